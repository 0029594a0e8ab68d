"""Run ``edged`` over a fake NVIDIA driver whose state lives in files (for end-to-end tests).

    python -m tests.fakes.nvml_daemon DRIVER_JSON DEMAND_JSON edged-arguments...

The fake ``pynvml`` of :mod:`tests.fakes.pynvml` is installed as ``sys.modules["pynvml"]``
before edged starts, so both the NVML sensor and the power-limit lever talk to it. Two files
make it behave like a driver that outlives the daemon:

* ``DRIVER_JSON`` ``{"gpus": [{"uuid", "power_limit_mw", "power_limit_min_mw",
  "power_limit_max_mw"}], "limit_log": [[uuid, mW], ...]}``: read at start, written back on
  every accepted ``nvmlDeviceSetPowerManagementLimit`` (a real GPU keeps its limit when the
  daemon is SIGKILLed, and the next start finds it);
* ``DEMAND_JSON`` ``{uuid: mW}``, written by the test: what each GPU would draw; it draws
  ``min(demand, limit)``, as a GPU held by its power cap does.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from tests.fakes.pynvml import FakeGpu, FakeHandle, FakeNvml


class FileBackedNvml(FakeNvml):
    """A :class:`FakeNvml` whose GPU limits persist in a file and whose draw follows one."""

    def __init__(self, driver_file: Path, demand_file: Path) -> None:
        self.driver_file = driver_file
        self.demand_file = demand_file
        state = json.loads(driver_file.read_text())
        gpus = [
            FakeGpu(
                uuid=g["uuid"],
                power_limit_mw=g["power_limit_mw"],
                power_limit_default_mw=g["power_limit_max_mw"],
                power_limit_min_mw=g["power_limit_min_mw"],
                power_limit_max_mw=g["power_limit_max_mw"],
            )
            for g in state["gpus"]
        ]
        super().__init__(gpus)
        self.limit_log = [(str(u), int(mw)) for u, mw in state.get("limit_log", [])]

    def _save(self) -> None:
        state: dict[str, Any] = {
            "gpus": [
                {
                    "uuid": g.uuid,
                    "power_limit_mw": g.power_limit_mw,
                    "power_limit_min_mw": g.power_limit_min_mw,
                    "power_limit_max_mw": g.power_limit_max_mw,
                }
                for g in self.gpus
            ],
            "limit_log": self.limit_log,
        }
        tmp = self.driver_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        os.replace(tmp, self.driver_file)

    def nvmlDeviceSetPowerManagementLimit(self, handle: FakeHandle, limit: int) -> None:
        super().nvmlDeviceSetPowerManagementLimit(handle, limit)
        self._save()

    def nvmlDeviceGetPowerUsage(self, handle: FakeHandle) -> int:
        gpu = self._gpu(handle, "nvmlDeviceGetPowerUsage")
        try:
            demand = json.loads(self.demand_file.read_text())
        except (OSError, ValueError):  # being replaced this instant: last figure
            return gpu.power_mw
        gpu.power_mw = min(int(demand.get(gpu.uuid, 0)), gpu.power_limit_mw)
        return gpu.power_mw


def main(argv: list[str]) -> int:
    driver_file, demand_file, *edged_args = argv
    fake = FileBackedNvml(Path(driver_file), Path(demand_file))
    sys.modules["pynvml"] = fake.module()
    from edged.cli import main as edged_main

    return edged_main(edged_args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
