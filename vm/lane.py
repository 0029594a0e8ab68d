#!/usr/bin/env python3
"""The VM lane: this checkout under real systemd (PID 1) and a pure cgroup v2, in qemu.

This machine (and CI's) has cgroup v1 hybrid and no systemd as PID 1, so the paths most users
run (systemd's D-Bus API on a unified hierarchy) can only be tested in a VM. The lane:

1. **Image** (cached): a Debian 12 root made with ``mmdebstrap`` (systemd, dbus, systemd-oomd,
   python3), edged's runtime dependencies and pytest installed offline into ``/opt/edged`` from
   wheels built here (a pip run inside the chroot has neither the host's certificates nor its
   pip settings), the runner unit ``edged-vm-lane.service`` enabled, written into an ext4 disk
   image with ``mkfs.ext4 -d`` (no loop mount). The image is cached under
   ``$EDGED_VM_CACHE`` (default ``/var/cache/edged-vm``, or ``~/.cache/edged-vm`` when not root)
   by a hash of its inputs: the package list, the dependency list in ``pyproject.toml`` and the
   files in ``vm/image/``. A change of edged's own code does not rebuild it.
2. **Run**: this checkout's wheel, ``tests/``, ``systemd/`` and ``vm/guest/`` go onto a second
   small ext4 disk. qemu boots the image (``snapshot=on``: the cached image is never written),
   systemd starts the runner, which installs the wheel and the units, runs
   ``pytest tests/vm`` and writes the results to the second disk, then powers the VM off.
3. **Results**: read back with ``debugfs -R "rdump /out ..."`` (no mount), printed, and the
   lane exits with pytest's exit status.

KVM is used where it works (``-enable-kvm -cpu host``); where ``/dev/kvm`` is missing or is the
paravirtual nested kind (``kvm_pvm``, which boots only guest kernels built for it), software
emulation (``-accel tcg,thread=multi -cpu max``). The lane skips (exit 0 with a reason, or 77
with ``--strict-skip``) only where qemu cannot run at all. See ../shared/VM.md for the recipe
and its timings.

Usage: ``python3 vm/lane.py [--keep DIR] [-- PYTEST ARGS]``. Needs root (mmdebstrap, chroot).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import tomllib  # type: ignore[import-not-found,unused-ignore]  # the lane needs Python 3.11

REPO = Path(__file__).resolve().parent.parent
IMAGE_DIR = REPO / "vm" / "image"
GUEST_DIR = REPO / "vm" / "guest"
SUITE = "bookworm"
# What the image needs beyond mmdebstrap's apt variant: systemd as PID 1 and its bus, udev for
# /dev/vdb, the kernel, Python for edged, PAM's systemd module so a login gets a session scope,
# and systemd-oomd to run beside edged.
PACKAGES = (
    "systemd",
    "systemd-sysv",
    "systemd-oomd",
    "libpam-systemd",
    "dbus",
    "udev",
    "kmod",
    "procps",
    "python3",
    "python3-venv",
    "linux-image-amd64",
)
# Test-side packages installed into /opt/edged beside edged's own dependencies.
TEST_REQUIREMENTS = ("pytest>=8", "pytest-timeout>=2.3")
# Bumped when the recipe below changes in a way the hashed inputs do not show.
RECIPE_VERSION = "1"
ROOT_IMAGE_SIZE = "3G"
LANE_DISK_SIZE = "64M"
LANE_LABEL = "edged-lane"
VM_MEMORY_MB = 2048
VM_CPUS = 2
# Whole-run bound: boot (~15 s under TCG), edged ready (~35 s), the suite. The runner in the
# guest has its own, shorter bound and powers off; this one catches a hung guest.
VM_TIMEOUT_S = 20 * 60


def log(message: str) -> None:
    print(f"[vm-lane {time.strftime('%H:%M:%S')}] {message}", flush=True)


def run(
    cmd: list[str], env: dict[str, str] | None = None, capture_output: bool = False
) -> subprocess.CompletedProcess[str]:
    log("$ " + shlex.join(cmd))
    return subprocess.run(cmd, check=True, text=True, env=env, capture_output=capture_output)


def cache_root() -> Path:
    configured = os.environ.get("EDGED_VM_CACHE")
    if configured:
        return Path(configured)
    if os.geteuid() == 0:
        return Path("/var/cache/edged-vm")
    return Path.home() / ".cache" / "edged-vm"


def runtime_requirements() -> list[str]:
    """edged's own dependencies (pyproject's [project] dependencies), without the ones whose
    environment marker excludes the guest's Python 3.11."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    kept = []
    for requirement in project["dependencies"]:
        if "python_version < '3.11'" in requirement.replace('"', "'"):
            continue
        kept.append(requirement)
    return kept


