"""``vbus bench``: rounds, alternation, medians, ratios, progress, JSON.

The machines this runs on are noisy, so no figure stands alone: every side of
a comparison runs in the same bench run, the variants of a subject alternate
(A B C, A B C, ...) for several rounds, and the report gives the median of
each figure over the rounds and the ratio of medians to the subject's
baseline.  Every run is a fresh ``vbus.bench.worker`` process (and, for the
vbus side, a fresh daemon), so rounds are independent.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from vbus.bench.machine import describe_machine
from vbus.bench.report import format_value, render
from vbus.bench.subject import Figures, Params, Subject, Target, discover

__all__ = ["BenchConfig", "Progress", "RunResult", "SubjectResult", "run_bench"]

DEFAULT_ROUNDS = 3


@dataclass
class BenchConfig:
    quick: bool = False
    rounds: int | None = None  # default: 3, or 1 with ``quick``
    only: tuple[str, ...] = ()  # subject names; empty: all
    json_path: Path | None = None
    plot_path: Path | None = None
    loop: str = "uvloop"
    duration: float | None = None  # overrides each subject's run duration
    profile_dir: Path | None = None  # py-spy the vbus side's measured window
    timeout: float = 300.0  # per run
    out: TextIO = field(default_factory=lambda: sys.stdout)
    err: TextIO = field(default_factory=lambda: sys.stderr)

    @property
    def round_count(self) -> int:
        return self.rounds if self.rounds is not None else (1 if self.quick else DEFAULT_ROUNDS)


@dataclass
class RunResult:
    variant: str
    round: int
    status: str  # ok, unavailable, error
    figures: Figures = field(default_factory=dict)
    reason: str = ""
    wall_s: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"variant": self.variant, "round": self.round, "status": self.status}
        if self.figures:
            out["figures"] = self.figures
        if self.reason:
            out["reason"] = self.reason
        out["wall_s"] = round(self.wall_s, 3)
        return out


@dataclass
class SubjectResult:
    subject: Subject
    params: Params
    runs: list[RunResult] = field(default_factory=list)

    def ok_runs(self, variant: str) -> list[RunResult]:
        return [r for r in self.runs if r.variant == variant and r.status == "ok"]

    def medians(self) -> dict[str, Figures]:
        out: dict[str, Figures] = {}
        for variant in self.subject.variants:
            runs = self.ok_runs(variant.name)
            if not runs:
                continue
            keys = sorted({key for run in runs for key in run.figures})
            out[variant.name] = {
                key: statistics.median(run.figures[key] for run in runs if key in run.figures)
                for key in keys
            }
        return out

    def spread(self, variant: str, key: str) -> float | None:
        """(max - min) / median of one figure over the rounds: how noisy it was."""
        values = [r.figures[key] for r in self.ok_runs(variant) if key in r.figures]
        if len(values) < 2:
            return None
        median = statistics.median(values)
        return (max(values) - min(values)) / median if median else None

    def ratios(self) -> dict[str, float | None]:
        """Each variant's median of the primary figure over the baseline's."""
        medians = self.medians()
        primary = self.subject.primary
        base = medians.get(self.subject.baseline, {}).get(primary)
        out: dict[str, float | None] = {}
        for variant in self.subject.variants:
            value = medians.get(variant.name, {}).get(primary)
            out[variant.name] = value / base if value is not None and base else None
        return out

    def unavailable(self, variant: str) -> str | None:
        for run in self.runs:
            if run.variant == variant and run.status == "unavailable":
                return run.reason
        return None

    def errors(self, variant: str | None = None) -> list[RunResult]:
        return [
            r
            for r in self.runs
            if r.status == "error" and (variant is None or r.variant == variant)
        ]

    def targets(self) -> list[Target]:
        return self.subject.targets(self.medians())

    def as_dict(self) -> dict[str, Any]:
        subject = self.subject
        medians = self.medians()
        return {
            "title": subject.title,
            "params": self.params,
            "primary": subject.primary,
            "baseline": subject.baseline,
            "figures": {
                f.key: {"label": f.label, "unit": f.unit, "higher_is_better": f.higher_is_better}
                for f in subject.figures
            },
            "variants": {
                v.name: {
                    "label": v.label,
                    "role": v.role,
                    "kind": v.kind,
                    "median": medians.get(v.name),
                    "ratio": self.ratios()[v.name],
                    "spread": self.spread(v.name, subject.primary),
                    "unavailable": self.unavailable(v.name),
                }
                for v in subject.variants
            },
            "runs": [r.as_dict() for r in self.runs],
            "targets": [t.as_dict() for t in self.targets()],
        }


class Progress:
    """One refreshing line on a terminal; plain lines otherwise."""

    def __init__(self, stream: TextIO, total: int) -> None:
        self.stream = stream
        self.total = total
        self.done = 0
        self.tty = stream.isatty()
        self.started = time.monotonic()

    def show(self, text: str) -> None:
        elapsed = time.monotonic() - self.started
        line = f"[{self.done + 1:>3}/{self.total}] {elapsed:6.1f}s  {text}"
        if self.tty:
            width = shutil.get_terminal_size((100, 20)).columns - 1
            self.stream.write("\r\033[K" + line[:width])
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def step(self, text: str) -> None:
        self.done += 1
        if not self.tty:
            self.stream.write(f"            {text}\n")
            self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\r\033[K")
            self.stream.flush()


def run_one(
    subject: Subject, variant: str, params: Params, round_no: int, config: BenchConfig
) -> RunResult:
    """Measure one variant once, in a fresh worker process."""
    with tempfile.TemporaryDirectory(prefix="vbus-bench-") as tmp:
        result_path = Path(tmp) / "result.json"
        request = {
            "subject": subject.name,
            "variant": variant,
            "params": params,
            "result": str(result_path),
        }
        if config.profile_dir is not None:
            request["params"] = {
                **params,
                "profile": str(config.profile_dir / f"{subject.name}-{variant}-r{round_no}"),
            }
        cmd = [sys.executable, "-m", "vbus.bench.worker"]
        started = time.monotonic()
        # Its own process group: on a timeout or Ctrl-C the worker goes with
        # everything it started (its daemon, its peers).
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        try:
            stdout, stderr = proc.communicate(json.dumps(request).encode(), config.timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            return RunResult(
                variant, round_no, "error", reason=f"timed out after {config.timeout} s"
            )
        except BaseException:
            _kill_group(proc)
            raise
        _kill_group(proc)  # anything the worker left behind
        wall = time.monotonic() - started
        try:
            result = json.loads(result_path.read_text())
        except (OSError, ValueError):
            tail = (stderr or stdout).decode(errors="replace").strip()[-2000:]
            return RunResult(
                variant,
                round_no,
                "error",
                reason=f"worker exited with {proc.returncode} and no result: {tail}",
                wall_s=wall,
            )
    status = result["status"]
    reason = result.get("reason", "")
    if status == "error" and result.get("traceback"):
        reason = f"{reason}\n{result['traceback']}"
    return RunResult(
        variant, round_no, status, figures=result.get("figures", {}), reason=reason, wall_s=wall
    )


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _describe_run(subject: Subject, run: RunResult) -> str:
    if run.status != "ok":
        first = run.reason.splitlines()[0] if run.reason else ""
        return f"{subject.name} {run.variant}: {run.status} {first}"
    figure = subject.figure(subject.primary)
    value = run.figures.get(figure.key)
    shown = f"{format_value(value, figure.unit)} {figure.unit}"
    return f"{subject.name} {run.variant}: {shown}"


def select_subjects(only: tuple[str, ...]) -> list[Subject]:
    subjects = discover()
    if not only:
        return [s for s in subjects if not s.on_request]
    names = {s.name for s in subjects}
    unknown = [name for name in only if name not in names]
    if unknown:
        raise ValueError(
            f"unknown subject(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}"
        )
    return [s for s in subjects if s.name in only]


def run_bench(config: BenchConfig, argv: list[str] | None = None) -> int:
    """Run the selected subjects; print the table; write JSON/plot.  Exit status:
    0, or 1 if any run crashed (the figures themselves never fail the bench)."""
    subjects = select_subjects(config.only)
    if config.round_count < 1:
        raise ValueError("--rounds must be at least 1")
    if config.duration is not None and config.duration <= 0:
        raise ValueError("--duration must be positive")
    if config.plot_path is not None and importlib.util.find_spec("matplotlib") is None:
        from vbus.bench.plot import PlotUnavailable

        raise PlotUnavailable("--plot needs matplotlib: pip install 'vbus[bench]'")
    if config.profile_dir is not None:
        from vbus.bench.profile import spy

        config.profile_dir.mkdir(parents=True, exist_ok=True)
        spy()  # fail early if it is missing
    machine = describe_machine(config.loop)
    rounds = config.round_count
    plan: list[tuple[SubjectResult, int, str]] = []
    results: list[SubjectResult] = []
    for subject in subjects:
        params = subject.params(config.quick)
        params["loop"] = config.loop
        if config.duration is not None and "duration" in params:
            params["duration"] = config.duration
        result = SubjectResult(subject, params)
        results.append(result)
        for round_no in range(1, rounds + 1):
            for variant in subject.variants:
                plan.append((result, round_no, variant.name))

    started = time.time()
    progress = Progress(config.err, len(plan))
    try:
        for result, round_no, name in plan:
            subject = result.subject
            if result.unavailable(name) is not None:
                progress.step(f"{subject.name} {name}: skipped (unavailable)")
                continue
            progress.show(f"{subject.name}  round {round_no}/{rounds}  {name} ...")
            run = run_one(subject, name, result.params, round_no, config)
            result.runs.append(run)
            progress.step(_describe_run(subject, run))
    finally:
        progress.close()
    wall = time.time() - started

    report = render(results, machine, rounds)
    config.out.write(report)
    config.out.flush()
    errors = [run for result in results for run in result.errors()]
    for result in results:
        for run in result.errors():
            config.err.write(f"vbus bench: {result.subject.name} {run.variant}: {run.reason}\n")

    if config.json_path is not None:
        document = {
            "vbus_bench": 1,
            "command": argv if argv is not None else sys.argv,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
            "wall_s": round(wall, 1),
            "machine": machine,
            "config": {
                "quick": config.quick,
                "rounds": rounds,
                "loop": config.loop,
                "only": list(config.only),
                "duration": config.duration,
            },
            "subjects": {r.subject.name: r.as_dict() for r in results},
            "targets": [t.as_dict() for r in results for t in r.targets()],
            "errors": len(errors),
            "table": report,
        }
        config.json_path.write_text(json.dumps(document, indent=2, default=_jsonable) + "\n")
    if config.profile_dir is not None:
        config.err.write(
            f"profiles in {config.profile_dir} (the profiled runs' figures are perturbed); "
            f"hot spots: python -m vbus.bench.profile {config.profile_dir}/*.txt\n"
        )
    if config.plot_path is not None:
        from vbus.bench.plot import plot_ratios

        plot_ratios(results, machine, config.plot_path)
    return 1 if errors else 0


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
