"""Trials on Flower's simulation engine, with one Ray instance for the whole study.

`fedcl.simulation.run_simulation` is the trial runner, exactly as `fedcl
simulate` uses it. Flower's Ray backend starts Ray when it is not running and
shuts it down at the end of every run; starting Ray is most of a small
trial's cost on this 2-core machine (25 s measured under load, against 2-3 s
to start the client actors). `shared_ray()` keeps Ray up between the trials
of one `fedcl tune` session: the end of a run still ends its client actors
(each trial gets fresh client processes), but not Ray itself. It patches one
method of Flower's backend (pinned flwr 1.42) for the duration of the study
and restores it after; set FEDCL_TUNE_SHARED_RAY=0 to turn it off.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator


@contextlib.contextmanager
def shared_ray() -> Iterator[None]:
    if os.environ.get("FEDCL_TUNE_SHARED_RAY", "1") == "0":
        yield
        return
    from flwr.server.superlink.fleet.vce.backend.raybackend import RayBackend

    original = RayBackend.terminate

    def terminate_actors_only(self) -> None:
        if self.pool:
            self.pool.terminate_all_actors()

    RayBackend.terminate = terminate_actors_only
    try:
        yield
    finally:
        RayBackend.terminate = original
        import ray

        if ray.is_initialized():
            ray.shutdown()


def engine_runner(config) -> None:
    """One trial (or one round step of it) on the simulation engine."""
    from fedcl.simulation import run_simulation

    run_simulation(config)
