"""``vbus vm``: a mini VMM and its guest firmware, a real KVM guest on a bus.

``vbus.vm.kvm`` holds the ioctls, ``vbus.vm.machine`` the VM (RAM, vcpu,
doorbells, interrupts, the exit loop), ``vbus.vm.firmware`` builds the
guest, ``vbus.vm.command`` is the command (registration on ``kvm.sock``,
the run, the report).  docs/design.md, "The VMM and its firmware".
"""

from vbus.vm.command import VmConfig, add_parser, main, run_vm

__all__ = ["VmConfig", "add_parser", "main", "run_vm"]
