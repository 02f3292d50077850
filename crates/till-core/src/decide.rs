//! The decision: token + request facts + revocation + current counts →
//! allow or deny, with no state touched.
//!
//! Every request path of Till calls this one function before it spends
//! anything: the proxy (ARCHITECTURE.md, "The request path"), and the places
//! that decide for others. Forwarding, counting and recording happen around
//! it, never inside it, so it stays a plain synchronous function that can be
//! tested and fuzzed on its own.
//!
//! A request that passes here has not been counted: the caller then reserves
//! every block's counter and re-checks the limits with the post-increment
//! values ([`recheck`]), because concurrent requests may have spent the
//! budget in between.
//!
//! Rate windows and concurrency caps are facts too (`rate`, `in_flight`):
//! the `_windowed` variants take what the window store counted. The plain
//! variants supply none, so a token with a window or a cap is denied by a
//! caller that does not count them (deny when unsure).

use crate::token::RequestFacts;
use crate::verify::{Denial, VerifiedToken, Verifier, WindowCounts, revoked_denial};

/// How much of the request is known.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// The head only: a JSON body that may name a model is still unread.
    /// Denies only what no model could make acceptable.
    BeforeBody,
    /// Everything the decision reads is known (`facts.model` is final).
    Final,
}

/// Decides a request without touching any state.
///
/// `revoked` is the first revoked block of the token, if any (the caller's
/// revocation list). `counts[k]` is block `k`'s current use count; the
/// request is judged as the next use (`counts[k] + 1`), so a used-up token is
/// refused here, before it reserves.
pub fn decide(
    verifier: &Verifier,
    token: &VerifiedToken,
    revoked: Option<usize>,
    facts: &RequestFacts,
    counts: &[u64],
    stage: Stage,
) -> Result<(), Denial> {
    decide_windowed(
        verifier,
        token,
        revoked,
        facts,
        counts,
        &WindowCounts::default(),
        stage,
    )
}

/// [`decide`] with the window counts this request makes (itself included;
/// before the window store is asked, [`WindowCounts::alone`]).
pub fn decide_windowed(
    verifier: &Verifier,
    token: &VerifiedToken,
    revoked: Option<usize>,
    facts: &RequestFacts,
    counts: &[u64],
    windows: &WindowCounts,
    stage: Stage,
) -> Result<(), Denial> {
    let uses = next_uses(token, counts);
    if let Some(answer) = answer_without_datalog(token, revoked, facts, &uses, windows, stage) {
        return answer;
    }
    match stage {
        Stage::BeforeBody => verifier.authorize_before_body_windowed(token, facts, &uses, windows),
        Stage::Final => verifier.authorize_windowed(token, facts, &uses, windows),
    }
}

/// [`decide`]'s answer when it needs no Datalog (a revoked block, or the
/// token's decision cache allows), `None` otherwise: the caller may then
/// hand the decision to a thread where its cost cannot hold up other
/// requests.
pub fn cached_decision(
    token: &VerifiedToken,
    revoked: Option<usize>,
    facts: &RequestFacts,
    counts: &[u64],
    stage: Stage,
) -> Option<Result<(), Denial>> {
    cached_decision_windowed(
        token,
        revoked,
        facts,
        counts,
        &WindowCounts::default(),
        stage,
    )
}

/// [`cached_decision`] with the window counts.
pub fn cached_decision_windowed(
    token: &VerifiedToken,
    revoked: Option<usize>,
    facts: &RequestFacts,
    counts: &[u64],
    windows: &WindowCounts,
    stage: Stage,
) -> Option<Result<(), Denial>> {
    // On the stack for any usual token: this runs up to three times a
    // request, and a heap allocation each time was measurable.
    let mut buf = [0u64; 16];
    let n = token.ids.len();
    let heap;
    let uses: &[u64] = if n <= buf.len() {
        for (k, u) in buf[..n].iter_mut().enumerate() {
            *u = next_use(counts, k);
        }
        &buf[..n]
    } else {
        heap = next_uses(token, counts);
        &heap
    };
    answer_without_datalog(token, revoked, facts, uses, windows, stage)
}

