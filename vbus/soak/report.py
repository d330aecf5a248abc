"""The soak's verdict: figures per phase, the bounds they must keep, a table and JSON.

Pure functions over what the runner collected; no IO except ``render`` output
being a string.  Bounds (the exit status of ``vbus soak``):

- good throughput while misbehaving >= ``MIN_RATIO`` x the baseline;
- no good message lost or corrupted (ring messages and call()s);
- daemon RSS at the end (bad clients gone) at most ``MAX_RSS_GROWTH`` (10 %)
  or ``RSS_ALLOWANCE_KIB`` (8 MiB), whichever is larger, above the end of the
  baseline.  The allowance is the allocators' high-water mark after the
  catalogues' biggest holders (hundreds of queues at once, 1 MiB spans,
  guest memory tables, xenstore trees, venet backlogs): with every catalogue
  of ``--bad all``, +6.4 MiB after 20 s and +5.1 MiB after 60 s on a 41 MiB
  daemon here, a plateau rather than a leak (about half of it is glibc's
  dynamic mmap threshold keeping freed spans in the heap);
- daemon fds back to the baseline's count at the end, and to the start's count
  once the good clients are gone too; the same for clients and connections;
- no exception anywhere: none logged by the daemon, none in a good client;
- every misbehaviour ran and drew the reaction the design promises.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "MAX_RSS_GROWTH",
    "MIN_RATIO",
    "RSS_ALLOWANCE_KIB",
    "Bound",
    "check_bounds",
    "percentile",
    "reaction_pattern",
    "render",
    "rss_limit_kib",
    "summarise_outcomes",
]

MIN_RATIO = 0.8
MAX_RSS_GROWTH = 0.10
RSS_ALLOWANCE_KIB = 8 * 1024


def rss_limit_kib(baseline_kib: int) -> int:
    """The most the daemon's RSS may be at the end, given the baseline's."""
    return baseline_kib + max(int(baseline_kib * MAX_RSS_GROWTH), RSS_ALLOWANCE_KIB)


@dataclass
class Bound:
    name: str
    value: str
    limit: str
    ok: bool

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "value": self.value, "limit": self.limit, "ok": self.ok}


def percentile(values: list[int] | list[float], fraction: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return float(ordered[min(len(ordered) - 1, int(fraction * len(ordered)))])


@dataclass
class BehaviourSummary:
    name: str
    connector: str
    expect: str
    instances: int = 0
    ok: int = 0
    faults: int = 0
    detect: list[float] = field(default_factory=list)
    reclaimed: bool | None = None
    reactions: dict[tuple[str, ...], Reactions] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "connector": self.connector,
            "expect": self.expect,
            "instances": self.instances,
            "ok": self.ok,
            "failed": self.instances - self.ok,
            "faults": self.faults,
            "detect_p50_s": percentile(self.detect, 0.5),
            "detect_max_s": max(self.detect) if self.detect else None,
            "reclaimed": self.reclaimed,
            "reactions": {
                kind.text(): kind.count
                for kind in sorted(self.reactions.values(), key=lambda k: -k.count)[:5]
            },
            "failures": self.failures[:10],
        }


# A number in a reaction: a hex address, or a decimal count, possibly with a fraction.
_NUMBER = re.compile(r"0x[0-9a-fA-F]+|\d+(?:\.\d+)?")


def reaction_pattern(reaction: str) -> tuple[tuple[str, ...], list[str]]:
    """The reaction's words before any detailed reason (``...: reason``), split
    around its numbers: reactions that differ only in numbers share the words."""
    head = reaction.split(":", 1)[0][:80]
    return tuple(_NUMBER.split(head)), _NUMBER.findall(head)


def _number(text: str) -> float:
    return float(int(text, 16)) if text.startswith("0x") else float(text)


@dataclass
class Reactions:
    """Reactions of one pattern: how many, and the range each number spanned."""

    words: tuple[str, ...]  # the text around the numbers: one more piece than numbers
    count: int = 0
    low: list[str] = field(default_factory=list)
    high: list[str] = field(default_factory=list)

    def add(self, numbers: list[str]) -> None:
        self.count += 1
        if not self.low:
            self.low, self.high = list(numbers), list(numbers)
            return
        for i, number in enumerate(numbers):
            if _number(number) < _number(self.low[i]):
                self.low[i] = number
            if _number(number) > _number(self.high[i]):
                self.high[i] = number

    def text(self) -> str:
        """The pattern with each number in place: the value, or ``low-high`` when
        the instances differed (``30-120 doorbells coalesced``)."""
        shown = [
            lo if lo == hi else f"{lo}-{hi}" for lo, hi in zip(self.low, self.high, strict=True)
        ]
        return "".join(w + n for w, n in zip(self.words, [*shown, ""], strict=True))


def summarise_outcomes(
    outcomes: list[dict[str, Any]], behaviours: list[tuple[str, str, str]]
) -> dict[str, BehaviourSummary]:
    """``behaviours``: (name, connector, expect) of every selected misbehaviour."""
    table = {name: BehaviourSummary(name, conn, expect) for name, conn, expect in behaviours}
    for outcome in outcomes:
        summary = table.get(outcome["behaviour"])
        if summary is None:
            continue
        summary.instances += 1
        summary.faults += int(outcome.get("faults") or 0)
        if outcome.get("ok"):
            summary.ok += 1
        else:
            summary.failures.append(f"{outcome.get('reaction')}: {outcome.get('detail')}")
        if outcome.get("detect_s") is not None:
            summary.detect.append(float(outcome["detect_s"]))
        reclaimed = outcome.get("reclaimed")
        if reclaimed is not None:
            summary.reclaimed = bool(reclaimed) and summary.reclaimed is not False
        words, numbers = reaction_pattern(str(outcome.get("reaction", "")))
        kind = summary.reactions.get(words)
        if kind is None:
            kind = summary.reactions[words] = Reactions(words)
        kind.add(numbers)
    return table


def check_bounds(result: dict[str, Any], problems: list[str]) -> list[Bound]:
    """The bounds a soak result must keep (the exit status of ``vbus soak``)."""
    good = result["good"]
    daemon = result["daemon"]
    samples = daemon["samples"]
    found: list[Bound] = []
    r = good["ratio"]["msgs_per_s"]
    found.append(
        Bound(
            "good throughput, misbehaving / baseline",
            "-" if r is None else f"{r:.2f}x",
            f">= {MIN_RATIO:.2f}x",
            r is not None and r >= MIN_RATIO,
        )
    )
    final = good["final"]
    lost = final["lost"] + final["call_errors"]
    corrupted = final["corrupted"] + final["call_corrupted"]
    counted = final["sent"] > 0  # no final count (a worker died): nothing is proven
    found.append(
        Bound(
            "good messages + calls lost",
            f"{lost:,}" if counted else "no final count",
            "0",
            lost == 0 and counted,
        )
    )
    found.append(Bound("good messages + calls corrupted", f"{corrupted:,}", "0", corrupted == 0))
    base_rss = samples.get("baseline", {}).get("rss_kib")
    end_rss = samples.get("end", {}).get("rss_kib")
    growth = (end_rss - base_rss) / base_rss if base_rss and end_rss else None
    found.append(
        Bound(
            "daemon RSS growth, end / end of baseline",
            "-" if growth is None else f"{growth * 100:+.1f} % ({base_rss:,} -> {end_rss:,} KiB)",
            f"<= {MAX_RSS_GROWTH * 100:.0f} % or {RSS_ALLOWANCE_KIB // 1024} MiB",
            growth is not None and end_rss <= rss_limit_kib(base_rss),
        )
    )
    for label, a, b in (
        ("end vs end of baseline", "baseline", "end"),
        ("final vs start", "start", "final"),
    ):
        sa, sb = samples.get(a, {}), samples.get(b, {})
        same = all(
            sa.get(k) is not None and sa.get(k) == sb.get(k)
            for k in ("fds", "clients", "connections")
        )
        found.append(
            Bound(
                f"daemon fds / clients / connections, {label}",
                f"{sb.get('fds')}/{sb.get('clients')}/{sb.get('connections')} vs "
                f"{sa.get('fds')}/{sa.get('clients')}/{sa.get('connections')}",
                "equal",
                same,
            )
        )
    errors = samples.get("final", samples.get("end", {})).get("errors_logged")
    log_bad = sum(
        daemon.get(k) or 0 for k in ("log_errors", "log_loop_exceptions", "log_tracebacks")
    )
    found.append(
        Bound(
            "daemon exceptions / errors logged",
            f"{errors} (log: {log_bad})" if daemon["log"] else f"{errors}",
            "0",
            errors == 0 and log_bad == 0,
        )
    )
    found.append(
        Bound(
            "good client exceptions",
            str(len(good["failures"])),
            "0",
            not good["failures"],
        )
    )
    if daemon["started_by_soak"]:
        found.append(
            Bound("daemon exit code", str(daemon["exit_code"]), "0", daemon["exit_code"] == 0)
        )
    missing = [n for n, s in result["misbehaviours"].items() if s["instances"] == 0]
    failed = {n: s["failed"] for n, s in result["misbehaviours"].items() if s["failed"]}
    found.append(
        Bound(
            "misbehaviours with the promised reaction",
            f"{sum(s['ok'] for s in result['misbehaviours'].values()):,} of "
            f"{sum(s['instances'] for s in result['misbehaviours'].values()):,}"
            + (f"; {len(failed)} kinds failed (see above)" if failed else "")
            + (f"; {len(missing)} never ran" if missing else ""),
            "all",
            not failed and not missing,
        )
    )
    found.append(Bound("soak run problems", str(len(problems)), "0", not problems))
    return found


# --- the table ----------------------------------------------------------------------


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def _ms(seconds: float | None) -> str:
    return (
        "-"
        if seconds is None
        else f"{seconds * 1e3:.1f} ms"
        if seconds < 10
        else f"{seconds:.1f} s"
    )


def _rows(rows: list[list[str]], right: set[int] | None = None) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    right = right if right is not None else set(range(1, len(widths)))
    out = []
    for row in rows:
        cells = [
            cell.rjust(widths[i]) if i in right else cell.ljust(widths[i])
            for i, cell in enumerate(row)
        ]
        out.append("  " + "  ".join(cells).rstrip())
    return out


def render(result: dict[str, Any]) -> str:
    """The end-of-run table: plain text, aligned."""
    lines: list[str] = []
    cfg = result["config"]
    phases = result["phases"]
    lines.append(
        f"vbus soak: {cfg['duration']:g} s = baseline {phases['baseline']['seconds']:.1f} s + "
        f"misbehaving {phases['misbehaving']['seconds']:.1f} s (warm-up and settling on top), "
        f"{cfg['good']} good clients "
        f"x {cfg['rate']:,.0f} msg/s offered, bad: {cfg['bad']}, loop {cfg['loop']}, "
        f"daemon pid {result['daemon'].get('pid')}" + (" (attached)" if cfg.get("attach") else "")
    )
    load = cfg.get("load_average") or {}
    if load:
        lines.append(
            f"machine: {cfg.get('cpus')} CPUs; load average at "
            + ", ".join(f"{phase} {value:.2f}" for phase, value in load.items())
        )
    lines.append("")
    good = result["good"]
    base, bad, ratio = good["baseline"], good["misbehaving"], good["ratio"]
    lines.append("good clients")
    rows = [
        ["", "baseline", "misbehaving", "ratio"],
        [
            "messages/s",
            _fmt(base["msgs_per_s"], 0),
            _fmt(bad["msgs_per_s"], 0),
            f"{_fmt(ratio['msgs_per_s'])}x",
        ],
        [
            "call() p50",
            _ms(base["call_p50_s"]),
            _ms(bad["call_p50_s"]),
            f"{_fmt(ratio['call_p50'])}x",
        ],
        [
            "call() p99",
            _ms(base["call_p99_s"]),
            _ms(bad["call_p99_s"]),
            f"{_fmt(ratio['call_p99'])}x",
        ],
        [
            "ring round trip p99",
            _ms(base["ring_p99_s"]),
            _ms(bad["ring_p99_s"]),
            f"{_fmt(ratio['ring_p99'])}x",
        ],
        [
            "their own loop lag p99",
            _ms(base.get("client_lag_p99_s")),
            _ms(bad.get("client_lag_p99_s")),
            f"{_fmt(ratio.get('client_lag_p99'))}x",
        ],
        ["calls", _fmt(base["calls"]), _fmt(bad["calls"]), ""],
        ["schedule skipped (msgs)", _fmt(base["skipped"]), _fmt(bad["skipped"]), ""],
    ]
    lines += _rows(rows)
    final = good["final"]
    lines.append(
        f"  total: {final['sent']:,} sent, {final['received']:,} received, "
        f"{final['lost']:,} lost, {final['corrupted']:,} corrupted; {final['calls']:,} calls, "
        f"{final['call_errors']:,} failed, {final['call_corrupted']:,} corrupted"
    )
    lines.append("")
    daemon = result["daemon"]
    samples = daemon["samples"]
    names = [name for name in ("start", "baseline", "end", "final") if name in samples]
    lines.append("daemon")
    header = ["", *("end of baseline" if n == "baseline" else n for n in names)]
    rows = [header]
    for label, key in (
        ("RSS (KiB)", "rss_kib"),
        ("open fds", "fds"),
        ("clients", "clients"),
        ("connections", "connections"),
        ("loop lag p50 (ms)", "loop_lag_p50_ms"),
        ("loop lag p99 (ms)", "loop_lag_p99_ms"),
        ("loop lag max (ms)", "loop_lag_max_ms"),
        ("faults dealt", "clients_faults"),
        ("clients dropped", "clients_dropped"),
        ("refused / denied", None),
        ("errors logged", "errors_logged"),
    ):
        row = [label]
        for name in names:
            sample = samples[name]
            if key is None:
                row.append(
                    f"{sample.get('clients_refused', '-')} / {sample.get('clients_denied', '-')}"
                )
            else:
                row.append(_fmt(sample.get(key)))
        rows.append(row)
    lines += _rows(rows)
    cpu = daemon.get("cpu_per_phase") or {}
    clients = daemon.get("client_cpu") or {}
    base_s = phases["baseline"]["seconds"] or 1.0
    bad_s = phases["misbehaving"]["seconds"] or 1.0

    def share(seconds: float | None, span: float) -> str:
        return "-" if seconds is None else f"{seconds / span * 100:.0f} %"

    lines.append(
        "  CPU, share of one core (baseline / misbehaving): daemon "
        f"{share(cpu.get('baseline'), base_s)} / {share(cpu.get('misbehaving'), bad_s)}, "
        f"good clients {share(clients.get('baseline', {}).get('good_worker'), base_s)} / "
        f"{share(clients.get('misbehaving', {}).get('good_worker'), bad_s)}, bad clients "
        f"{share(clients.get('misbehaving', {}).get('bad_worker'), bad_s)}"
    )
    if daemon.get("log"):
        lines.append(
            f"  log: {daemon.get('log_errors')} error lines, "
            f"{daemon.get('log_loop_exceptions')} loop.exception, "
            f"{daemon.get('log_tracebacks')} tracebacks; exit code {daemon.get('exit_code')}"
        )
    else:
        lines.append("  log: not readable (attached daemon); errors logged come from STATUS")
    lines.append("")
    lines.append("misbehaviour")
    rows = [
        [
            "name",
            "expect",
            "instances",
            "ok",
            "faults",
            "detect p50",
            "detect max",
            "reclaimed",
            "typical reaction",
        ]
    ]
    for name, s in result["misbehaviours"].items():
        top = next(iter(s["reactions"]), "-")
        rows.append(
            [
                name,
                s["expect"],
                _fmt(s["instances"]),
                _fmt(s["ok"]),
                _fmt(s["faults"]),
                _ms(s["detect_p50_s"]),
                _ms(s["detect_max_s"]),
                _fmt(s["reclaimed"]),
                top,
            ]
        )
    lines += _rows(rows, right={2, 3, 4, 5, 6})
    for name, s in result["misbehaviours"].items():
        for failure in s["failures"][:3]:
            lines.append(f"  ! {name}: {failure}")
        if s["instances"] == 0:
            lines.append(f"  ! {name}: never ran")
    for name, reason in (result.get("skipped") or {}).items():
        lines.append(f"  skipped {name}: {reason}")
    lines.append("")
    lines.append("bounds")
    rows = [["", "value", "limit", ""]]
    for bound in result["bounds"]:
        rows.append(
            [bound["name"], bound["value"], bound["limit"], "ok" if bound["ok"] else "BROKEN"]
        )
    lines += _rows(rows, right={1})
    lines.append("")
    lines.append("PASS: every bound held" if result["passed"] else "FAIL: a bound was broken")
    return "\n".join(lines)
