"""The words both sides and every layer share: the two modalities and the three kinds of device (which
modalities each holds). Kept apart from the wire, so that a module that needs only these names does not
depend on the message formats."""

from __future__ import annotations

MODALITIES = ("image", "text")
MODALITIES_OF_KIND: dict[str, tuple[str, ...]] = {
    "image": ("image",), "text": ("text",), "multimodal": ("image", "text"),
}
"""Which modalities' features each kind of device sends (and which global towers it fuses with)."""
CLIENT_KINDS = tuple(MODALITIES_OF_KIND)


def other_modality(modality: str) -> str:
    return "text" if modality == "image" else "image"
