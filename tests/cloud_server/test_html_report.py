"""`fedafd-cloud report RUN_DIR --html` on a real two-round federation (in-process transport, real wire), opened
in headless Chromium: every figure decodes, the sections are there, the numbers are metrics.jsonl's; and
`profile`'s profile.png drawn by matplotlib."""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from fedafd.cloud_server.cli import app as cloud_cli
from fedafd.runtime.config import ClientConfig, ServerConfig, build_config, write_config
from fedafd.cloud_server.reporting.html_report import format_value, html_page
from fedafd.cloud_server.reporting.report import read_metrics, summarize_round

KINDS = ("image", "text", "multimodal")
DIAGNOSTIC_PLOTS = {"plot-diag-disc", "plot-diag-gates", "plot-diag-upload-cos", "plot-diag-task", "plot-diag-sed",
                    "plot-diag-stage3"}
PLOTS = {"plot-metrics", "plot-server", "plot-bytes", "plot-cumulative", "plot-timings", "plot-sed", *DIAGNOSTIC_PLOTS}
SECTIONS = {"summary", "metrics", "server", "bandwidth", "timings", "sed", "diagnostics", "dropped", "rejected"}
JUNK = [b"not a fedafd message"]
DROP_REASON = "silent for 30s (heartbeat_timeout_s)"


class _JunkFirst:
    """A device transport that sends one malformed message before its first real one: the server rejects it."""

    def __init__(self, inner):
        self.inner, self.sent_junk = inner, False

    def send(self, frames) -> None:
        if not self.sent_junk:
            self.sent_junk = True
            self.inner.send(JUNK)
        self.inner.send(frames)

    def recv(self, timeout_s: float):
        return self.inner.recv(timeout_s)

    def close(self) -> None:
        self.inner.close()


