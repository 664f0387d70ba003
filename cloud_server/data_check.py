"""`fedafd-cloud data check`: what the server would train and evaluate on, and every problem, before any round.

`check_server(config)` checks, as `serve` reads them: the public set (public_data), the rows of public_subset
(each id a row of the public set's pool), the retrieval test set (eval_data, or public_data's test split), that
no eval picture is also a public one (public_data.shared_pictures; the bundled emoji's two flags drawn like
public ones are a warning, as ServerData.load says), and each --local/simulate pool (image_data, text_data,
multimodal_data) that is set, each as runtime/data/sources/check.py reports a device's data.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from fedafd.cloud_server.public_data import (
    BUNDLED_FLAGS, NOT_ON_WHAT_IT_TRAINS_ON, eval_is_bundled, read_subset, shared_line, shared_pictures,
)
from fedafd.runtime.config import ServerConfig
from fedafd.runtime.data.modal import as_modal
from fedafd.runtime.data.sources.check import inspect_source, problem_lines, rows_report, source_lines
from fedafd.runtime.data.sources.options import DataOptions, load_options
from fedafd.runtime.data.sources.records import MAX_LISTED_PROBLEMS, DataFormatError
from fedafd.runtime.data.sources.registry import DEMO_DEFAULTS, PUBLIC, Source
from fedafd.runtime.errors import FedafdError

POOLS = ("image", "text", "multimodal")
"""Device kinds whose pool a server config may name (`<kind>_data`, `<kind>_data_config`)."""


def check_server(config: ServerConfig) -> dict[str, Any]:
    """The report (JSON-able): `public`, `eval` and each set pool's source report, the public pool's and the
    eval rows' counts, `public_subset`, `shared_pictures`, `warnings`, and every problem (the first
    MAX_LISTED_PROBLEMS, and their count)."""
    found: list[tuple[list[str], int]] = []  # (listed, count) of each part
    report: dict[str, Any] = {"warnings": [], "pools": {}}
    with contextlib.ExitStack() as stack:
        public, public_options = _open(stack, report, "public", found, config.public_data or DEMO_DEFAULTS[PUBLIC],
                                       config.public_data_config, config.on_bad_sample)
        held = None
        if config.eval_data:
            eval_source, eval_options = _open(stack, report, "eval", found, config.eval_data,
                                              config.eval_data_config, config.on_bad_sample)
            if eval_source is not None:
                held = eval_source.rows(eval_options.test_splits) or eval_source.rows(("all",))
        if public is not None:
            own: list[str] = []
            pool = public.rows(public_options.train_splits) or public.rows(("all",))
            if pool is None:
                own.append(f"{public.location}: none of the train splits {list(public_options.train_splits)} "
                           f"(it has {', '.join(public.splits)})")
            else:
                report["pool"] = rows_report(pool)
                if config.public_subset:
                    try:
                        ids = read_subset(Path(config.public_subset), len(pool))
                        report["public_subset"] = {"file": config.public_subset, "rows": int(len(ids))}
                    except (DataFormatError, OSError) as err:
                        own.append(str(err))
            if not config.eval_data:
                held = public.rows(public_options.test_splits)
                if held is None:
                    own.append(f"{public.location} has no test split to evaluate the server on: set eval_data")
            if held is not None:
                report["eval_rows"] = rows_report(held)
            if pool is not None and held is not None:
                own += _shared(report, pool, held, bundled=eval_is_bundled(config),
                               eval_location=config.eval_data or public.location)
            found.append((own, len(own)))
    for kind in POOLS:
        location = getattr(config, f"{kind}_data")
        if location:
            pool_report = _pool_report(config, kind, location)
            report["pools"][kind] = pool_report
            found.append((pool_report["problems"], pool_report["problem_count"]))
    report["problems"] = [line for listed, _ in found for line in listed][:MAX_LISTED_PROBLEMS]
    report["problem_count"] = sum(count for _, count in found)
    return report


def _open(stack: contextlib.ExitStack, report: dict[str, Any], role: str, found: list, location: str,
          data_config: str, on_bad_sample: str) -> tuple[Source | None, DataOptions]:
    """The public or eval source checked (its report under `role`), kept open until the stack closes."""
    try:
        options = load_options(data_config)
    except FedafdError as err:
        report[role] = {"location": location, "problems": [str(err)], "problem_count": 1}
        found.append(([str(err)], 1))
        return None, DataOptions()
    role_report, source = stack.enter_context(inspect_source(PUBLIC, location, options, on_bad_sample=on_bad_sample))
    report[role] = role_report
    found.append((role_report["problems"], role_report["problem_count"]))
    return source, options


def _pool_report(config: ServerConfig, kind: str, location: str) -> dict[str, Any]:
    data_config = getattr(config, f"{kind}_data_config")
    try:
        options = load_options(data_config)
    except FedafdError as err:
        return {"kind": kind, "location": location, "problems": [str(err)], "problem_count": 1}
    with inspect_source(kind, location, options, test_fraction=config.test_fraction, seed=config.seed,
                        on_bad_sample=config.on_bad_sample) as (pool_report, _):
        return pool_report


def _shared(report: dict[str, Any], pool, held, bundled: bool, eval_location: str) -> list[str]:
    """The eval-vs-public check: its problem lines (a warning only for the bundled emoji)."""
    shared = shared_pictures(as_modal(pool), as_modal(held))
    report["shared_pictures"] = len(shared)
    if not shared:
        return []
    if bundled:
        report["warnings"].append(f"{shared_line(shared, eval_location)}: {BUNDLED_FLAGS}")
        return []
    return [f"{shared_line(shared, eval_location)}: {NOT_ON_WHAT_IT_TRAINS_ON}"]


def _count(rows: dict[str, Any]) -> str:
    return f"{rows['rows']} rows" + (f" ({rows['pictures']} pictures)" if "pictures" in rows else "")


def server_report_text(report: dict[str, Any]) -> str:
    """A short readable summary of check_server's report."""
    lines: list[str] = []
    for role, title in (("public", "public set"), ("eval", "eval set")):
        if role in report:
            lines += [f"{title}:"] + (source_lines(report[role], "  ") if "splits" in report[role]
                                      else [f"  {report[role]['location']}"])
    if report.get("pool"):
        lines.append(f"public pool: {_count(report['pool'])}")
    if report.get("public_subset"):
        lines.append(f"public_subset: {report['public_subset']['rows']} rows ({report['public_subset']['file']})")
    if report.get("eval_rows"):
        lines.append(f"evaluated on: {_count(report['eval_rows'])}, {report.get('shared_pictures', 0)} picture(s) "
                     "also in the public set")
    for kind, pool in report["pools"].items():
        lines += [f"{kind} pool:"] + (source_lines(pool, "  ") if "splits" in pool else [f"  {pool['location']}"])
    lines += [f"warning: {warning}" for warning in report["warnings"]]
    return "\n".join(lines + problem_lines(report["problems"], report["problem_count"]))
