"""`fedafd-edge`: an edge device that joins a federation."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from fedafd.runtime.cli_support import cli_errors, setup_logging
from fedafd.runtime.config import ClientConfig, load_config, write_config

app = typer.Typer(help="A fedafd edge device.", no_args_is_help=True, add_completion=False)


@app.callback()
def main() -> None:
    """A fedafd edge device: join a federation, export its model, run it with ONNX Runtime."""
    # A callback keeps `join` a named subcommand (typer runs a lone command without its name).


@app.command()
def join(
    server: Annotated[str, typer.Option(help="The server's ZeroMQ address, e.g. tcp://127.0.0.1:5555.")],
    kind: Annotated[Optional[str], typer.Option(help="image, text or multimodal.")] = None,
    partition: Annotated[Optional[int], typer.Option(help="This device's share of the non-IID split (0-based).")] = None,
    num_partitions: Annotated[Optional[int], typer.Option(help="How many devices of this kind share the data.")] = None,
    client_id: Annotated[Optional[str], typer.Option(help="Unique device id (default KIND-PARTITION).")] = None,
    state_dir: Annotated[Optional[Path], typer.Option(help="Where this device keeps its state between rounds "
                                                           "(default edge_state/<client id>).")] = None,
    config: Annotated[Optional[Path], typer.Option("--config", help="TOML file of ClientConfig values.")] = None,
    overrides: Annotated[Optional[list[str]], typer.Option("-c", "--set", help="key=value override, repeatable.")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Join a federation: train each round, upload public-set features (never data, never weights)."""
    setup_logging(verbose, default_level="INFO")
    with cli_errors():
        from fedafd.edge_client.app import EdgeApp
        from fedafd.runtime.transport import ZmqClientTransport

        client_config = load_config(ClientConfig, config, overrides, kind=kind, partition=partition,
                                    num_partitions=num_partitions, client_id=client_id)
        folder = state_dir or Path("edge_state") / client_config.client_id
        folder.mkdir(parents=True, exist_ok=True)
        write_config(client_config, folder / "config.json")
        transport = ZmqClientTransport(server, client_config.client_id)
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


if __name__ == "__main__":
    app()
