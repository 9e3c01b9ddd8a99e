"""framework: distributed LLM pretraining on PyTorch Lightning + Hydra."""

__version__ = "0.1.0"
