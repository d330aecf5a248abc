"""Where things live by default: the run directory and the socket in it."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["default_run_dir", "default_socket_path"]


def default_run_dir() -> Path:
    """``/run/vbus`` as root, else ``$XDG_RUNTIME_DIR/vbus`` (``/tmp/vbus-UID/vbus`` without it)."""
    if os.geteuid() == 0:
        return Path("/run/vbus")
    runtime = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/vbus-{os.geteuid()}"
    return Path(runtime) / "vbus"


def default_socket_path() -> Path:
    """``$VBUS_SOCKET``, else ``vbus.sock`` in the default run directory."""
    env = os.environ.get("VBUS_SOCKET")
    if env:
        return Path(env)
    return default_run_dir() / "vbus.sock"
