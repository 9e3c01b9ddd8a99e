"""Causal-LM loss on hand-computed cases, the LR schedule and optimizer grouping."""

import math

import pytest
import torch

from framework.objectives.base import lr_lambda, param_groups
from framework.objectives.clm import next_token_loss
from framework.models import ModelConfig, build_model


def test_next_token_loss_on_a_hand_computed_case():
    # vocab of 3; position 0 predicts token 2 from logits [0, 0, ln 2] -> p = 2/4; position 1 predicts token 0
    # from logits [ln 3, 0, 0] -> p = 3/5. Loss = -(ln(1/2) + ln(3/5)) / 2.
    logits = torch.tensor([[[0.0, 0.0, math.log(2)], [math.log(3), 0.0, 0.0]]])
    targets = torch.tensor([[2, 0]])
    expected = -(math.log(0.5) + math.log(0.6)) / 2
    assert next_token_loss(logits, targets).item() == pytest.approx(expected, abs=1e-6)


def test_ignored_targets_do_not_count():
    logits = torch.tensor([[[0.0, 0.0, math.log(2)], [math.log(3), 0.0, 0.0]]])
    assert next_token_loss(logits, torch.tensor([[2, -100]])).item() == pytest.approx(-math.log(0.5), abs=1e-6)


def test_uniform_model_loss_is_log_vocab():
    logits = torch.zeros(2, 5, 17)
    assert next_token_loss(logits, torch.randint(0, 17, (2, 5))).item() == pytest.approx(math.log(17), abs=1e-6)


def test_lr_schedule_warmup_then_cosine_to_floor():
    f = lambda s: lr_lambda(s, warmup_steps=10, total_steps=110, min_lr_ratio=0.1)  # noqa: E731
    assert f(0) == pytest.approx(0.1)  # (0 + 1) / 10
    assert f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the cosine
    assert f(110) == pytest.approx(0.1)
    assert f(500) == pytest.approx(0.1)


def test_weight_decay_only_on_matrices_and_tied_weight_once():
    model = build_model(ModelConfig(d_model=16, n_layers=1, n_heads=2, vocab_size=50))
    decay, no_decay = param_groups(model, 0.1)
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    n = sum(p.numel() for g in (decay, no_decay) for p in g["params"])
    assert n == model.config.num_parameters()  # tied embedding/head counted exactly once
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.1
