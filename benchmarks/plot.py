"""The PNG of a benchmark run: a panel for coverage after fork and for
the TLB-workload ratios; two for each of service, snapshot and pool, one
whose figures are better higher (throughput) and one whose figures are
better lower (latency, memory), every bar a ratio to 4 KiB pages with
whiskers from the lowest to the highest round. Memory is PSS plus the
hugetlb pages (which PSS leaves out).

``python -m benchmarks.plot RESULTS.json OUT.png`` redraws it from the JSON
that ``python -m benchmarks --json`` wrote (``RESULTS.json.gz`` too). Needs matplotlib (the ``bench``
extra).
"""

from __future__ import annotations

import gzip
import json
import sys


def _result(document: dict, name: str):
    for result in document.get("results", []):
        if result["name"] == name and not result.get("skipped"):
            return result
    return None


def _round_ratios(result: dict, size: str, variant: str) -> list:
    """Per-round ratios of ``variant`` to ``pristine`` (rounds ran back to back)."""
    rounds = (result.get("samples", {}).get(size) or {}).get("rounds") or {}
    mine, base = rounds.get(variant) or [], rounds.get("pristine") or []
    return [m["hops_per_s"] / b["hops_per_s"] for m, b in zip(mine, base) if b.get("hops_per_s")]


