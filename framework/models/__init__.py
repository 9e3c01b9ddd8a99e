"""Plain ``nn.Module`` models and their configuration."""

from framework.models.config import PRESETS, ModelConfig, count_parameters
from framework.models.decoder import Decoder
from framework.models.encoder import Encoder
from framework.models.encoder_decoder import EncoderDecoder


def build_model(config: ModelConfig):
    """The ``nn.Module`` for ``config.family``."""
    if config.family == "decoder":
        return Decoder(config)
    if config.family == "encoder":
        return Encoder(config)
    if config.family == "encoder_decoder":
        return EncoderDecoder(config)
    raise NotImplementedError(f"no model is registered for family {config.family!r} yet")


__all__ = ["ModelConfig", "PRESETS", "Decoder", "Encoder", "EncoderDecoder", "build_model", "count_parameters"]
