"""Administration: the configfs-like tree (FUSE) and the persisted state.

- ``vbus.admin.tree``: what the tree holds, over a ``Topology`` (pure).
- ``vbus.admin.fs``: ``AdminTree``, the pyfuse3 operations serving it.
- ``vbus.admin.mount``: ``mount_admin_tree`` / ``AdminMount``: mount, stale
  mounts, unmount.
- ``vbus.admin.state``: the persisted topology.

Nothing is imported here, so the state can be used where FUSE is missing.
"""
