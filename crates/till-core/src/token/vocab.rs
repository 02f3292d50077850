//! The Datalog vocabulary of Till tokens: the one place that knows fact names.
//!
//! Every string that comes from a user (a path, a label, a model name) enters
//! the Datalog through a typed parameter, never by string concatenation, so a
//! label such as `x"); right("github"` stays one string.

use std::collections::{BTreeSet, HashMap};
use std::time::SystemTime;

use biscuit_auth::builder::{self, BlockBuilder, Term};

use super::TokenError;

/// Predicate names. Policies in `policies/*.datalog` and the proxy's ambient
/// facts use exactly these.
pub mod names {
    /// `right($service, $method, $path_prefix)`: authority block only.
    pub const RIGHT: &str = "right";
    /// `label($text)`: free text naming who a token (or block) is for.
    pub const LABEL: &str = "label";
    /// `use_limit($block, $n)`: informational twin of the `uses` check.
    pub const USE_LIMIT: &str = "use_limit";
    /// `uses($block, $n)`: supplied by the verifier for every block.
    pub const USES: &str = "uses";
    /// `rate_limit($block, $n, $seconds)`: informational twin of the `rate`
    /// check (at most `$n` requests in any `$seconds`).
    pub const RATE_LIMIT: &str = "rate_limit";
    /// `rate($block, $seconds, $n)`: supplied by the verifier for every
    /// window a block declares on itself: requests admitted to that window
    /// in the last `$seconds`, this one included.
    pub const RATE: &str = "rate";
    /// `concurrency_limit($block, $n)`: informational twin of the
    /// `in_flight` check.
    pub const CONCURRENCY_LIMIT: &str = "concurrency_limit";
    /// `in_flight($block, $n)`: supplied by the verifier for every block
    /// with a concurrency cap: its requests in flight, this one included.
    pub const IN_FLIGHT: &str = "in_flight";
    pub const SERVICE: &str = "service";
    pub const METHOD: &str = "method";
    pub const PATH: &str = "path";
    pub const MODEL: &str = "model";
    pub const TIME: &str = "time";
    /// `mcp($method)`: the JSON-RPC method of one MCP message, for requests
    /// to an `api = "mcp"` upstream only; `""` when the request carries no
    /// JSON-RPC request or notification (a GET, a DELETE, a response).
    pub const MCP: &str = "mcp";
    /// `tool($name)`: the tool an MCP `tools/call` message names.
    pub const TOOL: &str = "tool";
    /// `prompt($name)`: the prompt an MCP `prompts/get` message names.
    pub const PROMPT: &str = "prompt";
    /// `resource($uri)`: the resource an MCP `resources/read` message names.
    pub const RESOURCE: &str = "resource";

    /// The request facts the verifier supplies ([`super::RequestFacts`] and
    /// [`super::add_windows_to`]). Only the verifier may state them: a
    /// block holding `uses(1, 0)` or `path("/v1/chat/x")` itself would
    /// satisfy its own checks on them (a check needs one matching fact, and
    /// a block's checks see its own facts), so it would look narrow to
    /// `till inspect`, the usage view and alerts while enforcing nothing.
    /// `token::shape` refuses a fact or rule head of any of these names in
    /// every block.
    pub const AMBIENT: &[&str] = &[
        USES, RATE, IN_FLIGHT, SERVICE, METHOD, PATH, MODEL, TIME, MCP, TOOL, PROMPT, RESOURCE,
    ];

    /// Whether `name` is one of the [`AMBIENT`] request facts.
    pub fn is_ambient(name: &str) -> bool {
        AMBIENT.contains(&name)
    }
}

/// The MCP method whose messages spend a use and are checked against the
/// token's tools.
pub const TOOLS_CALL: &str = "tools/call";
/// The MCP method checked against the token's prompts.
pub const PROMPTS_GET: &str = "prompts/get";
/// The MCP method checked against the token's resources.
pub const RESOURCES_READ: &str = "resources/read";

/// The MCP methods that name a target, the fact the target becomes, and
/// the parameter that holds it.
pub const NAMED_TARGETS: &[(&str, &str, &str)] = &[
    (TOOLS_CALL, names::TOOL, "name"),
    (PROMPTS_GET, names::PROMPT, "name"),
    (RESOURCES_READ, names::RESOURCE, "uri"),
];

/// Longest resource URI prefix accepted in a token.
pub const MAX_RESOURCE_LEN: usize = 1024;

/// Longest MCP tool name accepted (the MCP specification's bound).
pub const MAX_TOOL_LEN: usize = 128;

