"""Every cross-field check of a training config, run right after composition and before any data is read.

``validate(cfg)`` raises one ``ConfigurationError`` (a ValueError) whose message is one sentence naming the
setting at fault and what to do. ``framework.run`` calls it on the composed config and again as the first
line of ``build_run`` (recipes and benches call that directly); ``fw-prepare`` and ``fw-plan`` (on the plan it
is about to write) call it too. The checks, in order: value ranges of single fields (positive sizes and
steps), the model (family x objective, shape, ``seq_len`` x ``max_seq_len``, the vocabulary the tokenizer
sets), the objective (masking fractions, span corruption's noise spans x the tokenizer's sentinels), the
optimizer and schedule, the data source, and the strategy x precision pair on the device the run will use.
Checks that need files (a checkpoint to resume, a tokenizer's contents) stay where those files are read.
"""

from __future__ import annotations

import math
from typing import Any

from framework.catalogue import objective_spec


class ConfigurationError(ValueError):
    """A setting the user can fix; the console commands print it as one line (exit status 2), not a traceback."""


def validate(cfg, device=None, *, check_device: bool = True) -> None:
    """Raise ``ConfigurationError`` for the first setting of ``cfg`` (a ``framework.config.TrainConfig``) that
    cannot run; ``device``: a ``framework.distributed.precision.DeviceInfo`` (default: the one
    ``trainer.accelerator`` resolves to here). ``check_device=False``: the run executes on another machine
    (``fw-prepare`` on a CPU node), so the strategy x precision pair is not checked against this one."""
    try:
        _check_ranges(cfg)
        model = _check_model(cfg)
        _check_objective(cfg, model)
        _check_optim(cfg)
        _check_data(cfg.data)
        _check_callbacks(cfg)
        if check_device:
            _check_device(cfg, device)
    except ConfigurationError:
        raise
    except (ValueError, KeyError) as err:  # the existing checks' one-sentence ValueErrors
        raise ConfigurationError(str(err).strip("'\"")) from None


