"""The admin tree as a FUSE file system: pyfuse3 requests -> ``TreeView`` -> ``Topology``.

A thin adapter.  What the tree holds and what each write means is
``vbus.admin.tree``; this module adds inode numbers, open-file handles,
``stat`` attributes and the errno boundary:

- a ``VbusError`` from the view or the topology becomes ``FUSEError(exc.errno)``
  (mutations are logged as ``admin.refused`` with the reason);
- any other exception is a bug: logged as ``admin.error`` with its traceback,
  answered with EIO, and never allowed into pyfuse3 or the event loop;
- after every change the ``commit`` callback (persist the topology) is awaited
  before the request is answered; if it fails the caller gets EIO.

Nothing is cached by the kernel (entry/attr timeouts 0, ``direct_io``), so
changes made inside the daemon show at once.  Inode numbers are allocated on
lookup, stay with their path while the kernel knows them, and are never given
to another path within a mount.  Permissions: nodes belong to the daemon's
uid/gid with 0755/0644/0444 modes and the mount uses ``default_permissions``,
so the kernel refuses other users; the handlers refuse them too, and refuse
writes to read-only files even for root.
"""

from __future__ import annotations

import errno
import functools
import os
import stat
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, TypeVar

import structlog

from vbus.admin.tree import Kind, Node, TreePath, TreeView
from vbus.core.model import Topology
from vbus.errors import Denied, Invalid, NotFound, NotPermitted, VbusError

if TYPE_CHECKING:
    import pyfuse3
else:
    try:
        import pyfuse3
    except ImportError as exc:  # libfuse3 or the extension missing: mount_admin_tree says so
        from vbus.admin import _nofuse as pyfuse3

        pyfuse3.IMPORT_ERROR = f"pyfuse3 cannot be imported: {exc}"

__all__ = ["AdminTree", "InodeTable", "fuse_import_error"]

log = structlog.get_logger("vbus.admin")

ROOT_INODE = 1
_FILE_SIZE = 4096  # configfs style: the real size is only known by reading

P = ParamSpec("P")
R = TypeVar("R")
TreeT = TypeVar("TreeT", bound="AdminTree")


def fuse_import_error() -> str | None:
    """Why pyfuse3 is unusable in this process, or None."""
    return getattr(pyfuse3, "IMPORT_ERROR", None)


class InodeTable:
    """Inode numbers for tree paths, and the kernel's lookup count of each.

    A path gets a number on its first lookup and keeps it while the kernel
    holds it; ``forget`` to zero drops it (a later lookup gets a new number).
    ``retire`` is called when the tree itself removed a path: its number (and
    those of everything below it) then no longer resolves, so a directory
    created again with the same name gets a fresh number.  Numbers only grow.
    """

    def __init__(self) -> None:
        self._by_path: dict[TreePath, int] = {(): ROOT_INODE}
        self._paths: dict[int, TreePath | None] = {ROOT_INODE: ()}
        self._lookups: dict[int, int] = {}
        self._next = ROOT_INODE + 1

    def __len__(self) -> int:
        return len(self._paths)

    def inode(self, path: TreePath) -> int:
        """The number of ``path``, allocated if it has none."""
        number = self._by_path.get(path)
        if number is None:
            number = self._next
            self._next += 1
            self._by_path[path] = number
            self._paths[number] = path
        return number

    def path(self, inode: int) -> TreePath:
        """The path of ``inode``; ``NotFound`` if it is unknown or was removed."""
        path = self._paths.get(inode)
        if path is None:
            raise NotFound(f"stale inode {inode}")
        return path

    def remember(self, inode: int) -> None:
        """The kernel took one more reference (lookup, mkdir, symlink, readdirplus)."""
        self._lookups[inode] = self._lookups.get(inode, 0) + 1

    def lookups(self, inode: int) -> int:
        return self._lookups.get(inode, 0)

    def forget(self, inode: int, count: int) -> None:
        left = self._lookups.get(inode, 0) - count
        if left > 0:
            self._lookups[inode] = left
            return
        self._lookups.pop(inode, None)
        if inode == ROOT_INODE:
            return
        path = self._paths.pop(inode, None)
        if path is not None and self._by_path.get(path) == inode:
            del self._by_path[path]

    def retire(self, path: TreePath) -> None:
        """``path`` and everything below it were removed through the tree."""
        size = len(path)
        for known in [p for p in self._by_path if p[:size] == path and p]:
            number = self._by_path.pop(known)
            if self._lookups.get(number, 0) > 0:
                self._paths[number] = None  # the kernel still holds it: answer ENOENT
            else:
                del self._paths[number]


