"""`fedafd-cloud simulate`, and the `fedafd-cloud` program: cloud_server/cli.py's commands with simulate mounted
beside them (simulate hosts the devices too, so it lives here: the server's package never imports the device's)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from fedafd.cloud_server.cli import (ConfigOption, LocalSetOption, MlflowOption, OverridesOption, TensorboardOption,
                                     VerboseOption)
from fedafd.cloud_server.cli import app as server_app
from fedafd.runtime.cli_support import cli_errors, live_status, setup_logging
from fedafd.runtime.config import ServerConfig, config_to_dict, load_config, write_config
from fedafd.cloud_server.reporting.report import CONFIG_FILE, METRICS_FILE

app = typer.Typer(no_args_is_help=True, add_completion=False)


@app.command()
def simulate(
    fleet: Annotated[str, typer.Option(help="The devices, e.g. image=3,text=3,multimodal=4, or a fleet TOML (each "
                                            "kind's count, pool and partitioner, each device's own data: docs/data.md"
                                            "); the same devices, architectures, partitions and "
                                            "data as serve --local.")],
    out: Annotated[Optional[Path], typer.Option(help="Run folder (metrics.jsonl, checkpoint, config, device states). "
                                                     "Default: runs/<timestamp>.")] = None,
    config: ConfigOption = None,
    overrides: OverridesOption = None,
    local_set: LocalSetOption = None,
    workers: Annotated[int, typer.Option(help="Devices that train at the same time (threads; each draws its own "
                                              "random numbers and uploads arrive in the fleet's order, so the "
                                              "numbers do not depend on it). About the machine's cores.")] = 2,
    tensorboard: TensorboardOption = None,
    mlflow: MlflowOption = None,
    verbose: VerboseOption = False,
) -> None:
    """Run a whole federation in this process: the server and every device, one computing at a time, through
    the real wire encode/decode on an in-process hub. Same seed, same metrics.jsonl (but for timings); the run
    folder is the one `serve` writes, so `report`, `report --html` and `profile` read it."""
    setup_logging(verbose)
    with cli_errors():
        from fedafd.cloud_server.checkpoint import check_fresh
        from fedafd.cloud_server.fleet import parse_fleet
        from fedafd.cloud_server.tracking import open_tracking, require_extras
        from fedafd.cloud_server.reporting.report import progress_line
        from fedafd.simulation.engine import device_configs, run_simulation, simulation_config

        if workers < 1:
            raise typer.BadParameter(f"--workers must be >= 1, got {workers}")
        fleet_spec = parse_fleet(fleet)
        server_config = load_config(ServerConfig, config, overrides, **simulation_config(ServerConfig(), fleet_spec))
        # every device's settings: a wrong key or value fails here, before anything starts
        device_configs(server_config, fleet_spec, local_set or [])
        require_extras(*(name for name, given in (("tensorboard", tensorboard), ("mlflow", mlflow)) if given))
        run_dir = out or Path("runs") / time.strftime("%Y%m%d-%H%M%S")
        check_fresh(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        write_config(server_config, run_dir / CONFIG_FILE)
        typer.echo(f"fedafd-cloud: simulating {sum(fleet_spec.values())} devices in one process, run folder {run_dir}",
                   err=True)
        params = dict(config_to_dict(server_config), fleet=fleet, local_set=local_set or [], engine="simulate",
                      workers=workers)
        tracking = open_tracking(run_dir, params, tensorboard, mlflow)
        status = "FAILED"
        try:
            started = time.perf_counter()
            with live_status() as show:
                run_simulation(server_config, fleet_spec, run_dir, local_set or [], workers, sinks=[tracking], on_stage=show,
                               on_round=lambda record: typer.echo(progress_line(record, server_config.rounds)))
            status = "FINISHED"
            typer.echo(f"done: {server_config.rounds} rounds in {time.perf_counter() - started:.0f}s; "
                       f"metrics in {run_dir / METRICS_FILE}")
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            tracking.close(status)


fedafd_cloud = typer.Typer(help="The fedafd cloud server.", no_args_is_help=True, add_completion=False)
"""The `fedafd-cloud` entry point."""
fedafd_cloud.add_typer(server_app)
fedafd_cloud.add_typer(app)


if __name__ == "__main__":
    fedafd_cloud()
