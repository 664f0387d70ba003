"""What a device measures about its own learning in a round, on tensors it computes anyway (docs/implementation.md,
"Learning diagnostics"): how well BAA's discriminators tell G from its local features, how GFF's gates blend f_l and f_g,
how large its head's logits are. Each part also counts the seconds it costs, so a run shows that the
diagnostics stay cheap. No sockets here; edge_client/app.py sends the result inside the upload's metrics
(runtime.diagnostics.diagnostics_to_metrics)."""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import Tensor, nn

__all__ = ["Calls", "DiscriminatorTally", "RunningStats", "DeviceDiagnostics", "logit_norm"]


@dataclass
class Calls:
    """One discriminator's right calls: a real sample is called real when its logit is > 0, a fake one fake
    when its logit is < 0 (a logit of exactly 0 is wrong both ways)."""

    real_right: int = 0
    real_total: int = 0
    fake_right: int = 0
    fake_total: int = 0

    def add(self, real_logits: Tensor, fake_logits: Tensor) -> None:
        self.real_right += int((real_logits > 0).sum())
        self.real_total += real_logits.numel()
        self.fake_right += int((fake_logits < 0).sum())
        self.fake_total += fake_logits.numel()

    def balanced_accuracy(self) -> float:
        """The mean of the accuracy on real and on fake samples (0.5: chance; nan before any call)."""
        if not self.real_total or not self.fake_total:
            return math.nan
        return 0.5 * (self.real_right / self.real_total + self.fake_right / self.fake_total)


@dataclass
class DiscriminatorTally:
    """BAA's two discriminators' calls over a round's public batches, taken from the logits the discriminator
    step computes for its loss (so before that step updates them: each batch is judged before it is learnt)."""

    calls: dict[str, Calls] = field(default_factory=lambda: {"intra": Calls(), "cross": Calls()})
    seconds: float = 0.0

    def add(self, logits: dict[str, tuple[Tensor, Tensor]]) -> None:
        """logits: discriminator name ("intra", "cross") -> (real logits (B,), fake logits (B,))."""
        started = time.perf_counter()
        with torch.no_grad():
            for name, (real, fake) in logits.items():
                self.calls[name].add(real, fake)
        self.seconds += time.perf_counter() - started


@dataclass
class RunningStats:
    """Mean and (population) standard deviation of every element of the tensors added, streamed in float64."""

    total: float = 0.0
    total_sq: float = 0.0
    count: int = 0

    def add(self, values: Tensor) -> None:
        values = values.detach().double()
        self.total += float(values.sum())
        self.total_sq += float((values * values).sum())
        self.count += values.numel()

    def mean(self) -> float:
        return self.total / self.count if self.count else math.nan

    def std(self) -> float:
        if not self.count:
            return math.nan
        mean = self.mean()
        return math.sqrt(max(self.total_sq / self.count - mean * mean, 0.0))  # rounding can go a hair below 0


@torch.no_grad()
def logit_norm(logits: Tensor) -> float:
    """Mean over samples of the L2 norm of a classifier's logits (B, C)."""
    return float(logits.float().norm(dim=1).mean())


class DeviceDiagnostics:
    """One round's diagnostics of a device. `result()` gives `{name: value, modality: {name: value}}`:

    - `disc_acc_intra`, `disc_acc_cross`: balanced accuracy of D_in and D_cr on the round's public batches
      (all epochs, all modalities of the device); only when BAA runs;
    - `<modality>.gate1_mean`, `gate1_std`, `gate2_mean`, `gate2_std`: GFF's first-level gate M(f_l + f_g) and
      second-level gate M'(h) over every element of the evaluation pass on the device's test split (the
      share of z drawn from f_l; 1 - gate from f_g); only when GFF runs;
    - `<modality>.upload_cos`: mean cosine between the public features it uploads and the server's G of the
      same rows, when the device holds G this round;
    - `logit_norm`: mean L2 norm of its head's logits on the evaluation pass (classification devices);
    - `seconds`: what computing all of these took on the device.
    """

    def __init__(self) -> None:
        self.discriminators = DiscriminatorTally()
        self.gates: dict[str, dict[str, RunningStats]] = {}  # modality -> gate name -> its stats
        self.values: dict = {}  # finished diagnostics: name -> value, modality -> {name: value}
        self.seconds = 0.0

    @contextlib.contextmanager
    def timing(self) -> Iterator[None]:
        """Counts the block's seconds as diagnostics' cost."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds += time.perf_counter() - started

    def put(self, name: str, value: float, modality: str | None = None) -> None:
        if modality is None:
            self.values[name] = value
        else:
            self.values.setdefault(modality, {})[name] = value

    @contextlib.contextmanager
    def watching_gates(self, modality: str, fusion: nn.Module) -> Iterator[None]:
        """Inside the block, every output of `fusion.gate1` and `fusion.gate2` (the gates the forward really
        used, (B, d) each) is added to this modality's gate statistics, through forward hooks, so the fusion's
        forward (shared with training and the ONNX graph) stays as it is."""
        stats = self.gates.setdefault(modality, {"gate1": RunningStats(), "gate2": RunningStats()})

        def hook(name: str):
            def record(_module: nn.Module, _inputs, output: Tensor) -> None:
                with self.timing():
                    stats[name].add(output)
            return record

        handles = [fusion.gate1.register_forward_hook(hook("gate1")), fusion.gate2.register_forward_hook(hook("gate2"))]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def result(self) -> dict:
        out: dict = {}
        for name, calls in self.discriminators.calls.items():
            if calls.real_total:
                out[f"disc_acc_{name}"] = calls.balanced_accuracy()
        for modality, by_gate in self.gates.items():
            for gate, stats in by_gate.items():
                if stats.count:
                    out.setdefault(modality, {}).update({f"{gate}_mean": stats.mean(), f"{gate}_std": stats.std()})
        for key, value in self.values.items():
            if isinstance(value, dict):
                out.setdefault(key, {}).update(value)
            else:
                out[key] = value
        out["seconds"] = self.seconds + self.discriminators.seconds
        return out
