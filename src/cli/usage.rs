//! `till usage`: use counts per token family, from the running proxy, drawn
//! as a tree (every block under its own parent). The tree and the remaining
//! uses are worked out here from the admin API's flat block list.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::process::ExitCode;

use clap::Args;
use serde_json::Value;

use super::revoke::{AdminArgs, looks_like_id};

/// Ids are shown cut to this many hex digits, longer where two would look
/// the same; any command takes such a prefix back.
const ID_DIGITS: usize = 12;

#[derive(Args, Debug)]
pub struct UsageArgs {
    /// A token (text, a file holding it, or "-" for stdin), a revocation id, or a unique id
    /// prefix as shown in the table: show that block's family. Default: every family.
    #[arg(value_name = "TOKEN|ID")]
    pub target: Option<String>,
    /// Print JSON instead of a table (blocks in tree order, with their depth; "remaining"
    /// accounts for the ancestors' limits as in the table).
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub admin: AdminArgs,
}

fn time(v: &Value) -> String {
    v.as_u64()
        .map(crate::token::format_unix)
        .unwrap_or_else(|| "-".into())
}

fn num(v: &Value) -> String {
    v.as_u64()
        .map(|n| n.to_string())
        .unwrap_or_else(|| "-".into())
}

/// Orders a family's blocks depth first, each under its own parent, and
/// sets on each its tree `depth` and its `remaining`: the fewest uses left
/// on the block or any ancestor, since every use counts on all of them (a
/// child of a used-up parent has 0 left whatever its own limit).
fn tree(blocks: &[Value]) -> Vec<Value> {
    let ids: HashSet<&str> = blocks.iter().filter_map(|b| b["id"].as_str()).collect();
    let mut children: HashMap<&str, Vec<&Value>> = HashMap::new();
    let mut roots = Vec::new();
    for b in blocks {
        match b["parent"].as_str() {
            Some(p) if ids.contains(p) && b["id"].as_str() != Some(p) => {
                children.entry(p).or_default().push(b)
            }
            _ => roots.push(b),
        }
    }
    let key = |b: &&Value| (b["index"].as_u64(), b["id"].as_str().map(str::to_string));
    roots.sort_by_key(key);
    for c in children.values_mut() {
        c.sort_by_key(key);
    }
    let mut out = Vec::with_capacity(blocks.len());
    let mut seen = HashSet::new();
    // (block, depth, fewest uses left above it)
    let mut stack: Vec<(&Value, usize, Option<u64>)> =
        roots.iter().rev().map(|b| (*b, 0, None)).collect();
    while let Some((b, depth, above)) = stack.pop() {
        let id = b["id"].as_str().unwrap_or("");
        if !seen.insert(id) {
            continue;
        }
        let own = b["remaining"].as_u64();
        let left = match (own, above) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let mut row = b.clone();
        row["depth"] = depth.into();
        row["remaining"] = left.into();
        out.push(row);
        for c in children.get(id).into_iter().flatten().rev() {
            stack.push((c, depth + 1, left));
        }
    }
    out
}

/// The shortest prefix length, at least [`ID_DIGITS`], that tells every id
/// apart.
fn prefix_len(ids: &[&str]) -> usize {
    let mut sorted: Vec<&str> = ids.to_vec();
    sorted.sort();
    sorted.dedup();
    let common = sorted
        .windows(2)
        .map(|w| {
            w[0].bytes()
                .zip(w[1].bytes())
                .take_while(|(a, b)| a == b)
                .count()
        })
        .max()
        .unwrap_or(0);
    (common + 1).max(ID_DIGITS)
}

