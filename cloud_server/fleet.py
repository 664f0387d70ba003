"""`--local KIND=N,...`: start real `fedafd-edge join` processes against this server on loopback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Sequence

from fedafd.runtime.config import (TOWER_KEYS, ClientConfig, ConfigError, ServerConfig, load_config, relative_to,
                                   tower_setting)
from fedafd.runtime.tomlfile import read_toml
from fedafd.runtime.vocabulary import CLIENT_KINDS

# Device regimes (ServerConfig.device_regime): the architectures a fleet's devices take turns through, per
# modality. Devices differ in architecture on purpose (that is what FedAFD is for).
DEVICE_REGIMES: dict[str, dict[str, tuple[str, ...]]] = {
    # adapters of two shapes over the frozen backbones and a small net trained from scratch
    "mixed": {"image": ("effnet_linear", "cnn_small", "effnet_mlp"), "text": ("minilm_linear", "gru", "minilm_mlp")},
    # the paper's: every device encoder smaller than the server's towers (small nets trained from scratch)
    "paper": {"image": ("cnn_small",), "text": ("gru",)},
    # every device holds the pretrained backbone the server's towers adapt (LOCAL here is "LOCAL + backbone")
    "adapters": {"image": ("effnet_linear", "effnet_mlp"), "text": ("minilm_linear", "minilm_mlp")},
}


class Fleet(dict):
    """Kind -> number of devices, in start order, and what a fleet TOML gives them: `settings[kind]`, ClientConfig
    values for every device of the kind (its pool, partitioner, ...), and `each[kind][i]`, device i's own."""

    def __init__(self, counts: dict[str, int], settings: dict[str, dict] | None = None,
                 each: dict[str, list[dict]] | None = None):
        super().__init__(counts)
        self.settings = settings or {}
        self.each = each or {}

    def values_of(self, kind: str, index: int) -> dict[str, object]:
        """The fleet TOML's ClientConfig values for device `index` of `kind` (a device given its own data holds
        exactly those rows: it is not one share of a pool)."""
        values = dict(self.settings.get(kind, {}))
        devices = self.each.get(kind, [])
        own = dict(devices[index]) if index < len(devices) else {}
        if "data" in own:
            values.update(partition=0, num_partitions=1)
        values.update(own)
        return values


def parse_fleet(spec: str) -> Fleet:
    """'image=3,text=3,multimodal=4' -> {'image': 3, 'text': 3, 'multimodal': 4}; a path ending in .toml is
    read as a fleet TOML (read_fleet_toml)."""
    if spec.strip().endswith(".toml"):
        return read_fleet_toml(Path(spec.strip()))
    fleet: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        kind, sep, count = part.partition("=")
        if not sep or kind not in CLIENT_KINDS or not count.isdigit():
            raise ConfigError(f"--local takes KIND=N[,KIND=N...] with KIND in {', '.join(CLIENT_KINDS)}; got {part!r}")
        if kind in fleet:
            raise ConfigError(f"--local names {kind!r} twice")
        fleet[kind] = int(count)
    if sum(fleet.values()) == 0:
        raise ConfigError("--local must start at least one client")
    return Fleet(fleet)


