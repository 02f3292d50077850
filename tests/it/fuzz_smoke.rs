//! Fuzzing that runs on stable in CI: a bounded mutation loop over the kept
//! corpus calling the same bodies as the cargo-fuzz targets
//! (`till::fuzzing`), and a replay of every input kept in
//! `tests/fuzz-regressions/<target>/`.
//!
//! In the test suite the loop is deterministic: fixed RNG seeds, a fixed
//! number of inputs per target (`TILL_FUZZ_SMOKE_INPUTS`), mutating only
//! the checked-in corpus (`fuzz/seeds/`, `tests/fuzz-regressions/`), so
//! unchanged code never fails CI by luck. Exploration is explicit:
//! `TILL_FUZZ_SEED=random` draws a seed (printed) and runs for
//! `TILL_FUZZ_SMOKE_MS` per target (default 20 s); `TILL_FUZZ_SEED=N` with
//! `TILL_FUZZ_SMOKE_INPUTS=n` replays such a run. An input that panics is
//! saved under `target/fuzz-smoke/` and the test fails naming the file;
//! copy it to `tests/fuzz-regressions/<target>/` once fixed. Longer runs:
//! see SECURITY.md ("Fuzzing").

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// A fuzz target: its name and the body it runs on one input.
type Target = (&'static str, fn(&[u8]));

const TARGETS: &[Target] = &[
    ("token", till::fuzzing::token),
    ("request", till::fuzzing::request),
    ("config", till::fuzzing::config),
];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Byte strings that matter to the parsers: path tricks, JSON and TOML
/// syntax, protobuf tags and lengths, Datalog operators.
const DICTIONARY: &[&[u8]] = &[
    b"%2e",
    b"%2E%2e",
    b"..",
    b"/./",
    b"//",
    b"%2f",
    b"%5c",
    b"%25",
    b"\\",
    b"\"model\"",
    b"\"model\":",
    b"[",
    b"{",
    b"}",
    b"]",
    b"\\u0000",
    b"null",
    b"1e999",
    b"[upstreams.",
    b"url = \"",
    b"\"\"\"",
    b"'''",
    b"=",
    b"[[",
    b"]]",
    b"\n",
    b"\r\n",
    b"\x08\x01",
    b"\x12\x00",
    b"\x1a\x7f",
    b"\xff\xff\xff\xff\x0f",
    b"\x80\x80\x80\x80\x80\x80\x80\x80\x80\x01",
    b"check if ",
    b" or ",
    b" <- ",
    b".matches(",
    b".all($x -> ",
    b"uses(",
    b"$a",
    b"trusting ",
    b"Bearer ",
    b"\x00",
];

fn range(rng: &mut StdRng, len: usize) -> (usize, usize) {
    if len == 0 {
        return (0, 0);
    }
    let a = rng.gen_range(0..len);
    let b = rng.gen_range(a..=len.min(a + 64));
    (a, b)
}

/// A few random edits of `input`, sometimes splicing in another seed.
fn mutate(rng: &mut StdRng, input: &mut Vec<u8>, pool: &[Vec<u8>]) {
    for _ in 0..rng.gen_range(1..=4) {
        let len = input.len();
        match rng.gen_range(0..9) {
            0 if len > 0 => {
                let i = rng.gen_range(0..len);
                input[i] ^= 1 << rng.gen_range(0..8);
            }
            1 if len > 0 => {
                let i = rng.gen_range(0..len);
                input[i] = *[0u8, 0x7f, 0x80, 0xff, b'/', b'.', b'%', b'"', b' ', b'a']
                    .get(rng.gen_range(0..10))
                    .unwrap_or(&0);
            }
            2 => {
                let i = rng.gen_range(0..=len);
                let n = rng.gen_range(1..8);
                let bytes: Vec<u8> = (0..n).map(|_| rng.r#gen()).collect();
                input.splice(i..i, bytes);
            }
            3 => {
                let (a, b) = range(rng, len);
                input.drain(a..b);
            }
            4 => {
                let (a, b) = range(rng, len);
                let chunk = input[a..b].to_vec();
                let i = rng.gen_range(0..=len);
                input.splice(i..i, chunk);
            }
            5 => {
                let other = &pool[rng.gen_range(0..pool.len())];
                let (a, b) = range(rng, other.len());
                let i = rng.gen_range(0..=len);
                input.truncate(i);
                input.extend_from_slice(&other[a..b]);
            }
            6 => input.truncate(rng.gen_range(0..=len)),
            7 => {
                let word = DICTIONARY[rng.gen_range(0..DICTIONARY.len())];
                let i = rng.gen_range(0..=len);
                input.splice(i..i, word.iter().copied());
            }
            _ => {
                // Varint-sized length fields are where protobuf decoders slip.
                if len > 1 {
                    let i = rng.gen_range(0..len);
                    input[i] = input[i].wrapping_add(rng.gen_range(1..4));
                }
            }
        }
    }
}

/// What is mutated: `fuzz/seeds/<target>/` (what cargo-fuzz starts from)
/// and the kept regressions. Checked-in files only: the generated seeds
/// hold tokens signed with fresh random block keys, which would make the
/// inputs differ from run to run.
fn pool(target: &str) -> Vec<Vec<u8>> {
    let mut pool = Vec::new();
    for dir in [
        root().join("fuzz/seeds").join(target),
        root().join("tests/fuzz-regressions").join(target),
    ] {
        pool.extend(files(&dir).into_iter().map(|p| std::fs::read(p).unwrap()));
    }
    pool
}

/// RNG seeds of the deterministic run in the test suite.
const FIXED_SEEDS: [u64; 2] = [0x7111_0001, 0x7111_0002];
/// Inputs per target and fixed seed in the test suite.
const FIXED_INPUTS: u64 = 50_000;

/// How the mutation loop is driven.
#[derive(Debug)]
enum Run {
    /// The test suite: every fixed seed, `inputs` mutations each.
    Fixed { inputs: u64 },
    /// One seed (a replay, or a drawn one), bounded by `inputs` or `time`.
    Explore {
        seed: u64,
        inputs: Option<u64>,
        time: Duration,
    },
}

fn run_mode() -> Run {
    let num = |var: &str| {
        std::env::var(var).ok().map(|v| {
            v.parse::<u64>()
                .unwrap_or_else(|_| panic!("{var}={v:?}: expected a whole number"))
        })
    };
    let inputs = num("TILL_FUZZ_SMOKE_INPUTS");
    let time = Duration::from_millis(num("TILL_FUZZ_SMOKE_MS").unwrap_or(20_000));
    match std::env::var("TILL_FUZZ_SEED").ok().as_deref() {
        None | Some("") => Run::Fixed {
            inputs: inputs.unwrap_or(FIXED_INPUTS),
        },
        Some("random") => Run::Explore {
            seed: rand::random(),
            inputs,
            time,
        },
        Some(v) => Run::Explore {
            seed: v.parse().unwrap_or_else(|_| {
                panic!("TILL_FUZZ_SEED={v:?}: expected a whole number or \"random\"")
            }),
            inputs,
            time,
        },
    }
}

/// Mutates `pool` with `seed` until `inputs` inputs (or, without a count,
/// `time`) are spent; returns how many inputs ran.
fn mutation_loop(
    target: &str,
    f: fn(&[u8]),
    pool: &[Vec<u8>],
    seed: u64,
    inputs: Option<u64>,
    time: Duration,
    failures: &mut Vec<PathBuf>,
) -> u64 {
    let mut rng = StdRng::seed_from_u64(seed);
    let start = Instant::now();
    let mut n = 0u64;
    loop {
        let more = match inputs {
            Some(max) => n < max,
            None => start.elapsed() < time || n < 200,
        };
        if !more {
            break;
        }
        let mut input = pool[rng.gen_range(0..pool.len())].clone();
        mutate(&mut rng, &mut input, pool);
        if let Err(p) = run_one(target, f, &input) {
            failures.push(p);
        }
        n += 1;
    }
    eprintln!(
        "fuzz smoke: {target}: TILL_FUZZ_SEED={seed}, {n} inputs in {:?}",
        start.elapsed()
    );
    n
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut v: Vec<PathBuf> = rd
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    v.sort();
    v
}

/// Runs `f` on `input`; on a panic, saves the input and returns its path.
fn run_one(target: &str, f: fn(&[u8]), input: &[u8]) -> Result<(), PathBuf> {
    if catch_unwind(AssertUnwindSafe(|| f(input))).is_ok() {
        return Ok(());
    }
    let dir = root().join("target/fuzz-smoke");
    std::fs::create_dir_all(&dir).unwrap();
    let hash = input.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
    });
    let path = dir.join(format!("{target}-{hash:016x}"));
    std::fs::write(&path, input).unwrap();
    Err(path)
}

