"""The backbone feature cache: ONNX Runtime features equal the PyTorch backbone's, are cached, and a
damaged or stale cache is rebuilt. Small slices of real data only; the ONNX exports are shared by the
module (each takes seconds), every test gets its own empty feature folder."""

import json
import logging
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from fedafd.runtime.backbones import BACKBONES, backbone_digest, build_backbone
from fedafd.runtime.data import features, modal
from fedafd.runtime.data.features import backbone_features, feature_cache_path, onnx_path
from fedafd.runtime.data.modal import load_public_data, load_task_data

CPU = torch.device("cpu")
ROWS = 12


@pytest.fixture(scope="module")
def shared_onnx(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("onnx")


@pytest.fixture
def feature_home(tmp_path, monkeypatch, shared_onnx) -> Path:
    """An empty feature folder whose onnx/ is the module's shared one."""
    home = tmp_path / "features"
    home.mkdir()
    (home / "onnx").symlink_to(shared_onnx, target_is_directory=True)
    monkeypatch.setattr(features, "features_dir", lambda: home)
    return home


@pytest.fixture(scope="module")
def torch_backbones():
    return {name: build_backbone(name) for name in BACKBONES}


@pytest.fixture(scope="module")
def public_rows():
    """12 real emoji pairs (both modalities): rows 0, 37, 74, ... of the public set."""
    data = load_public_data("train")
    return data.select(np.arange(0, 37 * ROWS, 37))


@pytest.fixture(scope="module")
def text_rows():
    """Real WordNet glosses: some fill all 32 tokens (no padding), some are padded."""
    data = load_task_data("text", "test")
    lengths = data.inputs["text"][1].sum(axis=1)
    rows = np.concatenate([np.flatnonzero(lengths == lengths.max())[:4], np.flatnonzero(lengths < 12)[:ROWS - 4]])
    return data.select(rows)


def _torch_features(module, data, modality) -> np.ndarray:
    with torch.no_grad():
        return module(*data.batch(modality, slice(None), CPU)).numpy()


def _forbid_extraction(monkeypatch) -> None:
    def fail(*args, **kwargs):
        raise AssertionError("features were computed again instead of read from the cache")

    monkeypatch.setattr(features, "_extract", fail)


def _count_extractions(monkeypatch) -> list[str]:
    calls: list[str] = []
    real = features._extract

    def counted(spec, dataset, *args):
        calls.append(dataset)
        return real(spec, dataset, *args)

    monkeypatch.setattr(features, "_extract", counted)
    return calls


# --- ORT equals PyTorch ------------------------------------------------------------------------


@pytest.mark.parametrize("backbone", list(BACKBONES))
def test_ort_features_equal_the_pytorch_backbone(backbone, feature_home, torch_backbones, public_rows, text_rows,
                                                 monkeypatch):
    # Prepare: batches of 5 or 7 rows so the last batch is ragged.
    monkeypatch.setitem(features.BATCH_ROWS, "image", 5)
    monkeypatch.setitem(features.BATCH_ROWS, "text", 7)
    spec = BACKBONES[backbone]
    data = public_rows if spec.modality == "image" else text_rows
    # Execute
    got = backbone_features(backbone, "slice-test", data, progress=False)
    # Assert
    assert got.dtype == np.float32 and got.shape == (ROWS, spec.dim)
    expected = _torch_features(torch_backbones[backbone], data, spec.modality)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)
    assert len({row.tobytes() for row in got}) == ROWS  # every row its own feature


def test_text_graph_takes_other_sequence_lengths(feature_home, torch_backbones, text_rows):
    backbone_features("minilm", "slice-test", text_rows, progress=False)  # exports the graph
    session = features.backbone_session("minilm")
    input_ids, attention_mask = (torch.from_numpy(a[:, :12].copy()) for a in text_rows.inputs["text"])  # (12, 12)
    with torch.no_grad():
        expected = torch_backbones["minilm"](input_ids, attention_mask).numpy()
    np.testing.assert_allclose(features._run_session(session, (input_ids, attention_mask)), expected, atol=1e-4)


