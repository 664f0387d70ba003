"""`fedafd-cloud`: serve a federation, fetch the bundled data, read a run's results."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Annotated, NoReturn, Optional

import typer

from fedafd.runtime.cli_support import (
    Format, ProfileFormat, cli_errors, config_listing, live_status, raise_open_files_limit, setup_logging,
)
from fedafd.runtime.config import ServerConfig, config_to_dict, load_config, write_config
from fedafd.cloud_server.reporting.report import CONFIG_FILE, METRICS_FILE

app = typer.Typer(help="The fedafd cloud server.", no_args_is_help=True, add_completion=False)
data_app = typer.Typer(help="The bundled real data sets (from Debian packages, offline at run time).",
                       no_args_is_help=True)
app.add_typer(data_app, name="data")
nodes_app = typer.Typer(help="The allow-list of edge public keys this server admits over CURVE "
                             "(changes apply to the next connection, no restart).", no_args_is_help=True)
app.add_typer(nodes_app, name="nodes")

INSECURE_WARNING = ("warning: --insecure: plain-text transport without authentication; anyone who can reach "
                    "the address can join and read what is sent. Use it on loopback only.")


# The options `serve` and `simulate` share, defined once so their help cannot drift. (Square brackets are escaped:
# typer's rich markup would take `[tensorboard]` for a style and print "(needs fedafd)".)
ConfigOption = Annotated[Optional[Path], typer.Option("--config", help="TOML file of ServerConfig values "
                                                                       "(keys: `fedafd-cloud config`).")]
OverridesOption = Annotated[Optional[list[str]], typer.Option("-c", "--set", help="KEY=VALUE of ServerConfig, repeatable "
                                                              "(e.g. -c rounds=5 -c strategy=local); `fedafd-cloud "
                                                              "config` lists every key, its type, default and meaning.")]
LocalSetOption = Annotated[Optional[list[str]], typer.Option("--local-set", help="KEY=VALUE of ClientConfig for every "
                                                             "local or simulated device (e.g. disc_lr=1e-4), repeatable; "
                                                             "`fedafd-edge config` lists every key.")]
TensorboardOption = Annotated[Optional[Path], typer.Option(help="Also write every round to TensorBoard event files in "
                                                                "DIR/<run folder name> (needs fedafd\\[tensorboard]).")]
MlflowOption = Annotated[Optional[str], typer.Option(help="Also log to an MLflow run at this tracking URI, e.g. "
                                                          "sqlite:///mlruns.db, a folder, or http://host:5000 "
                                                          "(needs fedafd\\[mlflow]).")]
VerboseOption = Annotated[bool, typer.Option("--verbose", "-v", help="Log every message event.")]


@app.command()
def serve(
    bind: Annotated[Optional[str], typer.Option(help="ZeroMQ address to bind, e.g. tcp://0.0.0.0:5555 "
                                                     "(default tcp://127.0.0.1:5555; with --local a free loopback port).")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Run folder (metrics.jsonl, checkpoint, config, client states). "
                                                     "Default: runs/<timestamp>.")] = None,
    config: ConfigOption = None,
    overrides: OverridesOption = None,
    local: Annotated[Optional[str], typer.Option(help="Also start clients on this machine, e.g. "
                                                      "image=3,text=3,multimodal=4, or a fleet TOML (docs/data.md).")] = None,
    local_set: LocalSetOption = None,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out from its last finished round (same run id, "
                                              "so devices continue their states; the config may change only in "
                                              "rounds, timeouts, client counts, quorum, device, threads, sed_chunk).")] = False,
    keys: Annotated[Optional[Path], typer.Option(help="Folder with server.key and allowed_clients.json (see "
                                                      "`fedafd-cloud keys` and `nodes add`): CURVE encryption, "
                                                      "allow-listed devices only. Default with --local: "
                                                      "RUN_DIR/keys, generated.")] = None,
    insecure: Annotated[bool, typer.Option("--insecure", help="Plain text, no authentication (prints a warning).")] = False,
    tensorboard: TensorboardOption = None,
    mlflow: MlflowOption = None,
    workers: Annotated[int, typer.Option(help="Server processes that run stage 1, stage 3 and evaluation data-parallel "
                                              "(torch DDP; this command re-runs itself under torchrun). Rank 0 alone "
                                              "talks to the devices. Or start it with torchrun yourself.")] = 1,
    verbose: VerboseOption = False,
) -> None:
    """Run a federation: wait for clients, then stage 1, downlink, collect, stage 3, evaluate, every round."""
    setup_logging(verbose)
    raise_open_files_limit()  # one descriptor per connected device
    with cli_errors():
        world = int(os.environ["WORLD_SIZE"]) if "WORLD_SIZE" in os.environ else None  # set by torchrun
        if workers < 1 or (world is not None and workers not in (1, world)):
            raise typer.BadParameter(f"--workers must be >= 1 and match torchrun's {world} processes, got {workers}")
        if world is None and workers > 1:
            _relaunch_under_torchrun(workers)
        rank = int(os.environ.get("RANK", "0"))
        # Nothing here imports torch: the socket is bound and the --local devices started first, so they
        # import and load while this process does (ServerApp answers their Joins while it loads).
        from fedafd.cloud_server.checkpoint import check_fresh, check_resume
        from fedafd.cloud_server.fleet import LocalFleet, client_ids, fleet_configs, parse_fleet
        from fedafd.cloud_server.limits import max_upload_bytes
        from fedafd.cloud_server.tracking import open_tracking, require_extras
        from fedafd.runtime.keys import ALLOW_LIST, SERVER_KEY, AllowList, generate_keypair, load_keypair
        from fedafd.cloud_server.reporting.report import progress_line
        from fedafd.runtime.transport import CurveServerKeys, ZmqServerTransport

        fleet_spec = parse_fleet(local) if local else None
        if local_set and fleet_spec is None:
            raise typer.BadParameter("--local-set needs --local")
        explicit = {"expected_clients": len(client_ids(fleet_spec))} if fleet_spec else {}
        server_config = load_config(ServerConfig, config, overrides, **explicit)
        if fleet_spec:
            # every device's settings: a wrong key or value fails here, not in 10 children
            fleet_configs(server_config, fleet_spec, local_set or [])
        if rank != 0:  # no socket, no run folder: rank 0 sends what to train
            from fedafd.cloud_server.worker import serve_worker

            serve_worker(_join_ranks(server_config))
            return
        if resume and out is None:
            raise typer.BadParameter("--resume needs --out RUN_DIR")
        require_extras(*(name for name, given in (("tensorboard", tensorboard), ("mlflow", mlflow)) if given))
        if insecure and keys is not None:
            raise typer.BadParameter("--insecure and --keys exclude each other")
        if not insecure and keys is None and fleet_spec is None:
            raise typer.BadParameter("pass --keys DIR (CURVE; create it with `fedafd-cloud keys --out DIR` and "
                                     "`fedafd-cloud nodes add`) or --insecure for plain text")
        run_dir = out or Path("runs") / time.strftime("%Y%m%d-%H%M%S")
        if resume:
            check_resume(run_dir, server_config)  # before config.json is overwritten and devices start
        else:
            check_fresh(run_dir)
        from fedafd.cloud_server.public_data import server_data

        server_data(server_config).check(server_config)  # a bad file or row stops serve before it binds
        curve = None
        if insecure:
            typer.secho(INSECURE_WARNING, fg="yellow", err=True)
        else:
            keys = keys or run_dir / "keys"
            if fleet_spec is not None and not (keys / SERVER_KEY).exists():
                generate_keypair(keys / SERVER_KEY)
            pair = load_keypair(keys / SERVER_KEY)
            curve = CurveServerKeys(pair.public, pair.secret, AllowList(keys / ALLOW_LIST).client_of_key)
        transport = ZmqServerTransport(bind or ("tcp://127.0.0.1:*" if fleet_spec else "tcp://127.0.0.1:5555"),
                                       curve=curve, max_message_bytes=max_upload_bytes(server_config))
        # Only now, with the arguments, the config, the keys and the address checked, is the run folder
        # written: a refused command leaves none behind (--local's generated keys are the exception).
        run_dir.mkdir(parents=True, exist_ok=True)
        write_config(server_config, run_dir / CONFIG_FILE)
        (run_dir / "server.json").write_text(json.dumps({"endpoint": transport.endpoint}) + "\n")
        fleet = LocalFleet(fleet_spec, transport.endpoint, run_dir, server_config,
                           keys_dir=None if insecure else keys, client_overrides=local_set or []) if fleet_spec else None
        typer.echo(f"fedafd-cloud: serving on {transport.endpoint}, run folder {run_dir}", err=True)
        if fleet:
            fleet.start()
            typer.echo(f"started {len(fleet.processes)} local clients: {', '.join(fleet.processes)}", err=True)
        server = tracking = ranks = None
        status = "FAILED"  # of the MLflow run, unless the rounds finish or are interrupted
        try:
            from fedafd.cloud_server.app import ServerApp
            from fedafd.cloud_server.distributed import ONE_PROCESS, RankFailed

            def stopped_by_launcher(signum, frame) -> NoReturn:  # the --local devices still get stopped
                raise RankFailed("stopped by SIGTERM: torchrun sends it to every rank once one fails (its report "
                                 "names which, and its exit code)")

            if world is not None:
                signal.signal(signal.SIGTERM, stopped_by_launcher)
            ranks = _join_ranks(server_config) if world is not None else ONE_PROCESS
            params = config_to_dict(server_config)  # the run's settings, as MLflow params / TensorBoard HParams
            if fleet_spec:
                params.update(local=local, local_set=local_set or [])
            tracking = open_tracking(run_dir, params, tensorboard, mlflow, resume)
            server = ServerApp(server_config, transport, run_dir, dead_clients=fleet.dead if fleet else dict,
                               resume=resume, sinks=[tracking], ranks=ranks)
            started = time.perf_counter()
            with live_status() as show, ranks.reporting():
                server.on_stage = show
                server.run(on_round=lambda record: typer.echo(progress_line(record, server_config.rounds)))
            status = "FINISHED"
            typer.echo(f"done: {server_config.rounds} rounds in {time.perf_counter() - started:.0f}s; "
                       f"metrics in {run_dir / METRICS_FILE}")
            if fleet:
                failed = {cid: code for cid, code in fleet.stop().items() if code != 0}
                if failed:
                    typer.echo(f"warning: clients exited with errors {failed}; see {run_dir}/clients/*/log.txt", err=True)
        except BaseException as err:
            status = "KILLED" if isinstance(err, KeyboardInterrupt) else status
            if fleet:
                fleet.kill()
            raise
        finally:
            if tracking is not None:
                tracking.close(status)
            if server is not None:
                server.close()
            else:
                transport.close()
            if ranks is not None:
                ranks.close()


def _relaunch_under_torchrun(workers: int) -> NoReturn:
    """`serve --workers N`: this same command as N processes of torch's launcher (RANK, WORLD_SIZE, MASTER_ADDR
    in their environment); it tears them all down when one fails."""
    # "--": torchrun would read an abbreviation of its own options into ours (--local for --local-addr).
    os.execv(sys.executable, [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={workers}",
                              "-m", "--", "fedafd.cloud_server.cli", *sys.argv[1:]])


def _join_ranks(config: ServerConfig):
    from fedafd.cloud_server.distributed import join_from_environment

    # Rank 0's messages may be apart by as long as it waits for devices: joins, then a round's uploads.
    longest_wait_s = config.join_timeout_s + config.round_deadline_s + config.worker_timeout_s
    return join_from_environment(config.device, config.worker_timeout_s, longest_wait_s)


@app.command("convert-checkpoint")
def convert_checkpoint_cmd(
    source: Annotated[Path, typer.Argument(help="A run folder (or its checkpoint/server.pt) of an older build.")],
) -> None:
    """Rewrite an older build's torch.save checkpoint (server.pt, format 2) as server.safetensors, so that
    `serve --resume` and `fedafd-edge export` read it. It gets a new run id: convert the devices' states
    with `fedafd-edge convert-state DIR --run-id RUN_ID` to continue them."""
    with cli_errors():
        from fedafd.cloud_server.checkpoint import convert_checkpoint

        target, meta = convert_checkpoint(source)
        typer.echo(f"wrote {target} (format {meta['format']}, round {meta['round']}, run id {meta['run_id']})")


@app.command("keys")
def keys_cmd(
    out: Annotated[Path, typer.Option(help="Folder for server.key (the pair, 0600) and server.pub.")] = Path("server_keys"),
    force: Annotated[bool, typer.Option(help="Overwrite an existing key pair.")] = False,
) -> None:
    """Generate the server's CURVE key pair; give server.pub to every device (`fedafd-edge join --server-key`)."""
    with cli_errors():
        from fedafd.runtime.keys import SERVER_KEY, generate_keypair

        pair = generate_keypair(out / SERVER_KEY, overwrite=force)
        typer.echo(f"wrote {out / SERVER_KEY} and {out / 'server.pub'}; public key: {pair.public.decode()}")


