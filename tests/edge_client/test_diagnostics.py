"""A device's learning diagnostics against hand-computed numbers: the discriminators' balanced accuracy from
the discriminator step's own logits, GFF's gate statistics from the gates a forward really used, the logits'
norm, and what the device sends up."""

import math

import pytest
import torch

from fedafd.edge_client.alignment import Discriminator, discriminator_step
from fedafd.edge_client.diagnostics import Calls, DeviceDiagnostics, logit_norm
from fedafd.edge_client.fusion import GranularityFusion

D = 4
LN3 = math.log(3.0)  # sigmoid(ln 3) = 0.75, sigmoid(-ln 3) = 0.25


def _first_coordinate_discriminator() -> Discriminator:
    """A discriminator whose logit is x_0: each hidden layer passes x_0 (+100, so LeakyReLU is the identity on
    it) in its first unit, and the last layer (Discriminator.last) takes the 100 off again."""
    disc = Discriminator(D)
    first, _, second, _, _ = disc.net
    with torch.no_grad():
        for layer in (first, second, disc.last):
            layer.weight.zero_()
            layer.bias.zero_()
        first.weight[0, 0], first.bias[0] = 1.0, 100.0  # h1_0 = x_0 + 100 > 0
        second.weight[0, 0] = 1.0  # h2_0 = x_0 + 100
        disc.last.weight[0, 0], disc.last.bias[0] = 1.0, -100.0  # logit = x_0
    return disc


def _rows(first: list[float]) -> torch.Tensor:
    """(B, D) rows whose first coordinate is `first` (the rest 0.5)."""
    out = torch.full((len(first), D), 0.5)
    out[:, 0] = torch.tensor(first)
    return out


def test_discriminator_accuracy_on_known_logits() -> None:
    # Prepare: logit = x_0. D_in's reals (G_img) are right 3 of 4 times, D_cr's (G_txt) 1 of 4; the device's
    # fakes are right (logit < 0) 3 of 4 times, the 0.0 counting as wrong.
    d_in, d_cr = _first_coordinate_discriminator(), _first_coordinate_discriminator()
    g_image, g_text = _rows([1.0, 2.0, -1.0, 3.0]), _rows([-1.0, -2.0, -3.0, 4.0])
    local = _rows([-1.0, -2.0, 0.0, -3.0])
    optimizer = torch.optim.SGD([*d_in.parameters(), *d_cr.parameters()], lr=0.0)
    diagnostics = DeviceDiagnostics()
    # Execute: one step of an image device
    discriminator_step(d_in, d_cr, optimizer, {"image": local}, {"image": g_image, "text": g_text}, 0.5,
                       tally=diagnostics.discriminators)
    first = diagnostics.result()
    # ... and one step of a multimodal device (image fakes against G_img for D_in, text fakes against G_txt)
    text_local = _rows([1.0, -1.0, -1.0, -1.0])  # fakes right 3 of 4
    discriminator_step(d_in, d_cr, optimizer, {"image": local, "text": text_local},
                       {"image": g_image, "text": g_text}, 0.5, tally=diagnostics.discriminators)
    both = diagnostics.result()
    # Assert: balanced accuracy = (real right share + fake right share) / 2
    assert first["disc_acc_intra"] == pytest.approx((3 / 4 + 3 / 4) / 2)
    assert first["disc_acc_cross"] == pytest.approx((1 / 4 + 3 / 4) / 2)
    # Three batches judged per discriminator. D_in's reals: G_img, G_img, G_txt (3 + 3 + 1 of 12 right);
    # D_cr's reals: G_txt, G_txt, G_img (1 + 1 + 3 of 12). Fakes: 3 + 3 + 3 of 12 for both.
    assert both["disc_acc_intra"] == pytest.approx((7 / 12 + 9 / 12) / 2)
    assert both["disc_acc_cross"] == pytest.approx((5 / 12 + 9 / 12) / 2)