/// Wildcard accepted in the service and method positions of `right`.
pub const ANY: &str = "*";

/// The service name reserved for the proxy's admin API. It cannot be a route
/// (it contains a colon) and `*` does not cover it.
pub const ADMIN_SERVICE: &str = "till:admin";

/// What a block allows. Empty lists mean "no restriction at this level" for an
/// attenuation block; for an authority block, `services` must not be empty.
#[derive(Clone, Debug, Default)]
pub struct Scope {
    /// Upstream names, e.g. `openai`. Any of these.
    pub services: Vec<String>,
    /// HTTP methods, upper case. Any of these; empty means any method.
    pub methods: Vec<String>,
    /// Normalised path prefixes. Any of these; empty means any path.
    pub paths: Vec<String>,
    /// Model allow-list. When set, requests must name one of these models.
    pub models: Vec<String>,
    /// MCP tools this block may call: exact names, or prefixes written
    /// `name*` ([`ToolPattern`]). Empty means every tool.
    pub tools: Vec<String>,
    /// MCP prompts this block may get (`prompts/get`): names or `name*`
    /// prefixes. Empty means every prompt.
    pub prompts: Vec<String>,
    /// MCP resource URI prefixes this block may read (`resources/read`).
    /// Empty means every resource.
    pub resources: Vec<String>,
    /// Maximum number of activations of this block (and everything under it).
    pub max_uses: Option<u64>,
    /// The block stops being valid at this instant.
    pub expires: Option<SystemTime>,
    /// Rate windows of this block (and everything under it): at most
    /// `limit` requests in any `seconds`.
    pub rates: Vec<Rate>,
    /// At most this many requests of this block (and everything under it)
    /// in flight at once.
    pub concurrency: Option<u64>,
    /// Free text shown in `inspect`, usage and audit logs.
    pub label: Option<String>,
    /// Extra Datalog for experts, appended verbatim to the block.
    pub datalog: Option<String>,
}

/// Most requests one rate window may admit: the in-process sliding log
/// holds one timestamp (8 bytes) per admitted request for the window's
/// length, so this bounds a window's memory to 800 KB.
pub const MAX_RATE: u64 = 100_000;
/// Longest rate window: 31 days. Longer spans are what use limits are for.
pub const MAX_WINDOW_SECS: u64 = 31 * 86_400;
/// Most rate windows one block may declare on itself.
pub const MAX_WINDOWS_PER_BLOCK: usize = 4;
/// Largest concurrency cap.
pub const MAX_CONCURRENCY: u64 = 100_000;

/// One rate window: at most `limit` requests in any `seconds`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Rate {
    pub limit: u64,
    pub seconds: u64,
}

impl Rate {
    /// Parses `N/DURATION`, e.g. `10/1s`, `100/1h`, `1000/1d`.
    pub fn parse(s: &str) -> Result<Rate, TokenError> {
        let err = |why: &str| {
            TokenError::InvalidScope(format!(
                "{s:?} {why}; write N/DURATION, e.g. 10/1s, 100/1h or 1000/1d"
            ))
        };
        let (n, d) = s.trim().split_once('/').ok_or_else(|| err("has no '/'"))?;
        let limit: u64 = n
            .trim()
            .parse()
            .map_err(|_| err("does not start with a whole number of requests"))?;
        let d = d.trim();
        if d.bytes().any(|b| b.is_ascii_digit())
            && d.bytes().all(|b| b == b'0' || b.is_ascii_alphabetic())
        {
            return Err(err("has a window of 0 s; windows are 1s to 31d"));
        }
        let span = super::parse_duration(d)
            .map_err(|_| err("does not end with a duration (a number with a unit s, m, h or d)"))?;
        Rate::new(limit, span.as_secs()).map_err(|e| match e {
            TokenError::InvalidScope(m) => err(&m),
            e => e,
        })
    }

    /// Checks the bounds Till accepts.
    pub fn new(limit: u64, seconds: u64) -> Result<Rate, TokenError> {
        if limit == 0 {
            return Err(TokenError::InvalidScope(
                "allows 0 requests, so the key could never be used; allow at least 1".into(),
            ));
        }
        if limit > MAX_RATE {
            return Err(TokenError::InvalidScope(format!(
                "allows more than {MAX_RATE} requests per window; use a shorter window (or a use limit)"
            )));
        }
        if seconds == 0 || seconds > MAX_WINDOW_SECS {
            return Err(TokenError::InvalidScope(format!(
                "has a window of {seconds} s; windows are 1s to 31d"
            )));
        }
        Ok(Rate { limit, seconds })
    }
}

