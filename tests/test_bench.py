"""``vbus bench``: the smoke run completes and reports; the runner's arithmetic.

Speed is never asserted here: benchmarks are not pass/fail.  The smoke run
only proves that every subject runs without crashing and that the JSON has
what the README and the other engineer read from it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import ClassVar

import pytest

from vbus.bench.report import format_value, render
from vbus.bench.runner import RunResult, SubjectResult
from vbus.bench.subject import Figure, Figures, Subject, Target, Variant, discover

EXPECTED_SUBJECTS = {"stream", "call", "mitigation", "bulk", "scale", "xen", "venet", "kvm"}


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_quick_bench_runs_and_writes_json(tmp_path: Path) -> None:
    if os.environ.get("VBUS_TEST_LOOP", "uvloop") != "uvloop":
        pytest.skip("the bench smoke run belongs to the uvloop pass")
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "vbus.cli", "bench", "--quick", "--json", str(out)]
    plot = tmp_path / "ratios.png"
    if importlib.util.find_spec("matplotlib") is not None:
        cmd += ["--plot", str(plot)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=170)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"

    doc = json.loads(out.read_text())
    assert doc["errors"] == 0
    machine = doc["machine"]
    for key in ("cpu_model", "cpus", "kernel", "python", "loop", "libraries", "loadavg_start"):
        assert key in machine, key
    assert machine["loop"] == "uvloop"
    assert doc["config"]["rounds"] == 1
    assert set(doc["subjects"]) == EXPECTED_SUBJECTS
    for name, subject in doc["subjects"].items():
        assert subject["primary"] in subject["figures"], name
        for variant in subject["variants"].values():
            assert {"median", "ratio", "unavailable", "role"} <= set(variant), name
        assert subject["runs"], name
    # The vbus side of each subject was measured (peers may be unavailable here).
    stream = doc["subjects"]["stream"]["variants"]
    assert stream["vbus"]["median"]["msgs_per_s"] > 0
    assert stream["vbus"]["ratio"] == 1.0
    assert stream["ceiling"]["median"]["msgs_per_s"] > 0
    assert doc["subjects"]["call"]["variants"]["vbus"]["median"]["p50_us"] > 0
    assert doc["subjects"]["mitigation"]["variants"]["on"]["median"]["signals_per_msg"] >= 0
    assert doc["subjects"]["bulk"]["variants"]["vbus"]["median"]["gb_per_s"] > 0
    xen = doc["subjects"]["xen"]["variants"]
    assert all(xen[v]["median"]["per_s"] > 0 for v in ("xen", "userspace", "xenstore", "dict"))
    scale = doc["subjects"]["scale"]["variants"]
    assert {"c1", "c16", "c256"} <= set(scale)
    assert scale["c256"]["median"]["msgs_per_s"] > 0
    venet = doc["subjects"]["venet"]["variants"]
    if venet["gso"]["unavailable"] is None:  # root, iperf3, ip, ping, /dev/net/tun
        for name in ("gso", "nogso", "veth"):
            figures = venet[name]["median"]
            assert figures["gbit_per_s"] > 0 and figures["rtt_ab_p99_us"] > 0, name
        assert venet["gso"]["median"]["daemon_cpu_s_per_gb"] > 0
        assert venet["veth"]["ratio"] == 1.0
    else:
        assert "needs root" in venet["gso"]["unavailable"] or "no " in venet["gso"]["unavailable"]
    assert {t["text"] for t in doc["targets"]} >= {
        "stream: vbus >= 3x the fastest socket-based peer",
        "call: vbus p50 <= 1.3x the bare uvloop echo",
    }
    assert "stream:" in proc.stdout and "targets" in proc.stdout
    if plot.exists():
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- the runner's arithmetic, without processes -----------------------------------


class _Toy(Subject):
    name = "toy"
    title = "toy subject"
    variants: ClassVar[tuple[Variant, ...]] = (
        Variant("vbus", "vbus", role="vbus"),
        Variant("peer", "a peer"),
        Variant("gone", "not here"),
    )
    figures: ClassVar[tuple[Figure, ...]] = (
        Figure("rate", "msg/s", "msg/s"),
        Figure("lat", "p50", "us", higher_is_better=False),
    )
    primary = "rate"
    baseline = "vbus"

    def targets(self, medians: dict[str, Figures]) -> list[Target]:
        ratio = medians["vbus"]["rate"] / medians["peer"]["rate"]
        return [Target("toy: vbus >= 3x peer", ratio, 3.0, ">=")]


def _toy_result() -> SubjectResult:
    result = SubjectResult(_Toy(), {})
    for round_no, (vbus, peer) in enumerate([(300.0, 100.0), (330.0, 90.0), (100.0, 110.0)], 1):
        result.runs.append(RunResult("vbus", round_no, "ok", {"rate": vbus, "lat": 10.0}))
        result.runs.append(RunResult("peer", round_no, "ok", {"rate": peer}))
    result.runs.append(RunResult("gone", 1, "unavailable", reason="not installed"))
    return result


def test_medians_and_ratio_of_medians() -> None:
    result = _toy_result()
    medians = result.medians()
    assert medians["vbus"] == {"rate": 300.0, "lat": 10.0}
    assert medians["peer"] == {"rate": 100.0}
    assert "gone" not in medians
    ratios = result.ratios()
    assert ratios == {"vbus": 1.0, "peer": pytest.approx(1 / 3), "gone": None}
    assert result.spread("vbus", "rate") == pytest.approx((330 - 100) / 300)
    assert result.unavailable("gone") == "not installed"
    (target,) = result.targets()
    assert target.value == pytest.approx(3.0) and target.passed


def test_table_shows_medians_ratios_and_reasons() -> None:
    machine = {
        "cpus": 2,
        "cpu_model": "Test CPU",
        "kernel": "Linux 6",
        "python": "CPython 3.11",
        "loop": "uvloop",
        "libraries": {"uvloop": "0.23"},
        "loadavg_start": [0.0, 0.0, 0.0],
    }
    text = render([_toy_result()], machine, rounds=3)
    lines = text.splitlines()
    vbus_row = next(line for line in lines if line.startswith("  vbus "))
    assert "300" in vbus_row and "1.00x" in vbus_row
    peer_row = next(line for line in lines if "a peer" in line)
    assert "0.33x" in peer_row
    assert any("not here: n/a: not installed" in line for line in lines)
    assert any(line.strip().startswith("PASS") and "toy: vbus" in line for line in lines)


def test_format_value_units() -> None:
    assert format_value(3_120_000, "msg/s") == "3.12 M"
    assert format_value(812_400, "msg/s") == "812.4 k"
    assert format_value(0.0213, "/msg") == "0.0213"
    assert format_value(0.00213, "/msg") == "2.1e-03"
    assert format_value(None, "us") == "-"


def test_every_subject_is_discovered_with_a_consistent_shape() -> None:
    subjects = {s.name: s for s in discover()}
    assert set(subjects) >= EXPECTED_SUBJECTS
    for subject in subjects.values():
        names = [v.name for v in subject.variants]
        assert subject.baseline in names, subject.name
        assert subject.primary in {f.key for f in subject.figures}, subject.name
        assert len(set(names)) == len(names), subject.name
        subject.params(quick=True)


def test_subjects_that_boot_vms_run_only_when_named() -> None:
    from vbus.bench.runner import select_subjects

    assert "vhost_user" not in {s.name for s in select_subjects(())}
    (only,) = select_subjects(("vhost_user",))
    assert only.on_request and {v.name for v in only.variants} == {
        "vbus",
        "vbus-no-event-idx",
        "qemu-tap",
    }
    assert "xen_netback" not in {s.name for s in select_subjects(())}
    (xen,) = select_subjects(("xen_netback",))
    assert xen.on_request and {v.name for v in xen.variants} == {"vbusd", "kernel"}


ON_REQUEST = {"vhost_user", "xen_netback"}


def test_list_says_which_subjects_run_only_when_named() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "vbus.cli", "bench", "--list"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    blocks: dict[str, str] = {}
    name = ""
    for line in out.splitlines():
        if line and not line[0].isspace():
            name = line.split()[0]
        blocks[name] = blocks.get(name, "") + line
    assert "run only when named" in blocks["xen_netback"]
    assert "run only when named" in blocks["vhost_user"]
    assert not any("run only when named" in blocks[n] for n in blocks if n not in ON_REQUEST)
