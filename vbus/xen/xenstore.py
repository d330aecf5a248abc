"""The embedded xenstore: xenstored's data model and protocol, served by the daemon.

``Store`` is the database, sans-IO: a tree of nodes (value, permissions,
children), watches, transactions, domains and quotas, answering one
``xswire.Msg`` at a time for one ``Conn``.  ``XenstoreServer`` puts it on
``<run-dir>/xenstored.sock`` (mode 0600: every connection there is dom0's
toolstack, privileged, as on a Xen host) and hands each attached domain a
stream socket of its own, on which it is that domain, unprivileged, with
paths relative to ``/local/domain/N``.  ``LocalClient`` is the daemon's own
privileged connection (the backend).

Semantics follow Xen 4.17's C xenstored (docs/misc/xenstore.txt):

- Permissions: the first entry names the owner (full access) and the
  access of every domain without an entry of its own (``n``, ``r``, ``w``,
  ``b``); dom0 may do anything.  A new node inherits its parent's
  permissions, and an unprivileged creator becomes its owner.  A missing node
  reads as ENOENT only to whom may read (write, to create) its nearest
  existing ancestor, EACCES otherwise.  Only dom0 may change an owner (EPERM).
- Watches fire for the path changed and are matched by every watch on it or
  above it; the removal of a subtree fires the watches below it with their
  own path.  Registration fires once at once.  An unprivileged watcher only
  hears of nodes it may read.  ``@introduceDomain`` / ``@releaseDomain`` fire
  on INTRODUCE / RELEASE, for dom0.
- Transactions work on a copy of the tree (isolation); END with ``T``
  commits unless a node the transaction read or wrote was changed meanwhile
  (EAGAIN); events fire at commit.
- Quotas, for unprivileged connections, with 4.17's defaults and errors:
  1000 nodes per domain (ENOSPC), 2048-byte nodes (ENOSPC), 128 watches
  (E2BIG), 10 transactions (ENOSPC), 5 permission entries (ENOSPC), relative
  paths of 2048 bytes (EINVAL), and 20 outstanding replies, past which the
  connection is simply not read until it takes them.

Persistence: the tree is saved to a JSON file (temporary file, fsync, rename,
fsync the directory) and loaded at start, and a change is acknowledged only
once it is on disk (several changes share one save).  What lives as long as
a domain does (``/local/domain/N`` for N >= 1, the backends under
``/local/domain/0/backend``) is neither saved nor waited for: no domain
survives a daemon restart.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
import json
import os
import re
import socket
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from vbus.errors import ProtocolError
from vbus.log import get_logger
from vbus.xen import xswire
from vbus.xen.xswire import XsError, XsType

__all__ = [
    "Conn",
    "LocalClient",
    "Node",
    "Quotas",
    "Store",
    "XenstoreServer",
    "domain_path",
    "is_durable",
]

log = get_logger("vbus.xenstore")

Perm = tuple[int, str]  # (domid, one of n r w b)
_PATH_CHARS = re.compile(rb"[A-Za-z0-9\-/_@]*")
_PERM = re.compile(rb"([nrwb])([0-9]{1,5})")
_ROOT_PERMS: tuple[Perm, ...] = ((0, "n"),)
_READ = {"r", "b"}
_WRITE = {"w", "b"}
SPECIALS = ("@introduceDomain", "@releaseDomain")
_DOMAIN_DIR = re.compile(r"/local/domain/([0-9]+)(/|$)")
FORMAT_VERSION = 1
BATCH = 64  # requests answered per client per loop iteration
INBOX_MAX = 256  # requests queued before a client is no longer read


def domain_path(domid: int) -> str:
    return f"/local/domain/{domid}"


def is_durable(path: str) -> bool:
    """Saved across restarts: everything but what a domain's life bounds."""
    m = _DOMAIN_DIR.match(path)
    if m is None:
        return True
    if int(m.group(1)) != 0:
        return False
    return not (path == "/local/domain/0/backend" or path.startswith("/local/domain/0/backend/"))


@dataclass(frozen=True, slots=True)
class Quotas:
    nodes: int = 1000
    node_size: int = 2048
    watches: int = 128
    transactions: int = 10
    permissions: int = 5
    outstanding: int = 20
    path_max: int = xswire.REL_PATH_MAX


@dataclass(frozen=True, slots=True)
class Node:
    value: bytes
    perms: tuple[Perm, ...]
    children: tuple[str, ...]
    gen: int

    @property
    def owner(self) -> int:
        return self.perms[0][0]

    def size(self) -> int:
        """As xenstored counts it: header, permissions, value, child names."""
        return 16 + 8 * len(self.perms) + len(self.value) + sum(len(c) + 1 for c in self.children)


class _Tree:
    """Nodes by path, and how many each domain owns (the node quota)."""

    __slots__ = ("nodes", "owned")

    def __init__(self, nodes: dict[str, Node], owned: dict[int, int]) -> None:
        self.nodes = nodes
        self.owned = owned

    def copy(self) -> _Tree:
        return _Tree(dict(self.nodes), dict(self.owned))

    def put(self, path: str, node: Node) -> None:
        old = self.nodes.get(path)
        if old is not None:
            self._count(old.owner, -1)
        self.nodes[path] = node
        self._count(node.owner, 1)

    def drop(self, path: str) -> None:
        old = self.nodes.pop(path, None)
        if old is not None:
            self._count(old.owner, -1)

    def _count(self, domid: int, delta: int) -> None:
        value = self.owned.get(domid, 0) + delta
        if value:
            self.owned[domid] = value
        else:
            self.owned.pop(domid, None)


