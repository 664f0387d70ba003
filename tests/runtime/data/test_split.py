"""`fedafd-cloud data split`: for each kind, a small pool written into tmp_path (from the bundled data) is split,
and every device folder read back with its data.toml holds exactly its rows of the pool and the whole test rows;
split.json's counts match; a rerun does nothing; another split into the same folder is refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from fedafd.cloud_server.cli import app
from fedafd.runtime.data.fashion_mnist import load_fashion_mnist
from fedafd.runtime.data.partition import PartitionerSpec
from fedafd.runtime.data.prepared import PairData, subset
from fedafd.runtime.data.sources.options import load_options
from fedafd.runtime.data.sources.registry import open_source, partition_data, train_test
from fedafd.runtime.data.split import SPLIT_FILE, differing_keys, folder_name, rows_digest
from fedafd.runtime.data.wordnet import load_wordnet_topics

RUNNER = CliRunner()


# --- small pools -------------------------------------------------------------------------------


def _png(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image.transpose(1, 2, 0)).save(path)  # (3, H, W) -> (H, W, 3)


def image_pool(tmp_path: Path, class_names: list[str] | None = None) -> Path:
    """An .npz of 160 train and 40 test Fashion-MNIST pictures, with its class names ('/' as '-' by default)."""
    data = load_fashion_mnist("test")
    names = class_names or [c.replace("/", "-") for c in data.class_names]
    path = tmp_path / "fashion.npz"
    np.savez(path, x_train=data.images[:160], y_train=data.labels[:160], x_test=data.images[160:200],
             y_test=data.labels[160:200], class_names=np.array(names))
    return path


def text_pool(tmp_path: Path) -> Path:
    """150 WordNet glosses as one JSON lines file (no test split: test_fraction draws the test rows)."""
    data = load_wordnet_topics("test")
    path = tmp_path / "glosses.jsonl"
    path.write_text("".join(json.dumps({"text": data.texts[i], "label": data.class_names[data.labels[i]]}) + "\n"
                            for i in range(0, 3000, 20)), encoding="utf-8")
    return path


def pair_pool(tmp_path: Path) -> tuple[Path, Path]:
    """Tux Paint stamps as a metadata.jsonl folder with train/ and test/, every third picture with a second
    caption, grouped by category folder; and its data config."""
    stamps = open_source("multimodal", "demo:tuxpaint").splits["train"]
    root = tmp_path / "stamps"
    for split, rows in (("train", range(0, 90)), ("test", range(90, 110))):
        lines = []
        for i in rows:
            _png(root / split / f"{i:03d}.png", stamps.images[i])
            group = stamps.group_names[stamps.groups[i]]
            captions = [stamps.captions[i]] + ([f"another picture of {group}"] if i % 3 == 0 else [])
            lines += [{"file_name": f"{i:03d}.png", "text": c, "group": group} for c in captions]
        (root / split / "metadata.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")
    config = tmp_path / "stamps.toml"
    config.write_text('group_column = "group"\n', encoding="utf-8")
    return root, config


def run_split(src: Path | str, kind: str, out: Path, *args: str) -> tuple[int, str]:
    result = RUNNER.invoke(app, ["data", "split", str(src), "--kind", kind, "--out", str(out), *args])
    return result.exit_code, result.output


def read_device(kind: str, folder: Path):
    source = open_source(kind, folder, load_options(folder / "data.toml"), cache=False)
    return source.splits["train"], source.splits["test"]


def pool_rows(kind: str, src: Path, config: Path | None, seed: int, spec: PartitionerSpec, num: int):
    options = load_options(config)
    train, test = train_test(open_source(kind, src, options, cache=False), options, seed=seed)
    return train, test, partition_data(train, spec, num, seed)


def class_order(data, rows: np.ndarray) -> np.ndarray:
    """The order an ImageFolder reads: class folders by sorted name, then rows in the pool's order."""
    folders = np.array([folder_name(data.class_names[label]) for label in data.labels])
    return np.lexsort((rows, folders))


def canonical(ids: np.ndarray) -> list[int]:
    """Image ids renumbered by first appearance (which rows share a picture)."""
    seen: dict[int, int] = {}
    return [seen.setdefault(int(i), len(seen)) for i in ids]


# --- round trips -------------------------------------------------------------------------------


