"""The simulation engine: the server and every device of a fleet in one process, on the in-process hub.
Every message still goes through the wire's encode/decode, and the server and the devices are the same
ServerApp and EdgeApp that `serve` and `join` run; what changes is only who computes when:

- turns (SequentialTurns): one participant computes at a time; the devices of a phase (joining, then each
  round) in the fleet's order, the server between them. With each participant drawing its own random
  numbers (runtime.torch_utils.OwnRandom), the same command gives the same run every time;
- memory: the data sets and the backbones' cached features are loaded once and shared read-only (the
  features memory-mapped), and a device's model, optimisers and towers wait on disk between its turns;
- time: no process per device, so no device imports torch, loads the data or builds a cache of its own.

Each device runs in a thread of its own only so that EdgeApp's blocking loop stays as `join` runs it; the
turns make the threads take their steps one after another."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import traceback
from collections import defaultdict
from pathlib import Path
from typing import Callable, Iterator, Sequence

from fedafd.cloud_server.app import ServerApp
from fedafd.cloud_server.fleet import client_ids, fleet_configs
from fedafd.edge_client.app import EdgeApp
from fedafd.runtime.config import ClientConfig, ServerConfig
from fedafd.runtime.errors import FedafdError
from fedafd.runtime.memory import compact_allocator
from fedafd.runtime.transport import InprocHub
from fedafd.runtime.turns import JOINING, SERVER

log = logging.getLogger("fedafd.simulate")

NEVER_S = 1e9
"""Timeouts that do not apply to simulated devices: one waiting for its turn is neither silent nor late,
so the server's heartbeat_timeout_s and round_deadline_s (and the devices' heartbeats) are set to this."""


class SimulationError(FedafdError):
    """A simulated device failed; the message carries its traceback."""


class SequentialTurns:
    """Turns in a fixed order. Joining (runtime.turns.JOINING) is one device at a time, in `order`: it draws
    its model's initial weights from torch's global random numbers. In a round, up to `workers` devices
    compute at once (their dropout draws from their own generators), starting in `order`, and each sends its
    upload only after every device before it has sent its own; the server computes only when no device does.
    A device waits for no device that has left. So devices join in the same order, draw the same numbers,
    and their uploads reach the server in the same order every run, whatever the number of workers."""

    def __init__(self, order: Sequence[str], workers: int = 1):
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.workers = workers
        self._order = list(order)
        self._position = {who: i for i, who in enumerate(self._order)}
        self._cond = threading.Condition()
        self._computing: set[str] = set()  # devices, or SERVER
        self._exclusive = False  # the server, or a joining device, computes alone
        self._started: dict[int, set[str]] = defaultdict(set)  # per phase: the devices that started it
        self._delivered: dict[int, set[str]] = defaultdict(set)  # per round: the devices that sent their upload
        self._gone: set[str] = set()
        self._fronts: dict[tuple[int, int], int] = defaultdict(int)
        """Per (id of one of the sets above, phase): the position of the first device not in it and not gone;
        it only moves forward, so a waiting device's check costs O(1) on average."""

    @contextlib.contextmanager
    def take(self, who: str, phase: int) -> Iterator[None]:
        exclusive = who == SERVER or phase == JOINING
        with self._cond:
            self._check(who)
            self._cond.wait_for(lambda: self._may_start(who, phase, exclusive))
            self._computing.add(who)
            self._exclusive = exclusive
            if who != SERVER:
                self._started[phase].add(who)
            self._cond.notify_all()  # the next device in the order may start beside this one
        try:
            yield
        finally:
            with self._cond:
                self._computing.discard(who)
                self._exclusive = False
                self._cond.notify_all()

    @contextlib.contextmanager
    def deliver(self, who: str, phase: int) -> Iterator[None]:
        with self._cond:
            self._check(who)
            self._cond.wait_for(lambda: self._all_before(who, phase, self._delivered[phase]))
        try:
            yield
        finally:
            with self._cond:
                self._delivered[phase].add(who)
                self._cond.notify_all()

    def leave(self, who: str) -> None:
        """`who` takes no more turns (it finished or failed): nobody waits for it any more."""
        with self._cond:
            self._gone.add(who)
            self._cond.notify_all()

    def _check(self, who: str) -> None:
        if who != SERVER and who not in self._position:
            raise ValueError(f"{who!r} has no place in the simulation's order")

    def _may_start(self, who: str, phase: int, exclusive: bool) -> bool:
        if self._exclusive or (exclusive and self._computing) or len(self._computing) >= self.workers:
            return False
        return who == SERVER or self._all_before(who, phase, self._started[phase])

    def _all_before(self, who: str, phase: int, done: set[str]) -> bool:
        """Whether every device before `who` in the order is in `done` (of `phase`) or has left."""
        key = (id(done), phase)
        front = self._fronts[key]
        while front < len(self._order) and (self._order[front] in done or self._order[front] in self._gone):
            front += 1
        self._fronts[key] = front
        return front >= self._position[who]


