"""Data mixtures: token shares at every prefix, exact resume, rank disjointness, one shared tokenizer,
clear refusals, and a tiny end-to-end run with per-source tokens and validation losses."""

from __future__ import annotations

import csv
import json
import sysconfig
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from framework.config import to_run_config
from framework.data.config import DataConfig, SourceSpec
from framework.data.datamodule import MixtureSampler, PretrainDataModule
from framework.data.mixture import mixture_weights, prepare_mixture, source_config
from framework.data.mixture_schedule import MixtureSchedule, tijdeman_sequence, tolerance_windows
from fake_trainer import FakeTrainer
from stop_at import StopAt


def _shares_deviation(sources: list[int], weights: list[float]) -> float:
    """max over prefixes n and sources i of |c_i(n) - w_i n| for a stream of source ids."""
    onehot = torch.nn.functional.one_hot(torch.tensor(sources), len(weights)).double()  # (n, k)
    counts = onehot.cumsum(0)  # (n, k): c_i after each prefix
    n = torch.arange(1, len(sources) + 1, dtype=torch.float64)[:, None]
    return float((counts - n * torch.tensor(weights, dtype=torch.float64)).abs().max())


@pytest.mark.parametrize("weights", [[0.51, 0.49], [0.7, 0.2, 0.1], [0.3141, 0.2718, 0.4141]])
def test_token_share_within_tolerance_at_every_prefix(weights):
    sampler = MixtureSampler(["a", "b", "c"][: len(weights)], weights, [97, 31, 11][: len(weights)], seed=3, rank=0,
                             world_size=1)
    stream = iter(sampler)
    sources = [next(stream)[0] for _ in range(10_000)]  # all windows have one length: window share = token share
    assert MixtureSchedule(weights).period == {2: 100, 3: 10 if weights[0] == 0.7 else 10_000}[len(weights)]
    tol = tolerance_windows(weights)
    assert tol == {2: 0.5, 3: 0.75}[len(weights)]  # Tijdeman's bound 1 - 1/(2k - 2)
    assert _shares_deviation(sources, weights) <= tol + 1e-9
    # an i.i.d. draw by weight strays by ~sqrt(n) windows: the schedule is what keeps the share tight
    iid = torch.multinomial(torch.tensor(weights), 10_000, replacement=True, generator=torch.Generator().manual_seed(0))
    assert _shares_deviation(iid.tolist(), weights) > 5


def test_schedule_bound_holds_for_many_sources_and_zero_weights():
    weights = [0.4, 0.0, 0.25, 0.15, 0.1, 0.06, 0.04]  # a zero weight is never drawn and not counted in k
    schedule = MixtureSchedule(weights)
    assert schedule.period == 100 and schedule.quanta == [40, 0, 25, 15, 10, 6, 4]  # 10^6 w_i / gcd 10^4
    # the periodic look-up equals the rule applied position by position, across several periods
    direct = tijdeman_sequence(schedule.quanta, 3 * schedule.period + 17)
    assert [schedule.source(g)[0] for g in range(len(direct))] == direct
    for g in (0, 1, 99, 100, 177, 316):
        assert schedule.counts(g) == [direct[:g].count(i) for i in range(len(weights))]
        assert schedule.source(g)[1] == direct[:g].count(direct[g])  # the draw index within that source
    assert 1 not in direct
    assert _shares_deviation(direct, weights) <= tolerance_windows(weights) + 1e-9 == 1 - 1 / 10 + 1e-9


