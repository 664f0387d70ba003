"""Tux Paint stamps (Debian tuxpaint-stamps-default), the multimodal task: stamp pictures (PNG, or SVG
rasterised) with their captions -> PairData (each picture's bytes kept beside its 32 px array: a PNG's own, an
SVG's rendering)."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np

from fedafd.runtime.data.fetch import locate
from fedafd.runtime.data.images import IMAGE_SIZE, from_pil
from fedafd.runtime.data.pictures import from_encoded
from fedafd.runtime.data.prepared import PairData, corrupt, load_prepared, stratified_split, subset

logger = logging.getLogger(__name__)

TUXPAINT_STAMPS = "usr/share/tuxpaint/stamps"
_SVG_RENDER_PX = 4 * IMAGE_SIZE  # SVGs are rasterised at this longest side, then resized like any picture


def _read_stamp_image(path: Path) -> tuple[np.ndarray, bytes]:
    """(the stamp's 32 px array, its picture's encoded bytes: a PNG's own, an SVG's rendering, which the 32 px
    array is made from, so that the two agree and the same stamps written as files read back as these rows)."""
    from PIL import Image

    if path.suffix == ".svg":
        import cairosvg

        # The longest side comes out >= _SVG_RENDER_PX whatever the aspect ratio; parsing costs more than
        # drawing, so one render at a fixed width beats measuring first.
        png = cairosvg.svg2png(url=str(path), output_width=_SVG_RENDER_PX, unsafe=True)
        return from_pil(Image.open(io.BytesIO(png))), png
    with Image.open(path) as img:
        return from_pil(img), path.read_bytes()


def _build_tuxpaint() -> dict[str, PairData]:
    from fedafd.runtime.data.text import tokenize

    stamps = locate(TUXPAINT_STAMPS, "tuxpaint")
    images, encoded, captions, categories = [], [], [], []
    for text_path in sorted(stamps.rglob("*.txt"), key=lambda p: p.relative_to(stamps).as_posix()):
        # A stamp is picture + caption file; PNG preferred where both a PNG and an SVG exist (83 stamps).
        picture = next((p for p in (text_path.with_suffix(".png"), text_path.with_suffix(".svg")) if p.exists()), None)
        if picture is None or len(text_path.relative_to(stamps).parts) < 2:
            continue
        with open(text_path, encoding="utf-8-sig", errors="replace") as f:
            caption = f.readline().strip()
        if not caption:
            continue
        try:
            image, original = _read_stamp_image(picture)
        except Exception as err:  # noqa: BLE001 - one unreadable stamp should not sink the data set
            logger.warning("skipping Tux Paint stamp %s: %s", picture, err)
            continue
        images.append(image)
        encoded.append(original)
        captions.append(caption)
        categories.append(text_path.relative_to(stamps).parts[0])
    if len(captions) < 100:
        raise corrupt("Tux Paint stamps", stamps, f"only {len(captions)} stamps with a picture and caption")
    group_names = tuple(sorted(set(categories)))
    groups = np.array([group_names.index(c) for c in categories], dtype=np.int64)
    input_ids, attention_mask = tokenize(captions)
    everything = PairData(np.stack(images), input_ids, attention_mask, tuple(captions), groups, group_names,
                          pictures=from_encoded(encoded))
    train, test = stratified_split(groups)
    return {"train": subset(everything, train), "test": subset(everything, test)}


def load_tuxpaint_pairs(split: str) -> PairData:
    """950 Tux Paint stamps (785 PNG, 165 SVG) with their people-written English captions, grouped by
    category folder (16): "train" 760 / "test" 190, a fixed stratified 80/20 split."""
    return load_prepared("tuxpaint", split, PairData, _build_tuxpaint)
