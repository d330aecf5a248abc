"""vbusd: the host daemon.  Wiring, event loop, logging and lifecycle only.

Start-up: load the deviceclasses, check ``--config``, take the run
directory's lock, build the topology (the state file, else ``--config`` or
the embedded default), serve the userspace socket (``vbus.sock``) and the kvm
one (``kvm.sock``), tell systemd ``READY=1``.
A start that fails says why in one line on stderr and exits 1.
SIGTERM/SIGINT: tell every client, release everything, remove the socket,
exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import faulthandler
import fcntl
import math
import os
import resource
import signal
import socket
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from vbus import __version__
from vbus.admin.fs import AdminTree
from vbus.admin.mount import AdminMount, mount_admin_tree
from vbus.admin.state import StateStore, default_state_path
from vbus.connectors.base import Connector, Limits
from vbus.connectors.kvm import KvmConnector
from vbus.connectors.userspace import UserspaceConnector
from vbus.connectors.vhost_user import VhostUserConnector
from vbus.connectors.xen import XenConnector
from vbus.connectors.xen_dom0 import XenDom0Connector, xenstored_socket
from vbus.core.config import apply_config, check_config, default_config_text, load_config_text
from vbus.core.model import Topology
from vbus.core.registry import Registry
from vbus.core.resources import Ledger, ResourceLimits, format_size, parse_size
from vbus.errors import VbusError
from vbus.log import configure, errors_logged, get_logger
from vbus.log import flush as flush_log
from vbus.loopmon import LoopMonitor
from vbus.paths import default_run_dir, prepare_run_dir
from vbus.procfs import ProcTasks
from vbus.xen import dom0
from vbus.xen.xenstore import XenstoreServer

__all__ = ["main"]

log = get_logger("vbus.daemon")


class StartupError(Exception):
    """A reason not to start, said in one line."""


TOPOLOGY_AT_START = """\
topology at start:
  1. the state file (--state), if it exists: what the admin tree last had;
     --config is then not applied (a warning says so), but it is still checked
  2. else --config FILE
  3. else the embedded default: bus 'default' admitting the daemon's uid, with
     the echo device 'echo0'
  --reset-state skips 1: the state file is replaced by 2 or 3, the previous
  one kept as STATE.old.

A failed start prints one line (vbusd: FILE:LINE: KEY: what is wrong) and
exits with status 1.  With $NOTIFY_SOCKET set (systemd Type=notify) it sends
READY=1 once it serves, and STOPPING=1.
"""


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default only where it means something and the text has not
    already said it: not for flags, not for None (computed at start)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "(default" in text or action.default in (None, False, argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)


def _xen_interface(choice: str) -> str:
    """``dom0`` or ``shims``: ``auto`` is dom0 exactly in Xen's control domain."""
    if choice != "auto":
        return choice
    return "dom0" if dom0.detect() else "shims"


