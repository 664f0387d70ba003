"""SED maths (docs/method.md step 5) against hand-computed numbers, and the streaming fold of the teacher
against the whole-batch formula in any arrival order."""

import itertools
import math

import pytest
import torch

from fedafd.cloud_server.distill import TeacherFold, sed_scores, weight_entropy
from fedafd.runtime.diagnostics import mean_cosine
from fedafd.runtime.losses import distillation_loss


def _fold(clients: torch.Tensor, scores: torch.Tensor, order=None) -> TeacherFold:
    """The teacher as the server builds it: one client folded in at a time, in `order`."""
    fold = TeacherFold()
    for c in order if order is not None else range(len(clients)):
        fold.add(f"c{c}", clients[c], scores[c])
    return fold

E = math.e


def _hand_case():
    # Server features g_0 = [1, 0], g_1 = [0, 1], g_2 = [-1, 0] (already unit vectors).
    server = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    # Client A is the server; client B points "up" for samples 0 and 1 and "down" for sample 2.
    # B is scaled by 3 to check that the functions L2-normalise it first.
    client_a = server.clone()
    client_b = 3.0 * torch.tensor([[0.0, 1.0], [0.0, 1.0], [0.0, -1.0]])
    return torch.stack([client_a, client_b]), server


def test_sed_scores_weights_teacher_by_hand():
    # Prepare
    clients, server = _hand_case()
    # Execute
    scores = sed_scores(clients, server)
    fold = _fold(clients, scores)
    teacher = fold.teacher()
    # Assert
    # Client A, sample 0: <v, g_j> = [1, 0, -1] -> s = 1 - log(e + 1 + 1/e) = 1 - 1.40761 = -0.40761
    # Client A, sample 1: <v, g_j> = [0, 1, 0]  -> s = 1 - log(2 + e) = 1 - 1.55144 = -0.55144
    # Client A, sample 2: <v, g_j> = [-1, 0, 1] -> s = 1 - log(e + 1 + 1/e) = -0.40761
    # Client B, sample 0: v = [0, 1], sims [0, 1, 0], <v, g_0> = 0 -> s = -log(2 + e) = -1.55144
    # Client B, sample 1: same sims, <v, g_1> = 1 -> s = 1 - log(2 + e) = -0.55144
    # Client B, sample 2: v = [0, -1], sims [0, -1, 0], <v, g_2> = 0 -> -log(2 + 1/e) = -0.86199
    lse_a = math.log(E + 1 + 1 / E)
    lse_up = math.log(2 + E)
    lse_down = math.log(2 + 1 / E)
    expected_scores = torch.tensor(
        [[1 - lse_a, 1 - lse_up, 1 - lse_a], [-lse_up, 1 - lse_up, -lse_down]]
    )
    torch.testing.assert_close(scores, expected_scores, atol=1e-5, rtol=0)
    # Weights: w_A = 1 / (1 + exp(s_B - s_A)).
    # sample 0: s_A - s_B = 1.14384 -> w_A = 0.75838; sample 1: equal scores -> 0.5;
    # sample 2: s_A - s_B = 0.45439 -> w_A = 0.61168.
    w_a = torch.tensor([0.7583837, 0.5, 0.6116822])
    mean_weights = fold.mean_weights()
    assert mean_weights["c0"] == pytest.approx(float(w_a.mean()), abs=1e-5)
    assert mean_weights["c1"] == pytest.approx(float(1 - w_a.mean()), abs=1e-5)
    # Teacher t_k = w_A * v_A + w_B * v_B (unit vectors):
    # t_0 = 0.75838 * [1, 0] + 0.24162 * [0, 1]   = [0.75838, 0.24162]
    # t_1 = 0.5 * [0, 1] + 0.5 * [0, 1]           = [0, 1]
    # t_2 = 0.61168 * [-1, 0] + 0.38832 * [0, -1] = [-0.61168, -0.38832]
    expected_teacher = torch.tensor(
        [[0.7583837, 0.2416163], [0.0, 1.0], [-0.6116822, -0.3883178]]
    )
    torch.testing.assert_close(teacher, expected_teacher, atol=1e-5, rtol=0)


def test_equal_scores_make_the_plain_mean_of_unit_vectors():
    # Prepare
    clients, _ = _hand_case()
    # Execute: the "w/o SED" ablation's and FedMD's teacher
    teacher = _fold(clients, torch.zeros(2, 3)).teacher()
    # Assert: ([1,0] + [0,1]) / 2, ([0,1] + [0,1]) / 2, ([-1,0] + [0,-1]) / 2
    torch.testing.assert_close(teacher, torch.tensor([[0.5, 0.5], [0.0, 1.0], [-0.5, -0.5]]))


