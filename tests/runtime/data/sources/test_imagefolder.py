"""Folders of pictures as sources, through open_source: the same rows as an ImageFolder, a CSV and a JSONL manifest
give the same arrays and digest, and so do pairs as a metadata.jsonl folder and as a CSV; what Hugging Face's
imagefolder drops silently (nested class folders, uncaptioned pictures) is a bad row named by its file.
Fixtures are PNGs (lossless: they decode to the very arrays written) of a few dozen bundled pictures."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedafd.runtime.data.fashion_mnist import load_fashion_mnist
from fedafd.runtime.data.sources import imagefolder
from fedafd.runtime.data.sources.options import DataOptions
from fedafd.runtime.data.sources.records import DataFormatError
from fedafd.runtime.data.sources.registry import open_source
from fedafd.runtime.data.tuxpaint import load_tuxpaint_pairs

N_TRAIN = 20


@pytest.fixture(scope="module")
def fashion() -> tuple[np.ndarray, list[str]]:
    """30 Fashion-MNIST pictures (uint8 (N, 3, 32, 32)) and their class names ('/' replaced, for folder names)."""
    data = load_fashion_mnist("test")
    return data.images[:30], [data.class_names[i].replace("/", "-") for i in data.labels[:30]]


@pytest.fixture(scope="module")
def stamps() -> tuple[np.ndarray, list[list[str]], list[str]]:
    """10 Tux Paint pictures, their captions (every third picture with two more) and categories."""
    data = load_tuxpaint_pairs("test")
    rows = [int(np.flatnonzero(data.image_ids == i)[0]) for i in np.unique(data.image_ids)[:10]]
    captions = [[data.captions[r]] + ([f"another {data.captions[r]}", f"one more {data.captions[r]}"]
                                      if n % 3 == 0 else []) for n, r in enumerate(rows)]
    return data.images[rows], captions, [data.group_names[data.groups[r]] for r in rows]


def write_png(path: Path, image: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image.transpose(1, 2, 0)).save(path)  # (3, H, W) -> (H, W, 3)
    return path


def write_image_folder(root: Path, images: np.ndarray, labels: list[str], split: str = "",
                       start: int = 0) -> list[tuple[str, str]]:
    """ROOT/[split/]<class>/<nn>.png (nn counted from `start`); returns the (path under ROOT, class) rows in the
    reader's order."""
    rows = []
    for i, (image, label) in enumerate(zip(images, labels), start=start):
        path = f"{split + '/' if split else ''}{label}/{i:02d}.png"
        write_png(root / path, image)
        rows.append((path, label))
    return sorted(rows, key=lambda row: (row[1], row[0]))  # sorted class folders, then sorted file names


