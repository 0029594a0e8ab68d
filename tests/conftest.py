"""Shared fixtures and the markers that skip where this machine lacks a part."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
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
    except Exception:  # noqa: BLE001 - any failure means "no usable GPU here"
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


@pytest.fixture
def fixture_tree(tmp_path: Path) -> Iterator[callable]:  # type: ignore[valid-type]
    """Copy a tree from the shared fixtures (symlinks kept: sysfs trees have link cycles)."""

    def copy(relative: str) -> Path:
        src = FIXTURES / relative
        if not src.exists():
            pytest.skip(f"shared fixture {src} not present")
        dst = tmp_path / uuid.uuid4().hex[:8]
        shutil.copytree(src, dst, symlinks=True)
        return dst

    yield copy


def require(binary: str) -> str:
    """Path of a program the test needs; fails (not skips) in CI, where .ci/run installs it."""
    path = shutil.which(binary)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{binary} not installed; .ci/run must install it")
        pytest.skip(f"{binary} not installed")
    return path
