//! Offline verification: token + request facts + use counts → decision.
//!
//! The same code serves `till verify`, services embedding the library, and
//! the proxy. Revocation and counting are the caller's job (the proxy's
//! stores, or a file of revoked ids offline); this module only needs the root
//! public key and the policies.

use std::collections::HashSet;
use std::sync::Arc;

use biscuit_auth::error::{FailedCheck, Logic, MatchedPolicy, Token as BToken};
use biscuit_auth::{Biscuit, PublicKey};
use serde::Serialize;

use crate::policy::Policies;
use crate::token::inspect::{CheckMeaning, TokenView, inspect};
use crate::token::keyset::{PublicKeySet, RootKeys};
use crate::token::{RawToken, RequestFacts, TokenError};

/// Longest string a request fact (service, method, path, model) may hold:
/// the longest path accepted.
pub const MAX_FACT_LEN: usize = crate::path::MAX_PATH;

/// A token whose signatures have been checked, with what the verifier needs
/// to know about it. Cheap to share: the proxy caches these.
#[derive(Debug)]
pub struct VerifiedToken {
    pub biscuit: Biscuit,
    pub view: TokenView,
    /// Revocation id of each block, authority first (hex).
    pub ids: Vec<String>,
    /// Each block's own use limit (the one it sets on itself), when it has
    /// one: what usage, alerts, leases and the dashboard show. A limit a
    /// child writes about an ancestor is enforced by Datalog only, so a child
    /// cannot change what is shared about its parent.
    pub limits: Vec<Option<u64>>,
    /// The counters a request with this token reserves, one per block.
    pub specs: Vec<CounterSpec>,
    /// Earliest expiry of any block, as seconds since the Unix epoch.
    pub expires_unix: Option<u64>,
    /// The rate windows a request with this token must fit in: every
    /// block's own windows, so a child's requests fill its ancestors'.
    pub windows: Vec<WindowSpec>,
    /// The concurrency caps a request with this token must fit in.
    pub caps: Vec<CapSpec>,
    /// Present when the decision cache is sound for this token.
    fast: Option<FastPath>,
    /// The key set it was verified with ([`Verifier::is_current`]).
    pub root_key: crate::token::keyset::KeyStamp,
}

/// One rate window of a block: at most `limit` requests in any `seconds`,
/// counted over every request of the block and of the keys made from it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WindowSpec {
    /// Index of the block in the token.
    pub block: usize,
    /// Revocation id of the block: with `seconds`, the window's identity.
    pub id: String,
    pub limit: u64,
    pub seconds: u64,
}

/// One concurrency cap of a block: at most `limit` requests in flight.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CapSpec {
    pub block: usize,
    pub id: String,
    pub limit: u64,
}

/// What the window store counted for one request, itself included: the
/// `rate(block, seconds, n)` and `in_flight(block, n)` facts.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WindowCounts {
    /// `(block, seconds, requests in the window)`.
    pub rates: Vec<(usize, u64, u64)>,
    /// `(block, requests in flight)`.
    pub in_flight: Vec<(usize, u64)>,
}

impl WindowCounts {
    /// This request alone in every window and cap: the decision before the
    /// window store is asked. The store's own atomic admission (and the
    /// re-check with what it counted) is what keeps a window exact.
    pub fn alone(token: &VerifiedToken) -> Self {
        WindowCounts {
            rates: token
                .windows
                .iter()
                .map(|w| (w.block, w.seconds, 1))
                .collect(),
            in_flight: token.caps.iter().map(|c| (c.block, 1)).collect(),
        }
    }

    fn rate(&self, k: usize, secs: u64) -> Option<u64> {
        self.rates
            .iter()
            .find(|&&(b, d, _)| b == k && d == secs)
            .map(|r| r.2)
    }

    fn flight(&self, k: usize) -> Option<u64> {
        self.in_flight.iter().find(|&&(b, _)| b == k).map(|r| r.1)
    }
}

/// Decision cache of a "plain" token: every check of every block is one Till
/// recognises, no block has rules, scopes or a third-party signature, and
/// the policies do not mention `time` or `uses`. Then a Datalog "allow" for
/// a (service, method, path, model) holds at any time and use counts that
/// pass the token's expiry and use-limit comparisons, checked natively here.
///
/// Why: between two requests of one shape only the `time` and `uses` facts
/// differ, and the only checks reading them are `$t <= d` and `$u <= n`. When
/// the native comparison passes, the authorizer's own fact satisfies that
/// check in Datalog too. Facts a block forges (`uses(0, 0)`) can only satisfy
/// that block's own checks, and the native test ignores them, so it is at
/// most stricter; when it fails, Datalog decides. Denials are never cached.
/// Verification on a hot token drops from ~100 µs of Datalog to a few
/// comparisons (see benches/README.md).
#[derive(Debug)]
struct FastPath {
    /// Every `uses(k, $u), $u <= n` check, as (k, n).
    limits: Vec<(usize, u64)>,
    /// Every `rate(k, d, $u), $u <= n` check, as (k, d, n).
    rates: Vec<(usize, u64, u64)>,
    /// Every `in_flight(k, $c), $c <= n` check, as (k, n).
    caps: Vec<(usize, u64)>,
    /// Every `time($t), $t <= d` check's d.
    expires: Vec<u64>,
    /// Request shapes Datalog allowed.
    allowed: std::sync::RwLock<Vec<Shape>>,
    /// Shapes (model not yet known) that can only be decided by the model:
    /// the body is worth reading.
    pending: std::sync::RwLock<Vec<Shape>>,
    /// Bytes the two lists hold ([`shape_bytes`]), at most [`SHAPE_BUDGET`]:
    /// a token's cache entry is weighed once, when inserted, so what its
    /// shapes may grow to must be bounded up front.
    remembered: std::sync::atomic::AtomicUsize,
}

