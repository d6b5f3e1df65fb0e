//! What the GPU benchmarks share: finding the device (or saying why not and exiting 0),
//! timing with CUDA events (warm-up, median of many runs), random inputs.

use std::sync::Arc;

use cudarc::driver::sys::CUevent_flags;
use rcx::backend::cuda::{self, CudaRuntime};
use rcx::error::{Error, Result};

/// The device, or None after printing why the benchmark is skipped. With RCX_REQUIRE_GPU=1
/// a missing device is an error instead (scripts/gpu-check.sh sets it).
pub fn device(bench: &str) -> Result<Option<Arc<CudaRuntime>>> {
    match cuda::available() {
        Ok(()) => {
            let rt = CudaRuntime::new(0)?;
            println!(
                "{bench}: {} ({} loaded)",
                rt.device_name()?,
                rt.image_kind()
            );
            Ok(Some(Arc::new(rt)))
        }
        Err(why) if std::env::var("RCX_REQUIRE_GPU").is_ok_and(|v| v == "1") => Err(
            Error::internal(format!("RCX_REQUIRE_GPU=1 but no GPU: {why}")),
        ),
        Err(why) => {
            println!("{bench}: skipped, no GPU: {why}");
            Ok(None)
        }
    }
}

/// Median of `reps` timed runs in milliseconds, after `warmup` untimed ones. Run i gets its
/// index, to rotate among input sets (so that a small working set is not served from L2).
/// Each run is bracketed by two events on the stream: device time, launch gaps included.
pub fn median_ms(
    rt: &CudaRuntime,
    warmup: usize,
    reps: usize,
    mut run: impl FnMut(usize) -> Result<()>,
) -> Result<f64> {
    for i in 0..warmup {
        run(i)?;
    }
    rt.synchronize()?;
    let event = |what: &str| {
        rt.stream()
            .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(|e| Error::internal(format!("CUDA: record the {what} event: {e}")))
    };
    let mut times = Vec::with_capacity(reps);
    for i in 0..reps {
        let start = event("start")?;
        run(warmup + i)?;
        let end = event("end")?;
        let ms = start
            .elapsed_ms(&end)
            .map_err(|e| Error::internal(format!("CUDA: read an event timer: {e}")))?;
        times.push(ms as f64);
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

/// Deterministic splitmix64 uniforms, so a failing check reproduces.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [-scale, scale], never zero (|x| >= scale/20).
    pub fn values(&mut self, len: usize, scale: f32) -> Vec<f32> {
        (0..len)
            .map(|_| {
                let u = (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
                let magnitude = scale * (0.05 + 0.95 * u);
                if self.next_u64() & 1 == 0 {
                    magnitude
                } else {
                    -magnitude
                }
            })
            .collect()
    }

    pub fn below(&mut self, len: usize, limit: u32) -> Vec<u32> {
        (0..len)
            .map(|_| (self.next_u64() % limit as u64) as u32)
            .collect()
    }
}
