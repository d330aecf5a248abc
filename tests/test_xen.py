"""The Xen connector end to end: a domain attaches to a real vbusd, its frontend and the
backend walk the XenbusState handshake through the embedded xenstore, and echo traffic
crosses rings in granted pages.  Every rule a domain can break faults that domain only;
Xen's own xenstore tools watch it all.
"""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import Daemon, require
from vbus.errors import Busy, Closed, Denied
from vbus.memory import PAGE_SIZE
from vbus.net.calls import CALL_LINK_UP, CALL_MAC, CALL_NEGOTIATE, NEGOTIATED, U64
from vbus.net.vnet import F_VERSION_1, HDR_SIZE, header
from vbus.xen.abi import XenbusState, backend_path, frontend_path
from vbus.xen.domu import DomU, Frontend
from vbus.xen.grants import GTF_READING, GTF_WRITING
from vbus.xen.xswire import XsError, XsType

pytestmark = pytest.mark.integration

TOPOLOGY = """
[devices.echo0]
class = "echo"
[devices.other]
class = "echo"
[buses.lab]
members = ["domid:7", "domid:8"]
devices = ["echo0"]
[buses.elsewhere]
members = ["domid:9"]
devices = ["other"]
[devices.v0]
class = "venet"
[devices.v1]
class = "venet"
[buses.net]
members = ["domid:10", "domid:11"]
devices = ["v0", "v1"]
"""
N_ECHO = 100_000


@pytest.fixture
def daemon(vbusd: Callable[..., Daemon], tmp_path: Path) -> Daemon:
    config = tmp_path / "xen.toml"
    config.write_text(textwrap.dedent(TOPOLOGY))
    return vbusd("--config", str(config))


def xen_sock(daemon: Daemon) -> Path:
    return daemon.run_dir / "xen.sock"


def xs_env(daemon: Daemon) -> dict[str, str]:
    require(shutil.which("xenstore-ls") is not None, "xenstore-utils not installed")
    return {**os.environ, "XENSTORED_PATH": str(daemon.run_dir / "xenstored.sock")}


def xs(daemon: Daemon, *args: str) -> str:
    done = subprocess.run(args, env=xs_env(daemon), capture_output=True, text=True, timeout=20)
    return done.stdout if done.returncode == 0 else f"ERROR {done.stderr.strip()}"


async def echo(frontend: Frontend, n: int) -> None:
    tx, rx = frontend.queues[0], frontend.queues[1]
    payloads = [i.to_bytes(8, "little") * 8 for i in range(n)]

    async def receive() -> list[bytes]:
        got: list[bytes] = []
        while len(got) < n:
            got += await rx.recv_many(n - len(got))
        return got

    receiving = asyncio.ensure_future(receive())
    await tx.send_many(payloads)
    assert await receiving == payloads


