"""FedET on the device: as FedGEMS' devices, a digest toward the server's G before the epochs (the two methods
differ on the server, in how they weigh the uploads)."""

from __future__ import annotations

from fedafd.edge_client.objectives.base import Objective, digest


class FedEtObjective(Objective):
    name = "fedet"

    def before_epochs(self) -> dict[str, float]:
        return digest(self.round, self.round.G)
