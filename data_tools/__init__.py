"""Dataset command-line tools; installed as chinese_clip.data_tools."""