@dataclass(slots=True)
class _Watch:
    path: str  # absolute (or a special)
    token: bytes
    relative: bool
    depth: int | None = None


@dataclass(slots=True)
class _Tx:
    id: int
    tree: _Tree
    start: int
    accessed: set[str] = field(default_factory=set)
    touched: set[str] = field(default_factory=set)
    events: list[tuple[str, tuple[Perm, ...], bool]] = field(default_factory=list)


class Conn:
    """One client of the store: dom0's tools (privileged) or a domain."""

    def __init__(self, domid: int, deliver: Callable[[bytes], None], *, privileged: bool) -> None:
        self.domid = domid
        self.privileged = privileged
        self.deliver = deliver  # watch events, as encoded messages
        self.watches: list[_Watch] = []
        self.txs: dict[int, _Tx] = {}
        self.closed = False

    @property
    def base(self) -> str:
        return domain_path(self.domid)


class Store:
    """The database and the protocol's semantics; no I/O."""

    def __init__(self, quotas: Quotas | None = None) -> None:
        self.quotas = quotas or Quotas()
        self._stamp = 1
        root = Node(b"", _ROOT_PERMS, (), 1)
        self.tree = _Tree({"/": root}, {0: 1})
        self.gen = 0  # changes committed to the main tree
        self.changed_at: dict[str, int] = {}  # path -> gen, kept while transactions are open
        self.conns: set[Conn] = set()
        self.domains: set[int] = set()
        self._tx_ids = 0
        self.durable_changes = 0  # bumped by every change a save must hold
        self.counters = {"requests": 0, "errors": 0, "events": 0, "conflicts": 0}
        for path in ("/local", "/local/domain", "/local/domain/0", "/tool"):
            self._create(None, self.tree, path, b"", 0, privileged=True)
        self.changed_at.clear()

    # --- connections -------------------------------------------------------------
    def connect(self, domid: int, deliver: Callable[[bytes], None], *, privileged: bool) -> Conn:
        conn = Conn(domid, deliver, privileged=privileged)
        self.conns.add(conn)
        return conn

    def disconnect(self, conn: Conn) -> None:
        conn.closed = True
        conn.watches.clear()
        conn.txs.clear()
        self.conns.discard(conn)
        self._trim()

    # --- the protocol ----------------------------------------------------------------
    def request(self, conn: Conn, msg: xswire.Msg) -> bytes:
        """Answer one request: the encoded reply (same type, req_id, tx_id) or ERROR."""
        self.counters["requests"] += 1
        try:
            mtype, payload = self._dispatch(conn, msg)
        except XsError as exc:
            self.counters["errors"] += 1
            return xswire.encode(
                XsType.ERROR, msg.req_id, msg.tx_id, xswire.error_payload(exc.errno)
            )
        if len(payload) > xswire.PAYLOAD_MAX:
            payload = xswire.error_payload(errno.E2BIG)
            mtype = XsType.ERROR
        return xswire.encode(mtype, msg.req_id, msg.tx_id, payload)

    def _dispatch(self, conn: Conn, msg: xswire.Msg) -> tuple[int, bytes]:
        t = msg.type
        handler = _HANDLERS.get(t)
        if handler is None:
            raise XsError(errno.ENOSYS)
        tx = None
        if msg.tx_id and t not in _NO_TX:
            tx = conn.txs.get(msg.tx_id)
            if tx is None:
                raise XsError(errno.ENOENT, "no such transaction")
        return t, handler(self, conn, tx, msg)

    # --- paths and permissions -------------------------------------------------------
    def canonical(self, conn: Conn, raw: bytes, *, special: bool = False) -> str:
        if not raw or len(raw) > xswire.ABS_PATH_MAX:
            raise XsError(errno.EINVAL, "bad path length")
        if special and raw[:1] == b"@":
            text = raw.decode("ascii", "replace")
            if text.split("/", 1)[0] not in SPECIALS:
                raise XsError(errno.EINVAL, "unknown special path")
            return text
        if _PATH_CHARS.fullmatch(raw) is None:
            raise XsError(errno.EINVAL, "bad character in path")
        path = raw.decode("ascii")
        if not path.startswith("/"):
            if not conn.privileged and len(path) > self.quotas.path_max:
                raise XsError(errno.EINVAL, "relative path too long")
            path = f"{conn.base}/{path}"
        if "//" in path or (path != "/" and path.endswith("/")):
            raise XsError(errno.EINVAL, "bad path")
        if len(path) > xswire.ABS_PATH_MAX:
            raise XsError(errno.EINVAL, "path too long")
        return path

    @staticmethod
    def access(conn: Conn, perms: tuple[Perm, ...]) -> set[str]:
        """What ``conn`` may do with a node of ``perms``: a subset of {r, w, o}."""
        if conn.privileged or perms[0][0] == conn.domid:
            return {"r", "w", "o"}
        letter = perms[0][1]
        for domid, p in perms[1:]:
            if domid == conn.domid:
                letter = p
                break
        allowed = set()
        if letter in _READ:
            allowed.add("r")
        if letter in _WRITE:
            allowed.add("w")
        return allowed

    def _get(self, conn: Conn, tree: _Tree, tx: _Tx | None, path: str, need: str) -> Node:
        """The node, if ``conn`` may ``need`` it; else EACCES or ENOENT as xenstored says."""
        if tx is not None:
            tx.accessed.add(path)
        node = tree.nodes.get(path)
        if node is not None:
            if need not in self.access(conn, node.perms):
                raise XsError(errno.EACCES)
            return node
        ancestor = self._nearest(tree, path)
        if need in self.access(conn, ancestor.perms):
            raise XsError(errno.ENOENT)
        raise XsError(errno.EACCES)

    @staticmethod
    def _nearest(tree: _Tree, path: str) -> Node:
        while True:
            path = _parent(path)
            node = tree.nodes.get(path)
            if node is not None:
                return node

    # --- changes ----------------------------------------------------------------------
    def _stamped(self, node: Node, **changes: Any) -> Node:
        self._stamp += 1
        return replace(node, gen=self._stamp, **changes)

    def _changed(self, tx: _Tx | None, path: str, perms: tuple[Perm, ...]) -> None:
        """Record a change of ``path`` (already applied to the tree in use)."""
        if tx is not None:
            tx.accessed.add(path)
            tx.touched.add(path)
            return
        self.gen += 1
        if self._open_txs():
            self.changed_at[path] = self.gen
        if is_durable(path):
            self.durable_changes += 1

    def _open_txs(self) -> bool:
        return any(conn.txs for conn in self.conns)

    def _create(
        self,
        conn: Conn | None,
        tree: _Tree,
        path: str,
        value: bytes,
        domid: int,
        *,
        privileged: bool,
        tx: _Tx | None = None,
    ) -> list[str]:
        """Create ``path`` and its missing ancestors; returns the paths created."""
        missing = []
        at = path
        while at not in tree.nodes:
            missing.append(at)
            at = _parent(at)
        parent_path = at
        parent = tree.nodes[parent_path]
        leaf_names = [name.rsplit("/", 1)[1] for name in reversed(missing)]
        if not privileged:
            # Every check before the first change: a refusal leaves the tree as it was.
            owned = tree.owned.get(domid, 0)
            if owned + len(missing) > self.quotas.nodes:
                raise XsError(errno.ENOSPC, "node quota")
            grown = replace(parent, children=(*parent.children, leaf_names[0]))
            if grown.size() > self.quotas.node_size:
                raise XsError(errno.ENOSPC, "node size quota")
            if Node(value, parent.perms, (), 0).size() > self.quotas.node_size:
                raise XsError(errno.ENOSPC, "node size quota")
        created = []
        for name, leaf in zip(reversed(missing), leaf_names, strict=True):
            perms = parent.perms
            if not privileged:
                perms = ((domid, perms[0][1]), *perms[1:])
            new_parent = self._stamped(parent, children=(*parent.children, leaf))
            node = self._stamped(Node(value if name == path else b"", perms, (), 0))
            tree.put(parent_path, new_parent)
            tree.put(name, node)
            self._changed(tx, parent_path, new_parent.perms)
            self._changed(tx, name, node.perms)
            created.append(name)
            parent_path, parent = name, node
        return created

    def _remove(self, tree: _Tree, tx: _Tx | None, path: str) -> list[tuple[str, tuple[Perm, ...]]]:
        """Remove the subtree at ``path``; the removed paths with their permissions."""
        removed = []
        stack = [path]
        while stack:
            at = stack.pop()
            node = tree.nodes.get(at)
            if node is None:
                continue
            removed.append((at, node.perms))
            prefix = "" if at == "/" else at
            stack.extend(f"{prefix}/{child}" for child in node.children)
            tree.drop(at)
            self._changed(tx, at, node.perms)
        parent_path = _parent(path)
        parent = tree.nodes[parent_path]
        leaf = path.rsplit("/", 1)[1]
        tree.put(
            parent_path,
            self._stamped(parent, children=tuple(c for c in parent.children if c != leaf)),
        )
        self._changed(tx, parent_path, parent.perms)
        return removed

    # --- watches -------------------------------------------------------------------------
    def fire(self, path: str, perms: tuple[Perm, ...] | None, *, recursive: bool = False) -> None:
        """Send the watch events of a change of ``path`` (a removal: ``recursive``)."""
        for conn in list(self.conns):
            for watch in conn.watches:
                wpath = watch.path
                if _is_child(path, wpath):
                    epath = path
                    if watch.depth is not None and _depth(path, wpath) > watch.depth:
                        continue
                elif recursive and _is_child(wpath, path):
                    epath = wpath
                else:
                    continue
                if path.startswith("@"):
                    if not conn.privileged:
                        continue
                elif perms is not None and "r" not in self.access(conn, perms):
                    continue
                self._event(conn, watch, epath)

    def _event(self, conn: Conn, watch: _Watch, epath: str) -> None:
        shown = epath
        if watch.relative and epath.startswith(conn.base + "/"):
            shown = epath[len(conn.base) + 1 :]
        self.counters["events"] += 1
        payload = xswire.join_strings([shown.encode(), watch.token])
        conn.deliver(xswire.encode(XsType.WATCH_EVENT, 0, 0, payload))

    def _fire_all(self, events: Iterable[tuple[str, tuple[Perm, ...], bool]]) -> None:
        for path, perms, recursive in events:
            self.fire(path, perms, recursive=recursive)

    def _trim(self) -> None:
        """Forget change marks no open transaction can ask about."""
        starts = [tx.start for conn in self.conns for tx in conn.txs.values()]
        if not starts:
            self.changed_at.clear()
            return
        oldest = min(starts)
        for path in [p for p, g in self.changed_at.items() if g <= oldest]:
            del self.changed_at[path]

    # --- domains ------------------------------------------------------------------------
    def introduce(self, domid: int) -> None:
        self.domains.add(domid)
        self.fire("@introduceDomain", None)

    def release(self, domid: int) -> None:
        """The domain is gone: its directory and every node it owns go, then @releaseDomain."""
        self.domains.discard(domid)
        doomed = [domain_path(domid)]
        doomed += [p for p, n in self.tree.nodes.items() if n.owner == domid and p != "/"]
        for path in doomed:
            if path in self.tree.nodes:
                removed = self._remove(self.tree, None, path)
                self.fire(path, removed[0][1], recursive=True)
        self.fire("@releaseDomain", None)

    # --- persistence --------------------------------------------------------------------------
    def dump(self) -> dict[str, Any]:
        nodes = {}
        for path, node in self.tree.nodes.items():
            if not is_durable(path):
                continue
            nodes[path] = {
                "value": base64.b64encode(node.value).decode(),
                "perms": [f"{p}{d}" for d, p in node.perms],
                "children": [c for c in node.children if is_durable(_join(path, c))],
            }
        return {"version": FORMAT_VERSION, "nodes": nodes}

    def load(self, document: dict[str, Any]) -> None:
        """Replace the tree by a ``dump``; ``ValueError`` when it does not hold together."""
        if document.get("version") != FORMAT_VERSION or not isinstance(document.get("nodes"), dict):
            raise ValueError("unknown xenstore file format")
        tree = _Tree({}, {})
        for path, spec in document["nodes"].items():
            perms = tuple((int(text[1:]), text[0]) for text in spec["perms"])
            if not perms or any(p not in "nrwb" for _d, p in perms):
                raise ValueError(f"bad permissions at {path}")
            self._stamp += 1
            node = Node(
                base64.b64decode(spec["value"]), perms, tuple(spec["children"]), self._stamp
            )
            tree.put(path, node)
        for path, node in tree.nodes.items():
            for child in node.children:
                if _join(path, child) not in tree.nodes:
                    raise ValueError(f"{path} names a child {child} that is not there")
        if "/" not in tree.nodes:
            raise ValueError("no root node")
        self.tree = tree