/// A request without its time: service, method, path, model, MCP message.
type Shape = (
    String,
    String,
    String,
    Option<String>,
    Option<crate::token::McpMessage>,
);

/// Shapes cached per token and list: agents reuse few (service, method,
/// path, model) combinations; the rest go through Datalog.
const FAST_PATH_SHAPES: usize = 32;

/// Bytes of shapes one token's decision cache may hold, both lists together
/// (as counted by [`shape_bytes`]). Shapes are remembered even when the
/// request is then refused (400 on its body, a full window), so without a
/// byte bound a child sent 64 requests with made-up 4 KiB methods and paths
/// held ~550 KiB in the token cache while weighing 4.5 KiB (red team, wave
/// 2). A usual shape (`openai`, `POST`, `/v1/chat/completions`,
/// `gpt-4o-mini`) counts about 250 bytes: 8 KiB is ~32 of them, more than
/// an agent's endpoints and models; past it, requests are decided by
/// Datalog, which is slower, never wrong.
pub const SHAPE_BUDGET: usize = 8 << 10;

/// A shape counting more bytes than this is never remembered: real traffic
/// has short services, methods, paths and models, and one long shape would
/// otherwise take the room of many usual ones.
pub const MAX_SHAPE_BYTES: usize = 1 << 10;

/// Upper bound of the memory a token cache entry takes per byte of token
/// text: the parsed Biscuit and the [`TokenView`] together. Calibrated by
/// `crates/till-core/tests/memory.rs`, which counts the live bytes and
/// allocations of `VerifiedToken`s (plus 12.5% and 16 bytes per allocation
/// for the allocator's rounding): usual tokens hold 12–17 bytes per byte of
/// text, sets and arrays of small integers 8, many facts 10–12, and the
/// worst found, blocks of `check if true;` (each a few bytes of protobuf
/// decoded into a check, a rule, an expression and their view), 34 (42 with
/// rounding). The red team measured 17 KiB of RSS for an 880-byte token
/// weighed 4.5 KiB.
pub const TOKEN_BYTES_PER_TEXT_BYTE: usize = 48;

/// Memory of a cache entry besides the token: moka's entry, its place in
/// the hash table and the eviction lists.
pub const CACHE_ENTRY_BYTES: usize = 1024;

/// Upper bound of the memory a token cache entry holding a token of
/// `text_len` bytes may ever take: the key (the text), the verified token,
/// the entry, and the most its decision cache may grow to
/// ([`SHAPE_BUDGET`]). An honest bound, so that the cache's byte capacity
/// bounds its memory whatever tokens agents mint.
pub fn cache_weight(text_len: usize) -> u32 {
    let bytes = text_len
        .saturating_mul(TOKEN_BYTES_PER_TEXT_BYTE + 1)
        .saturating_add(CACHE_ENTRY_BYTES + SHAPE_BUDGET);
    u32::try_from(bytes).unwrap_or(u32::MAX)
}

/// What remembering `req` costs: the shape's slot in its list plus each
/// string's heap copy, with the allocator's rounding (mimalloc's size
/// classes are at most 12.5% apart above 64 bytes, 8 bytes apart below)
/// and a word per allocation. An empty string allocates nothing, but is
/// charged the same: a bound, not an estimate.
fn shape_bytes(req: &RequestFacts) -> usize {
    let heap = |s: &str| s.len() + s.len() / 8 + 16;
    let mcp = req
        .mcp
        .as_ref()
        .map_or(0, |m| heap(&m.method) + m.name.as_deref().map_or(0, heap));
    std::mem::size_of::<Shape>()
        + heap(&req.service)
        + heap(&req.method)
        + heap(&req.path)
        + req.model.as_deref().map_or(0, heap)
        + mcp
}

fn fast_path(view: &TokenView, policies: &Policies) -> Option<FastPath> {
    if !policies.request_only {
        return None;
    }
    let mut limits = Vec::new();
    let mut rates = Vec::new();
    let mut caps = Vec::new();
    let mut expires = Vec::new();
    for b in &view.blocks {
        if b.has_rules_or_scopes || b.third_party_key.is_some() {
            return None;
        }
        for c in &b.checks {
            match c {
                CheckMeaning::UseLimit { block, limit } => limits.push((*block, *limit)),
                CheckMeaning::RateLimit {
                    block,
                    limit,
                    seconds,
                } => rates.push((*block, *seconds, *limit)),
                CheckMeaning::Concurrency { block, limit } => caps.push((*block, *limit)),
                CheckMeaning::Expires { unix, .. } => expires.push(*unix),
                CheckMeaning::Services { .. }
                | CheckMeaning::Methods { .. }
                | CheckMeaning::PathPrefixes { .. }
                | CheckMeaning::Models { .. }
                | CheckMeaning::Tools { .. }
                | CheckMeaning::Prompts { .. }
                | CheckMeaning::Resources { .. } => {}
                CheckMeaning::Custom { .. } => return None,
            }
        }
    }
    Some(FastPath {
        limits,
        rates,
        caps,
        expires,
        allowed: std::sync::RwLock::new(Vec::new()),
        pending: std::sync::RwLock::new(Vec::new()),
        remembered: std::sync::atomic::AtomicUsize::new(0),
    })
}