@pytest.fixture(scope="module")
def run_dir(inproc_federation, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("run")
    config = build_config(ServerConfig, dict(
        rounds=2, baa=True, expected_clients=3, min_clients=3, public_size=48, feature_dim=16, image_arch="cnn_small",
        text_arch="gru", batch_size=16, device="cpu", join_timeout_s=60, round_deadline_s=120))
    write_config(config, run_dir / "config.json")
    clients = [build_config(ClientConfig, dict(kind=kind, max_private=48, max_test=32, batch_size=16)) for kind in KINDS]
    inproc_federation(config, run_dir, clients, wrap=lambda c, t: _JunkFirst(t) if c.kind == "text" else t)
    # A real drop costs a heartbeat timeout (tests/test_faults.py has one); here round 2 records one by hand.
    records = read_metrics(run_dir / "metrics.jsonl")
    records[1]["dropped"] = {"image-9": DROP_REASON}
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run_dir


class _Page(HTMLParser):
    """The page's images (attributes), the text of each element with an id, and every URL it refers to."""

    def __init__(self, text: str):
        super().__init__()
        self.images: dict[str, dict[str, str]] = {}
        self.text_of: dict[str, str] = {}
        self.ids: set[str] = set()
        self.urls: list[str] = []
        self.rows: dict[str, list[list[str]]] = {}
        self._open: list[tuple[str, str]] = []  # (tag, id) of the open elements that have an id
        self._table: str | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.urls += [v for k, v in attrs.items() if k in ("src", "href") and v]
        if tag == "img":
            self.images[attrs["id"]] = attrs
        elif "id" in attrs:
            self.ids.add(attrs["id"])
            self.text_of[attrs["id"]] = ""
            self._open.append((tag, attrs["id"]))
        if tag == "table":
            self._table = attrs.get("id")
            self.rows[self._table] = []
        if tag == "tr" and self._table:
            self.rows[self._table].append([])

    def handle_data(self, data):
        for _, element in self._open:
            self.text_of[element] += data
        if self._table and self.rows[self._table] and self.lasttag in ("td", "th"):
            self.rows[self._table][-1].append(data)

    def handle_endtag(self, tag):
        if self._open and self._open[-1][0] == tag:
            self._open.pop()
        if tag == "table":
            self._table = None


def _png_of(src: str) -> Image.Image:
    prefix = "data:image/png;base64,"
    assert src.startswith(prefix)
    image = Image.open(io.BytesIO(base64.b64decode(src[len(prefix):])))
    image.load()
    return image


@pytest.fixture(scope="module")
def page(run_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, _Page]:
    out = tmp_path_factory.mktemp("page") / "report.html"
    result = CliRunner().invoke(cloud_cli, ["report", str(run_dir), "--html", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out, _Page(out.read_text())


def test_page_is_self_contained_with_every_section_and_plot(page) -> None:
    _, parsed = page
    assert SECTIONS <= parsed.ids and set(parsed.images) == PLOTS
    # Nothing to fetch: every URL is an embedded PNG.
    assert parsed.urls and all(url.startswith("data:image/png;base64,") for url in parsed.urls)
    for image_id, attrs in parsed.images.items():
        image = _png_of(attrs["src"])
        assert image.format == "PNG" and image.width >= 900 and image.height >= 300, image_id
        assert len(image.getcolors(1 << 24)) > 20, f"{image_id} is blank"


def test_numbers_in_the_page_are_those_of_metrics_jsonl(page, run_dir: Path) -> None:
    _, parsed = page
    records = read_metrics(run_dir / "metrics.jsonl")
    last = records[-1]
    assert parsed.text_of["final-server_r1_sum"] == f"{last['server']['r1_sum']:.2f}"
    assert parsed.text_of["final-server_rsum"] == f"{last['server']['rsum']:.2f}"
    # One device per kind, so the kind's mean is that device's number.
    assert parsed.text_of["final-image_top1"] == f"{last['clients']['image-0']['metrics']['top1']:.2f}"
    assert parsed.text_of["final-mm_pers_t2i_r1"] == f"{last['clients']['multimodal-0']['metrics']['pers_t2i_r1']:.2f}"
    up = sum(sum(b["up"].values()) for b in last["bytes"].values()) / len(last["bytes"])
    assert parsed.text_of["final-up_bytes_per_client"] == f"{up / 1e6:.3f}"
    header, *rows = parsed.rows["rounds"]
    assert len(rows) == len(records) == 2
    for row, record in zip(rows, records):
        summary = summarize_round(record)
        assert dict(zip(header, row))["server rsum"] == f"{record['server']['rsum']:.2f}"
        assert row == [format_value(k, summary[k]) for k in summary]
    # The rejected junk (decoded by the server's real wire) and the dropped device, one row each.
    assert parsed.rows["dropped-table"][1:] == [["2", "image-9", DROP_REASON]]
    rejected = [r for r in last["rejected"] + records[0]["rejected"] if r["peer"] == "text-0"]
    assert len(rejected) == 1
    [rejected_row] = [row for row in parsed.rows["rejected-table"][1:] if row[1] == "text-0"]
    assert rejected_row[2:4] == [rejected[0]["code"], "1"]
    assert parsed.text_of["rejected"].startswith(f"Rejected messages ({sum(len(r['rejected']) for r in records)})")
    # The learning diagnostics: the server's R@1 sum around stage 3 in the final numbers, and the last round's
    # device diagnostics table, both metrics.jsonl's.
    server = last["diagnostics"]["server"]
    assert parsed.text_of["final-server_r1_sum_before_stage3"] == f"{server['r1_sum_before_stage3']:.2f}"
    assert parsed.text_of["final-server_stage3_r1_sum_delta"] == f"{server['stage3_r1_sum_delta']:.2f}"
    header, *rows = parsed.rows["diagnostics-table"]
    table = {row[0]: dict(zip(header[1:], row[1:])) for row in rows}
    assert set(table) == {"image-0", "text-0", "multimodal-0"}
    image, multimodal = last["clients"]["image-0"]["diagnostics"], last["clients"]["multimodal-0"]["diagnostics"]
    assert table["image-0"]["disc_acc_intra"] == f"{image['disc_acc_intra']:.3f}"
    assert table["image-0"]["logit_norm"] == f"{image['logit_norm']:.3f}"
    assert table["multimodal-0"]["text gate1_mean"] == f"{multimodal['text']['gate1_mean']:.3f}"
    assert table["multimodal-0"]["logit_norm"] == "-"  # a retrieval device has no logits


def test_a_run_without_diagnostics_skips_their_plots(run_dir: Path) -> None:
    # Prepare: the run's records without any diagnostics (as a LOCAL run has no BAA, SED or stage 3, or a run
    # from before the diagnostics existed)
    records = read_metrics(run_dir / "metrics.jsonl")
    for record in records:
        record.pop("diagnostics")
        for client in record["clients"].values():
            client.pop("diagnostics")
    # Execute
    parsed = _Page(html_page(records, {}, "no diagnostics"))
    # Assert: every other plot is there, each diagnostic one is replaced by a note
    assert set(parsed.images) == PLOTS - DIAGNOSTIC_PLOTS
    assert "BAA did not run" in parsed.text_of["diagnostics"] and "stage 3 never distilled" in parsed.text_of["diagnostics"]


CHECK_IMAGES = """<script>
window.addEventListener("load", () => {
  for (const img of document.images) {
    img.dataset.loaded = String(img.complete && img.naturalWidth > 0);
    img.dataset.naturalWidth = String(img.naturalWidth);
  }
  document.body.dataset.checked = "yes";
});
</script>"""


def _chromium(*args: str, profile: Path) -> subprocess.CompletedProcess:
    # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start.
    return subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           f"--user-data-dir={profile}", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(shutil.which("chromium") is None,
                    reason="needs Debian's chromium (setup.sh installs it: apt-get install -y chromium)")
def test_a_real_browser_loads_every_image_and_draws_the_page(page, tmp_path: Path) -> None:
    path, parsed = page
    # A copy with a script that writes what the browser decoded into the DOM; the page itself has none.
    checked = tmp_path / "checked.html"
    checked.write_text(path.read_text().replace("</body>", CHECK_IMAGES + "</body>"))
    dom = _chromium("--virtual-time-budget=10000", "--dump-dom", checked.as_uri(), profile=tmp_path / "chrome")
    assert dom.returncode == 0, dom.stderr[-2000:]
    loaded = _Page(dom.stdout)
    assert 'data-checked="yes"' in dom.stdout, "the load event never fired"
    assert set(loaded.images) == PLOTS
    for image_id, attrs in loaded.images.items():
        assert attrs["data-loaded"] == "true", image_id
        assert int(attrs["data-natural-width"]) == _png_of(parsed.images[image_id]["src"]).width, image_id

    shot = tmp_path / "report.png"
    result = _chromium("--window-size=1200,1600", f"--screenshot={shot}", path.as_uri(), profile=tmp_path / "chrome")
    assert result.returncode == 0, result.stderr[-2000:]
    with Image.open(shot) as image:
        assert image.format == "PNG" and image.size == (1200, 1600)
        # Not blank: text, table rules and the first plots' colours, not one background colour.
        assert len(image.convert("RGB").getcolors(1 << 24)) > 100


def test_profile_png_is_drawn_by_matplotlib_with_a_line_per_kind(run_dir: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(cloud_cli, ["profile", str(run_dir), "--format", "json", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    with Image.open(tmp_path / "profile.png") as image:
        assert image.format == "PNG" and image.size == (900, 520)
        assert "matplotlib" in image.info.get("Software", "")
        colours = {rgb for _, rgb in image.convert("RGB").getcolors(1 << 24)}
    # tab10's first three colours, one per device (sorted ids): each device's lines are drawn.
    assert {(31, 119, 180), (255, 127, 14), (44, 160, 44)} <= colours
    profile = json.loads(result.output)
    for client in profile["clients"].values():
        per_round = 2 * 4 * client["num_params"]  # FedAvg: the fp32 model down and up
        assert client["fedavg_cumulative_bytes"] == [per_round, 2 * per_round]


def test_clear_errors_for_an_empty_run_and_out_without_html(run_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text("")
    empty = CliRunner().invoke(cloud_cli, ["report", str(tmp_path), "--html"])
    assert empty.exit_code == 2 and "no finished round yet" in empty.output and not (tmp_path / "report.html").exists()
    stray = CliRunner().invoke(cloud_cli, ["report", str(run_dir), "--out", str(tmp_path / "r.html")])
    assert stray.exit_code == 2 and "pass --html too" in stray.output
