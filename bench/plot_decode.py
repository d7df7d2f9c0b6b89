#!/usr/bin/python3
"""Plots a decode CSV from `nsa bench decode --csv`: ms per step per branch against context S,
and per-step reads actual against expected. Usage: bench/plot_decode.py IN.csv OUT.png [title]"""
import csv
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main() -> int:
    if len(sys.argv) not in (3, 4):
        print(__doc__, file=sys.stderr)
        return 2
    with open(sys.argv[1], newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        print(f"plot_decode: {sys.argv[1]} has no rows", file=sys.stderr)
        return 1
    S = [int(r["S"]) for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for col, label in [("ms_total", "total"), ("ms_cmp", "cmp only"), ("ms_sel", "sel only"), ("ms_win", "win only")]:
        ax1.plot(S, [float(r[col]) for r in rows], marker="o", label=label)
    ax1.set_xscale("log", base=2)
    ax1.set_xlabel("context S (tokens)")
    ax1.set_ylabel("ms per decode step (mean)")
    ax1.set_title("decode latency per branch")
    ax1.grid(True, alpha=0.3)
    ax1.legend()
    ax2.plot(S, [int(r["reads_actual"]) for r in rows], marker="o", label="actual (measured)")
    ax2.plot(S, [int(r["reads_expected"]) for r in rows], marker="s", linestyle="--", label="expected (formula)")
    ax2.set_xscale("log", base=2)
    ax2.set_xlabel("context S (tokens)")
    ax2.set_ylabel("tokens read per step, per (sequence, group)")
    ax2.set_title("reads at the last timed step")
    ax2.grid(True, alpha=0.3)
    ax2.legend()
    if len(sys.argv) == 4:
        fig.suptitle(sys.argv[3])
    fig.tight_layout()
    fig.savefig(sys.argv[2], dpi=110)
    return 0


if __name__ == "__main__":
    sys.exit(main())
