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
}

pub fn run(a: AttenuateArgs) -> anyhow::Result<ExitCode> {
    let parent = a.input.read()?;
    let scope = a.scope.to_scope()?;
    println!("{}", token::attenuate(&parent, &scope)?);
    Ok(ExitCode::SUCCESS)
}
