#!/usr/bin/env python3
"""Median node durations and gaps of a repeated kernel sequence in an nsys cuda_gpu_trace CSV.

A step is the run of kernels from one launch of the first step kernel (prepare, short or fused
decode) to the next. The last `steps` steps whose kernel sequence is the most common one (the
graph replays) are summarised: per node, the median gap from the previous node's end to its
start, and its median duration; then the step's median span.
Usage: graph_timeline.py TRACE.csv [steps]
"""
import collections
import csv
import statistics
import sys

FIRST = ("nsa_prepare_kernel", "nsa_short_decode_kernel", "nsa_fused_decode_kernel")


def short_name(name):
    base = name.split("(")[0].split("<")[0].strip()
    return base.rsplit("::", 1)[-1] or name[:40]


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    path = sys.argv[1]
    keep = int(sys.argv[2]) if len(sys.argv) > 2 else 40
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as e:
        sys.exit(f"{path}: cannot read the trace ({e.strerror}); did nsys stats export it?")
    if not rows or "Start (ns)" not in rows[0] or "Duration (ns)" not in rows[0]:
        sys.exit(f"{path}: not an nsys cuda_gpu_trace CSV (no 'Start (ns)' / 'Duration (ns)')")
    kernels = []
    for r in rows:
        name = r.get("Name", "")
        if not name or name.startswith("[CUDA"):  # memcpy / memset rows
            continue
        kernels.append((int(r["Start (ns)"]), int(r["Duration (ns)"]), short_name(name)))
    kernels.sort()
    steps, cur = [], []
    for k in kernels:
        if k[2] in FIRST and cur:
            steps.append(cur)
            cur = []
        if k[2] in FIRST or cur:
            cur.append(k)
    if cur:
        steps.append(cur)
    if not steps:
        sys.exit(f"{path}: no step kernels ({', '.join(FIRST)}) in the trace")
    shapes = collections.Counter(tuple(k[2] for k in s) for s in steps)
    shape, _ = shapes.most_common(1)[0]
    picked = [s for s in steps if tuple(k[2] for k in s) == shape][-keep:]
    print(f"{len(picked)} steps of {len(shape)} kernels (the most common sequence of {len(steps)})")
    print(f"{'kernel':32s} {'gap us':>8s} {'dur us':>8s}")
    total_gap = total_dur = 0.0
    for i, name in enumerate(shape):
        durs = [s[i][1] / 1e3 for s in picked]
        gaps = [(s[i][0] - s[i - 1][0] - s[i - 1][1]) / 1e3 for s in picked] if i else [0.0]
        g, d = statistics.median(gaps), statistics.median(durs)
        total_gap += g
        total_dur += d
        print(f"{name:32s} {g:8.2f} {d:8.2f}")
    spans = [(s[-1][0] + s[-1][1] - s[0][0]) / 1e3 for s in picked]
    print(f"{'sum':32s} {total_gap:8.2f} {total_dur:8.2f}")
    print(f"step span (first start to last end), median: {statistics.median(spans):.2f} us")


if __name__ == "__main__":
    main()
