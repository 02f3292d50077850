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
use crate::token::{RawToken, RequestFacts, TokenError};

/// A token whose signatures have been checked, with what the verifier needs
/// to know about it. Cheap to share: the proxy caches these.
#[derive(Debug)]
pub struct VerifiedToken {
    pub biscuit: Biscuit,
    pub view: TokenView,
    /// Revocation id of each block, authority first (hex).
    pub ids: Vec<String>,
    /// Effective use limit of each block, when it has one.
    pub limits: Vec<Option<u64>>,
    /// Earliest expiry of any block, as seconds since the Unix epoch.
    pub expires_unix: Option<u64>,
}

impl VerifiedToken {
    /// The token family: the authority block's revocation id.
    pub fn family(&self) -> &str {
        &self.ids[0]
    }
}

/// What kind of denial, which decides the HTTP status.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DenialKind {
    /// Out of scope, or a custom check failed (403).
    Scope,
    /// Only use limits failed (429).
    Exhausted,
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
    pub kind: DenialKind,
    pub reason: String,
}

impl std::fmt::Display for Denial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.reason)
    }
}

/// Verifies tokens against one root key and one set of policies.
#[derive(Clone)]
pub struct Verifier {
    root: PublicKey,
    policies: Arc<Policies>,
}

impl Verifier {
    pub fn new(root: PublicKey, policies: Policies) -> Self {
        Verifier {
            root,
            policies: Arc::new(policies),
        }
    }

    pub fn root(&self) -> &PublicKey {
        &self.root
    }

    /// Bounds, decodes and checks the signatures of a token (the expensive,
    /// cacheable part).
    pub fn verify_token(&self, text: &str) -> Result<VerifiedToken, TokenError> {
        let raw = RawToken::parse(text)?;
        // Shape first: it is cheaper than the signatures it protects.
        crate::token::shape::check(&raw)?;
        let biscuit = raw.verify(&self.root)?;
        let view = inspect(&raw)?;
        let ids = raw.revocation_ids();
        let limits = view.effective_limits();
        let expires_unix = view.expires_at().and_then(|t| {
            t.duration_since(std::time::UNIX_EPOCH)
                .ok()
                .map(|d| d.as_secs())
        });
        Ok(VerifiedToken {
            biscuit,
            view,
            ids,
            limits,
            expires_unix,
        })
    }

    /// Runs the policies and every block's checks with the request facts and
    /// `uses[k]` = activations of block `k`, this request included.
    pub fn authorize(
        &self,
        token: &VerifiedToken,
        req: &RequestFacts,
        uses: &[u64],
    ) -> Result<(), Denial> {
        let internal = |e: TokenError| Denial {
            kind: DenialKind::Scope,
            reason: format!("authorization error: {e}"),
        };
        let builder = req
            .add_to(self.policies.builder(), uses)
            .map_err(internal)?;
        let mut authorizer = builder
            .build(&token.biscuit)
            .map_err(|e| explain(e, token, req))?;
        authorizer
            .authorize()
            .map(|_| ())
            .map_err(|e| explain(e, token, req))
    }

    /// Authorizes a request to the admin API: the token's authority block must
    /// hold `right("till:admin", "*", "/")`. Policies in `policies/` do not
    /// apply, so no operator policy can open the admin API by accident.
    pub fn authorize_admin(
        &self,
        token: &VerifiedToken,
        now: std::time::SystemTime,
    ) -> Result<(), Denial> {
        let facts = RequestFacts {
            service: crate::token::vocab::ADMIN_SERVICE.into(),
            method: "*".into(),
            path: "/".into(),
            model: None,
            time: now,
        };
        let uses = vec![1; token.ids.len()];
        let base = biscuit_auth::AuthorizerBuilder::new()
            .set_limits(crate::policy::run_limits())
            .code("allow if right(\"till:admin\", \"*\", \"/\")")
            .map_err(|e| Denial {
                kind: DenialKind::Scope,
                reason: e.to_string(),
            })?;
        let builder = facts.add_to(base, &uses).map_err(|e| Denial {
            kind: DenialKind::Scope,
            reason: e.to_string(),
        })?;
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

/// Returns the first revoked block of the token, if any.
pub fn first_revoked(token_ids: &[String], revoked: &HashSet<String>) -> Option<usize> {
    token_ids.iter().position(|id| revoked.contains(id))
}

/// The denial for a revoked block.
pub fn revoked_denial(block: usize) -> Denial {
    Denial {
        kind: DenialKind::Revoked,
        reason: if block == 0 {
            "token is revoked (its root block was revoked)".into()
        } else {
            format!("token is revoked (block {block} was revoked)")
        },
    }
}

fn explain(e: BToken, token: &VerifiedToken, req: &RequestFacts) -> Denial {
    let (checks, no_policy, deny_policy) = match e {
        BToken::FailedLogic(Logic::Unauthorized { policy, checks }) => {
            let deny = matches!(policy, MatchedPolicy::Deny(_)).then_some(policy);
            (checks, false, deny)
        }
        BToken::FailedLogic(Logic::NoMatchingPolicy { checks }) => (checks, true, None),
        BToken::RunLimit(l) => {
            return Denial {
                kind: DenialKind::Limits,
                reason: format!(
                    "authorization stopped at its run limits ({l}); the token's Datalog is too expensive"
                ),
            };
        }
        other => {
            return Denial {
                kind: DenialKind::Scope,
                reason: format!("authorization error: {other}"),
            };
        }
    };
    let mut reasons = Vec::new();
    let mut all_limits = !checks.is_empty();
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
                        all_limits &= m.is_use_limit();
                        expired |= matches!(m, CheckMeaning::Expires { .. });
                        reasons.push(m.explain(i));
                    }
                    None => {
                        all_limits = false;
                        reasons.push(format!("block {i} check {} failed", b.check_id));
                    }
                }
            }
            FailedCheck::Authorizer(a) => {
                all_limits = false;
                reasons.push(format!("policy check failed: {}", a.rule.escape_debug()));
            }
        }
    }
    // Scope reasons first: they are what the caller must fix.
    reasons.sort_by_key(|r| r.contains("uses and they are used up"));
    if no_policy {
        all_limits = false;
        reasons.insert(
            0,
            format!(
                "no right of the authority block covers {} {} on service {:?}",
                req.method, req.path, req.service
            ),
        );
    }
    if let Some(p) = deny_policy {
        all_limits = false;
        reasons.insert(0, p.to_string());
    }
    let kind = if expired {
        DenialKind::Expired
    } else if all_limits {
        DenialKind::Exhausted
    } else {
        DenialKind::Scope
    };
    Denial {
        kind,
        reason: reasons.join("; "),
    }
}
