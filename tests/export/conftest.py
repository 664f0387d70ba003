"""Tiny trained client states (one round on a few real samples) and their exports, shared by the tests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedafd.edge_client.model import MODALITIES_OF_KIND, GlobalTowers, LocalModel, build_encoder
from fedafd.edge_client.private_data import load_private_data
from fedafd.edge_client.state import ClientState, save_state
from fedafd.edge_client.training import Optimizers, RoundPlan, train_round

FEATURE_DIM = 32
MAX_TEST = 200
# Every architecture of the zoo's small nets appears once as a local encoder and once as a tower.
CLIENTS = {
    "image": {"image_arch": "cnn_small", "text_arch": "gru", "towers": {"image": "resnet_tiny"}},
    "text": {"image_arch": "cnn_small", "text_arch": "gru", "towers": {"text": "transformer_tiny"}},
    "multimodal": {"image_arch": "resnet_tiny", "text_arch": "transformer_tiny",
                   "towers": {"image": "cnn_small", "text": "gru"}},
}


def make_client_state(folder: Path, kind: str, max_private: int = 64) -> Path:
    """Train one short round (GFF on, no BAA) on real private data and save it as `join` would."""
    torch.manual_seed(0)
    spec = CLIENTS[kind]
    private = load_private_data(kind, 0, 1, 0.1, 0, max_private, MAX_TEST)
    model = LocalModel(kind, spec["image_arch"], spec["text_arch"], FEATURE_DIM, private.num_classes)
    towers = GlobalTowers(FEATURE_DIM, torch.device("cpu"))
    flat = {}
    for modality in MODALITIES_OF_KIND[kind]:
        tower = build_encoder(modality, spec["towers"][modality], FEATURE_DIM)
        flat.update({f"{modality}.{name}": t for name, t in tower.state_dict().items()})
    towers.load(2, spec["towers"], flat)
    optimizers = Optimizers.create(model, 3e-3, 1e-3)
    plan = RoundPlan(round=0, local_epochs=2, baa=False, gff=True, beta=0.5)
    train_round(model, optimizers, towers, private.train, None, plan, 16, 0, torch.device("cpu"))
    state = ClientState(model, optimizers, towers, last_round=0)
    folder.mkdir(parents=True, exist_ok=True)
    save_state(folder, state, {"client_id": f"{kind}-0", "kind": kind, "image_arch": spec["image_arch"],
                               "text_arch": spec["text_arch"], "feature_dim": FEATURE_DIM})
    (folder / "config.json").write_text(json.dumps({"kind": kind, "seed": 0, "max_test": MAX_TEST}))
    return folder


@pytest.fixture(scope="session")
def exported(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """kind -> (state folder, exported model folder), each exported with int8 graphs."""
    from fedafd.export.onnx_export import ExportOptions, export_client

    root = tmp_path_factory.mktemp("export")
    result = {}
    for kind in CLIENTS:
        state = make_client_state(root / f"state_{kind}", kind)
        out = root / f"model_{kind}"
        export_client(state, out, ExportOptions(parity_samples=32, eval_samples=MAX_TEST))
        result[kind] = (state, out)
    return result
