"""Evaluation of pretrained checkpoints beyond validation loss: zero-/few-shot tasks through lm-evaluation-harness
(``harness``: the model class and runner; ``scoring``: log-likelihood per model family; ``local_tasks``: the task
YAMLs that ship in ``tasks/``; ``cli``: the ``fw-eval`` command)."""
