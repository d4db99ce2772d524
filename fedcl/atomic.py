"""Atomic file writes: readers see the old file or the new one, never half.

Every piece of state fedcl keeps on disk (run checkpoints and metrics, privacy
ledgers, replay buffers, EWC importances, the adapter registry index, keys and
certificates) is written through here: a temporary file in the same folder,
flushed and fsynced, then `os.replace`d over the target, then the folder
fsynced so the rename itself survives a crash. A failed write leaves the old
file and no temporary file behind. Reading them back is `fedcl.statefile`'s
job: parsed and shape-checked, never trusted.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable


def write_bytes(path: str | Path, data: bytes, *, mode: int | None = None) -> Path:
    """Write `data` to `path` atomically, creating the folder if needed.

    `mode` sets the file's permissions before any byte is written (a private
    key never exists with wider rights); None keeps the temporary file's 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        if mode is not None:
            os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def write_text(path: str | Path, text: str, *, mode: int | None = None) -> Path:
    return write_bytes(path, text.encode("utf-8"), mode=mode)


def write_json(path: str | Path, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2) + "\n")


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some platforms cannot open a directory
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_dir(target: str | Path, fill: Callable[[Path], None]) -> Path:
    """Build a folder with `fill(tmp)` beside `target`, then move it into place.

    An existing `target` is replaced (a round re-run after a crash replaces its
    own output); if `fill` fails, `target` is left as it was.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        fill(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(target.parent)
    return target
