//! The shape Till accepts for attenuation blocks, checked before any
//! signature or Datalog work.
//!
//! Tokens come from agents, and agents can be compromised. A 1–2 KB block
//! with a cross-product rule or a regular expression over many facts can hold
//! a CPU for seconds, and biscuit-auth's time limit is only checked between
//! iterations. So attenuation blocks (every block after the authority block,
//! third-party blocks included) may only narrow, with bounded work:
//!
//! * facts (at most [`MAX_FACTS`]) and checks (at most [`MAX_CHECKS`]);
//! * **no rules**: a rule can derive facts, and joins of derived facts are
//!   where the blow-up lives;
//! * each check has at most [`MAX_QUERIES`] alternatives (`or`), each with at
//!   most [`MAX_BODY`] predicates and [`MAX_EXPRESSIONS`] expressions of at
//!   most [`MAX_OPS`] operations;
//! * no regular expressions, no closures over collections (`.all`, `.any`),
//!   no extern functions, and collections of at most [`MAX_COLLECTION`]
//!   elements, those of nested collections included. `&&` and `||` are fine;
//! * no `+`: on strings it concatenates, and a chain of concatenations of a
//!   long string costs time and memory quadratic in its length, on every
//!   combination of facts the check visits;
//! * a work budget: for every alternative of every check, the number of fact
//!   combinations its predicates can match (counting the facts of the blocks
//!   it can see, and the request's facts: up to [`crate::token::MAX_BLOCKS`]
//!   `uses` and `in_flight`, four times as many `rate`, one each of
//!   `service`, `method`, `path`, `model`, `time`, `mcp`, and one of
//!   `tool`, `prompt`, `resource`) times the cost of its expressions plus
//!   one, summed over all attenuation blocks, is at most [`MAX_WORK`]. An
//!   operation costs one plus the elements of the collections it copies,
//!   reads or builds (a variable's bound is the largest collection at its
//!   place in the facts it can match), so set operations are charged by the
//!   size of their sets. A check joining three predicates over 31 facts each is
//!   29,791 combinations: without this bound such a 6 KB token held a CPU for
//!   18 s, as biscuit-auth checks its time limit only between queries.
//!
//! Facts the operator's policies add are not counted: `policies/` is trusted
//! not to define thousands of facts of one name.
//!
//! And in **every** block, the authority block included: no fact and no rule
//! head named after a request fact ([`names::AMBIENT`]: `uses`, `path`,
//! `time`, ...). Only the verifier states those; a block stating them could
//! satisfy its own checks on them.
//!
//! Everything Till's own `attenuate` writes, and the usual checks other
//! Biscuit libraries write (`check if path($p), $p.starts_with("/v1/")`,
//! `check if time($t), $t <= ...`), fits. The authority block is written by
//! the operator and is restricted only by the request-fact rule above.

use std::collections::HashMap;

use biscuit_auth::datalog::{Binary, Check, Fact, Op, Rule, SymbolTable, Term, Unary};
use biscuit_auth::format::convert::proto_block_to_token_block;
use biscuit_auth::format::schema;
use prost::Message;

use super::vocab::names;
use super::{MAX_BLOCKS, RawToken, TokenError};

pub const MAX_FACTS: usize = 32;
pub const MAX_CHECKS: usize = 32;
pub const MAX_QUERIES: usize = 16;
pub const MAX_BODY: usize = 3;
pub const MAX_EXPRESSIONS: usize = 8;
pub const MAX_OPS: usize = 64;
pub const MAX_COLLECTION: usize = 256;
/// Datalog work all attenuation blocks of a token may cause, in evaluations
/// (fact combinations × (cost of the expressions + 1), an operation costing
/// one plus the elements of the collections it handles; see the module
/// docs). Till's own blocks cost about 100 each.
pub const MAX_WORK: u64 = 16_384;

/// Elements of a term, those of nested collections included: what copying
/// it costs (biscuit-auth copies a value at every use).
fn elements(t: &Term) -> u64 {
    let nested = |e: &Term| 1 + elements(e);
    match t {
        Term::Set(s) => s.iter().map(nested).sum(),
        Term::Array(a) => a.iter().map(nested).sum(),
        Term::Map(m) => m.values().map(nested).sum(),
        _ => 0,
    }
}

