"""The Xen connector's dom0 form, its xenstore side, without a hypervisor.

A second vbusd runs with ``--xen dom0`` against the first one's embedded
xenstore (``XENSTORED_PATH``), which plays the system's xenstored; the test
plays libxl and netfront in that store.  What needs the hypervisor (mapping
the rings, the data path) is tests/test_xen_real.py's; here a map fails as
it does on a host without gntdev, and that path is checked too.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from tests.conftest import Daemon
from vbus.errors import VbusError
from vbus.xen.xsclient import XsClient
from vbus.xen.xswire import XsError

pytestmark = pytest.mark.integration

CONFIG = """\
[devices.vif0]
class = "venet"
[devices.vif1]
class = "venet"
[devices.solo]
class = "venet"
[buses.lab]
members = ["domid:5", "domid:6"]
devices = ["vif0", "vif1"]
[buses.alone]
members = ["domid:8"]
devices = ["solo"]
"""


def be(domid: int) -> str:
    return f"/local/domain/0/backend/vif/{domid}/0"


def fe(domid: int) -> str:
    return f"/local/domain/{domid}/device/vif/0"


async def toolstack(xs: XsClient, domid: int, bridge: str | None) -> None:
    """What libxl writes for a vif with backend=0."""
    await xs.write(f"{fe(domid)}/state", "1")
    await xs.write(f"{fe(domid)}/backend", be(domid))
    await xs.write(f"{be(domid)}/frontend", fe(domid))
    await xs.write(f"{be(domid)}/frontend-id", str(domid))
    if bridge is not None:
        await xs.write(f"{be(domid)}/bridge", bridge)
    await xs.write(f"{be(domid)}/state", "1")


async def read(xs: XsClient, path: str) -> str | None:
    try:
        return (await xs.read(path)).decode()
    except (VbusError, XsError):
        return None


async def until(what: str, check: Callable[[], Awaitable[bool]], timeout: float = 15) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await check():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def exists(xs: XsClient, path: str) -> bool:
    return await read(xs, path) is not None


async def state(xs: XsClient, domid: int, value: str) -> None:
    async def reached() -> bool:
        return await read(xs, f"{be(domid)}/state") == value

    await until(f"backend {domid} in state {value}", reached)


@pytest.fixture
def pair(vbusd: Callable[..., Daemon], tmp_path: Path) -> tuple[Daemon, Daemon]:
    store = vbusd("--no-admin")
    config = tmp_path / "dom0.toml"
    config.write_text(CONFIG)
    env = dict(os.environ, XENSTORED_PATH=str(store.run_dir / "xenstored.sock"))
    env.pop("NOTIFY_SOCKET", None)
    dom0 = vbusd("--no-admin", "--xen", "dom0", "--config", str(config), env=env)
    return store, dom0


async def connect(daemon: Daemon) -> XsClient:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(daemon.run_dir / "xenstored.sock"))
    return XsClient(sock, asyncio.get_running_loop())


def test_dom0_without_a_xenstored_does_not_start(tmp_path: Path) -> None:
    env = dict(os.environ, XENSTORED_PATH=str(tmp_path / "absent.sock"))
    done = subprocess.run(
        [sys.executable, "-m", "vbus.daemon", "--run-dir", str(tmp_path / "run"),
         "--state", str(tmp_path / "state.json"), "--no-admin", "--xen", "dom0"],
        capture_output=True, text=True, timeout=30, env=env,
    )  # fmt: skip
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert "dom0 interface" in last and "absent.sock" in last, done.stderr
    assert "Traceback" not in done.stderr


async def test_the_interface_is_said_at_start(pair: tuple[Daemon, Daemon]) -> None:
    store, dom0 = pair
    assert store.logged('"interface": "shims"')  # not a dom0 here: auto picks the shims
    assert dom0.logged('"interface": "dom0"') and dom0.logged('"serves": "vif"')


async def test_an_admitted_vif_waits_and_the_toolstack_closes_it(
    pair: tuple[Daemon, Daemon],
) -> None:
    _store, dom0 = pair
    xs = await connect(_store)
    try:
        await toolstack(xs, 5, "vif0")
        await state(xs, 5, "2")  # InitWait, its features offered
        for key in ("feature-rx-copy", "feature-sg", "feature-gso-tcpv4"):
            assert await read(xs, f"{be(5)}/{key}") == "1"
        assert dom0.logged('"xen.vif_admitted"')
        assert '"device": "vif0"' in next(
            ln for ln in dom0.log().splitlines() if '"xen.vif_admitted"' in ln
        )
        await xs.write(f"{be(5)}/state", "5")  # xl destroy: libxl writes Closing ...
        await state(xs, 5, "6")  # ... and waits for Closed
        await xs.rm("/local/domain/0/backend/vif/5")
        assert dom0.logged('"xen.vif_removed"')
        await asyncio.sleep(0.3)  # nothing writes into the removed directory again
        assert await read(xs, be(5)) is None
    finally:
        xs.close()


@pytest.mark.parametrize(
    ("domid", "bridge", "reason"),
    [
        (7, "vif0", "domid 7 is not a member of any bus"),
        (5, "nosuch", "has several network devices (vif0, vif1)"),
    ],
)
async def test_a_vif_that_cannot_be_served_gets_no_backend(
    pair: tuple[Daemon, Daemon], domid: int, bridge: str, reason: str
) -> None:
    store, dom0 = pair
    xs = await connect(store)
    try:
        await toolstack(xs, domid, bridge)
        assert dom0.logged('"xen.vif_refused"')
        refused = next(ln for ln in dom0.log().splitlines() if '"xen.vif_refused"' in ln)
        assert reason in refused
        # the log line comes first, then the write
        await until("the error key", lambda: exists(xs, f"{be(domid)}/error"))
        error = await read(xs, f"{be(domid)}/error")
        assert error is not None and reason in error
        assert await read(xs, f"{be(domid)}/state") == "1"  # no InitWait: libxl gives up
    finally:
        xs.close()


async def test_the_only_network_device_of_the_bus_needs_no_bridge(
    pair: tuple[Daemon, Daemon],
) -> None:
    store, dom0 = pair
    xs = await connect(store)
    try:
        await toolstack(xs, 8, "xenbr0")  # xl's default bridge names no device
        await state(xs, 8, "2")
        assert '"device": "solo"' in next(
            ln for ln in dom0.log().splitlines() if '"xen.vif_admitted"' in ln
        )
    finally:
        xs.close()


@pytest.mark.parametrize(
    ("keys", "reason"),
    [
        ({}, "the frontend has no tx-ring-ref"),
        (
            {"tx-ring-ref": "8", "rx-ring-ref": "9", "event-channel": "x", "request-rx-copy": "1"},
            "event-channel is not a number",
        ),
        (
            {"tx-ring-ref": "8", "rx-ring-ref": "9", "event-channel": "3", "request-rx-copy": "0"},
            "does not request rx-copy",
        ),
        # good keys: the map itself fails here (no /dev/xen/gntdev), as a bad grant would
        (
            {"tx-ring-ref": "8", "rx-ring-ref": "9", "event-channel": "3", "request-rx-copy": "1"},
            "gntdev",
        ),
    ],
)
async def test_a_frontend_that_cannot_be_connected_is_closed_with_the_reason(
    pair: tuple[Daemon, Daemon], keys: dict[str, str], reason: str
) -> None:
    store, dom0 = pair
    xs = await connect(store)
    try:
        fds = dom0.fd_count()
        await toolstack(xs, 6, "vif1")
        await state(xs, 6, "2")
        for key, value in keys.items():
            await xs.write(f"{fe(6)}/{key}", value)
        await xs.write(f"{fe(6)}/state", "4")  # netfront goes straight to Connected
        await state(xs, 6, "5")  # Closing, with the reason
        error = await read(xs, f"{be(6)}/error")
        assert error is not None and reason in error, error
        assert dom0.logged('"xen.vif_disconnected"')
        assert dom0.fd_count() == fds  # nothing it opened on the way is left
        await xs.write(f"{fe(6)}/state", "6")  # netfront follows to Closed
        await state(xs, 6, "6")
        await xs.write(f"{fe(6)}/state", "1")  # its driver bound again: a new start
        await state(xs, 6, "2")
        assert await read(xs, f"{be(6)}/error") is None  # the last fault's reason went
    finally:
        xs.close()
