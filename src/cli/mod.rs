//! The `till` command: argument parsing and one module per subcommand.
//! Each subcommand is a thin layer over the library.

/// `print!` to stdout, ending the command quietly (exit 0) when the reader
/// has gone away (`till usage | head -1`) instead of panicking as `print!`
/// does on a closed pipe.
macro_rules! out {
    ($($t:tt)*) => {
        $crate::cli::write_stdout(format_args!($($t)*))
    };
}

/// `println!` with [`out!`]'s handling of a closed pipe.
macro_rules! outln {
    ($($t:tt)*) => {
        $crate::cli::write_stdout(format_args!("{}\n", format_args!($($t)*)))
    };
}

mod attenuate;
mod input;
mod inspect;
mod issue;
mod keys;
mod open_files;
mod reload;
mod revoke;
mod serve;
mod store;
mod usage;
mod verify;
mod warn;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

/// Exit code for a denied verification.
pub const EXIT_DENIED: u8 = 1;
/// Exit code for usage and configuration errors.
pub const EXIT_USAGE: u8 = 2;

#[derive(Parser, Debug)]
#[command(
    name = "till",
    version,
    about = "Scoped, activation-limited API keys for AI agents",
    long_about = "Till replaces static API keys with Biscuit tokens that carry their own scope \
(service, methods, path prefixes, models), expiry and use limits. Agents narrow their \
token offline before handing it to a sub-agent; the `till serve` proxy verifies tokens, \
counts every use durably and injects the real credential.\n\n\
Quick start:\n  till up                                  # start the proxy with defaults\n  \
till issue --service openai --max-uses 100 --ttl 24h --label my-agent\n  \
till attenuate --max-uses 5 --ttl 10m < parent.token > child.token\n  \
till inspect child.token\n\n\
Exit codes: 0 success/allowed, 1 denied, 2 usage or configuration error.",
    after_help = "Flags shown with [env: NAME] can also be set through that environment variable.\nRun `till <command> --help` for each command's flags and examples."
)]
pub struct Cli {
    /// State directory holding the root key, admin token, config and counters.
    #[arg(long, global = true, env = "TILL_HOME", default_value = ".till")]
    pub home: PathBuf,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Create the root key (Ed25519, mode 0600) under TILL_HOME and print its public key;
    /// with --rotate, add a new active key.
    #[command(after_help = "Examples:\n  \
TILL_HOME=/srv/till till keygen             # prints ed25519/<hex>\n  \
TILL_HOME=/srv/till till keygen --rotate    # new active key; the old one keeps verifying\n  \
TILL_HOME=/srv/till till reload             # the running proxy reads the new key set (or SIGHUP)\n  \
till key retire 0 && till reload            # later: tokens of key 0 are refused")]
    Keygen(keys::KeygenArgs),
    /// Print the active root public key ("ed25519/<hex>"), or the whole key set.
    #[command(after_help = "Examples:\n  \
till verify --public-key \"$(till pubkey)\" --service openai agent.token\n  \
till pubkey --all       # 0=ed25519/<hex> and 1=ed25519/<hex>: each key that still verifies\n  \
till pubkey --json      # the signed key set, as served at /.well-known/till-keys")]
    Pubkey(keys::PubkeyArgs),
    /// List or retire root keys (rotation: see `till keygen --rotate`).
    #[command(after_help = "Examples:\n  \
till key list\n  \
till key retire 0                 # tokens issued under key 0 are refused (401) from now on\n  \
till key retire 0 --after 7d      # keep verifying them for a week first\n  \
till reload                       # the running proxy picks the change up (or SIGHUP, or restart)")]
    Key(keys::KeyArgs),
    /// Mint a root token (operator; needs the root key).
    #[command(after_help = "Examples:\n  \
till issue --service openai --max-uses 100 --ttl 24h --label my-agent > agent.token\n  \
till issue --service openai --method POST --path /v1/chat/ --model gpt-4o-mini --max-uses 10 --ttl 1h\n  \
till issue --admin --ttl 8h --label ops > ops.token\n\n\
Warnings (stderr, exit 0; exit 2 with --strict): a token that can never succeed, or one with\n\
neither --max-uses nor --ttl/--expires.")]
    Issue(issue::IssueArgs),
    /// Narrow a token offline: no key, no server. Reads the parent, prints the child.
    #[command(after_help = "Examples:\n  \
