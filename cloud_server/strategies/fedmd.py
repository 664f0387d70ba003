"""FedMD at the representation level: the teacher is the consensus (the plain mean of the devices' public
features); the server keeps it and sends it down next round, where each device first digests it
(edge_client/objectives/fedmd.py), then trains on its own data."""

from __future__ import annotations

from torch import Tensor

from fedafd.cloud_server.stages import GlobalModel
from fedafd.cloud_server.strategies.base import Downlink, Strategy
from fedafd.runtime.methods import MethodSettings


class FedMd(Strategy):
    name = "fedmd"

    def __init__(self, config):
        super().__init__(config)
        self.consensus: dict[str, Tensor] = {}
        """Last round's teachers, per modality (on the CPU; checkpointed)."""

    def switches(self) -> dict:
        return dict(digest="consensus", digest_weight=1.0)

    def downlink(self, modalities: tuple[str, ...], settings: MethodSettings, model: GlobalModel,
                 public_size: int) -> Downlink:
        plan = super().downlink(modalities, settings, model, public_size)
        return Downlink(plan.towers, plan.global_features, {m: f.numpy() for m, f in self.consensus.items()})

    def keep(self, teachers: dict[str, Tensor]) -> None:
        self.consensus = {m: t.cpu() for m, t in teachers.items()}

    def state_tensors(self) -> dict[str, Tensor]:
        return dict(self.consensus)

    def load_state_tensors(self, tensors: dict[str, Tensor]) -> None:
        self.consensus = dict(tensors)
