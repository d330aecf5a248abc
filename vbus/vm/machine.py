"""The mini VMM of ``vbus vm``: one KVM guest with one vcpu, its RAM a
sealed memfd, doorbells bound with KVM_IOEVENTFD, interrupts with KVM_IRQFD,
and the firmware of ``vbus/vm/firmware`` (docs/design.md, "The VMM and its
firmware").

The guest starts in 64-bit long mode at CPL0 (page tables identity-mapping
the first GiB with 2 MiB pages, all user-accessible), with the in-kernel
irqchip (PIC, IOAPIC, LAPIC).  The VMM writes a boot information page the
firmware reads (mode, device, message count, address) and writes its
results into.  Ports that exit to the VMM: a console (one line per write),
the final status, and the data-phase markers.  Every exit to userspace is
counted by reason (``io`` split by port), and separately inside the data
phase, so a run shows whether doorbells and interrupts stayed in the kernel.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import mmap
import os
import signal
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from vbus.errors import Denied, Invalid, NotFound, NotSupported
from vbus.memory import REQUIRED_SEALS
from vbus.vm import kvm

__all__ = [
    "BI",
    "BRIDGE_GPA",
    "DOORBELL_PORT",
    "Machine",
    "MachineConfig",
    "RunResult",
    "start_vcpu_thread",
]

MiB = 1 << 20
BOOTINFO_GPA = 0x1000
BRIDGE_GPA = 0x2000
PML4_GPA, PDPT_GPA, PD_GPA = 0x8000, 0x9000, 0xA000
FIRMWARE_GPA = 0x100000
MIN_RAM = 32 * MiB
MAX_RAM = 1024 * MiB  # what the page tables map
PORT_PUTS, PORT_EXIT, PORT_MARK = 0x500, 0x504, 0x508
DOORBELL_PORT = 0x5000  # doorbell i: a 16-bit write to DOORBELL_PORT + 2 * i
IRQ_LINE = 3  # PIC line (and GSI) of interrupt 0; interrupt i is IRQ_LINE + i
MAX_IRQS = 8 - IRQ_LINE
MAX_DOORBELLS = 16


class BI:
    """Word indexes of the boot information page (vbus/vm/firmware/fw.h)."""

    MAGIC, MODE, RAM, MESSAGES, NDOORBELLS, NIRQS, MITIGATION = 0, 1, 2, 3, 4, 5, 6
    IP, PREFIX, MSG_SIZE, BATCH, IRQ_LINE, SECONDS = 7, 8, 9, 10, 11, 12
    DEVICE = 16 * 8  # byte offset
    STATUS, SENT, RECEIVED, BAD, DOORBELLS, IRQS, WAITS = 32, 33, 34, 35, 36, 37, 38
    ARP, ICMP, RX_FRAMES, TX_FRAMES, DROPPED = 39, 40, 41, 42, 43
    IRQ_TOTAL_AT, IRQ_COUNT_AT = 44, 45
    IRQ0 = 48
    MESSAGE = 64 * 8  # byte offset, 256 bytes


MAGIC = 0x4D564256  # "VBVM"
MODES = {"echo": 1, "venet": 2}

# Guest statuses (PORT_EXIT)
ST_OK, ST_FAILED, ST_NO_DEVICE, ST_FAULTED, ST_EXCEPTION = 0, 1, 3, 4, 0x100


@dataclass(frozen=True, slots=True)
class MachineConfig:
    memory: int = 64 * MiB
    mode: str = "echo"
    device: str = "echo0"
    messages: int = 100000
    msg_size: int = 64
    batch: int = 64
    mitigation: bool = True
    ip: int = 0
    prefix: int = 24
    seconds: int = 0
    ndoorbells: int = 2
    nirqs: int = 2
    trap_doorbells: bool = False  # doorbells exit to the VMM, which signals the eventfd


@dataclass(slots=True)
class RunResult:
    status: int | None = None  # the guest's PORT_EXIT, None if it never reported
    error: str = ""  # why the vcpu stopped without a status
    exits: Counter[str] = field(default_factory=Counter)
    data_exits: Counter[str] = field(default_factory=Counter)
    data_seconds: float = 0.0
    console: list[str] = field(default_factory=list)


def _eventfd() -> int:
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


class Machine:
    """A VM, its RAM and its vcpu, ready to run the firmware ``image``."""

    def __init__(self, config: MachineConfig, image: bytes) -> None:
        if not MIN_RAM <= config.memory <= MAX_RAM or config.memory % (2 * MiB):
            raise Invalid(
                f"guest memory must be a multiple of 2 MiB in {MIN_RAM >> 20}..{MAX_RAM >> 20} MiB"
            )
        if not 1 <= config.nirqs <= MAX_IRQS or not 1 <= config.ndoorbells <= MAX_DOORBELLS:
            raise Invalid("too many doorbells or interrupts for the mini VMM")
        self.config = config
        self.result = RunResult()  # filled by run(), readable while it runs
        self.thread: threading.Thread | None = None
        self.fds: list[int] = []
        self._closed = False
        try:
            self.kvm = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise NotFound("no /dev/kvm: this machine offers no KVM") from None
        except PermissionError:
            raise Denied("cannot open /dev/kvm: permission denied (join the kvm group)") from None
        self.fds.append(self.kvm)
        try:
            self._create(image)
        except BaseException:
            self.close()
            raise

    # --- construction --------------------------------------------------------------------
    def _create(self, image: bytes) -> None:
        cfg = self.config
        version = kvm.ioctl(self.kvm, kvm.KVM_GET_API_VERSION, what="KVM_GET_API_VERSION")
        if version != kvm.KVM_API_VERSION:
            raise NotSupported(f"KVM API version {version}, not {kvm.KVM_API_VERSION}")
        for cap, name in (
            (kvm.KVM_CAP_IRQCHIP, "IRQCHIP"),
            (kvm.KVM_CAP_IOEVENTFD, "IOEVENTFD"),
            (kvm.KVM_CAP_IRQFD, "IRQFD"),
            (kvm.KVM_CAP_USER_MEMORY, "USER_MEMORY"),
        ):
            if kvm.ioctl(self.kvm, kvm.KVM_CHECK_EXTENSION, cap, what="KVM_CHECK_EXTENSION") <= 0:
                raise NotSupported(f"this KVM lacks KVM_CAP_{name}")
        self.vm = kvm.ioctl(self.kvm, kvm.KVM_CREATE_VM, 0, what="KVM_CREATE_VM")
        self.fds.append(self.vm)
        try:  # VMX needs it below 4 GiB; other implementations ignore or refuse it
            kvm.ioctl(self.vm, kvm.KVM_SET_TSS_ADDR, 0xFFFBD000, what="KVM_SET_TSS_ADDR")
        except kvm.KvmError:
            pass
        kvm.ioctl(self.vm, kvm.KVM_CREATE_IRQCHIP, 0, what="KVM_CREATE_IRQCHIP")

        # Guest RAM: one memfd sealed against shrinking and growing (vbusd checks).
        self.ram_fd = os.memfd_create("vbus-vm-ram", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        self.fds.append(self.ram_fd)
        os.ftruncate(self.ram_fd, cfg.memory)
        fcntl.fcntl(self.ram_fd, fcntl.F_ADD_SEALS, REQUIRED_SEALS | fcntl.F_SEAL_SEAL)
        self.ram = mmap.mmap(self.ram_fd, cfg.memory, mmap.MAP_SHARED)
        self._anchor = ctypes.c_char.from_buffer(self.ram)  # the mapping's address, kept
        region = kvm.UserspaceMemoryRegion(
            slot=0,
            flags=0,
            guest_phys_addr=0,
            memory_size=cfg.memory,
            userspace_addr=ctypes.addressof(self._anchor),
        )
        kvm.ioctl(
            self.vm, kvm.KVM_SET_USER_MEMORY_REGION, region, what="KVM_SET_USER_MEMORY_REGION"
        )
        self._load(image)

        # Doorbells and interrupts: the eventfds vbusd gets in REGISTER.
        self.doorbells = [_eventfd() for _ in range(cfg.ndoorbells)]
        self.fds += self.doorbells
        self.irqs = [_eventfd() for _ in range(cfg.nirqs)]
        self.fds += self.irqs
        if not cfg.trap_doorbells:
            for i, fd in enumerate(self.doorbells):
                ev = kvm.Ioeventfd(
                    datamatch=0,
                    addr=DOORBELL_PORT + 2 * i,
                    len=2,
                    fd=fd,
                    flags=kvm.KVM_IOEVENTFD_FLAG_PIO,
                )
                kvm.ioctl(self.vm, kvm.KVM_IOEVENTFD, ev, what="KVM_IOEVENTFD")
        for i, fd in enumerate(self.irqs):
            kvm.ioctl(self.vm, kvm.KVM_IRQFD, kvm.Irqfd(fd=fd, gsi=IRQ_LINE + i), what="KVM_IRQFD")

        self.vcpu = kvm.ioctl(self.vm, kvm.KVM_CREATE_VCPU, 0, what="KVM_CREATE_VCPU")
        self.fds.append(self.vcpu)
        self._set_cpuid()
        self._set_registers()
        size = kvm.ioctl(self.kvm, kvm.KVM_GET_VCPU_MMAP_SIZE, 0, what="KVM_GET_VCPU_MMAP_SIZE")
        self.run_area = mmap.mmap(self.vcpu, size, mmap.MAP_SHARED)

    def _load(self, image: bytes) -> None:
        cfg = self.config
        ram = self.ram
        if FIRMWARE_GPA + len(image) > 4 * MiB:
            raise Invalid("the firmware image is too large")
        ram[FIRMWARE_GPA : FIRMWARE_GPA + len(image)] = image
        # Identity map of the first GiB, 2 MiB pages: present, writable, user.
        flags = 0x7
        struct.pack_into("<Q", ram, PML4_GPA, PDPT_GPA | flags)
        struct.pack_into("<Q", ram, PDPT_GPA, PD_GPA | flags)
        struct.pack_into("<512Q", ram, PD_GPA, *((i << 21) | flags | 0x80 for i in range(512)))
        words = {
            BI.MAGIC: MAGIC,
            BI.MODE: MODES[cfg.mode],
            BI.RAM: cfg.memory,
            BI.MESSAGES: cfg.messages,
            BI.NDOORBELLS: cfg.ndoorbells,
            BI.NIRQS: cfg.nirqs,
            BI.MITIGATION: int(cfg.mitigation),
            BI.IP: cfg.ip,
            BI.PREFIX: cfg.prefix,
            BI.MSG_SIZE: cfg.msg_size,
            BI.BATCH: cfg.batch,
            BI.IRQ_LINE: IRQ_LINE,
            BI.SECONDS: cfg.seconds,
        }
        for index, value in words.items():
            struct.pack_into("<Q", ram, BOOTINFO_GPA + 8 * index, value)
        name = cfg.device.encode()
        if not 1 <= len(name) <= 63:
            raise Invalid("the device name must be 1..63 bytes")
        at = BOOTINFO_GPA + BI.DEVICE
        ram[at : at + len(name) + 1] = name + b"\0"

    def _set_cpuid(self) -> None:
        n = 128

        class Cpuid(ctypes.Structure):
            _fields_ = [
                ("nent", ctypes.c_uint32),
                ("padding", ctypes.c_uint32),
                ("entries", kvm.CpuidEntry2 * n),
            ]

        cpuid = Cpuid(nent=n)
        kvm.ioctl(self.kvm, kvm.KVM_GET_SUPPORTED_CPUID, cpuid, what="KVM_GET_SUPPORTED_CPUID")
        kvm.ioctl(self.vcpu, kvm.KVM_SET_CPUID2, cpuid, what="KVM_SET_CPUID2")

    def _set_registers(self) -> None:
        sregs = kvm.Sregs()
        kvm.ioctl(self.vcpu, kvm.KVM_GET_SREGS, sregs, what="KVM_GET_SREGS")
        code = kvm.Segment(
            base=0, limit=0xFFFFFFFF, selector=0x08, type=11, present=1, dpl=0, db=0, s=1, l=1, g=1
        )
        data = kvm.Segment(
            base=0, limit=0xFFFFFFFF, selector=0x10, type=3, present=1, dpl=0, db=1, s=1, l=0, g=1
        )
        sregs.cs = code
        sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = data
        sregs.cr3 = PML4_GPA
        sregs.cr4 = 1 << 5  # PAE
        sregs.cr0 = 0x80050033  # PG, AM, WP, NE, ET, MP, PE
        sregs.efer = 0x500 | 0x1  # LMA, LME, SCE
        kvm.ioctl(self.vcpu, kvm.KVM_SET_SREGS, sregs, what="KVM_SET_SREGS")
        regs = kvm.Regs(rip=FIRMWARE_GPA, rflags=0x2, rsp=0x80000)
        kvm.ioctl(self.vcpu, kvm.KVM_SET_REGS, regs, what="KVM_SET_REGS")

    # --- what vbusd is given ------------------------------------------------------------
    def word(self, index: int) -> int:
        return int(struct.unpack_from("<Q", self.ram, BOOTINFO_GPA + 8 * index)[0])

    def guest_message(self) -> str:
        at = BOOTINFO_GPA + BI.MESSAGE
        raw = bytes(self.ram[at : at + 256])
        return raw.split(b"\0", 1)[0].decode("utf-8", "replace")

    # --- the vcpu thread --------------------------------------------------------------------
    def run(self, console: Callable[[str], None] | None = None) -> RunResult:
        """KVM_RUN until the guest reports its status or stops otherwise.
        Runs on the calling thread (the VMM's vcpu thread), signals blocked."""
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM, signal.SIGCHLD})
        result = self.result
        run = self.run_area
        exits = result.exits
        in_data = False
        data_start = 0.0
        mark: Counter[str] = Counter()
        trap = self.config.trap_doorbells
        ndoor = len(self.doorbells)
        while not self._closed:
            try:
                kvm.ioctl(self.vcpu, kvm.KVM_RUN, what="KVM_RUN")
            except kvm.KvmError as exc:
                if exc.errno == errno.EINTR:
                    if self._closed:  # the VMM's own stop: not the guest's exit
                        result.error = f"stopped{self._where()}"
                        break
                    exits["intr"] += 1
                    continue
                result.error = str(exc)
                break
            reason = struct.unpack_from("<I", run, kvm.RUN_EXIT_REASON)[0]
            if reason != kvm.KVM_EXIT_IO:
                exits[kvm.EXIT_REASONS.get(reason, f"reason_{reason}")] += 1
                if reason == kvm.KVM_EXIT_INTR:
                    continue
                result.error = self._describe_stop(reason)
                break
            direction, size, port, count, offset = struct.unpack_from("<BBHIQ", run, kvm.RUN_IO)
            value = int.from_bytes(run[offset : offset + size], "little")
            if DOORBELL_PORT <= port < DOORBELL_PORT + 2 * ndoor and trap:
                exits["io_doorbell"] += 1
                try:
                    os.eventfd_write(self.doorbells[(port - DOORBELL_PORT) // 2], 1)
                except BlockingIOError:
                    pass
                continue
            if direction != kvm.KVM_EXIT_IO_OUT:
                exits["io_other"] += 1
                run[offset : offset + size * count] = b"\xff" * (size * count)
                continue
            if port == PORT_PUTS:
                exits["io_console"] += 1
                text = self._string(value)
                result.console.append(text)
                if console is not None:
                    console(text)
            elif port == PORT_MARK:
                exits["io_mark"] += 1
                if value == 1 and not in_data:
                    in_data, mark, data_start = True, Counter(exits), time.monotonic()
                elif value == 2 and in_data:
                    result.data_seconds = time.monotonic() - data_start
                    in_data = False
                    result.data_exits = Counter(exits)
                    result.data_exits.subtract(mark)
                    result.data_exits["io_mark"] -= 1
                    result.data_exits = +result.data_exits  # drop zeros
            elif port == PORT_EXIT:
                exits["io_exit"] += 1
                result.status = value
                break
            else:
                exits["io_other"] += 1
        if in_data:  # stopped while serving (venet): the data phase ends here
            result.data_seconds = time.monotonic() - data_start
            result.data_exits = Counter(exits)
            result.data_exits.subtract(mark)
            result.data_exits = +result.data_exits
        return result

    def _string(self, gpa: int) -> str:
        if not 0 < gpa < len(self.ram):
            return f"<console write of a bad address {gpa:#x}>"
        end = self.ram.find(b"\0", gpa, min(len(self.ram), gpa + 4096))
        raw = self.ram[gpa : end if end >= 0 else gpa + 4096]
        return raw.decode("utf-8", "replace")

    def _where(self) -> str:
        regs = kvm.Regs()
        try:
            kvm.ioctl(self.vcpu, kvm.KVM_GET_REGS, regs, what="KVM_GET_REGS")
        except kvm.KvmError:
            return ""
        return f" at rip {regs.rip:#x} (rdi {regs.rdi:#x}, rflags {regs.rflags:#x})"

    def _describe_stop(self, reason: int) -> str:
        name = kvm.EXIT_REASONS.get(reason, f"reason {reason}")
        regs = kvm.Regs()
        try:
            kvm.ioctl(self.vcpu, kvm.KVM_GET_REGS, regs, what="KVM_GET_REGS")
            where = f" at rip {regs.rip:#x}"
        except kvm.KvmError:
            where = ""
        detail = ""
        if reason == kvm.KVM_EXIT_INTERNAL_ERROR:
            suberror, ndata = struct.unpack_from("<II", self.run_area, kvm.RUN_INTERNAL)
            data = struct.unpack_from(f"<{min(ndata, 16)}Q", self.run_area, kvm.RUN_INTERNAL + 8)
            detail = f" (suberror {suberror}, data {[hex(d) for d in data]})"
        return f"the guest stopped: KVM exit {name}{where}{detail}"

    def rings(self, n: int = 2) -> str:
        """The first ``n`` ioq rings' indexes and signal flags, for a report."""
        parts = []
        for k in range(n):
            at = 0x400000 + k * 0x10000
            magic, _v, count = struct.unpack_from("<III", self.ram, at)
            if magic != 0x56424951:
                continue
            north, south = bytes(self.ram[at + 24 : at + 27]), bytes(self.ram[at + 28 : at + 31])
            valid = struct.unpack_from("<I", self.ram, at + 64)[0]
            inuse = struct.unpack_from("<I", self.ram, at + 128)[0]
            parts.append(
                f"ring {k}: count {count} valid {valid} inuse {inuse} "
                f"north {list(north)} south {list(south)}"
            )
        return "; ".join(parts)

    def pic(self) -> str:
        """The master PIC's registers (irr, imr, isr), for a report."""
        chip = kvm.Irqchip(chip_id=0)
        try:
            kvm.ioctl(self.vm, kvm.KVM_GET_IRQCHIP, chip, what="KVM_GET_IRQCHIP")
        except kvm.KvmError as exc:
            return str(exc)
        last_irr, irr, imr, isr = bytes(chip.data[:4])
        counts = []
        for fd in self.irqs:
            with open(f"/proc/self/fdinfo/{fd}") as info:
                counts += [ln.split()[1] for ln in info if ln.startswith("eventfd-count")]
        total_at, count_at = self.word(BI.IRQ_TOTAL_AT), self.word(BI.IRQ_COUNT_AT)
        live = ""
        if 0 < total_at < len(self.ram) and 0 < count_at < len(self.ram):
            total = struct.unpack_from("<Q", self.ram, total_at)[0]
            lines = struct.unpack_from("<8Q", self.ram, count_at)
            live = f"; guest interrupts {total}, by PIC line {list(lines)}"
        return (
            f"pic last_irr {last_irr:#04x} irr {irr:#04x} imr {imr:#04x} isr {isr:#04x}; "
            f"interrupt eventfd counts {counts}{live}"
        )

    def stop(self) -> None:
        """Make the vcpu thread leave KVM_RUN (a halted vcpu too): immediate_exit,
        then a signal to the thread, which interrupts the ioctl."""
        self._closed = True
        self.run_area[1] = 1  # kvm_run.immediate_exit
        if self.thread is not None and self.thread.ident is not None:
            with contextlib.suppress(ProcessLookupError):
                signal.pthread_kill(self.thread.ident, signal.SIGUSR1)

    def close(self) -> None:
        self._closed = True
        if self.thread is not None and self.thread.is_alive():
            # The vcpu is still in KVM_RUN (a guest that ignored the stop):
            # its mappings and descriptors go with the process.
            return
        area = getattr(self, "run_area", None)
        if area is not None:
            area.close()
        anchor = getattr(self, "_anchor", None)
        if anchor is not None:
            del self._anchor
        ram = getattr(self, "ram", None)
        if ram is not None:
            try:
                ram.close()
            except BufferError:
                pass
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds.clear()


def start_vcpu_thread(
    machine: Machine, done: Callable[[RunResult], None], console: Callable[[str], None] | None
) -> threading.Thread:
    def body() -> None:
        try:
            result = machine.run(console)
        except Exception as exc:  # reported, never lost on the thread
            result = RunResult(error=f"vcpu thread: {exc}")
        done(result)

    thread = threading.Thread(target=body, name="vcpu0", daemon=True)
    machine.thread = thread
    if signal.getsignal(signal.SIGUSR1) in (signal.SIG_DFL, None):
        signal.signal(signal.SIGUSR1, _nothing)  # interrupts KVM_RUN (Machine.stop)
    thread.start()
    return thread


def _nothing(signum: int, frame: object) -> None:
    """SIGUSR1: its only purpose is to interrupt the vcpu thread's KVM_RUN."""
