"""The adapter registry: a folder of numbered global-adapter versions and their lineage.

Layout::

    REG/registry.json            the index: committed versions in order (the commit point)
    REG/versions/v0001/adapter/  the version's global adapter (PEFT format)
    REG/versions/v0001/version.json
                                 parent, created, config, data fingerprints (hashes,
                                 never data), metrics (parent vs new), epsilon spent
    REG/.jobs/<id>/              a running (or crashed) job's scratch folder

A job works only inside its own `.jobs/<id>/` folder. It commits by moving its
staged version folder to `versions/<name>` with one `os.replace` (refusing an
existing name) and then rewriting `registry.json` atomically. A version counts
once the index names it: a crash before the move leaves a stale job folder, a
crash between the move and the index leaves an unindexed version folder, and
`Registry.recover` (run at the start of every job) removes both. Versions are
never overwritten. Plain Python: no torch, no flwr.

Usage::

    reg = Registry(path)
    with reg.job() as job:                   # recovers, then gives a scratch folder
        ...write job.stage / "adapter", build `record`...
        name = reg.commit(job, record, parent=reg.latest_name())
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from fedcl.atomic import write_json

REGISTRY_KIND = "fedcl-adapter-registry"
REGISTRY_FORMAT = 1
VERSION_FILE = "version.json"
ADAPTER_DIR = "adapter"


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
        """The index as stored; an absent registry is an empty one."""
        if not self.index_file.exists():
            return {"kind": REGISTRY_KIND, "format": REGISTRY_FORMAT, "versions": []}
        return self._checked(json.loads(self.index_file.read_text(encoding="utf-8")))

    def _checked(self, state: dict) -> dict:
        if state.get("kind") != REGISTRY_KIND:
            raise RegistryError(f"{self.index_file}: kind is {state.get('kind')!r}, "
                                f"expected {REGISTRY_KIND!r}")
        if state.get("format") != REGISTRY_FORMAT:
            raise RegistryError(f"{self.index_file}: format {state.get('format')!r} is not "
                                f"supported (expected {REGISTRY_FORMAT})")
        return state

    def names(self) -> list[str]:
        return [entry["version"] for entry in self.state_dict()["versions"]]

    def latest_name(self) -> str | None:
        names = self.names()
        return names[-1] if names else None

    def record(self, name: str) -> dict:
        if name not in self.names():
            raise RegistryError(f"{self.root}: no committed version {name!r}")
        return json.loads((self.version_dir(name) / VERSION_FILE).read_text(encoding="utf-8"))

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
        """Remove what interrupted jobs left: unindexed version folders and stale job
        folders (a running job holds a lock on its own). Returns what was removed."""
        removed = []
        with self._lock():
            indexed = set(self.names())
            if self.versions_dir.is_dir():
                for folder in sorted(self.versions_dir.iterdir()):
                    if folder.name not in indexed:  # moved in, never committed
                        shutil.rmtree(folder)
                        removed.append(str(folder))
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
            self.versions_dir.mkdir(parents=True, exist_ok=True)
            os.rename(job.stage, target)  # one step; the name was checked free under the lock
            state["versions"].append({"version": name, "parent": parent,
                                      "created": record.get("created", "")})
            write_json(self.index_file, state)  # the commit point
        return name


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
