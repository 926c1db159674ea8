#!/usr/bin/env python3
"""Draws the added latency by percentile for each proxy from benches/proxy.rs's JSON results.

Usage: plot-bench.py RESULTS.json OUT.png
One panel per protocol and rate; one line per proxy. The y axis is logarithmic, so added
latencies at or below zero (within the noise of the direct path) are drawn at 0.01 ms.
"""
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PERCENTILES = ["p50", "p90", "p99", "p99.9", "max"]
FLOOR_MS = 0.01
STYLE = {"meshkeep": ("tab:blue", "o"), "haproxy": ("tab:orange", "s"), "nginx": ("tab:green", "^")}


def main(results_path: str, out_path: str) -> None:
    with open(results_path) as f:
        results = json.load(f)
    rows = results["latency"]
    modes = sorted({r["mode"] for r in rows})
    rates = sorted({r["rate"] for r in rows})
    fig, axes = plt.subplots(
        len(modes), len(rates), figsize=(4.2 * len(rates), 3.4 * len(modes)), squeeze=False, sharey=True
    )
    for i, mode in enumerate(modes):
        for j, rate in enumerate(rates):
            ax = axes[i][j]
            for row in rows:
                if row["mode"] != mode or row["rate"] != rate:
                    continue
                color, marker = STYLE.get(row["proxy"], (None, "x"))
                values = [max(row["added_ms"][p], FLOOR_MS) for p in PERCENTILES]
                ax.plot(PERCENTILES, values, label=row["proxy"], color=color, marker=marker)
            ax.set_yscale("log")
            ax.set_title(f"{mode}, {rate} req/s", fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
            if j == 0:
                ax.set_ylabel("added latency (ms)")
    axes[0][0].legend()
    fig.suptitle(
        f"Added latency over direct, two proxies with mTLS between them ({results['machine']}; "
        f"median of {results['runs']} runs of {results['seconds']} s)",
        fontsize=10,
    )
    fig.tight_layout()
    os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
    fig.savefig(out_path, dpi=110)
    print(f"plot: {out_path}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
