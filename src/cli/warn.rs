//! Warnings for `till issue` and `till attenuate`: a token that can never
//! succeed, a child promised more uses than its parent has, a root token
//! without bounds. They read the token back with `token::inspect` (never
//! changing what it means) and go to stderr; `--strict` turns them into an
//! error, so scripts can refuse such tokens.

use std::time::SystemTime;

use anyhow::bail;

use crate::token::format_time;
use crate::token::inspect::{CheckMeaning, TokenView};

/// Allow-lists of one kind, with the block each comes from. Every list must
/// be satisfied (each block's check), any element of a list will do.
type Lists = Vec<(usize, Vec<String>)>;

#[derive(Default)]
struct Scopes {
    services: Lists,
    methods: Lists,
    paths: Lists,
    models: Lists,
    tools: Lists,
    prompts: Lists,
    resources: Lists,
}

fn scopes(view: &TokenView) -> Scopes {
    let mut s = Scopes::default();
    for b in &view.blocks {
        for c in &b.checks {
            let (list, allowed) = match c {
                CheckMeaning::Services { allowed } => (&mut s.services, allowed),
                CheckMeaning::Methods { allowed } => (&mut s.methods, allowed),
                CheckMeaning::PathPrefixes { allowed } => (&mut s.paths, allowed),
                CheckMeaning::Models { allowed } => (&mut s.models, allowed),
                CheckMeaning::Tools { allowed } => (&mut s.tools, allowed),
                CheckMeaning::Prompts { allowed } => (&mut s.prompts, allowed),
                CheckMeaning::Resources { allowed } => (&mut s.resources, allowed),
                _ => continue,
            };
            list.push((b.index, allowed.clone()));
        }
    }
    s
}

/// Whether one value can pass every list; `fixed` is the value a right
/// pins (None for "*", any value).
fn one_value(fixed: Option<&str>, lists: &Lists) -> bool {
    match fixed {
        Some(f) => lists.iter().all(|(_, l)| l.iter().any(|x| x == f)),
        None => match lists.split_first() {
            None => true,
            Some(((_, first), rest)) => first
                .iter()
                .any(|x| rest.iter().all(|(_, l)| l.contains(x))),
        },
    }
}

/// Whether some path starts with `start` and with a prefix of every list:
/// two prefixes share a path exactly when one of them starts with the other.
fn one_path(start: &str, lists: &Lists) -> bool {
    let mut candidates = vec![start.to_string()];
    for (_, l) in lists {
        let mut next = Vec::new();
        for c in &candidates {
            for p in l {
                if c.starts_with(p.as_str()) {
                    next.push(c.clone());
                } else if p.starts_with(c.as_str()) {
                    next.push(p.clone());
                }
            }
        }
        next.sort();
        next.dedup();
        if next.is_empty() {
            return false;
        }
        candidates = next;
    }
    true
}

/// Whether some tool name passes every list (names, and prefixes written
/// `name*`). If one does, so does one of the lists' own names or prefixes:
/// a name listed exactly, or the longest of the prefixes it matches.
fn one_tool(lists: &Lists) -> bool {
    let passes = |name: &str, l: &[String]| {
        l.iter().any(|t| match t.strip_suffix('*') {
            Some(p) => name.starts_with(p),
            None => name == t,
        })
    };
    lists.is_empty()
        || lists
            .iter()
            .flat_map(|(_, l)| l.iter().map(|t| t.trim_end_matches('*')))
            .any(|c| lists.iter().all(|(_, l)| passes(c, l)))
}

