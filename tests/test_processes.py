"""The process sensor against real child processes: matching, memory, CPU, exit, pid reuse."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edged.config import Rule
from edged.rules import Classifier, read_process_info
from edged.sensors.base import Roots
from edged.sensors.processes import YOUNG_S, ProcessSensor

HOG = """
import sys, time
block = bytearray(int(sys.argv[1]) * 2**20)
for i in range(0, len(block), 4096):
    block[i] = 1
print("ready", flush=True)
end = time.monotonic() + float(sys.argv[2])
spin = sys.argv[3] == "spin"
while time.monotonic() < end:
    if not spin:
        time.sleep(0.05)
"""


@pytest.fixture
def children() -> Iterator[list[subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for p in procs:
        p.kill()
        p.wait(timeout=10)
        for pipe in (p.stdin, p.stdout):
            if pipe is not None:
                pipe.close()


def start(
    procs: list[subprocess.Popen[str]], mib: int, seconds: float, mode: str, tag: str
) -> subprocess.Popen[str]:
    p = subprocess.Popen(
        [sys.executable, "-c", HOG, str(mib), str(seconds), mode, tag],
        stdout=subprocess.PIPE,
        text=True,
    )
    procs.append(p)
    assert p.stdout is not None
    assert p.stdout.readline().strip() == "ready"
    return p


def test_rules_pick_processes_and_report_memory_and_cpu(
    children: list[subprocess.Popen[str]],
) -> None:
    tag = f"edged-test-{os.getpid()}"
    hog = start(children, 64, 30, "sleep", tag + "-hog")
    spinner = start(children, 1, 30, "spin", tag + "-spin")
    start(children, 1, 30, "sleep", "someone-else")
    rules = [
        Rule(cmdline=tag + "-hog", klass="besteffort"),
        Rule(cmdline=tag + "-spin", klass="normal"),
    ]
    sensor = ProcessSensor(Roots(), rules, mode="rules")
    sensor.read()
    assert set(sensor.watched) == {hog.pid, spinner.pid}  # the third matches no rule
    time.sleep(0.5)
    readings = sensor.read()
    rss = {
        r.attributes["process.pid"]: r.value for r in readings if r.metric == "process.memory.usage"
    }
    assert 64 * 2**20 <= rss[hog.pid] < 100 * 2**20
    user_cpu = {
        r.attributes["process.pid"]: r.value
        for r in readings
        if r.metric == "process.cpu.utilization" and r.attributes["cpu.mode"] == "user"
    }
    assert user_cpu[spinner.pid] > 0.5  # a spinning process uses most of a CPU
    assert user_cpu[hog.pid] < 0.2
    classes = {r.attributes["process.pid"]: r.attributes["edged.class"] for r in readings}
    assert classes == {hog.pid: "besteffort", spinner.pid: "normal"}
    assert all(str(r.attributes["process.executable.name"]).startswith("python") for r in readings)


def test_hurry_lists_proc_before_the_rescan_interval(
    children: list[subprocess.Popen[str]],
) -> None:
    """A process started after the last listing is seen within ``hurry``'s bound, not after
    ``rescan_s`` (the daemon hurries while memory is near or over a limit)."""
    tag = f"edged-hurry-{os.getpid()}"
    now = [100.0]
    sensor = ProcessSensor(Roots(), [Rule(cmdline=tag)], rescan_s=5.0, clock=lambda: now[0])
    sensor.read()  # the first listing
    late = start(children, 1, 30, "sleep", tag)
    now[0] += 0.2
    sensor.read()
    assert late.pid not in sensor.watched  # rescan_s has not passed
    sensor.hurry(0.1)
    now[0] += 0.05
    sensor.read()
    assert late.pid not in sensor.watched  # not before the bound either
    now[0] += 0.06
    sensor.read()
    assert late.pid in sensor.watched


RENAMES_ITSELF = """
import ctypes, sys, time
print("ready", flush=True)
time.sleep(0.4)
ctypes.CDLL(None).prctl(15, sys.argv[1].encode(), 0, 0, 0)  # PR_SET_NAME, as a program may
print("renamed", flush=True)
time.sleep(30)
"""


def test_a_young_process_is_judged_again_after_it_renames_itself(
    children: list[subprocess.Popen[str]],
) -> None:
    """Seen in its first moments a process may still carry its parent's name (a fork before
    exec) or rename itself as it starts: an unmatched young process is judged again at the next
    listing, so a rule on its final name still catches it."""
    name = f"edged-yng{os.getpid() % 100000}"
    p = subprocess.Popen(
        [sys.executable, "-c", RENAMES_ITSELF, name], stdout=subprocess.PIPE, text=True
    )
    children.append(p)
    assert p.stdout is not None
    assert p.stdout.readline().strip() == "ready"
    sensor = ProcessSensor(Roots(), [Rule(name=name)], mode="rules")
    sensor.rescan()
    assert p.pid not in sensor.watched  # still called python
    assert p.stdout.readline().strip() == "renamed"
    sensor.rescan()
    assert p.pid in sensor.watched
    assert sensor.watched[p.pid].info.name == name


BECOMES_ANOTHER = """
import ctypes, sys, time
ctypes.CDLL(None).prctl(15, sys.argv[2].encode(), 0, 0, 0)  # as a fork carries its parent's
print("ready", flush=True)
time.sleep(0.4)
ctypes.CDLL(None).prctl(15, sys.argv[1].encode(), 0, 0, 0)  # as it is after its exec
print("renamed", flush=True)
time.sleep(30)
"""


def test_a_watched_process_that_becomes_another_is_judged_again(
    children: list[subprocess.Popen[str]],
) -> None:
    """A fork carries its parent's name until it execs: seen then, it matched the parent's rule
    and class. When its name changes it is judged again: here it leaves the critical rule it
    matched and is taken by the rule on its new name."""
    parent = f"edged-par{os.getpid() % 100000}"
    child = f"edged-chl{os.getpid() % 100000}"
    p = subprocess.Popen(
        [sys.executable, "-c", BECOMES_ANOTHER, child, parent], stdout=subprocess.PIPE, text=True
    )
    children.append(p)
    assert p.stdout is not None
    assert p.stdout.readline().strip() == "ready"
    rules = [Rule(name=parent, klass="critical"), Rule(name=child, klass="besteffort")]
    sensor = ProcessSensor(Roots(), rules, mode="rules")
    sensor.rescan()
    assert sensor.watched[p.pid].klass == "critical"
    assert p.stdout.readline().strip() == "renamed"
    sensor.read()
    assert sensor.watched[p.pid].klass == "besteffort"
    assert sensor.watched[p.pid].info.name == child
    readings = sensor.read()
    mine = [r for r in readings if r.attributes["process.pid"] == p.pid]
    assert {r.attributes["edged.class"] for r in mine} == {"besteffort"}


def test_an_exited_process_is_dropped_without_error(children: list[subprocess.Popen[str]]) -> None:
    tag = f"edged-exit-{os.getpid()}"
    p = start(children, 1, 30, "sleep", tag)
    sensor = ProcessSensor(Roots(), [Rule(cmdline=tag)])
    sensor.read()
    assert p.pid in sensor.watched
    p.kill()
    p.wait()
    assert sensor.read() == []
    assert p.pid not in sensor.watched


def test_watch_adds_an_unmatched_pid_with_its_client(children: list[subprocess.Popen[str]]) -> None:
    p = start(children, 1, 30, "sleep", "unmatched")
    sensor = ProcessSensor(Roots(), [], mode="none")
    assert sensor.read() == []
    sensor.watch(p.pid, klass="besteffort", client="camera")
    mem = [r for r in sensor.read() if r.metric == "process.memory.usage"]
    assert mem[0].attributes["edged.client"] == "camera"
    assert mem[0].attributes["process.pid"] == p.pid
    sensor.unwatch(p.pid)
    assert sensor.read() == []
    sensor.watch(2**22 + 12345)  # no such pid: nothing sampled, nothing kept
    assert sensor.read() == []
    assert 2**22 + 12345 not in sensor.watched


def test_a_pid_watched_and_unwatched_between_reads_is_never_opened(
    children: list[subprocess.Popen[str]],
) -> None:
    """A lease granted and released between two ticks costs the sensor nothing, and a watch of
    a process that exits before the next read leaves no entry behind."""
    quick = start(children, 1, 30, "sleep", "quick")
    gone = start(children, 1, 30, "sleep", "gone")
    sensor = ProcessSensor(Roots(), [], mode="none")
    sensor.read()
    sensor.watch(quick.pid, klass="normal", client="c")
    sensor.unwatch(quick.pid)
    sensor.watch(gone.pid, klass="normal", client="c")
    gone.kill()
    gone.wait()
    assert sensor.read() == []
    assert sensor.watched == {}


def test_a_client_that_releases_and_asks_again_between_reads_keeps_its_files(
    children: list[subprocess.Popen[str]],
) -> None:
    """Unwatch then watch before the next read (a lease released and the next one granted
    within a tick) keeps the process sampled, with the same open files; an unwatch that is
    not taken back stops the sampling at the next read."""
    p = start(children, 1, 30, "sleep", "stepper")
    sensor = ProcessSensor(Roots(), [], mode="none")
    sensor.watch(p.pid, klass="normal", client="trainer")
    assert [
        r.attributes["process.pid"] for r in sensor.read() if r.metric == "process.memory.usage"
    ] == [p.pid]
    kept = sensor.watched[p.pid]
    sensor.unwatch(p.pid)
    sensor.watch(p.pid, klass="besteffort", client="trainer")
    mem = [r for r in sensor.read() if r.metric == "process.memory.usage"]
    assert sensor.watched[p.pid] is kept
    assert [r.attributes["edged.class"] for r in mem] == ["besteffort"]
    sensor.unwatch(p.pid)
    assert sensor.read() == []
    assert p.pid not in sensor.watched
    # asked again later (its entry parked meanwhile): sampled again, as what it is now
    sensor.watch(p.pid, klass="normal", client="trainer-2")
    mem = [r for r in sensor.read() if r.metric == "process.memory.usage"]
    assert [r.attributes["edged.client"] for r in mem] == ["trainer-2"]
    assert [r.attributes["process.pid"] for r in mem] == [p.pid]


def test_a_parked_entry_does_not_outlive_its_process(
    children: list[subprocess.Popen[str]],
) -> None:
    """A client that exits between two leases, its pid then watched again (reused, or a
    stale watch), yields nothing and leaves no entry: the start time is checked on read."""
    p = start(children, 1, 30, "sleep", "stepper")
    sensor = ProcessSensor(Roots(), [], mode="none")
    sensor.watch(p.pid)
    sensor.read()
    sensor.unwatch(p.pid)
    sensor.read()  # parked
    p.kill()
    p.wait()
    sensor.watch(p.pid)
    assert sensor.read() == []
    assert p.pid not in sensor.watched


def test_all_mode_skips_kernel_threads() -> None:
    sensor = ProcessSensor(Roots(), [], mode="all")
    sensor.read()
    assert os.getpid() in sensor.watched
    kthreads = [
        pid
        for pid in map(int, filter(str.isdigit, os.listdir("/proc")))
        if read_process_info(Roots().proc, pid) is None
    ]
    assert not set(kthreads) & set(sensor.watched)


def test_classifier_matchers() -> None:
    info = read_process_info(Roots().proc, os.getpid())
    assert info is not None
    assert Classifier([Rule(uid=os.getuid(), klass="critical")]).classify(info) == "critical"
    assert Classifier([Rule(uid=os.getuid() + 1)]).classify(info) is None
    assert Classifier([Rule(exe=info.exe, klass="besteffort")]).classify(info) == "besteffort"
    assert Classifier([Rule(name=info.name, cmdline="pytest|py")]).classify(info) == "normal"
    assert Classifier([Rule(cgroup=info.cgroup or "/")]).classify(info) == "normal"
    # first match wins
    assert (
        Classifier(
            [Rule(uid=os.getuid(), klass="besteffort"), Rule(uid=os.getuid(), klass="critical")]
        ).classify(info)
        == "besteffort"
    )


EXECS_LATER = """
import os, sys
print("ready", flush=True)
sys.stdin.readline()  # "go"
os.execv(sys.argv[1], [sys.argv[1], "30"])  # comm becomes the link's name
"""


def _age_s(pid: int) -> float:
    """Seconds since ``pid`` started, as /proc/uptime and its stat's start time say."""
    with open("/proc/uptime") as f:
        uptime_s = float(f.read().split()[0])
    stat = Path(f"/proc/{pid}/stat").read_text()
    start_ticks = int(stat.rsplit(")", 1)[1].split()[19])
    return uptime_s - start_ticks / os.sysconf("SC_CLK_TCK")


