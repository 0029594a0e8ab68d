"""Config: layering, validation errors that name the key, and check-config exit codes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from edged import config as cfg


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_defaults_without_any_file(tmp_path: Path) -> None:
    config = cfg.load(tmp_path / "absent.toml" if False else None, environ={})
    assert config.sampling.interval_s == 1.0
    assert config.sampling.history_s == 300.0
    assert config.telemetry.prometheus == "127.0.0.1:9464"
    assert config.telemetry.otlp == ""


def test_explicit_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(cfg.ConfigError, match="cannot read"):
        cfg.load(tmp_path / "nope.toml", environ={})


def test_precedence_file_dropin_env_flags(tmp_path: Path) -> None:
    main = write(
        tmp_path / "edged.toml",
        '[sampling]\ninterval = "2s"\nhistory = 600\n'
        '[server]\nmax_clients = 5\n[telemetry]\nprometheus = "off"\n',
    )
    write(tmp_path / "edged.d" / "10-fast.toml", "[sampling]\ninterval = 0.5\n")
    write(tmp_path / "edged.d" / "20-more.toml", "[server]\nmax_clients = 7\n")
    config = cfg.load(main, environ={})
    assert config.sampling.interval_s == 0.5  # drop-in over file
    assert config.sampling.history_s == 600  # file value kept where no layer overrides it
    assert config.server.max_clients == 7  # later drop-in wins
    config = cfg.load(
        main, environ={"EDGED_SAMPLING_INTERVAL": "250ms", "EDGED_SERVER_MAX_CLIENTS": "9"}
    )
    assert config.sampling.interval_s == 0.25  # env over drop-ins
    assert config.server.max_clients == 9  # keys with underscores resolve through the schema
    config = cfg.load(
        main,
        environ={"EDGED_SAMPLING_INTERVAL": "250ms"},
        overrides={"sampling": {"interval": "100ms"}},
    )
    assert config.sampling.interval_s == 0.1  # flags over everything


@pytest.mark.parametrize(
    ("text", "key", "fragment"),
    [
        ("[sampling]\nintervall = 1\n", "sampling.intervall", "unknown key"),
        ("[sampling]\ninterval = true\n", "sampling.interval", "Expected"),
        ('[sampling]\ninterval = "fast"\n', "sampling", "duration"),
        ('[server]\nmax_clients = "many"\n', "server.max_clients", "Expected `int`"),
        ('[[rules]]\nname = "x"\nclass = "vip"\n', "rules[0].class", "Invalid enum value"),
        ('[[rules]]\nclass = "critical"\n', "rules[0]", "at least one of"),
        ('[[rules]]\ncmdline = "(unclosed"\n', "rules[0]", "regular expression"),
        ('[limits.memory]\nsoft = "150%"\n', "limits.memory", "percentage"),
        ('[telemetry]\nprometheus = "nowhere"\n', "telemetry", "host:port"),
        ("[telemetry]\nexport_interval = 0\n", "telemetry", "greater than zero"),
        ("[bogus]\nx = 1\n", "bogus", "unknown key"),
        ('[alerts]\nfor = "soon"\n', "alerts", "for: expected a duration"),
        ("[alerts]\nfor = true\n", "alerts.for", "Expected"),
        ('[alerts]\ncritical_for = "-1s"\n', "alerts", "critical_for: expected a duration"),
        ("[alerts]\nfour = 1\n", "alerts.four", "unknown key"),
        ('[scope]\ncgroup = "bench"\n', "scope", "absolute path"),
        ('[scope]\ncgroup = "/"\n', "scope", "leave it empty"),
        ('[scope]\ncgroup = "/a/../b"\n', "scope", "plain cgroup path"),
        ('[scope]\ncgroup = "/a//b"\n', "scope", "plain cgroup path"),
        ("[scope]\ncgroup = 5\n", "scope.cgroup", "Expected `str`"),
        ('[scope]\npath = "/bench"\n', "scope.path", "unknown key"),
        ('[scope]\ncgroup = "/sys/kernel/mm"\n', "scope", "outside /sys/fs/cgroup"),
        ('[scope]\ncgroup = "/sys/fs/cgroup/memory/"\n', "scope", "root group"),
        ('[scope]\ncgroup = "/sys/fs/cgroup"\n', "scope", "root group"),
        ('[budget]\nreserve_memory = "lots"\n', "budget", "reserve_memory: expected a size"),
        ('[budget]\nreserve_cpu = "120%"\n', "budget", "reserve_cpu: a percentage"),
        ("[budget]\nreserve_cpu = -1\n", "budget", "reserve_cpu: expected cores"),
        ("[budget]\nreserve = 1\n", "budget.reserve", "unknown key"),
    ],
)
def test_bad_values_name_the_key(tmp_path: Path, text: str, key: str, fragment: str) -> None:
    path = write(tmp_path / "edged.toml", text)
    with pytest.raises(cfg.ConfigError) as err:
        cfg.load(path, environ={})
    assert err.value.key == key
    assert fragment in str(err.value)
    assert str(path) in str(err.value)  # the message names the file


def test_error_in_dropin_names_the_dropin(tmp_path: Path) -> None:
    main = write(tmp_path / "edged.toml", "[sampling]\ninterval = 1\n")
    bad = write(tmp_path / "edged.d" / "50-bad.toml", "[sampling]\ninterval = -1\n")
    with pytest.raises(cfg.ConfigError) as err:
        cfg.load(main, environ={})
    assert err.value.source == str(bad)


def test_unknown_environment_variable_is_an_error() -> None:
    with pytest.raises(cfg.ConfigError, match="EDGED_SAMPLING_SPEED"):
        cfg.load(None, environ={"EDGED_SAMPLING_SPEED": "1"})


def test_not_toml_is_reported(tmp_path: Path) -> None:
    path = write(tmp_path / "edged.toml", "[sampling\ninterval = 1\n")
    with pytest.raises(cfg.ConfigError, match="not valid TOML"):
        cfg.load(path, environ={})


@pytest.mark.parametrize(
    ("text", "seconds"), [("100ms", 0.1), ("1.5s", 1.5), ("5m", 300.0), ("2h", 7200.0), ("3", 3.0)]
)
def test_durations(text: str, seconds: float) -> None:
    assert cfg.parse_duration_s(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("3.5GiB", int(3.5 * 2**30)),
        ("512M", 512 * 10**6),
        ("1Ki", 1024),
        ("42", 42),
        ("2GB", 2 * 10**9),
    ],
)
def test_sizes(text: str, size: int) -> None:
    assert cfg.parse_size_bytes(text) == size


def test_printed_config_reads_back_identically(tmp_path: Path) -> None:
    path = write(
        tmp_path / "edged.toml",
        '[sampling]\ninterval = "200ms"\n[[rules]]\nname = "postgres"\n'
        'class = "critical"\n[limits.memory]\nsoft = "3.5GiB"\nhard = "95%"\n'
        '[telemetry.headers]\nauthorization = "Bearer x"\n',
    )
    config = cfg.load(path, environ={})
    again = write(tmp_path / "again.toml", cfg.dumps_toml(config))
    assert cfg.load(again, environ={}) == config


def test_alert_hold_times_from_file_environment_and_defaults(tmp_path: Path) -> None:
    default = cfg.load(None, environ={})
    assert (default.alerts.for_s, default.alerts.critical_for_s) == (30.0, 0.0)
    path = write(tmp_path / "edged.toml", '[alerts]\nfor = "2m"\ncritical_for = "500ms"\n')
    config = cfg.load(path, environ={})
    assert (config.alerts.for_s, config.alerts.critical_for_s) == (120.0, 0.5)
    config = cfg.load(path, environ={"EDGED_ALERTS_FOR": "10s", "EDGED_ALERTS_CRITICAL_FOR": "2"})
    assert (config.alerts.for_s, config.alerts.critical_for_s) == (10.0, 2.0)
    printed = cfg.dumps_toml(config)
    assert '[alerts]\nfor = "10s"\ncritical_for = 2\n' in printed  # the TOML key is `for`
    assert cfg.load(write(tmp_path / "again.toml", printed), environ={}) == config


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edged", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_check_config_exit_codes(tmp_path: Path) -> None:
    good = write(tmp_path / "good.toml", "[sampling]\ninterval = 0.5\n")
    result = run_cli("check-config", "--config", str(good))
    assert result.returncode == 0, result.stderr
    assert "interval = 0.5" in result.stdout
    bad = write(tmp_path / "bad.toml", "[sampling]\ninterval = 0.5\nfoo = 1\n")
    result = run_cli("check-config", "--config", str(bad))
    assert result.returncode == 6
    assert "sampling.foo" in result.stderr
    result = run_cli("check-config", "--bogus")
    assert result.returncode == 2


def test_the_shipped_example_config_is_valid_and_matches_the_defaults() -> None:
    example = Path(__file__).resolve().parent.parent / "examples" / "edged.toml"
    config = cfg.load(example, environ={})
    default = cfg.Config()
    for prop in ("interval_s", "history_s", "rescan_s", "processes"):
        assert getattr(config.sampling, prop) == getattr(default.sampling, prop)
    assert config.strategy == default.strategy
    assert config.server == default.server
    assert config.enforce == default.enforce
    assert (config.alerts.for_s, config.alerts.critical_for_s) == (
        default.alerts.for_s,
        default.alerts.critical_for_s,
    )
    assert config.scope == default.scope
    assert config.budget == default.budget
    assert config.limits == cfg.Config().limits
    assert config.telemetry.prometheus == cfg.Config().telemetry.prometheus


@pytest.mark.parametrize(
    ("value", "path"),
    [
        ("", ""),
        ("/bench", "/bench"),
        ("/system.slice/foo.service/", "/system.slice/foo.service"),
        # the sysfs form a user copies from a shell: v1 (a hierarchy's mount first), v2
        ("/sys/fs/cgroup/memory/box/bench", "/box/bench"),
        ("/sys/fs/cgroup/cpu,cpuacct/box/bench/", "/box/bench"),
        ("/sys/fs/cgroup/unified/box", "/box"),
        ("/sys/fs/cgroup/system.slice/foo.service", "/system.slice/foo.service"),
    ],
)
def test_scope_cgroup(tmp_path: Path, value: str, path: str) -> None:
    config = cfg.load(write(tmp_path / "edged.toml", f'[scope]\ncgroup = "{value}"\n'), environ={})
    assert config.scope.path == path
    from_env = cfg.load(None, environ={"EDGED_SCOPE_CGROUP": value or '""'})
    assert from_env.scope.path == path
