//! Criterion bench of the rate-window check per request, warm: what a
//! request with windows adds to the request path in the in-process store
//! (`LocalWindows`, used with the embedded counter store).
//!
//! * `window/admit/3w`: a 3-block token with one window on each block
//!   (limits large enough that every request is admitted), in steady
//!   state: each admission drops the admission that left the window and
//!   records its own in every window. The clock advances 1 ms per request,
//!   so each window holds 60,000 live admissions, as it would at 1,000
//!   req/s for a minute.
//! * `window/admit_cap/3w1c`: the same plus a concurrency cap whose slot is
//!   taken and freed (the end of the response) on every request.
//! * `window/full/3w`: a full window refusing (a leaked key hammering).
//!
//! Run: `cargo bench --bench window`.

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use futures_util::FutureExt;
use till::store::window::{Admit, LocalWindows, WindowStore};
use till::verify::{CapSpec, WindowSpec};

static NOW: AtomicU64 = AtomicU64::new(1_000_000_000);

fn tick() -> u64 {
    NOW.fetch_add(1, Ordering::Relaxed)
}

fn still() -> u64 {
    NOW.load(Ordering::Relaxed)
}

/// Real ids are 128 hex characters (an ed25519 signature).
fn windows(limit: u64) -> Vec<WindowSpec> {
    (0..3)
        .map(|k| WindowSpec {
            block: k,
            id: format!("{k}-{}", "ab".repeat(63)),
            limit,
            seconds: 60 + k as u64,
        })
        .collect()
}

fn bench_windows(c: &mut Criterion) {
    let mut g = c.benchmark_group("window");
    let store = LocalWindows::with_clock(tick);
    let w = windows(100_000);
    // Fill to the steady state before measuring.
    for _ in 0..70_000 {
        store.admit_now("f", &w, &[]);
    }
    g.bench_function("admit/3w", |b| {
        b.iter(|| match store.admit_now("f", black_box(&w), &[]) {
            Admit::Admitted { counts, .. } => black_box(counts),
            Admit::Full(f) => panic!("the bench window filled: {f:?}"),
        })
    });
    let cap = [CapSpec {
        block: 2,
        id: format!("2-{}", "ab".repeat(63)),
        limit: 1024,
    }];
    g.bench_function("admit_cap/3w1c", |b| {
        b.iter(|| match store.admit_now("f", black_box(&w), &cap) {
            Admit::Admitted { ticket, counts } => {
                store.finish(&ticket).now_or_never();
                black_box(counts)
            }
            Admit::Full(f) => panic!("the bench window filled: {f:?}"),
        })
    });
    let full = LocalWindows::with_clock(still);
    let small = windows(10);
    for _ in 0..10 {
        full.admit_now("f", &small, &[]);
    }
    g.bench_function("full/3w", |b| {
        b.iter(|| {
            assert!(matches!(
                full.admit_now("f", black_box(&small), &[]),
                Admit::Full(_)
            ))
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = bench_windows
}
criterion_main!(benches);