# --- request handlers (store, conn, transaction or None, message) -> reply payload -------------


def _args(msg: xswire.Msg, n: int) -> list[bytes]:
    parts = xswire.split_strings(msg.payload)
    if len(parts) < n:
        raise XsError(errno.EINVAL)
    return parts


def _ok() -> bytes:
    return b"OK\0"


def _tree(store: Store, tx: _Tx | None) -> _Tree:
    return tx.tree if tx is not None else store.tree


def _read(store: Store, conn: Conn, tx: _Tx | None, msg: xswire.Msg) -> bytes:
    path = store.canonical(conn, _args(msg, 1)[0])
    return store._get(conn, _tree(store, tx), tx, path, "r").value


def _directory(store: Store, conn: Conn, tx: _Tx | None, msg: xswire.Msg) -> bytes:
    path = store.canonical(conn, _args(msg, 1)[0])
    node = store._get(conn, _tree(store, tx), tx, path, "r")
    return xswire.join_strings([c.encode() for c in node.children])


def _directory_part(store: Store, conn: Conn, tx: _Tx | None, msg: xswire.Msg) -> bytes:
    args = _args(msg, 2)
    path = store.canonical(conn, args[0])
    try:
        offset = int(args[1] or b"0")
    except ValueError:
        raise XsError(errno.EINVAL) from None
    node = store._get(conn, _tree(store, tx), tx, path, "r")
    gen = str(node.gen).encode() + b"\0"
    children = xswire.join_strings([c.encode() for c in node.children])
    if offset >= len(children):
        return gen + b"\0"
    room = xswire.PAYLOAD_MAX - len(gen) - 1
    end = offset
    while end < len(children):
        nxt = children.index(b"\0", end) + 1
        if nxt - offset > room:
            break
        end = nxt
    part = children[offset:end]
    return gen + part + (b"\0" if end == len(children) else b"")


