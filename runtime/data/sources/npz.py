"""Image classification arrays in one .npz, read with allow_pickle=False (an object array is refused).

Arrays: `images` (or `x`) with `labels` (or `y`) as split "all", or `x_train`/`y_train` and `x_test`/`y_test` as
splits train and test; optionally `class_names` (a string array, in label order). Images are (N, H, W)
grayscale, (N, H, W, C) or (N, C, H, W) with C = 1, 3 or 4 (gray, RGB, RGBA), uint8 (or integers in [0, 255]),
or floats in [0, 1] (scaled to 0..255). Labels are integers or strings, one per image.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from fedafd.runtime.data.sources.options import DataOptions
from fedafd.runtime.data.sources.records import ImageRecord, Problems, Splits, Where

KINDS = ("image",)
CHANNELS = (1, 3, 4)
IMAGE_KEYS = ("images", "x")
LABEL_KEYS = ("labels", "y")
SPLIT_KEYS = {"train": ("x_train", "y_train"), "test": ("x_test", "y_test")}


def read(path: Path, kind: str, options: DataOptions, problems: Problems) -> Splits:
    """The records of an .npz: {"all"} from images/labels (x/y), or {"train", "test"} from x_train/y_train..."""
    arrays = _load(path, problems)
    name = str(path)
    if any(x in arrays for x, _ in SPLIT_KEYS.values()):
        pairs = {split: keys for split, keys in SPLIT_KEYS.items() if keys[0] in arrays}
    else:
        image_key = next((k for k in IMAGE_KEYS if k in arrays), None)
        if image_key is None:
            raise problems.fatal(name, f"no image array: expected one named images, x, or x_train/x_test "
                                       f"(it holds {_listing(arrays)})")
        pairs = {"all": (image_key, None)}
    splits: dict[str, list[ImageRecord]] = {}
    for split, (image_key, label_key) in pairs.items():
        label_key = _label_key(arrays, label_key, options, name, problems)
        splits[split] = _records(arrays, image_key, label_key, options, name, problems)
    return Splits(splits, _class_names(arrays, name, problems))


def _load(path: Path, problems: Problems) -> dict[str, np.ndarray]:
    """Every array of the file; an object array (which only pickle can load) is refused."""
    try:
        npz = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise problems.fatal(str(path), "no such file") from None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        refused = "pickle" in str(err)  # a bare .npy object array
        raise problems.fatal(str(path), "object arrays need pickle; save plain arrays" if refused else
                             f"not a readable .npz ({type(err).__name__}: {err})") from None
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise problems.fatal(str(path), "a single .npy array, not an .npz archive of named arrays (save with "
                                        "np.savez(path, images=..., labels=...))")
    arrays = {}
    with npz:
        for key in npz.files:
            try:
                arrays[key] = npz[key]
            except ValueError as err:
                if "pickle" in str(err):
                    raise problems.fatal(str(path), f"array {key!r} is an object array: object arrays need "
                                                    "pickle; save plain arrays (e.g. np.stack the images into one "
                                                    "uint8 array, labels as integers or strings)") from None
                raise problems.fatal(str(path), f"array {key!r} is unreadable ({err})") from None
            except (OSError, zipfile.BadZipFile, EOFError) as err:
                raise problems.fatal(str(path), f"array {key!r} is unreadable ({type(err).__name__}: "
                                                f"{err})") from None
    return arrays


def _listing(arrays: dict[str, np.ndarray]) -> str:
    return ", ".join(f"{k} {a.dtype} {a.shape}" for k, a in arrays.items()) or "no arrays"


def _label_key(arrays: dict[str, np.ndarray], split_key: str | None, options: DataOptions, name: str,
               problems: Problems) -> str:
    if options.label_column != "label":  # a data config naming the label array
        candidates: tuple[str, ...] = (options.label_column if split_key is None
                                       else f"{options.label_column}{split_key[1:]}",)
    else:
        candidates = LABEL_KEYS if split_key is None else (split_key,)
    key = next((k for k in candidates if k in arrays), None)
    if key is None:
        raise problems.fatal(name, f"no label array {' or '.join(candidates)} (it holds {_listing(arrays)})")
    return key


def _class_names(arrays: dict[str, np.ndarray], name: str, problems: Problems) -> tuple[str, ...]:
    names = arrays.get("class_names")
    if names is None:
        return ()
    if names.ndim != 1 or names.dtype.kind not in "US":
        raise problems.fatal(name, f"class_names must be a 1-D string array, got {names.dtype} {names.shape}")
    return tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names.tolist())


def _records(arrays: dict[str, np.ndarray], image_key: str, label_key: str, options: DataOptions, name: str,
             problems: Problems) -> list[ImageRecord]:
    images, labels = arrays[image_key], arrays[label_key]
    where = f"{name} [{image_key}]"
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1 or labels.dtype.kind not in "iuUS":
        raise problems.fatal(f"{name} [{label_key}]", f"labels must be one integer or string per image, got "
                                                      f"{labels.dtype} {labels.shape}")
    if len(images) != len(labels):
        raise problems.fatal(name, f"{image_key} holds {len(images)} images but {label_key} holds {len(labels)} "
                                   "labels; they must pair up one to one")
    hwc = _channels_last(images, where, problems)
    hwc, finite = _as_uint8(hwc, where, problems)
    natural = _natural_ids(arrays, image_key, options, len(images), name, problems)
    records = []
    for row, label in enumerate(labels.tolist()):
        if not finite[row]:
            problems.bad(Where(where, row + 1), "NaN or infinity in the image")
            continue
        label = label.decode() if isinstance(label, bytes) else label
        records.append(ImageRecord(_picture(hwc, row), label, Where(where, row + 1), natural[row]))
    return records


def _channels_last(images: np.ndarray, where: str, problems: Problems) -> np.ndarray:
    """A view of the images as (N, H, W) or (N, H, W, C); channels are last when the last axis can be them and
    is no larger than the second (so (N, 3, 4, 4) is read as 4 x 4 RGB, (N, 4, 4, 3) as 4 x 4 RGB too)."""
    shape = images.shape
    if images.ndim == 3:
        return images
    if images.ndim == 4:
        if shape[3] in CHANNELS and (shape[1] not in CHANNELS or shape[3] <= shape[1]):
            return images
        if shape[1] in CHANNELS:
            return images.transpose(0, 2, 3, 1)  # (N, C, H, W) -> (N, H, W, C)
    raise problems.fatal(where, f"images must be (N, H, W), (N, H, W, C) or (N, C, H, W) with C in 1, 3, 4; got "
                                f"shape {shape}")


def _as_uint8(images: np.ndarray, where: str, problems: Problems) -> tuple[np.ndarray, np.ndarray]:
    """The images as uint8 (floats in [0, 1] scaled by 255) and, per image, whether all its values are finite."""
    rows = len(images)
    kind = images.dtype.kind
    if kind == "u" and images.dtype.itemsize == 1:
        return images, np.ones(rows, dtype=bool)
    if kind in "iu":
        low, high = (int(images.min()), int(images.max())) if images.size else (0, 0)
        if low < 0 or high > 255:
            raise problems.fatal(where, f"integer images must lie in [0, 255], found [{low}, {high}]")
        return images.astype(np.uint8), np.ones(rows, dtype=bool)
    if kind != "f":
        raise problems.fatal(where, f"images must be uint8 or floats in [0, 1], got {images.dtype}")
    finite = np.isfinite(images.reshape(rows, -1)).all(axis=1) if rows else np.ones(0, dtype=bool)
    good = images[finite]
    if good.size:
        low, high = float(good.min()), float(good.max())
        if low < 0 or high > 1:
            raise problems.fatal(where, f"float images must lie in [0, 1], found [{low:g}, {high:g}] (save uint8, "
                                        "or divide by 255)")
    scaled = np.zeros(images.shape, dtype=np.uint8)
    scaled[finite] = np.rint(good * 255).astype(np.uint8)
    return scaled, finite


def _natural_ids(arrays: dict[str, np.ndarray], image_key: str, options: DataOptions, rows: int, name: str,
                 problems: Problems) -> list[str]:
    column = options.natural_id_column
    if not column:
        return [""] * rows
    key = column if image_key in IMAGE_KEYS else f"{column}{image_key[1:]}"  # x_train -> <column>_train
    if key not in arrays:
        raise problems.fatal(name, f"no natural id array {key!r} (it holds {_listing(arrays)})")
    ids = arrays[key]
    if ids.ndim != 1 or len(ids) != rows:
        raise problems.fatal(name, f"{key} holds {ids.shape} values, {image_key} {rows} images")
    return [i.decode() if isinstance(i, bytes) else str(i) for i in ids.tolist()]


def _picture(images: np.ndarray, row: int):
    """Opens image `row` as a PIL image (L, RGB or RGBA) when called."""

    def open_image():
        from PIL import Image

        pixels = np.ascontiguousarray(images[row])
        return Image.fromarray(pixels[:, :, 0] if pixels.ndim == 3 and pixels.shape[2] == 1 else pixels)

    return open_image
