//! The one bounded top-k of the fused CPU paths (retrieval and CAP).
//!
//! Ordering contract (the same as the device code in `kernels/topk.cuh`): an entry
//! `(score, index)` ranks above another when its score is larger, or when the scores are
//! equal and its index is lower ("ties go to the lower index"). NaN follows the collector's
//! [`NanPolicy`]: an error (retrieval: a NaN similarity means a NaN or infinite input) or
//! ranked as -inf (CAP: after every number, and among -inf/NaN entries by index).

use crate::elem::Acc;
use candle_core::Tensor;
use std::cmp::Ordering;

/// What a NaN score means to a [`TopK`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NanPolicy {
    /// [`TopK::offer`] refuses it with [`NanScore`] (the op turns that into an error).
    Error,
    /// It ranks as -inf.
    RankLast,
}

/// A NaN score offered to a [`TopK`] under [`NanPolicy::Error`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NanScore;

/// One scored candidate: `score` (never NaN once held) and its row `index` (u32).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Scored<S = f32> {
    /// Score; larger is better.
    pub score: S,
    /// Row index; the lower index wins a tie.
    pub index: u32,
}

impl<S: Acc> Scored<S> {
    /// True when `self` ranks strictly above `other` (higher score, or equal score and
    /// lower index).
    #[inline(always)]
    pub fn better_than(&self, other: &Scored<S>) -> bool {
        self.score > other.score || (self.score == other.score && self.index < other.index)
    }

    /// Total order on held (non-NaN) entries, the same as [`Scored::better_than`]: `Less`
    /// means `self` ranks above `other` (sorts first). Equal scores, -0 and +0 included, go
    /// by index: `total_cmp` alone would rank +0 above -0, which the selection and the
    /// kernels tie.
    #[inline]
    pub fn rank_cmp(&self, other: &Scored<S>) -> Ordering {
        if self.score == other.score {
            self.index.cmp(&other.index)
        } else {
            other.score.total_cmp(&self.score)
        }
    }
}

/// A bounded top-k collector: keeps the `k` best entries offered so far.
///
/// Small `k` (the retrieval case, n ~ 1..64) keeps a sorted array with insertion; large `k`
/// uses a binary heap whose root is the current worst entry. Both give the same result;
/// [`TopK::into_sorted`] returns best first.
#[derive(Clone, Debug)]
pub struct TopK<S = f32> {
    k: usize,
    /// Small mode: sorted best-first. Heap mode: a max-heap on "worseness".
    items: Vec<Scored<S>>,
    heap: bool,
    nan: NanPolicy,
}

/// Above this `k` the collector switches from insertion into a sorted array to a heap.
const SORTED_MAX_K: usize = 48;

impl<S: Acc> TopK<S> {
    /// A collector for the best `k` entries (`k` may be 0, which keeps nothing).
    pub fn new(k: usize, nan: NanPolicy) -> Self {
        TopK {
            k,
            items: Vec::with_capacity(k.min(1 << 16)),
            heap: k > SORTED_MAX_K,
            nan,
        }
    }

    /// The `k` this collector was built with.
    pub fn k(&self) -> usize {
        self.k
    }

    /// Drops every entry (keeps `k`, the policy and the allocation).
    pub fn clear(&mut self) {
        self.items.clear();
    }

    /// True when `k` entries are held, so a new entry must beat [`TopK::worst`].
    #[inline(always)]
    pub fn is_full(&self) -> bool {
        self.items.len() >= self.k
    }

    /// The worst entry currently held, if any.
    #[inline(always)]
    pub fn worst(&self) -> Option<Scored<S>> {
        if self.items.is_empty() {
            None
        } else if self.heap {
            Some(self.items[0])
        } else {
            self.items.last().copied()
        }
    }

    /// Score a candidate must reach (`>=`) to possibly enter; -inf while not full.
    #[inline(always)]
    pub fn threshold(&self) -> S {
        if self.is_full() {
            match self.worst() {
                Some(w) => w.score,
                None => S::INF, // k == 0: nothing ever enters
            }
        } else {
            S::NEG_INF
        }
    }

