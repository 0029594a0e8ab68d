"""Client library for edged's socket (DESIGN section 6): :class:`Client` (blocking) and
:class:`AsyncClient` (asyncio), stdlib only.

```python
from edged.client import Client, InsufficientResources

with Client() as client:  # $EDGED_SOCKET, $EDGED_SERVER_SOCKET, else the default path
    client.hello("trainer")
    try:
        with client.budget(memory="2G", cpu=1.5, wait=30, on_shrink=print) as lease:
            ...  # lease.granted, lease.revoked; client.poll() runs the callbacks
    except InsufficientResources as exc:
        print("only", exc.available)
```

Errors are :class:`EdgedError` subclasses carrying the reply's ``code``, ``message`` and
``data``. :func:`edged.client.monitor.monitored` records a call's duration and resource delta
as OpenTelemetry histograms.
"""

from __future__ import annotations

from edged.client._async import AsyncClient
from edged.client._common import (
    BUDGET_NOTIFICATIONS,
    TOPIC_NOTIFICATIONS,
    Lease,
    budget_params,
    socket_path,
)
from edged.client._sync import Client
from edged.client.errors import (
    ConnectionLost,
    DaemonUnavailable,
    EdgedError,
    InsufficientResources,
    InternalError,
    InvalidParams,
    InvalidRequest,
    MethodNotFound,
    NoSuchLease,
    ParseError,
    PermissionDenied,
    ShuttingDown,
    TimedOut,
    TooManyRequests,
    error_from_reply,
)

__all__ = [
    "BUDGET_NOTIFICATIONS",
    "TOPIC_NOTIFICATIONS",
    "AsyncClient",
    "Client",
    "ConnectionLost",
    "DaemonUnavailable",
    "EdgedError",
    "InsufficientResources",
    "InternalError",
    "InvalidParams",
    "InvalidRequest",
    "Lease",
    "MethodNotFound",
    "NoSuchLease",
    "ParseError",
    "PermissionDenied",
    "ShuttingDown",
    "TimedOut",
    "TooManyRequests",
    "budget_params",
    "error_from_reply",
    "socket_path",
]
