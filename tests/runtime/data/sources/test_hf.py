"""Hugging Face parquet files and save_to_disk folders as sources, through open_source, against fixtures written
by the real `datasets` library: the same rows through npz, CIFAR binary, parquet and save_to_disk give the same
arrays and digest (images as PNG: lossless); texts and pairs agree between parquet and save_to_disk; class names
come from the ClassLabel feature; DatasetDict splits are splits; bad rows and files are named; and without
pyarrow the error says what to install. Fixtures are a few dozen rows of the bundled data, in tmp_path."""

import io
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, Sequence, Value
from PIL import Image as PILImage

from fedafd.runtime.data.fashion_mnist import load_fashion_mnist
from fedafd.runtime.data.prepared import ImageClassData
from fedafd.runtime.data.sources.hf import split_of
from fedafd.runtime.data.sources.options import DataOptions
from fedafd.runtime.data.sources.records import DataFormatError
from fedafd.runtime.data.sources.registry import open_source
from fedafd.runtime.data.tuxpaint import load_tuxpaint_pairs
from fedafd.runtime.data.wordnet import load_wordnet_topics

datasets.disable_progress_bars()
TRAIN = 30


@pytest.fixture(scope="module")
def fashion() -> ImageClassData:
    """40 Fashion-MNIST rows (uint8 (N, 3, 32, 32)); its class names are not in sorted order."""
    data = load_fashion_mnist("test")
    return ImageClassData(data.images[:40], data.labels[:40], data.class_names)


def png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    PILImage.fromarray(image.transpose(1, 2, 0)).save(buffer, format="PNG")  # (3, H, W) -> (H, W, 3)
    return buffer.getvalue()


def image_dataset(images: np.ndarray, labels: np.ndarray, names) -> Dataset:
    features = Features({"image": Image(), "label": ClassLabel(names=list(names))})
    return Dataset.from_dict({"image": [{"bytes": png(i), "path": None} for i in images],
                              "label": labels.tolist()}, features=features)


def fashion_dict(fashion: ImageClassData) -> DatasetDict:
    return DatasetDict({"train": image_dataset(fashion.images[:TRAIN], fashion.labels[:TRAIN], fashion.class_names),
                        "test": image_dataset(fashion.images[TRAIN:], fashion.labels[TRAIN:], fashion.class_names)})


def to_parquet_folder(folder: Path, splits: DatasetDict) -> Path:
    """Parquet files named as Hugging Face names its shards (`data/<split>-00000-of-00001.parquet`)."""
    (folder / "data").mkdir(parents=True)
    for split, dataset in splits.items():
        dataset.to_parquet(str(folder / "data" / f"{split}-00000-of-00001.parquet"))
    return folder


def cifar_bytes(images: np.ndarray, labels: np.ndarray) -> bytes:
    return np.concatenate([labels.astype(np.uint8)[:, None], images.reshape(len(images), -1)], axis=1).tobytes()


def assert_same_sources(a, b) -> None:
    assert set(a.splits) == set(b.splits)
    for split in a.splits:
        for field in ("images", "labels", "input_ids", "attention_mask", "groups", "image_ids"):
            if hasattr(a.splits[split], field):
                np.testing.assert_array_equal(getattr(a.splits[split], field), getattr(b.splits[split], field))
    assert a.digest == b.digest


# --- images -------------------------------------------------------------------------------------


def test_the_same_rows_through_npz_cifar_parquet_and_save_to_disk_give_the_same_source(tmp_path, fashion):
    np.savez(tmp_path / "fashion.npz", x_train=fashion.images[:TRAIN], y_train=fashion.labels[:TRAIN],
             x_test=fashion.images[TRAIN:], y_test=fashion.labels[TRAIN:], class_names=np.array(fashion.class_names))
    binary = tmp_path / "cifar"
    binary.mkdir()
    (binary / "data_batch_1.bin").write_bytes(cifar_bytes(fashion.images[:TRAIN], fashion.labels[:TRAIN]))
    (binary / "test_batch.bin").write_bytes(cifar_bytes(fashion.images[TRAIN:], fashion.labels[TRAIN:]))
    (binary / "batches.meta.txt").write_text("\n".join(fashion.class_names) + "\n")
    splits = fashion_dict(fashion)
    to_parquet_folder(tmp_path / "parquet", splits)
    splits.save_to_disk(str(tmp_path / "disk"))

    sources = {location: open_source("image", tmp_path / location, cache=False)
               for location in ("fashion.npz", "cifar", "parquet", "disk")}

    assert [s.format for s in sources.values()] == ["npz", "cifar", "parquet", "hf_disk"]
    disk = sources["disk"]
    assert set(disk.splits) == {"train", "test"}  # the DatasetDict's splits
    np.testing.assert_array_equal(disk.splits["train"].images, fashion.images[:TRAIN])
    np.testing.assert_array_equal(disk.splits["test"].labels, fashion.labels[TRAIN:])
    assert disk.splits["train"].class_names == fashion.class_names  # ClassLabel's order, not sorted
    for other in sources.values():
        assert_same_sources(disk, other)


