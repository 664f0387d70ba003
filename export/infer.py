"""Run an exported model with ONNX Runtime alone: the code a device that only infers needs.

This module must never import torch (a device that only infers installs `fedafd[infer]`, without it):
it imports numpy, onnxruntime, the `tokenizers` library (on the tokenizer.json exported beside the
model), PIL for decoding pictures and the torch-free `fedafd.runtime.data.images`. A test runs
`fedafd-edge infer` in a subprocess and checks that torch never got imported.

A model folder holds `manifest.json` (see `Manifest`), one ONNX graph per modality (fp32 and, when
quantised, int8), the global tower graph(s) and `tokenizer.json` for text. The graphs take raw inputs
and hold the frozen backbones they need (EfficientNet-Lite0, MiniLM), so nothing here changes with them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedafd.runtime.errors import FedafdError
from fedafd.runtime.hashing import file_sha256

MANIFEST_FILE = "manifest.json"
TOKENIZER_FILE = "tokenizer.json"
MANIFEST_FORMAT = 1
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")
PRECISIONS = ("fp32", "int8")


class ModelError(FedafdError):
    """The model folder is missing, incomplete or corrupt; the message names the file and what to do."""


class InputError(FedafdError):
    """An input the model cannot take (wrong shape or dtype, unreadable picture, wrong modality)."""




@dataclass(frozen=True)
class Manifest:
    """manifest.json, as written by `fedafd.export.onnx_export`. Every graph entry names its file,
    sha256, inputs and outputs ({name, dtype, shape}, shape entries are ints or axis names)."""

    folder: Path
    data: dict[str, Any]

    @property
    def kind(self) -> str:
        """image | text | multimodal (a client) or server (the global towers as a retrieval model)."""
        return self.data["kind"]

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(self.data["graphs"])

    @property
    def labels(self) -> list[str]:
        return list(self.data.get("labels", []))

    def graph(self, modality: str) -> dict[str, Any]:
        if modality not in self.data["graphs"]:
            raise InputError(f"this {self.kind} model takes {' and '.join(self.modalities)} inputs, not {modality}")
        return self.data["graphs"][modality]

    def graph_file(self, modality: str, precision: str = "fp32") -> Path:
        entry = self.graph(modality)
        if precision not in PRECISIONS:
            raise InputError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        if precision == "int8":
            if "int8" not in entry:
                raise ModelError(f"{self.folder} has no int8 graph for {modality}: export again with quantisation on")
            return self.folder / entry["int8"]["file"]
        return self.folder / entry["file"]

    def sha256_of(self, path: Path) -> str | None:
        for entry in list(self.data["graphs"].values()) + list(self.data.get("towers", {}).values()):
            if entry["file"] == path.name:
                return entry["sha256"]
            if "int8" in entry and entry["int8"]["file"] == path.name:
                return entry["int8"]["sha256"]
        return None


def read_manifest(folder: Path) -> Manifest:
    folder = Path(folder)
    path = folder / MANIFEST_FILE
    if not folder.is_dir():
        raise ModelError(f"no model folder at {folder}: run `fedafd-edge export STATE_DIR --out {folder}` first")
    if not path.is_file():
        raise ModelError(f"{folder} has no {MANIFEST_FILE}: it is not an exported model "
                         f"(run `fedafd-edge export STATE_DIR --out {folder}`)")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelError(f"{path} is not readable JSON ({err}); export the model again") from None
    missing = [key for key in ("format", "kind", "graphs", "preprocessing") if key not in data]
    if missing:
        raise ModelError(f"{path} lacks {', '.join(missing)}; export the model again")
    if data["format"] != MANIFEST_FORMAT:
        raise ModelError(f"{path} has manifest format {data['format']}, this build reads {MANIFEST_FORMAT}")
    return Manifest(folder, data)


def open_session(path: Path, threads: int = 0, expected_sha256: str | None = None) -> Any:
    """An ONNX Runtime CPU session; a missing file or one whose bytes changed since export is a ModelError."""
    import onnxruntime as ort

    if not path.is_file():
        raise ModelError(f"model file {path} is missing; export the model again")
    if expected_sha256 is not None and file_sha256(path) != expected_sha256:
        raise ModelError(f"model file {path} is corrupt (its sha256 differs from the manifest's); export it again")
    options = ort.SessionOptions()
    if threads > 0:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own types (InvalidProtobuf, Fail, ...)
        raise ModelError(f"ONNX Runtime cannot load {path}: {str(err).splitlines()[0]}; export it again") from None


# -- preprocessing (the same conventions as training: runtime/data/images.py and runtime/data/text.py) --

def _open_picture(path: Path, convert: Any) -> np.ndarray:
    """`convert(PIL image)` of a picture file; a missing or unreadable file is an InputError naming it."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
            return convert(img)
    except FileNotFoundError:
        raise InputError(f"no such image file: {path}") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise InputError(f"cannot read image {path}: {err}") from None


