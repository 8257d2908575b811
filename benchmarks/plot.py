"""The PNG of a benchmark run: coverage after fork, and the TLB-workload ratios.

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
    """Draw the two panels of ``document`` (a results JSON object) into ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    host = document["host"]
    fig.suptitle(
        f"thpguard {document['thpguard']}, Linux {host['kernel']}, {host['cpu']} x{host['cpus']}, "
        f"{document['date'][:10]}{' (quick)' if document.get('quick') else ''}",
        fontsize=9,
    )

    cov = _result(document, "coverage")
    if cov:
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
    else:
        left.text(0.5, 0.5, "coverage benchmark not run", ha="center", transform=left.transAxes)

    tlb = _result(document, "tlb")
    if tlb:
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
    else:
        right.text(0.5, 0.5, "tlb benchmark not run", ha="center", transform=right.transAxes)

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
