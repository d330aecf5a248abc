"""Store-buffer litmus test of ``vbus.signal.fence`` across two processes.

The shm_signal handshake (docs/design.md 3.2) is two copies of the store-buffer
pattern: each side stores its own flag or index, then loads the other's::

    process A: X = 1; [fence]; r1 = Y        process B: Y = 1; [fence]; r2 = X

Without a full fence x86 may let each load pass the earlier store, and both
processes read 0 (``r1 == r2 == 0``): a lost wake-up.  With ``fence`` that
outcome must never appear.  This script runs the pattern over a shared
anonymous mapping between two forked processes pinned to different CPUs and
counts the four outcomes.

Layout of the mapping (every array starts on its own page)::

    page 0:  u64 progress[A] at 0, u64 progress[B] at 128 (separate cache lines)
    X[n], Y[n]:   u8 cells, fresh ones per iteration (no reset between iterations);
                  X[i] and Y[i] are n bytes apart, so never in one cache line
    R1[n], R2[n]: u8 observations of A (r1 = Y[i]) and B (r2 = X[i])

Each process announces the iteration it is at in its progress counter and
spins until the other has reached it too, so the two stay in lock step.

``--pattern wakeup`` runs the same race through the real code, two
``ShmSignal`` ends over the mapping, with a fresh signal block per
iteration (the south's side starts disarmed, as while it polls)::

    north: P[i] = 1; kicked = signal.notify()     (store dirty; fence; load enabled)
    south: signal.arm(); seen = P[i]              (store enabled; fence; load P)

``seen == kicked == 0`` is a lost wake-up: the north skipped the kick and
the south went to sleep without seeing the work.  ``nofence`` replaces
``vbus.signal.fence`` with nothing in both children.  The interpreter's own
work between each store and its load (a method call, the flag arithmetic)
narrows the window a great deal: on the 2-CPU development VM the unfenced
wakeup pattern lost no wake-up in 16 M iterations, where the bare pattern
reorders about once per thousand.  The fence is what makes it impossible
rather than rare; tests/test_signal.py checks its place deterministically.

    python -m benchmarks.litmus --mode both --iterations 3000000 [--pattern wakeup] [--json]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import select
import signal
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import vbus.signal
from vbus.signal import NORTH, SIGNAL_SIZE, SOUTH, ShmSignal
from vbus.signal import fence as vbus_fence

__all__ = ["PATTERNS", "LitmusResult", "main", "run_litmus", "usable_cpus"]

PATTERNS = ("store-load", "wakeup")

DEFAULT_ITERATIONS = 3_000_000
_PAGE = mmap.PAGESIZE
_PROGRESS_A, _PROGRESS_B = 0, 128 // 8  # u64 indexes into the header page
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True, slots=True)
class LitmusResult:
    """Outcome counts of one run; ``outcomes[(r1, r2)]`` (wakeup: r1 = the
    south saw the work, r2 = the north kicked)."""

    mode: str
    iterations: int
    outcomes: dict[tuple[int, int], int]
    seconds: float
    pinned: tuple[int, ...]
    pattern: str = "store-load"

    @property
    def reordered(self) -> int:
        """Iterations where both loads passed both stores (r1 == r2 == 0); for
        the wakeup pattern, the lost wake-ups."""
        return self.outcomes[(0, 0)]

    @property
    def rate(self) -> float:
        return self.iterations / self.seconds if self.seconds else 0.0

    def as_dict(self) -> dict[str, object]:
        return {
            "mode": self.mode,
            "pattern": self.pattern,
            "iterations": self.iterations,
            "r1r2_00": self.outcomes[(0, 0)],
            "r1r2_01": self.outcomes[(0, 1)],
            "r1r2_10": self.outcomes[(1, 0)],
            "r1r2_11": self.outcomes[(1, 1)],
            "seconds": round(self.seconds, 3),
            "iterations_per_s": round(self.rate),
            "pinned_cpus": list(self.pinned),
        }


def usable_cpus() -> list[int]:
    """CPUs this process may run on."""
    return sorted(os.sched_getaffinity(0))


def _spin_store_load(
    mine: memoryview,
    theirs: memoryview,
    seen: memoryview,
    my_progress: memoryview,
    their_progress: memoryview,
    n: int,
    fence: Callable[[], None] | None,
) -> None:
    """One side of the litmus test: ``mine[i] = 1; [fence()]; seen[i] = theirs[i]``.

    Two loops instead of one with a branch, everything in locals: the loop
    body is what limits the iteration rate.
    """
    if fence is None:
        for i in range(n):
            my_progress[0] = i
            while their_progress[0] < i:
                pass
            mine[i] = 1
            seen[i] = theirs[i]
    else:
        for i in range(n):
            my_progress[0] = i
            while their_progress[0] < i:
                pass
            mine[i] = 1
            fence()
            seen[i] = theirs[i]


def _no_fence() -> None:
    """What ``vbus.signal.fence`` becomes in a ``nofence`` child."""


def _wakeup_north(
    buf: mmap.mmap,
    signals_at: int,
    published: memoryview,
    kicked: memoryview,
    my_progress: memoryview,
    their_progress: memoryview,
    n: int,
    fence: bool,
) -> None:
    """The producer half through ``ShmSignal``: publish, then ``notify``."""
    if not fence:
        vbus.signal.fence = _no_fence  # this child only
    for i in range(n):
        sig = ShmSignal(buf, signals_at + i * SIGNAL_SIZE, NORTH, None)
        my_progress[0] = i
        while their_progress[0] < i:
            pass
        published[i] = 1
        kicked[i] = sig.notify()


def _wakeup_south(
    buf: mmap.mmap,
    signals_at: int,
    published: memoryview,
    seen: memoryview,
    my_progress: memoryview,
    their_progress: memoryview,
    n: int,
    fence: bool,
) -> None:
    """The consumer half through ``ShmSignal``: ``arm``, then re-check."""
    if not fence:
        vbus.signal.fence = _no_fence
    for i in range(n):
        sig = ShmSignal(buf, signals_at + i * SIGNAL_SIZE, SOUTH, None)
        my_progress[0] = i
        while their_progress[0] < i:
            pass
        sig.arm()
        seen[i] = published[i]


def _signal_blocks(n: int) -> bytes:
    """``n`` fresh signal blocks: the south's side disarmed (it is polling),
    the north's enabled, nothing pending."""
    one = bytearray(SIGNAL_SIZE)
    ShmSignal.format(one, 0)
    one[8 + 4 * SOUTH] = 0
    return bytes(one) * n


