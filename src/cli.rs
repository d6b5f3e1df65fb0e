//! The `rcx` command line: one subcommand per job; each is implemented in the module
//! that owns the concern and only dispatched from here.

use crate::error::Result;
use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "rcx",
    version,
    about = "Reward models on ranked preferences, and reward collapse"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// The optimal rewards of the theory for n ranked completions, and their limit.
    Theory(crate::theory::TheoryArgs),
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Theory(a) => crate::theory::cmd_theory(a),
    }
}
