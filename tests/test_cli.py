"""The user's side of vbus: finding the daemon, one-line refusals, the run
directory's privacy, `vbus status` and the `--json` forms."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import Daemon, require
from vbus import client
from vbus.client import connect
from vbus.errors import Closed, Denied
from vbus.paths import SYSTEM_RUN_DIR, check_private_dir, prepare_run_dir, socket_candidates

VBUS = [sys.executable, "-m", "vbus.cli"]
ROOT = Path(__file__).resolve().parent.parent


def run(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, **kw)  # type: ignore[call-overload,no-any-return]


def one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr and "never retrieved" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


# --- where the client looks ------------------------------------------------


def test_socket_candidates() -> None:
    assert socket_candidates(65534, {}) == [
        Path("/tmp/vbus-65534/vbus/vbus.sock"),
        SYSTEM_RUN_DIR / "vbus.sock",
    ]
    assert socket_candidates(1000, {"XDG_RUNTIME_DIR": "/run/user/1000"})[0] == Path(
        "/run/user/1000/vbus/vbus.sock"
    )
    assert socket_candidates(0, {}) == [SYSTEM_RUN_DIR / "vbus.sock"]
    assert socket_candidates(1000, {"VBUS_SOCKET": "/x/s"}) == [Path("/x/s")]


@pytest.mark.integration
@pytest.mark.asyncio
async def test_client_falls_back_to_the_next_socket(
    vbusd: Callable[..., Daemon], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    daemon = vbusd()
    missing = tmp_path / "nobody-here" / "vbus.sock"
    monkeypatch.delenv("VBUS_SOCKET", raising=False)
    monkeypatch.setattr(client, "socket_candidates", lambda: [missing, daemon.socket])
    async with connect() as bus:
        assert bus.name == "default"
    monkeypatch.setattr(client, "socket_candidates", lambda: [missing, tmp_path / "also.sock"])
    with pytest.raises(Closed) as refused:
        async with connect():
            pass
    message = refused.value.message
    assert str(missing) in message and "also.sock" in message
    assert "--socket" in message and "VBUS_SOCKET" in message


@pytest.mark.integration
def test_unprivileged_client_says_what_it_tried(tmp_path: Path) -> None:
    """uid 65534 has no daemon of its own: it tries its own socket, then the
    system daemon's.  Where a system daemon runs, reaching it (and being told
    it is on no bus) is the proof; where none runs, the error names both."""
    require(os.geteuid() == 0, "runs the client as uid 65534")
    require(shutil.which("setpriv") is not None, "setpriv (util-linux)")
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT), "HOME": "/nonexistent"}
    proc = run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *VBUS, "devices"],
        env=env,
        cwd="/",
    )
    line = one_line_error(proc)
    if "not a member" in line:  # a system vbusd answered
        assert (SYSTEM_RUN_DIR / "vbus.sock").exists()
        return
    assert "/tmp/vbus-65534/vbus/vbus.sock" in line and "/run/vbus/vbus.sock" in line, line
    assert "--socket" in line and "VBUS_SOCKET" in line


# --- refusals in one line --------------------------------------------------


@pytest.mark.integration
@pytest.mark.asyncio
async def test_connection_cap_refusal_is_one_line(vbusd: Callable[..., Daemon]) -> None:
    daemon = vbusd("--max-connections-per-uid", "1")
    async with connect(daemon.socket):
        proc = await asyncio.to_thread(run, [*VBUS, "--socket", str(daemon.socket), "devices"])
    line = one_line_error(proc)
    assert "refused" in line and "too many connections" in line, line


@pytest.mark.integration
def test_echo_client_without_a_daemon(tmp_path: Path) -> None:
    proc = run(
        [sys.executable, str(ROOT / "examples" / "echo_client.py")],
        env=dict(os.environ, VBUS_SOCKET=str(tmp_path / "none.sock")),
    )
    line = one_line_error(proc)
    assert "none.sock" in line


# --- the run directory is private ------------------------------------------


def test_private_dir_checks(tmp_path: Path) -> None:
    mine = tmp_path / "mine"
    mine.mkdir(mode=0o700)
    check_private_dir(mine, os.geteuid())
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    with pytest.raises(Denied, match="writable by others"):
        check_private_dir(open_dir, os.geteuid())
    with pytest.raises(Denied, match="belongs to uid"):
        check_private_dir(mine, os.geteuid() + 1)
    (tmp_path / "file").write_text("")
    with pytest.raises(Denied, match="not a directory"):
        check_private_dir(tmp_path / "file", os.geteuid())


def test_tmp_fallback_taken_by_someone_else() -> None:
    """A ``/tmp/vbus-UID`` that another uid made (or made world-writable) is
    refused, and so is a link put in its place."""
    require(os.geteuid() == 0, "creates a directory for another uid")
    uid = 3_999_999_000 + os.getpid() % 1000  # a uid nobody has
    base = Path(f"/tmp/vbus-{uid}")
    try:
        base.mkdir(mode=0o777)
        base.chmod(0o777)
        with pytest.raises(Denied, match="belongs to uid 0"):
            prepare_run_dir(base / "vbus", explicit=False, uid=uid, env={})
        os.chown(base, uid, uid)
        with pytest.raises(Denied, match="writable by others"):
            prepare_run_dir(base / "vbus", explicit=False, uid=uid, env={})
        base.rmdir()
        base.symlink_to("/tmp")
        with pytest.raises(Denied, match="not a directory"):
            prepare_run_dir(base / "vbus", explicit=False, uid=uid, env={})
    finally:
        if base.is_symlink():
            base.unlink()
        elif base.exists():
            shutil.rmtree(base)


@pytest.mark.integration
def test_daemon_refuses_a_world_writable_run_dir(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    run_dir.chmod(0o777)
    proc = run(
        [
            sys.executable,
            "-m",
            "vbus.daemon",
            "--run-dir",
            str(run_dir),
            "--state",
            str(tmp_path / "state.json"),
            "--no-admin",
        ]
    )
    assert proc.returncode != 0
    assert "writable by others" in proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr + proc.stdout


# --- status and --json -----------------------------------------------------


@pytest.mark.integration
def test_status_and_json(vbusd: Callable[..., Daemon]) -> None:
    daemon = vbusd()
    sock = ["--socket", str(daemon.socket)]
    text = run([*VBUS, *sock, "status"])
    assert text.returncode == 0, text.stderr
    keys = {line.split()[0] for line in text.stdout.splitlines()}
    assert {"pid", "uptime_s", "loop_lag_p99_ms", "clients", "rss_kib", "errors_logged"} <= keys
    figures = json.loads(run([*VBUS, *sock, "status", "--json"]).stdout)
    assert figures["pid"] == daemon.pid
    assert isinstance(figures["loop_lag_p99_ms"], float | int)
    assert figures["loop"] in ("uvloop", "asyncio")
    listing = json.loads(run([*VBUS, *sock, "devices", "--json"]).stdout)
    assert listing == {"bus": "default", "devices": [{"id": 1, "name": "echo0", "class": "echo"}]}


@pytest.mark.integration
def test_status_for_an_administrator_on_no_bus(
    vbusd: Callable[..., Daemon], tmp_path: Path
) -> None:
    """The admin is often on no bus: `vbus status` reads the admin tree's file."""
    config = tmp_path / "other.toml"
    config.write_text('[buses.lab]\nmembers = ["uid:4242"]\n')
    daemon = vbusd("--config", str(config))
    require(daemon.admin_mounted, f"the admin tree did not mount:\n{daemon.log()}")
    figures = json.loads(run([*VBUS, "--socket", str(daemon.socket), "status", "--json"]).stdout)
    assert figures["pid"] == daemon.pid
    refused = run([*VBUS, "--socket", str(daemon.socket), "devices"])
    assert "not a member" in one_line_error(refused)
