"""The downlink plan: a device gets the towers of its modalities, and for the other modality whichever is
fewer numbers, its tower or G; a device computes the same G from a tower as the server has."""

from __future__ import annotations

import dataclasses

import threading
from pathlib import Path

import numpy as np
import torch

from fedafd.cloud_server.strategies import build_strategy
from fedafd.cloud_server.admission import ClientRecord
from fedafd.cloud_server.app import ServerApp
from fedafd.cloud_server.stages import extract_features
from fedafd.edge_client.model import GlobalTowers
from fedafd.edge_client.training import G_from_towers
from fedafd.runtime import wire
from fedafd.runtime.codecs import wire_codec
from fedafd.runtime.config import ServerConfig, build_config
from fedafd.runtime.transport import InprocHub
from fedafd.runtime.wire import RoundStart
from fedafd.runtime.data.modal import public_source

D = 16


def _server(tmp_path: Path, public_size: int) -> ServerApp:
    config = build_config(ServerConfig, {"feature_dim": D, "public_size": public_size, "baa": True})  # BAA needs G
    return ServerApp(config, InprocHub().server(), tmp_path / f"run{public_size}")


def _plan(server: ServerApp, kind: str, strategy: str = "fedafd") -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(towers, G tensors) the server sends a device of `kind` under `strategy` (the strategy's downlink hook)."""
    method = build_strategy(dataclasses.replace(server.config, strategy=strategy))
    plan = method.downlink(ClientRecord(f"{kind}-0", kind, {}, 10, 0).modalities, method.settings(), server.model,
                           len(server.public))
    return plan.towers, plan.global_features


def test_adapter_towers_replace_g_when_they_are_fewer_numbers(tmp_path: Path) -> None:
    # By hand at d = 16: effnet_linear has 1280*16 + 16 = 20,496 numbers, minilm_linear 384*16 + 16 = 6,160;
    # G of all 1,496 public pairs is 1,496*16 = 23,936, G of 48 pairs 768.
    everything, few = _server(tmp_path, 0), _server(tmp_path, 48)
    try:
        assert len(everything.public) == 1496
        for kind in ("image", "text", "multimodal"):
            assert _plan(everything, kind) == (("image", "text"), ())
        assert _plan(few, "image") == (("image",), ("text",))
        assert _plan(few, "text") == (("text",), ("image",))
        assert _plan(few, "multimodal") == (("image", "text"), ())
        # Without fusion only what the method needs of G: CreamFL both modalities, each the cheaper way;
        # FedMD (its consensus travels instead) and LOCAL nothing.
        assert _plan(few, "image", "creamfl") == ((), ("image", "text"))
        assert _plan(everything, "image", "creamfl") == (("image", "text"), ())
        for strategy in ("fedmd", "local"):
            assert _plan(everything, "multimodal", strategy) == ((), ())
    finally:
        everything.close()
        few.close()


def test_a_device_computes_the_servers_g_from_towers_sent_as_fp16(tmp_path: Path) -> None:
    server = _server(tmp_path, 0)
    try:
        device = torch.device("cpu")
        g = {m: extract_features(server.model.encoders[m], server.public, m, device) for m in ("image", "text")}
        # The towers through the wire as RoundStart carries them by default (fp16), decoded on the device.
        start = RoundStart(round=0, local_epochs=1, tower_version=1, public_indices=server.public_rows.astype(np.int64),
                           global_features={}, tower={k: v.numpy() for k, v in server.model.tower_state(("image", "text")).items()},
                           tower_arch=dict(server.model.archs), settings=server.strategy.settings())
        received = wire.decode([bytes(f) for f in wire.encode(start, codecs={"tower": wire_codec(server.config.tower_codec)})]).msg
        towers = GlobalTowers(D, device)
        towers.load(1, dict(received.tower_arch), {k: torch.from_numpy(np.array(v)) for k, v in received.tower.items()})
        rows = torch.from_numpy(server.public_rows.astype(np.int64))
        computed = G_from_towers(towers, server.public_all, rows, ("image", "text"), device)
    finally:
        server.close()
    assert server.config.tower_codec == "fp16"
    assert received.tower["image.project.1.weight"].dtype == np.float32  # decoded from fp16 frames
    for modality in ("image", "text"):
        cosine = torch.nn.functional.cosine_similarity(computed[modality], g[modality], dim=1)
        assert cosine.min() > 0.9999, modality
        assert not torch.equal(computed[modality], g[modality])  # the fp16 weights did round


def test_uploads_that_arrive_during_the_downlink_are_folded_before_the_next_round_start(tmp_path: Path) -> None:
    # Prepare: three image devices; image-0 answers its RoundStart at once (inside the server's send to it,
    # so the upload is waiting before the server sends the next RoundStart). A spy notes, at each send of a
    # RoundStart, which uploads the server has already taken in.
    from fedafd.runtime.wire import FeatureUpload, Join, Welcome, decode, encode

    hub = InprocHub()
    inner = hub.server()
    devices = {f"image-{i}": hub.client(f"image-{i}") for i in range(3)}
    taken_at_send: dict[str, list[str]] = {}

    def upload(cid: str, start: RoundStart) -> list:
        features = np.random.default_rng(len(cid)).standard_normal((len(start.public_indices), D)).astype(np.float32)
        return encode(FeatureUpload(round=start.round, client_id=cid, features={"image": features}, metrics={},
                                    losses={}, train_seconds=0.0))

    class Spy:
        endpoint = inner.endpoint

        def send(self, peer: str, frames) -> None:
            first = server._live is not None and peer not in taken_at_send  # its RoundStart
            if first:
                taken_at_send[peer] = sorted(server._live.outcome.uploads)
            inner.send(peer, frames)
            if first and peer == "image-0":
                devices[peer].send(upload(peer, decode(devices[peer].recv(5.0)).msg))

        def recv(self, timeout_s: float):
            return inner.recv(timeout_s)

        def close(self) -> None:
            inner.close()

    config = build_config(ServerConfig, {"feature_dim": D, "public_size": 32, "image_arch": "cnn_small",
                                         "text_arch": "gru", "round_deadline_s": 60})
    server = ServerApp(config, Spy(), tmp_path)
    try:
        for cid, device in devices.items():
            device.send(encode(Join(client_id=cid, kind="image", image_arch="cnn_small", text_arch="",
                                    num_private=10, public_digest=public_source().digest)))
            server._handle_outside_round(server.messenger.recv(5.0))
            assert isinstance(decode(device.recv(5.0)).msg, Welcome)
        for cid in ("image-1", "image-2"):  # they answer once their RoundStart is there
            threading.Timer(0.0, lambda cid=cid: devices[cid].send(
                upload(cid, decode(devices[cid].recv(60.0)).msg))).start()

        # Execute
        record = server._run_round(0)
    finally:
        server.close()

    # Assert: image-0's upload was taken in between the RoundStarts, not left queued until the collect.
    # (image-1's answer may be in by image-2's RoundStart too.)
    assert taken_at_send["image-0"] == [] and taken_at_send["image-1"] == ["image-0"]
    assert "image-0" in taken_at_send["image-2"]
    assert sorted(record["clients"]) == ["image-0", "image-1", "image-2"]
