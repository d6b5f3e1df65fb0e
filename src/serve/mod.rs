//! `rcx serve`: a trained reward model behind HTTP for RLHF loops. `/score` answers the
//! numbers `rcx score` gives; `/get_reward` takes OpenRLHF's body. Concurrent requests are
//! batched into one forward pass on the model's own thread (batcher.rs); the HTTP side runs
//! on tokio (http.rs); bodies are checked in requests.rs; counters in metrics.rs.
//! docs/serve.md is the user's page.

mod batcher;
mod http;
mod metrics;
mod requests;

use crate::backend::cuda::CudaRuntime;
use crate::backend::{Backend, Batch, DType, Device};
use crate::checkpoint::MIN_MAX_LENGTH;
use crate::error::{Error, Result};
use crate::models::HostModel;
use crate::signals::Interrupts;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// `rcx serve`: score prompts and completions over HTTP.
#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// A model folder written by `rcx train` (or any Hugging Face BERT folder).
    #[arg(long)]
    pub model: PathBuf,
    /// The address to listen on (loopback unless said otherwise).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// The port to listen on; 0 lets the system pick one (printed on start).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// The most sequences (completions) per forward pass.
    #[arg(long, default_value_t = 32, allow_negative_numbers = true)]
    pub max_batch: usize,
    /// How long the first request of a batch waits for others, in milliseconds.
    #[arg(long, default_value_t = 5, allow_negative_numbers = true)]
    pub max_wait_ms: u64,
    /// The most sequences waiting for the model; beyond, requests get 503.
    #[arg(long, default_value_t = 4096, allow_negative_numbers = true)]
    pub max_queue: usize,
    /// Require `Authorization: Bearer TOKEN` on every endpoint but /health.
    #[arg(long)]
    pub token: Option<String>,
    /// Token limit per sequence (default: the model's training max_length).
    #[arg(long, allow_negative_numbers = true)]
    pub max_length: Option<usize>,
    /// Seconds a client has to send its request headers, and then its body.
    #[arg(long, default_value_t = 10, allow_negative_numbers = true)]
    pub read_timeout_s: u64,
    /// Answer (reward - mean) / std as the rewards, with the statistics saved in the model
    /// folder (`crate::reward_norm`), as `rcx score --normalize`; logits stay raw.
    #[arg(long)]
    pub normalize: bool,
    /// Where the model runs: cpu, cuda, or auto (CUDA when a device is usable, else the
    /// CPU). A model the device cannot run is refused before the server listens.
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: Device,
    /// The arithmetic: f32, or bf16 (CUDA only).
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: DType,
}

const MAX_BATCH_LIMIT: usize = 4096;
const MAX_WAIT_MS_LIMIT: u64 = 60_000;
const MAX_QUEUE_LIMIT: usize = 1 << 20;
const READ_TIMEOUT_S_LIMIT: u64 = 3600;

fn check_args(args: &ServeArgs) -> Result<()> {
    let range = |name: &str, value: u64, lo: u64, hi: u64| {
        if (lo..=hi).contains(&value) {
            Ok(())
        } else {
            Err(Error::user(format!(
                "--{name} must be in {lo}..={hi}, got {value}"
            )))
        }
    };
    range(
        "max-batch",
        args.max_batch as u64,
        1,
        MAX_BATCH_LIMIT as u64,
    )?;
    range("max-wait-ms", args.max_wait_ms, 0, MAX_WAIT_MS_LIMIT)?;
    range(
        "max-queue",
        args.max_queue as u64,
        1,
        MAX_QUEUE_LIMIT as u64,
    )?;
    range(
        "read-timeout-s",
        args.read_timeout_s,
        1,
        READ_TIMEOUT_S_LIMIT,
    )?;
    if let Some(n) = args.max_length.filter(|&n| n < MIN_MAX_LENGTH) {
        return Err(Error::user(format!(
            "--max-length must be at least {MIN_MAX_LENGTH} (the special tokens of a prompt \
             and completion), got {n}"
        )));
    }
    if let Some(token) = &args.token
        && (token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()))
    {
        return Err(Error::user(
            "--token must be non-empty printable ASCII without spaces (it travels in an HTTP header)",
        ));
    }
    Ok(())
}

/// Whether the model runs on CUDA, from `--device` and `--dtype`, decided before anything
/// is loaded.
fn use_cuda(device: Device, dtype: DType) -> Result<bool> {
    let cuda = crate::backend::cuda::available();
    let on_cuda = match (device, cuda) {
        (Device::Cpu, _) => false,
        (Device::Auto, available) => available.is_ok(),
        (Device::Cuda, Ok(())) => true,
        (Device::Cuda, Err(why)) => {
            return Err(Error::user(format!(
                "--device cuda: {why}; use --device cpu or --device auto"
            )));
        }
    };
    if dtype == DType::Bf16 && !on_cuda {
        return Err(Error::user(
            "--dtype bf16: bf16 runs on the CUDA device only; use --dtype f32 or --device cuda",
        ));
    }
    Ok(on_cuda)
}

