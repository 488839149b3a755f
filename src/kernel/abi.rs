// The host/device ABI of every kernel in kernels/, declared once.
//
// This file holds only the `r2_abi!` declaration. It is read twice:
// - by src/kernel/mod.rs, whose `r2_abi!` turns it into Rust: a `pub const` per constant and a
//   `#[repr(C)]` argument struct per kernel family (`KernelArgs`, `DeviceRepr` with `cuda`);
// - by build.rs (`include!`), whose `r2_abi!` turns it into `r2_abi.h`: a `#define` per
//   constant and the mirror C struct, which every `kernels/*.cu` includes through common.cuh.
// A kernel takes its struct by value; the cudarc launch and the emulated launch pass the same
// bytes, so an argument cannot be out of order on one side only.
//
// Two sections: `consts` (NAME: u32|f32 = literal;) and `structs` (Name("entry") { fields }).
// Field kinds: `ptr T` (const T*), `mut_ptr T` (T*), `u32`, `f32`; `T` is f32, u32 or `elem`
// (`const void*`: the storage type is the entry point's dtype suffix, `_f32`, `_f16`, `_bf16`).

r2_abi! {
    consts {
        /// The epsilon of paper Eq. 1 in every cosine of the crate (retrieval and CAP):
        /// `cos = a.b / (|a| |b| + COS_EPS)`, so a zero vector has cosine 0, never NaN.
        COS_EPS: f32 = 1e-8;
        /// Index of a padding entry in every top-k list: ranks below every real entry.
        PAD_INDEX: u32 = 0xffffffff;
        /// Most lists one block keeps in the streaming top-k of kernels/topk.cuh (hit counters
        /// are `3 * TOPK_MAXQ` words of shared memory).
        TOPK_MAXQ: u32 = 8;
        /// Device error code: a NaN score (error word 1 = query, word 2 = bank row).
        ERR_NAN_SCORE: u32 = 1;
        /// Device error code: an `exclude` entry that is neither a bank row nor `PAD_INDEX`
        /// (word 1 = query, word 2 = the entry).
        ERR_BAD_EXCLUDE: u32 = 2;
        /// Device error code: a query excludes a row and `n` = M, one more than the rows left
        /// (word 1 = query, word 2 = the excluded row).
        ERR_FEW_ROWS: u32 = 3;

        /// Threads per block of both cosine_topk kernels (4 warps).
        CT_THREADS: u32 = 128;
        /// Bank rows per tile of `cosine_topk_partial_*` (every configuration): the rows whose
        /// scores are offered to the running lists together.
        CT_TILE_ROWS: u32 = 128;
        /// Depth of the partial kernel's copy pipeline (shared-memory stages; two in flight
        /// while the third is scored).
        CT_STAGES: u32 = 3;
        /// Most queries one `cosine_topk_partial_*` block scores together (configuration q32).
        CT_QB_MAX: u32 = 32;
        /// Slices of the canonical |q| (`cosine_topk_qnorm` in kernels/cosine_topk.cu): every
        /// cosine_topk kernel sums a query's squares in this order, so scores do not depend on
        /// the batch size or the path. The partial kernels keep them in their hit buffers,
        /// which hold `2 * hb >= CT_QN_SLICES` floats per query.
        CT_QN_SLICES: u32 = 32;
        /// Candidates per tile of `cosine_topk_merge`.
        CT_MERGE_TILE: u32 = 1024;
        /// Blocks per multiprocessor the partial kernels' `__launch_bounds__` guarantee
        /// registers for (at most 65536 / (128 * 4) = 128 registers a thread).
        CT_MIN_BLOCKS: u32 = 4;
        /// Most key bytes per row and pipeline step of the partial kernels (a power of two; each
        /// thread copies `kb / 16` chunks per step).
        CT_KB_MAX: u32 = 512;

        /// Threads per block of the tensor-core pass `cosine_topk_tc_*` (8 warps, each owning a
        /// 32 x 64 piece of the 128 x 128 score tile).
        TC_THREADS: u32 = 256;
        /// Blocks per multiprocessor the pass's `__launch_bounds__` guarantee registers for (at
        /// most 65536 / (256 * 2) = 128 registers a thread).
        TC_MIN_BLOCKS: u32 = 2;
        /// Queries per block of `cosine_topk_tc_{f32,f16,bf16}` (the block's query tile).
        TC_BQ: u32 = 128;
        /// Bank rows per tile of `cosine_topk_tc_{f32,f16,bf16}`.
        TC_BK: u32 = 128;
        /// Bytes of one operand row per pipeline stage (a k-slice: 32 16-bit or 16 f32 elements,
        /// two 32-byte k-steps of the mma); also the stage's row stride (chunks XOR-swizzled).
        TC_SLICE_BYTES: u32 = 64;
        /// Shared-memory stages of the pass's cp.async pipeline (two slices in flight while one
        /// is multiplied).
        TC_STAGES: u32 = 3;
        /// Scores per query and tile the pass buffers for insertion into the query's threshold
        /// list (more only leave the list lower; every candidate is still written).
        TC_HITS: u32 = 8;
        /// Longest per-query threshold list of the tensor-core pass: the largest n it serves
        /// (the first tile's 8 holders of a query's 128 scores seed the list with ceil(n / 8)
        /// each).
        TC_NL_MAX: u32 = 128;
        /// Candidates per tile of `cosine_topk_rescore_*`'s approximate selection (small, so
        /// that the rescoring's shared memory stays under the 48 KiB default for every n).
        TC_RESCORE_TILE: u32 = 256;

        /// Threads per block of `cosine_topk_prep_*` (one warp per query row).
        RS_THREADS: u32 = 128;
        /// Blocks per multiprocessor a plan counts without the driver for `cosine_topk_rescore_*`,
        /// `cosine_topk_fallback_*` and `cosine_topk_finish` (`CT_THREADS` threads, so at most
        /// 128 registers a thread). Not a launch bound: one raised ptxas's allocation (rescore
        /// 40 -> 72, fallback 36 -> 80 registers on sm_90) and lowered the real occupancy;
        /// `scripts/sass-report` fails if ptxas goes above what this count assumes (it uses 25-40).
        RS_MIN_BLOCKS: u32 = 4;
        /// Blocks of `cosine_topk_fallback_*` per bank chunk and of `cosine_topk_finish` (flagged
        /// queries beyond it are taken in turns).
        RS_SLOTS: u32 = 8;
        /// Threads per block of `cosine_topk_gemm_select` (4 warps: 4 queries sharing columns).
        GS_THREADS: u32 = 128;
        /// Blocks per multiprocessor a plan counts without the driver for
        /// `cosine_topk_gemm_select` (at most 128 registers a thread; ptxas uses 80): 16 warps per
        /// SM. Not a launch bound (one raised ptxas's allocation to 86); `scripts/sass-report`
        /// holds ptxas under it.
        GS_MIN_BLOCKS: u32 = 4;
        /// Longest running list of `cosine_topk_gemm_select` (the largest n the GEMM + select
        /// path serves).
        GS_NL_MAX: u32 = 256;

        /// Longest row the one-warp top-k (`r2_warp_topk`) serves: 32 lanes of 8 register slots.
        TOPK_WARP_MAX_L: u32 = 256;
        /// Largest k the one-warp top-k serves (k rounds of 5 shuffles).
        TOPK_WARP_MAX_K: u32 = 32;
        /// Threads per block of `topk_rows` (2 warps: the rows are short).
        CAP_TOPK_THREADS: u32 = 64;
        /// Threads per block of `dissonance_topk_{f32,f16,bf16}` (the scoring and selection pass).
        DIS_THREADS: u32 = 128;
        /// Tokens one warp of `dissonance_topk_*` scores together (their loads in flight at once).
        DIS_ROWS_PER_WARP: u32 = 2;
        /// 16-byte vectors per token a lane of `dissonance_topk_*` loads before its first FMA.
        DIS_UNROLL: u32 = 4;
        /// Threads per block of `dissonance_topk_anchor_*` (its warps split the context tokens).
        DIS_ANCHOR_THREADS: u32 = 128;
        /// Output rows per block of the `gather_inject` kernels (one warp each).
        GI_ROWS_PER_BLOCK: u32 = 8;
    }

    structs {
        /// `cosine_topk_partial_q{1,8,16,32}_{f32,f16,bf16}`: block (x, y) scores bank rows
        /// `[y * chunk_rows, (y + 1) * chunk_rows)` against queries `[x * qb, (x + 1) * qb)` (qb =
        /// 1, 8, 16 or 32, the entry's configuration) and writes its best `kp` (score, row) pairs
        /// per query, sorted, to `cand_*[(query * gy + y) * kp ..]`.
        CosineTopkPartialArgs("cosine_topk_partial") {
            /// [B, D] f32 queries.
            q: ptr f32,
            /// [M, D] bank keys in the entry's dtype.
            keys: ptr elem,
            /// \[M\] f32 key norms.
            key_norms: ptr f32,
            /// \[B\] bank row each query skips (`PAD_INDEX` = none); null = no exclusion.
            /// Checked on the device (`ERR_BAD_EXCLUDE`, `ERR_FEW_ROWS`).
            exclude: ptr u32,
            b: u32,
            m: u32,
            d: u32,
            /// Results wanted per query (for the `ERR_FEW_ROWS` check).
            n: u32,
            /// Running-list length (a power of two >= n).
            kp: u32,
            /// Hit-buffer length per query (a power of two >= kp).
            hb: u32,
            /// Key bytes per row and pipeline stage (a power of two, 16 to `CT_KB_MAX`). Rows of
            /// `keys` and `q` are 16-byte aligned (the op stages other inputs to such a copy).
            kb: u32,
            /// Bank rows per block (a multiple of `CT_TILE_ROWS`).
            chunk_rows: u32,
            /// [B, gy, kp] candidate scores.
            cand_s: mut_ptr f32,
            /// [B, gy, kp] candidate rows.
            cand_i: mut_ptr u32,
            /// \[3\] error word (code, detail, detail), zeroed before the launch.
            err: mut_ptr u32,
        }

        /// `cosine_topk_merge`: one block per query merges its `ncand` candidates (sorted runs of
        /// `kp`) into the top `n`; every score of the call is NaN when the error word is set.
        CosineTopkMergeArgs("cosine_topk_merge") {
            /// [B, ncand] candidate scores.
            cand_s: ptr f32,
            /// [B, ncand] candidate rows.
            cand_i: ptr u32,
            ncand: u32,
            kp: u32,
            n: u32,
            /// \[3\] error word the partial kernel wrote.
            err: ptr u32,
            /// [B, n] scores, descending.
            out_s: mut_ptr f32,
            /// [B, n] rows.
            out_i: mut_ptr u32,
        }

        /// `cosine_topk_tc_{f32,f16,bf16}`: block (x, y) multiplies query tile x (`TC_BQ` rows of
        /// `qhat`) with bank rows `[y * chunk_rows, (y + 1) * chunk_rows)` on the tensor cores, tile
        /// by tile (`TC_BK` rows), and appends every (approximate score, row) that reaches its
        /// query's threshold less `margin` to the query's candidate list (`count` entries, the
        /// first `capq` stored). Never writes the B x M scores.
        CosineTopkTcArgs("cosine_topk_tc") {
            /// [rows, d_pad] unit queries (from `cosine_topk_prep`).
            qhat: ptr elem,
            /// \[B\] f32 `COS_EPS / |q|`.
            qeps: ptr f32,
            /// [M, D] bank keys in the entry's dtype (rows 16-byte aligned).
            keys: ptr elem,
            /// \[M\] f32 key norms.
            key_norms: ptr f32,
            /// \[B\] bank row each query skips (`PAD_INDEX` = none); null = no exclusion. Entries
            /// are checked by `cosine_topk_prep`.
            exclude: ptr u32,
            b: u32,
            m: u32,
            d: u32,
            d_pad: u32,
            n: u32,
            /// Threshold-list length: the next power of two >= n, at least 32, at most `TC_NL_MAX`.
            nl: u32,
            /// Bank rows per block (a multiple of `TC_BK`).
            chunk_rows: u32,
            /// Candidate capacity per query.
            capq: u32,
            /// Twice the bound on |approximate - exact score| (docs/DESIGN.md).
            margin: f32,
            /// \[B\] order-preserving u32 keys of the best threshold any block has published
            /// (0 = none yet), zeroed before the launch.
            theta: mut_ptr u32,
            /// \[B\] candidates appended per query (may exceed `capq`: overflow), zeroed before.
            count: mut_ptr u32,
            /// [B, capq] candidate approximate scores.
            cand_s: mut_ptr f32,
            /// [B, capq] candidate rows.
            cand_i: mut_ptr u32,
            /// \[3\] error word (code, query, row), shared with `cosine_topk_prep` and the rescoring.
            err: mut_ptr u32,
        }

        /// `cosine_topk_prep_{f32,f16,bf16}` (kernels/cosine_topk_rescore.cuh, shared by the
        /// tensor-core and GEMM + select paths): one warp per row of `qhat`, `RS_THREADS / 32`
        /// rows per block: the unit query `q / |q|` (canonical |q|) rounded to the entry's
        /// operand type (f32 for `_f32`: tf32 or f32 GEMM operands), zero-padded to `d_pad`
        /// columns, zero rows from B to `rows`; `COS_EPS / |q|`; the exclusion check
        /// (`ERR_BAD_EXCLUDE`, `ERR_FEW_ROWS`); `theta[b] = count[b] = 0`; `flagged[0] = 0`.
        CosineTopkPrepArgs("cosine_topk_prep") {
            /// [B, D] f32 queries.
            q: ptr f32,
            /// \[B\] bank row each query skips (`PAD_INDEX` = none); null = no exclusion.
            exclude: ptr u32,
            b: u32,
            m: u32,
            d: u32,
            /// Results wanted per query (for the `ERR_FEW_ROWS` check).
            n: u32,
            /// Row length of `qhat` (>= D).
            d_pad: u32,
            /// Rows of `qhat` written (>= B; the rows past B are zero).
            rows: u32,
            /// [rows, d_pad] unit queries in the operand type.
            qhat: mut_ptr elem,
            /// \[B\] f32 `COS_EPS / |q|` (inf for a zero query).
            qeps: mut_ptr f32,
            /// \[B\] threshold keys of the approximate pass, reset to 0.
            theta: mut_ptr u32,
            /// \[B\] candidate counts of the approximate pass, reset to 0.
            count: mut_ptr u32,
            /// \[1 + B\] flagged-query list (count, then queries); word 0 reset to 0.
            flagged: mut_ptr u32,
            /// \[3\] error word of the call (code, query, detail), zeroed before the launch.
            err: mut_ptr u32,
        }

        /// `cosine_topk_gemm_select` (kernels/cosine_topk_gemm_select.cuh): grid
        /// `(ceil(B / (GS_THREADS / 32)) x splits)`, one warp per (query, split): reads one
        /// chunk's GEMM scores `scores[b * ld + r]` (r < rows, bank row `r0 + r`), keeps the
        /// unit's running top-n approximate scores (`list_*`, across the chunks' launches) and
        /// appends every row that can be in the exact top n (the approximate score within
        /// `margin` of a lower bound of the n-th best) to the query's candidates.
        CosineTopkGemmSelectArgs("cosine_topk_gemm_select") {
            /// [B, ld] f32 dot products of the unit queries with the chunk's rows.
            scores: ptr f32,
            /// Row stride of `scores` (a multiple of 4).
            ld: u32,
            /// \[B\] f32 `COS_EPS / |q|`.
            qeps: ptr f32,
            /// \[M\] f32 key norms (of the whole bank), 16-byte aligned.
            key_norms: ptr f32,
            /// \[B\] bank row each query skips (`PAD_INDEX` = none); null = no exclusion.
            exclude: ptr u32,
            b: u32,
            /// First bank row of the chunk (a multiple of 4).
            r0: u32,
            /// Rows of the chunk.
            rows: u32,
            n: u32,
            /// List length (n rounded up to 32, at most `GS_NL_MAX`).
            nl: u32,
            /// Units per query.
            splits: u32,
            /// Columns per unit (a multiple of 128).
            span: u32,
            /// 1 at the first chunk (the lists start empty).
            first: u32,
            /// 1 at the last chunk (the lists are flushed into the candidates).
            last: u32,
            /// Candidate capacity per query.
            capq: u32,
            /// Twice the bound on |approximate - exact score| (docs/DESIGN.md).
            margin: f32,
            /// [B, splits, nl] f32 list scores between launches.
            list_s: mut_ptr f32,
            /// [B, splits, nl] list rows between launches.
            list_i: mut_ptr u32,
            /// \[B\] order-preserving keys of the best published n-th (0 = none).
            theta: mut_ptr u32,
            /// \[B\] candidates appended per query (may exceed `capq`: overflow).
            count: mut_ptr u32,
            /// [B, capq] candidate approximate scores.
            cand_s: mut_ptr f32,
            /// [B, capq] candidate rows.
            cand_i: mut_ptr u32,
            /// \[3\] error word (code, query, row).
            err: mut_ptr u32,
        }

        /// `cosine_topk_rescore_{f32,f16,bf16}` (kernels/cosine_topk_rescore.cuh): one block
        /// per query: the n-th best approximate score among its candidates, then the exact f32
        /// score (the bandwidth kernel's arithmetic) of every candidate within `margin` of it,
        /// and the top n of those; an overflowed query is appended to `flagged` instead.
        CosineTopkRescoreArgs("cosine_topk_rescore") {
            /// [B, D] f32 queries.
            q: ptr f32,
            /// [M, D] bank keys in the entry's dtype.
            keys: ptr elem,
            /// \[M\] f32 key norms.
            key_norms: ptr f32,
            /// \[B\] candidates per query.
            count: ptr u32,
            /// [B, capq] candidate approximate scores.
            cand_s: ptr f32,
            /// [B, capq] candidate rows.
            cand_i: ptr u32,
            b: u32,
            d: u32,
            n: u32,
            /// Running-list length of the approximate selection (a power of two >= n).
            kp: u32,
            capq: u32,
            /// Most candidates rescored per query (a power of two).
            cap: u32,
            margin: f32,
            /// 1: key and query rows are 16-byte aligned (16-byte loads in the exact dot).
            vec16: u32,
            /// [B, n] exact scores, descending.
            out_s: mut_ptr f32,
            /// [B, n] rows.
            out_i: mut_ptr u32,
            /// \[1 + B\] flagged-query list: word 0 the count, then the queries whose
            /// candidates overflowed `capq` or `cap` (answered by `cosine_topk_fallback_*`).
            flagged: mut_ptr u32,
            /// \[3\] error word (code, query, row).
            err: mut_ptr u32,
        }

        /// `cosine_topk_fallback_{f32,f16,bf16}`: grid (slots, gy): block (x, y) computes the
        /// exact top-kp over bank rows `[y * chunk_rows, (y + 1) * chunk_rows)` of the flagged
        /// queries `f = x, x + slots, ...` into `fb_*[(f * gy + y) * kp ..]`; exits at once when
        /// no query is flagged.
        CosineTopkFallbackArgs("cosine_topk_fallback") {
            /// [B, D] f32 queries.
            q: ptr f32,
            /// [M, D] bank keys in the entry's dtype.
            keys: ptr elem,
            /// \[M\] f32 key norms.
            key_norms: ptr f32,
            /// \[B\] bank row each query skips (`PAD_INDEX` = none); null = no exclusion.
            exclude: ptr u32,
            m: u32,
            d: u32,
            /// Running-list length (a power of two >= n).
            kp: u32,
            /// Streaming tile (a power of two >= kp and >= `CT_THREADS`).
            tile: u32,
            /// 1: key and query rows are 16-byte aligned.
            vec16: u32,
            /// Bank rows per block.
            chunk_rows: u32,
            /// \[1 + B\] flagged-query list.
            flagged: ptr u32,
            /// [B, gy, kp] exact candidate scores.
            fb_s: mut_ptr f32,
            /// [B, gy, kp] candidate rows.
            fb_i: mut_ptr u32,
            /// \[3\] error word (code, query, row).
            err: mut_ptr u32,
        }

        /// `cosine_topk_finish`: grid (slots): merges each flagged query's `gy * kp` exact
        /// candidates into its output row; then, if the error word is set, writes every score of
        /// the call as NaN (the last kernel of both approximate paths).
        CosineTopkFinishArgs("cosine_topk_finish") {
            /// \[1 + B\] flagged-query list.
            flagged: ptr u32,
            /// [B, gy, kp] exact candidate scores.
            fb_s: ptr f32,
            /// [B, gy, kp] candidate rows.
            fb_i: ptr u32,
            gy: u32,
            kp: u32,
            /// Streaming tile (a power of two >= kp and >= `CT_THREADS`).
            tile: u32,
            b: u32,
            n: u32,
            /// \[3\] error word of the call.
            err: ptr u32,
            /// [B, n] exact scores.
            out_s: mut_ptr f32,
            /// [B, n] rows.
            out_i: mut_ptr u32,
        }

        /// `dissonance_topk_anchor_{f32,f16,bf16}` (tokens context): the pooled anchor g (masked
        /// mean of `ctx[b]`) into `g`, `ceil(D / (32 V))` blocks per batch row (V elements per
        /// 16-byte vector). `dissonance_topk_{f32,f16,bf16}`: `chunks` blocks per batch row b
        /// score `delta[b, i] = 1 - cos(p[b, i], g)` (g from `g`, or the anchor row); the last
        /// block of row b to finish writes its top-k rows by delta.
        DissonanceTopkArgs("dissonance_topk") {
            /// [B, L, D] projected retrieved tokens in the entry's dtype.
            p: ptr elem,
            /// [B, La, D] available tokens, or [B, D] anchors (`anchor` = 1), in the entry's dtype.
            ctx: ptr elem,
            /// [B, La] f32 token weights (read only when `has_mask` = 1).
            mask: ptr f32,
            has_mask: u32,
            anchor: u32,
            l: u32,
            la: u32,
            d: u32,
            k: u32,
            /// Running-list length (a power of two >= k).
            kp: u32,
            /// Streaming tile (a power of two >= kp).
            tile: u32,
            /// 1: rows of `p` and `ctx` are 16-byte aligned (`D * sizeof(elem) % 16 == 0` and both
            /// base addresses 16-byte aligned): 16-byte loads; 0: element loads.
            vec16: u32,
            /// Blocks of `dissonance_topk_*` per batch row (`DIS_THREADS / 32 * DIS_ROWS_PER_WARP`
            /// tokens each).
            chunks: u32,
            /// [B, D] f32 pooled anchor: written by `dissonance_topk_anchor_*`, read by
            /// `dissonance_topk_*` (tokens context; unused with `anchor` = 1).
            g: mut_ptr f32,
            /// `[B]` u32 per-row count of finished blocks, zeroed before the launch.
            done: mut_ptr u32,
            /// 1: the selection runs on one warp (`r2_warp_topk`: L <= `TOPK_WARP_MAX_L`, k <=
            /// `TOPK_WARP_MAX_K`); 0: on the block (`R2Stream`).
            warp_select: u32,
            /// [B, L] f32 delta.
            delta: mut_ptr f32,
            /// [B, k] noise rows, delta descending.
            idx: mut_ptr u32,
            /// [B, L] f32 0/1 noise mask.
            noise_mask: mut_ptr f32,
        }

        /// `topk_rows_f32`: the top-k (value, index) pairs of each row of scores [B, L]: one
        /// warp per row (`warp_rows` = 1: L <= `TOPK_WARP_MAX_L`, k <= `TOPK_WARP_MAX_K`) or one
        /// block per row.
        TopkRowsArgs("topk_rows") {
            /// [B, L] f32 scores.
            scores: ptr f32,
            b: u32,
            /// 1: one warp per row (`r2_warp_topk`); 0: one block per row (`R2Stream`).
            warp_rows: u32,
            l: u32,
            k: u32,
            kp: u32,
            tile: u32,
            /// [B, k] values (the scores themselves).
            vals: mut_ptr f32,
            /// [B, k] indices.
            idx: mut_ptr u32,
        }

        /// `gather_inject_{fwd,zero,scatter}_{f32,f16,bf16}`, one warp per output row:
        /// `fwd`: `out[b, i] = src[b, sal[b, j]]` where `i = noise[b, j]`, else `h[b, i]` ([B, L, D]);
        /// `zero`: `out[b, i] = 0` at noise rows, else `h[b, i]` (`h` = the output gradient);
        /// `scatter`: `out[b, s] = sum over j with sal[b, j] = s of h[b, noise[b, j]]` ([B, Ls, D]).
        GatherInjectArgs("gather_inject") {
            /// [B, L, D] rows kept (fwd, zero) or the output gradient (scatter).
            h: ptr elem,
            /// [B, Ls, D] source rows (fwd only).
            src: ptr elem,
            /// [B, k] noise (target) rows, distinct per batch row.
            noise: ptr u32,
            /// [B, k] salient (source) rows.
            sal: ptr u32,
            b: u32,
            l: u32,
            ls: u32,
            d: u32,
            k: u32,
            /// 1: every row of `h`, `src` and `out` is 16-byte aligned (`D * sizeof(elem) % 16 ==
            /// 0` and the base addresses 16-byte aligned): 16-byte moves; 0: element moves.
            vec16: u32,
            /// [B, L, D] (fwd, zero) or [B, Ls, D] (scatter).
            out: mut_ptr elem,
        }
    }
}
