"""Classify processes into classes (critical, normal, besteffort): built-in defaults, refined
by the ``[[rules]]`` table.

Matching reads ``cmdline``, ``exe``, ``cgroup`` and ``oom_score_adj`` once, when a process is
first seen, never per tick. The first rule whose every given matcher matches decides; no match
means "unmatched" (the caller decides whether an unmatched process is watched at all).

Built-in classes (DESIGN section 4: every process is a candidate by default, and rules refine
the defaults, they never switch protection on). :func:`builtin_class` says ``critical`` for

- the init system and the services a machine cannot lose: the processes of ``init.scope``,
  ``systemd-*.service``, ``dbus*.service``, ``ssh(d).service`` and the getty units, and, by
  command name wherever they run (a machine without systemd, a container), ``systemd``,
  journald, logind, udevd, ``dbus-daemon``/``dbus-broker``, ``sshd`` (each session's too, so an
  operator keeps the shell they are fixing the machine from) and the gettys;
- a process whose ``oom_score_adj`` is -1000: the kernel's own "never kill this" mark, set by
  ``OOMScoreAdjust=-1000`` or by an operator.

A ``[[rules]]`` entry that names such a service wins over this (a user's explicit word). What no
rule can change: pid 1, kernel threads (never sampled), edged itself and its ancestors (the
sensor marks them, see :class:`~edged.sensors.processes.ProcessSensor`).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from edged.config import Rule

_UNIT_RE = re.compile(r"/([^/]+\.(?:service|scope))(?:/|$)")


@dataclass(frozen=True)
class ProcessInfo:
    """What is read once about a process when it is discovered."""

    pid: int
    name: str  # comm, at most 15 characters
    exe: str  # "" when unreadable (kernel thread, gone, or another user's without privilege)
    cmdline: str  # arguments joined by spaces
    uid: int
    cgroup: str  # unified (v2) path if any, else the memory controller's path
    start_ticks: int  # field 22 of stat: tells a reused pid from the process we knew
    oom_score_adj: int = 0  # -1000: the kernel never OOM-kills it, and nor does edged
    ppid: int = 0

    @property
    def unit(self) -> str | None:
        """The systemd unit (``foo.service`` / ``bar.scope``) the cgroup path names, if any."""
        units = _UNIT_RE.findall(self.cgroup)
        return units[-1] if units else None  # the innermost unit: a scope inside a service


def parse_stat_fields(raw: bytes) -> tuple[str, list[bytes]]:
    """(comm, fields after comm) of ``/proc/<pid>/stat``; comm may contain spaces and ')'."""
    left = raw.index(b"(")
    right = raw.rindex(b")")
    return raw[left + 1 : right].decode("utf-8", "replace"), raw[right + 2 :].split()


PF_KTHREAD = 0x00200000


def read_process_info(proc: Path, pid: int) -> ProcessInfo | None:
    """ProcessInfo of a live user-space process; None for kernel threads and vanished pids."""
    base = proc / str(pid)
    try:
        stat_raw = (base / "stat").read_bytes()
        uid = os.stat(base).st_uid
    except (FileNotFoundError, ProcessLookupError):
        return None
    comm, fields = parse_stat_fields(stat_raw)
    flags = int(fields[6])
    if flags & PF_KTHREAD:
        return None
    try:
        cmdline = (
            (base / "cmdline").read_bytes().replace(b"\0", b" ").strip().decode("utf-8", "replace")
        )
    except OSError:
        cmdline = ""
    try:
        exe = os.readlink(base / "exe")
    except OSError:
        exe = ""
    try:
        oom_score_adj = int((base / "oom_score_adj").read_bytes())
    except (OSError, ValueError):
        oom_score_adj = 0
    cgroup = ""
    try:
        for line in (base / "cgroup").read_text().splitlines():
            hid, controllers, path = line.split(":", 2)
            if hid == "0" and controllers == "":
                cgroup = path
                break
            if "memory" in controllers.split(",") and not cgroup:
                cgroup = path
    except (OSError, ValueError):
        pass
    return ProcessInfo(
        pid=pid,
        name=comm,
        exe=exe,
        cmdline=cmdline,
        uid=uid,
        cgroup=cgroup,
        start_ticks=int(fields[19]),
        oom_score_adj=oom_score_adj,
        ppid=int(fields[1]),
    )


# command names (comm, at most 15 characters: "systemd-journal" is journald) never acted on
CRITICAL_NAMES = frozenset(
    {
        "init",
        "systemd",
        "systemd-journal",
        "systemd-logind",
        "systemd-udevd",
        "systemd-oomd",
        "dbus-daemon",
        "dbus-broker",
        "dbus-broker-lau",
        "sshd",
        "sshd-session",  # OpenSSH 9.8+ splits each session into its own binary
        "agetty",
        "getty",
        "mingetty",
    }
)
_CRITICAL_UNIT_RE = re.compile(
    r"^(?:init\.scope|systemd-[^/]*\.service|dbus(?:-broker)?\.service|sshd?\.service"
    r"|(?:serial-|container-)?getty@[^/]*\.service|console-getty\.service)$"
)
NEVER_KILL_OOM_SCORE_ADJ = -1000


def builtin_class(info: ProcessInfo) -> str | None:
    """``critical`` for the init system's own units, journald, dbus, sshd, the gettys and a
    process the kernel is told never to OOM-kill; None (no opinion) otherwise."""
    if info.name in CRITICAL_NAMES or info.oom_score_adj <= NEVER_KILL_OOM_SCORE_ADJ:
        return "critical"
    unit = info.unit
    if unit is not None and _CRITICAL_UNIT_RE.match(unit):
        return "critical"
    return None


def ancestry(proc: Path, pid: int) -> frozenset[tuple[int, int]]:
    """(pid, start_ticks) of ``pid`` and each of its ancestors up to (not including) pid 1:
    edged and whatever started it (a shell, a supervisor) are never acted on."""
    found: set[tuple[int, int]] = set()
    while pid > 1 and len(found) < 64:
        try:
            raw = (proc / str(pid) / "stat").read_bytes()
        except OSError:
            break
        _comm, fields = parse_stat_fields(raw)
        found.add((pid, int(fields[19])))
        pid = int(fields[1])
    return frozenset(found)


class Classifier:
    """Compiled ``[[rules]]``."""

    def __init__(self, rules: list[Rule]) -> None:
        self._rules = [(rule, re.compile(rule.cmdline) if rule.cmdline else None) for rule in rules]

    def classify(self, info: ProcessInfo) -> str | None:
        """The class of the first matching rule, or None when no rule matches."""
        for rule, cmdline_re in self._rules:
            if rule.name is not None and rule.name != info.name:
                continue
            if rule.exe is not None and rule.exe != info.exe:
                continue
            if cmdline_re is not None and not cmdline_re.search(info.cmdline):
                continue
            if rule.uid is not None and rule.uid != info.uid:
                continue
            if rule.unit is not None and rule.unit != info.unit:
                continue
            if rule.cgroup is not None and not _under(info.cgroup, rule.cgroup):
                continue
            return rule.klass
        return None

    def classify_rule(self, info: ProcessInfo) -> tuple[str, int] | None:
        """(class, index in ``[[rules]]``) of the first matching rule, or None: what
        :meth:`classify` decides, with the index that tells which rule is doing something
        (status, the warning on a rule that matches nothing)."""
        for index in range(len(self._rules)):
            if self.matches(index, info):
                return self._rules[index][0].klass, index
        return None

    def matches(self, index: int, info: ProcessInfo) -> bool:
        """Whether every matcher of rule ``index`` matches, whatever the rules before it
        (``check-config`` tells a rule that matches nothing from one that earlier rules
        shadow). The same matchers as :meth:`classify` (tests hold the two equal)."""
        rule, cmdline_re = self._rules[index]
        if rule.name is not None and rule.name != info.name:
            return False
        if rule.exe is not None and rule.exe != info.exe:
            return False
        if cmdline_re is not None and not cmdline_re.search(info.cmdline):
            return False
        if rule.uid is not None and rule.uid != info.uid:
            return False
        if rule.unit is not None and rule.unit != info.unit:
            return False
        return rule.cgroup is None or _under(info.cgroup, rule.cgroup)


def _under(path: str, prefix: str) -> bool:
    prefix = prefix.rstrip("/")
    return path == prefix or path.startswith(prefix + "/") or prefix == ""
