"""vbus: virtual devices on run-time buses, served to untrusted north contexts.

The daemon (``vbusd``) holds devices and buses; north contexts reach the
devices on their own bus with two verbs, ``call()`` and ``shm()``, over
lockless shared-memory rings.  ``vbus.client`` is the process-side library.
"""

__version__ = "0.1.0"
