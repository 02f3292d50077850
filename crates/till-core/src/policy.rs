//! Authorizer policies: `policies/*.datalog`, parsed once at start.

use std::path::{Path, PathBuf};
use std::time::Duration;

use biscuit_auth::{AuthorizerBuilder, AuthorizerLimits};
use thiserror::Error;

/// The policy shipped in `policies/default.datalog`, embedded so `till up`
/// works from any directory.
pub const DEFAULT_POLICY: &str = include_str!("../../../policies/default.datalog");

/// Most one policy file may hold: policies are a few rules, and larger
/// files are more likely a wrong path than a policy.
pub const MAX_POLICY_FILE_BYTES: u64 = 1024 * 1024;

/// Why the policies could not be loaded.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum PolicyError {
    #[error("cannot read policies from {path}: {err}")]
    Io { path: PathBuf, err: std::io::Error },
    #[error("cannot read policy file {path}: {err}")]
    Read {
        path: PathBuf,
        err: crate::files::ReadError,
    },
    #[error("policy file {0} is not UTF-8 text")]
    NotText(PathBuf),
    #[error("{path}: invalid Datalog: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{0}: no *.datalog files; an empty policy set would deny everything")]
    Empty(PathBuf),
}

/// Datalog run limits used for every authorization.
///
/// The time limit is a last resort, set far above any honest token's cost:
/// it is wall-clock time, so on an overloaded machine a tight limit fires on
/// valid tokens (biscuit's 1 ms default does on a loaded 2-core machine).
/// What actually bounds the work a token can cause is checked before
/// Datalog runs: token size, block count and the shape of attenuation
/// blocks ([`crate::token::shape`]), plus the fact and iteration limits.
pub fn run_limits() -> AuthorizerLimits {
    AuthorizerLimits {
        max_facts: 1000,
        max_iterations: 100,
        max_time: Duration::from_secs(1),
    }
}

/// Parsed policies, ready to be cloned into each authorization.
#[derive(Clone, Debug)]
pub struct Policies {
    builder: AuthorizerBuilder,
    /// Where they came from, for logs.
    pub source: String,
    /// The policies never mention `time` or `uses`: their outcome depends
    /// only on the request's service, method, path and model.
    pub(crate) request_only: bool,
    /// The policies read the `model` fact: their outcome may change once a
    /// request body names a model.
    pub(crate) mentions_model: bool,
    /// Their Datalog, as parsed: which facts they read ([`Policies::reads`]).
    code: String,
}

impl Policies {
    /// The embedded default policy.
    pub fn default_policy() -> Self {
        Self::from_sources(&[("default.datalog".into(), DEFAULT_POLICY.into())])
            .expect("embedded default policy parses (covered by tests)")
    }

    /// Parses `(name, source)` pairs.
    pub fn from_sources(sources: &[(PathBuf, String)]) -> Result<Self, PolicyError> {
        let mut b = AuthorizerBuilder::new().set_limits(run_limits());
        for (path, code) in sources {
            b = b.code(code).map_err(|e| PolicyError::Parse {
                path: path.clone(),
                message: describe(&e),
            })?;
        }
        let code = b.dump_code();
        let request_only = !code.contains("time(") && !code.contains("uses(");
        let mentions_model = code.contains("model(");
        Ok(Policies {
            request_only,
            mentions_model,
            code,
            builder: b,
            source: sources
                .iter()
                .map(|(p, _)| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
        })
    }

    /// Loads every `*.datalog` file of `dir`, in name order.
    pub fn load_dir(dir: &Path) -> Result<Self, PolicyError> {
        let io = |err| PolicyError::Io {
            path: dir.to_path_buf(),
            err,
        };
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(io)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "datalog"))
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(PolicyError::Empty(dir.to_path_buf()));
        }
        let mut sources = Vec::new();
        for f in files {
            // Bounded, and never waiting on a FIFO: a reload reads these too,
            // and must not hang or run out of memory on a stray file.
            let bytes = crate::files::read_regular(&f, MAX_POLICY_FILE_BYTES).map_err(|err| {
                PolicyError::Read {
                    path: f.clone(),
                    err,
                }
            })?;
            let code = String::from_utf8(bytes).map_err(|_| PolicyError::NotText(f.clone()))?;
            sources.push((f, code));
        }
        Self::from_sources(&sources)
    }

    /// Loads `dir` when it exists; falls back to the embedded default when it
    /// does not and `dir` is the default location.
    pub fn load_or_default(dir: &Path, is_default_location: bool) -> Result<Self, PolicyError> {
        if !dir.exists() && is_default_location {
            return Ok(Self::default_policy());
        }
        Self::load_dir(dir)
    }

    /// Whether a policy reads the fact `name` ([`crate::unseen::code_reads`]).
    pub fn reads(&self, name: &str) -> bool {
        crate::unseen::code_reads(&self.code, name)
    }

    /// The policies as Datalog, comments and layout left out: two sets
    /// with the same text decide every request alike (a reload compares
    /// them to tell the operator that edited files need a restart).
    pub fn code(&self) -> String {
        self.builder.dump_code()
    }

    pub(crate) fn builder(&self) -> AuthorizerBuilder {
        self.builder.clone()
    }
}

fn describe(e: &biscuit_auth::error::Token) -> String {
    match e {
        biscuit_auth::error::Token::Language(l) => l.to_string(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_policy_parses() {
        let p = Policies::default_policy();
        assert!(p.builder.dump_code().contains("allow if"));
    }

    #[cfg(unix)]
    #[test]
    fn a_fifo_or_an_oversized_policy_file_is_refused_not_waited_on() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.datalog"), DEFAULT_POLICY).unwrap();
        let fifo = dir.path().join("b.datalog");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success());
        // Reading the FIFO would block this test for ever.
        let err = Policies::load_dir(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("b.datalog") && err.contains("not a regular file"),
            "{err}"
        );

        std::fs::remove_file(&fifo).unwrap();
        let big = "// padding\n".repeat((MAX_POLICY_FILE_BYTES / 10) as usize);
        std::fs::write(dir.path().join("c.datalog"), big).unwrap();
        let err = Policies::load_dir(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("c.datalog") && err.contains("larger than"),
            "{err}"
        );
    }

    #[test]
    fn bad_policy_names_the_file() {
        let err = Policies::from_sources(&[("x.datalog".into(), "allow if (".into())]).unwrap_err();
        assert!(
            err.to_string().starts_with("x.datalog: invalid Datalog"),
            "{err}"
        );
    }
}
