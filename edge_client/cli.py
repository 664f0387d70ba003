"""`fedafd-edge join` and its companions: an edge device that joins a federation (the `fedafd-edge` program
mounts these with export/cli.py's commands)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated, Optional

import typer

from fedafd.runtime.cli_support import Format, Kind, cli_errors, config_listing, setup_logging
from fedafd.runtime.config import ClientConfig, load_config

app = typer.Typer(help="A fedafd edge device in a federation (`fedafd-edge` adds export, infer and bench: "
                       "export/cli.py).", no_args_is_help=True, add_completion=False)
log = logging.getLogger("fedafd.edge")
data_app = typer.Typer(help="This device's own data, checked before anything trains.", no_args_is_help=True)
app.add_typer(data_app, name="data")

CONFIG_HELP = "TOML file of ClientConfig values (keys: `fedafd-edge config`)."
SET_HELP = "KEY=VALUE of ClientConfig, repeatable; `fedafd-edge config` lists every key, its type, default and meaning."


@app.command()
def join(
    server: Annotated[str, typer.Option(help="The server's ZeroMQ address, e.g. tcp://127.0.0.1:5555.")],
    kind: Annotated[Kind, typer.Option(help="This device's task: image and text classify, multimodal retrieves.")],
    data: Annotated[Optional[str], typer.Option(help="This device's own data: a folder or file (ImageFolder, CSV/TSV/"
                                                     "JSONL, CIFAR binary, .npz, COCO/Karpathy JSON, metadata.jsonl "
                                                     "folder, parquet, save_to_disk); it holds exactly those rows. "
                                                     "Default: a share of its kind's bundled set.")] = None,
    partition: Annotated[Optional[int], typer.Option(help="This device's share of the non-IID split (0-based).")] = None,
    num_partitions: Annotated[Optional[int], typer.Option(help="How many devices of this kind share the data "
                                                               "(default 1: this device holds all of it).")] = None,
    client_id: Annotated[Optional[str], typer.Option(help="Unique device id (default KIND-PARTITION).")] = None,
    state_dir: Annotated[Optional[Path], typer.Option(help="Where this device keeps its state between rounds "
                                                           "(default edge_state/<run id>/<client id>, the run id "
                                                           "being the federation's, from the server).")] = None,
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
                                    num_partitions=num_partitions, client_id=client_id, profile=profile, data=data)
        if client_config.num_partitions == 1 and not client_config.data:
            log.warning("num_partitions is 1: this device holds the whole %s data set (up to max_private=%d); when N "
                        "devices of this kind join, give each --num-partitions N and its own --partition",
                        client_config.kind, client_config.max_private)
        link = None
        if client_config.profile:
            from fedafd.runtime.shaping import load_profile

            link = load_profile(client_config.profile)
        _read_data(client_config)  # every bad file or row is named before anything connects
        curve = _curve_keys(key, server_key, insecure)  # after every check: a refused join writes nothing
        transport = ZmqClientTransport(server, client_config.client_id, curve=curve)
        if link is not None:
            from fedafd.runtime.shaping import ShapedClientTransport

            transport = ShapedClientTransport(transport, link)
        edge = None
        try:
            edge = EdgeApp(client_config, transport, state_dir)
            reports = edge.run()
            typer.echo(f"{client_config.client_id}: finished after {len(reports)} round(s)")
        finally:
            if edge is not None:
                edge.close()
            else:
                transport.close()


def _read_data(config: ClientConfig) -> None:
    """The device's private and public data read (and cached) now, so a bad file stops `join` before it connects;
    EdgeApp then takes the same rows from the process's cache."""
    from fedafd.edge_client.private_data import load_private_data
    from fedafd.runtime.data.modal import public_source, public_spec

    private = load_private_data(config)
    public_source(public_spec(config.public_data, config.public_data_config, config.on_bad_sample))
    log.info("%s: %d private training rows, %d test rows (%d bad rows skipped)", config.client_id,
             len(private.train), len(private.test), private.skipped)


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


@data_app.command("check")
def data_check(
    kind: Annotated[Kind, typer.Option(help="What the device does with the rows: image and text classify, "
                                            "multimodal retrieves (image-text pairs).")],
    data: Annotated[str, typer.Option(help="The data to check: a folder or file (docs/data.md) or "
                                           "demo:NAME.")],
    data_config: Annotated[Optional[Path], typer.Option(help="Data config TOML of --data (docs/data.md).")] = None,
    data_format: Annotated[Optional[str], typer.Option(help="The format, if not told from the path (imagefolder, "
                                                            "csv, tsv, jsonl, cifar, npz, coco, karpathy, parquet, "
                                                            "hf_disk).")] = None,
    test_data: Annotated[Optional[str], typer.Option(help="The device's test rows, when --data has no test "
                                                          "split.")] = None,
    test_fraction: Annotated[float, typer.Option(help="Share of the rows held out as test rows when --data has no "
                                                      "test split and no --test-data is given.")] = 0.2,
    fmt: Annotated[Format, typer.Option("--format")] = Format.text,
) -> None:
    """Print what a device would train on (rows, classes and rows per class, captions per picture, picture sizes)
    and every problem in its data (the first 20, and how many); exit 1 if there is any."""
    with cli_errors():
        from fedafd.runtime.data.sources.check import check_source, report_text
        from fedafd.runtime.data.sources.options import load_options

        options = load_options(data_config, format=data_format)
        report = check_source(str(kind), data, options, test_data or "", test_fraction)
    typer.echo(json.dumps(report, indent=2) if fmt == Format.json else report_text(report))
    if report["problem_count"]:
        raise typer.Exit(1)


@app.command("convert-state")
def convert_state_cmd(
    state_dir: Annotated[Path, typer.Argument(help="A state folder of an older build (holds client_state.pt).")],
    run_id: Annotated[str, typer.Option(help="The federation it continues (what `fedafd-cloud convert-checkpoint` "
                                             "printed); empty: only for `export`.")] = "",
) -> None:
    """Rewrite an older build's torch.save state (client_state.pt) as client_state.safetensors."""
    with cli_errors():
        from fedafd.edge_client.state import convert_state

        typer.echo(f"wrote {convert_state(state_dir, run_id)}")


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


@app.command("config")
def config_cmd(fmt: Annotated[Format, typer.Option("--format")] = Format.text) -> None:
    """Every device setting (ClientConfig) with its type, default and meaning: what `join -c KEY=VALUE`,
    `join --config FILE.toml` and the server's `serve --local-set KEY=VALUE` accept."""
    typer.echo(config_listing(ClientConfig, fmt, "Set with `fedafd-edge join -c KEY=VALUE` (repeatable) or "
                                                 "`--config FILE.toml` (KEY = VALUE lines); later wins."))


if __name__ == "__main__":
    app()