def test_chunked_scores_equal_unchunked_reference():
    # Prepare
    gen = torch.Generator().manual_seed(0)
    clients = torch.randn(3, 1000, 16, generator=gen)
    server = torch.randn(1000, 16, generator=gen)
    v = torch.nn.functional.normalize(clients, dim=-1)
    g = torch.nn.functional.normalize(server, dim=-1)
    sims = v @ g.T  # (C, P, P), fine for a reference at this size
    reference = sims.diagonal(dim1=1, dim2=2) - torch.logsumexp(sims, dim=-1)
    # Execute
    chunked = sed_scores(clients, server, chunk_size=64)
    whole = sed_scores(clients, server, chunk_size=1000)
    # Assert
    assert chunked.shape == (3, 1000)
    torch.testing.assert_close(chunked, reference, atol=1e-5, rtol=0)
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=0)


def test_client_identical_to_server_gets_larger_weight():
    # Prepare
    gen = torch.Generator().manual_seed(1)
    server = torch.randn(50, 32, generator=gen)
    stranger = torch.randn(50, 32, generator=gen)
    clients = torch.stack([server.clone(), stranger])
    # Execute
    weights = _fold(clients, sed_scores(clients, server)).mean_weights()
    # Assert
    assert weights["c0"] > 0.5 > weights["c1"]
    assert weights["c0"] + weights["c1"] == pytest.approx(1.0)


@pytest.mark.parametrize("order", list(itertools.permutations(range(4))))
def test_the_streaming_fold_equals_the_batch_formula_in_any_arrival_order(order):
    # Prepare: four clients whose scores span a wide range (each later one can raise the running max,
    # so the rescaling is exercised), the batch formula written out: w = softmax_c(s), t = sum_c w v.
    gen = torch.Generator().manual_seed(2)
    clients = torch.randn(4, 30, 8, generator=gen) * torch.tensor([1.0, 2.0, 0.5, 3.0]).view(4, 1, 1)
    scores = torch.randn(4, 30, generator=gen) * 20
    v = torch.nn.functional.normalize(clients, dim=-1)
    weights = torch.softmax(scores, dim=0)
    expected = (weights.unsqueeze(-1) * v).sum(0)
    # Execute
    fold = _fold(clients, scores, order)
    # Assert
    torch.testing.assert_close(fold.teacher(), expected, atol=1e-6, rtol=1e-5)
    means = fold.mean_weights()
    torch.testing.assert_close(torch.tensor([means[f"c{c}"] for c in range(4)]), weights.mean(1), atol=1e-6, rtol=0)


def test_the_fold_refuses_a_second_upload_bad_shapes_and_non_finite_scores():
    fold = TeacherFold()
    with pytest.raises(ValueError, match="no client"):
        fold.teacher()
    fold.add("a", torch.randn(4, 2), torch.zeros(4))
    with pytest.raises(ValueError, match="already folded"):
        fold.add("a", torch.randn(4, 2), torch.zeros(4))
    with pytest.raises(ValueError, match="do not match"):
        fold.add("b", torch.randn(5, 2), torch.zeros(5))
    with pytest.raises(ValueError, match="scores"):
        fold.add("b", torch.randn(4, 2), torch.zeros(3))
    with pytest.raises(ValueError, match="finite"):
        fold.add("b", torch.randn(4, 2), torch.tensor([0.0, float("nan"), 0.0, 0.0]))
    assert len(fold) == 1


def test_sed_rejects_no_clients_and_mismatched_shapes():
    server = torch.randn(4, 2)
    with pytest.raises(ValueError, match="C == 0"):
        sed_scores(torch.empty(0, 4, 2), server)
    with pytest.raises(ValueError, match="does not match"):
        sed_scores(torch.randn(2, 5, 2), server)  # P differs
    with pytest.raises(ValueError, match="does not match"):
        sed_scores(torch.randn(2, 4, 3), server)  # d differs
    with pytest.raises(ValueError, match=r"\(C, P, d\)"):
        sed_scores(torch.randn(4, 2), server)


def test_distillation_loss_is_gamma_times_mse():
    # Prepare: differences [1, -1, 2, 0] -> squares [1, 1, 4, 0] -> MSE = 6 / 4 = 1.5
    student = torch.tensor([[1.0, 0.0], [2.0, 3.0]], requires_grad=True)
    teacher = torch.tensor([[0.0, 1.0], [0.0, 3.0]])
    # Execute
    loss = distillation_loss(student, teacher, gamma=0.4)
    loss.backward()
    # Assert: 0.4 * 1.5 = 0.6; d/ds = gamma * 2 * (s - t) / 4 = 0.2 * (s - t)
    assert loss.item() == pytest.approx(0.6)
    torch.testing.assert_close(student.grad, torch.tensor([[0.2, -0.2], [0.4, 0.0]]))


# -- diagnostics: the SED weights' normalised entropy and the teacher's cosine with G -------------------------
def test_weight_entropy_of_equal_dominant_and_hand_computed_weights() -> None:
    # Prepare
    equal = torch.full((3, 5), 1 / 3)
    dominant = torch.tensor([[1.0, 1.0 - 1e-9], [0.0, 1e-9]])
    two = torch.tensor([[0.25, 0.5], [0.75, 0.5]])
    # Execute / Assert: equal weights = the plain mean = 1; one client deciding = 0
    assert weight_entropy(equal) == pytest.approx(1.0)
    assert weight_entropy(dominant) == pytest.approx(0.0, abs=1e-7)
    # -(1/4 ln 1/4 + 3/4 ln 3/4) / ln 2 = 0.811278 for sample 0, 1 for sample 1: mean 0.905639
    assert weight_entropy(two) == pytest.approx((0.811278124 + 1.0) / 2, abs=1e-8)
    assert weight_entropy(torch.ones(1, 4)) is None  # one client: log C = 0, undefined


