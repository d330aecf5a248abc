"""kvm: echo from a real KVM guest (``vbus vm``), its doorbells through
KVM_IOEVENTFD and its interrupts through KVM_IRQFD, against the same guest
with its doorbells trapped to the VMM.

Each variant boots the firmware in a fresh ``vbus vm`` against a fresh
daemon and has it send ``messages`` 64-byte messages to ``echo0``, every
echo verified.  Figures come from the guest's own counts over its data
phase (doorbells rung, interrupts taken, halts) and from the VMM's exit
counters over the same window:

- ``on``: mitigation on (the guest polls with notifications off, arms with
  a fence and re-checks; the daemon's NAPI poller likewise);
- ``off``: mitigation off (one message at a time, every doorbell and every
  interrupt forced);
- ``trapped``: mitigation on, but no KVM_IOEVENTFD: each doorbell is a port
  write that exits to the VMM, which signals the eventfd itself (what a VMM
  without ioeventfd would do);
- ``trapped-off``: the same without mitigation, where every message pays
  the exit.

The ratios (``trapped`` / ``on``, ``trapped-off`` / ``off``) price the exit
to userspace that ioeventfd saves.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

from vbus.bench.subject import Figure, Figures, Params, Subject, Target, Unavailable, Variant

__all__ = ["SUBJECT", "KvmSubject"]

_ARGS = {
    "on": (),
    "off": ("--no-mitigation",),
    "trapped": ("--trap-doorbells",),
    "trapped-off": ("--trap-doorbells", "--no-mitigation"),
}


class KvmSubject(Subject):
    name = "kvm"
    title = "kvm: echo from a real KVM guest, ioeventfd doorbells vs doorbells trapped to the VMM"
    order = 60
    variants = (
        Variant("on", "guest, mitigation on", role="vbus"),
        Variant("off", "guest, mitigation off", role="reference"),
        Variant("trapped", "trapped doorbells, mitigation on", role="peer"),
        Variant("trapped-off", "trapped doorbells, mitigation off", role="peer"),
    )
    figures = (
        Figure("msgs_per_s", "msg/s", "msg/s"),
        Figure("doorbells_per_msg", "doorbells/msg", "/msg", higher_is_better=False),
        Figure("irqs_per_msg", "irqs/msg", "/msg", higher_is_better=False),
        Figure("exits_per_msg", "VMM exits/msg", "/msg", higher_is_better=False),
        Figure("halts_per_msg", "halts/msg", "/msg", higher_is_better=False),
    )
    primary = "msgs_per_s"
    baseline = "on"

    def params(self, quick: bool) -> Params:
        return {"messages": 20000 if quick else 200000, "off_messages": 500 if quick else 10000}

    def run(self, variant: str, params: Params) -> Figures:
        if variant not in _ARGS:
            raise KeyError(f"kvm: no variant {variant!r}")
        if not os.access("/dev/kvm", os.R_OK | os.W_OK):
            raise Unavailable("no usable /dev/kvm")
        if shutil.which(os.environ.get("CC", "gcc")) is None:
            raise Unavailable("no gcc to build the guest firmware")
        from vbus.bench.daemon import BenchDaemon

        off = "--no-mitigation" in _ARGS[variant]
        messages = params["off_messages"] if off else params["messages"]
        with BenchDaemon(params.get("loop", "uvloop")) as daemon:
            cmd = [sys.executable, "-m", "vbus.cli", "vm", "--run-dir", str(daemon.run_dir)]
            cmd += ["--messages", str(messages), "--json", "--timeout", "300", *_ARGS[variant]]
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=330, check=False)
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        if done.returncode != 0 or not lines:
            raise RuntimeError(f"vbus vm failed ({done.returncode}): {done.stderr.strip()}")
        report = json.loads(lines[-1])
        guest = report["guest"]
        n = max(1, int(guest["received"]))
        exits = sum(int(v) for v in report["data_exits"].values())
        return {
            "msgs_per_s": float(report["messages_per_second"]),
            "doorbells_per_msg": guest["doorbells"] / n,
            "irqs_per_msg": guest["interrupts"] / n,
            "exits_per_msg": exits / n,
            "halts_per_msg": guest["waits"] / n,
        }

    def targets(self, medians: dict[str, Figures]) -> list[Target]:
        on = medians.get("on", {})
        out = [
            Target(
                "kvm: 0 VMM exits per message with ioeventfd and irqfd",
                on.get("exits_per_msg"),
                0.0,
                "<=",
            )
        ]
        for trapped, base, what in (
            ("trapped-off", "off", "mitigation off"),
            ("trapped", "on", "mitigation on"),
        ):
            a = medians.get(trapped, {}).get("msgs_per_s")
            b = medians.get(base, {}).get("msgs_per_s")
            out.append(
                Target(
                    f"kvm: trapped doorbells <= ioeventfd msg/s ({what})",
                    a / b if a is not None and b else None,
                    1.0,
                    "<=",
                    detail=f"msg/s {trapped} / {base}",
                )
            )
        return out


SUBJECT = KvmSubject()
