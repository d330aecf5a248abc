"""The learning switch without IO: learning, flooding, ageing, bounds, offload adaptation, keys."""

from __future__ import annotations

from collections import Counter

from tests.netframes import BROADCAST, MAC_A, MAC_B, MAC_C, frame, gso_frame, tcp_checksum_ok
from vbus.net.switch import Switch, Switches
from vbus.net.vnet import F_GUEST_CSUM, F_GUEST_TSO4, F_GUEST_TSO6, RX_CAPS


class FakePort:
    def __init__(self, name: str, caps: int = RX_CAPS) -> None:
        self.name = name
        self.caps = caps
        self.counters: Counter[str] = Counter()
        self.got: list[bytes] = []

    def deliver(self, frames: list[bytes]) -> None:
        self.got.extend(frames)

    def __repr__(self) -> str:
        return self.name


def three(switch: Switch) -> tuple[FakePort, FakePort, FakePort]:
    ports = FakePort("a"), FakePort("b"), FakePort("c")
    for port in ports:
        switch.attach(port)
    return ports


def test_unknown_unicast_and_broadcast_flood_then_learned_unicast_goes_to_one_port() -> None:
    switch = Switch("k")
    a, b, c = three(switch)
    switch.forward(a, [frame(MAC_B, MAC_A)], now=0.0)  # B unknown: flooded
    assert len(b.got) == 1 and len(c.got) == 1 and not a.got
    assert a.counters["tx_flooded"] == 1
    switch.forward(b, [frame(MAC_A, MAC_B)], now=1.0)  # A known: to a only
    assert len(a.got) == 1 and len(c.got) == 1
    switch.forward(a, [frame(MAC_B, MAC_A)] * 3, now=2.0)
    assert len(b.got) == 4 and len(c.got) == 1
    switch.forward(c, [frame(BROADCAST, MAC_C), frame(b"\x01\x00\x5e\x00\x00\x01", MAC_C)], now=3.0)
    assert len(a.got) == 3 and len(b.got) == 6
    assert switch.lookup(MAC_C, 3.0) is c
    assert switch.counters["learned"] == 3


def test_frames_for_the_senders_own_port_are_dropped() -> None:
    switch = Switch("k")
    a, b, _c = three(switch)
    switch.forward(a, [frame(BROADCAST, MAC_A)], now=0.0)
    switch.forward(a, [frame(MAC_A, MAC_B)], now=0.0)  # A lives on a: nowhere to go
    assert a.counters["tx_drop_same_port"] == 1
    assert len(b.got) == 1


def test_entries_age_out() -> None:
    switch = Switch("k", ageing=10.0)
    a, b, c = three(switch)
    switch.forward(b, [frame(BROADCAST, MAC_B)], now=0.0)
    switch.forward(a, [frame(MAC_B, MAC_A)], now=9.0)
    assert len(c.got) == 1  # only the broadcast
    switch.forward(a, [frame(MAC_B, MAC_A)], now=10.5)  # B stale: flooded again
    assert len(c.got) == 2
    switch.sweep(25.0)
    assert MAC_B not in switch.table and switch.macs[id(b)] == 0
    assert switch.counters["aged"] >= 1


def test_a_moving_mac_moves_its_entry() -> None:
    switch = Switch("k")
    a, b, _c = three(switch)
    switch.forward(a, [frame(BROADCAST, MAC_C)], now=0.0)
    assert switch.lookup(MAC_C, 0.0) is a
    switch.forward(b, [frame(BROADCAST, MAC_C)], now=1.0)
    assert switch.lookup(MAC_C, 1.0) is b
    assert switch.macs[id(a)] == 0 and switch.macs[id(b)] == 1
    assert switch.counters["moved"] == 1


def test_a_port_holds_at_most_its_share_of_the_table() -> None:
    switch = Switch("k", max_macs_per_port=4)
    a, b, _c = three(switch)
    switch.forward(b, [frame(BROADCAST, MAC_B)], now=0.0)
    flood = [frame(BROADCAST, bytes([2, 0, 0, 0, 1, i])) for i in range(100)]
    switch.forward(a, flood, now=1.0)
    assert switch.macs[id(a)] == 4
    assert a.counters["tx_learn_refused"] == 96
    assert switch.lookup(MAC_B, 1.0) is b  # the others' entries stay
    assert len(switch.table) == 5


def test_multicast_and_zero_sources_are_never_learned() -> None:
    switch = Switch("k")
    a, _b, _c = three(switch)
    switch.forward(a, [frame(BROADCAST, b"\x03" + bytes(5)), frame(BROADCAST, bytes(6))], now=0.0)
    assert not switch.table


def test_detach_forgets_the_ports_entries() -> None:
    switch = Switch("k")
    a, b, c = three(switch)
    switch.forward(b, [frame(BROADCAST, MAC_B)], now=0.0)
    switch.detach(b)
    switch.forward(a, [frame(MAC_B, MAC_A)], now=1.0)
    assert len(c.got) == 2 and len(b.got) == 0


def test_super_frames_are_segmented_once_for_each_kind_of_port() -> None:
    switch = Switch("k")
    gso, plain1, plain2, csum_only = (
        FakePort("gso"),
        FakePort("plain1", 0),
        FakePort("plain2", 0),
        FakePort("csum", F_GUEST_CSUM),
    )
    sender = FakePort("sender")
    for port in (sender, gso, plain1, plain2, csum_only):
        switch.attach(port)
    big = gso_frame(b"p" * 10000, 1448)  # to MAC_B, unknown: flooded to all four
    switch.forward(sender, [big], now=0.0)
    assert gso.got == [big]
    assert len(plain1.got) == 7 and plain1.got == plain2.got
    assert plain1.got[0] is plain2.got[0]  # cut once, shared
    assert all(f[0] == 0 and f[1] == 0 and tcp_checksum_ok(f[12:]) for f in plain1.got)
    assert len(csum_only.got) == 7 and all(f[0] == 2 for f in csum_only.got)  # DATA_VALID
    assert plain1.counters["rx_segmented"] == 1 and gso.counters["rx_segmented"] == 0
    assert switch.counters["segmented"] == 2


def test_a_tso6_only_port_gets_tcpv4_cut() -> None:
    switch = Switch("k")
    sender, v6 = FakePort("s"), FakePort("v6", F_GUEST_CSUM | F_GUEST_TSO6)
    switch.attach(sender)
    switch.attach(v6)
    switch.forward(sender, [gso_frame(b"q" * 3000, 1448)], now=0.0)
    assert len(v6.got) == 3
    big6 = gso_frame(b"q" * 3000, 1428, v6=True)
    switch.forward(sender, [big6], now=0.0)
    assert v6.got[-1] is big6
    assert F_GUEST_TSO4  # the other half of RX_CAPS


def test_switches_are_found_by_key_and_dropped_with_their_last_port() -> None:
    switches = Switches()
    a, b, c = FakePort("a"), FakePort("b"), FakePort("c")
    s1 = switches.attach(("bus1", "default"), a)
    assert switches.attach(("bus1", "default"), b) is s1
    s2 = switches.attach(("bus2", "default"), c)
    assert s2 is not s1
    s1.forward(a, [frame(BROADCAST, MAC_A)], now=0.0)
    assert len(b.got) == 1 and not c.got  # same name, another bus: never reached
    switches.detach(s1, a)
    switches.detach(s1, b)
    assert switches.get(("bus1", "default")) is None and len(switches) == 1
