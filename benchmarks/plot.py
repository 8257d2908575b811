"""The PNG of a benchmark run: one panel per benchmark with a figure
(coverage after fork, TLB-workload ratios, the service and the snapshot).

``python -m benchmarks.plot RESULTS.json OUT.png`` redraws it from the JSON
that ``python -m benchmarks --json`` wrote. Needs matplotlib (the ``bench``
extra).
"""

from __future__ import annotations

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
    fig.tight_layout()
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


def _ratio_bars(ax, variants, metrics, title, ylabel, extra_label=None) -> None:
    """Grouped bars, one group per variant (4 KiB first, drawn as the
    baseline line), one bar per metric; error bars span the rounds."""
    shown = [v for v in variants if v["variant"] != "4k"]
    width = 0.8 / len(metrics)
    for k, (key, name) in enumerate(metrics):
        xs, mids, lows, highs = [], [], [], []
        for i, v in enumerate(shown):
            if not v.get("available") or key not in v:
                continue
            mid, low, high = spread(v[key])
            xs.append(i + (k - (len(metrics) - 1) / 2) * width)
            mids.append(mid)
            lows.append(low)
            highs.append(high)
        bars = ax.bar(xs, mids, width, yerr=[lows, highs], capsize=3, label=name)
        ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=2)
    ax.axhline(1.0, color="black", linewidth=0.9, linestyle="--", label="baseline: 4 KiB pages (= 1)")
    labels = []
    for i, v in enumerate(shown):
        label = v["label"].replace("thpguard ", "").replace(", no thpguard", "\n(no thpguard)")
        label = label.replace(" (", "\n(", 1) if "\n" not in label else label
        if not v.get("available"):
            ax.text(i, 1.05, "not\navailable", ha="center", va="bottom", fontsize=7, color="gray")
            label += "\n[n/a]"
        elif extra_label:
            label += "\n" + extra_label(v)
        labels.append(label)
    ax.set_xticks(range(len(shown)))
    # Bars set the limits: without this a last variant that is not available sits on the edge.
    ax.set_xlim(-0.6, len(shown) - 0.4)
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    # Below the variant names, so it never hides a bar or its label.
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.24), ncol=3, frameon=False)
    ax.set_ylim(bottom=0)


def _service_panel(ax, service) -> None:
    _ratio_bars(
        ax, service["series"]["variants"],
        (("rps_ratio", "requests/s"), ("per_cpu_ratio", "requests per worker CPU-s"), ("p99_ratio", "p99 latency"),
         ("pss_ratio", "memory (PSS)")),
        "gunicorn --preload, 2 workers: ratio to 4 KiB pages (bars: median; whiskers: min-max of rounds)",
        "ratio to 4 KiB pages, same round",
        extra_label=lambda v: f"huge {100 * v['worker_huge_after']:.0f} %",
    )
    ax.title.set_fontsize(8)


def _snapshot_panel(ax, snap) -> None:
    def back(v):
        times = [t for t in v["back_to_huge_s"] if t is not None]
        extra = sorted(v.get("extra_bytes") or [0])[len(v.get("extra_bytes") or [0]) // 2]
        text = f"extra {extra / (1 << 20):.0f} MiB\n"
        if len(times) < len(v["back_to_huge_s"]):
            return text + "not huge again"
        return text + f"huge again {sorted(times)[len(times) // 2]:.1f} s"

    _ratio_bars(
        ax, snap["series"]["variants"],
        (("during_ops_per_s_ratio", "ops per CPU-s during snapshot"), ("after_ops_per_s_ratio", "ops per CPU-s after"),
         ("during_p99_us_ratio", "p99 batch latency during")),
        "store forking a snapshot child: ratio to 4 KiB pages (bars: median; whiskers: min-max);\n"
        "below each variant: extra memory (PSS) during the snapshot, time back to 100 % PMD-mapped",
        "ratio to 4 KiB pages, same round",
        extra_label=back,
    )
    ax.title.set_fontsize(8)


def _pool_panel(ax, pool) -> None:
    _ratio_bars(
        ax, pool["series"]["variants"],
        (("lookups_ratio", "lookups per CPU-s"), ("pss_ratio", "memory (PSS)")),
        "read-only multiprocessing pool: ratio to 4 KiB pages (bars: median; whiskers: min-max)",
        "ratio to 4 KiB pages, same round",
        extra_label=lambda v: f"huge {100 * v['worker_huge_after']:.0f} %",
    )
    ax.title.set_fontsize(8)


PANELS = (
    ("coverage", _coverage_panel),
    ("tlb", _tlb_panel),
    ("service", _service_panel),
    ("snapshot", _snapshot_panel),
    ("pool", _pool_panel),
)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m benchmarks.plot RESULTS.json OUT.png", file=sys.stderr)
        return 2
    with open(argv[0]) as f:
        plot(json.load(f), argv[1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