def _write(store: Store, conn: Conn, tx: _Tx | None, msg: xswire.Msg) -> bytes:
    raw, sep, value = msg.payload.partition(b"\0")
    if not sep:
        raise XsError(errno.EINVAL)
    path = store.canonical(conn, raw)
    _put(store, conn, tx, path, value, keep=False)
    return _ok()


def _mkdir(store: Store, conn: Conn, tx: _Tx | None, msg: xswire.Msg) -> bytes:
    path = store.canonical(conn, _args(msg, 1)[0])
    _put(store, conn, tx, path, b"", keep=True)
    return _ok()


def _put(store: Store, conn: Conn, tx: _Tx | None, path: str, value: bytes, *, keep: bool) -> None:
    tree = _tree(store, tx)
    try:
        node = store._get(conn, tree, tx, path, "w")
    except XsError as exc:
        if exc.errno != errno.ENOENT:
            raise
        created = store._create(
            conn, tree, path, value, conn.domid, privileged=conn.privileged, tx=tx
        )
        events = [(p, tree.nodes[p].perms, False) for p in created]
        if tx is None:
            store._fire_all(events)
        else:
            tx.events.extend(events)
        return
    if keep:
        return
    new = store._stamped(node, value=value)
    if not conn.privileged and new.size() > store.quotas.node_size:
        raise XsError(errno.ENOSPC, "node size quota")
    tree.put(path, new)
    store._changed(tx, path, new.perms)
    if tx is None:
        store.fire(path, new.perms)
    else:
        tx.events.append((path, new.perms, False))


