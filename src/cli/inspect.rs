//! `till inspect`: what a token allows, block by block.

use std::fmt::Write;
use std::process::ExitCode;

use clap::Args;

use super::input::TokenInput;
use crate::token::RawToken;
use crate::token::inspect::{CheckMeaning, TokenView, inspect};

#[derive(Args, Debug)]
pub struct InspectArgs {
    #[command(flatten)]
    pub input: TokenInput,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: InspectArgs) -> anyhow::Result<ExitCode> {
    let raw = RawToken::parse(&a.input.read()?)?;
    let view = inspect(&raw)?;
    if a.json {
        outln!("{}", serde_json::to_string_pretty(&view)?);
    } else {
        out!("{}", render(&view));
    }
    Ok(ExitCode::SUCCESS)
}

/// Human-readable rendering. Every string from the token is printed with
/// escapes (`{:?}`), so it cannot forge structure.
pub fn render(v: &TokenView) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "token family {} ({} block{}); signatures not checked (use `till verify`)",
        v.family,
        v.blocks.len(),
        if v.blocks.len() == 1 { "" } else { "s" }
    );
    for b in &v.blocks {
        let _ = writeln!(o);
        let kind = match (b.index, &b.third_party_key) {
            (0, _) => "authority".to_string(),
            (_, Some(k)) => format!("third-party, signed by {k}"),
            _ => "attenuation".to_string(),
        };
        let _ = writeln!(o, "block {} ({kind})", b.index);
        let _ = writeln!(o, "  revocation id: {}", b.revocation_id);
        for w in &b.warnings {
            let _ = writeln!(o, "  WARNING: {w}");
        }
        for l in &b.labels {
            let _ = writeln!(o, "  label: {l:?}");
        }
        for (s, m, p) in &b.rights {
            let _ = writeln!(o, "  right: service {s:?} method {m:?} path prefix {p:?}");
        }
        for c in &b.checks {
            let line = match c {
                CheckMeaning::UseLimit { block, limit } if *block == b.index => {
                    format!("use limit: {limit}")
                }
                CheckMeaning::UseLimit { block, limit } => {
                    format!("use limit on block {block}: {limit}")
                }
                CheckMeaning::RateLimit { limit, seconds, .. } => format!(
                    "rate limit: {} (at most {limit} requests in any {seconds} s)",
                    crate::token::vocab::Rate {
                        limit: *limit,
                        seconds: *seconds
                    }
                ),
                CheckMeaning::Concurrency { limit, .. } => {
                    format!("concurrency cap: {limit} in flight")
                }
                CheckMeaning::Expires { at, .. } => format!("expires: {at}"),
                CheckMeaning::Services { allowed } => format!("services: {}", list(allowed)),
                CheckMeaning::Methods { allowed } => format!("methods: {}", list(allowed)),
                CheckMeaning::PathPrefixes { allowed } => {
                    format!("path prefixes: {}", list(allowed))
                }
                CheckMeaning::Models { allowed } => format!("models: {}", list(allowed)),
                CheckMeaning::Tools { allowed } => format!("MCP tools: {}", list(allowed)),
                CheckMeaning::Prompts { allowed } => format!("MCP prompts: {}", list(allowed)),
                CheckMeaning::Resources { allowed } => {
                    format!("MCP resources: {}", list(allowed))
                }
                CheckMeaning::Custom { source } => format!("custom check: {source}"),
            };
            let _ = writeln!(o, "  {line}");
        }
        let _ = writeln!(o, "  datalog:");
        for line in b.source.lines() {
            let _ = writeln!(o, "    {line}");
        }
    }
    o
}

fn list(v: &[String]) -> String {
    v.iter()
        .map(|s| format!("{s:?}"))
        .collect::<Vec<_>>()
        .join(", ")
}
