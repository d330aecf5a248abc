"""The embedded xenstore: the store's semantics (sans-IO) and Xen's own tools against vbusd.

The unit half drives ``Store`` with wire messages from dom0 and from an
unprivileged domain; the integration half runs Debian's xenstore-utils
(``xenstore-write``, ``-read``, ``-ls``, ``-list``, ``-rm``, ``-chmod``,
``-exists``, ``-watch``) with ``XENSTORED_PATH`` at a real daemon's socket.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import Daemon, require
from vbus.errors import ProtocolError
from vbus.soak.fuzz import xenstore_target
from vbus.xen import xswire
from vbus.xen.xenstore import LocalClient, Quotas, Store, is_durable
from vbus.xen.xswire import XsError, XsType

TOOLS = ("xenstore-ls", "xenstore-read", "xenstore-write", "xenstore-rm", "xenstore-list",
         "xenstore-chmod", "xenstore-exists", "xenstore-watch")  # fmt: skip


class Client:
    """One connection to a ``Store``, speaking wire messages."""

    def __init__(self, store: Store, domid: int, privileged: bool) -> None:
        self.store = store
        self.events: list[bytes] = []
        self.conn = store.connect(domid, self.events.append, privileged=privileged)
        self.req = 0

    def raw(self, mtype: int, payload: bytes, tx: int = 0) -> tuple[int, bytes]:
        self.req += 1
        msg = xswire.Msg(mtype, self.req, tx, payload)
        before = len(self.events)
        try:
            reply = self.store.request(self.conn, msg)
        except Exception as exc:  # WATCH answers through the connection
            assert type(exc).__name__ == "_Answered"
            reply = self.events.pop(before)
        rtype, req_id, tx_id, length = xswire.HEADER.unpack_from(reply)
        assert (req_id, tx_id) == (self.req, tx)
        assert length == len(reply) - 16
        return rtype, reply[16:]

    def op(self, mtype: int, *parts: bytes, tx: int = 0) -> bytes:
        rtype, body = self.raw(mtype, xswire.join_strings(list(parts)), tx)
        if rtype == XsType.ERROR:
            raise XsError.from_payload(body)
        assert rtype == mtype
        return body

    def write(self, path: str, value: bytes, tx: int = 0) -> None:
        rtype, body = self.raw(XsType.WRITE, path.encode() + b"\0" + value, tx)
        if rtype == XsType.ERROR:
            raise XsError.from_payload(body)

    def read(self, path: str, tx: int = 0) -> bytes:
        return self.op(XsType.READ, path.encode(), tx=tx)

    def watched(self) -> list[tuple[str, str]]:
        out = []
        for frame in self.events:
            assert xswire.HEADER.unpack_from(frame)[:3] == (XsType.WATCH_EVENT, 0, 0)
            path, token = xswire.split_strings(frame[16:])
            out.append((path.decode(), token.decode()))
        self.events.clear()
        return out


def errno_of(call: Callable[[], object]) -> int:
    with pytest.raises(XsError) as info:
        call()
    return info.value.errno


@pytest.fixture
def store() -> Store:
    return Store()


def domain(store: Store, domid: int = 5) -> tuple[Client, Client]:
    """dom0 and domain ``domid``, with the directory a toolstack gives it."""
    dom0 = Client(store, 0, True)
    base = f"/local/domain/{domid}"
    dom0.op(XsType.MKDIR, base.encode())
    dom0.op(XsType.SET_PERMS, base.encode(), b"n0", f"r{domid}".encode())
    dom0.op(XsType.MKDIR, f"{base}/data".encode())
    dom0.op(XsType.SET_PERMS, f"{base}/data".encode(), f"b{domid}".encode())
    return dom0, Client(store, domid, False)


# --- the data model ----------------------------------------------------------------------


def test_write_creates_parents_and_read_directory_rm(store: Store) -> None:
    dom0 = Client(store, 0, True)
    dom0.write("/a/b/c", b"v\0binary")
    assert dom0.read("/a/b/c") == b"v\0binary"
    assert dom0.read("/a/b") == b""
    assert dom0.op(XsType.DIRECTORY, b"/a") == b"b\0"
    dom0.op(XsType.MKDIR, b"/a/b/c")  # exists: value kept
    assert dom0.read("/a/b/c") == b"v\0binary"
    dom0.op(XsType.RM, b"/a/b")
    assert errno_of(lambda: dom0.read("/a/b/c")) == errno.ENOENT
    dom0.op(XsType.RM, b"/a/zz")  # absent, parent exists: fine
    assert errno_of(lambda: dom0.op(XsType.RM, b"/q/zz")) == errno.ENOENT
    assert errno_of(lambda: dom0.op(XsType.RM, b"/")) == errno.EINVAL
    for bad in (b"/a//b", b"/a/", b"/a b", b""):
        assert errno_of(lambda bad=bad: dom0.read(bad.decode())) == errno.EINVAL
    assert errno_of(lambda: dom0.op(XsType.CONTROL, b"x")) == errno.ENOSYS


def test_directory_part_returns_the_list_in_pieces(store: Store) -> None:
    dom0 = Client(store, 0, True)
    names = [f"child-{i:04d}-{'x' * 40}" for i in range(200)]  # 10 KiB of names
    for name in names:
        dom0.write(f"/big/{name}", b"")
    assert errno_of(lambda: dom0.op(XsType.DIRECTORY, b"/big")) == errno.E2BIG
    got, offset, gens = b"", 0, set()
    while True:
        body = dom0.op(XsType.DIRECTORY_PART, b"/big", str(offset).encode())
        gen, _, rest = body.partition(b"\0")
        gens.add(gen)
        if rest == b"\0" or rest.endswith(b"\0\0"):
            got += rest[:-1]
            break
        got += rest
        offset += len(rest)
    assert len(gens) == 1
    assert xswire.split_strings(got) == [n.encode() for n in names]


def test_domain_permissions_owner_inheritance_and_errors(store: Store) -> None:
    dom0, dom5 = domain(store, 5)
    dom7 = Client(store, 7, False)
    dom5.write("data/mine", b"1")  # relative to /local/domain/5
    assert dom0.op(XsType.GET_PERMS, b"/local/domain/5/data/mine") == b"b5\0"
    dom5.write("/local/domain/5/data/sub/leaf", b"x")
    assert dom0.op(XsType.GET_PERMS, b"/local/domain/5/data/sub/leaf") == b"b5\0"
    # Domain 7 has no entry: the owner's entry (b) is everyone's default here.
    assert dom7.read("/local/domain/5/data/mine") == b"1"
    dom5.op(XsType.SET_PERMS, b"data/mine", b"n5", b"r7")
    assert dom7.read("/local/domain/5/data/mine") == b"1"
    assert errno_of(lambda: dom7.write("/local/domain/5/data/mine", b"2")) == errno.EACCES
    # Only dom0 may give a node away.
    assert errno_of(lambda: dom5.op(XsType.SET_PERMS, b"data/mine", b"n7")) == errno.EPERM
    # Another domain's directory, and dom0's.
    assert errno_of(lambda: dom5.write("/local/domain/0/x", b"1")) == errno.EACCES
    assert errno_of(lambda: dom5.write("/local/domain/5/x", b"1")) == errno.EACCES
    assert errno_of(lambda: dom5.read("/tool/none")) == errno.EACCES  # not ENOENT: it may not know
    dom0.write("/tool/secret", b"s")
    assert errno_of(lambda: dom5.read("/tool/secret")) == errno.EACCES
    assert dom5.read("/local/domain/5") == b""  # r5
    assert errno_of(lambda: dom5.read("data/none")) == errno.ENOENT
    assert errno_of(lambda: dom5.op(XsType.INTRODUCE, b"9", b"0", b"0")) == errno.EACCES
    assert dom5.op(XsType.GET_DOMAIN_PATH, b"5") == b"/local/domain/5\0"


def test_quotas_with_xens_errors() -> None:
    store = Store(Quotas(nodes=10, watches=3, transactions=2, node_size=200))
    dom0, dom5 = domain(store, 5)
    for i in range(9):  # with data/ itself, which it owns: 10
        dom5.write(f"data/n{i}", b"")
    assert errno_of(lambda: dom5.write("data/n10", b"")) == errno.ENOSPC
    assert errno_of(lambda: dom5.write("data/n10/deep", b"")) == errno.ENOSPC
    assert errno_of(lambda: dom5.write("data/n0", b"x" * 300)) == errno.ENOSPC
    dom0.write("/local/domain/5/data/by-dom0", b"")  # dom0 is not bound by them
    for i in range(3):
        dom5.op(XsType.WATCH, f"data/n{i}".encode(), b"t")
    assert errno_of(lambda: dom5.op(XsType.WATCH, b"data/n5", b"t")) == errno.E2BIG
    assert errno_of(lambda: dom5.op(XsType.WATCH, b"data/n0", b"t")) == errno.EEXIST
    dom5.op(XsType.TRANSACTION_START, b"")
    dom5.op(XsType.TRANSACTION_START, b"")
    assert errno_of(lambda: dom5.op(XsType.TRANSACTION_START, b"")) == errno.ENOSPC
    assert errno_of(lambda: dom5.op(XsType.SET_PERMS, b"data/n1", *[b"b5"] * 6)) == errno.ENOSPC
    assert errno_of(lambda: dom5.read("x" * 2100)) == errno.EINVAL  # relative path quota


def test_watches_initial_event_subtree_relative_and_permissions(store: Store) -> None:
    dom0, dom5 = domain(store, 5)
    dom0.op(XsType.WATCH, b"/local/domain/5", b"tok")
    assert dom0.watched() == [("/local/domain/5", "tok")]  # fired at registration
    dom5.op(XsType.WATCH, b"data", b"rel")
    assert dom5.watched() == [("data", "rel")]
    dom5.write("data/a/b", b"1")
    assert ("/local/domain/5/data/a/b", "tok") in dom0.watched()
    assert dom5.watched() == [("data/a", "rel"), ("data/a/b", "rel")]
    dom0.op(XsType.WATCH, b"/local/domain/5/data/a/b", b"deep")
    dom0.watched()
    dom0.op(XsType.RM, b"/local/domain/5/data/a")
    # The watch below the removed node hears of it under its own path.
    assert sorted(dom0.watched()) == [
        ("/local/domain/5/data/a", "tok"),
        ("/local/domain/5/data/a/b", "deep"),
    ]
    dom0.write("/tool/hidden", b"")
    dom5.op(XsType.WATCH, b"/tool", b"t")
    dom5.watched()
    dom0.write("/tool/hidden", b"2")
    assert dom5.watched() == []  # it may not read /tool/hidden
    dom0.op(XsType.UNWATCH, b"/local/domain/5", b"tok")
    assert errno_of(lambda: dom0.op(XsType.UNWATCH, b"/local/domain/5", b"tok")) == errno.ENOENT
    dom0.op(XsType.WATCH, b"@releaseDomain", b"rel")
    dom0.op(XsType.INTRODUCE, b"5", b"0", b"0")
    assert dom0.op(XsType.IS_DOMAIN_INTRODUCED, b"5") == b"T\0"
    dom0.watched()
    dom5.write("data/owned", b"")
    dom0.op(XsType.RELEASE, b"5")
    assert ("@releaseDomain", "rel") in dom0.watched()
    assert errno_of(lambda: dom0.read("/local/domain/5")) == errno.ENOENT
    assert dom0.op(XsType.IS_DOMAIN_INTRODUCED, b"5") == b"F\0"
    dom0.op(XsType.RESET_WATCHES, b"")
    dom0.write("/x", b"")
    assert dom0.watched() == []


def test_transactions_isolation_commit_conflict(store: Store) -> None:
    dom0, dom5 = domain(store, 5)
    a = Client(store, 0, True)
    a.write("/t/x", b"0")
    a.op(XsType.WATCH, b"/t", b"w")
    a.watched()
    tx = int(a.op(XsType.TRANSACTION_START, b"").rstrip(b"\0"))
    a.write("/t/x", b"1", tx)
    a.write("/t/new", b"n", tx)
    assert a.read("/t/x", tx) == b"1"
    assert dom0.read("/t/x") == b"0"  # isolated until committed
    assert errno_of(lambda: dom0.read("/t/new")) == errno.ENOENT
    assert a.watched() == []
    a.op(XsType.TRANSACTION_END, b"T", tx=tx)
    assert dom0.read("/t/x") == b"1" and dom0.read("/t/new") == b"n"
    assert {p for p, _t in a.watched()} >= {"/t/x", "/t/new"}
    # A node the transaction read, changed meanwhile: EAGAIN, nothing applied.
    tx = int(a.op(XsType.TRANSACTION_START, b"").rstrip(b"\0"))
    a.read("/t/x", tx)
    a.write("/t/y", b"from tx", tx)
    dom0.write("/t/x", b"changed")
    assert errno_of(lambda: a.op(XsType.TRANSACTION_END, b"T", tx=tx)) == errno.EAGAIN
    assert errno_of(lambda: dom0.read("/t/y")) == errno.ENOENT
    # Unrelated changes do not conflict; F discards.
    tx = int(a.op(XsType.TRANSACTION_START, b"").rstrip(b"\0"))
    a.write("/t/z", b"1", tx)
    dom0.write("/other", b"x")
    a.op(XsType.TRANSACTION_END, b"T", tx=tx)
    assert dom0.read("/t/z") == b"1"
    tx = int(a.op(XsType.TRANSACTION_START, b"").rstrip(b"\0"))
    a.write("/t/z", b"2", tx)
    a.op(XsType.TRANSACTION_END, b"F", tx=tx)
    assert dom0.read("/t/z") == b"1"
    assert errno_of(lambda: a.read("/t/z", tx=999)) == errno.ENOENT
    # A domain's transaction gets its permissions too.
    tx = int(dom5.op(XsType.TRANSACTION_START, b"").rstrip(b"\0"))
    assert errno_of(lambda: dom5.write("/t/x", b"no", tx)) == errno.EACCES


def test_decoder_limits_and_error_names() -> None:
    dec = xswire.Decoder()
    frame = xswire.encode(XsType.READ, 7, 0, b"/a\0")
    assert dec.feed(frame[:5]) == []
    assert dec.feed(frame[5:] + frame) == [xswire.Msg(XsType.READ, 7, 0, b"/a\0")] * 2
    with pytest.raises(ProtocolError):
        dec.feed(xswire.HEADER.pack(XsType.WRITE, 1, 0, 4097))
    with pytest.raises(ProtocolError):
        xswire.encode(XsType.WRITE, 1, 0, b"x" * 4097)
    assert XsError.from_payload(b"EAGAIN\0").errno == errno.EAGAIN
    assert xswire.error_payload(errno.E2BIG) == b"E2BIG\0"
    assert list(xswire.ERROR_NAMES.values())[:3] == ["EINVAL", "EACCES", "EEXIST"]


def test_local_client_and_durable_paths(store: Store) -> None:
    local = LocalClient(store)
    seen: list[str] = []
    local.watch("/local/domain/0/backend", seen.append)
    local.write("/local/domain/0/backend/vbus/3/1/state", "1")
    assert local.read("/local/domain/0/backend/vbus/3/1/state") == b"1"
    assert "/local/domain/0/backend/vbus/3/1/state" in seen
    assert local.directory("/local/domain/0/backend/vbus") == ["3"]
    assert not is_durable("/local/domain/0/backend/vbus/3")
    assert not is_durable("/local/domain/3/device")
    assert is_durable("/local/domain/0/name") and is_durable("/tool/x")
    dumped = store.dump()
    assert "/local/domain/0/backend" not in dumped["nodes"]
    again = Store()
    again.load(json.loads(json.dumps(dumped)))
    assert "backend" not in again.tree.nodes["/local/domain/0"].children


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_xenstore_fuzz_target(data: bytes) -> None:
    xenstore_target(data)


# --- Xen's own tools against vbusd ------------------------------------------------------------


def tools_env(daemon: Daemon) -> dict[str, str]:
    require(all(shutil.which(t) for t in TOOLS), "xenstore-utils (xenstore-* tools) not installed")
    return {**os.environ, "XENSTORED_PATH": str(daemon.run_dir / "xenstored.sock")}


def xs(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=20)


@pytest.mark.integration
def test_real_xenstore_tools(vbusd: Callable[..., Daemon]) -> None:
    daemon = vbusd("--no-admin")
    env = tools_env(daemon)
    sock = daemon.run_dir / "xenstored.sock"
    assert stat.S_IMODE(sock.stat().st_mode) == 0o600
    assert xs(env, "xenstore-write", "/tool/vbus/a", "1", "/tool/vbus/b/c", "hello").returncode == 0
    assert xs(env, "xenstore-read", "/tool/vbus/a", "/tool/vbus/b/c").stdout == "1\nhello\n"
    assert xs(env, "xenstore-list", "/tool/vbus").stdout.split() == ["a", "b"]
    assert xs(env, "xenstore-exists", "/tool/vbus/b/c").returncode == 0
    assert xs(env, "xenstore-exists", "/tool/vbus/zz").returncode != 0
    assert xs(env, "xenstore-chmod", "/tool/vbus/a", "n0", "r5").returncode == 0
    listing = xs(env, "xenstore-ls", "-p", "/tool/vbus").stdout
    assert 'a = "1"' in listing and "(n0,r5)" in listing
    tree = xs(env, "xenstore-ls", "/").stdout
    assert 'local = ""' in tree and '   c = "hello"' in tree
    assert xs(env, "xenstore-rm", "/tool/vbus/b").returncode == 0
    assert xs(env, "xenstore-list", "/tool/vbus").stdout.split() == ["a"]
    missing = xs(env, "xenstore-read", "/tool/vbus/nope")
    assert missing.returncode != 0 and "couldn't read path" in missing.stderr
    # xenstore-watch: the event at registration, then one per change below.
    watch = subprocess.Popen(
        ["xenstore-watch", "-n", "3", "/tool/vbus"], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 10
        while (
            b'"xenstore' not in Path(daemon.log_path).read_bytes() and time.monotonic() < deadline
        ):
            time.sleep(0.05)
        time.sleep(0.3)
        xs(env, "xenstore-write", "/tool/vbus/x/y", "5")
        out, _ = watch.communicate(timeout=10)
    finally:
        watch.kill()
    assert out.split() == ["/tool/vbus", "/tool/vbus/x", "/tool/vbus/x/y"]


@pytest.mark.integration
def test_contents_survive_a_restart(vbusd: Callable[..., Daemon]) -> None:
    daemon = vbusd("--no-admin")
    env = tools_env(daemon)
    assert xs(env, "xenstore-write", "/tool/keep", "kept").returncode == 0
    xs(env, "xenstore-chmod", "/tool/keep", "n0", "r3")
    # Acknowledged means on disk: a SIGKILL right after loses nothing.
    daemon.stop(sig=9)
    assert daemon.stop() == -9
    again = Daemon(daemon.run_dir, daemon.args).start()
    try:
        assert xs(env, "xenstore-read", "/tool/keep").stdout == "kept\n"
        assert "(n0,r3)" in xs(env, "xenstore-ls", "-p", "/tool").stdout
    finally:
        assert again.stop() == 0


@pytest.mark.integration
def test_a_flood_takes_turns_and_a_deaf_client_is_dropped(vbusd: Callable[..., Daemon]) -> None:
    daemon = vbusd("--no-admin")
    env = tools_env(daemon)
    flood = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    flood.connect(str(daemon.run_dir / "xenstored.sock"))
    request = xswire.encode(XsType.READ, 1, 0, b"/tool/none\0")
    sent = threading.Event()

    def pour() -> None:
        try:
            for _ in range(200):  # 200 x 1000 requests, never a reply read
                flood.sendall(request * 1000)
        except OSError:
            pass  # dropped: what should happen
        sent.set()

    pourer = threading.Thread(target=pour, daemon=True)
    pourer.start()
    try:
        started = time.monotonic()
        assert xs(env, "xenstore-write", "/tool/ok", "1").returncode == 0
        assert xs(env, "xenstore-read", "/tool/ok").stdout == "1\n"
        assert time.monotonic() - started < 10
        assert sent.wait(60), "the flood was neither served nor dropped"
        assert daemon.logged('"client does not read its replies"'), daemon.log()[-2000:]
    finally:
        flood.close()
        pourer.join(10)
    assert xs(env, "xenstore-read", "/tool/ok").stdout == "1\n"


@pytest.mark.integration
def test_an_unusable_xenstore_file_is_a_start_error(tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    (tmp_path / "state.xenstore.json").write_text('{"version": 1, "nodes": {"/x": 3}}')
    done = subprocess.run(
        [sys.executable, "-m", "vbus.daemon", "--run-dir", str(tmp_path / "run"),
         "--state", str(state), "--no-admin"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert done.returncode == 1
    assert "xenstore file" in done.stderr and "unusable" in done.stderr