impl FastPath {
    fn same(k: &Shape, req: &RequestFacts) -> bool {
        k.0 == req.service
            && k.1 == req.method
            && k.2 == req.path
            && k.3 == req.model
            && k.4 == req.mcp
    }
    /// True when the cached decision applies and allows the request (or,
    /// with `pending`, lets it go on to read its body).
    fn allows(
        &self,
        req: &RequestFacts,
        uses: &[u64],
        windows: &WindowCounts,
        pending: bool,
    ) -> bool {
        let now = match req.time.duration_since(std::time::UNIX_EPOCH) {
            Ok(d) => d.as_secs(),
            Err(_) => return false,
        };
        self.expires.iter().all(|&d| now <= d)
            && self
                .limits
                .iter()
                .all(|&(k, n)| uses.get(k).is_some_and(|&u| u <= n))
            && self
                .rates
                .iter()
                .all(|&(k, d, n)| windows.rate(k, d).is_some_and(|u| u <= n))
            && self
                .caps
                .iter()
                .all(|&(k, n)| windows.flight(k).is_some_and(|c| c <= n))
            && if pending {
                &self.pending
            } else {
                &self.allowed
            }
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .any(|k| Self::same(k, req))
    }
    fn remember(&self, req: &RequestFacts, pending: bool) {
        let list = if pending {
            &self.pending
        } else {
            &self.allowed
        };
        let cost = shape_bytes(req);
        if cost > MAX_SHAPE_BYTES {
            return;
        }
        let mut a = list.write().unwrap_or_else(|p| p.into_inner());
        if a.len() >= FAST_PATH_SHAPES || a.iter().any(|k| Self::same(k, req)) {
            return;
        }
        // The other list's writer may charge at the same time: take the
        // bytes atomically, so the two together never pass the budget.
        let charged = self.remembered.fetch_update(
            std::sync::atomic::Ordering::Relaxed,
            std::sync::atomic::Ordering::Relaxed,
            |b| b.checked_add(cost).filter(|&n| n <= SHAPE_BUDGET),
        );
        if charged.is_err() {
            return;
        }
        // Exactly one more slot (not the doubling `push` does), so the
        // list's capacity is what `shape_bytes` charged for. This runs
        // after a Datalog run, never on the cached path.
        a.reserve_exact(1);
        a.push((
            req.service.clone(),
            req.method.clone(),
            req.path.clone(),
            req.model.clone(),
            req.mcp.clone(),
        ));
    }
}

impl VerifiedToken {
    /// Request shapes the decision cache holds (tests and benchmarks).
    #[doc(hidden)]
    pub fn cached_shapes(&self) -> usize {
        self.fast.as_ref().map_or(0, |f| {
            f.allowed.read().unwrap_or_else(|p| p.into_inner()).len()
        })
    }

    /// Bytes the decision cache holds, as [`SHAPE_BUDGET`] counts them
    /// (tests).
    #[doc(hidden)]
    pub fn remembered_shape_bytes(&self) -> usize {
        self.fast.as_ref().map_or(0, |f| {
            f.remembered.load(std::sync::atomic::Ordering::Relaxed)
        })
    }

    /// Whether the decision cache alone allows this request with these
    /// uses (`before_body`: the model is not known yet). `false` means only
    /// that Datalog must decide. Cheap: no Datalog runs here.
    pub fn cache_allows(&self, req: &RequestFacts, uses: &[u64], before_body: bool) -> bool {
        self.cache_allows_windowed(req, uses, &WindowCounts::default(), before_body)
    }

    /// [`VerifiedToken::cache_allows`] with the window counts of the
    /// request.
    pub fn cache_allows_windowed(
        &self,
        req: &RequestFacts,
        uses: &[u64],
        windows: &WindowCounts,
        before_body: bool,
    ) -> bool {
        self.fast
            .as_ref()
            .is_some_and(|f| f.allows(req, uses, windows, before_body))
    }

    /// The token family: the authority block's revocation id.
    pub fn family(&self) -> &str {
        &self.ids[0]
    }
}

/// What kind of denial, which decides the HTTP status.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum DenialKind {
    /// Out of scope, or a custom check failed (403).
    Scope,
    /// Only use limits failed (429).
    Exhausted,
    /// Only rate windows or concurrency caps failed: full now, free later
    /// (429 with `Retry-After`).
    RateLimited,
    /// A block expired (403; alerts treat it specially).
    Expired,
    /// A block is revoked (403).
    Revoked,
    /// Authorization hit its run limits: deny rather than guess (403).
    Limits,
}

/// Why a request was denied, in plain words.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Denial {
    /// What kind of denial (decides the HTTP status).
    pub kind: DenialKind,
    /// What failed, in plain words, for the client.
    pub reason: String,
    /// The block to blame, authority = 0: the first revoked block, or the
    /// block of the first failed check (scope checks before use limits).
    /// `None` when no block's check failed (no right covers the request, a
    /// policy denied, run limits). For callers; not serialized.
    #[serde(skip)]
    pub block: Option<usize>,
    /// The failed check's index within [`Denial::block`], when a check
    /// failed (not for a revoked block). For callers; not serialized.
    #[serde(skip)]
    pub check: Option<usize>,
}

impl Denial {
    /// A denial that blames no block.
    pub fn new(kind: DenialKind, reason: impl Into<String>) -> Self {
        Denial {
            kind,
            reason: reason.into(),
            block: None,
            check: None,
        }
    }
}

impl std::fmt::Display for Denial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.reason)
    }
}

/// Verifies tokens against a set of root keys and one set of policies.
#[derive(Clone)]
pub struct Verifier {
    keys: RootKeys,
    policies: Arc<Policies>,
}

impl Verifier {
    /// One root key, checking every token whatever key id it names.
    pub fn new(root: PublicKey, policies: Policies) -> Self {
        Self::with_keys(RootKeys::new(PublicKeySet::single(root)), policies)
    }

