//! Request facts a verifier cannot see, and whether a token or the
//! policies read them.
//!
//! A verifier that does not read a request's body supplies no fact the body
//! would give: a gateway's forward-auth check carries no body at all, and
//! `till-tower` reads JSON bodies only and no MCP message. An allow-list on
//! such a fact then fails (denied), but a deny-list (`reject if
//! tool("delete_everything")`, a `deny if model("gpt-4")` policy) never
//! fires and lets every value through. Such a verifier must refuse a token
//! whose decision reads a fact it cannot supply: deny when unsure.

use crate::policy::Policies;
use crate::token::vocab::names;
use crate::verify::VerifiedToken;

/// The facts of one MCP message: only a verifier that reads the message
/// (the proxy, for an `api = "mcp"` upstream) supplies them.
pub const MCP_FACTS: [&str; 4] = [names::MCP, names::TOOL, names::PROMPT, names::RESOURCE];

/// Whether Datalog `code` reads the fact `name`: `name(` with no identifier
/// character just before it (`footool(` is another fact). Strings are not
/// skipped, so a string holding `tool(` counts too: that can only refuse.
pub fn code_reads(code: &str, name: &str) -> bool {
    // Forward-auth asks this on every check: no allocation.
    code.match_indices(name).any(|(i, _)| {
        code[i + name.len()..].starts_with('(')
            && code[..i]
                .chars()
                .next_back()
                .is_none_or(|c| !(c.is_alphanumeric() || c == '_'))
    })
}

/// The first of `facts` that a block of `token` or one of `policies` reads.
pub fn first_read<'a>(
    token: &VerifiedToken,
    policies: &Policies,
    facts: &[&'a str],
) -> Option<&'a str> {
    facts
        .iter()
        .copied()
        .find(|f| policies.reads(f) || token.view.blocks.iter().any(|b| code_reads(&b.source, f)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fact_is_read_only_under_its_own_name() {
        assert!(code_reads(r#"reject if tool("x")"#, "tool"));
        assert!(code_reads(r#"check if mcp($m), $m != "tools/call""#, "mcp"));
        assert!(code_reads("check if a(1) or tool($t)", "tool"));
        assert!(!code_reads(r#"reject if footool("x")"#, "tool"));
        assert!(!code_reads(r#"check if my_tool("x")"#, "tool"));
        assert!(!code_reads("check if tools($t)", "tool"));
        assert!(!code_reads(r#"right("openai", "*", "/")"#, "tool"));
    }

    #[test]
    fn policies_say_which_facts_they_read() {
        let p = Policies::from_sources(&[(
            "p.datalog".into(),
            r#"deny if tool("delete_everything"); allow if true;"#.into(),
        )])
        .unwrap();
        assert!(p.reads("tool"));
        assert!(!p.reads("model"));
        assert!(!Policies::default_policy().reads("tool"));
    }
}
