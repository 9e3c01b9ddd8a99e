"""In-context (zero-, one-, few-shot) evaluation of a pretrained checkpoint on a small labelled task.

Brown et al. 2020 ("Language Models are Few-Shot Learners", sec. 2): the model sees an instruction, k solved
examples and a query, and each candidate label is scored by its log-likelihood as the continuation; the
prediction is the label with the highest summed log-probability (no length normalisation), as in
lm-evaluation-harness's ``acc``.

Task file (JSONL): the first line is the header, every other line one example::

    {"name": "docstring_topic", "instruction": "Does each ...?", "choices": ["number", "string"]}
    {"input": "Return the square root of x.", "label": "number"}

Prompt for k shots (the examples are k other records, drawn by a seeded permutation, nested across k)::

    <instruction>\n\nInput: <x1>\nLabel: <y1>\n\n ... Input: <query>\nLabel:

and each label is scored as the continuation " <label>". Scoring per family:
- decoder: log p(label tokens | <eos> + prompt), the <eos> standing for a document start, as in training;
- encoder_decoder (span corruption): the encoder reads prompt + <extra_id_0>, the decoder scores
  <extra_id_0> + label tokens, T5's span-infilling format; only the label tokens count;
- encoder (masked LM): pseudo-log-likelihood (Salazar et al. 2020, "Masked Language Model Scoring"):
  each label token is masked in turn and its log-probability summed.

    python3 -m framework.evaluation.icl runs/default/checkpoints/last.ckpt \
        --task framework/evaluation/tasks/docstring_topic.jsonl --shots 0,1,3
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

DEFAULT_TASK = Path(__file__).resolve().parent / "tasks" / "docstring_topic.jsonl"


@dataclass(frozen=True)
class Example:
    input: str
    label: str


@dataclass(frozen=True)
class Task:
    name: str
    instruction: str
    choices: tuple[str, ...]
    examples: tuple[Example, ...]


def load_task(path: str | Path) -> Task:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no in-context task at {path}; pass a JSONL file (see framework/evaluation/tasks/).")
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not lines or "choices" not in lines[0]:
        raise ValueError(f"{path}: the first line must be a header with \"choices\" (and \"instruction\").")
    header, records = lines[0], lines[1:]
    choices = tuple(header["choices"])
    examples = []
    for i, r in enumerate(records, start=2):
        if "input" not in r or "label" not in r:
            raise ValueError(f"{path}:{i}: every example needs \"input\" and \"label\".")
        if r["label"] not in choices:
            raise ValueError(f"{path}:{i}: label {r['label']!r} is not one of the header's choices {list(choices)}.")
        examples.append(Example(str(r["input"]), str(r["label"])))
    if len(examples) < 2:
        raise ValueError(f"{path}: a task needs at least two examples.")
    return Task(header.get("name", path.stem), header.get("instruction", ""), choices, tuple(examples))


def build_prompt(instruction: str, shots: list[Example] | tuple[Example, ...], query: str) -> str:
    """The text the model conditions on; the scored continuation is " <label>"."""
    parts = [instruction] if instruction else []
    parts += [f"Input: {s.input}\nLabel: {s.label}" for s in shots]
    parts.append(f"Input: {query}\nLabel:")
    return "\n\n".join(parts)


def choose_shots(task: Task, query_index: int, k: int, seed: int = 0) -> list[Example]:
    """k examples other than the query, from a permutation seeded by (seed, query_index): the 1-shot example
    is the first of the 3-shot ones, so results across k differ only by the number of shots."""
    others = [e for i, e in enumerate(task.examples) if i != query_index]
    if k > len(others):
        raise ValueError(f"{k} shots need at least {k + 1} examples; the task has {len(task.examples)}.")
    random.Random(seed * 1_000_003 + query_index).shuffle(others)
    return others[:k]


# ----------------------------------------------------------------------------- scoring
@torch.no_grad()
def score_continuations(model: nn.Module, family: str, context: list[int], continuations: list[list[int]],
                        special: dict) -> list[float]:
    """Summed log-probability (nats) of each continuation's tokens given the context tokens."""
    if any(not c for c in continuations):
        raise ValueError("every label must encode to at least one token.")
    device = next(model.parameters()).device
    limit = model.config.max_seq_len
    if family == "decoder":
        context = [special["eos"]] + context
        longest = max(len(c) for c in continuations)
        context = context[-(limit + 1 - longest):]  # keep the end of a long prompt
        rows = [context + c for c in continuations]
        width = max(len(r) for r in rows)
        ids = torch.tensor([r + [special["pad"]] * (width - len(r)) for r in rows], device=device)
        logprobs = model(ids[:, :-1]).float().log_softmax(-1)  # (n, width-1, V); position t predicts token t+1
        scores = []
        for i, c in enumerate(continuations):
            start = len(context) - 1
            targets = torch.tensor(c, device=device)
            scores.append(float(logprobs[i, start : start + len(c)].gather(-1, targets[:, None]).sum()))
        return scores
    if family == "encoder_decoder":
        sentinel = special["sentinels"][0]
        enc = (context + [sentinel])[-(limit - 1):] + [special["eos"]]
        scores = []
        for c in continuations:
            target = [sentinel] + c
            logits = model(torch.tensor([enc], device=device), torch.tensor([[special["pad"]] + target[:-1]], device=device))
            logprobs = logits[0].float().log_softmax(-1)  # (len(target), V)
            picked = logprobs.gather(-1, torch.tensor(target, device=device)[:, None])[:, 0]
            scores.append(float(picked[1:].sum()))  # the label tokens, not the sentinel
        return scores
    if family == "encoder":
        scores = []
        for c in continuations:
            row = (context + c)[-limit:]
            start = len(row) - len(c)
            ids = torch.tensor([row] * len(c), device=device)
            positions = torch.arange(len(c), device=device)
            ids[positions, start + positions] = special["mask"]  # row j masks label token j
            logprobs = model(ids).float().log_softmax(-1)  # (len(c), T, V)
            scores.append(float(logprobs[positions, start + positions, torch.tensor(c, device=device)].sum()))
        return scores
    raise ValueError(f"no in-context scoring for model family {family!r}.")


