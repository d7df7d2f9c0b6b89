#!/usr/bin/env python3
"""Dense attention decode baseline on the GPU: one query token per sequence attending to all S
cached tokens with PyTorch's scaled_dot_product_attention (GQA), bf16, the paper's head shapes
(H 64, G 4, dk 192, dv 128). Median ms over CUDA-graph replays, and the bytes it must read."""
import argparse
import csv

import torch
import torch.nn.functional as F


def time_ms(fn, iters=50):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--S_list", default="8192,16384,32768,65536")
    ap.add_argument("--B_list", default="1,16")
    ap.add_argument("--csv", default="")
    a = ap.parse_args()
    H, G, dk, dv = 64, 4, 192, 128
    rows = []
    print(f"{'B':>4} {'S':>7} {'ms_dense':>10} {'MB':>9} {'GB/s':>8}")
    for B in map(int, a.B_list.split(",")):
        for S in map(int, a.S_list.split(",")):
            q = torch.randn(B, H, 1, dk, device="cuda", dtype=torch.bfloat16)
            k = torch.randn(B, G, S, dk, device="cuda", dtype=torch.bfloat16)
            v = torch.randn(B, G, S, dv, device="cuda", dtype=torch.bfloat16)
            ms = time_ms(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True))
            mb = B * G * S * (dk + dv) * 2 / 1e6
            rows.append({"B": B, "S": S, "ms_dense": f"{ms:.4f}", "bytes": int(mb * 1e6)})
            print(f"{B:>4} {S:>7} {ms:>10.4f} {mb:>9.1f} {mb / ms:>8.0f}")
            del q, k, v
    if a.csv:
        with open(a.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)


if __name__ == "__main__":
    main()
