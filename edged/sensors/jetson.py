"""NVIDIA Jetson: GPU load and clock from devfreq/nvgpu, power rails from INA3221/INA238.

Read straight from sysfs under the given roots; jetson-stats (``jtop``) is not used (it needs
its root service, and everything read here is in sysfs). Thermal zones and fans are the
generic thermal backend's; they are not read here.

Board identity (``board_model`` and ``l4t_release`` on every sensor of this module) comes from
the device-tree ``model`` (NUL-terminated) and the first line of ``/etc/nv_tegra_release``.

**GPU** (sensor ``jetson:gpu``). The GPU is the devfreq node whose *device* is the GPU, never
a devfreq name guess, since Tegra has other devfreq devices (``15340000.vic``, codec domains):

* an integrated GPU described by the device tree: ``device/of_node/name`` is ``gpu`` (or the
  chip name ``gv11b``/``gp10b``/``ga10b``/``gm20b``), or its ``compatible`` is a GPU chip
  (``nvidia,ga10b``, ``nvidia,tegra210-gm20b``);
* Thor's GPU on nvidia.ko: the device is an NVIDIA (0x10de) PCI display-class function. Its
  clock domains are all devfreq nodes of that one function (``gpu-gpc-0``, ``gpu-nvd-0``);
  the GPC domain (graphics processing clusters, where the SMs are) is the GPU clock, the NVD
  (video codec) domain is not.

Readings: ``hw.gpu.clock`` (``cur_freq``, Hz) with hw.id, ``edged.clock.domain=sm`` (the GPC
clock drives the SMs; the same domain name as the NVML backend's SM clock), and, where nvgpu
has a ``load`` file (per-mille busy), ``hw.gpu.utilization`` (0..1) with hw.id, hw.name,
hw.vendor=nvidia, hw.gpu.task=general. hw.id is the GPU's device name (``17000000.gpu``,
``0000:01:00.0``). Thor has no ``load`` file: utilization is reported Absent (NVML reports
it there), never as 0.

**Power rails** (sensor ``jetson:rails:<i2c device>`` per power-monitor chip, so one failing
chip does not hide the others): ``hw.power`` (W) with hw.id = hw.name = the rail label
(``VDD_IN``) and hw.type=voltage (the semantic-convention type of a voltage/current sensing
component). Three interfaces:

* mainline ``ina3221`` hwmon (JetPack 5/6, Thor module): channel N in 1..3 with an
  ``inN_label``; W = ``inN_input`` (mV) x ``currN_input`` (mA). ``in4..in6`` (shunt µV),
  ``in7`` (sum of shunt voltages) and ``curr4`` (summation) are not rails.
* L4T ``ina3221x`` IIO (JetPack 4): ``rail_name_K``, ``in_powerK_input`` (mW), falling back
  to ``in_voltageK_input`` (mV) x ``in_currentK_input`` (mA).
* ``ina238`` hwmon (Thor carrier board, the total input ``VIN``): ``power1_input`` (µW).

Channels labelled ``NC`` (not connected) or disabled (``inN_enable`` = 0) are skipped. The
board's input rail (``VDD_IN``, ``POM_5V_IN`` or ``VIN``) is the total: the other rails are
branches of it, so they carry ``hw.parent`` = the input rail's hw.id and must never be added
to it. ``JetsonRails.input_rail`` names it for the power policy.
"""

from __future__ import annotations

import glob
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from edged.sensors.base import Absent, KeptFile, Roots, Sensor, SensorError, read_text
from edged.snapshot import AttrValue, Reading

log = logging.getLogger(__name__)

SOURCE = "jetson"
CLOCK_DOMAIN = "edged.clock.domain"
# Device-tree node names and compatibles of Tegra integrated GPUs (Nano/TX1 gm20b, TX2 gp10b,
# Xavier gv11b, Orin ga10b; JetPack 6 names the Orin node plainly "gpu").
_GPU_OF_NAMES = frozenset({"gpu", "gm20b", "gp10b", "gv11b", "ga10b"})
_GPU_COMPATIBLE = re.compile(r"nvidia,(?:tegra\d+-)?(g[a-z]\d+b)")
_NVIDIA_PCI_VENDOR = "0x10de"
_INPUT_RAILS = ("VDD_IN", "POM_5V_IN", "VIN")  # in order of preference
_NOT_CONNECTED = frozenset({"NC", "N/C", ""})
_SYSFS_INT = re.compile(rb"\s*(-?\d+)\s*")
_SYSFS_INT_UNIT = re.compile(rb"\s*(-?\d+)(?:\s*[A-Za-z]+)?\s*")
_L4T_RELEASE = re.compile(r"#\s*R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)")


