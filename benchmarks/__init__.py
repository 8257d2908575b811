"""thpguard's benchmarks: what a split costs, how fast thpguard repairs it,
and what thpguard costs in CPU, memory and latency.

Run them from the repository root, with thpguard installed::

    python -m benchmarks [--quick] [--only NAME[,NAME...]] [--json PATH] [--plot PATH]

Every figure is a ratio against a baseline measured in the same run,
interleaved, after warm-up, as the median of several repetitions (see
``_harness``). This package is not part of the installed ``thpguard``.

The end-to-end benchmarks (``agent``, ``service``, ``snapshot``, ``pool``:
whole services, several GiB, Redis, gunicorn and wrk) run only when named
with ``--only``; a plain run is the seven component benchmarks.
"""

from . import (agent, alloc, coverage, forklat, hugetlb, overhead, pool, repair, service, snapshot,
               stall, tlb)

#: Every benchmark, in the order they run: module with NAME, TITLE, run().
BENCHMARKS = (repair, coverage, tlb, overhead, forklat, alloc, stall, agent, service, snapshot, pool,
              hugetlb)

#: What a run without ``--only`` runs (hugetlb grows the host's pool: only when named).
DEFAULT = (repair, coverage, tlb, overhead, forklat, alloc, stall)
