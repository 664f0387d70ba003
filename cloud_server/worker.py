"""What every server rank but 0 runs: no socket, no run folder; rank 0's messages say what to train.

Its calls follow ServerApp._run_round's stage calls one for one (stage 1's epochs, the features of each
modality, the evaluation before stage 3 when it distils, stage 3's epochs, the evaluation): each holds
collectives that every rank must enter in turn.
"""

from __future__ import annotations

import contextlib
import logging

import torch

from fedafd.cloud_server.distributed import Ranks, Stopped, load_state
from fedafd.cloud_server.stages import (
    GlobalModel, build_optimizers, distill_epoch, evaluate_retrieval, extract_features, train_contrastive_epoch,
)
from fedafd.runtime.config import ServerConfig, build_config, encoder_archs
from fedafd.cloud_server.public_data import server_data
from fedafd.runtime.data.modal import ModalData
from fedafd.runtime.torch_utils import configure_threads, rank_seed
from fedafd.runtime.vocabulary import MODALITIES

log = logging.getLogger("fedafd.cloud.worker")


def build_replica(ranks: Ranks) -> tuple[ServerConfig, GlobalModel, tuple[torch.optim.Optimizer, ...]]:
    """The model and optimisers of rank 0's config, holding rank 0's state."""
    config_values, state = ranks.receive_setup()
    config = build_config(ServerConfig, config_values)
    configure_threads(config.threads)
    archs = encoder_archs(config)
    model = GlobalModel(archs["image"], archs["text"], config.feature_dim, config.contrastive_loss,
                        config.adapter_dropout).to(ranks.device)
    optimizers = build_optimizers(model, config.lr, config.distill_lr)
    load_state(model, optimizers, state)
    return config, model, optimizers


def serve_worker(ranks: Ranks, public_all: ModalData | None = None, public_test: ModalData | None = None) -> int:
    """Train this rank's shards until rank 0 says stop; returns the number of rounds taken part in.
    `public_all`/`public_test`: the public train and test splits (default: loaded as rank 0 loads them)."""
    rounds = 0
    with ranks.reporting(), contextlib.suppress(Stopped):  # rank 0 stops at any point: done, or failed (it says why)
        config, model, (optimizer, distill_optimizer) = build_replica(ranks)
        backbones = tuple(sorted(set(model.backbones().values())))
        if public_all is None or public_test is None:
            public_all, public_test = server_data(config).load(backbones)
        ranks.replicate(model)
        torch.manual_seed(rank_seed(config.seed, ranks.rank))  # rank 0 keeps its stream: dropout masks differ per rank
        while True:
            round_, public_rows, generator_state = ranks.receive_round()
            public = public_all.select(public_rows.numpy())
            generator = torch.Generator()
            generator.set_state(generator_state)
            for _ in range(config.server_epochs):
                train_contrastive_epoch(model, optimizer, public, config.batch_size, generator, ranks.device, ranks)
            for m in MODALITIES:
                extract_features(model.encoders[m], public, m, ranks.device, ranks=ranks)
            teachers = {m: t.to(ranks.device) for m, t in ranks.share_teachers({}).items()}
            if teachers and config.distill_epochs > 0:  # ServerApp._diagnose_stage3: R@1 before stage 3
                evaluate_retrieval(model, public_test, ranks.device, ranks)
            for _ in range(config.distill_epochs):
                distill_epoch(model, distill_optimizer, public, teachers, config.gamma, config.batch_size, generator,
                              ranks.device, ranks, config.distill_target)
            evaluate_retrieval(model, public_test, ranks.device, ranks)
            rounds += 1
            log.info("rank %d: round %d done", ranks.rank, round_)
    ranks.close()
    return rounds
