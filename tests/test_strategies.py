"""Each strategy and ablation switch, two rounds through the in-process transport (still through the wire's
encode/decode): the loss parts are finite, and each method's parts really run."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from fedafd.edge_client.app import EdgeApp
from fedafd.runtime.config import ClientConfig, ServerConfig, build_config

KINDS = ("image", "text", "multimodal")
ROUNDS = 2
FEATURE_DIM = 16

VARIANTS = {
    "fedafd": {"baa": True},  # the paper's whole method (BAA is off by default: docs/learning.md H7)
    "local": {"strategy": "local"},
    "no_baa": {},  # the default
    "no_gff": {"baa": True, "gff": False},
    "no_sed": {"baa": True, "sed": False},
    "fedmd": {"strategy": "fedmd"},
    "creamfl": {"strategy": "creamfl"},
    "fedgems": {"strategy": "fedgems"},
    "fedet": {"strategy": "fedet"},
    "fedcmi": {"strategy": "fedcmi"},
}

LOSS_PARTS = {
    "fedafd": {"task", "adv_gen", "disc"}, "no_gff": {"task", "adv_gen", "disc"}, "no_sed": {"task", "adv_gen", "disc"},
    "local": {"task"}, "no_baa": {"task"}, "creamfl": {"task", "contrast"},
    "fedgems": {"task", "digest"}, "fedet": {"task", "digest"},
}
"""The loss parts every device reports, by variant (FedMD and FedCMI: see their own tests)."""


def run_federation(inproc_federation, run_dir: Path, switches: dict, on_stage=lambda text: None
                   ) -> tuple[list[dict], dict[str, EdgeApp]]:
    """A server and one device of each kind on an in-process hub; returns the round records and the devices."""
    server_config = build_config(ServerConfig, dict(
        rounds=ROUNDS, expected_clients=len(KINDS), min_clients=len(KINDS), public_size=48, feature_dim=FEATURE_DIM,
        image_arch="cnn_small", text_arch="gru", batch_size=16, device="cpu", join_timeout_s=60,
        round_deadline_s=120, **switches))
    clients = [build_config(ClientConfig, dict(kind=kind, max_private=48, max_test=32, batch_size=16,
                                               image_arch="cnn_small", text_arch="gru")) for kind in KINDS]
    records, _, edges = inproc_federation(server_config, run_dir, clients, on_stage=on_stage)
    return records, {edge.config.kind: edge for edge in edges.values()}


STAGES: list[str] = []
"""What the FedAFD server said it was doing (its live status line), in order."""


@pytest.fixture(scope="module")
def runs(inproc_federation, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[list[dict], dict[str, EdgeApp]]]:
    return {name: run_federation(inproc_federation, tmp_path_factory.mktemp(name), switches,
                                 STAGES.append if name == "fedafd" else lambda text: None)
            for name, switches in VARIANTS.items()}


def test_the_server_reports_each_stage_and_every_upload(runs) -> None:
    assert "waiting for devices: 3/3 joined" not in STAGES  # it starts as soon as the third joined
    assert STAGES[0].startswith("waiting for devices: ")
    for round_ in (1, 2):
        prefix = f"round {round_}/{ROUNDS}: "
        in_round = [s[len(prefix):] for s in STAGES if s.startswith(prefix)]
        assert in_round == ["stage 1, training the global encoders on 48 public pairs",
                            "devices training, 0/3 uploads", "devices training, 1/3 uploads",
                            "devices training, 2/3 uploads", "devices training, 3/3 uploads",
                            "stage 3, distilling from 3 uploads"]


@pytest.mark.parametrize("name", VARIANTS)
def test_every_round_has_finite_loss_parts_from_every_device(runs, name: str) -> None:
    records, _ = runs[name]
    assert [r["round"] for r in records] == list(range(ROUNDS))
    for record in records:
        assert record["quorum_met"]
        assert len(record["clients"]) == len(KINDS)
        for client in record["clients"].values():
            if name in LOSS_PARTS:
                assert set(client["losses"]) == LOSS_PARTS[name]
            assert all(math.isfinite(v) for v in client["losses"].values())
        assert math.isfinite(record["server"]["stage1_loss"]) and math.isfinite(record["server"]["distill_loss"])


def _disc_stepped(edge: EdgeApp) -> bool:
    # Adam keeps per-parameter state only for parameters it has stepped.
    optimizer = edge.state.optimizers.discriminator
    return any(p in optimizer.state for p in edge.state.model.discriminator_parameters())


def _fusion_stepped(edge: EdgeApp) -> bool:
    optimizer = edge.state.optimizers.task
    return any(p in optimizer.state for p in edge.state.model.fusions.parameters())


def test_fedafd_runs_alignment_fusion_and_similarity_weights(runs) -> None:
    records, edges = runs["fedafd"]
    for edge in edges.values():
        assert _disc_stepped(edge) and _fusion_stepped(edge)
        assert edge.state.towers.version == ROUNDS  # the tower of the last round was received
    for record in records:
        assert all(c["losses"]["disc"] > 0 and c["losses"]["adv_gen"] > 0 for c in record["clients"].values())
        assert record["server"]["distill_loss"] > 0
        # Per sample the SED weights sum to 1 over the clients of a modality, so their means do too.
        weights = record["sed_mean_weights"]
        assert set(weights) == {"image", "text"}
        assert set(weights["image"]) == {"image-0", "multimodal-0"}
        assert set(weights["text"]) == {"text-0", "multimodal-0"}
        for by_client in weights.values():
            assert sum(by_client.values()) == pytest.approx(1.0, abs=1e-5)


def test_without_baa_no_discriminator_parameter_changes(runs) -> None:
    records, edges = runs["no_baa"]
    for edge in edges.values():
        assert not _disc_stepped(edge)
        assert _fusion_stepped(edge)


def test_without_gff_the_fusion_never_trains(runs) -> None:
    _, edges = runs["no_gff"]
    for edge in edges.values():
        assert _disc_stepped(edge)
        assert not _fusion_stepped(edge)


def test_without_sed_the_server_distils_toward_the_plain_mean(runs) -> None:
    records, _ = runs["no_sed"]
    for record in records:
        # Equal scores: image and multimodal (and text and multimodal) each weigh a half everywhere.
        for by_client in record["sed_mean_weights"].values():
            assert sorted(by_client.values()) == pytest.approx([0.5, 0.5])
        assert record["server"]["distill_loss"] > 0


def test_fedmd_devices_digest_the_consensus_from_the_second_round(runs) -> None:
    records, edges = runs["fedmd"]
    assert all(set(c["losses"]) == {"task"} for c in records[0]["clients"].values())  # no consensus yet
    assert all(set(c["losses"]) == {"task", "digest"} and c["losses"]["digest"] > 0
               for c in records[1]["clients"].values())
    for edge in edges.values():
        assert not _disc_stepped(edge) and not _fusion_stepped(edge)
    # The consensus came down in round 2 (P x d per modality, both modalities) and no tower ever did.
    assert edges["image"].state.towers.version == -1
    for record, consensus_rows in ((records[0], 0), (records[1], 48)):
        for client_id, by_direction in record["bytes_by_part"].items():
            down = by_direction["down"]
            assert down.get("global_features", 0) == 0 and down.get("global_tower", 0) == 0
            assert down.get("consensus", 0) == 2 * consensus_rows * FEATURE_DIM * 4, client_id  # fp32, both modalities


def test_fedcmi_trains_the_infiltration_projector_of_classification_devices_only(runs) -> None:
    records, edges = runs["fedcmi"]
    for record in records:
        clients = {cid.split("-")[0]: c for cid, c in record["clients"].items()}
        assert set(clients["image"]["losses"]) == {"task", "infiltration"}
        assert set(clients["text"]["losses"]) == {"task", "infiltration"}
        assert set(clients["multimodal"]["losses"]) == {"task"}
    for kind in ("image", "text"):
        optimizer = edges[kind].state.optimizers.task
        assert all(p in optimizer.state for p in edges[kind].state.model.infiltration.parameters())


@pytest.mark.parametrize("name", ["creamfl", "fedgems", "fedet", "fedcmi"])
def test_the_methods_that_use_the_global_features_receive_them_and_distil(runs, name: str) -> None:
    records, edges = runs[name]
    for edge in edges.values():
        assert not _disc_stepped(edge) and not _fusion_stepped(edge)  # no BAA, no GFF
    for record in records:
        assert record["server"]["distill_loss"] > 0
        for client_id, by_direction in record["bytes_by_part"].items():
            # G of both modalities came down: as the (P, d) features, these small nets being more numbers.
            assert by_direction["down"].get("global_features", 0) == 2 * 48 * FEATURE_DIM * 4, client_id
        for by_client in record["sed_mean_weights"].values():
            assert sum(by_client.values()) == pytest.approx(1.0, abs=1e-5)


def test_local_baseline_shares_nothing(runs) -> None:
    records, edges = runs["local"]
    for edge in edges.values():
        assert not _disc_stepped(edge) and not _fusion_stepped(edge)
        assert edge.state.towers.version == -1  # no tower ever came down
    for record in records:
        assert record["server"]["distill_loss"] == 0
        for client_id, by_direction in record["bytes"].items():
            # No features go up (a LOCAL upload carries metrics only) and no tower or features come down.
            assert sum(by_direction["up"].values()) < 4_000, client_id
            assert sum(by_direction["down"].values()) < 4_000, client_id


def test_fedafd_rounds_carry_every_learning_diagnostic(runs) -> None:
    records, _ = runs["fedafd"]
    for record in records:
        server = record["diagnostics"]["server"]
        for modality in ("image", "text"):  # two devices per modality: the entropy is defined
            assert 0.0 <= server[modality]["sed_entropy"] <= 1.0 + 1e-9
            assert -1.0 <= server[modality]["teacher_cos"] <= 1.0
        assert server["r1_sum_after_stage3"] == record["server"]["r1_sum"]
        assert server["stage3_r1_sum_delta"] == pytest.approx(server["r1_sum_after_stage3"] - server["r1_sum_before_stage3"])
        assert record["timings"]["diagnostics"] >= 0
        for cid, client in record["clients"].items():
            diagnostics = client["diagnostics"]
            modalities = {"image-0": ("image",), "text-0": ("text",), "multimodal-0": ("image", "text")}[cid]
            assert 0.0 <= diagnostics["disc_acc_intra"] <= 1.0 and 0.0 <= diagnostics["disc_acc_cross"] <= 1.0
            for modality in modalities:
                by_modality = diagnostics[modality]
                assert set(by_modality) == {"gate1_mean", "gate1_std", "gate2_mean", "gate2_std", "upload_cos"}
                assert 0.0 < by_modality["gate1_mean"] < 1.0 and 0.0 < by_modality["gate2_mean"] < 1.0
            assert ("logit_norm" in diagnostics) == (cid != "multimodal-0")  # classification devices only
            assert diagnostics["task_loss"] == client["losses"]["task"]
            assert diagnostics["seconds"] >= 0
            assert not any(key.startswith("diag_") for key in client["metrics"])  # filed apart from the metrics


def test_local_and_ablations_report_only_the_diagnostics_of_what_ran(runs) -> None:
    for record in runs["local"][0]:  # no BAA, no GFF, no teacher, no stage 3
        assert record["diagnostics"]["server"] == {}
        for client in record["clients"].values():
            assert not any(key.startswith("disc_acc") for key in client["diagnostics"])
            assert "image" not in client["diagnostics"] and "text" not in client["diagnostics"]
            assert "task_loss" in client["diagnostics"]
    for record in runs["no_baa"][0]:  # GFF without BAA: gates but no discriminators (and no G on the device)
        for client in record["clients"].values():
            assert "disc_acc_intra" not in client["diagnostics"]
            assert any("gate1_mean" in v for v in client["diagnostics"].values() if isinstance(v, dict))
    for record in runs["no_gff"][0]:  # BAA without GFF: discriminators, no gates
        for client in record["clients"].values():
            assert "disc_acc_intra" in client["diagnostics"]
            assert not any("gate1_mean" in v for v in client["diagnostics"].values() if isinstance(v, dict))
    for record in runs["no_sed"][0]:  # the plain mean: every weight equal, entropy 1
        for modality in ("image", "text"):
            assert record["diagnostics"]["server"][modality]["sed_entropy"] == pytest.approx(1.0)
