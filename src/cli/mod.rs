//! The `till` command: argument parsing and one module per subcommand.
//! Each subcommand is a thin layer over the library.

mod attenuate;
mod input;
mod inspect;
mod issue;
mod keys;
mod revoke;
mod serve;
mod usage;
mod verify;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

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
    /// Create the root key (Ed25519, mode 0600) under TILL_HOME and print its public key.
    Keygen(keys::KeygenArgs),
    /// Print the root public key ("ed25519/<hex>").
    Pubkey(keys::PubkeyArgs),
    /// Mint a root token (operator; needs the root key).
    Issue(issue::IssueArgs),
    /// Narrow a token offline: no key, no server. Reads the parent, prints the child.
    Attenuate(attenuate::AttenuateArgs),
    /// Show a token's blocks, scope, limits and revocation ids.
    Inspect(inspect::InspectArgs),
    /// Check a token offline against a request, with the root public key.
    Verify(verify::VerifyArgs),
    /// Start the proxy with embedded defaults, creating TILL_HOME if needed.
    Up(serve::UpArgs),
    /// Run the proxy from an explicit config file.
    Serve(serve::ServeArgs),
    /// Revoke a token (its last block), its whole family, or a revocation id, on the running proxy.
    Revoke(revoke::RevokeArgs),
    /// Show usage per token family from the running proxy.
    Usage(usage::UsageArgs),
}

/// Parses the command line and runs it; returns the process exit code.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
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
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("till: error: {}", chain(&e));
            ExitCode::from(EXIT_USAGE)
        }
    }
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
        Command::Issue(a) => issue::run(&home, a),
        Command::Attenuate(a) => attenuate::run(a),
        Command::Inspect(a) => inspect::run(a),
        Command::Verify(a) => verify::run(&home, a),
        Command::Up(a) => serve::up(&home, a),
        Command::Serve(a) => serve::serve(a),
        Command::Revoke(a) => revoke::run(&home, a),
        Command::Usage(a) => usage::run(&home, a),
    }
}
