"""One set of defaults (the typed schemas), YAML files that only select and override, typed choices, and
composition errors as one line with exit code 2 before any run directory exists."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from framework.catalogue import OBJECTIVES, PRECISIONS, STRATEGIES
from framework.choices import Objective, PrecisionMode, Schedule, plain
from framework.config import TrainConfig, compose
from framework.config_errors import ConfigError, check_command_line, sweep_points

REPO = Path(__file__).resolve().parent.parent
CONF = REPO / "conf"


def _leaves(obj, prefix=""):
    """(dotted key, value) of every field of a dataclass, recursively (dicts and lists are leaves)."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from _leaves(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", value


def test_train_config_is_the_run_fw_train_composes_with_no_overrides():
    default, composed = dict(_leaves(TrainConfig())), dict(_leaves(compose([])))
    assert default.keys() == composed.keys()
    differences = {k: (default[k], composed[k]) for k in default
                   if default[k] != composed[k] or type(default[k]) is not type(composed[k])}
    assert differences == {}
    # the values the issue found disagreeing, now one set
    assert (composed["trainer.val_check_interval"], composed["optim.lr"], composed["optim.warmup_steps"],
            composed["data.vocab_size"], composed["model.preset"]) == (100, 1e-3, 30, 4096, "small-cpu")
    assert composed["model.preset"] == OBJECTIVES["clm"].default_model


def _schema_default(key: str):
    node = OmegaConf.structured(TrainConfig)
    return OmegaConf.select(node, key, throw_on_missing=False, default="<not in schema>")


def _option_settings(path: Path):
    """(dotted key, value) of every setting an option file writes, relative to the config root."""
    cfg = OmegaConf.load(path)
    global_package = "@package _global_" in path.read_text()
    prefix = "" if global_package or path.parent == CONF else f"{path.parent.name}."
    plain_cfg = OmegaConf.to_container(cfg, resolve=False)

    def walk(node, key):
        if isinstance(node, dict) and node and not key.endswith(("sources", "mixture", "env")):
            for k, v in node.items():
                yield from walk(v, f"{key}.{k}" if key else str(k))
        else:
            yield key, node

    for key, value in walk(plain_cfg or {}, prefix.rstrip(".")):
        if key.split(".")[0] not in ("defaults", "hydra"):
            yield key, value


# experiments are complete bundles (fw-plan writes every field of a plan), not options of one group
OPTION_FILES = [p for p in sorted(CONF.glob("*/*.yaml")) if p.parent.name not in ("experiment", "hydra")]


@pytest.mark.parametrize("path", OPTION_FILES + [CONF / "train.yaml"], ids=lambda p: str(p.relative_to(CONF)))
def test_yaml_files_only_select_and_override(path):
    for key, value in _option_settings(path):
        if isinstance(value, str) and (value.startswith("${") or value == "???"):
            continue  # an interpolation (a link between settings) or a value the user must give
        if key == "model.preset" and value == path.stem:
            continue  # a model file names its preset, the default one too (model=small-cpu after objective=mlm)
        default = _schema_default(key)
        assert default != "<not in schema>", f"{path.name}: {key} is not in the schema"
        assert OmegaConf.to_container(OmegaConf.create({"v": default}))["v"] != value, (
            f"{path.relative_to(CONF)} sets {key}={value!r}, the schema's default: delete it from the file")


def test_option_files_still_select_what_they_name():
    """The trimmed files still differ where they must: the catalogue's modes and strategies, data sources."""
    for option, spec in PRECISIONS.items():
        assert compose([f"precision={option}"]).precision.mode == spec.mode
    for option, spec in STRATEGIES.items():
        strategy = compose([f"strategy={option}"]).strategy
        assert (strategy.name, strategy.zero_stage if spec.name == "deepspeed" else 0) == (
            spec.name, spec.zero_stage if spec.name == "deepspeed" else 0)
        assert (strategy.offload_optimizer, strategy.offload_parameters) == (
            spec.offload in ("optimizer", "params"), spec.offload == "params")
    files = compose(["data=files", "data.paths=[x.jsonl]"]).data
    assert (files.source, files.vocab_size) == ("files", 8192)
    slurm = compose(["cluster=slurm"])
    assert (slurm.cluster.name, slurm.trainer.devices, slurm.trainer.num_nodes) == ("slurm", 8, 1)


