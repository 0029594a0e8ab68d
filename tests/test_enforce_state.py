"""The state file and the enforcer's bookkeeping, without touching any process."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from edged.enforce.enforcer import DEFAULT_REACTION_TIME_S, Enforcer, Outcome, Status
from edged.enforce.restore import (
    GroupRecord,
    StateStore,
    StoppedRecord,
    restore_all,
    state_directory,
)
from edged.enforce.signals import NoSuchProcess, Signaller, read_start_ticks
from edged.policy.base import Action, ActionKind, ProcessClass, Resource


def test_store_round_trips_and_writes_atomically(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state")
    assert store.data.empty()
    record = store.group("edged/pid-10")
    record.origins["10"] = {"memory": "/a", "cpu": "/"}
    record.frozen = True
    record.cpu_quota_cores = 0.5
    store.data.stopped["11"] = StoppedRecord(start_ticks=99)
    store.save()
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == ["imposed.json"]  # no temp
    again = StateStore(tmp_path / "state")
    assert again.data == store.data
    assert again.group_of(10) == "edged/pid-10"
    assert again.group_of(11) is None
    again.clear()
    assert StateStore(tmp_path / "state").data.empty()


def test_unreadable_file_is_moved_aside(tmp_path: Path) -> None:
    (tmp_path / "imposed.json").write_text("{not json")
    store = StateStore(tmp_path)
    assert store.data.empty()
    assert (tmp_path / "imposed.bad").read_text() == "{not json"


def test_state_directory_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STATE_DIRECTORY", "/run/a:/run/b")
    assert state_directory() == Path("/run/a")
    monkeypatch.delenv("STATE_DIRECTORY")
    assert state_directory() == Path("/var/lib/edged")


def test_restore_tolerates_vanished_pids_and_groups(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.data.stopped["999999999"] = StoppedRecord(start_ticks=1)  # no such pid
    store.data.groups["edged/pid-1"] = GroupRecord(frozen=True, cpu_quota_cores=1.0)
    store.save()
    # no backend at all: SIGSTOPs are undone (none here can be), groups are forgotten
    assert restore_all(StateStore(tmp_path), None, Signaller()) == 0
    assert StateStore(tmp_path).data.empty()
    assert restore_all(StateStore(tmp_path), None, Signaller()) == 0


def test_group_record_throttled() -> None:
    assert not GroupRecord(frozen=True).throttled()
    assert GroupRecord(memory_high_bytes=1).throttled()
    assert GroupRecord(memory_max_bytes=1).throttled()


def test_outcomes_and_default_reaction_time(tmp_path: Path) -> None:
    enf = Enforcer(None, Signaller(), StateStore(tmp_path), False, lambda _a: True)
    assert enf.reaction_time_s == DEFAULT_REACTION_TIME_S
    assert Outcome.done(0.01).reaction_s == 0.01
    failed = Outcome.failed(NoSuchProcess(5, "kill", "process has exited"))
    assert failed.status is Status.FAILED
    assert failed.reason == "kill pid=5: process has exited"
    # NOTIFY belongs to the server; pid 1 is refused before anything is read or recorded
    start = read_start_ticks(1) or 1
    for kind, pid in [(ActionKind.NOTIFY, 1), (ActionKind.KILL, 1), (ActionKind.KILL, os.getpid())]:
        action = Action(kind, pid, Resource.MEMORY, "t", "t", ProcessClass.NORMAL, start)
        assert enf.apply(action).status is Status.SKIPPED
    assert not (tmp_path / "imposed.json").exists()
