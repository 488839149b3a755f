#!/usr/bin/env python3
"""FAISS peer for `r2scp bench retrieve --faiss-python .venv-faiss/bin/python`.

Exact flat inner-product search (IndexFlatIP) on L2-normalised vectors, i.e. cosine
top-n, on the SAME raw f32 data the Rust bench wrote. Never a crate dependency: run it
from a throwaway venv:

    python3 -m venv .venv-faiss && .venv-faiss/bin/pip install faiss-cpu numpy

Threads: --threads (the bench passes its rayon pool size), OMP_WAIT_POLICY=PASSIVE.
For B > 1 `faiss.cvar.distance_compute_blas_threshold` is set to 1 so FAISS takes its
BLAS (sgemm) path; its default dispatch below the threshold scans the bank once per query.
Prints one JSON line: {"best_seconds": ..., "B": ..., "M": ..., "D": ..., "n": ...}.
Normalisation and index construction are not timed; only index.search is.
"""
import argparse
import json
import os
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import faiss  # noqa: E402
import numpy as np  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--keys", required=True)
    p.add_argument("--queries", required=True)
    p.add_argument("--m", type=int, required=True)
    p.add_argument("--d", type=int, required=True)
    p.add_argument("--b", type=int, required=True)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()

    faiss.omp_set_num_threads(a.threads)
    if a.b > 1:
        faiss.cvar.distance_compute_blas_threshold = 1
    keys = np.fromfile(a.keys, dtype=np.float32).reshape(a.m, a.d)
    queries = np.fromfile(a.queries, dtype=np.float32).reshape(a.b, a.d)
    faiss.normalize_L2(keys)
    faiss.normalize_L2(queries)
    index = faiss.IndexFlatIP(a.d)
    index.add(keys)
    index.search(queries, a.n)  # warm-up
    best = float("inf")
    for _ in range(max(1, a.reps)):
        t = time.perf_counter()
        index.search(queries, a.n)
        best = min(best, time.perf_counter() - t)
    print(json.dumps({"best_seconds": best, "B": a.b, "M": a.m, "D": a.d, "n": a.n}))


if __name__ == "__main__":
    main()
