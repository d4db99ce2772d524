"""Flower's simulation engine (its Ray backend), for any ServerApp and ClientApp.

The ServerApp runs in a thread of this process; each virtual client runs in
a Ray worker process that keeps its model loaded between rounds. Flower's own
round loop drives everything: nothing here iterates over rounds. Which apps
run is the caller's choice (`fedcl.ops.run` passes fedcl's own), so this
module sits below the apps it runs.

`shared_ray()` keeps one Ray instance up across several runs (the trials of a
`fedcl tune` study): Flower's backend starts Ray when it is not running and
shuts it down at the end of every run, and starting Ray is most of a small
trial's cost on a 2-core machine (25 s measured under load, against 2-3 s to
start the client actors). It patches one method of Flower's backend (pinned
flwr 1.42) while it is open and restores it after; set
FEDCL_TUNE_SHARED_RAY=0 to turn it off.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp
import torch

from fedcl import accelerator, keys
from fedcl.config import Config
from fedcl.federation.ray_leftovers import owned_ray, reap_leftovers


def backend_config(config: Config) -> dict:
    """Ray's resources: federation.client_cpus per client and, on CUDA, federation.client_gpus of a GPU.

    Ray then sets each client's CUDA_VISIBLE_DEVICES to the GPU it was given;
    the ServerApp, in this process, evaluates on model.device itself.
    """
    cpus = os.cpu_count() or 1
    on_cuda = accelerator.resolve_device(config.model.device).type == "cuda"
    gpus = torch.cuda.device_count() if on_cuda else 0
    return {
        "client_resources": {"num_cpus": min(config.federation.client_cpus, cpus),
                             "num_gpus": config.federation.client_gpus if gpus else 0.0},
        "init_args": {"num_cpus": cpus, "num_gpus": gpus, "include_dashboard": False,
                      "logging_level": "warning", "log_to_driver": True},
    }


def client_node_config(config: Config) -> dict:
    """What every simulated client's node config adds: on CUDA, "the GPU Ray gave you".

    A client sees only its own GPU (as cuda:0), so a model.device of cuda:N
    names the server's GPU, not the clients'.
    """
    if accelerator.resolve_device(config.model.device).type == "cuda":
        return {keys.NODE_DEVICE: "cuda"}
    return {}


def with_run_config(client_app: ClientApp, run_config: dict, node_config: dict | None = None) -> ClientApp:
    """`client_app` with `run_config` (and `node_config`'s keys added) in every Context it is called with.

    `flwr run` fills `context.run_config` from pyproject; the Python simulation
    entry point leaves it empty, so this wrapper supplies it to every call.
    """
    wrapped = ClientApp()
    frozen = dict(run_config)
    extra = dict(node_config or {})

    def with_config(context: Context) -> Context:
        # Context.run_config is read-only once set; the node's state record is
        # passed through by reference so that what a handler stores persists.
        return Context(run_id=context.run_id, node_id=context.node_id,
                       node_config={**context.node_config, **extra} if extra else context.node_config,
                       state=context.state, run_config=frozen)

    @wrapped.train()
    def _train(msg: Message, context: Context) -> Message:
        return client_app(msg, with_config(context))

    @wrapped.evaluate()
    def _evaluate(msg: Message, context: Context) -> Message:
        return client_app(msg, with_config(context))

    return wrapped


def run_on_ray(config: Config, *, client_app: ClientApp, server_app: ServerApp) -> None:
    """Run the federation described by `config` with these apps on Flower's Ray engine."""
    # Ray workers inherit the environment: one tokenizer thread each, and no hub access.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    # Ray starts its workers at nice 15, and the virtual clients' training is the run's
    # work: on a shared machine any other process took the cores from them (a DP run's
    # clients got 36% of a core each beside one busy process). Same priority as the server.
    os.environ.setdefault("RAY_worker_niceness", "0")

    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.telemetry import EventType

    flat = config.to_flat()
    context = Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config=dict(flat))
    # What an earlier fedcl run killed with SIGKILL left of its Ray (federation/ray_leftovers.py).
    reap_leftovers()
    with warnings.catch_warnings(), owned_ray():
        # The Python entry point is marked deprecated in favour of `flwr run`;
        # fedcl drives the same engine and says so in its docs.
        warnings.filterwarnings("ignore", message=".*run_simulation.*deprecated.*")
        _run_simulation(
            num_supernodes=config.federation.clients,
            exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
            client_app=with_run_config(client_app, flat, client_node_config(config)),
            server_app=server_app,
            backend_name="ray",
            backend_config=backend_config(config),
            server_app_context=context,
        )


@contextlib.contextmanager
def shared_ray() -> Iterator[None]:
    """Keep Ray running between the runs made inside this block (see the module docstring)."""
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
        reap_leftovers()
        with owned_ray():  # Ray outlives each run here: mark it for the block's length
            yield
    finally:
        RayBackend.terminate = original
        import ray

        if ray.is_initialized():
            ray.shutdown()