def read_fleet_toml(path: Path) -> Fleet:
    """A fleet TOML: one table per device kind, in start order, with `count` and ClientConfig keys for every device
    of the kind (e.g. `data`, its pool, and the partitioner that splits it), and optionally `[[KIND.device]]`
    tables, one per device, with that device's own keys (e.g. its own `data` folder from `fedafd-cloud data
    split`). Relative paths are read from the TOML's folder.

        [image]
        count = 3
        data = "/data/cifar-100-binary"
        partitioner = "dirichlet"
        alpha = 0.1
    """
    tables = read_toml(path, "fleet file", ConfigError)
    counts, settings, each = {}, {}, {}
    for kind, table in tables.items():
        if kind not in CLIENT_KINDS or not isinstance(table, dict):
            raise ConfigError(f"{path}: [{kind}] is not a device kind; the tables are {', '.join(CLIENT_KINDS)}")
        table = dict(table)
        devices = table.pop("device", [])
        if not isinstance(devices, list) or not all(isinstance(d, dict) for d in devices):
            raise ConfigError(f"{path}: {kind}.device must be [[{kind}.device]] tables")
        count = table.pop("count", len(devices))
        if isinstance(count, bool) or not isinstance(count, int) or count < 0 or count < len(devices):
            raise ConfigError(f"{path}: {kind}.count must be an integer >= the {len(devices)} [[{kind}.device]] tables, "
                              f"got {count!r}")
        counts[kind] = count
        settings[kind] = {k: _relative_to(path, k, v) for k, v in table.items()}
        each[kind] = [{k: _relative_to(path, k, v) for k, v in d.items()} for d in devices]
    if sum(counts.values()) == 0:
        raise ConfigError(f"{path}: the fleet has no devices")
    fleet = Fleet(counts, settings, each)
    try:
        fleet_configs(ServerConfig(), fleet)  # every key checked now, naming the file and the device
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    return fleet


def _relative_to(path: Path, key: str, value: object) -> object:
    """ClientConfig's file keys (and a profile's .toml) read from the fleet TOML's folder."""
    if key in ClientConfig.PATH_KEYS or (key == "profile" and isinstance(value, str) and value.endswith(".toml")):
        return relative_to(path, value)
    if key in TOWER_KEYS:
        return tower_setting(value, path)
    return value


def client_ids(fleet: dict[str, int]) -> list[str]:
    return [f"{kind}-{i}" for kind, count in fleet.items() for i in range(count)]


DATA_KEYS = ("partitioner", "min_partition_size", "self_balancing", "num_shards_per_partition", "shard_size",
             "keep_incomplete_shard", "num_classes_per_partition", "class_assignment_mode", "test_fraction",
             "on_bad_sample", "public_data", "public_data_config")
"""ServerConfig keys every local device takes as they are: how pools are split, and the public set (a device must
hold the server's)."""


def device_settings(config: ServerConfig, kind: str, index: int,
                    fleet: Fleet | dict[str, int] | None = None) -> dict[str, object]:
    """The ClientConfig values the fleet gives device `index` of `kind` (before the user's --local-set):
    the server's split, caps, pools and public set, its turn through the architectures of the config's device
    regime, then what a fleet TOML says of it. `serve --local` and `simulate` build their devices from the same
    values."""
    c = config
    cycle = DEVICE_REGIMES[c.device_regime]
    values: dict[str, object] = {
        "alpha": c.alpha, "seed": c.seed, "max_private": c.max_private, "max_test": c.max_test,
        "image_arch": cycle["image"][index % len(cycle["image"])],
        "text_arch": cycle["text"][index % len(cycle["text"])],
        "round_wait_s": c.round_deadline_s * 4 + c.join_timeout_s,
    }
    defaults = ServerConfig()
    values.update({key: getattr(c, key) for key in DATA_KEYS if getattr(c, key) != getattr(defaults, key)})
    # The server's own towers, which this machine holds: its devices run them too (GFF, G from the towers).
    values.update({f"server_{m}_tower": getattr(c, f"{m}_tower") for m in ("image", "text") if getattr(c, f"{m}_tower")})
    if getattr(c, f"{kind}_data"):
        values.update(data=getattr(c, f"{kind}_data"), data_config=getattr(c, f"{kind}_data_config"))
    if isinstance(fleet, Fleet):  # a fleet TOML's own values (a plain count mapping has none)
        values.update(fleet.values_of(kind, index))
    return values