# ------------------------------------------------------------------------------------------ single fields
def positive_int(value: Any, key: str, hint: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError(f"{key}={value} must be a positive integer; {hint}.")


def _check_ranges(cfg) -> None:
    t, d, c, o = cfg.trainer, cfg.data, cfg.callbacks, cfg.optim
    positive_int(t.max_steps, "trainer.max_steps", "it is the number of optimizer steps to train, e.g. 1000")
    positive_int(t.accumulate_grad_batches, "trainer.accumulate_grad_batches",
                 "it is the number of micro-batches per optimizer step (1 = no accumulation)")
    positive_int(t.val_check_interval, "trainer.val_check_interval", "it counts micro-batches between validations")
    positive_int(t.log_every_n_steps, "trainer.log_every_n_steps", "e.g. 10")
    positive_int(t.num_nodes, "trainer.num_nodes", "e.g. 1")
    _check_devices(t.devices)
    if not (isinstance(t.gradient_clip_val, (int, float)) and t.gradient_clip_val >= 0):
        raise ConfigurationError(f"trainer.gradient_clip_val={t.gradient_clip_val} must be >= 0 (0 = no clipping).")
    positive_int(d.seq_len, "data.seq_len", "it is the model's sequence length in tokens, e.g. 256")
    positive_int(d.micro_batch_size, "data.micro_batch_size", "it is the sequences per device per forward pass")
    positive_int(d.val_windows, "data.val_windows", "it is the validation windows evaluated each time")
    positive_int(d.text_document_chars, "data.text_document_chars", "e.g. 10000")
    positive_int(d.shard_tokens, "data.shard_tokens", "e.g. 50000000")
    positive_int(d.prepare_chunk_bytes, "data.prepare_chunk_bytes", "e.g. 256000")
    if isinstance(d.num_proc, bool) or not isinstance(d.num_proc, int) or d.num_proc < 0:
        raise ConfigurationError(f"data.num_proc={d.num_proc} must be >= 0: 0 tokenizes here with the tokenizer's "
                                 "thread pool, 1 here single-threaded, N >= 2 in N processes.")
    if d.max_documents < 0 or d.min_document_chars < 0:
        raise ConfigurationError(f"data.max_documents={d.max_documents} and data.min_document_chars="
                                 f"{d.min_document_chars} must be >= 0 (max_documents 0 = all documents).")
    if not 0.0 < d.val_fraction < 1.0:
        raise ConfigurationError(f"data.val_fraction={d.val_fraction} must be strictly between 0 and 1.")
    if d.num_workers < -1:
        raise ConfigurationError(f"data.num_workers={d.num_workers} must be >= 0, or -1 to choose automatically.")
    positive_int(c.checkpoint_every_n_steps, "callbacks.checkpoint_every_n_steps",
                 "it is the optimizer steps between checkpoints, e.g. 100")
    if not isinstance(c.keep_checkpoints, int) or c.keep_checkpoints < -1:
        raise ConfigurationError(f"callbacks.keep_checkpoints={c.keep_checkpoints} must be >= 0, or -1 to keep all.")
    positive_int(c.throughput_window, "callbacks.throughput_window", "it is the micro-batches averaged, e.g. 20")
    if not (math.isfinite(o.lr) and o.lr > 0):
        raise ConfigurationError(f"optim.lr={o.lr} must be a positive learning rate such as 3e-4.")
    if not (math.isfinite(o.weight_decay) and o.weight_decay >= 0):
        raise ConfigurationError(f"optim.weight_decay={o.weight_decay} must be >= 0.")
    if len(o.betas) != 2 or not all(0.0 <= b < 1.0 for b in o.betas):
        raise ConfigurationError(f"optim.betas={list(o.betas)} must be two numbers in [0, 1) such as [0.9, 0.95].")
    if not o.eps > 0 or o.warmup_steps < 0:
        raise ConfigurationError(f"optim.eps={o.eps} must be positive and optim.warmup_steps={o.warmup_steps} >= 0.")


def _check_devices(devices: Any) -> None:
    """Lightning's ``devices``: a positive count, -1 or "auto" (all visible), or a non-empty list of indices."""
    if isinstance(devices, str):
        ok = devices == "auto" or devices.strip() == "-1" or (devices.strip().isdigit() and int(devices) > 0) or (
            "," in devices and all(p.strip().isdigit() for p in devices.split(",") if p.strip()))
    elif isinstance(devices, (list, tuple)):
        ok = len(devices) > 0 and all(isinstance(i, int) and i >= 0 for i in devices)
    else:
        ok = isinstance(devices, int) and not isinstance(devices, bool) and (devices >= 1 or devices == -1)
    if not ok:
        raise ConfigurationError(f"trainer.devices={devices} must be a positive number of devices, -1 or auto (all "
                                 "visible ones), or a list of device indices such as [0,1].")


# ------------------------------------------------------------------------------------------------- model
MODEL_POSITIVE = ("d_model", "n_layers", "n_heads", "max_seq_len", "pad_vocab_multiple", "ffn_multiple")
MODEL_NON_NEGATIVE = ("n_decoder_layers", "n_kv_heads", "head_dim", "d_ff")  # 0 = derived from the others


def _check_model(cfg):
    """The resolved ModelConfig, after refusing sizes that cannot build a model and a family the objective
    does not train."""
    from framework.config import resolve_model

    spec = cfg.model
    for key in MODEL_POSITIVE:
        value = getattr(spec, key, None)
        if value is not None:
            positive_int(value, f"model.{key}", "set it to a positive size or leave it to the model preset")
    for key in MODEL_NON_NEGATIVE:
        value = getattr(spec, key, None)
        if value is not None and value < 0:
            raise ConfigurationError(f"model.{key}={value} must be >= 0 (0 derives it from the other sizes).")
    if getattr(spec, "vocab_size", None):
        raise ConfigurationError(
            f"model.vocab_size={spec.vocab_size} would be replaced by the tokenizer's vocabulary; remove it and set "
            "data.vocab_size (the tokenizer trained) or data.tokenizer_path (a given tokenizer) instead.")
    model = resolve_model(spec)
    objective = objective_spec(cfg.objective.name)
    if model.family != objective.family:
        raise ConfigurationError(
            f"objective={objective.name} trains {objective.family!r} models, but the model preset {model.name!r} is "
            f"of family {model.family!r}; pick a preset of family {objective.family!r} (see `model=` options in "
            f"conf/model/, e.g. model={objective.default_model}).")
    if cfg.data.seq_len > model.max_seq_len:
        raise ConfigurationError(f"data.seq_len={cfg.data.seq_len} exceeds model.max_seq_len={model.max_seq_len}; "
                                 "lower data.seq_len or raise model.max_seq_len.")
    return model


# --------------------------------------------------------------------------------------------- objective
def max_span_corruption_seq_len(num_sentinels: int, noise_density: float = 0.15,
                                mean_noise_span_length: float = 3.0) -> int:
    """The longest ``data.seq_len`` whose span-corruption windows make at most ``num_sentinels`` noise spans
    (each span is replaced by its own sentinel <extra_id_i>): 1,809 at T5's defaults with 100 sentinels."""
    lo, hi = 1, 1
    while _noise_spans(hi * 2, noise_density, mean_noise_span_length) <= num_sentinels:
        hi *= 2
    hi *= 2  # spans(hi) > num_sentinels >= spans(lo); the count grows with seq_len
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if _noise_spans(mid, noise_density, mean_noise_span_length) <= num_sentinels else (lo, mid)
    return lo


def _noise_spans(seq_len: int, noise_density: float, mean_noise_span_length: float) -> int:
    from framework.data.collators import noise_mask_counts, random_spans_helper

    tokens_length, _ = random_spans_helper(seq_len, noise_density, mean_noise_span_length)
    return noise_mask_counts(tokens_length, noise_density, mean_noise_span_length)[1]


def _check_objective(cfg, model) -> None:
    o, seq_len = cfg.objective, cfg.data.seq_len
    if o.name == "mlm":
        if not 0.0 < o.mask_probability < 1.0:
            raise ConfigurationError(f"objective.mask_probability={o.mask_probability} must be strictly between 0 and 1.")
        if min(o.mask_token_fraction, o.random_token_fraction) < 0 or o.mask_token_fraction + o.random_token_fraction > 1:
            raise ConfigurationError(f"objective.mask_token_fraction={o.mask_token_fraction} and "
                                     f"objective.random_token_fraction={o.random_token_fraction} must be >= 0 and sum "
                                     "to at most 1.")
    if o.name != "span_corruption":
        return
    if not 0.0 < o.noise_density < 1.0:
        raise ConfigurationError(f"objective.noise_density={o.noise_density} must be strictly between 0 and 1.")
    if o.mean_noise_span_length < 1.0:
        raise ConfigurationError(f"objective.mean_noise_span_length={o.mean_noise_span_length} must be at least 1.")
    from framework.data.tokenizer import NUM_SENTINELS  # the sentinels every tokenizer gets (appended if missing)

    spans = _noise_spans(seq_len, o.noise_density, o.mean_noise_span_length)
    if spans > NUM_SENTINELS:
        longest = max_span_corruption_seq_len(NUM_SENTINELS, o.noise_density, o.mean_noise_span_length)
        raise ConfigurationError(
            f"data.seq_len={seq_len} gives span corruption {spans} noise spans per window, more than the tokenizer's "
            f"{NUM_SENTINELS} sentinel tokens; use data.seq_len<={longest} or raise objective.mean_noise_span_length.")


# ------------------------------------------------------------------------------- optimizer, data, callbacks
def _check_optim(cfg) -> None:
    from framework.objectives.config import check_optim

    check_optim(cfg.optim, cfg.trainer.max_steps, cfg.strategy)


def _check_data(data) -> None:
    from framework.data.curation import check_config
    from framework.data.tokenizer import OBJECTIVE_ROLES, tokenizer_settings

    if data.mixture:
        from framework.data.mixture import mixture_weights, source_config

        mixture_weights(data)
        for name in data.mixture:
            _check_source(source_config(data, name), f"data.sources.{name}.")
    else:
        _check_source(data, "data.")
    if not data.tokenizer_path:  # the framework trains one: its vocabulary must hold bytes + special tokens
        tokenizer_settings(data.vocab_size, data.tokenizer_train_bytes)
    if data.special_tokens_for not in OBJECTIVE_ROLES:
        raise ConfigurationError(f"data.special_tokens_for={data.special_tokens_for!r} is not one of "
                                 f"{sorted(OBJECTIVE_ROLES)}.")
    check_config(data.curation)


SOURCES = ("stdlib", "licenses", "files", "hub")


def _check_source(data, prefix: str) -> None:
    if data.source not in SOURCES:
        raise ConfigurationError(f"{prefix}source={data.source!r} is not one of {', '.join(map(repr, SOURCES))}.")
    if data.source == "files" and not data.paths:
        raise ConfigurationError(f"{prefix}source=files needs {prefix}paths=[...] (text, JSONL or Parquet files).")
    if data.source == "hub" and not data.hub_name:
        raise ConfigurationError(f"{prefix}source=hub needs {prefix}hub_name=<a datasets hub name>.")


def _check_callbacks(cfg) -> None:
    c = cfg.callbacks
    if c.spike_guard.enabled:
        from framework.callbacks.spike_guard import check_spike_guard

        check_spike_guard(c.spike_guard, cfg.strategy.name, str(cfg.precision.mode))
    if c.icl_task:
        from pathlib import Path

        raise ConfigurationError(
            f"callbacks.icl_task was retired with fw-icl; evaluate through lm-evaluation-harness with "
            f"callbacks.eval_tasks=[{Path(c.icl_task).stem}] (local tasks in framework/evaluation/tasks/) and "
            "callbacks.eval_shots.")
    if c.eval_tasks:  # an unknown task fails now, not after training
        from framework.evaluation.local_tasks import check_eval_settings

        check_eval_settings(c.eval_tasks, c.eval_shots)


def _check_device(cfg, device) -> None:
    from framework.distributed.precision import check_strategy_precision, detect_device

    device = device if device is not None else detect_device(cfg.trainer.accelerator)
    check_strategy_precision(cfg.strategy, cfg.precision.mode, device)


__all__ = ["ConfigurationError", "validate", "max_span_corruption_seq_len", "positive_int"]
