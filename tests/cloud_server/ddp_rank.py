"""One server rank for test_distributed.py, run as its own process:

    python ddp_rank.py RANK WORLD_SIZE PORT SCENARIO OUT_DIR

SCENARIO: "same" (one round of the stages, then rank 1 dies mid stage 1) or "hang" (rank 1 freezes in
stage 1). Rank 0 hosts the TCP store on loopback. `reference()` is the same round in a single process.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from fedafd.cloud_server.distributed import ONE_PROCESS, RankFailed, Ranks, join
from fedafd.cloud_server.stages import (
    GlobalModel, build_optimizers, distill_epoch, evaluate_retrieval, extract_features, train_contrastive_epoch,
)
from fedafd.cloud_server.worker import build_replica
from fedafd.runtime.config import ServerConfig, config_to_dict
from fedafd.runtime.data.modal import ModalData
from fedafd.runtime.torch_utils import seeded_generator

# The server's default towers (adapters over cached backbone features), without dropout: no randomness in a
# step, so 1 and 2 ranks must agree.
CONFIG = ServerConfig(image_arch="effnet_linear", text_arch="minilm_linear", feature_dim=16, adapter_dropout=0.0, batch_size=16,
                      gamma=0.4, distill_lr=1e-3)
PUBLIC, TEST = 37, 21
"""37 rows in batches of 16: the last batch (5) splits 3 + 2 over two ranks (uneven shards, padding)."""


def pairs(n: int, seed: int) -> ModalData:
    """n public pairs: random backbone features (what the adapters read) and raw inputs beside them."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, 30_000, size=(n, 6), dtype=np.int64)
    return ModalData(inputs={"image": (rng.integers(0, 255, size=(n, 3, 32, 32), dtype=np.uint8),),
                             "text": (ids, np.ones_like(ids))},
                     features={"efficientnet_lite0": rng.standard_normal((n, 1280)).astype(np.float32),
                               "minilm": rng.standard_normal((n, 384)).astype(np.float32)})


def teachers() -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(7)
    return {m: torch.nn.functional.normalize(torch.from_numpy(rng.standard_normal((PUBLIC, 16)).astype(np.float32)), dim=-1)
            for m in ("image", "text")}


def rank0_model() -> tuple[GlobalModel, tuple[torch.optim.Optimizer, ...]]:
    """Rank 0's model, one single-process epoch in (so Adam has moments to hand over, as after --resume)."""
    torch.manual_seed(0)
    model = GlobalModel(CONFIG.image_arch, CONFIG.text_arch, CONFIG.feature_dim, CONFIG.contrastive_loss,
                        CONFIG.adapter_dropout)
    optimizers = build_optimizers(model, CONFIG.lr, CONFIG.distill_lr)
    train_contrastive_epoch(model, optimizers[0], pairs(PUBLIC, 1), CONFIG.batch_size, seeded_generator(1),
                            torch.device("cpu"))
    return model, optimizers


def one_round(model: GlobalModel, optimizers, ranks: Ranks, generator: torch.Generator) -> dict:
    """Stage 1, the image features, stage 3 toward fixed teachers, evaluation: what _run_round calls."""
    cpu = torch.device("cpu")
    public = pairs(PUBLIC, 1)
    stage1 = train_contrastive_epoch(model, optimizers[0], public, CONFIG.batch_size, generator, cpu, ranks)
    features = extract_features(model.encoders["image"], public, "image", cpu, ranks=ranks)
    shared = ranks.share_teachers(teachers() if ranks.is_main else {})
    stage3 = distill_epoch(model, optimizers[1], public, shared, CONFIG.gamma, CONFIG.batch_size, generator, cpu, ranks)
    metrics = evaluate_retrieval(model, pairs(TEST, 2), cpu, ranks)
    return {"stage1": stage1, "stage3": stage3, "metrics": metrics, "features": features.tolist(),
            "teachers_received": sorted(shared), "weights": {k: v.tolist() for k, v in model.state_dict().items()}}


def reference() -> dict:
    model, optimizers = rank0_model()
    return one_round(model, optimizers, ONE_PROCESS, seeded_generator(5))


def main(rank: int, world_size: int, port: int, scenario: str, out: Path) -> None:
    timeout = 60.0 if scenario == "same" else 3.0  # "same": a dead rank is found long before the timeout
    ranks = join(rank, world_size, "127.0.0.1", port, "cpu", worker_timeout_s=timeout, control_timeout_s=60.0,
                 host_store=rank == 0)
    if rank == 0:
        model, optimizers = rank0_model()
        ranks.setup(config_to_dict(CONFIG), model, optimizers)
        generator = seeded_generator(5)
        ranks.start_round(0, np.arange(PUBLIC), generator)
    else:
        torch.manual_seed(1234)  # a different initialisation: rank 0's state must replace it
        _, model, optimizers = build_replica(ranks)
        ranks.replicate(model)
        _, _, state = ranks.receive_round()
        generator = torch.Generator()
        generator.set_state(state)
    result = one_round(model, optimizers, ranks, generator) if scenario == "same" else {}
    (out / f"rank{rank}.json").write_text(json.dumps(result))

    # Then a second stage-1 epoch in which rank 1 exits (or freezes) after its first step.
    if rank == 1:
        step = optimizers[0].step

        def fail_on_second_step(*args, calls=[0], **kwargs):
            calls[0] += 1
            if calls[0] == 2:
                if scenario == "same":
                    os._exit(3)
                time.sleep(600)
            return step(*args, **kwargs)

        optimizers[0].step = fail_on_second_step
    started = time.monotonic()
    try:
        with ranks.reporting():
            train_contrastive_epoch(model, optimizers[0], pairs(PUBLIC, 1), CONFIG.batch_size, seeded_generator(9),
                                    torch.device("cpu"), ranks)
        failure = {"error": None}
    except RankFailed as err:
        failure = {"error": str(err)}
    failure["seconds"] = time.monotonic() - started
    (out / f"failure{rank}.json").write_text(json.dumps(failure))
    os._exit(0)  # the group is broken: leave without tearing it down


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], Path(sys.argv[5]))
