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


def test_cooperative_is_named_as_missing() -> None:
    with pytest.raises(ValueError, match="cooperative"):
        make_strategy("cooperative", {})


def test_unknown_name_and_setting() -> None:
    with pytest.raises(ValueError, match="'greedy'"):
        make_strategy("greedy", {})
    with pytest.raises(ValueError, match="'holdtime'"):
        make_strategy("dynamic", {"holdtime": 1})
