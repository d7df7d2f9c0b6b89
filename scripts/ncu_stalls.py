#!/usr/bin/env python3
"""Warp-stall samples of an Nsight Compute source-page CSV (ncu --page source --csv
--print-source cuda,sass), per kernel and per source line.

Usage: ncu_stalls.py FILE.csv[.gz] [KERNEL_SUBSTRING] [TOP_LINES]
"""
import collections
import csv
import gzip
import sys


def rows(path):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        yield from csv.reader(f)


def main():
    path = sys.argv[1]
    want = sys.argv[2] if len(sys.argv) > 2 else ""
    top = int(sys.argv[3]) if len(sys.argv) > 3 else 25
    per_kernel = collections.defaultdict(collections.Counter)
    per_line = collections.Counter()
    line_reasons = collections.defaultdict(collections.Counter)
    text = {}
    file = kernel = header = None
    for row in rows(path):
        if not row:
            continue
        if row[0] == "File Path":
            file = row[1].split("/")[-1]
        elif row[0] == "Function Name":
            kernel = row[1].split("(")[0]
        elif row[0] == "Line No":
            header = row
        elif row[0] and len(row) > 4 and row[2] == "-" and header:  # a source line
            for i, name in enumerate(header):
                if not name.startswith("stall_") or "(Not" in name:
                    continue
                try:
                    n = int(row[i])
                except ValueError:
                    continue
                per_kernel[kernel][name[6:]] += n
                if want in kernel:
                    key = (file, int(row[0]))
                    per_line[key] += n
                    line_reasons[key][name[6:]] += n
                    text[key] = row[1][:80]
    for kernel, reasons in per_kernel.items():
        total = sum(reasons.values()) or 1
        top_reasons = ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in reasons.most_common(6))
        print(f"{kernel}: {total} samples: {top_reasons}")
    total = sum(per_line.values()) or 1
    print(f"\nlines of kernels matching '{want}' ({total} samples)")
    for key, n in per_line.most_common(top):
        why = ", ".join(f"{k} {v}" for k, v in line_reasons[key].most_common(3) if v)
        print(f"{n:6d} {100 * n / total:5.1f}%  {key[0]}:{key[1]}  {text[key]}  [{why}]")


if __name__ == "__main__":
    main()
