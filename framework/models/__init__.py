"""Plain ``nn.Module`` models, their configuration and the family registry (``registry``)."""

from framework.models.config import PRESETS, ModelConfig, count_parameters
from framework.models.decoder import Decoder
from framework.models.encoder import Encoder
from framework.models.encoder_decoder import EncoderDecoder
from framework.models.registry import REGISTRY, build_model, family

__all__ = ["ModelConfig", "PRESETS", "Decoder", "Encoder", "EncoderDecoder", "REGISTRY", "build_model", "family",
           "count_parameters"]
