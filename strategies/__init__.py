"""Aggregation strategies on Flower's strategy interface, selectable by name."""

from __future__ import annotations

from strategies import fedavg

BUILDERS = {"fedavg": fedavg.build}


def build_strategy(config, *, round_offset: int = 0):
    """The strategy named by `config.strategy.name`, resumed at `round_offset`."""
    try:
        builder = BUILDERS[config.strategy.name]
    except KeyError:
        raise ValueError(f"strategy.name: got {config.strategy.name!r}, expected one of "
                         f"{', '.join(BUILDERS)}") from None
    return builder(config, round_offset=round_offset)