impl std::fmt::Display for Rate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.seconds;
        let unit = [(86_400, "d"), (3600, "h"), (60, "m")]
            .into_iter()
            .find(|(u, _)| s.is_multiple_of(*u));
        match unit {
            Some((u, name)) => write!(f, "{}/{}{name}", self.limit, s / u),
            None => write!(f, "{}/{s}s", self.limit),
        }
    }
}

/// Upper-cases and validates a method name (letters only).
pub fn normalize_method(m: &str) -> Result<String, TokenError> {
    let up = m.trim().to_ascii_uppercase();
    if up == ANY || (!up.is_empty() && up.len() <= 16 && up.bytes().all(|b| b.is_ascii_uppercase()))
    {
        Ok(up)
    } else {
        Err(TokenError::InvalidScope(format!(
            "method {m:?} is not an HTTP method (use e.g. GET, POST, or * for any)"
        )))
    }
}

/// Validates a service name: lower-case letters, digits, `-` and `_`.
pub fn validate_service(s: &str) -> Result<(), TokenError> {
    let ok = !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(TokenError::InvalidScope(format!(
            "service {s:?} must be lower-case letters, digits, '-' or '_' (it is the first path segment of the proxy route)"
        )))
    }
}

/// Validates and normalises a path prefix so that it matches how the proxy
/// normalises request paths.
pub fn normalize_prefix(p: &str) -> Result<String, TokenError> {
    if !p.starts_with('/') {
        return Err(TokenError::InvalidScope(format!(
            "path prefix {p:?} must start with '/'"
        )));
    }
    crate::path::normalize(p)
        .map_err(|e| TokenError::InvalidScope(format!("path prefix {p:?}: {e}")))
}

/// One `--tool` argument: an exact MCP tool name, or a prefix when it ends
/// in `*` (`github_*`). Nothing else is a pattern: a `*` anywhere else is
/// refused, so what a token allows reads the same to everyone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ToolPattern {
    Exact(String),
    Prefix(String),
}

/// Validates a `--resource` URI prefix: printable ASCII without spaces, at
/// most [`MAX_RESOURCE_LEN`] bytes; a trailing `*` is accepted and dropped
/// (every `--resource` is a prefix).
pub fn resource_prefix(r: &str) -> Result<String, TokenError> {
    let p = r.strip_suffix('*').unwrap_or(r);
    if p.is_empty() || p.len() > MAX_RESOURCE_LEN || !p.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(TokenError::InvalidScope(format!(
            "{r:?} is not a resource URI prefix: use 1 to {MAX_RESOURCE_LEN} printable characters without spaces, e.g. file:///docs/"
        )));
    }
    Ok(p.to_string())
}

/// Parses and validates a `--tool` (or `--prompt`) argument. Names are
/// 1–128 ASCII letters, digits, `_`, `-`, `.` or `/` (the MCP
/// specification's tool names).
pub fn tool_pattern(t: &str) -> Result<ToolPattern, TokenError> {
    let (name, prefix) = match t.strip_suffix('*') {
        Some(p) => (p, true),
        None => (t, false),
    };
    let ok_char = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b'/');
    if prefix && name.is_empty() {
        return Err(TokenError::InvalidScope(
            "\"*\" allows everything: leave the flag out instead".into(),
        ));
    }
    if name.is_empty() || name.len() > MAX_TOOL_LEN || !name.bytes().all(ok_char) {
        return Err(TokenError::InvalidScope(format!(
            "{t:?} is not an MCP tool or prompt name: use 1 to {MAX_TOOL_LEN} letters, digits, '_', '-', '.' or '/', optionally ending in '*' for a prefix (e.g. github_*)"
        )));
    }
    Ok(if prefix {
        ToolPattern::Prefix(name.to_string())
    } else {
        ToolPattern::Exact(name.to_string())
    })
}

