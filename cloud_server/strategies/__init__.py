"""The methods on the server, one file each, found by name (`-c strategy=NAME`); their device sides are
edge_client/objectives/<name>.py. What each computes and every choice made where a paper is unclear:
docs/strategies.md (with "Adding a method")."""

from __future__ import annotations

from fedafd.cloud_server.strategies.base import Downlink, Strategy
from fedafd.cloud_server.strategies.creamfl import CreamFl
from fedafd.cloud_server.strategies.fedafd import FedAfd
from fedafd.cloud_server.strategies.fedcmi import FedCmi
from fedafd.cloud_server.strategies.fedet import FedEt
from fedafd.cloud_server.strategies.fedgems import CONFIDENCE_TEMPERATURE, UNSELECTED, FedGems, retrieval_log_probs
from fedafd.cloud_server.strategies.fedmd import FedMd
from fedafd.cloud_server.strategies.local import Local
from fedafd.runtime.config import ServerConfig

STRATEGY_CLASSES: dict[str, type[Strategy]] = {
    cls.name: cls for cls in (FedAfd, Local, FedMd, CreamFl, FedGems, FedEt, FedCmi)}


def build_strategy(config: ServerConfig) -> Strategy:
    try:
        return STRATEGY_CLASSES[config.strategy](config)
    except KeyError:
        raise ValueError(f"unknown strategy {config.strategy!r}; known: {', '.join(STRATEGY_CLASSES)}") from None


__all__ = ["CONFIDENCE_TEMPERATURE", "UNSELECTED", "CreamFl", "Downlink", "FedAfd", "FedCmi", "FedEt", "FedGems",
           "FedMd", "Local", "STRATEGY_CLASSES", "Strategy", "build_strategy", "retrieval_log_probs"]
