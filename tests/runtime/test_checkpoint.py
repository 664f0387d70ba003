"""The checkpoint file: a tree of tensors and plain values through safetensors and back, exactly; Adam's
state restored takes the identical next step; old torch.save files are refused, read only by converters."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from fedafd.runtime.checkpoint import CheckpointError, load_checkpoint, read_legacy, read_meta, save_checkpoint

REPO = Path(__file__).resolve().parents[2]


def test_a_tree_comes_back_exactly_with_int_keys_tuples_and_plain_values(tmp_path: Path) -> None:
    # Prepare: what an optimiser state dict holds (int keys, a tuple, None, bools), several dtypes, a 0-dim tensor
    tree = {
        "model": {"fc.weight": torch.tensor([[1.5, -2.0], [0.25, 3.0]]), "bn.num_batches_tracked": torch.tensor(7)},
        "opt": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.tensor([0.1, 0.2], dtype=torch.float16)}},
                "param_groups": [{"lr": 1e-3, "betas": (0.5, 0.999), "foreach": None, "amsgrad": False,
                                  "params": [0, 1]}]},
        "towers": {},
        "mask": torch.tensor([True, False]),
    }
    tree["tied"] = tree["model"]["fc.weight"]  # one tensor under two names (tied weights)
    meta = {"round": 4, "config": {"feature_dim": 16}, "run_id": "r-1"}
    path = tmp_path / "c" / "x.safetensors"

    # Execute
    save_checkpoint(path, tree, meta)
    got, got_meta = load_checkpoint(path)

    # Assert: same structure and types (int keys stay int, the tuple stays a tuple), same tensors
    assert got_meta == meta and read_meta(path) == meta and json.loads(path.with_suffix(".json").read_text()) == meta
    assert list(got["opt"]["state"]) == [0] and got["opt"]["param_groups"] == tree["opt"]["param_groups"]
    assert isinstance(got["opt"]["param_groups"][0]["betas"], tuple) and got["towers"] == {}
    for a, b in ((got["model"]["fc.weight"], tree["model"]["fc.weight"]), (got["mask"], tree["mask"]),
                 (got["opt"]["state"][0]["exp_avg"], tree["opt"]["state"][0]["exp_avg"]),
                 (got["opt"]["state"][0]["step"], tree["opt"]["state"][0]["step"]),
                 (got["model"]["bn.num_batches_tracked"], tree["model"]["bn.num_batches_tracked"]),
                 (got["tied"], tree["model"]["fc.weight"])):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    # The file is plain safetensors: its own reader sees the tensors under their path in the tree.
    with safe_open(str(path), framework="pt") as handle:
        assert sorted(handle.keys()) == ["mask", "model/bn.num_batches_tracked", "model/fc.weight",
                                         "opt/state/0/exp_avg", "opt/state/0/step", "tied"]
        assert json.loads(handle.metadata()["fedafd_meta"]) == meta


def test_a_restored_adam_takes_the_identical_next_step(tmp_path: Path) -> None:
    # Prepare: a tiny model with Adam (non-default betas, weight decay) after three steps
    torch.manual_seed(0)
    x, y = torch.randn(8, 4), torch.randn(8, 2)

    def step(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()

    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01, betas=(0.5, 0.9), weight_decay=0.1)
    for _ in range(3):
        step(model, optimizer)
    save_checkpoint(tmp_path / "s.safetensors", {"model": model.state_dict(), "optimizer": optimizer.state_dict()}, {})

    # Execute: a fresh model and optimiser from the file, then one more step on both
    tree, _ = load_checkpoint(tmp_path / "s.safetensors")
    restored = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
    restored.load_state_dict(tree["model"])
    restored_optimizer = torch.optim.Adam(restored.parameters(), lr=0.5)
    restored_optimizer.load_state_dict(tree["optimizer"])
    step(model, optimizer)
    step(restored, restored_optimizer)

    # Assert: bit-identical weights and moments (a lost moment, step count or beta would differ)
    assert restored_optimizer.param_groups[0]["betas"] == (0.5, 0.9) and restored_optimizer.param_groups[0]["lr"] == 0.01
    for a, b in zip(model.parameters(), restored.parameters()):
        assert torch.equal(a, b)
        assert torch.equal(optimizer.state[a]["exp_avg_sq"], restored_optimizer.state[b]["exp_avg_sq"])
        assert float(restored_optimizer.state[b]["step"]) == 4.0


def _old_file(path: Path, meta: dict) -> None:
    """A checkpoint as builds before safetensors wrote it (torch.save, the metadata embedded)."""
    buffer = io.BytesIO()
    torch.save({"model": {"w": torch.ones(2)}, "__meta_json__": json.dumps(meta)}, buffer)
    path.write_bytes(buffer.getvalue())


def test_an_old_torch_save_file_is_refused_and_only_the_converter_reads_it(tmp_path: Path) -> None:
    _old_file(tmp_path / "old.pt", {"round": 1})
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 3)

    for name in ("old.pt", "junk.safetensors"):
        with pytest.raises(CheckpointError, match="not a fedafd safetensors checkpoint"):
            load_checkpoint(tmp_path / name)
        with pytest.raises(CheckpointError, match="not a fedafd safetensors checkpoint"):
            read_meta(tmp_path / name)
    tree, meta = read_legacy(tmp_path / "old.pt")
    assert meta == {"round": 1} and torch.equal(tree["model"]["w"], torch.ones(2)) and set(tree) == {"model"}


def test_no_production_code_reads_or_writes_with_torch_load_or_save() -> None:
    # The converter's reader is the one exception; backbones.py reads the EfficientNet package's own .pth weights;
    # towers.py reads a user's .pt/.pth with weights_only=True and names the conversion of one that needs more.
    allowed = {"runtime/checkpoint.py": 1, "runtime/backbones.py": 1, "runtime/towers.py": 2}
    found: dict[str, int] = {}
    for folder in ("runtime", "cloud_server", "edge_client", "export", "benchmarks"):
        for path in (REPO / folder).rglob("*.py"):
            count = len(re.findall(r"torch\.(?:load|save)\(", path.read_text()))
            if count:
                found[str(path.relative_to(REPO))] = count
    assert found == allowed
