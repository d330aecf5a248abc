"""The deviceclasses that may be instantiated, by name.

Deviceclasses arrive through the entry-point group ``vbus.deviceclasses`` so
that a third-party package can add one.  A plugin that fails to import or is
not a valid deviceclass is skipped with a log event; it never stops the daemon.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import re
from collections.abc import Iterator
from typing import Any

import structlog

from vbus.core.device import Attribute, DeviceModel
from vbus.errors import Exists, Invalid, VbusError

__all__ = ["ENTRY_POINT_GROUP", "RESERVED_ATTRIBUTES", "Registry"]

ENTRY_POINT_GROUP = "vbus.deviceclasses"
# Files the admin tree puts next to a device's attributes.
RESERVED_ATTRIBUTES = frozenset({"type", "stats", "id"})
_KINDS = frozenset({"str", "int", "bool", "choice", "mac"})
_CLASS_NAME = re.compile(r"[a-z][a-z0-9_-]{0,31}")
_ATTRIBUTE_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")


def _check_attribute(owner: str, attr: Any) -> None:
    if not isinstance(attr, Attribute):
        raise Invalid(f"deviceclass {owner!r}: {attr!r} is not an Attribute")
    if not isinstance(attr.name, str) or _ATTRIBUTE_NAME.fullmatch(attr.name) is None:
        raise Invalid(f"deviceclass {owner!r}: bad attribute name {attr.name!r}")
    if attr.name in RESERVED_ATTRIBUTES:
        raise Invalid(f"deviceclass {owner!r}: attribute name {attr.name!r} is reserved")
    if attr.kind not in _KINDS:
        raise Invalid(f"deviceclass {owner!r}: attribute {attr.name!r} has kind {attr.kind!r}")
    if attr.default is None or attr.default == "":
        return  # "unset" defaults are the class's business
    try:
        attr.parse(attr.format(attr.default))
    except Invalid as exc:
        raise Invalid(f"deviceclass {owner!r}: default of {exc.message}") from None


class Registry:
    """Deviceclasses (``DeviceModel`` subclasses) by their ``name``."""

    def __init__(self) -> None:
        self._classes: dict[str, type[DeviceModel]] = {}

    def register(self, cls: type[DeviceModel]) -> type[DeviceModel]:
        """Add ``cls``; re-registering the same class is a no-op.  Returns ``cls``
        so it can be used as a decorator."""
        if not inspect.isclass(cls) or not issubclass(cls, DeviceModel):
            raise Invalid(f"{cls!r} is not a DeviceModel subclass")
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or _CLASS_NAME.fullmatch(name) is None:
            raise Invalid(f"{cls.__qualname__}: bad deviceclass name {name!r}")
        if inspect.isabstract(cls):
            raise Invalid(f"deviceclass {name!r} is abstract (implement open())")
        attributes = getattr(cls, "attributes", ())
        if not isinstance(attributes, tuple):
            raise Invalid(f"deviceclass {name!r}: attributes must be a tuple")
        for attr in attributes:
            _check_attribute(name, attr)
        if len({attr.name for attr in attributes}) != len(attributes):
            raise Invalid(f"deviceclass {name!r}: duplicate attribute names")
        existing = self._classes.get(name)
        if existing is not None and existing is not cls:
            raise Exists(f"deviceclass {name!r} is already registered")
        self._classes[name] = cls
        return cls

    def get(self, name: str) -> type[DeviceModel]:
        cls = self._classes.get(name) if isinstance(name, str) else None
        if cls is None:
            # The admin tree maps an unknown class to EINVAL (`echo x > type`).
            raise Invalid(f"unknown deviceclass {name!r}")
        return cls

    def names(self) -> list[str]:
        return sorted(self._classes)

    def __contains__(self, name: object) -> bool:
        return name in self._classes

    def __iter__(self) -> Iterator[type[DeviceModel]]:
        """The classes, in name order."""
        return iter([self._classes[name] for name in self.names()])

    def __len__(self) -> int:
        return len(self._classes)

    @classmethod
    def from_entry_points(cls, group: str = ENTRY_POINT_GROUP, log: Any = None) -> Registry:
        """A registry of every deviceclass installed under ``group``."""
        log = log if log is not None else structlog.get_logger("vbus.registry")
        registry = cls()
        for entry in sorted(importlib.metadata.entry_points(group=group), key=_entry_key):
            try:
                loaded = entry.load()
                if getattr(loaded, "name", None) != entry.name:
                    raise Invalid(
                        f"entry point {entry.name!r} names deviceclass "
                        f"{getattr(loaded, 'name', None)!r}"
                    )
                registry.register(loaded)
            except (Exception, SystemExit) as exc:  # a plugin calling exit() at import, too
                log.warning(
                    "deviceclass.load_failed",
                    entry_point=entry.name,
                    value=entry.value,
                    error=exc.message if isinstance(exc, VbusError) else repr(exc),
                )
        return registry


def _entry_key(entry: importlib.metadata.EntryPoint) -> tuple[str, str]:
    return entry.name, entry.value
