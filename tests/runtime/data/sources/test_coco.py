"""The COCO captions and Karpathy split readers (runtime/data/sources/coco.py), through the registry's
open_source on fixtures written from the bundled Tux Paint pairs: 20 PNG pictures with 1-5 captions each, laid
out as COCO (`annotations/captions_val2017.json`, `val2017/*.png`) and as Karpathy's `dataset_coco.json`."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedafd.runtime.data.prepared import concat
from fedafd.runtime.data.sources import registry
from fedafd.runtime.data.sources.options import DataOptions
from fedafd.runtime.data.sources.records import DataFormatError
from fedafd.runtime.data.tuxpaint import load_tuxpaint_pairs

N_PICTURES = 20
SPLIT_CYCLE = ("train", "restval", "val", "test")
SPLIT_ORDER = ("train", "restval", "val", "test")
"""The order Karpathy's splits are concatenated in to compare with one COCO file of the same pictures."""


@dataclasses.dataclass
class Picture:
    image_id: int
    file_name: str
    pixels: np.ndarray
    """uint8 (3, 32, 32), as written to the PNG."""
    captions: list[str]
    split: str


@pytest.fixture(scope="module")
def pictures() -> list[Picture]:
    """20 Tux Paint pictures; picture i has 1 + i % 5 captions: its own, then other pairs' captions."""
    pairs = load_tuxpaint_pairs("train")
    out = []
    for i in range(N_PICTURES):
        captions = [pairs.captions[i]] + [pairs.captions[N_PICTURES + 7 * i + k] for k in range(i % 5)]
        out.append(Picture(1000 + 3 * i, f"{i:012d}.png", pairs.images[i], captions, SPLIT_CYCLE[i % 4]))
    return out


def write_pictures(folder: Path, pictures: list[Picture]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for picture in pictures:
        Image.fromarray(picture.pixels.transpose(1, 2, 0)).save(folder / picture.file_name)  # (3, H, W) -> (H, W, 3)


def coco_json(pictures: list[Picture]) -> dict:
    """COCO captions; annotations interleaved across pictures (as in the real file), each picture's in order."""
    annotations, ann_id = [], 1
    for k in range(5):
        for picture in pictures:
            if k < len(picture.captions):
                annotations.append({"image_id": picture.image_id, "id": ann_id, "caption": picture.captions[k]})
                ann_id += 1
    return {"info": {"description": "fixture"}, "licenses": [],
            "images": [{"license": 1, "file_name": p.file_name, "height": 32, "width": 32, "id": p.image_id}
                       for p in pictures],
            "annotations": annotations}


def karpathy_json(pictures: list[Picture], split: str | None = None) -> dict:
    """Karpathy's layout; raws carry the stray spaces and newlines real files have."""
    images, sent_id = [], 0
    for imgid, picture in enumerate(pictures):
        sentences = []
        for caption in picture.captions:
            sentences.append({"tokens": caption.lower().rstrip(".").split(), "raw": f" {caption} \n",
                              "imgid": imgid, "sentid": sent_id})
            sent_id += 1
        images.append({"filepath": "val2017", "sentids": [s["sentid"] for s in sentences],
                       "filename": picture.file_name, "imgid": imgid, "split": split or picture.split,
                       "sentences": sentences, "cocoid": picture.image_id})
    return {"images": images, "dataset": "coco"}


def write_json(path: Path, document: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document))
    return path


@pytest.fixture()
def layout(tmp_path: Path, pictures: list[Picture]) -> Path:
    """tmp/coco/{annotations/captions_val2017.json, val2017/*.png, dataset_coco.json (all in train)}."""
    root = tmp_path / "coco"
    write_pictures(root / "val2017", pictures)
    write_json(root / "annotations" / "captions_val2017.json", coco_json(pictures))
    write_json(root / "dataset_coco.json", karpathy_json(pictures, split="train"))
    return root


def open_pairs(path: Path, on_bad_sample: str = "error", **options) -> registry.Source:
    return registry.open_source("multimodal", path, DataOptions(**options), on_bad_sample=on_bad_sample, cache=False)