async def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def test_attach_handshake_echo_and_xenstore_tools(daemon: Daemon) -> None:
    env = xs_env(daemon)
    watcher = subprocess.Popen(
        ["xenstore-watch", "/local/domain/0/backend/vbus"], env=env,
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert watcher.stdout is not None
    first = watcher.stdout.readline()  # the event at registration: the watch is in place
    try:
        domu = await DomU.attach(xen_sock(daemon), 7, name="guest7")
        assert domu.bus == "lab"
        assert await domu.devices() == [(1, "echo0", "echo")]  # only its bus's devices
        frontend = await domu.frontend("echo0")
        assert await frontend.call(1, b"ping") == b"ping"
        await echo(frontend, N_ECHO)
        listing = xs(daemon, "xenstore-ls", "/local/domain")
        assert 'name = "guest7"' in listing
        front, back = frontend_path(7, 1), backend_path(7, 1)
        assert xs(daemon, "xenstore-read", f"{front}/state", f"{back}/state") == "4\n4\n"
        assert f'backend = "{back}"' in listing and f'frontend = "{front}"' in listing
        assert "ring-ref" in listing and "event-channel" in listing
        # Xen refuses to end access to a grant the backend maps.
        ring = frontend.queues[0].ring_ref
        assert domu.grants.entry(ring)[0] & (GTF_READING | GTF_WRITING)
        assert not domu.end_access(ring)
        await frontend.close()  # ends access to every grant: the backend unmapped them
        assert frontend.state == XenbusState.CLOSED
        assert xs(daemon, "xenstore-read", f"{back}/state") == "6\n"
        await domu.close()
        await wait_for(lambda: "ERROR" in xs(daemon, "xenstore-read", "/local/domain/7/name"),
                       "the domain's nodes to go with RELEASE")  # fmt: skip
        assert xs(daemon, "xenstore-read", f"{back}/online") == "0\n"
    finally:
        watcher.send_signal(signal.SIGTERM)
        out, _ = watcher.communicate(timeout=10)
    assert first.strip() == "/local/domain/0/backend/vbus"
    # Every backend state change, as Xen's own tool sees it: 1, 2, 4, 5, 6.
    assert out.split().count(f"{backend_path(7, 1)}/state") >= 5


async def test_cli_domu_echoes(daemon: Daemon) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "vbus.cli", "xen", "domu", "--domid", "8", "--messages", "20000",
        "--xen-socket", str(xen_sock(daemon)), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err
    text = out.decode()
    assert "attached: domain 8 on bus lab" in text
    assert "echo0 (echo) frontend and backend Connected" in text
    assert "echoed: 20000 messages of 64 B verified" in text


async def test_admission_by_domid_rules_and_unique_domids(daemon: Daemon) -> None:
    with pytest.raises(Denied, match="not a member of any bus"):
        await DomU.attach(xen_sock(daemon), 12)
    first = await DomU.attach(xen_sock(daemon), 7)
    try:
        with pytest.raises(Busy):
            await DomU.attach(xen_sock(daemon), 7)
        other = await DomU.attach(xen_sock(daemon), 9)
        assert [d[1] for d in await other.devices()] == ["other"]
        # Its xenstore connection has domain 9's permissions: domain 7's tree is not its own.
        with pytest.raises(XsError) as info:
            await other.store.read("/local/domain/7/device/vbus/1/backend")
        assert info.value.errno == errno.EACCES
        await other.close()
    finally:
        await first.close()


# --- rules, each faulting the domain that breaks it, and nobody else -----------------------------


async def _bystander(daemon: Daemon) -> tuple[DomU, Frontend]:
    domu = await DomU.attach(xen_sock(daemon), 8)
    return domu, await domu.frontend("echo0")


async def _refused(daemon: Daemon, tamper: Callable[[Frontend], None], match: str) -> None:
    bystander, good = await _bystander(daemon)
    domu = await DomU.attach(xen_sock(daemon), 7)
    try:
        with pytest.raises(Closed, match=match):
            await domu.frontend("echo0", tamper=tamper)
        back = backend_path(7, 1)
        assert xs(daemon, "xenstore-read", f"{back}/state") in ("5\n", "6\n")
        assert match.split()[0] in xs(daemon, "xenstore-read", f"{back}/error")
        await echo(good, 2000)  # the other domain on the same device's bus is served on
    finally:
        domu._release()
        await bystander.close()


async def test_grant_for_another_domid_faults(daemon: Daemon) -> None:
    def tamper(frontend: Frontend) -> None:
        ref = frontend.queues[0].ring_ref
        assert frontend.domu.end_access(ref)
        frontend.domu.grant(ref, domid=3)

    await _refused(daemon, tamper, "is for domain 3")


async def test_frame_outside_the_domain_faults(daemon: Daemon) -> None:
    def tamper(frontend: Frontend) -> None:
        ref = frontend.queues[1].buf_refs[0]
        frontend.domu.grants.atomic.store_u32(ref * 8 + 4, frontend.domu.pages + 100)

    await _refused(daemon, tamper, "outside the domain")


async def test_write_through_a_read_only_grant_faults(daemon: Daemon) -> None:
    bystander, good = await _bystander(daemon)

    def tamper(frontend: Frontend) -> None:
        for ref in frontend.queues[1].buf_refs:  # the device fills these
            assert frontend.domu.end_access(ref)
            frontend.domu.grant(ref, readonly=True)

    domu = await DomU.attach(xen_sock(daemon), 7)
    try:
        frontend = await domu.frontend("echo0", tamper=tamper)
        await frontend.queues[0].send_many([b"x" * 64])
        with pytest.raises(Closed, match="read-only"):
            await asyncio.wait_for(frontend.queues[1].recv_many(1), 15)
        await wait_for(lambda: frontend.state == XenbusState.CLOSED, "the frontend to follow")
        assert frontend.end_access() == []  # the backend let go of every grant
        await echo(good, 2000)
    finally:
        domu._release()
        await bystander.close()


async def test_xenstore_rules_for_a_domain(daemon: Daemon) -> None:
    env = xs_env(daemon)
    domu = await DomU.attach(xen_sock(daemon), 7)
    other = await DomU.attach(xen_sock(daemon), 8)
    try:
        store = domu.store
        for path in ("/local/domain/8/data/x", backend_path(7, 1) + "/state", "/tool/x"):
            with pytest.raises(XsError) as info:
                await store.write(path, "1")
            assert info.value.errno == errno.EACCES, path
        await store.write("data/mine", "1")  # its own data directory
        # Watches: 128 per connection, then E2BIG.
        for i in range(128):
            await store.watch(f"data/w{i}", f"t{i}", lambda _p: None)
        with pytest.raises(XsError) as info:
            await store.watch("data/one-more", "t", lambda _p: None)
        assert info.value.errno == errno.E2BIG
        await store.request(XsType.RESET_WATCHES, b"\0")
        # A node's size counts its children's names: 2048 bytes, then ENOSPC.
        with pytest.raises(XsError) as info:
            for i in range(1000):
                await store.write(f"data/flat/n{i}", "")
        assert info.value.errno == errno.ENOSPC and 300 < i < 500
        await store.rm("data/flat")
        # Nodes: 1000 per domain, what the toolstack gave it included, then ENOSPC.
        written = 0
        with pytest.raises(XsError) as info:
            for i in range(1100):
                await store.write(f"data/d{i // 100}/n{i}", "")
                written += 1
        assert info.value.errno == errno.ENOSPC and 900 < written < 1000
        # A transaction whose node dom0 changed meanwhile: EAGAIN.
        tx = int((await store.request(XsType.TRANSACTION_START, b"\0")).rstrip(b"\0"))
        await store.read("data/mine", tx)
        subprocess.run(["xenstore-write", "/local/domain/7/data/mine", "2"], env=env, check=True)
        with pytest.raises(XsError) as info:
            await store.request(XsType.TRANSACTION_END, b"T\0", tx)
        assert info.value.errno == errno.EAGAIN
        # None of it touched the other domain.
        frontend = await other.frontend("echo0")
        await echo(frontend, 1000)
    finally:
        await other.close()
        domu._release()


async def test_device_unlinked_closes_the_frontend(daemon: Daemon) -> None:
    require(daemon.admin_mounted, "the admin tree (FUSE) is not mounted")
    domu = await DomU.attach(xen_sock(daemon), 7)
    try:
        frontend = await domu.frontend("echo0")
        await echo(frontend, 100)
        await asyncio.to_thread(os.unlink, daemon.admin / "buses" / "lab" / "echo0")
        await wait_for(lambda: frontend.state == XenbusState.CLOSED, "the frontend to close")
        assert isinstance(frontend.error, Closed) and "device_removed" in str(frontend.error)
        await wait_for(lambda: "ERROR" in xs(daemon, "xenstore-read", frontend_path(7, 1)),
                       "the unlinked device's nodes to go")  # fmt: skip
    finally:
        domu._release()


async def test_device_linked_after_attach_is_published_and_serves(daemon: Daemon) -> None:
    """A device linked to the bus of an attached domain appears in its
    xenstore (backend InitWait) and connects; unlinked before any frontend
    used it, its nodes go at once."""
    require(daemon.admin_mounted, "the admin tree (FUSE) is not mounted")
    domu = await DomU.attach(xen_sock(daemon), 7)
    try:
        assert [name for _, name, _ in await domu.devices()] == ["echo0"]
        link = daemon.admin / "buses" / "lab" / "other"
        await asyncio.to_thread(os.symlink, "../../devices/other", link)
        devid = await _devid(domu, "other")
        back = backend_path(7, devid)
        await wait_for(lambda: xs(daemon, "xenstore-read", f"{back}/state").strip() == "2",
                       "the new device's backend in InitWait")  # fmt: skip
        frontend = await domu.frontend("other")
        await echo(frontend, 1000)
        await frontend.close()
        await asyncio.to_thread(os.unlink, link)
        await wait_for(lambda: "ERROR" in xs(daemon, "xenstore-read", frontend_path(7, devid)),
                       "the unlinked device's nodes to go")  # fmt: skip
        # linked and unlinked again without a frontend ever connecting
        await asyncio.to_thread(os.symlink, "../../devices/other", link)
        again = await _devid(domu, "other")
        await asyncio.to_thread(os.unlink, link)
        await wait_for(lambda: "ERROR" in xs(daemon, "xenstore-read", backend_path(7, again)),
                       "the idle device's backend nodes to go")  # fmt: skip
        frontend0 = await domu.frontend("echo0")
        await echo(frontend0, 100)  # the first device never noticed
    finally:
        domu._release()


async def _devid(domu: DomU, name: str, timeout: float = 15.0) -> int:
    deadline = time.monotonic() + timeout
    while True:
        found = [devid for devid, n, _ in await domu.devices() if n == name]
        if found:
            return found[0]
        assert time.monotonic() < deadline, f"{name} was never published"
        await asyncio.sleep(0.05)


async def test_sigkilled_domain_is_released(daemon: Daemon) -> None:
    await asyncio.sleep(0.5)
    fds, maps = daemon.fd_count(), daemon.memfd_mappings()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "vbus.cli", "xen", "domu", "--domid", "7",
        "--xen-socket", str(xen_sock(daemon)), stdout=subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    while b"Connected" not in await asyncio.wait_for(proc.stdout.readline(), 30):
        pass
    back = backend_path(7, 1)
    assert xs(daemon, "xenstore-read", f"{back}/state") == "4\n"
    assert daemon.fd_count() > fds and daemon.memfd_mappings() > maps
    proc.send_signal(signal.SIGKILL)
    await proc.wait()
    await wait_for(lambda: xs(daemon, "xenstore-read", f"{back}/state") == "6\n",
                   "the backend to be Closed")  # fmt: skip
    await wait_for(lambda: daemon.fd_count() == fds, "the domain's descriptors to be closed")
    assert daemon.memfd_mappings() == maps
    assert "ERROR" in xs(daemon, "xenstore-read", "/local/domain/7")
    assert '"domain.detached"' in daemon.log()
    # The domid is free again.
    again = await DomU.attach(xen_sock(daemon), 7)
    frontend = await again.frontend("echo0")
    await echo(frontend, 100)
    await again.close()


async def test_venet_frames_between_two_domains(daemon: Daemon) -> None:
    a = await DomU.attach(xen_sock(daemon), 10)
    b = await DomU.attach(xen_sock(daemon), 11)
    try:
        ends = [await a.frontend("v0"), await b.frontend("v1")]
        for end in ends:
            features, rx_size = NEGOTIATED.unpack(
                await end.call(CALL_NEGOTIATE, U64.pack(F_VERSION_1))
            )
            assert features == F_VERSION_1 and rx_size <= end.queues[1].buf_size
            assert await end.call(CALL_LINK_UP) == b"\x01"
        mac = await ends[0].call(CALL_MAC)
        frame = header() + b"\xff" * 6 + mac + b"\x88\xb5" + bytes(range(50))
        await ends[0].queues[0].send_many([frame])  # broadcast: the switch floods it
        got = await asyncio.wait_for(ends[1].queues[1].recv_many(1), 10)
        assert got[0][HDR_SIZE:] == frame[HDR_SIZE:]
        assert PAGE_SIZE % ends[1].queues[1].buf_size == 0  # a buffer never crosses a grant
    finally:
        await a.close()
        await b.close()