def write_csv(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows(rows)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


# --- the same rows in three formats -------------------------------------------------------------


def test_image_rows_as_folders_csv_and_jsonl_give_equal_arrays_and_digest(tmp_path, fashion):
    images, labels = fashion
    root = tmp_path / "folders"
    splits = {"train": write_image_folder(root, images[:N_TRAIN], labels[:N_TRAIN], "train"),
              "test": write_image_folder(root, images[N_TRAIN:], labels[N_TRAIN:], "test", N_TRAIN)}
    for split, rows in splits.items():  # CSV paths under image_root; JSONL paths relative to its own folder
        write_csv(tmp_path / "csv" / f"{split}.csv", [("path", "label"), *rows])
        write_jsonl(tmp_path / "jsonl" / f"{split}.jsonl", [{"file_name": f"../folders/{p}", "label": c}
                                                            for p, c in rows])
    folder = open_source("image", root, cache=False)
    table = open_source("image", tmp_path / "csv", DataOptions(format="csv", image_root=str(root)), cache=False)
    lines = open_source("image", tmp_path / "jsonl", DataOptions(format="jsonl"), cache=False)

    names = tuple(sorted(set(labels)))
    for split, rows in splits.items():
        data = folder.splits[split]
        order = [int(Path(p).stem) for p, _ in rows]
        assert np.array_equal(data.images, images[order])  # PNG: decoded exactly as written
        assert data.class_names == names and [names[i] for i in data.labels] == [labels[i] for i in order]
        for other in (table, lines):
            same = other.splits[split]
            assert np.array_equal(same.images, data.images) and np.array_equal(same.labels, data.labels)
            assert same.class_names == data.class_names
    assert folder.digest == table.digest == lines.digest
    assert folder.format == "imagefolder" and folder.skipped == 0


def test_pairs_as_a_metadata_folder_and_as_a_csv_give_equal_arrays_and_digest(tmp_path, stamps):
    images, captions, groups = stamps
    root = tmp_path / "pairs"
    for i, image in enumerate(images):
        write_png(root / "images" / f"{i:02d}.png", image)
    # One line per caption; a picture's later captions come after other pictures' lines.
    lines = [(f"images/{i:02d}.png", texts[0], groups[i]) for i, texts in enumerate(captions)]
    lines += [(f"images/{i:02d}.png", text, groups[i]) for i, texts in enumerate(captions) for text in texts[1:]]
    write_jsonl(root / "metadata.jsonl", [{"file_name": f, "text": t, "category": g} for f, t, g in lines])
    write_csv(tmp_path / "pairs.csv", [("file_name", "text", "category"), *lines])
    options = DataOptions(group_column="category")
    folder = open_source("multimodal", root, options, cache=False)
    table = open_source("multimodal", tmp_path / "pairs.csv", options.with_values(image_root=str(root)), cache=False)

    data = folder.splits["all"]
    assert data.captions == tuple(text for texts in captions for text in texts)  # picture by picture, in order
    assert data.image_ids.tolist() == [i for i, texts in enumerate(captions) for _ in texts]
    assert np.array_equal(data.images, np.repeat(images, [len(texts) for texts in captions], axis=0))
    assert [data.group_names[g] for g in data.groups] == [groups[i] for i, t in enumerate(captions) for _ in t]
    same = table.splits["all"]
    for name in ("images", "input_ids", "groups", "image_ids"):
        assert np.array_equal(getattr(same, name), getattr(data, name))
    assert same.captions == data.captions and same.group_names == data.group_names
    assert folder.digest == table.digest


def test_pairs_in_split_folders_and_metadata_csv(tmp_path, stamps):
    images, captions, _ = stamps
    for split, picks in (("train", range(0, 6)), ("test", range(6, 10))):
        rows = [("file_name", "text")]
        for i in picks:
            write_png(tmp_path / split / f"{i}.png", images[i])
            rows += [(f"{i}.png", text) for text in captions[i]]
        write_csv(tmp_path / split / "metadata.csv", rows)
    source = open_source("multimodal", tmp_path, cache=False)
    assert set(source.splits) == {"train", "test"}
    assert source.splits["test"].captions == tuple(t for i in range(6, 10) for t in captions[i])
    assert source.splits["train"].image_ids.tolist() == [i for i in range(6) for _ in captions[i]]


# --- layouts ------------------------------------------------------------------------------------


def test_class_folders_without_splits_ignore_notes_and_hidden_files(tmp_path, fashion):
    images, labels = fashion
    rows = write_image_folder(tmp_path, images[:8], labels[:8])
    (tmp_path / labels[0] / "README.txt").write_text("notes")
    (tmp_path / labels[0] / ".DS_Store").write_bytes(b"\0")
    write_png(tmp_path / labels[0] / ".hidden" / "x.png", images[0])
    (tmp_path / "LICENSE").write_text("a file beside the class folders")
    source = open_source("image", tmp_path, cache=False)
    assert set(source.splits) == {"all"} and source.skipped == 0
    assert np.array_equal(source.splits["all"].images, images[[int(Path(p).stem) for p, _ in rows]])


def test_split_names_are_splits_only_when_every_top_level_folder_is_one(tmp_path, fashion):
    images, _ = fashion
    write_png(tmp_path / "train" / "0.png", images[0])
    write_png(tmp_path / "cats" / "1.png", images[1])
    data = open_source("image", tmp_path, cache=False).splits["all"]
    assert data.class_names == ("cats", "train") and data.labels.tolist() == [0, 1]


def test_an_empty_class_folder_is_fatal_even_with_skip(tmp_path, fashion):
    write_image_folder(tmp_path, *fashion)
    (tmp_path / "Empty").mkdir()
    (tmp_path / "Empty" / "notes.txt").write_text("nothing here")
    with pytest.raises(DataFormatError, match=r"Empty: empty class folder"):
        open_source("image", tmp_path, on_bad_sample="skip", cache=False)


def test_pairs_without_metadata_and_natural_ids_without_columns_are_fatal(tmp_path, fashion):
    write_image_folder(tmp_path, *fashion)
    with pytest.raises(DataFormatError, match="no metadata.jsonl or metadata.csv"):
        open_source("multimodal", tmp_path, cache=False)
    with pytest.raises(DataFormatError, match="natural_id_column 'writer': class folders have no columns"):
        open_source("image", tmp_path, DataOptions(natural_id_column="writer"), cache=False)


def test_a_second_open_reads_the_cache(tmp_path, fashion, monkeypatch):
    write_image_folder(tmp_path / "data", *fashion)
    uncached = open_source("image", tmp_path / "data", cache=False)
    monkeypatch.setenv("FEDAFD_CACHE", str(tmp_path / "cache"))
    first = open_source("image", tmp_path / "data")
    monkeypatch.setattr(imagefolder, "read", lambda *args: pytest.fail("read again instead of from the cache"))
    second = open_source("image", tmp_path / "data")
    assert first.digest == second.digest == uncached.digest
    assert np.array_equal(second.splits["all"].images, uncached.splits["all"].images)


# --- bad rows --------------------------------------------------------------------------------------
# Each case writes a folder with bad files and returns (path, kind, [fragments of the first error], a function
# of the source that checks the rows kept with skip, the number of bad rows). A picture in a folder is its own
# row: its Where is the file.


def nested_class_folder(tmp_path, fashion, stamps):
    images, labels = fashion
    rows = write_image_folder(tmp_path, images[:6], labels[:6])
    nested = write_png(tmp_path / labels[0] / "closeups" / "a.png", images[7])
    write_png(tmp_path / labels[0] / "closeups" / "deeper" / "y.png", images[8])
    kept = images[[int(Path(p).stem) for p, _ in rows]]
    return tmp_path, "image", [str(nested), f"nested class folder {labels[0]}/closeups", "two levels below",
                               "flatten it"], lambda data: np.array_equal(data.images, kept), 2


def zero_byte_picture(tmp_path, fashion, stamps):
    images, labels = fashion
    rows = write_image_folder(tmp_path, images[:6], labels[:6])
    empty = tmp_path / rows[2][0]
    empty.write_bytes(b"")
    kept = images[[int(Path(p).stem) for p, _ in rows[:2] + rows[3:]]]
    return tmp_path, "image", [str(empty), "zero-byte file"], lambda data: np.array_equal(data.images, kept), 1


def truncated_picture(tmp_path, fashion, stamps):
    images, labels = fashion
    rows = write_image_folder(tmp_path, images[:6], labels[:6])
    broken = tmp_path / rows[4][0]
    broken.write_bytes(broken.read_bytes()[: broken.stat().st_size // 2])
    kept = images[[int(Path(p).stem) for p, _ in rows[:4] + rows[5:]]]
    return tmp_path, "image", [str(broken), "truncated"], lambda data: np.array_equal(data.images, kept), 1


def not_a_picture(tmp_path, fashion, stamps):
    images, labels = fashion
    rows = write_image_folder(tmp_path, images[:6], labels[:6])
    drawing = tmp_path / labels[1] / "drawing.svg"
    drawing.write_text("<svg/>")
    kept = images[[int(Path(p).stem) for p, _ in rows]]
    return tmp_path, "image", [str(drawing), "not a picture fedafd reads (.svg"], \
        lambda data: np.array_equal(data.images, kept), 1


def picture_outside_class_folders(tmp_path, fashion, stamps):
    images, labels = fashion
    rows = write_image_folder(tmp_path, images[:6], labels[:6])
    write_png(tmp_path / "loose.png", images[9])
    kept = images[[int(Path(p).stem) for p, _ in rows]]
    return tmp_path, "image", [str(tmp_path / "loose.png"), "picture outside any class folder"], \
        lambda data: np.array_equal(data.images, kept), 1


def _pairs(root: Path, stamps, lines: list[dict]) -> Path:
    images, _, _ = stamps
    for i in range(4):
        write_png(root / f"{i}.png", images[i])
    return write_jsonl(root / "metadata.jsonl", lines)


def image_without_captions(tmp_path, fashion, stamps):
    _pairs(tmp_path, stamps, [{"file_name": f"{i}.png", "text": f"picture {i}"} for i in (0, 1, 3)])
    return tmp_path, "multimodal", [str(tmp_path / "2.png"), "image without captions"], \
        lambda data: data.captions == ("picture 0", "picture 1", "picture 3"), 1


def caption_of_a_missing_file(tmp_path, fashion, stamps):
    lines = [{"file_name": f"{i}.png", "text": f"picture {i}"} for i in range(4)]
    lines.insert(2, {"file_name": "gone.png", "text": "a picture that is not there"})
    lines.append({"file_name": "0.png", "text": "   "})
    _pairs(tmp_path, stamps, lines)
    return tmp_path, "multimodal", ["metadata.jsonl, row 3", "image file not found: gone.png"], \
        lambda data: data.captions == tuple(f"picture {i}" for i in range(4)), 2


BAD_CASES = [nested_class_folder, zero_byte_picture, truncated_picture, not_a_picture, picture_outside_class_folders,
             image_without_captions, caption_of_a_missing_file]


@pytest.mark.parametrize("case", BAD_CASES, ids=lambda case: case.__name__)
def test_a_bad_file_is_named(tmp_path, fashion, stamps, case):
    path, kind, fragments, _, _ = case(tmp_path, fashion, stamps)
    with pytest.raises(DataFormatError) as err:
        open_source(kind, path, cache=False)
    for fragment in fragments:
        assert fragment in str(err.value)


@pytest.mark.parametrize("case", BAD_CASES, ids=lambda case: case.__name__)
def test_skip_leaves_out_exactly_the_bad_files(tmp_path, fashion, stamps, case):
    path, kind, _, kept, bad = case(tmp_path, fashion, stamps)
    source = open_source(kind, path, on_bad_sample="skip", cache=False)
    assert source.skipped == bad and len(source.problems) == bad
    assert kept(source.splits["all"])