fn term_ok(t: &Term) -> Result<(), String> {
    let n = elements(t);
    if n > MAX_COLLECTION as u64 {
        return Err(format!(
            "a collection of {n} elements (at most {MAX_COLLECTION})"
        ));
    }
    Ok(())
}

fn rule_ok(q: &Rule) -> Result<(), String> {
    if q.body.len() > MAX_BODY {
        return Err(format!(
            "a check joining {} predicates (at most {MAX_BODY})",
            q.body.len()
        ));
    }
    for p in &q.body {
        for t in &p.terms {
            term_ok(t)?;
        }
    }
    if q.expressions.len() > MAX_EXPRESSIONS {
        return Err(format!(
            "a check with {} expressions (at most {MAX_EXPRESSIONS})",
            q.expressions.len()
        ));
    }
    for e in &q.expressions {
        let n = ops_ok(&e.ops)?;
        if n > MAX_OPS {
            return Err(format!(
                "an expression of {n} operations (at most {MAX_OPS})"
            ));
        }
    }
    Ok(())
}

/// Checks a list of operations and returns how many there are, nested ones
/// included. `&&` and `||` are compiled to parameterless closures (lazy
/// evaluation): those are fine. Closures with parameters are `.all` /
/// `.any`, which iterate over collections: refused.
fn ops_ok(ops: &[Op]) -> Result<usize, String> {
    let mut n = ops.len();
    for op in ops {
        match op {
            Op::Value(t) => term_ok(t)?,
            Op::Binary(Binary::Regex) => return Err("a regular expression".into()),
            Op::Binary(Binary::Ffi(_)) | Op::Unary(Unary::Ffi(_)) => {
                return Err("an extern function call".into());
            }
            Op::Binary(Binary::Add) => {
                return Err("a '+' (it concatenates strings; use checks that compare)".into());
            }
            Op::Binary(Binary::All | Binary::Any) => {
                return Err("a closure (.all / .any)".into());
            }
            Op::Closure(params, _) if !params.is_empty() => {
                return Err("a closure (.all / .any)".into());
            }
            Op::Closure(_, inner) => n += ops_ok(inner)?,
            _ => {}
        }
    }
    Ok(n)
}

/// One block, decoded: what the shape and work checks need.
struct Decoded {
    facts: Vec<Fact>,
    rules: usize,
    /// The predicate (symbol) each rule derives.
    heads: Vec<u64>,
    checks: Vec<Check>,
    /// Symbols this block introduces.
    symbols: SymbolTable,
    third_party: bool,
    /// Block-level `trusting ...` scopes.
    scoped: bool,
}

fn decode(sb: &schema::SignedBlock) -> Result<Decoded, String> {
    let pb =
        schema::Block::decode(sb.block.as_slice()).map_err(|e| format!("undecodable ({e})"))?;
    let b = proto_block_to_token_block(&pb, None).map_err(|e| format!("undecodable ({e})"))?;
    Ok(Decoded {
        heads: b.rules.iter().map(|r| r.head.name).collect(),
        facts: b.facts,
        rules: b.rules.len(),
        checks: b.checks,
        symbols: b.symbols,
        third_party: sb.external_signature.is_some(),
        scoped: !b.scopes.is_empty(),
    })
}

/// Why block `index` (≥ 1) is refused, if it is.
fn block_violation(b: &Decoded) -> Result<(), String> {
    if b.rules > 0 {
        return Err(format!(
            "{} rule(s); rules are not allowed in attenuation blocks (use checks)",
            b.rules
        ));
    }
    if b.facts.len() > MAX_FACTS {
        return Err(format!("{} facts (at most {MAX_FACTS})", b.facts.len()));
    }
    for f in &b.facts {
        for t in &f.predicate.terms {
            term_ok(t)?;
        }
    }
    if b.checks.len() > MAX_CHECKS {
        return Err(format!("{} checks (at most {MAX_CHECKS})", b.checks.len()));
    }
    for c in &b.checks {
        if c.queries.len() > MAX_QUERIES {
            return Err(format!(
                "a check with {} alternatives (at most {MAX_QUERIES})",
                c.queries.len()
            ));
        }
        for q in &c.queries {
            rule_ok(q)?;
        }
    }
    Ok(())
}

