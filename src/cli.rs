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
    /// Build ranking data sets
    Data(crate::data::DataArgs),
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Data(a) => crate::data::cmd_data(a),
    }
}