def parse_sysfs_int(raw: bytes, unit_allowed: bool = False) -> int:
    """A decimal integer attribute; with ``unit_allowed``, a trailing unit word may follow
    (L4T's ina3221x driver writes some values as ``"96 mW"``).

    ValueError for an empty file or anything else, so garbage is never read as a number.
    """
    match = (_SYSFS_INT_UNIT if unit_allowed else _SYSFS_INT).fullmatch(raw)
    if match is None:
        raise ValueError(f"not an integer: {raw[:40]!r}" if raw.strip() else "empty")
    return int(match.group(1))


def _read_strings(path: Path) -> tuple[str, ...] | None:
    """A device-tree property as its NUL-separated strings, or None when it cannot be read."""
    try:
        raw = path.read_bytes()
    except OSError:
        return None
    return tuple(s.decode("utf-8", "replace") for s in raw.split(b"\0") if s)


@dataclass(frozen=True)
class JetsonBoard:
    """What kind of Jetson this is, from the device tree and the L4T release file."""

    model: str | None
    l4t_release: str | None  # "R36.3.0"
    compatible: tuple[str, ...]

    @property
    def soc(self) -> str | None:
        """The Tegra SoC (``tegra234``) from the device-tree compatible list."""
        for entry in self.compatible:
            match = re.fullmatch(r"nvidia,(tegra\d+)", entry)
            if match:
                return match.group(1)
        return None

    @property
    def is_jetson(self) -> bool:
        return self.l4t_release is not None or self.soc is not None


def read_board(roots: Roots) -> JetsonBoard:
    """Model, L4T release and compatible list; fields are None/empty where absent."""
    device_tree = (roots.proc / "device-tree", roots.sys / "firmware/devicetree/base")
    model: str | None = None
    compatible: tuple[str, ...] = ()
    for base in device_tree:
        names = _read_strings(base / "model")
        if names:
            model = names[0]
            compatible = _read_strings(base / "compatible") or ()
            break
    release: str | None = None
    text = read_text(roots.etc / "nv_tegra_release")
    if text:
        match = _L4T_RELEASE.match(text.splitlines()[0])
        if match:
            release = f"R{match.group(1)}.{match.group(2)}"
    return JetsonBoard(model, release, compatible)


# -- GPU ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GpuNode:
    """A devfreq node found to be the GPU."""

    devfreq: Path  # /sys/class/devfreq/<name>
    device: Path  # the GPU device directory (symlinks resolved)
    chip: str | None  # "ga10b", when the device tree says


def _of_gpu_chip(device: Path) -> tuple[bool, str | None]:
    """Whether the device tree node of ``device`` is a Tegra GPU, and its chip name."""
    of_node = device / "of_node"
    names = _read_strings(of_node / "name") or ()
    compatible = _read_strings(of_node / "compatible") or ()
    chip = None
    for entry in compatible:
        match = _GPU_COMPATIBLE.fullmatch(entry)
        if match:
            chip = match.group(1)
            break
    node_name = names[0] if names else None
    if chip is None and node_name in _GPU_OF_NAMES and node_name != "gpu":
        chip = node_name
    return (chip is not None or node_name in _GPU_OF_NAMES), chip


def _is_nvidia_pci_gpu(device: Path) -> bool:
    return (
        read_text(device / "vendor") == _NVIDIA_PCI_VENDOR
        and (read_text(device / "class") or "").startswith("0x03")  # display controller
    )


