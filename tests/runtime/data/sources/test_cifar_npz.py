"""CIFAR binary records and .npz arrays as sources, through open_source: the bundled rows written in each format
come back as the same arrays; CIFAR-100's coarse and fine labels; pictures taken from the file's map only when
opened; and each bad file or row named (a truncated file with its size, an object array, mismatched lengths,
a NaN picture by its row). Fixtures are written into tmp_path from a few dozen Fashion-MNIST rows."""

from pathlib import Path

import numpy as np
import pytest

from fedafd.runtime.data.fashion_mnist import load_fashion_mnist
from fedafd.runtime.data.prepared import ImageClassData
from fedafd.runtime.data.sources import cifar
from fedafd.runtime.data.sources.options import DataOptions
from fedafd.runtime.data.sources.records import DataFormatError, Problems
from fedafd.runtime.data.sources.registry import open_source


@pytest.fixture(scope="module")
def fashion() -> ImageClassData:
    """40 Fashion-MNIST rows: uint8 (N, 3, 32, 32), labels, the 10 class names (not in sorted order)."""
    data = load_fashion_mnist("test")
    return ImageClassData(data.images[:40], data.labels[:40], data.class_names)


def cifar_bytes(images: np.ndarray, *label_columns: np.ndarray) -> bytes:
    """CIFAR binary records: the label bytes, then the R, G, B planes ((3, 32, 32) row-major is exactly that)."""
    labels = np.stack(label_columns, axis=1).astype(np.uint8)  # (N, label bytes)
    return np.concatenate([labels, images.reshape(len(images), -1)], axis=1).tobytes()


