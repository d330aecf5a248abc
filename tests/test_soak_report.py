"""vbus soak without a soak: how reactions are grouped and shown, how --duration
splits into the two measured phases, which configurations are refused."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

from vbus.soak.report import reaction_pattern, render, summarise_outcomes
from vbus.soak.runner import MIN_PHASE, SoakConfig


def _outcome(behaviour: str, reaction: str) -> dict[str, Any]:
    return {
        "behaviour": behaviour,
        "ok": True,
        "reaction": reaction,
        "detect_s": None,
        "faults": 0,
        "reclaimed": True,
        "detail": "",
    }


def test_reactions_differing_in_numbers_show_their_range() -> None:
    outcomes = [
        _outcome("doorbell_flood", f"{n} doorbells coalesced; still served")
        for n in (120000, 95000, 131072)
    ]
    outcomes.append(_outcome("call_flood", "served 4096 pipelined calls; dropped after 32 unread"))
    outcomes.append(_outcome("call_flood", "served 900 pipelined calls; dropped after 32 unread"))
    table = summarise_outcomes(
        outcomes,
        [("doorbell_flood", "userspace", "absorbed"), ("call_flood", "userspace", "disconnect")],
    )
    assert table["doorbell_flood"].as_dict()["reactions"] == {
        "95000-131072 doorbells coalesced; still served": 3
    }
    # Numbers that did not change stay as they were; the range is numeric, not textual.
    assert table["call_flood"].as_dict()["reactions"] == {
        "served 900-4096 pipelined calls; dropped after 32 unread": 2
    }


def test_numbers_of_any_width_share_one_kind() -> None:
    # "9 probes" and "12 probes" once made two kinds ("# probes", "## probes").
    reactions = ("9 probes refused alike", "12 probes x", "12 probes refused alike")
    table = summarise_outcomes(
        [_outcome("namespace", reaction) for reaction in reactions],
        [("namespace", "userspace", "denied")],
    )
    assert table["namespace"].as_dict()["reactions"] == {
        "9-12 probes refused alike": 2,
        "12 probes x": 1,
    }


def test_reaction_pattern_keeps_words_drops_the_reason() -> None:
    words, numbers = reaction_pattern("fault after 3 won races: bad descriptor 0x1f at 2.5")
    assert words == ("fault after ", " won races")
    assert numbers == ["3"]
    assert reaction_pattern("ids 1..8 of 0x7f00 and 5.2 GiB") == (
        ("ids ", "..", " of ", " and ", " GiB"),
        ["1", "8", "0x7f00", "5.2"],
    )
    assert reaction_pattern("released on peer closed") == (("released on peer closed",), [])


def _result(reactions: dict[str, int]) -> dict[str, Any]:
    good = {
        "msgs_per_s": 1000.0,
        "call_p50_s": 0.001,
        "call_p99_s": 0.002,
        "ring_p99_s": 0.002,
        "client_lag_p99_s": 0.001,
        "calls": 10,
        "skipped": 0,
    }
    return {
        "config": {"duration": 5.0, "good": 1, "rate": 100.0, "bad": "all", "loop": "uvloop"},
        "phases": {"baseline": {"seconds": 2.0}, "misbehaving": {"seconds": 3.0}},
        "good": {
            "baseline": good,
            "misbehaving": good,
            "ratio": dict.fromkeys(("msgs_per_s", "call_p50", "call_p99", "ring_p99"), 1.0),
            "final": dict.fromkeys(
                ("sent", "received", "lost", "corrupted", "calls", "call_errors", "call_corrupted"),
                0,
            ),
        },
        "daemon": {"pid": 1, "samples": {"start": {"rss_kib": 1}}, "log": None},
        "misbehaviours": {
            "doorbell_flood": {
                "expect": "absorbed",
                "instances": 3,
                "ok": 3,
                "faults": 0,
                "detect_p50_s": None,
                "detect_max_s": None,
                "reclaimed": True,
                "reactions": reactions,
                "failures": [],
            }
        },
        "bounds": [],
        "passed": True,
    }


def test_the_table_shows_numbers_not_placeholders() -> None:
    outcomes = [_outcome("doorbell_flood", f"{n} doorbells coalesced") for n in (40, 400000)]
    summary = summarise_outcomes(outcomes, [("doorbell_flood", "userspace", "absorbed")])
    text = render(_result(summary["doorbell_flood"].as_dict()["reactions"]))
    row = next(line for line in text.splitlines() if line.strip().startswith("doorbell_flood"))
    assert row.rstrip().endswith("40-400000 doorbells coalesced")
    assert "#" not in text


def test_the_header_says_what_duration_covers() -> None:
    first = render(_result({})).splitlines()[0]
    assert first.startswith("vbus soak: 5 s = baseline 2.0 s + misbehaving 3.0 s")


@pytest.mark.parametrize("duration", [4.0, 5.0, 7.5, 8.0, 20.0, 60.0, 3600.0])
def test_duration_is_the_two_phases_together(duration: float) -> None:
    cfg = SoakConfig(duration=duration)
    assert cfg.problem() is None
    assert cfg.baseline_seconds + cfg.bad_seconds == pytest.approx(duration)
    assert cfg.baseline_seconds >= MIN_PHASE and cfg.bad_seconds >= MIN_PHASE
    assert cfg.bad_seconds >= cfg.baseline_seconds


def test_duration_splits_a_quarter_for_the_baseline() -> None:
    assert (SoakConfig(duration=60).baseline_seconds, SoakConfig(duration=60).bad_seconds) == (
        15.0,
        45.0,
    )
    assert (SoakConfig(duration=5).baseline_seconds, SoakConfig(duration=5).bad_seconds) == (
        2.0,
        3.0,
    )


@pytest.mark.parametrize(
    ("changes", "option"),
    [
        ({"duration": 3.9}, "--duration"),
        ({"duration": -1.0}, "--duration"),
        ({"duration": float("nan")}, "--duration"),
        ({"duration": float("inf")}, "--duration"),
        ({"good": 0}, "--good"),
        ({"rate": 0.0}, "--rate"),
        ({"rate": float("nan")}, "--rate"),
    ],
)
def test_configurations_that_cannot_run_are_named(changes: dict[str, Any], option: str) -> None:
    problem = SoakConfig(**changes).problem()
    assert problem is not None and problem.startswith(f"{option} must ")


def test_vbus_soak_refuses_a_too_short_duration_before_starting_anything() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "vbus.cli", "soak", "--duration", "1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "vbus soak: --duration must be at least 4 s (a baseline and a misbehaving phase "
        "of at least 2 s each), not 1"
    ]
    assert result.stdout == ""
