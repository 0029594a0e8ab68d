"""The shipped unit files: `systemd-analyze verify`, the offline security score, and the settings
edged's work depends on (a hardening change that breaks cgroup writes must fail here, not on a
customer's box).

`verify` runs against a throwaway root (``--root``): the host's unit directory is copied in (for
sysinit.target and friends) and every program an ``Exec*=`` line names is a shim at the path
systemd would resolve, so verify checks the files exactly as shipped, ``ExecStart=edged run``
included, without edged being installed on the machine. Nothing here starts systemd.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, require

UNITS = REPO / "systemd"
SERVICE = UNITS / "edged.service"
SOCKET = UNITS / "edged.socket"
SYSUSERS = UNITS / "edged.sysusers.conf"
SLICE_DROPIN = UNITS / "system.slice.d" / "50-edged.conf"

# Exposure score of edged.service must stay at or below this ("OK" band is < 4.0 in systemd's
# scale; the shipped unit scores 2.8 with systemd 252). What keeps it from going lower is what
# edged is for: it runs as root, keeps CAP_KILL/CAP_SYS_NICE/CAP_SYS_RESOURCE/CAP_SYS_PTRACE,
# writes cgroupfs, reads all of /proc, opens /dev/nvidia* and talks to the network.
EXPOSURE_THRESHOLD = 3.0
HOST_UNIT_DIRS = (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system"))
# systemd's fixed search path for a bare ExecStart= name; a shim goes in the first.
BARE_NAME_DIR = "usr/local/bin"
TIMEOUT_S = 60
MEMORY_KEYS = ("MemoryMin", "MemoryHigh", "MemoryMax")


@pytest.fixture(scope="module")
def analyze() -> str:
    return require("systemd-analyze")


def _run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
        stdin=subprocess.DEVNULL,
    )


# ---- a minimal unit-file reader -----------------------------------------------------------


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """Sections -> key -> every value assigned, in order (units repeat keys; an empty value
    resets a list, which the callers that care handle). Continuation lines are joined."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    logical: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if pending:
            line = pending + " " + line
            pending = ""
        if line.endswith("\\"):
            pending = line[:-1].rstrip()
            continue
        logical.append(line)
    for line in logical:
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"assignment outside a section: {line!r}"
        key, sep, value = line.partition("=")
        assert sep, f"not an assignment: {line!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def _values(unit: dict[str, dict[str, list[str]]], section: str, key: str) -> list[str]:
    return unit.get(section, {}).get(key, [])


def _last(unit: dict[str, dict[str, list[str]]], section: str, key: str) -> str | None:
    values = _values(unit, section, key)
    return values[-1] if values else None


def _words(unit: dict[str, dict[str, list[str]]], section: str, key: str) -> set[str]:
    words: set[str] = set()
    for value in _values(unit, section, key):
        if not value:
            words.clear()
        words.update(value.split())
    return words


@pytest.fixture(scope="module")
def service() -> dict[str, dict[str, list[str]]]:
    return parse_unit(SERVICE.read_text())


@pytest.fixture(scope="module")
def socket_unit() -> dict[str, dict[str, list[str]]]:
    return parse_unit(SOCKET.read_text())


# ---- systemd-analyze verify ---------------------------------------------------------------


def _exec_programs(unit_text: str) -> list[str]:
    """The program of every Exec*= line, prefixes (-@:+!) removed."""
    programs = []
    for section in parse_unit(unit_text).values():
        for key, values in section.items():
            if key.startswith("Exec"):
                for value in values:
                    program = shlex.split(value)[0].lstrip("-@:+!")
                    programs.append(program)
    return programs


