#!/usr/bin/env python3
"""PyTorch peer for `r2scp bench retrieve --torch-python PY` (CPU or CUDA).

The unfused two-liner users write for cosine top-n, on the SAME raw f32 data the Rust bench
wrote: the bank is L2-normalised once (not timed), then each timed call is
`s = q @ keys.T; s.topk(n, dim=1)` with the queries normalised inside the call (r2scp
normalises them inside `cosine_topk` too). Keys and queries are cast to the bench's key dtype
(f32, f16, bf16), as r2scp reads them; fp32 matmuls keep PyTorch's default (no TF32).

One run serves one (M, D) bank: every dtype in --dtypes and every batch size in --b, with
the queries for batch size B in `<queries-prefix><B>.f32`. Timing: CUDA events around each
call after a warm-up (best of --reps) on CUDA, `time.perf_counter` on the CPU.
Prints one JSON line per cell: {"dtype": "f32", "B": 64, "best_seconds": ..., "M": ..., "D": ...}.
A failure prints one line `torch_peer: ...` to stderr and exits 1.

Never a crate dependency: the GPU lane uses the machine's python3 with PyTorch; on the CPU,
a throwaway venv (`python3 -m venv .venv-torch && .venv-torch/bin/pip install torch numpy`).
"""
import argparse
import json
import sys
import time

DTYPES = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}


def best_time(fn, reps, device):
    import torch

    fn()  # warm-up (cuBLAS handles, kernel selection)
    best = float("inf")
    for _ in range(max(1, reps)):
        if device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            best = min(best, start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--keys", required=True, help="raw little-endian f32 [M, D]")
    p.add_argument("--queries-prefix", required=True, help="queries for B are PREFIX<B>.f32")
    p.add_argument("--m", type=int, required=True)
    p.add_argument("--d", type=int, required=True)
    p.add_argument("--b", required=True, help="comma list of batch sizes")
    p.add_argument("--dtypes", required=True, help="comma list of f32, f16, bf16")
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    a = p.parse_args()

    import numpy as np
    import torch

    if a.threads > 0:
        torch.set_num_threads(a.threads)
    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("torch_peer: --device cuda but torch.cuda.is_available() is False")
    device = torch.device(a.device)
    for name in a.dtypes.split(","):
        if name not in DTYPES:
            raise SystemExit(f"torch_peer: dtype `{name}` is not one of f32, f16, bf16")
    keys32 = torch.from_numpy(np.fromfile(a.keys, dtype=np.float32).reshape(a.m, a.d))
    # Normalised once on the device in f32, then cast per dtype: the bank is the index.
    keys32 = torch.nn.functional.normalize(keys32.to(device), dim=1)
    for name in a.dtypes.split(","):
        dt = getattr(torch, DTYPES[name])
        keys = keys32.to(dt)
        for b in (int(x) for x in a.b.split(",")):
            q = torch.from_numpy(
                np.fromfile(f"{a.queries_prefix}{b}.f32", dtype=np.float32).reshape(b, a.d)
            ).to(device)

            def call(q=q, keys=keys, dt=dt):
                qn = torch.nn.functional.normalize(q, dim=1).to(dt)
                return (qn @ keys.T).topk(min(a.n, a.m), dim=1)

            secs = best_time(call, a.reps, device)
            print(json.dumps({"dtype": name, "B": b, "best_seconds": secs, "M": a.m, "D": a.d}))
        del keys
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    try:
        main()
    except SystemExit:
        raise
    except Exception as e:  # one line, no traceback: the bench prints it per cell
        print(f"torch_peer: {type(e).__name__}: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(1)