/// `check if mcp($m), $m != "tools/call" or tool($t), {exact}.contains($t)
/// or tool($t), $t.starts_with({p0}) ...` (and the same for prompts and
/// resources): only messages of `method` are narrowed, so the MCP
/// housekeeping (`initialize`, `tools/list`, ...) stays open to the token.
/// A request to a non-MCP upstream has neither fact and fails it: a key
/// narrowed to tools is an MCP key.
fn target_check(
    b: BlockBuilder,
    method: &str,
    fact: &str,
    patterns: Vec<ToolPattern>,
) -> Result<BlockBuilder, TokenError> {
    let mut exact = Vec::new();
    let mut prefixes = Vec::new();
    for t in patterns {
        match t {
            ToolPattern::Exact(n) => exact.push(n),
            ToolPattern::Prefix(p) => prefixes.push(p),
        }
    }
    let mut alternatives = vec![format!("{}($m), $m != {{method}}", names::MCP)];
    let mut p = vec![("method", Term::Str(method.into()))];
    if !exact.is_empty() {
        alternatives.push(format!("{fact}($t), {{names}}.contains($t)"));
        p.push(("names", str_set(&exact)));
    }
    let keys: Vec<String> = (0..prefixes.len()).map(|i| format!("p{i}")).collect();
    for (k, v) in keys.iter().zip(&prefixes) {
        alternatives.push(format!("{fact}($t), $t.starts_with({{{k}}})"));
        p.push((k.as_str(), Term::Str(v.clone())));
    }
    // One alternative for the housekeeping, one for the exact names, one
    // per prefix: shape.rs allows 16.
    if alternatives.len() > super::shape::MAX_QUERIES {
        return Err(TokenError::InvalidScope(format!(
            "at most {} {fact} prefixes per key",
            super::shape::MAX_QUERIES - 2
        )));
    }
    add_code(b, &format!("check if {}", alternatives.join(" or ")), p)
}

fn str_set(items: &[String]) -> Term {
    Term::Set(
        items
            .iter()
            .cloned()
            .map(Term::Str)
            .collect::<BTreeSet<_>>(),
    )
}

fn params(pairs: Vec<(&str, Term)>) -> HashMap<String, Term> {
    pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
}

fn add_code(b: BlockBuilder, code: &str, p: Vec<(&str, Term)>) -> Result<BlockBuilder, TokenError> {
    b.code_with_params(code, params(p), HashMap::new())
        .map_err(TokenError::from_biscuit)
}

/// Checks shared by authority and attenuation blocks: models, expiry, label,
/// and the use limit of block `index`.
fn common(mut b: BlockBuilder, scope: &Scope, index: usize) -> Result<BlockBuilder, TokenError> {
    if !scope.models.is_empty() {
        b = add_code(
            b,
            "check if model($m), {models}.contains($m)",
            vec![("models", str_set(&scope.models))],
        )?;
    }
    let patterns = |v: &[String]| {
        v.iter()
            .map(|t| tool_pattern(t))
            .collect::<Result<Vec<_>, _>>()
    };
    if !scope.tools.is_empty() {
        b = target_check(b, TOOLS_CALL, names::TOOL, patterns(&scope.tools)?)?;
    }
    if !scope.prompts.is_empty() {
        b = target_check(b, PROMPTS_GET, names::PROMPT, patterns(&scope.prompts)?)?;
    }
    if !scope.resources.is_empty() {
        let prefixes = scope
            .resources
            .iter()
            .map(|r| resource_prefix(r).map(ToolPattern::Prefix))
            .collect::<Result<Vec<_>, _>>()?;
        b = target_check(b, RESOURCES_READ, names::RESOURCE, prefixes)?;
    }
    if let Some(exp) = scope.expires {
        let exp = super::unix_secs(exp).ok_or_else(|| {
            TokenError::InvalidScope(format!(
                "the expiry {} is outside the times Till handles (1970-01-01T00:00:00Z to {}); give one in that range",
                super::format_time(exp),
                super::MAX_TIME
            ))
        })?;
        b = add_code(
            b,
            "check if time($t), $t <= {exp}",
            vec![("exp", Term::Date(exp))],
        )?;
    }
    if let Some(label) = &scope.label {
        b = add_code(b, "label({l})", vec![("l", Term::Str(label.clone()))])?;
    }
    if let Some(n) = scope.max_uses {
        let n = i64::try_from(n)
            .map_err(|_| TokenError::InvalidScope(format!("--max-uses {n} is too large")))?;
        let k = index as i64;
        b = add_code(
            b,
            "use_limit({k}, {n}); check if uses({k}, $u), $u <= {n}",
            vec![("k", Term::Integer(k)), ("n", Term::Integer(n))],
        )?;
    }
    let mut seen = BTreeSet::new();
    for r in &scope.rates {
        let r = Rate::new(r.limit, r.seconds)?;
        if !seen.insert(r.seconds) {
            return Err(TokenError::InvalidScope(format!(
                "two rates with the same window ({}s); keep the smaller one",
                r.seconds
            )));
        }
        let k = index as i64;
        b = add_code(
            b,
            "rate_limit({k}, {n}, {d}); check if rate({k}, {d}, $u), $u <= {n}",
            vec![
                ("k", Term::Integer(k)),
                ("n", Term::Integer(r.limit as i64)),
                ("d", Term::Integer(r.seconds as i64)),
            ],
        )?;
    }
    if seen.len() > MAX_WINDOWS_PER_BLOCK {
        return Err(TokenError::InvalidScope(format!(
            "{} rate windows on one key; at most {MAX_WINDOWS_PER_BLOCK}",
            seen.len()
        )));
    }
    if let Some(n) = scope.concurrency {
        if n == 0 || n > MAX_CONCURRENCY {
            return Err(TokenError::InvalidScope(format!(
                "--concurrency {n}: a concurrency cap is 1 to {MAX_CONCURRENCY} requests in flight"
            )));
        }
        let k = index as i64;
        b = add_code(
            b,
            "concurrency_limit({k}, {n}); check if in_flight({k}, $c), $c <= {n}",
            vec![("k", Term::Integer(k)), ("n", Term::Integer(n as i64))],
        )?;
    }
    if let Some(code) = &scope.datalog {
        b = b.code(code).map_err(TokenError::from_biscuit)?;
    }
    Ok(b)
}

