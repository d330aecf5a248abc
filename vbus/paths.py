"""Where things live by default: the run directory, the socket in it, and the
sockets a client looks for.

As root the run directory is ``/run/vbus``.  Otherwise it is
``$XDG_RUNTIME_DIR/vbus``, or ``/tmp/vbus-UID/vbus`` without that variable;
either base must be the user's own private directory (the rules of
``XDG_RUNTIME_DIR``), since whoever can write there could put a socket of
their own in the daemon's place.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from pathlib import Path

from vbus.errors import Denied

__all__ = [
    "SYSTEM_RUN_DIR",
    "check_private_dir",
    "default_run_dir",
    "default_socket_path",
    "prepare_run_dir",
    "socket_candidates",
]

SYSTEM_RUN_DIR = Path("/run/vbus")


def _runtime_base(uid: int, env: Mapping[str, str]) -> tuple[Path, bool]:
    """The base directory of a non-root run directory, and whether it is the
    ``/tmp`` fallback (which the daemon creates itself)."""
    runtime = env.get("XDG_RUNTIME_DIR")
    if runtime:
        return Path(runtime), False
    return Path(f"/tmp/vbus-{uid}"), True


def default_run_dir(uid: int | None = None, env: Mapping[str, str] | None = None) -> Path:
    """``/run/vbus`` as root, else ``$XDG_RUNTIME_DIR/vbus`` (``/tmp/vbus-UID/vbus`` without it)."""
    uid = os.geteuid() if uid is None else uid
    if uid == 0:
        return SYSTEM_RUN_DIR
    base, _ = _runtime_base(uid, os.environ if env is None else env)
    return base / "vbus"


def default_socket_path() -> Path:
    """``$VBUS_SOCKET``, else ``vbus.sock`` in the default run directory."""
    env = os.environ.get("VBUS_SOCKET")
    if env:
        return Path(env)
    return default_run_dir() / "vbus.sock"


def socket_candidates(uid: int | None = None, env: Mapping[str, str] | None = None) -> list[Path]:
    """Where a client looks for vbusd, in order: ``$VBUS_SOCKET`` alone if it
    is set; else the socket of a daemon of the caller's own uid, then the
    system daemon's (``/run/vbus/vbus.sock``)."""
    env = os.environ if env is None else env
    explicit = env.get("VBUS_SOCKET")
    if explicit:
        return [Path(explicit)]
    own = default_run_dir(uid, env) / "vbus.sock"
    system = SYSTEM_RUN_DIR / "vbus.sock"
    return [own] if own == system else [own, system]


def check_private_dir(path: Path, uid: int, *, follow: bool = True) -> None:
    """``Denied`` unless ``path`` is a directory owned by ``uid`` that neither
    its group nor others may write."""
    try:
        st = os.stat(path) if follow else os.lstat(path)
    except OSError as exc:
        raise Denied(f"cannot use {path}: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise Denied(f"{path} is not a directory")
    if st.st_uid != uid:
        raise Denied(
            f"{path} belongs to uid {st.st_uid}, not to the daemon's uid {uid}; "
            "remove it or choose another with --run-dir"
        )
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise Denied(
            f"{path} is writable by others (mode {stat.S_IMODE(st.st_mode):04o}); "
            f"chmod go-w {path} or choose another with --run-dir"
        )


def prepare_run_dir(
    run_dir: Path, *, explicit: bool, uid: int | None = None, env: Mapping[str, str] | None = None
) -> None:
    """Create the daemon's run directory and check that it is private to it.

    For the default of a non-root daemon, its base (``$XDG_RUNTIME_DIR``, or
    ``/tmp/vbus-UID``, created 0700 when missing) is checked too."""
    uid = os.geteuid() if uid is None else uid
    env = os.environ if env is None else env
    if not explicit and uid != 0:
        base, fallback = _runtime_base(uid, env)
        if fallback:
            try:
                base.mkdir(mode=0o700)
            except FileExistsError:
                pass
            except OSError as exc:
                raise Denied(f"cannot create {base}: {exc.strerror}") from None
        # In /tmp anybody may have made the directory, or a link in its place.
        check_private_dir(base, uid, follow=not fallback)
    try:
        run_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
    except OSError as exc:
        raise Denied(f"cannot create run directory {run_dir}: {exc.strerror}") from None
    check_private_dir(run_dir, uid)