def test_image_split_reads_back_as_each_devices_rows(tmp_path: Path) -> None:
    src, out = image_pool(tmp_path), tmp_path / "out"
    spec = PartitionerSpec(name="dirichlet", alpha=0.5, min_partition_size=5)

    code, output = run_split(src, "image", out, "--partitioner", "dirichlet", "--num-partitions", "3",
                             "--alpha", "0.5", "--min-partition-size", "5", "--seed", "7")

    assert code == 0, output
    train, test, shares = pool_rows("image", src, None, 7, spec, 3)
    record = json.loads((out / SPLIT_FILE).read_text())
    assert sorted(np.concatenate(shares).tolist()) == list(range(len(train)))
    for i, rows in enumerate(shares):
        mine, held = read_device("image", out / f"image-{i}")
        expected = subset(train, rows[class_order(subset(train, rows), rows)])
        assert mine.class_names == train.class_names
        assert np.array_equal(mine.images, expected.images) and np.array_equal(mine.labels, expected.labels)
        in_order = subset(test, class_order(test, np.arange(len(test))))
        assert np.array_equal(held.images, in_order.images) and np.array_equal(held.labels, in_order.labels)
        device = record["devices"][f"image-{i}"]
        counts = np.bincount(mine.labels, minlength=len(mine.class_names))
        assert device["class_counts"] == {mine.class_names[c]: int(counts[c]) for c in np.flatnonzero(counts)}
        assert device["rows"] == len(rows) and device["rows_sha256"] == rows_digest(rows)
    assert record["partitioner"] == {"name": "dirichlet", "alpha": 0.5, "min_partition_size": 5,
                                     "self_balancing": False}
    assert record["source"] == str(src.resolve()) and record["train_rows"] == 160 and record["test_rows"] == 40


def test_text_split_reads_back_in_the_pools_order(tmp_path: Path) -> None:
    src, out = text_pool(tmp_path), tmp_path / "out"
    spec = PartitionerSpec(name="pathological", num_classes_per_partition=2,
                           class_assignment_mode="first-deterministic")

    code, output = run_split(src, "text", out, "--partitioner", "pathological", "--num-partitions", "4",
                             "--class-assignment-mode", "first-deterministic", "--test-fraction", "0.25")

    assert code == 0, output
    options = load_options(None)
    train, test = train_test(open_source("text", src, cache=False), options, test_fraction=0.25, seed=42)
    shares = partition_data(train, spec, 4, 42)
    record = json.loads((out / SPLIT_FILE).read_text())
    for i, rows in enumerate(shares):
        mine, held = read_device("text", out / f"text-{i}")
        assert mine.class_names == train.class_names
        assert mine.texts == subset(train, rows).texts
        assert np.array_equal(mine.labels, train.labels[rows])
        assert np.array_equal(mine.input_ids, train.input_ids[rows])
        assert held.texts == test.texts and np.array_equal(held.labels, test.labels)
        assert len(np.unique(mine.labels)) <= 2
        assert sum(record["devices"][f"text-{i}"]["class_counts"].values()) == len(rows)
    assert record["test_fraction"] == 0.25 and record["test_rows"] == len(test)


def test_pairs_are_split_by_picture_and_read_back(tmp_path: Path) -> None:
    (src, config), out = pair_pool(tmp_path), tmp_path / "out"
    spec = PartitionerSpec(name="iid")

    code, output = run_split(src, "multimodal", out, "--partitioner", "iid", "--num-partitions", "3",
                             "--data-config", str(config))

    assert code == 0, output
    train, test, shares = pool_rows("multimodal", src, config, 42, spec, 3)
    assert isinstance(train, PairData)
    pictures = [set(train.image_ids[rows].tolist()) for rows in shares]
    assert sum(map(len, pictures)) == len(set().union(*pictures))  # no picture on two devices
    record = json.loads((out / SPLIT_FILE).read_text())
    for i, rows in enumerate(shares):
        mine, held = read_device("multimodal", out / f"multimodal-{i}")
        expected = subset(train, rows)
        for got, want in ((mine, expected), (held, test)):
            assert got.captions == want.captions
            assert np.array_equal(got.images, want.images)
            assert [got.group_names[g] for g in got.groups] == [want.group_names[g] for g in want.groups]
            assert canonical(got.image_ids) == canonical(want.image_ids)
        device = record["devices"][f"multimodal-{i}"]
        assert device["pictures"] == len(pictures[i]) and device["rows"] == len(rows)
        assert sum(device["class_counts"].values()) == len(rows)


# --- reruns and refusals -----------------------------------------------------------------------


def test_rerun_is_a_no_op_and_another_split_is_refused(tmp_path: Path) -> None:
    src, out = image_pool(tmp_path), tmp_path / "out"
    args = ("--partitioner", "shard", "--num-partitions", "4", "--num-shards-per-partition", "2")
    assert run_split(src, "image", out, *args)[0] == 0
    written = (out / SPLIT_FILE).read_bytes()
    stamp = (out / "image-0").stat().st_mtime_ns

    code, output = run_split(src, "image", out, *args)

    assert code == 0 and "already there" in output
    assert (out / SPLIT_FILE).read_bytes() == written and (out / "image-0").stat().st_mtime_ns == stamp

    code, output = run_split(src, "image", out, *args[:-1], "3", "--seed", "1")

    assert code == 2
    assert "partitioner.num_shards_per_partition" in output and "seed" in output and "devices" in output
    assert (out / SPLIT_FILE).read_bytes() == written