def _rm(store: Store, conn: Conn, tx: _Tx | None, msg: xswire.Msg) -> bytes:
    path = store.canonical(conn, _args(msg, 1)[0])
    tree = _tree(store, tx)
    try:
        store._get(conn, tree, tx, path, "w")
    except XsError as exc:
        if exc.errno == errno.ENOENT and _parent(path) in tree.nodes:
            return _ok()
        raise
    if path == "/":
        raise XsError(errno.EINVAL)
    removed = store._remove(tree, tx, path)
    if tx is None:
        store.fire(path, removed[0][1], recursive=True)
    else:
        tx.events.append((path, removed[0][1], True))
    return _ok()


def _get_perms(store: Store, conn: Conn, tx: _Tx | None, msg: xswire.Msg) -> bytes:
    path = store.canonical(conn, _args(msg, 1)[0])
    node = store._get(conn, _tree(store, tx), tx, path, "r")
    return xswire.join_strings([f"{p}{d}".encode() for d, p in node.perms])


def _set_perms(store: Store, conn: Conn, tx: _Tx | None, msg: xswire.Msg) -> bytes:
    args = _args(msg, 2)
    path = store.canonical(conn, args[0])
    texts = args[1:]
    if not conn.privileged and len(texts) > store.quotas.permissions:
        raise XsError(errno.ENOSPC, "permissions quota")
    perms = []
    for text in texts:
        m = _PERM.fullmatch(text)
        if m is None:
            raise XsError(errno.EINVAL, "bad permission")
        perms.append((int(m.group(2)), m.group(1).decode()))
    tree = _tree(store, tx)
    node = store._get(conn, tree, tx, path, "w")
    if "o" not in store.access(conn, node.perms):
        raise XsError(errno.EACCES)
    if not conn.privileged and perms[0][0] != node.owner:
        raise XsError(errno.EPERM, "only dom0 changes an owner")
    new = store._stamped(node, perms=tuple(perms))
    tree.put(path, new)
    store._changed(tx, path, new.perms)
    if tx is None:
        store.fire(path, new.perms)
    else:
        tx.events.append((path, new.perms, False))
    return _ok()


def _watch(store: Store, conn: Conn, tx: _Tx | None, msg: xswire.Msg) -> bytes:
    args = _args(msg, 2)
    path = store.canonical(conn, args[0], special=True)
    token = args[1]
    depth = None
    if len(args) > 2 and args[2]:
        try:
            depth = int(args[2])
        except ValueError:
            raise XsError(errno.EINVAL) from None
    if any(w.path == path and w.token == token for w in conn.watches):
        raise XsError(errno.EEXIST)
    if not conn.privileged and len(conn.watches) >= store.quotas.watches:
        raise XsError(errno.E2BIG, "watch quota")
    watch = _Watch(path, token, not args[0].startswith((b"/", b"@")), depth)
    conn.watches.append(watch)
    # The reply first, then the initial event (xenstored's order).
    reply = xswire.encode(XsType.WATCH, msg.req_id, msg.tx_id, _ok())
    conn.deliver(reply)
    store._event(conn, watch, path)
    raise _Answered()


def _unwatch(store: Store, conn: Conn, tx: _Tx | None, msg: xswire.Msg) -> bytes:
    args = _args(msg, 2)
    path = store.canonical(conn, args[0], special=True)
    for i, watch in enumerate(conn.watches):
        if watch.path == path and watch.token == args[1]:
            del conn.watches[i]
            return _ok()
    raise XsError(errno.ENOENT)


def _tx_start(store: Store, conn: Conn, tx: _Tx | None, msg: xswire.Msg) -> bytes:
    if msg.tx_id:
        raise XsError(errno.EBUSY)
    if not conn.privileged and len(conn.txs) >= store.quotas.transactions:
        raise XsError(errno.ENOSPC, "transaction quota")
    store._tx_ids = store._tx_ids % 0xFFFFFFFF + 1
    while any(store._tx_ids in c.txs for c in store.conns):
        store._tx_ids = store._tx_ids % 0xFFFFFFFF + 1
    new = _Tx(store._tx_ids, store.tree.copy(), store.gen)
    conn.txs[new.id] = new
    return str(new.id).encode() + b"\0"


