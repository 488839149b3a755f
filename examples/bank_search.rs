//! Retrieval over a memory bank, as a library user writes it: a flat cosine index built from
//! keys, grown with `add`, searched for `(scores, ids)`, saved and loaded.
//!
//! The data: `rows` vectors around 64 cluster centres (each a centre plus noise), stored as
//! f16 keys with ids of our own; each query is a fresh noisy copy of a centre, and a hit is a
//! retrieved row of the same cluster. Prints the share of hits among the top 10 and the
//! search time.
//!
//! Usage: `cargo run --release --example bank_search -- [rows] [dim] [queries]`
//! (defaults 100000 256 64).

use candle_core::{DType, Device, Tensor};
use r2scp::bank::NO_ID;
use r2scp::prelude::*;
use std::time::Instant;

const CLUSTERS: usize = 64;

/// Deterministic uniform noise in [-1, 1) (a 64-bit LCG), so every run prints the same.
struct Noise(u64);

impl Noise {
    fn next(&mut self) -> f32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}

/// `n` vectors of `dim`: vector i is centre `cluster(i)` plus noise of amplitude `noise`.
fn around(
    centres: &[Vec<f32>],
    n: usize,
    cluster: impl Fn(usize) -> usize,
    noise: f32,
    rng: &mut Noise,
) -> Vec<f32> {
    let mut v = Vec::with_capacity(n * centres[0].len());
    for i in 0..n {
        for &c in &centres[cluster(i)] {
            v.push(c + noise * rng.next());
        }
    }
    v
}

fn arg(i: usize, default: usize) -> anyhow::Result<usize> {
    match std::env::args().nth(i) {
        None => Ok(default),
        Some(s) => s
            .parse()
            .map_err(|_| anyhow::anyhow!("argument {i}: `{s}` is not a count")),
    }
}

fn main() -> anyhow::Result<()> {
    let (rows, dim, nq) = (arg(1, 100_000)?, arg(2, 256)?, arg(3, 64)?);
    anyhow::ensure!(
        rows >= 2 && dim >= 1 && nq >= 1,
        "expected rows >= 2, dim >= 1, queries >= 1"
    );
    let dev = Device::Cpu;
    let mut rng = Noise(7);
    let centres: Vec<Vec<f32>> = (0..CLUSTERS)
        .map(|_| (0..dim).map(|_| rng.next()).collect())
        .collect();
    let cluster_of_row = |i: usize| (i * 7919) % CLUSTERS;
    let keys = Tensor::from_vec(
        around(&centres, rows, cluster_of_row, 1.0, &mut rng),
        (rows, dim),
        &dev,
    )?
    .to_dtype(DType::F16)?;

    // Ids of our own (here: 1000 + row), the first half now, the rest with `add_with_ids`.
    let ids: Vec<u32> = (0..rows as u32).map(|r| 1000 + r).collect();
    let half = rows / 2;
    let t = Instant::now();
    let mut bank = MemoryBank::with_ids(keys.narrow(0, 0, half)?, ids[..half].to_vec())?;
    bank.add_with_ids(&keys.narrow(0, half, rows - half)?, &ids[half..])?;
    println!(
        "bank: {} rows of D = {dim}, {:?} keys, built in {:.1} ms",
        bank.len(),
        bank.keys().dtype(),
        t.elapsed().as_secs_f64() * 1e3
    );

    // f32 queries against the f16 bank: a fresh noisy copy of centre q % CLUSTERS each.
    let queries = Tensor::from_vec(
        around(&centres, nq, |q| q % CLUSTERS, 1.0, &mut rng),
        (nq, dim),
        &dev,
    )?;
    let n = 10;
    let t = Instant::now();
    let (scores, found) = bank.search(&queries, n)?;
    let ms = t.elapsed().as_secs_f64() * 1e3;
    let (scores, found) = (scores.to_vec2::<f32>()?, found.to_vec2::<u32>()?);
    let hits: usize = found
        .iter()
        .enumerate()
        .map(|(q, ids)| {
            ids.iter()
                .filter(|&&id| cluster_of_row((id - 1000) as usize) == q % CLUSTERS)
                .count()
        })
        .sum();
    println!(
        "search: {nq} queries x top {n} in {ms:.1} ms; {:.1}% of the hits are of the query's cluster",
        100.0 * hits as f64 / (nq * n) as f64
    );
    println!(
        "query 0: ids {:?}\n         scores {:?}",
        &found[0][..5],
        scores[0][..5]
            .iter()
            .map(|s| (s * 1000.0).round() / 1000.0)
            .collect::<Vec<_>>()
    );

    // More results than rows: FAISS's padding (id NO_ID, score -inf).
    let tiny = MemoryBank::from_keys(keys.narrow(0, 0, 3)?)?;
    let (s, i) = tiny.search(&queries.narrow(0, 0, 1)?, 5)?;
    let padded = i.to_vec2::<u32>()?[0]
        .iter()
        .filter(|&&id| id == NO_ID)
        .count();
    println!(
        "a 3-row bank asked for 5: ids {:?}, {padded} padded slots scored {:?}",
        i.to_vec2::<u32>()?[0],
        s.to_vec2::<f32>()?[0][4]
    );

    // Save and load: the same search after the round trip.
    let dir = std::env::temp_dir().join(format!("r2scp-bank-search-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("bank.safetensors");
    bank.save(&path)?;
    let loaded = MemoryBank::load(&path, &dev)?;
    let (_, again) = loaded.search(&queries, n)?;
    anyhow::ensure!(
        again.to_vec2::<u32>()? == found,
        "the loaded bank searched differently"
    );
    std::fs::remove_dir_all(&dir)?;
    println!("saved and loaded {}: same results", path.display());
    Ok(())
}