def _allow_list(keys: Path):
    from fedafd.runtime.keys import ALLOW_LIST, AllowList

    return AllowList(keys / ALLOW_LIST)


_KEYS_DIR = Annotated[Path, typer.Option(help="The server's key folder (holds allowed_clients.json).")]


@nodes_app.command("add")
def nodes_add(
    client_id: Annotated[str, typer.Argument(help="The device's client id (what it joins as).")],
    key: Annotated[str, typer.Argument(help="Its public key: a .pub/.key file from `fedafd-edge keys`, or the z85 text.")],
    keys: _KEYS_DIR = Path("server_keys"),
) -> None:
    """Admit a device: its key may connect, and only as this client id."""
    with cli_errors():
        from fedafd.runtime.keys import load_public_key

        _allow_list(keys).add(client_id, load_public_key(key).decode())
        typer.echo(f"allowed {client_id}")


@nodes_app.command("list")
def nodes_list(keys: _KEYS_DIR = Path("server_keys"),
               fmt: Annotated[Format, typer.Option("--format")] = Format.text) -> None:
    """The admitted devices and their public keys."""
    with cli_errors():
        entries = _allow_list(keys).entries()
        typer.echo(json.dumps(entries, indent=2) if fmt == "json" else
                   "\n".join(f"{cid} {key}" for cid, key in entries.items()))


