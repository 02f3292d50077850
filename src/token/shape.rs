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
//!   elements. `&&` and `||` are fine.
//!
//! Everything Till's own `attenuate` writes, and the usual checks other
//! Biscuit libraries write (`check if path($p), $p.starts_with("/v1/")`,
//! `check if time($t), $t <= ...`), fits. The authority block is written by
//! the operator and is not restricted.

use biscuit_auth::datalog::{Binary, Op, Rule, Term, Unary};
use biscuit_auth::format::convert::proto_block_to_token_block;
use biscuit_auth::format::schema;
use prost::Message;

use super::{RawToken, TokenError};

pub const MAX_FACTS: usize = 32;
pub const MAX_CHECKS: usize = 32;
pub const MAX_QUERIES: usize = 16;
pub const MAX_BODY: usize = 3;
pub const MAX_EXPRESSIONS: usize = 8;
pub const MAX_OPS: usize = 64;
pub const MAX_COLLECTION: usize = 256;

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

/// Why block `index` (≥ 1) is refused, if it is.
fn block_violation(sb: &schema::SignedBlock) -> Result<(), String> {
    let pb =
        schema::Block::decode(sb.block.as_slice()).map_err(|e| format!("undecodable ({e})"))?;
    let b = proto_block_to_token_block(&pb, None).map_err(|e| format!("undecodable ({e})"))?;
    if !b.rules.is_empty() {
        return Err(format!(
            "{} rule(s); rules are not allowed in attenuation blocks (use checks)",
            b.rules.len()
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

/// Refuses a token whose attenuation blocks are outside the accepted shape.
pub fn check(raw: &RawToken) -> Result<(), TokenError> {
    for (i, sb) in raw.proto().blocks.iter().enumerate() {
        if let Err(why) = block_violation(sb) {
            return Err(TokenError::Shape(format!(
                "block {} is not accepted by Till: it contains {why}. Attenuation blocks may hold facts and bounded checks only (see policies/README.md)",
                i + 1
            )));
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