def predict(model: nn.Module, family: str, tokenizer, special: dict, prompt: str, choices: tuple[str, ...]) -> int:
    context = tokenizer.encode(prompt, add_special_tokens=False).ids
    continuations = [tokenizer.encode(" " + choice, add_special_tokens=False).ids for choice in choices]
    scores = score_continuations(model, family, context, continuations, special)
    return max(range(len(choices)), key=lambda i: scores[i])


def evaluate(model: nn.Module, family: str, tokenizer, special: dict, task: Task, shots=(0, 1, 3), seed: int = 0,
             limit: int = 0) -> dict[int, float]:
    """Accuracy for each number of shots over the task's examples (the first ``limit`` as queries, 0 = all)."""
    was_training = model.training
    model.eval()
    queries = range(len(task.examples) if limit <= 0 else min(limit, len(task.examples)))
    accuracy = {}
    for k in shots:
        correct = 0
        for qi in queries:
            query = task.examples[qi]
            prompt = build_prompt(task.instruction, choose_shots(task, qi, k, seed), query.input)
            correct += task.choices[predict(model, family, tokenizer, special, prompt, task.choices)] == query.label
        accuracy[k] = correct / len(queries)
    model.train(was_training)
    return accuracy


def format_accuracy(task: Task, accuracy: dict[int, float], n: int) -> str:
    chance = 1.0 / len(task.choices)
    cells = ", ".join(f"{k}-shot {acc:.3f}" for k, acc in accuracy.items())
    return f"in-context accuracy on {task.name} ({n} queries, chance {chance:.3f}): {cells}"


def parse_shots(text: str | list | tuple) -> tuple[int, ...]:
    values = [int(s) for s in text.split(",")] if isinstance(text, str) else [int(s) for s in text]
    if not values or any(v < 0 for v in values):
        raise ValueError(f"shots={text!r} must be non-negative integers such as 0,1,3.")
    return tuple(values)


def evaluate_after_training(trainer, module, tokenizer, task_path: str, shots, limit: int = 0) -> dict[int, float]:
    """The end-of-training evaluation ``callbacks.icl_task`` asks for. Every rank runs it (a sharded model's
    forward needs all ranks); rank 0 prints the accuracies and logs them as ``icl/acc_<k>shot`` to every logger."""
    import dataclasses

    task = load_task(task_path)
    special = dataclasses.asdict(module.special_ids)
    accuracy = evaluate(module.model, module.model_config.family, tokenizer, special, task, parse_shots(shots),
                        limit=limit)
    if trainer.is_global_zero:
        n = len(task.examples) if limit <= 0 else min(limit, len(task.examples))
        print(format_accuracy(task, accuracy, n))
        for logger in trainer.loggers:
            logger.log_metrics({f"icl/acc_{k}shot": v for k, v in accuracy.items()}, step=trainer.global_step)
            logger.save()
    return accuracy


def main(argv: list[str] | None = None) -> dict[int, float]:
    p = argparse.ArgumentParser(prog="python3 -m framework.evaluation.icl", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="a .ckpt written by training")
    p.add_argument("--task", default=str(DEFAULT_TASK), help="labelled JSONL task (default: %(default)s)")
    p.add_argument("--shots", default="0,1,3", help="comma-separated numbers of examples in the prompt")
    p.add_argument("--seed", type=int, default=0, help="seed of the shot selection")
    p.add_argument("--limit", type=int, default=0, help="evaluate the first N examples only (0 = all)")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the run directory's)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    from framework.data.tokenizer import load_tokenizer
    from framework.generate import find_tokenizer, load_checkpoint

    model, hp = load_checkpoint(args.checkpoint)
    model.to(args.device)
    tok = load_tokenizer(args.tokenizer or find_tokenizer(Path(args.checkpoint), hp.get("tokenizer_path", "")))
    task = load_task(args.task)
    accuracy = evaluate(model, hp["model_config"]["family"], tok, hp["special_ids"], task, parse_shots(args.shots),
                        args.seed, args.limit)
    n = len(task.examples) if args.limit <= 0 else min(args.limit, len(task.examples))
    print(format_accuracy(task, accuracy, n))
    return accuracy


def cli() -> None:
    """Console entry point ``fw-icl`` (exit status 0; ``main`` returns the accuracies for callers)."""
    main()


if __name__ == "__main__":
    cli()
