"""Per-device latency: PyTorch eager vs ONNX Runtime fp32 vs int8, for every exported client kind.

    python -m fedafd.benchmarks.latency --out benchmarks/results/latency          # trains, exports, measures
    python -m fedafd.benchmarks.latency --clients image-adapter --clients text-adapter --runs 50
    python -m fedafd.benchmarks.latency --state edge_state/RUN_ID/image-0 --state ...   # your own trained clients

Without --state, the clients of CLIENTS (all, or those named by --clients) are trained briefly (d=256)
and exported with `fedafd-edge export`'s code: one per kind trained from scratch on raw inputs (cnn_small,
gru, resnet_tiny + transformer_tiny, towers resnet_tiny / transformer_tiny), and the deployable adapter
clients (`*-adapter`: effnet_linear / minilm_linear over the frozen backbones, beside the server's default
towers, the same adapters), whose graphs hold EfficientNet-Lite0 and/or MiniLM. Every engine runs in its
own fresh process (the ORT ones never import torch, like a device with `fedafd[infer]`), so peak memory
is that process's max RSS; the timings are per call of the whole inference path of one modality from raw
inputs (backbone + local + tower + GFF + head; eager runs the export's own wrapper module), on real test
samples, batch 1 and 32, median and p90. Profiles: `1-thread` (a phone-class core: torch and ORT limited
to one thread) and `all-cores`. Writes latency.json and latency.md into --out.
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
CLIENTS: dict[str, tuple[str, str, str, dict[str, str]]] = {
    "image": ("image", "cnn_small", "gru", {"image": "resnet_tiny"}),
    "text": ("text", "cnn_small", "gru", {"text": "transformer_tiny"}),
    "multimodal": ("multimodal", "resnet_tiny", "transformer_tiny", {"image": "resnet_tiny", "text": "transformer_tiny"}),
    "image-adapter": ("image", "effnet_linear", "gru", {"image": "effnet_linear"}),
    "text-adapter": ("text", "cnn_small", "minilm_linear", {"text": "minilm_linear"}),
    "multimodal-adapter": ("multimodal", "effnet_linear", "minilm_linear",
                           {"image": "effnet_linear", "text": "minilm_linear"}),
}
"""Label -> (kind, image arch, text arch, tower archs) of the clients trained here."""

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
    from fedafd.export.infer import MANIFEST_FILE

    manifest = json.loads((model_dir / MANIFEST_FILE).read_text())
    inputs = {m: [np.load(inputs_dir / f"{m}_{i}.npy") for i in range(len(manifest["graphs"][m]["inputs"]))]
              for m in manifest["graphs"]}
    result: dict = {}
    if engine == "torch":
        import torch

        from fedafd.export.onnx_export import client_graphs, load_client

        torch.set_num_threads(threads)
        client = load_client(state_dir)
        graphs = client_graphs(client, client.fusion(manifest["fusion"]))
        for modality, arrays in inputs.items():
            module = graphs[modality]
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


def make_states(folder: Path, feature_dim: int, max_private: int, labels: list[str]) -> list[Path]:
    """One briefly trained client per label of CLIENTS (GFF on), saved as `join` saves it."""
    import torch

    from fedafd.edge_client.model import GlobalTowers, LocalModel
    from fedafd.edge_client.private_data import load_private_data
    from fedafd.edge_client.state import STATE_CONFIG_FILE, STATE_FILE, ClientState, save_state
    from fedafd.edge_client.objectives import objective_for
    from fedafd.edge_client.training import Optimizers, prepare_round, train_round
    from fedafd.runtime.methods import MethodSettings
    from fedafd.runtime.models import backbone_of, build_encoder

    states = []
    for label in labels:
        kind, image_arch, text_arch, archs = CLIENTS[label]
        state_dir = folder / label
        states.append(state_dir)
        if (state_dir / STATE_FILE).is_file():
            continue
        torch.manual_seed(0)
        backbones = tuple(sorted({backbone_of(a) for a in (image_arch, text_arch, *archs.values())} - {None}))
        private = load_private_data(kind, 0, 1, 0.1, 0, max_private, 1000, backbones=backbones)
        model = LocalModel(kind, image_arch, text_arch, feature_dim, private.num_classes)
        towers = GlobalTowers(feature_dim, torch.device("cpu"))
        flat = {f"{m}.{k}": v for m in archs for k, v in build_encoder(m, archs[m], feature_dim).state_dict().items()}
        towers.load(1, archs, flat)
        optimizers = Optimizers.create(model, 1e-3, 1e-3)
        settings = MethodSettings("fedafd", gff=True, beta=0.5)  # GFF, no BAA
        train_round(objective_for(prepare_round(model, optimizers, towers, private.train, settings, 0, 2, 32, 0,
                                                torch.device("cpu"))))
        state_dir.mkdir(parents=True, exist_ok=True)
        save_state(state_dir, ClientState(model, optimizers, towers, last_round=0),
                   {"client_id": f"{label}-0", "kind": kind, "image_arch": image_arch, "text_arch": text_arch,
                    "feature_dim": feature_dim})
        (state_dir / STATE_CONFIG_FILE).write_text(json.dumps({"kind": kind, "seed": 0, "max_test": 1000}))
        print(f"trained {label}-0 on {len(private.train)} samples")
    return states


def _graph_entry(folder: Path, manifest: dict, modality: str) -> dict:
    """What the size table shows of one modality's graph."""
    graph = manifest["graphs"][modality]
    q = graph["int8"]
    return {"arch": manifest["archs"][modality], "tower_arch": manifest["tower_archs"].get(modality),
            "backbones": graph.get("backbones", []), "size_fp32": (folder / graph["file"]).stat().st_size,
            "size_int8": (folder / q["file"]).stat().st_size, "int8_top1_agreement": q.get("top1_agreement"),
            "int8_top1_delta": q.get("top1_delta"), "int8_mean_cosine": q.get("mean_cosine"),
            "int8_fp32_backbones": q.get("fp32_backbones", []), "eval_samples": q["eval_samples"]}


