"""Bytes counted = bytes on the socket (raw ZeroMQ peers count the frames), split by part without losing a
byte; FedAvg equivalents and crossover arithmetic."""

from __future__ import annotations

import numpy as np
import pytest
import zmq

from fedafd.cloud_server.strategies import build_strategy
from fedafd.runtime.config import ServerConfig
from fedafd.runtime import wire
from fedafd.runtime.accounting import PARTS, ByteCounter
from fedafd.runtime.messaging import ClientMessenger, ServerMessenger
from fedafd.cloud_server.reporting.bandwidth import profile_records
from fedafd.runtime.transport import ZmqClientTransport, ZmqServerTransport

P, D = 50, 16


def _round_start() -> wire.RoundStart:
    rng = np.random.default_rng(0)
    return wire.RoundStart(
        round=0, local_epochs=1, tower_version=1, public_indices=np.arange(P, dtype=np.int64),
        global_features={m: rng.standard_normal((P, D)).astype(np.float32) for m in ("image", "text")},
        tower={"image.w": rng.standard_normal((D, 3)).astype(np.float32), "image.b": np.zeros(D, np.float32)},
        tower_arch={"image": "cnn_small"}, settings=build_strategy(ServerConfig()).settings())


def _upload() -> wire.FeatureUpload:
    feats = {m: np.random.default_rng(1).standard_normal((P, D)).astype(np.float32) for m in ("image", "text")}
    return wire.FeatureUpload(round=0, client_id="mm-0", features=feats, metrics={"num_params": 10.0},
                              losses={}, train_seconds=0.5)


@pytest.mark.parametrize("codec", ["raw", "int8_row"])
def test_server_side_counts_equal_raw_socket_bytes(codec):
    # Prepare: the server messenger on a real ROUTER; a raw DEALER stands in for the device.
    counter = ByteCounter()
    server = ServerMessenger(ZmqServerTransport("tcp://127.0.0.1:*"), counter)
    ctx = zmq.Context()
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.setsockopt(zmq.ROUTING_ID, b"mm-0")
    dealer.connect(server.transport.endpoint)
    try:
        # Execute: one upload up (raw frames), one RoundStart down (with codecs).
        up_frames = wire.encode(_upload(), codecs={"features": codec})
        dealer.send_multipart(up_frames)
        received = server.recv(timeout_s=5.0)
        assert received is not None and received.error is None
        server.send("mm-0", _round_start(), round=0, codecs={"global_features": codec, "tower": codec})
        assert dealer.poll(5000)
        down_on_socket = dealer.recv_multipart()
    finally:
        dealer.close()
        ctx.term()
        server.close()
    # Assert: what the counter holds is the byte length of what crossed the socket, to the byte.
    counted = counter.for_round(0)["mm-0"]
    assert counted["up"] == {"feature_upload": sum(len(f) for f in up_frames)}
    assert counted["down"] == {"round_start": sum(len(f) for f in down_on_socket)}
    parts = counter.parts_for_round(0)["mm-0"]
    assert sum(parts["up"].values()) == counted["up"]["feature_upload"]
    assert sum(parts["down"].values()) == counted["down"]["round_start"]
    per_element = 4 if codec == "raw" else 1
    scales = 0 if codec == "raw" else 4 * P
    assert parts["up"]["public_features"] == 2 * (P * D * per_element + scales)
    assert parts["down"]["global_features"] == 2 * (P * D * per_element + scales)
    # tower: w (D, 3) as int8_row = D*4 scales + 3D bytes; b (D,) goes fp16 under int8 = 2D bytes
    assert parts["down"]["global_tower"] == (D * 3 * 4 + D * 4 if codec == "raw" else D * 4 + D * 3 + D * 2)
    assert set(parts["up"]) <= set(PARTS) and set(parts["down"]) <= set(PARTS)


def test_client_side_counts_equal_raw_socket_bytes():
    counter = ByteCounter()
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    client = ClientMessenger(ZmqClientTransport(f"tcp://127.0.0.1:{port}", "mm-0"), counter, "mm-0")
    try:
        client.send(_upload(), round=0, codecs={"features": "fp16"})
        assert router.poll(5000)
        identity, *frames = router.recv_multipart()
        router.send_multipart([identity, *wire.encode(_round_start(), codecs={"global_features": "int8_col"})])
        received = client.recv(timeout_s=5.0)
        assert received is not None and received.error is None
    finally:
        client.close()
        router.close()
        ctx.term()
    counted = counter.for_round(0)["mm-0"]
    assert identity == b"mm-0"
    assert counted["up"]["feature_upload"] == sum(len(f) for f in frames)
    assert counter.parts_for_round(0)["mm-0"]["up"]["public_features"] == 2 * P * D * 2  # fp16
    assert counter.parts_for_round(0)["mm-0"]["down"]["global_features"] == 2 * (P * D + 4 * D)  # int8_col


def test_fedavg_equivalent_ratio_and_crossover_hand_computed():
    # One image client, 2 rounds: 1,000 B up and 9,000 B down per round, a 1,000-parameter model.
    def record(r):
        return {"round": r, "public_size": 10, "clients": {"image-0": {"kind": "image", "metrics": {"num_params": 1000.0}}},
                "bytes_by_part": {"image-0": {"up": {"public_features": 900, "control": 100},
                                              "down": {"global_features": 4000, "global_tower": 4500, "control": 500}}},
                "link": {"image-0": {"comm": 0.5, "compute": 2.0, "round_trip": 2.5}}}

    profile = profile_records([record(0), record(1)], {"feature_dim": 8})
    image = profile["kinds"]["image"]
    assert image["per_round"]["up_total"] == 1000 and image["per_round"]["down_total"] == 9000
    assert image["fedavg_per_round"]["up"] == 4000  # 1,000 params x 4 B
    assert image["ratio_to_fedavg"]["up"] == pytest.approx(0.25)
    assert image["ratio_to_fedavg"]["total"] == pytest.approx(10_000 / 8000)
    assert image["crossover_params"] == {"up": 250.0, "total": 1250.0}  # weights win below 1,250 params
    assert image["features_cheaper_for_this_model"] == {"up": True, "total": False}
    assert image["run_totals"] == {"up": 2000, "down": 18000}
    assert image["seconds_per_round"] == {"comm": 0.5, "compute": 2.0}
    assert profile["clients"]["image-0"]["cumulative_bytes"] == [10_000, 20_000]
    assert profile["clients"]["image-0"]["fedavg_cumulative_bytes"] == [8000, 16_000]  # 4,000 B each way per round
    assert image["reference_models"]["resnet18"]["ratio_up"] == pytest.approx(1000 / (11_689_512 * 4))