pub fn run(home: &Path, a: UsageArgs) -> anyhow::Result<ExitCode> {
    let mut families: Vec<Value> = match &a.target {
        None => a.admin.call(home, "GET", "/admin/usage", None)?["families"]
            .as_array()
            .cloned()
            .unwrap_or_default(),
        Some(t) => {
            let id = if looks_like_id(t) && !Path::new(t).is_file() {
                a.admin.resolve_id(home, t)?
            } else {
                let t = super::revoke::read_token_arg(t)?;
                // The last block of a token identifies its family and itself.
                crate::token::RawToken::parse(t.trim())?
                    .revocation_ids()
                    .pop()
                    .unwrap_or_default()
            };
            vec![
                a.admin
                    .call(home, "GET", &format!("/admin/usage/{id}"), None)?,
            ]
        }
    };
    for f in &mut families {
        let blocks = tree(f["blocks"].as_array().map(Vec::as_slice).unwrap_or(&[]));
        f["blocks"] = Value::Array(blocks);
    }
    if a.json {
        outln!("{}", serde_json::to_string_pretty(&families)?);
        return Ok(ExitCode::SUCCESS);
    }
    let ids: Vec<&str> = families
        .iter()
        .flat_map(|f| f["blocks"].as_array().into_iter().flatten())
        .filter_map(|b| b["id"].as_str())
        .collect();
    let digits = prefix_len(&ids);
    let rows: Vec<(String, &Value)> = families
        .iter()
        .flat_map(|f| f["blocks"].as_array().into_iter().flatten())
        .map(|b| {
            let id = b["id"].as_str().unwrap_or("");
            let depth = b["depth"].as_u64().unwrap_or(0) as usize;
            let name = format!("{}{}", "  ".repeat(depth), id.get(..digits).unwrap_or(id));
            (name, b)
        })
        .collect();
    let width = rows
        .iter()
        .map(|(n, _)| n.len())
        .max()
        .unwrap_or(0)
        .max("block".len());
    // Rate windows and the concurrency cap, e.g. `10/1m 1000/1d c3`.
    let windows = |b: &serde_json::Value| {
        let mut w: Vec<String> = b["rates"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|r| r.as_str().map(str::to_string))
            .collect();
        if let Some(c) = b["concurrency"].as_u64() {
            w.push(format!("c{c}"));
        }
        if w.is_empty() {
            "-".to_string()
        } else {
            w.join(" ")
        }
    };
    let wwidth = rows
        .iter()
        .map(|(_, b)| windows(b).len())
        .max()
        .unwrap_or(0)
        .max("windows".len());
    let mut o = format!(
        "{:<width$} {:>8} {:>8} {:>9}  {:<wwidth$}  {:<20}  {:<20}  label\n",
        "block", "uses", "limit", "remaining", "windows", "expires", "last use"
    );
    for (name, b) in rows {
        let revoked = if b["revoked"].as_bool() == Some(true) {
            " [revoked]"
        } else {
            ""
        };
        o.push_str(&format!(
            "{name:<width$} {:>8} {:>8} {:>9}  {:<wwidth$}  {:<20}  {:<20}  {}{revoked}\n",
            num(&b["uses"]),
            num(&b["limit"]),
            num(&b["remaining"]),
            windows(b),
            time(&b["expires"]),
            time(&b["last_use"]),
            b["label"]
                .as_str()
                .map(|l| format!("{l:?}"))
                .unwrap_or_default(),
        ));
    }
    out!("{o}");
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn grandchildren_sit_under_their_own_parent_and_inherit_what_is_left() {
        let blocks = vec![
            json!({"id": "r", "index": 0, "parent": null, "remaining": 0}),
            json!({"id": "a", "index": 1, "parent": "r", "remaining": 3}),
            json!({"id": "b", "index": 1, "parent": "r", "remaining": 2}),
            json!({"id": "a1", "index": 2, "parent": "a", "remaining": null}),
            json!({"id": "b1", "index": 2, "parent": "b", "remaining": 1}),
        ];
        let t = tree(&blocks);
        let order: Vec<(&str, u64, Option<u64>)> = t
            .iter()
            .map(|b| {
                (
                    b["id"].as_str().unwrap(),
                    b["depth"].as_u64().unwrap(),
                    b["remaining"].as_u64(),
                )
            })
            .collect();
        assert_eq!(
            order,
            vec![
                ("r", 0, Some(0)),
                ("a", 1, Some(0)),
                ("a1", 2, Some(0)),
                ("b", 1, Some(0)),
                ("b1", 2, Some(0)),
            ]
        );
    }

    #[test]
    fn prefixes_grow_until_ids_differ() {
        let a = "0f17ec1a7a9a00aa";
        let b = "0f17ec1a7a9a00ab";
        assert_eq!(prefix_len(&[a, b]), 16);
        assert_eq!(prefix_len(&["0000", "1111"]), ID_DIGITS);
        assert_eq!(prefix_len(&[a, a]), ID_DIGITS);
    }
}
