"""vbus.xen: Xen domains as north contexts (``dom0``: the hypervisor interface of a real dom0)."""
