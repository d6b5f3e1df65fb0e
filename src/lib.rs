//! rcx: training reward models on ranked preferences, and studying reward collapse.

pub mod backend;
pub mod checkpoint;
pub mod checksum;
pub mod cli;
pub mod config;
pub mod data;
pub mod error;
pub mod eval;
pub mod figures;
pub mod float;
pub mod gradcheck;
pub mod hf_config;
pub mod lock;
pub mod loss;
pub mod models;
pub mod plot;
pub mod provenance;
pub mod report;
pub mod rng;
pub mod safetensors;
pub mod scoring;
pub mod signals;
pub mod theory;
pub mod tokenizer;
pub mod train;
pub mod training_settings;