def find_gpus(roots: Roots) -> list[GpuNode]:
    """The devfreq nodes whose device is the GPU (see the module docstring for the rules)."""
    base = roots.sys / "class/devfreq"
    try:
        entries = sorted(os.listdir(base))
    except OSError:
        return []
    found: list[GpuNode] = []
    pci: dict[Path, list[str]] = {}
    for name in entries:
        device = Path(os.path.realpath(base / name / "device"))
        if not device.is_dir():
            continue
        is_gpu, chip = _of_gpu_chip(device)
        if is_gpu:
            found.append(GpuNode(base / name, device, chip))
        elif _is_nvidia_pci_gpu(device):
            pci.setdefault(device, []).append(name)
    for device, names in pci.items():
        # One PCI function, one devfreq node per clock domain (gpu-gpc-0, gpu-nvd-0): only
        # the GPC domain is the GPU clock. No GPC node means no GPU clock, never a guess.
        chosen = [n for n in names if "gpc" in n.split("-")]
        if not chosen:
            log.info("NVIDIA GPU %s: no GPC clock domain among devfreq %s", device.name, names)
        found.extend(GpuNode(base / n, device, None) for n in chosen[:1])
    return found


class _BoardSensor(Sensor):
    """What every sensor of this module tells about the board it runs on."""

    def __init__(self, board: JetsonBoard) -> None:
        self.board = board

    @property
    def board_model(self) -> str | None:
        return self.board.model

    @property
    def l4t_release(self) -> str | None:
        return self.board.l4t_release

    def describe(self) -> str:
        release = f", L4T {self.board.l4t_release}" if self.board.l4t_release else ""
        return f"{self.board.model or 'unknown Jetson'}{release}"


class JetsonGpu(_BoardSensor):
    """GPU clock (devfreq ``cur_freq``) and, where nvgpu has it, load (``load``, per-mille)."""

    def __init__(self, name: str, board: JetsonBoard, node: GpuNode) -> None:
        super().__init__(board)
        self.name = name
        self.devfreq_path = node.devfreq
        hw_id = node.device.name
        hw_name = node.chip or (f"{board.soc} GPU" if board.soc else "Jetson GPU")
        self._freq = KeptFile(node.devfreq / "cur_freq")
        load_path = node.device / "load"
        self._load = KeptFile(load_path) if load_path.is_file() else None
        self._clock_attrs: dict[str, AttrValue] = {"hw.id": hw_id, CLOCK_DOMAIN: "sm"}
        self._util_attrs: dict[str, AttrValue] = {
            "hw.id": hw_id,
            "hw.name": hw_name,
            "hw.vendor": "nvidia",
            "hw.gpu.task": "general",
        }

    @property
    def has_load(self) -> bool:
        return self._load is not None

    def read(self) -> list[Reading]:
        out = [Reading("hw.gpu.clock", float(self._int(self._freq)), self._clock_attrs)]
        if self._load is not None:
            permille = self._int(self._load)
            if not 0 <= permille <= 1000:
                raise SensorError(self.name, f"{self._load.path}: load {permille} not in 0..1000")
            out.append(Reading("hw.gpu.utilization", permille / 1000.0, self._util_attrs))
        return out

    def _int(self, file: KeptFile) -> int:
        try:
            return parse_sysfs_int(file.read_bytes())
        except (OSError, ValueError) as exc:
            raise SensorError(self.name, f"{file.path}: {exc}") from exc

    def close(self) -> None:
        self._freq.close()
        if self._load is not None:
            self._load.close()


# -- power rails ----------------------------------------------------------------------------


class Rail:
    """One monitored rail: watts = the product of its files' integers / ``divisor``.

    Either a power file alone (µW: divisor 1e6; mW: 1e3), or a voltage (mV) and a current (mA)
    file (divisor 1e6). Integers are multiplied first and divided once, so 5032 mV x 1384 mA
    reads as exactly 6.964288 W.
    """

    __slots__ = ("divisor", "files", "label")

    def __init__(self, label: str, files: tuple[KeptFile, ...], divisor: float) -> None:
        self.label = label
        self.files = files
        self.divisor = divisor

    @classmethod
    def from_power(cls, label: str, path: Path, divisor: float) -> Rail:
        return cls(label, (KeptFile(path),), divisor)

    @classmethod
    def from_voltage_current(cls, label: str, millivolts: Path, milliamps: Path) -> Rail:
        return cls(label, (KeptFile(millivolts), KeptFile(milliamps)), 1e6)

    def read_w(self) -> float:
        """Watts now. OSError/ValueError from the first file that cannot be read."""
        product = 1
        for file in self.files:
            product *= parse_sysfs_int(file.read_bytes(), unit_allowed=True)
        return product / self.divisor


