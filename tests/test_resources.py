"""vbus.core.resources: bounds per peer, per uid and overall, with a reserve."""

from __future__ import annotations

import pytest

from vbus.core.resources import Ledger, ResourceLimits, format_size, parse_size
from vbus.errors import NoSpace, TooManyFiles

M = 1 << 20


@pytest.mark.parametrize(
    ("text", "size"),
    [("4096", 4096), ("64M", 64 * M), ("1g", 1 << 30), ("2GiB", 2 << 30), ("8KB", 8192)],
)
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size
    assert parse_size(format_size(size)) == size


@pytest.mark.parametrize("text", ["", "M", "-1M", "1.5G", "12X", "ten"])
def test_parse_size_refuses_what_is_not_a_size(text: str) -> None:
    with pytest.raises(ValueError, match="not a size"):
        parse_size(text)


def test_shared_memory_bounds() -> None:
    ledger = Ledger(ResourceLimits(shm_per_peer=64 * M, shm_per_uid=100 * M, shm_total=150 * M))
    a, b = ledger.account(1000), ledger.account(1000)
    a.take(shm=64 * M)
    with pytest.raises(NoSpace, match="per connection is 64M"):
        a.take(shm=1)
    b.take(shm=36 * M)
    with pytest.raises(NoSpace, match="for uid 1000 is 100M"):
        b.take(shm=1)
    other = ledger.account(2000)  # another uid is not blamed, up to the daemon's total
    other.take(shm=50 * M)
    with pytest.raises(NoSpace, match="daemon's shared memory limit"):
        other.take(shm=1)
    assert ledger.shm == 150 * M and ledger.uid_usage(1000) == (100 * M, 0)
    a.close()
    b.take(shm=28 * M)  # what a gave back is free again
    b.close()
    other.close()
    assert ledger.shm == 0 and ledger.uid_usage(1000) == (0, 0)


def test_descriptor_bounds_keep_a_reserve() -> None:
    ledger = Ledger(ResourceLimits(fds_per_uid=10))
    ledger.fd_budget = 15  # as if RLIMIT_NOFILE left this much above the reserve
    hog = ledger.account(65534)
    for _ in range(5):
        hog.take(fds=2)
    with pytest.raises(TooManyFiles, match="uid 65534 reached"):
        hog.take(fds=1)
    witness = ledger.account(0)
    witness.take(fds=5)
    with pytest.raises(TooManyFiles, match="short of file descriptors"):
        witness.take(fds=1)
    hog.give(fds=2)
    witness.take(fds=1)
    assert ledger.fds == 14 and ledger.uid_usage(65534) == (0, 8)


def test_mappings_stay_below_the_map_count() -> None:
    ledger = Ledger()
    ledger.map_budget = 2
    account = ledger.account(1)
    account.take(maps=2)
    with pytest.raises(NoSpace, match="max_map_count"):
        account.take(maps=1)
    account.close()
    assert ledger.maps == 0


def test_defaults_fit_the_machine() -> None:
    ledger = Ledger()
    assert 0 < ledger.fds_per_uid < ledger.fd_budget
    assert ledger.shm_total > 0 and ledger.map_budget > 0
