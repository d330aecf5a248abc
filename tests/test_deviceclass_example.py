"""docs/deviceclass.md holds: its plug-in is the file in examples/deviceclass,
it works under DeviceHarness, and a real vbusd finds it through a real entry
point and serves it to a client."""

from __future__ import annotations

import re
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import Daemon
from vbus.client import connect
from vbus.errors import Invalid, NotSupported
from vbus.testing import DeviceHarness

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "deviceclass"
DOC = ROOT / "docs" / "deviceclass.md"


@pytest.fixture(scope="module")
def upper() -> Iterator[object]:
    sys.path.insert(0, str(EXAMPLE))
    try:
        import vbus_upper

        yield vbus_upper
    finally:
        sys.path.remove(str(EXAMPLE))
        sys.modules.pop("vbus_upper", None)


def blocks(lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", DOC.read_text(), re.MULTILINE | re.DOTALL)


def test_the_page_shows_the_files_as_they_are() -> None:
    assert (EXAMPLE / "vbus_upper.py").read_text() in blocks("python")
    assert (EXAMPLE / "pyproject.toml").read_text() in blocks("toml")


def test_the_pages_harness_test_passes(upper: object) -> None:
    (test_code,) = [b for b in blocks("python") if "def test_" in b]
    namespace: dict[str, object] = {}
    exec(compile(test_code, str(DOC), "exec"), namespace)
    tests = [f for name, f in namespace.items() if name.startswith("test_") and callable(f)]
    assert tests
    for test in tests:
        test()


def test_upper_refuses_what_a_north_gets_wrong(upper: object) -> None:
    Upper = upper.Upper  # type: ignore[attr-defined]
    with DeviceHarness(Upper) as dev:
        with pytest.raises(Invalid, match="wrong direction"):
            dev.queue(0, writable=True)
        with pytest.raises(Invalid, match="does not exist"):
            dev.queue(7, writable=False)
        with pytest.raises(NotSupported):
            dev.call(2, b"")
    with pytest.raises(Invalid):
        DeviceHarness(Upper, {"prefix": "x" * 33})


def test_upper_sleeps_without_room_and_wakes_with_it(upper: object) -> None:
    with DeviceHarness(upper.Upper) as dev:  # type: ignore[attr-defined]
        tx = dev.queue(0, writable=False)
        rx = dev.queue(1, writable=True)
        tx.post_many([b"a", b"b", b"c"])
        assert dev.poll() == 0  # no rx buffer: nothing done, and it sleeps (no Busy)
        rx.post_many([8, 8])
        assert dev.poll() == 2
        rx.post(8)
        assert dev.poll() == 1
        assert rx.written() == [b"A", b"B", b"C"]
        dev.set_attribute("prefix", "#")
        tx.post(b"d")
        rx.post(8)
        dev.poll()
        assert rx.written()[-1] == b"#D"


@pytest.mark.integration
@pytest.mark.asyncio
async def test_a_real_daemon_loads_it_through_its_entry_point(
    vbusd: Callable[..., Daemon], tmp_path: Path
) -> None:
    """What `pip install` would leave: the module and a dist-info with the
    entry point, on the daemon's path."""
    site = tmp_path / "site"
    dist = site / "vbus_upper-0.1.0.dist-info"
    dist.mkdir(parents=True)
    shutil.copy(EXAMPLE / "vbus_upper.py", site)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: vbus-upper\nVersion: 0.1.0\n")
    (dist / "entry_points.txt").write_text("[vbus.deviceclasses]\nupper = vbus_upper:Upper\n")
    config = tmp_path / "upper.toml"
    config.write_text(
        '[devices.up0]\nclass = "upper"\nprefix = "up:"\n'
        '[buses.default]\nmembers = ["uid:self"]\ndevices = ["up0"]\n'
    )
    import os

    env = dict(os.environ, PYTHONPATH=f"{site}{os.pathsep}{ROOT}")
    env.pop("NOTIFY_SOCKET", None)
    daemon = vbusd("--config", str(config), env=env)
    async with connect(daemon.socket) as bus:
        dev = await bus.open("up0")
        assert await dev.call(1, b"abc") == b"ABC"
        tx = await dev.shm(0, "tx", count=16, buf_size=256)
        rx = await dev.shm(1, "rx", count=16, buf_size=256)
        await tx.send_many([b"one", b"two"])
        got: list[bytes] = []
        while len(got) < 2:
            got += await rx.recv_many(2 - len(got))
        assert got == [b"up:ONE", b"up:TWO"]
