//! `till verify`: offline verification with the root public key.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::SystemTime;

use anyhow::{Context, bail};
use clap::Args;

use super::EXIT_DENIED;
use super::input::TokenInput;
use crate::policy::Policies;
use crate::token::keyset::{KeySet, KeysDocument, PublicKeySet, RootKeys};
use crate::token::{self, RequestFacts, TokenError, vocab};
use crate::verify::{Verifier, first_revoked, revoked_denial};

#[derive(Args, Debug)]
pub struct VerifyArgs {
    #[command(flatten)]
    pub input: TokenInput,
    /// Root public key to trust (repeatable): "ID=ed25519/<hex>" as `till pubkey --all` prints,
    /// or a bare "ed25519/<hex>" that checks any key id (default: the key set of TILL_HOME).
    #[arg(long = "public-key", value_name = "KEY", env = "TILL_PUBLIC_KEY")]
    pub public_keys: Vec<String>,
    /// Key set document saved from the proxy's GET /.well-known/till-keys (or `till pubkey
    /// --json`): follow a rotation. It must be signed by a key you trust (--public-key or
    /// TILL_HOME); its age is checked against --max-feed-age.
    #[arg(long, value_name = "FILE")]
    pub keys: Option<PathBuf>,
    /// Service of the request to check, e.g. openai.
    #[arg(long)]
    pub service: String,
    /// HTTP method of the request, upper case (the proxy refuses lower-case letters).
    #[arg(long, default_value = "GET")]
    pub method: String,
    /// Path of the request inside the upstream, e.g. /v1/chat/completions.
    #[arg(long, default_value = "/")]
    pub path: String,
    /// Model named by the request body, if any.
    #[arg(long)]
    pub model: Option<String>,
    /// JSON-RPC method of an MCP message (upstreams with api = "mcp"), e.g. tools/list;
    /// "" for a request that carries none (GET, DELETE). Implied by --tool.
    #[arg(long, value_name = "METHOD")]
    pub mcp_method: Option<String>,
    /// MCP tool called: checks a tools/call message naming it.
    #[arg(long, value_name = "NAME", conflicts_with_all = ["mcp_method", "prompt", "resource"])]
    pub tool: Option<String>,
    /// MCP prompt got: checks a prompts/get message naming it.
    #[arg(long, value_name = "NAME", conflicts_with_all = ["mcp_method", "resource"])]
    pub prompt: Option<String>,
    /// MCP resource read: checks a resources/read message naming its URI.
    #[arg(long, value_name = "URI", conflicts_with = "mcp_method")]
    pub resource: Option<String>,
    /// Directory of *.datalog policies (default: ./policies, or the built-in default policy).
    #[arg(long, env = "TILL_POLICIES")]
    pub policies: Option<PathBuf>,
    /// Signed revocation feed saved from the proxy's GET /revocations. Its
    /// signature (root key) and age (--max-feed-age) are checked; a file that
    /// is not such a feed (empty, a plain list) is refused.
    #[arg(long, value_name = "FILE")]
    pub revocations: Option<PathBuf>,
    /// Oldest signed revocation feed or key set document accepted, e.g. 10m, 1h [default: 1h].
    /// Applies to --revocations and --keys.
    #[arg(long, value_name = "DURATION")]
    pub max_feed_age: Option<String>,
    /// Plain list of revoked ids, one hex revocation id per line (`#` starts a
    /// comment). Unsigned and undated: nothing shows it is genuine or
    /// current, so use it only for a list you keep yourself.
    #[arg(long, value_name = "FILE")]
    pub revoked_ids: Option<PathBuf>,
    /// Evaluate as if block K had been used N times, this request included (repeatable).
    /// Blocks not named count 1.
    #[arg(long = "uses", value_name = "K=N")]
    pub uses: Vec<String>,
    /// Evaluate as if block K's rate window of DURATION held N requests, this one included
    /// (repeatable), e.g. --rate-used 0:1m=10. Windows not named hold 1 (this request alone).
    #[arg(long = "rate-used", value_name = "K:DURATION=N")]
    pub rate_used: Vec<String>,
    /// Evaluate as if block K had N requests in flight, this one included (repeatable).
    /// Caps not named hold 1.
    #[arg(long = "in-flight", value_name = "K=N")]
    pub in_flight: Vec<String>,
    /// Evaluate at this instant (RFC 3339) instead of now.
    #[arg(long, value_name = "TIME")]
    pub at: Option<String>,
    /// Print {"allowed":true} or {"allowed":false,"reason":"<reason>"} instead of text (same
    /// exit codes).
    #[arg(long)]
    pub json: bool,
}

