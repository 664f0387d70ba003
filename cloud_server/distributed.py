"""The server's stages data-parallel over torch.distributed (`fedafd-cloud serve --workers N`, or torchrun).

Rank 0 is the server ServerApp runs: it alone binds the device socket, collects uploads and computes the
teachers. Every rank, 0 included, trains on its shard of each global batch of stage 1 and stage 3 (DDP
averages the gradients) and extracts its shard of the features for the downlink, the teachers and the
evaluation. The other ranks learn what to do from rank 0's messages: the model and optimiser state at
start-up, each round's public rows and batch order, the teachers, stop (worker.py runs their loop).

Two process groups:
- compute (NCCL on GPUs, gloo on CPUs) carries the stages' collectives with timeout worker_timeout_s, so a
  rank that dies or hangs mid-stage fails the round within that (a dead peer within a second);
- control (gloo, CPU tensors) carries rank 0's messages; its timeout also covers what rank 0 waits for
  meanwhile (devices joining, the round's uploads).

`ONE_PROCESS` (Ranks()) is the single process: every hook is then the identity, so one code path serves both.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import msgpack
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._functional_collectives import all_gather_single  # torch's successor of nn.functional.all_gather

from fedafd.runtime.errors import FedafdError

log = logging.getLogger("fedafd.cloud.ranks")

_HEARTBEAT_KEY = "fedafd/heartbeat/{rank}"
_HEARTBEAT_S = 0.25
_PROBE_S = 2.0
"""After a failed collective, a rank whose heartbeat did not move for this long is reported as stopped."""
_DTYPES = {str(t).removeprefix("torch."): t for t in (torch.float32, torch.float16, torch.bfloat16, torch.float64,
                                                       torch.int64, torch.int32, torch.uint8, torch.bool)}


class RankFailed(FedafdError):
    """Another server rank died or stopped answering; the message names it and the setting that bounds the wait."""


class Stopped(Exception):
    """Rank 0 ended the run (finished, or failed and says why itself)."""


@dataclass
class Ranks:
    """This process's place among the server's ranks and the hooks the stages call."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    compute: Any = None
    """The stages' process group (None: a single process)."""
    control: Any = None
    """Rank 0's messages to the others (gloo)."""
    worker_timeout_s: float = 0.0
    store: Any = None
    """The rendezvous store (heartbeats live there)."""
    phase: str = "start-up"
    """What the ranks are doing, for error messages."""
    _replicas: dict[int, nn.Module] = field(default_factory=dict, init=False, repr=False)
    _broken: bool = field(default=False, init=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def single(self) -> bool:
        return self.world_size == 1

    # -- the stages' hooks -----------------------------------------------------------------------
    def shard(self, rows: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a global batch: every world_size-th, from position `rank` (as DistributedSampler
        splits, without its padding, so the global batch is the one a single process trains on)."""
        return rows if self.single else rows[self.rank::self.world_size]

    def gather(self, local: torch.Tensor, total: int) -> torch.Tensor:
        """(total, d) rows of a global batch, in the batch's order, from each rank's `shard` of them (B_r, d),
        with gradients flowing back to each rank's own rows (a contrastive loss then sees every negative)."""
        if self.single:
            return local
        longest = -(-total // self.world_size)
        padded = torch.cat([local, local.new_zeros(longest - len(local), *local.shape[1:])])  # (longest, d)
        stacked = all_gather_single(padded, 0, self.compute)  # (world * longest, d), rank-major
        # Row j of rank r is position j * world + r of the batch: interleave, then drop the padding at the end.
        interleaved = stacked.reshape(self.world_size, longest, *local.shape[1:]).transpose(0, 1)
        return interleaved.reshape(self.world_size * longest, *local.shape[1:])[:total]

    def replica(self, module: nn.Module) -> nn.Module:
        """What a training step calls: the module's DDP wrapper (gradients averaged over ranks), or the module."""
        return module if self.single else self._replicas[id(module)]

    def share(self, local: int, total: int) -> float:
        """Weight of a per-sample mean over this rank's `local` of `total` rows: DDP averages the ranks'
        gradients, so this makes the average that of the mean over the whole batch, even when shards differ."""
        return 1.0 if self.single else local * self.world_size / total

    def average(self, value: float) -> float:
        """Mean of a number over the ranks (the loss of a stage whose ranks each saw a share)."""
        if self.single:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor, group=self.compute)
        return tensor.item() / self.world_size

    # -- set-up ----------------------------------------------------------------------------------
    def setup(self, config: dict, model: nn.Module, optimizers: tuple[torch.optim.Optimizer, ...]) -> None:
        """Rank 0: send the config and the model's and optimisers' state (after a --resume too), then replicate."""
        if self.single:
            return
        self._send("setup", {"config": config}, _flat_state(model, optimizers))
        self.replicate(model)

    def receive_setup(self) -> tuple[dict, dict[str, torch.Tensor]]:
        """Other ranks: rank 0's config and state, for load_state once the model is built from the config."""
        meta, tensors = self._receive("setup")
        return meta["config"], tensors

    def replicate(self, model: nn.Module) -> None:
        """Every rank, once its model holds rank 0's state: wrap the encoders and the loss in DDP."""
        with_batchnorm = [model.archs[name] for name, encoder in model.encoders.items()
                          if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in encoder.modules())]
        if with_batchnorm and self.device.type != "cuda":
            raise RankFailed(f"server tower {', '.join(with_batchnorm)} has BatchNorm, whose statistics must come from "
                             f"the whole batch (SyncBatchNorm), which torch runs on GPUs only: use -c device=cuda, "
                             f"towers without it (effnet_*, minilm_*, gru, transformer_tiny), or --workers 1")
        dist.barrier(group=self.control)  # the others built theirs and loaded their data
        for name, encoder in list(model.encoders.items()):  # the same parameters, statistics over all ranks
            model.encoders[name] = nn.SyncBatchNorm.convert_sync_batchnorm(encoder, self.compute)
        modules = [*model.encoders.values(), model.loss]
        ids = [self.device.index] if self.device.type == "cuda" else None
        self._replicas = {id(m): nn.parallel.DistributedDataParallel(m, device_ids=ids, process_group=self.compute)
                          for m in modules}
        for m in modules:
            if hasattr(m, "input_view"):  # what encode_rows feeds an adapter: its backbone's cached features
                self._replicas[id(m)].input_view = m.input_view

    # -- rank 0's messages -----------------------------------------------------------------------
    def start_round(self, round_: int, public_rows, generator: torch.Generator) -> None:
        """Rank 0, before stage 1: the round, its public rows and the batch order's generator state."""
        if not self.single:
            self.phase = f"round {round_} (stage 1 or feature extraction)"
            self._send("round", {"round": round_},
                       {"public_rows": torch.as_tensor(public_rows, dtype=torch.int64), "generator": generator.get_state()})

    def share_teachers(self, teachers: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Rank 0 sends its teachers (none: no stage 3 this round); every rank returns them."""
        if self.single:
            return teachers
        self.phase = self.phase.replace("stage 1 or feature extraction", "stage 3 or evaluation")
        if self.is_main:
            self._send("teachers", {}, teachers)
            return teachers
        return self._receive("teachers")[1]

    def receive_round(self) -> tuple[int, torch.Tensor, torch.Tensor]:
        """Other ranks: (round, public rows, generator state) of the next round."""
        meta, tensors = self._receive("round")
        self.phase = f"round {meta['round']} (stage 1 or feature extraction)"
        return meta["round"], tensors["public_rows"], tensors["generator"]

    def close(self) -> None:
        """Rank 0 tells the others to stop; every rank leaves its groups (not after a failure: they are broken)."""
        if self.single or self._broken:
            return
        try:
            if self.is_main:
                self._send("stop", {}, {})
            dist.destroy_process_group()
        except RuntimeError as err:  # another rank is already gone; what failed first has been reported
            log.warning("server rank %d: leaving the process group: %s", self.rank, _first_line(err))

    def _send(self, kind: str, meta: dict, tensors: dict[str, torch.Tensor]) -> None:
        """A msgpack header (kind, meta, each tensor's name, dtype and shape), then one broadcast per tensor: no pickle."""
        tensors = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
        header = msgpack.packb({"kind": kind, "meta": meta, "tensors": [
            [name, str(t.dtype).removeprefix("torch."), list(t.shape)] for name, t in tensors.items()]})
        dist.broadcast(torch.tensor([len(header)], dtype=torch.int64), 0, group=self.control)
        dist.broadcast(torch.frombuffer(bytearray(header), dtype=torch.uint8), 0, group=self.control)
        for t in tensors.values():
            dist.broadcast(t, 0, group=self.control)

    def _receive(self, *kinds: str) -> tuple[dict, dict[str, torch.Tensor]]:
        length = torch.zeros(1, dtype=torch.int64)
        dist.broadcast(length, 0, group=self.control)
        raw = torch.zeros(int(length.item()), dtype=torch.uint8)
        dist.broadcast(raw, 0, group=self.control)
        header = msgpack.unpackb(raw.numpy().tobytes())
        tensors = {}
        for name, dtype, shape in header["tensors"]:
            tensors[name] = torch.empty(shape, dtype=_DTYPES[dtype])
            dist.broadcast(tensors[name], 0, group=self.control)
        if header["kind"] == "stop":  # at any point: rank 0 finished, or failed (and reports it)
            raise Stopped()
        if header["kind"] not in kinds:
            raise RankFailed(f"server rank {self.rank} expected {' or '.join(kinds)} from rank 0, got {header['kind']!r}: "
                             f"the ranks run different fedafd versions")
        return {"kind": header["kind"], **header["meta"]}, tensors

    # -- failures --------------------------------------------------------------------------------
    @contextlib.contextmanager
    def reporting(self) -> Iterator[None]:
        """A failed collective becomes a RankFailed naming the rank(s) that stopped heart-beating, or the
        timeout that ran out; other errors pass unchanged."""
        try:
            yield
        except FedafdError:
            raise
        except RuntimeError as err:
            if self.single:
                raise
            self._broken = True  # no stop message into a group that may be broken
            stopped = self._stopped_ranks()
            if stopped:
                who = ", ".join(map(str, stopped))
                raise RankFailed(f"server rank {who} of {self.world_size} stopped (exited, was killed or froze) during "
                                 f"{self.phase}; see that rank's output (torchrun prints its exit code). "
                                 f"Rank {self.rank} saw: {_first_line(err)}") from err
            if "timed out" in str(err).lower() or "timeout" in str(err).lower():
                raise RankFailed(f"a server rank did not answer within worker_timeout_s={self.worker_timeout_s:g}s "
                                 f"during {self.phase}, though every rank is alive: one is stuck or slower than that at "
                                 f"its share of a stage (raise -c worker_timeout_s). Rank {self.rank} saw: "
                                 f"{_first_line(err)}") from err
            raise

    def start_heartbeat(self, address: str, port: int) -> None:
        """A thread that counts up this rank's key in the store every _HEARTBEAT_S (its own client connection)."""
        def beat() -> None:
            try:
                store = dist.TCPStore(address, port, is_master=False, wait_for_workers=False,
                                      timeout=datetime.timedelta(seconds=10))
                key = _HEARTBEAT_KEY.format(rank=self.rank)
                while True:
                    store.add(key, 1)
                    time.sleep(_HEARTBEAT_S)
            except Exception:  # the store went away with its host: the collectives report that
                return

        threading.Thread(target=beat, name="rank-heartbeat", daemon=True).start()

    def _stopped_ranks(self) -> list[int]:
        others = [r for r in range(self.world_size) if r != self.rank]
        try:
            before = {r: self.store.add(_HEARTBEAT_KEY.format(rank=r), 0) for r in others}
            time.sleep(_PROBE_S)
            return [r for r in others if self.store.add(_HEARTBEAT_KEY.format(rank=r), 0) == before[r]]
        except Exception:  # the store's host (rank 0 without torchrun) is gone
            return [0] if self.rank != 0 else others


ONE_PROCESS = Ranks()
"""The single-process server (the stages' default)."""


def _first_line(err: BaseException) -> str:
    return str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__


def join(rank: int, world_size: int, address: str, port: int, device_name: str, worker_timeout_s: float,
         control_timeout_s: float, local_rank: int = 0, host_store: bool | None = None) -> Ranks:
    """Join the server's ranks at the rendezvous store address:port (rank 0 hosts it unless a torchrun agent
    does); NCCL when the device is a GPU, else gloo."""
    from fedafd.runtime.torch_utils import resolve_device

    device = resolve_device(device_name)
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)  # torch.device("cuda") in the stages is this rank's GPU
        device = torch.device("cuda", local_rank)
    if host_store is None:
        host_store = rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"
    store = dist.TCPStore(address, port, world_size, is_master=host_store,
                          timeout=datetime.timedelta(seconds=control_timeout_s))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=store, rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=worker_timeout_s))
    control = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=control_timeout_s))
    ranks = Ranks(rank, world_size, device, dist.group.WORLD, control, worker_timeout_s, store)
    ranks.start_heartbeat(address, port)
    log.info("server rank %d of %d on %s", rank, world_size, device)
    return ranks


