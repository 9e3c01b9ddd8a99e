"""framework.validate: every bad setting is refused with one sentence naming it, before any data is read."""

from __future__ import annotations

from pathlib import Path

import pytest

from framework.config import to_run_config
from framework.distributed.precision import DeviceInfo
from framework.validate import ConfigurationError, max_span_corruption_seq_len, validate

# (override(s), the key the message must name)
BAD = [
    (["model.n_layers=0"], "model.n_layers=0"),
    (["model.n_layers=-2"], "model.n_layers=-2"),
    (["model.d_model=0"], "model.d_model=0"),
    (["model.n_heads=0"], "model.n_heads=0"),
    (["model.vocab_size=999"], "model.vocab_size=999"),
    (["data.seq_len=0"], "data.seq_len=0"),
    (["data.seq_len=4096"], "data.seq_len=4096"),  # above model.max_seq_len
    (["data.micro_batch_size=0"], "data.micro_batch_size=0"),
    (["data.val_fraction=1.5"], "data.val_fraction=1.5"),
    (["data.vocab_size=100"], "data.vocab_size=100"),
    (["data.source=files"], "data.paths"),
    (["trainer.max_steps=0"], "trainer.max_steps=0"),
    (["trainer.devices=0"], "trainer.devices=0"),
    (["trainer.accumulate_grad_batches=0"], "trainer.accumulate_grad_batches=0"),
    (["callbacks.checkpoint_every_n_steps=0"], "callbacks.checkpoint_every_n_steps=0"),
    (["optim.lr=-1e-3"], "optim.lr=-0.001"),
    (["objective=mlm", "model=gpt2-small"], "objective=mlm"),
    (["objective=clm", "model=bert-tiny"], "objective=clm"),
    (["objective=span_corruption", "model=t5-tiny", "model.max_seq_len=4096", "data.seq_len=2048"],
     "data.seq_len=2048"),
    (["objective=mlm", "model=bert-tiny", "objective.mask_probability=0"], "objective.mask_probability=0"),
    (["precision=fp16"], "precision=fp16"),  # no CUDA: refused on the CPU
    (["strategy=deepspeed_zero2"], "strategy=deepspeed_zero2"),
    (["callbacks.spike_guard.enabled=true", "callbacks.spike_guard.sigma=0"], "callbacks.spike_guard.sigma=0"),
]


@pytest.mark.parametrize("overrides,key", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_setting_is_one_sentence_naming_it(compose, overrides, key):
    cfg = to_run_config(compose(overrides))
    with pytest.raises(ConfigurationError) as info:
        validate(cfg, device=DeviceInfo("cpu"))
    message = str(info.value)
    assert key in message, message
    assert "\n" not in message and message.endswith("."), message


def test_default_and_tiny_configs_pass(compose):
    validate(to_run_config(compose()), device=DeviceInfo("cpu"))
    validate(to_run_config(compose([], tiny=False)), device=DeviceInfo("cpu"))
    for objective, model in (("mlm", "bert-tiny"), ("span_corruption", "t5-tiny")):
        validate(to_run_config(compose([f"objective={objective}", f"model={model}"])), device=DeviceInfo("cpu"))


def test_configuration_error_is_a_value_error_importable_from_train():
    from framework.run import ConfigurationError as FromTrain

    assert FromTrain is ConfigurationError and issubclass(ConfigurationError, ValueError)


def test_span_corruption_limit_is_the_last_seq_len_within_the_sentinels(compose):
    from framework.data.collators import noise_mask_counts, random_spans_helper

    def spans(seq_len):
        return noise_mask_counts(random_spans_helper(seq_len)[0], 0.15, 3.0)[1]

    longest = max_span_corruption_seq_len(100)
    assert spans(longest) <= 100 < spans(longest + 1)
    assert spans(2048) == 114  # the example: 2048 needs 114 sentinels
    ok = ["objective=span_corruption", "model=t5-tiny", "model.max_seq_len=4096"]
    validate(to_run_config(compose(ok + [f"data.seq_len={longest}"])), device=DeviceInfo("cpu"))
    with pytest.raises(ConfigurationError, match=f"data.seq_len<={longest}"):
        validate(to_run_config(compose(ok + [f"data.seq_len={longest + 1}"])), device=DeviceInfo("cpu"))


def test_cuda_only_pairs_pass_on_a_gpu_device(compose):
    gpu = DeviceInfo("cuda", "NVIDIA H100", True)
    validate(to_run_config(compose(["precision=bf16", "strategy=deepspeed_zero2"])), device=gpu)
    with pytest.raises(ConfigurationError, match="bfloat16"):
        validate(to_run_config(compose(["precision=bf16"])), device=DeviceInfo("cuda", "Tesla V100", False))


@pytest.mark.parametrize("overrides", [["trainer.max_steps=0"], ["objective=mlm", "model=gpt2-small"],
                                       ["model.vocab_size=999"]])
def test_run_refuses_before_any_data_is_prepared(compose, tmp_path, overrides):
    """Through framework.run.run, as fw-train: refused with no cache directory and no run directory."""
    from framework.run import run

    cache = tmp_path / "cache"
    cfg = to_run_config(compose(overrides + [f"data.cache_dir={cache}"]))
    with pytest.raises(ConfigurationError):
        run(cfg, tmp_path / "run")
    assert not cache.exists()
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_build_run_validates_first(compose, tmp_path):
    from framework.run import build_run

    cache = tmp_path / "cache"
    cfg = to_run_config(compose(["data.micro_batch_size=0", f"data.cache_dir={cache}"]))
    with pytest.raises(ConfigurationError, match="data.micro_batch_size=0"):
        build_run(cfg, Path(tmp_path / "run"))
    assert not cache.exists()
