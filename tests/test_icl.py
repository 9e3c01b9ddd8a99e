"""In-context evaluation: exact few-shot prompts, label scoring by hand, the shipped task end to end."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from framework.evaluation.icl import (
    DEFAULT_TASK,
    Example,
    Task,
    build_prompt,
    choose_shots,
    evaluate,
    load_task,
    score_continuations,
)

SPECIAL = {"pad": 0, "bos": 1, "eos": 2, "unk": 3, "mask": 4, "sentinels": list(range(5, 105))}

TASK = Task("t", "Is it a fruit or a colour?", ("fruit", "colour"),
            (Example("apple", "fruit"), Example("red", "colour"), Example("pear", "fruit"), Example("blue", "colour"),
             Example("plum", "fruit")))


def test_prompt_for_0_1_and_3_shots():
    assert build_prompt(TASK.instruction, [], "lime") == "Is it a fruit or a colour?\n\nInput: lime\nLabel:"
    assert build_prompt(TASK.instruction, TASK.examples[:1], "lime") == (
        "Is it a fruit or a colour?\n\n"
        "Input: apple\nLabel: fruit\n\n"
        "Input: lime\nLabel:")
    assert build_prompt(TASK.instruction, TASK.examples[:3], "lime") == (
        "Is it a fruit or a colour?\n\n"
        "Input: apple\nLabel: fruit\n\n"
        "Input: red\nLabel: colour\n\n"
        "Input: pear\nLabel: fruit\n\n"
        "Input: lime\nLabel:")
    assert build_prompt("", [], "lime") == "Input: lime\nLabel:"


def test_shots_exclude_the_query_are_seeded_and_nested():
    for qi in range(len(TASK.examples)):
        three = choose_shots(TASK, qi, 3, seed=0)
        assert TASK.examples[qi] not in three and len(set(three)) == 3
        assert choose_shots(TASK, qi, 1, seed=0) == three[:1]
        assert choose_shots(TASK, qi, 3, seed=0) == three
    assert choose_shots(TASK, 0, 0) == []
    assert any(choose_shots(TASK, qi, 3, seed=0) != choose_shots(TASK, qi, 3, seed=1) for qi in range(5))
    with pytest.raises(ValueError, match="shots need"):
        choose_shots(TASK, 0, 5)


class Bigram(nn.Module):
    """A decoder whose next-token logits depend on the current token only: logits[t] = table[input[t]]."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = nn.Parameter(table)
        self.config = type("C", (), {"max_seq_len": 64})()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.table[input_ids]  # (B, T, V)


def test_label_scoring_by_hand():
    # vocabulary of 8; context [5, 6]; label A = [7, 5], label B = [6]
    V = 8
    table = torch.zeros(V, V)
    table[6, 7] = math.log(3.0)  # after 6: p(7) = 3 / (7 + 3) = 0.3, p(6) = 1 / 10
    table[7, 5] = math.log(5.0)  # after 7: p(5) = 5 / (7 + 5)
    model = Bigram(table)
    scores = score_continuations(model, "decoder", [5, 6], [[7, 5], [6]], SPECIAL)
    log_a = math.log(3 / 10) + math.log(5 / 12)  # -2.0794
    log_b = math.log(1 / 10)  # -2.3026
    assert scores == pytest.approx([log_a, log_b], abs=1e-6)
    assert max(range(2), key=lambda i: scores[i]) == 0  # A wins on the sum although its first token is less likely
    # make B's single token likelier than A's two together: B wins
    table[6, 6] = math.log(4.0)
    scores = score_continuations(Bigram(table), "decoder", [5, 6], [[7, 5], [6]], SPECIAL)
    assert scores == pytest.approx([math.log(3 / 13) + math.log(5 / 12), math.log(4 / 13)], abs=1e-6)
    assert scores[1] > scores[0]


def test_shipped_task_loads_balanced():
    task = load_task(DEFAULT_TASK)
    assert len(task.examples) == 40 and task.choices == ("number", "string")
    assert sum(e.label == "number" for e in task.examples) == 20


def test_bad_task_file_is_a_clear_error(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"choices": ["a", "b"]}\n{"input": "x", "label": "c"}\n')
    with pytest.raises(ValueError, match="not one of the header's choices"):
        load_task(path)


def test_evaluate_end_to_end_with_planted_models():
    """On the shipped task, a decoder that always prefers the token after "Label:" meaning "number" scores
    exactly the share of "number" labels, 0.5, for every number of shots."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    task = load_task(DEFAULT_TASK)
    words = sorted({w for e in task.examples for w in (e.input + " " + e.label).replace(".", " ").replace(",", " ")
                    .split()} | {"Input", "Label", "number", "string"})
    vocab = {w: i for i, w in enumerate(["<pad>", "<bos>", "<eos>", "<unk>", "<mask>"] + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    table = torch.zeros(len(vocab), len(vocab))
    table[:, vocab["number"]] = 5.0
    acc = evaluate(Bigram(table), "decoder", tok, SPECIAL, task, shots=(0, 1, 3))
    assert acc == {0: 0.5, 1: 0.5, 3: 0.5}


class LeftNeighbour(nn.Module):
    """A bidirectional "encoder" whose logits at t depend on the token at t-1 only: logits[t] = table[input[t-1]]."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = nn.Parameter(table)
        self.config = type("C", (), {"max_seq_len": 64})()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        previous = torch.cat([input_ids[:, :1], input_ids[:, :-1]], dim=1)
        return self.table[previous]


class DecoderSide(nn.Module):
    """An "encoder-decoder" whose logits depend on the current decoder input token only."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = nn.Parameter(table)
        self.config = type("C", (), {"max_seq_len": 64})()

    def forward(self, input_ids: torch.Tensor, decoder_input_ids: torch.Tensor) -> torch.Tensor:
        return self.table[decoder_input_ids]


def test_encoder_pseudo_log_likelihood_and_encoder_decoder_scoring_by_hand():
    V = 120
    table = torch.zeros(V, V)
    table[110, 111] = math.log(3.0)  # p(111 | 110) = 3 / (119 + 3)
    table[111, 112] = math.log(5.0)  # p(112 | 111) = 5 / (119 + 5)
    table[5, 111] = math.log(7.0)  # after the sentinel <extra_id_0> (id 5): p(111) = 7 / (119 + 7)
    # encoder: masking label token j leaves its left neighbour visible, so PLL = log p(111|110) + log p(112|111)
    pll = score_continuations(LeftNeighbour(table), "encoder", [109, 110], [[111, 112], [113]], SPECIAL)
    assert pll == pytest.approx([math.log(3 / 122) + math.log(5 / 124), math.log(1 / 122)], abs=1e-6)
    # encoder-decoder: decoder reads <pad> <extra_id_0> 111 and scores 111, 112 (not the sentinel)
    s2s = score_continuations(DecoderSide(table), "encoder_decoder", [109, 110], [[111, 112], [113]], SPECIAL)
    assert s2s == pytest.approx([math.log(7 / 126) + math.log(5 / 124), math.log(1 / 126)], abs=1e-6)