/// Prints the verdict; returns the exit code that goes with it.
fn verdict(json: bool, denied: Option<String>) -> ExitCode {
    let code = match denied {
        None => ExitCode::SUCCESS,
        Some(_) => ExitCode::from(EXIT_DENIED),
    };
    match (json, denied) {
        (false, None) => outln!("allowed"),
        (false, Some(r)) => outln!("denied: {r}"),
        (true, None) => outln!("{}", serde_json::json!({"allowed": true})),
        (true, Some(r)) => outln!("{}", serde_json::json!({"allowed": false, "reason": r})),
    }
    code
}

fn parse_uses(specs: &[String], blocks: usize) -> anyhow::Result<Vec<u64>> {
    let mut uses = vec![1u64; blocks];
    for s in specs {
        let (k, n) = s
            .split_once('=')
            .with_context(|| format!("--uses {s:?}: expected K=N, e.g. --uses 0=10"))?;
        let k: usize = k
            .trim()
            .parse()
            .with_context(|| format!("--uses {s:?}: K must be a block index"))?;
        let n: u64 = n
            .trim()
            .parse()
            .with_context(|| format!("--uses {s:?}: N must be a whole number"))?;
        if k >= blocks {
            bail!(
                "--uses {s:?}: the token has only {blocks} blocks (0..{})",
                blocks - 1
            );
        }
        uses[k] = n;
    }
    Ok(uses)
}

/// `--rate-used K:DURATION=N` and `--in-flight K=N` over the token's own
/// windows and caps (this request alone where not named).
fn parse_windows(
    token: &crate::verify::VerifiedToken,
    rate_used: &[String],
    in_flight: &[String],
) -> anyhow::Result<crate::verify::WindowCounts> {
    let mut w = crate::verify::WindowCounts::alone(token);
    for s in rate_used {
        let bad = || format!("--rate-used {s:?}: expected K:DURATION=N, e.g. --rate-used 0:1m=10");
        let (win, n) = s.split_once('=').with_context(bad)?;
        let (k, d) = win.split_once(':').with_context(bad)?;
        let k: usize = k.trim().parse().with_context(bad)?;
        let secs = token::parse_duration(d).with_context(bad)?.as_secs();
        let n: u64 = n.trim().parse().with_context(bad)?;
        let slot = w
            .rates
            .iter_mut()
            .find(|r| r.0 == k && r.1 == secs)
            .with_context(|| {
                format!("--rate-used {s:?}: block {k} of this token has no {d} window (see `till inspect`)")
            })?;
        slot.2 = n;
    }
    for s in in_flight {
        let bad = || format!("--in-flight {s:?}: expected K=N, e.g. --in-flight 0=3");
        let (k, n) = s.split_once('=').with_context(bad)?;
        let k: usize = k.trim().parse().with_context(bad)?;
        let n: u64 = n.trim().parse().with_context(bad)?;
        let slot = w.in_flight.iter_mut().find(|c| c.0 == k).with_context(|| {
            format!("--in-flight {s:?}: block {k} of this token has no concurrency cap (see `till inspect`)")
        })?;
        slot.1 = n;
    }
    Ok(w)
}

/// Largest feed, key set or id list read (as `till-tower` accepts).
const MAX_DOCUMENT_BYTES: u64 = 32 << 20;

/// Reads a document given by the operator: a regular file within the bound,
/// so a symlink to `/dev/zero` or a FIFO is refused instead of read without
/// end.
fn read_document(path: &Path, what: &str) -> anyhow::Result<String> {
    let bytes = till_core::files::read_regular(path, MAX_DOCUMENT_BYTES)
        .with_context(|| format!("cannot read {what} {}", path.display()))?;
    String::from_utf8(bytes).with_context(|| format!("{what} {} is not UTF-8 text", path.display()))
}

/// Reads a signed feed; nothing else is accepted here, so a feed cannot be
/// swapped for an empty file or a list that leaves a token out.
fn read_feed(
    path: &Path,
    keys: &mut PublicKeySet,
    max_age: std::time::Duration,
) -> anyhow::Result<HashSet<String>> {
    let text = read_document(path, "revocation feed")?;
    if !text.trim_start().starts_with('{') {
        let what = if text.trim().is_empty() {
            "is empty"
        } else {
            "is not a signed revocation feed"
        };
        bail!(
            "{} {what}: --revocations takes only the JSON feed saved from the proxy's GET /revocations \
             (signature and age are checked); for a plain list of ids you keep yourself, use --revoked-ids FILE",
            path.display()
        );
    }
    let (feed, followed) =
        crate::feed::Feed::verify_with(&text, keys, crate::store::now_unix(), max_age.as_secs())
            .with_context(|| format!("{}", path.display()))?;
    // The feed carries the key set: a rotation it announces applies to the
    // token too.
    *keys = followed;
    Ok(feed.ids.into_iter().collect())
}