def _die_with_parent(parent: int) -> None:
    """Ask for SIGKILL when the parent goes: a lone child would spin forever."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # it went before the request took effect
        os._exit(1)


def _child(parent: int, cpu: int | None, body: Callable[[], None]) -> None:
    """Run ``body`` in a forked child and never return into the parent's code."""
    code = 1
    try:
        _die_with_parent(parent)
        if cpu is not None:
            os.sched_setaffinity(0, {cpu})
        body()
        code = 0
    except BaseException:
        traceback.print_exc()
    finally:
        os._exit(code)


def _kill(pids: list[int]) -> None:
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    for pid in pids:
        os.waitpid(pid, 0)
    pids.clear()


def _reap(pids: list[int], deadline: float) -> None:
    """Wait for both children; if one fails, time runs out or we are
    interrupted, kill the other (it would wait for its partner forever).

    Sleeps on pidfds rather than polling: a parent that wakes up every few
    milliseconds takes a CPU away from one of the two spinning children.
    """
    failed: list[str] = []
    live = list(pids)
    pidfds = {os.pidfd_open(pid): pid for pid in live}
    try:
        while live:
            if failed:
                failed.append("partner killed")
                _kill(live)
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                failed.append("litmus run timed out")
                _kill(live)
                break
            ready, _, _ = select.select(list(pidfds), [], [], remaining)
            for pidfd in ready:
                pid = pidfds.pop(pidfd)
                os.close(pidfd)
                _, status = os.waitpid(pid, 0)
                live.remove(pid)
                code = os.waitstatus_to_exitcode(status)
                if code != 0:
                    failed.append(f"litmus child {pid} exited with {code}")
    except BaseException:
        _kill(live)
        raise
    finally:
        for pidfd in pidfds:
            os.close(pidfd)
    if failed:
        raise RuntimeError("; ".join(failed))


def _count_outcomes(r1: bytes, r2: bytes) -> dict[tuple[int, int], int]:
    """Count (r1, r2) pairs: code each pair as r1 + 2 * r2 in one byte, in C."""
    n = len(r1)
    doubled = r2.translate(bytes((2 * b) & 0xFF for b in range(256)))
    # Bytes are 0..3, so adding the two as little-endian integers never carries.
    coded = (int.from_bytes(r1, "little") + int.from_bytes(doubled, "little")).to_bytes(n, "little")
    outcomes = {(r1v, r2v): coded.count(r1v + 2 * r2v) for r2v in (0, 1) for r1v in (0, 1)}
    stray = n - sum(outcomes.values())
    if stray or r1.translate(None, b"\x00\x01") or r2.translate(None, b"\x00\x01"):
        raise RuntimeError(f"litmus harness broken: {stray} observations are not 0 or 1")
    return outcomes