def image_key() -> str:
    """A hash of everything the image is made of (not of edged's code: that goes on the lane
    disk each run)."""
    h = hashlib.sha256()
    h.update(RECIPE_VERSION.encode())
    h.update(SUITE.encode())
    for item in (*PACKAGES, *runtime_requirements(), *TEST_REQUIREMENTS):
        h.update(b"\0" + item.encode())
    for path in sorted(IMAGE_DIR.rglob("*")):
        if path.is_file():
            h.update(b"\0" + str(path.relative_to(IMAGE_DIR)).encode() + b"\0")
            h.update(path.read_bytes())
    h.update((REPO / "vm" / "lane.py").read_bytes().split(b"# --- recipe ---")[1])
    return h.hexdigest()[:16]


# --- recipe ---


def build_image(target: Path) -> None:
    """Make ``target``/{root.img, vmlinuz, initrd.img}; ``target`` appears only when complete."""
    work = Path(tempfile.mkdtemp(prefix="edged-vm-build-", dir=target.parent))
    try:
        started_s = time.monotonic()
        wheels = work / "wheels"
        requirements = [*runtime_requirements(), *TEST_REQUIREMENTS]
        run([sys.executable, "-m", "pip", "wheel", "-q", "-w", str(wheels), *requirements])
        rootfs = work / "rootfs"
        run(
            [
                "mmdebstrap",
                "--variant=apt",
                "--quiet",
                "--include=" + ",".join(PACKAGES),
                SUITE,
                str(rootfs),
            ]
        )
        shutil.copytree(wheels, rootfs / "wheels")
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", "LANG": "C.UTF-8"}
        chroot = ["chroot", str(rootfs)]
        run([*chroot, "python3", "-m", "venv", "/opt/edged"], env=env)
        run(
            [
                *chroot,
                "/opt/edged/bin/pip",
                "install",
                "-q",
                "--no-index",
                "--find-links",
                "/wheels",
                *requirements,
            ],
            env=env,
        )
        shutil.rmtree(rootfs / "wheels")
        # the image's own files: the runner unit and script, fstab, hostname
        for path in sorted(IMAGE_DIR.rglob("*")):
            if path.is_file():
                dest = rootfs / path.relative_to(IMAGE_DIR)
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, dest)
        (rootfs / "usr/local/sbin/edged-vm-lane").chmod(0o755)
        # `ExecStart=edged run` resolves through systemd's fixed path (/usr/local/bin first)
        (rootfs / "usr/local/bin/edged").symlink_to("/opt/edged/bin/edged")
        # an ordinary user, for processes in a login session (user-N.slice/session-M.scope)
        run([*chroot, "useradd", "--create-home", "--shell", "/bin/bash", "lane-user"], env=env)
        (rootfs / "etc/hostname").write_text("edged-vm\n")
        (rootfs / "etc/machine-id").write_text("")  # generated at first boot
        run([*chroot, "systemctl", "enable", "edged-vm-lane.service"], env=env)
        # nothing to wait for: the VM has no network
        for unit in ("apt-daily.timer", "apt-daily-upgrade.timer", "e2scrub_all.timer"):
            subprocess.run(
                [*chroot, "systemctl", "disable", unit], env=env, check=False, capture_output=True
            )
        # the root account: passwordless login on the console, for debugging by hand
        run([*chroot, "passwd", "-d", "root"], env=env, capture_output=True)
        boot = rootfs / "boot"
        kernel = next(boot.glob("vmlinuz-*"))
        initrd = next(boot.glob("initrd.img-*"))
        shutil.copy2(kernel, work / "vmlinuz")
        shutil.copy2(initrd, work / "initrd.img")
        run(
            [
                "mkfs.ext4",
                "-q",
                "-F",
                "-L",
                "edged-root",
                "-d",
                str(rootfs),
                str(work / "root.img"),
                ROOT_IMAGE_SIZE,
            ]
        )
        shutil.rmtree(rootfs)
        shutil.rmtree(wheels)
        (work / "built").write_text(f"{time.monotonic() - started_s:.0f} s\n")
        os.rename(work, target)
        log(f"image built in {time.monotonic() - started_s:.0f} s: {target}")
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)


def image(rebuild: bool) -> Path:
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    target = root / image_key()
    if rebuild and target.exists():
        shutil.rmtree(target)
    if target.exists():
        log(f"image cached: {target} (inputs unchanged)")
        return target
    for stale in root.iterdir():  # older keys: one image is enough on disk
        if stale.is_dir() and not stale.name.startswith("edged-vm-build-"):
            shutil.rmtree(stale, ignore_errors=True)
    log(f"building the image {target.name} (about 2 minutes)")
    build_image(target)
    return target


def lane_disk(run_dir: Path, pytest_args: list[str]) -> Path:
    """The second disk: the wheel of this checkout, the tests, the units, the guest script."""
    content = run_dir / "lane"
    inside = content / "in"
    inside.mkdir(parents=True)
    (content / "out").mkdir()
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(inside), str(REPO)])
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".*")
    tests = inside / "tests"
    tests.mkdir()
    for name in ("__init__.py", "conftest.py"):
        shutil.copy2(REPO / "tests" / name, tests / name)
    shutil.copytree(REPO / "tests" / "vm", tests / "vm", ignore=ignore)
    shutil.copytree(REPO / "systemd", inside / "systemd", ignore=ignore)
    shutil.copytree(GUEST_DIR, inside / "guest", ignore=ignore)
    shutil.copy2(REPO / "pyproject.toml", inside / "pyproject.toml")
    (inside / "pytest-args").write_text("\n".join(pytest_args) + ("\n" if pytest_args else ""))
    disk = run_dir / "lane.img"
    run(["mkfs.ext4", "-q", "-F", "-L", LANE_LABEL, "-d", str(content), str(disk), LANE_DISK_SIZE])
    return disk


