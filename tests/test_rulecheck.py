"""Rules that say what they do: per-rule live match counts, the warning on a rule that matches
nothing (log, ``status``, ``check-config``), with what its matchers compare against.

The state machine is driven with synthetic times; the daemon and ``check-config`` run for real
against real child processes and the real /proc.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edged.config import Rule
from edged.rulecheck import COMM_LEN, RuleWatch, describe_rule, live_matches, rule_hint
from edged.sensors.base import Roots
from tests.daemon_util import start_daemon

NAME_HINT = (
    "name matches the command name (comm, 15 characters), not the unit or the executable path"
)


def test_describe_and_hint_say_what_the_matchers_compare_against() -> None:
    rule = Rule(name="postgres", uid=999, klass="critical")
    assert describe_rule(2, rule) == 'rule 2 (name="postgres", uid=999)'
    assert rule_hint(Rule(name="postgres")) == NAME_HINT
    assert "every matcher of a rule must match" in rule_hint(rule)
    assert "resolved executable path" in rule_hint(Rule(exe="/usr/bin/python3"))
    assert "regular expression" in rule_hint(Rule(cmdline="x"))
    assert "innermost systemd unit" in rule_hint(Rule(unit="postgresql.service"))
    assert describe_rule(0, Rule(cmdline='a"b')) == 'rule 0 (cmdline="a\\"b")'
    long = Rule(name="postgres-checkpointer")  # 21 characters: comm keeps 15
    assert len(long.name or "") > COMM_LEN
    hint = rule_hint(long)
    assert "can never match" in hint
    assert 'use name = "postgres-checkp"' in hint


def test_a_rule_is_warned_about_once_and_again_only_after_it_matched() -> None:
    rules = [Rule(name="postgres"), Rule(cmdline="worker", klass="besteffort")]
    watch = RuleWatch(rules, warn_after_s=60.0, now_s=1000.0)
    assert watch.observe({1: 3}, 1030.0) == []  # not yet 60 s
    warned = watch.observe({1: 3}, 1060.0)
    assert warned == [f'rule 0 (name="postgres") has matched no process for 60 s: {NAME_HINT}']
    assert watch.observe({1: 3}, 1200.0) == []  # once
    status = watch.status(1200.0)
    assert status[0] == {
        "index": 0,
        "rule": 'rule 0 (name="postgres")',
        "matchers": {"name": "postgres"},
        "class": "normal",
        "matched": 0,
        "unmatched_for_s": 200.0,
        "hint": NAME_HINT,
    }
    assert status[1]["matched"] == 3
    assert status[1]["unmatched_for_s"] == 0.0
    assert "hint" not in status[1]
    # it matches, then stops: the clock starts again and it is warned about again
    assert watch.observe({0: 1, 1: 3}, 1300.0) == []
    assert watch.status(1300.0)[0]["matched"] == 1
    assert watch.observe({1: 3}, 1301.0) == []
    assert watch.observe({1: 3}, 1359.0) == []
    assert len(watch.observe({1: 3}, 1361.0)) == 1
    # rule 1 stopped matching at 1361: its own 60 s
    assert watch.observe({}, 1420.0) == []
    assert watch.observe({}, 1421.0) == [
        'rule 1 (cmdline="worker") has matched no process for 60 s: '
        "cmdline is a regular expression searched in the arguments joined by spaces"
    ]


def test_inactive_watch_counts_but_never_warns() -> None:
    """With processes = "none" rules select nothing: counting them is still true, a warning
    would not be."""
    watch = RuleWatch([Rule(name="x")], warn_after_s=1.0, now_s=0.0, active=False)
    assert watch.observe({}, 100.0) == []
    assert watch.status(100.0)[0]["unmatched_for_s"] == 100.0


def test_start_warnings_name_a_name_that_can_never_match() -> None:
    rules = [Rule(name="short"), Rule(name="a-name-far-too-long-for-comm")]
    lines = RuleWatch(rules, 60.0, 0.0).start_warnings()
    assert len(lines) == 1
    assert lines[0].startswith('rule 1 (name="a-name-far-too-long-for-comm"): name ')
    assert "can never match" in lines[0]


@pytest.fixture
def sleepers() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for p in procs:
        p.kill()
        p.wait(timeout=10)


def named_sleeper(tmp_path: Path, name: str, procs: list[subprocess.Popen[bytes]]) -> int:
    """A real ``sleep 60`` whose comm is ``name`` (exec'd through a link of that name)."""
    link = tmp_path / name
    if not link.exists():
        link.symlink_to(shutil.which("sleep") or "/bin/sleep")
    p = subprocess.Popen([str(link), "60"])
    procs.append(p)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{p.pid}/comm").read_text().strip() != name[:COMM_LEN]:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    return p.pid


def test_live_matches_counts_first_match_and_alone(
    tmp_path: Path, sleepers: list[subprocess.Popen[bytes]]
) -> None:
    name = f"edged-lm{os.getpid() % 100000}"
    named_sleeper(tmp_path, name, sleepers)
    named_sleeper(tmp_path, name, sleepers)
    rules = [Rule(name=name), Rule(cmdline=f"/{name} 60"), Rule(name=name + "-nothing")]
    assert live_matches(Roots().proc, rules) == [(2, 2), (0, 2), (0, 0)]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EDGED_", "OTEL_"))}
    return subprocess.run(
        [sys.executable, "-m", "edged", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )


def test_check_config_says_how_many_processes_each_rule_matches(
    tmp_path: Path, sleepers: list[subprocess.Popen[bytes]]
) -> None:
    name = f"edged-cc{os.getpid() % 100000}"
    named_sleeper(tmp_path, name, sleepers)
    config = tmp_path / "edged.toml"
    config.write_text(
        f'[[rules]]\nname = "{name}"\nclass = "critical"\n'
        '[[rules]]\nname = "pg-no-such"\n'
        f'[[rules]]\ncmdline = "{name}"\n'
        '[[rules]]\nname = "a-very-long-process-name"\n'
    )
    result = run_cli("check-config", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert "[[rules]]" in result.stdout  # stdout is still the config
    lines = result.stderr.splitlines()
    assert f'edged: rule 0 (name="{name}") matches 1 process now (class critical)' in lines
    assert (
        f'edged: warning: rule 1 (name="pg-no-such") matches no process now: {NAME_HINT}' in lines
    )
    assert any(
        line.startswith(f'edged: warning: rule 2 (cmdline="{name}") matches no process now')
        and "taken by earlier rules" in line
        for line in lines
    ), lines
    assert any(
        line.startswith('edged: warning: rule 3 (name="a-very-long-process-name")')
        and "can never match" in line
        and "15 characters" in line
        for line in lines
    ), lines
    as_json = run_cli("check-config", "--config", str(config), "--json")
    assert as_json.returncode == 0
    assert json.loads(as_json.stdout)["rules"][0]["name"] == name  # stdout stays JSON


EXEC_AFTER_S = (
    "import os, sys, time; time.sleep(float(sys.argv[1])); os.execv(sys.argv[2], sys.argv[2:])"
)


def test_the_daemon_warns_on_a_rule_that_matches_nothing(
    tmp_path: Path, sleepers: list[subprocess.Popen[bytes]]
) -> None:
    """A real `edged run`: a rule that matches a live process is counted; one that matches
    nothing is logged once after rule_warn_after, with the hint, and shown in status; when a
    process it names appears (a python that execs into it: the name is refreshed after the
    exec) it is counted, and when that process ends it is warned about again."""
    alive = f"edged-da{os.getpid() % 100000}"
    later = f"edged-dl{os.getpid() % 100000}"
    named_sleeper(tmp_path, alive, sleepers)
    config = tmp_path / "edged.toml"
    config.write_text(
        '[sampling]\ninterval = "100ms"\nrescan = "200ms"\nrule_warn_after = "1s"\n'
        "[enforce]\ndry_run = true\n"
        f'[[rules]]\nname = "{alive}"\nclass = "besteffort"\n'
        f'[[rules]]\nname = "{later}"\n'
        '[[rules]]\nname = "a-very-long-process-name"\n'
    )
    daemon = start_daemon(
        tmp_path, "--config", str(config), env={"STATE_DIRECTORY": str(tmp_path / "state")}
    )
    warning = f'WARNING edged: rule 1 (name="{later}") has matched no process for 1 s: {NAME_HINT}'
    child: subprocess.Popen[bytes] | None = None
    try:
        assert 'rule 2 (name="a-very-long-process-name"): name ' in daemon.log()  # at start
        deadline = time.monotonic() + 15
        while daemon.log().count(warning) < 1:
            assert time.monotonic() < deadline, daemon.log()
            time.sleep(0.1)
        rules = daemon.call("status")["rules"]
        assert [r["matched"] for r in rules] == [1, 0, 0]
        assert rules[0]["class"] == "besteffort"
        assert rules[1]["unmatched_for_s"] >= 1.0
        assert rules[1]["hint"] == NAME_HINT
        text = run_cli("status", "--socket", str(daemon.socket_path)).stdout
        assert f'rule 0 (name="{alive}") besteffort: 1 process' in text, text
        assert f'rule 1 (name="{later}") normal: no process for ' in text, text

        # a process started as python, exec'ing into `later` 2.5 s on (settled by then)
        link = tmp_path / later
        link.symlink_to(shutil.which("sleep") or "/bin/sleep")
        child = subprocess.Popen([sys.executable, "-c", EXEC_AFTER_S, "2.5", str(link), "60"])
        while daemon.call("status")["rules"][1]["matched"] != 1:
            assert time.monotonic() < deadline + 10, daemon.log()
            time.sleep(0.1)
        time.sleep(1.5)
        assert daemon.log().count(warning) == 1  # matching: not warned about
        child.kill()
        child.wait()
        deadline = time.monotonic() + 15
        while daemon.log().count(warning) < 2:  # stopped matching: warned about again
            assert time.monotonic() < deadline, daemon.log()
            time.sleep(0.1)
        assert daemon.call("status")["rules"][1]["matched"] == 0
    finally:
        if child is not None and child.poll() is None:
            child.kill()
            child.wait()
        assert daemon.stop() == 0