#[test]
fn fuzz_smoke_mutations_never_panic() {
    let run = run_mode();
    eprintln!("fuzz smoke: {run:?}");
    let mut failures = Vec::new();
    for (target, f) in TARGETS {
        // The generated seeds as they are, then mutations of the kept corpus.
        for s in &till::fuzzing::seeds(target) {
            if let Err(p) = run_one(target, *f, s) {
                failures.push(p);
            }
        }
        let pool = pool(target);
        assert!(
            !pool.is_empty(),
            "{target}: no kept seeds under fuzz/seeds/"
        );
        for s in &pool {
            if let Err(p) = run_one(target, *f, s) {
                failures.push(p);
            }
        }
        match run {
            Run::Fixed { inputs } => {
                for seed in FIXED_SEEDS {
                    mutation_loop(
                        target,
                        *f,
                        &pool,
                        seed,
                        Some(inputs),
                        Duration::ZERO,
                        &mut failures,
                    );
                }
            }
            Run::Explore { seed, inputs, time } => {
                let n = mutation_loop(target, *f, &pool, seed, inputs, time, &mut failures);
                eprintln!(
                    "fuzz smoke: replay {target} with TILL_FUZZ_SEED={seed} TILL_FUZZ_SMOKE_INPUTS={n}"
                );
            }
        }
    }
    assert!(
        failures.is_empty(),
        "inputs that panic ({run:?}); fix, then keep them in tests/fuzz-regressions/<target>/: {failures:#?}"
    );
}