/// Refuses a fact or rule head named after a request fact
/// ([`names::AMBIENT`]): only the verifier states those. A child holding
/// `uses(1, 0); path("/v1/chat/x")` next to `check if uses(1, $u), $u <= 2`
/// and `check if path($p), $p.starts_with("/v1/chat/")` satisfied its own
/// checks, so it was shown (inspect, usage, alerts) with limits it did not
/// enforce (red team, wave 2, third pass). In every block, the authority
/// block too: its facts are seen by every block's checks.
fn ambient_statement(b: &Decoded, table: &SymbolTable) -> Result<(), String> {
    let facts = b.facts.iter().map(|f| (f.predicate.name, "a fact"));
    let heads = b.heads.iter().map(|h| (*h, "a rule deriving"));
    for (sym, what) in facts.chain(heads) {
        let name = table.print_symbol_default(sym);
        if names::is_ambient(&name) {
            return Err(format!(
                "{what} `{name}(...)`, a request fact that only Till supplies ({}): a block that states it itself could satisfy its own checks on it",
                names::AMBIENT.join(", ")
            ));
        }
    }
    Ok(())
}

/// How many facts of `name`/`arity` the verifier adds to every request.
fn ambient(name: &str, arity: usize) -> u64 {
    match (name, arity) {
        (names::USES, 2) | (names::IN_FLIGHT, 2) => MAX_BLOCKS as u64,
        (names::RATE, 3) => (MAX_BLOCKS * super::vocab::MAX_WINDOWS_PER_BLOCK) as u64,
        (
            names::SERVICE
            | names::METHOD
            | names::PATH
            | names::MODEL
            | names::TIME
            | names::MCP
            | names::TOOL
            | names::PROMPT
            | names::RESOURCE,
            1,
        ) => 1,
        _ => 0,
    }
}

/// Facts of one block by (predicate name, arity): how many, and the most
/// elements a term holds at each position.
type FactCounts = HashMap<(String, usize), (u64, Vec<u64>)>;

/// Facts of each block, counted, and each block's symbol table (first-party
/// blocks share one; third-party blocks have their own).
fn fact_counts(blocks: &[Decoded]) -> Result<(Vec<FactCounts>, Vec<SymbolTable>), String> {
    let table = |strings: Vec<String>| {
        SymbolTable::from_symbols_and_public_keys(strings, Vec::new())
            .map_err(|e| format!("an invalid symbol table ({e})"))
    };
    let shared = table(
        blocks
            .iter()
            .filter(|b| !b.third_party)
            .flat_map(|b| b.symbols.strings())
            .collect(),
    )?;
    let mut counts = Vec::with_capacity(blocks.len());
    let mut tables = Vec::with_capacity(blocks.len());
    for b in blocks {
        let t = if b.third_party {
            table(b.symbols.strings())?
        } else {
            shared.clone()
        };
        let mut c = FactCounts::new();
        for f in &b.facts {
            let key = (
                t.print_symbol_default(f.predicate.name),
                f.predicate.terms.len(),
            );
            let (n, sizes) = c
                .entry(key)
                .or_insert_with(|| (0, vec![0; f.predicate.terms.len()]));
            *n += 1;
            for (m, t) in sizes.iter_mut().zip(&f.predicate.terms) {
                *m = (*m).max(elements(t));
            }
        }
        counts.push(c);
        tables.push(t);
    }
    Ok((counts, tables))
}

/// The cost of evaluating `ops` once, and the elements of the value it
/// leaves. Each operation costs one, plus the elements of every collection
/// it copies, reads or builds: biscuit-auth copies a variable's or a
/// literal's value at every use, and `union`, `intersection`, `contains`
/// and comparisons walk their operands and build new sets. Counting
/// operations alone let a 14.6 KB block of eight 256-integer sets, joined
/// three ways and put through a chain of unions and intersections, take
/// ~180 ms per request within the budget (red team, wave 2). On values
/// without collections this is the number of operations, as before.
/// `vars` bounds the elements of each variable's value.
fn ops_cost(ops: &[Op], vars: &HashMap<u32, u64>) -> (u64, u64) {
    let mut stack: Vec<u64> = Vec::new();
    let mut cost: u64 = 0;
    for op in ops {
        let (c, size) = match op {
            Op::Value(Term::Variable(v)) => {
                let n = vars.get(v).copied().unwrap_or(0);
                (n.saturating_add(1), n)
            }
            Op::Value(t) => {
                let n = elements(t);
                (n.saturating_add(1), n)
            }
            Op::Unary(u) => {
                let a = stack.pop().unwrap_or(0);
                (1, if matches!(u, Unary::Parens) { a } else { 0 })
            }
            Op::Binary(b) => {
                let r = stack.pop().unwrap_or(0);
                let l = stack.pop().unwrap_or(0);
                let size = match b {
                    Binary::Union => l.saturating_add(r),
                    Binary::Intersection => l.min(r),
                    Binary::Get => l,
                    Binary::TryOr => l.max(r),
                    _ => 0,
                };
                (
                    1u64.saturating_add(l)
                        .saturating_add(r)
                        .saturating_add(size),
                    size,
                )
            }
            Op::Closure(_, inner) => {
                let (c, n) = ops_cost(inner, vars);
                (c.saturating_add(1), n)
            }
        };
        cost = cost.saturating_add(c);
        stack.push(size);
    }
    (cost, stack.last().copied().unwrap_or(0))
}

