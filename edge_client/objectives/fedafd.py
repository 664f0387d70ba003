"""FedAFD on the device (docs/method.md, stage 2): bi-level adversarial alignment (BAA) and the task through
granularity-aware fusion (GFF: the model fuses f_l and f_g whenever the round's f_g is there). The switches baa
and gff turn each part off.

BAA's schedule (settings.baa_schedule):
- pass (the method's and the research code's): each local epoch opens with an adversarial pass over the public
  pairs, per public batch `disc_steps` steps of the discriminators D_in and D_cr on G (real) against the device's
  local features f_l of the same rows (fake), then one step of the local encoder on beta * L_G; then the private
  pass on L_task;
- paired: each private batch is paired with one public batch, and each step takes one discriminator step, then
  one step of the local model on L_task + beta * L_G (two to four discriminator steps a round in the quick
  setting: the game hardly starts)."""

from __future__ import annotations

import itertools
from typing import Iterator

import torch

from fedafd.edge_client.alignment import discriminator_step, generator_loss
from fedafd.edge_client.objectives.base import Objective
from fedafd.edge_client.training import evaluation_mode, task_loss
from fedafd.runtime.torch_utils import batch_indices


class FedAfdObjective(Objective):
    name = "fedafd"

    @property
    def paired(self) -> bool:
        return self.round.settings.baa and self.round.settings.baa_schedule == "paired"

    def before_epoch(self) -> dict[str, float]:
        r = self.round
        if not r.settings.baa or self.paired:
            return {}
        return {key: value / r.local_epochs for key, value in self.adversarial_pass().items()}

    def adversarial_pass(self) -> dict[str, float]:
        """Over the public pairs in shuffled batches (`baa_batches` of them, 0: all): `disc_steps` discriminator
        steps, then one encoder step on beta * L_G against the freshly updated discriminators. f_l is the
        uplink's (eval-mode encoders, gradients flowing). Returns the mean L_D (`disc`) and L_G (`adv_gen`)."""
        r, model, settings = self.round, self.round.model, self.round.settings
        intra, cross = model.discriminators["intra"], model.discriminators["cross"]
        tally = r.diagnostics.discriminators if r.diagnostics is not None else None
        totals, steps = {"disc": 0.0, "adv_gen": 0.0}, 0
        for positions in batch_indices(len(r.public_rows), r.batch_size, r.generator):
            if settings.baa_batches and steps >= settings.baa_batches:
                break
            rows = r.public_rows[positions]
            G = {m: g[positions].to(r.device) for m, g in r.G.items()}  # (B, d) each
            with evaluation_mode(model.encoders):
                f_l = {m: model.encode(m, r.public, rows, r.device) for m in model.modalities}  # (B, d) each
            for step in range(settings.disc_steps):  # the tally counts the first step's calls, before D moves
                totals["disc"] += discriminator_step(intra, cross, r.optimizers.discriminator, f_l, G, settings.beta,
                                                     settings.real_label, tally if step == 0 else None) / settings.disc_steps
            adversarial = sum(generator_loss(intra, cross, local, settings.beta) for local in f_l.values())
            r.optimizers.task.zero_grad(set_to_none=True)
            adversarial.backward()
            r.optimizers.task.step()
            totals["adv_gen"] += float(adversarial.detach())
            steps += 1
        return {key: value / max(steps, 1) for key, value in totals.items()}

    def public_batches(self) -> Iterator[torch.Tensor | None]:
        r = self.round
        if not self.paired:
            return itertools.repeat(None)
        return _cycle(len(r.public_rows), r.batch_size, r.generator)

    def loss_step(self, private_rows: torch.Tensor, public_positions: torch.Tensor | None
                  ) -> tuple[torch.Tensor, dict[str, float]]:
        r, model, settings = self.round, self.round.model, self.round.settings
        parts = {"task": 0.0}
        extra = torch.zeros((), device=r.device)  # what BAA adds to L_task
        if public_positions is not None:
            # f_l of the public rows, computed exactly as the uplink computes them (eval mode: running BatchNorm
            # statistics, no dropout), so the discriminators judge, and the encoder aligns, the feature the server
            # receives and compares with G; gradients still flow. Colour emoji also never move the statistics the
            # private task is evaluated with.
            rows = r.public_rows[public_positions]
            with evaluation_mode(model.encoders):
                f_l = {m: model.encode(m, r.public, rows, r.device) for m in model.modalities}  # (B, d) each
            G = {m: g[public_positions].to(r.device) for m, g in r.G.items()}
            intra, cross = model.discriminators["intra"], model.discriminators["cross"]
            tally = r.diagnostics.discriminators if r.diagnostics is not None else None
            parts["disc"] = discriminator_step(intra, cross, r.optimizers.discriminator, f_l, G, settings.beta,
                                               settings.real_label, tally)
            adversarial = sum(generator_loss(intra, cross, local, settings.beta) for local in f_l.values())
            parts["adv_gen"] = float(adversarial.detach())
            extra = extra + adversarial
        task = task_loss(model, r.private, private_rows, r.f_g, r.device, r.local_task_weight)
        parts["task"] = task.item()
        return task + extra, parts


def _cycle(count: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless shuffled batches of positions in range(count)."""
    while True:
        yield from batch_indices(count, batch_size, generator)
