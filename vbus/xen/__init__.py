"""Xen for vbus, without a hypervisor: what a Xen backend in dom0 sees, built in the daemon.

- ``xswire``: the xenstored wire format (``struct xsd_sockmsg``), sans-IO.
- ``xenstore``: the store and its server, speaking the real xenstored
  protocol on ``<run-dir>/xenstored.sock`` (Debian's xenstore-utils work
  against it with ``XENSTORED_PATH``) and to each attached domain.
- ``grants``: grant tables (``grant_entry_v1``) in a memfd the domain shares,
  and the backend's mapping of its grants.
- ``evtchn``: event channels between domains, delivered through eventfds.
- ``abi``: the attach protocol on ``<run-dir>/xen.sock``, the call page and
  the xenstore layout of a vbus device.
- ``domu``: the domain's side (``vbus xen domu``): attach, the frontend.
- ``dom0``: the hypervisor interface of a real dom0 (gntdev, evtchn; 4.8).

The connector itself is ``vbus.connectors.xen`` (docs/design.md 4.6).
"""
