//! Calibration of the memory a verified token holds (see
//! `till_core::verify::cache_weight`): a counting allocator measures the
//! live bytes of `VerifiedToken`s of the shapes that hold the most per
//! byte of token text, and of a decision cache filled to its budget.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::{Duration, SystemTime};

use till_core::verify::{SHAPE_BUDGET, cache_weight};
use till_core::{Policies, RequestFacts, Scope, Verifier, attenuate, issue, keys};

/// Live bytes and allocations, counted over all threads: the test below is
/// the only one in this binary, so nothing else allocates meanwhile.
struct Counting;
static BYTES: AtomicIsize = AtomicIsize::new(0);
static ALLOCS: AtomicIsize = AtomicIsize::new(0);

// SAFETY: forwards to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        BYTES.fetch_add(l.size() as isize, Ordering::Relaxed);
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller's layout, passed on.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        BYTES.fetch_sub(l.size() as isize, Ordering::Relaxed);
        ALLOCS.fetch_sub(1, Ordering::Relaxed);
        // SAFETY: allocated above with this layout.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        BYTES.fetch_add(new as isize - l.size() as isize, Ordering::Relaxed);
        // SAFETY: the caller's pointer and layout, passed on.
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn live() -> (isize, isize) {
    (
        BYTES.load(Ordering::Relaxed),
        ALLOCS.load(Ordering::Relaxed),
    )
}

/// Appends raw blocks (as any Biscuit library can) while the token stays
/// within 16 KiB.
fn fill(parent: &str, block: impl Fn(usize) -> String) -> String {
    let mut t = parent.to_string();
    for i in 0..15 {
        let b = biscuit_auth::UnverifiedBiscuit::from_base64(&t)
            .unwrap()
            .append(biscuit_auth::BlockBuilder::new().code(block(i)).unwrap())
            .unwrap()
            .to_base64()
            .unwrap();
        if b.len() > 16 << 10 {
            break;
        }
        t = b;
    }
    t
}

#[test]
fn a_verified_token_and_its_full_decision_cache_fit_in_its_cache_weight() {
    let root = keys::generate();
    let v = Verifier::new(root.public(), Policies::default_policy());
    let scope = Scope {
        services: vec!["openai".into()],
        paths: vec!["/v1/".into()],
        max_uses: Some(100),
        expires: Some(SystemTime::now() + Duration::from_secs(3600)),
        ..Scope::default()
    };
    let parent = issue(&root, &scope).unwrap();
    let child = attenuate(
        &parent,
        &Scope {
            methods: vec!["POST".into()],
            models: vec!["gpt-4o-mini".into()],
            max_uses: Some(10),
            ..Scope::default()
        },
    )
    .unwrap();
    let ints = |n: usize| (0..n).map(|i| i.to_string()).collect::<Vec<_>>().join(",");
    let tokens = [
        ("root", parent.clone()),
        ("child", child),
        (
            "sets of small integers",
            fill(&parent, |b| {
                (0..4)
                    .map(|i| format!("s({}, {{{}}});", b * 4 + i, ints(256)))
                    .collect()
            }),
        ),
        (
            "arrays of small integers",
            fill(&parent, |b| {
                (0..4)
                    .map(|i| format!("s({}, [{}]);", b * 4 + i, ints(256)))
                    .collect()
            }),
        ),
        (
            "nested arrays",
            fill(&parent, |b| {
                let inner: Vec<String> = (0..128).map(|i| format!("[{i}]")).collect();
                (0..4)
                    .map(|i| format!("s({}, [{}]);", b * 4 + i, inner.join(",")))
                    .collect()
            }),
        ),
        (
            "many small facts",
            fill(&parent, |b| {
                (0..32).map(|i| format!("f({}, {i});", b)).collect()
            }),
        ),
        (
            "many small checks",
            fill(&parent, |b| {
                (0..32)
                    .map(|i| format!("check if uses({b}, $u), $u <= {i};"))
                    .collect()
            }),
        ),
        (
            "many trivial alternatives",
            fill(&parent, |_| {
                (0..32)
                    .map(|_| format!("check if {};", vec!["true"; 16].join(" or ")))
                    .collect()
            }),
        ),
        (
            "many trivial checks",
            fill(&parent, |_| {
                (0..32).map(|_| "check if true;".to_string()).collect()
            }),
        ),
        (
            "many trivial facts",
            fill(&parent, |b| {
                (0..32).map(|i| format!("f{b}x{i}(true);")).collect()
            }),
        ),
    ];
    for (what, text) in &tokens {
        let before = live();
        let t = v.verify_token(text).unwrap();
        let after = live();
        let (bytes, allocs) = (after.0 - before.0, after.1 - before.1);
        // What the allocator may really hold: its size classes round up by
        // at most 12.5% (mimalloc, Till's allocator), plus a word or two
        // per allocation.
        let token = (bytes + bytes / 8 + 16 * allocs) as usize;
        // Fill the decision cache of a plain token (the others have none)
        // with every shape it takes: 4 KiB ones, never remembered, and
        // short ones up to the budget, allowed and pending.
        let before = live();
        for i in 0..200 {
            let long = i % 4 == 0;
            let req = RequestFacts {
                service: "openai".into(),
                method: if long {
                    "M".repeat(4096)
                } else {
                    format!("M{i}")
                },
                path: format!("/v1/{}", "p".repeat(if long { 4090 } else { i * 3 })),
                model: (i % 2 == 1).then(|| format!("gpt-4o-mini-{i}")),
                mcp: None,
                time: SystemTime::now(),
            };
            let _ = v.authorize_before_body(&t, &req, &[1, 1]);
            let _ = v.authorize(&t, &req, &[1, 1]);
        }
        // `remembered_shape_bytes` counts the allocator's rounding too.
        let grown = live().0 - before.0;
        assert!(
            t.remembered_shape_bytes() <= SHAPE_BUDGET,
            "{what}: {} bytes of shapes",
            t.remembered_shape_bytes()
        );
        assert!(
            grown as usize <= t.remembered_shape_bytes(),
            "{what}: the decision cache grew by {grown} bytes, counted {}",
            t.remembered_shape_bytes()
        );
        let weight = cache_weight(text.len()) as usize;
        // The key (the text), the token, the most its shapes may take, moka's entry.
        let entry = text.len() + token + SHAPE_BUDGET + 1024;
        println!(
            "{what}: {} bytes of text, {bytes} bytes live in {allocs} allocations ({:.1} per byte), shapes {grown} ({} remembered), entry ≤ {entry}, weight {weight}",
            text.len(),
            bytes as f64 / text.len() as f64,
            t.remembered_shape_bytes(),
        );
        assert!(entry <= weight, "{what}: {entry} bytes, weighed {weight}");
        drop(t);
    }
}
