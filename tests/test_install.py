"""Installing vbus: a quiet `make run` that still shows what failed, the systemd
unit in contrib/, and `make install-service`.

The Makefile runs against stand-ins (a fake interpreter whose venv's pip and
vbusd are shell scripts), so nothing is installed; the unit is checked with
`systemd-analyze verify` (Debian's systemd package) after the Makefile
installed it into a temporary directory.
"""

from __future__ import annotations

import os
import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import require
from vbus.daemon import build_parser

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "contrib" / "vbusd.service"

# A python that only knows `-m venv DIR`: the venv it makes has a pip that
# talks a lot (and fails when FAKE_PIP_FAILS names the argument it is given)
# and a vbusd that says how it was called.
FAKE_PYTHON = """\
#!/bin/sh
[ "$1 $2" = "-m venv" ] || exit 9
mkdir -p "$3/bin"
cat > "$3/bin/python" <<'PY'
#!/bin/sh
echo "pip chatter: $*"
echo "Building wheel for something (pyproject.toml) ... progress" >&2
for arg in "$@"; do
  [ -n "$FAKE_PIP_FAILS" ] && [ "$arg" = "$FAKE_PIP_FAILS" ] && { echo "ERROR: it broke" >&2; exit 3; }
done
exit 0
PY
printf '#!/bin/sh\\necho "vbusd ran with: $*"\\n' > "$3/bin/vbusd"
chmod +x "$3/bin/python" "$3/bin/vbusd"
"""