till attenuate --max-uses 5 --ttl 10m < parent.token > child.token\n  \
till attenuate --path /v1/chat/completions --model gpt-4o-mini parent.token > child.token\n\n\
Warnings (stderr, exit 0; exit 2 with --strict): the new token can never succeed (expired, or a\n\
service, method, path or model its parent cannot reach), or --max-uses is above the parent's limit.")]
    Attenuate(attenuate::AttenuateArgs),
    /// Show a token's blocks, scope, limits and revocation ids.
    #[command(
        after_help = "Examples:\n  till inspect agent.token\n  till inspect --json < agent.token"
    )]
    Inspect(inspect::InspectArgs),
    /// Check a token offline against a request, with the root public key.
    #[command(after_help = "Example:\n  \
till verify --public-key \"$(till pubkey)\" --service openai --method POST \\\n    \
--path /v1/chat/completions --model gpt-4o-mini agent.token\n  \
# prints `allowed` (exit 0) or `denied: <reason>` (exit 1); with --json,
  # {\"allowed\":true} or {\"allowed\":false,\"reason\":\"<reason>\"} (same exit codes)")]
    Verify(verify::VerifyArgs),
    /// Start the proxy with embedded defaults, creating TILL_HOME if needed.
    #[command(after_help = "Examples:\n  \
OPENAI_API_KEY=sk-... till up\n  \
TILL_HOME=/srv/till till up --listen :8788")]
    Up(serve::UpArgs),
    /// Run the proxy from an explicit config file (its state directory is the config's state_dir).
    #[command(
        after_help = "Example:\n  till serve --config /etc/till/till.toml --listen 127.0.0.1:8787"
    )]
    Serve(serve::ServeArgs),
    /// Revoke a token (its last block), its whole family, or a revocation id, on the running proxy.
    #[command(after_help = "Examples:\n  \
till revoke child.token            # this token and everything derived from it\n  \
till revoke --root child.token     # the whole family\n  \
till revoke --id 0f17ec1a7a9a      # a revocation id, or a unique prefix of one the proxy has seen\n  \
till revoke --list --json")]
    Revoke(revoke::RevokeArgs),
    /// Show usage per token family from the running proxy.
    #[command(after_help = "Examples:\n  \
till usage                         # every family, children under their parent\n  \
till usage agent.token             # the family of this token\n  \
till usage 0f17ec1a7a9a            # the family of this block (a unique id prefix)\n  \
till usage --json")]
    Usage(usage::UsageArgs),
    /// Re-read the running proxy's upstreams, their credentials and the root key set, without a
    /// restart.
    #[command(after_help = "Examples:\n  \
printf '%s\\n' \"$NEW_KEY\" > /etc/till/openai-api-key && till reload\n  \
kill -HUP \"$(pidof till)\"             # the same, by signal (outcome in the proxy's log)\n  \
till reload --json\n\n\
What a reload applies:\n  \
- the [upstreams.NAME] tables, every key of them (url, credential, header, prefix, set_headers,\n    \
pass_headers, api, forward_auth_credential, forward_auth_secret), upstreams added or removed;\n    \
credential files and forward-auth secrets are read again\n  \
- the root key set of the state directory (after `till keygen --rotate`, `till key retire`)\n  \
- the audit file is opened again by its name (log rotation)\n\
Other keys (listen, admin_listen, state_dir, policies, store, [limits], [audit], [alerts], ...)\n\
take effect at restart; a reload that finds some changed names them. A variable named by\n\
{ env = \"VAR\" } keeps its value: a running process's environment does not change.\n\
If the new configuration is invalid, the proxy keeps the previous one and this exits 2.")]
    Reload(reload::ReloadArgs),
    /// Move counts, block metadata, retired ids and revocations between stores (embedded, Redis).
    #[command(after_help = "Examples:\n  \
till store export counts.json                          # the store till.toml names\n  \
till store import counts.json --store redis://127.0.0.1:6379/0\n  \
till store export back.json --store redis://127.0.0.1:6379/0\n  \
till store import back.json --store embedded           # the embedded store in TILL_HOME\n\n\
Import never lowers a count: each counter ends at the larger of the file's and the store's.\n\
Stop the proxy before exporting from or importing into the embedded store (its file is locked).")]
    Store(store::StoreArgs),
}

/// Parses the command line and runs it; returns the process exit code.
pub fn main() -> ExitCode {
    let parsed = command()
        .try_get_matches()
        .and_then(|m| Ok((Cli::from_arg_matches(&m)?, m)));
    let (cli, matches) = match parsed {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return match e.kind() {
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => {
                    ExitCode::SUCCESS
                }
                _ => ExitCode::from(EXIT_USAGE),
            };
        }
    };
    match home_is_used(&cli, &matches)
        .and_then(|()| home_is_private(&cli))
        .and_then(|()| run(cli))
    {
        Ok(code) => code,
        Err(e) => {
            eprintln!("till: error: {}", chain(&e));
            ExitCode::from(EXIT_USAGE)
        }
    }
}

