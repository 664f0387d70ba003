"""Data at scale: reading an ImageFolder of real-size JPEGs, checking it and caching its backbone features, at two
sizes 10x apart, each measured in a fresh process.

    python -m fedafd.benchmarks.data --sizes 2000,20000 --out runs/bench/data.json

It writes an ImageFolder per size (256x256 JPEGs, quality 90, 16 classes: Tux Paint stamps from the bundled cache,
each drawn at a random scale, place and mirror on a random colour gradient with sensor-like noise) and measures:

  (a) reading throughput: `open_source` into a fresh cache (index, decode to 32 px, write the memory-mapped .npy
      files, digest) against a plain PIL loop over the same files doing the same decoding work (open, draft,
      convert to RGB, Lanczos resize to 32 px into a preallocated array), best of --repeats, side by side;
      target: ratio >= 0.8;
  (b) peak RSS (VmHWM of the process that did the work) of `fedafd-edge data check` (JSON) and of building the
      efficientnet_lite0 feature cache of every row, at both sizes; target: the large size's peak within 10%
      of the small size's;
  (c) the prepared cache: `open_source`'s first load (the build of (a)) against a second load in a new process;
      target: >= 10x faster.

Every child process gets its own cache folder (FEDAFD_CACHE), with the bundled cache's ONNX exports linked in so
that no child exports a backbone. The generated data and caches live in --work (default: a temporary folder,
removed afterwards unless --keep). Prints a table and writes the JSON to --out; a target that is missed is said
so with its numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from fedafd.benchmarks.latency import cpu_model  # the machine, named as the latency benchmark names it

BACKBONE = "efficientnet_lite0"
SIDE = 256
"""Side of the generated JPEGs (COCO-like pictures, before the 32 px the sources decode to)."""
TARGETS = {"throughput_ratio": 0.8, "rss_growth": 0.10, "second_load_speedup": 10.0}


# --- the generated data set -------------------------------------------------------------------------


def stamp_pictures(limit: int = 400) -> list[tuple[str, "object"]]:
    """(category, RGBA picture) of up to `limit` Tux Paint stamp PNGs of the bundled cache."""
    from PIL import Image

    from fedafd.runtime.data.fetch import locate
    from fedafd.runtime.data.tuxpaint import TUXPAINT_STAMPS

    stamps = locate(TUXPAINT_STAMPS, "tuxpaint")
    files = sorted(p for p in stamps.rglob("*.png") if len(p.relative_to(stamps).parts) >= 2)
    picked = files[:: max(1, len(files) // limit)][:limit]
    pictures = []
    for path in picked:
        with Image.open(path) as img:
            pictures.append((path.relative_to(stamps).parts[0], img.convert("RGBA")))
    return pictures


def write_image_folder(root: Path, rows: int, seed: int = 0) -> Path:
    """ROOT/<category>/<n>.jpg, `rows` pictures of SIDE x SIDE. Written once: a folder already complete is kept."""
    from PIL import Image

    done = root / ".complete"
    if done.exists() and done.read_text() == str(rows):
        return root
    shutil.rmtree(root, ignore_errors=True)
    rng = np.random.default_rng(seed)
    pictures = stamp_pictures()
    ramp = np.linspace(0.0, 1.0, SIDE, dtype=np.float32)
    for n in range(rows):
        category, stamp = pictures[n % len(pictures)]
        top, bottom = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        background = (top[None, :] * (1 - ramp[:, None]) + bottom[None, :] * ramp[:, None])  # (SIDE, 3)
        pixels = np.repeat(background[:, None, :], SIDE, axis=1) + rng.normal(0, 6, (SIDE, SIDE, 3))
        canvas = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).convert("RGBA")
        scale = rng.uniform(0.5, 1.0) * SIDE / max(stamp.size)
        picture = stamp.resize((max(1, int(stamp.width * scale)), max(1, int(stamp.height * scale))),
                               Image.Resampling.BILINEAR)
        if rng.random() < 0.5:
            picture = picture.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        x = int(rng.integers(0, SIDE - picture.width + 1))
        y = int(rng.integers(0, SIDE - picture.height + 1))
        canvas.alpha_composite(picture, (x, y))
        folder = root / category
        folder.mkdir(parents=True, exist_ok=True)
        canvas.convert("RGB").save(folder / f"{n:06d}.jpg", quality=90)
    done.write_text(str(rows))
    return root


# --- what each child process does ------------------------------------------------------------------------


def vm_hwm_mb() -> float:
    """This process's high-water resident memory (VmHWM starts afresh at exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def child_pil(data: Path) -> dict:
    """The plain loop: every picture opened, drafted, converted and resized into one preallocated array."""
    from PIL import Image

    start = time.perf_counter()
    files = [Path(folder, name) for folder, dirs, names in sorted(os.walk(data)) for name in sorted(names)
             if name.endswith(".jpg")]
    images = np.empty((len(files), 3, 32, 32), np.uint8)
    for i, file in enumerate(files):
        with Image.open(file) as img:
            img.draft("RGB", (32, 32))
            small = img.convert("RGB").resize((32, 32), Image.Resampling.LANCZOS, reducing_gap=3.0)
            images[i] = np.asarray(small).transpose(2, 0, 1)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "rows": len(files), "checksum": int(images.sum(dtype=np.int64))}


