"""The real data sets as prepared arrays: sizes, formats, splits, the cache. Needs the data fetched
(`fedafd-cloud data fetch`, run by setup.sh); the first run prepares the cache (about 15 s)."""

import dataclasses
import gzip
import os
import time

import numpy as np
import pytest

from fedafd.runtime.data import datasets, fashion_mnist
from fedafd.runtime.data.emoji import load_emoji_pairs
from fedafd.runtime.data.fashion_mnist import load_fashion_mnist
from fedafd.runtime.data.pictures import Pictures
from fedafd.runtime.data.prepared import ImageClassData, PairData, TextClassData, prepared_path, stratified_split, subset
from fedafd.runtime.data.tuxpaint import load_tuxpaint_pairs
from fedafd.runtime.data.wordnet import load_wordnet_topics
from fedafd.runtime.data import fetch as fetch_module
from fedafd.runtime.data.fetch import DataMissingError, cache_dir
from fedafd.runtime.data.text import MAX_TEXT_LEN, PAD_ID, VOCAB_SIZE

CLS = 101


@pytest.fixture(scope="module")
def fashion():
    return {split: load_fashion_mnist(split) for split in ("train", "test")}


@pytest.fixture(scope="module")
def wordnet():
    return {split: load_wordnet_topics(split) for split in ("train", "test")}


@pytest.fixture(scope="module")
def emoji():
    return {split: load_emoji_pairs(split) for split in ("train", "test")}


@pytest.fixture(scope="module")
def tuxpaint():
    return {split: load_tuxpaint_pairs(split) for split in ("train", "test")}


def _check_images(images: np.ndarray, n: int) -> None:
    assert images.shape == (n, 3, 32, 32) and images.dtype == np.uint8


def _check_tokens(input_ids: np.ndarray, attention_mask: np.ndarray, n: int) -> None:
    assert input_ids.shape == attention_mask.shape == (n, MAX_TEXT_LEN)
    assert input_ids.dtype == attention_mask.dtype == np.int64
    assert (input_ids[:, 0] == CLS).all() and (input_ids < VOCAB_SIZE).all()
    assert np.array_equal(attention_mask, (input_ids != PAD_ID).astype(np.int64))


def _rows(data: PairData) -> set[tuple[str, bytes]]:
    return {(caption, image.tobytes()) for caption, image in zip(data.captions, data.images)}