def make_root(base: Path, units: dict[str, str], *, shims: bool = True) -> Path:
    """A root for ``systemd-analyze --root``: host unit dir, our units, program shims."""
    host = next((d for d in HOST_UNIT_DIRS if (d / "sysinit.target").exists()), None)
    if host is None:
        pytest.skip("no systemd unit directory with sysinit.target on this machine")
    root = base / "root"
    shutil.copytree(host, root / "usr/lib/systemd/system", symlinks=True)
    etc = root / "etc/systemd/system"
    etc.mkdir(parents=True)
    for name, text in units.items():
        (etc / name).write_text(text)
        if not shims:
            continue
        for program in _exec_programs(text):
            rel = program.lstrip("/") if program.startswith("/") else f"{BARE_NAME_DIR}/{program}"
            shim = root / rel
            shim.parent.mkdir(parents=True, exist_ok=True)
            shim.write_text("#!/bin/sh\nexit 0\n")
            shim.chmod(0o755)
    return root


def verify(analyze: str, root: Path, *names: str) -> subprocess.CompletedProcess[str]:
    return _run([analyze, "verify", f"--root={root}", "--man=no", *names])


def test_verify_units_clean(analyze: str, tmp_path: Path) -> None:
    units = {"edged.service": SERVICE.read_text(), "edged.socket": SOCKET.read_text()}
    root = make_root(tmp_path, units)
    result = verify(analyze, root, "edged.service", "edged.socket")
    # verify exits 0 even for unknown keys and unparsable values; any message is a finding.
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_verify_slice_dropin_clean(analyze: str, tmp_path: Path) -> None:
    """The system.slice drop-in that makes edged.service's MemoryMin= effective loads clean
    (verify reads drop-ins under --root: a misspelt key there is reported too)."""
    units = {"edged.service": SERVICE.read_text(), "edged.socket": SOCKET.read_text()}
    root = make_root(tmp_path, units)
    dropin = root / "etc/systemd/system/system.slice.d" / SLICE_DROPIN.name
    dropin.parent.mkdir(parents=True)
    dropin.write_text(SLICE_DROPIN.read_text())
    result = verify(analyze, root, "system.slice", "edged.service")
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    dropin.write_text(SLICE_DROPIN.read_text().replace("MemoryMin=", "MemoryMn="))
    assert "MemoryMn" in verify(analyze, root, "system.slice").stderr


def test_verify_reports_a_typo(analyze: str, tmp_path: Path) -> None:
    """The check above can fail: a misspelt key is reported."""
    text = SERVICE.read_text().replace("ProtectSystem=strict", "ProtectSystme=strict")
    root = make_root(tmp_path, {"edged.service": text, "edged.socket": SOCKET.read_text()})
    result = verify(analyze, root, "edged.service")
    assert "ProtectSystme" in result.stderr


def test_verify_needs_the_program(analyze: str, tmp_path: Path) -> None:
    """Without a shim `edged` cannot be resolved in the fixed search path: verify fails."""
    units = {"edged.service": SERVICE.read_text(), "edged.socket": SOCKET.read_text()}
    root = make_root(tmp_path, units, shims=False)
    result = verify(analyze, root, "edged.service")
    assert result.returncode != 0
    assert "edged" in result.stderr


def test_execstart_is_a_bare_name(service: dict[str, dict[str, list[str]]]) -> None:
    """`edged` is found in /usr/local/bin (pip) or /usr/bin (packages) by systemd >= 239."""
    exec_start = _last(service, "Service", "ExecStart")
    assert exec_start is not None
    assert shlex.split(exec_start) == ["edged", "run"]


# ---- systemd-analyze security --offline -----------------------------------------------------

_SCORE = re.compile(r"Overall exposure level for (\S+): (\d+(?:\.\d+)?) (\w+)")


def exposure(analyze: str, unit: Path) -> float:
    result = _run([analyze, "security", "--offline=true", "--no-pager", str(unit)])
    assert result.returncode == 0, result.stderr
    match = _SCORE.search(result.stdout)
    assert match is not None, result.stdout[-2000:]
    return float(match.group(2))


def findings(analyze: str, unit: Path) -> dict[str, float]:
    """Each check that is not satisfied, with its exposure (``--json=short``, finer than the
    one-decimal overall score)."""
    result = _run([analyze, "security", "--offline=true", "--json=short", str(unit)])
    assert result.returncode == 0, result.stderr
    checks = json.loads(result.stdout)
    return {c["name"]: float(c["exposure"]) for c in checks if not c["set"] and c["exposure"]}


