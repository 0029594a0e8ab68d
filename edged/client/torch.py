"""PyTorch under an edged budget: ``edged.client.torch`` (the ``[torch]`` extra).

A lease says how much this process may use; PyTorch has the knobs that make it so:

* CPU cores: ``torch.set_num_threads`` (intra-op threads) = the granted cores, rounded down,
  at least 1, at most what PyTorch would use anyway;
* GPU memory: ``torch.cuda.set_per_process_memory_fraction(granted / total, device)``, so the
  caching allocator raises an out-of-memory error inside the budget instead of taking the GPU;
* ``budget.shrink``: ``torch.cuda.empty_cache()`` (the allocator gives back what it caches but
  does not use), a lower memory fraction at the target, and a ``budget.update`` that reports
  what is now reserved, so the daemon sees the client comply.

Leaving the budget puts the thread count and the memory fraction back as they were.

    from edged.client import Client
    from edged.client.torch import torch_budget

    with Client() as client, torch_budget(client, gpu_memory="6GiB", cpu=4) as lease:
        train()              # call client.poll() between steps to answer notifications

``torch`` is imported when a budget is applied, not when this module is; the functions take
the module as an argument so tests can hand in a CUDA stand-in on a machine without a GPU.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from edged.client._common import Lease
from edged.client._sync import Client


@dataclass
class TorchState:
    """What was in force before a budget was applied (put back on exit)."""

    num_threads: int
    memory_fraction: float | None  # None: no GPU memory budget was applied


def _torch(module: Any | None) -> Any:
    if module is not None:
        return module
    import torch  # the [torch] extra

    return torch


def gpu_total_bytes(torch: Any, device: int) -> int:
    """Total memory of a CUDA device, as PyTorch sees it."""
    return int(torch.cuda.get_device_properties(device).total_memory)


def apply_budget(
    granted: Mapping[str, Any], *, device: int = 0, torch: Any | None = None
) -> TorchState:
    """Size PyTorch to a grant: threads from ``cpu``, the allocator's cap from ``gpu_memory``.
    Returns what was in force before, for :func:`restore`."""
    t = _torch(torch)
    before = TorchState(num_threads=int(t.get_num_threads()), memory_fraction=None)
    cores = granted.get("cpu")
    if isinstance(cores, (int, float)) and cores > 0:
        t.set_num_threads(max(1, min(before.num_threads, math.floor(cores))))
    gpu_bytes = granted.get("gpu_memory")
    if isinstance(gpu_bytes, (int, float)) and gpu_bytes > 0 and t.cuda.is_available():
        fraction = min(1.0, gpu_bytes / gpu_total_bytes(t, device))
        t.cuda.set_per_process_memory_fraction(fraction, device)
        before.memory_fraction = 1.0
    return before


def restore(state: TorchState, *, device: int = 0, torch: Any | None = None) -> None:
    """Put back what :func:`apply_budget` changed."""
    t = _torch(torch)
    t.set_num_threads(state.num_threads)
    if state.memory_fraction is not None and t.cuda.is_available():
        t.cuda.set_per_process_memory_fraction(state.memory_fraction, device)


def shrink(
    client: Client,
    lease: Lease,
    target: Mapping[str, Any],
    *,
    device: int = 0,
    torch: Any | None = None,
) -> dict[str, int]:
    """Answer ``budget.shrink``: give cached GPU memory back, cap the allocator at the target,
    and report what is reserved now (``budget.update`` usage). Returns the usage reported."""
    t = _torch(torch)
    usage: dict[str, int] = {}
    if t.cuda.is_available():
        t.cuda.empty_cache()
        wanted = target.get("gpu_memory")
        if isinstance(wanted, (int, float)) and wanted > 0:
            fraction = min(1.0, wanted / gpu_total_bytes(t, device))
            t.cuda.set_per_process_memory_fraction(fraction, device)
        usage["gpu_memory"] = int(t.cuda.memory_reserved(device))
    cores = target.get("cpu")
    if isinstance(cores, (int, float)) and cores > 0:
        t.set_num_threads(max(1, math.floor(cores)))
    client.update(lease, usage=usage)
    return usage


@contextlib.contextmanager
def torch_budget(
    client: Client,
    *,
    memory: int | float | str | None = None,
    cpu: float | None = None,
    gpu_memory: int | float | str | None = None,
    device: int = 0,
    torch: Any | None = None,
    **request: Any,
) -> Iterator[Lease]:
    """``client.budget(...)`` with PyTorch sized to the grant, shrinks answered, and PyTorch
    put back on exit (also when the block raises). Extra keywords go to ``client.budget``."""
    t = _torch(torch)
    holder: dict[str, Lease] = {}

    def on_shrink(params: Mapping[str, Any]) -> None:
        target = params.get("target")
        if isinstance(target, Mapping) and "lease" in holder:
            shrink(client, holder["lease"], target, device=device, torch=t)

    with client.budget(
        memory=memory, cpu=cpu, gpu_memory=gpu_memory, on_shrink=on_shrink, **request
    ) as lease:
        holder["lease"] = lease
        state = apply_budget(lease.granted, device=device, torch=t)
        try:
            yield lease
        finally:
            restore(state, device=device, torch=t)