@nodes_app.command("revoke")
def nodes_revoke(client_id: Annotated[str, typer.Argument(help="The device to refuse from now on.")],
                 keys: _KEYS_DIR = Path("server_keys")) -> None:
    """Refuse a device from its next connection on (a running server reads the list for every connection)."""
    with cli_errors():
        _allow_list(keys).revoke(client_id)
        typer.echo(f"revoked {client_id}")


@data_app.command("fetch")
def data_fetch() -> None:
    """Install the Debian data packages into the cache (apt-get download + dpkg-deb -x), prepare the
    arrays every process reads and the frozen backbones' features of them. Idempotent."""
    setup_logging(False)
    with cli_errors():
        from fedafd.runtime.data.datasets import prepare_all
        from fedafd.runtime.data.modal import build_feature_caches
        from fedafd.runtime.data.fetch import fetch

        fetch()
        prepare_all()
        build_feature_caches(log=typer.echo)
        typer.echo("data ready")


@data_app.command("info")
def data_info(fmt: Annotated[Format, typer.Option("--format")] = Format.text) -> None:
    """Sizes of every data set and split (prepares them first if needed)."""
    with cli_errors():
        from fedafd.runtime.data.modal import load_public_data, load_task_data

        loaders = {"public pairs (emoji)": load_public_data,
                   "image task (Fashion-MNIST)": lambda split: load_task_data("image", split),
                   "text task (WordNet topics)": lambda split: load_task_data("text", split),
                   "multimodal task (Tux Paint stamps)": lambda split: load_task_data("multimodal", split)}
        info = {name: {split: len(load(split)) for split in ("train", "test")} for name, load in loaders.items()}
        typer.echo(json.dumps(info, indent=2) if fmt == "json" else
                   "\n".join(f"{name}: {sizes['train']} train / {sizes['test']} test" for name, sizes in info.items()))


