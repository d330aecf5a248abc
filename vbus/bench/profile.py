"""Profiles of the vbus side: ``vbus bench --profile DIR``, then
``python -m vbus.bench.profile DIR/*.txt`` for the hot spots.

With ``--profile`` the vbus stream runs (stream, mitigation, bulk) attach
``py-spy record --nonblocking --format raw`` to the daemon and to the client
process for the measured window only (after the warm-up, not the start-up),
one file each: ``SUBJECT-VARIANT-rN-daemon.txt`` and ``...-client.txt``.
A raw file has one line per distinct stack, ``frame;frame;... COUNT``
(leading ``process PID:"cmdline"`` frames when several processes were
sampled).  The summary lists, per process, the lines where the samples ended
(self) and the functions on the stack (inclusive), as shares of that
process's samples.  py-spy skips idle threads, so the shares are of busy
time; time inside uvloop's C code shows up on the Python frame that entered
it (``Runner.run``, the loop's ``run_forever``).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

__all__ = ["WindowProfiler", "main", "spy", "summarize"]

_PROCESS = re.compile(r'^process (\d+):"(.*)"$')
_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?):(?P<line>\d+)\)$")


def spy() -> str:
    """The py-spy executable (next to this Python first), or RuntimeError."""
    local = Path(sys.executable).with_name("py-spy")
    found = str(local) if os.access(local, os.X_OK) else shutil.which("py-spy")
    if found is None:
        raise RuntimeError("--profile needs py-spy: pip install 'vbus[bench]' (or py-spy)")
    return found


class WindowProfiler:
    """py-spy attached to some processes for one measured window.

    ``start()`` attaches (and gives py-spy a moment to do so), ``stop()``
    waits until every recorder has written its file.
    """

    def __init__(self, prefix: str, pids: dict[str, int], duration: float) -> None:
        self.prefix = prefix
        self.pids = pids
        self.duration = max(1, round(duration))
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self) -> None:
        exe = spy()
        for role, pid in self.pids.items():
            cmd = [
                exe,
                "record",
                "--nonblocking",
                "--rate",
                "400",
                "--format",
                "raw",
                "--duration",
                str(self.duration),
                "--pid",
                str(pid),
                "--output",
                f"{self.prefix}-{role}.txt",
            ]
            self.procs.append(
                subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            )
        time.sleep(0.5)

    def stop(self) -> None:
        for proc in self.procs:
            try:
                proc.wait(self.duration + 30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _role(cmdline: str) -> str:
    if "vbus.daemon" in cmdline:
        return "daemon"
    if "vbus.bench.worker" in cmdline:
        return "worker"
    return cmdline.split(" ", 1)[0].rsplit("/", 1)[-1]


def _short(frame: str) -> tuple[str, str]:
    """(function, function:line) with the file shortened to the package path."""
    match = _FRAME.match(frame)
    if match is None:
        return frame, frame
    path = match["file"]
    for marker in ("/site-packages/", "/vbus/"):
        if marker in path:
            path = ("vbus/" if marker == "/vbus/" else "") + path.split(marker, 1)[1]
            break
    func = f"{match['func']} ({path})"
    return func, f"{match['func']} ({path}:{match['line']})"


def summarize(path: Path, top: int = 15) -> str:
    self_lines: dict[str, Counter[str]] = defaultdict(Counter)
    inclusive: dict[str, Counter[str]] = defaultdict(Counter)
    totals: Counter[str] = Counter()
    for raw in path.read_text(errors="replace").splitlines():
        stack, _, count_text = raw.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        process = path.stem.rsplit("-", 1)[-1]  # one process per file: its role
        frames: list[str] = []
        for frame in stack.split(";"):
            match = _PROCESS.match(frame)
            if match is not None:
                process = f"{_role(match[2])} {match[1]}"
            else:
                frames.append(frame)
        if not frames:
            continue
        totals[process] += count
        self_lines[process][_short(frames[-1])[1]] += count
        for func in {_short(frame)[0] for frame in frames}:
            inclusive[process][func] += count
    out = [f"{path.name}"]
    for process, total in totals.most_common():
        out.append(f"  {process}: {total} samples")
        out.append("    self (where the samples ended):")
        for name, n in self_lines[process].most_common(top):
            out.append(f"      {100 * n / total:5.1f}%  {name}")
        out.append("    inclusive (on the stack):")
        for name, n in inclusive[process].most_common(top):
            out.append(f"      {100 * n / total:5.1f}%  {name}")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vbus.bench.profile", description=__doc__)
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args(argv)
    for path in args.files:
        sys.stdout.write(summarize(path, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