def make(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["make", "--no-print-directory", "-C", str(ROOT), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture
def fake_python(tmp_path: Path) -> Path:
    require(shutil.which("make") is not None, "make is not installed")
    path = tmp_path / "python3"
    path.write_text(FAKE_PYTHON)
    path.chmod(0o755)
    return path


def _progress(out: str) -> list[str]:
    # System packages are installed only where some are missing (as root).
    return [line for line in out.splitlines() if "installing system packages" not in line]


def test_first_make_run_says_one_line_per_step(tmp_path: Path, fake_python: Path) -> None:
    venv = tmp_path / "venv"
    args = (f"VENV={venv}", f"PYTHON={fake_python}", "run", "ARGS=--help")
    first = make(*args)
    assert first.returncode == 0, first.stdout + first.stderr
    assert _progress(first.stdout) == [
        f"vbus: creating {venv}",
        "vbus: upgrading pip",
        "vbus: installing Python packages (vbus and its test tools)",
        f"vbus: starting {venv}/bin/vbusd --help",
        "vbusd ran with: --help",
    ]
    assert first.stderr == ""
    log = (venv / "install.log").read_text()
    assert "pip chatter" in log and "Building wheel" in log  # kept, not shown
    # pip is told to be quiet, and the editable install of the tree is what it installs.
    installs = [line for line in log.splitlines() if line.startswith("pip chatter")]
    assert len(installs) == 2
    for line in installs:
        words = line.split()
        for flag in ("--quiet", "--disable-pip-version-check", "--no-warn-script-location"):
            assert flag in words, line
        assert words[words.index("--progress-bar") + 1] == "off"
    assert installs[1].endswith("install --no-warn-script-location --progress-bar off -e .[test]")
    # Installed once: the next run only starts vbusd.
    again = make(*args)
    assert again.returncode == 0
    assert _progress(again.stdout) == [
        f"vbus: starting {venv}/bin/vbusd --help",
        "vbusd ran with: --help",
    ]


def test_a_failing_step_shows_its_output(tmp_path: Path, fake_python: Path) -> None:
    venv = tmp_path / "venv"
    result = make(f"VENV={venv}", f"PYTHON={fake_python}", "run", env={"FAKE_PIP_FAILS": ".[test]"})
    assert result.returncode != 0
    assert "vbus: installing Python packages (vbus and its test tools)" in result.stdout
    assert "failed (exit status 3)" in result.stderr
    assert "ERROR: it broke" in result.stderr and "Building wheel" in result.stderr
    assert "vbusd ran" not in result.stdout
    assert not (venv / ".installed").exists()  # the next make tries again


def _unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """A unit file's sections and keys (a key may repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def test_unit_file_runs_vbusd_as_a_notify_service() -> None:
    unit = _unit(UNIT)
    service = unit["Service"]
    assert service["Type"] == ["notify"]  # vbusd sends READY=1 (tests/test_daemon.py)
    assert service["RuntimeDirectory"] == ["vbus"] and service["StateDirectory"] == ["vbus"]
    assert service["RuntimeDirectoryMode"] == ["0755"]  # every user reaches the socket
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]
    [exec_start] = service["ExecStart"]
    argv = shlex.split(exec_start)
    assert argv[0] == "/usr/local/bin/vbusd"  # what `make install-service` rewrites
    # The arguments are vbusd's own, and name the directories systemd makes.
    args = build_parser().parse_args(argv[1:])
    assert args.run_dir == Path("/run/vbus")
    assert args.state == Path("/var/lib/vbus/state.json")
    # The admin tree is a FUSE mount the host must see: no private mount namespace.
    for option in ("ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices",
                   "ReadWritePaths", "ReadOnlyPaths", "ProtectKernelTunables",
                   "ProtectControlGroups", "ProtectProc", "ProtectHostname", "MountFlags",
                   "ProtectClock"):  # fmt: skip
        assert option not in service, option
    # /dev/fuse, /dev/kvm and /dev/net/tun are misc devices: allowed.
    assert service["DevicePolicy"] == ["closed"] and service["DeviceAllow"] == ["char-misc rw"]
    assert "@mount" in service["SystemCallFilter"][0].split()


def _fake_venv(tmp_path: Path) -> Path:
    """A venv that make takes as installed, whose vbusd is the real entry point."""
    vbusd = Path(sys.executable).parent / "vbusd"
    require(vbusd.exists(), f"no vbusd entry point beside {sys.executable}")
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "vbusd").symlink_to(vbusd)
    (venv / ".installed").touch()  # newer than pyproject.toml: nothing to install
    return venv


def test_install_service_without_systemd_running(tmp_path: Path) -> None:
    require(shutil.which("make") is not None, "make is not installed")
    venv = _fake_venv(tmp_path)
    units = tmp_path / "units"
    result = make("install-service", f"VENV={venv}", f"UNITDIR={units}", "SYSTEMD_RUNNING=")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        f"vbus: installing {units}/vbusd.service (ExecStart={venv}/bin/vbusd)",
        "vbus: systemd is not running here: the unit is installed, not loaded",
    ]
    installed = _unit(units / "vbusd.service")
    assert shlex.split(installed["Service"]["ExecStart"][0])[0] == f"{venv}/bin/vbusd"
    assert sorted(p.name for p in units.iterdir()) == ["vbusd.service"]
    original = _unit(UNIT)
    del original["Service"]["ExecStart"], installed["Service"]["ExecStart"]
    assert installed == original  # only ExecStart differs


def test_install_service_reloads_a_running_systemd(tmp_path: Path) -> None:
    require(shutil.which("make") is not None, "make is not installed")
    venv = _fake_venv(tmp_path)
    calls = tmp_path / "calls"
    systemctl = tmp_path / "systemctl"
    systemctl.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    systemctl.chmod(systemctl.stat().st_mode | stat.S_IXUSR)
    args = ("install-service", f"VENV={venv}", f"UNITDIR={tmp_path / 'units'}")
    result = make(*args, "SYSTEMD_RUNNING=yes", f"SYSTEMCTL={systemctl}")
    assert result.returncode == 0, result.stderr
    assert calls.read_text() == "daemon-reload\n"
    assert "systemctl enable --now vbusd" in result.stdout
    failing = make(*args, "SYSTEMD_RUNNING=yes", "SYSTEMCTL=false")
    assert failing.returncode != 0  # a reload that fails is not hidden


def test_installed_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    require(shutil.which("make") is not None, "make is not installed")
    require(
        shutil.which("systemd-analyze") is not None,
        "systemd-analyze is not installed (Debian package systemd)",
    )
    venv = _fake_venv(tmp_path)
    units = tmp_path / "units"
    assert (
        make("install-service", f"VENV={venv}", f"UNITDIR={units}", "SYSTEMD_RUNNING=").returncode
        == 0
    )

    def verify(unit: Path) -> list[str]:
        result = subprocess.run(
            ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60
        )
        complaints = [
            line for line in (result.stdout + result.stderr).splitlines() if unit.name in line
        ]
        return complaints if result.returncode == 0 else [*complaints, result.stderr]

    assert verify(units / "vbusd.service") == []
    # The check does see mistakes: a misspelt type and key in a copy.
    broken = tmp_path / "broken" / "vbusd.service"
    broken.parent.mkdir()
    broken.write_text(
        (units / "vbusd.service")
        .read_text()
        .replace("Type=notify", "Type=notifyy")
        .replace("NoNewPrivileges=", "NoNewPrivilegs=")
    )
    complaints = verify(broken)
    assert any("notifyy" in line for line in complaints), complaints
    assert any("NoNewPrivilegs" in line for line in complaints), complaints
