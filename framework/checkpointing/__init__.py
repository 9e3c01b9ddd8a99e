"""Checkpoints and resume: atomic checksummed saves, discovery and retention, integrity checks, the run-directory
lock and consolidation of sharded checkpoints. None of it is specific to distribution."""
