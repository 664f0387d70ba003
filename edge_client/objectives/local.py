"""LOCAL on the device (the degenerate method): the task loss on the private data, nothing uploaded
(settings.uplink is off)."""

from __future__ import annotations

from fedafd.edge_client.objectives.base import Objective


class LocalObjective(Objective):
    name = "local"
