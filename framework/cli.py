"""Small console commands that share the training config: ``prepare``.

    python3 -m framework.cli prepare [hydra overrides]     # tokenize and shard the configured data, no training
"""

from __future__ import annotations

import sys
from pathlib import Path

from hydra import compose, initialize_config_dir

from framework.config import register_configs, to_run_config
from framework.data.prepare import prepare_data

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def compose_train_config(overrides: list[str]):
    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return to_run_config(compose(config_name="train", overrides=overrides))


def prepare_main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    cfg = compose_train_config(argv)
    if cfg.data.mixture:  # each source's shards, one shared tokenizer
        from framework.data.mixture import prepare_mixture

        mixture = prepare_mixture(cfg.data)
        for name, part in mixture.parts.items():
            print(f"{name} (weight {mixture.meta['mixture'][name]:.4g}) ready at {part.directory}: "
                  f"{part.meta['tokens']['train']:,} train / {part.meta['tokens']['val']:,} val tokens")
        print(f"shared tokenizer {mixture.meta['tokenizer_hash']} ({mixture.vocab_size} tokens): {mixture.tokenizer_path}")
        return
    prepared = prepare_data(cfg.data)
    m = prepared.meta
    print(f"data ready at {prepared.directory}: {m['tokens']['train']:,} train / {m['tokens']['val']:,} val tokens, "
          f"vocab {m['vocab_size']}, tokenizer {m['tokenizer_hash']}")


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in ("prepare",):
        print("usage: python3 -m framework.cli prepare [hydra overrides]", file=sys.stderr)
        sys.exit(2)
    command = sys.argv[1]
    if command == "prepare":
        prepare_main(sys.argv[2:])


if __name__ == "__main__":
    main()
