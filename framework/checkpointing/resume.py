"""Which checkpoint a run resumes from, and which old step checkpoints it removes after resuming.

``find_resume_checkpoint`` ranks every checkpoint in the directory by global step (from the name
``step{step:07d}.ckpt``; ``last.ckpt`` is read lazily with mmap) and takes the newest usable one. Usable: a
complete file (its zip central directory, written last by ``torch.save``, is intact) or a finished sharded
directory, whose checksums match (``framework.checkpointing.integrity``) and whose pickled parts load
``weights_only=True`` (a damaged pickle section fails here, not in the middle of ``fit``; a crafted pickle
that would run code is refused without running it). Each newer checkpoint that fails is named in one
sentence and skipped. Leftover ``.tmp`` files and sharded directories still being written are not
checkpoints. When checkpoints exist but none is usable, ``resolve_resume("auto", ...)`` refuses to start
over from step 0 (``resume=never`` does that on purpose).
"""

from __future__ import annotations

import pickle
import re
import shutil
import sys
import zipfile
from pathlib import Path
from typing import Callable

from lightning.pytorch.utilities import rank_zero_only

from framework.checkpointing.integrity import INCOMPLETE, check_dcp_directory, safe_load, sidecar, verify_checksums

STEP_PATTERN = re.compile(r"step(\d+)")
STEP_CHECKPOINT = re.compile(r"step(\d+)(-v\d+)?\.ckpt$")  # what ModelCheckpoint writes (not preempted-step...)
TMP_SUFFIX = ".tmp"
LIGHTNING_META = "meta.pt"  # what Lightning's ModelParallelStrategy writes last in a torch.distributed.checkpoint dir


def _say(message: str) -> None:
    if rank_zero_only.rank == 0:  # every rank resolves the same checkpoint; one of them speaks
        print(message, file=sys.stderr)


def _is_sharded_finished(path: Path) -> bool:
    dcp = (path / ".metadata").is_file() and (path / LIGHTNING_META).is_file()
    return (dcp or (path / "latest").is_file()) and not (path / INCOMPLETE).exists()


def is_complete(path: Path) -> bool:
    """A checkpoint file is complete when its zip central directory (written last by torch.save) is intact; a
    sharded directory when the file its writer writes last exists (FSDP/DCP: ``.metadata`` and Lightning's
    ``meta.pt``; DeepSpeed: the ``latest`` tag file) and no ``.incomplete`` marker says it is being rewritten."""
    path = Path(path)
    if path.name.endswith(TMP_SUFFIX):
        return False
    if path.is_dir():
        return _is_sharded_finished(path)
    try:
        with zipfile.ZipFile(path) as zf:
            return len(zf.namelist()) > 0
    except (zipfile.BadZipFile, OSError):
        return False


def _sharded_step(directory: Path) -> int:
    """The global step of a sharded checkpoint directory, from the small file that holds the trainer state."""
    if (directory / LIGHTNING_META).is_file():
        return int(safe_load(directory / LIGHTNING_META).get("global_step", -1))
    tag = (directory / "latest").read_text().strip()  # DeepSpeed: <tag>/*model_states.pt hold the client state
    states = sorted((directory / tag).glob("*model_states.pt"))
    return int(safe_load(states[0], mmap=True).get("global_step", -1)) if states else -1


def checkpoint_step(path: Path) -> int:
    """The global step a checkpoint was saved at: from its name when it carries one, else read lazily
    (-1 when it cannot be read without unpickling arbitrary objects)."""
    path = Path(path)
    match = STEP_PATTERN.search(path.name)
    if match:
        return int(match.group(1))
    try:
        if path.is_dir():
            return _sharded_step(path)
        return int(safe_load(path, mmap=True).get("global_step", -1))
    except Exception:
        return -1


