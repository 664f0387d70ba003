"""The load benchmark's fits and plot, on hand-made results (the benchmark itself takes minutes)."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from fedafd.benchmarks.load import fit_line, fits, plot


def test_fit_line_by_hand() -> None:
    # On the line y = 0.5 x + 100: R^2 = 1. A tent (0,0), (1,3), (2,0): flat fit at the mean 1, residual = total = 6.
    assert fit_line([100, 200, 300], [150, 200, 250]) == pytest.approx({"slope": 0.5, "intercept": 100.0, "r2": 1.0})
    bent = fit_line([0, 1, 2], [0, 3, 0])  # least squares: slope 0, intercept 1, R^2 = 1 - 6/6
    assert bent == pytest.approx({"slope": 0.0, "intercept": 1.0, "r2": 0.0}, abs=1e-12)


def test_fits_and_plot_of_results(tmp_path: Path) -> None:
    results = [{"clients": n, "server_peak_rss_mb": 600 + 0.05 * n, "exchange_s": 0.004 * n} for n in (100, 500, 1000)]
    fit = fits(results)
    assert fit["rss_mb_per_device"] == pytest.approx(0.05) and fit["rss_intercept_mb"] == pytest.approx(600)
    assert fit["exchange_ms_per_device"] == pytest.approx(4.0) and fit["exchange_r2"] == pytest.approx(1.0)
    path = plot(results, fit, tmp_path / "load.png")
    with Image.open(path) as image:  # a real PNG of the figure's size (9 x 3.5 in at 110 dpi)
        assert image.format == "PNG" and image.size == (990, 385)
