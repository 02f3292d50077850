//! Reading a token back: per-block source, revocation ids, and the Till
//! vocabulary each block carries.
//!
//! biscuit's printer writes strings between quotes without escaping them, so
//! a label such as `x"); right("github", "*", "/` would print as if the block
//! held a second right. We print every block with a symbol table whose
//! strings are escaped, and we flag names (predicates, variables) that are not
//! identifiers, so the output cannot lie about what the block contains.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use biscuit_auth::PublicKey;
use biscuit_auth::builder::CheckKind;
use biscuit_auth::datalog::{Check, Predicate, Rule, SymbolTable, Term};
use biscuit_auth::format::convert::proto_block_to_token_block;
use biscuit_auth::format::schema;
use prost::Message;
use serde::Serialize;

use super::vocab::names;
use super::{MAX_TIME, MAX_TIME_UNIX, RawToken, TokenError, format_unix};

/// What one check of a block means in Till's vocabulary.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum CheckMeaning {
    /// `check if uses(block, $u), $u <= limit`
    UseLimit {
        block: usize,
        limit: u64,
    },
    /// `check if rate(block, seconds, $u), $u <= limit`: at most `limit`
    /// requests in any `seconds`.
    RateLimit {
        block: usize,
        limit: u64,
        seconds: u64,
    },
    /// `check if in_flight(block, $c), $c <= limit`
    Concurrency {
        block: usize,
        limit: u64,
    },
    /// `check if time($t), $t <= expires`
    Expires {
        at: String,
        unix: u64,
    },
    Services {
        allowed: Vec<String>,
    },
    Methods {
        allowed: Vec<String>,
    },
    PathPrefixes {
        allowed: Vec<String>,
    },
    Models {
        allowed: Vec<String>,
    },
    /// MCP tools (`tools/call`) allowed: exact names, and prefixes shown
    /// as `name*`. Other MCP messages pass.
    Tools {
        allowed: Vec<String>,
    },
    /// MCP prompts (`prompts/get`) allowed, as for tools.
    Prompts {
        allowed: Vec<String>,
    },
    /// MCP resource URI prefixes (`resources/read`) allowed, shown as `uri*`.
    Resources {
        allowed: Vec<String>,
    },
    /// Anything else; `source` is escaped.
    Custom {
        source: String,
    },
}

/// One block, read back.
#[derive(Clone, Debug, Serialize)]
pub struct BlockView {
    pub index: usize,
    /// Hex revocation id: revoking it revokes this block and all below it.
    pub revocation_id: String,
    /// Public key of a third-party block's signer.
    pub third_party_key: Option<String>,
    /// Datalog source with every string escaped.
    pub source: String,
    pub labels: Vec<String>,
    /// `(service, method, path prefix)`; only block 0 grants rights, so a
    /// `right` fact in any other block is listed under `warnings` instead.
    pub rights: Vec<(String, String, String)>,
    /// Own use limit (`check if uses(index, ..)` in this block), if any.
    pub use_limit: Option<u64>,
    /// Rate windows this block declares on itself, e.g. `10/1m`.
    pub rates: Vec<super::vocab::Rate>,
    /// Concurrency cap this block declares on itself.
    pub concurrency: Option<u64>,
    /// Why this block's use of the window vocabulary (`rate`, `in_flight`)
    /// cannot be enforced exactly, if it cannot: the verifier refuses such
    /// a token rather than count a window that other requests do not feed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub window_problem: Option<String>,
    /// Earliest expiry among this block's checks.
    pub expires: Option<String>,
    #[serde(skip)]
    pub expires_at: Option<SystemTime>,
    pub checks: Vec<CheckMeaning>,
    /// Reasons the printed source might be misleading (hostile tokens).
    pub warnings: Vec<String>,
    /// Rules in the block, or scope annotations on any rule or check.
    #[serde(skip)]
    pub has_rules_or_scopes: bool,
}

/// A whole token, read back without checking signatures.
#[derive(Clone, Debug, Serialize)]
pub struct TokenView {
    pub blocks: Vec<BlockView>,
    /// Revocation id of the authority block: the token family.
    pub family: String,
}

impl TokenView {
    /// Smallest use limit on each block, whichever block imposed it.
    pub fn effective_limits(&self) -> Vec<Option<u64>> {
        let mut out = vec![None; self.blocks.len()];
        for b in &self.blocks {
            for c in &b.checks {
                if let CheckMeaning::UseLimit { block, limit } = c
                    && let Some(slot) = out.get_mut(*block)
                {
                    *slot = Some(slot.map_or(*limit, |l: u64| l.min(*limit)));
                }
            }
        }
        out
    }