def join_from_environment(device_name: str, worker_timeout_s: float, control_timeout_s: float) -> Ranks:
    """Join with what torch's launcher (torchrun / python -m torch.distributed.run) put in the environment."""
    env = os.environ
    return join(int(env["RANK"]), int(env["WORLD_SIZE"]), env["MASTER_ADDR"], int(env["MASTER_PORT"]), device_name,
                worker_timeout_s, control_timeout_s, local_rank=int(env.get("LOCAL_RANK", "0")))


def _flat_state(model: nn.Module, optimizers: tuple[torch.optim.Optimizer, ...]) -> dict[str, torch.Tensor]:
    """'model.NAME' and 'opt{i}.{param index}.{key}' tensors (Adam's step, exp_avg, exp_avg_sq)."""
    flat = {f"model.{name}": t for name, t in model.state_dict().items()}
    for i, optimizer in enumerate(optimizers):
        for index, state in optimizer.state_dict()["state"].items():
            flat.update({f"opt{i}.{index}.{key}": torch.as_tensor(value) for key, value in state.items()})
    return flat


def load_state(model: nn.Module, optimizers: tuple[torch.optim.Optimizer, ...], flat: dict[str, torch.Tensor]) -> None:
    """The inverse of _flat_state, into a model and optimisers built from the same config."""
    model.load_state_dict({name.removeprefix("model."): t for name, t in flat.items() if name.startswith("model.")})
    for i, optimizer in enumerate(optimizers):
        state: dict[int, dict[str, torch.Tensor]] = {}
        for name, t in flat.items():
            prefix, _, rest = name.partition(".")
            if prefix == f"opt{i}":
                index, _, key = rest.partition(".")
                state.setdefault(int(index), {})[key] = t
        optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})
