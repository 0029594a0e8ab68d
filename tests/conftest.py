"""Shared fixtures and the markers that skip where this machine lacks a part."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"
# ../shared beside the checkout (DESIGN: "with ../shared beside it"); EDGED_SHARED overrides.
SHARED = Path(os.environ.get("EDGED_SHARED", REPO.parent / "shared"))
FIXTURES = SHARED / "fixtures"


def _cgroup_v1_writable() -> bool:
    return os.geteuid() == 0 and os.access("/sys/fs/cgroup/memory/cgroup.procs", os.W_OK)


def _has_nvidia() -> bool:
    try:
        import pynvml

        pynvml.nvmlInit()
        pynvml.nvmlShutdown()
    except Exception:
        return False
    return True


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reasons = {
        "root": None if os.geteuid() == 0 else "needs root",
        "cgroup_v1": None if _cgroup_v1_writable() else "needs writable cgroup v1 controllers",
        "jetson": None if Path("/etc/nv_tegra_release").exists() else "not a Jetson board",
    }
    nvidia_checked = False
    for item in items:
        for name, reason in reasons.items():
            if reason and item.get_closest_marker(name):
                item.add_marker(pytest.mark.skip(reason=reason))
        if item.get_closest_marker("nvidia"):
            if not nvidia_checked:
                reasons_nvidia = None if _has_nvidia() else "no NVIDIA GPU/driver on this machine"
                nvidia_checked = True
            if reasons_nvidia:
                item.add_marker(pytest.mark.skip(reason=reasons_nvidia))


_LINK_RE = re.compile(rb"[\w@.:+-]+(/[\w@.:+-]+)*")


def restore_symlinks(tree: Path) -> int:
    """Turn flattened links back into symlinks; returns how many.

    The shared fixture trees reach us with their symlinks stored as small regular files whose
    whole content is the link target (``../cpufreq/policy0``, no newline). Real sysfs
    attributes end in a newline and device-tree properties in a NUL, so a short file whose
    content is a bare ``../`` path is a flattened link. Real links are left as they are.
    """
    restored = 0
    for dirpath, _dirs, files in os.walk(tree):  # followlinks=False: trees have link cycles
        for name in files:
            path = Path(dirpath) / name
            if path.is_symlink() or path.stat().st_size > 4096:
                continue
            raw = path.read_bytes()
            if not raw or b"\n" in raw or b"\0" in raw or not _LINK_RE.fullmatch(raw):
                continue
            # "../x" is always a link here; a bare "x/y" only if it names something beside it
            if not raw.startswith(b"../") and not (path.parent / raw.decode()).exists():
                continue
            path.unlink()
            path.symlink_to(raw.decode())
            restored += 1
    return restored


FixtureTree = Callable[[str], Path]


@pytest.fixture
def fixture_tree(tmp_path: Path) -> FixtureTree:
    """Copy a tree from the shared fixtures, with its symlinks (and their cycles) restored."""

    def copy(relative: str) -> Path:
        src = FIXTURES / relative
        if not src.exists():
            pytest.skip(f"shared fixture {src} not present")
        dst = tmp_path / uuid.uuid4().hex[:8]
        shutil.copytree(src, dst, symlinks=True)
        for dirpath, _dirs, files in os.walk(dst):  # the shared copy is read-only
            os.chmod(dirpath, 0o755)
            for name in files:
                if not os.path.islink(os.path.join(dirpath, name)):
                    os.chmod(os.path.join(dirpath, name), 0o644)
        restore_symlinks(dst)
        return dst

    return copy


def require(binary: str) -> str:
    """Path of a program the test needs; fails (not skips) in CI, where .ci/run installs it."""
    path = shutil.which(binary)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{binary} not installed; .ci/run must install it")
        pytest.skip(f"{binary} not installed")
    return path


def sleeping_process() -> Iterator[subprocess.Popen[bytes]]:
    """A real child process that sleeps for a minute, killed and reaped after the test. Test
    modules take it as a fixture under their own name:
    ``victim = pytest.fixture(sleeping_process, name="victim")``."""
    proc = subprocess.Popen(["sleep", "60"])
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture
def children() -> Iterator[list[subprocess.Popen[str]]]:
    """Child processes a test starts (append them): each killed and reaped in teardown."""
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(timeout=10)
        if p.stdout is not None:
            p.stdout.close()
