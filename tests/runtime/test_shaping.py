"""Device profiles and link shaping: the token bucket's arithmetic, and real transfers (in-process and ZeroMQ
on loopback) delayed by the profile's bandwidth and half its RTT."""

from __future__ import annotations

import dataclasses
import time

import pytest

from fedafd.runtime.shaping import (
    DeviceProfile, ProfileError, ShapedClientTransport, TokenBucket, load_profile, profile_to_toml, shipped_profiles,
)
from fedafd.runtime.transport import InprocHub, ZmqClientTransport, ZmqServerTransport

TOLERANCE_S = 0.08


def test_token_bucket_hand_computed():
    # Prepare: 1000 B/s, 100 B saved up.
    bucket = TokenBucket(rate=1000.0, burst=100.0, now=0.0)
    # Execute / Assert: 600 B at t=0 use the 100 B saved and wait for 500 more: 0.5 s.
    assert bucket.reserve(600, now=0.0) == pytest.approx(0.5)
    # 100 B at t=0.5: the debt is just paid off (0 tokens), so 0.1 s more.
    assert bucket.reserve(100, now=0.5) == pytest.approx(0.1)
    # After 10 idle seconds the bucket is full again (capped at 100): 50 B leave at once.
    assert bucket.reserve(50, now=10.0) == 0.0


def test_shipped_profiles_load_with_sources():
    names = shipped_profiles()
    assert {"phone_lte", "raspberry_pi_wifi", "workstation_ethernet"} <= set(names)
    for name in names:
        profile = load_profile(name)
        assert profile.name == name and profile.source and profile.uplink_mbps > 0
    assert load_profile("phone_lte").uplink_mbps < load_profile("workstation_ethernet").uplink_mbps


def test_profile_file_round_trip_and_errors(tmp_path):
    profile = dataclasses.replace(load_profile("phone_lte"), name="mine", source='has "quotes"')
    path = tmp_path / "mine.toml"
    path.write_text(profile_to_toml(profile))
    assert load_profile(path) == profile
    with pytest.raises(ProfileError, match="phone_lte"):
        load_profile("carrier_pigeon")
    (tmp_path / "bad.toml").write_text("uplink_mbps = 1\ndownlink_mbps = 1\nrtt_ms = 1\ndescription = 'x'\nwarp = 9\n")
    with pytest.raises(ProfileError, match="warp"):
        load_profile(tmp_path / "bad.toml")


def _profile(up_mbps: float, down_mbps: float, rtt_ms: float) -> DeviceProfile:
    return DeviceProfile(name="test", description="test link", uplink_mbps=up_mbps, downlink_mbps=down_mbps,
                         rtt_ms=rtt_ms, burst_bytes=0)


def test_uplink_and_downlink_are_delayed_by_bandwidth_and_half_rtt():
    # Prepare: 200 KB up at 4 Mbit/s (0.4 s) + 50 ms; 200 KB down at 8 Mbit/s (0.2 s) + 50 ms.
    hub = InprocHub()
    server = hub.server()
    profile = _profile(up_mbps=4.0, down_mbps=8.0, rtt_ms=100.0)
    client = ShapedClientTransport(hub.client("c"), profile)
    payload = [b"x" * 100_000, b"y" * 100_000]
    try:
        # Execute: uplink; the send itself does not block (a socket buffer), the arrival is late.
        started = time.monotonic()
        client.send(payload)
        assert time.monotonic() - started < 0.05
        got = server.recv(timeout_s=5.0)
        up_s = time.monotonic() - started
        # Downlink: on the wire at once, handed to the device when the emulated link has carried it.
        started = time.monotonic()
        server.send("c", payload)
        assert client.recv(timeout_s=0.05) is None  # not yet arrived
        frames = client.recv(timeout_s=5.0)
        down_s = time.monotonic() - started
    finally:
        client.close()
        server.close()
    # Assert
    assert got is not None and [bytes(f) for f in got[1]] == payload
    assert frames is not None and [bytes(f) for f in frames] == payload
    assert profile.transfer_seconds(200_000, "up") == pytest.approx(0.45)
    assert profile.transfer_seconds(200_000, "down") == pytest.approx(0.25)
    assert abs(up_s - 0.45) < TOLERANCE_S, up_s
    assert abs(down_s - 0.25) < TOLERANCE_S, down_s
    assert client.shaped_seconds["up"] == pytest.approx(0.45) and client.shaped_seconds["down"] == pytest.approx(0.25)


def test_back_to_back_messages_queue_behind_each_other_over_zeromq():
    # Two 100 KB uploads at 8 Mbit/s (0.1 s each) + 10 ms: the second arrives 0.21 s after the first send.
    server = ZmqServerTransport("tcp://127.0.0.1:*")
    client = ShapedClientTransport(ZmqClientTransport(server.endpoint, "c"), _profile(8.0, 8.0, 20.0))
    try:
        time.sleep(0.2)  # connect
        started = time.monotonic()
        client.send([b"a" * 100_000])
        client.send([b"b" * 100_000])
        first = server.recv(timeout_s=5.0)
        t_first = time.monotonic() - started
        second = server.recv(timeout_s=5.0)
        t_second = time.monotonic() - started
    finally:
        client.close()
        server.close()
    assert bytes(first[1][0][:1]) == b"a" and bytes(second[1][0][:1]) == b"b"
    assert abs(t_first - 0.11) < TOLERANCE_S, t_first
    assert abs(t_second - 0.21) < TOLERANCE_S, t_second
