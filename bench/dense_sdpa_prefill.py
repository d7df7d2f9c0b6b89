#!/usr/bin/env python3
"""Dense causal attention prefill baseline on the GPU (the reference of issue 5): PyTorch's
scaled_dot_product_attention with the flash backend, bf16, the paper's head shapes (H 64,
G 4, dk 192, dv 128), B = 1. Flash needs one head dim for q, k and v, so v is padded from 128
to 192 with zeros; the TFLOP/s count the unpadded work (causal: half of the T x T products)."""
import argparse
import csv

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from dense_sdpa_decode import time_ms  # median of CUDA-graph replays, same method as decode


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--T_list", default="8192,16384,32768,65536")
    ap.add_argument("--heads", type=int, default=64)
    ap.add_argument("--dk", type=int, default=192)
    ap.add_argument("--dv", type=int, default=128)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--csv", default=None)
    a = ap.parse_args()
    rows = []
    print(f"{'T':>8} {'ms_dense':>10} {'TFLOP/s':>9}  backend")
    for T in [int(t) for t in a.T_list.split(",")]:
        dev, dt = "cuda", torch.bfloat16
        q = torch.randn(1, a.heads, T, a.dk, device=dev, dtype=dt)
        k = torch.randn(1, a.heads, T, a.dk, device=dev, dtype=dt)  # GQA keys, one per head
        v = torch.zeros(1, a.heads, T, a.dk, device=dev, dtype=dt)
        v[..., : a.dv] = torch.randn(1, a.heads, T, a.dv, device=dev, dtype=dt)
        backend = "flash"
        try:
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                ms = time_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), a.iters)
        except RuntimeError:
            backend = "default"
            ms = time_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), a.iters)
        flops = 2.0 * a.heads * (T * (T + 1) / 2) * (a.dk + a.dv)
        tflops = flops / (ms * 1e-3) / 1e12
        print(f"{T:>8} {ms:>10.3f} {tflops:>9.1f}  {backend}", flush=True)
        rows.append({"T": T, "ms_dense": f"{ms:.4f}", "tflops": f"{tflops:.1f}", "backend": backend})
        del q, k, v
        torch.cuda.empty_cache()
    if a.csv:
        with open(a.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
            w.writeheader()
            w.writerows(rows)


if __name__ == "__main__":
    main()
