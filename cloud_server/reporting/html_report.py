"""A run's report as one self-contained HTML page (`fedafd-cloud report RUN_DIR --html`): the config and final
numbers, then per round the devices' metrics by kind, the server's retrieval, bytes by part and against
FedAvg, stage timings, SED weights, the learning diagnostics, dropped devices and rejected messages. Figures are matplotlib PNGs
inside the page as data URIs; the page loads nothing else and runs no script."""

from __future__ import annotations

import json
from collections import Counter
from html import escape
from pathlib import Path

from fedafd.runtime.accounting import PARTS
from .bandwidth import cumulative_figure, profile_records
from fedafd.runtime.errors import FedafdError
from .plots import data_uri, device_colours, new_figure, per_round_axes, png_bytes
from .report import read_run, summarize_round

LABELS = {
    "server_r1_sum": "server R@1 sum (i2t + t2i)", "server_rsum": "server rsum",
    "image_top1": "image top-1", "image_pers_top1": "image top-1, personalised", "image_top1_bound": "image top-1 bound",
    "text_top1": "text top-1", "text_pers_top1": "text top-1, personalised", "text_top1_bound": "text top-1 bound",
    "mm_i2t_r1": "multimodal i2t R@1", "mm_t2i_r1": "multimodal t2i R@1",
    "mm_pers_i2t_r1": "multimodal i2t R@1, personalised", "mm_pers_t2i_r1": "multimodal t2i R@1, personalised",
    "up_bytes_per_client": "MB up per device", "down_bytes_per_client": "MB down per device",
    "server_r1_sum_before_stage3": "server R@1 sum before stage 3", "server_stage3_r1_sum_delta": "stage 3's R@1 sum change",
    "seconds": "seconds",
}
"""Column names for `summarize_round`'s keys (a key without one shows as itself)."""

KIND_PLOTS = {"image": ("image", ("top1", "pers_top1")), "text": ("text", ("top1", "pers_top1")),
              "multimodal": ("mm", ("i2t_r1", "t2i_r1", "pers_i2t_r1", "pers_t2i_r1"))}
"""Per device kind: its prefix in `summarize_round` and the metrics drawn (personalised ones dashed)."""

WIDTH = 1000
"""Pixels across every figure of the page (the page is 1100 wide)."""

CSS = """
body { font-family: sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f3f3f3; } td.text { text-align: left; }
img { max-width: 100%; display: block; margin: 0.6em 0; }
.note { color: #555; } .wide { overflow-x: auto; }
"""


def format_value(key: str, value: float) -> str:
    """How the page writes a `summarize_round` value (tests compare the page with metrics.jsonl through it)."""
    if key == "round":
        return str(int(value) + 1)
    if key.endswith("bytes_per_client"):
        return f"{value / 1e6:.3f}"
    return f"{value:.2f}"


def _table(header: list[str], rows: list[list[str]], table_id: str, text_columns: set[int] = frozenset()) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f'<td class="text">{escape(c)}</td>' if i in text_columns else f"<td>{escape(c)}</td>"
                                    for i, c in enumerate(row)) + "</tr>" for row in rows)
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _image(figure, image_id: str, alt: str) -> str:
    return f'<img id="{image_id}" alt="{escape(alt)}" src="{data_uri(png_bytes(figure))}">'


def _rounds(records: list[dict]) -> list[int]:
    return [record["round"] + 1 for record in records]


# -- figures -----------------------------------------------------------------------------------------
def metrics_figure(records: list[dict], summaries: list[dict]):
    kinds = [kind for kind, (prefix, keys) in KIND_PLOTS.items() if any(f"{prefix}_{keys[0]}" in s for s in summaries)]
    figure, [row] = new_figure(WIDTH, 340, 1, max(len(kinds), 1))
    for axes, kind in zip(row, kinds):
        prefix, keys = KIND_PLOTS[kind]
        for key in keys:
            points = [(r, s[f"{prefix}_{key}"]) for r, s in zip(_rounds(records), summaries) if f"{prefix}_{key}" in s]
            if points:
                axes.plot(*zip(*points), marker="o", linestyle="--" if key.startswith("pers_") else "-",
                          label=LABELS.get(f"{prefix}_{key}", key).removeprefix(f"{kind} "))
        per_round_axes(axes, f"{kind} devices", "%")
    return figure


