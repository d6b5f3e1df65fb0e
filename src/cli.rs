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
    /// Train a reward model from a YAML config.
    Train(crate::train::TrainArgs),
    /// Score every completion of a ranking file with a trained model.
    Score(crate::eval::ScoreArgs),
    /// Serve a trained model's rewards over HTTP (/score, /get_reward), batching requests.
    Serve(crate::serve::ServeArgs),
    /// Evaluate a trained model: rewards per prompt type and rank, collapse gap, theory.
    Eval(crate::eval::EvalArgs),
    /// Draw runs' reward panels side by side (the paper's figure), curves or histograms.
    Plot(crate::figures::PlotArgs),
    /// Train the paper's runs, evaluate them and write docs/results.md with figures.
    Reproduce(crate::report::ReproduceArgs),
    /// Validate training config files.
    CheckConfig(crate::config::CheckConfigArgs),
    /// Solve the theory's reward optimum for a utility, and compare it with its limit.
    Theory(crate::theory::TheoryArgs),
    /// Build ranking data sets.
    Data(crate::data::DataArgs),
    /// Tokenize a text: BERT uncased WordPiece (--vocab) or a tokenizer.json (--tokenizer).
    Tokenize(crate::tokenizer::TokenizeArgs),
    /// Check every backward of the CPU reference against central finite differences.
    Gradcheck(crate::gradcheck::GradcheckArgs),
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Train(a) => crate::train::cmd_train(a),
        Command::Score(a) => crate::eval::cmd_score(a),
        Command::Serve(a) => crate::serve::cmd_serve(a),
        Command::Eval(a) => crate::eval::cmd_eval(a),
        Command::Plot(a) => crate::figures::cmd_plot(a),
        Command::Reproduce(a) => crate::report::cmd_reproduce(a),
        Command::CheckConfig(a) => crate::config::cmd_check_config(a),
        Command::Theory(a) => crate::theory::cmd_theory(a),
        Command::Data(a) => crate::data::cmd_data(a),
        Command::Tokenize(a) => crate::tokenizer::cmd_tokenize(a),
        Command::Gradcheck(a) => crate::gradcheck::cmd_gradcheck(a),
    }
}
