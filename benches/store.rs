//! Criterion benches of counter reservation in the embedded store
//! (`CounterStore::reserve` + awaiting `Reservation::durable`), durability on.
//!
//! * `reserve/large_limits/{c1,c64}`: one 3-block token family with limits
//!   in the millions. The durability lease (a high-water mark written ahead
//!   of use) makes most reservations free of disk writes.
//! * `reserve/small_limits/{c1,c64}`: 3-block families with a 5-use limit on
//!   the last block, each used 5 times and then replaced: no lease, so every
//!   reservation waits for a commit. At concurrency 64, group commit shares
//!   one fsync among all the reservations waiting.
//!
//! `c64` runs 64 tokio tasks on a 2-worker runtime; the time reported per
//! iteration is wall time / reservations, i.e. the inverse of throughput.
//! After each case the bench prints how many reservations shared a commit.
//!
//! Run: `cargo bench --bench store`.

use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use till::store::{CounterSpec, CounterStore, EmbeddedStore};

const CONCURRENCY: u64 = 64;

fn family(name: &str, limits: [u64; 3]) -> Vec<CounterSpec> {
    let expires = till::store::now_unix() + 86400;
    (0..3)
        .map(|k: usize| {
            // Real ids are 128 hex characters (an ed25519 signature): the
            // name in hex, padded.
            let id = |k: usize| {
                let mut id = hex::encode(format!("{name}-{k}"));
                while id.len() < 128 {
                    id.push_str("ab");
                }
                id
            };
            CounterSpec {
                family: id(0),
                parent: k.checked_sub(1).map(id),
                index: k,
                ..CounterSpec::standalone(&id(k), Some(limits[k]), Some(expires))
            }
        })
        .collect()
}

async fn reserve(store: &EmbeddedStore, specs: &[CounterSpec]) {
    let r = store.reserve(specs).await.expect("reserve");
    black_box(&r.uses);
    r.durable.await.expect("durable");
}

/// Reservations of one task: `n` of them, on `large` (one shared family) or
/// on 5-use families private to the task.
async fn run(store: EmbeddedStore, task: u64, n: u64, large: Option<Arc<Vec<CounterSpec>>>) {
    match large {
        Some(specs) => {
            for _ in 0..n {
                reserve(&store, &specs).await;
            }
        }
        None => {
            // A unique prefix per run keeps families fresh across criterion's
            // repeated calls.
            let run_id: u64 = rand::random();
            let mut specs = Vec::new();
            for i in 0..n {
                if i % 5 == 0 {
                    specs = family(
                        &format!("small-{run_id:x}-{task}-{i}"),
                        [1_000_000_000, 1_000_000, 5],
                    );
                }
                reserve(&store, &specs).await;
            }
        }
    }
}

fn bench_reserve(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(dir.path()).unwrap();
    let large = Arc::new(family(
        "large",
        [1_000_000_000_000, 1_000_000_000, 100_000_000],
    ));

    let mut g = c.benchmark_group("reserve");
    g.throughput(Throughput::Elements(1));
    for (limits, is_large) in [("large_limits", true), ("small_limits", false)] {
        for conc in [1, CONCURRENCY] {
            let name = format!("{limits}/c{conc}");
            let (mut total, mut commits0) = (0u64, None);
            g.bench_function(&name, |b| {
                b.iter_custom(|iters| {
                    let c0 = store.stats().commits.load(Ordering::Relaxed);
                    commits0.get_or_insert(c0);
                    total += iters;
                    let started = Instant::now();
                    rt.block_on(async {
                        let mut tasks = Vec::new();
                        for t in 0..conc {
                            let n = iters / conc + u64::from(t < iters % conc);
                            let specs = is_large.then(|| large.clone());
                            tasks.push(tokio::spawn(run(store.clone(), t, n, specs)));
                        }
                        for t in tasks {
                            t.await.unwrap();
                        }
                    });
                    started.elapsed()
                })
            });
            let commits = store.stats().commits.load(Ordering::Relaxed) - commits0.unwrap_or(0);
            eprintln!(
                "reserve/{name}: {total} reservations, {commits} group commits ({:.1} reservations per commit)",
                total as f64 / commits.max(1) as f64
            );
        }
    }
    g.finish();
    store.close().unwrap();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4));
    targets = bench_reserve
}
criterion_main!(benches);