@data_app.command("split")
def data_split(
    src: Annotated[str, typer.Argument(help="The pool to split: a path fedafd reads (docs/data.md) or "
                                            "demo:NAME.")],
    kind: Annotated[str, typer.Option(help="What the rows are: image, text or multimodal (pairs).")],
    partitioner: Annotated[str, typer.Option(help="iid, dirichlet, shard, pathological, natural (Flower Datasets' "
                                                  "partitioners) or dirichlet_legacy (the demo's split).")],
    num_partitions: Annotated[int, typer.Option(help="Devices to split among (natural: the number of natural ids).")],
    out: Annotated[Path, typer.Option(help="Folder to write: <kind>-<i>/ per device, and split.json.")],
    alpha: Annotated[Optional[float], typer.Option(help="dirichlet: concentration (default 0.1).")] = None,
    min_partition_size: Annotated[Optional[int], typer.Option(help="dirichlet: rows each device must get "
                                                                   "(default 10).")] = None,
    self_balancing: Annotated[Optional[bool], typer.Option("--self-balancing", help="dirichlet: no more rows for "
                                                           "devices above the average size.")] = None,
    num_shards_per_partition: Annotated[Optional[int], typer.Option(help="shard: shards per device (default 0: "
                                                                         "from --shard-size).")] = None,
    shard_size: Annotated[Optional[int], typer.Option(help="shard: rows per shard (default 0: from "
                                                           "--num-shards-per-partition).")] = None,
    keep_incomplete_shard: Annotated[Optional[bool], typer.Option("--keep-incomplete-shard", help="shard: deal "
                                                                  "out the last, shorter shard too.")] = None,
    num_classes_per_partition: Annotated[Optional[int], typer.Option(help="pathological: classes per device "
                                                                          "(default 2).")] = None,
    class_assignment_mode: Annotated[Optional[str], typer.Option(help="pathological: random (default), "
                                                                      "deterministic or first-deterministic.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the partitioner (and of the test rows drawn with "
                                           "--test-fraction); 42 is Flower's.")] = 42,
    data_config: Annotated[Optional[Path], typer.Option(help="Data config TOML of SRC (docs/data.md).")] = None,
    test_fraction: Annotated[float, typer.Option(help="Share of the rows held out as every device's test rows "
                                                      "when SRC has no test split.")] = 0.2,
) -> None:
    """Split a pool among devices with a partitioner: one folder per device that `data` + `data_config` read
    (its share of the train rows, the whole test rows), and split.json. A rerun with the same inputs does nothing."""
    with cli_errors():
        from fedafd.runtime.data.split import spec_from_options, split_pool

        spec = spec_from_options(partitioner, alpha=alpha, min_partition_size=min_partition_size,
                                 self_balancing=self_balancing, num_shards_per_partition=num_shards_per_partition,
                                 shard_size=shard_size, keep_incomplete_shard=keep_incomplete_shard,
                                 num_classes_per_partition=num_classes_per_partition,
                                 class_assignment_mode=class_assignment_mode)
        split_pool(src, kind, out, spec, num_partitions, seed, data_config, test_fraction, log=typer.echo)