def server_figure(records: list[dict]):
    figure, [[r1, rsum]] = new_figure(WIDTH, 320, 1, 2)
    rounds = _rounds(records)
    for key, label in (("i2t_r1", "i2t R@1"), ("t2i_r1", "t2i R@1"), ("r1_sum", "R@1 sum")):
        r1.plot(rounds, [record["server"][key] for record in records], marker="o", label=label)
    rsum.plot(rounds, [record["server"]["rsum"] for record in records], marker="o", color="tab:purple", label="rsum")
    for axes, title in ((r1, "server retrieval: R@1"), (rsum, "server retrieval: rsum (R@1+5+10 both ways)")):
        per_round_axes(axes, title)
    return figure


def bytes_by_part_figure(profile: dict, records: list[dict]):
    """Stacked bars: per round, what all devices' bytes carried, uplink and downlink apart."""
    figure, [[up, down]] = new_figure(WIDTH, 320, 1, 2)
    rounds = _rounds(records)
    index = {record["round"]: i for i, record in enumerate(records)}
    for axes, direction in ((up, "up"), (down, "down")):
        totals = {part: [0.0] * len(records) for part in PARTS}
        for client in profile["clients"].values():
            for row in client["rounds"]:
                for part, n in row[f"{direction}_parts"].items():
                    totals.setdefault(part, [0.0] * len(records))[index[row["round"]]] += n / 1e6
        bottom = [0.0] * len(records)
        for i, (part, values) in enumerate(totals.items()):
            if any(values):  # colour by the part's place in PARTS, the same in both panels
                axes.bar(rounds, values, bottom=bottom, label=part, color=f"C{i}")
                bottom = [b + v for b, v in zip(bottom, values)]
        axes.set_title(f"{'uplink' if direction == 'up' else 'downlink'}: MB per round, all devices")
        axes.set_xlabel("round")
        axes.set_xticks(rounds)
        axes.legend(fontsize="small")
    return figure


def timings_figure(records: list[dict]):
    figure, [[axes]] = new_figure(WIDTH, 300)
    rounds = _rounds(records)
    stages = list(dict.fromkeys(stage for record in records for stage in record["timings"]))
    bottom = [0.0] * len(records)
    for stage in stages:
        values = [record["timings"].get(stage, 0.0) for record in records]
        axes.bar(rounds, values, bottom=bottom, label=stage)
        bottom = [b + v for b, v in zip(bottom, values)]
    axes.set_title("server stage timings per round")
    axes.set_xlabel("round")
    axes.set_ylabel("seconds")
    axes.set_xticks(rounds)
    axes.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize="small")
    return figure


def sed_figure(records: list[dict], kinds: dict[str, str]):
    """Per modality, each device's SED weight (mean over the public set) per round; None if no round has any."""
    modalities = list(dict.fromkeys(m for record in records for m in record.get("sed_mean_weights", {})))
    if not modalities:
        return None
    figure, [row] = new_figure(WIDTH, 320, 1, len(modalities))
    rounds = _rounds(records)
    colours = device_colours(kinds)
    for axes, modality in zip(row, modalities):
        devices = sorted({cid for record in records for cid in record.get("sed_mean_weights", {}).get(modality, {})})
        for cid in devices:
            weights = [record.get("sed_mean_weights", {}).get(modality, {}).get(cid, float("nan")) for record in records]
            axes.plot(rounds, weights, marker="o", color=colours.get(cid, "tab:gray"), label=cid)
        per_round_axes(axes, f"SED weights, {modality} teacher", "mean weight (devices sum to 1)")
    return figure


