"""The methods on the device, one file each, found by the strategy's name in the round's settings; their server
sides are cloud_server/strategies/<name>.py."""

from __future__ import annotations

from fedafd.edge_client.objectives.base import Objective, digest
from fedafd.edge_client.objectives.creamfl import CreamFlObjective
from fedafd.edge_client.objectives.fedafd import FedAfdObjective
from fedafd.edge_client.objectives.fedcmi import FedCmiObjective
from fedafd.edge_client.objectives.fedet import FedEtObjective
from fedafd.edge_client.objectives.fedgems import FedGemsObjective
from fedafd.edge_client.objectives.fedmd import FedMdObjective
from fedafd.edge_client.objectives.local import LocalObjective
from fedafd.edge_client.training import DeviceRound

OBJECTIVES: dict[str, type[Objective]] = {cls.name: cls for cls in (
    FedAfdObjective, LocalObjective, FedMdObjective, CreamFlObjective, FedGemsObjective, FedEtObjective,
    FedCmiObjective)}


def objective_for(round: DeviceRound) -> Objective:
    """The objective of the round's method (settings.strategy)."""
    return OBJECTIVES[round.settings.strategy](round)


__all__ = ["OBJECTIVES", "Objective", "digest", "objective_for"]
