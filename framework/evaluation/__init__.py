"""Evaluation of pretrained checkpoints beyond validation loss: in-context (zero-/few-shot) accuracy."""
