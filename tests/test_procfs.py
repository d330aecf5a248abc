"""ProcTasks against the real /proc, and against crafted stat files."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vbus.core.members import Peer, TaskInfo
from vbus.procfs import ProcTasks, boot_id, task_starttime


def _pid_max() -> int:
    try:
        return int(Path("/proc/sys/kernel/pid_max").read_text())
    except OSError:
        return 4194304


def _stat_field(pid: int, number: int) -> int:
    text = Path(f"/proc/{pid}/stat").read_text()
    return int(text[text.rindex(")") + 2 :].split()[number - 3])


@pytest.fixture
def tasks() -> ProcTasks:
    return ProcTasks()


@pytest.fixture
def child() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


def test_is_a_task_info(tasks: ProcTasks) -> None:
    info: TaskInfo = tasks
    assert info.starttime(os.getpid()) is not None


def test_this_process(tasks: ProcTasks) -> None:
    pid = os.getpid()
    start = tasks.starttime(pid)
    assert isinstance(start, int) and start > 0
    assert start == _stat_field(pid, 22) == task_starttime(pid)
    assert tasks.starttime(pid) == start  # stable
    assert tasks.parent(pid) == os.getppid()
    assert tasks.uid(pid) == os.getuid()


def test_parent_process(tasks: ProcTasks) -> None:
    ppid = os.getppid()
    parent_start = tasks.starttime(ppid)
    own_start = tasks.starttime(os.getpid())
    assert parent_start is not None and own_start is not None
    assert parent_start <= own_start
    assert tasks.uid(ppid) is not None


def test_child_process(tasks: ProcTasks, child: subprocess.Popen[bytes]) -> None:
    start = tasks.starttime(child.pid)
    own_start = tasks.starttime(os.getpid())
    assert start is not None and own_start is not None and start >= own_start
    assert tasks.parent(child.pid) == os.getpid()
    assert tasks.uid(child.pid) == os.getuid()
    child.kill()
    child.wait()
    assert tasks.starttime(child.pid) is None
    assert tasks.parent(child.pid) is None
    assert tasks.uid(child.pid) is None


def test_ancestry_reaches_init(tasks: ProcTasks) -> None:
    pid: int | None = os.getpid()
    chain: list[int] = []
    while pid is not None and len(chain) < 4096:
        chain.append(pid)
        pid = tasks.parent(pid)
    assert chain[-1] == 1 or tasks.parent(chain[-1]) is None
    assert tasks.parent(1) is None


@pytest.mark.parametrize("pid", [0, -1, -4242])
def test_impossible_pids(tasks: ProcTasks, pid: int) -> None:
    assert tasks.starttime(pid) is None
    assert tasks.parent(pid) is None
    assert tasks.uid(pid) is None


def test_pid_that_does_not_exist(tasks: ProcTasks) -> None:
    missing = _pid_max() + 1
    assert tasks.starttime(missing) is None
    assert tasks.parent(missing) is None
    assert tasks.uid(missing) is None
    assert task_starttime(missing) is None


def test_non_int_pids(tasks: ProcTasks) -> None:
    assert tasks.starttime(True) is None
    assert tasks.starttime("self") is None  # type: ignore[arg-type]
    assert tasks.uid(None) is None  # type: ignore[arg-type]


def test_command_name_with_spaces_and_parentheses(tasks: ProcTasks, tmp_path: Path) -> None:
    sleep = shutil.which("sleep")
    if sleep is None:
        pytest.skip("no sleep binary")
    weird = tmp_path / "a) b (c) 1 2"
    shutil.copy(sleep, weird)
    proc = subprocess.Popen([str(weird), "60"])
    try:
        # Until the child has exec'd, its comm is still the parent's.
        deadline = time.monotonic() + 10
        comm = ""
        while ")" not in comm and time.monotonic() < deadline:
            comm = Path(f"/proc/{proc.pid}/comm").read_text().rstrip("\n")
            time.sleep(0.01)
        assert ")" in comm and " " in comm
        assert tasks.parent(proc.pid) == os.getpid()
        assert tasks.starttime(proc.pid) == _stat_field(proc.pid, 22)
    finally:
        proc.kill()
        proc.wait()


def _fake_proc(root: Path, pid: int, stat: bytes | None, status: bytes | None = None) -> None:
    directory = root / str(pid)
    directory.mkdir()
    if stat is not None:
        (directory / "stat").write_bytes(stat)
    if status is not None:
        (directory / "status").write_bytes(status)


def _stat_line(pid: int, comm: bytes, ppid: int, starttime: int) -> bytes:
    # Fields 3..22: state, ppid, pgrp, session, tty, tpgid, flags, minflt,
    # cminflt, majflt, cmajflt, utime, stime, cutime, cstime, priority, nice,
    # num_threads, itrealvalue, starttime; then a few more.
    rest = [b"S", str(ppid).encode()] + [b"0"] * 17 + [str(starttime).encode(), b"1", b"2"]
    return str(pid).encode() + b" (" + comm + b") " + b" ".join(rest) + b"\n"


def test_crafted_stat_files(tmp_path: Path) -> None:
    _fake_proc(
        tmp_path, 5, _stat_line(5, b"x) S 999 (y", 77, 12345), b"Name:\tx\nUid:\t1001\t0\t0\t0\n"
    )
    _fake_proc(tmp_path, 6, _stat_line(6, b"\xff\xfe))", 0, 6), b"Name:\ty\n")
    _fake_proc(tmp_path, 7, b"7 (truncated")
    _fake_proc(tmp_path, 8, b"8 (short) S 1\n", b"Uid:\tnope\n")
    _fake_proc(tmp_path, 9, _stat_line(9, b"ok", 1, 5).replace(b" 5 1 2", b" x 1 2"), b"Uid:\n")
    _fake_proc(tmp_path, 10, None)
    tasks = ProcTasks(str(tmp_path))
    assert (tasks.starttime(5), tasks.parent(5), tasks.uid(5)) == (12345, 77, 1001)
    assert (tasks.starttime(6), tasks.parent(6), tasks.uid(6)) == (6, None, None)
    assert (tasks.starttime(7), tasks.parent(7), tasks.uid(7)) == (None, None, None)
    assert (tasks.starttime(8), tasks.parent(8), tasks.uid(8)) == (None, 1, None)
    assert (tasks.starttime(9), tasks.parent(9), tasks.uid(9)) == (None, 1, None)
    assert (tasks.starttime(10), tasks.parent(10), tasks.uid(10)) == (None, None, None)
    assert tasks.boot_id() is None


def test_boot_id() -> None:
    value = boot_id()
    assert value is not None and len(value) == 36 and value.count("-") == 4
    assert ProcTasks().boot_id() == value


def test_resolves_a_real_child_through_a_pid_rule(child: subprocess.Popen[bytes]) -> None:
    from vbus.core.model import Topology
    from vbus.core.registry import Registry

    tasks = ProcTasks()
    topo = Topology(Registry(), tasks, os.getuid(), boot_id=boot_id())
    topo.create_bus("mine")
    topo.add_member("mine", str(os.getpid()))
    peer = Peer(child.pid, os.getuid(), os.getgid(), tasks.starttime(child.pid))
    assert topo.resolve(peer) is topo.bus("mine")
    assert topo.resolve(Peer(os.getppid(), os.getuid(), os.getgid())) is None
