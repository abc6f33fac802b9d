"""The package list: every package under chinese_clip/, and recipes/ and data_tools/ as
chinese_clip.recipes and chinese_clip.data_tools (their folders are mapped in pyproject.toml)."""
from setuptools import find_namespace_packages, setup

setup(packages=[*find_namespace_packages(include=["chinese_clip", "chinese_clip.*"]),
                "chinese_clip.recipes", "chinese_clip.data_tools"])