def build_parser() -> argparse.ArgumentParser:
    limits = Limits()
    parser = argparse.ArgumentParser(
        prog="vbusd",
        description="The vbus host daemon: serves virtual devices on buses to processes\n"
        "over a Unix socket and shared-memory rings.",
        epilog=TOPOLOGY_AT_START,
        formatter_class=_HelpFormatter,
    )
    parser.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="TOML topology to start with when there is no state file yet (default: the "
        "embedded one); a missing or bad FILE is an error even when it is not applied",
    )
    parser.add_argument(
        "--reset-state",
        action="store_true",
        help="start from --config (or the embedded default) even if the state file exists: "
        "it is replaced, the previous one kept as STATE.old",
    )
    parser.add_argument(
        "--run-dir",
        type=Path,
        default=None,
        metavar="RUN_DIR",
        help="directory for vbus.sock and the lock (default: /run/vbus as root, "
        "else $XDG_RUNTIME_DIR/vbus)",
    )
    parser.add_argument(
        "--state",
        type=Path,
        default=None,
        metavar="STATE",
        help="where the admin state is persisted (default: /var/lib/vbus/state.json as "
        "root, else $XDG_STATE_HOME/vbus/state.json)",
    )
    parser.add_argument(
        "--admin-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="mount point of the admin tree (default: RUN_DIR/admin)",
    )
    parser.add_argument(
        "--no-admin", action="store_true", help="do not mount the admin tree (FUSE)"
    )
    parser.add_argument(
        "--loop",
        choices=("uvloop", "asyncio"),
        default="uvloop",
        help="event loop: uvloop, or the standard library's asyncio",
    )
    parser.add_argument(
        "--log-format",
        choices=("console", "json"),
        default="console",
        help="log lines on stderr: for people, or one JSON object per line",
    )
    parser.add_argument(
        "--log-level",
        choices=("debug", "info", "warning", "error"),
        default="info",
        help="the least important events logged",
    )
    parser.add_argument(
        "--handshake-timeout",
        type=_seconds,
        default=limits.handshake_timeout,
        metavar="SECONDS",
        help="time a new connection has to say HELLO",
    )
    parser.add_argument(
        "--max-connections-per-uid",
        type=_count,
        default=limits.max_connections_per_uid,
        metavar="N",
        help="connections one uid may hold at once",
    )
    parser.add_argument(
        "--max-pending-per-uid",
        type=_count,
        default=limits.max_pending_per_uid,
        metavar="N",
        help="connections per uid that may wait for their handshake at once",
    )
    bounds = ResourceLimits()
    parser.add_argument(
        "--max-shm-per-peer",
        type=_size,
        default=bounds.shm_per_peer,
        metavar="SIZE",
        help=f"shared memory one connection may register, e.g. 512M "
        f"(default: {format_size(bounds.shm_per_peer)})",
    )
    parser.add_argument(
        "--max-shm-per-uid",
        type=_size,
        default=bounds.shm_per_uid,
        metavar="SIZE",
        help=f"shared memory all connections of one uid may register "
        f"(default: {format_size(bounds.shm_per_uid)})",
    )
    parser.add_argument(
        "--max-shm-total",
        type=_size,
        default=0,
        metavar="SIZE",
        help="shared memory all connections together may register (default: half of RAM)",
    )
    parser.add_argument(
        "--max-fds-per-uid",
        type=_count,
        default=0,
        metavar="N",
        help="descriptors the connections of one uid may make the daemon hold "
        "(default: a quarter of what RLIMIT_NOFILE leaves above the reserve)",
    )
    parser.add_argument(
        "--fd-reserve",
        type=_count,
        default=0,
        metavar="N",
        help="descriptors no client can take: the admin tree, logs, new connections "
        "(default: max(64, RLIMIT_NOFILE / 16))",
    )
    parser.add_argument(
        "--xen",
        choices=("auto", "dom0", "shims"),
        default="auto",
        help="the Xen connector's hypervisor interface: dom0 serves real domUs' vifs "
        "through the system xenstored, gntdev and evtchn; shims serves domain processes "
        "on xen.sock with an embedded xenstore; auto picks dom0 when "
        "/proc/xen/capabilities says control_d (default: auto)",
    )
    parser.add_argument("--version", action="version", version=f"vbusd {__version__}")
    return parser


def _size(text: str) -> int:
    try:
        size = parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if size <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive size, not {text!r}")
    return size


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, not {text!r}")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {text!r}")
    return value


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # A fatal signal (a crash in a C extension) prints every thread's Python
    # stack to stderr: the one place that still says where it happened.
    faulthandler.enable()
    configure(args.log_format, args.log_level)
    runner: Any
    if args.loop == "uvloop":
        import uvloop

        runner = uvloop.run
    else:
        runner = asyncio.run
    try:
        return int(runner(serve(args)))
    except StartupError as exc:
        flush_log(1.0)
        _say(f"vbusd: {exc}")
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        flush_log(1.0)


def _say(line: str) -> None:
    """One line to stderr, if anyone still reads it."""
    with contextlib.suppress(OSError):
        os.write(2, f"{line}\n".encode(errors="replace"))


