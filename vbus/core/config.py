"""The TOML topology file: parse and check it, then apply it to a Topology.

The daemon reads the file and hands over its text, so nothing here does IO
except reading the embedded default (a package resource).  Schema::

    [devices.echo0]
    class = "echo"          # required
    mode = "echo"           # any other key: an attribute of that class (str/int/bool)

    [buses.default]
    members = ["uid:self"]  # member rule texts: uid:N, uid:self, pid:N, domid:N
    devices = ["echo0"]     # linked devices

Errors are ``Invalid`` and name the source and the key; applying is all or
nothing (errors from the topology keep their class, with the key prepended).
"""

from __future__ import annotations

import importlib.resources
import tomllib
from typing import Any

from vbus.core.members import rule_syntax
from vbus.core.model import Topology, validate_name
from vbus.errors import Invalid, VbusError

__all__ = ["apply_config", "default_config_text", "load_config_text"]

_TOP_KEYS = ("buses", "devices")
_BUS_KEYS = ("devices", "members")


def default_config_text() -> str:
    """The embedded default topology (``vbus/default.toml``)."""
    return importlib.resources.files("vbus").joinpath("default.toml").read_text(encoding="utf-8")


def load_config_text(text: str, source: str) -> dict[str, Any]:
    """Parse and check a topology file.  Returns ``{"source", "devices", "buses"}``
    with ``devices = {name: {"class": str, "attrs": {key: value}}}`` and
    ``buses = {name: {"members": [text], "devices": [name]}}``."""

    def fail(where: str, why: str) -> Invalid:
        return Invalid(f"{source}: {where}: {why}" if where else f"{source}: {why}")

    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise fail("", f"not valid TOML ({exc})") from None
    for key in data:
        if key not in _TOP_KEYS:
            raise fail(key, f"unknown section (expected {' or '.join(_TOP_KEYS)})")

    devices: dict[str, Any] = {}
    devices_in = data.get("devices", {})
    if not isinstance(devices_in, dict):
        raise fail("devices", "must be a table of [devices.NAME] tables")
    for name, spec in devices_in.items():
        where = f"devices.{name}"
        _check_name(fail, where, name, "device name")
        if not isinstance(spec, dict):
            raise fail(where, "must be a table")
        cls = spec.get("class")
        if cls is None:
            raise fail(where, "missing required key 'class'")
        if not isinstance(cls, str):
            raise fail(f"{where}.class", "must be a string")
        attrs: dict[str, str | int | bool] = {}
        for key, value in spec.items():
            if key == "class":
                continue
            if not isinstance(value, str | int | bool):
                raise fail(
                    f"{where}.{key}", "an attribute value must be a string, integer or boolean"
                )
            attrs[key] = value
        devices[name] = {"class": cls, "attrs": attrs}

    buses: dict[str, Any] = {}
    buses_in = data.get("buses", {})
    if not isinstance(buses_in, dict):
        raise fail("buses", "must be a table of [buses.NAME] tables")
    for name, spec in buses_in.items():
        where = f"buses.{name}"
        _check_name(fail, where, name, "bus name")
        if not isinstance(spec, dict):
            raise fail(where, "must be a table")
        for key in spec:
            if key not in _BUS_KEYS:
                raise fail(f"{where}.{key}", f"unknown key (expected {' or '.join(_BUS_KEYS)})")
        members = _string_list(fail, f"{where}.members", spec.get("members", []))
        for rule in members:
            try:
                rule_syntax(rule)
            except Invalid as exc:
                raise fail(f"{where}.members", exc.message) from None
        linked = _string_list(fail, f"{where}.devices", spec.get("devices", []))
        for device in linked:
            if device not in devices:
                raise fail(f"{where}.devices", f"device {device!r} is not defined in [devices]")
        buses[name] = {"members": members, "devices": linked}

    return {"source": source, "devices": devices, "buses": buses}


def _check_name(fail: Any, where: str, name: str, what: str) -> None:
    try:
        validate_name(name, what)
    except Invalid as exc:
        raise fail(where, exc.message) from None


def _string_list(fail: Any, where: str, value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise fail(where, "must be a list of strings")
    if len(set(value)) != len(value):
        raise fail(where, "has duplicate entries")
    return list(value)


def apply_config(topology: Topology, cfg: dict[str, Any]) -> None:
    """Create what ``cfg`` (from ``load_config_text``) describes; all or nothing."""
    source = cfg.get("source", "config")
    with topology.transaction():
        for name, spec in cfg["devices"].items():
            with _context(source, f"devices.{name}.class"):
                topology.create_device(name, spec["class"])
            for key, value in spec["attrs"].items():
                with _context(source, f"devices.{name}.{key}"):
                    topology.set_attribute(name, key, value)
        for name, spec in cfg["buses"].items():
            with _context(source, f"buses.{name}"):
                topology.create_bus(name)
            for device in spec["devices"]:
                with _context(source, f"buses.{name}.devices"):
                    topology.link(name, device)
            for rule in spec["members"]:
                with _context(source, f"buses.{name}.members"):
                    topology.add_member(name, rule)


class _context:
    """Re-raise a VbusError with the same class, prefixed by where it happened."""

    def __init__(self, source: str, where: str) -> None:
        self.prefix = f"{source}: {where}"

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, exc: BaseException | None, tb: Any) -> None:
        if isinstance(exc, VbusError):
            raise type(exc)(f"{self.prefix}: {exc.message}") from exc
