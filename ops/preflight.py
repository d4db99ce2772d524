"""Checks every command runs before it writes anything, and the error they raise.

`preflight` checks the device (model.device, model.compute_dtype), loads the
data, the model and the task and splits the data as the run will, so a
missing GPU, a bad file, an empty client or an impossible DP plan ends the
command with a message before any run folder exists.
"""

from __future__ import annotations

from fedcl.config import Config, ConfigError


class UsageError(Exception):
    """A problem with the command line or its inputs; reported without a traceback."""


def preflight(config: Config) -> None:
    """Load data, model and task and split the data, so errors surface before any write."""
    from fedcl import accelerator, data
    from fedcl.session import GlobalEvaluator, dataset_for

    try:  # a device this machine lacks (model.device = cuda without CUDA) fails first of all
        accelerator.check(config.model)
    except accelerator.DeviceError as err:
        raise UsageError(str(err)) from None
    plan = _plan(config)  # before the model loads: a model the machine cannot hold is named first
    dataset_for(config.data, config.train.seed)  # a bad data file fails fast, before the model loads
    evaluator = GlobalEvaluator(config)
    for client in range(config.federation.clients):
        train, _ = data.client_split(config.data, evaluator.shared.dataset, client,
                                     config.federation.clients, config.train.seed)
        if not train:
            raise UsageError(f"client {client} gets no training records; use fewer clients "
                             "or another data.partition")
        if config.continual_on:
            _preflight_continual(config, client)
        elif config.privacy.enabled and config.privacy.mode == "sample":
            from fedcl.privacy import sample_plan

            try:  # delta vs 1/N and the budget vs one step, per client, before any write
                sample_plan(config, len(train))
            except ConfigError as err:
                raise ConfigError(f"client {client}: {err}") from None
    if plan is not None:
        import sys

        from fedcl.plan import summary_line

        print(summary_line(plan), file=sys.stderr)


def _plan(config: Config):
    """The memory plan (`fedcl plan`), its warnings printed on stderr now; None when it cannot
    be estimated (loading the model then reports what is wrong). Never refuses a run."""
    import sys

    from fedcl.plan import plan_run

    try:
        plan = plan_run(config)
    except (ValueError, OSError):
        return None
    for warning in plan.warnings:
        if "unknown" not in warning:  # an unknown free memory is said in the summary line
            print(f"plan: warning: {warning}", file=sys.stderr)
    return plan


def _preflight_continual(config: Config, client: int) -> None:
    """The task stream builds, and this client's DP plan over its task shares holds."""
    from fedcl.continual.node import dp_base_plan
    from fedcl.continual.schedule import build_stream
    from fedcl.continual.streams import client_share

    shares = client_share(list(build_stream(config.data, config.train.seed)), client,
                          config.federation.clients, config.train.seed)
    if config.privacy.enabled and config.privacy.mode == "sample":
        try:
            dp_base_plan(config, shares)
        except ConfigError as err:
            raise ConfigError(f"client {client}: {err}") from None
