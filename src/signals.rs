//! Stop requests from the terminal and from schedulers: SIGINT (Ctrl-C), SIGTERM (what
//! Slurm and most schedulers send before SIGKILL) and SIGUSR1 (Slurm's
//! `--signal=USR1@120` early warning) all ask an EnKF run to finish its iteration, write a
//! checkpoint and exit with the conventional code 128 + the signal number. A second
//! signal ends the process at once with that code.
//!
//! The handler only stores the signal number and sets [`crate::train::INTERRUPT`]
//! (atomics are async-signal-safe) and writes one fixed line with `write(2)`; the
//! trainer notices at the next iteration boundary.

use std::sync::atomic::{AtomicI32, Ordering};

/// The first stop signal received (0: none).
static RECEIVED: AtomicI32 = AtomicI32::new(0);

/// A signal that stops a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopSignal {
    /// SIGINT, Ctrl-C.
    Interrupt,
    /// SIGTERM.
    Terminate,
    /// SIGUSR1.
    User1,
}

impl StopSignal {
    /// Every stop signal.
    pub const ALL: [StopSignal; 3] = [
        StopSignal::Interrupt,
        StopSignal::Terminate,
        StopSignal::User1,
    ];

    /// The platform's signal number.
    pub fn number(self) -> i32 {
        match self {
            StopSignal::Interrupt => 2,
            StopSignal::Terminate => 15,
            #[cfg(target_os = "macos")]
            StopSignal::User1 => 30,
            #[cfg(not(target_os = "macos"))]
            StopSignal::User1 => 10,
        }
    }

    /// The conventional name.
    pub fn name(self) -> &'static str {
        match self {
            StopSignal::Interrupt => "SIGINT",
            StopSignal::Terminate => "SIGTERM",
            StopSignal::User1 => "SIGUSR1",
        }
    }

    /// The exit code a process ended by this signal reports: 128 + its number.
    pub fn exit_code(self) -> i32 {
        128 + self.number()
    }

    /// The stop signal with platform number `n`.
    pub fn from_number(n: i32) -> Option<StopSignal> {
        StopSignal::ALL.into_iter().find(|s| s.number() == n)
    }
}

/// The first stop signal this process received, if any.
pub fn received() -> Option<StopSignal> {
    StopSignal::from_number(RECEIVED.load(Ordering::SeqCst))
}

/// Records `sig` as if it had been delivered: what the handler does, minus the message
/// (for tests, and for embedding programs that catch signals themselves).
pub fn request_stop(sig: StopSignal) {
    let _ = RECEIVED.compare_exchange(0, sig.number(), Ordering::SeqCst, Ordering::SeqCst);
    crate::train::INTERRUPT.store(true, Ordering::SeqCst);
}

#[cfg(unix)]
mod unix {
    use super::{StopSignal, RECEIVED};
    use std::ffi::{c_int, c_void};
    use std::sync::atomic::Ordering;

    type Handler = extern "C" fn(c_int);

    extern "C" {
        fn signal(signum: c_int, handler: Handler) -> usize;
        fn write(fd: c_int, buf: *const c_void, count: usize) -> isize;
        fn _exit(status: c_int) -> !;
    }

    const SIG_ERR: usize = usize::MAX;
    const MESSAGE: &[u8] = b"\nstop requested: finishing the current iteration and writing a \
checkpoint (send the signal again to stop at once)\n";

    extern "C" fn on_signal(sig: c_int) {
        if RECEIVED
            .compare_exchange(0, sig, Ordering::SeqCst, Ordering::SeqCst)
            .is_err()
        {
            // SAFETY: _exit is async-signal-safe; a second signal ends the process now.
            unsafe { _exit(128 + sig) };
        }
        crate::train::INTERRUPT.store(true, Ordering::SeqCst);
        // SAFETY: write(2) is async-signal-safe; MESSAGE is a static buffer.
        unsafe {
            let _ = write(2, MESSAGE.as_ptr().cast(), MESSAGE.len());
        }
    }

    pub(super) fn install() -> bool {
        StopSignal::ALL.iter().all(|s| {
            // SAFETY: registers an async-signal-safe handler (atomics, write, _exit).
            unsafe { signal(s.number(), on_signal) != SIG_ERR }
        })
    }
}

/// Installs (once per process) the handler of every [`StopSignal`]. Returns whether the
/// handlers are in place (false on platforms without POSIX signals, where Ctrl-C ends the
/// process as usual).
pub fn install() -> bool {
    static INSTALLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *INSTALLED.get_or_init(|| {
        #[cfg(unix)]
        {
            unix::install()
        }
        #[cfg(not(unix))]
        {
            false
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_follow_the_shell_convention() {
        assert_eq!(StopSignal::Interrupt.exit_code(), 130);
        assert_eq!(StopSignal::Terminate.exit_code(), 143);
        for s in StopSignal::ALL {
            assert_eq!(StopSignal::from_number(s.number()), Some(s));
        }
        assert_eq!(StopSignal::from_number(0), None);
    }
}