/// Work of the checks of block `i` (≥ 1): for each alternative, the fact
/// combinations its predicates can match times (the cost of its
/// expressions, [`ops_cost`], + 1). A check sees the authority block, its
/// own block and the request's facts (which hold no collections), or every
/// block when it (or its block) has a `trusting` scope.
fn block_work(i: usize, b: &Decoded, counts: &[FactCounts], table: &SymbolTable) -> u64 {
    let mut work: u64 = 0;
    for q in b.checks.iter().flat_map(|c| c.queries.iter()) {
        let wide = b.scoped || !q.scopes.is_empty();
        let mut combos: u64 = 1;
        let mut vars: HashMap<u32, u64> = HashMap::new();
        for p in &q.body {
            let key = (table.print_symbol_default(p.name), p.terms.len());
            let mut n = ambient(&key.0, key.1);
            for (j, c) in counts.iter().enumerate() {
                if !(wide || j == 0 || j == i) {
                    continue;
                }
                let Some((count, sizes)) = c.get(&key) else {
                    continue;
                };
                n += count;
                for (t, &size) in p.terms.iter().zip(sizes) {
                    if let Term::Variable(v) = t {
                        let m = vars.entry(*v).or_default();
                        *m = (*m).max(size);
                    }
                }
            }
            combos = combos.saturating_mul(n);
        }
        let cost = q
            .expressions
            .iter()
            .fold(0u64, |a, e| a.saturating_add(ops_cost(&e.ops, &vars).0));
        work = work.saturating_add(combos.saturating_mul(cost.saturating_add(1)).max(1));
    }
    work
}