# -- learning diagnostics (docs/implementation.md "Learning diagnostics"); each figure is None when the run has no such data --
def _diag(container: dict, path: tuple[str, ...]) -> float:
    """container["diagnostics"][path...], nan where absent (a round without it leaves a gap in the line)."""
    value = container.get("diagnostics", {})
    for key in path:
        value = value.get(key, {}) if isinstance(value, dict) else {}
    return float(value) if isinstance(value, (int, float)) else float("nan")


def _device_lines(records: list[dict], name: str) -> dict[tuple[str, str | None], list[float]]:
    """(device, modality or None) -> the device diagnostic `name` per round, for every device and modality
    that has it in some round (a modality's diagnostic is found under its modality's dict)."""
    keys = sorted({(cid, None) for r in records for cid, c in r["clients"].items() if name in c.get("diagnostics", {})}
                  | {(cid, m) for r in records for cid, c in r["clients"].items()
                     for m, v in c.get("diagnostics", {}).items() if isinstance(v, dict) and name in v},
                  key=lambda k: (k[0], k[1] or ""))
    return {(cid, m): [_diag(r["clients"].get(cid, {}), (name,) if m is None else (m, name)) for r in records]
            for cid, m in keys}


def _device_panel(axes, records: list[dict], lines: dict, colours: dict[str, str], title: str, ylabel: str,
                  legend: bool = True) -> None:
    """One line per (device, modality); the legend (with ten devices, a tall one) outside on the right."""
    rounds = _rounds(records)
    for (cid, modality), values in lines.items():
        style = "--" if modality == "text" else "-"  # a multimodal device's two modalities apart
        label = cid if modality is None else f"{cid} {modality}"
        axes.plot(rounds, values, marker="o", linestyle=style, color=colours.get(cid, "tab:gray"), label=label)
    per_round_axes(axes, title, ylabel)
    legend_box = axes.get_legend()
    if legend_box is not None:
        legend_box.remove()
    if legend and lines:
        axes.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize="small")


def _paired_device_figure(records: list[dict], kinds: dict[str, str], left: tuple[str, str, str],
                          right: tuple[str, str, str]):
    """Two panels of one per-device diagnostic each, `(key, title, y label)`; None when neither has data."""
    lines = [_device_lines(records, key) for key, _, _ in (left, right)]
    if not any(lines):
        return None
    figure, [row] = new_figure(WIDTH, 320, 1, 2)
    colours = device_colours(kinds)
    for axes, panel_lines, (_, title, label), legend in zip(row, lines, (left, right), (False, True)):
        _device_panel(axes, records, panel_lines, colours, title, label, legend=legend)
    return figure


def discriminator_figure(records: list[dict], kinds: dict[str, str]):
    """BAA: each device's D_in and D_cr balanced accuracy per round (0.5: chance)."""
    return _paired_device_figure(
        records, kinds, ("disc_acc_intra", "D_in (intra-modal): balanced accuracy", "real vs local, 0.5 = chance"),
        ("disc_acc_cross", "D_cr (cross-modal): balanced accuracy", "real vs local, 0.5 = chance"))


def gates_figure(records: list[dict], kinds: dict[str, str]):
    """GFF: each device's first- and second-level gate mean per round, per modality (the std is in the table)."""
    label = "mean gate (1: z is f_l, 0: z is f_g)"
    return _paired_device_figure(records, kinds, ("gate1_mean", "first-level gate M(f_l + f_g)", label),
                                 ("gate2_mean", "second-level gate M'(h)", label))


def upload_cosine_figure(records: list[dict], kinds: dict[str, str]):
    """Each device's mean cosine between the public features it uploaded and the server's G, per modality."""
    lines = _device_lines(records, "upload_cos")
    if not lines:
        return None
    figure, [[axes]] = new_figure(WIDTH, 300)
    _device_panel(axes, records, lines, device_colours(kinds), "uploaded public features against the server's G",
                  "mean cosine")
    return figure


def device_task_figure(records: list[dict], kinds: dict[str, str]):
    """Each classification device's mean logit norm (evaluation pass) and each device's task loss."""
    return _paired_device_figure(records, kinds, ("logit_norm", "head's logits: mean L2 norm (test split)", "norm"),
                                 ("task_loss", "task loss (mean over the round's steps)", "loss"))