@dataclass(slots=True)
class _OpenFile:
    inode: int
    path: TreePath
    writing: bool
    content: bytes | None = None


@dataclass(slots=True)
class _OpenDir:
    inode: int
    path: TreePath
    names: list[str] = field(default_factory=list)


def _request(
    op: str,
) -> Callable[
    [Callable[Concatenate[TreeT, P], Awaitable[R]]],
    Callable[Concatenate[TreeT, P], Coroutine[Any, Any, R]],
]:
    """The errno boundary of one handler: VbusError -> its errno, anything
    else -> logged as a bug and EIO.  FUSEError passes through."""

    def decorate(
        handler: Callable[Concatenate[TreeT, P], Awaitable[R]],
    ) -> Callable[Concatenate[TreeT, P], Coroutine[Any, Any, R]]:
        @functools.wraps(handler)
        async def guarded(self: TreeT, /, *args: P.args, **kwargs: P.kwargs) -> R:
            try:
                return await handler(self, *args, **kwargs)
            except pyfuse3.FUSEError:
                raise
            except VbusError as exc:
                raise pyfuse3.FUSEError(exc.errno) from None
            except Exception:
                log.error("admin.error", op=op, exc_info=True)
                raise pyfuse3.FUSEError(errno.EIO) from None

        return guarded

    return decorate