    /// Offers a candidate under the collector's [`NanPolicy`]; the cheap path (a score below
    /// the threshold) is one comparison. Indices may arrive in any order: ties are resolved
    /// by index, not by arrival.
    #[inline(always)]
    pub fn offer(&mut self, score: S, index: u32) -> Result<(), NanScore> {
        if score >= self.threshold() {
            self.push(score, index);
        } else if score.is_nan() {
            match self.nan {
                NanPolicy::Error => return Err(NanScore),
                NanPolicy::RankLast => {
                    if S::NEG_INF >= self.threshold() {
                        self.push(S::NEG_INF, index);
                    }
                }
            }
        }
        Ok(())
    }

    /// Inserts a candidate whose score the caller has checked is not NaN (the vectorised
    /// kernels test NaN and the threshold for a whole vector of scores at once).
    #[inline(always)]
    pub fn push(&mut self, score: S, index: u32) {
        let c = Scored { score, index };
        if self.k == 0 {
            return;
        }
        if self.items.len() < self.k {
            if self.heap {
                self.items.push(c);
                self.sift_up(self.items.len() - 1);
            } else {
                let pos = self.items.partition_point(|x| x.better_than(&c));
                self.items.insert(pos, c);
            }
            return;
        }
        let worst = if self.heap {
            self.items[0]
        } else {
            self.items[self.k - 1]
        };
        if !c.better_than(&worst) {
            return;
        }
        if self.heap {
            self.items[0] = c;
            self.sift_down(0);
        } else {
            let pos = self.items.partition_point(|x| x.better_than(&c));
            self.items.pop();
            self.items.insert(pos, c);
        }
    }

    /// Merges another collector's entries into this one.
    pub fn merge(&mut self, other: &TopK<S>) {
        for c in &other.items {
            self.push(c.score, c.index);
        }
    }

    /// The held entries, best first.
    pub fn sorted(&mut self) -> &[Scored<S>] {
        if self.heap {
            self.items.sort_by(|a, b| a.rank_cmp(b));
            // Sorted best first is the array mode's layout, not a "worst at the root" heap.
            self.heap = false;
        }
        &self.items
    }

    /// The held entries, best first.
    pub fn into_sorted(mut self) -> Vec<Scored<S>> {
        self.sorted();
        self.items
    }

    // Heap helpers: parent ranks *worse* than (or equal to) its children.
    fn sift_up(&mut self, mut i: usize) {
        while i > 0 {
            let p = (i - 1) / 2;
            if self.items[p].better_than(&self.items[i]) {
                self.items.swap(p, i);
                i = p;
            } else {
                break;
            }
        }
    }

    fn sift_down(&mut self, mut i: usize) {
        let n = self.items.len();
        loop {
            let l = 2 * i + 1;
            if l >= n {
                break;
            }
            let r = l + 1;
            let mut w = l;
            if r < n && self.items[l].better_than(&self.items[r]) {
                w = r;
            }
            if self.items[i].better_than(&self.items[w]) {
                self.items.swap(i, w);
                i = w;
            } else {
                break;
            }
        }
    }
}

/// Top-`k` of one row (index = position in `row`) into `idx`, best first, under `nan`
/// (k <= row.len()). `tk` is a reusable collector (rebuilt when its `k` differs).
pub(crate) fn row_topk<S: Acc>(
    row: &[S],
    k: usize,
    nan: NanPolicy,
    idx: &mut [u32],
    tk: &mut Option<TopK<S>>,
) -> Result<(), (usize, NanScore)> {
    let t = match tk {
        Some(t) if t.k() == k && t.nan == nan => {
            t.clear();
            t
        }
        _ => tk.insert(TopK::new(k, nan)),
    };
    // A heap-mode collector turned sorted by an earlier `sorted()` must heap again.
    t.heap = k > SORTED_MAX_K;
    for (i, &v) in row.iter().enumerate() {
        t.offer(v, i as u32).map_err(|e| (i, e))?;
    }
    for (o, e) in idx.iter_mut().zip(t.sorted()) {
        *o = e.index;
    }
    Ok(())
}