def test_fashion_mnist_sizes_classes_and_format(fashion):
    for split, n in (("train", 60000), ("test", 10000)):
        data = fashion[split]
        assert isinstance(data, ImageClassData) and len(data) == n
        _check_images(data.images, n)
        assert data.labels.dtype == np.int64
        assert np.bincount(data.labels).tolist() == [n // 10] * 10
        assert data.class_names[0] == "T-shirt/top" and len(data.class_names) == 10
    images = fashion["test"].images
    assert not images[:, :, :2].any() and not images[:, :, :, -2:].any()  # black 2 px border
    assert (images[:, 0] == images[:, 1]).all() and (images[:, 0] == images[:, 2]).all()  # grayscale


def test_wordnet_topics_sizes_classes_and_tokens(wordnet):
    train, test = wordnet["train"], wordnet["test"]
    assert isinstance(train, TextClassData)
    assert (len(train), len(test)) == (39195, 9799)
    assert train.class_names == ("artifact", "person", "plant", "animal", "location", "substance", "food", "body")
    assert np.bincount(train.labels).tolist() == [9270, 8870, 6424, 6007, 2567, 2386, 2058, 1613]
    assert np.bincount(test.labels).tolist() == [2317, 2217, 1606, 1502, 642, 597, 515, 403]
    for data in (train, test):
        _check_tokens(data.input_ids, data.attention_mask, len(data))
        assert len(data.texts) == len(data) and all(data.texts)
    assert "any substance that can be used as food" in train.texts + test.texts


def test_emoji_pairs_sizes_groups_and_disjoint_split(emoji):
    train, test = emoji["train"], emoji["test"]
    assert isinstance(train, PairData)
    assert (len(train), len(test)) == (1496, 374)
    assert train.group_names == ("Smileys & Emotion", "People & Body", "Animals & Nature", "Food & Drink",
                                 "Travel & Places", "Activities", "Objects", "Symbols", "Flags")
    assert np.bincount(train.groups).tolist() == [133, 290, 122, 106, 174, 68, 209, 179, 215]
    for data in (train, test):
        _check_images(data.images, len(data))
        _check_tokens(data.input_ids, data.attention_mask, len(data))
        assert all(data.captions) and data.groups.dtype == np.int64
        assert (data.images[:, :, 0, 0] == 255).all()  # drawn on white
        assert ((data.images < 200).any(axis=(1, 2, 3))).all()  # every emoji has a picture
    assert not _rows(train) & _rows(test)
    assert not set(train.captions) & set(test.captions)  # Unicode names are unique
    assert "t-shirt" in train.captions + test.captions
    # The fixed split: the same on every machine and numpy version
    assert test.captions[:3] == ("grinning face with sweat", "rolling on the floor laughing", "smiling face with halo")


def test_tuxpaint_pairs_sizes_groups_and_disjoint_split(tuxpaint):
    train, test = tuxpaint["train"], tuxpaint["test"]
    assert (len(train), len(test)) == (760, 190)
    assert len(train.group_names) == 16 and train.group_names[0] == "animals"
    assert np.bincount(train.groups, minlength=16).sum() == 760
    assert set(test.groups.tolist()) == set(range(16)) - {train.group_names.index("naturalforces")}
    for data in (train, test):
        _check_images(data.images, len(data))
        _check_tokens(data.input_ids, data.attention_mask, len(data))
        assert all(c.strip() for c in data.captions)
        assert (data.images == 255).mean() > 0.2  # transparent backgrounds composited on white
    assert not _rows(train) & _rows(test)
    assert test.captions[:3] == ("Tux and spider - two friends.", "Penguins are wining!", "A duck.")


def test_cached_loads_are_fast_and_identical(emoji, tuxpaint, wordnet):
    for loader, first in ((load_emoji_pairs, emoji["test"]), (load_tuxpaint_pairs, tuxpaint["train"]),
                          (load_wordnet_topics, wordnet["test"])):
        start = time.perf_counter()
        again = loader("test" if first is not tuxpaint["train"] else "train")
        assert time.perf_counter() - start < 1.0
        for field in dataclasses.fields(first):
            a, b = getattr(first, field.name), getattr(again, field.name)
            if isinstance(a, Pictures):  # the same bytes under the same spans
                assert np.array_equal(a.spans, b.spans) and np.array_equal(a.blob, b.blob)
            else:
                assert np.array_equal(a, b) if isinstance(a, np.ndarray) else a == b


def test_prepared_files_hold_no_objects(emoji):
    path = prepared_path("emoji", "train")
    assert path.name == "emoji-train-v2.npz" and path.parent == cache_dir() / "prepared"
    assert (path.parent / "emoji-train-v2.picture_bytes.npy").is_file()  # the pictures' bytes, memory-mapped
    with np.load(path, allow_pickle=False) as stored:
        assert {stored[name].dtype.kind for name in stored.files} <= {"u", "i", "U"}
        assert stored["captions"].dtype.kind == "U"


def test_preparing_again_from_the_packaged_files_gives_the_same_arrays(emoji, tmp_path, monkeypatch):
    # A fresh cache whose unpacked packages are the real ones: emoji rendered again, split again
    (tmp_path / "root").symlink_to(cache_dir() / "root", target_is_directory=True)
    monkeypatch.setenv("FEDAFD_CACHE", str(tmp_path))
    if not (tmp_path / "root" / "usr").exists():
        pytest.skip("the emoji packages are installed system-wide, not in the cache")
    fresh = load_emoji_pairs("test")
    assert prepared_path("emoji", "train").is_file()  # both splits written at once
    assert np.array_equal(fresh.images, emoji["test"].images)
    assert np.array_equal(fresh.input_ids, emoji["test"].input_ids)
    assert fresh.captions == emoji["test"].captions and fresh.group_names == emoji["test"].group_names


def test_unreadable_cache_file_is_prepared_again(tmp_path, monkeypatch, emoji):
    (tmp_path / "root").symlink_to(cache_dir() / "root", target_is_directory=True)
    monkeypatch.setenv("FEDAFD_CACHE", str(tmp_path))
    if not (tmp_path / "root" / "usr").exists():
        pytest.skip("the emoji packages are installed system-wide, not in the cache")
    path = prepared_path("emoji", "test")
    path.parent.mkdir(parents=True)
    path.write_bytes(b"truncated")
    assert load_emoji_pairs("test").captions == emoji["test"].captions
    assert not [p for p in os.listdir(path.parent) if p.endswith(".tmp")]
    with np.load(path, allow_pickle=False) as stored:  # replaced by a good file
        assert len(stored["captions"]) == 374


def test_missing_data_says_how_to_fetch(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDAFD_CACHE", str(tmp_path))
    monkeypatch.setattr(fetch_module, "SYSTEM_ROOT", tmp_path / "system")
    with pytest.raises(DataMissingError, match="wordnet data not found.*fedafd-cloud data fetch"):
        load_wordnet_topics("train")


def test_damaged_idx_file_is_reported(tmp_path):
    path = tmp_path / "labels.gz"
    with gzip.open(path, "wb") as f:
        f.write((2051).to_bytes(4, "big") + (3).to_bytes(4, "big") + bytes(3))
    with pytest.raises(DataMissingError, match="magic number 2051, expected 2049"):
        fashion_mnist._read_idx(path, 2049, 1)
    with gzip.open(path, "wb") as f:
        f.write((2049).to_bytes(4, "big") + (5).to_bytes(4, "big") + bytes(3))
    with pytest.raises(DataMissingError, match="3 bytes of data for shape"):
        fashion_mnist._read_idx(path, 2049, 1)


def test_subset_selects_rows_of_every_kind(wordnet, emoji, fashion):
    rows = np.array([5, 0, 2])
    text = subset(wordnet["test"], rows)
    assert isinstance(text, TextClassData) and len(text) == 3
    assert text.texts == tuple(wordnet["test"].texts[i] for i in rows)
    assert np.array_equal(text.input_ids, wordnet["test"].input_ids[rows])
    assert text.class_names == wordnet["test"].class_names
    pairs = subset(emoji["train"], rows)
    assert pairs.captions[0] == emoji["train"].captions[5]
    assert np.array_equal(pairs.images[0], emoji["train"].images[5]) and pairs.groups.tolist() == [
        emoji["train"].groups[i] for i in rows]
    assert len(subset(fashion["test"], np.arange(0))) == 0
    with pytest.raises(TypeError, match="integer"):
        subset(fashion["test"], np.array([0.5]))


def test_rows_must_agree():
    with pytest.raises(ValueError, match="different numbers of rows"):
        ImageClassData(np.zeros((2, 3, 32, 32), np.uint8), np.zeros(3, np.int64), ("a",))


def test_bad_split_is_refused():
    with pytest.raises(ValueError, match="train"):
        load_emoji_pairs("validation")


def test_stratified_split_shares_each_label():
    labels = np.array([0] * 10 + [1] * 5 + [2] * 3)  # 18 rows: 3.6 test rows -> 4
    train, test = stratified_split(labels, 0.2, seed=1)
    assert len(test) == 4 and np.bincount(labels[test]).tolist() == [2, 1, 1]
    assert sorted(np.concatenate([train, test]).tolist()) == list(range(18))
    assert np.array_equal(test, stratified_split(labels, 0.2, seed=1)[1])


def test_every_loader_is_listed_for_prepare_all():
    assert set(datasets.LOADERS) == {"fashion_mnist", "wordnet", "emoji", "tuxpaint"}