def within_threshold(analyze: str, unit: Path, threshold: float) -> bool:
    """systemd's own check: --threshold takes the score times ten."""
    cmd = [
        analyze,
        "security",
        "--offline=true",
        "--no-pager",
        f"--threshold={round(threshold * 10)}",
    ]
    return _run([*cmd, str(unit)]).returncode == 0


def _strip_hardening(text: str) -> str:
    """The unit without its hardening block (from the '# --- Hardening' banner to [Install])."""
    out, skipping = [], False
    for line in text.splitlines(keepends=True):
        if line.startswith("# --- Hardening"):
            skipping = True
        elif line.startswith("[Install]"):
            skipping = False
        if not skipping:
            out.append(line)
    stripped = "".join(out)
    assert stripped != text, "hardening banner not found in edged.service"
    return stripped


def test_security_exposure_within_threshold(analyze: str) -> None:
    score = exposure(analyze, SERVICE)
    assert score <= EXPOSURE_THRESHOLD, f"edged.service exposure {score} > {EXPOSURE_THRESHOLD}"
    assert within_threshold(analyze, SERVICE, EXPOSURE_THRESHOLD)


def test_security_fails_without_hardening(analyze: str, tmp_path: Path) -> None:
    """The check above can fail: the same unit without its hardening block is far worse."""
    bare = tmp_path / "edged.service"
    bare.write_text(_strip_hardening(SERVICE.read_text()))
    score = exposure(analyze, bare)
    assert score > EXPOSURE_THRESHOLD + 4, score
    assert not within_threshold(analyze, bare, EXPOSURE_THRESHOLD)


@pytest.mark.parametrize(
    "key",
    [
        "CapabilityBoundingSet",
        "SystemCallFilter",
        "ProtectSystem",
        "ProtectKernelTunables",
        "RestrictAddressFamilies",
        "RestrictNamespaces",
        "MemoryDenyWriteExecute",
        "NoNewPrivileges",
        "PrivateTmp",
        "ProtectKernelModules",
        "LockPersonality",
    ],
)
def test_each_hardening_line_counts(analyze: str, tmp_path: Path, key: str) -> None:
    """Removing any one of the main settings adds a finding: none is a silent no-op."""
    text = SERVICE.read_text()
    without = "".join(
        line for line in text.splitlines(keepends=True) if not line.startswith(f"{key}=")
    )
    assert without != text, f"{key}= not in edged.service"
    copy = tmp_path / "edged.service"
    copy.write_text(without)
    before, after = findings(analyze, SERVICE), findings(analyze, copy)
    assert set(before) < set(after), f"removing {key}= changed nothing"
    assert sum(after.values()) > sum(before.values())


# ---- what edged needs must survive the hardening --------------------------------------------


def test_service_basics(service: dict[str, dict[str, list[str]]]) -> None:
    assert _last(service, "Service", "Type") == "notify"
    assert _last(service, "Service", "NotifyAccess") == "main"
    assert _last(service, "Service", "WatchdogSec") == "30s"
    assert _last(service, "Service", "Restart") == "on-failure"
    assert _last(service, "Service", "KillMode") == "mixed"
    assert _last(service, "Service", "ExecReload") == "/bin/kill -HUP $MAINPID"
    assert _last(service, "Service", "StateDirectory") == "edged"
    assert _last(service, "Service", "ConfigurationDirectory") == "edged"
    assert "edged.socket" in _words(service, "Unit", "Requires")
    assert "edged.socket" in _words(service, "Unit", "After")
    # /run/edged belongs to the socket unit: a RuntimeDirectory= would be deleted on stop.
    assert "RuntimeDirectory" not in service["Service"]
    # bad config (exit 6) does not restart in a loop
    assert "6" in _words(service, "Service", "RestartPreventExitStatus")