def run_litmus(
    iterations: int, *, fence: bool, timeout: float = 600.0, pattern: str = "store-load"
) -> LitmusResult:
    """Run the litmus test ``iterations`` times in two forked processes:
    ``pattern`` is the bare store-buffer pattern or the shm_signal wake-up."""
    if iterations <= 0:
        raise ValueError("iterations must be positive")
    if pattern not in PATTERNS:
        raise ValueError(f"pattern is one of {', '.join(PATTERNS)}")
    wakeup = pattern == "wakeup"
    n = iterations
    span = (n + _PAGE - 1) // _PAGE * _PAGE
    x_at, y_at, r1_at, r2_at = (_PAGE + k * span for k in range(4))
    # wakeup: X is the published work, Y unused; the signal blocks follow.
    signals_at = _PAGE + 4 * span
    signals = (n * SIGNAL_SIZE + _PAGE - 1) // _PAGE * _PAGE if wakeup else 0
    mapping = mmap.mmap(-1, _PAGE + 4 * span + signals, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
    if wakeup:
        mapping[signals_at : signals_at + n * SIGNAL_SIZE] = _signal_blocks(n)
    cpus = usable_cpus()
    pinned: tuple[int, ...] = (cpus[0], cpus[1]) if len(cpus) >= 2 else ()
    fence_fn = vbus_fence if fence else None
    mv = memoryview(mapping)
    views: list[memoryview] = []
    try:
        # Aligned native u64 progress counters: one load or store each (not struct).
        progress = mv[:_PAGE].cast("Q")
        prog_a = progress[_PROGRESS_A : _PROGRESS_A + 1]
        prog_b = progress[_PROGRESS_B : _PROGRESS_B + 1]
        x = mv[x_at : x_at + n]
        y = mv[y_at : y_at + n]
        r1 = mv[r1_at : r1_at + n]
        r2 = mv[r2_at : r2_at + n]
        views += [progress, prog_a, prog_b, x, y, r1, r2]
        sys.stdout.flush()
        sys.stderr.flush()
        start = time.perf_counter()
        pids: list[int] = []
        parent = os.getpid()
        try:
            for side in (0, 1):
                pid = os.fork()
                if pid == 0:
                    cpu = pinned[side] if pinned else None
                    if wakeup and side == 0:  # arm; r1 = X (seen)
                        body = partial(
                            _wakeup_south, mapping, signals_at, x, r1, prog_a, prog_b, n, fence
                        )
                    elif wakeup:  # X = 1; r2 = notify() (kicked)
                        body = partial(
                            _wakeup_north, mapping, signals_at, x, r2, prog_b, prog_a, n, fence
                        )
                    elif side == 0:  # X = 1; r1 = Y
                        body = partial(_spin_store_load, x, y, r1, prog_a, prog_b, n, fence_fn)
                    else:  # Y = 1; r2 = X
                        body = partial(_spin_store_load, y, x, r2, prog_b, prog_a, n, fence_fn)
                    _child(parent, cpu, body)
                pids.append(pid)
        except BaseException:
            _kill(pids)  # a lone first child would wait for its partner forever
            raise
        _reap(pids, time.monotonic() + timeout)
        seconds = time.perf_counter() - start
        outcomes = _count_outcomes(bytes(r1), bytes(r2))
    finally:
        for view in reversed(views):
            view.release()
        mv.release()
        mapping.close()
    mode = "fence" if fence else "nofence"
    return LitmusResult(mode, n, outcomes, seconds, pinned, pattern)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=DEFAULT_ITERATIONS)
    parser.add_argument("--mode", choices=("fence", "nofence", "both"), default="both")
    parser.add_argument(
        "--pattern",
        choices=PATTERNS,
        default="store-load",
        help="store-load: the bare pattern; wakeup: through two ShmSignal ends",
    )
    parser.add_argument("--json", action="store_true", help="emit one JSON object")
    args = parser.parse_args(argv)
    if args.iterations <= 0:
        parser.error("--iterations must be positive")
    if len(usable_cpus()) < 2:
        print("warning: fewer than 2 CPUs, the processes cannot run in parallel", file=sys.stderr)
    modes = ("fence", "nofence") if args.mode == "both" else (args.mode,)
    results = [
        run_litmus(args.iterations, fence=mode == "fence", pattern=args.pattern) for mode in modes
    ]
    if args.json:
        print(json.dumps({"results": [r.as_dict() for r in results]}, indent=2))
    else:
        for r in results:
            o = r.outcomes
            print(
                f"{r.pattern} {r.mode:8} iterations={r.iterations} r1==r2==0: {o[(0, 0)]}  "
                f"(0,1): {o[(0, 1)]}  (1,0): {o[(1, 0)]}  (1,1): {o[(1, 1)]}  "
                f"{r.seconds:.2f} s, {r.rate:,.0f} iterations/s, cpus {list(r.pinned)}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
