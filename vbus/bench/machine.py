"""What the figures were measured on: CPU, cores, kernel, Python, loop, libraries, load."""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

from vbus import __version__

__all__ = ["describe_machine", "summary_line"]

_LIBRARIES = ("uvloop", "pyzmq", "iceoryx2", "atomicshm", "matplotlib")


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _mem_total_kib() -> int | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1])
    return None


def _os_release() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip().strip('"')
    return ""


def _git_commit() -> str | None:
    """The source tree's commit, read-only (None outside a git checkout)."""
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        return f"{head}{'+dirty' if dirty else ''}" if head else None
    return None


def describe_machine(loop: str) -> dict[str, Any]:
    versions: dict[str, str | None] = {}
    for name in _LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    uname = platform.uname()
    return {
        "cpu_model": _cpu_model(),
        "cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "mem_total_kib": _mem_total_kib(),
        "kernel": f"{uname.system} {uname.release}",
        "kernel_version": uname.version,
        "os": _os_release(),
        "arch": uname.machine,
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "python_executable": sys.executable,
        "loop": loop,
        "libraries": versions,
        "vbus": __version__,
        "commit": _git_commit(),
        "loadavg_start": list(os.getloadavg()),
    }


def summary_line(machine: dict[str, Any]) -> str:
    libs = machine["libraries"]
    uvloop = f" {libs['uvloop']}" if machine["loop"] == "uvloop" and libs.get("uvloop") else ""
    load = ", ".join(f"{x:.2f}" for x in machine["loadavg_start"])
    return (
        f"{machine['cpus']} x {machine['cpu_model']}, {machine['kernel']}, "
        f"{machine['python']}, loop {machine['loop']}{uvloop}, load {load} at start"
    )