@data_app.command("check")
def data_check(
    config: Annotated[Optional[Path], typer.Option("--config", help="TOML file of ServerConfig values "
                                                                     "(keys: `fedafd-cloud config`).")] = None,
    overrides: Annotated[Optional[list[str]], typer.Option("-c", "--set", help="KEY=VALUE of ServerConfig, repeatable "
                                                           "(e.g. -c public_data=coco/annotations/captions_train2017"
                                                           ".json).")] = None,
    fmt: Annotated[Format, typer.Option("--format")] = Format.text,
) -> None:
    """Print what the server would train and evaluate on (the public set, public_subset, the eval set, the pools
    its --local devices split) and every problem (the first 20, and how many); exit 1 if there is any."""
    with cli_errors():
        from fedafd.cloud_server.data_check import check_server, server_report_text

        report = check_server(load_config(ServerConfig, config, overrides))
    typer.echo(json.dumps(report, indent=2) if fmt == Format.json else server_report_text(report))
    if report["problem_count"]:
        raise typer.Exit(1)


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="A run folder written by `serve`.")],
    fmt: Annotated[Format, typer.Option("--format")] = Format.text,
    html: Annotated[bool, typer.Option("--html", help="Also write one self-contained page with plots "
                                                      "(RUN_DIR/report.html, or --out).")] = False,
    out: Annotated[Optional[Path], typer.Option(help="Where the --html page goes.")] = None,
    against: Annotated[Optional[Path], typer.Option(help="Another run folder (e.g. the same fleet with "
                                                         "-c strategy=local): the last rounds side by side.")] = None,
) -> None:
    """Per-round summary of a run: client-kind means, server retrieval, bytes per client; with --html also a
    page of plots and tables (metrics, bytes against FedAvg, stage timings, SED weights, drops, rejections);
    with --against, the last round beside another run's, with the differences."""
    with cli_errors():
        from fedafd.cloud_server.reporting.report import compare_runs, read_metrics, read_run, summarize_round

        for folder in (run_dir, against) if against is not None else (run_dir,):
            if not (folder / METRICS_FILE).exists():
                raise typer.BadParameter(f"no {METRICS_FILE} in {folder}")
        if out is not None and not html:
            raise typer.BadParameter("--out is where the --html page goes; pass --html too")
        if html:  # the run's page, with --against too (it was once silently left out)
            from fedafd.cloud_server.reporting.html_report import write_html_report

            typer.echo(f"written: {write_html_report(run_dir, out)}", err=True)
        if against is not None:
            comparison = compare_runs(read_run(run_dir), read_run(against))
            typer.echo(json.dumps(comparison, indent=2) if fmt == "json" else comparison_text(comparison, run_dir, against))
            return
        path = run_dir / METRICS_FILE
        rows = [summarize_round(record) for record in read_metrics(path)]
        if fmt == "json":
            typer.echo(json.dumps(rows, indent=2))
            return
        keys = list(dict.fromkeys(k for row in rows for k in row))
        typer.echo(" | ".join(keys))
        for row in rows:
            typer.echo(" | ".join(f"{row[k]:.4g}" if k in row else "-" for k in keys))