async def serve(args: argparse.Namespace) -> int:
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(_loop_exception)
    _raise_fd_limit()

    registry = Registry.from_entry_points()
    tasks = ProcTasks()
    # Checked before anything else: a bad file is an error even when the state
    # file will win, and nothing is taken or created for a start that fails.
    config = _read_config(args.config, registry) if args.config is not None else None
    topology_log = _StartLog(get_logger("vbus.core"))
    topology = Topology(registry, tasks, os.getuid(), boot_id=tasks.boot_id(), log=topology_log)
    run_dir: Path = args.run_dir or default_run_dir()
    lock = _take_run_dir(run_dir, explicit=args.run_dir is not None)
    store = StateStore(args.state or default_state_path(), topology.snapshot)
    try:
        state_lock = _lock_state(store.path)
        source = _restore(topology, store, config, reset=args.reset_state, say=_console_say(args))
    except StartupError:
        (run_dir / "vbusd.pid").unlink(missing_ok=True)
        lock.close()
        raise
    topology_log.starting = False
    sock_path = run_dir / "vbus.sock"
    limits = Limits(
        handshake_timeout=args.handshake_timeout,
        max_connections_per_uid=args.max_connections_per_uid,
        max_pending_per_uid=args.max_pending_per_uid,
    )
    ledger = Ledger(
        ResourceLimits(
            shm_per_peer=args.max_shm_per_peer,
            shm_per_uid=args.max_shm_per_uid,
            shm_total=args.max_shm_total,
            fds_per_uid=args.max_fds_per_uid,
            fd_reserve=args.fd_reserve,
        )
    )
    monitor = LoopMonitor(loop)
    started = time.monotonic()
    loop_name = type(loop).__module__.split(".")[0]

    def status() -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "version": __version__,
            "loop": loop_name,
            "uptime_s": round(time.monotonic() - started, 3),
            "loop_lag_p50_ms": round(monitor.percentile(0.5) * 1e3, 3),
            "loop_lag_p99_ms": round(monitor.percentile(0.99) * 1e3, 3),
            "loop_lag_max_ms": round(monitor.worst * 1e3, 3),
            "clients": sum(c.clients() for c in connectors),
            "connections": len(topology.connections()),
            **_summed((c.counters for c in connectors), prefix="clients_"),
            **_summed(c.queue_totals() for c in connectors),
            "rss_kib": _rss_kib(),
            "fds": len(os.listdir("/proc/self/fd")),
            "shm_bytes": ledger.shm,
            "shm_limit_bytes": ledger.shm_total,
            "client_fds": ledger.fds,
            "client_fd_limit": ledger.fd_budget,
            "client_mappings": ledger.maps,
            "state_saves": store.saves,
            "errors_logged": errors_logged(),
        }

    # The embedded xenstore: its tree persists beside the admin state.
    xenstore = XenstoreServer(
        loop, run_dir / "xenstored.sock", store.path.with_suffix(".xenstore.json")
    )
    try:
        xenstore_source = xenstore.load()
    except ValueError as exc:
        lock.close()
        raise StartupError(str(exc)) from None
    kvm_path = run_dir / "kvm.sock"
    xen: Connector
    if _xen_interface(args.xen) == "dom0":
        try:
            xenstored = xenstored_socket()
        except VbusError as exc:
            lock.close()
            raise StartupError(f"the Xen connector's dom0 interface: {exc.message}") from None
        xen = XenDom0Connector(topology, loop, limits, ledger, xenstored)
    else:
        xen = XenConnector(topology, run_dir / "xen.sock", loop, xenstore, limits, ledger)
        log.info("xen.interface", interface="shims", socket=str(run_dir / "xen.sock"))
    connectors: list[Connector] = [
        UserspaceConnector(topology, sock_path, loop, limits, tasks, status, ledger),
        KvmConnector(topology, kvm_path, loop, limits, tasks, ledger),
        xen,
        VhostUserConnector(topology, run_dir, loop, limits, tasks, ledger),
    ]
    serving = sock_path
    try:
        for path in (sock_path, kvm_path):
            serving = path
            _clear_stale_socket(path)
        xenstore.start()
        for connector in connectors:
            connector.start()
    except OSError as exc:
        for connector in connectors:
            connector.stop("daemon failed to start")
        xenstore.stop()
        lock.close()
        raise StartupError(f"cannot serve {serving}: {exc.strerror}") from None

    monitor.start()

    admin: AdminMount | None = None
    if not args.no_admin:
        tree = AdminTree(topology, store.commit, uid=os.getuid(), gid=os.getgid(), status=status)
        admin = await mount_admin_tree(tree, args.admin_dir or run_dir / "admin")

    pruner = loop.create_task(_prune_members(topology, store))

    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, _on_signal, stop, signum)

    log.info(
        "daemon.ready",
        version=__version__,
        pid=os.getpid(),
        socket=str(sock_path),
        kvm_socket=str(kvm_path),
        config=source,
        loop=loop_name,
        admin=str(admin.path) if admin else None,
        state=str(store.path),
        buses=[bus.name for bus in topology.buses()],
        devices=len(topology.devices()),
        xenstore=xenstore_source,
    )
    _sd_notify("READY=1")
    try:
        await stop.wait()
    finally:
        _sd_notify("STOPPING=1")
        pruner.cancel()
        if admin is not None:
            await admin.unmount()
        for connector in connectors:
            connector.stop("daemon stopping")
        xenstore.stop()
        monitor.stop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        with contextlib.suppress(FileNotFoundError):
            (run_dir / "vbusd.pid").unlink()
        lock.close()
        state_lock.close()
        log.info("daemon.stopped", uptime=round(time.monotonic() - started, 3))
    return 0