def write_cifar10(folder: Path, data: ImageClassData, train: int = 30, meta: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    half = train // 2
    (folder / "data_batch_1.bin").write_bytes(cifar_bytes(data.images[:half], data.labels[:half]))
    (folder / "data_batch_2.bin").write_bytes(cifar_bytes(data.images[half:train], data.labels[half:train]))
    (folder / "test_batch.bin").write_bytes(cifar_bytes(data.images[train:], data.labels[train:]))
    if meta:
        (folder / "batches.meta.txt").write_text("".join(f"{n}\n" for n in data.class_names) + "\n\n")
    return folder


def assert_rows(got: ImageClassData, images: np.ndarray, labels: np.ndarray, names) -> None:
    np.testing.assert_array_equal(got.images, images)
    np.testing.assert_array_equal(got.labels, labels)
    assert got.class_names == tuple(names)


# --- CIFAR --------------------------------------------------------------------------------------


def test_cifar10_folder_gives_its_splits_in_batch_order_with_the_meta_names(tmp_path, fashion):
    source = open_source("image", write_cifar10(tmp_path / "cifar-10-batches-bin", fashion), cache=False)
    assert source.format == "cifar" and set(source.splits) == {"train", "test"}
    assert_rows(source.splits["train"], fashion.images[:30], fashion.labels[:30], fashion.class_names)
    assert_rows(source.splits["test"], fashion.images[30:], fashion.labels[30:], fashion.class_names)


def test_cifar10_one_file_is_split_all_and_without_meta_the_classes_are_0_to_9(tmp_path, fashion):
    folder = write_cifar10(tmp_path, fashion, meta=False)
    source = open_source("image", folder / "data_batch_2.bin", cache=False)
    assert set(source.splits) == {"all"}
    assert_rows(source.splits["all"], fashion.images[15:30], fashion.labels[15:30], [str(i) for i in range(10)])


def test_cifar100_uses_the_fine_label_unless_coarse_label_is_asked(tmp_path, fashion):
    coarse = fashion.labels % 4
    fine = fashion.labels
    (tmp_path / "train.bin").write_bytes(cifar_bytes(fashion.images[:30], coarse[:30], fine[:30]))
    (tmp_path / "test.bin").write_bytes(cifar_bytes(fashion.images[30:], coarse[30:], fine[30:]))
    (tmp_path / "coarse_label_names.txt").write_text("c0\nc1\nc2\nc3\n")
    fine_source = open_source("image", tmp_path, cache=False)  # no fine_label_names.txt: "0".."99"
    assert_rows(fine_source.splits["train"], fashion.images[:30], fine[:30], [str(i) for i in range(100)])
    coarse_source = open_source("image", tmp_path, DataOptions(label_column="coarse_label"), cache=False)
    assert_rows(coarse_source.splits["test"], fashion.images[30:], coarse[30:], ["c0", "c1", "c2", "c3"])
    assert fine_source.digest != coarse_source.digest
    with pytest.raises(DataFormatError, match="label_column must be fine_label"):
        open_source("image", tmp_path, DataOptions(label_column="superclass"), cache=False)
    with pytest.raises(DataFormatError, match="natural_id_column 'writer': CIFAR records have no columns"):
        open_source("image", tmp_path, DataOptions(natural_id_column="writer"), cache=False)


def test_truncated_cifar_file_is_named_with_its_size(tmp_path, fashion):
    folder = write_cifar10(tmp_path, fashion)
    batch = folder / "data_batch_1.bin"
    batch.write_bytes(batch.read_bytes()[:-100])
    size = batch.stat().st_size
    with pytest.raises(DataFormatError, match=rf"data_batch_1\.bin: {size} bytes .* truncated"):
        open_source("image", folder, DataOptions(), on_bad_sample="skip", cache=False)


def test_cifar_label_past_the_classes_is_a_bad_row_named_by_its_record(tmp_path, fashion):
    labels = fashion.labels[:10].copy()
    labels[6] = 12  # CIFAR-10 has 10 classes
    file = tmp_path / "test_batch.bin"
    file.write_bytes(cifar_bytes(fashion.images[:10], labels))
    with pytest.raises(DataFormatError, match=r"test_batch\.bin, row 7: label 12 is outside \[0, 10\)"):
        open_source("image", file, cache=False)
    source = open_source("image", file, on_bad_sample="skip", cache=False)
    assert source.skipped == 1 and len(source.splits["all"]) == 9


def test_cifar_pictures_come_from_the_map_when_opened(tmp_path, fashion):
    """Reading copies only the labels: the pixels are read from the mapped file when image() is called."""
    file = tmp_path / "test_batch.bin"
    file.write_bytes(cifar_bytes(fashion.images[:3], fashion.labels[:3]))
    records = cifar.read(file, "image", DataOptions(format="cifar"), Problems())["all"]
    with open(file, "r+b") as handle:  # overwrite record 2's pixels after reading
        handle.seek(cifar.CIFAR10.record_size + 1)
        handle.write(bytes(cifar.PIXELS))
    assert np.asarray(records[1].image()).max() == 0
    np.testing.assert_array_equal(np.asarray(records[0].image()), fashion.images[0].transpose(1, 2, 0))


# --- npz ----------------------------------------------------------------------------------------


def test_npz_channel_first_uint8_with_class_names(tmp_path, fashion):
    path = tmp_path / "d.npz"
    np.savez(path, images=fashion.images, labels=fashion.labels, class_names=np.array(fashion.class_names))
    source = open_source("image", path, cache=False)
    assert source.format == "npz" and set(source.splits) == {"all"}
    assert_rows(source.splits["all"], fashion.images, fashion.labels, fashion.class_names)


def test_npz_channel_last_floats_and_train_test_splits_give_the_same_arrays(tmp_path, fashion):
    hwc = fashion.images.transpose(0, 2, 3, 1).astype(np.float32) / 255  # (N, 32, 32, 3) in [0, 1]
    path = tmp_path / "d.npz"
    np.savez(path, x_train=hwc[:30], y_train=fashion.labels[:30], x_test=hwc[30:], y_test=fashion.labels[30:])
    source = open_source("image", path, cache=False)
    assert set(source.splits) == {"train", "test"}
    assert_rows(source.splits["train"], fashion.images[:30], fashion.labels[:30], [str(i) for i in range(10)])
    assert_rows(source.splits["test"], fashion.images[30:], fashion.labels[30:], [str(i) for i in range(10)])


def test_npz_grayscale_is_replicated_to_rgb(tmp_path, fashion):
    path = tmp_path / "gray.npz"
    np.savez(path, x=fashion.images[:5, 0], y=np.array(["a", "b", "a", "c", "b"]))
    data = open_source("image", path, cache=False).splits["all"]
    np.testing.assert_array_equal(data.images, np.repeat(fashion.images[:5, :1], 3, axis=1))
    assert data.class_names == ("a", "b", "c") and data.labels.tolist() == [0, 1, 0, 2, 1]


def test_npz_object_array_is_refused_without_unpickling(tmp_path):
    path = tmp_path / "ragged.npz"
    np.savez(path, images=np.array([np.zeros((2, 2)), np.zeros((3, 3))], dtype=object), labels=np.array([0, 1]))
    with pytest.raises(DataFormatError, match=r"ragged\.npz: array 'images' .*object arrays need pickle; save "
                                              "plain arrays"):
        open_source("image", path, cache=False)


def test_npz_length_mismatch_names_both_counts(tmp_path, fashion):
    path = tmp_path / "d.npz"
    np.savez(path, images=fashion.images[:10], labels=fashion.labels[:9])
    with pytest.raises(DataFormatError, match=r"d\.npz: images holds 10 images but labels holds 9 labels"):
        open_source("image", path, cache=False)


def test_npz_nan_picture_is_a_bad_row(tmp_path, fashion):
    floats = fashion.images[:6].astype(np.float64) / 255
    floats[3, 1, 5, 5] = np.nan
    path = tmp_path / "d.npz"
    np.savez(path, images=floats, labels=fashion.labels[:6])
    with pytest.raises(DataFormatError, match=r"d\.npz \[images\], row 4: NaN"):
        open_source("image", path, cache=False)
    source = open_source("image", path, on_bad_sample="skip", cache=False)
    assert source.skipped == 1 and "row 4" in source.problems[0]
    np.testing.assert_array_equal(source.splits["all"].images, fashion.images[[0, 1, 2, 4, 5]])


def test_npz_floats_outside_0_1_and_missing_labels_are_fatal(tmp_path, fashion):
    path = tmp_path / "d.npz"
    np.savez(path, images=fashion.images.astype(np.float32), labels=fashion.labels)
    with pytest.raises(DataFormatError, match=r"float images must lie in \[0, 1\], found \[0, 255\]"):
        open_source("image", path, cache=False)
    np.savez(path, images=fashion.images)
    with pytest.raises(DataFormatError, match=r"no label array labels or y \(it holds images uint8"):
        open_source("image", path, cache=False)


def test_npz_natural_ids_come_from_the_named_array(tmp_path, fashion):
    path = tmp_path / "d.npz"
    writers = np.array([f"w{i % 4}" for i in range(10)])
    np.savez(path, x_train=fashion.images[:10], y_train=fashion.labels[:10], writer_train=writers)
    data = open_source("image", path, DataOptions(natural_id_column="writer"), cache=False).splits["train"]
    assert data.natural_ids == tuple(writers.tolist())
    with pytest.raises(DataFormatError, match="no natural id array 'site_train'"):
        open_source("image", path, DataOptions(natural_id_column="site"), cache=False)
