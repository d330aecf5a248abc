"""``vbus soak``: the orchestrator.  Daemon, phases, sampling, progress, verdict.

Timeline (``--duration`` is the two measured phases together: a quarter of it,
at least ``MIN_PHASE`` s, is the baseline, the rest misbehaving; the warm-up
and the settling come on top, a few seconds)::

    start daemon (or attach)  -> sample "start"
    good worker up, warm-up   -> baseline phase (good clients only) -> sample "baseline"
    bad worker up             -> misbehaving phase (the same good clients + the catalogue)
    bad worker stopped        -> settle until its connections are gone -> sample "end"
    good worker drained       -> settle -> sample "final"; daemon stopped; verdict

The daemon's health comes from its STATUS call (works when attached too):
RSS, fds, clients, connections, loop lag, errors logged; when the soak started
the daemon it also reads its log (error lines, ``loop.exception``, tracebacks,
when a SIGKILLed client was released) and its CPU time from /proc.

As root, with a daemon of its own, the misbehaving clients run as uid 65534
on a bus of their own that links the same echo device: per-uid caps can then
be hit without locking out the good clients, and the namespace probe has a
real hidden device to look for.  Behaviours that exhaust a per-uid bound run
in a second bad worker as uid 65533, on a bus of its own, so that the other
bad clients never meet that bound.  The daemon the soak starts has the bounds
those behaviours need (shared memory, descriptors), a sink-mode device on the
bad clients' bus, and (as root) its admin tree, through which a bad client
has its own member rule removed; as root the soak also sets a few huge pages
aside for the hugetlb behaviour and gives them back at the end.  Behaviours
that cannot run here are skipped, each with its reason in the report.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import vbus
from vbus.client import Bus, connect
from vbus.errors import VbusError
from vbus.soak.catalogue import Misbehaviour, Outcome, select
from vbus.soak.catalogue.userspace import free_hugepages, resolve_crash
from vbus.soak.report import check_bounds, percentile, render, summarise_outcomes

__all__ = ["SoakConfig", "run_soak"]

NOBODY = 65534
EXHAUSTER = 65533  # the uid of the behaviours that exhaust a per-uid bound
HIDDEN_DEVICE = "secret0"
SINK_DEVICE = "sink0"
TRANSIENT_BUS = "transient"  # no members of its own: a pid rule admits a bad client's child
HUGEPAGES = 4  # set aside (as root) for the hugetlb behaviour
# Limits of the daemon the soak starts: tight enough that the caps are reached
# cheaply, and stated in the JSON.  The good clients hold a few hundred KiB of
# shared memory and a few dozen descriptors: far from the bounds.
SOAK_LIMITS: dict[str, float] = {
    "handshake_timeout": 2.0,
    "max_pending_per_uid": 32,
    "max_connections_per_uid": 128,
    "max_shm_per_peer": 64 << 20,
    "max_shm_per_uid": 128 << 20,
    "max_fds_per_uid": 1024,
}
_SIZES = ("max_shm_per_peer", "max_shm_per_uid")  # given to vbusd as SIZE (K/M/G)
WARMUP = 2.0
SAMPLE_EVERY = 0.5
MIN_PHASE = 2.0  # seconds: the shortest baseline or misbehaving phase worth measuring


@dataclass
class SoakConfig:
    duration: float = 60.0
    good: int = 8
    bad: str = "all"
    json_path: Path | None = None
    attach: Path | None = None
    loop: str = "uvloop"
    rate: float = 10000.0  # messages/s offered by each good client
    device: str = "echo0"
    seed: int = 0
    keep: bool = False  # keep the temporary directory (logs)
    progress: bool | None = None  # None: a refreshing line on a TTY, else periodic lines

    @property
    def baseline_seconds(self) -> float:
        """A quarter of ``duration``, at least ``MIN_PHASE``, leaving the
        misbehaving phase at least as much."""
        quarter = max(MIN_PHASE, round(self.duration * 0.25, 1))
        return min(quarter, max(MIN_PHASE, self.duration - MIN_PHASE))

    @property
    def bad_seconds(self) -> float:
        """The rest of ``duration``: the two phases add up to it."""
        return self.duration - self.baseline_seconds

    def problem(self) -> str | None:
        """Why this configuration cannot run (the option's name and what it takes), or None."""
        shortest = 2 * MIN_PHASE
        if not math.isfinite(self.duration) or self.duration < shortest:
            return (
                f"--duration must be at least {shortest:.0f} s (a baseline and a misbehaving "
                f"phase of at least {MIN_PHASE:.0f} s each), not {self.duration:g}"
            )
        if self.good < 1:
            return f"--good must be at least 1, not {self.good}"
        if not math.isfinite(self.rate) or self.rate <= 0:
            return f"--rate must be a positive number of messages/s, not {self.rate:g}"
        return None


@dataclass
class Worker:
    """A client process: its JSON lines are parsed as they arrive."""

    name: str
    proc: asyncio.subprocess.Process
    stderr_path: Path
    lines: list[dict[str, Any]] = field(default_factory=list)
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    final: asyncio.Event = field(default_factory=asyncio.Event)
    reader: asyncio.Task[None] | None = None

    async def read(self, on_line: Any) -> None:
        assert self.proc.stdout is not None
        while True:
            try:
                raw = await self.proc.stdout.readline()
            except ValueError as exc:  # a line over the limit: say so, keep reading
                on_line({"type": "garbled", "error": str(exc)})
                continue
            if not raw:
                break
            try:
                line = json.loads(raw)
            except ValueError:
                continue
            self.lines.append(line)
            on_line(line)
            if line.get("type") == "ready":
                self.ready.set()
            elif line.get("type") == "final":
                self.final.set()
        self.ready.set()  # a worker that died early must not hang the soak
        self.final.set()

    async def stop(self, timeout: float) -> int | None:
        if self.proc.stdin is not None and not self.proc.stdin.is_closing():
            with contextlib.suppress(ConnectionError):
                self.proc.stdin.write(b"stop\n")
                await self.proc.stdin.drain()
            self.proc.stdin.close()
        try:
            return await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
            return None

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""


class Soak:
    def __init__(self, cfg: SoakConfig, out: TextIO) -> None:
        self.cfg = cfg
        self.out = out
        self.tty = cfg.progress if cfg.progress is not None else out.isatty()
        self.tmp = Path(tempfile.mkdtemp(prefix="vbus-soak-"))
        os.chmod(self.tmp, 0o755)  # the bad worker (uid 65534) reaches the socket through it
        self.socket = cfg.attach or self.tmp / "run" / "vbus.sock"
        self.daemon: asyncio.subprocess.Process | None = None
        self.daemon_pid: int | None = None
        self.log_path = self.tmp / "vbusd.log"
        self.monitor: Bus | None = None
        self.stack = contextlib.AsyncExitStack()
        self.samples: dict[str, dict[str, Any]] = {}
        self.series: list[tuple[float, dict[str, Any]]] = []
        self.ticks: list[dict[str, Any]] = []
        self.outcomes: list[dict[str, Any]] = []
        self.phase = "starting"
        self.phase_start = time.monotonic()
        self.marks: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self.own_uid = cfg.attach is None and os.geteuid() == 0
        self.behaviours = select(cfg.bad)
        self.skipped: dict[str, str] = {}  # behaviour -> why it could not run here
        self.problems: list[str] = []  # things that went wrong outside the bounds' figures
        self.client_cpu: dict[str, float | None] = {}
        self.load: dict[str, float] = {}
        self.bads: list[Worker] = []
        self.hugepages_before: str | None = None  # nr_hugepages to restore at the end
        self.hugepages = 0  # free huge pages the bad clients may take
        self.args: list[str] | None = (
            None  # of the daemon the soak started  # the machine's 1-minute load average per phase start
        )
        self.client_cpu_baseline: float | None = None

    # --- the daemon ------------------------------------------------------------------
    def topology(self) -> str:
        device = self.cfg.device
        # The sink is on the bad clients' bus only: the good clients' bus stays as it was.
        hostile = (
            f"""
            [buses.hostile]
            members = ["uid:{NOBODY}"]
            devices = ["{device}", "{SINK_DEVICE}"]
            [buses.exhaust]
            members = ["uid:{EXHAUSTER}"]
            devices = ["{device}"]
            [buses.{TRANSIENT_BUS}]
            devices = ["{device}"]
            """
            if self.own_uid
            else ""
        )
        default_devices = f'"{device}"' if self.own_uid else f'"{device}", "{SINK_DEVICE}"'
        return textwrap.dedent(
            f"""
            [devices.{device}]
            class = "echo"
            [devices.{HIDDEN_DEVICE}]
            class = "echo"
            [devices.{SINK_DEVICE}]
            class = "echo"
            mode = "sink"
            [buses.default]
            members = ["uid:self"]
            devices = [{default_devices}]
            [buses.hidden]
            members = ["uid:4242"]
            devices = ["{HIDDEN_DEVICE}"]
            """
        ) + textwrap.dedent(hostile)

    @property
    def admin_dir(self) -> Path:
        return self.tmp / "run" / "admin"

    def daemon_args(self) -> list[str]:
        topology = self.tmp / "topology.toml"
        topology.write_text(self.topology())
        limits: list[str] = []
        for key, value in SOAK_LIMITS.items():
            text = f"{int(value) >> 20}M" if key in _SIZES else str(value)
            limits += [f"--{key.replace('_', '-')}", text]
        # As root the admin tree is mounted: a bad client changes member rules through it.
        admin = ["--admin-dir", str(self.admin_dir)] if self.own_uid else ["--no-admin"]
        return [
            "--run-dir",
            str(self.tmp / "run"),
            "--state",
            str(self.tmp / "state.json"),
            "--config",
            str(topology),
            *admin,
            "--log-format",
            "json",
            "--loop",
            self.cfg.loop,
            *limits,
        ]

    # --- huge pages for the hugetlb behaviour ---------------------------------------------
    def reserve_hugepages(self) -> int:
        """As root: raise nr_hugepages by HUGEPAGES for the run.  Returns how many
        free huge pages the bad clients may take (0: the behaviour is skipped)."""
        if not self.own_uid or "hugetlb_hole" not in {c.name for c in self.behaviours}:
            return 0
        knob = Path("/proc/sys/vm/nr_hugepages")
        try:
            before = knob.read_text()
            knob.write_text(str(int(before) + HUGEPAGES))
        except (OSError, ValueError):
            return 0
        self.hugepages_before = before
        return HUGEPAGES if free_hugepages() >= HUGEPAGES else 0

    def restore_hugepages(self) -> None:
        if self.hugepages_before is not None:
            with contextlib.suppress(OSError):
                Path("/proc/sys/vm/nr_hugepages").write_text(self.hugepages_before)
            self.hugepages_before = None

    async def start_daemon(self) -> None:
        self.args = self.daemon_args()
        with open(self.log_path, "wb") as log:
            self.daemon = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "vbus.daemon", *self.args, stdout=log, stderr=log
            )
        self.daemon_pid = self.daemon.pid
        deadline = time.monotonic() + 30
        while b'"daemon.ready"' not in self.log_path.read_bytes():
            if self.daemon.returncode is not None or time.monotonic() > deadline:
                raise RuntimeError(f"vbusd did not start:\n{self.log_text()[-3000:]}")
            await asyncio.sleep(0.05)
        if self.own_uid and os.path.ismount(self.admin_dir):
            # libfuse allocates its splice pipe (two descriptors, kept for the
            # mount's life) at the first change made through the tree; make
            # one now so that the "start" sample already counts them.
            warm = self.admin_dir / "buses" / "soak-warm-up"
            await asyncio.to_thread(warm.mkdir)
            await asyncio.to_thread(warm.rmdir)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    async def stop_daemon(self) -> int | None:
        if self.daemon is None or self.daemon.returncode is not None:
            return None if self.daemon is None else self.daemon.returncode
        self.daemon.send_signal(signal.SIGTERM)
        try:
            return await asyncio.wait_for(self.daemon.wait(), 20)
        except TimeoutError:
            self.daemon.kill()
            await self.daemon.wait()
            self.problems.append("vbusd did not stop within 20 s of SIGTERM")
            return None

    def daemon_cpu(self) -> float | None:
        return None if self.daemon_pid is None else cpu_seconds(self.daemon_pid)

    # --- sampling ---------------------------------------------------------------------
    async def status(self) -> dict[str, Any]:
        assert self.monitor is not None
        raw = await asyncio.wait_for(self.monitor.status(), 10)
        parsed: dict[str, Any] = {}
        for key, value in raw.items():
            try:
                parsed[key] = int(value)
            except ValueError:
                try:
                    parsed[key] = float(value)
                except ValueError:
                    parsed[key] = value
        return parsed

    async def sample(self, name: str) -> dict[str, Any]:
        sample = await self.status()
        sample["t"] = time.monotonic()
        self.samples[name] = sample
        return sample

    async def poll_status(self) -> None:
        while True:
            await asyncio.sleep(SAMPLE_EVERY)
            try:
                self.series.append((time.monotonic(), await self.status()))
            except (VbusError, TimeoutError) as exc:
                self.problems.append(f"STATUS failed during the run: {exc}")
                return

    async def settle(self, clients: int, connections: int, fds: int | None, limit: float) -> bool:
        """Wait until the daemon is back to ``clients``/``connections``/``fds``."""
        deadline = time.monotonic() + limit
        while True:
            now = await self.status()
            if (
                now.get("clients") == clients
                and now.get("connections") == connections
                and (fds is None or now.get("fds") == fds)
            ):
                return True
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.1)

    # --- workers ------------------------------------------------------------------------
    async def spawn(
        self, role: str, args: list[str], uid: int | None = None, label: str | None = None
    ) -> Worker:
        label = label or role
        stderr_path = self.tmp / f"{label}.err"
        # (uvloop's subprocess_exec has no user=/group=: the worker drops them itself.)
        drop = ["--as-uid", str(uid)] if uid is not None else []
        # The workers run this vbus, wherever it was imported from (from "/", an
        # installed copy elsewhere would win).
        here = str(Path(vbus.__file__).resolve().parent.parent)
        path = os.environ.get("PYTHONPATH")
        env = {**os.environ, "PYTHONPATH": here + (os.pathsep + path if path else "")}
        with open(stderr_path, "wb") as err:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "vbus.soak.worker",
                "--loop",
                self.cfg.loop,
                *drop,
                role,
                *args,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=err,
                cwd="/" if uid is not None else None,
                env=env,
                limit=1 << 24,  # a tick carries latency samples: lines can be long
            )
        worker = Worker(label, proc, stderr_path)
        on_line = self.on_good_line if role == "good" else self.on_bad_line
        worker.reader = asyncio.ensure_future(worker.read(on_line))
        return worker

    def on_good_line(self, line: dict[str, Any]) -> None:
        if line.get("type") == "tick":
            self.ticks.append(line)
        elif line.get("type") == "garbled":
            self.problems.append(f"good worker report lost: {line['error']}")

    def on_bad_line(self, line: dict[str, Any]) -> None:
        if line.get("type") == "outcome":
            self.outcomes.append(line)
        elif line.get("type") == "ready":
            self.skipped.update(line.get("skipped") or {})
        elif line.get("type") == "garbled":
            self.problems.append(f"bad worker report lost: {line['error']}")

    # --- progress -------------------------------------------------------------------------
    def good_rate(self, window: float = 1.0) -> float:
        if len(self.ticks) < 2:
            return 0.0
        last = self.ticks[-1]
        first = next(
            (t for t in reversed(self.ticks) if last["t"] - t["t"] >= window), self.ticks[0]
        )
        dt = last["t"] - first["t"]
        return (last["received"] - first["received"]) / dt if dt > 0 else 0.0

    async def show_progress(self) -> None:
        last_line = 0.0
        while True:
            await asyncio.sleep(0.5)
            now = time.monotonic()
            total = {
                "warm-up": WARMUP,
                "baseline": self.cfg.baseline_seconds,
                "misbehaving": self.cfg.bad_seconds,
            }.get(self.phase)
            elapsed = now - self.phase_start
            faults = sum(int(o.get("faults") or 0) for o in self.outcomes)
            failed = sum(1 for o in self.outcomes if not o.get("ok"))
            lag = self.series[-1][1].get("loop_lag_p99_ms") if self.series else None
            lag_text = "-" if not isinstance(lag, int | float) else f"{lag:.1f}"
            text = (
                f"[{self.phase} {elapsed:5.1f}"
                + (f"/{total:.0f} s]" if total else " s]")
                + f" good {self.good_rate():>9,.0f} msg/s  bad instances {len(self.outcomes):>5,}"
                + f"  faults dealt {faults:>6,}  failed {failed}  daemon lag p99 {lag_text} ms"
            )
            if self.tty:
                self.out.write("\r\x1b[K" + text)
                self.out.flush()
            elif now - last_line >= 5.0:
                self.out.write(text + "\n")
                self.out.flush()
                last_line = now

    def set_phase(self, name: str) -> None:
        self.phase = name
        self.phase_start = time.monotonic()
        self.marks[name] = self.phase_start
        self.load[name] = round(os.getloadavg()[0], 2)
        cpu = self.daemon_cpu()
        if cpu is not None:
            self.cpu[name] = cpu
        if not self.tty:
            self.out.write(f"phase: {name}\n")
            self.out.flush()

    # --- the run ---------------------------------------------------------------------------
    async def run(self) -> dict[str, Any]:
        cfg = self.cfg
        good: Worker | None = None
        bads: list[Worker] = []
        background: list[asyncio.Task[None]] = []
        exit_code: int | None = None
        try:
            if cfg.attach is None:
                self.hugepages = self.reserve_hugepages()
                await self.start_daemon()
            self.monitor = await self.stack.enter_async_context(
                connect(self.socket, name="soak-monitor")
            )
            start = await self.sample("start")
            self.daemon_pid = self.daemon_pid or int(start.get("pid", 0)) or None
            background.append(asyncio.ensure_future(self.poll_status()))
            background.append(asyncio.ensure_future(self.show_progress()))

            self.set_phase("warm-up")
            good = await self.spawn(
                "good",
                [
                    "--socket",
                    str(self.socket),
                    "--device",
                    cfg.device,
                    "--clients",
                    str(cfg.good),
                    "--rate",
                    str(cfg.rate),
                ],
            )
            await asyncio.wait_for(good.ready.wait(), 30)
            if good.proc.returncode is not None or not any(
                line.get("type") == "ready" for line in good.lines
            ):
                raise RuntimeError(f"the good clients did not start:\n{good.stderr()[-3000:]}")
            try:
                bads = await self.phases(good, start)
            except (VbusError, TimeoutError, OSError) as exc:
                # The daemon died or stopped answering: that is the verdict, not a crash.
                self.problems.append(f"the run was cut short in phase {self.phase}: {exc!r}")
        finally:
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            if self.tty:
                self.out.write("\r\x1b[K")
                self.out.flush()
            bads = bads or self.bads
            for worker in (*bads, good):
                if worker is not None and worker.proc.returncode is None:
                    worker.proc.kill()
                    await worker.proc.wait()
            await self.stack.aclose()
            exit_code = await self.stop_daemon()
            self.restore_hugepages()
        return self.result(exit_code, good, bads)

    async def phases(self, good: Worker, start: dict[str, Any]) -> list[Worker]:
        """Warm-up, baseline, misbehaving, settling, draining; returns the bad workers."""
        cfg = self.cfg
        await asyncio.sleep(WARMUP)

        self.set_phase("baseline")
        good_cpu = cpu_seconds(good.proc.pid)
        await asyncio.sleep(cfg.baseline_seconds)
        self.client_cpu_baseline = _delta(cpu_seconds(good.proc.pid), good_cpu)
        self.marks["baseline_end"] = time.monotonic()
        await self.sample("baseline")

        bads = self.bads
        for uid, label, group in self.bad_groups():
            bads.append(await self.spawn("bad", self.bad_args(group, uid), uid, label))
        for bad in bads:
            await asyncio.wait_for(bad.ready.wait(), 30)
        self.set_phase("misbehaving")
        good_cpu = cpu_seconds(good.proc.pid)
        bad_cpu = [cpu_seconds(bad.proc.pid) for bad in bads]
        await asyncio.sleep(cfg.bad_seconds)
        self.marks["misbehaving_end"] = time.monotonic()
        spent = [_delta(cpu_seconds(b.proc.pid), c) for b, c in zip(bads, bad_cpu, strict=True)]
        self.client_cpu = {
            "good_worker": _delta(cpu_seconds(good.proc.pid), good_cpu),
            "bad_worker": None if None in spent else round(sum(filter(None, spent)), 2),
        }
        self.set_phase("settling")
        for bad, code in zip(
            bads, await asyncio.gather(*(bad.stop(timeout=60) for bad in bads)), strict=True
        ):
            if code != 0:
                self.problems.append(f"{bad.name} exited with {code}: {bad.stderr()[-2000:]}")
        good_now = cfg.good + 1  # the good clients and the monitor
        if not await self.settle(good_now, cfg.good, self.samples["baseline"]["fds"], 15):
            self.problems.append("the daemon did not settle back after the bad clients left")
        await self.sample("end")

        self.set_phase("draining")
        code = await good.stop(timeout=30)
        if code != 0:
            self.problems.append(f"the good worker exited with {code}: {good.stderr()[-2000:]}")
        if not await self.settle(1, 0, start["fds"], 10):
            self.problems.append("the daemon did not settle back after the good clients left")
        await self.sample("final")
        return bads

    def bad_groups(self) -> list[tuple[int | None, str, list[type[Misbehaviour]]]]:
        """(uid, label, behaviours) of each bad worker.  As root, those that
        exhaust a per-uid bound get a uid (and a bus) of their own."""
        if not self.own_uid:
            return [(None, "bad", list(self.behaviours))]
        shared = [c for c in self.behaviours if not c.exhausts_uid]
        alone = [c for c in self.behaviours if c.exhausts_uid]
        groups: list[tuple[int | None, str, list[type[Misbehaviour]]]] = []
        if shared:
            groups.append((NOBODY, "bad", shared))
        if alone:
            groups.append((EXHAUSTER, "bad-exhaust", alone))
        return groups

    def bad_args(self, group: list[type[Misbehaviour]], uid: int | None) -> list[str]:
        cfg = self.cfg
        args = [
            "--socket",
            str(self.socket),
            "--device",
            cfg.device,
            "--bad",
            ",".join(c.name for c in group),
            "--seed",
            str(cfg.seed),
            "--hidden",
            HIDDEN_DEVICE if cfg.attach is None else "",
            "--timeout",
            "10",
        ]
        if cfg.attach is None:
            for key, value in SOAK_LIMITS.items():
                args += [f"--{key.replace('_', '-')}", str(value)]
            args += ["--sink-device", SINK_DEVICE, "--hugepages", str(self.hugepages)]
            members = self.admin_dir / "buses" / TRANSIENT_BUS / "members"
            if self.own_uid and os.path.ismount(self.admin_dir) and members.exists():
                args += ["--members-file", str(members)]
        if uid is not None:
            args += ["--own-uid", "--own-bus"]
        return args

    # --- the verdict -------------------------------------------------------------------------
    def phase_good(self, start: float, end: float) -> dict[str, Any]:
        ticks = [t for t in self.ticks if start <= t["t"] <= end]
        before = [t for t in self.ticks if t["t"] < start]
        first = before[-1] if before else (ticks[0] if ticks else None)
        last = ticks[-1] if ticks else None
        calls: list[int] = []
        ring: list[int] = []
        lag: list[int] = []
        for tick in ticks:
            calls += tick["call_lat_us"]
            ring += tick["ring_lat_us"]
            lag += tick.get("lag_us", [])

        def delta(key: str) -> int:
            if first is None or last is None:
                return 0
            return int(last[key] - first[key])

        dt = (last["t"] - first["t"]) if first is not None and last is not None else 0.0

        def lat(values: list[int], q: float) -> float | None:
            p = percentile(values, q)
            return None if p is None else p / 1e6

        return {
            "seconds": round(dt, 3),
            "msgs_per_s": delta("received") / dt if dt > 0 else 0.0,
            "received": delta("received"),
            "lost": delta("lost"),
            "corrupted": delta("corrupted"),
            "skipped": delta("skipped"),
            "calls": delta("calls"),
            "call_errors": delta("call_errors"),
            "call_corrupted": delta("call_corrupted"),
            "call_p50_s": lat(calls, 0.5),
            "call_p99_s": lat(calls, 0.99),
            "call_max_s": lat(calls, 1.0),
            "ring_p50_s": lat(ring, 0.5),
            "ring_p99_s": lat(ring, 0.99),
            "client_lag_p99_s": lat(lag, 0.99),
            "client_lag_max_s": lat(lag, 1.0),
        }

    def result(
        self, exit_code: int | None, good: Worker | None, bads: list[Worker]
    ) -> dict[str, Any]:
        cfg = self.cfg
        log = self.log_text() if self.daemon is not None else ""
        # Crashed clients: only the daemon's log knows when they were released.
        for line in self.outcomes:
            if line.get("pending") and log:
                outcome = Outcome(
                    **{k: v for k, v in line.items() if k in Outcome.__dataclass_fields__}
                )
                if resolve_crash(outcome, log):
                    line.update(outcome.as_dict())
                else:
                    line.update(ok=False, reaction="killed client never released")
        base_start = self.marks.get("baseline", 0.0)
        base_end = self.marks.get("baseline_end", base_start)
        bad_start = self.marks.get("misbehaving", base_end)
        bad_end = self.marks.get("misbehaving_end", bad_start)
        base = self.phase_good(base_start, base_end)
        during = self.phase_good(bad_start, bad_end)

        def ratio(a: float | None, b: float | None) -> float | None:
            return None if not a or b is None else b / a

        final_line = next(
            (line for line in (good.lines if good else []) if line.get("type") == "final"), None
        )
        totals = {
            key: sum(c[key] for c in final_line["clients"]) if final_line else 0
            for key in (
                "sent",
                "received",
                "lost",
                "corrupted",
                "calls",
                "call_errors",
                "call_corrupted",
                "skipped",
            )
        }
        good_failures = list(final_line["failures"]) if final_line else ["no final report"]
        for tick in self.ticks:
            good_failures += [f for f in tick.get("failures", []) if f not in good_failures]

        summaries = summarise_outcomes(
            self.outcomes,
            [
                (c.name, c.connector, c.expect)
                for c in self.behaviours
                if c.name not in self.skipped
            ],
        )
        samples = self.samples
        cpu: dict[str, float] = {}
        if "misbehaving" in self.cpu and "baseline" in self.cpu:
            cpu["baseline"] = round(self.cpu["misbehaving"] - self.cpu["baseline"], 2)
        if "settling" in self.cpu and "misbehaving" in self.cpu:
            cpu["misbehaving"] = round(self.cpu["settling"] - self.cpu["misbehaving"], 2)
        daemon = {
            "pid": self.daemon_pid,
            "started_by_soak": self.daemon is not None,
            "args": self.args,
            "limits": SOAK_LIMITS if self.daemon is not None else None,
            "exit_code": exit_code,
            "samples": samples,
            "cpu_per_phase": cpu,
            "client_cpu": {
                "baseline": {"good_worker": self.client_cpu_baseline},
                "misbehaving": self.client_cpu,
            },
            "log": str(self.log_path) if self.daemon is not None else None,
            "log_errors": _count_level(log, ("error", "critical")) if log else None,
            "log_loop_exceptions": log.count('"loop.exception"') if log else None,
            "log_tracebacks": log.count("Traceback") if log else None,
            "series": [{"t": t, **s} for t, s in self.series],
        }
        result: dict[str, Any] = {
            "command": " ".join(["vbus", "soak", *sys.argv[2:]])
            if sys.argv[1:2] == ["soak"]
            else None,
            "config": {
                "duration": cfg.duration,
                "good": cfg.good,
                "bad": cfg.bad,
                "behaviours": [c.name for c in self.behaviours],
                "loop": cfg.loop,
                "rate": cfg.rate,
                "device": cfg.device,
                "seed": cfg.seed,
                "attach": str(cfg.attach) if cfg.attach else None,
                "bad_uid": NOBODY if self.own_uid else os.geteuid(),
                "cpus": os.cpu_count(),
                "load_average": self.load,
            },
            "phases": {
                "baseline": {"seconds": base_end - base_start},
                "misbehaving": {"seconds": bad_end - bad_start},
            },
            "good": {
                "baseline": base,
                "misbehaving": during,
                "ratio": {
                    "msgs_per_s": ratio(base["msgs_per_s"], during["msgs_per_s"]),
                    "call_p50": ratio(base["call_p50_s"], during["call_p50_s"]),
                    "call_p99": ratio(base["call_p99_s"], during["call_p99_s"]),
                    "ring_p99": ratio(base["ring_p99_s"], during["ring_p99_s"]),
                    "client_lag_p99": ratio(base["client_lag_p99_s"], during["client_lag_p99_s"]),
                },
                "final": totals,
                "clients": final_line["clients"] if final_line else [],
                "failures": good_failures,
            },
            "daemon": daemon,
            "misbehaviours": {name: s.as_dict() for name, s in summaries.items()},
            "skipped": dict(self.skipped),
            "outcomes": self.outcomes,
            "problems": self.problems,
        }
        for bad in bads:
            final_bad = next((x for x in bad.lines if x.get("type") == "final"), None)
            if final_bad is None:
                self.problems.append(f"{bad.name} gave no final report")
            elif final_bad.get("errors") or final_bad.get("unfinished"):
                self.problems.append(f"{bad.name}: {final_bad}")
            if "Traceback" in bad.stderr():
                self.problems.append(f"{bad.name} stderr: {bad.stderr()[-2000:]}")
        if good is not None and "Traceback" in good.stderr():
            self.problems.append(f"good worker stderr: {good.stderr()[-2000:]}")
        result["bounds"] = [b.as_dict() for b in check_bounds(result, self.problems)]
        result["passed"] = all(b["ok"] for b in result["bounds"])
        return result

    def cleanup(self) -> None:
        if not self.cfg.keep:
            shutil.rmtree(self.tmp, ignore_errors=True)


