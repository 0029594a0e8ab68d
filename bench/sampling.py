"""What sampling every process costs: the process sensor's read, all processes every tick
against the tiers (hot every tick, cold once per COLD_S), with N extra idle processes.

A benchmark, not a test: it prints a markdown table and asserts nothing. Each figure is the
median and the mean of ``--reads`` reads (one tick apart on a fake clock, so the tiers behave
as in a 1 s cadence) of ``ProcessSensor.read()`` on this machine's real /proc, with N
sleeping children started for the run (small and idle: the cold tier) beside whatever the
machine runs.

Usage: ``.venv/bin/python bench/sampling.py [--extra 0,200,1000] [--reads 200]``
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edged.sensors.base import Roots
from edged.sensors.processes import ProcessSensor


def measure(reads: int, urgent: bool) -> tuple[float, float, int, float]:
    """(median and mean µs per read, processes watched, mean processes read per read)."""
    now = [0.0]
    sensor = ProcessSensor(Roots(), [], mode="all", clock=lambda: now[0])
    sensor.urgent = urgent
    try:
        for _ in range(3):  # discover, then the second read that gives CPU figures
            sensor.read()
            now[0] += 1.0
        times_us: list[float] = []
        done = 0
        for _ in range(reads):
            start = time.perf_counter()
            sensor.read()
            times_us.append((time.perf_counter() - start) * 1e6)
            done += sensor.last_reads
            now[0] += 1.0
        return (
            statistics.median(times_us),
            statistics.fmean(times_us),
            len(sensor.watched),
            done / reads,
        )
    finally:
        sensor.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--extra", default="0,200,1000", help="idle children per row")
    parser.add_argument("--reads", type=int, default=200)
    args = parser.parse_args(argv)
    print(
        "| extra idle processes | watched | all every tick: median / mean µs "
        "| tiered: median / mean µs | tiered: read per tick | mean ratio |"
    )
    print("|---|---|---|---|---|---|")
    for extra in (int(x) for x in args.extra.split(",")):
        children = [
            subprocess.Popen(["sleep", "600"], stdin=subprocess.DEVNULL) for _ in range(extra)
        ]
        try:
            time.sleep(0.5)
            all_p50, all_mean, watched, _ = measure(args.reads, urgent=True)
            tiered_p50, tiered_mean, _, read = measure(args.reads, urgent=False)
        finally:
            for child in children:
                child.kill()
            for child in children:
                child.wait()
        print(
            f"| {extra} | {watched} | {all_p50:.0f} / {all_mean:.0f} | "
            f"{tiered_p50:.0f} / {tiered_mean:.0f} | {read:.1f} | {tiered_mean / all_mean:.2f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
