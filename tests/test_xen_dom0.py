"""vbus.xen.dom0 off Xen: its ioctl numbers and layouts against Linux's own headers,
detect(), the pending/unmask encoding of the evtchn device, refusals before any ioctl.

The same code against the real devices is in tests/test_xen_real.py.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from tests.conftest import require
from vbus.errors import Closed, Invalid, NotFound
from vbus.xen import dom0

HEADERS = Path("/usr/include/xen")  # Debian's linux-libc-dev: Linux's include/uapi/xen

PROBE = r"""
#include <stdio.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/ioctl.h>
typedef uint16_t domid_t;      /* from Xen's public headers, which the uapi ones assume */
typedef uint32_t grant_ref_t;
#include <xen/gntdev.h>
#include <xen/evtchn.h>
int main(void) {
    printf("IOCTL_GNTDEV_MAP_GRANT_REF %lu\n", (unsigned long)IOCTL_GNTDEV_MAP_GRANT_REF);
    printf("IOCTL_GNTDEV_UNMAP_GRANT_REF %lu\n", (unsigned long)IOCTL_GNTDEV_UNMAP_GRANT_REF);
    printf("IOCTL_EVTCHN_BIND_INTERDOMAIN %lu\n", (unsigned long)IOCTL_EVTCHN_BIND_INTERDOMAIN);
    printf("IOCTL_EVTCHN_UNBIND %lu\n", (unsigned long)IOCTL_EVTCHN_UNBIND);
    printf("IOCTL_EVTCHN_NOTIFY %lu\n", (unsigned long)IOCTL_EVTCHN_NOTIFY);
    printf("map_size %zu\n", sizeof(struct ioctl_gntdev_map_grant_ref));
    printf("map_index %zu\n", offsetof(struct ioctl_gntdev_map_grant_ref, index));
    printf("map_refs %zu\n", offsetof(struct ioctl_gntdev_map_grant_ref, refs));
    printf("grant_ref_size %zu\n", sizeof(struct ioctl_gntdev_grant_ref));
    printf("unmap_size %zu\n", sizeof(struct ioctl_gntdev_unmap_grant_ref));
    printf("unmap_count %zu\n", offsetof(struct ioctl_gntdev_unmap_grant_ref, count));
    printf("bind_size %zu\n", sizeof(struct ioctl_evtchn_bind_interdomain));
    printf("IOCTL_GNTDEV_GRANT_COPY %lu\n", (unsigned long)IOCTL_GNTDEV_GRANT_COPY);
    printf("copy_size %zu\n", sizeof(struct ioctl_gntdev_grant_copy));
    printf("copy_segments %zu\n", offsetof(struct ioctl_gntdev_grant_copy, segments));
    printf("seg_size %zu\n", sizeof(struct gntdev_grant_copy_segment));
    printf("seg_dest %zu\n", offsetof(struct gntdev_grant_copy_segment, dest));
    printf("seg_len %zu\n", offsetof(struct gntdev_grant_copy_segment, len));
    printf("seg_flags %zu\n", offsetof(struct gntdev_grant_copy_segment, flags));
    printf("seg_status %zu\n", offsetof(struct gntdev_grant_copy_segment, status));
    printf("foreign_offset %zu\n", offsetof(struct gntdev_grant_copy_segment, source.foreign.offset));
    printf("foreign_domid %zu\n", offsetof(struct gntdev_grant_copy_segment, source.foreign.domid));
    return 0;
}
"""


def test_ioctls_and_layouts_match_linux_headers(tmp_path: Path) -> None:
    gcc = shutil.which("gcc")
    require(gcc is not None, "gcc is needed to compile Linux's Xen uapi headers")
    require((HEADERS / "gntdev.h").exists(), f"{HEADERS}/gntdev.h missing (linux-libc-dev)")
    assert gcc is not None
    (tmp_path / "probe.c").write_text(PROBE)
    subprocess.run([gcc, "-o", str(tmp_path / "probe"), str(tmp_path / "probe.c")], check=True)
    out = subprocess.run([str(tmp_path / "probe")], capture_output=True, text=True, check=True)
    c = {k: int(v) for k, v in (line.split() for line in out.stdout.splitlines())}
    assert c["IOCTL_GNTDEV_MAP_GRANT_REF"] == dom0.IOCTL_GNTDEV_MAP_GRANT_REF
    assert c["IOCTL_GNTDEV_UNMAP_GRANT_REF"] == dom0.IOCTL_GNTDEV_UNMAP_GRANT_REF
    assert c["IOCTL_EVTCHN_BIND_INTERDOMAIN"] == dom0.IOCTL_EVTCHN_BIND_INTERDOMAIN
    assert c["IOCTL_EVTCHN_UNBIND"] == dom0.IOCTL_EVTCHN_UNBIND
    assert c["IOCTL_EVTCHN_NOTIFY"] == dom0.IOCTL_EVTCHN_NOTIFY
    assert c["map_size"] == dom0._MAP_SIZE
    assert struct.calcsize("=II") == c["map_index"]  # count, pad, then index
    assert dom0._MAP_HEAD.size == c["map_refs"]
    assert dom0._GRANT_REF.size == c["grant_ref_size"]
    assert dom0._UNMAP.size == c["unmap_size"]
    assert struct.calcsize("=Q") == c["unmap_count"]
    assert dom0._BIND_INTERDOMAIN.size == c["bind_size"]
    # the grant copy: its argument and its segments
    assert c["IOCTL_GNTDEV_GRANT_COPY"] == dom0.IOCTL_GNTDEV_GRANT_COPY
    assert (dom0._COPY.size, 8) == (c["copy_size"], c["copy_segments"])
    for layout in (dom0._COPY_FROM_GRANT, dom0._COPY_TO_GRANT):
        assert layout.size == c["seg_size"]
    assert (c["seg_dest"], c["seg_len"], c["seg_flags"]) == (8, 16, 18)
    assert c["seg_status"] == dom0._COPY_STATUS_AT
    assert (c["foreign_offset"], c["foreign_domid"]) == (4, 6)  # after the u32 ref


@pytest.mark.parametrize(
    ("text", "expected"),
    [("control_d\n", True), ("\n", False), ("control_dx\n", False)],
)
def test_detect_reads_capabilities(tmp_path: Path, text: str, expected: bool) -> None:
    caps = tmp_path / "capabilities"
    caps.write_text(text)
    assert dom0.detect(caps) is expected


def test_detect_without_xenfs_is_false(tmp_path: Path) -> None:
    assert dom0.detect(tmp_path / "absent") is False


def test_missing_devices_are_not_found(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="not a Xen dom0"):
        dom0.Gntdev(tmp_path / "gntdev")
    with pytest.raises(NotFound, match="not a Xen dom0"):
        dom0.EventChannels(tmp_path / "evtchn")


def test_pending_and_unmask_speak_native_u32_ports(tmp_path: Path) -> None:
    # A FIFO stands in for the device: what the driver would queue, and what it would read.
    fifo = tmp_path / "evtchn"
    os.mkfifo(fifo)
    with dom0.EventChannels(fifo) as chans:
        assert chans.pending() == []  # nothing fired: non-blocking, empty
        peer = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)
        try:
            os.write(peer, struct.pack("=III", 5, 9, 70000))
            assert chans.pending() == [5, 9, 70000]
            assert chans.pending() == []
            chans.unmask(9)
            assert os.read(peer, 64) == struct.pack("=I", 9)
        finally:
            os.close(peer)
    with pytest.raises(Closed):
        chans.pending()


def test_refusals_come_before_any_ioctl(tmp_path: Path) -> None:
    fifo = tmp_path / "dev"
    os.mkfifo(fifo)
    with dom0.Gntdev(fifo) as gnt:
        with pytest.raises(Invalid):
            gnt.map(1, [])
        with pytest.raises(Invalid):
            gnt.map(0x7FF0, [8])  # DOMID_FIRST_RESERVED and above are not domains
        with pytest.raises(Invalid):
            gnt.map(1, [1 << 32])
        copier = dom0.GrantCopier(gnt, 1, 8192)
        with pytest.raises(Invalid):
            copier.from_grant(7, 4000, 200, 0)  # leaves its page
        with pytest.raises(Invalid):
            copier.to_grant(7, 0, 8000, 400)  # outside the local buffer
        with pytest.raises(Invalid):
            copier.from_grant(1 << 32, 0, 10, 0)
        assert copier.run() == []  # nothing was queued: no ioctl either
        copier.close()
    with dom0.EventChannels(fifo) as chans:
        with pytest.raises(Invalid):
            chans.bind_interdomain(-1, 3)
        with pytest.raises(NotFound):
            chans.notify(3)  # never bound here
        with pytest.raises(NotFound):
            chans.unbind(3)
