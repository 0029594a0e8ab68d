"""systemd integration without libsystemd: sd_notify, the watchdog and socket activation.

The protocols are small and stable, so edged speaks them directly instead of linking
libsystemd (which is absent on many embedded images and on Jetson minimal roots):

- **sd_notify** (``sd_notify(3)``): one datagram of newline-separated ``KEY=VALUE`` assignments,
  sent over an ``AF_UNIX``/``SOCK_DGRAM`` socket to ``$NOTIFY_SOCKET``. The address is a
  filesystem path (``/run/systemd/notify``) or, when it starts with ``@``, a name in the Linux
  abstract namespace.
- **the watchdog** (``sd_watchdog_enabled(3)``): ``$WATCHDOG_USEC`` is the interval after which
  systemd kills the service unless it has sent ``WATCHDOG=1``; ``$WATCHDOG_PID``, when set, says
  which process the variable is meant for.
- **socket activation** (``sd_listen_fds(3)``): ``$LISTEN_FDS`` descriptors starting at fd 3
  (``SD_LISTEN_FDS_START``), valid only when ``$LISTEN_PID`` is our pid; ``$LISTEN_FDNAMES``
  names them (``FileDescriptorName=`` in the socket unit, the unit's name by default).

Nothing here raises because systemd went away: the daemon's job is to protect the machine, and a
notify socket that disappears (systemd re-executing, a test harness closing) must not stop it.
A failure is logged once at WARNING per address and reason, then at DEBUG.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import math
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping, MutableMapping

__all__ = [
    "SD_LISTEN_FDS_START",
    "Notifier",
    "listen_fds",
    "listen_fds_with_names",
    "notify",
    "notify_address",
    "watchdog_interval_s",
]

log = logging.getLogger(__name__)

SD_LISTEN_FDS_START = 3
"""The first descriptor passed by socket activation (``SD_LISTEN_FDS_START`` in sd-daemon.h)."""

_LISTEN_VARS = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")
_SEND_TIMEOUT_S = 1.0
"""Bound on a blocked send: systemd's notify socket has a large queue, so blocking means PID 1 is
stuck, and then a late WATCHDOG=1 is worth nothing; the main loop must keep going."""

# (address, errno) pairs already reported at WARNING by the module-level notify().
_reported: set[tuple[str, int]] = set()
_reported_lock = threading.Lock()


def notify_address(environ: Mapping[str, str] | None = None) -> str | None:
    """The socket address ``sd_notify`` would use, or None when ``$NOTIFY_SOCKET`` is unset.

    A leading ``@`` becomes a NUL byte (abstract namespace). Anything that is neither an absolute
    path nor abstract is rejected (logged, None), as libsystemd rejects it with ``-EINVAL``;
    ``vsock:`` addresses (systemd 254+, for VMs) are not supported here.
    """
    env = os.environ if environ is None else environ
    value = env.get("NOTIFY_SOCKET", "")
    if not value:
        return None
    if value.startswith("@"):
        if len(value) < 2:
            _warn_once(value, errno.EINVAL, "NOTIFY_SOCKET=%r: empty abstract name", value)
            return None
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    _warn_once(
        value,
        errno.EINVAL,
        "NOTIFY_SOCKET=%r is neither an absolute path nor an abstract '@name'; ignored",
        value,
    )
    return None


def _warn_once(key: str, code: int, message: str, *args: object) -> bool:
    """Log at WARNING the first time (key, code) is seen, at DEBUG after; True if it warned."""
    with _reported_lock:
        first = (key, code) not in _reported
        _reported.add((key, code))
    log.log(logging.WARNING if first else logging.DEBUG, message, *args)
    return first


def _open_notify_socket() -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    sock.settimeout(_SEND_TIMEOUT_S)
    return sock


def _printable(address: str) -> str:
    return "@" + address[1:] if address.startswith("\0") else address


def notify(state: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send one sd_notify message (``"READY=1\\nSTATUS=up"``) to ``$NOTIFY_SOCKET``.

    Returns True when the datagram was sent, False when ``$NOTIFY_SOCKET`` is unset or invalid or
    the send failed. Never raises for a socket error; a failure is logged once per address and
    errno. Opens a socket per call, as ``sd_notify`` does; use :class:`Notifier` in a loop.
    """
    address = notify_address(environ)
    if address is None:
        return False
    with _open_notify_socket() as sock:
        return _send(sock, address, state, _warn_once)