@pytest.mark.parametrize("override,expected", [
    ("optim.schedule=linear", "optim.schedule=linear is not one of cosine, wsd"),
    ("precision.mode=bf17", "precision.mode=bf17 is not one of 32-true, 16-mixed, bf16-mixed, bf16-true"),
    ("strategy.name=megatron", "strategy.name=megatron is not one of auto, ddp, deepspeed, fsdp"),
    ("objective.name=gpt", "objective.name=gpt is not one of clm, mlm, span_corruption"),
    ("data.source=s3", "data.source=s3 is not one of stdlib, licenses, files, hub"),
    ("logger.wandb_mode=sometimes", "logger.wandb_mode=sometimes is not one of auto, online, offline, disabled"),
    ("cluster.name=k8s", "cluster.name=k8s is not one of local, slurm"),
    ("model.family=decodr", "model.family=decodr is not one of decoder, encoder, encoder_decoder"),
    ("model.preset=gpt5", "model.preset=gpt5 is not one of tiny, small-cpu, gpt2-small"),
    ("optim=sgd", "optim=sgd is not an option of the optim group; pick one of adamw, muon"),
    ("trainer.max_stepz=10", "trainer.max_stepz is not a setting (did you mean trainer.max_steps?)"),
    ("+trainer.max_stepz=10", "trainer.max_stepz is not a setting (did you mean trainer.max_steps?)"),
    ("trainer.max_steps=ten", "trainer.max_steps=ten is not a whole number"),
    ("logger.csv=maybe", "logger.csv=maybe is not true or false"),
])
def test_a_bad_name_fails_at_composition_with_the_choices(override, expected):
    with pytest.raises(ConfigError) as err:
        compose([override])
    message = str(err.value)
    assert expected in message and "\n" not in message


def test_choices_render_and_serialise_as_their_values():
    assert (f"{Objective.clm}", str(PrecisionMode["bf16-mixed"]), f"{Schedule.wsd:>4}") == ("clm", "bf16-mixed", " wsd")
    assert json.dumps({"m": PrecisionMode["32-true"]}) == '{"m": "32-true"}'
    assert f"{Objective.mlm!r}" == "'mlm'" and {"clm": 1}[Objective.clm] == 1  # messages, dict lookups by name
    cfg = compose(["precision=bf16", "optim=muon", "objective=mlm"])
    values = [cfg.precision.mode, cfg.optim.name, cfg.objective.name, cfg.data.special_tokens_for, cfg.model.preset]
    assert values == ["bf16-mixed", "muon", "mlm", "mlm", "bert-small-cpu"]
    assert all(type(v) is str for v in values)  # plain strings downstream: paths, JSON, checkpoints, wandb
    assert type(plain([{Objective.mlm: Schedule.wsd}])[0]["mlm"]) is str


def test_every_point_of_a_sweep_is_checked(capsys):
    points = sweep_points(["optim.lr=1e-3,3e-3", "optim=adamw,muon", "name=s"], multirun=True)
    assert sorted(points) == sorted([[f"optim.lr={lr}", f"optim={o}", "name=s"]
                                     for lr in ("0.001", "0.003") for o in ("adamw", "muon")])
    check_command_line(["-m", "optim.lr=1e-3,3e-3", "name=s"])  # a good sweep passes
    with pytest.raises(SystemExit) as exit_:
        check_command_line(["-m", "optim.schedule=cosine,linaer", "name=s"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == "error: optim.schedule=linaer is not one of cosine, wsd; pick one of those.\n"


BAD_COMMAND_LINES = [
    ["trainer.max_stepz=10"], ["trainer.max_steps=ten"], ["model=gpt5"], ["optim.schedule=linaer"],
    ["+foo=1"], ["trainer.max_steps=[1"], ["-m", "precision=fp32,fp17"], ["cluster.nodes=0"],
]


@pytest.mark.slow
def test_fw_train_refuses_bad_overrides_in_one_line_with_exit_2_and_no_directory(tmp_path):
    """One process, the console entry called per command line: exit 2, one `error:` line, nothing created."""
    script = textwrap.dedent(f"""
        import io, json, sys, contextlib
        from framework.commands.train import main
        results = []
        for argv in {BAD_COMMAND_LINES!r}:
            sys.argv = ["fw-train", *argv, "name=bad"]
            err = io.StringIO()
            with contextlib.redirect_stderr(err):
                try:
                    main()
                    code = 0
                except SystemExit as exit_:
                    code = exit_.code
            results.append([argv, code, err.getvalue()])
        print(json.dumps(results))
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    for argv, code, stderr in json.loads(proc.stdout.strip().splitlines()[-1]):
        lines = stderr.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (argv, code, stderr)
        assert "Traceback" not in stderr and argv[-1].split("=")[0].lstrip("+") in lines[0], (argv, stderr)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "multirun").exists()
