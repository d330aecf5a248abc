"""The store-buffer litmus test of ``vbus.signal.fence`` (see benchmarks/litmus.py).

``X = 1; fence(); r1 = Y`` against ``Y = 1; fence(); r2 = X`` in two processes
on two CPUs over a shared mapping: ``r1 == r2 == 0`` would be a lost wake-up in
the shm_signal handshake, and must never appear.  Without the fence it does on
these machines (x86 lets a load pass an earlier store); that count is printed,
not asserted, because it is probabilistic.

Timing on the 2-CPU development VM: 1.3 to 2.9 M iterations/s, so the
8 M fenced plus 2 M unfenced iterations take 4 to 8 s.

The same race through the real code (``--pattern wakeup``: the north
publishes and ``notify()``s, the south ``arm()``s and re-checks, two
``ShmSignal`` ends over one mapping) must never lose a wake-up either.
Without the fence it rarely does from Python (none in 16 M iterations
here: the interpreter's work between store and load narrows the window), so
that count is printed too; the deterministic check of the fence's place is
in tests/test_signal.py.
"""

from __future__ import annotations

import json
import os

import pytest

import vbus.signal
from benchmarks.litmus import (
    LitmusResult,
    _count_outcomes,
    _signal_blocks,
    _wakeup_north,
    _wakeup_south,
    main,
    run_litmus,
    usable_cpus,
)
from vbus.signal import SIGNAL_SIZE

FENCED_ITERATIONS = int(os.environ.get("VBUS_LITMUS_ITERATIONS", 8_000_000))
UNFENCED_ITERATIONS = max(FENCED_ITERATIONS // 4, 1000)
WAKEUP_ITERATIONS = max(FENCED_ITERATIONS // 4, 1000)  # ~1.2 M/s here: slower per iteration
OUTCOMES = {(0, 0), (0, 1), (1, 0), (1, 1)}


def _require_two_cpus() -> None:
    cpus = usable_cpus()
    if len(cpus) >= 2:
        return
    reason = f"the litmus test needs 2 CPUs to run both sides in parallel; {len(cpus)} usable"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason} (CI=true: a skipped litmus test would hide a broken fence)")
    pytest.skip(reason)


def _check_harness(result: LitmusResult, iterations: int) -> None:
    """The harness itself works: every iteration has exactly one of the four outcomes."""
    assert result.iterations == iterations
    assert set(result.outcomes) == OUTCOMES
    assert all(count >= 0 for count in result.outcomes.values())
    assert sum(result.outcomes.values()) == iterations
    assert len(result.pinned) == 2 and result.pinned[0] != result.pinned[1]


def test_fence_forbids_store_load_reordering() -> None:
    _require_two_cpus()
    fenced = run_litmus(FENCED_ITERATIONS, fence=True, timeout=60)
    plain = run_litmus(UNFENCED_ITERATIONS, fence=False, timeout=60)
    for result in (fenced, plain):
        print(
            f"litmus {result.mode}: {result.iterations} iterations, "
            f"r1==r2==0 {result.reordered} times, outcomes {result.outcomes}, "
            f"{result.rate:,.0f} iterations/s"
        )
    _check_harness(plain, UNFENCED_ITERATIONS)
    _check_harness(fenced, FENCED_ITERATIONS)
    # The two sides really ran at the same time (else zero would prove nothing).
    assert fenced.outcomes[(1, 1)] > 0
    assert fenced.reordered == 0, f"the fence let {fenced.reordered} loads pass stores"


def test_the_shm_signal_handshake_loses_no_wakeup() -> None:
    _require_two_cpus()
    fenced = run_litmus(WAKEUP_ITERATIONS, fence=True, timeout=120, pattern="wakeup")
    plain = run_litmus(max(WAKEUP_ITERATIONS // 4, 1000), fence=False, timeout=60, pattern="wakeup")
    for result in (fenced, plain):
        print(
            f"litmus wakeup {result.mode}: {result.iterations} iterations, "
            f"lost wake-ups {result.reordered}, outcomes {result.outcomes}, "
            f"{result.rate:,.0f} iterations/s"
        )
    _check_harness(fenced, WAKEUP_ITERATIONS)
    assert fenced.pattern == "wakeup"
    assert fenced.outcomes[(1, 1)] > 0  # both halves overlapped: a race was really run
    assert fenced.reordered == 0, f"{fenced.reordered} wake-ups lost through ShmSignal"
    assert vbus.signal.fence is not None and vbus.signal.fence.__module__ == "vbus.signal"


@pytest.mark.parametrize("north_first", [True, False])
def test_the_wakeup_halves_record_what_they_saw(north_first: bool) -> None:
    """One iteration of each half, in turn, in this process: the south sees
    the work published before it armed; the north kicks a south already armed."""
    mapping = bytearray(_signal_blocks(1))
    published, seen, kicked = bytearray(1), bytearray(1), bytearray(1)
    progress = [memoryview(bytearray(8)).cast("Q") for _ in range(2)]

    def north() -> None:
        _wakeup_north(mapping, 0, memoryview(published), memoryview(kicked), *progress, 1, True)  # type: ignore[arg-type]

    def south() -> None:
        _wakeup_south(mapping, 0, memoryview(published), memoryview(seen), *progress, 1, True)  # type: ignore[arg-type]

    for half in (north, south) if north_first else (south, north):
        half()
    assert len(mapping) == SIGNAL_SIZE
    assert (seen[0], kicked[0]) == ((1, 0) if north_first else (0, 1))


def test_outcome_counting() -> None:
    r1 = bytes([0, 0, 1, 1, 1, 0, 1])
    r2 = bytes([0, 1, 0, 1, 1, 1, 1])
    assert _count_outcomes(r1, r2) == {(0, 0): 1, (0, 1): 2, (1, 0): 1, (1, 1): 3}
    with pytest.raises(RuntimeError, match="harness broken"):
        _count_outcomes(bytes([0, 2]), bytes([0, 0]))
    with pytest.raises(RuntimeError, match="harness broken"):
        _count_outcomes(bytes([0, 1]), bytes([1, 0xFF]))


def test_command_line_emits_json(capsys: pytest.CaptureFixture[str]) -> None:
    # Few iterations: on one CPU every lock step costs a context switch.
    assert main(["--mode", "both", "--iterations", "200", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    modes = {r["mode"]: r for r in report["results"]}
    assert set(modes) == {"fence", "nofence"}
    for r in modes.values():
        assert r["iterations"] == 200
        assert r["r1r2_00"] + r["r1r2_01"] + r["r1r2_10"] + r["r1r2_11"] == 200


def test_command_line_runs_the_wakeup_pattern(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--mode", "nofence", "--pattern", "wakeup", "--iterations", "200", "--json"]) == 0
    (result,) = json.loads(capsys.readouterr().out)["results"]
    assert (result["mode"], result["pattern"], result["iterations"]) == ("nofence", "wakeup", 200)
    assert vbus.signal.fence.__name__ == "fence"  # only the children ran without it
    with pytest.raises(ValueError, match="pattern"):
        run_litmus(10, fence=True, pattern="other")


def test_a_run_that_overstays_is_killed() -> None:
    """Both children are killed and reaped: nothing keeps spinning after a failure."""
    with pytest.raises(RuntimeError, match="timed out"):
        run_litmus(50_000_000, fence=False, timeout=0.2)