def assert_same_rows(a, b) -> None:
    for name in ("images", "input_ids", "attention_mask", "groups", "image_ids"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    assert a.captions == b.captions
    assert a.group_names == b.group_names


def by_split(pictures: list[Picture]) -> list[Picture]:
    return [p for split in SPLIT_ORDER for p in pictures if p.split == split]


def captions_of(pictures: list[Picture]) -> tuple[str, ...]:
    return tuple(c for p in pictures for c in p.captions)


# --- the same pictures through both formats ----------------------------------------------------


def test_coco_and_karpathy_give_the_same_arrays_and_digest(layout: Path, pictures: list[Picture]) -> None:
    coco = open_pairs(layout / "annotations" / "captions_val2017.json")
    karpathy = open_pairs(layout / "dataset_coco.json")
    assert (coco.format, karpathy.format) == ("coco", "karpathy")  # told from the JSON by the registry
    assert set(coco.splits) == {"all"} and set(karpathy.splits) == {"train"}
    assert_same_rows(coco.splits["all"], karpathy.splits["train"])
    # The digest names the split, so it is compared over one named split: Karpathy's only split taken as "all".
    karpathy_all = open_pairs(layout / "dataset_coco.json", split="train")
    assert set(karpathy_all.splits) == {"all"}
    assert karpathy_all.digest == coco.digest
    assert karpathy.digest != coco.digest  # the same rows under another split name
    # The rows are the fixture's: lossless pictures, every caption in file order, none skipped.
    data = coco.splits["all"]
    assert data.captions == captions_of(pictures)
    np.testing.assert_array_equal(data.images, np.stack([p.pixels for p in pictures for _ in p.captions]))
    assert coco.skipped == karpathy.skipped == 0


def test_mixed_splits_concatenated_equal_one_coco_file(tmp_path: Path, pictures: list[Picture]) -> None:
    root = tmp_path / "coco"
    write_pictures(root / "val2017", pictures)
    karpathy = open_pairs(write_json(root / "dataset_coco.json", karpathy_json(pictures)))
    coco = open_pairs(write_json(root / "annotations" / "captions_val2017.json", coco_json(by_split(pictures))))
    assert set(karpathy.splits) == set(SPLIT_ORDER)
    every_split = concat([karpathy.splits[s] for s in SPLIT_ORDER])
    assert_same_rows(every_split, coco.splits["all"])
    assert registry.data_digest({"all": every_split}) == coco.digest
    for split in SPLIT_ORDER:
        assert karpathy.splits[split].captions == captions_of([p for p in pictures if p.split == split])


def test_every_caption_of_a_picture_is_a_row_with_its_image_id(layout: Path, pictures: list[Picture]) -> None:
    data = open_pairs(layout / "annotations" / "captions_val2017.json").splits["all"]
    counts = [len(p.captions) for p in pictures]
    assert sorted(set(counts)) == [1, 2, 3, 4, 5]
    assert len(data) == sum(counts)
    expected_ids = np.repeat(np.arange(N_PICTURES), counts)
    np.testing.assert_array_equal(data.image_ids, expected_ids)
    for picture_id in range(N_PICTURES):
        rows = np.flatnonzero(data.image_ids == picture_id)
        assert (data.images[rows] == data.images[rows[0]]).all()
        assert [data.captions[r] for r in rows] == pictures[picture_id].captions


# --- Karpathy's splits -------------------------------------------------------------------------


def test_karpathy_train_restval_train_and_test_tests(tmp_path: Path, pictures: list[Picture]) -> None:
    root = tmp_path / "flickr"
    write_pictures(root / "val2017", pictures)
    source = open_pairs(write_json(root / "dataset_coco.json", karpathy_json(pictures)))
    train, test = registry.train_test(source, DataOptions())
    in_split = {s: [p for p in pictures if p.split == s] for s in SPLIT_ORDER}
    assert train.captions == captions_of(in_split["train"] + in_split["restval"])
    assert test.captions == captions_of(in_split["test"])
    np.testing.assert_array_equal(test.images, np.stack([p.pixels for p in in_split["test"] for _ in p.captions]))
    assert len(np.unique(train.image_ids)) == len(in_split["train"]) + len(in_split["restval"])
    assert len(source.splits["val"]) == len(captions_of(in_split["val"])) > 0  # val is read, but neither side


def test_split_option_keeps_only_that_split(tmp_path: Path, pictures: list[Picture]) -> None:
    root = tmp_path / "flickr"
    write_pictures(root / "val2017", pictures)
    path = write_json(root / "dataset_coco.json", karpathy_json(pictures))
    source = open_pairs(path, split="test")
    assert set(source.splits) == {"all"}
    assert source.splits["all"].captions == captions_of([p for p in pictures if p.split == "test"])
    with pytest.raises(DataFormatError, match="no split 'dev'"):
        open_pairs(path, split="dev")


def test_flickr_layout_without_filepath_and_explicit_image_root(tmp_path: Path, pictures: list[Picture]) -> None:
    images = tmp_path / "flickr30k-images"
    write_pictures(images, pictures)
    document = karpathy_json(pictures, split="test")
    for entry in document["images"]:
        del entry["filepath"], entry["cocoid"]
    document["dataset"] = "flickr30k"
    source = open_pairs(write_json(tmp_path / "dataset_flickr30k.json", document), image_root=str(images))
    assert source.splits["test"].captions == captions_of(pictures)


def test_coco_json_beside_its_pictures(tmp_path: Path, pictures: list[Picture]) -> None:
    write_pictures(tmp_path / "mine", pictures)
    source = open_pairs(write_json(tmp_path / "mine" / "captions.json", coco_json(pictures)))
    assert source.splits["all"].captions == captions_of(pictures)


# --- bad files and rows ------------------------------------------------------------------------

BROKEN_ROW = 4
"""The 1-based images row each broken fixture breaks (picture index 3: four captions)."""


def _coco_no_captions(doc: dict, root: Path, pictures: list[Picture]) -> tuple[int, int]:
    dropped = pictures[BROKEN_ROW - 1].image_id
    doc["annotations"] = [a for a in doc["annotations"] if a["image_id"] != dropped]
    return BROKEN_ROW, len(pictures[BROKEN_ROW - 1].captions)


def _coco_unknown_id(doc: dict, root: Path, pictures: list[Picture]) -> tuple[int, int]:
    doc["annotations"].insert(6, {"image_id": 99999, "id": 99999, "caption": "A stray caption."})
    return 7, 0


def _coco_missing_file(doc: dict, root: Path, pictures: list[Picture]) -> tuple[int, int]:
    (root / "val2017" / pictures[BROKEN_ROW - 1].file_name).unlink()
    return BROKEN_ROW, len(pictures[BROKEN_ROW - 1].captions)


def _coco_empty_caption(doc: dict, root: Path, pictures: list[Picture]) -> tuple[int, int]:
    row = next(i for i, a in enumerate(doc["annotations"], start=1) if a["image_id"] == pictures[3].image_id)
    doc["annotations"][row - 1]["caption"] = "  "
    return row, 1


COCO_BROKEN = {
    "image without captions": (_coco_no_captions, "image without captions"),
    "unknown image id": (_coco_unknown_id, "99999"),
    "missing picture": (_coco_missing_file, "000000000003.png"),
    "empty caption": (_coco_empty_caption, "empty caption"),
}


@pytest.mark.parametrize("case", list(COCO_BROKEN))
def test_coco_bad_rows_name_file_and_row_or_are_skipped(case: str, layout: Path, pictures: list[Picture]) -> None:
    path = layout / "annotations" / "captions_val2017.json"
    document = coco_json(pictures)
    breaks, says = COCO_BROKEN[case]
    row, rows_lost = breaks(document, layout, pictures)
    write_json(path, document)
    with pytest.raises(DataFormatError) as raised:
        open_pairs(path)
    message = str(raised.value)
    assert "captions_val2017.json" in message and f"row {row}:" in message and says in message
    skipped = open_pairs(path, on_bad_sample="skip")
    assert skipped.skipped == 1 and len(skipped.problems) == 1 and f"row {row}:" in skipped.problems[0]
    assert len(skipped.splits["all"]) == sum(len(p.captions) for p in pictures) - rows_lost
    clean = list(captions_of(pictures))
    if case == "empty caption":
        clean.remove(pictures[3].captions[0])
    elif rows_lost:
        clean = list(captions_of([p for i, p in enumerate(pictures) if i != BROKEN_ROW - 1]))
    assert skipped.splits["all"].captions == tuple(clean)


def _karpathy_no_sentences(doc: dict, root: Path, pictures: list[Picture]) -> int:
    doc["images"][BROKEN_ROW - 1]["sentences"] = []
    return len(pictures[BROKEN_ROW - 1].captions)


def _karpathy_missing_file(doc: dict, root: Path, pictures: list[Picture]) -> int:
    (root / "val2017" / pictures[BROKEN_ROW - 1].file_name).unlink()
    return len(pictures[BROKEN_ROW - 1].captions)


def _karpathy_empty_raw(doc: dict, root: Path, pictures: list[Picture]) -> int:
    doc["images"][BROKEN_ROW - 1]["sentences"][2]["raw"] = " \n"
    return 1


KARPATHY_BROKEN = {
    "image without sentences": (_karpathy_no_sentences, "image without sentences"),
    "missing picture": (_karpathy_missing_file, "val2017/000000000003.png"),
    "empty raw": (_karpathy_empty_raw, "sentence 3"),
}


@pytest.mark.parametrize("case", list(KARPATHY_BROKEN))
def test_karpathy_bad_rows_name_file_and_row_or_are_skipped(case: str, layout: Path,
                                                            pictures: list[Picture]) -> None:
    path = layout / "dataset_coco.json"
    document = karpathy_json(pictures, split="train")
    breaks, says = KARPATHY_BROKEN[case]
    rows_lost = breaks(document, layout, pictures)
    write_json(path, document)
    with pytest.raises(DataFormatError) as raised:
        open_pairs(path)
    message = str(raised.value)
    assert "dataset_coco.json" in message and f"row {BROKEN_ROW}:" in message and says in message
    skipped = open_pairs(path, on_bad_sample="skip")
    assert skipped.skipped == 1
    kept = skipped.splits["train"]
    assert len(kept) == sum(len(p.captions) for p in pictures) - rows_lost
    broken = pictures[BROKEN_ROW - 1]
    if case == "empty raw":
        expected = [c for p in pictures for i, c in enumerate(p.captions) if not (p is broken and i == 2)]
    else:
        expected = list(captions_of([p for p in pictures if p is not broken]))
    assert kept.captions == tuple(expected)


@pytest.mark.parametrize("missing", ["images", "annotations"])
def test_coco_without_a_top_level_key_is_fatal_even_with_skip(tmp_path: Path, pictures: list[Picture],
                                                             missing: str) -> None:
    document = coco_json(pictures)
    del document[missing]
    path = write_json(tmp_path / "captions_val2017.json", document)
    with pytest.raises(DataFormatError, match=f"captions_val2017.json: no top-level '{missing}'"):
        open_pairs(path, on_bad_sample="skip", format="coco")


def test_karpathy_without_images_and_broken_json_are_fatal(tmp_path: Path) -> None:
    path = write_json(tmp_path / "dataset_flickr30k.json", {"dataset": "flickr30k"})
    with pytest.raises(DataFormatError, match="no top-level 'images'"):
        open_pairs(path, on_bad_sample="skip", format="karpathy")
    path.write_text('{"images": [')
    with pytest.raises(DataFormatError, match="not valid JSON"):
        open_pairs(path, on_bad_sample="skip", format="karpathy")


def test_group_and_natural_id_columns_read_image_entries(layout: Path, pictures: list[Picture]) -> None:
    path = layout / "annotations" / "captions_val2017.json"
    document = coco_json(pictures)
    for entry, picture in zip(document["images"], pictures):
        entry["site"], entry["user"] = picture.split, f"u{picture.image_id % 2}"
    del document["images"][BROKEN_ROW - 1]["site"]
    write_json(path, document)
    with pytest.raises(DataFormatError, match=f"row {BROKEN_ROW}: the image entry has no 'site'"):
        open_pairs(path, group_column="site", natural_id_column="user")
    source = open_pairs(path, on_bad_sample="skip", group_column="site", natural_id_column="user")
    data = source.splits["all"]
    kept = [p for i, p in enumerate(pictures) if i != BROKEN_ROW - 1]
    assert source.skipped == 1 and data.group_names == tuple(sorted(SPLIT_CYCLE))
    assert [data.group_names[g] for g in data.groups] == [p.split for p in kept for _ in p.captions]
    assert data.natural_ids == tuple(f"u{p.image_id % 2}" for p in kept for _ in p.captions)


def test_read_never_opens_pictures_and_build_reports_a_broken_one(layout: Path, pictures: list[Picture]) -> None:
    from fedafd.runtime.data.sources import coco
    from fedafd.runtime.data.sources.records import Problems

    (layout / "val2017" / pictures[BROKEN_ROW - 1].file_name).write_bytes(b"not a png")
    path = layout / "annotations" / "captions_val2017.json"
    records = coco.read(path, "multimodal", DataOptions(format="coco"), Problems())["all"]
    assert [r.image_key for r in records] == [str(p.image_id) for p in pictures]
    assert [list(r.captions) for r in records] == [p.captions for p in pictures]
    with pytest.raises(DataFormatError, match=f"row {BROKEN_ROW}: unreadable or truncated image"):
        open_pairs(path)