def _delta(after: float | None, before: float | None) -> float | None:
    return None if after is None or before is None else round(after - before, 2)


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process so far (None once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _count_level(log: str, levels: tuple[str, ...]) -> int:
    needles = tuple(f'"level": "{level}"' for level in levels)
    return sum(1 for line in log.splitlines() if any(n in line for n in needles))


async def run_soak(cfg: SoakConfig, out: TextIO = sys.stdout) -> int:
    """Run the soak, print progress and the table; returns the exit status
    (0: every bound held, 1: a bound was broken, 2: the soak could not run)."""
    problem = cfg.problem()
    if problem is not None:
        sys.stderr.write(f"vbus soak: {problem}\n")
        return 2
    soak = Soak(cfg, out)
    try:
        try:
            result = await soak.run()
        except (RuntimeError, VbusError, OSError, TimeoutError) as exc:
            out.write(f"vbus soak: could not run: {exc}\n")
            return 2
        out.write(render(result) + "\n")
        if soak.problems:
            for problem in soak.problems:
                out.write(f"  problem: {problem}\n")
        if cfg.json_path is not None:
            cfg.json_path.write_text(json.dumps(result, indent=1, default=str) + "\n")
        if cfg.keep:
            out.write(f"kept {soak.tmp}\n")
        out.flush()
        return 0 if result["passed"] else 1
    finally:
        soak.cleanup()
