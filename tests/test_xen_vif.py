"""The vif backend's xenbus handshake: the keys it writes, what it reads of
netfront's, Connected only once the rings are mapped, Closing with the reason
in ``error`` on a fault, and a reconnect after Closed."""

from __future__ import annotations

import pytest

from vbus.net import vnet
from vbus.xen.abi import XenbusState as S
from vbus.xen.vif import FRONTEND_KEYS, Map, Read, Remove, Unmap, VifBackend, VifRings, Write

GOOD = {"tx-ring-ref": "8", "rx-ring-ref": "9", "event-channel": "5", "request-rx-copy": "1"}


def connected() -> VifBackend:
    vif = VifBackend()
    vif.start()
    assert vif.frontend_state(S.CONNECTED) == [Read(FRONTEND_KEYS)]
    assert vif.frontend_keys(GOOD) == [Map(VifRings(8, 9, 5))]
    assert vif.mapped() == [Write("state", "4")]
    return vif


def test_start_offers_the_features_then_waits() -> None:
    vif = VifBackend()
    assert vif.start() == [
        Write("feature-rx-copy", "1"),
        Write("feature-sg", "1"),
        Write("feature-gso-tcpv4", "1"),
        Write("state", "2"),
    ]
    assert vif.state == S.INIT_WAIT
    assert vif.start() == []  # once


@pytest.mark.parametrize("front", [S.INITIALISED, S.CONNECTED])
def test_the_frontend_keys_lead_to_connected(front: S) -> None:
    vif = VifBackend()
    vif.start()
    assert vif.frontend_state(S.INITIALISING) == []
    assert vif.frontend_state(front) == [Read(FRONTEND_KEYS)]
    assert vif.frontend_state(front) == []  # a repeated watch asks nothing twice
    assert vif.frontend_keys(GOOD) == [Map(VifRings(8, 9, 5))]
    assert vif.state == S.INIT_WAIT  # not Connected before the rings are mapped
    assert vif.mapped() == [Write("state", "4")]
    assert vif.state == S.CONNECTED and vif.rings == VifRings(8, 9, 5)
    assert vif.mapped() == [] and vif.frontend_state(S.CONNECTED) == []


@pytest.mark.parametrize(
    "change, reason",
    [
        ({"tx-ring-ref": None}, "has no tx-ring-ref"),
        ({"rx-ring-ref": "x"}, "rx-ring-ref is not a number"),
        ({"event-channel": "4294967296"}, "event-channel is out of range"),
        ({"event-channel": "-1"}, "event-channel is out of range"),
        ({"request-rx-copy": "0"}, "does not request rx-copy"),
        ({"request-rx-copy": None}, "does not request rx-copy"),
    ],
)
def test_bad_frontend_keys_close_with_the_reason(
    change: dict[str, str | None], reason: str
) -> None:
    vif = VifBackend()
    vif.start()
    vif.frontend_state(S.CONNECTED)
    actions = vif.frontend_keys({**GOOD, **change})
    assert len(actions) == 2 and actions[1] == Write("state", "5")
    assert isinstance(actions[0], Write) and actions[0].key == "error"
    assert reason in actions[0].value and vif.error == actions[0].value
    assert vif.state == S.CLOSING


def test_a_ring_fault_unmaps_and_closes() -> None:
    vif = connected()
    assert vif.fault("a slot crosses its page") == [
        Write("error", "a slot crosses its page"),
        Unmap(),
        Write("state", "5"),
    ]
    assert vif.rings is None
    assert vif.fault("again") == []  # one reason, the first
    assert vif.frontend_state(S.CLOSED) == [Write("state", "6")]


def test_a_failed_map_closes_without_unmap() -> None:
    vif = VifBackend()
    vif.start()
    vif.frontend_state(S.CONNECTED)
    vif.frontend_keys(GOOD)
    assert vif.map_failed("grant 8 is not granted") == [
        Write("error", "grant 8 is not granted"),
        Write("state", "5"),
    ]
    assert vif.mapped() == []  # a late completion does not connect


