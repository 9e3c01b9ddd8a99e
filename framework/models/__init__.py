"""Plain ``nn.Module`` models and their configuration."""

from framework.models.config import PRESETS, ModelConfig, count_parameters
from framework.models.decoder import Decoder


def build_model(config: ModelConfig):
    """The ``nn.Module`` for ``config.family``."""
    if config.family == "decoder":
        return Decoder(config)
    raise NotImplementedError(f"no model is registered for family {config.family!r} yet")


__all__ = ["ModelConfig", "PRESETS", "Decoder", "build_model", "count_parameters"]
