"""Chinese CLIP pretraining and fine-tuning recipe."""
