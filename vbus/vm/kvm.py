"""The KVM ioctls ``vbus vm`` uses, their numbers and structures as in
Linux's uapi ``<linux/kvm.h>`` (x86-64), through ``ctypes``.

The numbers are computed with the header's own ``_IO``/``_IOW``/``_IOR``/
``_IOWR`` encoding from the same type codes and structure sizes, so a
wrong structure layout shows up as a wrong size (ENOTTY) instead of a
silent mismatch.  ``ioctl`` goes through libc with the GIL released, so a
``KVM_RUN`` on the vcpu thread never blocks the VMM's event loop.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from typing import Any

__all__ = [
    "KVMIO",
    "CpuidEntry2",
    "Ioeventfd",
    "Irqfd",
    "KvmError",
    "Regs",
    "Segment",
    "Sregs",
    "UserspaceMemoryRegion",
    "ioctl",
]

c_u8, c_u16, c_u32, c_u64 = ctypes.c_uint8, ctypes.c_uint16, ctypes.c_uint32, ctypes.c_uint64

_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (KVMIO << 8) | nr


def _io(nr: int) -> int:
    return _ioc(_IOC_NONE, nr, 0)


def _iow(nr: int, struct: type[ctypes.Structure]) -> int:
    return _ioc(_IOC_WRITE, nr, ctypes.sizeof(struct))


def _ior(nr: int, struct: type[ctypes.Structure]) -> int:
    return _ioc(_IOC_READ, nr, ctypes.sizeof(struct))


def _iowr(nr: int, struct: type[ctypes.Structure]) -> int:
    return _ioc(_IOC_READ | _IOC_WRITE, nr, ctypes.sizeof(struct))


KVMIO = 0xAE


class Regs(ctypes.Structure):
    _fields_ = [
        (name, c_u64)
        for name in (
            [
                "rax",
                "rbx",
                "rcx",
                "rdx",
                "rsi",
                "rdi",
                "rsp",
                "rbp",
                "r8",
                "r9",
                "r10",
                "r11",
                "r12",
                "r13",
                "r14",
                "r15",
                "rip",
                "rflags",
            ]
        )
    ]


class Segment(ctypes.Structure):
    _fields_ = [
        ("base", c_u64),
        ("limit", c_u32),
        ("selector", c_u16),
        ("type", c_u8),
        ("present", c_u8),
        ("dpl", c_u8),
        ("db", c_u8),
        ("s", c_u8),
        ("l", c_u8),
        ("g", c_u8),
        ("avl", c_u8),
        ("unusable", c_u8),
        ("padding", c_u8),
    ]


class Dtable(ctypes.Structure):
    _fields_ = [("base", c_u64), ("limit", c_u16), ("padding", c_u16 * 3)]


class Sregs(ctypes.Structure):
    _fields_ = [
        *((name, Segment) for name in ["cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt"]),
        ("gdt", Dtable),
        ("idt", Dtable),
        *((name, c_u64) for name in ["cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base"]),
        ("interrupt_bitmap", c_u64 * 4),
    ]


class UserspaceMemoryRegion(ctypes.Structure):
    _fields_ = [
        ("slot", c_u32),
        ("flags", c_u32),
        ("guest_phys_addr", c_u64),
        ("memory_size", c_u64),
        ("userspace_addr", c_u64),
    ]


class Irqfd(ctypes.Structure):
    _fields_ = [
        ("fd", c_u32),
        ("gsi", c_u32),
        ("flags", c_u32),
        ("resamplefd", c_u32),
        ("pad", c_u8 * 16),
    ]


class Ioeventfd(ctypes.Structure):
    _fields_ = [
        ("datamatch", c_u64),
        ("addr", c_u64),
        ("len", c_u32),
        ("fd", ctypes.c_int32),
        ("flags", c_u32),
        ("pad", c_u8 * 36),
    ]


class CpuidEntry2(ctypes.Structure):
    _fields_ = [
        ("function", c_u32),
        ("index", c_u32),
        ("flags", c_u32),
        ("eax", c_u32),
        ("ebx", c_u32),
        ("ecx", c_u32),
        ("edx", c_u32),
        ("padding", c_u32 * 3),
    ]


class Irqchip(ctypes.Structure):
    """``struct kvm_irqchip``: chip 0 the master PIC, 1 the slave, 2 the IOAPIC."""

    _fields_ = [("chip_id", c_u32), ("pad", c_u32), ("data", c_u8 * 512)]


class Cpuid2(ctypes.Structure):
    """``struct kvm_cpuid2`` without its flexible array (the size the ioctl number encodes)."""

    _fields_ = [("nent", c_u32), ("padding", c_u32)]


assert ctypes.sizeof(Regs) == 0x90 and ctypes.sizeof(Sregs) == 0x138
assert ctypes.sizeof(Irqfd) == 0x20 and ctypes.sizeof(Ioeventfd) == 0x40

KVM_GET_API_VERSION = _io(0x00)
KVM_CREATE_VM = _io(0x01)
KVM_CHECK_EXTENSION = _io(0x03)
KVM_GET_VCPU_MMAP_SIZE = _io(0x04)
KVM_GET_SUPPORTED_CPUID = _iowr(0x05, Cpuid2)
KVM_CREATE_VCPU = _io(0x41)
KVM_SET_USER_MEMORY_REGION = _iow(0x46, UserspaceMemoryRegion)
KVM_SET_TSS_ADDR = _io(0x47)
KVM_CREATE_IRQCHIP = _io(0x60)
KVM_GET_IRQCHIP = _iowr(0x62, Irqchip)
KVM_IRQFD = _iow(0x76, Irqfd)
KVM_IOEVENTFD = _iow(0x79, Ioeventfd)
KVM_RUN = _io(0x80)
KVM_GET_REGS = _ior(0x81, Regs)
KVM_SET_REGS = _iow(0x82, Regs)
KVM_GET_SREGS = _ior(0x83, Sregs)
KVM_SET_SREGS = _iow(0x84, Sregs)
KVM_SET_CPUID2 = _iow(0x90, Cpuid2)

KVM_API_VERSION = 12
KVM_CAP_IRQCHIP = 0
KVM_CAP_USER_MEMORY = 3
KVM_CAP_IRQFD = 32
KVM_CAP_IOEVENTFD = 36
KVM_IOEVENTFD_FLAG_PIO = 1 << 1

# struct kvm_run
RUN_EXIT_REASON = 8
RUN_IO = 32  # union: struct { u8 direction, size; u16 port; u32 count; u64 data_offset; } io
RUN_INTERNAL = 32  # struct { u32 suberror; u32 ndata; u64 data[16]; } internal
KVM_EXIT_IO_OUT = 1

EXIT_REASONS = {
    0: "unknown",
    1: "exception",
    2: "io",
    3: "hypercall",
    4: "debug",
    5: "hlt",
    6: "mmio",
    7: "irq_window_open",
    8: "shutdown",
    9: "fail_entry",
    10: "intr",
    17: "internal_error",
    24: "system_event",
}
KVM_EXIT_IO = 2
KVM_EXIT_HLT = 5
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_INTERNAL_ERROR = 17

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_libc.ioctl.restype = ctypes.c_int


class KvmError(OSError):
    """A KVM ioctl failed; ``what`` names it."""

    def __init__(self, what: str, err: int) -> None:
        super().__init__(err, f"{what}: {os.strerror(err)}")
        self.what = what


def ioctl(fd: int, request: int, arg: Any = None, what: str = "ioctl") -> int:
    """One ioctl with the GIL released; ``arg`` a ctypes object (by reference) or an int."""
    if arg is None:
        ptr: Any = None
    elif isinstance(arg, int):
        ptr = ctypes.c_void_p(arg)
    else:
        ptr = ctypes.byref(arg)
    while True:
        ret = int(_libc.ioctl(fd, request, ptr))
        if ret >= 0:
            return ret
        err = ctypes.get_errno()
        if err != 4:  # EINTR: retried (KVM_RUN handles it itself)
            raise KvmError(what, err)
        if request == KVM_RUN:
            raise KvmError(what, err)