/// The uses this request would make of every block: the next one.
fn next_uses(token: &VerifiedToken, counts: &[u64]) -> Vec<u64> {
    (0..token.ids.len()).map(|k| next_use(counts, k)).collect()
}

/// The use block `k` would make: its count plus one.
fn next_use(counts: &[u64], k: usize) -> u64 {
    counts.get(k).copied().unwrap_or(0).saturating_add(1)
}

fn answer_without_datalog(
    token: &VerifiedToken,
    revoked: Option<usize>,
    facts: &RequestFacts,
    uses: &[u64],
    windows: &WindowCounts,
    stage: Stage,
) -> Option<Result<(), Denial>> {
    if let Some(b) = revoked {
        return Some(Err(revoked_denial(&token.view, b)));
    }
    token
        .cache_allows_windowed(facts, uses, windows, stage == Stage::BeforeBody)
        .then_some(Ok(()))
}

/// [`decide`] for a request that makes no use (MCP housekeeping such as
/// `initialize` or `tools/list`): judged with the current counts, so a
/// used-up token can still list what it could call, never call it. It
/// takes no window slot either, so it is judged as alone in every window.
pub fn decide_free(
    verifier: &Verifier,
    token: &VerifiedToken,
    revoked: Option<usize>,
    facts: &RequestFacts,
    counts: &[u64],
    stage: Stage,
) -> Result<(), Denial> {
    let uses: Vec<u64> = (0..token.ids.len())
        .map(|k| counts.get(k).copied().unwrap_or(0))
        .collect();
    let windows = WindowCounts::alone(token);
    if let Some(answer) = answer_without_datalog(token, revoked, facts, &uses, &windows, stage) {
        return answer;
    }
    match stage {
        Stage::BeforeBody => verifier.authorize_before_body_windowed(token, facts, &uses, &windows),
        Stage::Final => verifier.authorize_windowed(token, facts, &uses, &windows),
    }
}

/// After reserving: the same decision with this request's own
/// post-increment counts, which is what makes concurrent requests exact.
pub fn recheck(
    verifier: &Verifier,
    token: &VerifiedToken,
    facts: &RequestFacts,
    uses: &[u64],
) -> Result<(), Denial> {
    verifier.authorize(token, facts, uses)
}

