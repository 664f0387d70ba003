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


def device_colours(client_ids) -> dict[str, str]:
    """One colour per device, the same in every figure of a run (tab10; tab20 past ten devices, then repeating)."""
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    ids = sorted(client_ids)
    palette = colormaps["tab10" if len(ids) <= 10 else "tab20"].colors
    return {cid: to_hex(palette[i % len(palette)]) for i, cid in enumerate(ids)}


def new_figure(width_px: int, height_px: int, rows: int = 1, cols: int = 1) -> tuple[Figure, list[list[Axes]]]:
    """A figure of exactly width_px x height_px (constrained layout keeps the size) and its grid of axes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width_px / DPI, height_px / DPI), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure, figure.subplots(rows, cols, squeeze=False).tolist()


def per_round_axes(axes: Axes, title: str, ylabel: str = "") -> None:
    """Title and labels of a line plot over rounds: whole rounds on the x axis, a light grid, the legend."""
    axes.set_title(title)
    axes.set_xlabel("round")
    if ylabel:
        axes.set_ylabel(ylabel)
    axes.xaxis.get_major_locator().set_params(integer=True)
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize="small")


def png_bytes(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def data_uri(png: bytes) -> str:
    """A PNG as an `<img src=...>` value, so a page carries its figures inside itself."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")
