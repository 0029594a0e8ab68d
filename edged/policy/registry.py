"""Strategy construction by name, from the ``[strategy.<name>]`` settings of the config."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from edged.policy.adaptive import AdaptiveStrategy
from edged.policy.base import Strategy
from edged.policy.cooperative import CooperativeStrategy
from edged.policy.dynamic import DynamicStrategy
from edged.policy.predictive import PredictiveStrategy

_FACTORIES: Mapping[str, Callable[[Mapping[str, Any]], Strategy]] = {
    "dynamic": DynamicStrategy,
    "predictive": PredictiveStrategy,
    "adaptive": AdaptiveStrategy,
    "cooperative": CooperativeStrategy,
}
_PLANNED: tuple[str, ...] = ()  # named by DESIGN section 4 but not written yet

STRATEGY_NAMES: tuple[str, ...] = tuple(_FACTORIES)


def make_strategy(name: str, settings: Mapping[str, Any] | None = None) -> Strategy:
    """A fresh strategy called ``name`` with ``settings`` (unknown keys raise ValueError)."""
    factory = _FACTORIES.get(name)
    if factory is None:
        if name in _PLANNED:
            raise ValueError(f"strategy {name!r} is not implemented yet")
        known = ", ".join(STRATEGY_NAMES)
        raise ValueError(f"unknown strategy {name!r} (known: {known})")
    return factory(settings or {})
