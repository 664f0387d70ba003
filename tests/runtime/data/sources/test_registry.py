"""The registry's own refusals and choices: pickles and hub ids refused before anything is opened, formats told
from paths, a device's train and test rows, and the bundled sets as sources."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

from fedafd.runtime.data.sources.options import DataOptions
from fedafd.runtime.data.sources.records import DataFormatError
from fedafd.runtime.data.sources.registry import detect_format, open_source, train_test


class Exploding:
    """Unpickling this runs code: if any reader opened a pickle, the test would see the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("name", ["data.pkl", "data.pickle", "tensors.pt", "weights.pth"])
def test_pickle_files_are_refused_without_being_opened(tmp_path: Path, name: str) -> None:
    # Prepare: a pickle that, if unpickled, creates a file.
    marker = tmp_path / "unpickled"
    (tmp_path / name).write_bytes(pickle.dumps(Exploding(marker)))
    # Execute
    with pytest.raises(DataFormatError) as refused:
        open_source("image", tmp_path / name, cache=False)
    # Assert: refused by name, with the conversion that works; nothing ran.
    assert name in str(refused.value) and "never unpickles" in str(refused.value) and "np.savez" in str(refused.value)
    assert not marker.exists()


def test_the_python_cifar_folder_is_refused_with_the_binary_version_named(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    (folder / "train").write_bytes(pickle.dumps(Exploding(tmp_path / "unpickled")))
    with pytest.raises(DataFormatError, match="cifar-100-binary.tar.gz.*format cifar"):
        open_source("image", folder, cache=False)
    assert not (tmp_path / "unpickled").exists()


@pytest.mark.parametrize("name", ["uoft-cs/cifar100", "fancyzhx/ag_news"])
def test_a_hub_id_is_refused_at_once(name: str) -> None:
    with pytest.raises(DataFormatError, match="looks like a hub id; fedafd never downloads"):
        open_source("text", name, cache=False)


def test_a_missing_path_and_an_unknown_format_are_named(tmp_path: Path) -> None:
    with pytest.raises(DataFormatError, match="no such file or folder"):
        open_source("image", tmp_path / "nowhere", cache=False)
    (tmp_path / "notes.docx").write_bytes(b"x")
    with pytest.raises(DataFormatError, match="notes.docx: cannot tell the format"):
        detect_format(tmp_path / "notes.docx", "text")
    with pytest.raises(DataFormatError, match="unknown format 'excel'"):
        open_source("text", tmp_path / "notes.docx", DataOptions(format="excel"), cache=False)


def test_a_format_of_another_kind_is_refused_by_name(tmp_path: Path) -> None:
    np.savez(tmp_path / "x.npz", images=np.zeros((4, 8, 8), np.uint8), labels=np.zeros(4, np.int64))
    with pytest.raises(DataFormatError, match="format npz holds image data, not text"):
        open_source("text", tmp_path / "x.npz", cache=False)


def test_rows_too_few_for_the_test_fraction_are_an_error(tmp_path: Path) -> None:
    np.savez(tmp_path / "two.npz", images=np.zeros((2, 8, 8), np.uint8), labels=np.array([0, 1]))
    source = open_source("image", tmp_path / "two.npz", cache=False)
    with pytest.raises(DataFormatError, match="2 rows are too few for test_fraction 0.2"):
        train_test(source, DataOptions(), test_fraction=0.2)


def test_without_a_test_split_a_stratified_seeded_share_is_held_out(tmp_path: Path) -> None:
    labels = np.repeat([0, 1, 2], 10)
    np.savez(tmp_path / "x.npz", images=np.arange(30 * 64, dtype=np.uint8).reshape(30, 8, 8) % 251, labels=labels)
    source = open_source("image", tmp_path / "x.npz", cache=False)
    train, test = train_test(source, DataOptions(), test_fraction=0.2, seed=3)
    again = train_test(source, DataOptions(), test_fraction=0.2, seed=3)[1]
    other = train_test(source, DataOptions(), test_fraction=0.2, seed=4)[1]
    # 2 of each class's 10 rows held out; the same rows for the same seed, others for another
    assert (len(train), len(test)) == (24, 6) and np.bincount(test.labels).tolist() == [2, 2, 2]
    assert np.array_equal(test.images, again.images) and not np.array_equal(test.images, other.images)


def test_the_bundled_sets_are_sources_with_their_splits() -> None:
    image = open_source("image", "demo:fashion_mnist")
    assert (len(image.splits["train"]), len(image.splits["test"])) == (12_000, 2_000)
    assert open_source("public", "demo:emoji").splits["train"].image_ids.tolist()[:3] == [0, 1, 2]
    with pytest.raises(DataFormatError, match="demo:emoji holds multimodal data, not image"):
        open_source("image", "demo:emoji")
    with pytest.raises(DataFormatError, match="no such bundled data set; known: demo:fashion_mnist"):
        open_source("image", "demo:cifar100")


def test_pairs_cut_out_of_a_larger_set_number_their_pictures_from_zero_so_the_same_rows_have_one_digest() -> None:
    # A bundled set built fresh cuts its splits out of all pairs (ids are positions in the whole set); read back
    # from files the same rows are numbered 0, 1, ...: both must be the same rows to the digest.
    from fedafd.runtime.data.prepared import PairData, canonical_ids, subset
    from fedafd.runtime.data.sources.registry import data_digest

    assert canonical_ids(np.array([5, 5, 2, 9, 2, 7])).tolist() == [0, 0, 1, 2, 1, 3]
    pairs = open_source("multimodal", "demo:tuxpaint").splits["test"]
    cut = subset(pairs, np.arange(0, 40, 2))  # image ids 0, 2, 4, ... before numbering
    fresh = PairData(cut.images, cut.input_ids, cut.attention_mask, cut.captions, cut.groups, cut.group_names,
                     pictures=cut.pictures)
    assert cut.image_ids.tolist() == list(range(20))
    assert data_digest({"test": cut}) == data_digest({"test": fresh})


def test_a_build_killed_midway_leaves_nothing_behind_once_another_builds(tmp_path: Path, monkeypatch) -> None:
    # Prepare: the building folder of a process that died (no such pid), and one of this live process.
    import os
    import subprocess

    from fedafd.runtime.data.sources.registry import sources_dir

    monkeypatch.setenv("FEDAFD_CACHE", str(tmp_path / "cache"))
    gone = subprocess.Popen(["true"])
    gone.wait()  # a pid that was a process and is no more
    dead = sources_dir() / f".building-{gone.pid}-abc"
    live = sources_dir() / f".building-{os.getpid()}-def"
    for folder in (dead, live):
        (folder / "split0.images.npy").parent.mkdir(parents=True)
    np.savez(tmp_path / "x.npz", images=np.zeros((10, 8, 8), np.uint8), labels=np.arange(10) % 2)
    # Execute
    open_source("image", tmp_path / "x.npz")
    # Assert
    assert not dead.exists() and live.exists()
