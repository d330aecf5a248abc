"""A vbusd of the bench's own: a temporary run directory, state file and topology.

The topology has one bus admitting the bench's uid (and Xen domain 1) with two echo devices:
``sink0`` (mode sink: consumes queue 0 and counts) and ``echo0`` (mode echo);
a subject may bring its own (``topology``).
Readiness comes from the daemon's own ``READY=1`` (``NOTIFY_SOCKET``), not
from its log.  ``wrap`` prefixes the command (a profiler, for instance); the
daemon's pid is then read from its pid file.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

__all__ = [
    "BENCH_DOMID",
    "BENCH_TOPOLOGY",
    "ECHO_DEVICE",
    "SINK_DEVICE",
    "BenchDaemon",
    "cpu_seconds",
    "rss_kib",
]

SINK_DEVICE = "sink0"
ECHO_DEVICE = "echo0"
BENCH_DOMID = 1  # the Xen domain a bench attaches as
BENCH_TOPOLOGY = f"""\
[devices.{SINK_DEVICE}]
class = "echo"
mode = "sink"

[devices.{ECHO_DEVICE}]
class = "echo"
mode = "echo"

[buses.bench]
members = ["uid:self", "domid:{BENCH_DOMID}"]
devices = ["{SINK_DEVICE}", "{ECHO_DEVICE}"]
"""


class BenchDaemon:
    """``with BenchDaemon(loop="uvloop") as daemon: ... daemon.socket ...``"""

    def __init__(
        self,
        loop: str = "uvloop",
        *,
        args: Sequence[str] = (),
        wrap: Sequence[str] = (),
        log_level: str = "warning",
        topology: str = BENCH_TOPOLOGY,
    ) -> None:
        self.loop = loop
        self.topology = topology
        self.args = list(args)
        self.wrap = list(wrap)
        self.log_level = log_level
        self.topology = topology
        self.dir = Path(tempfile.mkdtemp(prefix="vbus-bench-"))
        self.run_dir = self.dir / "run"
        self.socket = self.run_dir / "vbus.sock"
        self.log_path = self.dir / "vbusd.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid = 0

    def start(self, timeout: float = 30.0) -> BenchDaemon:
        config = self.dir / "topology.toml"
        config.write_text(self.topology)
        notify_path = self.dir / "notify.sock"
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        notify.bind(str(notify_path))
        env = dict(os.environ)
        env["NOTIFY_SOCKET"] = str(notify_path)
        env.pop("VBUS_SOCKET", None)
        cmd = [
            *self.wrap,
            sys.executable,
            "-m",
            "vbus.daemon",
            "--run-dir",
            str(self.run_dir),
            "--state",
            str(self.dir / "state.json"),
            "--no-admin",
            "--config",
            str(config),
            "--loop",
            self.loop,
            "--log-format",
            "json",
            "--log-level",
            self.log_level,
            *self.args,
        ]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        try:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"vbusd exited with {self.proc.returncode}:\n{self.log()}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RuntimeError(f"vbusd not ready in {timeout} s:\n{self.log()}")
                notify.settimeout(min(left, 0.1))
                try:
                    if b"READY=1" in notify.recv(4096):
                        break
                except TimeoutError:
                    continue
        except BaseException:
            self.stop()
            raise
        finally:
            notify.close()
        self.pid = int((self.run_dir / "vbusd.pid").read_text().strip())
        return self

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def rss_kib(self) -> int:
        return rss_kib(self.pid)

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pid)

    def stop(self, timeout: float = 20.0) -> int | None:
        code: int | None = None
        if self.proc is not None:
            if self.proc.poll() is None:
                # To the daemon itself: a wrapper (a profiler) may not forward signals.
                target = self.pid or self.proc.pid
                with contextlib.suppress(ProcessLookupError):
                    os.kill(target, signal.SIGTERM)
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            code = self.proc.returncode
            self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)
        return code

    def __enter__(self) -> BenchDaemon:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def rss_kib(pid: int) -> int:
    """Resident set of ``pid`` in KiB (``VmRSS``)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` so far."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