def test_class_names_come_from_classlabel_even_for_classes_without_rows(tmp_path, fashion):
    """Two classes only in the rows, ten in the ClassLabel: labels keep their indices and K stays 10."""
    rows = np.flatnonzero(np.isin(fashion.labels, [3, 7]))
    image_dataset(fashion.images[rows], fashion.labels[rows], fashion.class_names).to_parquet(
        str(tmp_path / "two.parquet"))
    data = open_source("image", tmp_path / "two.parquet", cache=False).splits["all"]
    assert data.class_names == fashion.class_names
    np.testing.assert_array_equal(data.labels, fashion.labels[rows])


def test_split_names_as_hugging_face_writes_them():
    assert split_of("train-00000-of-00003.parquet") == "train"
    assert split_of("validation-00001-of-00002-5e3b1b4b0f5f5bd6.parquet") == "validation"
    assert split_of("test.parquet") == "test"
    assert split_of("my_rows.parquet") == "all"


def test_a_datasetdict_with_a_validation_split_and_a_folder_of_named_parquet_files(tmp_path, fashion):
    names = fashion.class_names
    splits = DatasetDict({"train": image_dataset(fashion.images[:20], fashion.labels[:20], names),
                          "validation": image_dataset(fashion.images[20:30], fashion.labels[20:30], names),
                          "test": image_dataset(fashion.images[30:], fashion.labels[30:], names)})
    splits.save_to_disk(str(tmp_path / "disk"))
    (tmp_path / "flat").mkdir()
    for split, dataset in splits.items():
        dataset.to_parquet(str(tmp_path / "flat" / f"{split}.parquet"))
    disk = open_source("image", tmp_path / "disk", cache=False)
    assert set(disk.splits) == {"train", "validation", "test"}
    assert [len(disk.splits[s]) for s in ("train", "validation", "test")] == [20, 10, 10]
    assert_same_sources(disk, open_source("image", tmp_path / "flat", cache=False))
    one = open_source("image", tmp_path / "disk" / "validation", cache=False)  # one Dataset: its rows
    np.testing.assert_array_equal(one.splits["all"].images, fashion.images[20:30])


def test_an_image_row_with_garbage_bytes_is_named_by_its_row(tmp_path, fashion):
    dataset = image_dataset(fashion.images[:8], fashion.labels[:8], fashion.class_names)
    cells = [{"bytes": png(i), "path": None} for i in fashion.images[:8]]
    cells[5] = {"bytes": b"not a picture at all", "path": None}
    dataset = Dataset.from_dict({"image": cells, "label": fashion.labels[:8].tolist()}, features=dataset.features)
    dataset.to_parquet(str(tmp_path / "bad.parquet"))
    dataset.save_to_disk(str(tmp_path / "bad"))
    for location in ("bad.parquet", "bad"):
        with pytest.raises(DataFormatError, match=r", row 6: unreadable or truncated image"):
            open_source("image", tmp_path / location, cache=False)
        source = open_source("image", tmp_path / location, on_bad_sample="skip", cache=False)
        assert source.skipped == 1 and "row 6" in source.problems[0]
        np.testing.assert_array_equal(source.splits["all"].images, fashion.images[[0, 1, 2, 3, 4, 6, 7]])


def test_a_missing_column_names_the_columns_there_are(tmp_path, fashion):
    image_dataset(fashion.images[:4], fashion.labels[:4], fashion.class_names).to_parquet(str(tmp_path / "d.parquet"))
    with pytest.raises(DataFormatError, match=r"d\.parquet: no column 'class' \(label_column\); the columns are: "
                                              "image, label"):
        open_source("image", tmp_path / "d.parquet", DataOptions(label_column="class"), cache=False)
    with pytest.raises(DataFormatError, match=r"no column 'text' \(text_columns\); the columns are: image, label"):
        open_source("text", tmp_path / "d.parquet", cache=False)


def test_without_pyarrow_the_error_says_to_install_the_parquet_extra(tmp_path, fashion, monkeypatch):
    image_dataset(fashion.images[:4], fashion.labels[:4], fashion.class_names).to_parquet(str(tmp_path / "d.parquet"))
    for name in [m for m in sys.modules if m == "pyarrow" or m.startswith("pyarrow.")]:
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(DataFormatError, match=r"needs pyarrow: pip install 'fedafd\[parquet\]'"):
        open_source("image", tmp_path / "d.parquet", cache=False)


