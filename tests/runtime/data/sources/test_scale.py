"""Sources kept as memory-mapped files: a cached source holds the very rows an in-memory build gives (and the same
digest), as uncompressed .npy files and JSON strings (no pickle, no .npz); editing a picture a source reads, beside
a manifest or in COCO's images folder, builds it again and gives its rows another feature cache; the feature
cache written batch by batch equals the features computed at once; streaming over a mapped file does not keep
its pages. The benchmark (benchmarks/data.py) measures the same at scale."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedafd.runtime.data import features
from fedafd.runtime.data.fashion_mnist import load_fashion_mnist
from fedafd.runtime.data.modal import rows_view
from fedafd.runtime.data.prepared import NpyRows, open_npy, row_blocks
from fedafd.runtime.data.sources import imagefolder
from fedafd.runtime.data.sources.registry import data_digest, open_source, sources_dir
from fedafd.runtime.data.tuxpaint import load_tuxpaint_pairs

ROWS = 48


@pytest.fixture(scope="module")
def fashion() -> tuple[np.ndarray, list[str]]:
    data = load_fashion_mnist("test")
    return data.images[:ROWS], [data.class_names[i].replace("/", "-") for i in data.labels[:ROWS]]


@pytest.fixture(scope="module")
def stamps() -> tuple[np.ndarray, list[str]]:
    data = load_tuxpaint_pairs("test")
    first = np.unique(data.image_ids, return_index=True)[1][:12]
    return data.images[first], [data.captions[r] for r in first]


@pytest.fixture(scope="module")
def real_onnx() -> Path:
    """The bundled cache's exported backbones (read before a test points FEDAFD_CACHE elsewhere)."""
    return features.features_dir() / "onnx"


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """A private cache (after the module's bundled arrays were loaded)."""
    home = tmp_path / "cache"
    monkeypatch.setenv("FEDAFD_CACHE", str(home))
    return home


def write_png(path: Path, image: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(image.transpose(1, 2, 0))).save(path)
    return path


def image_folder(root: Path, images: np.ndarray, labels: list[str]) -> list[Path]:
    return [write_png(root / label / f"{i:03d}.png", image) for i, (image, label) in enumerate(zip(images, labels))]


def assert_same_rows(cached, built) -> None:
    assert cached.digest == built.digest == data_digest(cached.splits)
    assert list(cached.splits) == list(built.splits)
    for split, data in cached.splits.items():
        other = built.splits[split]
        assert type(data) is type(other)
        for name, value in vars(data).items():
            expected = getattr(other, name)
            if isinstance(value, np.ndarray):
                assert isinstance(value, np.memmap) and not value.flags.writeable, name
                assert value.dtype == expected.dtype and value.shape == expected.shape, name
                np.testing.assert_array_equal(value, expected, err_msg=name)
            else:
                assert value == expected, name


def edit(path: Path, image: np.ndarray) -> None:
    """Another picture of the same size in the same file, with a later modification time."""
    before = path.stat()
    write_png(path, 255 - image)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))


# --- the stored rows are the built rows ------------------------------------------------------------


def test_a_cached_image_folder_holds_the_built_rows_as_npy_and_json(tmp_path, fashion, cache, monkeypatch):
    image_folder(tmp_path / "data", *fashion)
    built = open_source("image", tmp_path / "data", cache=False)
    first = open_source("image", tmp_path / "data")
    monkeypatch.setattr(imagefolder, "read", lambda *args: pytest.fail("read again instead of from the cache"))
    second = open_source("image", tmp_path / "data")
    assert_same_rows(first, built)
    assert_same_rows(second, built)
    folders = [p for p in sources_dir().iterdir() if p.is_dir()]
    assert len(folders) == 1  # the temporary build folder was renamed into place
    names = sorted(p.name for p in folders[0].iterdir())
    assert names == ["source.json", "split0.images.npy", "split0.labels.npy", "split0.strings.json"]
    assert np.load(folders[0] / "split0.images.npy", allow_pickle=False).shape == (ROWS, 3, 32, 32)
    strings = json.loads((folders[0] / "split0.strings.json").read_text())
    assert strings["class_names"] == list(built.splits["all"].class_names)


def test_skipped_pictures_shrink_the_stored_arrays(tmp_path, fashion, cache):
    image_folder(tmp_path / "data", *fashion)
    for name in ("broken.png", "zero.png"):
        (tmp_path / "data" / fashion[1][0] / name).write_bytes(b"" if name == "zero.png" else b"\x89PNG nonsense")
    built = open_source("image", tmp_path / "data", on_bad_sample="skip", cache=False)
    cached = open_source("image", tmp_path / "data", on_bad_sample="skip")
    assert cached.skipped == built.skipped == 2 and len(cached.splits["all"]) == ROWS
    assert_same_rows(cached, built)