def test_pair_data_gives_each_backbone_its_modality(feature_home, torch_backbones, public_rows):
    image = backbone_features("efficientnet_lite0", "emoji-slice", public_rows, progress=False)
    text = backbone_features("minilm", "emoji-slice", public_rows, progress=False)
    assert image.shape == (ROWS, 1280) and text.shape == (ROWS, 384)
    np.testing.assert_allclose(text, _torch_features(torch_backbones["minilm"], public_rows, "text"), atol=1e-4)
    assert feature_cache_path("efficientnet_lite0", "emoji-slice") == feature_home / "efficientnet_lite0-112-emoji-slice.npy"
    assert feature_cache_path("minilm", "emoji-slice") == feature_home / "minilm-0-emoji-slice.npy"
    assert onnx_path("minilm").name == f"minilm-{backbone_digest('minilm')[:12]}-0.onnx"


def test_wrong_modality_or_backbone_is_refused(feature_home, text_rows):
    with pytest.raises(ValueError, match="reads image inputs"):
        backbone_features("efficientnet_lite0", "wordnet-slice", text_rows, progress=False)
    with pytest.raises(ValueError, match="unknown backbone"):
        backbone_features("vit", "wordnet-slice", text_rows, progress=False)


# --- the cache is read, and checked --------------------------------------------------------------


@pytest.fixture
def cached(feature_home, public_rows):
    """EfficientNet features of the public rows, computed once into the test's feature folder."""
    first = backbone_features("efficientnet_lite0", "emoji-slice", public_rows, progress=False)
    return feature_cache_path("efficientnet_lite0", "emoji-slice"), first


def test_second_call_reads_the_cache(cached, public_rows, monkeypatch):
    path, first = cached
    _forbid_extraction(monkeypatch)
    again = backbone_features("efficientnet_lite0", "emoji-slice", public_rows, progress=False)
    np.testing.assert_array_equal(again, first)
    record = json.loads(path.with_suffix(".json").read_text())
    assert record == {"format": features.FEATURES_FORMAT, "backbone": "efficientnet_lite0",
                      "digest": backbone_digest("efficientnet_lite0"), "image_size": 112, "dataset": "emoji-slice",
                      "rows": ROWS, "dim": 1280, "inputs_sha256": features.inputs_sha256(public_rows.inputs["image"]),
                      "npy_sha256": features.file_sha256(path)}
    np.testing.assert_array_equal(np.load(path, allow_pickle=False), first)