@dataclass
class PowerMonitor:
    """A power-monitor chip found at discovery, with its rails."""

    device: str  # i2c device name, "1-0040"
    chip: str  # "ina3221", "ina3221x", "ina238"
    rails: list[Rail]


class JetsonRails(_BoardSensor):
    """``hw.power`` of each rail of one power-monitor chip."""

    def __init__(
        self,
        board: JetsonBoard,
        monitor: PowerMonitor,
        attributes: list[dict[str, AttrValue]],
        input_rail: str | None,
    ) -> None:
        super().__init__(board)
        self.name = f"{SOURCE}:rails:{monitor.device}"
        self.chip = monitor.chip
        self.input_rail = input_rail
        self._rails = list(zip(monitor.rails, attributes, strict=True))

    @property
    def rail_labels(self) -> list[str]:
        return [rail.label for rail, _ in self._rails]

    def read(self) -> list[Reading]:
        out: list[Reading] = []
        for rail, attrs in self._rails:
            try:
                out.append(Reading("hw.power", rail.read_w(), attrs))
            except (OSError, ValueError) as exc:
                paths = ", ".join(f.path for f in rail.files)
                raise SensorError(self.name, f"rail {rail.label} ({paths}): {exc}") from exc
        return out

    def close(self) -> None:
        for rail, _ in self._rails:
            for file in rail.files:
                file.close()


def _rail_label(path: Path) -> str | None:
    """The rail name in a label file, or None when missing or "NC" (not connected)."""
    label = read_text(path)
    if label is None or label.upper() in _NOT_CONNECTED:
        return None
    return label


def _device_name(path: Path) -> str:
    """The i2c device (``1-0040``) a hwmon or IIO directory belongs to."""
    device = path / "device"
    if device.exists():
        return Path(os.path.realpath(device)).name
    return Path(os.path.realpath(path)).parent.name


def _ina3221_hwmon_rails(hwmon: Path) -> list[Rail]:
    rails = []
    for channel in (1, 2, 3):  # in4..in7 and curr4 are shunt/summation channels, not rails
        label = _rail_label(hwmon / f"in{channel}_label")
        if label is None or read_text(hwmon / f"in{channel}_enable") == "0":
            continue
        voltage, current = hwmon / f"in{channel}_input", hwmon / f"curr{channel}_input"
        if voltage.is_file() and current.is_file():
            rails.append(Rail.from_voltage_current(label, voltage, current))
    return rails


def _ina238_rails(hwmon: Path, default_label: str) -> list[Rail]:
    label = read_text(hwmon / "power1_label") or read_text(hwmon / "in1_label") or default_label
    power = hwmon / "power1_input"
    if power.is_file():
        return [Rail.from_power(label, power, 1e6)]  # µW
    voltage, current = hwmon / "in1_input", hwmon / "curr1_input"
    if voltage.is_file() and current.is_file():
        return [Rail.from_voltage_current(label, voltage, current)]
    return []


def _ina3221x_iio_rails(iio: Path) -> list[Rail]:
    rails = []
    for channel in (0, 1, 2):
        label = _rail_label(iio / f"rail_name_{channel}")
        if label is None:
            continue
        power = iio / f"in_power{channel}_input"
        voltage, current = iio / f"in_voltage{channel}_input", iio / f"in_current{channel}_input"
        if power.is_file():
            rails.append(Rail.from_power(label, power, 1e3))  # mW
        elif voltage.is_file() and current.is_file():
            rails.append(Rail.from_voltage_current(label, voltage, current))
    return rails


def _hwmon_index(path: str) -> int:
    match = re.search(r"(\d+)$", path)
    return int(match.group(1)) if match else -1


