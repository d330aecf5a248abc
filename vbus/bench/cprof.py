"""Run a Python module under cProfile: ``python -m vbus.bench.cprof OUT PYTHON -m MODULE ARGS...``.

A wrapper for ``BenchDaemon(wrap=...)`` and the venet subject's ``vbus tap``
processes: the command after OUT is the one that would have run (its
interpreter is this one), and the profile goes to OUT (pstats format) when
the module returns, also after SIGTERM where the module handles it.
``python -m pstats OUT`` reads it.
"""

from __future__ import annotations

import cProfile
import runpy
import sys

__all__ = ["main"]


def main(argv: list[str]) -> int:
    if len(argv) < 4 or argv[2] != "-m":
        print("usage: python -m vbus.bench.cprof OUT PYTHON -m MODULE [ARGS...]", file=sys.stderr)
        return 2
    out, module, args = argv[0], argv[3], argv[4:]
    sys.argv = [module, *args]
    profiler = cProfile.Profile()
    code = 0
    profiler.enable()
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        profiler.disable()
        profiler.dump_stats(out)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
