"""Model cards (Mitchell et al. 2019, "Model Cards for Model Reporting"): a README.md beside every trained model.

Written at the end of training into the run directory (with ``model_card.json``, the same facts as data) and
into every export. ``card_info_from_checkpoint`` rebuilds the facts from a checkpoint alone (architecture,
parameters, tokens seen, compute), enriched by the run directory's ``model_card.json`` when it is there.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from framework.catalogue import FAMILIES, OBJECTIVES, pf_days

CARD_JSON = "model_card.json"
USES = {
    "clm": "text continuation with `fw-generate`, few-shot prompting, and as a starting point for fine-tuning",
    "mlm": "filling in `<mask>` tokens with `fw-generate`, and as a text encoder to fine-tune for classification "
           "or retrieval; it does not generate free text",
    "span_corruption": "filling in `<extra_id_N>` spans with `fw-generate`, and as a starting point for "
                       "fine-tuning on text-to-text tasks",
}


@dataclass
class ModelCardInfo:
    name: str
    objective: str
    model_config: dict  # framework.models.ModelConfig as a dict
    parameters: int
    data: dict = field(default_factory=dict)  # source, description, tokens_seen, seq_len, documents, vocab_size
    compute: dict = field(default_factory=dict)  # flops, steps, devices, accelerator, precision
    results: dict = field(default_factory=dict)  # train_loss, val_loss_nats, val_ppl, eval (harness), ...


def _objective(name: str) -> str:
    return OBJECTIVES[name].description if name in OBJECTIVES else name


def _architecture(family: str) -> str:
    return FAMILIES[family].architecture if family in FAMILIES else family


def describe_data(data_cfg: Any, meta: dict | None = None) -> dict:
    """The facts about a run's data a card states, from its DataConfig and the prepared data's meta.json."""
    mixture = bool(getattr(data_cfg, "mixture", None))
    if mixture:  # each source described, with its share of the training tokens
        from framework.data.mixture import mixture_weights, source_config

        description = "a mixture of training tokens: " + "; ".join(
            f"{weight:.0%} {name} ({describe_data(source_config(data_cfg, name))['description']})"
            for name, weight in mixture_weights(data_cfg).items())
    elif data_cfg.source == "stdlib":
        description = "docstrings and pydoc topics of the Python standard library, the embedded corpus"
    elif data_cfg.source == "licenses":
        description = ("licence texts Debian/Ubuntu installs (/usr/share/common-licenses and every package's "
                       "copyright file), the embedded legal corpus")
    elif data_cfg.source == "files":
        description = "local files: " + ", ".join(map(str, data_cfg.paths))
    else:
        description = f"Hugging Face dataset {data_cfg.hub_name}" + (f" ({data_cfg.hub_config})" if data_cfg.hub_config
                                                                      else "") + f", split {data_cfg.hub_split}"
    out = {"source": "mixture" if mixture else data_cfg.source, "description": description, "seq_len": data_cfg.seq_len}
    if data_cfg.max_documents:
        out["max_documents"] = data_cfg.max_documents
    if meta:
        out.update(documents=meta.get("documents"), corpus_tokens=meta.get("tokens"), vocab_size=meta.get("vocab_size"))
        given = getattr(data_cfg, "tokenizer_path", "")
        out["tokenizer"] = {"kind": f"given ({given})" if given else "byte-level BPE trained on the training split",
                            "special_tokens": meta.get("special_tokens")}
    return out


def tokenizer_lines(tokenizer: dict | None) -> list[str]:
    """The card's tokenizer lines: where it came from and each special token's id (and whether the run added it)."""
    if not tokenizer:
        return []
    lines = [f"- tokenizer: {tokenizer.get('kind', 'not recorded')}"]
    st = tokenizer.get("special_tokens")
    if st:
        cells = []
        for role in ("eos", "pad", "bos", "unk", "mask"):
            entry = st.get(role)
            if entry and entry.get("aliased_to_eos"):
                cells.append(f"{role} = eos")
            elif entry:
                cells.append(f"{role} `{entry['token']}` {entry['id']}" + (" (added)" if entry.get("added") else ""))
        if st.get("sentinels"):
            s = st["sentinels"]
            cells.append(f"{s['count']} sentinels `<extra_id_N>` {s['first_id']}..{s['last_id']}"
                         + (f" ({s['added']} added)" if s.get("added") else ""))
        lines.append("- special tokens: " + ", ".join(cells))
    return lines


def _fmt(x: Any, spec: str = ",") -> str:
    if x is None or x == "":
        return "not recorded"
    if isinstance(x, float) and spec == ",":
        spec = ".4g"
    return format(x, spec)


def render_model_card(info: ModelCardInfo, usage: str | None = None) -> str:
    """The card as Markdown; ``usage``: a code snippet for a "How to load" section (exports)."""
    c, d, comp, res = info.model_config, info.data, info.compute, info.results
    family = c.get("family", "decoder")
    layers = (f"{c['n_layers']} encoder + {c.get('n_decoder_layers') or c['n_layers']} decoder layers"
              if family == "encoder_decoder" else f"{c['n_layers']} layers")
    flops = comp.get("flops")
    lines = [
        f"# {info.name}",
        "",
        f"A {family.replace('_', '-')} language model pretrained from scratch with {_objective(info.objective)}.",
        "",
        "## Architecture",
        "",
        f"- {_architecture(family)}",
        f"- {layers}, d_model {c['d_model']}, {c['n_heads']} attention heads ({c.get('n_kv_heads') or c['n_heads']} "
        f"key/value heads) of dimension {c.get('head_dim')}, SwiGLU hidden size {c.get('d_ff')}",
        f"- vocabulary {_fmt(c.get('vocab_size'))} tokens (embedding padded to "
        f"{_fmt(_padded(c))}), {'tied' if c.get('tie_embeddings') else 'untied'} input/output embeddings, "
        f"context up to {c.get('max_seq_len')} tokens",
        f"- **parameters: {info.parameters:,}** (exact count, embeddings included)",
        "",
        "## Training data",
        "",
        f"- source: {d.get('description', d.get('source', 'not recorded'))}",
        *tokenizer_lines(d.get("tokenizer")),
        f"- sequence length: {_fmt(d.get('seq_len'))} tokens",
        f"- **tokens seen: {_fmt(d.get('tokens_seen'))}**"
        + (f" (prepared corpus: {_fmt((d.get('corpus_tokens') or {}).get('train'))} training tokens)"
           if d.get("corpus_tokens") else ""),
        "",
        "## Compute",
        "",
        f"- optimizer steps: {_fmt(comp.get('steps'))}",
        f"- **training compute: {_fmt(flops, '.4g')} FLOPs = {_fmt(pf_days(flops) if flops else None, '.4g')} PF-days** "
        "(matrix-multiply FLOPs of forward and backward, measured with PyTorch's FLOP counter; "
        "1 PF-day = 8.64e19 FLOPs)",
        f"- hardware: {_fmt(comp.get('devices'))} x {comp.get('accelerator') or 'not recorded'}, "
        f"precision {comp.get('precision') or 'not recorded'}",
        "",
        "## Results",
        "",
        f"- final training loss: {_fmt(res.get('train_loss'), '.4f')} nats/token",
        f"- final validation loss: {_fmt(res.get('val_loss_nats'), '.4f')} nats/token "
        f"(perplexity {_fmt(res.get('val_ppl'), '.2f')}; unigram entropy of the validation tokens "
        f"{_fmt(res.get('val_unigram_entropy_nats'), '.4f')})",
    ]
    lines += evaluation_lines(res)
    if usage:
        lines += ["", "## How to load", "", "```python", usage, "```"]
    lines += [
        "",
        "## Intended use",
        "",
        f"Research and education on pretraining: {USES.get(info.objective, 'experiments')}.",
        "",
        "## Limitations",
        "",
        "- Pretrained only: no instruction tuning, no preference tuning, no safety filtering of inputs or outputs.",
        f"- It knows only what its data contains ({d.get('description', 'see above')}); outside that domain its "
        "outputs are unreliable, and any model of this kind can state falsehoods fluently.",
        "- Small models and short training runs give low-quality text; judge it by the losses above, not by a "
        "few samples.",
        "- Biases of the training text are reproduced; evaluate before any use that affects people.",
        "",
    ]
    return "\n".join(lines)


def evaluation_lines(results: dict) -> list[str]:
    """One line per task of the lm-evaluation-harness results (``results["eval"]``: {task: {shots: {metric: v}}},
    shots as int or, read back from JSON, str), accuracy with its standard error; a card written by the retired
    in-context evaluation (``icl_accuracy``) still renders."""
    lines = []
    for task, by_shot in (results.get("eval") or {}).items():
        cells = []
        for k, metrics in sorted(by_shot.items(), key=lambda kv: int(kv[0])):
            metric = "acc" if "acc" in metrics else next((m for m in metrics if m not in ("n", "samples")
                                                          and not m.endswith("_stderr")), None)
            if metric is None:
                continue
            stderr = metrics.get(f"{metric}_stderr")
            cells.append(f"{k}-shot {metric} {metrics[metric]:.3f}" + (f" ± {stderr:.3f}" if stderr is not None else ""))
        n = next(iter(by_shot.values()), {}).get("n")
        lines.append(f"- {task} (lm-evaluation-harness, {n} examples): {', '.join(cells)}")
    if results.get("icl_accuracy"):
        cells = ", ".join(f"{k}-shot {v:.3f}" for k, v in results["icl_accuracy"].items())
        lines.append(f"- in-context accuracy on {results.get('icl_task', 'the task')}: {cells}")
    return lines


def _padded(c: dict) -> int | None:
    v, m = c.get("vocab_size"), c.get("pad_vocab_multiple") or 1
    return ((v + m - 1) // m) * m if v else None


def write_model_card(path: str | Path, info: ModelCardInfo, usage: str | None = None) -> Path:
    """Write README.md (and model_card.json) into the directory ``path``; returns the README's path."""
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    readme = directory / "README.md"
    readme.write_text(render_model_card(info, usage))
    (directory / CARD_JSON).write_text(json.dumps(asdict(info), indent=2, default=str))
    return readme