def load_image(path: Path) -> np.ndarray:
    """A picture file -> (3, 32, 32) uint8, exactly as the training data were prepared."""
    from fedafd.runtime.data.images import from_pil

    return _open_picture(path, from_pil)


def load_fitted_image(path: Path, size: int, fit: str, pad_colour: tuple[float, ...]) -> np.ndarray:
    """A picture file -> float32 (3, size, size) in [0, 1], as a user tower's feature cache prepared its pictures."""
    from fedafd.runtime.data.images import fit_picture

    return _open_picture(path, lambda img: fit_picture(img, size, fit, pad_colour))


def load_image_array(path: Path) -> np.ndarray:
    """A .npy file of uint8 images (3, 32, 32) or (N, 3, 32, 32), or float ones in [0, 1]."""
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise InputError(f"cannot read {path} as a numpy array: {err}") from None
    return array[None] if array.ndim == 3 else array


class TextPreprocessor:
    """The MiniLM WordPiece tokenizer from tokenizer.json via the `tokenizers` library: [CLS] ... [SEP],
    truncated and padded to the manifest's max_len with pad id 0, the same ids as runtime.data.text.tokenize."""

    def __init__(self, path: Path, max_len: int, pad_id: int, padding: str = "max_length"):
        from tokenizers import Tokenizer

        if not path.is_file():
            raise ModelError(f"the tokenizer file {path} is missing; export the model again")
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as err:
            raise ModelError(f"cannot read the tokenizer {path}: {err}; export the model again") from None
        pad_token = tokenizer.id_to_token(pad_id)
        tokenizer.enable_truncation(max_length=max_len)
        # A user tower's graph pads to the batch's longest text (a BERT's 512 positions would cost 16x at 32
        # words); the project's own graphs to max_len, as training does.
        tokenizer.enable_padding(length=max_len if padding == "max_length" else None, pad_id=pad_id, pad_token=pad_token)
        self.tokenizer, self.max_len = tokenizer, max_len

    def __call__(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Texts -> (input_ids, attention_mask), both int64 (N, max_len)."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise InputError("texts must be a list of str")
        if not texts:
            empty = np.zeros((0, self.max_len), dtype=np.int64)
            return empty, empty.copy()
        encodings = self.tokenizer.encode_batch(list(texts))
        input_ids = np.array([e.ids for e in encodings], dtype=np.int64)  # (N, max_len)
        attention_mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)  # (N, max_len)
        return input_ids, attention_mask


# -- the model -----------------------------------------------------------------------------------

