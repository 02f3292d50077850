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
//!   elements. `&&` and `||` are fine;
//! * no `+`: on strings it concatenates, and a chain of concatenations of a
//!   long string costs time and memory quadratic in its length, on every
//!   combination of facts the check visits;
//! * a work budget: for every alternative of every check, the number of fact
//!   combinations its predicates can match (counting the facts of the blocks
//!   it can see, and the request's facts: up to [`crate::token::MAX_BLOCKS`]
//!   `uses` and `in_flight`, four times as many `rate`, one each of
//!   `service`, `method`, `path`, `model`, `time`, `mcp`, and one of
//!   `tool`, `prompt`, `resource`) times
//!   its operations plus one, summed over all attenuation blocks, is at most
//!   [`MAX_WORK`]. A check joining three predicates over 31 facts each is
//!   29,791 combinations: without this bound such a 6 KB token held a CPU for
//!   18 s, as biscuit-auth checks its time limit only between queries.
//!
//! Facts the operator's policies add are not counted: `policies/` is trusted
//! not to define thousands of facts of one name.
//!
//! Everything Till's own `attenuate` writes, and the usual checks other
//! Biscuit libraries write (`check if path($p), $p.starts_with("/v1/")`,
//! `check if time($t), $t <= ...`), fits. The authority block is written by
//! the operator and is not restricted.

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
/// (fact combinations × (operations + 1), see the module docs). Till's own
/// blocks cost about 100 each.
pub const MAX_WORK: u64 = 16_384;

fn term_ok(t: &Term) -> Result<(), String> {
    let n = match t {
        Term::Set(s) => s.len(),
        Term::Array(a) => a.len(),
        Term::Map(m) => m.len(),
        _ => 0,
    };
    if n > MAX_COLLECTION {
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

/// Facts of one block, counted by (predicate name, arity).
type FactCounts = HashMap<(String, usize), u64>;

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
            *c.entry(key).or_default() += 1;
        }
        counts.push(c);
        tables.push(t);
    }
    Ok((counts, tables))
}

/// Work of the checks of block `i` (≥ 1): for each alternative, the fact
/// combinations its predicates can match times (operations + 1). A check
/// sees the authority block, its own block and the request's facts, or every
/// block when it (or its block) has a `trusting` scope.
fn block_work(i: usize, b: &Decoded, counts: &[FactCounts], table: &SymbolTable) -> u64 {
    let mut work: u64 = 0;
    for q in b.checks.iter().flat_map(|c| c.queries.iter()) {
        let wide = b.scoped || !q.scopes.is_empty();
        let mut combos: u64 = 1;
        for p in &q.body {
            let key = (table.print_symbol_default(p.name), p.terms.len());
            let mut n = ambient(&key.0, key.1);
            for (j, c) in counts.iter().enumerate() {
                if wide || j == 0 || j == i {
                    n += c.get(&key).copied().unwrap_or(0);
                }
            }
            combos = combos.saturating_mul(n);
        }
        let ops: u64 = q
            .expressions
            .iter()
            .map(|e| ops_ok(&e.ops).unwrap_or(MAX_OPS) as u64)
            .sum();
        work = work.saturating_add(combos.saturating_mul(ops + 1).max(1));
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
    let mut blocks = Vec::with_capacity(proto.blocks.len() + 1);
    for (i, sb) in std::iter::once(&proto.authority)
        .chain(proto.blocks.iter())
        .enumerate()
    {
        let b = decode(sb).map_err(|why| refuse(i, why))?;
        if i > 0 {
            block_violation(&b).map_err(|why| refuse(i, why))?;
        }
        blocks.push(b);
    }
    let (counts, tables) = fact_counts(&blocks).map_err(|why| refuse(0, why))?;
    let mut work: u64 = 0;
    for (i, b) in blocks.iter().enumerate().skip(1) {
        work = work.saturating_add(block_work(i, b, &counts, &tables[i]));
        if work > MAX_WORK {
            return Err(refuse(
                i,
                format!(
                    "checks that, with the blocks before it, may take {work} evaluations (at most {MAX_WORK}): joining predicates multiplies the facts each one matches"
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
}
