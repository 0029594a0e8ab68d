"""What the blocking and the asyncio client share: socket path, framing, budget parameters,
leases and the dispatch of server notifications to callbacks."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from edged.client.errors import EdgedError, error_from_reply
from edged.config import parse_size_bytes
from edged.server.protocol import MAX_LINE_BYTES, PROTOCOL_VERSION

log = logging.getLogger("edged.client")

#: Methods sent again on a new connection when the old one broke before the reply came:
#: the read-only ones, and ``budget.release`` (a second release of a lease the first one
#: already released gets 1004, which the client treats as released). Anything else
#: (``budget.request``, ``budget.update``) may have been acted on, so it raises ConnectionLost.
IDEMPOTENT_METHODS = frozenset(
    {
        "hello",
        "status",
        "snapshot",
        "history",
        "events",
        "subscribe",  # it sets the connection's topics: sending it twice changes nothing
        "budget.list",
        "budget.release",
    }
)

#: ``subscribe`` topics and the notification each one brings (DESIGN section 6).
TOPIC_NOTIFICATIONS = {"pressure": "pressure", "events": "event", "snapshot": "snapshot"}


def subscribe_params(topics: Sequence[str]) -> dict[str, Any]:
    """``subscribe`` params; raises ValueError on a topic the daemon does not know (the
    daemon would refuse it with -32602 anyway; this says so before anything is sent)."""
    if isinstance(topics, str):
        raise ValueError("topics must be a list of topic names, not one string")
    unknown = sorted(set(topics) - set(TOPIC_NOTIFICATIONS))
    if unknown:
        raise ValueError(f"unknown topic {unknown[0]!r} (known: {', '.join(TOPIC_NOTIFICATIONS)})")
    return {"topics": list(dict.fromkeys(topics))}


#: Notifications the daemon pushes about budgets (DESIGN section 6).
BUDGET_NOTIFICATIONS = ("budget.granted", "budget.shrink", "budget.grow", "budget.revoked")

Callback = Callable[[Mapping[str, Any]], Any]


def socket_path(path: str | os.PathLike[str] | None = None) -> str:
    """The socket to connect to: ``path``, else ``$EDGED_SOCKET``, else
    ``$EDGED_SERVER_SOCKET`` (the variable that sets ``edged run``'s ``[server] socket``, so a
    daemon and clients started in one environment agree), else the daemon's default
    (``/run/edged/edged.sock`` as root, ``$XDG_RUNTIME_DIR/edged.sock`` otherwise)."""
    if path is not None:
        return os.fspath(path)
    from edged.server.server import default_socket_path

    return (
        os.environ.get("EDGED_SOCKET")
        or os.environ.get("EDGED_SERVER_SOCKET")
        or str(default_socket_path())
    )


def encode_request(request_id: int, method: str, params: Mapping[str, Any] | None) -> bytes:
    """One request line; refuses lines the daemon would drop as oversized."""
    line = json.dumps(
        {"jsonrpc": "2.0", "id": request_id, "method": method, "params": dict(params or {})},
        separators=(",", ":"),
    ).encode()
    if len(line) >= MAX_LINE_BYTES:
        raise ValueError(f"request of {len(line)} bytes exceeds the {MAX_LINE_BYTES}-byte line")
    return line + b"\n"


def decode_line(line: bytes) -> dict[str, Any]:
    """One message from the daemon; a line that is not a JSON object is a protocol error."""
    try:
        message = json.loads(line)
    except ValueError as exc:
        raise EdgedError(None, f"daemon sent a line that is not JSON: {line[:80]!r}") from exc
    if not isinstance(message, dict):
        raise EdgedError(None, f"daemon sent a non-object message: {line[:80]!r}")
    return message


def result_of(message: Mapping[str, Any]) -> Any:
    """The reply's result, or its error raised as the matching exception."""
    if "error" in message:
        raise error_from_reply(message["error"])
    return message.get("result")


def hello_params(client_name: str) -> dict[str, Any]:
    return {"client": client_name, "protocol": PROTOCOL_VERSION}


