"""The bench's plain-text table: one block per subject, then the targets."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from vbus.bench.machine import summary_line
from vbus.bench.subject import Figure

if TYPE_CHECKING:
    from vbus.bench.runner import SubjectResult

__all__ = ["format_value", "render"]


def format_value(value: float | None, unit: str) -> str:
    if value is None or math.isnan(value):
        return "-"
    if unit in ("msg/s", "calls/s"):
        if value >= 1e6:
            return f"{value / 1e6:.2f} M"
        if value >= 1e3:
            return f"{value / 1e3:.1f} k"
        return f"{value:.0f}"
    if unit == "/msg":
        if value == 0 or value >= 10:
            return f"{value:.0f}" if value == 0 else f"{value:.1f}"
        return f"{value:.4f}" if value >= 0.01 else f"{value:.1e}"
    if unit in ("us", "ms", "KiB"):
        return f"{value:.1f}" if value >= 10 or unit == "KiB" else f"{value:.2f}"
    return f"{value:.2f}"


def _ratio(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}x" if value < 100 else f"{value:.0f}x"


def _spread(value: float | None) -> str:
    return "" if value is None else f"±{value * 50:.0f}%"


def _table(rows: list[list[str]], indent: str = "  ", left: int = 1) -> list[str]:
    """Aligned columns: the first ``left`` ones to the left, numbers to the right."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [
            cell.ljust(width) if i < left else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append((indent + "  ".join(cells)).rstrip())
    return lines


def _subject_block(result: SubjectResult) -> list[str]:
    subject = result.subject
    medians = result.medians()
    ratios = result.ratios()
    primary = subject.figure(subject.primary)
    # Columns: the primary figure, its ratio and spread, then the other figures
    # that at least one variant has.
    others: list[Figure] = [
        f
        for f in subject.figures
        if f.key != primary.key and any(f.key in m for m in medians.values())
    ]
    header = [
        "variant",
        primary.label if primary.label == primary.unit else f"{primary.label} ({primary.unit})",
        f"/{subject.baseline}",
        "spread",
        *(f.label for f in others),
    ]
    rows = [header]
    notes: list[str] = []
    for variant in subject.variants:
        figures = medians.get(variant.name)
        if figures is None:
            reason = result.unavailable(variant.name)
            if reason is None:
                errors = result.errors(variant.name)
                reason = "error: " + errors[0].reason.splitlines()[0] if errors else "not measured"
            else:
                reason = "n/a: " + reason
            notes.append(f"  {variant.label}: {reason}")
            continue
        rows.append(
            [
                variant.label,
                format_value(figures.get(primary.key), primary.unit),
                _ratio(ratios.get(variant.name)),
                _spread(result.spread(variant.name, primary.key)),
                *(format_value(figures.get(f.key), f.unit) for f in others),
            ]
        )
    lines = [f"{subject.name}: {subject.title}"]
    if len(rows) > 1:
        lines += _table(rows)
    lines += notes
    return lines


def render(results: list[SubjectResult], machine: dict[str, Any], rounds: int) -> str:
    lines = [
        f"vbus bench: {summary_line(machine)}",
        f"{rounds} round(s), variants alternating; medians over rounds, ratios of medians; "
        "spread = half the range over rounds",
        "",
    ]
    for result in results:
        lines += _subject_block(result)
        lines.append("")
    targets = [t for r in results for t in r.targets()]
    if targets:
        lines.append("targets (medians of this run; informational, never a test failure):")
        rows = []
        for target in targets:
            passed = target.passed
            verdict = "n/a" if passed is None else ("PASS" if passed else "MISS")
            value = "-" if target.value is None else f"{target.value:.4g}"
            rows.append(
                [
                    verdict,
                    target.text,
                    f"{value} (want {target.op} {target.limit:g})",
                    target.detail,
                ]
            )
        lines += _table(rows, left=4)
    return "\n".join(lines).rstrip() + "\n"