    /// A set of root keys (rotation), shared with every clone and
    /// replaceable through [`Verifier::keys`].
    pub fn with_keys(keys: RootKeys, policies: Policies) -> Self {
        Verifier {
            keys,
            policies: Arc::new(policies),
        }
    }

    /// The first of `facts` that `token` or this verifier's policies read:
    /// a verifier that cannot supply those facts must refuse the token
    /// ([`crate::unseen`]).
    pub fn first_read<'a>(&self, token: &VerifiedToken, facts: &[&'a str]) -> Option<&'a str> {
        crate::unseen::first_read(token, &self.policies, facts)
    }

    pub fn keys(&self) -> &RootKeys {
        &self.keys
    }

    /// The policies every proxied request is authorized with.
    pub fn policies(&self) -> &Policies {
        &self.policies
    }

    /// Whether a verification (cached) still holds: the key set has not
    /// been replaced and the token's key has not passed its `not_after`.
    pub fn is_current(&self, token: &VerifiedToken) -> bool {
        self.keys.is_current(&token.root_key)
    }

    /// Bounds, decodes and checks the signatures of a token (the expensive,
    /// cacheable part).
    pub fn verify_token(&self, text: &str) -> Result<VerifiedToken, TokenError> {
        let raw = RawToken::parse(text)?;
        // Shape first: it is cheaper than the signatures it protects.
        crate::token::shape::check(&raw)?;
        let (biscuit, root_key) = self.keys.verify(&raw)?;
        let view = inspect(&raw)?;
        if let Some(p) = view.blocks.iter().find_map(|b| b.window_problem.clone()) {
            return Err(TokenError::Shape(p));
        }
        let ids = raw.revocation_ids();
        let limits: Vec<Option<u64>> = view.blocks.iter().map(|b| b.use_limit).collect();
        let specs = counter_specs(&view, &ids, &limits);
        let expires_unix = view.expires_at().and_then(|t| {
            t.duration_since(std::time::UNIX_EPOCH)
                .ok()
                .map(|d| d.as_secs())
        });
        let fast = fast_path(&view, &self.policies);
        let (windows, caps) = window_specs(&view, &ids);
        Ok(VerifiedToken {
            biscuit,
            view,
            ids,
            limits,
            specs,
            expires_unix,
            windows,
            caps,
            fast,
            root_key,
        })
    }

    /// Runs the policies and every block's checks with the request facts and
    /// `uses[k]` = activations of block `k`, this request included.
    /// No window counts are supplied: a token with rate windows or a
    /// concurrency cap is denied ([`Verifier::authorize_windowed`] counts).
    pub fn authorize(
        &self,
        token: &VerifiedToken,
        req: &RequestFacts,
        uses: &[u64],
    ) -> Result<(), Denial> {
        self.authorize_windowed(token, req, uses, &WindowCounts::default())
    }

    /// [`Verifier::authorize`] with the `rate` and `in_flight` facts of
    /// the request.
    pub fn authorize_windowed(
        &self,
        token: &VerifiedToken,
        req: &RequestFacts,
        uses: &[u64],
        windows: &WindowCounts,
    ) -> Result<(), Denial> {
        if let Some(f) = &token.fast
            && f.allows(req, uses, windows, false)
        {
            return Ok(());
        }
        match self.run(token, req, uses, windows)? {
            Ok(()) => {
                if let Some(f) = &token.fast {
                    f.remember(req, false);
                }
                Ok(())
            }
            Err(e) => Err(explain(e, token, req)),
        }
    }

    /// Decides a request whose body has not been read yet (`req.model` is
    /// unknown): denies only what no model could make acceptable, so a
    /// request that cannot pass never gets its body read. Passing here is
    /// not an allow: [`Verifier::authorize`] decides again with the model.
    pub fn authorize_before_body(
        &self,
        token: &VerifiedToken,
        req: &RequestFacts,
        uses: &[u64],
    ) -> Result<(), Denial> {
        self.authorize_before_body_windowed(token, req, uses, &WindowCounts::default())
    }

    /// [`Verifier::authorize_before_body`] with the window counts.
    pub fn authorize_before_body_windowed(
        &self,
        token: &VerifiedToken,
        req: &RequestFacts,
        uses: &[u64],
        windows: &WindowCounts,
    ) -> Result<(), Denial> {
        if let Some(f) = &token.fast
            && f.allows(req, uses, windows, true)
        {
            return Ok(());
        }
        let outcome = match self.run(token, req, uses, windows)? {
            Ok(()) => Ok(()),
            Err(e) if self.model_could_change(&e, token) => Ok(()),
            // What the model would decide is not the reason: leave it out.
            Err(e) => Err(explain_with(e, token, req, true)),
        };
        if outcome.is_ok()
            && let Some(f) = &token.fast
        {
            f.remember(req, true);
        }
        outcome
    }

    /// Whether adding a `model` fact could turn this failure into an allow:
    /// every failed check and the policy outcome must depend on `model`.
    /// Datalog is monotonic apart from `reject if`/`check all`/deny
    /// policies, and those are decided again once the model is known.
    fn model_could_change(&self, e: &BToken, token: &VerifiedToken) -> bool {
        // A rule can derive any fact from `model`.
        let rules_read_model = token
            .view
            .blocks
            .iter()
            .any(|b| b.has_rules_or_scopes && b.source.contains("model("));
        let check_reads_model = |c: &FailedCheck| rules_read_model || reads_model(c, token);
        let policy_reads_model = self.policies.mentions_model || rules_read_model;
        match e {
            BToken::FailedLogic(Logic::Unauthorized { policy, checks }) => {
                (matches!(policy, MatchedPolicy::Allow(_)) || policy_reads_model)
                    && checks.iter().all(check_reads_model)
            }
            BToken::FailedLogic(Logic::NoMatchingPolicy { checks }) => {
                policy_reads_model && checks.iter().all(check_reads_model)
            }
            _ => false,
        }
    }

    /// Runs the Datalog: `Err` is a denial before Datalog could answer.
    fn run(
        &self,
        token: &VerifiedToken,
        req: &RequestFacts,
        uses: &[u64],
        windows: &WindowCounts,
    ) -> Result<Result<(), BToken>, Denial> {
        let internal =
            |e: TokenError| Denial::new(DenialKind::Scope, format!("authorization error: {e}"));
        // Datalog string operations cost time in proportion to their
        // operands: with attenuation blocks bounded by `token::shape`,
        // bounding the request's strings bounds the work (a model name can
        // otherwise be most of an 8 MiB body).
        let facts = [
            ("service", &req.service),
            ("method", &req.method),
            ("path", &req.path),
        ];
        let mcp = req.mcp.as_ref();
        let long = facts
            .into_iter()
            .chain(req.model.as_ref().map(|m| ("model", m)))
            .chain(mcp.map(|m| ("MCP method", &m.method)))
            .chain(mcp.and_then(|m| m.name.as_ref()).map(|t| ("MCP target", t)))
            .find(|(_, v)| v.len() > MAX_FACT_LEN);
        if let Some((name, v)) = long {
            return Err(Denial::new(
                DenialKind::Scope,
                format!(
                    "the request's {name} is {} bytes, more than the {MAX_FACT_LEN} Till accepts",
                    v.len()
                ),
            ));
        }
        let builder = req
            .add_to(self.policies.builder(), uses)
            .and_then(|b| {
                crate::token::vocab::add_windows_to(b, &windows.rates, &windows.in_flight)
            })
            .map_err(internal)?;
        let mut authorizer = match builder.build(&token.biscuit) {
            Ok(a) => a,
            Err(e) => return Ok(Err(e)),
        };
        Ok(authorizer.authorize().map(|_| ()))
    }

    /// Authorizes a request to the admin plane (admin API, `/metrics`,
    /// dashboard): the token's authority block must hold
    /// `right("till:admin", "*", "/")`, and every block's checks must pass
    /// with the facts `service("till:admin")`, the request's `method` and
    /// `path` (e.g. `GET` `/admin/usage`), `time` and `uses`. So an
    /// attenuated admin token can be read-only (`--method GET`), limited to
    /// some endpoints (`--path /admin/usage`), short-lived, or limited in
    /// uses. Policies in `policies/` do not apply, so no operator policy can
    /// open the admin plane by accident.
    pub fn authorize_admin(
        &self,
        token: &VerifiedToken,
        method: &str,
        path: &str,
        now: std::time::SystemTime,
        uses: &[u64],
    ) -> Result<(), Denial> {
        let facts = RequestFacts {
            service: crate::token::vocab::ADMIN_SERVICE.into(),
            method: method.into(),
            path: path.into(),
            model: None,
            mcp: None,
            time: now,
        };
        let base = biscuit_auth::AuthorizerBuilder::new()
            .set_limits(crate::policy::run_limits())
            .code("allow if right(\"till:admin\", \"*\", \"/\")")
            .map_err(|e| Denial::new(DenialKind::Scope, e.to_string()))?;
        let builder = facts
            .add_to(base, uses)
            .map_err(|e| Denial::new(DenialKind::Scope, e.to_string()))?;
        let mut a = builder
            .build(&token.biscuit)
            .map_err(|e| explain(e, token, &facts))?;
        a.authorize().map(|_| ()).map_err(|e| {
            let mut d = explain(e, token, &facts);
            if d.kind == DenialKind::Scope && d.reason.starts_with("no right") {
                d.reason = "this token is not an admin token (its authority block lacks right(\"till:admin\", \"*\", \"/\"))".into();
            }
            d
        })
    }
}