def _rewrite_array(path: Path, array: np.ndarray) -> None:
    """A well-formed .npy whose sidecar vouches for it: only the content checks can catch it."""
    np.save(path, array, allow_pickle=False)
    sidecar = path.with_suffix(".json")
    record = json.loads(sidecar.read_text())
    record["npy_sha256"] = features.file_sha256(path)
    sidecar.write_text(json.dumps(record))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_bytes(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[-100:-90] = bytes(b ^ 0xFF for b in raw[-100:-90])  # inside the float data, header intact
    path.write_bytes(bytes(raw))


def _write_nan(path: Path) -> None:
    array = np.load(path, allow_pickle=False)
    array[3, 7] = np.nan
    _rewrite_array(path, array)


def _write_inf(path: Path) -> None:
    array = np.load(path, allow_pickle=False)
    array[0, 0] = np.inf
    _rewrite_array(path, array)


def _wrong_shape(path: Path) -> None:
    _rewrite_array(path, np.load(path, allow_pickle=False)[:-1])


def _wrong_dtype(path: Path) -> None:
    _rewrite_array(path, np.load(path, allow_pickle=False).astype(np.float64))


def _garbage_sidecar(path: Path) -> None:
    path.with_suffix(".json").write_text("{not json")


def _no_sidecar(path: Path) -> None:
    path.with_suffix(".json").unlink()


def _no_array(path: Path) -> None:
    path.unlink()


def _stale_format(path: Path) -> None:
    sidecar = path.with_suffix(".json")
    sidecar.write_text(json.dumps({**json.loads(sidecar.read_text()), "format": features.FEATURES_FORMAT - 1}))


def _stale_size(path: Path) -> None:
    sidecar = path.with_suffix(".json")
    sidecar.write_text(json.dumps({**json.loads(sidecar.read_text()), "image_size": 224}))


DAMAGE = {"truncated": (_truncate, "corrupt"), "flipped bytes": (_flip_bytes, "sha256"),
          "NaN": (_write_nan, "NaN"), "Inf": (_write_inf, "Inf"), "wrong shape": (_wrong_shape, "expected float32"),
          "wrong dtype": (_wrong_dtype, "float64"), "garbage sidecar": (_garbage_sidecar, "unreadable sidecar"),
          "no sidecar": (_no_sidecar, "unreadable sidecar"), "no array": (_no_array, "unreadable"),
          "old format": (_stale_format, "stale: format"), "other size": (_stale_size, "stale: image_size")}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_or_stale_cache_is_rebuilt(damage, cached, public_rows, monkeypatch, caplog):
    path, first = cached
    spoil, reason = DAMAGE[damage]
    spoil(path)
    calls = _count_extractions(monkeypatch)
    with caplog.at_level(logging.WARNING, logger=features.__name__):
        rebuilt = backbone_features("efficientnet_lite0", "emoji-slice", public_rows, progress=False)
    assert calls == ["emoji-slice"]
    assert any(reason in r.getMessage() and str(path) in r.getMessage() for r in caplog.records), caplog.text
    np.testing.assert_allclose(rebuilt, first, atol=1e-6)
    _forbid_extraction(monkeypatch)  # and the file on disk is good again
    np.testing.assert_array_equal(backbone_features("efficientnet_lite0", "emoji-slice", public_rows, progress=False),
                                  rebuilt)


def test_changed_input_data_is_rebuilt(cached, torch_backbones, monkeypatch, caplog):
    path, first = cached
    other = load_public_data("train").select(np.arange(1, 37 * ROWS, 37))  # other rows, same count and name
    calls = _count_extractions(monkeypatch)
    with caplog.at_level(logging.WARNING, logger=features.__name__):
        got = backbone_features("efficientnet_lite0", "emoji-slice", other, progress=False)
    assert calls == ["emoji-slice"] and "stale: inputs_sha256" in caplog.text
    np.testing.assert_allclose(got, _torch_features(torch_backbones["efficientnet_lite0"], other, "image"), atol=1e-4)
    assert not np.allclose(got, first)


def test_changed_weights_digest_is_rebuilt(cached, public_rows, monkeypatch, caplog):
    path, first = cached
    real_digest = backbone_digest("efficientnet_lite0")
    calls = _count_extractions(monkeypatch)
    real_graph = onnx_path("efficientnet_lite0")
    monkeypatch.setattr(features, "backbone_digest", lambda name: "f" * 64)  # as if other weights shipped
    fake_graph = onnx_path("efficientnet_lite0")
    assert fake_graph.name == "efficientnet_lite0-ffffffffffff-112.onnx"  # its own graph, copied to skip an export
    for source, target in ((real_graph, fake_graph), (real_graph.with_suffix(".json"), fake_graph.with_suffix(".json"))):
        target.write_bytes(source.read_bytes())
    with caplog.at_level(logging.WARNING, logger=features.__name__):
        got = backbone_features("efficientnet_lite0", "emoji-slice", public_rows, progress=False)
    assert calls == ["emoji-slice"] and "stale: digest" in caplog.text
    assert json.loads(path.with_suffix(".json").read_text())["digest"] == "f" * 64
    np.testing.assert_allclose(got, first, atol=1e-6)  # the same real weights, so the same features
    monkeypatch.setattr(features, "backbone_digest", lambda name: real_digest)
    backbone_features("efficientnet_lite0", "emoji-slice", public_rows, progress=False)
    assert calls == ["emoji-slice", "emoji-slice"]


def test_damaged_onnx_graph_is_exported_again(feature_home, shared_onnx, torch_backbones, public_rows, monkeypatch,
                                              caplog):
    # Prepare: a private copy of the shared graph (exported by an earlier call), then cut it short; the
    # export (tested above) is replaced by writing the good bytes back, to save seconds.
    backbone_features("efficientnet_lite0", "emoji-slice", public_rows, progress=False)
    graph = onnx_path("efficientnet_lite0")
    (feature_home / "onnx").unlink()
    (feature_home / "onnx").mkdir()
    for source in (shared_onnx / graph.name, shared_onnx / graph.with_suffix(".json").name):
        (feature_home / "onnx" / source.name).write_bytes(source.read_bytes())
    good = graph.read_bytes()
    graph.write_bytes(good[: len(good) // 3])
    feature_cache_path("efficientnet_lite0", "emoji-slice").unlink()
    exports = []
    monkeypatch.setattr(features, "_export", lambda module, modality, path, inputs: exports.append(path) or path.write_bytes(good))
    # Execute
    with caplog.at_level(logging.WARNING, logger=features.__name__):
        got = backbone_features("efficientnet_lite0", "emoji-slice", public_rows, progress=False)
    # Assert
    assert "ONNX backbone" in caplog.text and "exporting it again" in caplog.text
    assert exports == [graph] and graph.read_bytes() == good
    np.testing.assert_allclose(got, _torch_features(torch_backbones["efficientnet_lite0"], public_rows, "image"),
                               atol=1e-4)


def test_processes_starting_at_once_build_once(feature_home, public_rows, monkeypatch):
    # Threads take the lock through separate open() calls, so flock serialises them like processes.
    calls = _count_extractions(monkeypatch)
    results: list[np.ndarray] = []
    errors: list[BaseException] = []

    def one() -> None:
        try:
            results.append(backbone_features("minilm", "emoji-slice", public_rows, progress=False))
        except BaseException as err:  # noqa: BLE001 - reported by the assertion below
            errors.append(err)

    threads = [threading.Thread(target=one) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors and len(results) == 4
    assert calls == ["emoji-slice"]
    for result in results[1:]:
        np.testing.assert_array_equal(result, results[0])


def test_the_federation_sets():
    # Each bundled set's rows, named by their digest (the same rows read from files share the cache).
    from fedafd.runtime.data.sources.registry import open_source

    names = [(backbone, dataset) for backbone, dataset, _ in modal.feature_sets()]
    expected = {(backbone, modal.rows_name(open_source(role, f"demo:{name}").splits[split], split))
                for split in ("train", "test")
                for backbone, role, name in (("efficientnet_lite0", "image", "fashion_mnist"),
                                             ("efficientnet_lite0", "multimodal", "tuxpaint"),
                                             ("efficientnet_lite0", "public", "emoji"), ("minilm", "text", "wordnet"),
                                             ("minilm", "multimodal", "tuxpaint"), ("minilm", "public", "emoji"))}
    assert len(names) == 12 and set(names) == expected
    assert all(dataset.split("-")[0] in ("train", "test") and len(dataset.split("-")[1]) == 20 for _, dataset in names)
    assert set(modal.feature_cache_paths()) == {f"{b}/{d}" for b, d in expected}


def test_build_feature_caches_reports_each_set(feature_home, public_rows, monkeypatch):
    monkeypatch.setattr(modal, "feature_sets", lambda: [("minilm", "emoji-slice", lambda: public_rows)])
    lines: list[str] = []
    first = modal.build_feature_caches(log=lines.append, progress=False)
    modal.build_feature_caches(log=lines.append, progress=False)
    assert list(first) == ["minilm/emoji-slice"]
    assert "computed" in lines[0] and "texts/s" in lines[0] and f"{ROWS} x 384" in lines[0]
    assert "cached" in lines[1]
