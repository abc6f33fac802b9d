import pytest

from chinese_clip.config import ModelConfig, TextConfig, VisionConfig


@pytest.fixture
def tiny_model_cfg() -> ModelConfig:
    """A model small enough to run forwards and backwards in milliseconds."""
    return ModelConfig(
        embed_dim=16,
        vision=VisionConfig(image_size=32, patch_size=8, width=32, layers=2, heads=2),
        text=TextConfig(vocab_size=21128, hidden_size=32, layers=2, heads=2, intermediate_size=64,
                        max_position_embeddings=64, dropout=0.0),
    )