/// The counters of a token's blocks: each block's own limit, the earliest
/// expiry of it and its ancestors (a block cannot outlive them), and what the
/// usage view shows.
fn counter_specs(view: &TokenView, ids: &[String], limits: &[Option<u64>]) -> Vec<CounterSpec> {
    let mut exp: Option<u64> = None;
    ids.iter()
        .enumerate()
        .map(|(k, id)| {
            let b = view.blocks.get(k);
            let own = b.and_then(|b| b.expires_at).and_then(|e| {
                e.duration_since(std::time::UNIX_EPOCH)
                    .ok()
                    .map(|d| d.as_secs())
            });
            exp = match (exp, own) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            CounterSpec {
                id: id.clone(),
                limit: limits.get(k).copied().flatten(),
                expires: exp,
                family: ids[0].clone(),
                parent: k.checked_sub(1).and_then(|p| ids.get(p)).cloned(),
                index: k,
                label: b.and_then(|b| b.labels.first().cloned()),
                rates: b.map(|b| b.rates.clone()).unwrap_or_default(),
                concurrency: b.and_then(|b| b.concurrency),
            }
        })
        .collect()
}

/// Every block's own rate windows and concurrency cap, authority first.
fn window_specs(view: &TokenView, ids: &[String]) -> (Vec<WindowSpec>, Vec<CapSpec>) {
    let mut windows = Vec::new();
    let mut caps = Vec::new();
    for (b, id) in view.blocks.iter().zip(ids) {
        for r in &b.rates {
            windows.push(WindowSpec {
                block: b.index,
                id: id.clone(),
                limit: r.limit,
                seconds: r.seconds,
            });
        }
        if let Some(limit) = b.concurrency {
            caps.push(CapSpec {
                block: b.index,
                id: id.clone(),
                limit,
            });
        }
    }
    (windows, caps)
}

