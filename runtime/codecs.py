"""How a float32 tensor is stored in its wire frame: fp32 (raw), fp16, or int8 with per-row/per-column scales.

The header's tensor descriptor always gives the *decoded* dtype and shape; its `codec` says how the
frame stores it, so a receiver never guesses:

    codec      frame layout (little-endian)                          stated error, per element
    raw        the array's own bytes                                  exact
    fp16       count x float16                                        |x' - x| <= 2**-11 * |x| + 2**-25
    int8_row   R x float32 scales, then R*C x int8 (row-major)        |x' - x| <= scale_r / 2 (+ fp32 rounding)
    int8_col   C x float32 scales, then R*C x int8 (row-major)        |x' - x| <= scale_c / 2 (+ fp32 rounding)

For int8 a tensor is viewed as a matrix (R, C): rows = first dim, columns = the rest flattened
(int8_row) or rows = all but the last dim, columns = last dim (int8_col); a 0-d or 1-d tensor is one
row (int8_row) or one column (int8_col), i.e. one scale. scale = max |x| over the row (column) / 127,
q = round(x / scale) in [-127, 127], x' = q * scale. A feature matrix (P, d) with int8_row has one scale
per public sample, with int8_col one per feature dimension.

The fp16/int8 codecs apply to float32 tensors only; `choose` sends anything else raw, and sends 0-d and
1-d float32 tensors (biases, BatchNorm statistics: tiny and precision-sensitive) as fp16 when int8 was
asked for. The size of every frame follows from (codec, dtype, shape) alone (`frame_nbytes`), so the
receiver checks frame lengths before it allocates anything.
"""

from __future__ import annotations

import math

import numpy as np

CODECS = ("raw", "fp16", "int8_row", "int8_col")
"""Codec names as they appear in the header."""
FEATURE_CODECS = ("fp32", "fp16", "int8_row", "int8_col")
"""Config names (fp32 is the wire's `raw` for float32 tensors)."""
FP16_MAX = 65504.0
_Q = 127.0


class CodecError(ValueError):
    """A tensor cannot be stored with this codec (or a frame does not fit its codec)."""


def wire_codec(config_name: str) -> str:
    """Config value (fp32/fp16/int8_row/int8_col) -> header codec name."""
    if config_name not in FEATURE_CODECS:
        raise CodecError(f"unknown codec {config_name!r}; choose one of {', '.join(FEATURE_CODECS)}")
    return "raw" if config_name == "fp32" else config_name


def choose(requested: str, arr: np.ndarray) -> str:
    """The codec a tensor actually travels with, given the one asked for its field."""
    if requested == "raw" or arr.dtype != np.float32:
        return "raw"
    if requested.startswith("int8") and arr.ndim < 2:
        return "fp16"
    return requested


def _matrix(codec: str, shape: tuple[int, ...]) -> tuple[int, int]:
    count = math.prod(shape)
    if len(shape) < 2:
        return (1, count) if codec == "int8_row" else (count, 1)
    if codec == "int8_row":
        return shape[0], count // shape[0] if shape[0] else 0
    return count // shape[-1] if shape[-1] else 0, shape[-1]


def _num_scales(codec: str, shape: tuple[int, ...]) -> int:
    rows, cols = _matrix(codec, shape)
    return rows if codec == "int8_row" else cols


def frame_nbytes(codec: str, dtype: str, shape: tuple[int, ...]) -> int:
    """Exact frame length of a tensor of decoded (dtype, shape) stored with `codec`."""
    count = math.prod(shape)
    if codec == "raw":
        return count * np.dtype(dtype).itemsize
    if dtype != "float32":
        raise CodecError(f"codec {codec} stores float32 tensors only, got {dtype}")
    if codec == "fp16":
        return count * 2
    if codec in ("int8_row", "int8_col"):
        return 4 * _num_scales(codec, shape) + count
    raise CodecError(f"unknown codec {codec!r} (known: {', '.join(CODECS)})")


def encode(arr: np.ndarray, codec: str) -> memoryview:
    """The frame bytes of `arr` (raw: a zero-copy view of its buffer; others: a new buffer)."""
    if codec == "raw":
        arr = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<"))
        return memoryview(arr.reshape(-1).view(np.uint8))
    if arr.dtype != np.float32:
        raise CodecError(f"codec {codec} stores float32 tensors only, got {arr.dtype}")
    if codec == "fp16":
        peak = float(np.abs(arr).max()) if arr.size else 0.0
        if peak > FP16_MAX:
            raise CodecError(f"a value of magnitude {peak:.3g} exceeds float16's range ({FP16_MAX:g}); use fp32")
        return memoryview(np.ascontiguousarray(arr, dtype="<f2").reshape(-1).view(np.uint8))
    if codec in ("int8_row", "int8_col"):
        rows, cols = _matrix(codec, arr.shape)
        x = np.ascontiguousarray(arr).reshape(rows, cols)
        axis = 1 if codec == "int8_row" else 0
        scales = (np.abs(x).max(axis=axis) / _Q).astype(np.float32) if x.size else np.zeros(
            rows if axis == 1 else cols, np.float32)
        safe = np.where(scales > 0, scales, np.float32(1.0))
        divisor = safe[:, None] if axis == 1 else safe[None, :]
        q = np.clip(np.rint(x / divisor), -_Q, _Q).astype(np.int8)
        out = np.empty(4 * scales.size + q.size, np.uint8)
        out[: 4 * scales.size] = scales.astype("<f4").view(np.uint8)
        out[4 * scales.size:] = q.reshape(-1).view(np.uint8)
        return memoryview(out)
    raise CodecError(f"unknown codec {codec!r} (known: {', '.join(CODECS)})")


def decode(codec: str, dtype: str, shape: tuple[int, ...], buf: memoryview) -> np.ndarray:
    """The read-only array a frame holds. `buf` must already have `frame_nbytes` bytes."""
    if codec == "raw":
        arr = np.frombuffer(buf, dtype=np.dtype(dtype).newbyteorder("<")).reshape(shape)
    elif codec == "fp16":
        arr = np.frombuffer(buf, dtype="<f2").astype(np.float32).reshape(shape)
    elif codec in ("int8_row", "int8_col"):
        rows, cols = _matrix(codec, shape)
        n = _num_scales(codec, shape)
        scales = np.frombuffer(buf[: 4 * n], dtype="<f4")
        q = np.frombuffer(buf[4 * n:], dtype=np.int8).reshape(rows, cols)
        factor = scales[:, None] if codec == "int8_row" else scales[None, :]
        arr = (q.astype(np.float32) * factor).reshape(shape)
    else:
        raise CodecError(f"unknown codec {codec!r} (known: {', '.join(CODECS)})")
    arr.flags.writeable = False
    return arr


def error_bound(codec: str, arr: np.ndarray) -> np.ndarray:
    """Per-element bound on |decode(encode(arr)) - arr| that this module promises (for tests and docs)."""
    x = np.asarray(arr, np.float32)
    if codec == "raw":
        return np.zeros_like(x)
    if codec == "fp16":
        return np.abs(x) * 2.0**-11 + 2.0**-25
    rows, cols = _matrix(codec, x.shape)
    m = np.abs(x.reshape(rows, cols))
    peak = m.max(axis=1, keepdims=True) if codec == "int8_row" else m.max(axis=0, keepdims=True)
    # half a quantisation step, plus float32 rounding of the scale and of the product
    bound = peak / _Q * 0.5 + peak * 2.0**-22
    return np.broadcast_to(bound, (rows, cols)).reshape(x.shape)