def child_load(data: Path) -> dict:
    """open_source: a first load builds the cache, a second one maps it back."""
    from fedafd.runtime.data.sources.registry import open_source

    start = time.perf_counter()
    source = open_source("image", data)
    seconds = time.perf_counter() - start
    images = source.splits["all"].images
    from fedafd.runtime.data.prepared import row_blocks

    checksum = sum(int(block.sum(dtype=np.int64)) for block in row_blocks(images))  # every pixel read once
    return {"seconds": seconds, "rows": len(images), "checksum": checksum, "digest": source.digest,
            "memmap": type(images).__name__}


def child_check(data: Path) -> dict:
    """`fedafd-edge data check --format json`, as the command runs it."""
    from typer.testing import CliRunner

    from fedafd.edge_client.cli import app

    start = time.perf_counter()
    result = CliRunner().invoke(app, ["data", "check", "--kind", "image", "--data", str(data), "--format", "json"])
    seconds = time.perf_counter() - start
    report = json.loads(result.stdout)
    return {"seconds": seconds, "exit_code": result.exit_code, "rows": report["splits"]["all"]["rows"],
            "problems": report["problem_count"]}


def child_features(data: Path) -> dict:
    """The backbone feature cache of every row of the (cached) source, as a device computes it."""
    from fedafd.runtime.data.modal import rows_view
    from fedafd.runtime.data.sources.registry import open_source

    source = open_source("image", data)
    start = time.perf_counter()
    view = rows_view(source.splits["all"], "all", (BACKBONE,))
    seconds = time.perf_counter() - start
    feats = view.features[BACKBONE]
    return {"seconds": seconds, "rows": int(feats.shape[0]), "dim": int(feats.shape[1]),
            "memmap": type(feats).__name__}


CHILDREN = {"pil": child_pil, "load": child_load, "check": child_check, "features": child_features}


