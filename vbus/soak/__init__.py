"""Soak testing: prove that vbusd keeps serving everyone else under load, faults and hostile input.

``vbus soak`` (``vbus.soak.runner``) starts a daemon (or attaches to one), runs
good clients (``vbus.soak.good``) alone for a baseline, then alongside the
misbehaving clients of the catalogue (``vbus.soak.catalogue``), and checks the
bounds: good throughput, nothing lost or corrupted, no leaked memory or
descriptors, no exception in the daemon.  ``vbus.soak.fuzz`` holds the fuzz
targets for every parser of north input.
"""
