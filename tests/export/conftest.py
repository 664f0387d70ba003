"""Tiny trained client states (one round on a few real samples) and their exports, shared by the tests.

Exporting the frozen backbones is what costs here (MiniLM is a 90 MB graph), so they appear in few
graphs: the image classifier's tower reads EfficientNet-Lite0 (a raw-input local encoder beside a
backbone tower), the multimodal client is the deployable adapter client (an MLP and a linear adapter
over EfficientNet, linear adapters over MiniLM, the server's default towers) and is exported once for
the whole session; the text classifier is trained from scratch on tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedafd.edge_client.model import MODALITIES_OF_KIND, GlobalTowers, LocalModel
from fedafd.edge_client.private_data import load_private_data
from fedafd.runtime.config import ClientConfig
from fedafd.edge_client.privacy import PrivacyBudget
from fedafd.edge_client.state import ClientState, save_state
from fedafd.edge_client.objectives import objective_for
from fedafd.edge_client.training import Optimizers, prepare_round, train_private_round, train_round
from fedafd.runtime.methods import MethodSettings
from fedafd.runtime.models import backbone_of, build_encoder

FEATURE_DIM = 32
MAX_TEST = 200
PARITY_SAMPLES = 32
CLIENTS = {
    "image": {"image_arch": "cnn_small", "text_arch": "gru", "towers": {"image": "effnet_linear"}},
    "text": {"image_arch": "cnn_small", "text_arch": "gru", "towers": {"text": "transformer_tiny"}},
    "multimodal": {"image_arch": "effnet_mlp", "text_arch": "minilm_linear",
                   "towers": {"image": "effnet_linear", "text": "minilm_linear"}},
}


def make_client_state(folder: Path, kind: str, spec: dict | None = None, max_private: int = 64, dp: bool = False) -> Path:
    """Train one short round (GFF on, no BAA) on real private data and save it as `join` would (`dp`: as a DP
    device, with DP-SGD and GFF's LayerNorm gates)."""
    torch.manual_seed(0)
    spec = spec or CLIENTS[kind]
    modalities = MODALITIES_OF_KIND[kind]
    archs = [spec[f"{m}_arch"] for m in modalities] + [spec["towers"][m] for m in modalities]
    backbones = tuple(sorted({backbone_of(a) for a in archs} - {None}))
    private = load_private_data(ClientConfig(kind=kind, alpha=0.1, seed=0, max_private=max_private, max_test=MAX_TEST),
                                backbones=backbones)
    model = LocalModel(kind, spec["image_arch"], spec["text_arch"], FEATURE_DIM, private.num_classes,
                       fusion_norm="layer" if dp else "batch")
    global_towers = GlobalTowers(FEATURE_DIM, torch.device("cpu"))
    towers = {m: build_encoder(m, spec["towers"][m], FEATURE_DIM) for m in modalities}
    flat = {f"{m}.{name}": t for m, tower in towers.items() for name, t in tower.state_dict().items()}
    global_towers.load(2, spec["towers"], flat)
    optimizers = Optimizers.create(model, 3e-3, 1e-3)
    settings = MethodSettings("fedafd", gff=True, beta=0.5)  # GFF, no BAA
    objective = objective_for(prepare_round(model, optimizers, global_towers, private.train, settings, 0, 2, 16, 0,
                                            torch.device("cpu")))
    if dp:
        train_private_round(objective, PrivacyBudget(100.0, 1e-5, 1.0, 1.0), 3e-3, seed=0)
    else:
        train_round(objective)
    state = ClientState(model, optimizers, global_towers, last_round=0)
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
        export_client(state, out, ExportOptions(parity_samples=PARITY_SAMPLES, eval_samples=MAX_TEST))
        result[kind] = (state, out)
    return result


@pytest.fixture(scope="session")
def text_state(tmp_path_factory) -> Path:
    """A trained text client's state alone (no backbones: the cheapest to export)."""
    return make_client_state(tmp_path_factory.mktemp("text_state"), "text")


@pytest.fixture(scope="session")
def dp_image_state(tmp_path_factory) -> Path:
    """An image device's state trained with DP-SGD: an adapter, and GFF's gates with LayerNorm."""
    spec = {"image_arch": "effnet_linear", "text_arch": "minilm_linear", "towers": {"image": "effnet_linear"}}
    return make_client_state(tmp_path_factory.mktemp("dp_state"), "image", spec, dp=True)