def accelerator() -> tuple[list[str], str]:
    """KVM where it works, else TCG (see the module docstring)."""
    if Path("/sys/module/kvm_pvm").exists():
        return ["-accel", "tcg,thread=multi", "-cpu", "max"], "tcg (kvm here is kvm-pvm)"
    if os.access("/dev/kvm", os.R_OK | os.W_OK):
        return ["-enable-kvm", "-cpu", "host"], "kvm"
    return ["-accel", "tcg,thread=multi", "-cpu", "max"], "tcg (no usable /dev/kvm)"


def boot(images: Path, disk: Path, console_log: Path) -> int:
    accel, which = accelerator()
    log(f"booting with {which}; console: {console_log}")
    cmd = [
        "qemu-system-x86_64",
        *accel,
        "-m", str(VM_MEMORY_MB),
        "-smp", str(VM_CPUS),
        "-nographic",
        "-monitor", "none",
        "-nic", "none",
        "-no-reboot",
        "-kernel", str(images / "vmlinuz"),
        "-initrd", str(images / "initrd.img"),
        "-append",
        "root=/dev/vda rw console=ttyS0 systemd.unified_cgroup_hierarchy=1 panic=-1 "
        "systemd.show_status=0 loglevel=4",
        "-drive", f"file={images / 'root.img'},format=raw,if=virtio,snapshot=on",
        "-drive", f"file={disk},format=raw,if=virtio",
    ]  # fmt: skip
    log("$ " + shlex.join(cmd))
    started_s = time.monotonic()
    with console_log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        try:
            rc = proc.wait(timeout=VM_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            log(f"the VM did not power off within {VM_TIMEOUT_S} s: killed")
            return -1
        finally:  # a timeout, or the lane itself stopped (SIGTERM, Ctrl-C): no qemu left
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    log(f"VM powered off after {time.monotonic() - started_s:.0f} s (qemu exit {rc})")
    return rc


def results(disk: Path, out_dir: Path) -> int:
    out_dir.mkdir(parents=True, exist_ok=True)
    run(["debugfs", "-R", f"rdump /out {out_dir}", str(disk)], capture_output=True)
    out = out_dir / "out"
    for name in ("environment.txt", "pytest.log"):
        path = out / name
        if path.exists():
            print(f"----- {name} (from the VM) -----")
            print(path.read_text(errors="replace"), end="", flush=True)
    rc_file = out / "rc"
    if not rc_file.exists():
        log("the VM wrote no exit status: the runner did not finish (see the console log)")
        return 1
    return int(rc_file.read_text().strip() or 1)


def qemu_usable() -> str | None:
    """None, or why qemu cannot run here at all."""
    for tool in ("qemu-system-x86_64", "mmdebstrap", "mkfs.ext4", "debugfs"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (Debian: qemu-system-x86 mmdebstrap e2fsprogs)"
    if os.geteuid() != 0:
        return "the image build needs root (mmdebstrap, chroot)"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rebuild", action="store_true", help="rebuild the cached image")
    parser.add_argument("--keep", type=Path, help="keep the run's files (console, results) here")
    parser.add_argument("--build-only", action="store_true", help="build the image and stop")
    parser.add_argument(
        "--strict-skip", action="store_true", help="exit 77 rather than 0 when qemu cannot run"
    )
    parser.add_argument("pytest_args", nargs="*", help="passed to pytest in the VM (after --)")
    args = parser.parse_args(argv)
    # SIGTERM (CI's timeout, kill) unwinds like Ctrl-C: qemu ended, the run's files removed
    signal.signal(signal.SIGTERM, lambda _sig, _frame: sys.exit(143))
    why_not = qemu_usable()
    if why_not:
        log(f"SKIPPED: {why_not}")
        return 77 if args.strict_skip else 0
    started_s = time.monotonic()
    images = image(args.rebuild)
    if args.build_only:
        return 0
    run_dir = args.keep or Path(tempfile.mkdtemp(prefix="edged-vm-run-"))
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        disk = lane_disk(run_dir, args.pytest_args)
        console = run_dir / "console.log"
        qemu_rc = boot(images, disk, console)
        rc = results(disk, run_dir / "results")
        if rc != 0 or qemu_rc != 0:
            print("----- console (last 80 lines) -----")
            lines = console.read_text(errors="replace").splitlines()
            print("\n".join(re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", s) for s in lines[-80:]))
        log(f"lane finished in {time.monotonic() - started_s:.0f} s: pytest exit {rc}")
        return rc if qemu_rc == 0 else (rc or 1)
    finally:
        if args.keep is None:
            shutil.rmtree(run_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