def test_balanced_accuracy_weighs_real_and_fake_equally() -> None:
    # Prepare: 1 real right of 1, 1 fake right of 4
    calls = Calls()
    # Execute
    calls.add(torch.tensor([2.0]), torch.tensor([-1.0, 1.0, 0.0, 3.0]))
    # Assert: (1/1 + 1/4) / 2, not the pooled 2/5
    assert calls.balanced_accuracy() == pytest.approx(0.625)
    assert math.isnan(Calls().balanced_accuracy())


def _constant_gate(gate, per_element: list[float]) -> None:
    """gate(x) = sigmoid(per_element) whatever x: zero Linear layers, identity BatchNorms (eval mode) but the
    last BatchNorm's bias of T1, which is `per_element`."""
    for branch in (gate.t1, gate.t2):
        for module in branch:
            if isinstance(module, torch.nn.Linear):
                torch.nn.init.zeros_(module.weight)
                torch.nn.init.zeros_(module.bias)
            elif isinstance(module, torch.nn.BatchNorm1d):
                module.reset_parameters()
    with torch.no_grad():
        gate.t1[-1].bias.copy_(torch.tensor(per_element))


def test_gate_mean_and_std_of_forced_gates_and_the_blend_matches_z() -> None:
    # Prepare: first gate sigmoid([ln3, -ln3, 0, 0]) = [0.75, 0.25, 0.5, 0.5]; second gate 0.25 everywhere.
    fusion = GranularityFusion(D).eval()
    _constant_gate(fusion.gate1, [LN3, -LN3, 0.0, 0.0])
    _constant_gate(fusion.gate2, [-LN3] * D)
    f_l = torch.tensor([[1.0, 2.0, 0.0, -1.0], [4.0, 0.0, 2.0, 2.0], [0.0, 1.0, 1.0, 0.0]])
    f_g = torch.tensor([[0.0, 1.0, 2.0, 1.0], [0.0, 0.0, 0.0, 6.0], [1.0, 1.0, 0.0, 0.0]])
    diagnostics = DeviceDiagnostics()
    # Execute
    with diagnostics.watching_gates("image", fusion):
        z = fusion(f_l, f_g)
    fusion(f_l, f_g)  # outside the block: not counted (the hooks are gone)
    gates = diagnostics.result()["image"]
    # Assert: gate 1 over its 12 elements: mean 0.5, std sqrt((0.25^2 + 0.25^2 + 0 + 0) / 4) = 0.176777
    assert gates["gate1_mean"] == pytest.approx(0.5)
    assert gates["gate1_std"] == pytest.approx(math.sqrt(0.03125))
    assert gates["gate2_mean"] == pytest.approx(0.25) and gates["gate2_std"] == pytest.approx(0.0, abs=1e-7)
    # z draws gate2_mean of f_l and the rest of f_g (a constant gate: exactly)
    torch.testing.assert_close(z, gates["gate2_mean"] * f_l + (1 - gates["gate2_mean"]) * f_g)
    assert set(fusion.gate1._forward_hooks) == set() and set(fusion.gate2._forward_hooks) == set()


def test_logit_norm_by_hand() -> None:
    # Prepare: rows of norm 5, 0, 10
    logits = torch.tensor([[3.0, 4.0], [0.0, 0.0], [-6.0, 8.0]])
    # Execute / Assert
    assert logit_norm(logits) == pytest.approx(5.0)


def test_result_has_only_what_ran_and_its_cost() -> None:
    # Prepare: nothing measured but a cosine
    diagnostics = DeviceDiagnostics()
    with diagnostics.timing():
        diagnostics.put("upload_cos", 0.25, "text")
    # Execute
    result = diagnostics.result()
    # Assert: no discriminator accuracy (BAA did not run), no gates (GFF did not run)
    assert set(result) == {"text", "seconds"} and result["text"] == {"upload_cos": 0.25}
    assert 0 <= result["seconds"] < 1
