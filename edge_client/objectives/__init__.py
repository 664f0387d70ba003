"""The methods on the device, one file each, found by the strategy's name in the round's settings (`<NAME>.py`
here and its Objective of that name); their server sides are cloud_server/strategies/<NAME>.py."""

from __future__ import annotations

from fedafd.edge_client.objectives.base import Objective, digest
from fedafd.edge_client.training import DeviceRound
from fedafd.runtime.methods import STRATEGIES, method_class


def objective_class(name: str) -> type[Objective]:
    """The Objective called `name`, from the module of that name in this package."""
    return method_class(__name__, name, Objective)


OBJECTIVES: dict[str, type[Objective]] = {name: objective_class(name) for name in STRATEGIES}


def objective_for(round: DeviceRound) -> Objective:
    """The objective of the round's method (settings.strategy)."""
    return OBJECTIVES[round.settings.strategy](round)


__all__ = ["OBJECTIVES", "Objective", "digest", "objective_class", "objective_for"]
