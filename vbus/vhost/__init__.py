"""vhost-user: a VMM's virtio device served by a vbus device (docs/design.md 4.7).

``wire`` is the protocol without IO, ``virtq`` the split virtqueue behind
the queue interface (``vbus.queue``); the connector that joins them to
sockets, mappings and eventfds is ``vbus.connectors.vhost_user``.
"""
