"""Emoji pairs (Debian fonts-noto-color-emoji, unicode-data), the public set: each emoji drawn from the
colour font and captioned with its Unicode name -> PairData (the drawing kept as PNG at the font's own size,
136x128, beside its 32 px array)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from fedafd.runtime.data.fetch import locate
from fedafd.runtime.data.images import from_pil
from fedafd.runtime.data.pictures import from_encoded, png_bytes
from fedafd.runtime.data.prepared import PairData, corrupt, load_prepared, stratified_split, subset

logger = logging.getLogger(__name__)

EMOJI_FONT = "usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
EMOJI_TEST = "usr/share/unicode/emoji/emoji-test.txt"
EMOJI_FONT_SIZE = 109  # the only size at which FreeType loads the font's 136x128 colour bitmaps
_SKIN_TONES = range(0x1F3FB, 0x1F400)


def _read_emoji_list(path: Path) -> list[tuple[str, str, str]]:
    """(emoji, English name, group) for every fully-qualified emoji of emoji-test.txt without a skin tone.
    Lines read `1F600 ; fully-qualified # 😀 E1.0 grinning face` under `# group: ...` headings."""
    rows, group = [], None
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.startswith("# group:"):
                group = line.split(":", 1)[1].strip()
                continue
            if not line.strip() or line.startswith("#"):
                continue
            codes, _, rest = line.partition(";")
            status, _, comment = rest.partition("#")
            parts = comment.split(None, 2)
            try:
                points = [int(code, 16) for code in codes.split()]
            except ValueError:
                points = []
            if not points or len(parts) != 3 or group is None:
                raise corrupt("emoji list", path, f"line {number} is not an emoji entry")
            if status.strip() != "fully-qualified" or any(p in _SKIN_TONES for p in points):
                continue
            rows.append(("".join(map(chr, points)), parts[2].strip(), group))
    if not rows:
        raise corrupt("emoji list", path, "no fully-qualified emoji")
    return rows


def _render_emoji(font, emoji: str) -> tuple[np.ndarray, bytes]:
    """The emoji drawn on white: (its 32 px array, the drawing as PNG)."""
    from PIL import Image, ImageDraw

    _, _, right, bottom = font.getbbox(emoji)
    canvas = Image.new("RGB", (max(1, right), max(1, bottom)), (255, 255, 255))
    ImageDraw.Draw(canvas).text((0, 0), emoji, font=font, embedded_color=True)
    return from_pil(canvas), png_bytes(canvas)


def _build_emoji() -> dict[str, PairData]:
    from PIL import ImageFont

    from fedafd.runtime.data.text import tokenize

    rows = _read_emoji_list(locate(EMOJI_TEST, "emoji"))
    font_path = locate(EMOJI_FONT, "emoji")
    try:
        font = ImageFont.truetype(str(font_path), EMOJI_FONT_SIZE)
    except OSError as err:
        raise corrupt("emoji font", font_path, str(err)) from None
    rendered = [_render_emoji(font, emoji) for emoji, _, _ in rows]
    images = np.stack([image for image, _ in rendered])  # (N, 3, 32, 32)
    encoded = [png for _, png in rendered]
    blank = np.flatnonzero((images == 255).all(axis=(1, 2, 3)))
    if len(blank):  # a glyph the font lacks: keep the pair set honest by dropping it
        logger.warning("the emoji font has no picture for %d emoji, e.g. %s", len(blank), rows[blank[0]][1])
        keep = np.setdiff1d(np.arange(len(rows)), blank)
        images, rows, encoded = images[keep], [rows[i] for i in keep], [encoded[i] for i in keep]
    group_names = tuple(dict.fromkeys(group for _, _, group in rows))
    groups = np.array([group_names.index(group) for _, _, group in rows], dtype=np.int64)
    captions = tuple(name for _, name, _ in rows)
    input_ids, attention_mask = tokenize(list(captions))
    everything = PairData(images, input_ids, attention_mask, captions, groups, group_names,
                          pictures=from_encoded(encoded))
    train, test = stratified_split(groups)
    return {"train": subset(everything, train), "test": subset(everything, test)}


def load_emoji_pairs(split: str) -> PairData:
    """1,870 base emoji (fully-qualified, no skin tones) drawn from Noto Color Emoji, captioned with their
    Unicode names, grouped by emoji group (9): "train" 1,496 (the public set P) / "test" 374 (the server's
    held-out retrieval split), a fixed stratified 80/20 split."""
    return load_prepared("emoji", split, PairData, _build_emoji)
