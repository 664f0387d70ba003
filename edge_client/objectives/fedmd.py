"""FedMD on the device: before the epochs, one pass over the public set regressing the local features toward the
consensus the server sent (last round's teacher; none in the first round), then the task."""

from __future__ import annotations

from fedafd.edge_client.objectives.base import Objective, digest


class FedMdObjective(Objective):
    name = "fedmd"

    def before_epochs(self) -> dict[str, float]:
        return digest(self.round, self.round.consensus)
