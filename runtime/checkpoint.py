"""Checkpoint files both processes write: safetensors (tensors only, no pickle) with the rest in its header.

A checkpoint is a tree of dicts, lists and tuples whose leaves are tensors or plain values (None, bool,
int, float, str): a model's state dict, an optimiser's (Adam: per-parameter exp_avg, exp_avg_sq and
step tensors under int keys, param groups of floats, tuples and bools). The tensors go into the
safetensors file under their path in the tree ("optimizer/state/0/exp_avg"); the tree with each tensor
replaced by {"tensor": path} goes into the header as JSON ("layout"), beside the caller's metadata
("meta", JSON). Every container is a one-key object ({"dict": [[key, value], ...]}, {"list": [...]},
{"tuple": [...]}), so int keys and tuples come back as they went in and the tree is rebuilt exactly.

The metadata is also written beside the file as JSON for people (PATH.json); the loader trusts only the
copy in the header, so a crash between the two writes cannot make them disagree.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from fedafd.runtime.errors import FedafdError

SUFFIX = ".safetensors"
_META, _LAYOUT = "fedafd_meta", "fedafd_layout"
_MAX_HEADER_BYTES = 100 << 20
"""safetensors' own limit on its JSON header."""


class CheckpointError(FedafdError):
    """A checkpoint file that cannot be read (not safetensors, not written by fedafd, damaged)."""


def save_checkpoint(path: Path, tree: dict[str, Any], meta: dict[str, Any]) -> None:
    """Write `tree` (tensors and plain values) and `meta` (JSON values) to `path`, atomically."""
    from safetensors.torch import save

    from fedafd.runtime.files import atomic_write_bytes

    tensors: dict[str, Any] = {}
    layout = _flatten(tree, "", tensors)
    seen = set()
    for name, tensor in tensors.items():  # safetensors refuses two names for one memory (tied weights)
        if tensor.numel() and tensor.data_ptr() in seen:
            tensors[name] = tensor.clone()
        seen.add(tensor.data_ptr())
    meta_json = json.dumps(meta, sort_keys=True)
    payload = save(tensors, metadata={_META: meta_json, _LAYOUT: json.dumps(layout)})
    atomic_write_bytes(path, payload)
    atomic_write_bytes(path.with_suffix(".json"), (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode())


def load_checkpoint(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(tree, meta) of a file written by save_checkpoint; tensors on the CPU."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    data = Path(path).read_bytes()
    header = _metadata(path, data)
    try:
        tensors = load(data)
        return _unflatten(json.loads(header[_LAYOUT]), tensors), json.loads(header[_META])
    except (SafetensorError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{path} is damaged ({type(err).__name__}: {err}); restore it from a copy or "
                              f"start afresh") from None


def read_meta(path: Path) -> dict[str, Any]:
    """Only the metadata, from the header (no tensors read, no torch imported)."""
    with open(path, "rb") as handle:
        head = handle.read(8)
        size = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        data = head + handle.read(size) if 0 < size <= _MAX_HEADER_BYTES else head
    return json.loads(_metadata(path, data)[_META])


def _metadata(path: Path, data: bytes) -> dict[str, str]:
    """The header's string -> string metadata; any file that is not a fedafd safetensors file is an error."""
    size = struct.unpack("<Q", data[:8])[0] if len(data) >= 8 else -1
    try:
        if not 0 < size <= min(len(data) - 8, _MAX_HEADER_BYTES):
            raise ValueError("no safetensors header")
        header = json.loads(data[8:8 + size])
        metadata = header["__metadata__"]
        json.loads(metadata[_META]), json.loads(metadata[_LAYOUT])
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise CheckpointError(f"{path} is not a fedafd safetensors checkpoint (a torch.save file of an older "
                              f"build, or damaged)") from None
    return metadata


def read_legacy(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(tree, meta) of a checkpoint an older build wrote with torch.save: for the explicit converters only.
    weights_only=True unpickles tensors and plain containers, never code."""
    import torch

    try:
        tree = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for a file that is not its zip/pickle format
        raise CheckpointError(f"{path} is not a torch.save checkpoint ({type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else ''})") from None
    embedded = tree.pop("__meta_json__", None)  # older builds also embedded the metadata
    sidecar = Path(path).with_suffix(".json")
    if not isinstance(embedded, str) and not sidecar.is_file():
        raise CheckpointError(f"{path} has no metadata: neither embedded nor in {sidecar}")
    return tree, json.loads(embedded if isinstance(embedded, str) else sidecar.read_text())


def _flatten(value: Any, name: str, tensors: dict[str, Any]) -> Any:
    import torch

    if isinstance(value, torch.Tensor):
        if name in tensors:
            raise CheckpointError(f"two tensors would both be stored as {name!r}")
        tensors[name] = value.detach().cpu().contiguous()
        return {"tensor": name}
    if isinstance(value, dict):
        items = []
        for key, item in value.items():
            if isinstance(key, bool) or not isinstance(key, (str, int)):
                raise CheckpointError(f"{name or 'the checkpoint'} has a key {key!r}; only str and int keys are stored")
            items.append([key, _flatten(item, f"{name}/{key}" if name else str(key), tensors)])
        return {"dict": items}
    if isinstance(value, (list, tuple)):
        return {type(value).__name__: [_flatten(item, f"{name}/{i}", tensors) for i, item in enumerate(value)]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise CheckpointError(f"cannot store a {type(value).__name__} at {name!r} in a checkpoint")


def _unflatten(layout: Any, tensors: dict[str, Any]) -> Any:
    if not isinstance(layout, dict):
        return layout
    ((kind, body),) = layout.items()
    if kind == "tensor":
        return tensors[body]
    if kind == "dict":
        return {key: _unflatten(item, tensors) for key, item in body}
    if kind in ("list", "tuple"):
        items = [_unflatten(item, tensors) for item in body]
        return items if kind == "list" else tuple(items)
    raise ValueError(f"unknown layout entry {kind!r}")