@dataclasses.dataclass
class SimulatedDevice:
    edge: EdgeApp
    thread: threading.Thread | None = None
    error: str | None = None  # the traceback of a failure


def device_configs(server_config: ServerConfig, fleet: dict[str, int], client_overrides: Sequence[str] = ()
                   ) -> list[ClientConfig]:
    """The devices `serve --local` would start for this fleet (architectures, partitions, data), with the
    settings a device in a shared process needs: no threads of its own, no heartbeats."""
    return fleet_configs(server_config, fleet, client_overrides, threads=0, heartbeat_s=NEVER_S)


def simulation_config(server_config: ServerConfig, fleet: dict[str, int]) -> dict[str, object]:
    """The server settings a simulation fixes (the CLI passes them as explicit values, so -c still wins)."""
    return {"expected_clients": len(client_ids(fleet)), "heartbeat_timeout_s": NEVER_S, "round_deadline_s": NEVER_S}


def run_simulation(server_config: ServerConfig, fleet: dict[str, int], run_dir: Path,
                   client_overrides: Sequence[str] = (), workers: int = 1, sinks: Sequence = (),
                   on_stage: Callable[[str], None] = lambda text: None,
                   on_round: Callable[[dict], None] = lambda record: None) -> list[dict]:
    """A whole federation in this process, up to `workers` devices training at once; returns the round
    records (also in RUN_DIR/metrics.jsonl). Devices keep their state in RUN_DIR/clients/<client id>, as
    with `serve --local`."""
    compact_allocator()  # before the devices' threads: freed states go back to the system
    configs = device_configs(server_config, fleet, client_overrides)
    turns = SequentialTurns([c.client_id for c in configs], workers)
    hub = InprocHub()
    devices: dict[str, SimulatedDevice] = {}

    def failed() -> dict[str, int]:  # for the server: like a --local child process that exited with an error
        return {cid: 1 for cid, device in devices.items() if device.error is not None}

    server = ServerApp(server_config, hub.server(), run_dir, dead_clients=failed, sinks=sinks, turns=turns)
    server.on_stage = on_stage
    try:
        for config in configs:
            edge = EdgeApp(config, hub.client(config.client_id), run_dir / "clients" / config.client_id, turns=turns,
                           state_in_memory=False)
            devices[config.client_id] = device = SimulatedDevice(edge)
            device.thread = threading.Thread(target=_serve, args=(device, turns, config.client_id),
                                             name=config.client_id, daemon=True)
        for device in devices.values():
            device.thread.start()
        records = server.run(on_round=on_round)
    finally:
        for device in devices.values():
            if device.thread is not None and device.thread.ident is not None:
                device.thread.join(timeout=60)
        server.close()
        for device in devices.values():
            device.edge.close()
    errors = {cid: device.error for cid, device in devices.items() if device.error is not None}
    if errors:
        first = next(iter(errors))
        raise SimulationError(f"{len(errors)} simulated device(s) failed ({', '.join(errors)}); {first}:\n{errors[first]}")
    return records


def _serve(device: SimulatedDevice, turns: SequentialTurns, client_id: str) -> None:
    """A device's thread: EdgeApp.run until the server's Bye; a failure is kept for the server and the caller."""
    try:
        device.edge.run()
    except BaseException:  # noqa: BLE001 - reported by run_simulation, with its traceback
        device.error = traceback.format_exc()
        log.error("simulated device %s failed:\n%s", client_id, device.error)
    finally:
        turns.leave(client_id)
