//! SIGINT and SIGTERM during training: the handler only records the signal; the training
//! loop looks between steps, between evaluation batches and after each save, so a save
//! under way is finished (it is atomic) and the run then stops cleanly. A second signal of
//! the same kind gets the default action (the handler resets itself), for a user who will
//! not wait. SIGXFSZ is ignored while training, so that a file size limit fails the write
//! (EFBIG) with the file named instead of killing the process.

use std::sync::atomic::{AtomicI32, Ordering};

/// The signal received, 0 for none.
static RECEIVED: AtomicI32 = AtomicI32::new(0);

extern "C" fn record(signal: libc::c_int) {
    // Only an atomic store: async-signal-safe.
    RECEIVED.store(signal, Ordering::SeqCst);
}

/// The handlers installed for a run; the previous dispositions come back when dropped.
pub struct Interrupts {
    previous: Vec<(libc::c_int, libc::sigaction)>,
}

impl Interrupts {
    pub fn install() -> Interrupts {
        RECEIVED.store(0, Ordering::SeqCst);
        let mut previous = Vec::new();
        let recorder = record as *const () as libc::sighandler_t;
        for (signal, handler, flags) in [
            (libc::SIGINT, recorder, libc::SA_RESETHAND),
            (libc::SIGTERM, recorder, libc::SA_RESETHAND),
            (libc::SIGXFSZ, libc::SIG_IGN, 0),
        ] {
            // SAFETY: sigaction with a zeroed, then filled, struct; the handler only stores
            // to an atomic.
            unsafe {
                let mut action: libc::sigaction = std::mem::zeroed();
                action.sa_sigaction = handler;
                action.sa_flags = flags;
                libc::sigemptyset(&mut action.sa_mask);
                let mut old: libc::sigaction = std::mem::zeroed();
                if libc::sigaction(signal, &action, &mut old) == 0 {
                    previous.push((signal, old));
                }
            }
        }
        Interrupts { previous }
    }

    /// The signal received since `install`, if any: (number, name).
    pub fn received(&self) -> Option<(i32, &'static str)> {
        match RECEIVED.load(Ordering::SeqCst) {
            0 => None,
            libc::SIGINT => Some((libc::SIGINT, "SIGINT")),
            libc::SIGTERM => Some((libc::SIGTERM, "SIGTERM")),
            other => Some((other, "a signal")),
        }
    }
}

impl Drop for Interrupts {
    fn drop(&mut self) {
        for (signal, old) in &self.previous {
            // SAFETY: restores a disposition sigaction returned for this signal.
            unsafe {
                libc::sigaction(*signal, old, std::ptr::null_mut());
            }
        }
    }
}