#[test]
fn fuzz_regressions_replay() {
    let dir = root().join("tests/fuzz-regressions");
    let mut replayed = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if !path.is_dir() {
            continue;
        }
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        let (_, f) = TARGETS
            .iter()
            .find(|(t, _)| *t == name)
            .unwrap_or_else(|| panic!("{}: not a fuzz target", path.display()));
        for file in files(&path) {
            let input = std::fs::read(&file).unwrap();
            assert!(
                catch_unwind(AssertUnwindSafe(|| f(&input))).is_ok(),
                "{} panics again",
                file.display()
            );
            replayed += 1;
        }
    }
    eprintln!("replayed {replayed} kept fuzz inputs");
    assert!(replayed > 0, "no kept inputs found under {}", dir.display());
}

/// `fuzz/seeds/` is what cargo-fuzz starts from; regenerate it with
/// `cargo test --test it write_fuzz_seeds -- --ignored`.
#[test]
#[ignore]
fn write_fuzz_seeds() {
    for (target, _) in TARGETS {
        let dir = root().join("fuzz/seeds").join(target);
        std::fs::create_dir_all(&dir).unwrap();
        for (i, s) in till::fuzzing::seeds(target).iter().enumerate() {
            std::fs::write(dir.join(format!("seed-{i:02}")), s).unwrap();
        }
    }
}