def comparison_text(comparison: dict, run_dir: Path, against: Path) -> str:
    rounds = comparison["rounds"]
    lines = [f"last round of {run_dir} (round {rounds[0]}) against {against} (round {rounds[1]})",
             "the runs' configs differ in: " + (", ".join(comparison["config_differs"]) or "nothing"),
             f"{'metric':<32} {'run':>10} {'against':>10} {'difference':>11}"]
    for key, entry in comparison["metrics"].items():
        number = ".4g" if "bytes" in key else ".2f"
        lines.append(f"{key:<32} {entry['run']:>10{number}} {entry['against']:>10{number}} {entry['difference']:>+11{number}}")
    return "\n".join(lines)


@app.command()
def profile(
    run_dir: Annotated[Path, typer.Argument(help="A run folder written by `serve`.")],
    fmt: Annotated[ProfileFormat, typer.Option("--format")] = ProfileFormat.markdown,
    out: Annotated[Optional[Path], typer.Option(help="Where profile.md/.json/.png go (default: RUN_DIR).")] = None,
) -> None:
    """Bytes per round and client kind by what they carry (public features, global features, global tower,
    control), beside FedAvg for the same model, the crossover model size, and a PNG of cumulative bytes."""
    with cli_errors():
        from fedafd.cloud_server.reporting.bandwidth import profile_markdown, write_profile

        if not (run_dir / METRICS_FILE).exists():
            raise typer.BadParameter(f"no {METRICS_FILE} in {run_dir}")
        result = write_profile(run_dir, out)
        typer.echo(json.dumps(result, indent=2) if fmt == "json" else profile_markdown(result))
        if fmt != "json":
            typer.echo(f"written: {Path(result['plot']).with_suffix('.md')}, .json, {result['plot']}", err=True)


@app.command("config")
def config_cmd(fmt: Annotated[Format, typer.Option("--format")] = Format.text) -> None:
    """Every server setting (ServerConfig) with its type, default and meaning: what `serve -c KEY=VALUE`
    and `serve --config FILE.toml` accept."""
    typer.echo(config_listing(ServerConfig, fmt, "Set with `fedafd-cloud serve -c KEY=VALUE` (repeatable) or "
                                                 "`--config FILE.toml` (KEY = VALUE lines); later wins."))


if __name__ == "__main__":
    app()
