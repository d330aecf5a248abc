"""The guest firmware of ``vbus vm``: freestanding C in ``vbus/vm/firmware``,
built with gcc on first use into a cache directory keyed by a hash of the
sources, the flags and the compiler.

Everything is compiled for CPL0's instruction emulator (docs/design.md,
"The VMM and its firmware"): ``-mgeneral-regs-only -mno-red-zone
-fno-builtin``, no CET landing pads, no stack protector.  After linking,
the object code is checked for instructions the emulator cannot run (SSE,
x87, popcnt/lzcnt/tzcnt, int3/int $n): a compiler that emits them anyway
is an error here, not a guest that dies on its first interrupt.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from vbus.errors import NotFound, NotSupported

__all__ = ["CFLAGS", "SOURCES", "FirmwareError", "build", "cache_dir", "source_dir"]

SOURCES = ("start.S", "kernel.c", "lib.c", "driver.c")
HEADERS = ("fw.h", "fw.ld")
CFLAGS = (
    "-O2",
    "-std=gnu11",
    "-ffreestanding",
    "-fno-builtin",
    "-nostdlib",
    "-mgeneral-regs-only",
    "-mno-red-zone",
    "-fno-pic",
    "-fno-pie",
    "-no-pie",
    "-static",
    "-fno-stack-protector",
    "-fcf-protection=none",
    "-fno-asynchronous-unwind-tables",
    "-fno-tree-loop-distribute-patterns",
    "-mcmodel=small",
    "-Wall",
    "-Wl,--build-id=none",
    "-Wl,-z,noexecstack",
    "-Wl,--no-warn-rwx-segments",
)
# What the CPL0 emulator cannot run (docs/design.md: the platform's KVM).
_FORBIDDEN_OPS = re.compile(
    r"^(?:f[a-z0-9]+|popcnt|lzcnt|tzcnt|int3|int|xsave\w*|xgetbv|cmpxchg16b|rdtscp)$"
)
_SSE_REG = re.compile(r"%[xyz]mm\d")
_INSN = re.compile(r"^\s*[0-9a-f]+:\t(\S+)\s*(.*)$")


class FirmwareError(NotSupported):
    """The firmware cannot be built here (gcc missing, a compile error)."""


def source_dir() -> Path:
    return Path(__file__).with_name("firmware")


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "vbus"


def _compiler() -> str:
    gcc = shutil.which(os.environ.get("CC", "gcc"))
    if gcc is None:
        raise FirmwareError("gcc is missing: the guest firmware is built with it (apt install gcc)")
    return gcc


def _key(gcc: str, src: Path) -> str:
    digest = hashlib.sha256()
    version = subprocess.run([gcc, "--version"], capture_output=True, text=True, check=False)
    digest.update(version.stdout.encode())
    digest.update(" ".join(CFLAGS).encode())
    for name in (*SOURCES, *HEADERS):
        digest.update(name.encode() + b"\0" + (src / name).read_bytes())
    return digest.hexdigest()[:20]


def build(cache: Path | None = None) -> Path:
    """The firmware image (a flat binary loaded at 1 MiB), built if it is not cached."""
    src = source_dir()
    missing = [name for name in (*SOURCES, *HEADERS) if not (src / name).is_file()]
    if missing:
        raise NotFound(f"firmware sources missing from {src}: {', '.join(missing)}")
    gcc = _compiler()
    cache = cache or cache_dir()
    image = cache / f"vbus-vm-{_key(gcc, src)}.bin"
    if image.is_file():
        return image
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="vbus-fw-") as tmp:
        elf = Path(tmp) / "fw.elf"
        cmd = [gcc, *CFLAGS, "-T", str(src / "fw.ld"), "-o", str(elf)]
        cmd += [str(src / name) for name in SOURCES]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise FirmwareError(f"the firmware does not compile: {done.stderr.strip()[-2000:]}")
        _check_code(elf)
        objcopy = shutil.which("objcopy")
        if objcopy is None:
            raise FirmwareError("objcopy (binutils) is missing: it makes the firmware image")
        flat = Path(tmp) / "fw.bin"
        subprocess.run([objcopy, "-O", "binary", str(elf), str(flat)], check=True)
        # Atomic: another vbus vm may be building the same image.
        staged = cache / f".{image.name}.{os.getpid()}"
        shutil.copyfile(flat, staged)
        os.replace(staged, image)
    return image


def _check_code(elf: Path) -> None:
    objdump = shutil.which("objdump")
    if objdump is None:
        return  # the check is a safety net, not a build step
    out = subprocess.run(
        [objdump, "-d", "--no-show-raw-insn", str(elf)], capture_output=True, text=True, check=True
    ).stdout
    bad = []
    for line in out.splitlines():
        insn = _INSN.match(line)
        if insn and (_FORBIDDEN_OPS.match(insn.group(1)) or _SSE_REG.search(insn.group(2))):
            bad.append(line.strip())
    if bad:
        raise FirmwareError(
            "the compiler emitted instructions the CPL0 emulator cannot run: " + "; ".join(bad[:5])
        )
