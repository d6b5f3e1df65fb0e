//! Timing harness for the CPU evaluation forward at `rcx serve`'s shapes: batches of 1 to 64
//! sequences of 40 to 160 tokens, as the batcher hands them to the model (sorted by length,
//! at most a quarter of padding), on a model folder (scripts/bench-serve.sh writes a
//! bert-tiny one under target/tmp/bench-serve/model). Not a test: run it by hand, alone on
//! the machine if possible, and under `perf record` to see where the time goes:
//!
//!     cargo run --release --example serve_forward -- target/tmp/bench-serve/model [ROUNDS]
//!
//! Prints, per shape, the best and the median wall time of a forward over ROUNDS (default
//! 20) after one warm-up, and the microseconds per sequence and per real token.

use rcx::checkpoint::load_for_scoring;
use rcx::data::Batch;
use rcx::rng::Rng;
use std::time::Instant;

/// (sequences, shortest, longest): lengths uniform in [shortest, longest].
const SHAPES: [(usize, usize, usize); 6] = [
    (1, 60, 60),
    (8, 100, 125),
    (64, 40, 50),
    (64, 80, 100),
    (64, 128, 160),
    (64, 40, 160),
];

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let Some(dir) = args.get(1) else {
        eprintln!("usage: serve_forward MODEL_DIR [ROUNDS]");
        std::process::exit(2);
    };
    let rounds: usize = match args.get(2).map(|r| r.parse()) {
        None => 20,
        Some(Ok(r)) if r > 0 => r,
        Some(_) => {
            eprintln!("serve_forward: ROUNDS must be a positive integer");
            std::process::exit(2);
        }
    };
    let (host, tok, _) = load_for_scoring(std::path::Path::new(dir)).unwrap_or_else(|e| {
        eprintln!("serve_forward: {e}");
        std::process::exit(2);
    });
    let vocab = host.config.vocab_size as u64;
    let mut model = host.on_cpu();
    let mut rng = Rng::new(1);
    println!(
        "threads {}; rounds {rounds}; model {dir}",
        rayon::current_num_threads()
    );
    println!("  B   T  real tokens  best ms  median ms  us/seq  us/token");
    let mut total_median = 0.0;
    for (b, shortest, longest) in SHAPES {
        // Ids drawn from the vocabulary above the special tokens; two segments as the
        // pair encoding has them.
        let sequences: Vec<(Vec<u32>, Vec<u8>)> = (0..b)
            .map(|_| {
                let len = shortest + rng.below(longest - shortest + 1);
                let ids = (0..len)
                    .map(|_| 100 + (rng.next_u64() % (vocab - 100)) as u32)
                    .collect();
                let types = (0..len).map(|i| u8::from(i >= len / 3)).collect();
                (ids, types)
            })
            .collect();
        let real: usize = sequences.iter().map(|(ids, _)| ids.len()).sum();
        let batch = Batch::from_sequences(
            sequences.iter().map(|(ids, ty)| (&ids[..], &ty[..])),
            tok.pad_id(),
        );
        model.forward(&batch, None).expect("warm-up forward");
        let mut times: Vec<f64> = (0..rounds)
            .map(|_| {
                let start = Instant::now();
                std::hint::black_box(model.forward(&batch, None).expect("forward"));
                start.elapsed().as_secs_f64() * 1e3
            })
            .collect();
        times.sort_by(f64::total_cmp);
        let median = times[rounds / 2];
        total_median += median;
        println!(
            "{b:3} {:3} {real:12} {:8.3} {median:10.3} {:7.1} {:9.2}",
            batch.t,
            times[0],
            median * 1e3 / b as f64,
            median * 1e3 / real as f64
        );
    }
    println!("sum of medians: {total_median:.3} ms");
}