/// Returns the first revoked block of the token, if any.
pub fn first_revoked(token_ids: &[String], revoked: &HashSet<String>) -> Option<usize> {
    token_ids.iter().position(|id| revoked.contains(id))
}

/// The denial for block `block` of `view` being revoked. The monitor reads
/// the block back from this text, so each block's reason is distinct.
pub fn revoked_denial(view: &TokenView, block: usize) -> Denial {
    let who = view.key_name(block);
    let ask = view.ask_for_a_new_one(block);
    Denial {
        kind: DenialKind::Revoked,
        reason: if block + 1 == view.blocks.len() {
            format!("{who} was revoked; {ask}")
        } else {
            format!("{who} was revoked, and so every key made from it; {ask}")
        },
        block: Some(block),
        check: None,
    }
}

/// Whether a failed check reads the `model` fact.
fn reads_model(c: &FailedCheck, token: &VerifiedToken) -> bool {
    match c {
        FailedCheck::Block(b) => match token
            .view
            .blocks
            .get(b.block_id as usize)
            .and_then(|blk| blk.checks.get(b.check_id as usize))
        {
            Some(CheckMeaning::Models { .. }) => true,
            Some(CheckMeaning::Custom { .. }) | None => b.rule.contains("model("),
            Some(_) => false,
        },
        FailedCheck::Authorizer(a) => a.rule.contains("model("),
    }
}

fn explain(e: BToken, token: &VerifiedToken, req: &RequestFacts) -> Denial {
    explain_with(e, token, req, false)
}

/// A denial in plain words; `skip_model` leaves out the checks that read
/// a model not known yet.
fn explain_with(e: BToken, token: &VerifiedToken, req: &RequestFacts, skip_model: bool) -> Denial {
    let (checks, no_policy, deny_policy) = match e {
        BToken::FailedLogic(Logic::Unauthorized { policy, checks }) => {
            let deny = matches!(policy, MatchedPolicy::Deny(_)).then_some(policy);
            (checks, false, deny)
        }
        BToken::FailedLogic(Logic::NoMatchingPolicy { checks }) => (checks, true, None),
        BToken::RunLimit(l) => {
            return Denial::new(
                DenialKind::Limits,
                format!(
                    "authorization stopped at its run limits ({l}); the token's Datalog is too expensive"
                ),
            );
        }
        other => {
            return Denial::new(DenialKind::Scope, format!("authorization error: {other}"));
        }
    };
    // (is a use limit, reason, (block, check) to blame)
    type Blame = Option<(usize, usize)>;
    let mut reasons: Vec<(bool, String, Blame)> = Vec::new();
    let checks: Vec<FailedCheck> = checks
        .into_iter()
        .filter(|c| !(skip_model && reads_model(c, token)))
        .collect();
    let mut all_limits = !checks.is_empty();
    let mut any_use_limit = false;
    let mut expired = false;
    for c in &checks {
        match c {
            FailedCheck::Block(b) => {
                let i = b.block_id as usize;
                let meaning = token
                    .view
                    .blocks
                    .get(i)
                    .and_then(|blk| blk.checks.get(b.check_id as usize));
                match meaning {
                    Some(m) => {
                        let limit = m.is_use_limit() || m.is_window();
                        all_limits &= limit;
                        any_use_limit |= m.is_use_limit();
                        expired |= matches!(m, CheckMeaning::Expires { .. });
                        reasons.push((
                            limit,
                            m.explain(i, &token.view),
                            Some((i, b.check_id as usize)),
                        ));
                    }
                    None => {
                        all_limits = false;
                        reasons.push((
                            false,
                            format!("check {} of {} failed", b.check_id, token.view.key_name(i)),
                            Some((i, b.check_id as usize)),
                        ));
                    }
                }
            }
            FailedCheck::Authorizer(a) => {
                all_limits = false;
                reasons.push((
                    false,
                    format!("policy check failed: {}", a.rule.escape_debug()),
                    None,
                ));
            }
        }
    }
    // Scope reasons first: they are what the caller must fix.
    reasons.sort_by_key(|r| r.0);
    let blame = reasons.iter().find_map(|r| r.2);
    if no_policy {
        all_limits = false;
        reasons.insert(
            0,
            (
                false,
                format!(
                    "no right of the authority block covers {} {} on service {:?}",
                    req.method, req.path, req.service
                ),
                None,
            ),
        );
    }
    if let Some(p) = deny_policy {
        all_limits = false;
        reasons.insert(0, (false, p.to_string(), None));
    }
    let kind = if expired {
        DenialKind::Expired
    } else if all_limits && any_use_limit {
        // Spent for good beats full for now: retrying cannot help.
        DenialKind::Exhausted
    } else if all_limits {
        DenialKind::RateLimited
    } else {
        DenialKind::Scope
    };
    Denial {
        kind,
        reason: reasons
            .into_iter()
            .map(|(_, r, _)| r)
            .collect::<Vec<_>>()
            .join("; "),
        block: blame.map(|b| b.0),
        check: blame.map(|b| b.1),
    }
}

