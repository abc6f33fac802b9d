"""The recipes' entry points (pretrain, finetune, evaluate, export, predict) and their configs;
installed as chinese_clip.recipes."""
