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
    /// Validate training config files.
    CheckConfig(crate::config::CheckConfigArgs),
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::CheckConfig(a) => crate::config::cmd_check_config(a),
    }
}