def _send(
    sock: socket.socket,
    address: str,
    state: str,
    warn: Callable[..., bool],
) -> bool:
    payload = state.encode("utf-8")
    try:
        sent = sock.sendto(payload, address)
    except OSError as exc:
        code = exc.errno if exc.errno is not None else errno.EIO
        if isinstance(exc, TimeoutError):
            code = errno.ETIMEDOUT
        warn(
            _printable(address),
            code,
            "sd_notify to %s failed: %s (further failures of this kind logged at DEBUG)",
            _printable(address),
            exc,
        )
        return False
    if sent != len(payload):  # cannot happen for a datagram, but never report a partial send
        warn(_printable(address), errno.EMSGSIZE, "sd_notify to %s: short send", address)
        return False
    return True


def watchdog_interval_s(environ: Mapping[str, str] | None = None) -> float | None:
    """The watchdog interval in seconds, or None when the watchdog is off or not meant for us.

    Mirrors ``sd_watchdog_enabled(0, ...)``: ``$WATCHDOG_USEC`` must be a positive integer, and
    ``$WATCHDOG_PID``, if set, must be our pid (a child that inherited the environment must not
    think it owns the parent's watchdog). A malformed value is logged and treated as off.
    """
    env = os.environ if environ is None else environ
    usec_text = env.get("WATCHDOG_USEC")
    if not usec_text:
        return None
    try:
        usec = int(usec_text)
    except ValueError:
        log.warning("WATCHDOG_USEC=%r is not an integer; watchdog off", usec_text)
        return None
    if usec <= 0:
        log.warning("WATCHDOG_USEC=%r is not positive; watchdog off", usec_text)
        return None
    pid_text = env.get("WATCHDOG_PID")
    if pid_text:
        try:
            pid = int(pid_text)
        except ValueError:
            log.warning("WATCHDOG_PID=%r is not an integer; watchdog off", pid_text)
            return None
        if pid != os.getpid():
            log.debug("WATCHDOG_PID=%d is not our pid %d; watchdog off", pid, os.getpid())
            return None
    return usec / 1_000_000


def listen_fds_with_names(
    unset_environment: bool = True,
    environ: Mapping[str, str] | None = None,
) -> list[tuple[int, str]]:
    """The descriptors passed by socket activation, with their names, in order from fd 3.

    Follows ``sd_listen_fds_with_names(3)``: nothing unless ``$LISTEN_PID`` is our pid; each fd
    gets ``FD_CLOEXEC`` (so the workers and helpers edged spawns do not inherit the listening
    socket); with ``unset_environment`` the three ``LISTEN_*`` variables are removed whatever the
    outcome, so children do not misread them. The environment is ``os.environ`` by default
    (removal also calls ``unsetenv``); a given mapping is edited only if it is mutable.

    Names come from ``$LISTEN_FDNAMES`` (colon-separated); when it is absent every fd is named
    ``"unknown"``, as libsystemd does. A name count that does not match ``$LISTEN_FDS`` (libsystemd
    fails with ``-EINVAL``) is logged and the fds are kept, named ``"unknown"``: a daemon that
    received sockets should serve them rather than refuse to start. A number that is not an open
    descriptor is logged and skipped.
    """
    env: Mapping[str, str] = os.environ if environ is None else environ
    try:
        return _listen_fds_with_names(env)
    finally:
        if unset_environment and isinstance(env, MutableMapping):
            for name in _LISTEN_VARS:
                env.pop(name, None)


def _listen_fds_with_names(env: Mapping[str, str]) -> list[tuple[int, str]]:
    pid_text = env.get("LISTEN_PID")
    fds_text = env.get("LISTEN_FDS")
    if not pid_text or not fds_text:
        return []
    try:
        pid = int(pid_text)
        count = int(fds_text)
    except ValueError:
        log.warning("LISTEN_PID=%r LISTEN_FDS=%r: not integers; ignored", pid_text, fds_text)
        return []
    if pid != os.getpid():
        log.debug("LISTEN_PID=%d is not our pid %d; the fds are not ours", pid, os.getpid())
        return []
    if count <= 0:
        return []
    names_text = env.get("LISTEN_FDNAMES")
    names = names_text.split(":") if names_text is not None else ["unknown"] * count
    if len(names) != count:
        log.warning(
            "LISTEN_FDNAMES has %d names for LISTEN_FDS=%d; naming them all 'unknown'",
            len(names),
            count,
        )
        names = ["unknown"] * count
    result: list[tuple[int, str]] = []
    for offset, name in enumerate(names):
        fd = SD_LISTEN_FDS_START + offset
        try:
            flags = fcntl.fcntl(fd, fcntl.F_GETFD)
            if not flags & fcntl.FD_CLOEXEC:
                fcntl.fcntl(fd, fcntl.F_SETFD, flags | fcntl.FD_CLOEXEC)
        except OSError as exc:
            log.warning("LISTEN_FDS: fd %d (%s) is not usable: %s; skipped", fd, name, exc)
            continue
        result.append((fd, name))
    return result