/// [`NanPolicy::RankLast`] for the plain-candle references: `t` with every NaN replaced by
/// -inf, the sort key a stable descending `arg_sort` then orders exactly like [`TopK`]
/// (candle's sort panics on NaN, whose comparisons are not a total order).
pub(crate) fn nan_last_keys(t: &Tensor) -> candle_core::Result<Tensor> {
    let neg = Tensor::full(f64::NEG_INFINITY, t.shape(), t.device())?.to_dtype(t.dtype())?;
    t.ne(t)?.where_cond(&neg, t)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// Top-`k` of one row of scores (index = position), best first.
    fn topk_desc(scores: &[f32], k: usize) -> Vec<Scored> {
        let mut t = TopK::new(k.min(scores.len()), NanPolicy::Error);
        for (i, &s) in scores.iter().enumerate() {
            t.offer(s, i as u32).expect("no NaN");
        }
        t.into_sorted()
    }

    fn brute(scores: &[f32], k: usize) -> Vec<Scored> {
        let mut v: Vec<Scored> = scores
            .iter()
            .enumerate()
            .map(|(i, &s)| Scored {
                score: s,
                index: i as u32,
            })
            .collect();
        v.sort_by(|a, b| a.rank_cmp(b));
        v.truncate(k);
        v
    }

    #[test]
    fn matches_sort_with_ties_small_and_large_k() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        for case in 0..200 {
            let len = rng.random_range(1..400usize);
            // few distinct values => many ties
            let levels = rng.random_range(1..20u32);
            let scores: Vec<f32> = (0..len)
                .map(|_| rng.random_range(0..levels) as f32 * 0.25 - 1.0)
                .collect();
            let k = rng.random_range(0..=len + 3);
            let got = topk_desc(&scores, k);
            let want = brute(&scores, k);
            assert_eq!(got, want, "case {case}: len {len} k {k}");
        }
    }

    /// -0 and +0 tie and go by index, in the sorted array (small k) and in the heap (large
    /// k), offered in either order.
    #[test]
    fn signed_zeros_tie_by_index() {
        for len in [6usize, 120] {
            let scores: Vec<f32> = (0..len)
                .map(|i| match i % 3 {
                    0 => 0.0,
                    1 => -0.0,
                    _ => -1.0,
                })
                .collect();
            let want: Vec<u32> = (0..len as u32)
                .filter(|i| i % 3 != 2)
                .chain((0..len as u32).filter(|i| i % 3 == 2))
                .collect();
            for k in [1, len / 2, len] {
                for reversed in [false, true] {
                    let mut t = TopK::new(k, NanPolicy::Error);
                    let order: Vec<usize> = if reversed {
                        (0..len).rev().collect()
                    } else {
                        (0..len).collect()
                    };
                    for i in order {
                        t.push(scores[i], i as u32);
                    }
                    let got: Vec<u32> = t.into_sorted().iter().map(|s| s.index).collect();
                    assert_eq!(got, want[..k], "len {len} k {k} reversed {reversed}");
                }
            }
        }
    }

    #[test]
    fn merge_equals_single_pass() {
        let scores: Vec<f32> = (0..300).map(|i| ((i * 37) % 17) as f32).collect();
        for k in [1usize, 5, 60, 300] {
            let mut a = TopK::new(k, NanPolicy::Error);
            let mut b = TopK::new(k, NanPolicy::Error);
            for (i, &s) in scores.iter().enumerate() {
                if i % 3 == 0 {
                    a.push(s, i as u32)
                } else {
                    b.push(s, i as u32)
                }
            }
            a.merge(&b);
            assert_eq!(a.into_sorted(), brute(&scores, k), "k {k}");
        }
    }

    #[test]
    fn zero_k_keeps_nothing() {
        let mut t = TopK::<f32>::new(0, NanPolicy::Error);
        t.push(1.0, 0);
        assert!(t.sorted().is_empty());
        assert_eq!(t.threshold(), f32::INFINITY);
    }
}
