"""Run fedcl's own ServerApp and ClientApp: on Flower's Ray engine, or in this process.

The engines in `fedcl.federation` run any pair of apps; this is where fedcl's
pair is bound to them, so the Flower layer never imports its own apps.
`simulate` is what `fedcl simulate`, `fedcl update` and `fedcl tune` run;
`run_inprocess` drives the same apps through `InProcessGrid` (no Ray), for
tests, benchmarks and tuning studies where Ray's start would dominate.
"""

from __future__ import annotations

from collections.abc import Callable

from flwr.app import Message

from fedcl.config import Config
from fedcl.federation.grid import InProcessGrid, server_context


def simulate(config: Config) -> None:
    """Run (or resume) the federation described by `config`; the server writes `run.out_dir`."""
    from fedcl.client.app import app as client_app
    from fedcl.federation.engine import run_on_ray
    from fedcl.server.app import app as server_app

    run_on_ray(config, client_app=client_app, server_app=server_app)


def run_inprocess(config: Config, *,
                  intercept: Callable[[int, Message], Message | None] | None = None) -> InProcessGrid:
    """Run (or resume) the federation in this process; return the grid (what was sent and replied)."""
    from fedcl.client.app import app as client_app
    from fedcl.server.app import main as server_main

    flat = config.to_flat()
    grid = InProcessGrid(client_app, config.federation.clients, flat, intercept=intercept)
    server_main(grid, server_context(flat))
    return grid
