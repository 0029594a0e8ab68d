#!/bin/bash
# Runs inside the VM (vm/lane.py), as root, from edged-vm-lane.service: install this checkout's
# wheel and units the way a package would, then run tests/vm. Results go to $1/out.
set -u
lane=$1
in=$lane/in
out=$lane/out
export PATH=/opt/edged/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

{
    echo "PID 1: $(cat /proc/1/comm) ($(readlink /proc/1/exe))"
    echo "cgroup filesystem at /sys/fs/cgroup: $(stat -fc %T /sys/fs/cgroup)"
    echo "cgroup controllers: $(cat /sys/fs/cgroup/cgroup.controllers)"
    echo "systemd: $(systemctl --version | head -1)"
    echo "kernel: $(uname -r)"
    echo "python: $(/opt/edged/bin/python --version)"
    echo "memory: $(awk '/MemTotal/ {print $2 " kB"}' /proc/meminfo), cpus: $(nproc)"
    echo "systemd-oomd: $(systemctl is-enabled systemd-oomd.service 2>&1)"
} >"$out/environment.txt"

step() { echo "[guest] $*"; }
{
    step "installing the checkout's wheel"
    pip install -q --no-index --no-deps --force-reinstall "$in"/edged-*.whl
    step "installing the units as a package would (systemd/edged.service header)"
    install -m 0644 "$in/systemd/edged.service" "$in/systemd/edged.socket" /etc/systemd/system/
    install -d /etc/systemd/system/system.slice.d
    install -m 0644 "$in/systemd/system.slice.d/50-edged.conf" /etc/systemd/system/system.slice.d/
    install -m 0644 "$in/systemd/edged.sysusers.conf" /usr/lib/sysusers.d/edged.conf
    systemd-sysusers
    systemctl daemon-reload
} >"$out/install.log" 2>&1 || { echo 1 >"$out/rc"; exit 1; }

cd "$in" || exit 1
mapfile -t extra <"$in/pytest-args"
timeout --kill-after=30 14m python -m pytest -p no:cacheprovider -v -rA \
    --junitxml="$out/junit.xml" tests/vm "${extra[@]}" >"$out/pytest.log" 2>&1
echo $? >"$out/rc"
systemctl status --no-pager edged.service >"$out/edged-status.txt" 2>&1
journalctl -b --no-pager -o short-monotonic >"$out/journal.txt" 2>&1
exit 0
