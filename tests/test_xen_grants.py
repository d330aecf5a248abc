"""Grant tables and event channels: the rules a backend enforces on a domain's grants,
the flags both sides change atomically, and eventfd delivery that never blocks."""

from __future__ import annotations

import fcntl
import mmap
import os

import pytest

from vbus.errors import Busy, Fault, Invalid, NotFound
from vbus.memory import PAGE_SIZE
from vbus.xen.evtchn import EvtchnTable, PortTransport
from vbus.xen.grants import (
    GTF_PERMIT_ACCESS,
    GTF_READING,
    GTF_READONLY,
    GTF_WRITING,
    GrantMapper,
    GrantMemory,
    GrantTable,
)

PAGES = 8


@pytest.fixture
def domain() -> tuple[GrantTable, GrantTable, GrantMapper, mmap.mmap]:
    """The domain's view of its table, the backend's view of the same bytes, a mapper."""
    shared = mmap.mmap(-1, 64 * 8)
    memory = mmap.mmap(-1, PAGES * PAGE_SIZE)
    ro = mmap.mmap(-1, PAGES * PAGE_SIZE, prot=mmap.PROT_READ)
    return (
        GrantTable(shared),
        GrantTable(shared),
        GrantMapper(GrantTable(shared), memory, ro),
        memory,
    )


def test_map_only_what_is_granted_to_dom0_inside_the_domain(domain) -> None:  # type: ignore[no-untyped-def]
    guest, _backend, mapper, memory = domain
    guest.grant(1, 0, 3)
    memory[3 * PAGE_SIZE : 3 * PAGE_SIZE + 5] = b"hello"
    pages = GrantMemory(mapper)
    pages.map_grant(1)
    assert pages.read(1 * PAGE_SIZE, 5) == b"hello"  # address = ref * 4096
    with pytest.raises(Fault, match="outside every mapped page"):
        pages.read(3 * PAGE_SIZE, 5)  # the frame itself is not an address
    guest.grant(2, 7, 4)
    with pytest.raises(Fault, match="is for domain 7"):
        pages.map_grant(2)
    guest.grant(4, 0, PAGES)  # one past the last frame
    with pytest.raises(Fault, match="outside the domain"):
        pages.map_grant(4)
    assert guest.entry(4)[0] == GTF_PERMIT_ACCESS  # not left pinned
    with pytest.raises(Fault, match="grants no access"):
        pages.map_grant(5)
    with pytest.raises(Fault, match="outside the 64-entry table"):
        pages.map_grant(64)
    with pytest.raises(Fault, match="listed twice"):
        pages.map_grant(1)


def test_flags_while_mapped_and_end_of_access(domain) -> None:  # type: ignore[no-untyped-def]
    guest, _backend, mapper, _memory = domain
    guest.grant(1, 0, 1)
    guest.grant(2, 0, 2, readonly=True)
    pages = GrantMemory(mapper)
    pages.map_grant(1)
    pages.map_grant(2)
    assert guest.entry(1)[0] == GTF_PERMIT_ACCESS | GTF_READING | GTF_WRITING
    assert guest.entry(2)[0] == GTF_PERMIT_ACCESS | GTF_READONLY | GTF_READING
    assert not guest.end_access(1)  # mapped: Xen refuses, nothing changes
    assert guest.entry(1)[0] & GTF_WRITING
    pages.write(1 * PAGE_SIZE, b"ok")
    with pytest.raises(Fault, match="read-only"):
        pages.write(2 * PAGE_SIZE, b"no")
    view = pages.view(2 * PAGE_SIZE, 4)
    assert view.readonly
    view.release()
    # A second device mapping the same grant: the pin outlives the first unmap.
    other = GrantMemory(mapper)
    other.map_grant(1)
    pages.close()
    assert guest.entry(1)[0] & GTF_READING
    assert guest.end_access(2)
    other.close()
    assert guest.end_access(1)
    assert guest.entry(1) == (0, 0, 1)
    assert mapper.mapped == 0
    with pytest.raises(Invalid):
        GrantTable(bytearray(12))


def test_pin_is_a_compare_and_swap_of_flags_and_domid(domain) -> None:  # type: ignore[no-untyped-def]
    guest, backend, _mapper, _memory = domain
    guest.grant(9, 0, 1)
    # The domain retargets its entry between the backend's load and its swap:
    # the swap fails, the next round sees the new domid and refuses it.
    real_cas = backend.atomic.cas_u32
    calls = []

    def racing_cas(offset: int, expected: int, desired: int) -> int:
        if not calls:
            guest.atomic.store_u16(offset + 2, 5)
        calls.append(offset)
        return real_cas(offset, expected, desired)

    backend.atomic = type("A", (), {})()  # a stand-in that forwards to the real view
    for name in ("load_u32", "load_u16", "fetch_and_u16"):
        setattr(backend.atomic, name, getattr(guest.atomic, name))
    backend.atomic.cas_u32 = racing_cas
    with pytest.raises(Fault, match="is for domain 5"):
        backend.pin(9, 0)
    assert guest.entry(9)[0] == GTF_PERMIT_ACCESS  # never pinned


def test_event_channels_bind_send_close() -> None:
    table = EvtchnTable()
    unbound = table.alloc_unbound(5, 0)
    # A send before the binding is pending when the backend binds.
    os.eventfd_write(unbound.outbox.fd, 1)
    with pytest.raises(Invalid):
        table.bind_interdomain(7, 5, unbound.port)  # not for domain 7
    backend = table.bind_interdomain(0, 5, unbound.port)
    with pytest.raises(Busy):
        table.bind_interdomain(0, 5, unbound.port)
    transport = PortTransport(table, backend)
    assert transport.drain() == 1
    transport.kick()
    assert os.eventfd_read(unbound.inbox.fd) == 1
    table.send(5, unbound.port)
    assert transport.drain() == 1
    transport.close()
    assert not table.get(5, unbound.port).bound  # unbound again, still there
    again = table.bind_interdomain(0, 5, unbound.port)
    assert again.inbox is unbound.outbox
    assert table.close_domain(5) == 1
    with pytest.raises(NotFound):
        table.send(5, unbound.port)
    table.close(0, again.port)
    assert table.ports == {}


def test_send_never_blocks_on_a_full_counter() -> None:
    table = EvtchnTable()
    port = table.alloc_unbound(5, 0)
    backend = table.bind_interdomain(0, 5, port.port)
    fd = port.inbox.fd
    os.eventfd_write(fd, 0xFFFFFFFFFFFFFFFE)  # the domain fills its own inbox
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    with pytest.raises(Fault, match="would block"):
        table.send(0, backend.port)
    table.close_domain(5)
    table.close_domain(0)
