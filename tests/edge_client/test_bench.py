"""`fedafd-edge bench` measures this device and writes a profile that loads back as a device profile."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from fedafd.export.cli import fedafd_edge as app
from fedafd.runtime.shaping import load_profile


def test_bench_writes_a_loadable_profile_with_what_it_measured(tmp_path: Path) -> None:
    # Execute
    out = tmp_path / "me.toml"
    result = CliRunner().invoke(app, ["bench", "--kind", "image", "--out", str(out), "--name", "me",
                                      "--link", "phone_lte", "--reference-ms", "1000", "--format", "json",
                                      "-c", "batch_size=8"])
    # Assert: the measurements are real numbers, and the file keeps the phone's link values.
    assert result.exit_code == 0, result.output
    measured = json.loads(result.output)
    assert measured["train_ms_per_sample"] > 0 and measured["extract_ms_per_sample"] > 0
    assert measured["infer_ms_per_sample"] == 0 and measured["onnx"].startswith("skipped")
    profile, phone = load_profile(str(out)), load_profile("phone_lte")
    assert profile.name == "me"
    assert profile.train_ms_per_sample == measured["train_ms_per_sample"]
    assert profile.compute_factor == measured["train_ms_per_sample"] / 1000
    assert (profile.uplink_mbps, profile.downlink_mbps, profile.rtt_ms) == (phone.uplink_mbps, phone.downlink_mbps,
                                                                            phone.rtt_ms)


def deployable_image_client(folder: Path) -> Path:
    """An (untrained: the timing is the same) adapter image client as `join` saves it: effnet_linear over
    EfficientNet-Lite0 beside the server's default tower, effnet_linear too."""
    import torch

    from fedafd.edge_client.model import GlobalTowers, LocalModel
    from fedafd.edge_client.state import ClientState, save_state
    from fedafd.edge_client.training import Optimizers
    from fedafd.runtime.models import build_encoder

    torch.manual_seed(0)
    model = LocalModel("image", "effnet_linear", "gru", 32, 10)
    towers = GlobalTowers(32, torch.device("cpu"))
    towers.load(1, {"image": "effnet_linear"},
                {f"image.{k}": v for k, v in build_encoder("image", "effnet_linear", 32).state_dict().items()})
    save_state(folder, ClientState(model, Optimizers.create(model, 1e-3, 1e-3), towers, last_round=0),
               {"client_id": "image-0", "kind": "image", "image_arch": "effnet_linear", "text_arch": "gru",
                "feature_dim": 32})
    (folder / "config.json").write_text(json.dumps({"kind": "image", "seed": 0, "max_test": 64}))
    return folder


def test_bench_times_the_deployable_graphs_fp32_and_int8_at_batch_1_and_32(tmp_path: Path) -> None:
    # Prepare: the exported backbone + adapter graph (and its int8 copy, and the stand-alone tower)
    from fedafd.export.onnx_export import ExportOptions, export_client

    state = deployable_image_client(tmp_path / "state")
    export_client(state, tmp_path / "model", ExportOptions(parity_samples=8, eval_samples=32))

    # Execute
    out = tmp_path / "me.toml"
    result = CliRunner().invoke(app, ["bench", "--kind", "image", "--onnx-dir", str(tmp_path / "model"), "--out", str(out),
                                      "--format", "json", "-c", "batch_size=8"])

    # Assert: one row per graph and precision (the tower is no inference step), each with its size and times
    assert result.exit_code == 0, result.output
    measured = json.loads(result.output)
    rows = {(r["graph"], r["precision"]): r for r in measured["onnx_graphs"]}
    assert set(rows) == {("image", "fp32"), ("image", "int8")}
    for row in rows.values():
        assert row["backbones"] == ["efficientnet_lite0"]
        assert row["size_bytes"] == (tmp_path / "model" / row["file"]).stat().st_size > 10e6  # the backbone is inside
        assert 0 < row["b1_ms"] < row["b32_ms"]
    assert measured["infer_ms_per_sample"] == rows["image", "fp32"]["b1_ms"]
    assert load_profile(str(out)).infer_ms_per_sample == measured["infer_ms_per_sample"]
