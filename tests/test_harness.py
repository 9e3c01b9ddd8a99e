"""Evaluation through lm-evaluation-harness: the prompts it builds and the scores it reports equal log-likelihoods
computed by hand; every model family's scoring by hand; local tasks only; unknown tasks and damaged checkpoints
refused in one line."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from framework.evaluation.local_tasks import local_tasks, resolve_tasks
from framework.evaluation.scoring import rolling_requests, score_requests

REPO = Path(__file__).resolve().parent.parent
SPECIAL = {"pad": 0, "bos": 1, "eos": 2, "unk": 3, "mask": 4, "sentinels": list(range(5, 105))}


class CumulativeBag(nn.Module):
    """A causal "decoder" whose logits at t are the sum of ``table`` rows of the tokens up to t, so a few-shot
    example changes the query's scores: logits[t] = sum_{s <= t} table[x_s]."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = nn.Parameter(table)
        self.config = type("C", (), {"max_seq_len": 64})()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.table[input_ids].cumsum(dim=1)  # (B, T, V)


def _word_tokenizer(words: list[str]):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["<pad>", "<bos>", "<eos>", "<unk>", "<mask>"] + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()  # "Label:" -> "Label", ":"
    return tok, vocab


def _bag_logprob(weights: dict, vocab: dict, context: list[str], continuation: list[str]) -> float:
    """By hand, in plain Python: sum over continuation tokens of log softmax(sum of weight rows so far)."""
    total, seen = 0.0, list(context)
    for token in continuation:
        logits = [sum(weights.get((w, v), 0.0) for w in seen) for v in vocab]
        log_z = math.log(sum(math.exp(x) for x in logits))
        total += logits[vocab[token]] - log_z
        seen.append(token)
    return total


def _write_task(directory: Path) -> None:
    (directory / "colours.jsonl").write_text('{"input": "apple", "label": "fruit"}\n'
                                             '{"input": "red", "label": "a colour"}\n')
    (directory / "colours.yaml").write_text(
        "task: colours\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    train: colours.jsonl\n"
        "test_split: train\nfewshot_split: train\noutput_type: multiple_choice\n"
        "description: \"Fruit or colour?\\n\\n\"\ndoc_to_text: \"Input: {{input}}\\nLabel:\"\n"
        "doc_to_choice: [\"fruit\", \"a colour\"]\ndoc_to_target: \"{{label}}\"\ntarget_delimiter: \" \"\n"
        "fewshot_delimiter: \"\\n\\n\"\nmetric_list:\n  - metric: acc\n")


