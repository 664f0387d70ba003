"""Collecting a round's uploads: why each silent device is dropped (a typed reason, with readable text), and
that only a straggler stays joined for the next round."""

from __future__ import annotations

import threading
from pathlib import Path

from fedafd.cloud_server.app import ServerApp
from fedafd.cloud_server.round_record import DropReason, RoundOutcome
from fedafd.runtime.config import ServerConfig, build_config
from fedafd.runtime.transport import InprocHub
from fedafd.runtime.wire import Bye, Heartbeat, Join, encode
from fedafd.runtime.data.modal import public_source


def test_a_straggler_stays_joined_and_an_exited_silent_or_leaving_device_is_forgotten(tmp_path: Path) -> None:
    # Prepare: four joined devices, none uploads. image-0 keeps sending heartbeats (a straggler), image-1's
    # process exited, image-2 says nothing, image-3 says Bye.
    hub = InprocHub()
    config = build_config(ServerConfig, dict(image_arch="cnn_small", text_arch="gru", public_size=32, feature_dim=16,
                                             heartbeat_timeout_s=2.0, round_deadline_s=3.5))
    server = ServerApp(config, hub.server(), tmp_path, dead_clients=lambda: {"image-1": 9})
    devices = {cid: hub.client(cid) for cid in ("image-0", "image-1", "image-2", "image-3")}
    for cid, device in devices.items():
        device.send(encode(Join(client_id=cid, kind="image", image_arch="cnn_small", text_arch="", num_private=10,
                                 public_digest=public_source().digest)))
        server._handle_outside_round(server.messenger.recv(5.0))
    stop = threading.Event()

    def straggle() -> None:
        while not stop.wait(0.2):
            devices["image-0"].send(encode(Heartbeat(client_id="image-0", round=0, stage="training")))

    devices["image-3"].send(encode(Bye(reason="battery low")))
    heartbeats = threading.Thread(target=straggle)
    heartbeats.start()
    outcome = RoundOutcome()
    try:
        # Execute
        server._collect(0, list(devices), outcome)
    finally:
        stop.set()
        heartbeats.join()
        server.close()

    # Assert: one typed reason each, the text says it with its setting; only the straggler is still joined.
    assert {cid: drop.reason for cid, drop in outcome.dropped.items()} == {
        "image-0": DropReason.DEADLINE, "image-1": DropReason.PROCESS_EXITED, "image-2": DropReason.SILENT,
        "image-3": DropReason.LEFT}
    assert outcome.dropped["image-0"].text == "no upload by the round deadline (round_deadline_s=3.5)"
    assert outcome.dropped["image-1"].text == "process exited with code 9"
    assert outcome.dropped["image-2"].text == "silent for 2s (heartbeat_timeout_s)"
    assert outcome.dropped["image-3"].text == "left: battery low"
    assert list(server.clients) == ["image-0"]
