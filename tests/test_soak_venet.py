"""vbus.soak's venet catalogue: each bad venet north against a real daemon.

Every instance runs next to its witness (two more venets of the same switch
pinging each other), which must lose nothing; the daemon's reaction is the
one docs/design.md 3.8 promises, nothing is logged as an error, and its
descriptors come back to what they were.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import Daemon
from vbus.soak.catalogue import CONNECTORS, Context, Misbehaviour, catalogue, run_instance, select
from vbus.soak.catalogue.venet import WITNESS_PORTS

pytestmark = pytest.mark.integration

VENETS = tuple(f"vn{i}" for i in range(4))
TOPOLOGY = (
    "".join(f'[devices.{n}]\nclass = "venet"\nbackend = "switch:soak"\n' for n in VENETS)
    + '[devices.echo0]\nclass = "echo"\n'
    + '[buses.default]\nmembers = ["uid:self"]\ndevices = ['
    + ", ".join(f'"{n}"' for n in ("echo0", *VENETS))
    + "]\n"
)

# behaviour -> (words its reaction must say, what its outcome must show)
EXPECTED: dict[str, tuple[str, Callable[..., bool]]] = {
    "venet_no_rx": ("backpressure", lambda o: o.faults == 0 and "dropped" in o.detail),
    "venet_garbage": ("dropped and counted", lambda o: "runt" in o.detail),
    "venet_rx_oob": ("fault while delivering", lambda o: o.faults == 1 and o.reclaimed),
    "venet_mac_flap": ("table stayed bounded", lambda o: "refused" in o.detail),
    "venet_storm": ("every broadcast flooded", lambda o: "broadcasts" in o.detail),
}


def test_the_venet_catalogue_is_selectable() -> None:
    assert "venet" in CONNECTORS
    assert [cls.name for cls in select("venet")] == list(EXPECTED)
    assert set(catalogue("venet")) <= set(select("all"))
    ctx = Context(socket=Path("/nonexistent"))
    for cls in catalogue("venet"):
        assert "venet devices" in (cls.unavailable(ctx) or "")
        assert cls.unavailable(Context(socket=Path("/x"), venets=VENETS)) is None
        assert cls.ports + WITNESS_PORTS <= len(VENETS)


def _fds_settle(daemon: Daemon, baseline: int, timeout: float = 10.0) -> int:
    deadline = time.monotonic() + timeout
    while daemon.fd_count() != baseline and time.monotonic() < deadline:
        time.sleep(0.05)
    return daemon.fd_count()


@pytest.mark.parametrize("cls", catalogue("venet"), ids=lambda cls: cls.name)
async def test_a_bad_venet_north_hurts_only_itself(
    vbusd: Callable[..., Daemon], tmp_path: Path, cls: type[Misbehaviour]
) -> None:
    config = tmp_path / "topology.toml"
    config.write_text(TOPOLOGY)
    daemon = vbusd("--no-admin", "--config", str(config))
    ctx = Context(socket=daemon.socket, venets=VENETS, timeout=5.0, read_log=daemon.log)
    baseline = daemon.fd_count()
    for _ in range(2):  # twice: the devices are given back and can be driven again
        outcome = await asyncio.wait_for(run_instance(cls(), ctx), 60)
        words, check = EXPECTED[cls.name]
        assert outcome.ok, outcome
        assert words in outcome.reaction, outcome
        assert check(outcome), outcome
        assert "witness" in outcome.detail and "p99" in outcome.detail, outcome
        if cls.expect == "fault":
            assert outcome.detect_s is not None and outcome.detect_s < ctx.timeout, outcome
    assert await asyncio.to_thread(_fds_settle, daemon, baseline) == baseline
    log = daemon.log()
    assert '"level": "error"' not in log
