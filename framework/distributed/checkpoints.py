"""Finding the checkpoint to resume from."""

from __future__ import annotations

import zipfile
from pathlib import Path


def is_complete(path: Path) -> bool:
    """A checkpoint file is complete when its zip central directory (written last by torch.save) is intact."""
    try:
        with zipfile.ZipFile(path) as zf:
            return len(zf.namelist()) > 0
    except (zipfile.BadZipFile, OSError):
        return False


def find_resume_checkpoint(directory: Path) -> Path | None:
    """The newest complete ``*.ckpt`` in ``directory`` (by modification time), or None."""
    if not directory.is_dir():
        return None
    candidates = sorted((p for p in directory.glob("*.ckpt") if p.is_file()), key=lambda p: p.stat().st_mtime,
                        reverse=True)
    for path in candidates:
        if is_complete(path):
            return path
    return None


def resolve_resume(resume: str, checkpoint_dir: Path) -> str | None:
    if resume == "never":
        return None
    if resume == "auto":
        found = find_resume_checkpoint(checkpoint_dir)
        return str(found) if found else None
    path = Path(resume).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"resume={resume!r}: no such checkpoint; use resume=auto, resume=never or a .ckpt path.")
    if not is_complete(path):
        raise ValueError(f"resume={resume!r} is an incomplete or corrupt checkpoint; pick an earlier one.")
    return str(path)