@pytest.mark.parametrize("mode", ["rules", "all"])
def test_a_process_that_execs_later_is_judged_by_its_new_name(
    children: list[subprocess.Popen[str]], tmp_path: Path, mode: str
) -> None:
    """A program started from a shell or a launcher is first seen by its parent's name
    (``bash``, ``python3``); after it execs, a rule on its real name must match it, in both
    modes: unmatched and settled (older than YOUNG_S, so not judged again for its youth) in
    "rules", watched as normal in "all". The child here is a real python that execs
    /bin/sleep through a link whose name becomes its comm."""
    name = f"edged-ex{os.getpid() % 100000}"
    link = tmp_path / name
    link.symlink_to(shutil.which("sleep") or "/bin/sleep")
    p = subprocess.Popen(
        [sys.executable, "-c", EXECS_LATER, str(link)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    children.append(p)
    assert p.stdout is not None
    assert p.stdin is not None
    assert p.stdout.readline().strip() == "ready"
    deadline = time.monotonic() + 10
    while _age_s(p.pid) < YOUNG_S + 0.2:  # settled: no longer judged again as a young one
        assert time.monotonic() < deadline
        time.sleep(0.05)
    now = [100.0]
    rules = [Rule(name=name, klass="besteffort")]
    sensor = ProcessSensor(Roots(), rules, mode=mode, rescan_s=5.0, clock=lambda: now[0])
    sensor.read()
    if mode == "rules":
        assert p.pid not in sensor.watched  # python3: no rule names it
    else:
        assert sensor.watched[p.pid].klass == "normal"
        assert sensor.watched[p.pid].rule is None
    assert sensor.rule_counts() == {}
    p.stdin.write("go\n")
    p.stdin.flush()
    while Path(f"/proc/{p.pid}/comm").read_text().strip() != name:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    sensor.read()  # "all": the name in stat changed, judged again at once
    now[0] += 5.0
    sensor.read()  # "rules": the next listing looks at the settled unmatched ones again
    watched = sensor.watched[p.pid]
    assert (watched.klass, watched.rule, watched.info.name) == ("besteffort", 0, name)
    assert watched.info.exe.endswith("/sleep")
    assert sensor.rule_counts() == {0: 1}
    readings = [r for r in sensor.read() if r.attributes["process.pid"] == p.pid]
    assert {r.attributes["edged.class"] for r in readings} == {"besteffort"}
    assert {r.attributes["process.executable.name"] for r in readings} == {name}


def test_classify_rule_decides_as_classify_and_names_the_rule() -> None:
    """classify_rule is classify plus the index of the deciding rule; matches is one rule's
    matchers alone, so a rule that earlier rules shadow still matches."""
    info = read_process_info(Roots().proc, os.getpid())
    assert info is not None
    rule_sets = [
        [Rule(uid=os.getuid() + 1), Rule(name=info.name, klass="besteffort")],
        [Rule(exe=info.exe, klass="critical"), Rule(uid=os.getuid())],
        [Rule(cmdline="no-such-thing-here"), Rule(cgroup="/no/such/group")],
        [Rule(name=info.name, cmdline="pytest|py", uid=os.getuid(), cgroup=info.cgroup or "/")],
    ]
    for rules in rule_sets:
        classifier = Classifier(rules)
        matched = classifier.classify_rule(info)
        assert (matched[0] if matched else None) == classifier.classify(info)
    assert Classifier(rule_sets[0]).classify_rule(info) == ("besteffort", 1)
    assert Classifier(rule_sets[1]).classify_rule(info) == ("critical", 0)
    assert Classifier(rule_sets[1]).matches(1, info)  # shadowed by rule 0, still matching
    assert Classifier(rule_sets[2]).classify_rule(info) is None
