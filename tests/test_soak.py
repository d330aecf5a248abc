"""vbus.soak: every misbehaviour of the catalogue against a real daemon, next to a good client.

For each bad client: the daemon reacts as docs/design.md section 6 promises (the
right fault / error / disconnect and reason), a good client streaming on the
same device meanwhile loses and corrupts nothing and keeps moving, and the
daemon's descriptors come back to what they were.  Then ``vbus soak`` itself,
20 seconds of it, as a subprocess.  The kvm catalogue's own tests are in
tests/test_soak_kvm.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import TEST_LOOP, Daemon
from vbus.client import connect
from vbus.errors import Closed
from vbus.soak.catalogue import CONNECTORS, Context, Misbehaviour, catalogue, run_instance, select
from vbus.soak.good import GoodClient, check_message, make_message
from vbus.soak.report import check_bounds, render, rss_limit_kib, summarise_outcomes

pytestmark = pytest.mark.integration

HANDSHAKE = 1.0
PENDING_CAP = 8
CONNECTION_CAP = 40
TOPOLOGY = """
[devices.echo0]
class = "echo"
[devices.secret0]
class = "echo"
[devices.vhost_garbage]
class = "venet"
[devices.vhost_bad_table]
class = "venet"
[devices.vhost_bad_ring]
class = "venet"
[devices.vhost_ring_fault]
class = "venet"
[devices.vhost_kick_storm]
class = "venet"
[buses.default]
members = ["uid:self", "domid:100", "domid:101", "domid:102", "domid:103"]
devices = ["echo0", "vhost_garbage", "vhost_bad_table", "vhost_bad_ring", "vhost_ring_fault", "vhost_kick_storm"]
[buses.hidden]
members = ["uid:4242"]
devices = ["secret0"]
"""

# behaviour -> (what its reaction must say, extra check on the outcome)
# The behaviours this file runs one by one (bad venet norths: test_soak_venet.py).
CASES = catalogue("userspace") + catalogue("xen") + catalogue("vhost_user")

EXPECTED: dict[str, tuple[tuple[str, ...], Callable[[Any], bool]]] = {
    "stall": (("backpressure", "none lost"), lambda o: o.faults == 0),
    "garbage": (("fault at",), lambda o: o.faults == 1),
    "oob": (("fault (", "outside", "exceeds"), lambda o: o.faults == 1),
    "toctou": (("fault after", "snapshots held"), lambda o: o.faults <= 1),
    "doorbell_flood": (("coalesced", "still served"), lambda o: o.faults == 0),
    # The outbound queue of a peer that does not read is bounded in bytes (1 MiB):
    # a regression to the frame-only bound let it pin 512 x 32 KiB here.
    "call_flood": (("dropped after",), lambda o: int(o.detail.split("=")[1]) < 128),
    "oversized": (("ERROR", "disconnect"), lambda o: o.faults == 1),
    "truncated": (("disconnect",), lambda o: o.faults == 1),
    "slowloris": (("evicted at the pending cap", "timed out", "refused past"), lambda o: True),
    "fd_abuse": (("bad registrations refused",), lambda o: o.faults == 15),
    "crash": (("released on peer closed the connection",), lambda o: o.detect_s is not None),
    "churn": (("cycles served",), lambda o: o.faults == 0),
    "namespace": (("probes refused alike",), lambda o: o.faults >= 20),
    "blocking_call": (("would block",), lambda o: o.faults == 1),
    "blocking_kick": (("races absorbed", "fault after"), lambda o: True),
    "semaphore_kick": (("semaphore",), lambda o: o.faults == 1),
    "path_fd": (("EINVAL",), lambda o: o.faults == 2),
    "hugetlb_hole": (("hugetlb",), lambda o: o.faults == 1),
    "huge_buffers": (("rounds",), lambda o: o.faults == 0),
    "sparse_memory": (("ENOSPC",), lambda o: o.faults == 2),
    "fd_exhaustion": (("refused past",), lambda o: o.faults >= 1),
    "removed_member": (("BUS_GONE",), lambda o: o.faults == 2),
    "cross_tenant": (("refused alike",), lambda o: o.faults >= 9),
    "garbage_ring_ref": (("fault (",), lambda o: o.faults == 1 and o.detail.endswith("=0")),
    "revoked_grants": (("refused while mapped", "served on"), lambda o: o.faults == 0),
    "evtchn_storm": (("coalesced", "still served"), lambda o: o.faults == 0),
    "xenstore_flood": (("ENOSPC", "E2BIG"), lambda o: o.faults == 2),
    "vhost_garbage": (("disconnected",), lambda o: o.faults == 1),
    "vhost_bad_table": (("nack",), lambda o: o.faults == 1),
    "vhost_bad_ring": (("nack",), lambda o: o.faults == 1),
    "vhost_ring_fault": (("NEEDS_RESET",), lambda o: o.faults == 1),
    "vhost_kick_storm": (("absorbed",), lambda o: o.faults == 0),
}


def test_the_catalogue_is_complete_and_selectable() -> None:
    names = [cls.name for cls in CASES]
    assert names == list(EXPECTED)
    assert CONNECTORS == ("userspace", "kvm", "xen", "vhost_user", "venet")
    assert select("all") == catalogue() == sum((select(c) for c in CONNECTORS), ())
    assert [c.name for c in select("stall, crash,stall")] == ["stall", "crash"]
    with pytest.raises(ValueError, match="unknown misbehaviour 'nope'"):
        select("stall,nope")
    for name in CONNECTORS:
        for cls in catalogue(name):
            assert cls.summary and cls.expect and cls.connector == name
    assert {c.name for c in catalogue("xen")} == {
        "garbage_ring_ref",
        "revoked_grants",
        "evtchn_storm",
        "xenstore_flood",
    }
    assert all(c.name.startswith("kvm_") for c in select("kvm"))
    assert len({cls.name for cls in catalogue()}) == len(catalogue())


def test_good_messages_detect_corruption_and_strangers() -> None:
    msg = make_message(7, 12345, 99)
    assert check_message(msg, 7) == (12345, 99)
    assert check_message(msg, 8) is None  # someone else's message
    for i in range(len(msg)):
        flipped = bytearray(msg)
        flipped[i] ^= 0x10
        assert check_message(bytes(flipped), 7) is None, i
    assert check_message(msg[:-1], 7) is None
    assert check_message(b"short", 7) is None


def _topology(tmp_path: Path) -> str:
    path = tmp_path / "soak-topology.toml"
    path.write_text(textwrap.dedent(TOPOLOGY))
    return str(path)


def _settle(check: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return check()


async def _next_to_a_good_client(daemon: Daemon, cls: type[Misbehaviour]) -> None:
    ctx = Context(
        socket=daemon.socket,
        xen_socket=daemon.run_dir / "xen.sock",
        xen_domids=(100, 101, 102, 103),
        hidden=("secret0",),
        handshake_timeout=HANDSHAKE,
        max_pending_per_uid=PENDING_CAP,
        max_connections_per_uid=CONNECTION_CAP,
        cap_safe=True,  # the good client is connected before the caps are hit
        timeout=5.0,
        read_log=daemon.log,
        vhost_dir=daemon.run_dir / "vhost-user" / "default",
    )
    reason = cls.unavailable(ctx) or (
        "it exhausts a per-uid bound the good client shares" if cls.exhausts_uid else None
    )
    if reason is not None:
        pytest.skip(f"{reason} here; tests/test_hardening.py runs it where it can run")
    good = GoodClient(1, daemon.socket, rate=3000, call_interval=0.01)
    await good.start()
    try:
        await asyncio.sleep(0.3)
        baseline = daemon.fd_count()
        moved = good.stats.received
        for _ in range(2):  # twice: each run picks another variant
            outcome = await run_instance(cls(), ctx)
            must_say, check = EXPECTED[cls.name]
            assert outcome.ok, outcome
            assert any(word in outcome.reaction for word in must_say), outcome
            assert check(outcome), outcome
            assert outcome.reclaimed is not False, outcome
            if cls.expect not in ("absorbed", "backpressure"):
                assert outcome.detect_s is not None and outcome.detect_s < ctx.timeout, outcome
        await asyncio.sleep(0.2)
        assert good.stats.received > moved + 500, "the good client stopped moving"
        assert good.failed() is None
        await asyncio.to_thread(_settle, lambda: daemon.fd_count() == baseline)
        assert daemon.fd_count() == baseline, "descriptors not back to the baseline"
    finally:
        await good.stop(drain_timeout=5)
        await good.close()
    stats = good.stats
    assert stats.sent > 1000 and stats.received == stats.sent
    assert (stats.lost, stats.corrupted, stats.call_errors, stats.call_corrupted) == (0, 0, 0, 0)
    assert stats.calls > 20


@pytest.mark.parametrize("cls", CASES, ids=lambda cls: cls.name)
async def test_misbehaviour_is_detected_and_nobody_else_notices(
    vbusd: Callable[..., Daemon], tmp_path: Path, cls: type[Misbehaviour]
) -> None:
    daemon = vbusd(
        "--no-admin",
        "--config",
        _topology(tmp_path),
        "--handshake-timeout",
        str(HANDSHAKE),
        "--max-pending-per-uid",
        str(PENDING_CAP),
        "--max-connections-per-uid",
        str(CONNECTION_CAP),
    )
    await asyncio.wait_for(_next_to_a_good_client(daemon, cls), 60)
    log = daemon.log()
    assert '"level": "error"' not in log


async def test_closing_a_bus_wakes_a_waiting_recv_with_closed(vbusd: Callable[..., Daemon]) -> None:
    # Found by the soak's harness: the queue's eventfd was closed while a pending
    # recv still had it registered, and the recv died of ValueError(fd -1).
    daemon = vbusd("--no-admin")

    async def scenario() -> None:
        async with connect(daemon.socket) as bus:
            dev = await bus.open("echo0")
            rx = await dev.shm(1, "rx", count=16, buf_size=64)
            waiting = asyncio.ensure_future(rx.recv_many(16))
            await asyncio.sleep(0.05)
            await bus.close()
            with pytest.raises(Closed):
                await waiting

    await asyncio.wait_for(scenario(), 20)


def test_report_renders_and_summarises() -> None:
    outcomes = [
        {"behaviour": "stall", "ok": True, "reaction": "backpressure after 4", "detect_s": 0.001,
         "faults": 0, "reclaimed": True, "detail": ""},
        {"behaviour": "stall", "ok": False, "reaction": "client error", "detect_s": None,
         "faults": 0, "reclaimed": None, "detail": "boom"},
    ]  # fmt: skip
    table = summarise_outcomes(outcomes, [("stall", "userspace", "backpressure")])
    summary = table["stall"].as_dict()
    assert (summary["instances"], summary["ok"], summary["failed"]) == (2, 1, 1)
    assert summary["failures"] == ["client error: boom"]
    assert summary["reactions"] == {"backpressure after 4": 1, "client error": 1}


def _soak(
    tmp_path: Path, *args: str, timeout: float
) -> tuple[subprocess.CompletedProcess[str], Any]:
    out = tmp_path / "soak.json"
    proc = subprocess.run(
        [sys.executable, "-m", "vbus.cli", "soak", "--json", str(out), "--loop", TEST_LOOP, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"},
    )
    result = json.loads(out.read_text()) if out.exists() else None
    return proc, result


@pytest.mark.skipif(
    os.environ.get("VBUS_TEST_LOOP", "uvloop") != "uvloop",
    reason="the soak starts its own daemon; run once, in the uvloop pass",
)
def test_soak_20s(tmp_path: Path) -> None:
    proc, result = _soak(tmp_path, "--duration", "20", "--bad", "all", timeout=150)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert result is not None and result["passed"]
    good = result["good"]
    assert good["ratio"]["msgs_per_s"] >= 0.8
    assert good["final"]["sent"] > 100_000
    assert good["final"]["lost"] == good["final"]["corrupted"] == 0
    assert good["final"]["call_errors"] == good["final"]["call_corrupted"] == 0
    samples = result["daemon"]["samples"]
    assert samples["end"]["fds"] == samples["baseline"]["fds"]
    assert samples["final"]["fds"] == samples["start"]["fds"]
    assert samples["end"]["rss_kib"] <= rss_limit_kib(samples["baseline"]["rss_kib"])
    assert samples["final"]["errors_logged"] == 0
    for name, summary in result["misbehaviours"].items():
        assert summary["instances"] >= 1 and summary["failed"] == 0, (name, summary)
    assert "misbehaviour" in proc.stdout and "PASS" in proc.stdout
    assert render(result).splitlines()[0].startswith("vbus soak: 20 s")


def _passing_result() -> dict[str, Any]:
    sample = {"fds": 22, "clients": 1, "connections": 0, "rss_kib": 100_000, "errors_logged": 0}
    return {
        "good": {
            "ratio": {"msgs_per_s": 1.0},
            "final": {"sent": 10, "lost": 0, "call_errors": 0, "corrupted": 0, "call_corrupted": 0},
            "failures": [],
        },
        "daemon": {
            "samples": {name: dict(sample) for name in ("start", "baseline", "end", "final")},
            "log": "vbusd.log",
            "log_errors": 0,
            "log_loop_exceptions": 0,
            "log_tracebacks": 0,
            "started_by_soak": True,
            "exit_code": 0,
        },
        "misbehaviours": {"stall": {"instances": 3, "ok": 3, "failed": 0}},
    }


def test_rss_bound_is_ten_percent_or_the_allowance() -> None:
    assert rss_limit_kib(100_000) == 110_000
    assert rss_limit_kib(38_000) == 38_000 + 8 * 1024


@pytest.mark.parametrize(
    "breakage",
    [
        lambda r: r["good"]["ratio"].update(msgs_per_s=0.79),
        lambda r: r["good"]["final"].update(lost=1),
        lambda r: r["good"]["final"].update(call_corrupted=1),
        lambda r: r["daemon"]["samples"]["end"].update(rss_kib=110_001),
        lambda r: r["daemon"]["samples"]["end"].update(fds=23),
        lambda r: r["daemon"]["samples"]["final"].update(connections=1),
        lambda r: r["daemon"]["samples"]["final"].update(errors_logged=1),
        lambda r: r["daemon"].update(log_loop_exceptions=1),
        lambda r: r["daemon"].update(exit_code=-9),
        lambda r: r["good"].update(failures=["ValueError()"]),
        lambda r: r["misbehaviours"]["stall"].update(failed=1),
        lambda r: r["misbehaviours"]["stall"].update(instances=0),
    ],
)
def test_every_bound_can_break(breakage: Callable[[dict[str, Any]], None]) -> None:
    result = _passing_result()
    assert all(b.ok for b in check_bounds(result, []))
    assert not all(b.ok for b in check_bounds(result, ["the daemon died"]))
    breakage(result)
    broken = [b.name for b in check_bounds(result, []) if not b.ok]
    assert len(broken) == 1, broken