def test_service_keeps_what_edged_needs(service: dict[str, dict[str, list[str]]]) -> None:
    caps = _words(service, "Service", "CapabilityBoundingSet")
    assert caps == {
        "CAP_KILL",
        "CAP_SYS_NICE",
        "CAP_SYS_RESOURCE",
        "CAP_SYS_PTRACE",
        "CAP_IPC_LOCK",
    }
    assert "User" not in service["Service"]  # root: cgroupfs, RAPL, D-Bus
    assert _last(service, "Service", "ProtectControlGroups") == "no"
    assert "/sys/fs/cgroup" in _words(service, "Service", "ReadWritePaths")
    assert _last(service, "Service", "PrivateDevices") in (None, "no")
    assert "char-nvidia*" in _words(service, "Service", "DeviceAllow")
    # closed, not the default auto: with a DeviceAllow= list, auto denies /dev/null and friends.
    assert _last(service, "Service", "DevicePolicy") == "closed"
    assert _last(service, "Service", "PrivateNetwork") in (None, "no")
    assert _last(service, "Service", "ProtectProc") in (None, "default")
    assert _last(service, "Service", "ProcSubset") in (None, "all")
    assert {"AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK"} <= _words(
        service, "Service", "RestrictAddressFamilies"
    )
    filters = _values(service, "Service", "SystemCallFilter")
    allowed = {w for v in filters if not v.startswith("~") for w in v.split()}
    denied = {w for v in filters if v.startswith("~") for w in v[1:].split()}
    assert "@system-service" in allowed  # kill, setpriority, sched_setaffinity, ioctl, pidfd_*
    assert not {"@resources", "@signal", "@process", "@network-io"} & denied
    assert {"@debug", "process_vm_readv", "process_vm_writev"} <= denied
    assert _last(service, "Service", "SystemCallErrorNumber") == "EPERM"


def service_capabilities() -> set[str]:
    """CapabilityBoundingSet= of the shipped edged.service."""
    return _words(parse_unit(SERVICE.read_text()), "Service", "CapabilityBoundingSet")


def setpriv_caps(caps: set[str]) -> list[str]:
    """setpriv(1) arguments for a root process with only ``caps`` left, as the unit sets it up."""
    keep = ",".join(["-all", *sorted("+" + c.removeprefix("CAP_").lower() for c in caps)])
    return [require("setpriv"), f"--bounding-set={keep}", "--inh-caps=-all", "--no-new-privs"]


_READLINK = """
import os, sys
try:
    print(os.readlink(sys.argv[1]))
except OSError as e:
    print(e.errno)
"""


