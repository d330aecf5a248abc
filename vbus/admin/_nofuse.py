"""Stand-ins for the pyfuse3 names that ``vbus.admin.fs`` needs at import time.

Used only when pyfuse3 cannot be imported (no libfuse3, a broken build): the
daemon can still build an ``AdminTree``, and ``mount_admin_tree`` then reports
``IMPORT_ERROR`` as the reason the tree is unavailable.
"""

from __future__ import annotations

import errno

IMPORT_ERROR = "pyfuse3 cannot be imported"


class FUSEError(Exception):
    def __init__(self, code: int = errno.EIO) -> None:
        super().__init__(code)
        self.errno = code


class Operations:
    """Nothing is ever served without pyfuse3."""
