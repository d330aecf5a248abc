"""Shared test plumbing: the event loop under test, loop-error guard, a real vbusd.

``VBUS_TEST_LOOP`` (uvloop, the default, or asyncio) picks the loop for async
tests and for the daemons that integration tests start; ``make test`` runs the
suite once per loop.  Any exception that reaches a loop's exception handler
during an async test fails that test.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import uvloop

TEST_LOOP = os.environ.get("VBUS_TEST_LOOP", "uvloop")
IN_CI = os.environ.get("CI") == "true"


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    if TEST_LOOP == "asyncio":
        return {"asyncio": asyncio.new_event_loop}
    return {"uvloop": uvloop.new_event_loop}


ASYNC_TEST_TIMEOUT = float(os.environ.get("VBUS_ASYNC_TEST_TIMEOUT", "60"))


def _bounded(test: Callable[..., Any]) -> Callable[..., Any]:
    """The test coroutine under asyncio.wait_for: a hung await fails the test
    from inside the loop (a signal-based timeout may not reach into it)."""

    @functools.wraps(test)
    async def bounded(*args: Any, **kwargs: Any) -> Any:
        return await asyncio.wait_for(test(*args, **kwargs), ASYNC_TEST_TIMEOUT)

    return bounded


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("asyncio") is not None:
            item.add_marker(pytest.mark.usefixtures("_loop_guard"))
            if isinstance(item, pytest.Function) and inspect.iscoroutinefunction(item.obj):
                item.obj = _bounded(item.obj)


@pytest.fixture
async def _loop_guard() -> Any:
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    yield
    loop.set_exception_handler(None)
    assert not errors, f"exceptions reached the event loop: {errors}"


def require(condition: bool, reason: str) -> None:
    """Skip for a missing real part, except under CI where that is a failure."""
    if not condition:
        if IN_CI:
            pytest.fail(f"required under CI: {reason}")
        pytest.skip(reason)


class Daemon:
    """A vbusd subprocess in its own run directory."""

    def __init__(
        self,
        run_dir: Path,
        args: list[str],
        env: dict[str, str] | None = None,
        preexec_fn: Callable[[], None] | None = None,
    ) -> None:
        self.run_dir = run_dir
        self.socket = run_dir / "vbus.sock"
        self.admin = run_dir / "admin"
        self.state = run_dir.parent / f"{run_dir.name}.state.json"
        self.log_path = run_dir.parent / f"{run_dir.name}.log"
        self.args = args
        self.env = env
        self.preexec_fn = preexec_fn  # e.g. a small RLIMIT_NOFILE for the daemon
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20.0) -> Daemon:
        cmd = [
            sys.executable,
            "-m",
            "vbus.daemon",
            "--run-dir",
            str(self.run_dir),
            "--state",
            str(self.state),
            "--loop",
            TEST_LOOP,
            "--log-format",
            "json",
            "--log-level",
            "debug",
            *self.args,
        ]
        env = dict(os.environ if self.env is None else self.env)
        if self.env is None:
            env.pop("NOTIFY_SOCKET", None)
        self._log = open(self.log_path, "ab")  # noqa: SIM115
        since = self._log.tell()  # a restart appends: only its own lines count
        self.proc = subprocess.Popen(
            cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env, preexec_fn=self.preexec_fn
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vbusd exited with {self.proc.returncode}:\n{self.log()}")
            if b'"daemon.ready"' in self.log_path.read_bytes()[since:]:
                return self
            time.sleep(0.02)
        raise RuntimeError(f"vbusd did not become ready in {timeout} s:\n{self.log()}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def admin_mounted(self) -> bool:
        return '"admin.unavailable"' not in self.log() and os.path.ismount(self.admin)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def logged(self, text: str, timeout: float = 15.0) -> bool:
        """Whether ``text`` reaches the log within ``timeout`` s: lines are written
        by a thread of the daemon's own, on their own time."""
        deadline = time.monotonic() + timeout
        while text not in self.log():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"vbusd did not stop within {timeout} s") from None
        self._log.close()
        return self.proc.returncode

    def fd_count(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def memfd_mappings(self) -> int:
        """Mappings of client memory (memfds) in the daemon.  (All mappings would
        also count the allocator's arenas, which come and go on their own.)"""
        with open(f"/proc/{self.pid}/maps") as f:
            return sum(1 for line in f if "/memfd:" in line)


@pytest.fixture
def vbusd(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    """Factory: ``vbusd(*args)`` starts a daemon; all are stopped (and checked) at teardown.

    ``preexec_fn`` runs in the daemon's process before it starts (resource
    limits); ``reachable=True`` puts its run directory where other uids can
    reach the socket (pytest's own temporary directories are private)."""
    started: list[Daemon] = []
    counter = iter(range(1000))
    shared: list[Path] = []

    def start(
        *args: str,
        env: dict[str, str] | None = None,
        preexec_fn: Callable[[], None] | None = None,
        reachable: bool = False,
    ) -> Daemon:
        base = tmp_path
        if reachable:
            if not shared:
                shared.append(Path(tempfile.mkdtemp(prefix="vbus-test-")))
                os.chmod(shared[0], 0o755)
            base = shared[0]
        daemon = Daemon(base / f"run{next(counter)}", list(args), env, preexec_fn)
        started.append(daemon)
        return daemon.start()

    yield start
    try:
        for daemon in started:
            if daemon.proc is not None and daemon.proc.poll() is None:
                code = daemon.stop()
                log = daemon.log()
                assert code == 0, f"vbusd exited with {code}:\n{log}"
            log = daemon.log()
            assert '"loop.exception"' not in log, f"exception in the daemon's loop:\n{log}"
            assert "Traceback" not in log or '"device.error"' in log, f"traceback in log:\n{log}"
    finally:
        for path in shared:
            shutil.rmtree(path, ignore_errors=True)
