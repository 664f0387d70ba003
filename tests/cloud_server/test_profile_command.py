"""A two-round federation (in-process transport, real wire) with int8 features, an fp16 tower, a fresh public
subset per round and one device on an emulated LTE link; then `fedafd-cloud profile` on its run folder."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from fedafd.cloud_server.cli import app as cloud_cli
from fedafd.cloud_server.stages import GlobalModel
from fedafd.runtime import codecs
from fedafd.runtime.config import ClientConfig, ServerConfig, build_config, write_config
from fedafd.runtime.data.partition import cap_indices
from fedafd.runtime.shaping import ShapedClientTransport, load_profile

P, D, ROUNDS = 48, 16, 2
KINDS = ("image", "text", "multimodal")


@pytest.fixture(scope="module")
def run(inproc_federation, tmp_path_factory: pytest.TempPathFactory):
    run_dir = tmp_path_factory.mktemp("run")
    config = build_config(ServerConfig, dict(
        rounds=ROUNDS, baa=True, expected_clients=3, min_clients=3, public_size=P, feature_dim=D, image_arch="cnn_small",
        text_arch="gru", batch_size=16, device="cpu", join_timeout_s=60, round_deadline_s=120,
        feature_codec="int8_row", tower_codec="fp16", public_resample=True))
    write_config(config, run_dir / "config.json")
    clients = [build_config(ClientConfig, dict(kind=kind, max_private=48, max_test=32, batch_size=16)) for kind in KINDS]

    def shape_the_image_device(client: ClientConfig, transport):
        return ShapedClientTransport(transport, load_profile("phone_lte")) if client.kind == "image" else transport

    records, server, _ = inproc_federation(config, run_dir, clients, wrap=shape_the_image_device)
    return run_dir, records, server


def test_records_count_every_part_exactly(run):
    _, records, _ = run
    tower_fp16 = {m: sum(codecs.frame_nbytes(codecs.choose("fp16", t.numpy()), t.numpy().dtype.name, tuple(t.shape))
                         for t in GlobalModel("cnn_small", "gru", D, "pcme").tower_state((m,)).values())
                  for m in ("image", "text")}
    int8_features = P * (D + 4)  # P x d int8 + one float32 scale per row
    for record in records:
        assert record["codecs"] == {"features": "int8_row", "tower": "fp16"}
        parts = record["bytes_by_part"]
        for cid, modalities in (("image-0", ("image",)), ("text-0", ("text",)), ("multimodal-0", ("image", "text"))):
            assert parts[cid]["up"]["public_features"] == len(modalities) * int8_features
            # G only of the modality whose tower it does not get (the device computes G from a tower it has);
            # the small nets' towers are larger than G at P = 48, d = 16, so only the client's towers travel.
            assert parts[cid]["down"].get("global_features", 0) == (2 - len(modalities)) * int8_features
            # The tower changes every round (stages 1 and 3), so it is sent every round.
            assert parts[cid]["down"]["global_tower"] == sum(tower_fp16[m] for m in modalities)
            for direction in ("up", "down"):
                assert sum(parts[cid][direction].values()) == sum(record["bytes"][cid][direction].values())


def test_shaped_device_shows_its_link_time(run):
    _, records, _ = run
    lte = load_profile("phone_lte")
    for record in records:
        link = record["link"]["image-0"]
        down = sum(record["bytes"]["image-0"]["down"].values())
        up = record["bytes"]["image-0"]["up"]["feature_upload"]
        # At least the emulated RoundStart and upload transfers (heartbeats and acks only add to it).
        assert link["comm"] >= lte.transfer_seconds(down, "down") + lte.transfer_seconds(up, "up") - 0.02, link
        assert link["compute"] > 0 and math.isclose(link["comm"] + link["compute"], link["round_trip"], rel_tol=1e-9)


def test_public_subset_is_fresh_each_round(run):
    _, _, server = run
    last = server.public_rows
    fixed = np.sort(cap_indices(np.arange(len(server.public_all)), P, 0))
    assert len(last) == P and not np.array_equal(last, fixed)


def test_profile_command_json_has_the_fields(run, tmp_path: Path):
    run_dir, records, _ = run
    result = CliRunner().invoke(cloud_cli, ["profile", str(run_dir), "--format", "json", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    profile = json.loads(result.output)
    assert profile["rounds"] == ROUNDS and profile["public_size"] == P and profile["feature_dim"] == D
    assert set(profile["kinds"]) == set(KINDS)
    for kind, entry in profile["kinds"].items():
        assert set(entry["per_round"]["up"]) >= {"public_features", "global_features", "global_tower", "control"}
        assert set(entry) >= {"per_round", "run_totals", "fedavg_per_round", "ratio_to_fedavg", "crossover_params",
                              "reference_models", "num_params", "seconds_per_round"}
        assert entry["fedavg_per_round"]["up"] == entry["num_params"] * 4
        assert entry["ratio_to_fedavg"]["up"] == pytest.approx(entry["per_round"]["up_total"] / (entry["num_params"] * 4))
        assert entry["crossover_params"]["up"] == pytest.approx(entry["per_round"]["up_total"] / 4)
    mm = profile["kinds"]["multimodal"]
    assert mm["per_round"]["up"]["public_features"] == 2 * P * (D + 4)
    assert profile["clients"]["image-0"]["cumulative_bytes"][-1] == sum(
        sum(r["bytes"]["image-0"][d].values()) for r in records for d in ("up", "down"))
    with Image.open(tmp_path / "profile.png") as image:
        assert image.format == "PNG" and image.size == (900, 520)
    assert (tmp_path / "profile.md").read_text().startswith("Rounds: 2")
    markdown = CliRunner().invoke(cloud_cli, ["profile", str(run_dir), "--out", str(tmp_path)])
    assert markdown.exit_code == 0 and "FedAvg, same model" in markdown.output
