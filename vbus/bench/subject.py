"""The plug-in shape of a bench subject: one module per subject in ``vbus.bench.subjects``.

A subject compares *variants* (the vbus side, its peers, a ceiling) on a few
*figures*.  The runner calls ``run(variant, params)`` once per variant and
round, each time in a fresh process (``vbus.bench.worker``), so rounds are
independent: no warm caches, no leftover daemon state, no shared allocator.

A new subject is one file in ``vbus/bench/subjects/`` that defines
``SUBJECT = SomeSubject()``; it is found by listing the package, nothing
else needs to change.  ``run`` raises ``Unavailable`` when a variant cannot
run on this machine (a missing package or hook): the table says why instead
of failing the bench.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import Any, ClassVar

__all__ = [
    "Figure",
    "Figures",
    "Params",
    "Subject",
    "Target",
    "Unavailable",
    "Variant",
    "discover",
]

Params = dict[str, Any]
Figures = dict[str, float]


class Unavailable(Exception):
    """This variant cannot run here; the message says why (shown in the table)."""


@dataclass(frozen=True, slots=True)
class Variant:
    """One side of a comparison.  ``role``: ``vbus``, ``peer``, ``ceiling`` or ``reference``."""

    name: str
    label: str
    role: str = "peer"
    kind: str = ""  # e.g. "socket" or "shm": which peers a target compares against


@dataclass(frozen=True, slots=True)
class Figure:
    key: str
    label: str
    unit: str  # msg/s, us, GB/s, KiB, ms, /msg, ""
    higher_is_better: bool = True


@dataclass(frozen=True, slots=True)
class Target:
    """A target for this subject checked against the medians of this run (informational)."""

    text: str  # what is checked, e.g. "vbus >= 3x the fastest socket peer"
    value: float | None  # the measured quantity (None: could not be measured)
    limit: float
    op: str  # ">=" or "<="
    detail: str = ""  # how the value was obtained, or why it is missing

    @property
    def passed(self) -> bool | None:
        if self.value is None:
            return None
        return self.value >= self.limit if self.op == ">=" else self.value <= self.limit

    def as_dict(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "value": self.value,
            "limit": self.limit,
            "op": self.op,
            "passed": self.passed,
            "detail": self.detail,
        }


class Subject:
    """Base class: subclasses set the class attributes and implement ``run``."""

    name: ClassVar[str]
    title: ClassVar[str]
    order: ClassVar[int] = 100  # position in the table
    variants: ClassVar[tuple[Variant, ...]]
    figures: ClassVar[tuple[Figure, ...]]
    primary: ClassVar[str]  # the figure ratios and the plot use
    baseline: ClassVar[str]  # ratios are variant / baseline on ``primary``
    # Run only when named (``vbus bench NAME``): boots VMs, takes minutes.
    on_request: ClassVar[bool] = False

    def params(self, quick: bool) -> Params:
        """Run parameters (message counts, durations); the runner adds ``loop``."""
        return {}

    def run(self, variant: str, params: Params) -> Figures:
        """Measure one variant once.  Runs in a fresh worker process."""
        raise NotImplementedError

    def targets(self, medians: dict[str, Figures]) -> list[Target]:
        """The targets for this subject, from the medians per variant."""
        return []

    def variant(self, name: str) -> Variant:
        for variant in self.variants:
            if variant.name == name:
                return variant
        raise KeyError(f"{self.name}: no variant {name!r}")

    def figure(self, key: str) -> Figure:
        for figure in self.figures:
            if figure.key == key:
                return figure
        raise KeyError(f"{self.name}: no figure {key!r}")


def discover() -> list[Subject]:
    """Every ``SUBJECT`` in ``vbus.bench.subjects``, in table order."""
    from vbus.bench import subjects

    found: list[Subject] = []
    for info in pkgutil.iter_modules(subjects.__path__):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{subjects.__name__}.{info.name}")
        subject = getattr(module, "SUBJECT", None)
        if isinstance(subject, Subject):
            found.append(subject)
    return sorted(found, key=lambda s: (s.order, s.name))


def load(name: str) -> Subject:
    """The subject called ``name`` (its module has the same name)."""
    module = importlib.import_module(f"vbus.bench.subjects.{name}")
    subject = getattr(module, "SUBJECT", None)
    if not isinstance(subject, Subject):
        raise KeyError(f"vbus.bench.subjects.{name} defines no SUBJECT")
    return subject