/// Refuses a token whose attenuation blocks are outside the accepted shape.
pub fn check(raw: &RawToken) -> Result<(), TokenError> {
    let refuse = |i: usize, why: String| {
        TokenError::Shape(format!(
            "block {i} is not accepted by Till: it contains {why}. Attenuation blocks may hold facts and bounded checks only (see policies/README.md)"
        ))
    };
    let proto = raw.proto();
    let blocks = std::iter::once(&proto.authority)
        .chain(proto.blocks.iter())
        .enumerate()
        .map(|(i, sb)| decode(sb).map_err(|why| refuse(i, why)))
        .collect::<Result<Vec<_>, _>>()?;
    let (counts, tables) = fact_counts(&blocks).map_err(|why| refuse(0, why))?;
    for (i, (b, table)) in blocks.iter().zip(&tables).enumerate() {
        ambient_statement(b, table).map_err(|why| {
            TokenError::Shape(format!(
                "block {i} is not accepted by Till: it contains {why}. No block may state a request fact"
            ))
        })?;
        if i > 0 {
            block_violation(b).map_err(|why| refuse(i, why))?;
        }
    }
    let mut work: u64 = 0;
    for (i, b) in blocks.iter().enumerate().skip(1) {
        work = work.saturating_add(block_work(i, b, &counts, &tables[i]));
        if work > MAX_WORK {
            return Err(refuse(
                i,
                format!(
                    "checks that, with the blocks before it, may take {work} evaluations (at most {MAX_WORK}): joining predicates multiplies the facts each one matches, and set operations cost their sets' elements"
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::{Scope, issue, keys};

    fn with_block(code: &str) -> RawToken {
        let root = keys::generate();
        let t = issue(
            &root,
            &Scope {
                services: vec!["openai".into()],
                ..Scope::default()
            },
        )
        .unwrap();
        let u = biscuit_auth::UnverifiedBiscuit::from_base64(&t).unwrap();
        let c = u
            .append(biscuit_auth::BlockBuilder::new().code(code).unwrap())
            .unwrap();
        RawToken::parse(&c.to_base64().unwrap()).unwrap()
    }

    /// The red team's child (wave 2, third pass): its own `uses`, `path`,
    /// `method` and `time` facts satisfied its checks, so it showed a use
    /// limit of 2, `/v1/chat/`, `GET` and a 2000 expiry while DELETE
    /// requests elsewhere passed.
    const FORGED_CHILD: &str = r#"uses(1, 0); path("/v1/chat/x"); method("GET");
        time(2000-01-01T00:00:00Z); use_limit(1, 2); label("looks-narrow");
        check if uses(1, $u), $u <= 2;
        check if path($p), $p.starts_with("/v1/chat/");
        check if time($t), $t <= 2000-06-01T00:00:00Z;
        check if method($m), {"GET"}.contains($m);"#;

    #[test]
    fn regression_no_block_may_state_a_request_fact() {
        let e = check(&with_block(FORGED_CHILD)).unwrap_err();
        let m = e.to_string();
        assert!(matches!(e, TokenError::Shape(_)), "{e:?}");
        assert!(
            m.starts_with("block 1 ") && m.contains("`uses(...)`"),
            "{m}"
        );
        // Every request fact, at any arity, and only those.
        for name in names::AMBIENT {
            for fact in [format!("{name}(\"x\")"), format!("{name}(1, 2, 3)")] {
                let m = check(&with_block(&format!("{fact};")))
                    .unwrap_err()
                    .to_string();
                assert!(m.contains(&format!("`{name}(...)`")), "{fact}: {m}");
            }
        }
        for ok in [
            r#"use_limit(1, 5); label("x"); rate_limit(1, 5, 60); concurrency_limit(1, 2);"#,
            r#"right("openai", "*", "/"); resources("x"); paths("/"); user("u");"#,
        ] {
            assert!(
                check(&with_block(ok)).is_ok(),
                "{ok}: {:?}",
                check(&with_block(ok))
            );
        }
    }

    /// The authority block may hold rules (it is the operator's), but not
    /// one deriving a request fact, nor such a fact: every block's checks
    /// see the authority block.
    #[test]
    fn regression_the_authority_block_may_not_state_a_request_fact_either() {
        let authority = |code: &str| {
            let t = biscuit_auth::Biscuit::builder()
                .code(code)
                .unwrap()
                .build(&keys::generate())
                .unwrap();
            RawToken::parse(&t.to_base64().unwrap()).unwrap()
        };
        let base = r#"right("openai", "*", "/");"#;
        assert!(check(&authority(base)).is_ok());
        assert!(
            check(&authority(&format!(
                "{base} allowed($s) <- right($s, $m, $p);"
            )))
            .is_ok()
        );
        for (code, name) in [
            ("time(2000-01-01T00:00:00Z);", "time"),
            (
                "uses($k, 0) <- right($s, $m, $p), use_limit($k, $n);",
                "uses",
            ),
            ("model(\"gpt-4o-mini\") <- right($s, $m, $p);", "model"),
        ] {
            let m = check(&authority(&format!("{base} {code}")))
                .unwrap_err()
                .to_string();
            assert!(
                m.starts_with("block 0 ") && m.contains(&format!("`{name}(...)`")),
                "{code}: {m}"
            );
        }
    }

    #[test]
    fn lazy_boolean_operators_are_accepted() {
        let t = with_block(r#"check if method($m), $m == "GET" || $m == "POST" && true"#);
        assert!(check(&t).is_ok(), "{:?}", check(&t));
    }

    #[test]
    fn iterating_closures_and_regexes_are_refused() {
        for code in [
            r#"check if path($p), ["a", "b"].any($x -> $p.starts_with($x))"#,
            r#"check if path($p), $p.matches("^/v1/(a+)+$")"#,
            r#"check if path($p), $p == "a" || $p.matches("(a+)+")"#,
        ] {
            assert!(
                matches!(check(&with_block(code)), Err(TokenError::Shape(_))),
                "{code}"
            );
        }
    }

    fn ints(from: usize, n: usize) -> String {
        (from..from + n)
            .map(|i| i.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The red team's block (wave 2): 14.6 KB, eight facts of 256 distinct
    /// integers joined three ways through a chain of unions and
    /// intersections, ~180 ms of CPU per request within the old budget,
    /// which counted operations whatever their operands' size.
    #[test]
    fn regression_set_operations_are_charged_by_the_size_of_their_sets() {
        let facts: String = (0..8)
            .map(|k| format!("f({k}, {{{}}});", ints(k * 256, 256)))
            .collect();
        let u = "$x.union($y).union($z)";
        let red = format!(
            "{facts} check if f($a, $x), f($b, $y), f($c, $z), {u}.intersection({u}).intersection({u}).union({u}).length() < 0;"
        );
        match check(&with_block(&red)) {
            Err(TokenError::Shape(m)) => assert!(m.contains("set operations"), "{m}"),
            other => panic!("accepted: {other:?}"),
        }
        // Without a join, one chain over one fact's set costs its elements
        // at every step: refused past the budget too.
        let chain = |n: usize| {
            format!(
                "f({{{}}}); check if f($x), $x{}.length() < 0;",
                ints(0, 256),
                ".union($x)".repeat(n)
            )
        };
        assert!(check(&with_block(&chain(2))).is_ok());
        assert!(matches!(
            check(&with_block(&chain(12))),
            Err(TokenError::Shape(_))
        ));
        // Nested collections count their inner elements.
        let nested: Vec<String> = (0..200).map(|i| format!("[{i}]")).collect();
        let e = check(&with_block(&format!("g([{}]);", nested.join(", ")))).unwrap_err();
        assert!(e.to_string().contains("400 elements"), "{e}");
        // Allow-lists of the largest literal size stay accepted.
        let models: Vec<String> = (0..256).map(|i| format!("\"m{i}\"")).collect();
        let list = format!("check if model($m), [{}].contains($m);", models.join(", "));
        assert!(
            check(&with_block(&list)).is_ok(),
            "{:?}",
            check(&with_block(&list))
        );
    }

    /// The costliest set block the shape accepts (the longest chain of
    /// unions over a 256-element set the budget lets through) authorizes
    /// to its end (the failing check, not the run limits). Its time is
    /// `cargo bench --bench verify -- costliest_set_block` (the old shape's
    /// worst took 180 ms in release).
    #[test]
    fn the_costliest_accepted_set_block_authorizes_quickly() {
        use crate::policy::Policies;
        use crate::verify::{DenialKind, Verifier};
        let root = keys::generate();
        let parent = issue(
            &root,
            &Scope {
                services: vec!["openai".into()],
                ..Scope::default()
            },
        )
        .unwrap();
        let block = |n: usize| {
            format!(
                "f(1, {{{}}}); f(2, {{{}}}); check if f($a, $x), f($b, $y), $x{}.length() < 0;",
                ints(0, 256),
                ints(256, 256),
                ".union($y).intersection($x)".repeat(n)
            )
        };
        let token = |n: usize| {
            biscuit_auth::UnverifiedBiscuit::from_base64(&parent)
                .unwrap()
                .append(biscuit_auth::BlockBuilder::new().code(block(n)).unwrap())
                .unwrap()
                .to_base64()
                .unwrap()
        };
        let n = (1..32)
            .take_while(|&n| check(&RawToken::parse(&token(n)).unwrap()).is_ok())
            .last()
            .expect("one step is accepted");
        let v = Verifier::new(root.public(), Policies::default_policy());
        let t = v.verify_token(&token(n)).unwrap();
        let req = crate::token::RequestFacts {
            service: "openai".into(),
            method: "GET".into(),
            path: "/v1/x".into(),
            model: None,
            mcp: None,
            time: std::time::SystemTime::now(),
        };
        let start = std::time::Instant::now();
        let d = v.authorize(&t, &req, &[1, 1]).unwrap_err();
        // The check's own failure, not the authorizer's run limits cutting
        // it short: the costliest accepted block runs to its end. Its time
        // is measured by `cargo bench --bench verify -- costliest_set_block`,
        // not asserted here.
        assert_eq!(d.kind, DenialKind::Scope, "{d:?}");
        println!("{n} steps accepted, authorized in {:?}", start.elapsed());
    }
}