class OnnxModel:
    """An exported model folder, run with ONNX Runtime. `run(modality, *arrays)` takes the graph's raw
    inputs; `images(...)` and `texts(...)` take pictures and strings and preprocess them first."""

    def __init__(self, folder: Path, precision: str = "fp32", threads: int = 0, verify_files: bool = True):
        self.manifest = read_manifest(Path(folder))
        self.precision = precision
        self.threads = threads
        self.verify_files = verify_files
        self._sessions: dict[str, Any] = {}
        self._text: TextPreprocessor | None = None

    @property
    def kind(self) -> str:
        return self.manifest.kind

    def session(self, modality: str) -> Any:
        if modality not in self._sessions:
            path = self.manifest.graph_file(modality, self.precision)
            expected = self.manifest.sha256_of(path) if self.verify_files else None
            self._sessions[modality] = open_session(path, self.threads, expected)
        return self._sessions[modality]

    def run(self, modality: str, *arrays: np.ndarray) -> dict[str, np.ndarray]:
        """The graph's outputs by name for its inputs (checked against the manifest's shapes and dtypes)."""
        entry = self.manifest.graph(modality)
        specs = entry["inputs"]
        if len(arrays) != len(specs):
            raise InputError(f"the {modality} graph takes {len(specs)} input(s) "
                             f"({', '.join(s['name'] for s in specs)}), got {len(arrays)}")
        feeds = {spec["name"]: _check_input(spec, array) for spec, array in zip(specs, arrays)}
        session = self.session(modality)
        names = [o["name"] for o in entry["outputs"]]
        return dict(zip(names, session.run(names, feeds)))

    def images(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """uint8 (N, 3, 32, 32) pictures (runtime.data.images format) or float ones in [0, 1]."""
        images = np.asarray(images)
        if images.dtype == np.uint8:
            images = images.astype(np.float32) / np.float32(255.0)
        return self.run("image", images)

    def texts(self, texts: list[str]) -> dict[str, np.ndarray]:
        return self.run("text", *self.text_preprocessor()(texts))

    def text_preprocessor(self) -> TextPreprocessor:
        if self._text is None:
            spec = self.manifest.data["preprocessing"].get("text")
            if spec is None:
                raise InputError(f"this {self.kind} model takes no text")
            self._text = TextPreprocessor(self.manifest.folder / spec["tokenizer"], spec["max_len"], spec["pad_id"],
                                          spec.get("padding", "max_length"))
        return self._text

    def read_images(self, paths: list[Path]) -> np.ndarray:
        """Picture files (and .npy arrays) as this model's image graph takes them: 32 px pictures, or a user
        tower's size and fit (manifest preprocessing), by the functions training used."""
        spec = self.manifest.data["preprocessing"].get("image", {})
        if "tower" not in spec:
            return read_images(paths)
        return read_images(paths, lambda p: load_fitted_image(p, spec["size"], spec["fit"], tuple(spec["pad_colour"])),
                           spec["size"])


def _check_input(spec: dict[str, Any], array: np.ndarray) -> np.ndarray:
    array = np.asarray(array)
    name, shape = spec["name"], spec["shape"]
    want = np.dtype(spec["dtype"])
    if array.dtype != want:
        if np.issubdtype(want, np.floating) and np.issubdtype(array.dtype, np.floating):
            array = array.astype(want)
        elif np.issubdtype(want, np.integer) and np.issubdtype(array.dtype, np.integer):
            array = array.astype(want)
        else:
            raise InputError(f"input {name} must be {want}, got {array.dtype}")
    shown = "(" + ", ".join(str(s) for s in shape) + ")"
    if array.ndim != len(shape) or any(isinstance(s, int) and s != n for s, n in zip(shape, array.shape)):
        raise InputError(f"input {name} must have shape {shown}, got {tuple(array.shape)}")
    if len(array) == 0:
        raise InputError(f"input {name} is empty (batch of 0)")
    max_len = spec.get("max_len")
    if max_len is not None and array.shape[1] > max_len:
        raise InputError(f"input {name} has {array.shape[1]} tokens; this model takes at most {max_len}")
    return np.ascontiguousarray(array)


# -- what `fedafd-edge infer` prints ---------------------------------------------------------------

def split_inputs(inputs: list[str]) -> tuple[list[Path], list[str]]:
    """Arguments that name picture (or .npy) files are images; the rest are texts."""
    images, texts = [], []
    for item in inputs:
        path = Path(item)
        if path.suffix.lower() in IMAGE_SUFFIXES + (".npy",) and (path.exists() or os.sep in item):
            images.append(path)
        else:
            texts.append(item)
    return images, texts


def read_images(paths: list[Path], load: Any = load_image, size: int = 32) -> np.ndarray:
    """(N, 3, size, size) uint8 or float from picture files (each through `load`: 32 px by default) and .npy
    arrays; uint8 and float inputs are not mixed (OnnxModel.images scales uint8 to [0, 1])."""
    batches = [load_image_array(p) if p.suffix.lower() == ".npy" else load(p)[None] for p in paths]
    dtypes = {b.dtype for b in batches}
    if len(dtypes) > 1:
        raise InputError("mix of uint8 and float image inputs; give one kind")
    return np.concatenate(batches) if batches else np.zeros((0, 3, size, size), np.uint8)


def predict(model: OnnxModel, inputs: list[str], top_k: int = 3) -> dict[str, Any]:
    """Classify pictures or texts (image/text clients), or rank the given captions for every given
    picture (multimodal clients and the server's towers). A JSON-ready dict."""
    images, texts = split_inputs(inputs)
    kind = model.kind
    if kind in ("image", "text"):
        wrong = texts if kind == "image" else images
        if wrong:
            raise InputError(f"this is {'an' if kind == 'image' else 'a'} {kind} classifier; cannot classify {wrong[0]!s}"
                             + (" (no such image file?)" if kind == "image" else ""))
        if kind == "image":
            probs = model.images(model.read_images(images))["probs"]
            names = [str(p) for p in images]
        else:
            probs = model.texts(texts)["probs"]
            names = texts
        if kind == "image" and len(probs) != len(names):  # a .npy file may hold several images
            names = [f"{n}[{i}]" for n in names for i in range(len(probs) // len(names))][:len(probs)]
        return {"kind": kind, "precision": model.precision,
                "predictions": [_top_classes(name, row, model.manifest.labels, top_k) for name, row in zip(names, probs)]}
    if not images or not texts:
        raise InputError(f"a {kind} model ranks captions for pictures: give at least one image file and one text")
    image_features = model.images(model.read_images(images))["feature"]  # (N, d), L2-normalised
    text_features = model.texts(texts)["feature"]  # (M, d), L2-normalised
    scores = image_features @ text_features.T  # (N, M)
    rankings = []
    for path, row in zip(images, scores):
        order = np.argsort(-row, kind="stable")
        rankings.append({"input": str(path), "ranking": [{"text": texts[j], "score": float(row[j])} for j in order]})
    return {"kind": kind, "precision": model.precision, "rankings": rankings}


def _top_classes(name: str, probs: np.ndarray, labels: list[str], top_k: int) -> dict[str, Any]:
    order = np.argsort(-probs, kind="stable")[:top_k]
    top = [{"label": labels[i] if i < len(labels) else str(i), "index": int(i), "prob": float(probs[i])} for i in order]
    return {"input": name, "label": top[0]["label"], "index": top[0]["index"], "prob": top[0]["prob"], "top": top}


def format_text(result: dict[str, Any]) -> str:
    """One line per classified input, or one block per picture with its ranked captions."""
    lines = []
    for item in result.get("predictions", []):
        rest = ", ".join(f"{t['label']} {t['prob']:.3f}" for t in item["top"][1:])
        lines.append(f"{item['input']}: {item['label']} ({item['prob']:.3f})" + (f"  [{rest}]" if rest else ""))
    for item in result.get("rankings", []):
        lines.append(f"{item['input']}:")
        lines += [f"  {r['score']:+.3f}  {r['text']}" for r in item["ranking"]]
    return "\n".join(lines)
