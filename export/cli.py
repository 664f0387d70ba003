"""`fedafd-edge export`, `infer` and `bench`: the device commands that make, run or time ONNX graphs, and the
whole `fedafd-edge` program, edge_client's federated commands (edge_client/cli.py) with these mounted beside
them. The mounting is here because the exporter reads edge_client's model and state: edge_client never
imports export, so the packages import each other in one direction only (tests/test_architecture.py).

Nothing here imports torch at module level: `fedafd-edge infer` runs on a device without it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from fedafd.edge_client.cli import CONFIG_HELP, SET_HELP
from fedafd.edge_client.cli import app as federated_app
from fedafd.runtime.cli_support import Format, Kind, cli_errors, setup_logging
from fedafd.runtime.config import ClientConfig, load_config

app = typer.Typer(help="Exported models: export, run and time them.", no_args_is_help=True, add_completion=False)


@app.command("export")
def export_cmd(
    state_dir: Annotated[Path, typer.Argument(help="A client's state folder (the --state-dir of `join`), or a "
                                                   "server run folder / server.safetensors for the global towers.")],
    out: Annotated[Path, typer.Option("--out", help="Model folder to write (ONNX graphs, manifest.json, tokenizer).")],
    quantize: Annotated[bool, typer.Option(help="Also write int8 graphs (ONNX Runtime dynamic quantisation).")] = True,
    fusion: Annotated[bool, typer.Option(help="Fuse with the global tower (off: the local path only, for "
                                              "clients trained without GFF).")] = True,
    parity_samples: Annotated[int, typer.Option(help="Real test samples ORT must match PyTorch on.")] = 64,
    eval_samples: Annotated[int, typer.Option(help="Test samples for the int8 vs fp32 comparison (0: all).")] = 1000,
    atol: Annotated[float, typer.Option(help="Largest allowed |ORT - PyTorch| on any output.")] = 1e-4,
    exporter: Annotated[str, typer.Option(help="torchscript (default) or dynamo.")] = "torchscript",
    output_format: Annotated[Format, typer.Option("--format", help="json: the manifest.")] = Format.text,
) -> None:
    """Export a trained client (or the server's global towers) to verified ONNX for on-device inference."""
    setup_logging(False)
    with cli_errors():
        import contextlib
        import json
        import sys

        from fedafd.export.onnx_export import ExportOptions, export_any

        # Progress (the export's own lines and torch.onnx's prints) goes to stderr: stdout carries only the
        # result, so `--format json > manifest.json` is JSON.
        with contextlib.redirect_stdout(sys.stderr):
            manifest = export_any(state_dir, out, ExportOptions(parity_samples=parity_samples, eval_samples=eval_samples,
                                                                atol=atol, quantize=quantize, fusion=fusion,
                                                                exporter=exporter))
        if output_format == "json":
            typer.echo(json.dumps(manifest, indent=2))
        else:
            typer.echo(f"wrote {out} ({', '.join(sorted(manifest['graphs']))}; run `fedafd-edge infer {out} INPUT...`)")


@app.command("infer")
def infer_cmd(
    model_dir: Annotated[Path, typer.Argument(help="A folder written by `fedafd-edge export`.")],
    inputs: Annotated[list[str], typer.Argument(help="Picture files (or .npy uint8 (N,3,32,32)) and/or texts; "
                                                     "multimodal models rank the texts for each picture.")],
    precision: Annotated[str, typer.Option(help="fp32 or int8.")] = "fp32",
    top_k: Annotated[int, typer.Option(help="Classes shown per input.")] = 3,
    threads: Annotated[int, typer.Option(help="ONNX Runtime threads (0: all cores).")] = 0,
    output_format: Annotated[Format, typer.Option("--format")] = Format.text,
) -> None:
    """Classify pictures or texts, or rank captions for a picture, with ONNX Runtime alone (no torch)."""
    setup_logging(False)
    with cli_errors():
        import json

        from fedafd.export.infer import OnnxModel, format_text, predict

        result = predict(OnnxModel(model_dir, precision=precision, threads=threads), inputs, top_k=top_k)
        typer.echo(json.dumps(result, indent=2) if output_format == "json" else format_text(result))


@app.command()
def bench(
    kind: Annotated[Kind, typer.Option(help="Which task model to time.")] = Kind.image,
    onnx_dir: Annotated[Optional[Path], typer.Option(help="A folder of exported .onnx graphs to time with ONNX "
                                                          "Runtime (skipped when not given).")] = None,
    out: Annotated[Path, typer.Option(help="Profile file (TOML) to write.")] = Path("device_profile.toml"),
    name: Annotated[str, typer.Option(help="Name of the written profile.")] = "this_device",
    link: Annotated[str, typer.Option(help="Shipped profile or TOML whose link values (bandwidth, RTT, "
                                           "availability) the written profile keeps.")] = "workstation_ethernet",
    reference_ms: Annotated[float, typer.Option(help="Training ms per sample of the reference machine (compute "
                                                     "factor 1); 0: write compute_factor 1.")] = 0.0,
    config: Annotated[Optional[Path], typer.Option("--config", help=CONFIG_HELP)] = None,
    overrides: Annotated[Optional[list[str]], typer.Option("-c", "--set", help=SET_HELP)] = None,
    fmt: Annotated[Format, typer.Option("--format")] = Format.text,
) -> None:
    """Time this device's training step, feature extraction and (with --onnx-dir) ONNX inference; write a
    device profile from what was measured."""
    with cli_errors():
        import json

        from fedafd.edge_client.bench import run_bench
        from fedafd.export.timing import onnx_rows

        client_config = load_config(ClientConfig, config, overrides, kind=kind)
        graphs = onnx_rows(onnx_dir) if onnx_dir is not None else []
        result = run_bench(client_config, onnx_dir, graphs, out, name, link, reference_ms)
        typer.echo(json.dumps(result, indent=2) if fmt == "json" else
                   "\n".join(f"{k}: {v}" for k, v in result.items()))


fedafd_edge = typer.Typer(help="A fedafd edge device: join a federation, export its model, run it with ONNX Runtime.",
                          no_args_is_help=True, add_completion=False)
"""The `fedafd-edge` entry point."""
fedafd_edge.add_typer(federated_app)
fedafd_edge.add_typer(app)


if __name__ == "__main__":
    fedafd_edge()
