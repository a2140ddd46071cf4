//! Ctrl-C and `kill`: temporary files registered here are removed when SIGINT, SIGTERM or
//! SIGHUP arrives, before the process dies of the signal as it would have anyway.
//!
//! The handler may only make async-signal-safe calls, so the paths are kept as leaked C
//! strings in a fixed table of atomic pointers, and the handler only calls `unlink`,
//! `signal` and `raise`.

use std::ffi::{c_char, CString};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::ptr;
use std::sync::atomic::{AtomicPtr, Ordering};
use std::sync::Once;

const SLOTS: usize = 32;
static PATHS: [AtomicPtr<c_char>; SLOTS] = [const { AtomicPtr::new(ptr::null_mut()) }; SLOTS];
static INSTALL: Once = Once::new();

/// A registered temporary file; unregistered when dropped.
pub struct Registered {
    slot: Option<usize>,
}

impl Drop for Registered {
    fn drop(&mut self) {
        if let Some(i) = self.slot {
            let p = PATHS[i].swap(ptr::null_mut(), Ordering::SeqCst);
            if !p.is_null() {
                // SAFETY: `p` came from `CString::into_raw` in `remove_on_signal` and was taken
                // out of the table, so nothing else frees or reads it.
                drop(unsafe { CString::from_raw(p) });
            }
        }
    }
}

/// Removes `path` if the process is interrupted while the returned guard lives. When the
/// table is full the file is simply not registered (it is still removed on normal exits).
pub fn remove_on_signal(path: &Path) -> Registered {
    INSTALL.call_once(install);
    let Ok(c) = CString::new(path.as_os_str().as_bytes()) else {
        return Registered { slot: None };
    };
    let raw = c.into_raw();
    for (i, slot) in PATHS.iter().enumerate() {
        if slot
            .compare_exchange(ptr::null_mut(), raw, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
        {
            return Registered { slot: Some(i) };
        }
    }
    // SAFETY: `raw` was not stored anywhere; take it back to free it.
    drop(unsafe { CString::from_raw(raw) });
    Registered { slot: None }
}

/// For a process that handles SIGINT and SIGTERM itself (the server, which shuts down
/// gracefully): the handler here is never installed, so it cannot end the process first.
/// Returns false when it was installed already (a file was registered before).
pub fn leave_signals_to_the_caller() -> bool {
    let mut first = false;
    INSTALL.call_once(|| first = true);
    first
}

extern "C" fn on_signal(sig: libc::c_int) {
    for slot in &PATHS {
        let p = slot.load(Ordering::SeqCst);
        if !p.is_null() {
            // SAFETY: `p` is a NUL-terminated string that stays allocated while registered;
            // unlink is async-signal-safe.
            unsafe { libc::unlink(p) };
        }
    }
    // SAFETY: restoring the default action and re-raising are async-signal-safe; the process
    // then ends by the signal, with the exit status a shell expects.
    unsafe {
        libc::signal(sig, libc::SIG_DFL);
        libc::raise(sig);
    }
}

fn install() {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: installs a handler that only makes async-signal-safe calls (see above).
        unsafe {
            libc::signal(sig, on_signal as *const () as libc::sighandler_t);
        }
    }
}