def checkpoint_problem(path: Path) -> tuple[str | None, bool]:
    """(why ``path`` cannot be resumed from, or None; whether a checksum vouched for its bytes)."""
    path = Path(path)
    if not is_complete(path):
        return "it is not a complete checkpoint (truncated, zeroed or not a torch.save archive)", False
    problem, verified = verify_checksums(path)
    if problem:
        return problem, verified
    if path.is_dir():
        return (check_dcp_directory(path) if (path / LIGHTNING_META).is_file() else None), verified
    try:
        safe_load(path, mmap=True)  # parses the whole pickle section; tensor bytes stay on disk
    except pickle.UnpicklingError as err:  # a refused global, or an invalid opcode of a damaged pickle
        if "global" in str(err).lower():
            return "it holds pickled code that a weights-only load refuses (none of it was run)", verified
        return "its pickle data is damaged", verified
    except Exception as err:  # a damaged pickle raises anything from EOFError to KeyError
        return f"its pickle data is damaged ({type(err).__name__})", verified
    return None, verified


def _candidates(directory: Path) -> list[Path]:
    """``*.ckpt`` files and finished sharded directories, newest step first (newest file on a tie)."""
    found = [p for p in directory.glob("*.ckpt") if not (p.is_dir() and not _is_sharded_finished(p))]
    return sorted(found, key=lambda p: (checkpoint_step(p), p.stat().st_mtime), reverse=True)


def scan_checkpoints(directory: Path, say: Callable[[str], None] = _say) -> tuple[Path | None, list[tuple[Path, str]]]:
    """(the newest usable checkpoint or None, [(skipped checkpoint, why)]), saying one sentence per skip."""
    directory = Path(directory)
    if not directory.is_dir():
        return None, []
    skipped = []
    for path in _candidates(directory):
        problem, verified = checkpoint_problem(path)
        if problem is None:
            if not verified:
                say(f"warning: checkpoint {path} has no checksum (written by an older version); using it unverified.")
            return path, skipped
        say(f"skipping checkpoint {path}: {problem}.")
        skipped.append((path, problem))
    return None, skipped


def find_resume_checkpoint(directory: Path) -> Path | None:
    """The newest usable checkpoint in ``directory`` (see the module doc), or None."""
    return scan_checkpoints(directory)[0]


def resolve_resume(resume: str, checkpoint_dir: Path) -> str | None:
    if resume == "never":
        return None
    if resume == "auto":
        found, skipped = scan_checkpoints(checkpoint_dir)
        if found is None and skipped:
            names = ", ".join(p.name for p, _ in skipped)
            raise ValueError(f"resume=auto found {len(skipped)} checkpoint(s) in {checkpoint_dir} ({names}) and none "
                             f"is usable; move them away to keep them, or start over from step 0 with resume=never.")
        return str(found) if found else None
    path = Path(resume).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"resume={resume!r}: no such checkpoint; use resume=auto, resume=never or a .ckpt path.")
    problem, _ = checkpoint_problem(path)
    if problem:
        raise ValueError(f"resume={resume!r} is an incomplete or corrupt checkpoint ({problem}); pick an earlier one.")
    return str(path)


def prune_step_checkpoints(directory: Path, keep: int, resume_step: int, resume_from: Path | None) -> list[Path]:
    """Remove ``step*.ckpt`` (files with their checksum sidecars, or sharded directories) at or below the resumed
    step beyond the newest ``keep``; never ``resume_from``. ModelCheckpoint forgets files written before a
    restart (or between a save and the removal a kill interrupted), so they would stay forever. Those above
    the resumed step were skipped as unusable; they are left for the user to inspect. ``keep < 0``: keep all."""
    if keep < 0 or not Path(directory).is_dir():
        return []
    steps = [(int(m.group(1)), p) for p in Path(directory).iterdir() if (m := STEP_CHECKPOINT.match(p.name))]
    older = sorted((s, p.stat().st_mtime, p) for s, p in steps if s <= resume_step)
    doomed = [p for _, _, p in older[:max(len(older) - keep, 0)]]
    removed = []
    for path in doomed:
        if resume_from is not None and path.resolve() == Path(resume_from).resolve():
            continue
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
            sidecar(path).unlink(missing_ok=True)
        removed.append(path)
    return removed
