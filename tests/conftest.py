"""Shared test helpers."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Callable, Sequence

import pytest

from fedafd.cloud_server.app import ServerApp
from fedafd.cloud_server.tracking import RoundSink
from fedafd.edge_client.app import EdgeApp
from fedafd.runtime.config import ClientConfig, ServerConfig
from fedafd.runtime.transport import ClientTransport, InprocHub

InprocFederation = Callable[..., tuple[list[dict], ServerApp, dict[str, EdgeApp]]]


def run_inproc_federation(server_config: ServerConfig, run_dir: Path, client_configs: list[ClientConfig],
                          wrap: Callable[[ClientConfig, ClientTransport], ClientTransport] = lambda c, t: t,
                          on_stage: Callable[[str], None] = lambda text: None, sinks: Sequence[RoundSink] = (),
                          ) -> tuple[list[dict], ServerApp, dict[str, EdgeApp]]:
    """A server and its devices on an in-process hub (still through the wire's encode/decode), each device
    in a thread; returns the round records, the server and the devices by client id once all finished."""
    run_dir.mkdir(parents=True, exist_ok=True)
    hub = InprocHub()
    server = ServerApp(server_config, hub.server(), run_dir, sinks=sinks)
    server.on_stage = on_stage
    edges = {c.client_id: EdgeApp(c, wrap(c, hub.client(c.client_id)), run_dir / c.client_id) for c in client_configs}
    threads = [threading.Thread(target=edge.run, daemon=True) for edge in edges.values()]
    for thread in threads:
        thread.start()
    try:
        records = server.run()
    finally:
        for thread in threads:
            thread.join(timeout=60)
        server.close()
        for edge in edges.values():
            edge.close()
    assert not any(thread.is_alive() for thread in threads), "a device did not finish"
    return records, server, edges


@pytest.fixture(scope="session")
def inproc_federation() -> InprocFederation:
    return run_inproc_federation
