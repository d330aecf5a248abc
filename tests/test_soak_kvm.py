"""vbus.soak's kvm catalogue: every hostile guest against a real daemon, next
to good traffic, then ``vbus soak --bad kvm`` itself, briefly.

For each hostile guest: the daemon reacts as docs/design.md 4.5 and section 6
promise (the fault reason, the refusal, the release), a good userspace client
and a well-behaved simulated guest on the same device meanwhile lose and
corrupt nothing and keep moving, and the daemon's descriptors and memfd
mappings come back to what they were.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import TEST_LOOP, Daemon
from tests.test_soak import _soak, _topology
from vbus.kvmsim import SimGuest
from vbus.soak.catalogue import Context, Misbehaviour, catalogue, run_instance
from vbus.soak.good import GoodClient

pytestmark = pytest.mark.integration

# behaviour -> (what its reaction must say, extra check on the outcome)
EXPECTED: dict[str, tuple[tuple[str, ...], Callable[[Any], bool]]] = {
    "kvm_bridge": (("fault BRIDGE",), lambda o: o.faults == 1),
    "kvm_call_ring": (("fault CALL_RING",), lambda o: o.faults == 1),
    "kvm_address": (("fault ADDRESS",), lambda o: o.faults == 1),
    "kvm_storm": (("fault DOORBELL_STORM",), lambda o: o.faults == 1),
    "kvm_stall": (("backpressure", "none lost"), lambda o: o.faults == 0),
    "kvm_register": (("refused", "disconnected"), lambda o: o.faults == 1),
    "kvm_crash": (("released on",), lambda o: o.detect_s is not None),
    "kvm_namespace": (("probes refused alike",), lambda o: o.faults >= 9),
}


def test_the_kvm_catalogue_is_complete() -> None:
    assert [cls.name for cls in catalogue("kvm")] == list(EXPECTED)
    no_kvm = Context(socket=Path("/nonexistent"))
    for cls in catalogue("kvm"):
        assert cls.connector == "kvm" and cls.summary
        assert cls.unavailable(no_kvm) == "the daemon under test has no kvm.sock"


class _Guest:
    """A well-behaved simulated guest streaming echo traffic beside the bad ones."""

    def __init__(self, path: Path) -> None:
        self.guest = SimGuest(path, "good-guest")
        self.moved = 0
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.guest.register()
        self.guest.boot()
        _handle, tx, rx = await self.guest.echo_pair()
        self.task = asyncio.ensure_future(self._run(tx, rx))

    async def _run(self, tx: Any, rx: Any) -> None:
        round_ = 0
        while True:
            sent = [round_.to_bytes(4, "little") + i.to_bytes(4, "little") * 15 for i in range(128)]
            assert await self.guest.exchange(tx, rx, sent, timeout=30) == sent
            self.moved += len(sent)
            round_ += 1
            await asyncio.sleep(0.002)  # a timer: the other tasks' timers get their turn

    async def stop(self) -> None:
        task = self.task
        assert task is not None
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        self.guest.close()


def _memfd_maps(daemon: Daemon) -> int:
    return daemon.memfd_mappings()


async def _settle(check: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        await asyncio.sleep(0.05)
    return check()


async def _beside_good_traffic(daemon: Daemon, cls: type[Misbehaviour]) -> None:
    ctx = Context(
        socket=daemon.socket,
        kvm_socket=daemon.run_dir / "kvm.sock",
        hidden=("secret0",),
        timeout=10.0,
        read_log=daemon.log,
    )
    assert cls.unavailable(ctx) is None
    good = GoodClient(1, daemon.socket, rate=2000, call_interval=0.01)
    guest = _Guest(daemon.run_dir / "kvm.sock")
    await good.start()
    await guest.start()
    try:
        await asyncio.sleep(0.3)
        fds, maps = daemon.fd_count(), _memfd_maps(daemon)
        moved, guest_moved = good.stats.received, guest.moved
        for _ in range(2):  # twice: each run picks another variant
            outcome = await run_instance(cls(), ctx)
            must_say, check = EXPECTED[cls.name]
            assert outcome.ok, outcome
            assert any(word in outcome.reaction for word in must_say), outcome
            assert check(outcome), outcome
            assert outcome.reclaimed is not False, outcome
            assert outcome.pending is None, outcome
            if cls.expect not in ("absorbed", "backpressure"):
                assert outcome.detect_s is not None and outcome.detect_s < ctx.timeout, outcome
        assert await _settle(lambda: good.stats.received > moved + 500), "the good client stopped"
        assert await _settle(lambda: guest.moved > guest_moved + 500), "the good guest stopped"
        assert good.failed() is None
        assert await _settle(lambda: daemon.fd_count() == fds), "descriptors not back"
        assert await _settle(lambda: _memfd_maps(daemon) == maps), "mappings not back"
    finally:
        await guest.stop()
        await good.stop(drain_timeout=5)
        await good.close()
    stats = good.stats
    assert stats.sent > 500 and stats.received == stats.sent
    assert (stats.lost, stats.corrupted, stats.call_errors, stats.call_corrupted) == (0, 0, 0, 0)


@pytest.mark.parametrize("cls", catalogue("kvm"), ids=lambda cls: cls.name)
async def test_hostile_guest_is_dealt_with_and_nobody_else_notices(
    vbusd: Callable[..., Daemon], tmp_path: Path, cls: type[Misbehaviour]
) -> None:
    daemon = vbusd("--no-admin", "--config", _topology(tmp_path))
    await asyncio.wait_for(_beside_good_traffic(daemon, cls), 90)
    assert '"level": "error"' not in daemon.log()


@pytest.mark.skipif(
    TEST_LOOP != "uvloop", reason="the soak starts its own daemon; run once, in the uvloop pass"
)
def test_soak_kvm_briefly(tmp_path: Path) -> None:
    proc, result = _soak(tmp_path, "--duration", "8", "--good", "2", "--bad", "kvm", timeout=120)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert result is not None and result["passed"]
    good = result["good"]["final"]
    assert good["sent"] > 10_000 and good["lost"] == good["corrupted"] == 0
    samples = result["daemon"]["samples"]
    assert samples["end"]["fds"] == samples["baseline"]["fds"]
    assert samples["final"]["fds"] == samples["start"]["fds"]
    ran = result["misbehaviours"]
    assert set(ran) == set(EXPECTED), ran
    for name, summary in ran.items():
        assert summary["instances"] >= 1 and summary["failed"] == 0, (name, summary)
    assert os.path.exists(tmp_path / "soak.json")
