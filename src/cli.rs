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
    /// Encode a text (or a pair) with a BERT WordPiece vocabulary; prints the ids as JSON.
    Tokenize(crate::tokenizer::TokenizeArgs),
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Tokenize(a) => crate::tokenizer::cmd_tokenize(a),
    }
}
