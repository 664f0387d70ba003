"""Every row's picture as its source encodes it, beside the 32 px array (images.py) that training reads: what a
pretrained tower with an input size of its own (a 224 px ResNet) is fed.

`Pictures` holds the encoded bytes of a split's pictures end to end (`blob`) and each row's span into them. A
picture that is a file keeps the file's own bytes (a JPEG stays that JPEG); a picture a reader makes in memory
(an npz or CIFAR array, a rendered emoji) is encoded losslessly as PNG. Rows of one picture (a pair's captions)
share one span, so its bytes are kept once. With the data config's max_picture_side, a picture whose longer
side is larger is kept downscaled (aspect ratio kept, Lanczos) as PNG. A split whose every picture is 32x32
(CIFAR, Fashion-MNIST) keeps none: its 32 px array is the picture itself (build.py).

Joined splits (`concat`) keep each part's bytes where they are: `blobs` may be several arrays, read as one
(the spans are offsets into all of them laid end to end), so joining two memory-mapped splits copies nothing.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from fedafd.runtime.data.images import on_white  # the 32 px array's compositing, so both agree

PNG_MODES = ("1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA")
"""Modes PNG stores as they are; a picture in any other mode is stored as RGB(A)."""


@dataclass(frozen=True, eq=False)
class Pictures:
    """The encoded pictures of a split's rows: row i's picture is bytes [spans[i, 0], spans[i, 1]) of `blobs`
    laid end to end."""

    blobs: tuple[np.ndarray, ...]
    """uint8 (T_k,) each: the encoded bytes, one array per joined part (usually one)."""
    spans: np.ndarray
    """int64 (N, 2): row i's [start, end) in the blobs."""
    _starts: np.ndarray = field(init=False, repr=False)
    """int64 (K + 1,): where each blob begins in the blobs laid end to end, then their total."""

    def __post_init__(self) -> None:
        if any(b.dtype != np.uint8 or b.ndim != 1 for b in self.blobs):
            raise ValueError(f"picture blobs must be uint8 (T,), got {[(b.dtype, b.shape) for b in self.blobs]}")
        if self.spans.dtype != np.int64 or self.spans.ndim != 2 or self.spans.shape[1] != 2:
            raise ValueError(f"picture spans must be int64 (N, 2), got {self.spans.dtype} {self.spans.shape}")
        starts = np.cumsum([0] + [len(b) for b in self.blobs], dtype=np.int64)
        if len(self.spans) and (self.spans[:, 0].min() < 0 or self.spans[:, 1].max() > starts[-1]
                                or (self.spans[:, 1] < self.spans[:, 0]).any()):
            raise ValueError(f"picture spans outside the {int(starts[-1])} bytes of their blobs")
        object.__setattr__(self, "_starts", starts)

    @property
    def blob(self) -> np.ndarray:
        """The bytes as one uint8 (T,) array: the blob itself, or (joined splits) a copy of them all."""
        return self.blobs[0] if len(self.blobs) == 1 else np.concatenate(self.blobs)

    def __len__(self) -> int:
        return len(self.spans)

    def select(self, indices: np.ndarray) -> Pictures:
        """Rows `indices` (the bytes are shared, not copied)."""
        return Pictures(self.blobs, self.spans[np.asarray(indices, dtype=np.int64)])

    def pieces(self, start: int, end: int) -> list[np.ndarray]:
        """Bytes [start, end) of the blobs laid end to end, as views of the blobs (one per blob they cross)."""
        found = []
        first = int(np.searchsorted(self._starts, start, side="right")) - 1
        for k in range(max(first, 0), len(self.blobs)):
            low, high = max(start, self._starts[k]), min(end, self._starts[k + 1])
            if low >= high:
                break
            found.append(self.blobs[k][low - self._starts[k]:high - self._starts[k]])
        return found

    def encoded(self, i: int) -> bytes:
        """Row i's picture as its encoded bytes (a file's own, or PNG)."""
        start, end = (int(v) for v in self.spans[i])
        return b"".join(piece.tobytes() for piece in self.pieces(start, end))

    def open(self, i: int) -> Image.Image:
        """Row i's picture, decoded: RGB at its stored size, transparency composited on white as the 32 px
        array's is (images.from_pil)."""
        with Image.open(io.BytesIO(self.encoded(i))) as img:
            return on_white(img)

    def distinct(self) -> tuple[np.ndarray, np.ndarray]:
        """(which int64 (N,), spans int64 (P, 2)): each picture once, numbered in the order rows first show
        it, and row i shows picture which[i]. Where the bytes lie does not matter: the same rows cut out of
        a larger set, or kept in another blob, give the same pictures."""
        if len(self.spans) == 0:
            return np.zeros(0, np.int64), np.zeros((0, 2), np.int64)
        _, first, inverse = np.unique(self.spans[:, 0], return_index=True, return_inverse=True)
        order = np.argsort(first, kind="stable")
        rank = np.empty(len(first), dtype=np.int64)
        rank[order] = np.arange(len(first))
        return rank[inverse.reshape(-1)], np.asarray(self.spans[first[order]])


