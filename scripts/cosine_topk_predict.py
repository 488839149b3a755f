#!/usr/bin/env python3
"""Predicted H200 time of cosine_topk's GEMM + select path per baseline cell (issue 23).

No GPU was lent when this was written: every figure is arithmetic from the stated rates, the
plan (src/retrieve/cosine_topk/gemm_select.rs `plan`, mirrored below) and the select kernel's
SASS (instructions per 128-column warp step, docs/DESIGN.md "GEMM + select path"), to be held
against the first measurement (`scripts/gpu-lane run`). Each rate is a (fast, slow) pair, so
every prediction is a range. Prints two markdown tables: the baseline cells, and the
crossovers behind the default dispatch rule (B = 16, D = 32) against a roofline of the
bandwidth kernel.

    python3 scripts/cosine_topk_predict.py
"""

# Rates (leads: ../shared/gpu/H200-baseline-2026-11-29.md and static-review-2026-12-05.md),
# (fast, slow). SMS, CLOCK, HBM and L2_RATE are the H200 rates of every prediction in the
# repository: scripts/sass-report imports them for its bandwidth-kernel and tensor-core
# predictions, so the three paths are predicted from one set of rates.
SMS = 132
CLOCK = (1.85e9, 1.75e9)          # SM clock under load, Hz (the static review's range)
L2_BYTES = 50 << 20               # what the plan sizes chunks from (cudaDevAttrL2CacheSize)
HBM = (4.3e12, 3.85e12)           # bytes/s, bank reads: ~90% of the 4.8 TB/s datasheet, and
                                  # what torch's B = 1 scan (cuBLAS) reached on this card
PEAK = {"bf16": 790e12, "f16": 790e12, "f32": 395e12}  # tensor FLOP/s (tf32 = half of bf16)
GEMM_EFF = (0.75, 0.55)           # cuBLAS share of the tensor peak, large GEMMs
L2_RATE = (8e12, 5.5e12)          # bytes/s, L2 to SMs (the select's reads, the GEMM's writes)
SELECT_INSTR = 57                 # warp instructions per 128-column step (sm_90 SASS, no hits)
IPC = (3.0, 2.0)                  # warp instructions issued per clock per SM, sustained
HOST_PER_CHUNK = (8e-6, 15e-6)    # s: cublasGemmEx + one kernel launch, enqueued by the host
FIXED = (25e-6, 60e-6)            # s: prep, rescoring, fallback (empty), finish
ELT = {"f32": 4, "f16": 2, "bf16": 2}
CUDA_CORE = 67e12                 # f32 FMA FLOP/s of the H200's CUDA cores (132 x 128 x 2 x 1.98 GHz)
CORE_EFF = (0.7, 0.5)             # share of it the bandwidth kernel's q8/q16/q32 reach

# The baseline's cells: (M, D, B, keys, torch ms measured on the H200, 2026-11-29).
CELLS = [
    (1_000_000, 256, 1, "f32", 0.428),
    (1_000_000, 256, 1, "bf16", 0.233),
    (1_000_000, 256, 64, "f32", 1.806),
    (1_000_000, 256, 1024, "f32", 24.36),
    (1_000_000, 256, 1024, "bf16", 8.255),
    (1_000_000, 1024, 1, "f32", 1.071),
    (1_000_000, 1024, 64, "bf16", 1.137),
    (1_000_000, 1024, 1024, "f32", 52.08),
    (1_000_000, 1024, 1024, "bf16", 10.06),
    (10_000_000, 256, 1, "f32", 2.663),
    (10_000_000, 256, 1, "bf16", 1.364),
    (10_000_000, 256, 16, "f32", 7.125),
    (10_000_000, 256, 64, "f16", 6.176),
    (10_000_000, 256, 256, "bf16", 23.80),
]


