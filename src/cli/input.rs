//! Where a token comes from: `--token`, `$TILL_TOKEN`, a file, or stdin.

use std::io::{IsTerminal, Read};
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Args;

#[derive(Args, Debug, Clone)]
pub struct TokenInput {
    /// The token itself (also $TILL_TOKEN). Without it, the token is read from FILE or stdin.
    #[arg(long, env = "TILL_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// File holding the token ("-" for stdin).
    #[arg(value_name = "FILE")]
    pub file: Option<PathBuf>,
}

impl TokenInput {
    pub fn read(&self) -> anyhow::Result<String> {
        let text = match (&self.token, &self.file) {
            (Some(_), Some(f)) if f.as_os_str() != "-" => {
                bail!("both --token (or TILL_TOKEN) and a token file were given; pass only one")
            }
            (Some(t), _) => t.clone(),
            (None, Some(f)) if f.as_os_str() != "-" => std::fs::read_to_string(f)
                .with_context(|| format!("cannot read token file {}", f.display()))?,
            _ => {
                let stdin = std::io::stdin();
                if stdin.is_terminal() {
                    bail!(
                        "no token given: pass --token, set TILL_TOKEN, name a file, or pipe one on stdin"
                    );
                }
                let mut s = String::new();
                stdin
                    .lock()
                    .take(crate::token::MAX_TOKEN_LEN as u64 * 2)
                    .read_to_string(&mut s)
                    .context("cannot read the token from stdin")?;
                s
            }
        };
        let t = text.trim().to_string();
        if t.is_empty() {
            bail!("the token is empty");
        }
        Ok(t)
    }
}