def server_sed_figure(records: list[dict]):
    """Per modality: the normalised entropy of the SED weights and the teacher's cosine with the server's G."""
    modalities = [m for m in ("image", "text") if any(m in r.get("diagnostics", {}).get("server", {}) for r in records)]
    if not modalities:
        return None
    figure, [[entropy, cosine]] = new_figure(WIDTH, 320, 1, 2)
    rounds = _rounds(records)
    for modality in modalities:
        for axes, name in ((entropy, "sed_entropy"), (cosine, "teacher_cos")):
            axes.plot(rounds, [_diag(r, ("server", modality, name)) for r in records], marker="o", label=modality)
    per_round_axes(entropy, "SED weights: normalised entropy", "1 = plain mean, 0 = one device")
    per_round_axes(cosine, "teacher against the server's G", "mean cosine")
    return figure


def stage3_figure(records: list[dict]):
    """The server's R@1 sum just before and just after stage 3, in the rounds where it distilled."""
    before = [_diag(r, ("server", "r1_sum_before_stage3")) for r in records]
    if all(v != v for v in before):  # all nan: stage 3 never ran
        return None
    after = [_diag(r, ("server", "r1_sum_after_stage3")) for r in records]
    figure, [[axes]] = new_figure(WIDTH, 300)
    rounds = _rounds(records)
    axes.plot(rounds, before, marker="o", label="before stage 3")
    axes.plot(rounds, after, marker="o", label="after stage 3")
    per_round_axes(axes, "server R@1 sum (i2t + t2i) around stage 3", "R@1 sum")
    return figure


def privacy_figure(records: list[dict], kinds: dict[str, str]):
    """Differentially private devices: each one's spent epsilon per round (its budget dotted), and the run's own
    privacy-utility trace (its personalised top-1 against the epsilon spent so far). None without DP devices."""
    private = sorted({cid for r in records for cid, c in r["clients"].items() if "dp_epsilon" in c["metrics"]})
    if not private:
        return None
    figure, [[left, right]] = new_figure(WIDTH, 320, 1, 2)
    colours = device_colours(kinds)
    rounds = _rounds(records)
    for cid in private:
        metrics = [r["clients"].get(cid, {}).get("metrics", {}) for r in records]
        spent = [m.get("dp_epsilon", float("nan")) for m in metrics]
        left.plot(rounds, spent, marker="o", color=colours.get(cid, "tab:gray"), label=cid)
        budgets = [m["dp_budget"] for m in metrics if "dp_budget" in m]
        if budgets:
            left.axhline(budgets[-1], linestyle=":", color=colours.get(cid, "tab:gray"), linewidth=0.8)
        right.plot(spent, [m.get("pers_top1", float("nan")) for m in metrics], marker="o",
                   color=colours.get(cid, "tab:gray"), label=cid)
    per_round_axes(left, "epsilon spent (dotted: the budget)", "epsilon")
    right.set_title("personalised top-1 against epsilon spent")
    right.set_xlabel("epsilon spent")
    right.set_ylabel("top-1 %")
    right.grid(True, alpha=0.3)
    right.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize="small")
    return figure


def privacy_rows(record: dict) -> list[list[str]]:
    """Per DP device in `record`: epsilon spent, the budget, delta, whether it still trains."""
    return [[cid, f"{m['dp_epsilon']:.3g}", f"{m['dp_budget']:g}" if "dp_budget" in m else "-", f"{m['dp_delta']:g}",
             "yes" if m.get("dp_training") else "no (budget spent)"]
            for cid, c in sorted(record["clients"].items()) if "dp_epsilon" in (m := c["metrics"])]