def plot(document: dict, path: str) -> None:
    """Draw one panel per benchmark of ``document`` (a results JSON object)
    that has a figure (coverage, tlb, service, snapshot) into ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(name, draw) for name, draw in PANELS if _result(document, name)]
    if not panels:
        panels = [(name, draw) for name, draw in PANELS[:2]]  # say what was not run
    cols = 2 if len(panels) > 1 else 1
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.4 * cols, 5.4 * rows), squeeze=False)
    host = document["host"]
    # One panel is half as wide: the title takes two lines there, or it is cut at both edges.
    fig.suptitle(
        f"thpguard {document['thpguard']}, Linux {host['kernel']}, {host['cpu']} x{host['cpus']},"
        f"{' ' if cols > 1 else chr(10)}"
        f"{document['date'][:10]}{' (quick)' if document.get('quick') else ''}, "
        f"load {host.get('loadavg', '?').split(' ')[0]} at start, {document.get('loadavg_end', '?').split(' ')[0]} at end",
        fontsize=9,
    )
    flat = [ax for row in axes for ax in row]
    for ax, (name, draw) in zip(flat, panels):
        result = _result(document, name)
        if result is None:
            ax.text(0.5, 0.5, f"{name} benchmark not run", ha="center", transform=ax.transAxes)
            continue
        draw(ax, result)
    for ax in flat[len(panels):]:
        ax.axis("off")
    # Below the figure's title: with three rows of panels it would cover the first row's titles.
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / (5.4 * rows)))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _coverage_panel(left, cov) -> None:
    from .coverage import median_run

    chosen = dict(cov["series"])
    if cov["samples"].get("guarded"):
        chosen["guarded"] = median_run(cov["samples"]["guarded"])["series"]
    for label, style, width in (("unguarded", "--", 2.5), ("guarded", "-", 1.8)):
        series = chosen.get(label)
        if not series:
            continue
        t = [max(p[0], 1e-3) for p in series]
        y = [100 * p[1] for p in series]
        if label == "guarded" and t[-1] < chosen["unguarded"][-1][0]:
            # Stays at 100 % once repaired; draw it to the end of the watch.
            t.append(chosen["unguarded"][-1][0])
            y.append(y[-1])
        name = "thpguard guard" if label == "guarded" else "kernel defaults (khugepaged)"
        left.step(t, y, style, where="post", label=name, linewidth=width)
    left.set_xscale("log")
    left.set_xlabel("seconds after the child split 256 blocks")
    left.set_ylabel("PMD-mapped share of the region (%)")
    left.set_ylim(-5, 105)
    left.set_title("coverage after fork (PAGEMAP_SCAN; guarded: the median run)", fontsize=10)
    left.legend(fontsize=8, loc="center right")


def _tlb_panel(right, tlb) -> None:
    points = tlb["series"]["ratios"]
    labels = [p["size"] for p in points]
    x = range(len(labels))
    width = 0.38
    tops = []
    for offset, key, name in (
        (-width / 2, "split", "split (one write per block)"),
        (width / 2, "repaired", "split, then repaired by thpguard"),
    ):
        values = [p[key] for p in points]
        low, high = [], []
        for p, value in zip(points, values):
            spread = _round_ratios(tlb, p["size"], key)
            low.append(value - min(spread) if spread else 0.0)
            high.append(max(spread) - value if spread else 0.0)
        right.bar([i + offset for i in x], values, width, label=name,
                  yerr=[low, high], capsize=4, error_kw={"linewidth": 1})
        # In the bar's right half, beside the whisker that runs up its middle.
        for i, value in zip(x, values):
            right.annotate(f"{value:.2f}", xy=(i + offset, value), xytext=(5, -4),
                           textcoords="offset points", ha="left", va="top", fontsize=9,
                           color="white", fontweight="bold")
        tops += [v + h for v, h in zip(values, high)]
    right.axhline(1.0, color="gray", linewidth=0.8, linestyle="--",
                  label="1.0: pristine huge pages (never split)")
    right.set_xticks(list(x))
    right.set_xticklabels(labels)
    right.set_xlim(-0.6, len(labels) - 0.4)
    # Head room above the tallest bar and its error bar for the legend.
    right.set_ylim(0, max(tops + [1.0]) * 1.45)
    right.set_ylabel("throughput / pristine huge pages")
    right.set_title("pointer chasing in a forked worker\n(bars: median of paired rounds; "
                    "whiskers: lowest and highest round)", fontsize=10)
    right.legend(fontsize=8, loc="upper left", ncol=1, frameon=False)


def spread(values):
    """(median, distance down to the lowest, distance up to the highest):
    a bar and its error bar from the per-round ratios."""
    import statistics

    clean = [v for v in values if v == v]
    if not clean:
        return float("nan"), 0.0, 0.0
    mid = statistics.median(clean)
    return mid, mid - min(clean), max(clean) - mid


#: Short names for the variants under the bars (the tables have the long ones).
_SHORT = {
    "thp": "MADV_HUGEPAGE\n(no thpguard)",
    "share+guard": "share\n+ guard",
    "copy eager": "copy, eager\n(at fork)",
    "copy lazy": "copy, lazy\n(first write)",
    "hugetlb": "hugetlb\n(2 MiB pool)",
}


def _name(v: dict) -> str:
    name = _SHORT.get(v["variant"], v["label"])
    if not v.get("available"):
        return name + "\n[not available]"
    if v.get("downgraded_runs"):
        # thpguard gave the children THP copies: not a hugetlb figure.
        runs = max((len(x) for x in v.values() if isinstance(x, list)), default=0)
        name = f"hugetlb, DOWNGRADED\nto THP copies\nin {v['downgraded_runs']} of {runs} runs"
    return name


def _ratio_bars(ax, variants, metrics, title, better, extra_label=None) -> None:
    """Grouped bars, one group per variant other than 4 KiB pages (drawn as
    the labelled baseline line at 1), one bar per metric, each with its
    median printed above its whisker (lowest to highest round). ``better``
    is "higher" or "lower": all metrics of one panel go the same way."""
    shown = [v for v in variants if v["variant"] != "4k"]
    width = 0.8 / len(metrics)
    tops, bottoms = [1.0], [1.0]
    for k, (key, name) in enumerate(metrics):
        xs, mids, lows, highs = [], [], [], []
        for i, v in enumerate(shown):
            if not v.get("available") or key not in v:
                continue
            mid, low, high = spread(v[key])
            if mid != mid:
                continue
            xs.append(i + (k - (len(metrics) - 1) / 2) * width)
            mids.append(mid)
            lows.append(low)
            highs.append(high)
        ax.bar(xs, mids, width * 0.92, yerr=[lows, highs], capsize=3, label=name,
               error_kw={"linewidth": 0.9})
        for x, mid, high in zip(xs, mids, highs):
            # Above the whisker's cap, so neither hides the other.
            ax.annotate(f"{mid:.2f}", xy=(x, mid + high), xytext=(0, 2), textcoords="offset points",
                        ha="center", va="bottom", fontsize=6.5, rotation=90 if len(metrics) > 2 else 0)
            tops.append(mid + high)
            bottoms.append(max(mid - low, 1e-3))
    ax.axhline(1.0, color="black", linewidth=0.9, linestyle="--", zorder=0,
               label="baseline: 4 KiB pages (MADV_NOHUGEPAGE) = 1")
    labels = []
    for i, v in enumerate(shown):
        label = _name(v)
        if not v.get("available"):
            ax.text(i, 0.5, "not\navailable", ha="center", va="center", fontsize=7, color="gray")
        elif extra_label:
            label += "\n" + extra_label(v)
        labels.append(label)
    ax.set_xticks(range(len(shown)))
    # Bars set the limits: without this a last variant that is not available sits on the edge.
    ax.set_xlim(-0.6, len(shown) - 0.4)
    ax.set_xticklabels(labels, fontsize=7)
    arrow = "\u2191" if better == "higher" else "\u2193"
    ax.set_ylabel(f"ratio to 4 KiB pages, same round\n{arrow} {better} is better", fontsize=8)
    ax.set_title(title + f" ({better} is better)", fontsize=9)
    if max(tops) > 8:
        # One variant tens of times the baseline would flatten the others:
        # a log axis keeps every ratio readable (2x and 0.5x equally far from 1).
        ax.set_yscale("log")
        ax.set_ylim(min(bottoms) * 0.5, max(tops) * 6)
    else:
        # Head room above the tallest whisker for the legend.
        ax.set_ylim(0, max(tops) * 1.35)
    ax.legend(fontsize=7, loc="upper left", ncol=2, frameon=False)


_WHISKERS = "bars: median, whiskers: lowest and highest round"


def _service_speed(ax, service) -> None:
    _ratio_bars(
        ax, service["series"]["variants"],
        (("rps_ratio", "requests/s"), ("per_cpu_ratio", "requests per worker CPU-s")),
        f"service (gunicorn --preload, 2 workers): throughput\n{_WHISKERS}", "higher",
        extra_label=lambda v: f"huge {100 * v['worker_huge_after']:.0f} %",
    )


def _service_cost(ax, service) -> None:
    _ratio_bars(
        ax, service["series"]["variants"],
        (("p99_ratio", "p99 latency"), ("pss_ratio", "memory, master + workers")),
        f"service: latency and memory\n{_WHISKERS}", "lower",
    )


def _never_split(snap: dict, v: dict) -> bool:
    """No split was seen in any run (smaps sampled every 0.1 s)."""
    figures = (snap.get("samples", {}).get("figures") or {}).get(v["variant"])
    if figures:
        return not any(f.get("split_seen") for f in figures)
    return all(h >= 1.0 for h in v.get("huge_at_exit") or [0])


def _snapshot_speed(ax, snap) -> None:
    def back(v):
        times = [t for t in v["back_to_huge_s"] if t is not None]
        if _never_split(snap, v):
            return "never split"
        if len(times) < len(v["back_to_huge_s"]):
            return "not huge again\nwhile watched"
        return f"huge again\nafter {sorted(times)[len(times) // 2]:.1f} s"

    _ratio_bars(
        ax, snap["series"]["variants"],
        (("during_ops_per_s_ratio", "ops per CPU-s during snapshot"), ("after_ops_per_s_ratio", "after it")),
        f"snapshot (a store forks a child to write it out): throughput\n{_WHISKERS}\n"
        "below the names: time until 100 % PMD-mapped again", "higher",
        extra_label=back,
    )


def _snapshot_cost(ax, snap) -> None:
    def extra(v):
        values = sorted(v.get("extra_bytes") or [0])
        return f"+{values[len(values) // 2] / (1 << 20):.0f} MiB"

    _ratio_bars(
        ax, snap["series"]["variants"],
        (("during_p99_us_ratio", "p99 batch latency during"), ("extra_bytes_ratio", "extra memory")),
        f"snapshot: latency and extra memory\n{_WHISKERS}\nbelow the names: extra memory during the snapshot",
        "lower",
        extra_label=extra,
    )


def _pool_speed(ax, pool) -> None:
    _ratio_bars(
        ax, pool["series"]["variants"],
        (("lookups_ratio", "lookups per CPU-s"),),
        f"read-only multiprocessing pool: lookups\n{_WHISKERS}", "higher",
        extra_label=lambda v: f"huge {100 * v['worker_huge_after']:.0f} %",
    )


def _pool_cost(ax, pool) -> None:
    _ratio_bars(
        ax, pool["series"]["variants"],
        (("startup_ratio", "pool start-up time"), ("pss_ratio", "memory, parent + workers")),
        f"pool: start-up and memory\n{_WHISKERS}", "lower",
    )


PANELS = (
    ("coverage", _coverage_panel),
    ("tlb", _tlb_panel),
    ("service", _service_speed),
    ("service", _service_cost),
    ("snapshot", _snapshot_speed),
    ("snapshot", _snapshot_cost),
    ("pool", _pool_speed),
    ("pool", _pool_cost),
)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m benchmarks.plot RESULTS.json OUT.png", file=sys.stderr)
        return 2
    opener = gzip.open if argv[0].endswith(".gz") else open
    with opener(argv[0], "rt") as f:
        plot(json.load(f), argv[1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
