"""Tables (CSV, TSV, JSON lines) as sources, through open_source: the same rows in each format give the same
arrays and digest; AG News' headerless CSV; each kind of bad row named by file and row, and skipped exactly.
Fixtures are written into tmp_path from a few dozen rows of the bundled data."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedafd.runtime.data.fashion_mnist import load_fashion_mnist
from fedafd.runtime.data.sources import tables
from fedafd.runtime.data.sources.options import DataOptions, load_options
from fedafd.runtime.data.sources.records import DataFormatError
from fedafd.runtime.data.sources.registry import open_source
from fedafd.runtime.data.wordnet import load_wordnet_topics


@pytest.fixture(scope="module")
def texts() -> list[tuple[str, str]]:
    """(class name, text) rows: WordNet glosses, and one with a quote, a comma and a newline inside."""
    data = load_wordnet_topics("test")
    rows = [(data.class_names[data.labels[i]], data.texts[i]) for i in range(0, 600, 25)]
    return rows + [("food", 'a "quoted" text, with a comma\nand a second line')]


@pytest.fixture(scope="module")
def fashion() -> tuple[np.ndarray, list[str]]:
    """12 Fashion-MNIST pictures (uint8 (N, 3, 32, 32)) and their class names ('/' replaced, for file names)."""
    data = load_fashion_mnist("test")
    return data.images[:12], [data.class_names[i].replace("/", "-") for i in data.labels[:12]]


def write_csv(path: Path, rows: list, delimiter: str = ",") -> Path:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        csv.writer(handle, delimiter=delimiter).writerows(rows)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def write_png(path: Path, image: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image.transpose(1, 2, 0)).save(path)  # (3, H, W) -> (H, W, 3)
    return path


def text_table(tmp_path: Path, rows: list[tuple[str, str]], name: str = "texts.csv") -> Path:
    return write_csv(tmp_path / name, [("label", "text"), *rows])


def image_manifest(tmp_path: Path, fashion, name: str = "manifest.csv") -> Path:
    images, labels = fashion
    paths = [f"pictures/{i:02d}.png" for i in range(len(images))]
    for path, image in zip(paths, images):
        write_png(tmp_path / path, image)
    return write_csv(tmp_path / name, [("path", "label"), *zip(paths, labels)])


# --- the same rows in three formats -------------------------------------------------------------


def test_text_rows_as_csv_tsv_and_jsonl_give_equal_arrays_and_digest(tmp_path, texts):
    csv_path = text_table(tmp_path, texts)
    tsv_path = write_csv(tmp_path / "texts.tsv", [("label", "text"), *texts], delimiter="\t")
    jsonl_path = write_jsonl(tmp_path / "texts.jsonl", [{"text": t, "label": c} for c, t in texts])
    sources = [open_source("text", p, cache=False) for p in (csv_path, tsv_path, jsonl_path)]

    data = sources[0].splits["all"]
    assert data.texts == tuple(t for _, t in texts)
    assert data.class_names == tuple(sorted({c for c, _ in texts}))
    assert data.labels.tolist() == [data.class_names.index(c) for c, _ in texts]
    for other in sources[1:]:
        assert other.digest == sources[0].digest and other.skipped == 0
        same = other.splits["all"]
        assert same.texts == data.texts and same.class_names == data.class_names
        assert np.array_equal(same.input_ids, data.input_ids) and np.array_equal(same.labels, data.labels)


def test_a_folder_of_tables_has_a_split_per_file(tmp_path, texts):
    folder = tmp_path / "texts"
    folder.mkdir()
    text_table(folder, texts[:15], "train.csv")
    text_table(folder, texts[15:], "test.csv")
    (folder / "notes.txt").write_text("not a table")
    source = open_source("text", folder, DataOptions(format="csv"), cache=False)
    assert set(source.splits) == {"train", "test"}
    assert source.splits["train"].texts == tuple(t for _, t in texts[:15])
    assert source.splits["test"].class_names == source.splits["train"].class_names  # one class list


def test_natural_ids_come_from_their_column(tmp_path, texts):
    path = write_csv(tmp_path / "t.csv", [("label", "text", "writer"), *[(c, t, f"w{i % 3}")
                                                                        for i, (c, t) in enumerate(texts)]])
    data = open_source("text", path, DataOptions(natural_id_column="writer"), cache=False).splits["all"]
    assert data.natural_ids == tuple(f"w{i % 3}" for i in range(len(texts)))


def test_a_second_open_reads_the_cache(tmp_path, texts, monkeypatch):
    path = text_table(tmp_path, texts)
    uncached = open_source("text", path, cache=False)
    monkeypatch.setenv("FEDAFD_CACHE", str(tmp_path / "cache"))
    first = open_source("text", path)
    monkeypatch.setattr(tables, "read", lambda *args: pytest.fail("read again instead of from the cache"))
    second = open_source("text", path)
    assert len([p for p in (tmp_path / "cache" / "prepared" / "sources").iterdir() if p.is_dir()]) == 1
    assert first.digest == second.digest == uncached.digest
    assert second.splits["all"].texts == uncached.splits["all"].texts


# --- AG News -------------------------------------------------------------------------------------

AG_NEWS = [  # AG News' train.csv: no header, every field quoted, classes 1-4, newlines written as a literal \n
    ("3", "Wall St. Bears Claw Back Into the Black (Reuters)", "Reuters - Short-sellers, Wall Street's dwindling"
                                                                "\\nband of ultra-cynics, are seeing green again."),
    ("2", "Phelps Wins Again", 'Michael Phelps won his "sixth" gold medal.'),
    ("1", "Talks in Geneva", "Delegates met,\nagain, on Tuesday."),  # a real newline inside a quoted field
    ("4", "New Chip Unveiled", "A faster chip\\nfor laptops."),
    ("1", "Elections Held", "Voters went to the polls."),
    ("4", "Space Probe Launched", "The probe left on Monday."),
]
AG_CONFIG = """columns = ["class", "title", "description"]
header = false
label_column = "class"
text_columns = ["title", "description"]
{offset}class_names = ["World", "Sports", "Business", "Sci/Tech"]
unescape = true
"""


def write_ag_news(folder: Path) -> Path:
    folder.mkdir()
    with open(folder / "train.csv", "w", newline="", encoding="utf-8") as handle:
        csv.writer(handle, quoting=csv.QUOTE_ALL).writerows(AG_NEWS)
    return folder / "train.csv"


def test_ag_news_headerless_csv_with_its_data_config(tmp_path):
    path = write_ag_news(tmp_path / "ag_news")
    config = tmp_path / "ag_news.toml"
    config.write_text(AG_CONFIG.format(offset="label_offset = 1\n"))
    data = open_source("text", path, load_options(config), cache=False).splits["all"]
    assert data.class_names == ("World", "Sports", "Business", "Sci/Tech")
    assert data.labels.tolist() == [2, 1, 0, 3, 0, 3]
    assert data.texts[0] == ("Wall St. Bears Claw Back Into the Black (Reuters) Reuters - Short-sellers, Wall "
                             "Street's dwindling\nband of ultra-cynics, are seeing green again.")
    assert data.texts[1] == 'Phelps Wins Again Michael Phelps won his "sixth" gold medal.'
    assert data.texts[2] == "Talks in Geneva Delegates met,\nagain, on Tuesday."
    assert data.texts[3] == "New Chip Unveiled A faster chip\nfor laptops."


def test_one_based_labels_without_label_offset_name_the_row_and_the_setting(tmp_path):
    path = write_ag_news(tmp_path / "ag_news")
    config = tmp_path / "ag_news.toml"
    config.write_text(AG_CONFIG.format(offset=""))
    with pytest.raises(DataFormatError) as err:
        open_source("text", path, load_options(config), cache=False)
    # The first class-4 row is the fourth record, which starts on line 5 (the third one spans lines 3-4).
    assert f"{path}, row 5" in str(err.value)
    assert "label 4 is outside [0, 4)" in str(err.value) and "label_offset = 1" in str(err.value)


def test_a_header_without_the_configured_column_is_fatal_even_with_skip(tmp_path, texts):
    path = write_csv(tmp_path / "t.csv", [("label", "body"), *texts])
    with pytest.raises(DataFormatError, match=r"t\.csv: no column 'text' in the header.*text_columns"):
        open_source("text", path, on_bad_sample="skip", cache=False)
    with pytest.raises(DataFormatError, match="header = false needs columns"):
        open_source("text", path, DataOptions(header=False), cache=False)


# --- pairs ----------------------------------------------------------------------------------------


def test_pairs_keep_every_caption_of_a_picture(tmp_path, fashion):
    images, _ = fashion
    for i in range(3):
        write_png(tmp_path / f"p{i}.png", images[i])
    rows = [("p0.png", "a shoe", "wear"), ("p1.png", "a bag", "carry"), ("p0.png", "a boot", "wear"),
            ("./p0.png", "footwear", "wear"), ("p2.png", "a shirt", "wear")]
    path = write_csv(tmp_path / "pairs.csv", [("file_name", "caption", "kind"), *rows])
    data = open_source("multimodal", path, DataOptions(caption_column="caption", group_column="kind"),
                       cache=False).splits["all"]
    assert data.captions == ("a shoe", "a boot", "footwear", "a bag", "a shirt")  # picture by picture
    assert data.image_ids.tolist() == [0, 0, 0, 1, 2]
    assert data.group_names == ("carry", "wear") and data.groups.tolist() == [1, 1, 1, 0, 1]
    assert np.array_equal(data.images[:3], np.stack([images[0]] * 3)) and np.array_equal(data.images[3], images[1])


# --- bad rows --------------------------------------------------------------------------------------
# Each case writes a table with bad rows and returns (path, kind, options, [fragments of the first error],
# the rows expected with skip, the number of bad rows).


def wrong_column_count(tmp_path, texts, fashion):
    path = text_table(tmp_path, texts[:5])
    lines = path.read_text().splitlines(keepends=True)
    lines[3] = lines[3].rstrip("\r\n") + ",extra\r\n"  # the third record, on line 4
    path.write_text("".join(lines))
    return path, "text", DataOptions(), ["texts.csv, row 4", "3 fields", "2 columns"], \
        [t for i, (_, t) in enumerate(texts[:5]) if i != 2], 1


def invalid_json_line(tmp_path, texts, fashion):
    rows = [json.dumps({"text": t, "label": c}) for c, t in texts[:5]]
    rows[2] = rows[2][:-5]  # cut off: no closing brace
    rows.insert(4, json.dumps(["a list", "not an object"]))
    rows.insert(5, json.dumps({"text": "no label here"}))
    path = tmp_path / "texts.jsonl"
    path.write_text("\n".join(rows) + "\n")
    return path, "text", DataOptions(), ["texts.jsonl, row 3", "not valid JSON"], \
        [t for i, (_, t) in enumerate(texts[:5]) if i != 2], 3


def empty_text(tmp_path, texts, fashion):
    rows = list(texts[:5])
    rows[1] = (rows[1][0], "   ")
    return text_table(tmp_path, rows), "text", DataOptions(), ["texts.csv, row 3", "empty text"], \
        [t for i, (_, t) in enumerate(texts[:5]) if i != 1], 1


def missing_label(tmp_path, texts, fashion):
    rows = list(texts[:5])
    rows[3] = ("", rows[3][1])
    return text_table(tmp_path, rows), "text", DataOptions(), ["texts.csv, row 5", "missing label"], \
        [t for i, (_, t) in enumerate(texts[:5]) if i != 3], 1


def missing_image_file(tmp_path, texts, fashion):
    path = image_manifest(tmp_path, fashion)
    (tmp_path / "pictures" / "03.png").unlink()
    return path, "image", DataOptions(), ["manifest.csv, row 5", "image file not found", "03.png"], \
        np.delete(fashion[0], 3, axis=0), 1


def zero_byte_image(tmp_path, texts, fashion):
    path = image_manifest(tmp_path, fashion)
    (tmp_path / "pictures" / "05.png").write_bytes(b"")
    return path, "image", DataOptions(), ["manifest.csv, row 7", "zero-byte file", "05.png"], \
        np.delete(fashion[0], 5, axis=0), 1


def truncated_png(tmp_path, texts, fashion):
    path = image_manifest(tmp_path, fashion, "manifest.jsonl")
    picture = tmp_path / "pictures" / "00.png"
    picture.write_bytes(picture.read_bytes()[: picture.stat().st_size // 2])
    rows = [{"path": f"pictures/{i:02d}.png", "label": label} for i, label in enumerate(fashion[1])]
    write_jsonl(path, rows)
    return path, "image", DataOptions(), ["manifest.jsonl, row 1", "truncated"], fashion[0][1:], 1


BAD_CASES = [wrong_column_count, invalid_json_line, empty_text, missing_label, missing_image_file, zero_byte_image,
             truncated_png]


@pytest.mark.parametrize("case", BAD_CASES, ids=lambda case: case.__name__)
def test_a_bad_row_is_named_by_file_and_row(tmp_path, texts, fashion, case):
    path, kind, options, fragments, _, _ = case(tmp_path, texts, fashion)
    with pytest.raises(DataFormatError) as err:
        open_source(kind, path, options, cache=False)
    for fragment in fragments:
        assert fragment in str(err.value)


@pytest.mark.parametrize("case", BAD_CASES, ids=lambda case: case.__name__)
def test_skip_leaves_out_exactly_the_bad_rows(tmp_path, texts, fashion, case):
    path, kind, options, _, kept, bad = case(tmp_path, texts, fashion)
    source = open_source(kind, path, options, on_bad_sample="skip", cache=False)
    assert source.skipped == bad and len(source.problems) == bad
    data = source.splits["all"]
    if kind == "text":
        assert data.texts == tuple(kept)
    else:
        assert np.array_equal(data.images, kept)


def test_a_conflicting_group_for_one_picture_is_a_bad_row(tmp_path, fashion):
    write_png(tmp_path / "p.png", fashion[0][0])
    path = write_csv(tmp_path / "pairs.csv", [("path", "text", "kind"), ("p.png", "a shoe", "wear"),
                                              ("p.png", "a boot", "carry")])
    with pytest.raises(DataFormatError, match=r"pairs\.csv, row 3: picture p\.png is in group 'wear'"):
        open_source("multimodal", path, DataOptions(group_column="kind"), cache=False)
