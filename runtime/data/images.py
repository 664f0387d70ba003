"""The one image format of the project: uint8 RGB arrays (N, 3, 32, 32), pictures centred on white.

Every image (grayscale Fashion-MNIST, colour emoji, transparent Tux Paint stamps) is brought here, so
every image encoder reads the same tensors. Models normalise internally; this module does not.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

IMAGE_SIZE = 32
"""Side of every image, in pixels."""

_BACKGROUND = (255, 255, 255)


def from_grayscale_28(batch: np.ndarray) -> np.ndarray:
    """(N, 28, 28) uint8 grayscale -> (N, 3, 32, 32): 2 px of zeros around (the Fashion-MNIST background
    is black), the channel replicated three times."""
    batch = np.asarray(batch)
    if batch.dtype != np.uint8 or batch.ndim != 3 or batch.shape[1:] != (28, 28):
        raise ValueError(f"expected uint8 (N, 28, 28), got {batch.dtype} {batch.shape}")
    pad = (IMAGE_SIZE - 28) // 2
    padded = np.pad(batch, ((0, 0), (pad, pad), (pad, pad)))  # (N, 32, 32)
    return np.repeat(padded[:, None], 3, axis=1)  # (N, 3, 32, 32)


def on_white(img: Image.Image) -> Image.Image:
    """RGB; pictures with transparency (RGBA, LA, P with a transparent index) composited on white."""
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, _BACKGROUND + (255,))
        canvas.alpha_composite(rgba)
        return canvas.convert("RGB")
    return img.convert("RGB")


def from_pil(img: Image.Image) -> np.ndarray:
    """Any PIL image -> (3, 32, 32) uint8 RGB: composited on white, the longest side fitted into 32 px
    keeping the aspect ratio (Lanczos), centred on a white canvas."""
    if img.width < 1 or img.height < 1:
        raise ValueError(f"empty image {img.size}")
    img.draft("RGB", (IMAGE_SIZE, IMAGE_SIZE))  # JPEG: decode at a reduced scale; other formats: no-op
    rgb = on_white(img)
    scale = IMAGE_SIZE / max(rgb.width, rgb.height)
    size = (max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale)))
    if size != rgb.size:
        # Composited before resizing, so transparent pixels' colours never bleed into the edges.
        rgb = rgb.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    canvas = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), _BACKGROUND)
    canvas.paste(rgb, ((IMAGE_SIZE - size[0]) // 2, (IMAGE_SIZE - size[1]) // 2))
    return np.asarray(canvas, dtype=np.uint8).transpose(2, 0, 1).copy()  # (H, W, 3) -> (3, H, W)


def to_float(batch: np.ndarray) -> np.ndarray:
    """uint8 images -> float32 in [0, 1], same shape."""
    batch = np.asarray(batch)
    if batch.dtype != np.uint8:
        raise ValueError(f"expected uint8 images, got {batch.dtype}")
    return batch.astype(np.float32) / np.float32(255.0)


FIT_RESIZES = ("shorter", "longer", "stretch")


def fit_picture(img: Image.Image, size: int, resize: str, mean: tuple[float, ...]) -> np.ndarray:
    """A picture at any size -> float32 (3, size, size) in [0, 1], as a tower's preprocessing says, composited
    on white first like from_pil: `shorter` scales the shorter side to `size` and crops the centre; `longer`
    scales the longer side to `size` and pads with the `mean` colour (0 once normalised); `stretch` scales
    both sides. Bilinear (torchvision's default; antialiased when shrinking). The one implementation of a
    tower's image transform: the feature cache and torch-free `infer` both call it."""
    if resize not in FIT_RESIZES:
        raise ValueError(f"resize must be one of {', '.join(FIT_RESIZES)}, got {resize!r}")
    if img.width < 1 or img.height < 1:
        raise ValueError(f"empty image {img.size}")
    rgb = on_white(img)
    w, h = rgb.size
    bilinear = Image.Resampling.BILINEAR
    if resize == "stretch":
        out = rgb.resize((size, size), bilinear)
    elif resize == "shorter":
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        scaled = rgb.resize((nw, nh), bilinear) if (nw, nh) != (w, h) else rgb
        left, top = (nw - size) // 2, (nh - size) // 2
        out = scaled.crop((left, top, left + size, top + size))
    else:
        scale = size / max(w, h)
        nw, nh = min(size, max(1, round(w * scale))), min(size, max(1, round(h * scale)))
        fill = tuple(int(round(255 * m)) for m in mean) if len(mean) == 3 else _BACKGROUND
        out = Image.new("RGB", (size, size), fill)
        out.paste(rgb.resize((nw, nh), bilinear) if (nw, nh) != (w, h) else rgb, ((size - nw) // 2, (size - nh) // 2))
    return np.asarray(out, dtype=np.float32).transpose(2, 0, 1) / np.float32(255.0)  # (3, S, S)