    /// Earliest expiry over all blocks.
    pub fn expires_at(&self) -> Option<SystemTime> {
        self.blocks.iter().filter_map(|b| b.expires_at).min()
    }

    /// Labels of all blocks, outermost first.
    pub fn labels(&self) -> Vec<String> {
        self.blocks.iter().flat_map(|b| b.labels.clone()).collect()
    }
    /// Block `k` as messages name it for whoever holds the token: the last
    /// block is the key they hold ("this key"), earlier ones are keys it was
    /// made from, told apart by their index; each with its label if any.
    pub fn key_name(&self, k: usize) -> String {
        let label = self
            .blocks
            .get(k)
            .and_then(|b| b.labels.first())
            .map(|l| format!("label {l:?}"));
        if k + 1 == self.blocks.len() {
            match label {
                Some(l) => format!("this key ({l})"),
                None => "this key".into(),
            }
        } else {
            match label {
                Some(l) => format!("the key this one was made from (block {k}, {l})"),
                None => format!("the key this one was made from (block {k})"),
            }
        }
    }

    /// What to do about a key that can no longer be used because of block
    /// `k`.
    pub fn ask_for_a_new_one(&self, k: usize) -> &'static str {
        if k + 1 == self.blocks.len() {
            "ask whoever gave it to you for a new one"
        } else {
            "ask whoever gave you this key for a new one"
        }
    }
}

/// `n` times, in words.
fn times(n: u64) -> String {
    match n {
        1 => "once".into(),
        n => format!("{n} times"),
    }
}

struct Decoded {
    facts: Vec<biscuit_auth::datalog::Fact>,
    rules: Vec<Rule>,
    checks: Vec<Check>,
    symbols: SymbolTable,
    public_keys: Vec<PublicKey>,
    /// The block has block-level `trusting` annotations.
    scoped: bool,
}

fn escape(s: &str) -> String {
    s.escape_debug().to_string()
}

