"""Attribute (vbus/core/device.py): parsing and formatting of every kind."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vbus.core.device import Attribute
from vbus.errors import Invalid

STR = Attribute("label", "str", "", max_length=8)
INT = Attribute("size", "int", 4, minimum=1, maximum=64)
INT_FREE = Attribute("offset", "int", 0)
BOOL = Attribute("flag", "bool", False)
CHOICE = Attribute("mode", "choice", "echo", choices=("echo", "sink"))
MAC = Attribute("mac", "mac", "02:00:00:00:00:01")
ALL = (STR, INT, INT_FREE, BOOL, CHOICE, MAC)

# Any code point, surrogates included (what surrogateescape'd bytes become).
ANY_TEXT = st.text(alphabet=st.characters(codec=None, exclude_categories=()))


@pytest.mark.parametrize(
    ("attr", "text", "value"),
    [
        (STR, "hello", "hello"),
        (STR, "  padded\n", "padded"),
        (STR, "", ""),
        (STR, "12345678", "12345678"),
        (STR, 42, "42"),
        (INT, "7", 7),
        (INT, " 0x10\n", 16),
        (INT, "0o7", 7),
        (INT, "1_0", 10),
        (INT, 64, 64),
        (INT, "1", 1),
        (INT, True, 1),
        (INT_FREE, "-5", -5),
        (BOOL, "1", True),
        (BOOL, "yes", True),
        (BOOL, "ON", True),
        (BOOL, "true\n", True),
        (BOOL, "0", False),
        (BOOL, "off", False),
        (BOOL, "N", False),
        (BOOL, True, True),
        (BOOL, False, False),
        (BOOL, 1, True),
        (BOOL, 0, False),
        (CHOICE, "sink", "sink"),
        (CHOICE, "echo\n", "echo"),
        (MAC, "02:AA:bb:00:11:22", "02:aa:bb:00:11:22"),
        (MAC, "00:00:00:00:00:00", "00:00:00:00:00:00"),
    ],
)
def test_parse_accepts(attr: Attribute, text: Any, value: Any) -> None:
    assert attr.parse(text) == value


@pytest.mark.parametrize(
    ("attr", "text"),
    [
        (STR, "123456789"),  # longer than max_length
        (STR, "ééééé"),  # 10 bytes of UTF-8
        (STR, "a\0b"),
        (STR, "bad\udcff"),  # a lone surrogate cannot be encoded
        (STR, 1.5),
        (STR, None),
        (STR, b"bytes"),
        (INT, "0"),  # below minimum
        (INT, "65"),  # above maximum
        (INT, "seven"),
        (INT, ""),
        (INT, "010"),  # ambiguous octal: refused by int(x, 0)
        (INT, "٣"),  # non-ASCII digit
        (INT, "1.5"),
        (INT, 1.5),
        (INT_FREE, "9" * 5000),  # beyond int()'s digit limit
        (BOOL, "2"),
        (BOOL, 2),
        (BOOL, "maybe"),
        (BOOL, ""),
        (CHOICE, "Echo"),
        (CHOICE, ""),
        (CHOICE, 1),
        (MAC, "01:00:00:00:00:00"),  # multicast
        (MAC, "02:00:00:00:00"),
        (MAC, "02:00:00:00:00:00:00"),
        (MAC, "02-00-00-00-00-01"),
        (MAC, "zz:00:00:00:00:01"),
        (Attribute("odd", "float", 0), "1"),  # unknown kind
    ],
)
def test_parse_rejects_with_invalid(attr: Attribute, text: Any) -> None:
    with pytest.raises(Invalid) as info:
        attr.parse(text)
    assert info.value.message.startswith(f"{attr.name}:")


@pytest.mark.parametrize(
    ("attr", "value", "text"),
    [
        (BOOL, True, "1"),
        (BOOL, False, "0"),
        (INT, 12, "12"),
        (STR, "x y", "x y"),
        (CHOICE, "sink", "sink"),
        (MAC, "02:00:00:00:00:01", "02:00:00:00:00:01"),
    ],
)
def test_format(attr: Attribute, value: Any, text: str) -> None:
    assert attr.format(value) == text


def test_attribute_is_frozen() -> None:
    with pytest.raises(AttributeError):
        INT.default = 5  # type: ignore[misc]


@pytest.mark.parametrize("attr", ALL, ids=lambda a: a.kind)
@given(text=ANY_TEXT)
def test_parse_raises_only_invalid_on_any_text(attr: Attribute, text: str) -> None:
    try:
        value = attr.parse(text)
    except Invalid:
        return
    # What parses formats back to text that parses to the same value.
    assert attr.parse(attr.format(value)) == value


@pytest.mark.parametrize("attr", ALL, ids=lambda a: a.kind)
@given(number=st.integers() | st.booleans())
def test_parse_raises_only_invalid_on_any_config_number(attr: Attribute, number: int) -> None:
    try:
        attr.parse(number)
    except Invalid:
        pass


@given(st.integers(min_value=1, max_value=64))
def test_int_round_trip(number: int) -> None:
    assert INT.parse(INT.format(number)) == number


@given(st.lists(st.integers(0, 255), min_size=6, max_size=6))
def test_mac_accepts_every_unicast_address(octets: list[int]) -> None:
    text = ":".join(f"{o:02X}" for o in octets)
    if octets[0] & 1:
        with pytest.raises(Invalid):
            MAC.parse(text)
    else:
        assert MAC.parse(text) == text.lower()
