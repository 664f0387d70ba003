"""Training-step details that a wrong implementation would get silently wrong."""

from __future__ import annotations

import torch
from torch import nn

from fedafd.edge_client.training import batchnorm_statistics_frozen


def test_public_batches_leave_batchnorm_statistics_alone_but_still_train() -> None:
    # Prepare: a BatchNorm whose running mean starts at 0; a batch whose mean is 10.
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)).train()
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(2))
        model[0].bias.zero_()
    batch = torch.tensor([[9.0, 9.0], [11.0, 11.0]])
    # Execute: inside the context, then outside it.
    with batchnorm_statistics_frozen(model):
        out = model(batch)
        out[:, 0].mul(torch.tensor([1.0, 2.0])).sum().backward()
    frozen_mean = model[1].running_mean.clone()
    model(batch)
    # Assert: frozen inside (and normalised by the batch's own statistics: +-1), updated outside with
    # momentum 0.1 (0.9 * 0 + 0.1 * 10 = 1), momentum restored, and gradients reached the weights.
    torch.testing.assert_close(frozen_mean, torch.zeros(2))
    torch.testing.assert_close(out[:, 0], torch.tensor([-1.0, 1.0]), atol=1e-3, rtol=0)
    torch.testing.assert_close(model[1].running_mean, torch.tensor([1.0, 1.0]))
    assert model[1].momentum == 0.1
    assert model[0].weight.grad is not None and model[0].weight.grad.abs().sum() > 0