def _tx_end(store: Store, conn: Conn, tx: _Tx | None, msg: xswire.Msg) -> bytes:
    if tx is None:
        raise XsError(errno.ENOENT)
    arg = _args(msg, 1)[0]
    if arg not in (b"T", b"F"):
        raise XsError(errno.EINVAL)
    del conn.txs[tx.id]
    try:
        if arg == b"F":
            return _ok()
        if any(store.changed_at.get(p, 0) > tx.start for p in tx.accessed):
            store.counters["conflicts"] += 1
            raise XsError(errno.EAGAIN)
        if tx.touched:
            for path in tx.touched:
                node = tx.tree.nodes.get(path)
                if node is None:
                    store.tree.drop(path)
                else:
                    store.tree.put(path, node)
                store._changed(None, path, node.perms if node else _ROOT_PERMS)
            store._fire_all(tx.events)
        return _ok()
    finally:
        store._trim()


def _get_domain_path(store: Store, conn: Conn, tx: _Tx | None, msg: xswire.Msg) -> bytes:
    return domain_path(_domid(_args(msg, 1)[0])).encode() + b"\0"


def _introduce(store: Store, conn: Conn, tx: _Tx | None, msg: xswire.Msg) -> bytes:
    _privileged(conn)
    domid = _domid(_args(msg, 3)[0], real=True)
    store.introduce(domid)
    return _ok()


def _release(store: Store, conn: Conn, tx: _Tx | None, msg: xswire.Msg) -> bytes:
    _privileged(conn)
    domid = _domid(_args(msg, 1)[0], real=True)
    if domid not in store.domains:
        raise XsError(errno.ENOENT)
    store.release(domid)
    return _ok()


def _is_introduced(store: Store, conn: Conn, tx: _Tx | None, msg: xswire.Msg) -> bytes:
    domid = _domid(_args(msg, 1)[0])
    return b"T\0" if domid == 0 or domid in store.domains else b"F\0"


def _reset_watches(store: Store, conn: Conn, tx: _Tx | None, msg: xswire.Msg) -> bytes:
    conn.watches.clear()
    conn.txs.clear()
    store._trim()
    return _ok()


def _privileged(conn: Conn) -> None:
    if not conn.privileged:
        raise XsError(errno.EACCES)


def _domid(raw: bytes, *, real: bool = False) -> int:
    try:
        domid = int(raw)
    except ValueError:
        raise XsError(errno.EINVAL) from None
    if not 0 <= domid <= 65535 or (real and not 0 < domid < 0x7FF0):
        raise XsError(errno.EINVAL)
    return domid


class _Answered(Exception):
    """The handler delivered its reply itself (WATCH: reply, then the first event)."""


_HANDLERS: dict[int, Callable[[Store, Conn, _Tx | None, xswire.Msg], bytes]] = {
    XsType.READ: _read,
    XsType.DIRECTORY: _directory,
    XsType.DIRECTORY_PART: _directory_part,
    XsType.WRITE: _write,
    XsType.MKDIR: _mkdir,
    XsType.RM: _rm,
    XsType.GET_PERMS: _get_perms,
    XsType.SET_PERMS: _set_perms,
    XsType.WATCH: _watch,
    XsType.UNWATCH: _unwatch,
    XsType.TRANSACTION_START: _tx_start,
    XsType.TRANSACTION_END: _tx_end,
    XsType.GET_DOMAIN_PATH: _get_domain_path,
    XsType.INTRODUCE: _introduce,
    XsType.RELEASE: _release,
    XsType.IS_DOMAIN_INTRODUCED: _is_introduced,
    XsType.RESET_WATCHES: _reset_watches,
}
_NO_TX = frozenset(
    {XsType.WATCH, XsType.UNWATCH, XsType.TRANSACTION_START, XsType.INTRODUCE, XsType.RELEASE}
)


def _parent(path: str) -> str:
    head = path.rsplit("/", 1)[0]
    return head or "/"


def _join(path: str, child: str) -> str:
    return f"/{child}" if path == "/" else f"{path}/{child}"


def _is_child(child: str, parent: str) -> bool:
    return child == parent or parent == "/" or child.startswith(parent + "/")


def _depth(child: str, parent: str) -> int:
    if child == parent:
        return 0
    rest = child[len(parent) :] if parent != "/" else child
    return rest.count("/")


# --- I/O ----------------------------------------------------------------------------------------