/// Builds the authority block: one `right` per service × method × path.
pub fn authority_block(scope: &Scope) -> Result<BlockBuilder, TokenError> {
    if scope.services.is_empty() {
        return Err(TokenError::InvalidScope(
            "a root token needs at least one --service (or the dangerous --any-service)".into(),
        ));
    }
    let methods = if scope.methods.is_empty() {
        vec![ANY.to_string()]
    } else {
        scope.methods.clone()
    };
    let paths = if scope.paths.is_empty() {
        vec!["/".to_string()]
    } else {
        scope.paths.clone()
    };
    let mut b = BlockBuilder::new();
    for s in &scope.services {
        for m in &methods {
            for p in &paths {
                b = b
                    .fact(builder::fact(
                        names::RIGHT,
                        &[builder::string(s), builder::string(m), builder::string(p)],
                    ))
                    .map_err(TokenError::from_biscuit)?;
            }
        }
    }
    common(b, scope, 0)
}

/// Builds an attenuation block (checks only) that will sit at `index`.
pub fn attenuation_block(scope: &Scope, index: usize) -> Result<BlockBuilder, TokenError> {
    let mut b = BlockBuilder::new();
    if !scope.services.is_empty() {
        b = add_code(
            b,
            "check if service($s), {set}.contains($s)",
            vec![("set", str_set(&scope.services))],
        )?;
    }
    if !scope.methods.is_empty() && !scope.methods.iter().any(|m| m == ANY) {
        b = add_code(
            b,
            "check if method($m), {set}.contains($m)",
            vec![("set", str_set(&scope.methods))],
        )?;
    }
    if !scope.paths.is_empty() {
        // One alternative per prefix: `check if A or B` is satisfied by any.
        let code = (0..scope.paths.len())
            .map(|i| format!("path($p), $p.starts_with({{p{i}}})"))
            .collect::<Vec<_>>()
            .join(" or ");
        let names: Vec<String> = (0..scope.paths.len()).map(|i| format!("p{i}")).collect();
        let p = names
            .iter()
            .zip(&scope.paths)
            .map(|(n, v)| (n.as_str(), Term::Str(v.clone())))
            .collect();
        b = add_code(b, &format!("check if {code}"), p)?;
    }
    common(b, scope, index)
}

/// Facts describing one request, added by the verifier to the authorizer.
#[derive(Clone, Debug)]
pub struct RequestFacts {
    pub service: String,
    pub method: String,
    /// Already normalised with [`crate::path::normalize`].
    pub path: String,
    pub model: Option<String>,
    /// One MCP message, for requests to an `api = "mcp"` upstream.
    pub mcp: Option<McpMessage>,
    pub time: SystemTime,
}

/// The facts one MCP (JSON-RPC) message contributes: `mcp($method)` and,
/// for a method that names a target ([`NAMED_TARGETS`]), `tool($name)`,
/// `prompt($name)` or `resource($uri)`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct McpMessage {
    /// The JSON-RPC method; empty when the request carries none.
    pub method: String,
    /// The tool, prompt or resource URI the message names; ignored for
    /// other methods.
    pub name: Option<String>,
}

