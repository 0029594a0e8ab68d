"""make_strategy: names to strategies, settings checked."""

from __future__ import annotations

import pytest

from edged.policy.base import Resource, Strategy
from edged.policy.registry import STRATEGY_NAMES, make_strategy
from tests.test_policy_support import GIB, make_state


@pytest.mark.parametrize("name", STRATEGY_NAMES)
def test_makes_each_strategy(name: str) -> None:
    strategy: Strategy = make_strategy(name, {})
    assert strategy.name == name
    assert strategy.decide(make_state(0.0, {Resource.MEMORY: 1 * GIB})) == []


def test_every_strategy_the_config_names_is_built() -> None:
    assert set(STRATEGY_NAMES) == {"dynamic", "predictive", "adaptive", "cooperative"}
    with pytest.raises(ValueError, match="tolerance"):
        make_strategy("cooperative", {"tolerance": 2})


def test_unknown_name_and_setting() -> None:
    with pytest.raises(ValueError, match="'greedy'"):
        make_strategy("greedy", {})
    with pytest.raises(ValueError, match="'holdtime'"):
        make_strategy("dynamic", {"holdtime": 1})
