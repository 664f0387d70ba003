"""LOCAL, the no-federation baseline (the degenerate method): devices train on their own data only, nothing
but metrics goes up, and the server only trains its encoders on the public set."""

from __future__ import annotations

from fedafd.cloud_server.strategies.base import Strategy


class Local(Strategy):
    name = "local"

    def switches(self) -> dict:
        return dict(uplink=False)
