"""Every row's picture at source resolution beside its 32 px array (runtime/data/pictures.py): a file's own bytes
(a JPEG stays that JPEG), PNG for pictures made in memory, one span per picture however many captions it has,
max_picture_side, subsets, joins, the files a cached source keeps, the digest, and transparency composited on
white as the 32 px array's is. Fixtures are a few small pictures written with PIL in tmp_path."""

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedafd.runtime.data.emoji import load_emoji_pairs
from fedafd.runtime.data.images import from_pil
from fedafd.runtime.data.modal import as_modal
from fedafd.runtime.data.pictures import Pictures, concat_pictures, cap_picture
from fedafd.runtime.data.prepared import (
    ImageClassData, PairData, concat, load_split, pictures_sha256, save_split, split_file, subset,
)
from fedafd.runtime.data.sources.options import DataOptions, load_options
from fedafd.runtime.data.sources.records import DataFormatError
from fedafd.runtime.data.sources.registry import data_digest, open_source

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """A private cache, so a cached source is built here."""
    home = tmp_path / "cache"
    monkeypatch.setenv("FEDAFD_CACHE", str(home))
    return home


def noise(height: int, width: int, channels: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)


def transparent(height: int, width: int) -> np.ndarray:
    """RGBA (H, W, 4): coloured noise, its left half fully transparent, its right half half transparent."""
    pixels = noise(height, width, 4, 3)
    pixels[:, : width // 2, 3] = 0
    pixels[:, width // 2:, 3] = 128
    return pixels


def write(path: Path, pixels: np.ndarray, **save) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, **save)
    return path


@pytest.fixture
def photos(tmp_path) -> tuple[Path, list[tuple[Path, np.ndarray]]]:
    """An ImageFolder of three pictures (the reader's order: class folders, then files, sorted): a 40x60 PNG,
    a 300x200 JPEG and a 120x80 RGBA PNG; with each file and its pixels."""
    root = tmp_path / "photos"
    files = [(write(root / "cat" / "a.png", noise(60, 40, 3, 0)), noise(60, 40, 3, 0)),
             (write(root / "cat" / "b.jpg", noise(200, 300, 3, 1), quality=90), None),
             (write(root / "dog" / "c.png", transparent(80, 120)), transparent(80, 120))]
    return root, files


@pytest.fixture
def pairs(tmp_path) -> tuple[Path, list[Path]]:
    """A metadata.jsonl folder of three pictures with two captions each, a line per caption (the second
    captions after every first one)."""
    root = tmp_path / "pairs"
    files = [write(root / f"{i}.png", noise(30 + 10 * i, 50, 3, 10 + i)) for i in range(2)]
    files.append(write(root / "2.jpg", noise(90, 70, 3, 12)))
    lines = [{"file_name": f.name, "text": f"picture {i} first"} for i, f in enumerate(files)]
    lines += [{"file_name": f.name, "text": f"picture {i} second"} for i, f in enumerate(files)]
    (root / "metadata.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return root, files


def decoded(pictures: Pictures, i: int) -> np.ndarray:
    return np.asarray(pictures.open(i))  # (H, W, 3)


# --- at source resolution ------------------------------------------------------------------------


def test_an_image_folder_keeps_each_picture_at_its_own_size_and_bytes(photos, cache):
    root, files = photos
    data = open_source("image", root).splits["all"]
    pictures = data.pictures
    assert isinstance(data, ImageClassData) and len(pictures) == len(data) == 3
    assert [pictures.open(i).size for i in range(3)] == [(40, 60), (300, 200), (120, 80)]
    for i, (path, _) in enumerate(files):
        assert pictures.encoded(i) == path.read_bytes()  # the file's own bytes, the JPEG's too
    assert np.array_equal(decoded(pictures, 0), files[0][1])  # PNG: the very pixels
    with Image.open(files[1][0]) as jpeg:
        assert np.array_equal(decoded(pictures, 1), np.asarray(jpeg.convert("RGB")))
    assert pictures.blob.shape == (sum(p.stat().st_size for p, _ in files),)  # each picture once
    # A cached source maps its pictures back read-only, like its other arrays.
    assert all(isinstance(a, np.memmap) and not a.flags.writeable for a in (pictures.blob, pictures.spans))


def test_a_picture_with_transparency_opens_on_white_as_its_32_px_array_has_it(photos):
    root, files = photos
    data = open_source("image", root, cache=False).splits["all"]
    picture = data.pictures.open(2)
    assert picture.mode == "RGB" and picture.size == (120, 80)
    pixels = np.asarray(picture)
    assert (pixels[:, :60] == 255).all()  # fully transparent: white
    rgba = files[2][1].astype(np.float64)
    half = 128 / 255 * rgba[:, 60:, :3] + (1 - 128 / 255) * 255  # half transparent over white
    assert np.abs(pixels[:, 60:] - half).max() <= 1
    for i in (0, 2):  # PNGs: the 32 px array is the full picture brought down to 32 px
        assert np.array_equal(from_pil(data.pictures.open(i)), data.images[i])


def test_pictures_made_in_memory_are_kept_as_png_with_their_pixels(tmp_path):
    images = np.stack([noise(50, 70, 3, 20), noise(50, 70, 3, 21)])  # (2, 50, 70, 3)
    np.savez(tmp_path / "arrays.npz", images=images, labels=np.array([0, 1]))
    pictures = open_source("image", tmp_path / "arrays.npz", cache=False).splits["all"].pictures
    for i in range(2):
        assert pictures.encoded(i).startswith(PNG_SIGNATURE)
        assert np.array_equal(decoded(pictures, i), images[i])


def test_a_split_of_32_px_pictures_keeps_none_beside_its_arrays(tmp_path):
    # The 32 px array is the picture itself: Fashion-MNIST or CIFAR read from arrays agree with the bundled set.
    images = np.stack([noise(32, 32, 3, 30), noise(32, 32, 3, 31)])  # (2, 32, 32, 3)
    np.savez(tmp_path / "small.npz", images=images, labels=np.array([0, 1]))
    data = open_source("image", tmp_path / "small.npz", cache=False).splits["all"]
    assert data.pictures is None and np.array_equal(data.images, images.transpose(0, 3, 1, 2))
    root = tmp_path / "mixed"
    write(root / "a" / "small.png", images[0])
    write(root / "a" / "large.png", noise(40, 33, 3, 33))
    assert len(open_source("image", root, cache=False).splits["all"].pictures) == 2  # one larger: all kept


def test_the_captions_of_one_picture_share_its_span(pairs, cache):
    root, files = pairs
    data = open_source("multimodal", root).splits["all"]
    assert isinstance(data, PairData) and len(data) == 6
    spans = np.asarray(data.pictures.spans)
    assert data.image_ids.tolist() == [0, 0, 1, 1, 2, 2]
    assert all((spans[2 * p] == spans[2 * p + 1]).all() for p in range(3))
    assert len(np.unique(spans[:, 0])) == 3 and data.pictures.blob.size == sum(f.stat().st_size for f in files)
    for row in range(6):
        assert data.pictures.encoded(row) == files[row // 2].read_bytes()
    assert data.pictures.open(4).size == (70, 90)


def test_max_picture_side_caps_the_longer_side_keeping_the_aspect_ratio(photos, tmp_path):
    root, files = photos
    config = tmp_path / "data.toml"
    config.write_text("max_picture_side = 100\n")
    data = open_source("image", root, load_options(config), cache=False).splits["all"]
    uncapped = open_source("image", root, cache=False).splits["all"]
    pictures = data.pictures
    assert [pictures.open(i).size for i in range(3)] == [(40, 60), (100, 67), (100, 67)]
    assert pictures.encoded(0) == files[0][0].read_bytes()  # small enough: as it is
    assert pictures.encoded(1).startswith(PNG_SIGNATURE) and pictures.encoded(2).startswith(PNG_SIGNATURE)
    assert np.array_equal(data.images, uncapped.images)  # the 32 px arrays are the originals'
    assert (decoded(pictures, 2)[:, :45] == 255).all()  # transparency composited before downscaling
    with pytest.raises(DataFormatError, match="max_picture_side"):
        DataOptions.from_dict({"max_picture_side": -1})


def test_cap_picture_downscales_a_tall_picture_by_its_height():
    buffer = io.BytesIO()
    Image.fromarray(noise(400, 100, 3, 5)).save(buffer, format="PNG")
    with Image.open(io.BytesIO(cap_picture(buffer.getvalue(), 200))) as img:
        assert img.size == (50, 200)
    assert cap_picture(buffer.getvalue(), 0) == buffer.getvalue()


# --- subsets, joins and files ----------------------------------------------------------------------


def test_subset_concat_and_a_saved_split_keep_each_rows_picture(pairs, tmp_path):
    root, files = pairs
    data = open_source("multimodal", root, cache=False).splits["all"]
    cut = subset(data, np.array([5, 0, 1]))  # pictures 2, 0, 0
    assert [cut.pictures.encoded(i) for i in range(3)] == [files[2].read_bytes(), *[files[0].read_bytes()] * 2]
    assert cut.pictures.blob is data.pictures.blob  # a subset shares the bytes

    joined = concat([cut, data])
    assert len(joined.pictures) == 9
    assert [joined.pictures.encoded(i) for i in range(9)] == (
        [cut.pictures.encoded(i) for i in range(3)] + [data.pictures.encoded(i) for i in range(6)])

    folder = tmp_path / "saved"
    folder.mkdir()
    save_split(folder, "cut", cut)
    loaded = load_split(folder, "cut", PairData)
    assert isinstance(loaded.pictures.blob, np.memmap) and not loaded.pictures.blob.flags.writeable
    assert [loaded.pictures.encoded(i) for i in range(3)] == [cut.pictures.encoded(i) for i in range(3)]
    kept = np.load(split_file(folder, "cut", "picture_bytes"), mmap_mode="r")
    assert kept.shape == (sum(files[i].stat().st_size for i in (0, 2)),)  # the subset's own pictures, once each
    assert pictures_sha256(loaded.pictures) == pictures_sha256(cut.pictures)
    assert data_digest({"all": loaded}) == data_digest({"all": cut})


def test_joining_memory_mapped_splits_copies_no_bytes(pairs, cache):
    root, _ = pairs
    data = open_source("multimodal", root).splits["all"]
    halves = [subset(data, np.arange(0, 2)), subset(data, np.arange(2, 6))]
    joined = concat_pictures([halves[0].pictures, halves[1].pictures])
    assert len(joined.blobs) == 2 and all(b is data.pictures.blob for b in joined.blobs)
    assert [joined.encoded(i) for i in range(6)] == [data.pictures.encoded(i) for i in range(6)]
    assert pictures_sha256(joined) == pictures_sha256(data.pictures)  # where the bytes lie does not count


def test_a_split_without_pictures_stays_without(tmp_path):
    data = ImageClassData(np.zeros((2, 3, 32, 32), np.uint8), np.array([0, 1]), ("a", "b"))
    folder = tmp_path / "saved"
    folder.mkdir()
    save_split(folder, "plain", data)
    assert load_split(folder, "plain", ImageClassData).pictures is None
    assert concat([data, data]).pictures is None and subset(data, np.array([1])).pictures is None


def test_spans_must_cover_every_row_and_lie_inside_the_bytes():
    blob = np.zeros(10, np.uint8)
    with pytest.raises(ValueError, match="different numbers of rows"):
        ImageClassData(np.zeros((2, 3, 32, 32), np.uint8), np.array([0, 1]), ("a", "b"),
                       pictures=Pictures((blob,), np.array([[0, 10]], np.int64)))
    with pytest.raises(ValueError, match="outside"):
        Pictures((blob,), np.array([[0, 11]], np.int64))


# --- the digest and the view training reads --------------------------------------------------------


def test_the_digest_covers_the_pictures_bytes_where_the_32_px_arrays_are_equal(photos):
    root, files = photos
    before = open_source("image", root, cache=False)
    path, pixels = files[0]
    write(path, pixels, compress_level=1)  # the same pixels, other bytes
    after = open_source("image", root, cache=False)
    assert np.array_equal(after.splits["all"].images, before.splits["all"].images)
    assert after.splits["all"].pictures.encoded(0) != before.splits["all"].pictures.encoded(0)
    assert after.digest != before.digest


def test_modal_data_carries_texts_and_pictures_through_select(pairs):
    root, files = pairs
    data = open_source("multimodal", root, cache=False).splits["all"]
    view = as_modal(data)
    assert view.texts == data.captions and view.pictures is data.pictures
    picked = view.select(np.array([4, 1]))
    assert picked.texts == (data.captions[4], data.captions[1])
    assert [picked.pictures.encoded(i) for i in range(2)] == [files[2].read_bytes(), files[0].read_bytes()]
    assert picked.picture_ids().tolist() == [2, 0]


def test_the_bundled_emoji_keep_their_drawings():
    data = load_emoji_pairs("test")
    assert len(data.pictures) == len(data)
    for i in range(5):
        picture = data.pictures.open(i)
        assert max(picture.size) > 32 and np.array_equal(from_pil(picture), data.images[i])
