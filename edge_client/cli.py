"""`fedafd-edge`: an edge device that joins a federation."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Optional

import typer

from fedafd.runtime.cli_support import Format, Kind, cli_errors, config_listing, setup_logging
from fedafd.runtime.config import ClientConfig, load_config, write_config

app = typer.Typer(help="A fedafd edge device.", no_args_is_help=True, add_completion=False)
log = logging.getLogger("fedafd.edge")

CONFIG_HELP = "TOML file of ClientConfig values (keys: `fedafd-edge config`)."
SET_HELP = "KEY=VALUE of ClientConfig, repeatable; `fedafd-edge config` lists every key, its type, default and meaning."


@app.callback()
def main() -> None:
    """A fedafd edge device: join a federation, export its model, run it with ONNX Runtime."""
    # A callback keeps `join` a named subcommand (typer runs a lone command without its name).


@app.command()
def join(
    server: Annotated[str, typer.Option(help="The server's ZeroMQ address, e.g. tcp://127.0.0.1:5555.")],
    kind: Annotated[Kind, typer.Option(help="This device's task: image and text classify, multimodal retrieves.")],
    partition: Annotated[Optional[int], typer.Option(help="This device's share of the non-IID split (0-based).")] = None,
    num_partitions: Annotated[Optional[int], typer.Option(help="How many devices of this kind share the data "
                                                               "(default 1: this device holds all of it).")] = None,
    client_id: Annotated[Optional[str], typer.Option(help="Unique device id (default KIND-PARTITION).")] = None,
    state_dir: Annotated[Optional[Path], typer.Option(help="Where this device keeps its state between rounds "
                                                           "(default edge_state/<client id>).")] = None,
    config: Annotated[Optional[Path], typer.Option("--config", help=CONFIG_HELP)] = None,
    overrides: Annotated[Optional[list[str]], typer.Option("-c", "--set", help=SET_HELP)] = None,
    profile: Annotated[Optional[str], typer.Option(help="Emulate this device profile's link (delay + token-bucket "
                                                        "bandwidth): a shipped name (phone_lte, raspberry_pi_wifi, "
                                                        "workstation_ethernet) or a TOML path.")] = None,
    key: Annotated[Optional[Path], typer.Option(help="This device's CURVE key pair (from `fedafd-edge keys`); "
                                                     "the server must allow-list its public key.")] = None,
    server_key: Annotated[Optional[str], typer.Option(help="The server's public key: server.pub or its z85 text.")] = None,
    insecure: Annotated[bool, typer.Option("--insecure", help="Plain text, no authentication (prints a warning).")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Join a federation: train each round, upload public-set features (never data, never weights)."""
    setup_logging(verbose, default_level="INFO")
    with cli_errors():
        from fedafd.edge_client.app import EdgeApp
        from fedafd.runtime.transport import ZmqClientTransport

        client_config = load_config(ClientConfig, config, overrides, kind=kind, partition=partition,
                                    num_partitions=num_partitions, client_id=client_id, profile=profile)
        if client_config.num_partitions == 1:
            log.warning("num_partitions is 1: this device holds the whole %s data set (up to max_private=%d); when N "
                        "devices of this kind join, give each --num-partitions N and its own --partition",
                        client_config.kind, client_config.max_private)
        link = None
        if client_config.profile:
            from fedafd.runtime.shaping import load_profile

            link = load_profile(client_config.profile)
        curve = _curve_keys(key, server_key, insecure)
        folder = state_dir or Path("edge_state") / client_config.client_id
        folder.mkdir(parents=True, exist_ok=True)  # after every check: a refused join writes nothing
        write_config(client_config, folder / "config.json")
        transport = ZmqClientTransport(server, client_config.client_id, curve=curve)
        if link is not None:
            from fedafd.runtime.shaping import ShapedClientTransport

            transport = ShapedClientTransport(transport, link)
        edge = None
        try:
            edge = EdgeApp(client_config, transport, folder)
            reports = edge.run()
            typer.echo(f"{client_config.client_id}: finished after {len(reports)} round(s)")
        finally:
            if edge is not None:
                edge.close()
            else:
                transport.close()


def _curve_keys(key: Optional[Path], server_key: Optional[str], insecure: bool):
    """CURVE keys from --key/--server-key, or None with --insecure (after a warning); anything else is an error."""
    from fedafd.runtime.keys import load_keypair, load_public_key
    from fedafd.runtime.transport import CurveClientKeys

    if insecure:
        if key is not None or server_key is not None:
            raise typer.BadParameter("--insecure excludes --key and --server-key")
        typer.secho("warning: --insecure: plain-text transport without authentication; use it on loopback only",
                    fg="yellow", err=True)
        return None
    if key is None or server_key is None:
        raise typer.BadParameter("pass --key FILE and --server-key FILE (CURVE; create a key with `fedafd-edge keys`) "
                                 "or --insecure for plain text")
    pair = load_keypair(key)
    return CurveClientKeys(pair.public, pair.secret, load_public_key(server_key))


@app.command("keys")
def keys_cmd(
    out: Annotated[Path, typer.Option(help="Key pair file to write (0600); the public key goes beside it as .pub.")] = Path("client.key"),
    force: Annotated[bool, typer.Option(help="Overwrite an existing key pair.")] = False,
) -> None:
    """Generate this device's CURVE key pair; the server operator allow-lists the .pub with `fedafd-cloud nodes add`."""
    with cli_errors():
        from fedafd.runtime.keys import generate_keypair

        pair = generate_keypair(out, overwrite=force)
        typer.echo(f"wrote {out} and {out.with_suffix('.pub')}; public key: {pair.public.decode()}\n"
                   f"on the server: fedafd-cloud nodes add CLIENT_ID {pair.public.decode()}")


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

        client_config = load_config(ClientConfig, config, overrides, kind=kind)
        result = run_bench(client_config, onnx_dir, out, name, link, reference_ms)
        typer.echo(json.dumps(result, indent=2) if fmt == "json" else
                   "\n".join(f"{k}: {v}" for k, v in result.items()))


@app.command("export")
def export_cmd(
    state_dir: Annotated[Path, typer.Argument(help="A client's state folder (the --state-dir of `join`), or a "
                                                   "server run folder / server.pt for the global towers.")],
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


@app.command("config")
def config_cmd(fmt: Annotated[Format, typer.Option("--format")] = Format.text) -> None:
    """Every device setting (ClientConfig) with its type, default and meaning: what `join -c KEY=VALUE`,
    `join --config FILE.toml` and the server's `serve --local-set KEY=VALUE` accept."""
    typer.echo(config_listing(ClientConfig, fmt, "Set with `fedafd-edge join -c KEY=VALUE` (repeatable) or "
                                                 "`--config FILE.toml` (KEY = VALUE lines); later wins."))


if __name__ == "__main__":
    app()