/// Commands that take no `--home` ([`home_is_used`] says why).
const REFUSE_HOME: [&str; 3] = ["serve", "inspect", "attenuate"];

/// The parser: [`Cli`], with a hidden `--home` of their own on the commands
/// that refuse it. The global `--home` would otherwise be copied into their
/// help as if it did something there; clap copies a global into no command
/// that has an argument of that name, and a `--home` given to them still
/// reaches [`home_is_used`] and its explanation.
fn command() -> clap::Command {
    REFUSE_HOME.into_iter().fold(Cli::command(), |cli, name| {
        cli.mut_subcommand(name, |sub| {
            sub.arg(
                clap::Arg::new("home")
                    .long("home")
                    .value_name("HOME")
                    // The global's type: clap hands values between the two.
                    .value_parser(clap::value_parser!(PathBuf))
                    .hide(true),
            )
        })
    })
}

/// Writes to stdout for [`out!`] and [`outln!`].
pub(crate) fn write_stdout(args: std::fmt::Arguments) {
    use std::io::Write;
    let mut o = std::io::stdout().lock();
    if let Err(e) = o.write_fmt(args).and_then(|()| o.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            // The reader has what it wanted; nothing is left to say.
            std::process::exit(0);
        }
        eprintln!("till: error: cannot write to stdout: {e}");
        std::process::exit(i32::from(EXIT_USAGE));
    }
}

/// `--home` given on the command line to a command that ignores it is an
/// error rather than silently doing nothing (TILL_HOME in the environment
/// is fine: it is meant for every command).
fn home_is_used(cli: &Cli, m: &clap::ArgMatches) -> anyhow::Result<()> {
    let given = std::iter::once(m)
        .chain(m.subcommand().map(|(_, s)| s))
        .any(|m| m.value_source("home") == Some(ValueSource::CommandLine));
    let why = match &cli.command {
        Command::Serve(_) => {
            "`till serve` keeps its state in the config's state_dir; set it there (or use `till up`, which uses --home)"
        }
        Command::Attenuate(_) | Command::Inspect(_) => {
            "this command needs no key and no state directory; leave --home out"
        }
        _ => return Ok(()),
    };
    if given {
        anyhow::bail!("--home does nothing here: {why}");
    }
    Ok(())
}

/// Refuses, before anything is read from it, a state directory (or its
/// till.toml) that another user could have written: its `listen` receives
/// the admin token (a `.till` planted in a shared directory is the default
/// TILL_HOME there), its keys issue tokens. See [`crate::state_dir`].
fn home_is_private(cli: &Cli) -> anyhow::Result<()> {
    let reads_home = match &cli.command {
        Command::Serve(_) | Command::Attenuate(_) | Command::Inspect(_) => false,
        Command::Verify(a) => a.public_keys.is_empty(),
        Command::Pubkey(a) => a.key.is_none() || a.all || a.json,
        _ => true,
    };
    if reads_home {
        crate::state_dir::check_home(&cli.home)?;
    }
    Ok(())
}

fn chain(e: &anyhow::Error) -> String {
    e.chain()
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join(": ")
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let home = cli.home;
    match cli.command {
        Command::Keygen(a) => keys::keygen(&home, a),
        Command::Pubkey(a) => keys::pubkey(&home, a),
        Command::Key(a) => keys::key(&home, a),
        Command::Issue(a) => issue::run(&home, a),
        Command::Attenuate(a) => attenuate::run(a),
        Command::Inspect(a) => inspect::run(a),
        Command::Verify(a) => verify::run(&home, a),
        Command::Up(a) => serve::up(&home, a),
        Command::Serve(a) => serve::serve(a),
        Command::Revoke(a) => revoke::run(&home, a),
        Command::Usage(a) => usage::run(&home, a),
        Command::Reload(a) => reload::run(&home, a),
        Command::Store(a) => store::run(&home, a),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_parser_is_well_formed() {
        command().debug_assert();
    }

    /// Help of `till <name>`, as `--help` prints it.
    fn help(name: &str) -> String {
        let mut cli = command();
        cli.build();
        cli.find_subcommand_mut(name)
            .unwrap()
            .render_long_help()
            .to_string()
    }

    #[test]
    fn home_is_in_the_help_of_the_commands_that_take_it_only() {
        for name in REFUSE_HOME {
            assert!(!help(name).contains("--home"), "till {name} --help");
        }
        for name in ["issue", "up", "usage", "verify"] {
            assert!(help(name).contains("--home"), "till {name} --help");
        }
    }
}
