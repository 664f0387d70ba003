"""Figures for a run's report and bandwidth profile: matplotlib on its Agg canvas (no pyplot, so no global
state and no display), written as PNG bytes."""

from __future__ import annotations

import base64
import io
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

DPI = 100
KIND_COLOURS = {"image": "tab:blue", "text": "tab:orange", "multimodal": "tab:green"}
"""One colour per device kind in every figure."""


def kind_colour(kind: str) -> str:
    return KIND_COLOURS.get(kind, "tab:gray")


def new_figure(width_px: int, height_px: int, rows: int = 1, cols: int = 1) -> tuple[Figure, list[list[Axes]]]:
    """A figure of exactly width_px x height_px (constrained layout keeps the size) and its grid of axes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width_px / DPI, height_px / DPI), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure, figure.subplots(rows, cols, squeeze=False).tolist()


def png_bytes(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def data_uri(png: bytes) -> str:
    """A PNG as an `<img src=...>` value, so a page carries its figures inside itself."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")