def test_imagefolder_to_parquet_with_absolute_paths(tmp_path, fashion):
    """An imagefolder dataset's to_parquet keeps bytes=None and absolute paths: read while they exist, each
    missing one a bad row naming its path."""
    folder = tmp_path / "pictures"
    for i, (image, label) in enumerate(zip(fashion.images[:12], fashion.labels[:12])):
        path = folder / fashion.class_names[label].replace("/", "-") / f"{i:02d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png(image))
    dataset = datasets.load_dataset("imagefolder", data_dir=str(folder), split="train",
                                    cache_dir=str(tmp_path / "hf_cache"))
    dataset.to_parquet(str(tmp_path / "paths.parquet"))
    cell = dataset.data.column("image")[0].as_py()
    assert cell["bytes"] is None and Path(cell["path"]).is_absolute()

    source = open_source("image", tmp_path / "paths.parquet", cache=False)
    data = source.splits["all"]
    assert len(data) == 12 and data.class_names == tuple(dataset.features["label"].names)
    for image, label in zip(data.images, data.labels):  # every picture under its class's folder
        assert any((image == fashion.images[i]).all() for i in range(12)
                   if fashion.class_names[fashion.labels[i]].replace("/", "-") == data.class_names[label])

    gone = Path(dataset.data.column("image")[4].as_py()["path"])
    gone.unlink()
    with pytest.raises(DataFormatError, match=rf"row 5: image file not found: {gone}"):
        open_source("image", tmp_path / "paths.parquet", cache=False)
    skipped = open_source("image", tmp_path / "paths.parquet", on_bad_sample="skip", cache=False)
    assert skipped.skipped == 1 and str(gone) in skipped.problems[0] and len(skipped.splits["all"]) == 11


# --- texts and pairs ----------------------------------------------------------------------------


def test_texts_through_parquet_and_save_to_disk_agree(tmp_path):
    data = load_wordnet_topics("test")
    rows = [i for i in range(0, 1600, 20) if " " in data.texts[i]][:40]
    features = Features({"title": Value("string"), "body": Value("string"),
                         "topic": ClassLabel(names=list(data.class_names)), "writer": Value("string")})
    dataset = Dataset.from_dict({"title": [data.texts[i].split(" ", 1)[0] for i in rows],
                                 "body": [data.texts[i].split(" ", 1)[1] for i in rows],
                                 "topic": [int(data.labels[i]) for i in rows],
                                 "writer": [f"w{i % 3}" for i in rows]}, features=features)
    dataset.to_parquet(str(tmp_path / "texts.parquet"))
    dataset.save_to_disk(str(tmp_path / "texts"))
    options = DataOptions(text_columns=("title", "body"), label_column="topic", natural_id_column="writer")

    parquet = open_source("text", tmp_path / "texts.parquet", options, cache=False)
    disk = open_source("text", tmp_path / "texts", options, cache=False)

    assert_same_sources(parquet, disk)
    got = disk.splits["all"]
    assert got.texts == tuple(data.texts[i] for i in rows)  # the two columns joined by a space
    np.testing.assert_array_equal(got.labels, data.labels[rows])
    assert got.class_names == data.class_names and got.natural_ids == tuple(f"w{i % 3}" for i in rows)


def test_pairs_through_parquet_and_save_to_disk_agree(tmp_path):
    pairs = load_tuxpaint_pairs("test")
    first = np.unique(pairs.image_ids, return_index=True)[1][:20]  # one caption row per picture
    groups = [pairs.group_names[pairs.groups[i]] for i in first]
    dataset = Dataset.from_dict({"image": [{"bytes": png(pairs.images[i]), "path": None} for i in first],
                                 "text": [pairs.captions[i] for i in first], "category": groups},
                                features=Features({"image": Image(), "text": Value("string"),
                                                   "category": Value("string")}))
    dataset.to_parquet(str(tmp_path / "pairs.parquet"))
    dataset.save_to_disk(str(tmp_path / "pairs"))
    options = DataOptions(group_column="category")

    parquet = open_source("multimodal", tmp_path / "pairs.parquet", options, cache=False)
    disk = open_source("multimodal", tmp_path / "pairs", options, cache=False)

    assert_same_sources(parquet, disk)
    got = disk.splits["all"]
    np.testing.assert_array_equal(got.images, pairs.images[first])
    assert got.captions == tuple(pairs.captions[i] for i in first)
    assert [got.group_names[g] for g in got.groups] == groups


def test_a_list_of_captions_is_several_captions_of_one_picture(tmp_path):
    pairs = load_tuxpaint_pairs("test")
    captions = [["a red thing", "something red"], ["a blue thing"], ["one", "two", "three"]]
    dataset = Dataset.from_dict({"image": [{"bytes": png(pairs.images[i]), "path": None} for i in range(3)],
                                 "captions": captions},
                                features=Features({"image": Image(), "captions": Sequence(Value("string"))}))
    dataset.save_to_disk(str(tmp_path / "pairs"))
    data = open_source("multimodal", tmp_path / "pairs", DataOptions(caption_column="captions"),
                       cache=False).splits["all"]
    assert data.captions == tuple(c for row in captions for c in row)
    assert data.image_ids.tolist() == [0, 0, 1, 2, 2, 2]
    np.testing.assert_array_equal(data.images[[0, 2, 3]], pairs.images[[0, 1, 2]])