@pytest.mark.root
def test_capabilities_read_exe_of_other_users(service: dict[str, dict[str, list[str]]]) -> None:
    """Why CAP_SYS_PTRACE is kept: without it root cannot read /proc/<pid>/exe of another user's
    process (nor of a root process with more capabilities), so exe rules could not match."""
    caps = _words(service, "Service", "CapabilityBoundingSet")
    setpriv = require("setpriv")
    sleeper = subprocess.Popen(
        [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", "sleep", "60"],
        stdin=subprocess.DEVNULL,
    )
    try:
        exe = f"/proc/{sleeper.pid}/exe"
        deadline = time.monotonic() + TIMEOUT_S
        while Path(f"/proc/{sleeper.pid}/comm").read_text().strip() != "sleep":  # exec done
            assert time.monotonic() < deadline
            time.sleep(0.01)

        def readlink_with(keep: set[str]) -> str:
            cmd = [*setpriv_caps(keep), sys.executable, "-c", _READLINK, exe]
            result = _run(cmd)
            assert result.returncode == 0, result.stderr
            return result.stdout.strip()

        assert readlink_with(caps).endswith("/sleep")
        assert readlink_with(caps - {"CAP_SYS_PTRACE"}) == str(errno.EACCES)
    finally:
        os.kill(sleeper.pid, signal.SIGKILL)
        sleeper.wait(timeout=TIMEOUT_S)


_MDWE_PROBE = """
import ctypes, errno, mmap, sys
libc = ctypes.CDLL(None, use_errno=True)
PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1
if libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
    print("unsupported", ctypes.get_errno())
    sys.exit(0)
try:  # the policy is really on
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    print("not enforced")
    sys.exit(0)
except PermissionError:
    pass
import edged.cli, edged.daemon, edged.telemetry, edged.systemd
import opentelemetry.sdk.metrics
import opentelemetry.exporter.otlp.proto.http.metric_exporter
import opentelemetry.exporter.prometheus
import psutil, msgspec
callback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int)(lambda x: x + 1)
assert callback(41) == 42
try:
    import pynvml
    pynvml.nvmlInit()
    count = pynvml.nvmlDeviceGetCount()
    for i in range(count):
        h = pynvml.nvmlDeviceGetHandleByIndex(i)
        pynvml.nvmlDeviceGetMemoryInfo(h)
        pynvml.nvmlDeviceGetPowerUsage(h)
    pynvml.nvmlShutdown()
    print("ok nvml", count)
except ImportError:
    print("ok")
except pynvml.NVMLError as exc:
    print("ok no-nvml", exc)
"""


def test_memory_deny_write_execute_is_safe_for_edged() -> None:
    """MemoryDenyWriteExecute=yes is emulated with prctl(PR_SET_MDWE) (Linux >= 6.3, same rule:
    no W+X mapping, no exec gained later): edged's imports, a ctypes callback (libffi) and,
    where a GPU is present, NVML calls must all work under it."""
    result = _run([sys.executable, "-c", _MDWE_PROBE])
    assert result.returncode == 0, result.stderr
    out = result.stdout.strip()
    if out.startswith(("unsupported", "not enforced")):
        pytest.skip(f"PR_SET_MDWE not available on this kernel ({out})")
    assert out.startswith("ok"), out


def test_service_limits_its_own_cost(service: dict[str, dict[str, list[str]]]) -> None:
    assert _last(service, "Service", "MemoryHigh") == "128M"
    assert _last(service, "Service", "MemoryMax") == "256M"
    # kept resident (edged.memlock): mlockall needs CAP_IPC_LOCK or an unlimited rlimit,
    # and on v2 reclaim spares the group below MemoryMin (protected in system.slice too)
    assert _last(service, "Service", "LimitMEMLOCK") == "infinity"
    assert _last(service, "Service", "MemoryMin") == "64M"
    assert "CAP_IPC_LOCK" in _words(service, "Service", "CapabilityBoundingSet")
    slice_min = _last(parse_unit(SLICE_DROPIN.read_text()), "Slice", "MemoryMin")
    assert slice_min == _last(service, "Service", "MemoryMin")
    from edged.config import parse_size_bytes

    sizes = [parse_size_bytes(_last(service, "Service", k) or "") for k in MEMORY_KEYS]
    assert sizes == sorted(sizes)
    assert len(set(sizes)) == 3, sizes  # MemoryMin < MemoryHigh < MemoryMax
    assert _last(service, "Service", "OOMScoreAdjust") == "-900"
    assert _last(service, "Service", "CPUQuota") == "50%"


def test_socket_matches_the_protocol_contract(
    socket_unit: dict[str, dict[str, list[str]]],
) -> None:
    from edged.server.server import default_socket_path

    listen = _values(socket_unit, "Socket", "ListenStream")
    assert listen == ["/run/edged/edged.sock"]
    if default_socket_path({}).is_relative_to("/run"):  # the daemon's root default agrees
        assert str(default_socket_path({})) == listen[0]
    assert _last(socket_unit, "Socket", "SocketMode") == "0660"
    assert _last(socket_unit, "Socket", "SocketGroup") == "edged"
    assert _last(socket_unit, "Socket", "DirectoryMode") == "0755"
    assert _last(socket_unit, "Socket", "Accept") in (None, "no")
    assert "sockets.target" in _words(socket_unit, "Install", "WantedBy")


def test_sysusers_creates_the_socket_group(socket_unit: dict[str, dict[str, list[str]]]) -> None:
    """SocketGroup= must name a group that exists, or the socket unit fails to start."""
    groups = {
        fields[1]
        for line in SYSUSERS.read_text().splitlines()
        if (fields := line.split()) and not line.startswith("#") and fields[0] == "g"
    }
    assert _last(socket_unit, "Socket", "SocketGroup") in groups
    assert "edged-admin" in groups
