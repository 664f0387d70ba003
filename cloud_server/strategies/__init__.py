"""The methods on the server, one file each, found by name (`-c strategy=NAME` loads `<NAME>.py` here and its
Strategy of that name); their device sides are edge_client/objectives/<NAME>.py. What each computes and every
choice made where a paper is unclear: docs/strategies.md (with "Adding a method")."""

from __future__ import annotations

from fedafd.cloud_server.strategies.base import Downlink, Strategy
from fedafd.cloud_server.strategies.fedgems import CONFIDENCE_TEMPERATURE, UNSELECTED, retrieval_log_probs
from fedafd.runtime.config import ServerConfig
from fedafd.runtime.methods import STRATEGIES, method_class


def strategy_class(name: str) -> type[Strategy]:
    """The Strategy called `name`, from the module of that name in this package."""
    return method_class(__name__, name, Strategy)


STRATEGY_CLASSES: dict[str, type[Strategy]] = {name: strategy_class(name) for name in STRATEGIES}


def build_strategy(config: ServerConfig) -> Strategy:
    return strategy_class(config.strategy)(config)


__all__ = ["CONFIDENCE_TEMPERATURE", "UNSELECTED", "Downlink", "STRATEGY_CLASSES", "Strategy", "build_strategy",
           "retrieval_log_probs", "strategy_class"]
