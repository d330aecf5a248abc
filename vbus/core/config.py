"""The TOML topology file: parse and check it, then apply it to a Topology.

The daemon reads the file and hands over its text, so nothing here does IO
except reading the embedded default (a package resource).  Schema::

    [devices.echo0]
    class = "echo"          # required
    mode = "echo"           # any other key: an attribute of that class (str/int/bool)

    [buses.default]
    members = ["uid:self"]  # member rule texts: uid:N, uid:self, pid:N, domid:N
    devices = ["echo0"]     # linked devices

Errors are ``Invalid`` and name the source, the line when it can be found,
and the key (``topology.toml:7: buses.lab.members: ...``); applying is all or
nothing (errors from the topology keep their class, with the place prepended).
``check_config`` checks deviceclasses and attribute values against a registry
without creating anything.
"""

from __future__ import annotations

import importlib.resources
import re
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from vbus.core.members import rule_syntax
from vbus.core.model import Topology, validate_name
from vbus.core.registry import Registry
from vbus.errors import Denied, Invalid, NoSuchTask, VbusError

__all__ = ["apply_config", "check_config", "default_config_text", "load_config_text"]

_TOP_KEYS = ("buses", "devices")
_BUS_KEYS = ("devices", "members")


def default_config_text() -> str:
    """The embedded default topology (``vbus/default.toml``)."""
    return importlib.resources.files("vbus").joinpath("default.toml").read_text(encoding="utf-8")


def load_config_text(text: str, source: str) -> dict[str, Any]:
    """Parse and check a topology file.  Returns ``{"source", "devices", "buses"}``
    with ``devices = {name: {"class": str, "attrs": {key: value}}}`` and
    ``buses = {name: {"members": [text], "devices": [name]}}``, plus ``lines``:
    where each table and key starts in the text (for later messages)."""
    lines = _key_lines(text)

    def fail(where: tuple[str, ...], why: str) -> Invalid:
        return Invalid(_place(source, lines, where, why))

    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # tomllib says where only inside its message: "... (at line 3, column 7)".
        found = re.search(r"\(at line (\d+), column \d+\)$", str(exc))
        why = str(exc)[: found.start()].rstrip() if found else str(exc)
        at = f"{source}:{found.group(1)}" if found else source
        raise Invalid(f"{at}: not valid TOML ({why})") from None
    for key in data:
        if key not in _TOP_KEYS:
            raise fail((key,), f"unknown section (expected {' or '.join(_TOP_KEYS)})")

    devices: dict[str, Any] = {}
    devices_in = data.get("devices", {})
    if not isinstance(devices_in, dict):
        raise fail(("devices",), "must be a table of [devices.NAME] tables")
    for name, spec in devices_in.items():
        where = ("devices", name)
        _check_name(fail, where, name, "device name")
        if not isinstance(spec, dict):
            raise fail(where, "must be a table")
        cls = spec.get("class")
        if cls is None:
            raise fail(where, "missing required key 'class'")
        if not isinstance(cls, str):
            raise fail((*where, "class"), "must be a string")
        attrs: dict[str, str | int | bool] = {}
        for key, value in spec.items():
            if key == "class":
                continue
            if not isinstance(value, str | int | bool):
                raise fail((*where, key), "an attribute value must be a string, integer or boolean")
            attrs[key] = value
        devices[name] = {"class": cls, "attrs": attrs}

    buses: dict[str, Any] = {}
    buses_in = data.get("buses", {})
    if not isinstance(buses_in, dict):
        raise fail(("buses",), "must be a table of [buses.NAME] tables")
    for name, spec in buses_in.items():
        where = ("buses", name)
        _check_name(fail, where, name, "bus name")
        if not isinstance(spec, dict):
            raise fail(where, "must be a table")
        for key in spec:
            if key not in _BUS_KEYS:
                raise fail((*where, key), f"unknown key (expected {' or '.join(_BUS_KEYS)})")
        members = _string_list(fail, (*where, "members"), spec.get("members", []))
        for rule in members:
            try:
                rule_syntax(rule)
            except Invalid as exc:
                raise fail((*where, "members"), exc.message) from None
        linked = _string_list(fail, (*where, "devices"), spec.get("devices", []))
        for device in linked:
            if device not in devices:
                raise fail((*where, "devices"), f"device {device!r} is not defined in [devices]")
        buses[name] = {"members": members, "devices": linked}

    return {"source": source, "devices": devices, "buses": buses, "lines": lines}


def _check_name(fail: Any, where: tuple[str, ...], name: str, what: str) -> None:
    try:
        validate_name(name, what)
    except Invalid as exc:
        raise fail(where, exc.message) from None