class AdminTree(pyfuse3.Operations):
    """pyfuse3 operations serving ``TreeView(topology)``.

    ``commit`` is awaited after every successful change, before the request
    returns (it persists ``topology.snapshot()``).  ``status`` (optional)
    feeds the read-only root file ``status``.
    """

    def __init__(
        self,
        topology: Topology,
        commit: Callable[[], Awaitable[None]],
        *,
        uid: int,
        gid: int,
        status: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        super().__init__()
        self.topology = topology
        self.view = TreeView(topology, status=status)
        self.uid = uid
        self.gid = gid
        self._commit = commit
        self._inodes = InodeTable()
        self._files: dict[int, _OpenFile] = {}
        self._dirs: dict[int, _OpenDir] = {}
        self._next_handle = 1
        self._born_ns = time.time_ns()

    @property
    def inodes(self) -> InodeTable:
        return self._inodes

    def set_mountpoint(self, *paths: str) -> None:
        """Where the tree is mounted: absolute symlink targets below these count."""
        self.view.mountpoints = tuple(dict.fromkeys(paths))

    # --- helpers -----------------------------------------------------------------
    def _attributes(self, inode: int, path: TreePath, node: Node) -> pyfuse3.EntryAttributes:
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = inode
        entry.generation = 0
        entry.entry_timeout = 0
        entry.attr_timeout = 0
        if node.kind is Kind.DIR:
            entry.st_mode = stat.S_IFDIR | node.mode
            entry.st_nlink = 2 + self.view.subdirectories(path)
            entry.st_size = 0
        elif node.kind is Kind.LINK:
            entry.st_mode = stat.S_IFLNK | node.mode
            entry.st_nlink = 1
            entry.st_size = len(os.fsencode(node.target))
        else:
            entry.st_mode = stat.S_IFREG | node.mode
            entry.st_nlink = 1
            entry.st_size = _FILE_SIZE
        entry.st_uid = self.uid
        entry.st_gid = self.gid
        entry.st_rdev = 0
        entry.st_blksize = 4096
        entry.st_blocks = 0
        entry.st_atime_ns = entry.st_mtime_ns = entry.st_ctime_ns = self._born_ns
        return entry

    def _entry(self, path: TreePath) -> pyfuse3.EntryAttributes:
        """Attributes of ``path`` for a reply that gives the kernel a reference."""
        node = self.view.node(path)
        inode = self._inodes.inode(path)
        self._inodes.remember(inode)
        return self._attributes(inode, path, node)

    def _child(self, parent_inode: int, name: bytes) -> TreePath:
        parent = self._inodes.path(parent_inode)
        text = os.fsdecode(name)
        if "/" in text or "\0" in text:
            raise NotFound(f"bad name {text!r}")
        return (*parent, text)

    def _require_admin(self, ctx: pyfuse3.RequestContext) -> None:
        # The kernel already refuses others (default_permissions + modes);
        # this keeps the rule if the mount options ever change.
        if ctx.uid not in (0, self.uid):
            raise Denied(f"uid {ctx.uid} may not change the admin tree")

    async def _change(self, op: str, path: TreePath, change: Callable[[], None]) -> None:
        """Apply a change through the view; persist it before answering."""
        before = self.view.generation
        try:
            change()
        except VbusError as exc:
            log.warning(
                "admin.refused",
                op=op,
                path="/".join(path),
                errno=errno.errorcode.get(exc.errno, str(exc.errno)),
                reason=exc.message,
            )
            if self.view.generation != before:  # part of a members write went through
                await self._persist(op, path)
            raise
        if self.view.generation != before:
            await self._persist(op, path)

    async def _persist(self, op: str, path: TreePath) -> None:
        try:
            await self._commit()
        except Exception:
            log.error("admin.commit_failed", op=op, path="/".join(path), exc_info=True)
            raise pyfuse3.FUSEError(errno.EIO) from None

    def _handle(self) -> int:
        handle = self._next_handle
        self._next_handle += 1
        return handle

    # --- names and attributes ----------------------------------------------------------
    @_request("lookup")
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        parent = self._inodes.path(parent_inode)
        if name == b".":
            return self._entry(parent)
        if name == b"..":
            return self._entry(parent[:-1])
        return self._entry(self._child(parent_inode, name))

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        try:
            for inode, count in inode_list:
                self._inodes.forget(inode, count)
        except Exception:  # forget may not raise at all
            log.error("admin.error", op="forget", exc_info=True)

    @_request("getattr")
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        path = self._inodes.path(inode)
        return self._attributes(inode, path, self.view.node(path))

    @_request("setattr")
    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        path = self._inodes.path(inode)
        node = self.view.node(path)
        if fields.update_mode or fields.update_uid or fields.update_gid:
            raise NotPermitted(f"modes and owners of {'/'.join(path)} are fixed")
        if fields.update_size:
            # O_TRUNC / truncate before a write: accepted on writable files, and
            # does nothing (the write that follows carries the whole value).
            if node.kind is Kind.DIR:
                raise pyfuse3.FUSEError(errno.EISDIR)
            self._require_admin(ctx)
            if not node.writable:
                raise Denied(f"{'/'.join(path)} is read-only")
        # Time updates (touch) are accepted and ignored.
        return self._attributes(inode, path, node)

    @_request("readlink")
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        node = self.view.node(self._inodes.path(inode))
        if node.kind is not Kind.LINK:
            raise pyfuse3.FUSEError(errno.EINVAL)
        return os.fsencode(node.target)

    @_request("statfs")
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        data = pyfuse3.StatvfsData()
        data.f_bsize = data.f_frsize = 4096
        data.f_blocks = data.f_bfree = data.f_bavail = 0
        data.f_files = len(self._inodes)
        data.f_ffree = data.f_favail = 0
        data.f_namemax = 255
        return data

    # --- changes ----------------------------------------------------------------------------
    @_request("mkdir")
    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        path = self._child(parent_inode, name)
        self._require_admin(ctx)
        await self._change("mkdir", path, lambda: self.view.mkdir(path))
        return self._entry(path)

    @_request("rmdir")
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        path = self._child(parent_inode, name)
        self._require_admin(ctx)
        await self._change("rmdir", path, lambda: self.view.rmdir(path))
        self._inodes.retire(path)

    @_request("symlink")
    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        path = self._child(parent_inode, name)
        self._require_admin(ctx)
        text = os.fsdecode(target)
        await self._change("symlink", path, lambda: self.view.symlink(path, text))
        return self._entry(path)

    @_request("unlink")
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        path = self._child(parent_inode, name)
        self._require_admin(ctx)
        await self._change("unlink", path, lambda: self.view.unlink(path))
        self._inodes.retire(path)

    @_request("create")
    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        path = self._child(parent_inode, name)
        log.warning(
            "admin.refused",
            op="create",
            path="/".join(path),
            errno="EACCES",
            reason="files cannot be created in the admin tree",
        )
        raise pyfuse3.FUSEError(errno.EACCES)

    @_request("mknod")
    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EACCES)

    @_request("link")
    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EPERM)

    @_request("rename")
    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        raise pyfuse3.FUSEError(errno.EPERM)

    # --- files ----------------------------------------------------------------------------------
    @_request("open")
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        path = self._inodes.path(inode)
        node = self.view.node(path)
        if node.kind is Kind.DIR:
            raise pyfuse3.FUSEError(errno.EISDIR)
        writing = flags & os.O_ACCMODE != os.O_RDONLY
        if writing:
            self._require_admin(ctx)
            if not node.writable:
                raise Denied(f"{'/'.join(path)} is read-only")
        handle = self._handle()
        self._files[handle] = _OpenFile(inode, path, writing)
        return pyfuse3.FileInfo(fh=handle, direct_io=True, keep_cache=False)

    @_request("read")
    async def read(self, fh: int, off: int, size: int) -> bytes:
        handle = self._files.get(fh)
        if handle is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        # Render at offset 0 (every new `cat`), serve later offsets from that
        # rendering so one read of a long file is consistent.
        if off == 0 or handle.content is None:
            handle.content = self.view.read(handle.path).encode()
        return handle.content[off : off + size]

    @_request("write")
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        handle = self._files.get(fh)
        if handle is None or not handle.writing:
            raise pyfuse3.FUSEError(errno.EBADF)
        path = handle.path

        def apply() -> None:
            try:
                text = buf.decode()
            except UnicodeDecodeError:
                raise Invalid(f"{'/'.join(path)}: not UTF-8 text") from None
            self.view.write(path, text)

        await self._change("write", path, apply)
        handle.content = None
        return len(buf)

    async def flush(self, fh: int) -> None:
        return None

    async def fsync(self, fh: int, datasync: bool) -> None:
        return None

    async def release(self, fh: int) -> None:
        self._files.pop(fh, None)

    # --- directories ------------------------------------------------------------------------------
    @_request("opendir")
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        path = self._inodes.path(inode)
        if self.view.node(path).kind is not Kind.DIR:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        handle = self._handle()
        self._dirs[handle] = _OpenDir(inode, path)
        return handle

    @_request("readdir")
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        handle = self._dirs.get(fh)
        if handle is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        if start_id == 0 or not handle.names:
            # One listing per pass, taken at its start: offsets index into it,
            # so entries that come and go meanwhile are never repeated or skipped.
            try:
                handle.names = [".", "..", *self.view.children(handle.path)]
            except NotFound:
                handle.names = []
        for index in range(start_id, len(handle.names)):
            name = handle.names[index]
            if name == ".":
                path = handle.path
            elif name == "..":
                path = handle.path[:-1]
            else:
                path = (*handle.path, name)
            try:
                node = self.view.node(path)
            except NotFound:
                continue  # gone since the listing was taken
            inode = self._inodes.inode(path)
            attributes = self._attributes(inode, path, node)
            if not pyfuse3.readdir_reply(token, os.fsencode(name), attributes, index + 1):
                return
            if name not in (".", ".."):
                self._inodes.remember(inode)

    async def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)

    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        return None