def find_monitors(roots: Roots) -> list[PowerMonitor]:
    """Every INA3221 (hwmon or L4T IIO) and INA238 power monitor with at least one rail."""
    monitors: list[PowerMonitor] = []
    unlabelled_ina238 = 0
    hwmons = sorted(glob.glob(str(roots.sys / "class/hwmon/hwmon*")), key=_hwmon_index)
    for entry in hwmons:
        hwmon = Path(entry)
        chip = read_text(hwmon / "name")
        if chip == "ina3221":
            rails = _ina3221_hwmon_rails(hwmon)
        elif chip == "ina238":
            # Thor's carrier INA238 has no label; it measures the board input, "VIN".
            default = "VIN" if unlabelled_ina238 == 0 else f"VIN{unlabelled_ina238}"
            rails = _ina238_rails(hwmon, default)
            if any(rail.label == default for rail in rails):
                unlabelled_ina238 += 1
        else:
            continue
        if rails:
            monitors.append(PowerMonitor(_device_name(hwmon), chip, rails))
    seen: set[str] = set()
    iio_dirs = sorted(glob.glob(str(roots.sys / "bus/i2c/drivers/ina3221x/*/iio:device*")))
    iio_dirs += sorted(glob.glob(str(roots.sys / "bus/iio/devices/iio:device*")))
    for entry in iio_dirs:
        real = os.path.realpath(entry)
        if real in seen:
            continue
        seen.add(real)
        iio = Path(entry)
        under_driver = "/drivers/ina3221x/" in entry
        if not under_driver and read_text(iio / "name") != "ina3221x":
            continue
        rails = _ina3221x_iio_rails(iio)
        if rails:
            monitors.append(PowerMonitor(Path(real).parent.name, "ina3221x", rails))
    return monitors


def _rail_sensors(board: JetsonBoard, monitors: list[PowerMonitor]) -> list[JetsonRails]:
    """One sensor per chip; attributes decided over the whole board (ids, the input rail)."""
    labels = [rail.label for m in monitors for rail in m.rails]
    input_rail = next((name for name in _INPUT_RAILS if name in labels), None)
    used_ids: set[str] = set()
    sensors = []
    for monitor in monitors:
        attributes: list[dict[str, AttrValue]] = []
        for rail in monitor.rails:
            hw_id = rail.label if rail.label not in used_ids else f"{rail.label}@{monitor.device}"
            used_ids.add(hw_id)
            attrs: dict[str, AttrValue] = {
                "hw.id": hw_id,
                "hw.name": rail.label,
                "hw.type": "voltage",
            }
            if input_rail is not None and hw_id != input_rail:
                attrs["hw.parent"] = input_rail
            attributes.append(attrs)
        sensors.append(JetsonRails(board, monitor, attributes, input_rail))
    return sensors


def discover(roots: Roots) -> list[Sensor | Absent]:
    """The Jetson GPU and power-rail sensors, or Absent when this is not a Jetson."""
    board = read_board(roots)
    if not board.is_jetson:
        return [Absent(SOURCE, "not a Jetson (no nv_tegra_release, no nvidia,tegra* board)")]
    found: list[Sensor | Absent] = []
    gpus = find_gpus(roots)
    for index, node in enumerate(gpus):
        name = f"{SOURCE}:gpu" if index == 0 else f"{SOURCE}:gpu:{node.device.name}"
        gpu = JetsonGpu(name, board, node)
        found.append(gpu)
        if not gpu.has_load:
            found.append(
                Absent(
                    f"{name}:load",
                    "no nvgpu load file: GPU utilization is not in sysfs here (NVML has it)",
                )
            )
    if not gpus:
        found.append(Absent(f"{SOURCE}:gpu", "no devfreq node whose device is the GPU"))
    rails = _rail_sensors(board, find_monitors(roots))
    found.extend(rails)
    if not rails:
        found.append(Absent(f"{SOURCE}:rails", "no INA3221/INA238 power monitor with rails"))
    return found


__all__ = [
    "CLOCK_DOMAIN",
    "SOURCE",
    "GpuNode",
    "JetsonBoard",
    "JetsonGpu",
    "JetsonRails",
    "PowerMonitor",
    "Rail",
    "discover",
    "find_gpus",
    "find_monitors",
    "parse_sysfs_int",
    "read_board",
]
