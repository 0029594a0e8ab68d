"""Rules that say what they do: which ``[[rules]]`` entry matches how many live processes, and
a warning, with a hint, for one that matches none.

``name = "postgres"`` reads like a label but matches the command name (comm, at most 15
characters), and a rule that matches nothing is otherwise silent. The daemon keeps, per rule,
how many sampled processes it classifies (:meth:`ProcessSensor.rule_counts`) and since when it
has classified none (:class:`RuleWatch`); a rule unmatched for ``[sampling] rule_warn_after``
is logged once, with what its matchers compare against, and again only after it matched
something and then stopped. ``edged check-config`` reads /proc once and reports the same per
rule (:func:`live_matches`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edged.config import Rule
from edged.rules import Classifier, read_process_info

#: The kernel keeps a process's name (comm, ``/proc/PID/stat``) in 16 bytes with the NUL
#: (TASK_COMM_LEN): a longer ``name`` can never match.
COMM_LEN = 15
_MATCHERS = ("name", "exe", "cmdline", "uid", "unit", "cgroup")


def matchers_of(rule: Rule) -> dict[str, str | int]:
    """The matchers a rule gives, by their TOML keys (``{"name": "postgres"}``)."""
    return {k: v for k in _MATCHERS if (v := getattr(rule, k)) is not None}


def describe_rule(index: int, rule: Rule) -> str:
    """``rule 2 (name="postgres", uid=999)``: the rule by its index in ``[[rules]]`` and the
    matchers it gives, as a log line or ``edged status`` names it."""
    given = [
        f"{key}={value}" if isinstance(value, int) else f"{key}={_quoted(value)}"
        for key, value in matchers_of(rule).items()
    ]
    return f"rule {index} ({', '.join(given)})"


def _quoted(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def name_too_long(rule: Rule) -> bool:
    """Whether the rule's ``name`` is longer than a comm can be (it can never match)."""
    return rule.name is not None and len(rule.name.encode()) > COMM_LEN


def rule_hint(rule: Rule) -> str:
    """What the rule's matchers compare against: the usual reason a rule matches nothing is a
    matcher read as a label (``name = "postgres"`` for a unit or an executable path)."""
    hints = []
    if rule.name is not None:
        if name_too_long(rule):
            hints.append(
                f"name {_quoted(rule.name)} is {len(rule.name.encode())} bytes and can never "
                f"match: the kernel keeps {COMM_LEN} characters of the command name (comm); "
                f"use name = {_quoted(rule.name.encode()[:COMM_LEN].decode(errors='ignore'))}"
                " or a cmdline or exe matcher"
            )
        else:
            hints.append(
                f"name matches the command name (comm, {COMM_LEN} characters), not the unit "
                "or the executable path"
            )
    if rule.exe is not None:
        hints.append(
            "exe matches the resolved executable path exactly (/proc/PID/exe: symlinks "
            "resolved, such as /usr/bin/python3.11 for /usr/bin/python3)"
        )
    if rule.cmdline is not None:
        hints.append("cmdline is a regular expression searched in the arguments joined by spaces")
    if rule.uid is not None:
        hints.append("uid is the numeric owner of /proc/PID")
    if rule.unit is not None:
        hints.append(
            "unit matches the innermost systemd unit in the process's cgroup path, "
            "such as foo.service"
        )
    if rule.cgroup is not None:
        hints.append("cgroup is a prefix of the cgroup path as /proc/PID/cgroup writes it")
    if sum(getattr(rule, key) is not None for key in _MATCHERS) > 1:
        hints.append("every matcher of a rule must match")
    return "; ".join(hints)


@dataclass
class _RuleState:
    since_s: float  # when it last classified a process (or when watching began)
    matched: int = 0  # processes it classifies at the last observation
    warned: bool = False  # the warning was logged since it last matched


class RuleWatch:
    """Per ``[[rules]]`` entry: how many processes it classifies, and since when none.

    ``observe`` returns the warnings to log now: a rule that has classified no process for
    ``warn_after_s`` is reported once, and again only after it matched and then stopped.
    ``active`` False (``[sampling] processes = "none"``: rules select nothing) keeps the
    counts but never warns."""

    def __init__(
        self, rules: list[Rule], warn_after_s: float, now_s: float, *, active: bool = True
    ) -> None:
        self.rules = list(rules)
        self.warn_after_s = warn_after_s
        self.active = active
        self._states = [_RuleState(since_s=now_s) for _ in self.rules]

    def start_warnings(self) -> list[str]:
        """What is wrong with a rule before any process is seen: a name that can never match."""
        return [
            f"{describe_rule(i, rule)}: {rule_hint(rule)}"
            for i, rule in enumerate(self.rules)
            if name_too_long(rule)
        ]

    def observe(self, counts: Mapping[int, int], now_s: float) -> list[str]:
        """Take the per-rule counts of this moment; the warnings to log now."""
        out: list[str] = []
        for i, (rule, state) in enumerate(zip(self.rules, self._states, strict=True)):
            state.matched = counts.get(i, 0)
            if state.matched:
                state.since_s, state.warned = now_s, False
            elif self.active and not state.warned and now_s - state.since_s >= self.warn_after_s:
                state.warned = True
                out.append(
                    f"{describe_rule(i, rule)} has matched no process for "
                    f"{self.warn_after_s:g} s: {rule_hint(rule)}"
                )
        return out

    def status(self, now_s: float) -> list[dict[str, Any]]:
        """The ``rules`` list of the ``status`` result: per rule its index, description,
        matchers, class, ``matched`` (processes it classifies now) and ``unmatched_for_s``
        (0 while it matches), with the ``hint`` while it matches nothing."""
        out: list[dict[str, Any]] = []
        for i, (rule, state) in enumerate(zip(self.rules, self._states, strict=True)):
            entry: dict[str, Any] = {
                "index": i,
                "rule": describe_rule(i, rule),
                "matchers": {
                    k: getattr(rule, k) for k in _MATCHERS if getattr(rule, k) is not None
                },
                "class": rule.klass,
                "matched": state.matched,
                "unmatched_for_s": 0.0 if state.matched else round(now_s - state.since_s, 1),
            }
            if not state.matched:
                entry["hint"] = rule_hint(rule)
            out.append(entry)
        return out


def live_matches(proc: Path, rules: list[Rule]) -> list[tuple[int, int]]:
    """Per rule, read from /proc once: (processes it classifies, first match winning;
    processes its matchers match, whatever the rules before it). Kernel threads are never
    matched, as in the daemon."""
    classifier = Classifier(rules)
    classified = [0] * len(rules)
    alone = [0] * len(rules)
    for entry in os.listdir(proc):
        if not entry.isdigit():
            continue
        try:
            info = read_process_info(proc, int(entry))
        except (OSError, ValueError, IndexError):  # gone while read, or not readable
            continue
        if info is None:
            continue
        first = classifier.classify_rule(info)
        if first is not None:
            classified[first[1]] += 1
        for i in range(len(rules)):
            if classifier.matches(i, info):
                alone[i] += 1
    return list(zip(classified, alone, strict=True))