def test_harness_few_shot_scores_equal_hand_computed_loglikelihoods(tmp_path, monkeypatch):
    from framework.evaluation.harness import FrameworkLM, run_evaluation

    def no_network(*args, **kwargs):
        raise AssertionError("the evaluation tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    _write_task(tmp_path)
    tok, vocab = _word_tokenizer(["Fruit", "or", "colour", "?", "Input", "Label", ":", "apple", "red", "fruit", "a"])
    # ":" pulls towards "fruit" (0-shot: "apple" right, "red" wrong, acc 0.5); "red" and a shown "fruit" label pull
    # towards "a": with the other example in the prompt both are right (1-shot acc 1.0); the <eos> the decoder is
    # scored after (a document start, as in training) counts too
    weights = {(":", "fruit"): 0.5, ("red", "a"): 1.0, ("fruit", "a"): 3.0, ("a", "colour"): 3.0, ("<eos>", "a"): 0.2}
    table = torch.zeros(len(vocab), len(vocab))
    for (w, v), x in weights.items():
        table[vocab[w], vocab[v]] = x
    lm = FrameworkLM(model=CumulativeBag(table), family="decoder", special=SPECIAL, tokenizer_obj=tok)
    results = run_evaluation(lm, ["colours"], shots=[0, 1], include_paths=[tmp_path], log_samples=True)

    head = ["<eos>", "Fruit", "or", "colour", "?"]
    shown = {"apple": ["Input", ":", "apple", "Label", ":", "fruit"],
             "red": ["Input", ":", "red", "Label", ":", "a", "colour"]}
    other = {"apple": "red", "red": "apple"}
    for k, expected_acc in ((0, 0.5), (1, 1.0)):
        assert results["colours"][k]["acc"] == expected_acc and results["colours"][k]["n"] == 2
        for sample in results["colours"][k]["samples"]:
            query = sample["doc"]["input"]
            prompt = "Fruit or colour?\n\n" + (f"Input: {other[query]}\nLabel: {sample_label(other[query])}\n\n"
                                               if k else "") + f"Input: {query}\nLabel:"
            assert [a[0] for a in sample["arguments"]] == [prompt, prompt]  # the harness's exact prompt
            context = head + (shown[other[query]] if k else []) + ["Input", ":", query, "Label", ":"]
            expected = [_bag_logprob(weights, vocab, context, ["fruit"]),
                        _bag_logprob(weights, vocab, context, ["a", "colour"])]
            assert [r[0][0] for r in sample["resps"]] == pytest.approx(expected, abs=1e-5)


def sample_label(query: str) -> str:
    return {"apple": "fruit", "red": "a colour"}[query]


class Bigram(nn.Module):
    """logits[t] = table[input[t]]: the next token depends on the current one only."""

    def __init__(self, table: torch.Tensor, max_seq_len: int = 64) -> None:
        super().__init__()
        self.table = nn.Parameter(table)
        self.config = type("C", (), {"max_seq_len": max_seq_len})()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.table[input_ids]


def test_rolling_loglikelihood_over_windows_equals_the_bigram_chain():
    """With windows of 4 tokens each conditioned on the token before it, a bigram's rolling log-likelihood is the
    exact chain sum log p(x_1 | <eos>) + sum_i log p(x_i | x_{i-1})."""
    from framework.evaluation.harness import FrameworkLM

    torch.manual_seed(0)
    table = torch.randn(12, 12)
    tok, vocab = _word_tokenizer(list("abcdefg"))
    lm = FrameworkLM(model=Bigram(table, max_seq_len=4), family="decoder", special=SPECIAL, tokenizer_obj=tok)
    text = "a c b g f e d a b"
    ids = [vocab[w] for w in text.split()]
    assert rolling_requests("decoder", ids, 4)[1] == (ids[3:4], ids[4:8])
    logp = table.log_softmax(-1)
    chain = sum(float(logp[prev, cur]) for prev, cur in zip([SPECIAL["eos"]] + ids[:-1], ids))
    request = type("Instance", (), {"args": (text,)})()
    assert lm.loglikelihood_rolling([request]) == pytest.approx([chain], abs=1e-5)


class LeftNeighbour(nn.Module):
    """A bidirectional "encoder": logits[t] = table[input[t-1]]."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = nn.Parameter(table)
        self.config = type("C", (), {"max_seq_len": 64})()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.table[torch.cat([input_ids[:, :1], input_ids[:, :-1]], dim=1)]


class DecoderSide(nn.Module):
    """An "encoder-decoder" whose logits depend on the current decoder input token only."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = nn.Parameter(table)
        self.config = type("C", (), {"max_seq_len": 64})()

    def forward(self, input_ids: torch.Tensor, decoder_input_ids: torch.Tensor) -> torch.Tensor:
        return self.table[decoder_input_ids]


def test_each_family_scores_by_hand_with_greedy_flags():
    V = 120
    table = torch.zeros(V, V)
    table[110, 111] = math.log(3.0)  # p(111 | 110) = 3 / (119 + 3)
    table[111, 112] = math.log(5.0)  # p(112 | 111) = 5 / (119 + 5)
    table[5, 111] = math.log(7.0)  # after the sentinel <extra_id_0> (id 5): p(111) = 7 / (119 + 7)
    requests = [([109, 110], [111, 112]), ([109, 110], [113])]
    # decoder: the continuation 111 112 after 110 is the argmax chain; 113 is not
    dec = score_requests(Bigram(table), "decoder", requests, SPECIAL, batch_size=1)
    assert dec == [(pytest.approx(math.log(3 / 122) + math.log(5 / 124), abs=1e-6), True),
                   (pytest.approx(math.log(1 / 122), abs=1e-6), False)]
    # encoder: masking token j leaves its left neighbour visible, so PLL = log p(111|110) + log p(112|111)
    pll = score_requests(LeftNeighbour(table), "encoder", requests, SPECIAL)
    assert pll == [(pytest.approx(math.log(3 / 122) + math.log(5 / 124), abs=1e-6), True),
                   (pytest.approx(math.log(1 / 122), abs=1e-6), False)]
    # encoder-decoder: the decoder reads <pad> <extra_id_0> 111 and scores 111, 112 (not the sentinel)
    s2s = score_requests(DecoderSide(table), "encoder_decoder", requests, SPECIAL)
    assert s2s == [(pytest.approx(math.log(7 / 126) + math.log(5 / 124), abs=1e-6), True),
                   (pytest.approx(math.log(1 / 126), abs=1e-6), False)]


def test_shipped_tasks_are_local_and_balanced():
    tasks = local_tasks()
    assert {"docstring_topic", "docstring_return"} <= set(tasks)
    for name, choices, per_label in (("docstring_topic", ["number", "string"], 20),
                                     ("docstring_return", ["bool", "int", "str", "list"], 6)):
        records = [json.loads(line) for line in (tasks[name].parent / f"{name}.jsonl").read_text().splitlines()]
        assert all(sum(r["label"] == c for r in records) == per_label for c in choices)
    with pytest.raises(ValueError, match="unknown evaluation task 'nope'; the local tasks are: .*docstring_topic"):
        resolve_tasks(["docstring_topic", "nope"])


def test_fw_eval_refuses_an_unknown_task_and_a_damaged_checkpoint_in_one_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "framework", "eval"]
    unknown = subprocess.run(command + [str(tmp_path / "none.ckpt"), "--tasks", "hellaswag"], env=env,
                             capture_output=True, text=True, timeout=120)
    assert unknown.returncode == 2 and unknown.stdout == ""
    assert unknown.stderr.count("\n") == 1 and "unknown evaluation task 'hellaswag'" in unknown.stderr
    assert "docstring_topic" in unknown.stderr
    damaged = tmp_path / "last.ckpt"
    damaged.write_bytes(b"not a checkpoint")
    bad = subprocess.run(command + [str(damaged), "--tasks", "docstring_topic"], env=env, capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "is not a PyTorch checkpoint" in bad.stderr


def test_shipped_task_through_the_harness_with_a_planted_model(tmp_path, monkeypatch):
    """On docstring_topic, a model that always prefers the token "number" scores exactly the share of "number"
    labels, 0.5, at every number of shots (few-shot examples drawn from all 40) (the data files resolve beside the YAML, from any working directory)."""
    from framework.evaluation.harness import FrameworkLM, run_evaluation

    records = [json.loads(line) for line in (local_tasks()["docstring_topic"].parent / "docstring_topic.jsonl")
               .read_text().splitlines()]
    words = {w for r in records for w in (r["input"] + " " + r["label"]).replace(".", " ").replace(",", " ").split()}
    tok, vocab = _word_tokenizer(sorted(words | {"Does", "each", "Python", "docstring", "describe", "an", "operation",
                                                 "on", "numbers", "or", "strings", "?", "Input", "Label", ":"}))
    table = torch.zeros(len(vocab), len(vocab))
    table[:, vocab["number"]] = 5.0
    lm = FrameworkLM(model=Bigram(table), family="decoder", special=SPECIAL, tokenizer_obj=tok)
    monkeypatch.chdir(tmp_path)
    results = run_evaluation(lm, ["docstring_topic"], shots=[0, 3], limit=10)  # the first 10 alternate labels
    assert {k: (r["acc"], r["n"]) for k, r in results["docstring_topic"].items()} == {0: (0.5, 10), 3: (0.5, 10)}


def test_training_refuses_an_unknown_eval_task_and_the_retired_icl_task_before_any_data(compose, tmp_path):
    from framework.config import to_run_config
    from framework.run import ConfigurationError, run

    for override, message in (("callbacks.eval_tasks=[docstring_topic,nope]", "unknown evaluation task 'nope'"),
                              ("callbacks.icl_task=x/docstring_topic.jsonl",
                               "with callbacks.eval_tasks=[docstring_topic]")):
        cache = tmp_path / "cache"
        cfg = to_run_config(compose([override, f"data.cache_dir={cache}"]))
        with pytest.raises(ConfigurationError, match=message.replace("[", r"\[").replace("]", r"\]")):
            run(cfg, tmp_path / "run")
        assert not cache.exists()  # refused before any data was prepared


def test_generate_until_decodes_greedily_and_stops_at_the_until_string():
    """A bigram whose argmax successor cycles a -> b -> c -> . -> a: from "a" the greedy text is "b c . a b ...",
    cut before the first "."; a family that cannot generate refuses in one sentence."""
    from framework.evaluation.harness import FrameworkLM

    tok, vocab = _word_tokenizer(["a", "b", "c", "."])
    table = torch.zeros(len(vocab), len(vocab))
    for current, successor in (("a", "b"), ("b", "c"), ("c", "."), (".", "a")):
        table[vocab[current], vocab[successor]] = 5.0
    lm = FrameworkLM(model=Bigram(table), family="decoder", special=SPECIAL, tokenizer_obj=tok)
    request = type("Instance", (), {"args": ("a", {"until": ["."], "max_gen_toks": 6}), "kwargs": {}})()
    assert lm.generate_until([request]) == ["b c "]
    encoder = FrameworkLM(model=LeftNeighbour(table), family="encoder", special=SPECIAL, tokenizer_obj=tok)
    with pytest.raises(NotImplementedError, match="generation tasks need a decoder checkpoint"):
        encoder.generate_until([request])