fn is_ident(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

/// Decodes every block of `raw` and describes it.
pub fn inspect(raw: &RawToken) -> Result<TokenView, TokenError> {
    let proto = raw.proto();
    let signed: Vec<&schema::SignedBlock> = std::iter::once(&proto.authority)
        .chain(proto.blocks.iter())
        .collect();
    let mut blocks = Vec::with_capacity(signed.len());
    for (i, sb) in signed.iter().enumerate() {
        let ext = match &sb.external_signature {
            Some(e) => Some(
                PublicKey::from_proto(&e.public_key)
                    .map_err(|e| TokenError::Malformed(format!("block {i}: {e}")))?,
            ),
            None => None,
        };
        let pb = schema::Block::decode(sb.block.as_slice())
            .map_err(|e| TokenError::Malformed(format!("block {i}: {e}")))?;
        let b = proto_block_to_token_block(&pb, ext)
            .map_err(|e| TokenError::Malformed(format!("block {i}: {e}")))?;
        // The block type is not exported by biscuit-auth; keep what we need.
        let decoded = Decoded {
            facts: b.facts,
            rules: b.rules,
            checks: b.checks,
            symbols: b.symbols,
            public_keys: b.public_keys.into_inner(),
            scoped: !b.scopes.is_empty(),
        };
        blocks.push((decoded, ext));
    }

    // First-party blocks share one symbol table, appended block by block;
    // third-party blocks carry their own.
    let mut strings = Vec::new();
    let mut keys = Vec::new();
    for (b, ext) in &blocks {
        if ext.is_none() {
            strings.extend(b.symbols.strings());
            keys.extend(b.public_keys.iter().cloned());
        }
    }
    let shared = SymbolTable::from_symbols_and_public_keys(strings.clone(), keys.clone())
        .map_err(|e| TokenError::Malformed(format!("symbol table: {e}")))?;
    let shared_escaped = SymbolTable::from_symbols_and_public_keys(
        strings.iter().map(|s| escape(s)).collect(),
        keys,
    )
    .map_err(|e| TokenError::Malformed(format!("symbol table: {e}")))?;

    let ids = raw.revocation_ids();
    let mut views = Vec::with_capacity(blocks.len());
    for (i, (block, ext)) in blocks.iter().enumerate() {
        let (syms, esc) = match ext {
            None => (shared.clone(), shared_escaped.clone()),
            Some(_) => {
                let s = block.symbols.strings();
                let k = block.public_keys.clone();
                let plain = SymbolTable::from_symbols_and_public_keys(s.clone(), k.clone())
                    .map_err(|e| TokenError::Malformed(format!("block {i}: {e}")))?;
                let e = SymbolTable::from_symbols_and_public_keys(
                    s.iter().map(|s| escape(s)).collect(),
                    k,
                )
                .map_err(|e| TokenError::Malformed(format!("block {i}: {e}")))?;
                (plain, e)
            }
        };
        views.push(describe(
            i,
            block,
            &syms,
            &esc,
            ids.get(i).cloned().unwrap_or_default(),
            *ext,
        ));
    }
    // An expiry Till cannot represent would be one it could neither show nor
    // compare as a time: refuse the token instead of guessing (an earlier
    // bound would deny uses the token allows, a missing one would hide it).
    for v in &views {
        for c in &v.checks {
            if let CheckMeaning::Expires { unix, .. } = c
                && *unix > MAX_TIME_UNIX
            {
                return Err(TokenError::Shape(format!(
                    "block {} expires after {MAX_TIME} (`check if time($t), $t <= ...`), later than Till handles; write an expiry up to {MAX_TIME}, or none",
                    v.index
                )));
            }
        }
    }
    Ok(TokenView {
        family: ids.first().cloned().unwrap_or_default(),
        blocks: views,
    })
}

fn sym(t: &SymbolTable, i: u64) -> String {
    t.print_symbol_default(i)
}

fn term_str(t: &SymbolTable, term: &Term) -> Option<String> {
    match term {
        Term::Str(i) => Some(sym(t, *i)),
        _ => None,
    }
}

fn collect_names(preds: &mut Vec<u64>, vars: &mut Vec<u32>, rule: &Rule) {
    for p in std::iter::once(&rule.head).chain(rule.body.iter()) {
        preds.push(p.name);
        for t in &p.terms {
            if let Term::Variable(v) = t {
                vars.push(*v);
            }
        }
    }
}

fn describe(
    index: usize,
    block: &Decoded,
    syms: &SymbolTable,
    esc: &SymbolTable,
    revocation_id: String,
    ext: Option<PublicKey>,
) -> BlockView {
    let mut warnings = Vec::new();
    let mut pred_names: Vec<u64> = block.facts.iter().map(|f| f.predicate.name).collect();
    let mut var_names = Vec::new();
    for r in &block.rules {
        collect_names(&mut pred_names, &mut var_names, r);
    }
    for c in &block.checks {
        for q in &c.queries {
            collect_names(&mut pred_names, &mut var_names, q);
        }
    }
    for n in pred_names
        .iter()
        .copied()
        .chain(var_names.iter().map(|v| *v as u64))
    {
        let s = sym(syms, n);
        if !is_ident(&s) {
            warnings.push(format!(
                "block {index} uses the name {s:?}, which is not an identifier: the source below may be misleading"
            ));
        }
    }

    warnings.extend(ambient_warnings(index, block, syms));

    let mut source = String::new();
    for f in &block.facts {
        source.push_str(&esc.print_fact(f));
        source.push_str(";\n");
    }
    for r in &block.rules {
        source.push_str(&esc.print_rule(r));
        source.push_str(";\n");
    }
    for c in &block.checks {
        source.push_str(&esc.print_check(c));
        source.push_str(";\n");
    }

    let mut labels = Vec::new();
    let mut rights = Vec::new();
    for f in &block.facts {
        let name = sym(syms, f.predicate.name);
        let strs: Vec<Option<String>> = f
            .predicate
            .terms
            .iter()
            .map(|t| term_str(syms, t))
            .collect();
        match (name.as_str(), strs.as_slice()) {
            (names::LABEL, [Some(l)]) => labels.push(l.clone()),
            (names::RIGHT, [Some(s), Some(m), Some(p)]) if index == 0 => {
                rights.push((s.clone(), m.clone(), p.clone()))
            }
            // Policies only trust the authority block: showing these as
            // rights would make a forged child look more powerful than it is.
            (names::RIGHT, [Some(s), Some(m), Some(p)]) => warnings.push(format!(
                "block {index} declares right({s:?}, {m:?}, {p:?}), which grants nothing: only the authority block's rights count"
            )),
            _ => {}
        }
    }

    let checks: Vec<CheckMeaning> = block.checks.iter().map(|c| meaning(c, syms, esc)).collect();
    let use_limit = checks
        .iter()
        .filter_map(|c| match c {
            CheckMeaning::UseLimit { block, limit } if *block == index => Some(*limit),
            _ => None,
        })
        .min();
    let mut rates: Vec<super::vocab::Rate> = Vec::new();
    let mut concurrency: Option<u64> = None;
    let mut window_problem = None;
    for (c, raw) in checks.iter().zip(&block.checks) {
        let reads_window = raw.queries.iter().any(|q| {
            q.body.iter().any(|p| {
                let n = sym(syms, p.name);
                n == names::RATE || n == names::IN_FLIGHT
            })
        });
        match c {
            CheckMeaning::RateLimit {
                block,
                limit,
                seconds,
            } if *block == index => match super::vocab::Rate::new(*limit, *seconds) {
                Ok(r) => match rates.iter_mut().find(|x| x.seconds == r.seconds) {
                    Some(x) => x.limit = x.limit.min(r.limit),
                    None => rates.push(r),
                },
                Err(e) => {
                    window_problem.get_or_insert(format!("block {index}'s rate window: {e}"));
                }
            },
            CheckMeaning::Concurrency { block, limit }
                if *block == index && (1..=super::vocab::MAX_CONCURRENCY).contains(limit) =>
            {
                concurrency = Some(concurrency.map_or(*limit, |c: u64| c.min(*limit)));
            }
            _ if reads_window => {
                window_problem.get_or_insert(format!(
                    "block {index} has a check on rate or in_flight that is not its own window or cap (`check if rate({index}, SECONDS, $u), $u <= N` or `check if in_flight({index}, $c), $c <= N`): only those are counted"
                ));
            }
            _ => {}
        }
    }
    if rates.len() > super::vocab::MAX_WINDOWS_PER_BLOCK {
        window_problem.get_or_insert(format!(
            "block {index} declares {} rate windows, more than {}",
            rates.len(),
            super::vocab::MAX_WINDOWS_PER_BLOCK
        ));
    }
    let expires_unix = checks
        .iter()
        .filter_map(|c| match c {
            CheckMeaning::Expires { unix, .. } => Some(*unix),
            _ => None,
        })
        .min();
    // Checked: a crafted block can hold any u64 as a date. An expiry past
    // MAX_TIME_UNIX gets none here, and `inspect` refuses the token.
    let expires_at = expires_unix
        .filter(|u| *u <= MAX_TIME_UNIX)
        .and_then(|u| UNIX_EPOCH.checked_add(Duration::from_secs(u)));
    BlockView {
        index,
        revocation_id,
        third_party_key: ext.map(|k| k.to_string()),
        source,
        labels,
        rights,
        use_limit,
        rates,
        concurrency,
        window_problem,
        expires: expires_unix.map(format_unix),
        expires_at,
        checks,
        warnings,
        has_rules_or_scopes: !block.rules.is_empty()
            || block.scoped
            || block
                .checks
                .iter()
                .any(|c| c.queries.iter().any(|q| !q.scopes.is_empty())),
    }
}

/// A fact or rule head named after a request fact (`uses`, `path`, ...):
/// the block's own checks on it could be satisfied by it, so what the
/// checks are shown to enforce may not hold. The verifier refuses such a
/// token (`token::shape`); `till inspect` still reads it, and says so.
fn ambient_warnings(index: usize, block: &Decoded, syms: &SymbolTable) -> Vec<String> {
    let facts = block.facts.iter().map(|f| f.predicate.name);
    let heads = block.rules.iter().map(|r| r.head.name);
    let mut stated: Vec<String> = facts
        .chain(heads)
        .map(|n| sym(syms, n))
        .filter(|n| names::is_ambient(n))
        .collect();
    stated.sort();
    stated.dedup();
    stated
        .into_iter()
        .map(|n| format!(
            "block {index} states {n}(...) itself, a request fact only Till supplies: its checks on {n} may be satisfied by its own facts rather than by the request, so the limits shown may not hold; Till refuses this token"
        ))
        .collect()
}

fn body_names(syms: &SymbolTable, body: &[Predicate]) -> Vec<String> {
    body.iter().map(|p| sym(syms, p.name)).collect()
}

/// Strings and integers and dates appearing as constants in a rule's expressions.
fn constants(rule: &Rule) -> Vec<Term> {
    use biscuit_auth::datalog::Op;
    fn walk(ops: &[Op], out: &mut Vec<Term>) {
        for op in ops {
            match op {
                Op::Value(Term::Set(s)) => out.extend(s.iter().cloned()),
                Op::Value(Term::Variable(_)) => {}
                Op::Value(t) => out.push(t.clone()),
                Op::Closure(_, inner) => walk(inner, out),
                _ => {}
            }
        }
    }
    let mut out = Vec::new();
    for e in &rule.expressions {
        walk(&e.ops, &mut out);
    }
    out
}

/// The strings a scope check allows, when every alternative of `check` is
/// exactly one of the forms Till (or a careful agent) writes on the variable
/// of its single predicate: `{"a", "b"}.contains($v)` or `$v == "a"`, or, for
/// paths (`prefix`), `$v.starts_with("a")`. Anything else (`$v != "a"`,
/// `!$v.starts_with("a")`, `"abc".contains($v)`, ...) is not an allow-list
/// and must not be shown as one.
fn allow_list(check: &Check, syms: &SymbolTable, prefix: bool) -> Option<Vec<String>> {
    use biscuit_auth::datalog::{Binary, Op};
    let mut out = Vec::new();
    for q in &check.queries {
        let [pred] = q.body.as_slice() else {
            return None;
        };
        let [Term::Variable(v)] = pred.terms.as_slice() else {
            return None;
        };
        let [e] = q.expressions.as_slice() else {
            return None;
        };
        let is_var = |op: &Op| matches!(op, Op::Value(Term::Variable(x)) if x == v);
        match (prefix, e.ops.as_slice()) {
            (true, [a, Op::Value(Term::Str(s)), Op::Binary(Binary::Prefix)]) if is_var(a) => {
                out.push(sym(syms, *s))
            }
            (false, [Op::Value(Term::Set(set)), a, Op::Binary(Binary::Contains)]) if is_var(a) => {
                for t in set {
                    out.push(term_str(syms, t)?);
                }
            }
            (
                false,
                [
                    a,
                    Op::Value(Term::Str(s)),
                    Op::Binary(Binary::Equal | Binary::HeterogeneousEqual),
                ]
                | [
                    Op::Value(Term::Str(s)),
                    a,
                    Op::Binary(Binary::Equal | Binary::HeterogeneousEqual),
                ],
            ) if is_var(a) => out.push(sym(syms, *s)),
            _ => return None,
        }
    }
    out.sort();
    out.dedup();
    Some(out)
}

/// `$x <= constant`, the only comparison a use limit or expiry may use.
fn is_at_most(rule: &Rule) -> bool {
    use biscuit_auth::datalog::{Binary, Op};
    rule.expressions.len() == 1
        && matches!(
            rule.expressions[0].ops.as_slice(),
            [
                Op::Value(Term::Variable(_)),
                Op::Value(_),
                Op::Binary(Binary::LessOrEqual)
            ]
        )
}

fn meaning(check: &Check, syms: &SymbolTable, esc: &SymbolTable) -> CheckMeaning {
    let custom = || CheckMeaning::Custom {
        source: esc.print_check(check),
    };
    if check.kind != CheckKind::One || check.queries.is_empty() {
        return custom();
    }
    let q0 = &check.queries[0];
    let names0 = body_names(syms, &q0.body);
    // Single-predicate checks on one of our facts.
    let only = |n: &str| {
        check
            .queries
            .iter()
            .all(|q| q.body.len() == 1 && sym(syms, q.body[0].name) == n && q.scopes.is_empty())
    };
    if check.queries.len() == 1 && names0 == [names::USES] && is_at_most(q0) {
        if let ([Term::Integer(k), Term::Variable(_)], [Term::Integer(n)]) =
            (q0.body[0].terms.as_slice(), constants(q0).as_slice())
            && *k >= 0
            && *n >= 0
        {
            return CheckMeaning::UseLimit {
                block: *k as usize,
                limit: *n as u64,
            };
        }
        return custom();
    }
    if check.queries.len() == 1 && names0 == [names::RATE] && is_at_most(q0) {
        if let ([Term::Integer(k), Term::Integer(d), Term::Variable(_)], [Term::Integer(n)]) =
            (q0.body[0].terms.as_slice(), constants(q0).as_slice())
            && *k >= 0
            && *d >= 0
            && *n >= 0
        {
            return CheckMeaning::RateLimit {
                block: *k as usize,
                limit: *n as u64,
                seconds: *d as u64,
            };
        }
        return custom();
    }
    if check.queries.len() == 1 && names0 == [names::IN_FLIGHT] && is_at_most(q0) {
        if let ([Term::Integer(k), Term::Variable(_)], [Term::Integer(n)]) =
            (q0.body[0].terms.as_slice(), constants(q0).as_slice())
            && *k >= 0
            && *n >= 0
        {
            return CheckMeaning::Concurrency {
                block: *k as usize,
                limit: *n as u64,
            };
        }
        return custom();
    }
    if check.queries.len() == 1 && names0 == [names::TIME] && is_at_most(q0) {
        if let [Term::Date(d)] = constants(q0).as_slice() {
            let at = format_unix(*d);
            return CheckMeaning::Expires { at, unix: *d };
        }
        return custom();
    }
    let list = |prefix| allow_list(check, syms, prefix);
    if only(names::PATH)
        && let Some(allowed) = list(true)
    {
        return CheckMeaning::PathPrefixes { allowed };
    }
    if only(names::SERVICE)
        && let Some(allowed) = list(false)
    {
        return CheckMeaning::Services { allowed };
    }
    if only(names::METHOD)
        && let Some(allowed) = list(false)
    {
        return CheckMeaning::Methods { allowed };
    }
    if only(names::MODEL)
        && let Some(allowed) = list(false)
    {
        return CheckMeaning::Models { allowed };
    }
    use super::vocab::{PROMPTS_GET, RESOURCES_READ, TOOLS_CALL};
    if let Some(allowed) = target_list(check, syms, TOOLS_CALL, names::TOOL) {
        return CheckMeaning::Tools { allowed };
    }
    if let Some(allowed) = target_list(check, syms, PROMPTS_GET, names::PROMPT) {
        return CheckMeaning::Prompts { allowed };
    }
    if let Some(allowed) = target_list(check, syms, RESOURCES_READ, names::RESOURCE) {
        return CheckMeaning::Resources { allowed };
    }
    custom()
}

/// The targets a check written by [`super::vocab`] allows: first
/// `mcp($m), $m != "<method>"`, then only `<fact>($t)` alternatives that
/// are `{..}.contains($t)` or `$t.starts_with("..")` (shown as `..*`).
fn target_list(check: &Check, syms: &SymbolTable, method: &str, fact: &str) -> Option<Vec<String>> {
    use biscuit_auth::datalog::{Binary, Op};
    let (first, rest) = check.queries.split_first()?;
    let [pred] = first.body.as_slice() else {
        return None;
    };
    let [Term::Variable(v)] = pred.terms.as_slice() else {
        return None;
    };
    let [e] = first.expressions.as_slice() else {
        return None;
    };
    let housekeeping = sym(syms, pred.name) == names::MCP
        && first.scopes.is_empty()
        && matches!(
            e.ops.as_slice(),
            [Op::Value(Term::Variable(x)), Op::Value(Term::Str(s)), Op::Binary(Binary::NotEqual | Binary::HeterogeneousNotEqual)]
                if x == v && sym(syms, *s) == method
        );
    if !housekeeping || rest.is_empty() {
        return None;
    }
    let mut out = Vec::new();
    for q in rest {
        if q.body.len() != 1 || sym(syms, q.body[0].name) != fact || !q.scopes.is_empty() {
            return None;
        }
        let one = Check {
            queries: vec![q.clone()],
            kind: CheckKind::One,
        };
        if let Some(names) = allow_list(&one, syms, false) {
            out.extend(names);
        } else {
            out.extend(
                allow_list(&one, syms, true)?
                    .into_iter()
                    .map(|p| format!("{p}*")),
            );
        }
    }
    out.sort();
    out.dedup();
    Some(out)
}

impl CheckMeaning {
    /// Why this check of block `index` of `view` failed, in words for
    /// whoever holds the token: it names the key by its label and tells
    /// them what to do.
    pub fn explain(&self, index: usize, view: &TokenView) -> String {
        let list = |v: &[String]| {
            v.iter()
                .map(|s| format!("{s:?}"))
                .collect::<Vec<_>>()
                .join(" or ")
        };
        let who = view.key_name(index);
        let ask = view.ask_for_a_new_one(index);
        match self {
            CheckMeaning::UseLimit { block, limit } if *block == index => {
                let used = match limit {
                    0 => "may not be used at all".to_string(),
                    1 => "has used its one use".to_string(),
                    n => format!("has used all {n} of its uses"),
                };
                format!("{who} {used}; {ask}")
            }
            CheckMeaning::UseLimit { block, limit } => format!(
                "{who} stops working once {} has been used {}, which it has; {ask}",
                view.key_name(*block),
                times(*limit)
            ),
            CheckMeaning::RateLimit { limit, seconds, .. } => {
                let r = super::vocab::Rate {
                    limit: *limit,
                    seconds: *seconds,
                };
                format!(
                    "{who} allows {r} (at most {limit} requests in any {seconds} s) and that window is full; retry when a slot frees"
                )
            }
            CheckMeaning::Concurrency { limit, .. } => format!(
                "{who} allows {limit} request(s) in flight at once and that many are running; retry when one finishes"
            ),
            CheckMeaning::Expires { at, .. } => format!("{who} expired at {at}; {ask}"),
            CheckMeaning::Services { allowed } => {
                format!("{who} only allows service {}", list(allowed))
            }
            CheckMeaning::Methods { allowed } => {
                format!("{who} only allows method {}", list(allowed))
            }
            CheckMeaning::PathPrefixes { allowed } => {
                format!("{who} only allows paths starting with {}", list(allowed))
            }
            CheckMeaning::Models { allowed } => format!(
                "{who} only allows model {} (named in a JSON or form body's \"model\" field, a multipart body's `model` part or `?model=`)",
                list(allowed)
            ),
            CheckMeaning::Tools { allowed } => format!(
                "{who} only allows the MCP tool {} (a name ending in '*' is a prefix)",
                list(allowed)
            ),
            CheckMeaning::Prompts { allowed } => format!(
                "{who} only allows the MCP prompt {} (a name ending in '*' is a prefix)",
                list(allowed)
            ),
            CheckMeaning::Resources { allowed } => format!(
                "{who} only allows MCP resources whose URI starts with {}",
                list(
                    &allowed
                        .iter()
                        .map(|r| r.trim_end_matches('*').to_string())
                        .collect::<Vec<_>>()
                )
            ),
            CheckMeaning::Custom { source } => format!("a check of {who} failed: {source}"),
        }
    }

    /// Whether this is an activation limit (429) rather than a scope denial (403).
    pub fn is_use_limit(&self) -> bool {
        matches!(self, CheckMeaning::UseLimit { .. })
    }

    /// Whether this is a rate window or concurrency cap: full now, free
    /// later (429, retryable).
    pub fn is_window(&self) -> bool {
        matches!(
            self,
            CheckMeaning::RateLimit { .. } | CheckMeaning::Concurrency { .. }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::{Scope, attenuate, issue, keys};

    #[test]
    fn hostile_label_cannot_forge_output() {
        let root = keys::generate();
        let scope = Scope {
            services: vec!["openai".into()],
            label: Some("x\"); right(\"github\", \"*\", \"/\"); //".into()),
            ..Scope::default()
        };
        let t = issue(&root, &scope).unwrap();
        let v = inspect(&RawToken::parse(&t).unwrap()).unwrap();
        let src = &v.blocks[0].source;
        assert!(!src.contains("right(\"github\""), "{src}");
        assert!(
            src.contains(r#"label("x\"); right(\"github\", \"*\", \"/\"); //")"#),
            "{src}"
        );
        assert_eq!(v.blocks[0].rights.len(), 1);
        assert_eq!(
            v.blocks[0].labels[0],
            "x\"); right(\"github\", \"*\", \"/\"); //"
        );
    }

    /// A block stating request facts is read back (the verifier refuses
    /// it), with a warning that its checks may be satisfied by its own
    /// facts: the limits shown may not hold.
    #[test]
    fn a_block_stating_request_facts_is_flagged() {
        let root = keys::generate();
        let t = issue(
            &root,
            &Scope {
                services: vec!["openai".into()],
                ..Scope::default()
            },
        )
        .unwrap();
        let child = biscuit_auth::UnverifiedBiscuit::from_base64(&t)
            .unwrap()
            .append(
                biscuit_auth::BlockBuilder::new()
                    .code(r#"uses(1, 0); path("/v1/chat/x"); label("looks-narrow"); check if uses(1, $u), $u <= 2;"#)
                    .unwrap(),
            )
            .unwrap()
            .to_base64()
            .unwrap();
        let v = inspect(&RawToken::parse(&child).unwrap()).unwrap();
        let w = &v.blocks[1].warnings;
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(w[0].starts_with("block 1 states path(...) itself"), "{w:?}");
        assert!(w[1].starts_with("block 1 states uses(...) itself"), "{w:?}");
        assert!(v.blocks[0].warnings.is_empty());
    }

    #[test]
    fn vocabulary_round_trips() {
        let root = keys::generate();
        let scope = Scope {
            services: vec!["openai".into()],
            methods: vec!["POST".into()],
            paths: vec!["/v1/chat/".into()],
            models: vec!["gpt-4o-mini".into()],
            tools: vec!["github_*".into(), "add".into(), "echo".into()],
            prompts: vec!["greet".into()],
            resources: vec!["res://docs/".into()],
            max_uses: Some(100),
            expires: Some(UNIX_EPOCH + Duration::from_secs(1_800_000_000)),
            label: Some("ci-bot".into()),
            datalog: None,
            rates: vec![crate::token::vocab::Rate {
                limit: 100,
                seconds: 3600,
            }],
            concurrency: Some(4),
        };
        let t = issue(&root, &scope).unwrap();
        let child = attenuate(
            &t,
            &Scope {
                paths: vec!["/v1/chat/completions".into(), "/v1/x".into()],
                methods: vec!["POST".into()],
                services: vec!["openai".into()],
                tools: vec!["add".into()],
                max_uses: Some(5),
                rates: vec![
                    crate::token::vocab::Rate::parse("10/1s").unwrap(),
                    crate::token::vocab::Rate::parse("50/1m").unwrap(),
                ],
                ..Scope::default()
            },
        )
        .unwrap();
        let v = inspect(&RawToken::parse(&child).unwrap()).unwrap();
        assert_eq!(v.blocks[0].concurrency, Some(4));
        assert_eq!(v.blocks[1].concurrency, None);
        assert_eq!(
            v.blocks[1]
                .rates
                .iter()
                .map(|r| r.to_string())
                .collect::<Vec<_>>(),
            vec!["10/1s", "50/1m"]
        );
        assert_eq!(v.blocks[0].rates[0].to_string(), "100/1h");
        assert!(v.blocks.iter().all(|b| b.window_problem.is_none()));
        assert_eq!(v.blocks.len(), 2);
        let b0 = &v.blocks[0];
        assert_eq!(
            b0.rights,
            vec![("openai".into(), "POST".into(), "/v1/chat/".into())]
        );
        assert_eq!(b0.use_limit, Some(100));
        assert_eq!(b0.expires.as_deref(), Some("2027-01-15T08:00:00Z"));
        assert!(b0.checks.contains(&CheckMeaning::Models {
            allowed: vec!["gpt-4o-mini".into()]
        }));
        assert!(b0.checks.contains(&CheckMeaning::Tools {
            allowed: vec!["add".into(), "echo".into(), "github_*".into()]
        }));
        assert!(b0.checks.contains(&CheckMeaning::Prompts {
            allowed: vec!["greet".into()]
        }));
        assert!(b0.checks.contains(&CheckMeaning::Resources {
            allowed: vec!["res://docs/*".into()]
        }));
        let b1 = &v.blocks[1];
        assert_eq!(b1.use_limit, Some(5));
        assert!(b1.checks.contains(&CheckMeaning::PathPrefixes {
            allowed: vec!["/v1/chat/completions".into(), "/v1/x".into()]
        }));
        assert!(b1.checks.contains(&CheckMeaning::Services {
            allowed: vec!["openai".into()]
        }));
        assert!(b1.checks.contains(&CheckMeaning::Tools {
            allowed: vec!["add".into()]
        }));
        assert_eq!(v.effective_limits(), vec![Some(100), Some(5)]);
        assert_eq!(v.family, v.blocks[0].revocation_id);
    }

    #[test]
    fn only_exact_allow_lists_are_read_as_scope() {
        let root = keys::generate();
        let t = issue(
            &root,
            &Scope {
                services: vec!["openai".into()],
                ..Scope::default()
            },
        )
        .unwrap();
        let child = attenuate(
            &t,
            &Scope {
                datalog: Some(
                    r#"check if service($s), $s != "openai";
                       check if path($p), !$p.starts_with("/v1/");
                       check if model($m), "abc".contains($m);
                       check if method($m), $m.starts_with("G");
                       check if service($s), $s == "openai";
                       right("github", "*", "/");"#
                        .into(),
                ),
                ..Scope::default()
            },
        )
        .unwrap();
        let v = inspect(&RawToken::parse(&child).unwrap()).unwrap();
        let c = &v.blocks[1].checks;
        assert!(
            c[..4]
                .iter()
                .all(|m| matches!(m, CheckMeaning::Custom { .. })),
            "{c:?}"
        );
        assert_eq!(
            c[4],
            CheckMeaning::Services {
                allowed: vec!["openai".into()]
            }
        );
        assert!(v.blocks[1].rights.is_empty());
        assert!(
            v.blocks[1].warnings[0].contains("grants nothing"),
            "{:?}",
            v.blocks[1].warnings
        );
    }
}
