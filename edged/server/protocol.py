"""JSON-RPC 2.0 framing for protocol v1: one JSON object per line, at most 64 KiB a line."""

from __future__ import annotations

from typing import Any

import msgspec

PROTOCOL_VERSION = 1
MAX_LINE_BYTES = 64 * 1024

# JSON-RPC codes
PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
# edged codes
INSUFFICIENT_RESOURCES = 1001
TIMED_OUT = 1002
PERMISSION_DENIED = 1003
NO_SUCH_LEASE = 1004
TOO_MANY = 1005
SHUTTING_DOWN = 1006

RequestId = int | str | None


class RpcError(Exception):
    """An error reply; handlers raise it, the server turns it into a JSON-RPC error object."""

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data


class Request(msgspec.Struct, frozen=True):
    jsonrpc: str
    method: str
    id: RequestId = None
    params: dict[str, Any] | None = None
    has_id: bool = True  # False for notifications (no "id" member)


_encoder = msgspec.json.Encoder()


# What decoding a hostile line can raise besides DecodeError: RecursionError for deeply nested
# arrays/objects (a 2 KB line of "[[[[..."), and the conversions msgspec makes of strings and
# numbers. One place turns all of them into -32700, so none reaches a caller as an exception.
_DECODE_FAILURES = (msgspec.DecodeError, RecursionError, ValueError, OverflowError, MemoryError)


def decode_line(line: bytes) -> Any:
    """The JSON value of ``line``; RpcError(-32700) for anything that is not JSON edged can hold
    (never another exception: this runs on the daemon's loop, on bytes any client sent)."""
    try:
        return msgspec.json.decode(line)
    except RecursionError as exc:
        raise RpcError(PARSE_ERROR, "parse error: nested too deeply") from exc
    except _DECODE_FAILURES as exc:
        raise RpcError(PARSE_ERROR, f"parse error: {str(exc)[:200]}") from exc


def parse_request(line: bytes) -> Request:
    """Decode and validate one line; raises RpcError(-32700 or -32600) with the id if known."""
    obj = decode_line(line)
    if not isinstance(obj, dict):
        raise RpcError(INVALID_REQUEST, "a request must be a JSON object")
    rid = obj.get("id")
    if isinstance(rid, bool) or not isinstance(rid, (int, str, type(None))):
        raise RpcError(INVALID_REQUEST, "id must be a string, a number or null")
    if obj.get("jsonrpc") != "2.0":
        raise RpcError(INVALID_REQUEST, 'jsonrpc must be "2.0"', {"id": rid})
    method = obj.get("method")
    if not isinstance(method, str):
        raise RpcError(INVALID_REQUEST, "method must be a string", {"id": rid})
    params = obj.get("params")
    if params is not None and not isinstance(params, dict):
        raise RpcError(INVALID_PARAMS, "params must be an object (named parameters)", {"id": rid})
    return Request(jsonrpc="2.0", method=method, id=rid, params=params, has_id="id" in obj)


def request_id_of(line: bytes) -> RequestId:
    """The id of a request line, or None when it has none or does not parse (for replies to
    requests that are refused before they are dispatched)."""
    try:
        obj = decode_line(line)
    except RpcError:
        return None
    rid = obj.get("id") if isinstance(obj, dict) else None
    return rid if isinstance(rid, (int, str)) and not isinstance(rid, bool) else None


def encode_result(rid: RequestId, result: Any) -> bytes:
    return _encoder.encode({"jsonrpc": "2.0", "id": rid, "result": result}) + b"\n"


def encode_error(rid: RequestId, code: int, message: str, data: Any = None) -> bytes:
    error: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        error["data"] = data
    return _encoder.encode({"jsonrpc": "2.0", "id": rid, "error": error}) + b"\n"


def encode_notification(method: str, params: Any) -> bytes:
    return _encoder.encode({"jsonrpc": "2.0", "method": method, "params": params}) + b"\n"