def concat_pictures(parts: list[Pictures]) -> Pictures:
    """The rows of every part in order: the parts' blobs side by side (not copied), their spans shifted."""
    blobs: list[np.ndarray] = []
    spans = []
    offset = 0
    for part in parts:
        blobs += part.blobs
        spans.append(part.spans + offset)
        offset += int(part._starts[-1])
    return Pictures(tuple(blobs), np.concatenate(spans).astype(np.int64, copy=False))


def from_encoded(encoded: list[bytes], rows: np.ndarray | None = None) -> Pictures:
    """Pictures of a set built in memory (the bundled ones): `encoded` end to end; row i shows picture
    rows[i] (None: picture i)."""
    lengths = np.array([len(e) for e in encoded], dtype=np.int64)
    ends = np.cumsum(lengths)
    spans = np.stack([ends - lengths, ends], axis=1).reshape(-1, 2)  # (P, 2)
    blob = np.frombuffer(b"".join(encoded), dtype=np.uint8)
    return Pictures((blob,), spans if rows is None else spans[np.asarray(rows, dtype=np.int64)])


# --- what a picture's bytes are ------------------------------------------------------------------


def source_bytes(img: Image.Image) -> bytes | None:
    """The encoded bytes `img` was opened from, read before it is decoded: its file's, or its in-memory buffer's
    (Image.open of a path or a BytesIO). None for a picture made in memory (Image.fromarray, a drawing)."""
    if getattr(img, "filename", ""):
        return Path(img.filename).read_bytes()
    fp = getattr(img, "fp", None)
    if isinstance(fp, io.BytesIO):
        return fp.getvalue()
    return None


def png_bytes(img: Image.Image) -> bytes:
    """`img` encoded losslessly as PNG (a mode PNG does not store becomes RGB, or RGBA where it has alpha)."""
    if img.mode not in PNG_MODES:
        img = img.convert("RGBA" if "A" in img.getbands() else "RGB")
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return buffer.getvalue()


def cap_picture(encoded: bytes, max_side: int) -> bytes:
    """`encoded` as it is when its longer side is at most `max_side` (0: no cap); else composited on white (as
    the 32 px array is, so no transparent pixel's colour bleeds in), downscaled to `max_side` keeping the
    aspect ratio (Lanczos) and encoded as PNG."""
    if not max_side:
        return encoded
    with Image.open(io.BytesIO(encoded)) as img:
        if max(img.size) <= max_side:
            return encoded
        scale = max_side / max(img.size)
        size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
        img.draft("RGB", size)  # JPEG: decode at the smallest scale still at least `size`
        rgb = on_white(img)
        return png_bytes(rgb.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0))
