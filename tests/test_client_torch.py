"""edged.client.torch with the real (CPU) PyTorch; CUDA, absent here, through a stand-in that
records the calls PyTorch's CUDA API would get."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from edged.client import Client
from edged.client.torch import apply_budget, restore, torch_budget
from tests.budget_server import BudgetServer

torch = pytest.importorskip("torch", reason="PyTorch is not installed (pip install torch)")

GIB = 2**30
TOTAL_GPU_BYTES = 16 * GIB


@pytest.fixture
def cuda(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, Any]]:
    """torch.cuda answering as a 16 GiB GPU would, recording what edged asks of it."""
    calls: list[tuple[str, Any]] = []
    reserved = {"bytes": 6 * GIB}

    def set_fraction(fraction: float, device: int = 0) -> None:
        calls.append(("set_per_process_memory_fraction", (round(fraction, 6), device)))

    def empty_cache() -> None:
        calls.append(("empty_cache", None))
        reserved["bytes"] = 1 * GIB  # what the allocator cached and did not use goes back

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(
        torch.cuda,
        "get_device_properties",
        lambda device: SimpleNamespace(total_memory=TOTAL_GPU_BYTES),
    )
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", set_fraction)
    monkeypatch.setattr(torch.cuda, "empty_cache", empty_cache)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=0: reserved["bytes"])
    return calls


@pytest.fixture
def server(tmp_path: Path) -> Iterator[BudgetServer]:
    capacity = {"memory": 8.0 * GIB, "cpu": 4.0, "gpu_memory": float(TOTAL_GPU_BYTES)}
    with BudgetServer(tmp_path / "budget.sock", capacity) as srv:
        yield srv


def test_cpu_budget_sets_and_restores_torch_threads() -> None:
    before = torch.get_num_threads()
    state = apply_budget({"cpu": 1.5})
    try:
        assert torch.get_num_threads() == 1  # 1.5 cores: one intra-op thread, never two
    finally:
        restore(state)
    assert torch.get_num_threads() == before
    t = torch.ones(64, 64)
    assert float((t @ t).sum()) == 64.0**3  # PyTorch still computes after the change


def test_gpu_budget_caps_the_allocator_and_lifts_it(cuda: list[tuple[str, Any]]) -> None:
    state = apply_budget({"gpu_memory": 4 * GIB})
    assert cuda == [("set_per_process_memory_fraction", (0.25, 0))]
    restore(state)
    assert cuda[-1] == ("set_per_process_memory_fraction", (1.0, 0))


def test_torch_budget_answers_a_shrink_with_empty_cache_and_a_usage_report(
    server: BudgetServer, cuda: list[tuple[str, Any]]
) -> None:
    before = torch.get_num_threads()
    with Client(server.path) as client, torch_budget(client, gpu_memory="8GiB", cpu=1) as lease:
        assert cuda == [("set_per_process_memory_fraction", (0.5, 0))]
        assert torch.get_num_threads() == 1
        server.notify(
            lease.id,
            "budget.shrink",
            {"lease": lease.id, "target": {"gpu_memory": 2 * GIB}, "deadline": 5, "reason": "x"},
        )
        deadline = time.monotonic() + 5
        while not server.updates and time.monotonic() < deadline:
            client.poll(0.1)
        assert ("empty_cache", None) in cuda
        assert ("set_per_process_memory_fraction", (0.125, 0)) in cuda  # capped at the target
        (update,) = server.updates
        assert update["usage"] == {"gpu_memory": 1 * GIB}  # what is reserved after emptying
        assert lease.shrink_target == {"gpu_memory": 2 * GIB}
    assert torch.get_num_threads() == before  # put back on exit
    assert cuda[-1] == ("set_per_process_memory_fraction", (1.0, 0))
    assert server.leases == {}  # and the lease released