def run_child(job: str, data: Path, cache: Path) -> dict:
    """`job` in a fresh Python process with its own cache folder; its result with its peak RSS."""
    result_file = cache.parent / f".{cache.name}-{job}.json"
    env = {**os.environ, "FEDAFD_CACHE": str(cache), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    subprocess.run([sys.executable, "-m", "fedafd.benchmarks.data", "--child", job, "--data", str(data),
                    "--result", str(result_file)], env=env, check=True)
    result = json.loads(result_file.read_text())
    result_file.unlink()
    return result


def fresh_cache(path: Path, onnx: Path) -> Path:
    """An empty cache folder whose features/onnx is the bundled cache's (exports are not what is measured)."""
    shutil.rmtree(path, ignore_errors=True)
    (path / "features").mkdir(parents=True)
    (path / "features" / "onnx").symlink_to(onnx, target_is_directory=True)
    return path


# --- the benchmark -------------------------------------------------------------------------------------


def measure(size: int, data: Path, work: Path, onnx: Path, repeats: int, log) -> dict:
    pil, loads = [], []
    for attempt in range(repeats):  # interleaved, so a busy moment hurts both alike
        pil.append(run_child("pil", data, fresh_cache(work / f"cache-{size}-pil", onnx)))
        built = fresh_cache(work / f"cache-{size}", onnx)
        loads.append(run_child("load", data, built))
        log(f"  {size}: PIL loop {pil[-1]['seconds']:.2f} s, open_source (fresh cache) {loads[-1]['seconds']:.2f} s")
    if len({r["checksum"] for r in pil + loads}) != 1:
        raise SystemExit("the PIL loop and open_source decoded different pixels: not the same work")
    first = min(loads, key=lambda r: r["seconds"])
    second = run_child("load", data, work / f"cache-{size}")  # the last build's cache, in a new process
    check = run_child("check", data, fresh_cache(work / f"cache-{size}-check", onnx))
    feats = run_child("features", data, work / f"cache-{size}")  # from the prepared cache: the build is not in it
    best_pil = min(r["seconds"] for r in pil)
    result = {
        "rows": size, "pil_s": best_pil, "open_source_s": first["seconds"],
        "pil_rows_per_s": size / best_pil, "open_source_rows_per_s": size / first["seconds"],
        "throughput_ratio": best_pil / first["seconds"],
        "first_load_s": first["seconds"], "second_load_s": second["seconds"],
        "second_load_speedup": first["seconds"] / second["seconds"],
        "peak_rss_mb": {"pil_loop": min(r["peak_rss_mb"] for r in pil),
                        "first_load": min(r["peak_rss_mb"] for r in loads), "second_load": second["peak_rss_mb"],
                        "data_check": check["peak_rss_mb"], "feature_cache": feats["peak_rss_mb"]},
        "data_check_s": check["seconds"], "data_check_exit": check["exit_code"],
        "data_check_problems": check["problems"],
        "feature_cache_s": feats["seconds"], "feature_rows_per_s": size / feats["seconds"],
        "arrays": {"images": first["memmap"], "features": feats["memmap"]},
        "disk_mb": sum(p.stat().st_size for p in data.rglob("*.jpg")) / 2**20,
    }
    return result


def verdicts(results: list[dict]) -> dict:
    small, large = results[0], results[-1]
    growth = {name: large["peak_rss_mb"][name] / small["peak_rss_mb"][name] - 1.0
              for name in ("data_check", "feature_cache", "first_load")}
    return {
        "throughput_ratio": {"value": min(r["throughput_ratio"] for r in results),
                             "target": f">= {TARGETS['throughput_ratio']}"},
        "rss_growth_data_check": {"value": growth["data_check"], "target": f"<= {TARGETS['rss_growth']:.0%}"},
        "rss_growth_feature_cache": {"value": growth["feature_cache"], "target": f"<= {TARGETS['rss_growth']:.0%}"},
        "rss_growth_first_load": {"value": growth["first_load"], "target": f"<= {TARGETS['rss_growth']:.0%}"},
        "second_load_speedup": {"value": min(r["second_load_speedup"] for r in results),
                                "target": f">= {TARGETS['second_load_speedup']:g}"},
    } | {"met": {
        "throughput_ratio": min(r["throughput_ratio"] for r in results) >= TARGETS["throughput_ratio"],
        "rss_growth_data_check": growth["data_check"] <= TARGETS["rss_growth"],
        "rss_growth_feature_cache": growth["feature_cache"] <= TARGETS["rss_growth"],
        "rss_growth_first_load": growth["first_load"] <= TARGETS["rss_growth"],
        "second_load_speedup": min(r["second_load_speedup"] for r in results) >= TARGETS["second_load_speedup"],
    }}


def table(results: list[dict]) -> str:
    rows = [("rows", "{rows}"), ("JPEG MB on disk", "{disk_mb:.0f}"), ("PIL loop rows/s", "{pil_rows_per_s:.0f}"),
            ("open_source rows/s", "{open_source_rows_per_s:.0f}"), ("throughput ratio", "{throughput_ratio:.2f}"),
            ("first load s", "{first_load_s:.2f}"), ("second load s", "{second_load_s:.3f}"),
            ("second load speedup", "{second_load_speedup:.0f}x"), ("data check s", "{data_check_s:.2f}"),
            ("feature cache s", "{feature_cache_s:.1f}")]
    lines = [f"{'':<28}" + "".join(f"{r['rows']:>12}" for r in results)]
    lines += [f"{name:<28}" + "".join(f"{fmt.format(**r):>12}" for r in results) for name, fmt in rows[1:]]
    for name in ("pil_loop", "first_load", "second_load", "data_check", "feature_cache"):
        lines.append(f"{'peak RSS MB ' + name:<28}" + "".join(f"{r['peak_rss_mb'][name]:>12.1f}" for r in results))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="2000,20000", help="comma-separated picture counts (10x apart)")
    parser.add_argument("--repeats", type=int, default=2, help="runs of the PIL loop and of the first load (best)")
    parser.add_argument("--work", type=Path, default=None, help="folder for the generated data and caches "
                        "(default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep --work's generated pictures afterwards")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/data.json"), help="JSON file for the results")
    parser.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = CHILDREN[args.child](args.data)
        result["peak_rss_mb"] = vm_hwm_mb()
        args.result.write_text(json.dumps(result))
        return

    from fedafd.runtime.data.features import features_dir

    onnx = features_dir() / "onnx"  # the bundled cache's exports, before any child points FEDAFD_CACHE away
    work = args.work or Path(tempfile.mkdtemp(prefix="fedafd-bench-data-"))
    work.mkdir(parents=True, exist_ok=True)
    sizes = [int(s) for s in args.sizes.split(",")]
    results = []
    started = time.perf_counter()
    try:
        subprocess.run([sys.executable, "-c", f"from fedafd.runtime.data.features import backbone_session; "
                                              f"backbone_session({BACKBONE!r})"], check=True)  # exported once
        for size in sizes:
            t = time.perf_counter()
            data = write_image_folder(work / f"images-{size}", size)
            print(f"{size} pictures in {data} ({time.perf_counter() - t:.0f} s to write)", flush=True)
            results.append(measure(size, data, work, onnx, args.repeats, lambda line: print(line, flush=True)))
    finally:
        for path in work.glob("cache-*"):
            shutil.rmtree(path, ignore_errors=True)
        if args.work is None and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(table(results))
    verdict = verdicts(results) if len(results) >= 2 else {}
    for name, met in verdict.get("met", {}).items():
        value = verdict[name]["value"]
        shown = f"{value:+.1%}" if name.startswith("rss") else f"{value:.2f}"
        print(f"{name}: {shown} (target {verdict[name]['target']}): {'met' if met else 'NOT MET'}")
    command = " ".join(["python -m fedafd.benchmarks.data", *sys.argv[1:]])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": command, "machine": {"cpu": cpu_model(), "cores": os.cpu_count()},
                                    "seconds": time.perf_counter() - started, "results": results,
                                    "verdicts": verdict}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