def _merged(names, weights, sizes, world, per_rank, start=0, seed=5, micro_batch=1):
    """Each rank's first ``per_rank`` samples, and all ranks' samples in global order (rank blocks side by side)."""
    streams = []
    for rank in range(world):
        it = iter(MixtureSampler(names, weights, sizes, seed, rank, world, start, micro_batch_size=micro_batch))
        streams.append([next(it) for _ in range(per_rank)])
    merged = [streams[r][m * micro_batch + i] for m in range(per_rank // micro_batch) for r in range(world)
              for i in range(micro_batch)]
    return streams, merged


def test_resume_mid_stream_and_two_ranks_disjoint():
    names, weights, sizes = ["big", "mid", "small"], [0.7, 0.2, 0.1], [50, 13, 7]
    full, merged = _merged(names, weights, sizes, world=2, per_rank=400)
    # rank r reads global positions r, r + 2, ... (micro-batch 1); positions are global
    assert [p for _, _, p in full[1]] == list(range(1, 800, 2))
    assert [p for _, _, p in merged] == list(range(800))
    # within a source, consecutive blocks of one epoch are a permutation of its windows: no window is read by
    # both ranks (or twice) within an epoch; the small source repeated ~11 times, each epoch in a new order
    orders = []
    for s, size in enumerate(sizes):
        draws = [w for src, w, _ in merged if src == s]
        epochs = [draws[i : i + size] for i in range(0, len(draws) - size + 1, size)]
        assert all(sorted(e) == list(range(size)) for e in epochs)
        orders.append(epochs)
    assert len(orders[2]) >= 10 and orders[2][0] != orders[2][1]
    # resume after 246 global samples: the per-source counts follow from the position; same continuation
    consumed = 246
    assert MixtureSchedule(weights).counts(consumed) == [
        sum(1 for s, _, _ in merged[:consumed] if s == i) for i in range(3)]
    resumed, _ = _merged(names, weights, sizes, world=2, per_rank=400 - consumed // 2, start=consumed)
    for rank in range(2):
        assert resumed[rank] == full[rank][consumed // 2 :]
    # and on another world size and micro-batch (1 rank x 4, 3 ranks x 2): the same global stream
    for world, micro_batch in ((1, 4), (3, 2)):
        _, other = _merged(names, weights, sizes, world, per_rank=96, start=consumed, micro_batch=micro_batch)
        assert other == merged[consumed : consumed + len(other)]


def _code_files(tmp_path: Path, count: int = 60) -> list[str]:
    """A second domain: Python source code of the standard library (the stdlib source is its docstrings)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = tmp_path / "code"
    out.mkdir(exist_ok=True)
    for path in sorted(root.glob("*.py"))[:count]:
        (out / f"{path.stem}.txt").write_text(path.read_text(encoding="utf-8", errors="replace")[:6000])
    return [str(out / "*.txt")]


@pytest.fixture(scope="module")
def code_paths(tmp_path_factory) -> list[str]:
    return _code_files(tmp_path_factory.mktemp("mixture_files"))


def _mixture_overrides(code_paths: list[str], weights=(0.51, 0.49)) -> list[str]:
    return [f"data.sources={{code:{{source:files,paths:[{code_paths[0]}]}},prose:{{source:stdlib,max_documents:400}}}}",
            f"data.mixture={{code:{weights[0]},prose:{weights[1]}}}"]


def test_issue_command_line_and_example_config_compose(compose):
    issue = to_run_config(compose(["data.sources={legal:{source:licenses},general:{source:stdlib}}",
                                   "data.mixture={legal:0.51,general:0.49}"])).data
    example = to_run_config(compose(["data=mixture_example"])).data
    for cfg in (issue, example):
        legal, general = source_config(cfg, "legal"), source_config(cfg, "general")
        assert (legal.source, general.source) == ("licenses", "stdlib")
        assert legal.max_documents == cfg.max_documents == 800 and legal.val_fraction == cfg.val_fraction  # inherited
        assert mixture_weights(cfg) == pytest.approx({"legal": 0.51, "general": 0.49})
    with pytest.raises(Exception, match="sourc"):  # a misspelt source field is an error, not a new key
        compose(["data.sources={legal:{sourc:licenses}}"])


def test_command_line_and_shared_tokenizer(compose, code_paths):
    cfg = to_run_config(compose(_mixture_overrides(code_paths))).data
    assert isinstance(cfg.sources["code"], SourceSpec) and cfg.sources["code"].text_field is None  # unset = inherit
    assert cfg.sources["prose"].max_documents == 400 and cfg.mixture == {"code": 0.51, "prose": 0.49}
    prepared = prepare_mixture(cfg, progress=False)
    code, prose = prepared.parts["code"], prepared.parts["prose"]
    assert code.directory != prose.directory and code.meta["tokens"] != prose.meta["tokens"]  # own shards each
    # one tokenizer: same hash, same file content, same ids for the same text
    assert code.meta["tokenizer_hash"] == prose.meta["tokenizer_hash"] == prepared.meta["tokenizer_hash"]
    assert code.tokenizer_path.read_bytes() == prose.tokenizer_path.read_bytes() == prepared.tokenizer_path.read_bytes()
    text = "def window_length(self, seq_len): return the raw window length"
    assert code.tokenizer().encode(text).ids == prose.tokenizer().encode(text).ids
    # trained on the union: it knows code-only words better than a tokenizer of prose alone would
    assert prepared.meta["documents"]["train"] == code.meta["documents"]["train"] + prose.meta["documents"]["train"]
    expected = 0.51 * code.meta["val_unigram_entropy_nats"] + 0.49 * prose.meta["val_unigram_entropy_nats"]
    assert prepared.meta["val_unigram_entropy_nats"] == pytest.approx(expected)
    # a given tokenizer (continued pretraining) is used as is by every source
    given = prepare_mixture(replace(cfg, tokenizer_path=str(prepared.tokenizer_path)), progress=False)
    assert given.meta["tokenizer_hash"] == prepared.meta["tokenizer_hash"]


def test_datamodule_state_round_trip(compose, code_paths):
    cfg = to_run_config(compose(_mixture_overrides(code_paths, (0.7, 0.3)))).data
    prepared = prepare_mixture(cfg, progress=False)

    def module():
        return PretrainDataModule(prepared, window_length=33, micro_batch_size=4, seed=11, num_workers=0)

    uninterrupted = [b for b, _ in zip(module().train_dataloader(), range(12))]
    first = module()
    for _ in range(5):  # five micro-batches trained, then a checkpoint
        first.on_micro_batch_consumed()
    state = first.state_dict()
    assert state["source_windows"] == {"code": 14, "prose": 6}  # 20 windows at 0.7 / 0.3
    resumed = module()
    resumed.load_state_dict(json.loads(json.dumps(state)))
    continued = [b for b, _ in zip(resumed.train_dataloader(), range(7))]
    assert all(torch.equal(a, b) for a, b in zip(continued, uninterrupted[5:]))
    # a checkpoint of another mixture is refused with one sentence
    other = PretrainDataModule(prepare_mixture(replace(cfg, mixture={"code": 0.5, "prose": 0.5}), progress=False), 33, 4)
    with pytest.raises(ValueError, match=r"trained with data.mixture=.*resume with the same mixture"):
        other.load_state_dict(state)
    # and so is a mixture checkpoint resumed by a single-source run with the same tokenizer (and back)
    single = PretrainDataModule(prepared.parts["code"], 33, 4)
    assert single.prepared.meta["tokenizer_hash"] == state["tokenizer_hash"]
    with pytest.raises(ValueError, match=r"trained on the mixture data.mixture=.*not on one source"):
        single.load_state_dict(state)
    with pytest.raises(ValueError, match="trained on a single source, not a mixture"):
        resumed.load_state_dict(single.state_dict())
    # a checkpoint of the former MixtureDataModule restores into the one DataModule (the module's hook moves it)
    from framework.data.position import upgrade_data_state

    old = {"MixtureDataModule": dict(state)}
    upgrade_data_state(old)
    assert old == {"PretrainDataModule": state}
    # validation: one loader per source, val_windows per source
    loaders = resumed.val_dataloader()
    assert resumed.val_sources == (("code", 0.7), ("prose", 0.3)) and len(loaders) == 2


def test_mixture_resumes_on_another_world_size(compose, code_paths):
    """2 ranks x 2 windows stopped after 3 micro-batches, resumed on 1 rank x 4 (and 1 -> 2): the same windows as
    one uninterrupted rank x 4, the ranks' batches side by side."""
    prepared = prepare_mixture(to_run_config(compose(_mixture_overrides(code_paths, (0.7, 0.3)))).data, progress=False)

    def read(world: int, micro_batch: int, micro_batches: int, state: dict | None = None) -> tuple[torch.Tensor, dict]:
        modules = [PretrainDataModule(prepared, 33, micro_batch, seed=11) for _ in range(world)]
        batches = []
        for rank, dm in enumerate(modules):
            dm.trainer = FakeTrainer(rank, world)
            if state is not None:
                dm.load_state_dict(json.loads(json.dumps(state)))
            batches.append([b for b, _ in zip(dm.train_dataloader(), range(micro_batches))])
        for _ in range(micro_batches):
            modules[0].on_micro_batch_consumed()
        return torch.cat([b for step in zip(*batches) for b in step]), modules[0].state_dict()

    reference, _ = read(1, 4, 12)  # (48, 33): global positions 0..47
    first, state = read(2, 2, 3)
    assert state["global_samples_consumed"] == 12 and state["world_size"] == 2
    assert state["source_windows"] == {"code": 8, "prose": 4}  # 12 windows at 0.7 / 0.3 (8.4 / 3.6)
    resumed, _ = read(1, 4, 9, state)
    assert torch.equal(torch.cat([first, resumed]), reference)
    first, state = read(1, 4, 3)
    resumed, _ = read(2, 2, 9, state)
    assert torch.equal(torch.cat([first, resumed]), reference)


@pytest.mark.parametrize("mixture, message", [
    ({"code": -0.1, "prose": 1.0}, r"must be >= 0"),
    ({"code": 0.0, "prose": 0.0}, r"all zero"),
    ({"code": 0.5, "legal": 0.5}, r"names \['legal'\] which data.sources does not define"),
    ({}, r"data.mixture is empty"),
])
def test_bad_mixtures_refused(mixture, message):
    cfg = DataConfig(sources={"code": SourceSpec(source="files"), "prose": SourceSpec()}, mixture=mixture)
    with pytest.raises(ValueError, match=message):
        mixture_weights(cfg)


def test_weights_normalised():
    cfg = DataConfig(sources={"a": SourceSpec(), "b": SourceSpec()}, mixture={"a": 51, "b": 49})
    assert mixture_weights(cfg) == pytest.approx({"a": 0.51, "b": 0.49})


def test_tiny_run_logs_per_source_tokens_and_val_losses(compose, code_paths, tmp_path):
    from framework.run import run

    weights = {"code": 0.51, "prose": 0.49}
    cfg = to_run_config(compose(_mixture_overrides(code_paths) + [
        "trainer.max_steps=20", "trainer.log_every_n_steps=1", "trainer.val_check_interval=10",
        "callbacks.throughput=false"]))
    metrics = run(cfg, tmp_path)
    rows = list(csv.DictReader(next(tmp_path.rglob("metrics.csv")).open()))
    last = [r for r in rows if r.get("train/tokens_seen/code")][-1]
    tokens = {n: float(last[f"train/tokens_seen/{n}"]) for n in weights}
    total = float(last["train/tokens_seen"])
    assert sum(tokens.values()) == total == 20 * 8 * 64  # steps x micro-batch x seq_len input tokens
    windows = {n: t / 64 for n, t in tokens.items()}  # 160 windows: 81.6 / 78.4 by weight, within 1/2 window
    assert all(abs(windows[n] - w * 160) <= 0.5 for n, w in weights.items())
    assert metrics["tokens_seen/code"] == tokens["code"] and metrics["epochs/code"] > 0
    # per-source validation losses, logged during training and in the final metrics; val/loss is their weighted mean
    assert any(r.get("val/code/loss") for r in rows) and any(r.get("val/prose/loss") for r in rows)
    per_source = {n: metrics[f"val_loss_nats/{n}"] for n in weights}
    assert all(0 < v < 10 for v in per_source.values()) and per_source["code"] != per_source["prose"]
    assert metrics["val_loss_nats"] == pytest.approx(sum(w * per_source[n] for n, w in weights.items()), rel=1e-5)
    saved = json.loads((tmp_path / "final_metrics.json").read_text())
    assert saved["val_loss_nats/prose"] == per_source["prose"]
    card = (tmp_path / "README.md").read_text()  # the model card names each source with its share
    assert "a mixture of training tokens: 51% code (local files:" in card and "49% prose (docstrings" in card


def test_stopped_and_resumed_mixture_run_matches_uninterrupted(compose, code_paths, tmp_path):
    from framework.run import build_run, run

    cfg = to_run_config(compose(_mixture_overrides(code_paths, (0.3, 0.7)) + [
        "trainer.max_steps=14", "trainer.log_every_n_steps=1", "trainer.val_check_interval=100",
        "callbacks.checkpoint_every_n_steps=6", "callbacks.throughput=false", "callbacks.model_card=false",
        "data.val_windows=8"]))
    full_dir, part_dir = tmp_path / "full", tmp_path / "part"
    full = run(cfg, full_dir)
    trainer, module, dm, _ = build_run(cfg, part_dir)
    trainer.callbacks.append(StopAt(6))
    trainer.fit(module, datamodule=dm)  # stops right after the step-6 checkpoint
    assert dm.source_windows == {"code": 14, "prose": 34}  # 48 windows at 0.3 / 0.7 (14.4 / 33.6)
    part = run(cfg, part_dir)  # resume=auto: step 6 -> 14

    def losses(run_dir):
        rows = csv.DictReader(next(run_dir.rglob("metrics.csv")).open())
        return {int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")}

    resumed = losses(part_dir)
    assert sorted(s for s in resumed if s >= 6) == list(range(6, 14))
    assert all(resumed[s] == pytest.approx(losses(full_dir)[s], abs=1e-5) for s in range(6, 14))
    for key in ("tokens_seen/code", "tokens_seen/prose", "val_loss_nats/code", "val_loss_nats/prose"):
        assert part[key] == pytest.approx(full[key], abs=1e-5), key