def test_the_frontend_closes_then_reconnects() -> None:
    vif = connected()
    assert vif.frontend_state(S.CLOSING) == [Unmap(), Write("state", "5")]
    assert vif.frontend_state(S.CLOSED) == [Write("state", "6")]
    assert vif.frontend_state(S.INITIALISING) == [Write("state", "2")]
    assert vif.frontend_state(S.CONNECTED) == [Read(FRONTEND_KEYS)]
    assert vif.frontend_keys({**GOOD, "tx-ring-ref": "10"}) == [Map(VifRings(10, 9, 5))]


def test_a_fault_then_a_new_frontend_removes_the_error() -> None:
    vif = connected()
    assert vif.fault("a ring index jumped")[0] == Write("error", "a ring index jumped")
    assert vif.frontend_state(S.CLOSED) == [Write("state", "6")]
    assert vif.frontend_state(S.INITIALISING) == [Remove("error"), Write("state", "2")]
    assert vif.error is None
    assert vif.frontend_state(S.CONNECTED) == [Read(FRONTEND_KEYS)]
    assert vif.frontend_keys(GOOD) == [Map(VifRings(8, 9, 5))]
    assert vif.mapped() == [Write("state", "4")]


def test_closing_during_the_map_unmaps() -> None:
    vif = VifBackend()
    vif.start()
    vif.frontend_state(S.CONNECTED)
    vif.frontend_keys(GOOD)
    assert vif.frontend_state(S.CLOSED) == [Unmap(), Write("state", "5"), Write("state", "6")]
    assert vif.mapped() == [] and vif.state == S.CLOSED


def test_an_unknown_frontend_state_is_a_fault() -> None:
    vif = connected()
    actions = vif.frontend_state(42)
    assert actions[0] == Write("error", "the frontend's state 42 is unknown")
    assert actions[1:] == [Unmap(), Write("state", "5")]


def test_keys_nobody_asked_for_are_ignored() -> None:
    vif = VifBackend()
    vif.start()
    assert vif.frontend_keys(GOOD) == []
    assert vif.state == S.INIT_WAIT


NETFRONT = {**GOOD, "feature-sg": "1", "feature-gso-tcpv4": "1", "feature-gso-tcpv6": "1"}
CSUM, TSO4, TSO6 = vnet.F_GUEST_CSUM, vnet.F_GUEST_TSO4, vnet.F_GUEST_TSO6


@pytest.mark.parametrize(
    "keys, caps",
    [
        (NETFRONT, CSUM | TSO4 | TSO6),  # what Linux's netfront writes
        (GOOD, CSUM),  # absent features are 0
        ({**NETFRONT, "feature-sg": "0"}, CSUM),  # a super-frame needs scatter-gather
        ({**NETFRONT, "feature-gso-tcpv6": None}, CSUM | TSO4),
        ({**NETFRONT, "feature-no-csum-offload": "1"}, 0),
    ],
)
def test_what_the_frontend_takes_becomes_rx_caps(keys: dict[str, str | None], caps: int) -> None:
    vif = VifBackend()
    vif.start()
    vif.frontend_state(S.CONNECTED)
    (action,) = vif.frontend_keys(keys)
    assert isinstance(action, Map) and action.rings.rx_caps == caps
    vif.mapped()
    assert vif.rings is not None and vif.rings.rx_caps == caps


def test_the_toolstack_closing_is_answered_with_unmap_and_closed() -> None:
    vif = connected()
    # xl destroy / network-detach: libxl writes Closing and waits for Closed
    assert vif.toolstack_closing() == [Unmap(), Write("state", "6")]
    assert vif.state == S.CLOSED and vif.rings is None
    assert vif.toolstack_closing() == []  # once
    waiting = VifBackend()
    waiting.start()  # never connected: nothing to unmap, Closed all the same
    assert waiting.toolstack_closing() == [Write("state", "6")]
