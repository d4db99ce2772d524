"""Run a configured federation on Flower's simulation engine (its Ray backend).

The ServerApp runs in a thread of this process; each virtual client runs in
a Ray worker process that keeps its model loaded between rounds. Flower's own
round loop drives everything: nothing here iterates over rounds.
"""

from __future__ import annotations

import os
import warnings

from fedcl.config import Config


def backend_config(config: Config) -> dict:
    cpus = os.cpu_count() or 1
    return {
        "client_resources": {"num_cpus": min(config.federation.client_cpus, cpus), "num_gpus": 0.0},
        "init_args": {"num_cpus": cpus, "num_gpus": 0, "include_dashboard": False,
                      "logging_level": "warning", "log_to_driver": True},
    }


def run_simulation(config: Config) -> None:
    """Run (or resume) the federation described by `config`; the server writes `run.out_dir`."""
    # Ray workers inherit the environment: one tokenizer thread each, and no hub access.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

    from flwr.app import Context, RecordDict
    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.telemetry import EventType

    from client.app import with_run_config
    from server.app import app as server_app

    flat = config.to_flat()
    context = Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config=dict(flat))
    with warnings.catch_warnings():
        # The Python entry point is marked deprecated in favour of `flwr run`;
        # fedcl drives the same engine and says so in its docs.
        warnings.filterwarnings("ignore", message=".*run_simulation.*deprecated.*")
        _run_simulation(
            num_supernodes=config.federation.clients,
            exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
            client_app=with_run_config(flat),
            server_app=server_app,
            backend_name="ray",
            backend_config=backend_config(config),
            server_app_context=context,
        )
