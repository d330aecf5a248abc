"""Mitigation: the stream with signal mitigation on and off.

Saturating 64-byte stream into the sink device, as in ``stream``; figures
are messages/s and signals per message in both directions (north->south
kicks the client sent, south->north kicks that reached the client) plus the
daemon's own per-queue counters from STATUS where it has them.

"Off" needs a switch in the client library and the daemon
(``Device.shm(..., mitigation=False)``): a signal for every message both
ways.  Until that exists the variant reports it as unavailable.
"""

from __future__ import annotations

from vbus.bench.clientside import has_mitigation_switch, run_vbus_stream
from vbus.bench.subject import Figure, Figures, Params, Subject, Target, Unavailable, Variant
from vbus.mitigation import DEFAULT_BUDGET

__all__ = ["SUBJECT", "MitigationSubject"]

NEEDS_SWITCH = (
    "needs a mitigation switch: Device.shm(..., mitigation=False) and an SHM flag "
    "that makes both ends signal every message"
)


class MitigationSubject(Subject):
    name = "mitigation"
    title = "Mitigation: the saturating stream with signal mitigation on and off"
    order = 30
    variants = (
        Variant("on", "mitigation on", role="vbus"),
        Variant("off", "mitigation off", role="reference"),
    )
    figures = (
        Figure("msgs_per_s", "msg/s", "msg/s"),
        Figure("signals_per_msg", "sig/msg", "/msg", higher_is_better=False),
        Figure("n2s_per_msg", "n->s sig/msg", "/msg", higher_is_better=False),
        Figure("s2n_per_msg", "s->n sig/msg", "/msg", higher_is_better=False),
        Figure("north_waits_per_msg", "n waits/msg", "/msg", higher_is_better=False),
        Figure("daemon_queue_polls_per_msg", "d polls/msg", "/msg", higher_is_better=False),
    )
    primary = "msgs_per_s"
    baseline = "on"

    def params(self, quick: bool) -> Params:
        return {
            "duration": 0.3 if quick else 2.0,
            "size": 64,
            "batch": 256,
            "ring": 1024,
            "budget": DEFAULT_BUDGET,
            "warmup": 4096 if quick else 16384,
        }

    def run(self, variant: str, params: Params) -> Figures:
        if variant == "on":
            return run_vbus_stream(params, mitigation=True if has_mitigation_switch() else None)
        if variant == "off":
            if not has_mitigation_switch():
                raise Unavailable(NEEDS_SWITCH)
            return run_vbus_stream(params, mitigation=False)
        raise KeyError(f"mitigation: no variant {variant!r}")

    def targets(self, medians: dict[str, Figures]) -> list[Target]:
        on = medians.get("on", {})
        off = medians.get("off", {})
        ratio = (
            on["msgs_per_s"] / off["msgs_per_s"]
            if "msgs_per_s" in on and "msgs_per_s" in off
            else None
        )
        return [
            Target(
                "mitigation: <= 0.01 signals per message under saturation (both ways)",
                on.get("signals_per_msg"),
                0.01,
                "<=",
            ),
            Target(
                "mitigation: on >= 3x the msg/s of off",
                ratio,
                3.0,
                ">=",
                "" if ratio is not None else NEEDS_SWITCH,
            ),
        ]


SUBJECT = MitigationSubject()
