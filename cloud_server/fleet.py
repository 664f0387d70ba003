"""`--local KIND=N,...`: start real `fedafd-edge join` processes against this server on loopback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Sequence

from fedafd.runtime.config import ClientConfig, ConfigError, ServerConfig, load_config
from fedafd.runtime.wire import CLIENT_KINDS

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


def parse_fleet(spec: str) -> dict[str, int]:
    """'image=3,text=3,multimodal=4' -> {'image': 3, 'text': 3, 'multimodal': 4}."""
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
    return fleet


def client_ids(fleet: dict[str, int]) -> list[str]:
    return [f"{kind}-{i}" for kind, count in fleet.items() for i in range(count)]


def device_settings(config: ServerConfig, kind: str, index: int) -> dict[str, object]:
    """The ClientConfig values the fleet gives device `index` of `kind` (before the user's --local-set):
    the server's split and caps, and its turn through the architectures of the config's device regime. `serve --local` and `simulate`
    build their devices from the same values."""
    c = config
    cycle = DEVICE_REGIMES[c.device_regime]
    return {
        "alpha": c.alpha, "seed": c.seed, "max_private": c.max_private, "max_test": c.max_test,
        "image_arch": cycle["image"][index % len(cycle["image"])],
        "text_arch": cycle["text"][index % len(cycle["text"])],
        "round_wait_s": c.round_deadline_s * 4 + c.join_timeout_s,
    }


def fleet_configs(config: ServerConfig, fleet: dict[str, int], client_overrides: Sequence[str] = (),
                  **extra: object) -> list[ClientConfig]:
    """Every device's ClientConfig (the fleet's values, `extra`, then the user's --local-set), validated before
    anything starts, and differentially private devices checked against the server's method settings."""
    from fedafd.cloud_server.strategies import build_strategy

    configs = []
    for kind, count in fleet.items():
        for index in range(count):
            values = dict(device_settings(config, kind, index), **extra)
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

    def __init__(self, fleet: dict[str, int], endpoint: str, run_dir: Path, config: ServerConfig,
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
        overrides = device_settings(self.config, kind, index)
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