class _StartLog:
    """The topology's logger.  While the start-up builds the topology (and,
    for a bad file, rolls it back) each step is a debug event: a start shows
    its outcome, ``daemon.ready`` or one line of error, not every step."""

    KEPT = frozenset({"member.not_restored"})  # news for the administrator

    def __init__(self, log: Any) -> None:
        self._log = log
        self.starting = True

    def info(self, event: str, **fields: Any) -> None:
        if self.starting and event not in self.KEPT:
            self._log.debug(event, **fields)
        else:
            self._log.info(event, **fields)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._log, name)


def _read_config(path: Path, registry: Registry) -> dict[str, Any]:
    """Read, parse and check ``--config`` (no topology is touched)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise StartupError(f"cannot read --config {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise StartupError(f"{path}: not UTF-8 text") from None
    try:
        cfg = load_config_text(text, str(path))
        check_config(cfg, registry)
    except VbusError as exc:
        raise StartupError(exc.message) from None
    return cfg


def _console_say(args: argparse.Namespace) -> Any:
    """One line of prose to stderr beside a warning, for people (console logs);
    JSON logs carry the same text in the event's ``hint``."""
    return _say if args.log_format == "console" else (lambda line: None)


def _restore(
    topology: Topology,
    store: StateStore,
    config: dict[str, Any] | None,
    *,
    reset: bool = False,
    say: Any = None,
) -> str:
    """Rebuild the topology from the persisted state, or on a first start (or
    with ``reset``) from ``config`` (or the embedded default), which is then
    persisted.  Returns where the topology came from."""
    if store.clear_leftovers():
        log.info("state.leftovers_removed", state=str(store.path))
    hint = f"start with --reset-state to replace it (it is kept as {store.previous_path})"
    if not reset:
        try:
            saved = store.load()
        except VbusError as exc:
            raise StartupError(f"{exc.message}; {hint}") from None
        if saved is not None:
            try:
                topology.apply(saved)
            except VbusError as exc:
                raise StartupError(f"cannot restore {store.path}: {exc.message}; {hint}") from None
            if config is not None:
                message = (
                    f"--config {config['source']} is not applied: the state file {store.path} "
                    "exists and holds the topology; to start from the configuration, "
                    "use --reset-state"
                )
                log.warning(
                    "state.config_ignored",
                    config=config["source"],
                    state=str(store.path),
                    hint=message,
                )
                if say is not None:
                    say(f"vbusd: warning: {message}")
            log.info(
                "state.restored",
                state=str(store.path),
                buses=len(topology.buses()),
                devices=len(topology.devices()),
            )
            return str(store.path)
    if config is None:
        config = load_config_text(default_config_text(), "embedded default")
    try:
        apply_config(topology, config)
    except VbusError as exc:
        raise StartupError(exc.message) from None
    try:
        previous = store.keep_previous() if reset else None
        store.save_sync(topology.snapshot())
    except OSError as exc:
        raise StartupError(f"cannot write state {store.path}: {exc.strerror}") from None
    if reset:
        log.info(
            "state.reset",
            state=str(store.path),
            config=config["source"],
            previous=str(previous) if previous else None,
        )
    return str(config["source"])