fn quoted(v: &[String]) -> String {
    v.iter()
        .map(|s| {
            if s == "*" {
                "any".into()
            } else {
                format!("{s:?}")
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// "block 0 grants "openai"; block 1 allows only "github"".
fn explain(what: &str, granted: Vec<String>, lists: &Lists) -> String {
    let mut granted = granted;
    granted.sort();
    granted.dedup();
    let mut parts = Vec::new();
    if !granted.is_empty() {
        parts.push(format!("block 0 grants {}", quoted(&granted)));
    }
    for (i, l) in lists {
        parts.push(format!("block {i} allows only {}", quoted(l)));
    }
    format!("no {what} passes every block ({})", parts.join("; "))
}

/// Why no request can ever pass the scope of `view`, if that can be told
/// from the checks Till writes (custom Datalog is not second-guessed).
fn unreachable(view: &TokenView) -> Option<String> {
    let s = scopes(view);
    let rights = view.blocks.first().map(|b| b.rights.as_slice())?;
    if !one_value(None, &s.models) {
        return Some(explain("model", Vec::new(), &s.models));
    }
    // A token without a right is not Till-shaped (custom policies may give
    // it meaning): say nothing rather than guess.
    if rights.is_empty() {
        return None;
    }
    let pin = |v: &str| (v != "*").then(|| v.to_string());
    let svc = |r: &(String, String, String)| one_value(pin(&r.0).as_deref(), &s.services);
    let method = |r: &(String, String, String)| one_value(pin(&r.1).as_deref(), &s.methods);
    let path = |r: &(String, String, String)| one_path(&r.2, &s.paths);
    if rights.iter().any(|r| svc(r) && method(r) && path(r)) {
        return None;
    }
    let all = |f: fn(&(String, String, String)) -> &String| rights.iter().map(f).cloned().collect();
    Some(if !rights.iter().any(svc) {
        explain("service", all(|r| &r.0), &s.services)
    } else if !rights.iter().any(|r| svc(r) && method(r)) {
        explain("method", all(|r| &r.1), &s.methods)
    } else {
        explain("path", all(|r| &r.2), &s.paths)
    })
}

fn expired(view: &TokenView, now: SystemTime) -> Option<String> {
    let at = view.expires_at()?;
    (at < now).then(|| format!("it expired at {}", format_time(at)))
}

/// Why no MCP tool (prompt, resource) can ever be used with `view` (its
/// other MCP messages still pass), if so: "tool: no tool passes ...".
fn no_tool(view: &TokenView) -> Option<String> {
    let s = scopes(view);
    [
        ("tool", &s.tools),
        ("prompt", &s.prompts),
        ("resource", &s.resources),
    ]
    .into_iter()
    .find(|(_, l)| !one_tool(l))
    .map(|(what, l)| format!("{what}: {}", explain(what, Vec::new(), l)))
}

/// Warnings for a root token just issued.
pub fn for_root(view: &TokenView, now: SystemTime) -> Vec<String> {
    let mut w = Vec::new();
    if let Some(why) = expired(view, now).or_else(|| unreachable(view)) {
        w.push(format!("this token can never succeed: {why}"));
    }
    if let Some(why) = no_tool(view) {
        w.push(format!("this token can use no MCP {why}"));
    }
    if let Some(b) = view.blocks.first()
        && b.use_limit.is_none()
        && b.expires_at.is_none()
    {
        w.push(
            "this token has neither a use limit nor an expiry: it works until it is revoked; \
             add --max-uses N and/or --ttl DURATION"
                .into(),
        );
    }
    w
}

/// Warnings for a child just attenuated (`view` includes the new block).
pub fn for_child(view: &TokenView, now: SystemTime) -> Vec<String> {
    let mut w = Vec::new();
    if let Some(why) = expired(view, now).or_else(|| unreachable(view)) {
        w.push(format!("the new token can never succeed: {why}"));
    }
    if let Some(why) = no_tool(view) {
        w.push(format!("the new token can use no MCP {why}"));
    }
    let n = view.blocks.len();
    let limits = view.effective_limits();
    let parent_limit = limits[..n.saturating_sub(1)].iter().flatten().min();
    if let (Some(own), Some(parent)) = (view.blocks.last().and_then(|b| b.use_limit), parent_limit)
        && own > *parent
    {
        w.push(format!(
            "--max-uses {own} is above the parent's use limit of {parent}: every use also counts \
             on the parent, so the new token gets at most {parent} uses (fewer if the parent has \
             been used)"
        ));
    }
    // A child's window or cap that an ancestor's already implies: harmless,
    // but whoever reads `--rate 1000/1s` would expect 1,000 requests.
    if let Some((last, ancestors)) = view.blocks.split_last() {
        for r in &last.rates {
            let tighter = ancestors
                .iter()
                .flat_map(|b| &b.rates)
                .find(|p| p.seconds >= r.seconds && p.limit <= r.limit);
            if let Some(p) = tighter {
                w.push(format!(
                    "--rate {r} adds nothing: the parent's {p} already allows at most {} requests in any {} s (a child can only narrow its parent's windows)",
                    p.limit, r.seconds
                ));
            }
        }
        let parent_cap = ancestors.iter().filter_map(|b| b.concurrency).min();
        if let (Some(own), Some(p)) = (last.concurrency, parent_cap)
            && own >= p
        {
            w.push(format!(
                "--concurrency {own} adds nothing: the parent allows {p} in flight, and every request of the new token counts there too"
            ));
        }
    }
    w
}

/// Prints the warnings; with `strict`, any warning is an error (exit 2,
/// nothing on stdout).
pub fn report(warnings: &[String], strict: bool) -> anyhow::Result<()> {
    for w in warnings {
        eprintln!("till: warning: {w}");
    }
    if strict && !warnings.is_empty() {
        bail!(
            "--strict: not printing the token because of the warning{} above",
            if warnings.len() == 1 { "" } else { "s" }
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lists(v: &[(usize, &[&str])]) -> Lists {
        v.iter()
            .map(|(i, l)| (*i, l.iter().map(|s| s.to_string()).collect()))
            .collect()
    }

    #[test]
    fn prefixes_meet_only_when_one_extends_the_other() {
        assert!(one_path(
            "/",
            &lists(&[(1, &["/v1/"]), (2, &["/v1/chat/"])])
        ));
        assert!(one_path("/v1/", &lists(&[(1, &["/v2/", "/v1/chat"])])));
        assert!(!one_path("/v1/", &lists(&[(1, &["/v2/"])])));
        assert!(!one_path("/", &lists(&[(1, &["/a/"]), (2, &["/b/"])])));
    }

    #[test]
    fn some_tool_must_pass_every_list() {
        assert!(one_tool(&lists(&[])));
        assert!(one_tool(&lists(&[
            (0, &["github_*"]),
            (1, &["github_get_*"])
        ])));
        assert!(one_tool(&lists(&[(0, &["github_*"]), (1, &["github_x"])])));
        assert!(one_tool(&lists(&[
            (0, &["a", "b*"]),
            (1, &["bc*"]),
            (2, &["bcd"])
        ])));
        assert!(!one_tool(&lists(&[(0, &["github_*"]), (1, &["gitlab_*"])])));
        assert!(!one_tool(&lists(&[(0, &["add"]), (1, &["add_*"])])));
        assert!(!one_tool(&lists(&[
            (0, &["add", "echo"]),
            (1, &["delete"])
        ])));
    }

    #[test]
    fn values_must_pass_every_list() {
        assert!(one_value(None, &lists(&[])));
        assert!(one_value(Some("openai"), &lists(&[])));
        assert!(one_value(None, &lists(&[(1, &["a", "b"]), (2, &["b"])])));
        assert!(!one_value(None, &lists(&[(1, &["a"]), (2, &["b"])])));
        assert!(!one_value(Some("a"), &lists(&[(1, &["b"])])));
    }
}
