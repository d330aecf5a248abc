"""Mounting the admin tree: stale mounts, pyfuse3's session on the running loop, unmount.

``mount_admin_tree`` either returns an ``AdminMount`` whose ``pyfuse3.main()``
runs as a task on the running loop (uvloop or asyncio), or logs one
``admin.unavailable`` warning saying why and returns None: the daemon then
runs without the tree.  pyfuse3 keeps one session per process, so one tree
can be mounted at a time.

A daemon that died leaves its mount behind ("Transport endpoint is not
connected"); it is lazily unmounted first, with ``admin.stale_mount_cleared``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import re
from pathlib import Path
from typing import Any

import structlog

from vbus.admin.fs import AdminTree, fuse_import_error

__all__ = ["AdminMount", "fuse_mount_listed", "mount_admin_tree"]

log = structlog.get_logger("vbus.admin")

MOUNT_OPTIONS = frozenset({"fsname=vbus", "subtype=vbus", "default_permissions", "allow_other"})
_PROBE_TIMEOUT = 3.0  # a stat of a FUSE mount whose server hangs never returns
_STOP_TIMEOUT = 10.0
_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")

_active: AdminMount | None = None  # pyfuse3 holds one session per process


class AdminMount:
    """A mounted admin tree; ``unmount()`` ends ``pyfuse3.main()`` and unmounts."""

    def __init__(self, path: Path, task: asyncio.Task[None]) -> None:
        self.path = path
        self._task = task
        self._stopping = False
        self._closed = False
        self._unmounted = asyncio.Event()
        task.add_done_callback(self._main_ended)

    def __repr__(self) -> str:
        return f"<AdminMount {self.path}{' unmounted' if self._closed else ''}>"

    @property
    def serving(self) -> bool:
        return not self._task.done()

    async def unmount(self) -> None:
        """End the FUSE session and unmount.  Idempotent (later calls wait for the first)."""
        if self._stopping:
            await self._unmounted.wait()
            return
        self._stopping = True
        try:
            if not self._task.done():
                await self._stop_main()
        except Exception:  # never into the daemon's shutdown
            log.error("admin.unmount_failed", path=str(self.path), exc_info=True)
        finally:
            self._close()
            self._unmounted.set()

    async def _stop_main(self) -> None:
        _terminate()  # requests in flight finish first
        try:
            await asyncio.wait_for(asyncio.shield(self._task), _STOP_TIMEOUT)
        except TimeoutError:
            log.error("admin.stop_timeout", path=str(self.path), timeout=_STOP_TIMEOUT)
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        except Exception:
            pass  # logged by _main_ended

    def _main_ended(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            if not self._stopping:
                log.error("admin.failed", path=str(self.path), reason="the FUSE task was cancelled")
                self._close()
            return
        exc = task.exception()
        if exc is not None:
            log.error(
                "admin.failed",
                path=str(self.path),
                reason=repr(exc),
                exc_info=(type(exc), exc, exc.__traceback__),
            )
        elif not self._stopping:
            log.error(
                "admin.failed",
                path=str(self.path),
                reason="the FUSE session ended on its own (unmounted from outside?)",
            )
        if not self._stopping:
            # Nobody serves the mount any more: release it, else every access hangs.
            self._close()

    def _close(self) -> None:
        global _active
        if self._closed:
            return
        self._closed = True
        import pyfuse3

        try:
            pyfuse3.close(unmount=True)  # lazy unmount (MNT_DETACH / fusermount3 -z)
        except Exception as exc:
            log.error("admin.unmount_failed", path=str(self.path), reason=repr(exc))
        else:
            log.info("admin.unmounted", path=str(self.path))
        if _active is self:
            _active = None


def _terminate() -> None:
    import pyfuse3

    pyfuse3.terminate()  # sets the exit flag, then wakes the waiting worker


def _make_readiness_race_free(shim: Any) -> None:
    """Replace pyfuse3's asyncio ``wait_readable``/``notify_closing`` (3.5) with
    equivalents that tolerate each other.

    pyfuse3's versions resolve the worker's future from an ``add_reader``
    callback and fail it from ``terminate()`` without checking whether it is
    already done.  When a request arrives just as the daemon stops, one of the
    two meets a finished future and raises InvalidStateError: from terminate()
    (the daemon's shutdown fails) or inside the loop (``loop.exception``).
    """
    if getattr(shim, "_vbus_race_free", False):
        return
    futures = shim._read_futures  # fd -> set of futures, shared with the shim

    async def wait_readable(fd: int) -> None:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()

        def ready() -> None:
            if not future.done():
                future.set_result(None)

        futures[fd].add(future)
        loop.add_reader(fd, ready)
        try:
            await future
        finally:
            loop.remove_reader(fd)
            futures[fd].discard(future)
            if not futures[fd]:
                del futures[fd]

    def notify_closing(fd: int) -> None:
        for future in list(futures.get(fd, ())):
            if not future.done():
                future.set_exception(shim.ClosedResourceError())

    shim.wait_readable = wait_readable
    shim.notify_closing = notify_closing
    shim._vbus_race_free = True


async def mount_admin_tree(tree: AdminTree, path: Path) -> AdminMount | None:
    """Mount ``tree`` at ``path`` and serve it on the running loop, or say why not."""
    global _active
    path = Path(os.path.abspath(path))

    def unavailable(reason: str) -> None:
        log.warning("admin.unavailable", path=str(path), reason=reason)

    reason = fuse_import_error()
    if reason is not None:
        unavailable(reason)
        return None
    if not os.path.exists("/dev/fuse"):
        unavailable("no /dev/fuse: FUSE is not available here (kernel module or container)")
        return None
    if _active is not None:
        unavailable(f"this process already serves an admin tree at {_active.path}")
        return None
    try:
        await _clear_stale_mount(path)
    except _Refused as exc:
        unavailable(str(exc))
        return None
    try:
        path.mkdir(mode=0o755, parents=True, exist_ok=True)
    except OSError as exc:
        unavailable(f"cannot create {path}: {exc.strerror}")
        return None
    # Resolved now: once mounted, a stat of our own mount from the loop would deadlock.
    tree.set_mountpoint(str(path), os.path.realpath(path))

    options = set(MOUNT_OPTIONS)
    if os.geteuid() != 0 and not _user_allow_other():
        options.discard("allow_other")
        log.warning(
            "admin.allow_other_unavailable",
            path=str(path),
            reason="/etc/fuse.conf lacks user_allow_other: only uid "
            f"{os.geteuid()} can read the tree",
        )

    import pyfuse3
    import pyfuse3.asyncio

    pyfuse3.asyncio.enable()
    _make_readiness_race_free(pyfuse3.asyncio)
    try:
        pyfuse3.init(tree, str(path), options)
    except Exception as exc:
        with contextlib.suppress(Exception):
            pyfuse3.close(unmount=False)  # drop the half-made session
        hint = "" if os.geteuid() == 0 else " (not root: fusermount3 refused; see its message)"
        unavailable(f"mounting FUSE at {path} failed: {exc}{hint}")
        return None
    task = asyncio.get_running_loop().create_task(pyfuse3.main(), name="vbus-admin-fuse")
    mount = AdminMount(path, task)
    _active = mount
    log.info("admin.mounted", path=str(path), options=sorted(options))
    return mount


class _Refused(Exception):
    """The mount point cannot be used; the message says why in one line."""


def fuse_mount_listed(mountinfo: str, path: str) -> bool:
    """Whether ``mountinfo`` (the text of /proc/self/mountinfo) has a FUSE
    mount at ``path``."""
    for line in mountinfo.splitlines():
        fields = line.split()
        if "-" not in fields or len(fields) < 5:
            continue
        separator = fields.index("-")
        if separator + 1 >= len(fields):
            continue
        mountpoint = _OCTAL_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), fields[4])
        fstype = fields[separator + 1]
        if mountpoint == path and (fstype == "fuse" or fstype.startswith("fuse.")):
            return True
    return False


async def _clear_stale_mount(path: Path) -> None:
    """Lazily unmount a FUSE mount at ``path`` that nothing serves any more."""
    try:
        with open("/proc/self/mountinfo") as f:
            listed = fuse_mount_listed(f.read(), str(path))
    except OSError:
        listed = False
    if listed:
        # Something may still serve it, or hang: probe from a child process
        # that can be killed, never from the loop.
        state = await _probe(path)
        if state == "served":
            raise _Refused(f"{path} is already a FUSE mount served by another process")
        if state == "hung":
            raise _Refused(f"{path} is a FUSE mount whose server does not answer")
    else:
        try:
            os.stat(path)
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno != errno.ENOTCONN:
                raise _Refused(f"cannot use {path}: {exc.strerror}") from None
    await _lazy_unmount(path)


async def _probe(path: Path) -> str:
    """``served``, ``stale`` (not connected) or ``hung``."""
    try:
        proc = await asyncio.create_subprocess_exec(
            "stat",
            "-c",
            "%i",
            "--",
            str(path),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
    except OSError as exc:
        raise _Refused(f"cannot probe the FUSE mount at {path}: {exc.strerror}") from None
    try:
        _, stderr = await asyncio.wait_for(proc.communicate(), _PROBE_TIMEOUT)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return "hung"
    if proc.returncode == 0:
        return "served"
    if b"not connected" in stderr:
        return "stale"
    message = stderr.decode(errors="replace").strip()
    raise _Refused(f"cannot use {path}: {message or 'stat failed'}")


async def _lazy_unmount(path: Path) -> None:
    commands = [["umount", "-l", str(path)], ["fusermount3", "-uz", str(path)]]
    if os.geteuid() != 0:
        commands.reverse()
    errors: list[str] = []
    for command in commands:
        try:
            proc = await asyncio.create_subprocess_exec(
                *command,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
            )
            _, stderr = await asyncio.wait_for(proc.communicate(), _STOP_TIMEOUT)
        except (OSError, TimeoutError) as exc:
            errors.append(f"{command[0]}: {exc!r}")
            continue
        if proc.returncode == 0:
            log.warning("admin.stale_mount_cleared", path=str(path), command=" ".join(command))
            return
        errors.append(f"{command[0]}: {stderr.decode(errors='replace').strip()}")
    raise _Refused(f"stale FUSE mount at {path} could not be cleared ({'; '.join(errors)})")


def _user_allow_other() -> bool:
    try:
        with open("/etc/fuse.conf") as f:
            return any(line.split("#", 1)[0].strip() == "user_allow_other" for line in f)
    except OSError:
        return False
