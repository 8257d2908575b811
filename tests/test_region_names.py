"""alloc(name=...): checked, kept on the region, and visible from outside
the process (a marker page in /proc/PID/maps that `thpguard status` reads)."""

import os

import pytest

import thpguard
from thpguard import _procmap, cli


@pytest.mark.parametrize("name, error", [
    (b"weights", TypeError), (7, TypeError), ("", ValueError), ("a b", ValueError),
    ("x" * 49, ValueError), ("caf\u00e9", ValueError), ("a]b", ValueError),
])
def test_bad_names_refused(name, error):
    """A name that cannot travel into maps, labels or a signal handler's message is refused."""
    with pytest.raises(error) as info:
        thpguard.alloc(2 << 20, name=name, populate=False)
    assert isinstance(info.value, thpguard.ThpguardError) and "name must be" in str(info.value)


def test_status_marks_regions_with_their_names(capsys):
    """status finds each region by its marker page, named or not; the marker is not the region."""
    with thpguard.alloc(4 << 20, name="weights.v2") as named, thpguard.alloc(2 << 20) as plain:
        pc = _procmap.scan_process(os.getpid())
        regions = {v.start: v.region for v in pc.vmas if v.region is not None}
        assert regions[named.address] == "weights.v2" and regions[plain.address] == ""
        assert not any(v.region is not None for v in pc.vmas if v.start in (
            named.address - 4096, plain.address - 4096))  # the marker pages are not regions
        assert "weights.v2" in repr(named)
        assert cli.main(["status", str(os.getpid())]) == 0
        out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if f"{named.address:012x}-" in line)
    assert row.endswith("* thpguard region 'weights.v2'")
    assert "memfd:" not in out  # the marker page itself is hidden without --all