def fleet_configs(config: ServerConfig, fleet: dict[str, int], client_overrides: Sequence[str] = (),
                  **extra: object) -> list[ClientConfig]:
    """Every device's ClientConfig (the fleet's values, `extra`, then the user's --local-set), validated before
    anything starts, and differentially private devices checked against the server's method settings."""
    from fedafd.cloud_server.strategies import build_strategy

    configs = []
    for kind, count in fleet.items():
        for index in range(count):
            values = dict(device_settings(config, kind, index, fleet), **extra)
            overrides = [f"{key}={value}" for key, value in values.items()] + list(client_overrides)
            try:
                configs.append(load_config(ClientConfig, None, overrides, kind=kind, partition=index,
                                           num_partitions=count, client_id=f"{kind}-{index}"))
            except ConfigError as err:
                raise ConfigError(f"device {kind}-{index}: {err}") from None
    if any(c.dp for c in configs) and (why := build_strategy(config).settings().dp_conflict()):
        raise ConfigError(f"dp devices cannot train strategy={config.strategy} as configured: {why}")
    return configs


class LocalFleet:
    """Child processes, one per device; each logs to RUN_DIR/clients/ID/log.txt and keeps its state there."""

    def __init__(self, fleet: Fleet | dict[str, int], endpoint: str, run_dir: Path, config: ServerConfig,
                 keys_dir: Path | None = None, client_overrides: list[str] = ()):
        self.fleet = fleet
        self.client_overrides = list(client_overrides)
        """`key=value` ClientConfig values for every device (`serve --local-set`), after the fleet's own."""
        self.keys_dir = keys_dir
        """CURVE: the server's key folder; each device gets a generated key, allow-listed there. None: --insecure."""
        self.endpoint = endpoint
        self.run_dir = run_dir
        self.config = config
        self.processes: dict[str, subprocess.Popen] = {}
        self._logs: list = []

    def command(self, kind: str, index: int) -> list[str]:
        overrides = device_settings(self.config, kind, index, self.fleet)
        command = [sys.executable, "-m", "fedafd.edge_client.cli", "join", "--server", self.endpoint, "--kind", kind,
                   "--partition", str(index), "--num-partitions", str(self.fleet[kind]),
                   "--state-dir", str(self.state_dir(f"{kind}-{index}"))]
        if self.keys_dir is None:
            command.append("--insecure")
        else:
            command += ["--server-key", str(self.keys_dir / "server.pub"),
                        "--key", str(self.client_key(f"{kind}-{index}"))]
        for item in [f"{key}={value}" for key, value in overrides.items()] + self.client_overrides:
            command += ["-c", item]
        return command

    def client_key(self, client_id: str) -> Path:
        return self.keys_dir / "clients" / f"{client_id}.key"

    def _ensure_keys(self, client_id: str) -> None:
        from fedafd.runtime.keys import ALLOW_LIST, AllowList, generate_keypair, load_keypair

        path = self.client_key(client_id)
        pair = load_keypair(path) if path.exists() else generate_keypair(path)
        AllowList(self.keys_dir / ALLOW_LIST).add(client_id, pair.public.decode())

    def state_dir(self, client_id: str) -> Path:
        return self.run_dir / "clients" / client_id

    def start(self) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        for kind, count in self.fleet.items():
            for index in range(count):
                client_id = f"{kind}-{index}"
                self.state_dir(client_id).mkdir(parents=True, exist_ok=True)
                if self.keys_dir is not None:
                    self._ensure_keys(client_id)
                log = open(self.state_dir(client_id) / "log.txt", "ab")
                self._logs.append(log)
                self.processes[client_id] = subprocess.Popen(self.command(kind, index), stdout=log,
                                                             stderr=subprocess.STDOUT, env=env)

    def dead(self) -> dict[str, int]:
        """Children that exited with an error (client id -> exit code)."""
        return {cid: p.returncode for cid, p in self.processes.items() if p.poll() is not None and p.returncode != 0}

    def stop(self, grace_s: float = 20.0) -> dict[str, int]:
        """Wait for the children to leave after Bye; terminate stragglers. Returns exit codes."""
        codes = {}
        for client_id, process in self.processes.items():
            try:
                codes[client_id] = process.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                process.terminate()
                try:
                    codes[client_id] = process.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    process.kill()
                    codes[client_id] = process.wait()
        for log in self._logs:
            log.close()
        return codes

    def kill(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.kill()
        self.stop(grace_s=5)