def test_teacher_fold_entropy_from_the_scores() -> None:
    # Prepare: scores 0 and ln 3 give weights 1/4 and 3/4 on every sample
    features = torch.tensor([[[1.0, 0.0], [1.0, 0.0]], [[0.0, 1.0], [0.0, 1.0]]])
    scores = torch.tensor([[0.0, 0.0], [math.log(3.0), math.log(3.0)]])
    # Execute
    fold = _fold(features, scores)
    one = _fold(features[:1], scores[:1])
    # Assert
    assert fold.weight_entropy() == pytest.approx(0.811278124, abs=1e-8)
    assert _fold(features, torch.zeros(2, 2)).weight_entropy() == pytest.approx(1.0)  # without SED: plain mean
    assert one.weight_entropy() is None


def test_teacher_cosine_with_the_server_features_by_hand() -> None:
    # Prepare: equal scores, clients [1, 0] and [0, 1] -> teacher [0.5, 0.5] on both samples;
    # the server's G is [1, 0] on sample 0 (cos 1/sqrt 2) and [1, 1]/sqrt 2 on sample 1 (cos 1).
    features = torch.tensor([[[1.0, 0.0], [1.0, 0.0]], [[0.0, 1.0], [0.0, 1.0]]])
    server = torch.tensor([[1.0, 0.0], [1 / math.sqrt(2), 1 / math.sqrt(2)]])
    # Execute
    cosine = mean_cosine(_fold(features, torch.zeros(2, 2)).teacher(), server)
    # Assert
    assert cosine == pytest.approx((1 / math.sqrt(2) + 1) / 2)


# -- SED's temperature and stage 3's relational target -------------------------------------------------------
def test_sed_temperature_divides_the_similarities_by_hand() -> None:
    # Prepare: the hand case above, at T = 0.5 (similarities doubled).
    clients, server = _hand_case()
    # Execute
    scores = sed_scores(clients, server, temperature=0.5)
    # Assert: client A, sample 0: sims [2, 0, -2] -> s = 2 - log(e^2 + 1 + e^-2); client B, sample 0: sims
    # [0, 2, 0] -> s = -log(2 + e^2); sample 1: A and B both [0, 2, 0] with the positive 2.
    lse_a, lse_up, lse_down = math.log(E**2 + 1 + E**-2), math.log(2 + E**2), math.log(2 + E**-2)
    expected = torch.tensor([[2 - lse_a, 2 - lse_up, 2 - lse_a], [-lse_up, 2 - lse_up, -lse_down]])
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=0)
    # Sample 0's weight of A is sharper than at T = 1 (0.75838): 1 / (1 + exp(s_B - s_A)) = 0.89057.
    w_a = torch.softmax(scores[:, 0], 0)[0]
    assert float(w_a) == pytest.approx(1 / (1 + math.exp(-lse_up - 2 + lse_a)), abs=1e-5)
    assert float(w_a) == pytest.approx(0.89057, abs=1e-4)
    with pytest.raises(ValueError, match="temperature"):
        sed_scores(clients, server, temperature=0.0)


def test_the_fedafd_strategy_scores_with_the_configured_temperature() -> None:
    from fedafd.cloud_server.strategies.fedafd import FedAfd
    from fedafd.runtime.config import ServerConfig

    clients, server = _hand_case()
    strategy = FedAfd(ServerConfig(sed_temperature=0.5))
    scores = strategy.score("image", clients[1], {"image": server})
    torch.testing.assert_close(scores, sed_scores(clients[1:], server, temperature=0.5)[0])
    assert not torch.allclose(scores, sed_scores(clients[1:], server)[0])


def test_relation_loss_by_hand_and_invariant_to_a_rotation_of_the_teacher() -> None:
    from fedafd.runtime.losses import relation_loss

    # Prepare: student rows e1, e1 (cosine 1); teacher rows e1, e2 (cosine 0), the second scaled by 3.
    student = torch.tensor([[1.0, 0.0], [2.0, 0.0]])
    teacher = torch.tensor([[1.0, 0.0], [0.0, 3.0]])
    # Execute
    loss = relation_loss(student, teacher, gamma=0.4)
    # Assert: Gram matrices [[1, 1], [1, 1]] and [[1, 0], [0, 1]]: two of four entries differ by 1 -> MSE 0.5.
    assert float(loss) == pytest.approx(0.4 * 0.5)
    rotation = torch.tensor([[0.0, -1.0], [1.0, 0.0]])
    assert float(relation_loss(student, teacher @ rotation, 0.4)) == pytest.approx(0.4 * 0.5)
    assert float(relation_loss(teacher @ rotation, teacher, 0.4)) == pytest.approx(0.0, abs=1e-7)