def test_cached_texts_and_pairs_hold_the_built_rows(tmp_path, stamps, cache):
    images, captions = stamps
    texts = tmp_path / "texts.csv"
    texts.write_text("text,label\n" + "".join(f'"{c}",{"ab"[i % 2]}\n' for i, c in enumerate(captions)))
    pairs = tmp_path / "pairs"
    lines = []
    for i, (image, caption) in enumerate(zip(images, captions)):
        write_png(pairs / f"{i:02d}.png", image)
        lines += [{"file_name": f"{i:02d}.png", "text": caption}] + ([{"file_name": f"{i:02d}.png",
                                                                       "text": f"again {caption}"}] if i % 3 else [])
    (pairs / "metadata.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    for kind, location in (("text", texts), ("multimodal", pairs), ("public", pairs)):
        assert_same_rows(open_source(kind, location), open_source(kind, location, cache=False))
    data = open_source("multimodal", pairs).splits["all"]
    assert len(data) == len(lines) and len(np.unique(data.image_ids)) == len(images)


# --- what invalidates a cached source ----------------------------------------------------------------


def test_editing_a_picture_beside_a_manifest_builds_the_source_again(tmp_path, fashion, cache):
    files = image_folder(tmp_path / "pictures", *fashion)
    manifest = tmp_path / "train.csv"
    manifest.write_text("path,label\n" + "".join(f"{p.relative_to(tmp_path)},{p.parent.name}\n" for p in files))
    before = open_source("image", manifest)
    edit(files[3], fashion[0][3])
    after = open_source("image", manifest)
    assert after.digest != before.digest
    np.testing.assert_array_equal(after.splits["all"].images[3], open_source("image", manifest, cache=False)
                                  .splits["all"].images[3])
    assert len([p for p in sources_dir().iterdir() if p.is_dir()]) == 2


def test_editing_a_picture_in_cocos_images_folder_builds_the_source_again(tmp_path, stamps, cache):
    images, captions = stamps
    files = [write_png(tmp_path / "coco" / "val2017" / f"{i:012d}.png", image) for i, image in enumerate(images)]
    annotations = tmp_path / "coco" / "annotations" / "captions_val2017.json"
    annotations.parent.mkdir(parents=True)
    annotations.write_text(json.dumps({"images": [{"id": i, "file_name": p.name} for i, p in enumerate(files)],
                                       "annotations": [{"image_id": i, "caption": c} for i, c in enumerate(captions)]}))
    before = open_source("multimodal", annotations)
    assert open_source("multimodal", annotations).digest == before.digest  # unchanged: read from the cache
    edit(files[0], images[0])
    assert open_source("multimodal", annotations).digest != before.digest


def test_an_edited_picture_gets_its_own_feature_cache(tmp_path, fashion, cache, real_onnx, monkeypatch):
    home = cache / "features"
    home.mkdir(parents=True)
    (home / "onnx").symlink_to(real_onnx, target_is_directory=True)  # reuse the bundled export (seconds)
    monkeypatch.setattr(features, "features_dir", lambda: home)
    computed: list[str] = []
    real_extract = features._extract
    monkeypatch.setattr(features, "_extract", lambda spec, dataset, *args: computed.append(dataset)
                        or real_extract(spec, dataset, *args))
    files = image_folder(tmp_path / "data", fashion[0][:12], fashion[1][:12])

    def view():
        source = open_source("image", tmp_path / "data")
        return rows_view(source.splits["all"], "train", ("efficientnet_lite0",))

    first = view().features["efficientnet_lite0"]
    again = view().features["efficientnet_lite0"]
    edit(files[5], fashion[0][5])
    edited = view().features["efficientnet_lite0"]
    assert len(computed) == 2 and computed[0] != computed[1]  # the unchanged rows were read from the cache
    np.testing.assert_array_equal(again, first)
    row = sorted(range(12), key=lambda i: (fashion[1][i], i)).index(5)  # the reader's order: class, then file
    assert not np.allclose(edited[row], first[row])
    np.testing.assert_allclose(np.delete(edited, row, 0), np.delete(first, row, 0), atol=1e-5)


# --- the feature cache, written batch by batch -----------------------------------------------------


def test_features_written_batch_by_batch_equal_those_computed_at_once(tmp_path, fashion, cache, real_onnx,
                                                                      monkeypatch):
    home = cache / "features"
    home.mkdir(parents=True)
    (home / "onnx").symlink_to(real_onnx, target_is_directory=True)
    monkeypatch.setattr(features, "features_dir", lambda: home)
    monkeypatch.setitem(features.BATCH_ROWS, "image", 10)  # 48 rows: four batches and a short one
    image_folder(tmp_path / "data", *fashion)
    source = open_source("image", tmp_path / "data")
    data = rows_view(source.splits["all"], "all", ())
    cached = features.backbone_features("efficientnet_lite0", "scale-test", data, progress=False)
    session = features.backbone_session("efficientnet_lite0")
    at_once = features._run_session(session, data.batch("image", slice(None), features.torch.device("cpu")))
    assert isinstance(cached, np.memmap) and cached.shape == (ROWS, 1280)
    np.testing.assert_allclose(cached, at_once, atol=1e-5)
    path = features.feature_cache_path("efficientnet_lite0", "scale-test")
    record = json.loads(path.with_suffix(".json").read_text())
    assert record["npy_sha256"] == features.file_sha256(path) and record["rows"] == ROWS
    np.testing.assert_array_equal(np.load(path, allow_pickle=False), cached)
    assert [p.name for p in home.iterdir() if p.name.endswith(".tmp")] == []


# --- streaming keeps memory flat -----------------------------------------------------------------


def _rss_file_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1])
    pytest.skip("no RssFile in /proc/self/status")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="Linux /proc")
def test_streaming_over_a_mapped_file_releases_its_pages(tmp_path):
    rows = NpyRows(tmp_path / "big.npy", np.uint8, (3, 32, 32), 16_384)  # 48 MiB
    block = np.arange(1024 * 3 * 32 * 32, dtype=np.uint8).reshape(1024, 3, 32, 32)
    for _ in range(16):
        rows.extend(block)
    array = rows.close()
    start = _rss_file_kb()
    total = sum(int(b[:, 0, 0, 0].sum()) for b in row_blocks(array, 4 << 20))
    assert total == 16 * int(block[:, 0, 0, 0].sum())
    assert _rss_file_kb() - start < 16 << 10  # under 16 MiB of the 48 MiB stay mapped
    np.testing.assert_array_equal(open_npy(tmp_path / "big.npy")[-1024:], block)
