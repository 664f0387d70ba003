"""The backbone feature cache: each frozen backbone's features of each data set, computed once.

`backbone_features(backbone, dataset, data)` returns float32 (N, dim), row i = backbone(data row i). The
first call exports the backbone to ONNX (`features_dir()/onnx/{backbone}-{digest[:12]}-{size}.onnx`) and
runs it with ONNX Runtime, about 500 images/s at 112 px on 2 cores (eager PyTorch is 4-10x slower); the
result is written to `features_dir()/{backbone}-{size}-{dataset}.npy` (no pickle) a batch at a time, beside a
JSON sidecar naming what it was computed from. Later calls, in any process, map it back read-only. Nothing
here holds all N rows in memory: the inputs (memory-mapped for a cached source) are hashed and encoded a block
at a time and their pages released as it goes (prepared.row_blocks), the features are written batch by batch
and the cached file is hashed and checked for finiteness in blocks, so building or reading the cache of a data
set larger than memory keeps the process's resident memory flat.

A cached file is used only when its sidecar matches everything (format, backbone, weight digest, input
size, data set, rows, dim, sha256 of the input arrays) and the .npy bytes match the sidecar's sha256 and
hold finite float32 (rows, dim); anything else is logged with the reason and built again. Writes are
atomic (temporary file + os.replace), and a lock file makes a fleet starting at once build each file
once while the others wait and then read it. `size` is the image side for image backbones, 0 for text.

A user's tower (registered by runtime.backbones.register_tower) is cached the same way, but reads its own
inputs (`tower_batch`): each picture at its source resolution (the data's `pictures`; the 32 px array only
where a data set has none) brought to the tower's size by its own resize and crop, and each raw text
tokenized by the tower's own tokenizer to its max_tokens.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from fedafd.runtime.backbones import (BACKBONE_IMAGE_SIZE, BackboneSpec, backbone_digest, backbone_spec,
                                      build_backbone, user_tower)
from fedafd.runtime.files import atomic_write
from fedafd.runtime.data.prepared import (NpyRows, file_lock, open_npy, pictures_sha256, release_pages,
                                         row_blocks)
from fedafd.runtime.data.fetch import cache_dir
from fedafd.runtime.data.views import ModalData
from fedafd.runtime.data.text import MAX_TEXT_LEN, PAD_ID
from fedafd.runtime.errors import FedafdError
from fedafd.runtime.hashing import file_sha256

logger = logging.getLogger(__name__)

FEATURES_FORMAT = 1
"""Bumped whenever what a feature file holds changes, so stale caches are never read."""
OPSET = 17
BATCH_ROWS = {"image": 128, "text": 256}
"""Rows per ONNX Runtime call."""
PARITY_ATOL = 1e-3
"""Largest allowed |ORT - PyTorch| on the rows checked right after an export (features are O(1))."""
PARITY_ROWS = 8
"""Rows of the data set being encoded on which a fresh export must match PyTorch."""
_INPUT_NAMES = {"image": ("image",), "text": ("input_ids", "attention_mask")}
_OUTPUT_NAME = "feature"


class FeatureCacheError(FedafdError):
    """A backbone does not export to ONNX faithfully, or the features cannot be computed."""


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


# --- where things are --------------------------------------------------------------------------


def features_dir() -> Path:
    """`cache_dir()/features` (a function so tests can point it elsewhere without moving the prepared data)."""
    return cache_dir() / "features"


def _size_key(spec: BackboneSpec, image_size: int) -> int:
    if spec.modality != "image":
        return 0  # text backbones have no input size
    tower = user_tower(spec.name)
    return tower.image_size if tower is not None else image_size


def feature_cache_path(backbone: str, dataset: str, image_size: int = BACKBONE_IMAGE_SIZE) -> Path:
    """The .npy of `backbone`'s features of `dataset` (its JSON sidecar has the same stem)."""
    size = _size_key(backbone_spec(backbone), image_size)
    return features_dir() / f"{backbone}-{size}-{dataset}.npy"


def onnx_path(backbone: str, image_size: int = BACKBONE_IMAGE_SIZE) -> Path:
    size = _size_key(backbone_spec(backbone), image_size)
    return features_dir() / "onnx" / f"{backbone}-{backbone_digest(backbone)[:12]}-{size}.onnx"


def _sidecar(path: Path) -> Path:
    return path.with_suffix(".json")


def _lock(path: Path) -> Path:
    return path.parent / f".{path.name}.lock"


# --- small helpers -----------------------------------------------------------------------------


def inputs_sha256(arrays: tuple[np.ndarray, ...]) -> str:
    """sha256 over the dtype, shape and bytes of each input array (C order, a block at a time): a changed data
    set changes it."""
    digest = hashlib.sha256()
    for array in arrays:
        digest.update(f"{array.dtype.str}{array.shape};".encode())
        for block in row_blocks(array) if array.ndim else [np.ascontiguousarray(array)]:
            digest.update(memoryview(block).cast("B"))
    return digest.hexdigest()