/// The model on its device as a forward function, with the backend's description. One
/// forward of a two-token sequence runs first, so that a model the device cannot run (an
/// architecture without kernels there) is refused now, not at the first request.
fn place_model(
    host: HostModel<f32>,
    on_cuda: bool,
    dtype: DType,
    pad_id: u32,
) -> Result<(Box<batcher::Forward<'static>>, String)> {
    let token = u32::from(pad_id == 0);
    let probe = Batch::from_sequences([(&[token, token][..], &[0u8, 0][..])], pad_id);
    if on_cuda {
        let rt = Arc::new(CudaRuntime::new(0)?);
        let mut model = host.on_cuda(rt, dtype)?;
        model.forward(&probe, None)?;
        let described = model.backend.describe();
        Ok((
            Box::new(move |batch: &Batch| model.forward(batch, None)),
            described,
        ))
    } else {
        let mut model = host.on_cpu();
        model.forward(&probe, None)?;
        let described = model.backend.describe();
        Ok((
            Box::new(move |batch: &Batch| model.forward(batch, None)),
            described,
        ))
    }
}

pub fn cmd_serve(args: ServeArgs) -> Result<()> {
    check_args(&args)?;
    let on_cuda = use_cuda(args.device, args.dtype)?;
    let normalization = match args.normalize {
        true => Some(crate::reward_norm::read(&args.model)?),
        false => None,
    };
    let (model, tokenizer, meta) = crate::checkpoint::load_for_scoring(&args.model)?;
    // As `rcx score` chooses it, so that both give the same numbers.
    let max_length = args
        .max_length
        .or(meta.as_ref().map(|m| m.max_length))
        .unwrap_or(512)
        .min(model.config.max_position_embeddings);
    let pad_id = tokenizer.pad_id();

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| Error::internal(format!("cannot start the HTTP runtime: {e}")))?;
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind((
            args.host.as_str(),
            args.port,
        )))
        .map_err(|e| {
            Error::user(format!(
                "--host {} --port {}: cannot listen there: {e}",
                args.host, args.port
            ))
        })?;
    let address = listener
        .local_addr()
        .map_err(|e| Error::internal(format!("the listening address: {e}")))?;

    let batcher = Arc::new(batcher::Batcher::new(
        args.max_batch,
        Duration::from_millis(args.max_wait_ms),
        args.max_queue,
    ));
    let metrics = Arc::new(metrics::Metrics::default());
    // The model is put on its device by its own thread (a GPU context stays with the thread
    // that made it), which says whether that worked before anything is served.
    let (ready, placed) = std::sync::mpsc::sync_channel(1);
    let dtype = args.dtype;
    let model_thread = {
        let (batcher, metrics) = (Arc::clone(&batcher), Arc::clone(&metrics));
        std::thread::Builder::new()
            .name("rcx-model".into())
            .spawn(move || match place_model(model, on_cuda, dtype, pad_id) {
                Ok((mut forward, described)) => {
                    let _ = ready.send(Ok(described));
                    batcher::run(&batcher, &mut *forward, pad_id, &metrics);
                }
                Err(e) => {
                    let _ = ready.send(Err(e));
                }
            })
            .map_err(|e| Error::internal(format!("cannot start the model thread: {e}")))?
    };
    let described = placed
        .recv()
        .map_err(|_| Error::internal("the model thread ended before placing the model"))??;
    let state = Arc::new(http::State {
        batcher: Arc::clone(&batcher),
        metrics,
        tokenizer,
        max_length,
        max_queue: args.max_queue,
        token: args.token,
        read_timeout: Duration::from_secs(args.read_timeout_s),
        normalization,
    });

    let interrupts = Interrupts::install();
    eprintln!(
        "rcx serve: {} on {described} listening on http://{address} (max batch {}, max wait \
         {} ms)",
        args.model.display(),
        args.max_batch,
        args.max_wait_ms
    );
    runtime.block_on(http::serve(listener, state, || {
        interrupts.received().is_some()
    }));
    batcher.close();
    model_thread
        .join()
        .map_err(|_| Error::internal("the model thread panicked"))?;
    let signal = interrupts.received().map_or("a signal", |(_, name)| name);
    eprintln!("rcx serve: stopped by {signal} after answering the requests under way");
    Ok(())
}
