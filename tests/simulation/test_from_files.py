"""A whole simulated federation whose every data set is read from files, one format per role (image pool: .npz;
text pool: CSV; retrieval pool: Karpathy's split JSON; public set: metadata.jsonl folders), ends with the same
metrics as the same rows through the bundled registry (demo:...)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedafd.runtime.config import ServerConfig, build_config
from fedafd.runtime.data import features
from fedafd.runtime.data.modal import rows_name
from fedafd.runtime.data.sources.options import load_options
from fedafd.runtime.data.sources.records import DataFormatError
from fedafd.runtime.data.sources.registry import DEMO_DEFAULTS, PUBLIC, open_source
from fedafd.cloud_server.reporting.report import METRICS_FILE, without_timings
from fedafd.simulation.engine import run_simulation, simulation_config

FLEET = {"image": 2, "text": 2, "multimodal": 2}
"""Two devices a kind: each holds its share of the pool (capped at max_private like the bundled sets' shares)."""


def _png(folder: Path, name: str, image: np.ndarray) -> str:
    Image.fromarray(np.ascontiguousarray(image.transpose(1, 2, 0))).save(folder / name)
    return name


def _picture(folder: Path, name: str, data, row: int) -> str:
    """Row `row`'s picture as its own bytes (the bundled sets keep them beside the 32 px arrays)."""
    (folder / name).write_bytes(data.pictures.encoded(row))
    return name


def _toml(path: Path, **values: object) -> str:
    path.write_text("".join(f"{key} = {json.dumps(value)}\n" for key, value in values.items()))
    return str(path)


def write_sources(root: Path, demo: dict) -> dict[str, str]:
    """Each role's bundled rows written in a format users have; returns ServerConfig values that name them."""
    image, text, pairs, public = (demo[role].splits for role in ("image", "text", "multimodal", PUBLIC))
    # image pool: one .npz with the splits' arrays and the class names
    np.savez(root / "fashion.npz", x_train=image["train"].images, y_train=image["train"].labels,
             x_test=image["test"].images, y_test=image["test"].labels,
             class_names=np.array(image["train"].class_names))
    # text pool: a CSV per split, labels by class name
    (root / "topics").mkdir()
    for split, data in text.items():
        with open(root / "topics" / f"{split}.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["text", "label"])
            writer.writerows((t, data.class_names[y]) for t, y in zip(data.texts, data.labels))
    # retrieval pool: Karpathy's split JSON, its pictures beside it, categories as a field of each image
    (root / "stamps").mkdir()
    images = [{"filename": _picture(root / "stamps", f"{split}-{row}.png", data, row), "split": split,
               "category": data.group_names[data.groups[row]], "sentences": [{"raw": data.captions[row]}]}
              for split, data in pairs.items() for row in range(len(data))]
    (root / "stamps" / "dataset_stamps.json").write_text(json.dumps({"dataset": "stamps", "images": images}))
    # public set: Hugging Face's imagefolder-with-metadata convention, a folder per split
    for split, data in public.items():
        folder = root / "public" / split
        folder.mkdir(parents=True)
        with open(folder / "metadata.jsonl", "w") as metadata:
            for row in range(len(data)):
                metadata.write(json.dumps({"file_name": _picture(folder, f"{row}.png", data, row),
                                           "text": data.captions[row],
                                           "group": data.group_names[data.groups[row]]}) + "\n")
    return {
        "image_data": str(root / "fashion.npz"),
        "text_data": str(root / "topics"),
        "text_data_config": _toml(root / "topics.toml", class_names=list(text["train"].class_names)),
        "multimodal_data": str(root / "stamps" / "dataset_stamps.json"),
        "multimodal_data_config": _toml(root / "stamps.toml", group_column="category",
                                        group_names=list(pairs["train"].group_names)),
        "public_data": str(root / "public"),
        "public_data_config": _toml(root / "public.toml", group_column="group",
                                    group_names=list(public["train"].group_names)),
    }


def _config(fleet: dict[str, int] = FLEET, **values: object) -> ServerConfig:
    base = dict(rounds=2, seed=7, public_size=48, feature_dim=16, batch_size=16, max_private=40, max_test=32,
                local_epochs=1, alpha=1.0, device="cpu", threads=1, join_timeout_s=60)
    return build_config(ServerConfig, dict(base, **values, **simulation_config(ServerConfig(), fleet)))


@pytest.fixture
def demo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    """The bundled sources, read (and kept by the process) before the prepared-data cache moves to tmp_path; the
    backbone feature cache stays where it is (rows are named by their digest, so the same rows share it)."""
    sources = {role: open_source(role, location) for role, location in DEMO_DEFAULTS.items()}
    real_features = features.features_dir()
    monkeypatch.setattr(features, "features_dir", lambda: real_features)
    monkeypatch.setenv("FEDAFD_CACHE", str(tmp_path / "cache"))
    return sources


def test_a_federation_read_from_files_ends_as_the_same_rows_through_the_registry(tmp_path, demo) -> None:
    # Prepare: the bundled rows written to files.
    (tmp_path / "files").mkdir()
    sources = write_sources(tmp_path / "files", demo)
    # The same rows through each format: equal digests of each split (so every feature cache is shared too).
    for role, key in (("image", "image_data"), ("text", "text_data"), ("multimodal", "multimodal_data"),
                      (PUBLIC, "public_data")):
        read = open_source(role, sources[key], load_options(sources.get(f"{key}_config", "")))
        assert set(read.splits) == {"train", "test"}, key
        for split in ("train", "test"):
            assert rows_name(read.splits[split], split) == rows_name(demo[role].splits[split], split), (key, split)
    # The bundled eval split holds two flags drawn like public ones (France and Clipperton Island, ...): read
    # from files, the server refuses to be tested on what it trains on, naming the rows.
    with pytest.raises(DataFormatError, match="2 eval picture.*eval row 329 = public row 1353"):
        run_simulation(_config(**sources), FLEET, tmp_path / "refused")
    # Execute (the bundled eval split, kept as the demo always has, for both)
    bundled = run_simulation(_config(), FLEET, tmp_path / "bundled")
    from_files = run_simulation(_config(**sources, eval_data="demo:emoji"), FLEET, tmp_path / "from_files")
    # Assert: the same metrics, round by round, but for timings; and the run did read the files.
    lines = [[json.loads(line) for line in (tmp_path / run / METRICS_FILE).read_text().splitlines()]
             for run in ("bundled", "from_files")]
    assert len(lines[0]) == 2 and without_timings(lines[0]) == without_timings(lines[1])
    assert from_files[-1]["server"]["r1_sum"] == bundled[-1]["server"]["r1_sum"] > 0
    read = sorted(json.loads(p.read_text())["location"] for p in (tmp_path / "cache").rglob("source.json"))
    assert read == sorted(sources[k] for k in ("image_data", "text_data", "multimodal_data", "public_data"))


def test_a_skipped_bad_row_is_counted_in_the_rounds_metrics(tmp_path, demo) -> None:
    # Prepare: an image pool of 60 bundled pictures as PNG files in a CSV manifest, one of them truncated.
    bundled = demo["image"].splits
    folder = tmp_path / "pool"
    folder.mkdir()
    rows = []
    for split, count in (("train", 48), ("test", 12)):
        for row in range(count):
            name = _png(folder, f"{split}-{row}.png", bundled[split].images[row])
            rows.append((name, bundled[split].class_names[bundled[split].labels[row]]))
    broken = folder / rows[5][0]
    broken.write_bytes(broken.read_bytes()[:40])
    with open(folder / "labels.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([("path", "label"), *rows])
    config = _config({"image": 1}, image_data=str(folder / "labels.csv"), on_bad_sample="skip", rounds=1)
    # Execute
    records = run_simulation(config, {"image": 1}, tmp_path / "run", ["image_arch=cnn_small"])
    # Assert: the device trained without the broken picture, and said so.
    (client,) = records[-1]["clients"].values()
    assert client["metrics"]["skipped_rows"] == 1.0
