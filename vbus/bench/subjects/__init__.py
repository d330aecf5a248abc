"""Bench subjects: one module each, defining ``SUBJECT`` (see ``vbus.bench.subject``).

Later subjects (venet against a veth pair, KVM guests, Xen domUs, vhost-user
guests against QEMU's own tap) each add one file here.
"""
