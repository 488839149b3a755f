//! CPU bounded top-k selection shared by the fused CPU paths.
//!
//! Ordering contract (the same as the device code in `kernels/topk.cuh`): an entry
//! `(score, index)` ranks above another when its score is larger, or when the scores
//! are equal and its index is lower ("ties go to the lower index"). Scores must not be
//! NaN; callers check for NaN before pushing (the ops turn NaN into an error).

use std::cmp::Ordering;

/// One scored candidate: `score` (f32, not NaN) and its row `index` (u32).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Scored {
    /// Similarity score; larger is better.
    pub score: f32,
    /// Row index; the lower index wins a tie.
    pub index: u32,
}

impl Scored {
    /// True when `self` ranks strictly above `other` (higher score, or equal score and
    /// lower index).
    #[inline(always)]
    pub fn better_than(&self, other: &Scored) -> bool {
        self.score > other.score || (self.score == other.score && self.index < other.index)
    }

    /// Total order: `Less` means `self` ranks above `other` (sorts first).
    #[inline]
    pub fn rank_cmp(&self, other: &Scored) -> Ordering {
        other
            .score
            .total_cmp(&self.score)
            .then(self.index.cmp(&other.index))
    }
}

/// A bounded top-k collector: keeps the `k` best entries pushed so far.
///
/// Small `k` (the retrieval case, n ~ 1..64) keeps a sorted array with insertion;
/// large `k` uses a binary heap whose root is the current worst entry. Both give the
/// same result; [`TopK::into_sorted`] returns best first.
#[derive(Clone, Debug)]
pub struct TopK {
    k: usize,
    /// Small mode: sorted best-first. Heap mode: a max-heap on "worseness".
    items: Vec<Scored>,
    heap: bool,
}

/// Above this `k` the collector switches from insertion into a sorted array to a heap.
const SORTED_MAX_K: usize = 48;

impl TopK {
    /// A collector for the best `k` entries (`k` may be 0, which keeps nothing).
    pub fn new(k: usize) -> Self {
        TopK {
            k,
            items: Vec::with_capacity(k.min(1 << 16)),
            heap: k > SORTED_MAX_K,
        }
    }

    /// The `k` this collector was built with.
    pub fn k(&self) -> usize {
        self.k
    }

    /// Number of entries held (at most `k`).
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// True when nothing is held.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// True when `k` entries are held, so a new entry must beat [`TopK::worst`].
    #[inline(always)]
    pub fn is_full(&self) -> bool {
        self.items.len() >= self.k
    }

    /// The worst entry currently held, if any.
    #[inline(always)]
    pub fn worst(&self) -> Option<Scored> {
        if self.items.is_empty() {
            None
        } else if self.heap {
            Some(self.items[0])
        } else {
            self.items.last().copied()
        }
    }

    /// Score a candidate must reach (`>=`) to possibly enter; `-inf` while not full.
    #[inline(always)]
    pub fn threshold(&self) -> f32 {
        if self.is_full() {
            match self.worst() {
                Some(w) => w.score,
                None => f32::INFINITY, // k == 0: nothing ever enters
            }
        } else {
            f32::NEG_INFINITY
        }
    }

    /// Offers a candidate. Indices should be pushed in any order; ties are resolved by
    /// index, not by arrival order.
    #[inline(always)]
    pub fn push(&mut self, score: f32, index: u32) {
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
    pub fn merge(&mut self, other: &TopK) {
        for c in &other.items {
            self.push(c.score, c.index);
        }
    }

    /// The held entries, best first.
    pub fn into_sorted(mut self) -> Vec<Scored> {
        if self.heap {
            self.items.sort_by(|a, b| a.rank_cmp(b));
        }
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

/// Top-`k` of one row of scores (index = position in `scores`), best first.
/// `k` larger than the row keeps the whole row. NaN scores are the caller's business
/// (they compare as neither better nor worse and end up in arbitrary places).
pub fn topk_desc(scores: &[f32], k: usize) -> Vec<Scored> {
    let mut t = TopK::new(k.min(scores.len()));
    for (i, &s) in scores.iter().enumerate() {
        if s >= t.threshold() {
            t.push(s, i as u32);
        }
    }
    t.into_sorted()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

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

    #[test]
    fn merge_equals_single_pass() {
        let scores: Vec<f32> = (0..300).map(|i| ((i * 37) % 17) as f32).collect();
        for k in [1usize, 5, 60, 300] {
            let mut a = TopK::new(k);
            let mut b = TopK::new(k);
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
        let mut t = TopK::new(0);
        t.push(1.0, 0);
        assert!(t.is_empty());
        assert_eq!(t.threshold(), f32::INFINITY);
    }
}
