"""The methods on the server, one file each, found by name (`-c strategy=NAME` loads `<NAME>.py` here and its
Strategy of that name); their device sides are edge_client/objectives/<NAME>.py. What each computes and every
choice made where a paper is unclear: docs/strategies.md (with "Adding a method")."""

from __future__ import annotations

import importlib

from fedafd.cloud_server.strategies.base import Downlink, Strategy
from fedafd.cloud_server.strategies.fedgems import CONFIDENCE_TEMPERATURE, UNSELECTED, retrieval_log_probs
from fedafd.runtime.config import ServerConfig
from fedafd.runtime.methods import STRATEGIES


def strategy_class(name: str) -> type[Strategy]:
    """The Strategy called `name`, from the module of that name in this package."""
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; known: {', '.join(STRATEGIES)}")
    module = importlib.import_module(f"{__name__}.{name}")
    (cls,) = [c for c in vars(module).values() if isinstance(c, type) and issubclass(c, Strategy) and c.name == name]
    return cls


STRATEGY_CLASSES: dict[str, type[Strategy]] = {name: strategy_class(name) for name in STRATEGIES}


def build_strategy(config: ServerConfig) -> Strategy:
    return strategy_class(config.strategy)(config)


__all__ = ["CONFIDENCE_TEMPERATURE", "UNSELECTED", "Downlink", "STRATEGY_CLASSES", "Strategy", "build_strategy",
           "retrieval_log_probs", "strategy_class"]
