"""A stock Linux guest for the QEMU tests and the bench, built from Debian packages, cached.

``build(cache)`` downloads (``apt-get download``) the versioned kernel that
``linux-image-cloud-amd64`` depends on and ``busybox-static``, unpacks them
with ``dpkg-deb -x`` (nothing is installed), and writes an initramfs: busybox,
the virtio-net modules, and an ``/init`` that loads them, runs the shell
script given base64-encoded on the kernel command line (``vbus.script=``),
prints ``VBUS-EXIT <status>`` and powers off.  ``qemu_command`` is the
vhost-user command line of PLATFORM.md.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Guest", "build", "default_cache", "qemu_command"]

MODULES = (  # dependency order
    "kernel/drivers/virtio/virtio_ring.ko",
    "kernel/drivers/virtio/virtio.ko",
    "kernel/drivers/virtio/virtio_pci_modern_dev.ko",
    "kernel/drivers/virtio/virtio_pci_legacy_dev.ko",
    "kernel/drivers/virtio/virtio_pci.ko",
    "kernel/net/core/failover.ko",
    "kernel/drivers/net/net_failover.ko",
    "kernel/drivers/net/virtio_net.ko",
)

INIT = """#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /tmp
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
for m in {modules}; do insmod /lib/modules/$m || echo "VBUS-INSMOD-FAILED $m"; done
for word in $(cat /proc/cmdline); do
  case "$word" in vbus.script=*) echo "${{word#vbus.script=}}" | base64 -d > /script.sh ;; esac
done
sh /script.sh
echo "VBUS-EXIT $?"
poweroff -f
"""


@dataclass(frozen=True)
class Guest:
    kernel: Path
    initrd: Path


def _run(*cmd: str, cwd: Path | None = None) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=cwd).stdout


def build(cache: Path) -> Guest:
    """The guest's kernel and initramfs, from ``cache`` when they are there."""
    cache.mkdir(parents=True, exist_ok=True)
    depends = _run("apt-cache", "depends", "linux-image-cloud-amd64")
    versioned = next(
        line.split()[1]
        for line in depends.splitlines()
        if line.strip().startswith("Depends: linux-image-")
    )
    for package in (versioned, "busybox-static"):
        if not list(cache.glob(f"{package}_*.deb")):
            _run("apt-get", "download", package, cwd=cache)
    release = versioned.removeprefix("linux-image-")
    kernel_dir = cache / f"kernel-{release}"
    if not (kernel_dir / "boot").exists():
        shutil.rmtree(kernel_dir, ignore_errors=True)
        (deb,) = cache.glob(f"{versioned}_*.deb")
        _run("dpkg-deb", "-x", str(deb), str(kernel_dir))
    busybox_dir = cache / "busybox"
    if not (busybox_dir / "bin" / "busybox").exists():
        (deb,) = cache.glob("busybox-static_*.deb")
        _run("dpkg-deb", "-x", str(deb), str(busybox_dir))
    (vmlinuz,) = (kernel_dir / "boot").glob("vmlinuz-*")
    recipe = hashlib.sha256((INIT + " ".join(MODULES)).encode()).hexdigest()[:12]
    initrd = cache / f"initrd-{release}-{recipe}.gz"
    if not initrd.exists():
        modules = kernel_dir / "lib" / "modules" / release
        files: list[tuple[str, bytes, int]] = [
            ("bin/busybox", (busybox_dir / "bin" / "busybox").read_bytes(), 0o755),
            ("init", INIT.format(modules=" ".join(Path(m).name for m in MODULES)).encode(), 0o755),
        ]
        files += [
            (f"lib/modules/{Path(m).name}", (modules / m).read_bytes(), 0o644) for m in MODULES
        ]
        partial = initrd.with_suffix(".tmp")
        partial.write_bytes(gzip.compress(_cpio(files), 6))
        os.replace(partial, initrd)
    return Guest(vmlinuz, initrd)


def _cpio(files: list[tuple[str, bytes, int]]) -> bytes:
    """A newc archive: the directories, then ``files`` (path, data, mode)."""
    out = bytearray()
    ino = 1
    dirs = sorted({str(parent) for p, _d, _m in files for parent in Path(p).parents} - {"."})

    def entry(name: str, data: bytes, mode: int) -> None:
        nonlocal ino
        fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name) + 1, 0)
        out.extend(b"070701" + b"".join(b"%08X" % f for f in fields))
        out.extend(name.encode() + b"\0")
        out.extend(b"\0" * (-len(out) % 4))
        out.extend(data)
        out.extend(b"\0" * (-len(out) % 4))
        ino += 1

    for d in dirs:
        entry(d, b"", 0o040755)
    for path, data, mode in files:
        entry(path, data, 0o100000 | mode)
    entry("TRAILER!!!", b"", 0)
    return bytes(out)


def default_cache() -> Path:
    """``$VBUS_GUEST_CACHE``, else ``~/.cache/vbus/guest``."""
    return Path(os.environ.get("VBUS_GUEST_CACHE", Path.home() / ".cache" / "vbus" / "guest"))


def qemu_command(
    guest: Guest,
    socket: str | None,
    script: str,
    mac: str,
    *,
    mem: str = "256M",
    netdev: str | None = None,
    device: str = "",
    reconnect: int = 0,
) -> list[str]:
    """QEMU under TCG with a virtio-net-pci device on a vhost-user ``socket``
    (or on ``netdev``, e.g. ``tap,id=n0,...``); ``device`` adds properties;
    ``reconnect`` (seconds) has QEMU connect again when the socket goes."""
    encoded = base64.b64encode(script.encode()).decode()
    accel = "tcg"
    if netdev is None:
        netdev = "vhost-user,id=n0,chardev=c0"
    again = f",reconnect={reconnect}" if reconnect else ""
    chardev = ["-chardev", f"socket,id=c0,path={socket}{again}"] if socket is not None else []
    return [
        "qemu-system-x86_64",
        "-accel", accel,
        "-cpu", "max",
        "-m", mem,
        "-smp", "1",
        "-kernel", str(guest.kernel),
        "-initrd", str(guest.initrd),
        "-append", f"console=ttyS0 quiet panic=-1 vbus.script={encoded}",
        "-nographic", "-no-reboot", "-nodefaults", "-serial", "stdio",
        "-object", f"memory-backend-memfd,id=mem,size={mem},share=on",
        "-numa", "node,memdev=mem",
        *chardev,
        "-netdev", netdev,
        "-device", f"virtio-net-pci,netdev=n0,mac={mac},vectors=0{device}",
    ]  # fmt: skip