/// [`recheck`] with what the window store counted for this request.
pub fn recheck_windowed(
    verifier: &Verifier,
    token: &VerifiedToken,
    facts: &RequestFacts,
    uses: &[u64],
    windows: &WindowCounts,
) -> Result<(), Denial> {
    verifier.authorize_windowed(token, facts, uses, windows)
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::*;
    use crate::policy::Policies;
    use crate::token::{Scope, issue, keys};
    use crate::verify::DenialKind;

    fn facts(model: Option<&str>) -> RequestFacts {
        RequestFacts {
            service: "openai".into(),
            method: "POST".into(),
            path: "/v1/chat/completions".into(),
            model: model.map(str::to_string),
            mcp: None,
            time: SystemTime::now(),
        }
    }

    fn token(models: &[&str], max_uses: u64) -> (Verifier, VerifiedToken) {
        let root = keys::generate();
        let v = Verifier::new(root.public(), Policies::default_policy());
        let t = issue(
            &root,
            &Scope {
                services: vec!["openai".into()],
                models: models.iter().map(|m| m.to_string()).collect(),
                max_uses: Some(max_uses),
                expires: Some(SystemTime::now() + Duration::from_secs(600)),
                ..Scope::default()
            },
        )
        .unwrap();
        let t = v.verify_token(&t).unwrap();
        (v, t)
    }

    #[test]
    fn a_model_check_waits_for_the_body_and_then_decides() {
        let (v, t) = token(&["gpt-4o-mini"], 5);
        // The first answer needs Datalog; the second comes from the cache.
        assert!(cached_decision(&t, None, &facts(None), &[0], Stage::BeforeBody).is_none());
        decide(&v, &t, None, &facts(None), &[0], Stage::BeforeBody).unwrap();
        assert!(matches!(
            cached_decision(&t, None, &facts(None), &[0], Stage::BeforeBody),
            Some(Ok(()))
        ));
        // The cache never answers past a limit; a revoked block needs none.
        assert!(cached_decision(&t, None, &facts(None), &[5], Stage::BeforeBody).is_none());
        assert!(matches!(
            cached_decision(&t, Some(0), &facts(None), &[0], Stage::BeforeBody),
            Some(Err(_))
        ));
        decide(
            &v,
            &t,
            None,
            &facts(Some("gpt-4o-mini")),
            &[0],
            Stage::Final,
        )
        .unwrap();
        let d = decide(&v, &t, None, &facts(Some("gpt-4")), &[0], Stage::Final).unwrap_err();
        assert_eq!(d.kind, DenialKind::Scope, "{d:?}");
    }

    #[test]
    fn what_no_model_can_fix_is_refused_before_the_body() {
        let (v, t) = token(&["gpt-4o-mini"], 5);
        // Used up: refused before the body, whatever the model.
        let d = decide(&v, &t, None, &facts(None), &[5], Stage::BeforeBody).unwrap_err();
        assert_eq!(d.kind, DenialKind::Exhausted, "{d:?}");
        // Out of scope on the path.
        let mut f = facts(None);
        f.service = "github".into();
        let d = decide(&v, &t, None, &f, &[0], Stage::BeforeBody).unwrap_err();
        assert_eq!(d.kind, DenialKind::Scope, "{d:?}");
        // Expired.
        let mut f = facts(None);
        f.time = SystemTime::now() + Duration::from_secs(3600);
        let d = decide(&v, &t, None, &f, &[0], Stage::BeforeBody).unwrap_err();
        assert_eq!(d.kind, DenialKind::Expired, "{d:?}");
        // Revoked.
        let d = decide(&v, &t, Some(0), &facts(None), &[0], Stage::BeforeBody).unwrap_err();
        assert_eq!(d.kind, DenialKind::Revoked, "{d:?}");
    }

    fn mcp(method: &str, tool: Option<&str>) -> RequestFacts {
        RequestFacts {
            service: "tools".into(),
            path: "/mcp".into(),
            mcp: Some(crate::token::McpMessage {
                method: method.into(),
                name: tool.map(str::to_string),
            }),
            ..facts(None)
        }
    }

    #[test]
    fn tools_narrow_tool_calls_only_and_prefixes_stay_prefixes() {
        let root = keys::generate();
        let v = Verifier::new(root.public(), Policies::default_policy());
        let parent = issue(
            &root,
            &Scope {
                services: vec!["tools".into(), "openai".into()],
                tools: vec!["add".into(), "github_*".into()],
                max_uses: Some(1),
                ..Scope::default()
            },
        )
        .unwrap();
        let t = v.verify_token(&parent).unwrap();
        let ok = |f: &RequestFacts| decide(&v, &t, None, f, &[0], Stage::Final);
        ok(&mcp("tools/call", Some("add"))).unwrap();
        ok(&mcp("tools/call", Some("github_issues"))).unwrap();
        for tool in ["delete_everything", "github", "githubx_", "ad", "add2"] {
            let d = ok(&mcp("tools/call", Some(tool))).unwrap_err();
            assert_eq!(d.kind, DenialKind::Scope, "{tool}: {d:?}");
            assert!(d.reason.contains("MCP tool"), "{d:?}");
        }
        // Housekeeping passes, even for a used-up token when judged free.
        for m in ["initialize", "tools/list", "notifications/initialized", ""] {
            ok(&mcp(m, None)).unwrap();
            decide_free(&v, &t, None, &mcp(m, None), &[1], Stage::Final).unwrap();
        }
        let d = decide(
            &v,
            &t,
            None,
            &mcp("tools/call", Some("add")),
            &[1],
            Stage::Final,
        )
        .unwrap_err();
        assert_eq!(d.kind, DenialKind::Exhausted, "{d:?}");
        // A tools/call without a tool fact is no housekeeping.
        assert!(ok(&mcp("tools/call", None)).is_err());
        // A key narrowed to tools is an MCP key: HTTP APIs refuse it.
        assert!(ok(&facts(None)).is_err());

        // A child narrows: a prefix inside the parent's prefix.
        let child = crate::token::attenuate(
            &parent,
            &Scope {
                tools: vec!["github_pr_*".into()],
                ..Scope::default()
            },
        )
        .unwrap();
        let c = v.verify_token(&child).unwrap();
        let ok = |f: &RequestFacts| decide(&v, &c, None, f, &[0, 0], Stage::Final);
        ok(&mcp("tools/call", Some("github_pr_list"))).unwrap();
        assert!(ok(&mcp("tools/call", Some("github_issues"))).is_err());
        assert!(ok(&mcp("tools/call", Some("add"))).is_err());
        ok(&mcp("tools/list", None)).unwrap();
    }

    #[test]
    fn tool_patterns_are_names_or_trailing_prefixes() {
        use crate::token::vocab::{ToolPattern, tool_pattern};
        assert_eq!(
            tool_pattern("add").unwrap(),
            ToolPattern::Exact("add".into())
        );
        assert_eq!(
            tool_pattern("github_*").unwrap(),
            ToolPattern::Prefix("github_".into())
        );
        for bad in ["*", "", "a*b", "**", "a b", "x\"y", &"a".repeat(129)] {
            assert!(tool_pattern(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_caller_that_does_not_count_windows_denies_a_windowed_token() {
        use crate::token::vocab::Rate;
        let root = keys::generate();
        let v = Verifier::new(root.public(), Policies::default_policy());
        let t = issue(
            &root,
            &Scope {
                services: vec!["openai".into()],
                rates: vec![Rate {
                    limit: 2,
                    seconds: 60,
                }],
                concurrency: Some(1),
                ..Scope::default()
            },
        )
        .unwrap();
        let t = v.verify_token(&t).unwrap();
        // No window facts: denied, never let through unlimited.
        assert!(decide(&v, &t, None, &facts(None), &[0], Stage::Final).is_err());
        // This request alone: allowed, then answered by the cache.
        let alone = WindowCounts::alone(&t);
        decide_windowed(&v, &t, None, &facts(None), &[0], &alone, Stage::Final).unwrap();
        assert!(matches!(
            cached_decision_windowed(&t, None, &facts(None), &[0], &alone, Stage::Final),
            Some(Ok(()))
        ));
        // The cache never answers past a window or a cap; Datalog denies,
        // as a retryable rate limit.
        let mut full = alone.clone();
        full.rates[0].2 = 3;
        assert!(
            cached_decision_windowed(&t, None, &facts(None), &[0], &full, Stage::Final).is_none()
        );
        let d = recheck_windowed(&v, &t, &facts(None), &[1], &full).unwrap_err();
        assert_eq!(d.kind, DenialKind::RateLimited, "{d:?}");
        let mut busy = alone.clone();
        busy.in_flight[0].1 = 2;
        let d = recheck_windowed(&v, &t, &facts(None), &[1], &busy).unwrap_err();
        assert_eq!(d.kind, DenialKind::RateLimited, "{d:?}");
        assert!(d.reason.contains("in flight"), "{d:?}");
        // Spent uses win over a full window: retrying cannot help.
        let t2 = issue(
            &root,
            &Scope {
                services: vec!["openai".into()],
                max_uses: Some(1),
                rates: vec![Rate {
                    limit: 1,
                    seconds: 60,
                }],
                ..Scope::default()
            },
        )
        .unwrap();
        let t2 = v.verify_token(&t2).unwrap();
        let mut w = WindowCounts::alone(&t2);
        w.rates[0].2 = 2;
        let d = recheck_windowed(&v, &t2, &facts(None), &[2], &w).unwrap_err();
        assert_eq!(d.kind, DenialKind::Exhausted, "{d:?}");
    }

    #[test]
    fn the_decision_judges_the_next_use_and_the_recheck_the_reserved_one() {
        let (v, t) = token(&[], 2);
        decide(&v, &t, None, &facts(None), &[1], Stage::Final).unwrap();
        assert!(decide(&v, &t, None, &facts(None), &[2], Stage::Final).is_err());
        recheck(&v, &t, &facts(None), &[2]).unwrap();
        assert!(recheck(&v, &t, &facts(None), &[3]).is_err());
    }
}
