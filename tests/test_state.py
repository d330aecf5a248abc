"""The persisted admin state: atomic, durable, refused when damaged."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from vbus.admin.state import FORMAT_VERSION, StateStore
from vbus.errors import Invalid


def store_of(tmp_path: Path, state: dict[str, Any] | None = None) -> StateStore:
    current = {"value": 0} if state is None else state
    return StateStore(tmp_path / "sub" / "state.json", lambda: dict(current))


def test_first_start_has_no_state(tmp_path: Path) -> None:
    assert store_of(tmp_path).load() is None


def test_save_then_load_round_trips(tmp_path: Path) -> None:
    store = store_of(tmp_path)
    store.save_sync({"buses": {"b0": {"devices": ["x"]}}})
    assert store.load() == {"buses": {"b0": {"devices": ["x"]}}}
    document = json.loads(store.path.read_text())
    assert document["version"] == FORMAT_VERSION
    assert store.saves == 1
    assert oct(store.path.stat().st_mode & 0o777) == "0o600"


def test_save_leaves_no_temporary_file(tmp_path: Path) -> None:
    store = store_of(tmp_path)
    store.save_sync({"a": 1})
    store.save_sync({"a": 2})
    assert sorted(p.name for p in store.path.parent.iterdir()) == ["state.json"]


def test_interrupted_save_leaves_the_old_state_whole(tmp_path: Path) -> None:
    store = store_of(tmp_path)
    store.save_sync({"a": 1})
    # A crash between writing the temporary file and the rename:
    leftover = store.path.parent / f".{store.path.name}.12345.tmp"
    leftover.write_text('{"version": 1, "topology": {"a": ')
    assert store.load() == {"a": 1}
    assert store.clear_leftovers() == 1
    assert not leftover.exists()


@pytest.mark.parametrize(
    "content, reason",
    [
        (b"{not json", "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        (b'{"version": 99, "topology": {}}', "unknown format"),
        (b"[]", "unknown format"),
        (b'{"version": 1, "topology": []}', "holds no topology"),
    ],
)
def test_damaged_state_is_refused_not_replaced(tmp_path: Path, content: bytes, reason: str) -> None:
    store = store_of(tmp_path)
    store.path.parent.mkdir(parents=True)
    store.path.write_bytes(content)
    with pytest.raises(Invalid, match=reason):
        store.load()
    assert store.path.read_bytes() == content


async def test_commits_are_serialised_and_the_last_one_wins(tmp_path: Path) -> None:
    state = {"value": 0}
    store = StateStore(tmp_path / "state.json", lambda: dict(state))

    async def change(value: int) -> None:
        state["value"] = value
        await store.commit()

    await asyncio.wait_for(asyncio.gather(*(change(i) for i in range(1, 21))), 30)
    assert store.load() == {"value": 20}
    assert store.saves == 20


def test_fsync_failure_surfaces(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = store_of(tmp_path)
    store.save_sync({"a": 1})

    def failing_fsync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError):
        store.save_sync({"a": 2})
    monkeypatch.undo()
    assert store.load() == {"a": 1}
    assert sorted(p.name for p in store.path.parent.iterdir()) == ["state.json"]


async def test_async_save_fails_like_the_sync_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failing disk under ``commit`` surfaces, keeps the old state, leaves no temp file."""
    state = {"a": 1}
    store = StateStore(tmp_path / "state.json", lambda: dict(state))
    await store.commit()

    def failing_fsync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    state["a"] = 2
    with pytest.raises(OSError):
        await store.commit()
    monkeypatch.undo()
    assert store.load() == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]
    assert oct(store.path.stat().st_mode & 0o777) == "0o600"


async def test_a_slow_disk_never_stalls_the_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each fsync of a commit takes 0.4 s here; the loop keeps running meanwhile
    (measured by the daemon's own lag monitor), and the commit still waits for
    them.  The same fsync called on the loop is seen by the monitor: the
    measurement can see a stall."""
    from vbus.loopmon import LoopMonitor

    real_fsync = os.fsync
    slow = 0.4

    def slow_fsync(fd: int) -> None:
        time.sleep(slow)
        real_fsync(fd)

    store = store_of(tmp_path)
    monkeypatch.setattr(os, "fsync", slow_fsync)
    monitor = LoopMonitor(asyncio.get_running_loop(), interval=0.01)
    monitor.start()
    started = time.monotonic()
    await store.commit()
    took = time.monotonic() - started
    await asyncio.sleep(0.05)
    off_loop = monitor.worst
    store.save_sync({"value": 1})  # the blocking form, on the loop: a stall
    await asyncio.sleep(0.05)
    monitor.stop()
    assert took >= 2 * slow  # the file's fsync and the directory's were awaited
    assert off_loop < slow / 2, f"the loop stalled {off_loop:.3f} s during commit()"
    assert monitor.worst >= slow, "the monitor did not see a blocking fsync"


def test_keep_previous_copies_whatever_the_file_holds(tmp_path: Path) -> None:
    store = store_of(tmp_path)
    assert store.keep_previous() is None  # nothing to keep on a first start
    assert not store.previous_path.exists()
    store.path.parent.mkdir()
    store.path.write_bytes(b"{damaged")
    assert store.keep_previous() == store.previous_path == store.path.with_name("state.json.old")
    assert store.previous_path.read_bytes() == b"{damaged"
    assert store.path.read_bytes() == b"{damaged"  # a copy: the reset's save replaces the file
    store.save_sync({"a": 1})
    assert store.load() == {"a": 1}
    assert sorted(p.name for p in store.path.parent.iterdir()) == ["state.json", "state.json.old"]
