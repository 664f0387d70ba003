"""CURVE and the allow-list: key files, `fedafd-cloud nodes`, who gets in, and a live server that
keeps serving a real round while an insider fuzzes it and outsiders knock."""

from __future__ import annotations

import stat
import threading
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedafd.benchmarks.fuzz import fuzz_live
from fedafd.benchmarks.sim_clients import run_devices
from fedafd.cloud_server.app import ServerApp
from fedafd.cloud_server.cli import app as cloud_cli
from fedafd.export.cli import fedafd_edge as edge_cli
from fedafd.runtime.config import ServerConfig
from fedafd.runtime.keys import ALLOW_LIST, AllowList, KeyFileError, generate_keypair, load_keypair
from fedafd.runtime.transport import CurveClientKeys, CurveServerKeys, ZmqClientTransport, ZmqServerTransport

WAIT_S = 3.0


def test_key_files_are_private_and_a_readable_secret_is_refused(tmp_path: Path) -> None:
    pair = generate_keypair(tmp_path / "dev.key")
    for name in ("dev.key", "dev.pub"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600
    assert load_keypair(tmp_path / "dev.key") == pair
    assert (tmp_path / "dev.pub").read_text().strip() == pair.public.decode()
    with pytest.raises(KeyFileError, match="exists"):
        generate_keypair(tmp_path / "dev.key")
    (tmp_path / "dev.key").chmod(0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        load_keypair(tmp_path / "dev.key")


def test_keys_and_nodes_commands(tmp_path: Path) -> None:
    runner = CliRunner()
    server_dir, device_key = tmp_path / "srv", tmp_path / "image-0.key"
    assert runner.invoke(cloud_cli, ["keys", "--out", str(server_dir)]).exit_code == 0
    result = runner.invoke(edge_cli, ["keys", "--out", str(device_key)])
    assert result.exit_code == 0 and "nodes add" in result.output
    assert runner.invoke(cloud_cli, ["nodes", "add", "image-0", str(device_key.with_suffix(".pub")),
                                     "--keys", str(server_dir)]).exit_code == 0
    listed = runner.invoke(cloud_cli, ["nodes", "list", "--keys", str(server_dir), "--format", "json"])
    assert '"image-0"' in listed.output and load_keypair(device_key).public.decode() in listed.output
    assert stat.S_IMODE((server_dir / ALLOW_LIST).stat().st_mode) == 0o600
    assert runner.invoke(cloud_cli, ["nodes", "revoke", "image-0", "--keys", str(server_dir)]).exit_code == 0
    assert AllowList(server_dir / ALLOW_LIST).entries() == {}
    again = runner.invoke(cloud_cli, ["nodes", "revoke", "image-0", "--keys", str(server_dir)])
    assert again.exit_code == 2 and "not in the allow-list" in again.output
    bad = runner.invoke(cloud_cli, ["nodes", "add", "x", "not-a-key", "--keys", str(server_dir)])
    assert bad.exit_code == 2 and "40 z85" in bad.output


def test_serve_and_join_need_keys_or_insecure(tmp_path: Path) -> None:
    runner = CliRunner()
    serve = runner.invoke(cloud_cli, ["serve", "--out", str(tmp_path / "run"), "--bind", "tcp://127.0.0.1:*"])
    assert serve.exit_code == 2 and "--insecure" in serve.output
    join = runner.invoke(edge_cli, ["join", "--server", "tcp://127.0.0.1:1", "--kind", "image",
                                    "--state-dir", str(tmp_path / "s")])
    assert join.exit_code == 2 and "--insecure" in join.output


class _Keys:
    def __init__(self, tmp_path: Path, *names: str):
        self.server = generate_keypair(tmp_path / "server.key")
        self.allow = AllowList(tmp_path / ALLOW_LIST)
        self.pairs = {}
        for name in names:
            self.pairs[name] = generate_keypair(tmp_path / f"{name}.key")
            self.allow.add(name, self.pairs[name].public.decode())

    def server_transport(self) -> ZmqServerTransport:
        return ZmqServerTransport("tcp://127.0.0.1:*", curve=CurveServerKeys(self.server.public, self.server.secret,
                                                                            self.allow.client_of_key))

    def client(self, endpoint: str, name: str, pair=None) -> ZmqClientTransport:
        pair = pair or self.pairs[name]
        return ZmqClientTransport(endpoint, name, curve=CurveClientKeys(pair.public, pair.secret, self.server.public))


def test_curve_admits_only_allow_listed_keys_under_their_own_name(tmp_path: Path) -> None:
    keys = _Keys(tmp_path, "image-0", "text-0")
    server = keys.server_transport()
    stranger_pair = generate_keypair(tmp_path / "stranger.key")
    clients = []
    try:
        good = keys.client(server.endpoint, "image-0")
        stranger = keys.client(server.endpoint, "image-0", stranger_pair)  # unknown key, claims image-0
        plain = ZmqClientTransport(server.endpoint, "image-0")  # no encryption at all
        impostor = keys.client(server.endpoint, "image-0", keys.pairs["text-0"])  # text-0's key claiming image-0
        clients += [good, stranger, plain, impostor]
        for c, payload in ((stranger, b"s"), (plain, b"p")):
            c.send([payload])
        good.send([b"g"])
        peer, frames = server.recv(WAIT_S)
        assert (peer, bytes(frames[0])) == ("image-0", b"g")
        assert server.recv(1.0) is None  # the stranger and the plain-text peer never got through
        impostor.send([b"i"])
        peer, frames = server.recv(WAIT_S)
        assert (peer, bytes(frames[0])) == ("text-0", b"i")  # known by its key, not by what it claims
        server.send("image-0", [b"yours"])
        assert bytes(good.recv(WAIT_S)[0]) == b"yours" and impostor.recv(0.5) is None
        # Revocation: the open connection stays, the next one is refused, no restart.
        keys.allow.revoke("image-0")
        good.reconnect()
        good.send([b"again"])
        assert server.recv(1.5) is None
        impostor.send([b"still serving"])
        assert server.recv(WAIT_S)[0] == "text-0"
    finally:
        for c in clients:
            c.close()
        server.close()


@pytest.mark.slow
def test_live_curve_server_survives_fuzzing_and_outsiders_and_completes_a_round(tmp_path: Path) -> None:
    # Prepare: a real ServerApp on a CURVE transport, in a thread; an allow-listed fuzzer and device.
    keys = _Keys(tmp_path, "fuzzer", "image-0")
    transport = keys.server_transport()
    config = ServerConfig(rounds=1, expected_clients=1, min_clients=1, public_size=16, feature_dim=8,
                          image_arch="cnn_small", text_arch="gru", join_timeout_s=120, device="cpu", threads=1)
    server = ServerApp(config, transport, tmp_path / "run")
    (tmp_path / "run").mkdir()
    records: list = []
    thread = threading.Thread(target=lambda: records.extend(server.run()), daemon=True)
    thread.start()
    try:
        # Execute: 300 mutated messages from an insider, then outsiders, then a real device's round.
        fuzzer = keys.pairs["fuzzer"]
        fuzz = fuzz_live(transport.endpoint, 300, seed=3, reply_timeout_s=10.0, alive=thread.is_alive,
                         curve=(fuzzer.public, fuzzer.secret, keys.server.public))
        stranger_pair = generate_keypair(tmp_path / "stranger.key")
        outsiders = [keys.client(transport.endpoint, "image-0", stranger_pair), ZmqClientTransport(transport.endpoint, "image-0")]
        for o in outsiders:
            o.send([b"FAFD\x01", b"\x80"])
        outsider_replies = [o.recv(1.0) for o in outsiders]
        for o in outsiders:
            o.close()
        device = keys.pairs["image-0"]
        stats = run_devices(transport.endpoint, [("image-0", "image")], timeout_s=120,
                            curve_keys={"image-0": (device.public, device.secret, keys.server.public)})
        thread.join(timeout=60)
    finally:
        server.close()

    # Assert: every fuzz message answered, nothing crashed, outsiders silent, the round counted the device.
    assert fuzz["tried"] == 300 and fuzz["crashed"] == 0 and fuzz["answered"] == 300, fuzz
    assert {"bad_magic", "bad_header", "frame_count"} <= set(fuzz["codes"]), fuzz["codes"]
    assert set(fuzz["codes"]) <= {code for code in fuzz["codes"] if code.islower()}  # only Error replies
    assert outsider_replies == [None, None]
    assert not thread.is_alive() and [r["round"] for r in records] == [0]
    assert set(records[0]["clients"]) == {"image-0"} and stats.uploads == 1 and stats.byes == 1
    assert stats.errors == []
    rejected = records[0]["rejected"]
    assert len(rejected) >= 300 and {r["peer"] for r in rejected} == {"fuzzer"}
