"""A real Xen machine under QEMU, for tests of vbus's dom0 side.

``Build`` turns Debian's packages (the Xen hypervisor, the generic kernel, the
Xen tools, busybox) into boot artefacts, unpacked with ``dpkg-deb -x`` into a
cache keyed by the package versions (``$XDG_CACHE_HOME/vbus/xenlab``, else
``~/.cache/vbus/xenlab``); nothing is installed on the host.  ``XenLab``
boots Xen with a dom0 under QEMU TCG and runs shell scripts in that dom0.

The dom0 is a busybox initramfs.  Everything else it runs comes from the host
through read-only 9p shares mounted at the same paths as on the host: ``/usr``
(glibc, libgcc), the host's Python and virtualenv, this checkout, and the
unpacked Xen tools in the cache.  So ``python -c 'import vbus'`` in dom0 is the
host's interpreter importing the tree under test.  One read-write share, the
lab directory, carries the command channel: the host drops ``req/N.sh``, the
dom0 agent runs it under ``timeout`` and answers with ``out/N.out``,
``out/N.err`` and, last, ``out/N.rc``.  xenconsoled writes the domUs' consoles
into ``logs/`` of that share, and QEMU's serial port (Xen's and dom0's
console) goes to ``console.log`` beside it.

QEMU runs niced in its own session and dies with the process that started it
(``PR_SET_PDEATHSIG``); ``XenLab.close`` powers dom0 off and kills QEMU if it
does not leave in time, whatever state the machine is in.

``python -m vbus.xenlab build`` prepares the cache; ``python -m vbus.xenlab
shell`` boots the machine and reads scripts from stdin, for poking at it.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import ctypes
import fcntl
import gzip
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from vbus.errors import NotFound, NotSupported, TimedOut, VbusError
from vbus.log import get_logger

__all__ = [
    "BOOT_TIMEOUT",
    "Build",
    "LabError",
    "Result",
    "XenLab",
    "cache_dir",
    "missing_host_tools",
    "resolve_packages",
]

log = get_logger("vbus.xenlab")

# Bump when what `Build` makes from the same packages changes: it is part of the key.
RECIPE = "10"
XEN = "4.17"
KERNEL_META = "linux-image-amd64"
PACKAGES = (
    f"xen-hypervisor-{XEN}-amd64",
    f"xen-utils-{XEN}",
    "xen-utils-common",
    "xenstore-utils",
    "libxencall1",
    "libxendevicemodel1",
    "libxenevtchn1",
    "libxenforeignmemory1",
    "libxengnttab1",
    "libxenhypfs1",
    f"libxenmisc{XEN}",
    "libxenstore4",
    "libxentoollog1",
    "libxentoolcore1",
    "libyajl2",
    "busybox-static",
)
# dom0: the Xen device drivers vbus uses, xenfs, and 9p over virtio for the shares.
DOM0_MODULES = (
    "xen-evtchn",
    "xen-gntdev",
    "xen-gntalloc",
    "xen-privcmd",
    "xenfs",
    "virtio_pci",
    "9pnet_virtio",
    "9p",
    "tun",  # vbus tap
    "fuse",  # vbusd's admin tree
)
# In dom0's /modules but not loaded at boot: Linux's own netback, which would
# claim every vif vbusd is to serve; the bench loads it for its comparison.
DOM0_SPARE_MODULES = ("xen-netback",)
# QEMU's CPU for the lab ($VBUS_XENLAB_CPU overrides it, to try another):
# - without SMAP: with it QEMU 7.2's TCG faults the PV dom0's first iret;
# - without FSGSBASE: dom0's processes (vbusd, vbus tap) died of heap corruption
#   in some runs that destroy a domU mid-stream, and none did without it (nor
#   with a change of the xenstore client alone: docs/design.md 4.8).
QEMU_CPU = "max,-smap,-fsgsbase"
DOMU_MODULES = ("xen-netfront",)
HOST_TOOLS = ("apt-get", "apt-cache", "dpkg-deb", "qemu-system-x86_64")

BOOT_TIMEOUT = 300.0  # TCG on two shared cores: ~30 s when the machine is quiet
POWEROFF_TIMEOUT = 20.0
LAB_MOUNT = "/xenlab"  # where dom0 mounts the lab directory
DOM0_MEM = "768M"
QEMU_MEM = "1536"

PR_SET_PDEATHSIG = 1
DOMU_CMDLINE_MAX = 1000  # of Xen's 1024 for a PV guest's command line


class LabError(VbusError):
    """The Xen machine could not be built, booted or driven."""


@dataclass(frozen=True)
class Result:
    """What a dom0 script did."""

    rc: int
    out: str
    err: str

    def check(self, what: str = "script") -> str:
        if self.rc != 0:
            raise LabError(f"{what} exited {self.rc}: {self.err.strip() or self.out.strip()}")
        return self.out


def missing_host_tools() -> list[str]:
    """The host programs the lab needs and does not find on PATH."""
    return [tool for tool in HOST_TOOLS if shutil.which(tool) is None]


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "vbus" / "xenlab"


def _apt_show(packages: Sequence[str]) -> dict[str, dict[str, str]]:
    """Candidate stanzas of ``packages`` from apt's lists (``apt-cache show``)."""
    proc = subprocess.run(
        ["apt-cache", "show", "--no-all-versions", *packages],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise NotFound(f"apt-cache show: {proc.stderr.strip()}")
    stanzas: dict[str, dict[str, str]] = {}
    for block in proc.stdout.split("\n\n"):
        fields = dict(
            line.split(": ", 1) for line in block.splitlines() if ": " in line and line[0] != " "
        )
        if "Package" in fields:
            stanzas.setdefault(fields["Package"], fields)
    return stanzas


def resolve_packages() -> dict[str, str]:
    """Package name -> candidate version for everything the lab unpacks.

    The kernel is the one ``linux-image-amd64`` depends on: the generic
    flavour, since the cloud kernel has no dom0 support.
    """
    meta = _apt_show([KERNEL_META]).get(KERNEL_META)
    if meta is None:
        raise NotFound(f"apt knows no {KERNEL_META}")
    match = re.match(r"(linux-image-[0-9][^ ,]*-amd64)", meta.get("Depends", ""))
    if match is None:
        raise NotFound(f"{KERNEL_META} depends on no versioned kernel: {meta.get('Depends')!r}")
    wanted = [*PACKAGES, match.group(1)]
    stanzas = _apt_show(wanted)
    missing = [name for name in wanted if name not in stanzas]
    if missing:
        raise NotFound(f"apt knows no {', '.join(missing)}")
    return {name: stanzas[name]["Version"] for name in wanted}


# --- initramfs -----------------------------------------------------------------


class Cpio:
    """A newc cpio archive, the format the kernel unpacks as an initramfs."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._ino = 1
        self._dirs: set[str] = set()

    def _entry(self, name: str, mode: int, data: bytes = b"") -> None:
        encoded = name.encode() + b"\0"
        fields = (self._ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(encoded), 0)
        self._ino += 1
        header = b"070701" + b"".join(b"%08x" % f for f in fields)
        self._parts.append(header + encoded + b"\0" * (-(110 + len(encoded)) % 4))
        self._parts.append(data + b"\0" * (-len(data) % 4))

    def dir(self, name: str) -> None:
        parts = name.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            path = "/".join(parts[:i])
            if path not in self._dirs:
                self._dirs.add(path)
                self._entry(path, 0o040755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        name = name.strip("/")
        if "/" in name:
            self.dir(name.rsplit("/", 1)[0])
        self._entry(name, 0o100000 | mode, data)

    def symlink(self, name: str, target: str) -> None:
        name = name.strip("/")
        if "/" in name:
            self.dir(name.rsplit("/", 1)[0])
        self._entry(name, 0o120777, target.encode())

    def gzipped(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return gzip.compress(b"".join(self._parts), compresslevel=6)


def _module_index(root: Path) -> dict[str, Path | None]:
    """Module name (dashes as underscores) -> its .ko under ``lib/modules``, or
    None for one built into the kernel (``modules.builtin``: nothing to load)."""
    index: dict[str, Path | None] = {}
    for builtin in root.glob("lib/modules/*/modules.builtin"):
        for line in builtin.read_text().split():
            index[line.rsplit("/", 1)[-1].removesuffix(".ko").replace("-", "_")] = None
    for ko in root.glob("lib/modules/*/kernel/**/*.ko"):
        index[ko.name[:-3].replace("-", "_")] = ko
    return index


def _module_order(index: dict[str, Path | None], wanted: Iterable[str]) -> list[Path]:
    """``wanted`` and what they depend on (modinfo ``depends=``), dependencies first.

    The package carries no modules.dep, so the order comes from the modules.
    """
    order: list[Path] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        key = name.replace("-", "_")
        if key in seen:
            return
        seen.add(key)
        if key not in index:
            raise NotFound(f"no kernel module {name}")
        ko = index[key]
        if ko is None:
            return  # built in
        match = re.search(rb"(?:^|\0)depends=([^\0]*)\0", ko.read_bytes())
        for dep in match.group(1).decode().split(",") if match else []:
            if dep:
                visit(dep)
        order.append(ko)

    for name in wanted:
        visit(name)
    return order


DOM0_INIT = r"""#!/bin/busybox sh
# dom0 of the vbus Xen lab: mount, load the Xen drivers, mount the host shares,
# start the Xen daemons, then hand over to the agent on the lab share.
/bin/busybox --install -s /bin
export PATH=/bin
mkdir -p /proc /sys /dev /tmp /run /mnt
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts
mount -t devpts devpts /dev/pts  # xenconsoled gives each domU console a pty
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
for m in $(cat /modules/order); do insmod /modules/$m || echo "xenlab: insmod $m failed"; done
mount -t xenfs xenfs /proc/xen
mkdir -p LAB
mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 xenlab LAB || {
    echo "xenlab: FATAL: cannot mount the lab share"; poweroff -f; }
while read -r tag path; do
    mkdir -p "$path"
    mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144,ro "$tag" "$path" ||
        echo "xenlab: FATAL: cannot mount $tag at $path"
done < LAB/mounts
exec /bin/sh LAB/agent.sh > /dev/console 2>&1
""".replace("LAB", LAB_MOUNT)

# The host's /usr is mounted on dom0's: its programs find their loader and libraries.
DOM0_LINKS = {"lib": "usr/lib", "lib64": "usr/lib64"}

DOMU_INIT = r"""#!/bin/busybox sh
# A domU of the vbus Xen lab: netfront, a script from the kernel command line
# (xenlab=<base64>, see XenLab.domu_extra), and netfront's interrupt count.
/bin/busybox --install -s /bin
export PATH=/bin
mkdir -p /proc /sys /dev /tmp
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
echo "xenlab-domu: up"
for m in $(cat /modules/order); do insmod /modules/$m || echo "xenlab-domu: insmod $m failed"; done
echo "xenlab-domu: netfront loaded"
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        xenlab=*) echo "${arg#xenlab=}" | base64 -d > /tmp/run.sh ;;
    esac
