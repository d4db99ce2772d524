"""Turn a .gguf file into a plain Hugging Face folder once, and reuse it.

Transformers can read GGUF, but it dequantises every tensor on each load
(about 30 s for the 135M SmolLM2). `ensure_converted` does that work once and
caches the result as float32 safetensors with the tokenizer beside it, in
``$FEDCL_CACHE/models/<stem>-<key>`` (default ``~/.cache/fedcl/models/...``);
later loads read that folder in well under a second.

The key is a short hash of the file's size and modification time, so a
replaced file gets a new folder. A folder only counts as converted when it
holds the marker file, and it only gets its final name through one
``os.replace`` of a finished temporary folder: a killed conversion leaves a
``.tmp-`` folder that nothing trusts (the next conversion deletes it), and of
two processes converting at once the loser drops its copy and uses the
winner's. A lock file makes the second process wait instead of converting too.

Used by `fedcl.models.load_base`; nothing here imports flwr.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import uuid
from pathlib import Path
from typing import Callable, Iterator

try:  # POSIX only; without it two processes may both convert (still safe).
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

# Written last into a finished folder; its presence is what "converted" means.
MARKER = "fedcl-gguf.json"


def cache_root() -> Path:
    """``$FEDCL_CACHE`` if set, else ``~/.cache/fedcl``."""
    env = os.environ.get("FEDCL_CACHE", "")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fedcl"


def converted_folder(gguf_path: str | os.PathLike, root: Path | None = None) -> Path:
    """Where the converted folder for `gguf_path` lives (it may not exist yet)."""
    path = Path(gguf_path)
    stat = path.stat()
    key = hashlib.sha256(f"{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return (root or cache_root()) / "models" / f"{path.stem}-{key}"


def is_converted(folder: Path) -> bool:
    return (folder / MARKER).is_file()


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantise `gguf_path` to a float32 Hugging Face folder at `out_dir`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src_dir, fname = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=fname, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        src_dir, gguf_file=fname, dtype=torch.float32, local_files_only=True
    )
    # The weights are dequantised now; without this, save_pretrained records a
    # GGUF quantizer that a plain later load would try to honour.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    if fcntl is None:  # pragma: no cover
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released by the OS if we die
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_converted(
    gguf_path: str | os.PathLike,
    root: Path | None = None,
    *,
    convert: Callable[[Path, Path], None] | None = None,
) -> Path:
    """Return the converted folder for `gguf_path`, converting it first if needed.

    `convert(source, out_dir)` fills a folder (default `convert_gguf`; tests
    pass fakes).
    """
    convert = convert or convert_gguf
    source = Path(gguf_path).expanduser().resolve()
    target = converted_folder(source, root)
    if is_converted(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _lock(target.parent / f".{target.name}.lock"):
        if is_converted(target):  # another process finished while we waited
            return target
        _remove_leftovers(target)
        tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        print(f"fedcl: converting {source.name} to a Hugging Face folder once, cached at {target}",
              file=sys.stderr, flush=True)
        try:
            tmp.mkdir()
            convert(source, tmp)
            stat = source.stat()
            info = {"source": str(source), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
            (tmp / MARKER).write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
            try:
                os.replace(tmp, target)
            except OSError:
                if not is_converted(target):  # not a lost race: a real error
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _remove_leftovers(target: Path) -> None:
    """Delete temporary folders of killed conversions, and an unmarked target.

    Called under the lock, so no live conversion owns these folders (unless
    the file system ignores locks, where the worst case is one redone copy).
    """
    for stale in target.parent.glob(f".{target.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    if target.exists() and not is_converted(target):
        aside = target.parent / f".{target.name}.tmp-stale-{uuid.uuid4().hex[:8]}"
        os.replace(target, aside)
        shutil.rmtree(aside, ignore_errors=True)