def _all_finite(features: np.ndarray) -> bool:
    return all(np.isfinite(block).all() for block in row_blocks(features))


def _write_bytes(path: Path, raw: bytes) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(raw))


def _write_json(path: Path, record: dict[str, Any]) -> None:
    _write_bytes(path, (json.dumps(record, indent=2, sort_keys=True) + "\n").encode())


# --- the cached features -----------------------------------------------------------------------


def _read_cached(path: Path, expected: dict[str, Any]) -> tuple[np.ndarray | None, str]:
    """(features, "") when the cache at `path` is good, else (None, why not)."""
    sidecar = _sidecar(path)
    if not sidecar.exists() and not path.exists():
        return None, "missing"
    try:
        record = json.loads(sidecar.read_text())
        if not isinstance(record, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as err:
        return None, f"unreadable sidecar {sidecar.name} ({err})"
    for key, value in expected.items():
        if record.get(key) != value:
            return None, f"stale: {key} is {record.get(key)!r}, expected {value!r}"
    try:
        sha256 = file_sha256(path)  # read a block at a time
    except OSError as err:
        return None, f"unreadable ({err})"
    if sha256 != record.get("npy_sha256"):
        return None, "corrupt: its sha256 differs from the sidecar's"
    try:
        # Memory-mapped, read-only: every process (and every simulated device) shares the page cache's copy.
        features = open_npy(path)
    except (OSError, ValueError, EOFError) as err:
        return None, f"corrupt: not a .npy array ({err})"
    shape = (expected["rows"], expected["dim"])
    if features.dtype != np.float32 or features.shape != shape:
        return None, f"corrupt: {features.dtype} {features.shape}, expected float32 {shape}"
    if not _all_finite(features):
        return None, "corrupt: holds NaN or Inf"
    return features, ""


def _install_cached(path: Path, built: Path, record: dict[str, Any]) -> None:
    """A copy of the features written to `built` made the cache file at `path` (atomically; the .npy first: a
    sidecar never vouches for bytes not yet there), then its sidecar. The copy is the kernel's (sendfile), so
    no byte passes through this process's memory."""
    atomic_write(path, lambda tmp: shutil.copyfile(built, tmp))
    _write_json(_sidecar(path), {**record, "npy_sha256": file_sha256(path)})


def compute_features(backbone: str, dataset: str, data: ModalData, image_size: int,
              progress: bool) -> tuple[np.ndarray, float | None]:
    """(features, seconds spent encoding them now, or None when they were read from the cache)."""
    spec = backbone_spec(backbone)
    if spec.modality not in data.inputs:
        raise ValueError(f"{backbone} reads {spec.modality} inputs; data set {dataset} has only {', '.join(data.inputs)}")
    size = _size_key(spec, image_size)
    expected = {"format": FEATURES_FORMAT, "backbone": backbone, "digest": backbone_digest(backbone),
                "image_size": size, "dataset": dataset, "rows": len(data), "dim": spec.dim,
                "inputs_sha256": tower_inputs_sha256(backbone, data)}
    path = feature_cache_path(backbone, dataset, image_size)
    features, reason = _read_cached(path, expected)
    if features is not None:
        return features, None
    if reason != "missing":
        logger.warning("feature cache %s not used (%s); computing it again", path, reason)
    with file_lock(_lock(path)):
        features, _ = _read_cached(path, expected)  # built by another process while this one waited
        if features is not None:
            return features, None
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-", suffix=".tmp")
        os.close(fd)
        built = Path(name)
        try:
            _, encode_seconds = _extract(spec, dataset, data, image_size, progress, built)
            # The caller maps this process's own file, unnamed once unlinked below: whatever later happens to
            # the cache file (rebuilt, damaged in place) never changes or truncates the rows it holds.
            features = open_npy(built)
            _install_cached(path, built, expected)
        finally:
            built.unlink(missing_ok=True)
    return features, encode_seconds


def backbone_features(backbone: str, dataset: str, data: ModalData, image_size: int = BACKBONE_IMAGE_SIZE,
                      progress: bool = True) -> np.ndarray:
    """float32 (N, dim): row i is the frozen `backbone`'s feature of row i of `data` (the inputs of the
    backbone's modality), from the cache when it holds exactly these, else computed with ONNX Runtime and
    cached. `dataset` names the data in the cache's file names, e.g. "fashion_mnist-train"."""
    return compute_features(backbone, dataset, data, image_size, progress)[0]


# --- ONNX export and ONNX Runtime ----------------------------------------------------------------


def tower_inputs_sha256(backbone: str, data: ModalData) -> str:
    """sha256 of what a backbone's features are computed from (its cache's inputs_sha256): a shipped backbone's,
    the data's input arrays of its modality; a user tower's, the rows' pictures at source resolution (when the
    data keeps them; else the 32 px arrays) or the raw texts with their lengths."""
    spec = backbone_spec(backbone)
    if user_tower(backbone) is None:
        return inputs_sha256(data.inputs[spec.modality])
    if spec.modality == "image":
        return inputs_sha256(data.inputs["image"]) if data.pictures is None else pictures_sha256(data.pictures)
    encoded = [text.encode() for text in _texts(data)]
    lengths = np.array([len(e) for e in encoded], dtype=np.int64)
    return inputs_sha256((lengths, np.frombuffer(b"".join(encoded), dtype=np.uint8)))


def _texts(data: ModalData) -> tuple[str, ...]:
    texts = data.texts
    if texts is None:
        raise FeatureCacheError("this data set keeps no raw texts, and a tower of your own tokenizes them itself")
    return texts


def tower_batch(backbone: str, data: ModalData, rows: slice | np.ndarray) -> tuple[torch.Tensor, ...]:
    """The inputs of `rows` of `data` as the backbone reads them, on the CPU: a shipped backbone's from the data's
    arrays (data.batch); a user tower's from the pictures (decoded, brought to its size by fit_image) or the raw
    texts (its tokenizer, padded to the batch's longest, at most max_tokens)."""
    spec = backbone_spec(backbone)
    tower = user_tower(backbone)
    cpu = torch.device("cpu")
    if tower is None:
        return data.batch(spec.modality, rows, cpu)
    indices = np.arange(len(data))[rows] if isinstance(rows, slice) else np.asarray(rows)
    from fedafd.runtime.towers import fit_image

    if spec.modality == "image":
        pictures = data.pictures
        if pictures is None:  # pictures of at most 32 px keep none: the 32 px array is the whole picture
            images = data.inputs["image"][0]
            fitted = [fit_image(Image.fromarray(np.ascontiguousarray(images[i].transpose(1, 2, 0))), tower)
                      for i in indices]
        else:
            fitted = [fit_image(pictures.open(int(i)), tower) for i in indices]
        size = tower.image_size
        return (torch.from_numpy(np.stack(fitted)) if fitted else torch.zeros(0, 3, size, size),)
    texts = _texts(data)
    return tower_tokens(tower, [texts[int(i)] for i in indices])


def tower_tokens(tower: Any, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) int64 (B, L) of `texts` by a text tower's own tokenizer: padded to the
    batch's longest, truncated at its max_tokens (what its cache, its trace and its training read)."""
    tokens = tower_tokenizer(tower)(texts, padding="longest", truncation=True, max_length=tower.max_tokens,
                                    return_tensors="np")
    return (torch.from_numpy(tokens["input_ids"].astype(np.int64)),
            torch.from_numpy(tokens["attention_mask"].astype(np.int64)))


_tokenizers: dict[Any, Any] = {}


def tower_tokenizer(tower: Any) -> Any:
    """A user text tower's tokenizer, loaded once per process."""
    if tower not in _tokenizers:
        from fedafd.runtime.towers import load_tower_tokenizer

        _tokenizers[tower] = load_tower_tokenizer(tower)
    return _tokenizers[tower]


def example_inputs(modality: str, backbone: str = "") -> tuple[torch.Tensor, ...]:
    """Two rows to trace with; the token rows end in padding so the mask is traced as data, not skipped."""
    tower = user_tower(backbone) if backbone else None
    if tower is not None and modality == "image":
        size = tower.image_size
        return (torch.linspace(0.0, 1.0, 2 * 3 * size * size).reshape(2, 3, size, size),)
    if tower is not None:  # the second row ends in padding, as below
        return tower_tokens(tower, ["a dog runs on the grass near two trees", "a dog"])
    if modality == "image":
        return (torch.linspace(0.0, 1.0, 2 * 3 * 32 * 32).reshape(2, 3, 32, 32),)
    input_ids = torch.full((2, MAX_TEXT_LEN), PAD_ID, dtype=torch.int64)
    input_ids[0, :4] = torch.tensor([101, 1037, 3899, 102])  # [CLS] a dog [SEP]
    input_ids[1, :3] = torch.tensor([101, 3899, 102])
    return input_ids, (input_ids != PAD_ID).to(torch.int64)


def _export(module: torch.nn.Module, modality: str, path: Path, inputs: tuple[torch.Tensor, ...]) -> None:
    import onnx

    names = list(_INPUT_NAMES[modality])
    axes = {n: {0: "batch", 1: "seq"} if modality == "text" else {0: "batch"} for n in names}
    axes[_OUTPUT_NAME] = {0: "batch"}

    def write(tmp: Path) -> None:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about Python-side shape arithmetic
            torch.onnx.export(module, inputs, str(tmp), input_names=names,
                              output_names=[_OUTPUT_NAME], dynamic_axes=axes, opset_version=OPSET, dynamo=False)
        onnx.checker.check_model(onnx.load(str(tmp)), full_check=True)

    atomic_write(path, write)


def _open_session(path: Path) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _run_session(session: Any, inputs: tuple[torch.Tensor, ...]) -> np.ndarray:
    feeds = {i.name: t.numpy() for i, t in zip(session.get_inputs(), inputs)}
    return session.run([_OUTPUT_NAME], feeds)[0]


def backbone_session(backbone: str, image_size: int = BACKBONE_IMAGE_SIZE,
                     check_rows: tuple[torch.Tensor, ...] | None = None) -> Any:
    """An ONNX Runtime session of the backbone, exported once and reused. The file is trusted when it loads
    and its bytes match the sha256 recorded at export; otherwise (or when absent) the backbone is exported
    again and checked against PyTorch on `check_rows` (default: the trace example)."""
    spec = backbone_spec(backbone)
    path = onnx_path(backbone, image_size)
    with file_lock(_lock(path)):
        if path.exists():
            try:
                record = json.loads(_sidecar(path).read_text())
                if record.get("sha256") != file_sha256(path):
                    raise ValueError("its sha256 differs from the one recorded at export")
                return _open_session(path)
            except Exception as err:  # noqa: BLE001 - ORT raises its own types; any failure means rebuild
                logger.warning("ONNX backbone %s not used (%s); exporting it again", path, _first_line(err))
        start = time.perf_counter()
        module = build_backbone(backbone, image_size)
        _export(module, spec.modality, path, example_inputs(spec.modality, backbone))
        session = _open_session(path)
        check_rows = check_rows if check_rows is not None else example_inputs(spec.modality, backbone)
        with torch.no_grad():
            expected = module(*check_rows).numpy()
        difference = float(np.abs(_run_session(session, check_rows) - expected).max(initial=0.0))
        if not difference <= PARITY_ATOL:
            path.unlink(missing_ok=True)
            raise FeatureCacheError(f"the ONNX export of {backbone} differs from PyTorch by {difference:.2e} "
                                    f"(> {PARITY_ATOL}); check the installed torch and onnxruntime versions")
        _write_json(_sidecar(path), {"format": FEATURES_FORMAT, "backbone": backbone, "digest": backbone_digest(backbone),
                                     "image_size": _size_key(spec, image_size), "opset": OPSET,
                                     "sha256": file_sha256(path), "parity_max_abs_diff": difference})
        logger.info("exported %s to %s in %.1f s (max |ORT - PyTorch| %.1e)", backbone, path,
                    time.perf_counter() - start, difference)
        return session


@contextmanager
def _progress_bar(description: str, total: int, enabled: bool) -> Iterator[Callable[[int], None]]:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    console = Console(stderr=True)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=console, transient=True, disable=not (enabled and console.is_terminal)) as bar:
        task = bar.add_task(description, total=total)
        yield lambda rows: bar.advance(task, rows)