def test_same_inputs_give_a_byte_identical_split_json(tmp_path: Path) -> None:
    src = text_pool(tmp_path)
    args = ("--partitioner", "dirichlet", "--num-partitions", "3", "--self-balancing", "--min-partition-size", "3")
    assert run_split(src, "text", tmp_path / "a", *args)[0] == 0
    assert run_split(src, "text", tmp_path / "b", *args)[0] == 0

    assert (tmp_path / "a" / SPLIT_FILE).read_bytes() == (tmp_path / "b" / SPLIT_FILE).read_bytes()
    assert (tmp_path / "a" / "text-1" / "train.jsonl").read_bytes() == \
           (tmp_path / "b" / "text-1" / "train.jsonl").read_bytes()


def test_a_folder_of_other_files_is_refused_and_an_unfinished_split_replaced(tmp_path: Path) -> None:
    src, out = text_pool(tmp_path), tmp_path / "out"
    (out / "notes").mkdir(parents=True)
    args = ("--partitioner", "iid", "--num-partitions", "2")

    code, output = run_split(src, "text", out, *args)

    assert code == 2 and "holds no split.json" in output and "notes" in output
    (out / "notes").rmdir()
    (out / "text-5").mkdir()  # left by an interrupted split with more devices
    (out / ".text-0.abc").mkdir()
    assert run_split(src, "text", out, *args)[0] == 0
    assert sorted(p.name for p in out.iterdir()) == ["split.json", "text-0", "text-1"]


@pytest.mark.parametrize("args, words", [
    (("--partitioner", "dirichlett", "--num-partitions", "2"), "partitioner name"),
    (("--partitioner", "iid", "--num-partitions", "2", "--kind", "audio"), "--kind"),
    (("--partitioner", "natural", "--num-partitions", "2"), "natural_id_column"),
    (("--partitioner", "pathological", "--num-partitions", "2", "--num-classes-per-partition", "99"),
     "num_classes_per_partition"),
    (("--partitioner", "shard", "--num-partitions", "2"), "shard_size"),
])
def test_bad_parameters_are_one_error_line(tmp_path: Path, args: tuple[str, ...], words: str) -> None:
    code, output = run_split(text_pool(tmp_path), "text", tmp_path / "out", *args)

    assert code == 2 and words in output and "Traceback" not in output
    assert not (tmp_path / "out" / SPLIT_FILE).exists()


def test_differing_keys_name_fields_of_the_partitioner() -> None:
    old = {"seed": 1, "partitioner": {"name": "dirichlet", "alpha": 0.1}, "kind": "text"}
    new = {"seed": 1, "partitioner": {"name": "dirichlet", "alpha": 0.5}, "kind": "image"}

    assert differing_keys(old, new) == ["partitioner.alpha", "kind"]


def test_a_class_name_with_a_slash_reads_back_by_its_name(tmp_path: Path) -> None:
    names = list(load_fashion_mnist("test").class_names)  # "T-shirt/top"
    src, out = image_pool(tmp_path, names), tmp_path / "out"
    assert run_split(src, "image", out, "--partitioner", "iid", "--num-partitions", "2")[0] == 0
    assert (out / "image-0" / "train" / "T-shirt_top").is_dir()

    mine, _ = read_device("image", out / "image-0")

    assert mine.class_names[0] == "T-shirt/top"


def test_a_split_keeps_each_picture_as_its_source_encodes_it(tmp_path: Path) -> None:
    # Prepare: an ImageFolder pool of JPEGs and PNGs larger than 32 px (what a tower of its own reads at full size).
    rng = np.random.default_rng(3)
    src = tmp_path / "pool"
    for split, count in (("train", 12), ("test", 4)):
        for i in range(count):
            cls = ("cat", "dog")[i % 2]
            (src / split / cls).mkdir(parents=True, exist_ok=True)
            picture = Image.fromarray(rng.integers(0, 256, size=(40 + i, 64, 3), dtype=np.uint8))
            picture.save(src / split / cls / f"{i:02d}.{'jpg' if i % 3 else 'png'}")
    # Execute
    code, output = run_split(src, "image", tmp_path / "out", "--partitioner", "iid", "--num-partitions", "2")
    # Assert: every device file holds the bytes of a pool file, suffix kept; read back, the pictures are the pool's.
    assert code == 0, output
    pool_files = {p.read_bytes(): p.suffix for p in src.rglob("*.*")}
    written = [p for p in (tmp_path / "out").rglob("*") if p.suffix in (".jpg", ".png")]
    assert len(written) == 12 + 2 * 4  # each device its train share and the whole test split
    assert all(pool_files.get(p.read_bytes()) == p.suffix for p in written)
    mine, _ = read_device("image", tmp_path / "out" / "image-0")
    assert mine.pictures is not None and {mine.pictures.open(i).size for i in range(len(mine))} <= {(64, 40 + i) for i in range(12)}
