"""The client's exceptions: one class per DESIGN section 6 error code, with the reply's fields.

A JSON-RPC error reply becomes an :class:`EdgedError` subclass picked by ``code`` (as psutil
turns ``OSError`` into ``NoSuchProcess``/``AccessDenied`` once, at the boundary), so callers catch
``InsufficientResources`` and read ``.available`` instead of comparing numbers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from edged.server import protocol


class EdgedError(Exception):
    """An error from edged: ``code`` (JSON-RPC or edged code; None when no daemon answered),
    ``message`` and ``data`` as the server sent them."""

    def __init__(self, code: int | None, message: str, data: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data


class DaemonUnavailable(EdgedError):
    """No daemon could be reached on the socket (not running, wrong path, or it went away
    and did not come back within the reconnect budget)."""

    def __init__(self, message: str, path: str) -> None:
        super().__init__(None, message)
        self.path = path


class ConnectionLost(DaemonUnavailable):
    """The connection broke after a request that is not safe to repeat (``budget.request``,
    ``budget.release``...) was sent: whether the daemon acted on it is unknown."""


class ParseError(EdgedError):
    """-32700: the daemon could not parse what was sent."""


class InvalidRequest(EdgedError):
    """-32600: not a valid JSON-RPC request."""


class MethodNotFound(EdgedError):
    """-32601: the daemon has no such method (an older daemon, or a typo)."""


class InvalidParams(EdgedError):
    """-32602: the parameters were refused; ``message`` says which."""


class InternalError(EdgedError):
    """-32603: the daemon failed while handling the request."""


class InsufficientResources(EdgedError):
    """1001: the budget cannot be granted now; ``available`` is what the daemon could give
    (resource name -> amount, bytes or cores), from the error's ``data``."""

    @property
    def available(self) -> Mapping[str, Any]:
        if isinstance(self.data, Mapping):
            value = self.data.get("available", {})
            if isinstance(value, Mapping):
                return value
        return {}


class TimedOut(EdgedError):
    """1002: the request waited its ``wait`` seconds in the queue without being granted."""


class PermissionDenied(EdgedError):
    """1003: the peer may not do this (another uid's process, an admin method), or the socket
    itself refused the connection (EACCES: not in group ``edged``)."""


class NoSuchLease(EdgedError):
    """1004: the lease is unknown (released, revoked, expired, or the daemon restarted)."""


class TooManyRequests(EdgedError):
    """1005: too many requests or connections; back off and retry."""


class ShuttingDown(EdgedError):
    """1006: the daemon is stopping."""


_BY_CODE: dict[int, type[EdgedError]] = {
    protocol.PARSE_ERROR: ParseError,
    protocol.INVALID_REQUEST: InvalidRequest,
    protocol.METHOD_NOT_FOUND: MethodNotFound,
    protocol.INVALID_PARAMS: InvalidParams,
    protocol.INTERNAL_ERROR: InternalError,
    protocol.INSUFFICIENT_RESOURCES: InsufficientResources,
    protocol.TIMED_OUT: TimedOut,
    protocol.PERMISSION_DENIED: PermissionDenied,
    protocol.NO_SUCH_LEASE: NoSuchLease,
    protocol.TOO_MANY: TooManyRequests,
    protocol.SHUTTING_DOWN: ShuttingDown,
}


def error_from_reply(error: Any) -> EdgedError:
    """The exception for a reply's ``error`` member; an unknown code gives plain EdgedError."""
    if not isinstance(error, Mapping):
        return EdgedError(None, f"malformed error reply: {error!r}")
    code = error.get("code")
    message = str(error.get("message", "error"))
    data = error.get("data")
    if not isinstance(code, int) or isinstance(code, bool):
        return EdgedError(None, message, data)
    return _BY_CODE.get(code, EdgedError)(code, message, data)
