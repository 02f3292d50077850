//! Where a token comes from: `--token`, `$TILL_TOKEN`, a file, or stdin.

use std::io::{IsTerminal, Read};
use std::path::{Path, PathBuf};

use anyhow::{Context, anyhow, bail};
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
            (None, Some(f)) if f.as_os_str() != "-" => read_file(f)?,
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

/// Reads a token file: a regular file within twice the token bound (a
/// symlink to `/dev/zero` or a FIFO is refused, not read without end).
fn read_file(f: &Path) -> anyhow::Result<String> {
    let max = crate::token::MAX_TOKEN_LEN as u64 * 2;
    match till_core::files::read_regular(f, max) {
        Ok(bytes) => String::from_utf8(bytes)
            .map_err(|_| anyhow!("token file {} is not UTF-8 text", f.display())),
        // The message would quote the argument: a token given where the
        // file name goes would land in the terminal's scrollback and logs.
        Err(till_core::files::ReadError::Io(_)) if looks_like_a_token(f) => bail!(
            "the argument is not a file name but looks like a token itself ({} characters, not shown): \
             pass the token with --token, TILL_TOKEN or on stdin, or name a file holding it",
            f.as_os_str().len()
        ),
        Err(e) => Err(anyhow!("cannot read token file {}: {e}", f.display())),
    }
}

/// Whether a file name is rather a token's text: long, and only the
/// characters of URL-safe base64, which Biscuit tokens are written in.
fn looks_like_a_token(f: &Path) -> bool {
    f.to_str().is_some_and(|s| {
        s.len() >= 64
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'='))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_given_as_the_file_is_recognised_and_a_path_is_not() {
        let token =
            "EscBCl0KBm9wZW5haQoEUE9TVAoJL3YxL2NoYXQvCgF0GAMiEwoRCAQSAxiACBIDGIEIEgMYgggyKAom==";
        assert!(looks_like_a_token(Path::new(token)));
        assert!(!looks_like_a_token(Path::new("agent.token")));
        assert!(!looks_like_a_token(Path::new(
            "/home/someone/projects/agents/tokens/a-rather-long-file-name-for-a-token"
        )));
    }
}
