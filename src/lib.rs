//! rcx: training reward models on ranked preferences, and studying reward collapse.

pub mod backend;
pub mod cli;
pub mod error;
pub mod loss;
