"""Per-device latency: PyTorch eager vs ONNX Runtime fp32 vs int8, for every exported client kind.

    python -m fedafd.benchmarks.latency --out benchmarks/results/latency          # trains, exports, measures
    python -m fedafd.benchmarks.latency --state edge_state/image-0 --state ...   # your own trained clients

Without --state, one client of each kind is trained briefly (the fleet's first architectures: cnn_small,
gru, resnet_tiny + transformer_tiny, d=256, the server's default towers resnet_tiny / transformer_tiny)
and exported with `fedafd-edge export`'s code. Every engine runs in its own fresh process (the ORT ones
never import torch, like a device with `fedafd[infer]`), so peak memory is that process's max RSS; the
timings are per call of the whole inference path of one modality (local + tower + GFF + head), on real
test samples, batch 1 and 32, median and p90. Profiles: `1-thread` (a phone-class core: torch and ORT
limited to one thread) and `all-cores`. Writes latency.json and latency.md into --out.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import typer

from fedafd.runtime.timing import time_calls

ENGINES = ("torch", "fp32", "int8")
BATCHES = (1, 32)

def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def timed(call, runs: int) -> dict[str, float]:
    ms = 1000.0 * time_calls(call, runs)
    return {"median_ms": float(np.median(ms)), "p90_ms": float(np.percentile(ms, 90)), "runs": runs}


def worker(engine: str, model_dir: Path, state_dir: Path, inputs_dir: Path, threads: int, runs: int) -> dict:
    """One engine in this (fresh) process: timings per modality and batch, and the process's peak RSS."""
    manifest = json.loads((model_dir / "manifest.json").read_text())
    inputs = {m: [np.load(inputs_dir / f"{m}_{i}.npy") for i in range(len(manifest["graphs"][m]["inputs"]))]
              for m in manifest["graphs"]}
    result: dict = {}
    if engine == "torch":
        import torch

        from fedafd.export.onnx_export import ClassifierGraph, FeatureGraph, load_client

        torch.set_num_threads(threads)
        client = load_client(state_dir)
        for modality, arrays in inputs.items():
            model = client.model
            parts = (model.encoders[modality], client.towers.encoders[modality], model.fusions[modality])
            module = (ClassifierGraph(*parts, model.head) if model.head is not None else FeatureGraph(*parts)).eval()
            for batch in BATCHES:
                tensors = tuple(torch.from_numpy(a[:batch]) for a in arrays)

                def call(module=module, tensors=tensors):
                    with torch.inference_mode():
                        module(*tensors)

                result[f"{modality}/b{batch}"] = timed(call, runs if batch == 1 else max(10, runs // 8))
    else:
        from fedafd.export.infer import OnnxModel

        onnx_model = OnnxModel(model_dir, precision=engine, threads=threads)
        for modality, arrays in inputs.items():
            session = onnx_model.session(modality)
            names = [i.name for i in session.get_inputs()]
            for batch in BATCHES:
                feeds = {n: np.ascontiguousarray(a[:batch]) for n, a in zip(names, arrays)}
                result[f"{modality}/b{batch}"] = timed(lambda s=session, f=feeds: s.run(None, f),
                                                       runs if batch == 1 else max(10, runs // 8))
        result["torch_imported"] = "torch" in sys.modules
    result["peak_rss_mb"] = peak_rss_mb()
    return result


def peak_rss_mb() -> float:
    """This process's high-water RSS (VmHWM starts afresh at exec; ru_maxrss can carry the parent's over a fork)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def worker_main(argv: list[str]) -> None:
    """`latency worker ENGINE MODEL_DIR STATE_DIR INPUTS_DIR THREADS RUNS`: prints one RESULT line."""
    engine, model_dir, state_dir, inputs_dir, threads, runs = argv
    print("RESULT " + json.dumps(worker(engine, Path(model_dir), Path(state_dir), Path(inputs_dir), int(threads), int(runs))))


def make_states(folder: Path, feature_dim: int, max_private: int) -> list[Path]:
    """One briefly trained client per kind (GFF on), saved as `join` saves it."""
    import torch

    from fedafd.edge_client.model import MODALITIES_OF_KIND, GlobalTowers, LocalModel, build_encoder
    from fedafd.edge_client.private_data import load_private_data
    from fedafd.edge_client.state import ClientState, save_state
    from fedafd.edge_client.training import Optimizers, RoundPlan, train_round

    kinds = {"image": ("cnn_small", "gru"), "text": ("cnn_small", "gru"), "multimodal": ("resnet_tiny", "transformer_tiny")}
    towers_archs = {"image": "resnet_tiny", "text": "transformer_tiny"}
    states = []
    for kind, (image_arch, text_arch) in kinds.items():
        state_dir = folder / f"{kind}-0"
        states.append(state_dir)
        if (state_dir / "client_state.pt").is_file():
            continue
        torch.manual_seed(0)
        private = load_private_data(kind, 0, 1, 0.1, 0, max_private, 1000)
        model = LocalModel(kind, image_arch, text_arch, feature_dim, private.num_classes)
        towers = GlobalTowers(feature_dim, torch.device("cpu"))
        archs = {m: towers_archs[m] for m in MODALITIES_OF_KIND[kind]}
        flat = {f"{m}.{k}": v for m in archs for k, v in build_encoder(m, archs[m], feature_dim).state_dict().items()}
        towers.load(1, archs, flat)
        optimizers = Optimizers.create(model, 1e-3, 1e-3)
        train_round(model, optimizers, towers, private.train, None, RoundPlan(0, 2, False, True, 0.5), 32, 0,
                    torch.device("cpu"))
        state_dir.mkdir(parents=True, exist_ok=True)
        save_state(state_dir, ClientState(model, optimizers, towers, last_round=0),
                   {"client_id": f"{kind}-0", "kind": kind, "image_arch": image_arch, "text_arch": text_arch,
                    "feature_dim": feature_dim})
        (state_dir / "config.json").write_text(json.dumps({"kind": kind, "seed": 0, "max_test": 1000}))
        print(f"trained {kind}-0 on {len(private.train)} samples")
    return states


def _dir_size(folder: Path, precision: str, manifest: dict) -> int:
    return sum((folder / (g["int8"]["file"] if precision == "int8" else g["file"])).stat().st_size
               for g in manifest["graphs"].values())


def markdown(report: dict) -> str:
    lines = [f"CPU: {report['cpu']} ({report['cores']} cores); onnxruntime {report['onnxruntime']}, torch {report['torch']}",
             "", "| kind | graph | profile | batch | eager ms (p90) | ORT fp32 ms (p90) | ORT int8 ms (p90) | "
             "fp32/eager | int8/eager |", "|---|---|---|---|---|---|---|---|---|"]
    for kind, entry in report["kinds"].items():
        for profile, engines in entry["profiles"].items():
            for key in engines["torch"]:
                if "/b" not in key:
                    continue
                modality, batch = key.split("/b")
                t, f, q = (engines[e][key] for e in ENGINES)
                lines.append(f"| {kind} | {modality} | {profile} | {batch} | {t['median_ms']:.2f} ({t['p90_ms']:.2f}) | "
                             f"{f['median_ms']:.2f} ({f['p90_ms']:.2f}) | {q['median_ms']:.2f} ({q['p90_ms']:.2f}) | "
                             f"{f['median_ms'] / t['median_ms']:.2f} | {q['median_ms'] / t['median_ms']:.2f} |")
    lines += ["", "| kind | fp32 MB | int8 MB | int8/fp32 | int8 top-1 agreement | int8 top-1 delta (pp) | "
              "peak RSS MB eager / fp32 / int8 (all-cores) |", "|---|---|---|---|---|---|---|"]
    for kind, entry in report["kinds"].items():
        rss = entry["profiles"]["all-cores"]
        agreement = entry.get("int8_top1_agreement")
        lines.append(f"| {kind} | {entry['size_fp32'] / 1e6:.2f} | {entry['size_int8'] / 1e6:.2f} | "
                     f"{entry['size_int8'] / entry['size_fp32']:.2f} | "
                     + (f"{100 * agreement:.1f}%" if agreement is not None else
                        f"cosine {entry['int8_mean_cosine']:.4f}") + " | "
                     + (f"{entry['int8_top1_delta']:+.1f}" if entry.get("int8_top1_delta") is not None else "-") + " | "
                     + " / ".join(f"{rss[e]['peak_rss_mb']:.0f}" for e in ENGINES) + " |")
    return "\n".join(lines) + "\n"


def main(
    out: Annotated[Path, typer.Option(help="Folder for latency.json, latency.md, states and models.")] = Path("benchmarks/results/latency"),
    state: Annotated[Optional[list[Path]], typer.Option(help="Trained client state folders (default: train one per kind).")] = None,
    runs: Annotated[int, typer.Option(help="Timed calls at batch 1 (batch 32: runs/8, at least 10).")] = 200,
    feature_dim: Annotated[int, typer.Option(help="d of the clients trained here.")] = 256,
    max_private: Annotated[int, typer.Option(help="Samples the clients trained here see.")] = 512,
    eval_samples: Annotated[int, typer.Option(help="Test samples for the int8 agreement.")] = 1000,
) -> None:
    """Measure eager vs ORT fp32 vs int8 for every client kind, both device profiles."""
    import onnxruntime
    import torch

    from fedafd.export.onnx_export import ExportOptions, client_test_split, export_client, load_client, sample_inputs

    out.mkdir(parents=True, exist_ok=True)
    states = state or make_states(out / "states", feature_dim, max_private)
    cores = os.cpu_count() or 1
    report = {"cpu": cpu_model(), "cores": cores, "platform": platform.platform(), "onnxruntime": onnxruntime.__version__,
              "torch": torch.__version__, "runs_b1": runs, "profiles": {"1-thread": 1, "all-cores": cores}, "kinds": {}}
    for state_dir in states:
        client = load_client(state_dir)
        kind = client.meta["kind"]
        model_dir = out / "models" / kind
        manifest = export_client(state_dir, model_dir, ExportOptions(eval_samples=eval_samples))
        inputs_dir = out / "inputs" / kind
        inputs_dir.mkdir(parents=True, exist_ok=True)
        data = client_test_split(kind, client.config)
        for modality in manifest["graphs"]:
            for i, array in enumerate(sample_inputs(data, modality, max(BATCHES))):
                np.save(inputs_dir / f"{modality}_{i}.npy", array)
        entry = {"state": str(state_dir), "archs": manifest["archs"], "tower_archs": manifest["tower_archs"],
                 "size_fp32": _dir_size(model_dir, "fp32", manifest), "size_int8": _dir_size(model_dir, "int8", manifest),
                 "profiles": {}}
        first = next(iter(manifest["graphs"].values()))["int8"]
        entry["int8_top1_agreement"] = first.get("top1_agreement")
        entry["int8_top1_delta"] = first.get("top1_delta")
        entry["int8_mean_cosine"] = min(g["int8"].get("mean_cosine", 1.0) for g in manifest["graphs"].values())
        for profile, threads in report["profiles"].items():
            engines = {}
            for engine in ENGINES:
                done = subprocess.run([sys.executable, "-m", "fedafd.benchmarks.latency", "worker", engine, str(model_dir),
                                       str(state_dir), str(inputs_dir), str(threads), str(runs)],
                                      capture_output=True, text=True)
                lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
                if done.returncode != 0 or not lines:
                    raise SystemExit(f"{engine} worker failed for {kind}: {done.stderr[-2000:]}")
                engines[engine] = json.loads(lines[-1][len("RESULT "):])
            entry["profiles"][profile] = engines
            b1 = {e: engines[e][f"{next(iter(manifest['graphs']))}/b1"]["median_ms"] for e in ENGINES}
            print(f"{kind:10s} {profile:9s} batch 1: eager {b1['torch']:.2f} ms, ORT fp32 {b1['fp32']:.2f} ms "
                  f"({b1['fp32'] / b1['torch']:.2f}x), int8 {b1['int8']:.2f} ms ({b1['int8'] / b1['torch']:.2f}x)")
        report["kinds"][kind] = entry
    (out / "latency.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "latency.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    if sys.argv[1:2] == ["worker"]:
        worker_main(sys.argv[2:])
    else:
        typer.run(main)