def _extract(spec: BackboneSpec, dataset: str, data: ModalData, image_size: int, progress: bool,
             out: Path) -> tuple[np.ndarray, float]:
    """Features (N, dim) written to the .npy `out` a batch at a time, and returned memory-mapped, with the
    seconds spent in ONNX Runtime (the export excluded). The inputs' pages are released batch by batch."""
    rows = len(data)
    written = NpyRows(out, np.float32, (spec.dim,), rows)  # (N, dim)
    try:
        if rows == 0:
            return written.close(), 0.0
        check_rows = tower_batch(spec.name, data, slice(0, PARITY_ROWS))
        session = backbone_session(spec.name, image_size, check_rows)
        start_encoding = time.perf_counter()
        step = BATCH_ROWS[spec.modality]
        inputs = data.inputs[spec.modality]
        with _progress_bar(f"{spec.name} features of {dataset}", rows, progress) as advance:
            for start in range(0, rows, step):
                batch = tower_batch(spec.name, data, slice(start, start + step))
                features = _run_session(session, batch)  # (b, dim)
                if not np.isfinite(features).all():
                    raise FeatureCacheError(f"{spec.name} gave NaN or Inf features for {dataset} (rows {start}..)")
                written.extend(features)
                for array in inputs if user_tower(spec.name) is None else ():  # a tower's are not row-indexed
                    release_pages(array[start:start + step])
                advance(len(batch[0]))
        seconds = time.perf_counter() - start_encoding
    except BaseException:
        written.abort()
        raise
    return written.close(), seconds
