//! `till attenuate`: offline narrowing, no key and no server.

use std::process::ExitCode;

use clap::Args;

use super::input::TokenInput;
use super::issue::ScopeArgs;
use crate::token;

#[derive(Args, Debug)]
pub struct AttenuateArgs {
    #[command(flatten)]
    pub input: TokenInput,
    #[command(flatten)]
    pub scope: ScopeArgs,
    /// Refuse (exit 2, no token printed) instead of warning when the new token can never
    /// succeed or promises more uses than its parent has.
    #[arg(long)]
    pub strict: bool,
}

pub fn run(a: AttenuateArgs) -> anyhow::Result<ExitCode> {
    let parent = a.input.read()?;
    let scope = a.scope.to_scope()?;
    let child = token::attenuate(&parent, &scope)?;
    let view = token::inspect::inspect(&token::RawToken::parse(&child)?)?;
    super::warn::report(
        &super::warn::for_child(&view, std::time::SystemTime::now()),
        a.strict,
    )?;
    outln!("{child}");
    Ok(ExitCode::SUCCESS)
}
