"""Granularity-aware feature fusion with hand-set gate weights."""

import math

import pytest
import torch

from fedafd.edge_client.fusion import AttentionGate, GranularityFusion, fuse, gated_mix

LN3 = math.log(3.0)  # sigmoid(ln 3) = 0.75, sigmoid(-ln 3) = 0.25, sigmoid(0) = 0.5


def _set_branch(branch: torch.nn.Sequential, w1: list[float], w2: list[float]) -> None:
    """Bottleneck d=4 -> 1 -> 4 with first weight w1 (1x4), second weight w2 (4x1), zero biases and
    identity BatchNorms (eval mode, running mean 0, var 1, affine 1/0, eps 0)."""
    lin1, bn1, _, lin2, bn2 = branch
    with torch.no_grad():
        lin1.weight.copy_(torch.tensor([w1]))
        lin1.bias.zero_()
        lin2.weight.copy_(torch.tensor(w2).unsqueeze(1))
        lin2.bias.zero_()
    for bn in (bn1, bn2):
        bn.reset_parameters()  # running mean 0, running var 1, weight 1, bias 0
        bn.eps = 0.0


def test_bottleneck_shape_d_to_d_over_4():
    gate = AttentionGate(16)
    widths = [(m.in_features, m.out_features) for m in gate.t1 if isinstance(m, torch.nn.Linear)]
    assert widths == [(16, 4), (4, 16)]
    assert [type(m).__name__ for m in gate.t2] == [
        "Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d"
    ]


def test_zero_weights_give_half_gate_and_average():
    # Prepare: all Linear weights and biases zero -> T1 = T2 = 0 -> gate = sigmoid(0) = 0.5
    fusion = GranularityFusion(4).eval()
    for gate in (fusion.gate1, fusion.gate2):
        for branch in (gate.t1, gate.t2):
            _set_branch(branch, [0.0] * 4, [0.0] * 4)
    f_l = torch.tensor([[1.0, 2.0, 0.0, -1.0], [4.0, 0.0, 2.0, 2.0]])
    f_g = torch.tensor([[0.0, 1.0, 2.0, 1.0], [0.0, 0.0, 0.0, 6.0]])
    # Execute
    z = fusion(f_l, f_g)
    # Assert: h = 0.5 f_l + 0.5 f_g; z = 0.5 f_l + 0.5 f_g
    torch.testing.assert_close(z, 0.5 * f_l + 0.5 * f_g)


def test_nontrivial_gates_by_hand():
    # Prepare
    fusion = GranularityFusion(4).eval()
    # Gate 1: T1 picks x_0 and writes [ln3, 0, 0, ln3]; T2 picks x_0 and writes [0, 0, -ln3, 0].
    _set_branch(fusion.gate1.t1, [1.0, 0.0, 0.0, 0.0], [LN3, 0.0, 0.0, LN3])
    _set_branch(fusion.gate1.t2, [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, -LN3, 0.0])
    # Gate 2: T1' picks -2 * x_3 and writes [0, ln3, ln3, -ln3]; T2' is zero.
    _set_branch(fusion.gate2.t1, [0.0, 0.0, 0.0, -2.0], [0.0, LN3, LN3, -LN3])
    _set_branch(fusion.gate2.t2, [0.0] * 4, [0.0] * 4)
    f_l = torch.tensor([[1.0, 2.0, 0.0, -1.0]])
    f_g = torch.tensor([[0.0, 1.0, 2.0, 1.0]])
    # Execute
    z = fusion(f_l, f_g)
    # Assert
    # Level 1: x = f_l + f_g = [1, 3, 2, 0]; ReLU(x_0) = 1 in both branches
    #   T1 + T2 = [ln3, 0, -ln3, ln3] -> M = [0.75, 0.5, 0.25, 0.75]
    #   h = M f_l + (1 - M) f_g
    #     = [0.75*1 + 0.25*0, 0.5*2 + 0.5*1, 0.25*0 + 0.75*2, 0.75*(-1) + 0.25*1]
    #     = [0.75, 1.5, 1.5, -0.5]
    # Level 2: ReLU(-2 * h_3) = ReLU(1) = 1 -> T1' = [0, ln3, ln3, -ln3]
    #   -> M' = [0.5, 0.75, 0.75, 0.25]
    #   z = [0.5*1 + 0.5*0, 0.75*2 + 0.25*1, 0.75*0 + 0.25*2, 0.25*(-1) + 0.75*1]
    #     = [0.5, 1.75, 0.5, 0.5]
    torch.testing.assert_close(z, torch.tensor([[0.5, 1.75, 0.5, 0.5]]))
    h = gated_mix(fusion.gate1(f_l + f_g), f_l, f_g)
    torch.testing.assert_close(h, torch.tensor([[0.75, 1.5, 1.5, -0.5]]))


def test_fuse_with_plain_gate_functions():
    # Prepare: gate1 constant 0.25, gate2 = h itself (values chosen inside [0, 1])
    f_l = torch.tensor([[1.0, 0.0]])
    f_g = torch.tensor([[0.0, 1.0]])
    # Execute
    z = fuse(lambda x: torch.full_like(x, 0.25), lambda h: h, f_l, f_g)
    # Assert: h = 0.25 f_l + 0.75 f_g = [0.25, 0.75]; z = h f_l + (1 - h) f_g = [0.25, 0.25]
    torch.testing.assert_close(z, torch.tensor([[0.25, 0.25]]))


def test_output_shape_and_gradients_reach_both_gates():
    # Prepare
    torch.manual_seed(0)
    fusion = GranularityFusion(32).train()
    f_l = torch.randn(8, 32, requires_grad=True)
    f_g = torch.randn(8, 32)
    # Execute
    z = fusion(f_l, f_g)
    (z * torch.randn(8, 32)).sum().backward()
    # Assert
    assert z.shape == (8, 32)
    assert f_l.grad is not None
    for gate in (fusion.gate1, fusion.gate2):
        grads = [p.grad for p in gate.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        assert sum(float(g.abs().sum()) for g in grads) > 0


def test_fuse_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="shapes differ"):
        GranularityFusion(4).eval()(torch.randn(2, 4), torch.randn(3, 4))