/// One counter to reserve: a block's revocation id, what the store may use
/// to size its durability lease and its retention, and what the usage view
/// shows about the block (recorded when its counter is first created, i.e.
/// on the block's first allowed request — never for a denied one).
#[derive(Clone, Debug)]
pub struct CounterSpec {
    /// Hex revocation id of the block.
    pub id: String,
    /// The block's own use limit (the one it sets on itself), when it has
    /// one. Limits a child writes about its ancestors are enforced by the
    /// Datalog but never shared: a child cannot rewrite its parent's figure.
    pub limit: Option<u64>,
    /// Seconds since the Unix epoch after which the token cannot be valid.
    pub expires: Option<u64>,
    /// Revocation id of the token family's authority block.
    pub family: String,
    /// Revocation id of the block before this one.
    pub parent: Option<String>,
    /// Index of the block in its token.
    pub index: usize,
    /// The block's first label.
    pub label: Option<String>,
    /// The block's own rate windows and concurrency cap, for the usage
    /// view (enforced by the window store, never read from here).
    pub rates: Vec<crate::token::vocab::Rate>,
    pub concurrency: Option<u64>,
}

impl CounterSpec {
    /// A counter that is its own family (tests and benchmarks).
    pub fn standalone(id: &str, limit: Option<u64>, expires: Option<u64>) -> Self {
        CounterSpec {
            id: id.to_string(),
            limit,
            expires,
            family: id.to_string(),
            parent: None,
            index: 0,
            label: None,
            rates: Vec::new(),
            concurrency: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::path::PathBuf;
    use std::time::{Duration, SystemTime};

    use super::*;
    use crate::token::{Scope, attenuate, issue, keys};

    fn scope(max_uses: u64, ttl: u64) -> Scope {
        Scope {
            services: vec!["openai".into()],
            paths: vec!["/v1/".into()],
            max_uses: Some(max_uses),
            expires: Some(SystemTime::now() + Duration::from_secs(ttl)),
            ..Scope::default()
        }
    }

    fn req(path: &str, time: SystemTime) -> RequestFacts {
        RequestFacts {
            service: "openai".into(),
            method: "POST".into(),
            path: path.into(),
            model: None,
            mcp: None,
            time,
        }
    }

    /// `parent` with a block appended through biscuit-auth directly, as an
    /// agent with any Biscuit library can (Till's own `attenuate` refuses
    /// what the verifier would).
    fn append_raw(parent: &str, code: &str, date: u64) -> String {
        let block = biscuit_auth::builder::BlockBuilder::new()
            .code_with_params(
                code,
                HashMap::from([("d".to_string(), biscuit_auth::builder::Term::Date(date))]),
                HashMap::new(),
            )
            .unwrap();
        biscuit_auth::UnverifiedBiscuit::from_base64(parent)
            .unwrap()
            .append(block)
            .unwrap()
            .to_base64()
            .unwrap()
    }

    #[test]
    fn regression_an_expiry_past_year_9999_is_refused_not_a_panic() {
        let root = keys::generate();
        let v = Verifier::new(root.public(), Policies::default_policy());
        let parent = issue(&root, &scope(5, 60)).unwrap();
        // The red team's block: 9999-12-31T23:59:59-23:59 is 10000-01-01 in UTC.
        let text = "check if time($t), $t <= 9999-12-31T23:59:59-23:59;";
        let child = biscuit_auth::UnverifiedBiscuit::from_base64(&parent)
            .unwrap()
            .append(
                biscuit_auth::builder::BlockBuilder::new()
                    .code(text)
                    .unwrap(),
            )
            .unwrap()
            .to_base64()
            .unwrap();
        // Any u64 fits a Datalog date; the largest overflowed SystemTime too.
        let max = append_raw(&parent, "check if time($t), $t <= {d};", u64::MAX);
        for token in [&child, &max] {
            let e = v.verify_token(token).unwrap_err();
            assert!(
                e.to_string().contains("expires after 9999-12-31T23:59:59Z"),
                "{e}"
            );
            let e = crate::token::inspect::inspect(&RawToken::parse(token).unwrap()).unwrap_err();
            assert!(e.to_string().contains("block 1 expires after"), "{e}");
        }
        // Till's own attenuation refuses to write it, and its time parser to read it.
        let e = attenuate(
            &parent,
            &Scope {
                datalog: Some(text.into()),
                ..Scope::default()
            },
        )
        .unwrap_err();
        assert!(e.to_string().contains("expires after"), "{e}");
        let e = crate::token::parse_time("9999-12-31T23:59:59-23:59").unwrap_err();
        assert!(
            e.to_string().contains("outside the times Till handles"),
            "{e}"
        );
        // The last second Till handles is still an expiry it reads and shows.
        let last = append_raw(&parent, "check if time($t), $t <= {d};", 253_402_300_799);
        let t = v.verify_token(&last).unwrap();
        assert_eq!(
            t.view.blocks[1].expires.as_deref(),
            Some("9999-12-31T23:59:59Z")
        );
        v.authorize(&t, &req("/v1/chat", SystemTime::now()), &[1, 1])
            .unwrap();
    }

    #[test]
    fn a_cached_shape_still_obeys_use_limits_and_expiry() {
        let root = keys::generate();
        let v = Verifier::new(root.public(), Policies::default_policy());
        let t = v
            .verify_token(&issue(&root, &scope(2, 60)).unwrap())
            .unwrap();
        let now = SystemTime::now();
        let r = req("/v1/chat", now);
        v.authorize(&t, &r, &[1]).unwrap();
        assert_eq!(t.cached_shapes(), 1, "an allowed plain request is cached");
        v.authorize(&t, &r, &[2]).unwrap();
        let over = v.authorize(&t, &r, &[3]).unwrap_err();
        assert_eq!(over.kind, DenialKind::Exhausted, "{over:?}");
        let late = v
            .authorize(&t, &req("/v1/chat", now + Duration::from_secs(120)), &[1])
            .unwrap_err();
        assert_eq!(late.kind, DenialKind::Expired, "{late:?}");
        // Another shape is not covered by the cached one.
        let out = v.authorize(&t, &req("/v2/x", now), &[1]).unwrap_err();
        assert_eq!(out.kind, DenialKind::Scope, "{out:?}");
    }

    /// Red team, wave 2: 64 requests with distinct made-up 4 KiB methods
    /// and paths, refused after the before-body decision, each left its
    /// shape in the token's decision cache (~550 KiB per token, never
    /// released, weighed 4.5 KiB).
    #[test]
    fn regression_remembered_shapes_are_bounded_in_bytes() {
        let root = keys::generate();
        let v = Verifier::new(root.public(), Policies::default_policy());
        let t = v
            .verify_token(&issue(&root, &scope(100, 60)).unwrap())
            .unwrap();
        let now = SystemTime::now();
        let shape = |method: String, path: String| RequestFacts {
            method,
            ..req(&path, now)
        };
        for i in 0..64 {
            let r = shape(
                format!("{i}{}", "M".repeat(4090)),
                format!("/v1/{i}{}", "p".repeat(4080)),
            );
            v.authorize_before_body(&t, &r, &[1]).unwrap();
            v.authorize(&t, &r, &[1]).unwrap();
        }
        assert_eq!(t.cached_shapes(), 0, "no 4 KiB shape is remembered");
        assert_eq!(t.remembered_shape_bytes(), 0);
        // Shapes under the size bound fill the budget, and no more.
        for i in 0..64 {
            let r = shape(format!("M{i}"), format!("/v1/{i}{}", "p".repeat(600)));
            v.authorize_before_body(&t, &r, &[1]).unwrap();
            v.authorize(&t, &r, &[1]).unwrap();
            assert!(t.remembered_shape_bytes() <= SHAPE_BUDGET);
        }
        assert!((1..FAST_PATH_SHAPES).contains(&t.cached_shapes()));
        assert!(t.remembered_shape_bytes() > SHAPE_BUDGET - MAX_SHAPE_BYTES);
        // Short shapes take what is left, and no more: past the budget,
        // requests are decided by Datalog, and still allowed.
        for i in 0..64 {
            let r = req(&format!("/v1/chat/{i}"), now);
            v.authorize_before_body(&t, &r, &[1]).unwrap();
            v.authorize(&t, &r, &[1]).unwrap();
            assert!(t.remembered_shape_bytes() <= SHAPE_BUDGET);
        }
        assert!(
            t.cached_shapes() < FAST_PATH_SHAPES,
            "{}",
            t.cached_shapes()
        );
        assert!(t.remembered_shape_bytes() > SHAPE_BUDGET - 300);
        // The token's cache weight counts the whole budget.
        assert!(cache_weight(0) as usize >= SHAPE_BUDGET + CACHE_ENTRY_BYTES);
        // The cached answer is still Datalog's.
        let r = shape("M1".into(), format!("/v1/1{}", "p".repeat(600)));
        assert!(t.cache_allows(&r, &[1], false));
        assert_eq!(
            v.authorize(&t, &r, &[101]).unwrap_err().kind,
            DenialKind::Exhausted
        );
    }

    /// A child stating a use count (`uses(0, 0)`) used to be accepted and
    /// gained nothing (block 0's check does not see block 1's facts); it is
    /// now refused outright, by `attenuate` and by the verifier, since one
    /// stating its own count (`uses(1, 0)`) satisfied its own use limit.
    #[test]
    fn a_child_forging_a_use_count_is_refused() {
        let root = keys::generate();
        let v = Verifier::new(root.public(), Policies::default_policy());
        let parent = issue(&root, &scope(2, 60)).unwrap();
        for forged in ["uses(0, 0);", "uses(1, 0); check if uses(1, $u), $u <= 2;"] {
            let e = attenuate(
                &parent,
                &Scope {
                    datalog: Some(forged.into()),
                    ..Scope::default()
                },
            )
            .unwrap_err();
            assert!(matches!(e, TokenError::Shape(_)), "{forged}: {e:?}");
            let child = biscuit_auth::UnverifiedBiscuit::from_base64(&parent)
                .unwrap()
                .append(biscuit_auth::BlockBuilder::new().code(forged).unwrap())
                .unwrap()
                .to_base64()
                .unwrap();
            let Err(e) = v.verify_token(&child) else {
                panic!("{forged}: accepted");
            };
            assert!(e.to_string().contains("`uses(...)`"), "{forged}: {e}");
        }
    }

    #[test]
    fn checks_and_policies_the_cache_cannot_reason_about_turn_it_off() {
        let root = keys::generate();
        let v = Verifier::new(root.public(), Policies::default_policy());
        let custom = attenuate(
            &issue(&root, &scope(5, 60)).unwrap(),
            &Scope {
                datalog: Some(r#"check if method($m), $m != "DELETE";"#.into()),
                ..Scope::default()
            },
        )
        .unwrap();
        let t = v.verify_token(&custom).unwrap();
        v.authorize(&t, &req("/v1/chat", SystemTime::now()), &[1, 1])
            .unwrap();
        assert!(t.fast.is_none(), "a custom check disables the cache");

        let timed = Policies::from_sources(&[(
            PathBuf::from("office-hours.datalog"),
            r#"allow if service("openai"), time($t), $t <= 2100-01-01T00:00:00Z;"#.into(),
        )])
        .unwrap();
        let v = Verifier::new(root.public(), timed);
        let t = v
            .verify_token(&issue(&root, &scope(5, 60)).unwrap())
            .unwrap();
        v.authorize(&t, &req("/v1/chat", SystemTime::now()), &[1])
            .unwrap();
        assert!(t.fast.is_none(), "a policy reading time disables the cache");
    }
}