async def _prune_members(topology: Topology, store: StateStore, every: float = 2.0) -> None:
    """Pid rules of tasks that are gone are dropped (and the drop persisted)."""
    while True:
        await asyncio.sleep(every)
        try:
            if topology.prune_members():
                await store.commit()
        except Exception:
            log.exception("members.prune_failed")


def _on_signal(stop: asyncio.Event, signum: int) -> None:
    stop.set()  # first: nothing after this line may keep the daemon from stopping
    log.info("daemon.stopping", signal=signal.Signals(signum).name)


def _loop_exception(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    exc = context.get("exception")
    log.error(
        "loop.exception",
        message=context.get("message"),
        exc_info=(type(exc), exc, exc.__traceback__) if exc is not None else None,
    )


def _take_run_dir(run_dir: Path, explicit: bool) -> Any:
    """Create the run directory (private to this uid) and hold its lock for the
    daemon's lifetime."""
    try:
        prepare_run_dir(run_dir, explicit=explicit)
    except VbusError as exc:
        raise StartupError(exc.message) from None
    try:
        lock = open(run_dir / "vbusd.lock", "a+")  # noqa: SIM115 - held until exit
    except OSError as exc:
        raise StartupError(f"cannot use run directory {run_dir}: {exc.strerror}") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        holder = _read_pid(run_dir / "vbusd.pid")
        who = f" (pid {holder})" if holder else ""
        raise StartupError(
            f"another vbusd{who} is already serving {run_dir}; stop it or use --run-dir"
        ) from None
    (run_dir / "vbusd.pid").write_text(f"{os.getpid()}\n")
    return lock


def _lock_state(path: Path) -> Any:
    """One daemon per state file, whatever its run directory."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = open(path.parent / f".{path.name}.lock", "a+")  # noqa: SIM115 - held until exit
    except OSError as exc:
        raise StartupError(f"cannot use state file {path}: {exc.strerror}") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise StartupError(f"another vbusd uses the state file {path}; use --state") from None
    return lock


def _clear_stale_socket(path: Path) -> None:
    """We hold the lock, so a socket file left here belongs to a dead daemon,
    unless something else answers on it."""
    if not path.exists() and not path.is_symlink():
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    probe.settimeout(0.5)
    try:
        probe.connect(str(path))
    except OSError:
        path.unlink()
        log.info("daemon.stale_socket_removed", socket=str(path))
        return
    finally:
        probe.close()
    raise StartupError(f"{path} is served by another process; stop it or use --run-dir")


def _summed(parts: Iterable[dict[str, int]], prefix: str = "") -> dict[str, int]:
    """Counters of every connector, added key by key."""
    total: dict[str, int] = {}
    for part in parts:
        for key, value in part.items():
            total[prefix + key] = total.get(prefix + key, 0) + value
    return total


def _rss_kib() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * (os.sysconf("SC_PAGE_SIZE") // 1024)


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _raise_fd_limit() -> None:
    """Each connection costs descriptors; use what the hard limit allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _sd_notify(state: str) -> None:
    """systemd Type=notify: a datagram to $NOTIFY_SOCKET (abstract if it starts with @)."""
    target = os.environ.get("NOTIFY_SOCKET")
    if not target:
        return
    address = "\0" + target[1:] if target.startswith("@") else target
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.sendto(state.encode(), address)
        except OSError as exc:
            log.warning("daemon.notify_failed", socket=target, reason=exc.strerror)


if __name__ == "__main__":
    sys.exit(main())
