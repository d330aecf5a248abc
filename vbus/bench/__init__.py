"""``vbus bench``: side-by-side benchmarks against what users would pick instead.

Every comparison runs both sides in the same run, alternating, for several
rounds, each run in a fresh process; the report gives medians and ratios of
medians, the subjects' targets checked against them, and the machine it ran
on.  Subjects are plug-ins, one module each in ``vbus.bench.subjects``
(``vbus.bench.subject`` has the interface).  Benchmarks are never part of
pass/fail: ``vbus bench --quick`` in the tests only checks that nothing crashes.
"""

from vbus.bench.runner import BenchConfig, run_bench
from vbus.bench.subject import Figure, Subject, Target, Unavailable, Variant, discover

__all__ = [
    "BenchConfig",
    "Figure",
    "Subject",
    "Target",
    "Unavailable",
    "Variant",
    "discover",
    "run_bench",
]
