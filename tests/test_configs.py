"""Every option of every group in conf/ composes against the typed schema and builds its objects."""

from pathlib import Path

import pytest
from framework.config import resolve_model, to_run_config
from framework.config_errors import ConfigError

CONF = Path(__file__).resolve().parent.parent / "conf"
GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name != "hydra")
# options whose mandatory values (???) a user must give
REQUIRED = {("data", "files"): ["data.paths=[README.md]"], ("data", "hub"): ["data.hub_name=some/dataset"]}


def _options():
    for group in GROUPS:
        for path in sorted((CONF / group).glob("*.yaml")):
            yield group, path.stem


@pytest.mark.parametrize("group,option", list(_options()))
def test_every_config_composes_and_builds(compose, group, option):
    cfg = to_run_config(compose([f"{group}={option}"] + REQUIRED.get((group, option), []), tiny=False))
    model = resolve_model(cfg.model).replace(vocab_size=1000)
    assert model.num_parameters() > 0
    from framework.objectives import objective_class

    objective_class(cfg.objective.name)


def test_there_are_configs_in_every_group():
    for group in ("objective", "model", "data", "optim", "trainer", "strategy", "precision", "logger", "callbacks",
                  "cluster"):
        assert list((CONF / group).glob("*.yaml")), f"conf/{group}/ is empty"


def test_unknown_key_is_an_error(compose):
    with pytest.raises(ConfigError, match=r"trainer.max_stepz is not a setting \(did you mean trainer.max_steps\?\)"):
        compose(["trainer.max_stepz=10"])


def test_wrong_type_is_an_error(compose):
    with pytest.raises(ConfigError, match="trainer.max_steps=ten is not a whole number"):
        compose(["trainer.max_steps=ten"])


def test_unknown_model_preset_field_is_an_error(compose):
    with pytest.raises(ConfigError, match=r"did you mean model.n_layers\?"):
        compose(["model.n_layerz=3"])


def test_model_overrides_apply_on_top_of_the_preset(compose):
    cfg = to_run_config(compose(["model=gpt2-small", "model.n_layers=3"], tiny=False))
    model = resolve_model(cfg.model)
    assert (model.d_model, model.n_layers, model.n_heads) == (768, 3, 12)


def test_a_bad_setting_is_one_line_and_exit_code_2(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "framework", "train", "objective=mlm", "model=tiny",
                           f"run_dir={tmp_path}"], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parent.parent)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "pick a preset of family 'encoder'" in errors[0]