def chunk_rows(b, m, d, elt):
    """gemm_select::plan: scores (4 B bytes a row) plus, above 256 queries, the keys, in half
    the L2; a multiple of 128 rows, at most M rounded up to 128."""
    per_row = 4 * b + (d * elt if b > 256 else 0)
    rows = max((L2_BYTES // 2 // per_row) // 128 * 128, 128)
    return min(rows, -(-m // 128) * 128)


def predict(m, d, b, keys, k):
    """Seconds for the k-th end of the range (0: fast, 1: slow) and the pieces."""
    elt = ELT[keys]
    flops = 2.0 * b * m * d
    gemm_compute = flops / (PEAK[keys] * GEMM_EFF[k])
    gemm_read = m * d * elt / HBM[k]
    gemm_write = 4.0 * b * m / L2_RATE[k]
    gemm = max(gemm_compute, gemm_read, gemm_write)
    select_bytes = 4.0 * b * m / L2_RATE[k]
    select_issue = b * m / 128.0 * SELECT_INSTR / (SMS * IPC[k] * CLOCK[k])
    select = max(select_bytes, select_issue)
    r = chunk_rows(b, m, d, elt)
    chunks = -(-m // r)
    device = gemm + select
    host = chunks * HOST_PER_CHUNK[k]
    total = max(device, host) + FIXED[k]
    bound = "host" if host > device else ("gemm" if gemm >= select else "select")
    return total, dict(gemm=gemm, select=select, chunks=chunks, rows=r, bound=bound,
                       gemm_kind="compute" if gemm == gemm_compute else
                       ("HBM" if gemm == gemm_read else "C write"))


def bandwidth(m, d, b, keys, k):
    """The bandwidth kernel as a roofline: the bank read once (q1..q32 cover B <= 32 with one
    query group) against B x M x D CUDA-core FMAs, plus its two launches."""
    reads = -(-b // 32)
    return max(reads * m * d * ELT[keys] / HBM[k],
               2.0 * b * m * d / (CUDA_CORE * CORE_EFF[k])) + (10e-6, 20e-6)[k]


def crossover():
    """The default rule's thresholds (kernel::choose: GEMM_MIN_B = 16, GEMM_MIN_D = 32)."""
    print()
    print("| M | D | B | keys | bandwidth kernel ms | GEMM + select ms |")
    print("|---|---|---|---|---:|---:|")
    for m, d, b, keys in [(1_000_000, 256, b, "bf16") for b in (4, 8, 16, 32, 64)] + \
            [(1_000_000, d, 1024, "bf16") for d in (8, 16, 32, 64)]:
        bw = [bandwidth(m, d, b, keys, k) * 1e3 for k in (0, 1)]
        gs = [predict(m, d, b, keys, k)[0] * 1e3 for k in (0, 1)]
        print(f"| {m // 1_000_000}M | {d} | {b} | {keys} | {bw[0]:.3f}-{bw[1]:.3f} | "
              f"{gs[0]:.3f}-{gs[1]:.3f} |")


def main():
    print("| M | D | B | keys | chunk rows x chunks | GEMM ms (bound) | select ms | bound by | "
          "predicted ms | torch ms (measured) | torch / predicted |")
    print("|---|---|---|---|---|---|---|---|---:|---:|---:|")
    for m, d, b, keys, torch in CELLS:
        lo, p = predict(m, d, b, keys, 0)
        hi, q = predict(m, d, b, keys, 1)
        print(f"| {m // 1_000_000}M | {d} | {b} | {keys} | {p['rows']} x {p['chunks']} | "
              f"{p['gemm'] * 1e3:.3f}-{q['gemm'] * 1e3:.3f} ({p['gemm_kind']}) | "
              f"{p['select'] * 1e3:.3f}-{q['select'] * 1e3:.3f} | {q['bound']} | "
              f"{lo * 1e3:.2f}-{hi * 1e3:.2f} | {torch} | {torch / (hi * 1e3):.1f}-{torch / (lo * 1e3):.1f}x |")
    crossover()


if __name__ == "__main__":
    main()
