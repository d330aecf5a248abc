"""The in-daemon L2 learning switch that venet ports share (docs/design.md 3.8).

Sans-IO: frames in (``forward``), frames out through each port's
``deliver``.  The time is passed in, so ageing is a plain unit test.

- Learning: the source MAC of every frame (unicast, not zero) is bound to
  the port it came from, with the time it was last seen.  A port holds at
  most ``max_macs_per_port`` entries; past that its new MACs are not
  learned (counted), so one port cannot fill the table and push the others'
  entries out.  A MAC that moves to another port moves its entry.
- Forwarding: a known, fresh unicast destination goes to its port only; a
  destination on the sending port itself is dropped; broadcast, multicast
  and unknown unicast are flooded to every other port.
- Ageing: an entry not seen for ``ageing`` seconds is stale: it no longer
  steers frames, and a sweep (at most every ``ageing / 4`` seconds, during
  forwarding) removes it.
- Offloads: each port says what it can receive (``caps``, virtio-net bits).
  A super-frame for a port without the matching GUEST_TSO bit is segmented
  in software; a partial checksum for a port without GUEST_CSUM is completed
  (``vnet.adapt_for``).  Senders are never refused GSO because of another
  port: features are fixed once negotiated, and a port may join later.
- Isolation: a switch is found by a key (the venet device uses its bus and
  the switch name), so ports on different buses never share one whatever
  the name.  ``Switches`` keeps them and drops a switch with its last port.

A port's ``deliver`` must not raise and must not block: it queues what it
cannot take at once, within its own bound, and drops (counting) the rest.
That is what keeps a stalled port from delaying any other.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Final, Protocol

from vbus.net.vnet import F_GUEST_CSUM, F_GUEST_TSO4, F_GUEST_TSO6, adapt_for

__all__ = ["DEFAULT_AGEING", "DEFAULT_MAX_MACS_PER_PORT", "Port", "Switch", "Switches"]

DEFAULT_AGEING: Final = 300.0  # seconds, as a Linux bridge
DEFAULT_MAX_MACS_PER_PORT: Final = 256
_ALL_CAPS: Final = F_GUEST_CSUM | F_GUEST_TSO4 | F_GUEST_TSO6
_ZERO_MAC: Final = bytes(6)
# Ethernet addresses inside a venet frame (after the 12-byte header).
_DST: Final = slice(12, 18)
_SRC: Final = slice(18, 24)


class _Entry:
    """Where a MAC was last seen, and when."""

    __slots__ = ("port", "seen")

    def __init__(self, port: Port, seen: float) -> None:
        self.port = port
        self.seen = seen


class Port(Protocol):
    """One side of the switch: a venet session with its link up."""

    caps: int  # vnet.RX_CAPS bits the port can receive as they are
    counters: dict[str, int]  # the switch adds to "tx_flooded", "tx_learn_refused", ...

    def deliver(self, frames: list[bytes]) -> None:
        """Take frames for the north, or queue or drop them; never raise, never block."""
        ...


class Switch:
    """One learning switch: its ports and its MAC table."""

    def __init__(
        self,
        key: Hashable,
        *,
        ageing: float = DEFAULT_AGEING,
        max_macs_per_port: int = DEFAULT_MAX_MACS_PER_PORT,
    ) -> None:
        self.key = key
        self.ageing = ageing
        self.max_macs_per_port = max_macs_per_port
        self.ports: list[Port] = []
        self.table: dict[bytes, _Entry] = {}
        self.macs: dict[int, int] = {}  # id(port) -> entries it holds
        self.counters = {"learned": 0, "moved": 0, "aged": 0, "flooded": 0, "segmented": 0}
        self._next_sweep = 0.0

    def __repr__(self) -> str:
        return f"<Switch {self.key!r} ports={len(self.ports)} macs={len(self.table)}>"

    def attach(self, port: Port) -> None:
        if any(p is port for p in self.ports):
            return
        self.ports.append(port)
        self.macs[id(port)] = 0

    def detach(self, port: Port) -> None:
        """Remove ``port`` and every entry pointing at it."""
        self.ports = [p for p in self.ports if p is not port]
        self.macs.pop(id(port), None)
        for mac in [mac for mac, entry in self.table.items() if entry.port is port]:
            del self.table[mac]

    def lookup(self, mac: bytes, now: float) -> Port | None:
        """The port a fresh entry binds ``mac`` to, or None."""
        entry = self.table.get(mac)
        if entry is None or now - entry.seen >= self.ageing:
            return None
        return entry.port

    def forward(self, src: Port, frames: list[bytes], now: float) -> None:
        """Learn from and switch ``frames`` sent by ``src`` (each already
        checked by ``vnet.check_tx``)."""
        if now >= self._next_sweep:
            self.sweep(now)
        table = self.table
        ageing = self.ageing
        others = [p for p in self.ports if p is not src]
        out: dict[int, list[bytes]] = {id(p): [] for p in others}
        flooded = same_port = 0
        for frame in frames:
            smac = frame[_SRC]
            if not smac[0] & 1:
                entry = table.get(smac)
                if entry is not None and entry.port is src:
                    entry.seen = now
                elif smac != _ZERO_MAC:
                    self._learn(src, smac, entry, now)
            dmac = frame[_DST]
            if not dmac[0] & 1:
                entry = table.get(dmac)
                if entry is not None and now - entry.seen < ageing:
                    dst = entry.port
                    if dst is src:
                        same_port += 1
                    else:
                        out[id(dst)].append(frame)
                    continue
            flooded += 1
            for port in others:
                out[id(port)].append(frame)
        counters = src.counters
        if flooded:
            counters["tx_flooded"] += flooded
            self.counters["flooded"] += flooded
        if same_port:
            counters["tx_drop_same_port"] += same_port
        cache: dict[tuple[int, int], list[bytes]] = {}
        for port in others:
            batch = out[id(port)]
            if batch:
                if port.caps & _ALL_CAPS != _ALL_CAPS:
                    batch = self._adapt(port, batch, cache)
                port.deliver(batch)

    def _adapt(
        self, port: Port, frames: list[bytes], cache: dict[tuple[int, int], list[bytes]]
    ) -> list[bytes]:
        """Frames as ``port`` can take them; a flooded super-frame is cut
        once per kind of port, not once per port."""
        caps = port.caps & _ALL_CAPS
        out: list[bytes] = []
        for frame in frames:
            if not (frame[0] or frame[1]):  # no partial checksum, no GSO: as is
                out.append(frame)
                continue
            key = (id(frame), caps)
            adapted = cache.get(key)
            if adapted is None:
                adapted = cache[key] = adapt_for(frame, caps)
                if frame[1]:
                    self.counters["segmented"] += 1
                    port.counters["rx_segmented"] += 1
                else:
                    port.counters["rx_csum_completed"] += 1
            out.extend(adapted)
        return out

    def _learn(self, port: Port, mac: bytes, entry: _Entry | None, now: float) -> None:
        macs = self.macs
        if entry is not None:  # the MAC moved here (or its old entry went stale)
            old = entry.port
            macs[id(old)] = macs.get(id(old), 1) - 1
            del self.table[mac]
            self.counters["moved"] += 1
        if macs.get(id(port), 0) >= self.max_macs_per_port:
            port.counters["tx_learn_refused"] += 1
            return
        macs[id(port)] = macs.get(id(port), 0) + 1
        self.table[mac] = _Entry(port, now)
        self.counters["learned"] += 1

    def sweep(self, now: float) -> int:
        """Remove stale entries; returns how many went."""
        self._next_sweep = now + self.ageing / 4
        stale = [mac for mac, entry in self.table.items() if now - entry.seen >= self.ageing]
        for mac in stale:
            port = self.table.pop(mac).port
            self.macs[id(port)] = self.macs.get(id(port), 1) - 1
        self.counters["aged"] += len(stale)
        return len(stale)


class Switches:
    """The switches of one daemon, by key; made on first attach, dropped with the last port."""

    def __init__(
        self,
        *,
        ageing: float = DEFAULT_AGEING,
        max_macs_per_port: int = DEFAULT_MAX_MACS_PER_PORT,
    ) -> None:
        self._switches: dict[Hashable, Switch] = {}
        self.ageing = ageing
        self.max_macs_per_port = max_macs_per_port

    def attach(self, key: Hashable, port: Port) -> Switch:
        switch = self._switches.get(key)
        if switch is None:
            switch = Switch(key, ageing=self.ageing, max_macs_per_port=self.max_macs_per_port)
            self._switches[key] = switch
        switch.attach(port)
        return switch

    def detach(self, switch: Switch, port: Port) -> None:
        switch.detach(port)
        if not switch.ports and self._switches.get(switch.key) is switch:
            del self._switches[switch.key]

    def get(self, key: Hashable) -> Switch | None:
        return self._switches.get(key)

    def __len__(self) -> int:
        return len(self._switches)