def diagnostics_rows(record: dict) -> tuple[list[str], list[list[str]]]:
    """The table of a round's device diagnostics: one row per device, one column per diagnostic (a modality's
    as "modality name"), three decimals; "-" where a device has none."""
    flat = {cid: {(f"{k} {n}" if isinstance(v, dict) else k): x
                  for k, v in client.get("diagnostics", {}).items()
                  for n, x in (v.items() if isinstance(v, dict) else [(k, v)])}
            for cid, client in sorted(record["clients"].items())}
    columns = sorted({k for values in flat.values() for k in values})
    return ["device", *columns], [[cid, *(f"{values[k]:.3f}" if k in values else "-" for k in columns)]
                                  for cid, values in flat.items()]


def _maybe_image(figure, image_id: str, alt: str, missing: str) -> str:
    return _image(figure, image_id, alt) if figure is not None else f'<p class="note">{escape(missing)}</p>'


# -- the page ----------------------------------------------------------------------------------------
def html_page(records: list[dict], config: dict, title: str) -> str:
    """The whole report; `records` as read from metrics.jsonl, `config` as config.json."""
    if not records:
        raise FedafdError("metrics.jsonl has no finished round yet; report again after the first round")
    summaries = [summarize_round(record) for record in records]
    profile = profile_records(records, config)
    kinds = {cid: client["kind"] for cid, client in profile["clients"].items()}
    final = summaries[-1]
    total_seconds = sum(s["seconds"] for s in summaries)
    counts = Counter(kinds.values())
    devices = ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items()))

    # One id per final number, so tests and scripts find it without parsing labels.
    final_table = ('<table id="final"><tbody>' + "".join(
        f'<tr><td class="text">{escape(LABELS.get(k, k))}</td><td id="final-{k}">{escape(format_value(k, v))}</td></tr>'
        for k, v in final.items() if k not in ("round", "seconds")) + "</tbody></table>")
    config_rows = [[k, v if isinstance(v, str) else json.dumps(v)] for k, v in sorted(config.items())]
    keys = list(dict.fromkeys(k for s in summaries for k in s))
    round_rows = [[format_value(k, s[k]) if k in s else "-" for k in keys] for s in summaries]

    ratios = "; ".join(f"{kind}: ours / FedAvg per round {k['ratio_to_fedavg']['total']:.3g} (up+down, "
                       f"{k['num_params']:,.0f}-parameter model)"
                       for kind, k in profile["kinds"].items() if k["ratio_to_fedavg"]["total"] is not None)
    sed = sed_figure(records, kinds)
    privacy = privacy_figure(records, kinds)
    dropped = [[str(r["round"] + 1), cid, reason] for r in records for cid, reason in sorted(r.get("dropped", {}).items())]
    rejected: dict[tuple[int, str, str], list[str]] = {}  # (round, peer, code) -> reasons: fuzzing sends hundreds
    for r in records:
        for m in r.get("rejected", []):
            rejected.setdefault((r["round"] + 1, m["peer"], m["code"]), []).append(m["reason"])
    rejected_rows = [[str(rnd), peer, code, str(len(reasons)), reasons[0]]
                     for (rnd, peer, code), reasons in sorted(rejected.items())]

    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{escape(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{escape(title)}</h1>",
        f'<p class="note">Strategy {escape(str(records[-1].get("strategy", config.get("strategy", "?"))))}, '
        f"{len(records)} rounds, devices: {escape(devices)}; server stage time {total_seconds:.1f} s; "
        f"rounds are numbered from 1.</p>",
        f'<section id="summary"><h2>Final numbers (round {format_value("round", final["round"])})</h2>', final_table,
        "<details><summary>Config (config.json)</summary>",
        _table(["setting", "value"], config_rows, "config", {0, 1}), "</details></section>",

        '<section id="metrics"><h2>Device metrics per round, by kind</h2>',
        '<p class="note">Test-set accuracy (top-1) or retrieval (R@1) in %, mean over each kind\'s devices; '
        "dashed: personalised (each device's own test split).</p>",
        _image(metrics_figure(records, summaries), "plot-metrics", "device metrics per round"),
        '<div class="wide">', _table([LABELS.get(k, k) for k in keys], round_rows, "rounds"), "</div></section>",

        '<section id="server"><h2>Server retrieval per round</h2>',
        _image(server_figure(records), "plot-server", "server R@1 and rsum per round"), "</section>",

        '<section id="bandwidth"><h2>Bytes on the wire</h2>',
        _image(bytes_by_part_figure(profile, records), "plot-bytes", "bytes per round by part"),
        _image(cumulative_figure(profile), "plot-cumulative", "cumulative bytes against FedAvg"),
        f'<p class="note">{escape(ratios)}. Details: <code>fedafd-cloud profile RUN_DIR</code>.</p></section>',

        '<section id="timings"><h2>Stage timings per round</h2>',
        _image(timings_figure(records), "plot-timings", "stage timings per round"), "</section>",

        '<section id="sed"><h2>SED weights per device</h2>',
        _image(sed, "plot-sed", "SED weights per device") if sed is not None else
        '<p class="note">No SED weights in this run (strategy local, sed off, or no round reached stage 3).</p>',
        "</section>",

        '<section id="diagnostics"><h2>Learning diagnostics</h2>',
        '<p class="note">What each part of the method does, round by round; the "Learning diagnostics" of docs/implementation.md '
        "says what a healthy value looks like. Device lines: dashed is a multimodal device's text side.</p>",
        _maybe_image(discriminator_figure(records, kinds), "plot-diag-disc", "discriminator accuracy per device",
                     "No discriminator accuracy: BAA did not run (strategy local, baa off, or a baseline)."),
        _maybe_image(gates_figure(records, kinds), "plot-diag-gates", "GFF gate means per device",
                     "No gate statistics: GFF did not run."),
        _maybe_image(upload_cosine_figure(records, kinds), "plot-diag-upload-cos", "uploads against G per device",
                     "No upload-vs-G cosine: no device held the server's G (or uploaded features)."),
        _maybe_image(device_task_figure(records, kinds), "plot-diag-task", "logit norm and task loss per device",
                     "No logit norm or task loss reported."),
        _maybe_image(server_sed_figure(records), "plot-diag-sed", "SED entropy and teacher cosine per modality",
                     "No SED diagnostics: no round made a teacher (strategy local, or no quorum)."),
        _maybe_image(stage3_figure(records), "plot-diag-stage3", "server R@1 sum before and after stage 3",
                     "No R@1 sum before stage 3: stage 3 never distilled."),
        f'<h3>Device diagnostics, round {format_value("round", final["round"])}</h3>',
        '<div class="wide">', _table(*diagnostics_rows(records[-1]), "diagnostics-table", {0}), "</div></section>",

        *([] if privacy is None else [
            '<section id="privacy"><h2>Differential privacy</h2>',
            '<p class="note">DP-SGD devices: the (epsilon, delta) each has spent, by Opacus\'s RDP accountant, on the '
            "private steps only (public passes spend nothing); uploads inherit it by post-processing. The evaluation "
            "metrics a device reports are outside the guarantee (docs/operations.md, Security).</p>",
            _image(privacy, "plot-privacy", "epsilon spent per device and the privacy-utility trace"),
            _table(["device", "epsilon spent", "budget", "delta", "still trains"], privacy_rows(records[-1]),
                   "privacy-table", {0, 4}), "</section>"]),
        f'<section id="dropped"><h2>Dropped devices ({len(dropped)})</h2>',
        _table(["round", "device", "reason"], dropped, "dropped-table", {1, 2}) if dropped else "<p>None.</p>",
        "</section>",
        f'<section id="rejected"><h2>Rejected messages ({sum(map(len, rejected.values()))})</h2>',
        _table(["round", "peer", "code", "count", "first reason"], rejected_rows, "rejected-table", {1, 2, 4})
        if rejected_rows else "<p>None.</p>",
        "</section></body></html>",
    ]
    return "\n".join(parts) + "\n"


def write_html_report(run_dir: Path, out: Path | None = None) -> Path:
    """Reads RUN_DIR/metrics.jsonl and config.json; writes the page to `out` (default RUN_DIR/report.html)."""
    records, config = read_run(run_dir)
    out = out or run_dir / "report.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(html_page(records, config, f"fedafd run {run_dir.resolve().name}"))
    return out
