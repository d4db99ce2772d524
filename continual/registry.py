"""The adapter registry: a folder of numbered global-adapter versions and their lineage.

Layout::

    REG/registry.json            the index: committed versions in order (the commit point)
    REG/versions/v0001/adapter/  the version's global adapter (PEFT format)
    REG/versions/v0001/version.json
                                 parent, created, config, data fingerprints (hashes,
                                 never data), metrics (parent vs new), epsilon spent
    REG/.jobs/<id>/              a running (or crashed) job's scratch folder

A job works only inside its own `.jobs/<id>/` folder. It commits by marking
its staged version folder as fedcl's (a `.fedcl-staged` file), moving it to
`versions/<name>` with one rename (refusing an existing name), rewriting
`registry.json` atomically, then removing the mark. A version counts once the
index names it: a crash before the move leaves a stale job folder, a crash
between the move and the index leaves an unindexed, marked version folder, and
`Registry.recover` (run at the start of every job) removes both. Anything
else under `versions/` that the index does not list (a user's backup, a
committed version missing from a stale index) is never deleted: it is moved
to `versions/.unlisted-<time>/` with a warning, and dot-folders there are left
alone. Versions are never overwritten. The index and each version.json are
read through `fedcl.statefile` and checked (shape, names, lineage). Plain
Python: no torch, no flwr.

Usage::

    reg = Registry(path)
    with reg.job() as job:                   # recovers, then gives a scratch folder
        ...write job.stage / "adapter", build `record`...
        name = reg.commit(job, record, parent=reg.latest_name())
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from fedcl.atomic import write_json
from fedcl.statefile import field, read_json

REGISTRY_KIND = "fedcl-adapter-registry"
REGISTRY_FORMAT = 1
VERSION_FILE = "version.json"
ADAPTER_DIR = "adapter"
STAGED_MARK = ".fedcl-staged"  # in a version folder fedcl is committing; removed once indexed
UNLISTED_PREFIX = ".unlisted-"
_FIX = ("fedcl changed nothing: restore registry.json from a backup (each committed version's "
        "versions/vNNNN/version.json holds its version, parent and created)")

logger = logging.getLogger("fedcl.registry")


class RegistryError(ValueError):
    """The registry folder is not what it should be, or a commit is refused."""


@dataclass
class Job:
    """A job's scratch folder; `stage` is the version folder being built."""

    path: Path

    @property
    def stage(self) -> Path:
        return self.path / "version"


def version_name(number: int) -> str:
    return f"v{number:04d}"


