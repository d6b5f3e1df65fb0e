//! The server's counters in Prometheus's text format: requests by endpoint and status,
//! forward-pass batch sizes and time, request latency quantiles (over the latest requests) and the
//! queue depth.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::time::Duration;

/// Latencies kept for the quantiles: the latest this many requests.
const LATENCY_WINDOW: usize = 4096;
/// Upper bounds of the batch-size histogram's buckets (sequences per forward).
const BATCH_BUCKETS: [usize; 9] = [1, 2, 4, 8, 16, 32, 64, 128, 256];

#[derive(Default)]
struct Counts {
    requests: BTreeMap<(&'static str, u16), u64>, // (endpoint, status) -> count
    latencies: Vec<f64>,                          // seconds, a ring of LATENCY_WINDOW
    next_latency: usize,
    latency_sum: f64,
    latency_count: u64,
    batch_buckets: [u64; BATCH_BUCKETS.len()],
    batch_sum: u64,
    forwards: u64,
    forward_seconds: f64,
}

#[derive(Default)]
pub struct Metrics {
    counts: Mutex<Counts>,
}

impl Metrics {
    pub fn record_request(&self, endpoint: &'static str, status: u16, took: Duration) {
        let mut c = self.lock();
        *c.requests.entry((endpoint, status)).or_insert(0) += 1;
        let seconds = took.as_secs_f64();
        if c.latencies.len() < LATENCY_WINDOW {
            c.latencies.push(seconds);
        } else {
            let at = c.next_latency;
            c.latencies[at] = seconds;
        }
        c.next_latency = (c.next_latency + 1) % LATENCY_WINDOW;
        c.latency_sum += seconds;
        c.latency_count += 1;
    }

    pub fn record_forward(&self, sequences: usize, took: Duration) {
        let mut c = self.lock();
        c.forward_seconds += took.as_secs_f64();
        for (bucket, &bound) in c.batch_buckets.iter_mut().zip(&BATCH_BUCKETS) {
            if sequences <= bound {
                *bucket += 1;
            }
        }
        c.batch_sum += sequences as u64;
        c.forwards += 1;
    }

    /// The Prometheus text exposition, with the queue depth now.
    pub fn render(&self, queue_depth: usize) -> String {
        let c = self.lock();
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP rcx_serve_requests_total HTTP requests answered, by endpoint and status."
        );
        let _ = writeln!(out, "# TYPE rcx_serve_requests_total counter");
        for ((endpoint, status), n) in &c.requests {
            let _ = writeln!(
                out,
                "rcx_serve_requests_total{{endpoint=\"{endpoint}\",status=\"{status}\"}} {n}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP rcx_serve_request_seconds Request latency; quantiles over the latest {LATENCY_WINDOW} requests."
        );
        let _ = writeln!(out, "# TYPE rcx_serve_request_seconds summary");
        let mut sorted = c.latencies.clone();
        sorted.sort_by(f64::total_cmp);
        for q in [0.5, 0.9, 0.99] {
            let value = quantile(&sorted, q).map_or("NaN".to_string(), |v| format!("{v}"));
            let _ = writeln!(out, "rcx_serve_request_seconds{{quantile=\"{q}\"}} {value}");
        }
        let _ = writeln!(out, "rcx_serve_request_seconds_sum {}", c.latency_sum);
        let _ = writeln!(out, "rcx_serve_request_seconds_count {}", c.latency_count);
        let _ = writeln!(
            out,
            "# HELP rcx_serve_batch_sequences Sequences per forward pass of the model."
        );
        let _ = writeln!(out, "# TYPE rcx_serve_batch_sequences histogram");
        for (bound, n) in BATCH_BUCKETS.iter().zip(&c.batch_buckets) {
            let _ = writeln!(
                out,
                "rcx_serve_batch_sequences_bucket{{le=\"{bound}\"}} {n}"
            );
        }
        let _ = writeln!(
            out,
            "rcx_serve_batch_sequences_bucket{{le=\"+Inf\"}} {}",
            c.forwards
        );
        let _ = writeln!(out, "rcx_serve_batch_sequences_sum {}", c.batch_sum);
        let _ = writeln!(out, "rcx_serve_batch_sequences_count {}", c.forwards);
        let _ = writeln!(
            out,
            "# HELP rcx_serve_forward_seconds_total Time spent in the model's forward passes."
        );
        let _ = writeln!(out, "# TYPE rcx_serve_forward_seconds_total counter");
        let _ = writeln!(out, "rcx_serve_forward_seconds_total {}", c.forward_seconds);
        let _ = writeln!(
            out,
            "# HELP rcx_serve_queue_sequences Sequences waiting for the model."
        );
        let _ = writeln!(out, "# TYPE rcx_serve_queue_sequences gauge");
        let _ = writeln!(out, "rcx_serve_queue_sequences {queue_depth}");
        out
    }

    /// The counts survive a panicking holder: each update is whole.
    fn lock(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The `q` quantile of sorted values (nearest rank), None when there are none.
fn quantile(sorted: &[f64], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_text_holds_counts_buckets_and_quantiles() {
        let m = Metrics::default();
        for ms in 1..=100 {
            m.record_request("score", 200, Duration::from_millis(ms));
        }
        m.record_request("score", 400, Duration::from_millis(1));
        m.record_forward(3, Duration::from_millis(250));
        m.record_forward(40, Duration::from_millis(500));
        let text = m.render(7);
        assert!(text.contains("rcx_serve_requests_total{endpoint=\"score\",status=\"200\"} 100"));
        assert!(text.contains("rcx_serve_requests_total{endpoint=\"score\",status=\"400\"} 1"));
        assert!(text.contains("rcx_serve_request_seconds{quantile=\"0.5\"} 0.05\n"));
        assert!(text.contains("rcx_serve_request_seconds{quantile=\"0.99\"} 0.099\n"));
        assert!(text.contains("rcx_serve_request_seconds_count 101"));
        assert!(text.contains("rcx_serve_batch_sequences_bucket{le=\"2\"} 0"));
        assert!(text.contains("rcx_serve_batch_sequences_bucket{le=\"4\"} 1"));
        assert!(text.contains("rcx_serve_batch_sequences_bucket{le=\"64\"} 2"));
        assert!(text.contains("rcx_serve_batch_sequences_sum 43"));
        assert!(text.contains("rcx_serve_forward_seconds_total 0.75\n"));
        assert!(text.contains("rcx_serve_queue_sequences 7"));
    }
}