done
if [ -s /tmp/run.sh ]; then
    # line by line as it comes (sed would hold its output until the script ends)
    (sh /tmp/run.sh 2>&1 | while IFS= read -r line; do echo "xenlab-domu: $line"; done
     echo "xenlab-domu: script done") &
fi
# Report netfront's interrupt count whenever it changes: dom0's test sees on
# this console that its event channel notifications arrive.
last=""
while :; do
    now=$(awk '/ eth0$/ { print $2 }' /proc/interrupts)  # one vcpu: one count
    [ -n "$now" ] && [ "$now" != "$last" ] && echo "xenlab-domu: eth0 interrupts $now" && last=$now
    sleep 1
done
"""


def _initramfs(
    busybox: Path,
    init: str,
    modules: Sequence[Path],
    links: dict[str, str] | None = None,
    spare: Sequence[Path] = (),
) -> bytes:
    """busybox, ``init``, ``modules`` (loaded at boot, in ``modules/order``) and
    ``spare`` modules (in ``/modules``, loaded only when asked for)."""
    archive = Cpio()
    for name in ("bin", "dev", "proc", "sys", "tmp", "run", "etc", "var", "modules"):
        archive.dir(name)
    for name, target in (links or {}).items():
        archive.symlink(name, target)
    archive.file("bin/busybox", busybox.read_bytes(), 0o755)
    archive.symlink("bin/sh", "busybox")
    archive.file("init", init.encode(), 0o755)
    archive.file("modules/order", "".join(f"{ko.name}\n" for ko in modules).encode())
    for ko in dict.fromkeys([*modules, *spare]):
        archive.file(f"modules/{ko.name}", ko.read_bytes())
    return archive.gzipped()


@dataclass(frozen=True)
class Build:
    """The boot artefacts made from one set of package versions."""

    dir: Path
    versions: dict[str, str]

    @property
    def xen(self) -> Path:  # the hypervisor, uncompressed: QEMU's -kernel loads it (multiboot)
        return self.dir / "xen.elf"

    @property
    def kernel(self) -> Path:  # the generic Debian kernel, for dom0 and domUs
        return self.dir / "vmlinuz"

    @property
    def dom0_initrd(self) -> Path:
        return self.dir / "dom0.cpio.gz"

    @property
    def domu_initrd(self) -> Path:
        return self.dir / "domu.cpio.gz"

    @property
    def tools(self) -> Path:  # the unpacked packages' tree (usr/ of the Xen tools)
        return self.dir / "root"

    @staticmethod
    def key(versions: dict[str, str]) -> str:
        text = RECIPE + "\n" + "".join(f"{k}={v}\n" for k, v in sorted(versions.items()))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @classmethod
    def ensure(cls, versions: dict[str, str] | None = None, cache: Path | None = None) -> Build:
        """The build for ``versions`` (apt's candidates by default), made if not cached.

        Without apt lists to ask, the newest complete build in the cache is used.
        """
        cache = cache or cache_dir()
        if versions is None:
            try:
                versions = resolve_packages()
            except NotFound:
                cached = cls.newest(cache)
                if cached is None:
                    raise
                return cached
        target = cache / cls.key(versions)
        if (target / "manifest.json").exists():
            return cls(target, versions)
        cache.mkdir(parents=True, exist_ok=True)
        with (cache / "lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # two test runs do not build the same thing twice
            if not (target / "manifest.json").exists():
                cls._make(target, versions)
        return cls(target, versions)

    @classmethod
    def newest(cls, cache: Path) -> Build | None:
        manifests = sorted(cache.glob("*/manifest.json"), key=lambda p: p.stat().st_mtime)
        if not manifests:
            return None
        data = json.loads(manifests[-1].read_text())
        return cls(manifests[-1].parent, dict(data["versions"]))

    @staticmethod
    def _make(target: Path, versions: dict[str, str]) -> None:
        started = time.monotonic()
        work = Path(tempfile.mkdtemp(prefix=".build-", dir=target.parent))
        try:
            debs = work / "debs"
            root = work / "root"
            debs.mkdir()
            root.mkdir()
            wanted = [f"{name}={version}" for name, version in sorted(versions.items())]
            proc = subprocess.run(
                ["apt-get", "download", "-q", *wanted],
                cwd=debs,
                capture_output=True,
                text=True,
                check=False,
            )
            if proc.returncode != 0:
                raise LabError(f"apt-get download: {proc.stderr.strip()}")
            for deb in sorted(debs.glob("*.deb")):
                subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
            kernel = next((root / "boot").glob("vmlinuz-*"))
            shutil.copyfile(kernel, work / "vmlinuz")
            with gzip.open(root / "boot" / f"xen-{XEN}-amd64.gz") as src:
                (work / "xen.elf").write_bytes(src.read())
            busybox = root / "bin" / "busybox"
            index = _module_index(root)
            (work / "dom0.cpio.gz").write_bytes(
                _initramfs(
                    busybox,
                    DOM0_INIT,
                    _module_order(index, DOM0_MODULES),
                    DOM0_LINKS,
                    _module_order(index, DOM0_SPARE_MODULES),
                )
            )
            (work / "domu.cpio.gz").write_bytes(
                _initramfs(busybox, DOMU_INIT, _module_order(index, DOMU_MODULES))
            )
            # What dom0 needs from the tree is usr/ (the tools, their libraries, the
            # hotplug scripts' helpers): the modules and the boot files are copied out.
            shutil.rmtree(debs)
            shutil.rmtree(root / "lib" / "modules")
            shutil.rmtree(root / "boot")
            manifest = {"versions": versions, "recipe": RECIPE, "kernel": kernel.name}
            (work / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
            if target.exists():
                shutil.rmtree(target)
            work.rename(target)
            # builds of other versions are of no further use: one build stays cached
            for old in target.parent.glob("*/manifest.json"):
                if old.parent != target:
                    shutil.rmtree(old.parent, ignore_errors=True)
        finally:
            if work.exists():
                shutil.rmtree(work, ignore_errors=True)
        log.info(
            "xenlab.built", dir=str(target), kernel=kernel.name, seconds=time.monotonic() - started
        )


# --- the machine ------------------------------------------------------------------

AGENT = r"""# The dom0 agent of the vbus Xen lab: start the Xen daemons, then run what the host drops.
LAB=@LAB@
XEN=@XEN@
export PATH=$XEN/usr/lib/xen-@XENVER@/bin:$XEN/usr/sbin:$XEN/usr/bin:/bin:/usr/sbin:/usr/bin
export LD_LIBRARY_PATH=$XEN/usr/lib/x86_64-linux-gnu:$XEN/usr/lib/xen-@XENVER@/lib/x86_64-linux-gnu
export HOME=/tmp TMPDIR=/tmp
ln -sfn /run /var/run
mkdir -p /run/xen /run/xenstored /var/lib/xen /var/lib/xenstored /var/log/xen /etc/xen $LAB/logs
printf 'autoballoon="off"\n' > /etc/xen/xl.conf
echo "xenlab: dom0 $(uname -r), shares mounted"
fatal() { echo "xenlab: FATAL: $*"; while :; do sleep 3600; done; }  # the host reads it
xenstored --pid-file /run/xenstored.pid || fatal "xenstored failed"
xen-init-dom0 || fatal "xen-init-dom0 failed"
xenconsoled --log=guest --log-dir=$LAB/logs || fatal "xenconsoled failed"
mkdir -p $LAB/req $LAB/run $LAB/out
echo "xenlab: agent ready"
echo ready > $LAB/ready
while :; do
    for f in $LAB/req/*.sh; do
        [ -e "$f" ] || continue
        id=${f##*/}
        id=${id%.sh}
        mv "$f" $LAB/run/$id.sh
        t=$(cat $LAB/run/$id.timeout 2>/dev/null || echo 60)
        timeout -s KILL "$t" sh $LAB/run/$id.sh > $LAB/out/$id.out 2> $LAB/out/$id.err < /dev/null
        echo $? > $LAB/out/$id.rc.tmp
        mv $LAB/out/$id.rc.tmp $LAB/out/$id.rc
    done
    sleep 0.1