def run_card_info(name: str, module, trainer, data_cfg: Any, prepared_meta: dict, metrics: dict) -> ModelCardInfo:
    """Card facts at the end of a training run (``framework.run.run``)."""
    from framework.callbacks.throughput import ThroughputMonitor
    from framework.scaling.hardware import detect_accelerator

    monitor = next((c for c in trainer.callbacks if isinstance(c, ThroughputMonitor)), None)
    data = describe_data(data_cfg, prepared_meta)
    data["tokens_seen"] = int(module.tokens_seen)
    accelerator = detect_accelerator() if module.device.type == "cuda" else None
    compute = {"steps": int(trainer.global_step), "devices": int(trainer.world_size),
               "accelerator": accelerator or module.device.type, "precision": str(trainer.precision),
               "flops": monitor.cumulative_flops if monitor and monitor.flops_per_micro_batch else None}
    results = {k: metrics.get(k) for k in ("train_loss", "val_loss_nats", "val_ppl", "val_unigram_entropy_nats",
                                           "eval") if metrics.get(k) is not None}
    return ModelCardInfo(name=name, objective=module.objective_name, model_config=asdict(module.model_config),
                         parameters=module.model_config.num_parameters(), data=data, compute=compute, results=results)


def card_info_from_checkpoint(checkpoint: str | Path, name: str | None = None) -> ModelCardInfo:
    """Card facts from a Lightning checkpoint, merged over the run directory's model_card.json if present."""
    import torch

    from framework.data.position import checkpoint_seq_len
    from framework.models import ModelConfig

    checkpoint = Path(checkpoint)
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)  # weights stay on disk
    hp = ckpt["hyper_parameters"]
    flops = None
    for key, state in (ckpt.get("callbacks") or {}).items():
        if "ThroughputMonitor" in str(key) and isinstance(state, dict):
            flops = state.get("cumulative_flops")
    info = None
    for directory in [checkpoint.parent, *checkpoint.resolve().parents][:3]:
        if (directory / CARD_JSON).exists():
            info = ModelCardInfo(**json.loads((directory / CARD_JSON).read_text()))
            break
    cfg = ModelConfig(**hp["model_config"])
    if info is None:
        info = ModelCardInfo(name=name or checkpoint.parent.parent.name, objective=hp["objective"]["name"],
                             model_config=hp["model_config"], parameters=cfg.num_parameters(),
                             data={"seq_len": checkpoint_seq_len(ckpt)})
    elif name:
        info.name = name
    # the checkpoint's own numbers win: it may be an earlier step than the end of training, whose losses
    # then do not describe it
    step = int(ckpt.get("global_step", 0))
    if info.compute.get("steps") not in (None, step):
        info.results = {}
    info.data["tokens_seen"] = int(ckpt.get("tokens_seen", info.data.get("tokens_seen") or 0))
    info.compute["steps"] = step
    if flops is not None:
        info.compute["flops"] = float(flops)
    return info