class Registry:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    # -- paths ---------------------------------------------------------------
    @property
    def index_file(self) -> Path:
        return self.root / "registry.json"

    @property
    def versions_dir(self) -> Path:
        return self.root / "versions"

    @property
    def jobs_dir(self) -> Path:
        return self.root / ".jobs"

    def version_dir(self, name: str) -> Path:
        return self.versions_dir / name

    def adapter_dir(self, name: str) -> Path:
        return self.version_dir(name) / ADAPTER_DIR

    # -- the index -----------------------------------------------------------
    def state_dict(self) -> dict:
        """The index as stored, checked; an absent registry is an empty one."""
        if not self.index_file.exists():
            return {"kind": REGISTRY_KIND, "format": REGISTRY_FORMAT, "versions": []}
        return self._checked(read_json(self.index_file, what="registry index", fix=_FIX,
                                       error=RegistryError))

    def _checked(self, state: dict) -> dict:
        path = self.index_file
        if state.get("kind") != REGISTRY_KIND:
            raise RegistryError(f"{path}: kind is {state.get('kind')!r}, "
                                f"expected {REGISTRY_KIND!r}")
        if state.get("format") != REGISTRY_FORMAT:
            raise RegistryError(f"{path}: format {state.get('format')!r} is not "
                                f"supported (expected {REGISTRY_FORMAT})")
        previous = None
        for index, entry in enumerate(field(state, "versions", list, path=path, fix=_FIX,
                                            error=RegistryError)):
            where = f"versions[{index}]"
            if not isinstance(entry, dict):
                raise RegistryError(f"{path}: {where} is not an object; {_FIX}")
            name = field(entry, "version", str, path=path, fix=_FIX, where=where, error=RegistryError)
            parent = field(entry, "parent", (str, type(None)), path=path, fix=_FIX, where=where,
                           error=RegistryError)
            field(entry, "created", str, path=path, fix=_FIX, where=where, error=RegistryError)
            # Commits append vNNNN in order, each the child of the one before.
            if name != version_name(index + 1) or parent != previous:
                raise RegistryError(f"{path}: {where} is {name!r} with parent {parent!r}, expected "
                                    f"{version_name(index + 1)!r} with parent {previous!r}; {_FIX}")
            previous = name
        return state

    def names(self) -> list[str]:
        return [entry["version"] for entry in self.state_dict()["versions"]]

    def latest_name(self) -> str | None:
        names = self.names()
        return names[-1] if names else None

    def record(self, name: str) -> dict:
        if name not in self.names():
            raise RegistryError(f"{self.root}: no committed version {name!r}")
        path = self.version_dir(name) / VERSION_FILE
        fix = "fedcl changed nothing: restore the version folder from a backup"
        record = read_json(path, what=f"record of version {name}", fix=fix, error=RegistryError)
        if field(record, "version", str, path=path, fix=fix, error=RegistryError) != name:
            raise RegistryError(f"{path}: version is {record['version']!r}, expected {name!r}; {fix}")
        return record

    def records(self) -> list[dict]:
        """Every committed version's record, oldest first (the lineage)."""
        return [self.record(name) for name in self.names()]

    # -- jobs and commits ------------------------------------------------------
    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            yield

    def recover(self) -> list[str]:
        """Undo what interrupted jobs left: stale job folders (a running job holds a lock
        on its own) and version folders fedcl marked while committing but never indexed.
        Anything else under `versions/` that the index does not list is moved aside to
        `versions/.unlisted-<time>/`, with a warning. Returns what was removed."""
        removed, unlisted = [], None
        with self._lock():
            indexed = set(self.names())
            if self.versions_dir.is_dir():
                for entry in sorted(self.versions_dir.iterdir()):
                    if entry.name in indexed:  # committed; the mark stays after a crash before the unmark
                        (entry / STAGED_MARK).unlink(missing_ok=True)
                        continue
                    if entry.name.startswith("."):  # .unlisted-* and whatever else is hidden: not ours
                        continue
                    if entry.is_dir() and not entry.is_symlink() and (entry / STAGED_MARK).is_file():
                        shutil.rmtree(entry)  # moved in by a commit, never indexed
                        removed.append(str(entry))
                        continue
                    if unlisted is None:
                        unlisted = _fresh_folder(self.versions_dir,
                                                 f"{UNLISTED_PREFIX}{time.strftime('%Y%m%d-%H%M%S')}")
                    os.rename(entry, unlisted / entry.name)
                    logger.warning("registry %s: %s is not in %s and was not staged by fedcl; "
                                   "moved it to %s (nothing was deleted)", self.root, entry.name,
                                   self.index_file.name, unlisted / entry.name)
            if self.jobs_dir.is_dir():
                for folder in sorted(self.jobs_dir.iterdir()):
                    if _try_lock(folder):
                        shutil.rmtree(folder, ignore_errors=True)
                        removed.append(str(folder))
        return removed

    @contextlib.contextmanager
    def job(self) -> Iterator[Job]:
        """A fresh scratch folder under `.jobs/`, removed when the job ends either way."""
        self.state_dict()  # refuse a folder that is not a registry before any write
        self.recover()
        path = self.jobs_dir / f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
        path.mkdir(parents=True)
        with open(path / ".lock", "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield Job(path)
            finally:
                shutil.rmtree(path, ignore_errors=True)

    def commit(self, job: Job, record: dict, *, parent: str | None) -> str:
        """Make `job.stage` (holding `adapter/`) the next version; returns its name.

        Refuses when another version was committed since the job read `parent`,
        and never replaces an existing version folder.
        """
        if not (job.stage / ADAPTER_DIR).is_dir():
            raise RegistryError(f"{job.stage}: no {ADAPTER_DIR}/ folder to commit")
        with self._lock():
            state = self.state_dict()
            latest = state["versions"][-1]["version"] if state["versions"] else None
            if latest != parent:
                raise RegistryError(f"{self.root}: the latest version is now {latest!r}, not the "
                                    f"parent {parent!r} this job started from; run the update again")
            name = version_name(len(state["versions"]) + 1)
            target = self.version_dir(name)
            if target.exists():
                raise RegistryError(f"{target}: already exists; versions are never overwritten")
            record = {"version": name, "parent": parent, **record}
            write_json(job.stage / VERSION_FILE, record)
            # The mark tells `recover` this folder is fedcl's own until the index names it.
            write_json(job.stage / STAGED_MARK, {"job": job.path.name, "version": name})
            self.versions_dir.mkdir(parents=True, exist_ok=True)
            os.rename(job.stage, target)  # one step; the name was checked free under the lock
            state["versions"].append({"version": name, "parent": parent,
                                      "created": record.get("created", "")})
            write_json(self.index_file, state)  # the commit point
            (target / STAGED_MARK).unlink()
        return name


def _fresh_folder(parent: Path, name: str) -> Path:
    """Create and return `parent/name`, or `name-2`, `name-3`, ... if taken."""
    for n in range(1, 1000):
        folder = parent / (name if n == 1 else f"{name}-{n}")
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue
    raise RegistryError(f"{parent}: cannot create a folder named {name}-N")


def _try_lock(folder: Path) -> bool:
    """True when no running job holds `folder`'s lock (or it has none)."""
    lock = folder / ".lock"
    if not lock.exists():
        return True
    with open(lock, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True
