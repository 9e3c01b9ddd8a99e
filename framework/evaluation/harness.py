"""Zero-, one- and few-shot evaluation of the framework's own models through lm-evaluation-harness, in-process.

``FrameworkLM`` is an ``lm_eval.api.model.LM`` (registered as ``framework``): the harness builds each task's prompts
(description, ``num_fewshot`` solved examples, query; Brown et al. 2020, sec. 2), and asks the model for
log-likelihoods, which ``framework.evaluation.scoring`` computes for every family (causal log-probability,
T5 span infilling, masked-LM pseudo-log-likelihood). Tasks are the local YAMLs of ``framework.evaluation.local_tasks``;
their ``data_files`` are resolved relative to the YAML and the Hub is switched off, so nothing reaches the network.

    from framework.evaluation.harness import FrameworkLM, run_evaluation
    results = run_evaluation(FrameworkLM.from_checkpoint("runs/default/checkpoints/last.ckpt"),
                             ["docstring_topic"], shots=[0, 1, 3])
    # {"docstring_topic": {0: {"acc": 0.55, "acc_stderr": 0.08, ..., "n": 40}, 1: {...}, 3: {...}}}
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from framework.catalogue import family_spec
from framework.evaluation.local_tasks import resolve_tasks, task_dirs
from framework.evaluation.scoring import rolling_requests, score_requests

OFFLINE_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


@contextlib.contextmanager
def offline():
    """The Hugging Face libraries offline while the harness runs (their flags are read at import, so the imported
    modules' constants are switched too), restored afterwards: a task can read local files only."""
    import datasets.config
    import huggingface_hub.constants as hub

    saved_env = {k: os.environ.get(k) for k in OFFLINE_ENV}
    saved = (datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE, hub.HF_HUB_OFFLINE)
    os.environ.update({k: "1" for k in OFFLINE_ENV})
    datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = hub.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE, hub.HF_HUB_OFFLINE = saved
        for k, v in saved_env.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


@register_model("framework")
class FrameworkLM(LM):
    """A framework model (a plain ``nn.Module`` from ``framework.models``) with its tokenizer, for the harness.

    Registered so that code which imports this module can also call ``lm_eval.simple_evaluate(model="framework",
    model_args={"checkpoint": ...})``; ``fw-eval`` and the end-of-training evaluation build it directly."""

    def __init__(self, checkpoint: str | None = None, tokenizer: str | None = None, device: str | None = None,
                 batch_size: int | str = 16, *, model=None, family: str | None = None, special: dict | None = None,
                 tokenizer_obj=None, **_ignored) -> None:
        super().__init__()
        if model is None:
            if checkpoint is None:
                raise ValueError("FrameworkLM needs checkpoint=<path to a .ckpt> (or a model object).")
            model, family, special, tokenizer_obj = load_for_eval(checkpoint, tokenizer)
        self.model, self.family, self.special, self.tokenizer = model, family, dict(special), tokenizer_obj
        if device:
            self.model.to(device)
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 16  # "auto" is not supported: 16

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path, tokenizer: str | None = None, device: str | None = None,
                        batch_size: int = 16) -> "FrameworkLM":
        return cls(str(checkpoint), tokenizer, device, batch_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def _pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Context and continuation tokenized apart; trailing spaces of the context move to the continuation
        (the harness's Hugging Face model does the same), so " number" is scored with its space."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        return self._encode(context), self._encode(continuation)

    def _score(self, requests: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        was_training = self.model.training
        self.model.eval()
        try:
            return score_requests(self.model, self.family, requests, self.special, self.batch_size)
        finally:
            self.model.train(was_training)

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        """(log p(continuation | context) in nats, whether the continuation is greedy) for each request."""
        results = self._score([self._pair(*r.args) for r in requests])
        for request, result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", request.args, result)
        return results

    def loglikelihood_rolling(self, requests) -> list[float]:
        """Total log-likelihood of each whole text (perplexity tasks), over disjoint windows of the model's length."""
        totals = []
        for request in requests:
            tokens = self._encode(request.args[0])
            windows = rolling_requests(self.family, tokens, self.model.config.max_seq_len)
            totals.append(sum(score for score, _ in self._score(windows)) if tokens else 0.0)
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, totals[-1])
        return totals

    def generate_until(self, requests) -> list[str]:
        """Greedy (or sampled, with do_sample) continuation of a decoder, cut at the first ``until`` string."""
        if family_spec(self.family).generates != "text":
            raise NotImplementedError(f"generation tasks need a decoder checkpoint; this one is {self.family}, "
                                      "which the harness can score with log-likelihood tasks only.")
        from framework.generate import generate

        outputs = []
        for request in requests:
            context, kwargs = request.args
            kwargs = dict(kwargs or {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.get("max_gen_toks", 64))
            ids = ([self.special["eos"]] + self._encode(context))[-(self.model.config.max_seq_len - max_new):]
            sample = bool(kwargs.get("do_sample", False))
            out = generate(self.model, torch.tensor([ids], device=self.device), max_new,
                           greedy=not sample, temperature=float(kwargs.get("temperature", 1.0) or 1.0),
                           eos_id=self.special["eos"], pad_id=self.special["pad"],
                           use_cache=hasattr(self.model, "new_kv_cache"))
            text = self.tokenizer.decode(out[0, len(ids):].tolist(), skip_special_tokens=True)
            cut = min([text.find(u) for u in until if u and u in text], default=len(text))
            outputs.append(text[:cut])
            self.cache_hook.add_partial("generate_until", request.args, outputs[-1])
        return outputs


def task_configs(names: list[str], include_paths: list[str | Path] | tuple = ()) -> list[dict]:
    """The harness configs of the named local tasks, with ``data_files`` made absolute (relative to the YAML)."""
    from lm_eval.tasks._yaml_loader import load_yaml  # resolves include: and !function like the TaskManager

    configs = []
    for name, path in resolve_tasks(names, include_paths).items():
        config = load_yaml(path, resolve_func=True)
        files = (config.get("dataset_kwargs") or {}).get("data_files")
        if files is not None:
            absolute = lambda f: str((path.parent / f).resolve())  # noqa: E731
            config["dataset_kwargs"]["data_files"] = (
                {split: absolute(f) for split, f in files.items()} if isinstance(files, dict)
                else [absolute(f) for f in files] if isinstance(files, list) else absolute(files))
        configs.append(config)
    return configs


def metrics_of(task_result: dict) -> dict[str, float]:
    """Harness keys "acc,none" -> "acc" (a filter other than "none" is kept as a suffix: "exact_match_strict")."""
    out = {}
    for key, value in task_result.items():
        if "," not in key or not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        metric, filter_name = key.split(",", 1)
        out[metric if filter_name == "none" else f"{metric}_{filter_name}"] = float(value)
    return out


def run_evaluation(lm: FrameworkLM, tasks: list[str], shots: list[int] = (0,), limit: int = 0,
                   include_paths: list[str | Path] | tuple = (), seed: int = 0, log_samples: bool = False) -> dict:
    """{task: {shots: {metric: value, ..., "n": examples}}} (and ``"samples"`` per shot with ``log_samples``).

    One harness run per number of shots; the few-shot examples come from the task's ``fewshot_split`` with the
    query left out, drawn by ``seed``. ``limit``: the first N examples of each task (0 = all). Returns {} on a
    process whose LOCAL_RANK is not 0 (the harness reports results there only)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=[str(d) for d in task_dirs(include_paths)], include_defaults=False)
    results: dict = {}
    for k in shots:
        with offline():
            out = lm_eval.simple_evaluate(model=lm, tasks=task_configs(tasks, include_paths), num_fewshot=k,
                                          limit=limit or None, task_manager=manager, bootstrap_iters=1000,
                                          log_samples=log_samples, random_seed=seed, fewshot_random_seed=seed)
        if out is None:
            return {}
        for name in tasks:
            n_shot = int(out["n-shot"].get(name, k))  # a YAML that pins num_fewshot: 0 keeps it
            entry = metrics_of(out["results"][name])
            entry["n"] = int(out["n-samples"][name]["effective"])
            if log_samples:
                entry["samples"] = out["samples"][name]
            results.setdefault(name, {})[n_shot] = entry
    return results


def flat_metrics(results: dict) -> dict[str, float]:
    """Logger keys: ``eval/<task>/<metric>_<k>shot``."""
    return {f"eval/{task}/{metric}_{k}shot": value for task, by_shot in results.items()
            for k, metrics in by_shot.items() for metric, value in metrics.items()
            if metric not in ("n", "samples") and not metric.endswith("_stderr")}


def format_table(results: dict) -> str:
    lines = [f"{'task':<24} {'shots':>5} {'metric':<16} {'value':>8} {'stderr':>8} {'n':>6}"]
    for task, by_shot in results.items():
        for k, metrics in by_shot.items():
            for metric, value in metrics.items():
                if metric in ("n", "samples") or metric.endswith("_stderr"):
                    continue
                stderr = metrics.get(f"{metric}_stderr")
                lines.append(f"{task:<24} {k:>5} {metric:<16} {value:>8.4f} "
                             f"{'' if stderr is None else f'{stderr:.4f}':>8} {metrics['n']:>6}")
    return "\n".join(lines)


def evaluate_after_training(trainer, module, tokenizer, tasks: list[str], shots, limit: int = 0) -> dict:
    """The end-of-training evaluation ``callbacks.eval_tasks`` asks for. Every rank runs it (a sharded model's
    forward needs all ranks); rank 0 prints the table and logs ``eval/<task>/<metric>_<k>shot`` to every logger."""
    import dataclasses

    lm = FrameworkLM(model=module.model, family=module.model_config.family,
                     special=dataclasses.asdict(module.special_ids), tokenizer_obj=tokenizer)
    results = run_evaluation(lm, list(tasks), list(shots), limit)
    if trainer.is_global_zero:
        print(format_table(results))
        for logger in trainer.loggers:
            logger.log_metrics(flat_metrics(results), step=trainer.global_step)
            logger.save()
    return results


def load_for_eval(checkpoint: str | Path, tokenizer: str | None = None):
    """(model, family, special ids, tokenizer) of a training checkpoint and its run directory's tokenizer."""
    from framework.data.tokenizer import load_tokenizer
    from framework.generate import find_tokenizer, load_checkpoint

    model, hp = load_checkpoint(checkpoint)
    tok = load_tokenizer(tokenizer or find_tokenizer(Path(checkpoint), hp.get("tokenizer_path", "")))
    return model, hp["model_config"]["family"], hp["special_ids"], tok