/// Reads a plain list, one hex id per line.
fn read_ids(path: &Path) -> anyhow::Result<HashSet<String>> {
    let text = read_document(path, "revocation list")?;
    if text.trim_start().starts_with('{') {
        bail!(
            "{} looks like a signed revocation feed: pass it with --revocations so its signature and age are checked",
            path.display()
        );
    }
    let mut set = HashSet::new();
    for (i, line) in text.lines().enumerate() {
        let l = line.trim();
        if l.is_empty() || l.starts_with('#') {
            continue;
        }
        if hex::decode(l).is_err() {
            bail!(
                "{}:{}: {l:?} is not a hex revocation id",
                path.display(),
                i + 1
            );
        }
        set.insert(l.to_ascii_lowercase());
    }
    Ok(set)
}

pub fn run(home: &Path, a: VerifyArgs) -> anyhow::Result<ExitCode> {
    let mut root = PublicKeySet::default();
    for k in &a.public_keys {
        root.add_flag(k)?;
    }
    if root.is_empty() {
        root = KeySet::load(home)
            .context("no --public-key given and no root key in TILL_HOME")?
            .public();
    }
    let dir = a.policies.as_deref().unwrap_or(Path::new("policies"));
    crate::state_dir::check_policies(dir)?;
    let policies = match &a.policies {
        Some(dir) => Policies::load_dir(dir)?,
        None => Policies::load_or_default(Path::new("policies"), true)?,
    };
    let mut revoked = HashSet::new();
    if a.revocations.is_none() && a.keys.is_none() && a.max_feed_age.is_some() {
        bail!(
            "--max-feed-age needs a signed feed given with --revocations FILE or a key set given with --keys FILE (a --revoked-ids list has no date to check)"
        );
    }
    let age = token::parse_duration(a.max_feed_age.as_deref().unwrap_or("1h"))
        .context("--max-feed-age")?;
    if let Some(f) = &a.keys {
        let text = read_document(f, "key set")?;
        root = KeysDocument::follow_text(&text, &root, crate::store::now_unix(), age.as_secs())
            .with_context(|| format!("{}", f.display()))?;
    }
    if let Some(f) = &a.revocations {
        revoked.extend(read_feed(f, &mut root, age)?);
    }
    if let Some(f) = &a.revoked_ids {
        revoked.extend(read_ids(f)?);
    }
    vocab::validate_service(&a.service)?;
    // The proxy refuses such a request as malformed (400), as it does a
    // path it cannot normalise, which is an error here too.
    if let Some(why) = crate::request::lower_case_method(&a.method) {
        bail!("--method {:?}: {why}", a.method);
    }
    let method = vocab::normalize_method(&a.method)?;
    let path = crate::path::normalize(&a.path).with_context(|| format!("--path {:?}", a.path))?;
    let time = match &a.at {
        Some(t) => token::parse_time(t)?,
        None => SystemTime::now(),
    };
    let text = a.input.read()?;
    let verifier = Verifier::with_keys(RootKeys::new(root), policies);
    let verified = match verifier.verify_token(&text) {
        Ok(v) => v,
        // The token is readable but not acceptable: a denial, not bad input.
        Err(
            e @ (TokenError::WrongRootKey
            | TokenError::RetiredRootKey { .. }
            | TokenError::UnknownRootKey(_)
            | TokenError::Shape(_)
            | TokenError::UnsupportedAlgorithm(_)),
        ) => {
            return Ok(verdict(a.json, Some(e.to_string())));
        }
        Err(e) => return Err(e.into()),
    };
    if let Some(b) = first_revoked(&verified.ids, &revoked) {
        return Ok(verdict(
            a.json,
            Some(revoked_denial(&verified.view, b).to_string()),
        ));
    }
    let uses = parse_uses(&a.uses, verified.ids.len())?;
    let windows = parse_windows(&verified, &a.rate_used, &a.in_flight)?;
    let req = RequestFacts {
        service: a.service,
        method,
        path,
        model: a.model,
        mcp: {
            use crate::token::vocab::{PROMPTS_GET, RESOURCES_READ, TOOLS_CALL};
            match (a.tool, a.prompt, a.resource, a.mcp_method) {
                (Some(t), _, _, _) => Some(till_mcp(TOOLS_CALL, Some(t))),
                (_, Some(p), _, _) => Some(till_mcp(PROMPTS_GET, Some(p))),
                (_, _, Some(r), _) => Some(till_mcp(RESOURCES_READ, Some(r))),
                (_, _, _, Some(m)) => Some(till_mcp(&m, None)),
                _ => None,
            }
        },
        time,
    };
    match verifier.authorize_windowed(&verified, &req, &uses, &windows) {
        Ok(()) => Ok(verdict(a.json, None)),
        Err(d) => Ok(verdict(a.json, Some(d.to_string()))),
    }
}

fn till_mcp(method: &str, name: Option<String>) -> crate::token::McpMessage {
    crate::token::McpMessage {
        method: method.to_string(),
        name,
    }
}