impl McpMessage {
    /// A request to an MCP upstream that carries no JSON-RPC request or
    /// notification: a GET (the server's event stream), a DELETE (end of
    /// session), or responses the client sends back.
    pub fn none() -> Self {
        McpMessage {
            method: String::new(),
            name: None,
        }
    }

    /// The fact this message's target becomes, with the target.
    pub fn target(&self) -> Option<(&'static str, &str)> {
        let fact = NAMED_TARGETS
            .iter()
            .find(|(m, _, _)| *m == self.method)
            .map(|(_, f, _)| *f)?;
        Some((fact, self.name.as_deref()?))
    }
}

impl RequestFacts {
    /// Appends the ambient facts and `uses(k, n)` for each block.
    pub(crate) fn add_to(
        &self,
        mut a: biscuit_auth::AuthorizerBuilder,
        uses: &[u64],
    ) -> Result<biscuit_auth::AuthorizerBuilder, TokenError> {
        use builder::{fact, string};
        let e = TokenError::from_biscuit;
        a = a
            .fact(fact(names::SERVICE, &[string(&self.service)]))
            .map_err(e)?;
        a = a
            .fact(fact(names::METHOD, &[string(&self.method)]))
            .map_err(e)?;
        a = a
            .fact(fact(names::PATH, &[string(&self.path)]))
            .map_err(e)?;
        if let Some(m) = &self.model {
            a = a.fact(fact(names::MODEL, &[string(m)])).map_err(e)?;
        }
        if let Some(m) = &self.mcp {
            a = a.fact(fact(names::MCP, &[string(&m.method)])).map_err(e)?;
            if let Some((name, target)) = m.target() {
                a = a.fact(fact(name, &[string(target)])).map_err(e)?;
            }
        }
        // biscuit's `builder::date` panics on a time before 1970.
        let now = self
            .time
            .duration_since(std::time::UNIX_EPOCH)
            .map_err(|_| TokenError::InvalidScope("the request time is before 1970".into()))?;
        a = a
            .fact(fact(names::TIME, &[Term::Date(now.as_secs())]))
            .map_err(e)?;
        for (k, n) in uses.iter().enumerate() {
            let n = i64::try_from(*n).unwrap_or(i64::MAX);
            a = a
                .fact(fact(
                    names::USES,
                    &[builder::int(k as i64), builder::int(n)],
                ))
                .map_err(e)?;
        }
        Ok(a)
    }
}

/// Appends `rate(k, seconds, n)` for each window and `in_flight(k, n)` for
/// each concurrency cap: the counts this request makes, itself included.
pub(crate) fn add_windows_to(
    mut a: biscuit_auth::AuthorizerBuilder,
    rates: &[(usize, u64, u64)],
    in_flight: &[(usize, u64)],
) -> Result<biscuit_auth::AuthorizerBuilder, TokenError> {
    use builder::{fact, int};
    let e = TokenError::from_biscuit;
    let i = |n: u64| int(i64::try_from(n).unwrap_or(i64::MAX));
    for &(k, secs, n) in rates {
        a = a
            .fact(fact(names::RATE, &[i(k as u64), i(secs), i(n)]))
            .map_err(e)?;
    }
    for &(k, n) in in_flight {
        a = a
            .fact(fact(names::IN_FLIGHT, &[i(k as u64), i(n)]))
            .map_err(e)?;
    }
    Ok(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// [`names::AMBIENT`] is what the shape check refuses blocks to state:
    /// it must name every fact the verifier supplies, or a block could
    /// forge the one left out.
    #[test]
    fn ambient_names_every_fact_the_verifier_supplies() {
        let mut supplied = BTreeSet::new();
        for (method, _, _) in NAMED_TARGETS {
            let req = RequestFacts {
                service: "s".into(),
                method: "POST".into(),
                path: "/".into(),
                model: Some("m".into()),
                mcp: Some(McpMessage {
                    method: (*method).into(),
                    name: Some("n".into()),
                }),
                time: SystemTime::now(),
            };
            let a = req
                .add_to(biscuit_auth::AuthorizerBuilder::new(), &[1, 2])
                .and_then(|a| add_windows_to(a, &[(0, 60, 1)], &[(0, 1)]))
                .unwrap();
            for line in a.dump_code().lines() {
                if let Some((name, _)) = line.split_once('(') {
                    supplied.insert(name.trim().to_string());
                }
            }
        }
        let ambient: BTreeSet<String> = names::AMBIENT.iter().map(|n| n.to_string()).collect();
        assert_eq!(supplied, ambient);
    }
}