done
"""


def _pdeathsig() -> None:
    """In QEMU's child before exec: die with the process that started it."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    os.nice(10)  # TCG is two busy host threads on a shared machine


def _covering(paths: Iterable[Path]) -> list[Path]:
    """The shortest list of directories containing every one of ``paths``."""
    out: list[Path] = []
    for path in sorted({p.resolve() for p in paths}, key=lambda p: len(p.parts)):
        if not any(path == top or top in path.parents for top in out):
            out.append(path)
    return out


class XenLab:
    """Xen + dom0 under QEMU TCG; scripts run in dom0 through the lab share.

    ``shares`` are host directories dom0 sees read-only at the same path;
    ``/usr``, the running Python's prefixes, ``checkout`` and the build
    (its kernel, initramfs and unpacked tools) are always shared.  Use it as
    a context manager: leaving it tears down.
    """

    def __init__(
        self,
        build: Build,
        workdir: Path,
        *,
        checkout: Path,
        shares: Iterable[Path] = (),
        boot_timeout: float = BOOT_TIMEOUT,
    ) -> None:
        self.build = build
        self.dir = workdir
        self.checkout = checkout.resolve()
        self.boot_timeout = boot_timeout
        self.interpreter = Path(sys.executable)
        self.shares = _covering(
            [
                Path("/usr"),
                Path(sys.prefix),
                Path(sys.base_prefix),
                self.interpreter.resolve().parent.parent,
                self.checkout,
                build.dir,
                *shares,
            ]
        )
        # past a script's timeout, how long to wait for the agent's answer (its own
        # `timeout` kills the script first; a dom0 that stopped answering does not)
        self.answer_grace = 30.0
        self.exit_status: int | None = None  # QEMU's, once it is gone
        self._qemu: subprocess.Popen[bytes] | None = None
        self._seq = 0
        self._answering = True  # false once the agent missed an answer: no more waiting on it

    @property
    def console_log(self) -> Path:  # Xen's and dom0's console (QEMU's serial port)
        return self.dir / "console.log"

    @property
    def logs(self) -> Path:  # the domUs' consoles, from xenconsoled
        return self.dir / "logs"

    def _qemu_argv(self) -> list[str]:
        for path in (self.build.xen, self.build.kernel, self.build.dom0_initrd, *self.shares):
            if "," in str(path) or " " in str(path):
                raise NotSupported(f"QEMU cannot take a path with a comma or space: {path}")
        argv = [
            "qemu-system-x86_64",
            "-accel",
            "tcg",
            "-cpu",
            os.environ.get("VBUS_XENLAB_CPU", QEMU_CPU),
            "-m",
            QEMU_MEM,
            "-smp",
            "2",
            "-nodefaults",
            "-display",
            "none",
            "-monitor",
            "none",
            "-serial",
            f"file:{self.console_log}",
            "-no-reboot",
            "-kernel",
            str(self.build.xen),
            "-append",
            f"console=com1 com1=115200 dom0_mem={DOM0_MEM},max:{DOM0_MEM} "
            "dom0_max_vcpus=1 noreboot",
            "-initrd",
            f"{self.build.kernel} console=hvc0 earlyprintk=xen,{self.build.dom0_initrd}",
            "-virtfs",
            f"local,path={self.dir},mount_tag=xenlab,security_model=none",
        ]
        for i, share in enumerate(self.shares):
            argv += [
                "-virtfs",
                f"local,path={share},mount_tag=host{i},security_model=none,readonly=on",
            ]
        return argv

    def start(self) -> None:
        """Boot, and return once the dom0 agent answers (else raise, torn down)."""
        for sub in ("req", "run", "out", "py", "logs"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        agent = (
            AGENT.replace("@LAB@", LAB_MOUNT)
            .replace("@XEN@", str(self.build.tools))
            .replace("@XENVER@", XEN)
        )
        (self.dir / "agent.sh").write_text(agent)
        (self.dir / "mounts").write_text(
            "".join(f"host{i} {share}\n" for i, share in enumerate(self.shares))
        )
        argv = self._qemu_argv()
        (self.dir / "qemu.argv").write_text(" ".join(argv) + "\n")
        started = time.monotonic()
        with (self.dir / "qemu.out").open("wb") as qemu_out:
            self._qemu = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=qemu_out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_pdeathsig,
            )
        log.info("xenlab.booting", pid=self._qemu.pid, dir=str(self.dir))
        try:
            self._wait_ready(started)
        except BaseException:
            self.close()
            raise
        log.info("xenlab.ready", seconds=round(time.monotonic() - started, 1))

    def _wait_ready(self, started: float) -> None:
        ready = self.dir / "ready"
        while not ready.exists():
            self._check_alive("booting")
            text = self._console_text()
            for fatal in ("Panic on CPU", "Kernel panic", "xenlab: FATAL"):
                if fatal in text:
                    raise LabError(f"boot failed ({fatal!r}); console:\n{self.console_tail()}")
            if time.monotonic() - started > self.boot_timeout:
                raise TimedOut(
                    f"dom0 not ready after {self.boot_timeout:.0f} s; console:\n"
                    + self.console_tail()
                )
            time.sleep(0.25)

    def _console_text(self) -> str:
        try:
            return self.console_log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def console_tail(self, lines: int = 40) -> str:
        text = self._console_text().replace("\r", "")
        return "\n".join([line for line in text.splitlines() if line][-lines:])

    def _check_alive(self, doing: str) -> None:
        if self._qemu is None:
            raise LabError("the lab is not running")
        rc = self._qemu.poll()
        if rc is not None:
            qemu_out = (self.dir / "qemu.out").read_text(errors="replace").strip()
            raise LabError(
                f"QEMU exited {rc} while {doing}: {qemu_out}\nconsole:\n{self.console_tail()}"
            )

    def run(self, script: str, timeout: float = 60.0, *, grace: float | None = None) -> Result:
        """Run ``script`` with dom0's sh; killed after ``timeout`` seconds (rc 137).

        ``TimedOut`` if no answer comes ``grace`` (default ``answer_grace``)
        seconds after that.
        """
        self._check_alive("starting a script")
        self._seq += 1
        name = f"{self._seq:05d}"
        # the timeout first: the agent reads it as soon as the script appears
        (self.dir / "run" / f"{name}.timeout").write_text(f"{max(1, int(timeout))}\n")
        tmp = self.dir / "req" / f"{name}.tmp"
        tmp.write_text(script)
        tmp.rename(self.dir / "req" / f"{name}.sh")
        out = self.dir / "out"
        rc_file = out / f"{name}.rc"
        deadline = time.monotonic() + timeout + (self.answer_grace if grace is None else grace)
        while not rc_file.exists():
            self._check_alive(f"running script {name}")
            if time.monotonic() > deadline:
                self._answering = False
                raise TimedOut(f"dom0 script {name} gave no answer in {timeout:.0f} s")
            time.sleep(0.05)
        result = Result(
            rc=int(rc_file.read_text().strip() or "-1"),
            out=(out / f"{name}.out").read_text(errors="replace"),
            err=(out / f"{name}.err").read_text(errors="replace"),
        )
        log.debug("xenlab.ran", script=name, rc=result.rc)
        return result

    def check(self, script: str, timeout: float = 60.0) -> str:
        """``run`` that raises ``LabError`` unless the script exits 0; its stdout."""
        return self.run(script, timeout).check(script.strip().splitlines()[0][:60])

    def python(self, code: str, timeout: float = 60.0) -> Result:
        """``code`` run by the host's interpreter in dom0, from the checkout."""
        path = self.dir / "py" / f"{self._seq + 1:05d}.py"
        path.write_text(code)
        # PYTHONPATH: a script's own directory heads sys.path, the checkout must come next
        script = f"cd {self.checkout} && PYTHONPATH={self.checkout} exec {self.interpreter} "
        return self.run(f"{script}{self.lab_path(path)}\n", timeout)

    @staticmethod
    def domu_extra(script: str = "") -> str:
        """A domU's kernel command line (xl's ``extra``) that runs ``script``
        in the lab's domU init once netfront is loaded; its output goes to the
        domU's console, each line after ``xenlab-domu: ``."""
        extra = "console=hvc0"
        if script:
            extra += " xenlab=" + base64.b64encode(script.encode()).decode()
        if len(extra) > DOMU_CMDLINE_MAX:
            raise LabError(f"a domU script of {len(extra)} bytes on its command line is too long")
        return extra

    def lab_path(self, host_path: Path) -> str:
        """Where dom0 sees a file of the lab directory."""
        return f"{LAB_MOUNT}/{host_path.relative_to(self.dir)}"

    def collect(self) -> None:
        """Save Xen's ring buffer and dom0's kernel log into the lab directory."""
        with contextlib.suppress(VbusError, OSError):
            self.run(
                f"xl dmesg > {LAB_MOUNT}/xen-dmesg.log 2>&1; dmesg > {LAB_MOUNT}/dom0-dmesg.log",
                timeout=15,
                grace=5,
            )

    def close(self) -> None:
        """Power off dom0 (its domUs die with Xen), and make sure QEMU is gone."""
        qemu = self._qemu
        if qemu is None:
            return
        try:
            if qemu.poll() is None and (self.dir / "ready").exists():
                if self._answering:
                    self.collect()
                req = self.dir / "req"
                (req / "poweroff.tmp").write_text("poweroff -f\n")
                (req / "poweroff.tmp").rename(req / "poweroff.sh")
                with contextlib.suppress(subprocess.TimeoutExpired):
                    qemu.wait(POWEROFF_TIMEOUT)
        finally:
            self._qemu = None
            if qemu.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(qemu.pid, signal.SIGKILL)
                qemu.wait()
            self.exit_status = qemu.returncode
            log.info("xenlab.stopped", rc=qemu.returncode, dir=str(self.dir))

    def __enter__(self) -> XenLab:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vbus.xenlab", description=__doc__)
    parser.add_argument("command", choices=["build", "shell"])
    parser.add_argument("--dir", type=Path, help="lab directory (default: a new temporary one)")
    args = parser.parse_args(argv)
    build = Build.ensure()
    if args.command == "build":
        print(build.dir)
        return 0
    workdir = args.dir or Path(tempfile.mkdtemp(prefix="xenlab-"))
    with XenLab(build, workdir, checkout=Path.cwd()) as lab:
        print(f"dom0 ready; lab directory {workdir}; one script per line, EOF ends")
        for line in sys.stdin:
            result = lab.run(line, timeout=300)
            sys.stdout.write(result.out)
            sys.stderr.write(result.err)
            print(f"[rc {result.rc}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