class _Client:
    """One stream connection: its decoder, outbound queue and store ``Conn``."""

    def __init__(self, server: XenstoreServer, sock: socket.socket, domid: int, privileged: bool):
        self.server = server
        self.sock = sock
        self.fd = sock.fileno()
        self.decoder = xswire.Decoder()
        self.outbound: deque[bytes] = deque()
        self.outbound_bytes = 0
        self.writing = False
        self.reading = True
        self.held: list[bytes] = []  # replies waiting for a save to be durable
        self.waiting_save = 0  # the save generation they wait for
        self.inbox: deque[xswire.Msg] = deque()
        self.scheduled = False
        self.closed = False
        self.conn = server.store.connect(domid, self.send, privileged=privileged)
        self.log = log.bind(domid=domid) if not privileged else log

    def send(self, frame: bytes) -> None:
        if self.closed:
            return
        if self.held:  # keep the order: events behind the replies they follow
            self.held.append(frame)
            return
        self._out(frame)

    def _out(self, frame: bytes) -> None:
        if not self.outbound:
            try:
                sent = self.sock.send(frame, socket.MSG_DONTWAIT)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                self.server._drop(self, f"send failed: {exc.strerror}")
                return
            if sent == len(frame):
                return
            frame = frame[sent:]
        self.outbound.append(frame)
        self.outbound_bytes += len(frame)
        if self.outbound_bytes > self.server.max_outbound_bytes:
            self.server._drop(self, "client does not read its replies")
            return
        if not self.writing:
            self.writing = True
            self.server.loop.add_writer(self.fd, self._flush)
        self._throttle()

    def _flush(self) -> None:
        while self.outbound:
            frame = self.outbound[0]
            try:
                sent = self.sock.send(frame, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            except OSError as exc:
                self.server._drop(self, f"send failed: {exc.strerror}")
                return
            self.outbound_bytes -= sent
            if sent < len(frame):
                self.outbound[0] = frame[sent:]
                return
            self.outbound.popleft()
        self.writing = False
        self.server.loop.remove_writer(self.fd)
        self._throttle()

    def _throttle(self) -> None:
        """Read only while there is room: a domain with too many replies it has
        not taken is not read (xenstored's outstanding-requests quota), nor
        is any client with a backlog of requests still to answer."""
        if self.closed:
            return
        busy = len(self.inbox) >= INBOX_MAX or (
            not self.conn.privileged and len(self.outbound) >= self.server.store.quotas.outstanding
        )
        if busy and self.reading:
            self.reading = False
            self.server.loop.remove_reader(self.fd)
        elif not busy and not self.reading and not self.closed:
            self.reading = True
            self.server.loop.add_reader(self.fd, self.server._readable, self)


class XenstoreServer:
    """The store on its socket, the domains' own connections, and its file."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        socket_path: Path,
        state_path: Path | None,
        quotas: Quotas | None = None,
    ) -> None:
        self.loop = loop
        self.path = socket_path
        self.state_path = state_path
        self.store = Store(quotas)
        self.clients: dict[int, _Client] = {}
        self.max_outbound_bytes = 1 << 20
        self._listener: socket.socket | None = None
        self._saved = self.store.durable_changes  # changes already on disk
        self._saving: asyncio.Task[None] | None = None
        self._save_gen = 0
        self._saves_done = 0
        self.saves = 0

    # --- lifecycle --------------------------------------------------------------------
    def load(self) -> str:
        """The saved tree, if any; returns what was loaded, for the log."""
        if self.state_path is None:
            return "none"
        try:
            raw = self.state_path.read_bytes()
        except FileNotFoundError:
            return "fresh"
        try:
            self.store.load(json.loads(raw))
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"xenstore file {self.state_path} is unusable: {exc}") from None
        self._saved = self.store.durable_changes
        return str(self.state_path)

    def start(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            old = os.umask(0o177)
            try:
                sock.bind(str(self.path))
            finally:
                os.umask(old)
            os.chmod(self.path, 0o600)  # dom0's toolstack only, as /var/run/xenstored/socket
            sock.listen(64)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self._listener = sock
        self.loop.add_reader(sock.fileno(), self._accept)
        log.info("xenstore.listening", socket=str(self.path), nodes=len(self.store.tree.nodes))

    def stop(self) -> None:
        if self._listener is not None:
            self.loop.remove_reader(self._listener.fileno())
            self._listener.close()
            self._listener = None
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        for client in list(self.clients.values()):
            self._drop(client, "xenstore stopping", level="debug")
        if self.store.durable_changes != self._saved and self.state_path is not None:
            self._write(self.store.dump())

    def domain_socket(self, domid: int) -> socket.socket:
        """A new connection of domain ``domid``; returns the domain's end."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        ours.setblocking(False)
        self._add(ours, domid, privileged=False)
        return theirs

    def close_domain(self, domid: int) -> None:
        for client in list(self.clients.values()):
            if not client.conn.privileged and client.conn.domid == domid:
                self._drop(client, "domain released", level="info")

    # --- serving -------------------------------------------------------------------------
    def _accept(self) -> None:
        assert self._listener is not None
        for _ in range(16):
            try:
                sock, _addr = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("xenstore.accept_failed", reason=exc.strerror)
                return
            sock.setblocking(False)
            self._add(sock, 0, privileged=True)

    def _add(self, sock: socket.socket, domid: int, *, privileged: bool) -> _Client:
        client = _Client(self, sock, domid, privileged)
        self.clients[client.fd] = client
        self.loop.add_reader(client.fd, self._readable, client)
        return client

    def _readable(self, client: _Client) -> None:
        try:
            data = client.sock.recv(16384)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._drop(client, f"receive failed: {exc.strerror}", level="info")
            return
        if not data:
            self._drop(client, "closed by the client", level="debug")
            return
        try:
            msgs = client.decoder.feed(data)
        except ProtocolError as exc:
            self._drop(client, f"protocol violation: {exc.message}")
            return
        client.inbox.extend(msgs)
        if not client.scheduled:
            self._serve(client)
        else:
            client._throttle()

    def _serve(self, client: _Client) -> None:
        """Answer queued requests, at most ``BATCH`` per loop iteration: a
        client's flood takes turns with everyone else."""
        store = self.store
        client.scheduled = False
        served = 0
        while client.inbox and not client.held and not client.closed:
            if served >= BATCH:
                client.scheduled = True
                self.loop.call_soon(self._serve, client)
                break
            served += 1
            msg = client.inbox.popleft()
            before = store.durable_changes
            try:
                reply: bytes | None = store.request(client.conn, msg)
            except _Answered:
                reply = None
            if store.durable_changes != before and self.state_path is not None:
                # Acknowledged once on disk: hold the reply (and what follows) until then.
                client.held.append(reply or b"")
                client.waiting_save = self._schedule_save()
                continue
            if reply is not None:
                client.send(reply)
        client._throttle()

    def _schedule_save(self) -> int:
        """The number of the save that will hold every change made so far."""
        if self._saving is None:
            self._saving = self.loop.create_task(self._save_loop())
        return self._save_gen + 1

    async def _save_loop(self) -> None:
        try:
            while self.store.durable_changes != self._saved:
                self._save_gen += 1
                target = self.store.durable_changes
                document = self.store.dump()
                await asyncio.to_thread(self._write, document)
                self._saved = target
                self._saves_done = self._save_gen
                self.saves += 1
                self._release_held()
        except OSError as exc:
            log.error("xenstore.save_failed", path=str(self.state_path), error=exc.strerror)
            for client in list(self.clients.values()):
                if client.held:
                    self._drop(client, "the store could not be saved")
        finally:
            self._saving = None

    def _release_held(self) -> None:
        for client in list(self.clients.values()):
            if client.held and client.waiting_save <= self._saves_done:
                frames, client.held = client.held, []
                for frame in frames:
                    if frame:
                        client._out(frame)
                self._serve(client)

    def _write(self, document: dict[str, Any]) -> None:
        assert self.state_path is not None
        path = self.state_path
        data = json.dumps(document, sort_keys=True).encode()
        tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        dirfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dirfd)
        finally:
            os.close(dirfd)

    def _drop(self, client: _Client, reason: str, level: str = "warning") -> None:
        if client.closed:
            return
        client.closed = True
        self.store.disconnect(client.conn)
        if client.reading:
            self.loop.remove_reader(client.fd)
        if client.writing:
            self.loop.remove_writer(client.fd)
        self.clients.pop(client.fd, None)
        getattr(client.log, level)("xenstore.client_closed", reason=reason)
        client.sock.close()


