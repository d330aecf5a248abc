"""What a north driver and a venet agree on besides frames: call() functions, queues, layouts.

Integers are little-endian.

| func | name | request | reply |
| --- | --- | --- | --- |
| 1 | ``CALL_FEATURES`` | - | u64 offered virtio-net features |
| 2 | ``CALL_NEGOTIATE`` | u64 features | u64 features, u32 rx buffer size (``NEGOTIATED``) |
| 3 | ``CALL_CONFIG`` | - | mac[6], u16 mtu, u8 link, u8 0, u64 negotiated (``CONFIG``) |
| 4 | ``CALL_MAC`` | - | mac[6] |
| 5 | ``CALL_LINK_UP`` | - | u8 link (1) |
| 6 | ``CALL_LINK_DOWN`` | - | u8 link (0) |
| 7 | ``CALL_STATS`` | - | ``name value`` lines |

Queue 0 carries frames north->south (tx), queue 1 south->north (rx: the
north posts empty buffers of the negotiated rx buffer size).
"""

from __future__ import annotations

import struct
from typing import Final

__all__ = [
    "CALL_CONFIG",
    "CALL_FEATURES",
    "CALL_LINK_DOWN",
    "CALL_LINK_UP",
    "CALL_MAC",
    "CALL_NEGOTIATE",
    "CALL_STATS",
    "CONFIG",
    "NEGOTIATED",
    "QUEUE_RX",
    "QUEUE_TX",
    "TAP_MAX_MTU",
    "U64",
]

CALL_FEATURES: Final = 1
CALL_NEGOTIATE: Final = 2
CALL_CONFIG: Final = 3
CALL_MAC: Final = 4
CALL_LINK_UP: Final = 5
CALL_LINK_DOWN: Final = 6
CALL_STATS: Final = 7
QUEUE_TX: Final = 0  # north -> south
QUEUE_RX: Final = 1  # south -> north

CONFIG: Final = struct.Struct("<6sHBxQ")  # mac, mtu, link, -, negotiated features
NEGOTIATED: Final = struct.Struct("<QI")  # features, rx buffer size
U64: Final = struct.Struct("<Q")
TAP_MAX_MTU: Final = 65521  # the largest MTU the tun driver takes