def _string_list(fail: Any, where: tuple[str, ...], value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise fail(where, "must be a list of strings")
    if len(set(value)) != len(value):
        raise fail(where, "has duplicate entries")
    return list(value)


def check_config(cfg: dict[str, Any], registry: Registry) -> None:
    """What ``apply_config`` would refuse about devices, found without creating
    anything: unknown deviceclasses, unknown or read-only attributes, values
    out of range.  (Member rules naming tasks can only be checked by applying.)"""
    for name, spec in cfg["devices"].items():
        with _context(cfg, ("devices", name, "class")):
            cls = registry.get(spec["class"])
        known = {attr.name: attr for attr in cls.attributes}
        for key, value in spec["attrs"].items():
            with _context(cfg, ("devices", name, key)):
                attr = known.get(key)
                if attr is None:
                    raise Invalid(f"deviceclass {cls.name!r} has no attribute {key!r}")
                if attr.readonly:
                    raise Denied(f"attribute {key!r} of deviceclass {cls.name!r} is read-only")
                attr.parse(value)


def apply_config(topology: Topology, cfg: dict[str, Any]) -> None:
    """Create what ``cfg`` (from ``load_config_text``) describes; all or nothing."""
    with topology.transaction():
        for name, spec in cfg["devices"].items():
            with _context(cfg, ("devices", name, "class")):
                topology.create_device(name, spec["class"])
            for key, value in spec["attrs"].items():
                with _context(cfg, ("devices", name, key)):
                    topology.set_attribute(name, key, value)
        for name, spec in cfg["buses"].items():
            with _context(cfg, ("buses", name)):
                topology.create_bus(name)
            for device in spec["devices"]:
                with _context(cfg, ("buses", name, "devices")):
                    topology.link(name, device)
            for rule in spec["members"]:
                with _context(cfg, ("buses", name, "members")):
                    try:
                        topology.add_member(name, rule)
                    except NoSuchTask as exc:
                        raise NoSuchTask(
                            f"{rule!r}: {exc.message} (a pid rule must name a running process)"
                        ) from None


@contextmanager
def _context(cfg: dict[str, Any], where: tuple[str, ...]) -> Iterator[None]:
    """Re-raise a VbusError with the same class, prefixed by where it happened."""
    try:
        yield
    except VbusError as exc:
        source = cfg.get("source", "config")
        raise type(exc)(_place(source, cfg.get("lines", {}), where, exc.message)) from exc


def _place(source: str, lines: dict[tuple[str, ...], int], where: tuple[str, ...], why: str) -> str:
    """``source:LINE: a.b.c: why``, the line being where the nearest enclosing key
    or table is written (left out when it cannot be found)."""
    line = None
    for depth in range(len(where), 0, -1):
        line = lines.get(where[:depth])
        if line is not None:
            break
    at = f"{source}:{line}" if line is not None else source
    if not where:
        return f"{at}: {why}"
    # An attribute's own message starts with its name, which the key already says.
    why = why.removeprefix(f"{where[-1]}: ")
    return f"{at}: {'.'.join(where)}: {why}"


_KEY_PART = re.compile(r"""\s*("(?:[^"\\]|\\.)*"|'[^']*'|[A-Za-z0-9_-]+)\s*""")


def _key_lines(text: str) -> dict[tuple[str, ...], int]:
    """The line (1-based) on which each table header and key first appears,
    by full dotted path.  Best effort: only used to point messages at a line,
    the parsing proper is tomllib's."""
    found: dict[tuple[str, ...], int] = {}
    table: tuple[str, ...] = ()
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if stripped.startswith("["):
            inner = stripped.lstrip("[")
            end = inner.find("]")
            path = _key_path(inner[:end]) if end >= 0 else None
            if path is not None:
                table = path
                for depth in range(1, len(path) + 1):
                    found.setdefault(path[:depth], number)
            continue
        equals = stripped.find("=")
        if equals <= 0:
            continue
        path = _key_path(stripped[:equals])
        if path is not None:
            for depth in range(1, len(path) + 1):
                found.setdefault((*table, *path[:depth]), number)
    return found


def _key_path(text: str) -> tuple[str, ...] | None:
    """``a."b.c".d`` -> ("a", "b.c", "d"); None if it is not a key."""
    parts: list[str] = []
    for piece in _split_dotted(text):
        matched = _KEY_PART.fullmatch(piece)
        if matched is None:
            return None
        token = matched.group(1)
        if token[0] == '"':
            try:
                token = tomllib.loads(f"k = {token}")["k"]
            except tomllib.TOMLDecodeError:
                return None
        elif token[0] == "'":
            token = token[1:-1]
        parts.append(token)
    return tuple(parts) or None


def _split_dotted(text: str) -> Iterator[str]:
    """Split on dots that are not inside quotes."""
    start, quote = 0, ""
    for index, char in enumerate(text):
        if quote:
            if char == quote and (quote == "'" or text[index - 1] != "\\"):
                quote = ""
        elif char in "\"'":
            quote = char
        elif char == ".":
            yield text[start:index]
            start = index + 1
    yield text[start:]