def listen_fds(
    unset_environment: bool = True,
    environ: Mapping[str, str] | None = None,
) -> list[int]:
    """The descriptors passed by socket activation (fd 3 onwards); see listen_fds_with_names."""
    return [fd for fd, _ in listen_fds_with_names(unset_environment, environ)]


def _one_line(text: str) -> str:
    # A newline would start a new assignment: "STATUS=a\nREADY=1" must not be spoofable.
    return " ".join(text.splitlines())


class Notifier:
    """What the daemon tells systemd; every method is a no-op without ``$NOTIFY_SOCKET``.

    Keeps one unbound datagram socket and addresses each message with ``sendto``, so a notify
    socket that is recreated (systemd re-exec) is found again on the next message. Each method
    returns True when a datagram was sent. :meth:`watchdog` is rate-limited to one datagram per
    half watchdog interval, so the main loop can call it on every tick.
    """

    def __init__(
        self,
        environ: Mapping[str, str] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Read ``NOTIFY_SOCKET`` and the watchdog variables once; ``clock`` is for tests."""
        self._address = notify_address(environ)
        self.watchdog_interval_s: float | None = (
            watchdog_interval_s(environ) if self._address is not None else None
        )
        self._clock = clock
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._last_watchdog = -math.inf
        self._failing: set[int] = set()

    @property
    def enabled(self) -> bool:
        """True when there is a notify socket to talk to."""
        return self._address is not None

    def send(self, state: str) -> bool:
        """Send raw assignments (``"KEY=VALUE\\n..."``); False if disabled or the send failed."""
        if self._address is None:
            return False
        with self._lock:
            if self._sock is None:
                self._sock = _open_notify_socket()
            ok = _send(self._sock, self._address, state, self._warn)
            if ok and self._failing:
                log.info("sd_notify to %s works again", _printable(self._address))
                self._failing.clear()
            return ok

    def _warn(self, key: str, code: int, message: str, *args: object) -> bool:
        first = code not in self._failing
        self._failing.add(code)
        log.log(logging.WARNING if first else logging.DEBUG, message, *args)
        return first

    def ready(self, status: str | None = None) -> bool:
        """``READY=1`` (startup or a reload finished), with an optional status line."""
        return self.send("READY=1" + (f"\nSTATUS={_one_line(status)}" if status else ""))

    def status(self, text: str) -> bool:
        """``STATUS=...``: the one line ``systemctl status`` shows."""
        return self.send(f"STATUS={_one_line(text)}")

    def watchdog(self) -> bool:
        """``WATCHDOG=1``, at most once per half interval; False when skipped or off."""
        interval = self.watchdog_interval_s
        if interval is None:
            return False
        now = self._clock()
        if now - self._last_watchdog < interval / 2:
            return False
        # Stamp before sending: a failing socket must not turn every tick into a send attempt.
        self._last_watchdog = now
        return self.send("WATCHDOG=1")

    def stopping(self, status: str | None = None) -> bool:
        """``STOPPING=1``: shutdown has begun (restoring throttles may take a moment)."""
        return self.send("STOPPING=1" + (f"\nSTATUS={_one_line(status)}" if status else ""))

    def reloading(self, status: str | None = None) -> bool:
        """``RELOADING=1`` with ``MONOTONIC_USEC`` (CLOCK_MONOTONIC, as sd_notify(3) asks).

        Send :meth:`ready` when the reload is done, whether or not the new config was taken.
        """
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        line = f"RELOADING=1\nMONOTONIC_USEC={usec}"
        return self.send(line + (f"\nSTATUS={_one_line(status)}" if status else ""))

    def extend_timeout(self, seconds: float) -> bool:
        """``EXTEND_TIMEOUT_USEC``: ask for more time to start or stop (e.g. a long restore)."""
        return self.send(f"EXTEND_TIMEOUT_USEC={max(0, round(seconds * 1_000_000))}")

    def close(self) -> None:
        """Close the socket; a later message opens a new one."""
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None

    def __enter__(self) -> Notifier:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