class LocalClient:
    """The daemon's own privileged connection: calls in, watch events to callbacks."""

    def __init__(
        self, store: Store, defer: Callable[[Callable[[str], None], str], object] | None = None
    ) -> None:
        """``defer(callback, path)`` runs a watch callback later (``loop.call_soon``):
        never inside the store's own change, whose watch lists it may alter."""
        self.store = store
        self.defer = defer
        self._callbacks: dict[bytes, Callable[[str], None]] = {}
        self._pending: list[bytes] = []
        self.conn = store.connect(0, self._deliver, privileged=True)
        self._tokens = 0

    def _deliver(self, frame: bytes) -> None:
        mtype = xswire.HEADER.unpack_from(frame)[0]
        if mtype != XsType.WATCH_EVENT:
            self._pending.append(frame)
            return
        parts = xswire.split_strings(frame[xswire.HEADER.size :])
        callback = self._callbacks.get(parts[1]) if len(parts) > 1 else None
        if callback is None:
            return
        if self.defer is not None:
            self.defer(callback, parts[0].decode())
        else:
            callback(parts[0].decode())

    def _call(self, mtype: XsType, parts: list[bytes], raw: bytes | None = None) -> bytes:
        payload = raw if raw is not None else xswire.join_strings(parts)
        msg = xswire.Msg(mtype, 0, 0, payload)
        try:
            reply = self.store.request(self.conn, msg)
        except _Answered:
            reply = self._pending.pop(0)
        rtype, _r, _t, _n = xswire.HEADER.unpack_from(reply)
        body = reply[xswire.HEADER.size :]
        if rtype == XsType.ERROR:
            raise XsError.from_payload(body)
        return body

    def read(self, path: str) -> bytes:
        return self._call(XsType.READ, [path.encode()])

    def read_or(self, path: str, default: bytes = b"") -> bytes:
        try:
            return self.read(path)
        except XsError:
            return default

    def write(self, path: str, value: bytes | str) -> None:
        data = value.encode() if isinstance(value, str) else value
        self._call(XsType.WRITE, [], path.encode() + b"\0" + data)

    def mkdir(self, path: str) -> None:
        self._call(XsType.MKDIR, [path.encode()])

    def rm(self, path: str) -> None:
        self._call(XsType.RM, [path.encode()])

    def set_perms(self, path: str, perms: list[str]) -> None:
        self._call(XsType.SET_PERMS, [path.encode(), *(p.encode() for p in perms)])

    def directory(self, path: str) -> list[str]:
        return [
            c.decode() for c in xswire.split_strings(self._call(XsType.DIRECTORY, [path.encode()]))
        ]

    def watch(self, path: str, callback: Callable[[str], None]) -> bytes:
        self._tokens += 1
        token = f"vbus{self._tokens}".encode()
        self._callbacks[token] = callback
        self._call(XsType.WATCH, [path.encode(), token])
        return token

    def unwatch(self, path: str, token: bytes) -> None:
        self._callbacks.pop(token, None)
        with contextlib.suppress(XsError):
            self._call(XsType.UNWATCH, [path.encode(), token])

    def close(self) -> None:
        self._callbacks.clear()
        self.store.disconnect(self.conn)