def _graph_name(graph: dict) -> str:
    path = graph["arch"] + (f" + {graph['tower_arch']}" if graph["tower_arch"] else "")
    return path + (f" [{', '.join(graph['backbones'])}]" if graph["backbones"] else "")


def markdown(report: dict) -> str:
    lines = [f"CPU: {report['cpu']} ({report['cores']} cores); onnxruntime {report['onnxruntime']}, torch {report['torch']}; "
             f"{report['runs_b1']} calls at batch 1, {max(10, report['runs_b1'] // 8)} at batch 32",
             "", "| client | graph: local + tower [backbones inside] | profile | batch | eager ms (p90) | "
             "ORT fp32 ms (p90) | ORT int8 ms (p90) | fp32/eager | int8/eager |", "|---|---|---|---|---|---|---|---|---|"]
    for label, entry in report["clients"].items():
        for profile, engines in entry["profiles"].items():
            for key in engines["torch"]:
                if "/b" not in key:
                    continue
                modality, batch = key.split("/b")
                t, f, q = (engines[e][key] for e in ENGINES)
                lines.append(f"| {label} | {modality}: {_graph_name(entry['graphs'][modality])} | {profile} | {batch} | "
                             f"{t['median_ms']:.2f} ({t['p90_ms']:.2f}) | {f['median_ms']:.2f} ({f['p90_ms']:.2f}) | "
                             f"{q['median_ms']:.2f} ({q['p90_ms']:.2f}) | {f['median_ms'] / t['median_ms']:.2f} | "
                             f"{q['median_ms'] / t['median_ms']:.2f} |")
    lines += ["", "| client | graph | fp32 MB | int8 MB | int8/fp32 | backbone left fp32 in int8 | int8 vs fp32 on the test "
              "split | int8 top-1 delta (pp) |", "|---|---|---|---|---|---|---|---|"]
    for label, entry in report["clients"].items():
        for modality, graph in entry["graphs"].items():
            agreement = graph["int8_top1_agreement"]
            vs = (f"top-1 agreement {100 * agreement:.1f}%, " if agreement is not None else "") + \
                f"cosine {graph['int8_mean_cosine']:.4f} ({graph['eval_samples']} samples)"
            delta = graph["int8_top1_delta"]
            lines.append(f"| {label} | {modality} | {graph['size_fp32'] / 1e6:.2f} | {graph['size_int8'] / 1e6:.2f} | "
                         f"{graph['size_int8'] / graph['size_fp32']:.2f} | {', '.join(graph['int8_fp32_backbones']) or '-'} | "
                         f"{vs} | {f'{delta:+.1f}' if delta is not None else '-'} |")
    lines += ["", "| client | peak RSS MB eager / ORT fp32 / ORT int8 (all-cores) |", "|---|---|"]
    for label, entry in report["clients"].items():
        rss = entry["profiles"]["all-cores"]
        lines.append(f"| {label} | " + " / ".join(f"{rss[e]['peak_rss_mb']:.0f}" for e in ENGINES) + " |")
    return "\n".join(lines) + "\n"


