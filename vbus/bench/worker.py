"""One measurement in a fresh process: ``python -m vbus.bench.worker < request.json``.

The request names a subject, a variant, the parameters and a result file;
the figures (or why there are none) are written there as JSON.  The runner
starts one worker per variant and round, so no run inherits another's state.
"""

from __future__ import annotations

import json
import math
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from vbus.bench.subject import Unavailable, load

__all__ = ["main"]


def measure(request: dict[str, Any]) -> dict[str, Any]:
    started = time.perf_counter()
    try:
        subject = load(request["subject"])
        figures = subject.run(request["variant"], request["params"])
    except Unavailable as exc:
        return {"status": "unavailable", "reason": str(exc)}
    except Exception as exc:
        return {
            "status": "error",
            "reason": f"{type(exc).__name__}: {exc}",
            "traceback": traceback.format_exc(),
        }
    return {
        "status": "ok",
        # A figure that could not be measured is left out (JSON has no NaN).
        "figures": {key: float(v) for key, v in figures.items() if math.isfinite(v)},
        "wall_s": round(time.perf_counter() - started, 3),
    }


def main() -> int:
    request = json.loads(sys.stdin.read())
    result = measure(request)
    Path(request["result"]).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
