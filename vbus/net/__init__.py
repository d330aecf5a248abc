"""Ethernet for vbus: the venet frame format (sans-IO), the learning switch, host taps.

- ``vnet``: ``struct virtio_net_hdr_v1`` frames, virtio-net feature bits,
  the checks every frame from a north passes, checksums and software TCP
  segmentation.  Pure functions over bytes.
- ``calls``: the venet's call() functions, queue numbers and reply layouts,
  shared by the device and its drivers.
- ``switch``: the in-daemon L2 learning switch shared by venet ports.
- ``tap``: opening and configuring Linux tap devices (``/dev/net/tun``) and
  entering a network namespace to create one.
"""