def main(
    out: Annotated[Path, typer.Option(help="Folder for latency.json, latency.md, states and models.")] = Path("runs/bench/latency"),
    state: Annotated[Optional[list[Path]], typer.Option(help="Trained client state folders (default: train those of --clients).")] = None,
    clients: Annotated[Optional[list[str]], typer.Option(help=f"Clients to train and measure, of: {', '.join(CLIENTS)} (default: all).")] = None,
    runs: Annotated[int, typer.Option(help="Timed calls at batch 1 (batch 32: runs/8, at least 10).")] = 200,
    feature_dim: Annotated[int, typer.Option(help="d of the clients trained here.")] = 256,
    max_private: Annotated[int, typer.Option(help="Samples the clients trained here see.")] = 512,
    eval_samples: Annotated[int, typer.Option(help="Test samples for the int8 agreement.")] = 1000,
) -> None:
    """Measure eager vs ORT fp32 vs int8 for every client, both device profiles."""
    import onnxruntime
    import torch

    from fedafd.export.onnx_export import ExportOptions, client_test_split, export_client, load_client, sample_inputs

    unknown = sorted(set(clients or ()) - set(CLIENTS))
    if unknown:
        raise typer.BadParameter(f"unknown client(s) {', '.join(unknown)}; choose of {', '.join(CLIENTS)}", param_hint="--clients")
    out.mkdir(parents=True, exist_ok=True)
    states = state or make_states(out / "states", feature_dim, max_private, list(clients or CLIENTS))
    cores = os.cpu_count() or 1
    report = {"cpu": cpu_model(), "cores": cores, "platform": platform.platform(), "onnxruntime": onnxruntime.__version__,
              "torch": torch.__version__, "runs_b1": runs, "profiles": {"1-thread": 1, "all-cores": cores}, "clients": {}}
    for state_dir in states:
        client = load_client(state_dir)
        kind, label = client.meta["kind"], Path(state_dir).name
        model_dir = out / "models" / label
        manifest = export_client(state_dir, model_dir, ExportOptions(eval_samples=eval_samples))
        inputs_dir = out / "inputs" / label
        inputs_dir.mkdir(parents=True, exist_ok=True)
        data = client_test_split(kind, client.config)
        for modality in manifest["graphs"]:
            for i, array in enumerate(sample_inputs(data, modality, max(BATCHES))):
                np.save(inputs_dir / f"{modality}_{i}.npy", array)
        entry = {"state": str(state_dir), "kind": kind, "backbones": sorted(manifest["backbones"]),
                 "graphs": {m: _graph_entry(model_dir, manifest, m) for m in manifest["graphs"]}, "profiles": {}}
        for profile, threads in report["profiles"].items():
            engines = {}
            for engine in ENGINES:
                done = subprocess.run([sys.executable, "-m", "fedafd.benchmarks.latency", "worker", engine, str(model_dir),
                                       str(state_dir), str(inputs_dir), str(threads), str(runs)],
                                      capture_output=True, text=True)
                lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
                if done.returncode != 0 or not lines:
                    raise SystemExit(f"{engine} worker failed for {label}: {done.stderr[-2000:]}")
                engines[engine] = json.loads(lines[-1][len("RESULT "):])
            entry["profiles"][profile] = engines
            b1 = {e: engines[e][f"{next(iter(manifest['graphs']))}/b1"]["median_ms"] for e in ENGINES}
            print(f"{label:18s} {profile:9s} batch 1: eager {b1['torch']:.2f} ms, ORT fp32 {b1['fp32']:.2f} ms "
                  f"({b1['fp32'] / b1['torch']:.2f}x), int8 {b1['int8']:.2f} ms ({b1['int8'] / b1['torch']:.2f}x)")
        report["clients"][label] = entry
    (out / "latency.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "latency.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    if sys.argv[1:2] == ["worker"]:
        worker_main(sys.argv[2:])
    else:
        typer.run(main)
