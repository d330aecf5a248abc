"""``--plot FILE.png``: a bar chart of the ratios (matplotlib, an optional extra)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from vbus.bench.machine import summary_line

if TYPE_CHECKING:
    from vbus.bench.runner import SubjectResult

__all__ = ["PlotUnavailable", "plot_ratios"]


class PlotUnavailable(RuntimeError):
    """matplotlib is not installed."""


def plot_ratios(results: list[SubjectResult], machine: dict[str, Any], path: Path) -> None:
    """One horizontal bar per variant: its median over the subject's baseline,
    drawn from 1x on a log scale (left of the line: less than the baseline)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter
    except ImportError:
        raise PlotUnavailable(
            "--plot needs matplotlib: pip install 'vbus[bench]' (or pip install matplotlib)"
        ) from None

    blocks: list[tuple[SubjectResult, list[tuple[str, float, str]]]] = []
    for result in results:
        ratios = result.ratios()
        bars: list[tuple[str, float, str]] = []
        for v in result.subject.variants:
            ratio = ratios.get(v.name)
            if ratio is not None:
                bars.append((v.label, ratio, v.role))
        if bars:
            blocks.append((result, bars))
    height = max(2.5, 0.32 * sum(len(bars) + 1.5 for _, bars in blocks))
    fig, axes = plt.subplots(
        len(blocks) or 1,
        1,
        figsize=(9, height),
        gridspec_kw={"height_ratios": [len(bars) for _, bars in blocks] or [1]},
        squeeze=False,
    )
    colours = {"vbus": "#1f77b4", "ceiling": "#2ca02c", "reference": "#9467bd", "peer": "#ff7f0e"}
    for ax, (result, bars) in zip(axes[:, 0], blocks, strict=False):
        subject = result.subject
        figure = subject.figure(subject.primary)
        labels = [label for label, _, _ in bars]
        values = [value for _, value, _ in bars]
        ax.barh(
            labels,
            [value - 1.0 for value in values],
            left=1.0,
            color=[colours.get(role, "#7f7f7f") for _, _, role in bars],
        )
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_xlim(min(*values, 1.0) / 1.6, max(*values, 1.0) * 1.6)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _pos: f"{x:g}x"))
        ax.xaxis.set_minor_formatter(FuncFormatter(lambda _x, _pos: ""))
        ax.invert_yaxis()
        for y, value in enumerate(values):
            ax.annotate(
                f"{value:.2f}x",
                (value, y),
                xytext=(3 if value >= 1 else -3, 0),
                textcoords="offset points",
                ha="left" if value >= 1 else "right",
                va="center",
                fontsize=8,
            )
        better = "higher is better" if figure.higher_is_better else "lower is better"
        ax.set_title(
            f"{subject.name}: {figure.label} / {subject.baseline} ({better})",
            fontsize=9,
            loc="left",
        )
        ax.tick_params(labelsize=8)
    fig.suptitle(f"vbus bench: {summary_line(machine)}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
