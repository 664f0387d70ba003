"""Differentially private devices (ClientConfig.dp): DP-SGD through Opacus on every step that reads private data.

What reads private data, and what does not:
- the private steps (the task loss on private rows, through the encoders, GFF and the head) run DP-SGD: rows
  Poisson-sampled at rate q = 1 / ceil(N / batch_size), per-sample gradients clipped to norm C (dp_clip), Gaussian
  noise of std sigma * C (dp_noise) on their sum; Opacus's RDP accountant adds up each step's (sigma, q);
- public passes (BAA's adversarial pass, FedMD/FedGEMS/FedET's digest, CreamFL's regularisers) read only the
  public set, G and the current weights, so they spend no budget; per-sample hooks are off during them;
- the uploads are the local encoders' features of the public set: a function of the DP-trained weights and
  public data only, so they carry the same (epsilon, delta) by post-processing.
Not covered: the evaluation metrics and training losses a device reports (computed on its private data). The
global tower's features of the private data (GFF's f_g) never leave the device.

A DP step uses its own Adam over the modules it trains, fresh each round (Opacus's optimizer needs a
per-sample gradient for every parameter it holds, and the device's persistent optimiser also holds the
discriminators). Noise comes from a generator seeded by the device and round (deterministic runs); Opacus's
secure_mode (a cryptographic generator) is not used."""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator

import torch
from torch import nn

from fedafd.edge_client.model import adam_groups
from fedafd.runtime.torch_utils import derived_seed, round_seed, seeded_generator

if TYPE_CHECKING:
    from opacus.accountants import RDPAccountant
# Opacus is imported where it is used: importing it costs about 7 s of CPU, paid by every device process and
# simulation at start-up, DP or not.

# Opacus's backward hooks on an adapter's first layer, whose input (cached backbone features) needs no gradient:
# torch warns on every step that the hook sees output gradients only, which is all per-sample gradients need.
warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed with respect "
                                          "to module outputs since no inputs require gradients")


@dataclass
class PrivacyBudget:
    """A device's (epsilon, delta) budget and what it has spent: the accountant's history of (sigma, q, steps),
    saved with the device's state so a restarted device goes on counting."""

    epsilon: float
    delta: float
    noise_multiplier: float
    max_grad_norm: float
    history: list[tuple[float, float, int]] = field(default_factory=list)

    def accountant(self, extra_steps: int = 0, sample_rate: float = 0.0) -> RDPAccountant:
        from opacus.accountants import RDPAccountant

        accountant = RDPAccountant()
        accountant.history = [tuple(entry) for entry in self.history]
        if extra_steps:
            accountant.history.append((self.noise_multiplier, sample_rate, extra_steps))
        return accountant

    def spent(self) -> float:
        """Epsilon spent so far at this budget's delta (0 before the first private step)."""
        return self.accountant().get_epsilon(self.delta) if self.history else 0.0

    def epsilon_after(self, steps: int, sample_rate: float) -> float:
        """Epsilon spent after `steps` more DP-SGD steps at `sample_rate`."""
        return self.accountant(steps, sample_rate).get_epsilon(self.delta)

    def affords(self, steps: int, sample_rate: float) -> bool:
        """Whether `steps` more DP-SGD steps at `sample_rate` stay within epsilon."""
        return self.epsilon_after(steps, sample_rate) <= self.epsilon

    def record(self, steps: int, sample_rate: float) -> None:
        accountant = self.accountant()
        for _ in range(steps):
            accountant.step(noise_multiplier=self.noise_multiplier, sample_rate=sample_rate)
        self.history = [tuple(entry) for entry in accountant.history]


def sample_rate(private_count: int, batch_size: int) -> float:
    """Poisson sampling rate q: each row joins each step's batch with probability 1 / ceil(N / batch size), as
    Opacus's DP data loader samples (about one pass over the data every ceil(N / batch size) steps)."""
    return 1.0 / math.ceil(private_count / batch_size)


def steps_per_epoch(private_count: int, batch_size: int) -> int:
    return math.ceil(private_count / batch_size)


class PrivateSteps:
    """One round's DP-SGD: per-sample gradients on the private modules (hooks on only while a private step
    runs), Opacus's DPOptimizer, Poisson batches, and the budget's accounting of each step."""

    def __init__(self, modules: nn.ModuleDict, budget: PrivacyBudget, private_count: int, batch_size: int, lr: float,
                 seed: int, fusion_lr: float = 0.0):
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer

        self.budget = budget
        self.rate = sample_rate(private_count, batch_size)
        self.private_count = private_count
        self.steps_per_epoch = steps_per_epoch(private_count, batch_size)
        self.modules = GradSampleModule(modules, loss_reduction="mean", strict=True)
        self.modules.disable_hooks()
        parameters = [(name, p) for name, p in modules.named_parameters() if p.requires_grad]
        adam = torch.optim.Adam(adam_groups(parameters, lr, fusion_lr), lr=lr)
        self.optimizer = DPOptimizer(adam, noise_multiplier=budget.noise_multiplier,
                                     max_grad_norm=budget.max_grad_norm,
                                     expected_batch_size=max(1, int(self.rate * private_count)),  # as Opacus's make_private
                                     loss_reduction="mean", generator=seeded_generator(derived_seed(seed, "dp-noise")))
        self.steps = 0

    def batches(self, generator: torch.Generator) -> Iterator[torch.Tensor]:
        """One epoch of Poisson-sampled batches of private rows (possibly empty). Every batch counts as a step
        of the mechanism, trained on or not (an empty one releases nothing, so counting it is conservative)."""
        for _ in range(self.steps_per_epoch):
            mask = torch.rand(self.private_count, generator=generator) < self.rate
            self.steps += 1
            yield torch.nonzero(mask).flatten()

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        """Per-sample gradients are captured only inside (a private step's forward and backward)."""
        self.modules.enable_hooks()
        try:
            yield
        finally:
            self.modules.disable_hooks()

    def close(self) -> None:
        """Account the round's steps and take the hooks and per-sample gradients off the model."""
        self.budget.record(self.steps, self.rate)
        self.modules.remove_hooks()
        for parameter in self.modules.parameters():
            for name in ("grad_sample", "_forward_counter", "summed_grad"):
                if hasattr(parameter, name):
                    delattr(parameter, name)


def upload_noise_generator(seed: int, round_: int) -> torch.Generator:
    """The stream of a device's upload noise in a round (`seed`: the device's own seed)."""
    return seeded_generator(derived_seed(round_seed(seed, round_), "upload-noise"))


def noisy_upload(features: dict[str, torch.Tensor], clip: float, std: float, generator: torch.Generator
                 ) -> dict[str, torch.Tensor]:
    """The cheaper, weaker option (ClientConfig.upload_noise): each uploaded row clipped to norm `clip`, then
    Gaussian noise of std `std` on each element. It blurs what the server sees of each public row; it is not a
    differential-privacy guarantee for the private data (the noise is not calibrated to any one private sample's
    influence on the features)."""
    noisy = {}
    for modality, rows in features.items():  # (P, d)
        norms = rows.norm(dim=1, keepdim=True).clamp(min=1e-12)
        clipped = rows * (clip / norms).clamp(max=1.0)
        noisy[modality] = clipped + std * torch.randn(clipped.shape, generator=generator, dtype=clipped.dtype)
    return noisy