def _resources(
    memory: int | float | str | None,
    cpu: float | None,
    gpu_memory: int | float | str | None,
    gpu: int | None,
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if memory is not None:
        out["memory"] = parse_size_bytes(memory)
    if cpu is not None:
        if isinstance(cpu, bool) or cpu <= 0:
            raise ValueError(f"cpu must be a positive number of cores; got {cpu!r}")
        out["cpu"] = float(cpu)
    if gpu_memory is not None:
        out["gpu_memory"] = parse_size_bytes(gpu_memory)
    if gpu is not None:
        out["gpu"] = int(gpu)
    return out


def budget_params(
    *,
    memory: int | float | str | None = None,
    cpu: float | None = None,
    gpu_memory: int | float | str | None = None,
    gpu: int | None = None,
    min: Mapping[str, int | float | str] | None = None,  # the protocol's name
    wait_s: float = 0.0,
    ttl_s: float | None = None,
    klass: str | None = None,
    pid: int | None = None,
) -> dict[str, Any]:
    """``budget.request`` params (DESIGN section 6) from Python arguments; sizes may be
    ``"2G"``/``"512MiB"`` (as in edged.toml). Raises ValueError on a bad value."""
    resources = _resources(memory, cpu, gpu_memory, gpu)
    if not resources:
        raise ValueError("a budget needs at least one of memory, cpu, gpu_memory")
    params: dict[str, Any] = {"resources": resources, "wait": float(wait_s)}
    if wait_s < 0:
        raise ValueError(f"wait must be >= 0 seconds; got {wait_s!r}")
    if min is not None:
        unknown = set(min) - {"memory", "cpu", "gpu_memory"}
        if unknown:
            raise ValueError(f"min: unknown resources {sorted(unknown)}")
        cpu_min = min.get("cpu")
        params["min"] = _resources(
            min.get("memory"),
            None if cpu_min is None else float(cpu_min),
            min.get("gpu_memory"),
            None,
        )
    if ttl_s is not None:
        if ttl_s <= 0:
            raise ValueError(f"ttl must be > 0 seconds; got {ttl_s!r}")
        params["ttl"] = float(ttl_s)
    if klass is not None:
        params["class"] = klass
    if pid is not None:
        params["pid"] = int(pid)
    return params


@dataclass
class Lease:
    """A granted budget. ``granted`` follows ``budget.grow``/``budget.shrink``; ``revoked``
    turns True on ``budget.revoked``. Released when its ``with`` block ends."""

    id: Any
    granted: dict[str, Any]
    enforced: Any = None
    shrink_target: dict[str, Any] | None = None
    shrink_deadline_s: float | None = None
    revoked: bool = False
    revoke_reason: str | None = None
    released: bool = False
    callbacks: dict[str, list[Callback]] = field(default_factory=dict)


def lease_callbacks(
    on_shrink: Callback | None, on_grow: Callback | None, on_revoke: Callback | None
) -> dict[str, list[Callback]]:
    pairs = (("budget.shrink", on_shrink), ("budget.grow", on_grow), ("budget.revoked", on_revoke))
    return {method: [cb] for method, cb in pairs if cb is not None}


class Dispatcher:
    """Routes notifications: updates the lease they name, then calls that lease's callbacks,
    then the client-wide ones. A callback that raises is logged and the others still run: a
    bug in one handler must not break the connection every other lease depends on."""

    def __init__(self) -> None:
        self.callbacks: dict[str, list[Callback]] = {}
        self.leases: dict[Any, Lease] = {}

    def on(self, method: str, callback: Callback) -> None:
        self.callbacks.setdefault(method, []).append(callback)

    def off(self, method: str, callback: Callback) -> None:
        """Remove one registration of ``callback`` for ``method`` (if there is one)."""
        found = self.callbacks.get(method, [])
        if callback in found:
            found.remove(callback)

    def targets(self, method: str, params: Mapping[str, Any]) -> list[Callback]:
        """Apply the notification to its lease; the callbacks to call, in order."""
        lease = self.leases.get(params.get("lease"))
        if lease is not None:
            if method == "budget.grow" and isinstance(params.get("granted"), dict):
                lease.granted = dict(params["granted"])
                lease.shrink_target = None
                lease.shrink_deadline_s = None
            elif method == "budget.shrink":
                target = params.get("target")
                lease.shrink_target = dict(target) if isinstance(target, dict) else None
                deadline = params.get("deadline")
                lease.shrink_deadline_s = float(deadline) if deadline is not None else None
            elif method == "budget.revoked":
                lease.revoked = True
                lease.revoke_reason = str(params.get("reason", ""))
        found = list(lease.callbacks.get(method, [])) if lease is not None else []
        return found + list(self.callbacks.get(method, []))

    @staticmethod
    def report(method: str, exc: BaseException) -> None:
        log.error("callback for %s raised %r", method, exc, exc_info=exc)


class Backoff:
    """Exponential delays for reconnecting: ``initial_s`` doubling up to ``max_s``, until
    ``total_s`` has been spent (bounded, so a daemon that stays down ends in
    DaemonUnavailable instead of a hang)."""

    def __init__(self, initial_s: float, max_s: float, total_s: float) -> None:
        self.initial_s = initial_s
        self.max_s = max_s
        self.total_s = total_s

    def delays(self) -> list[float]:
        out: list[float] = []
        delay, spent = self.initial_s, 0.0
        while spent < self.total_s:
            step = min(delay, self.max_s, self.total_s - spent)
            out.append(step)
            spent += step
            delay *= 2
        return out
