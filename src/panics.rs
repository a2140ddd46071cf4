//! Panics inside third-party code that reads user files (a tokenizer's regex, say) become
//! errors: [`quietly`] catches them without printing the usual panic message.

use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Once;

/// How many [`quietly`] calls are running; while any is, panic messages are not printed.
static QUIET: AtomicUsize = AtomicUsize::new(0);
static HOOK: Once = Once::new();

/// Runs `f`; a panic in it (or in the rayon tasks it waits for) is returned as its message.
pub fn quietly<R>(f: impl FnOnce() -> R) -> Result<R, String> {
    HOOK.call_once(|| {
        let default = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            if QUIET.load(Ordering::SeqCst) == 0 {
                default(info);
            }
        }));
    });
    QUIET.fetch_add(1, Ordering::SeqCst);
    let result = panic::catch_unwind(AssertUnwindSafe(f));
    QUIET.fetch_sub(1, Ordering::SeqCst);
    result.map_err(|payload| {
        payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic without a message".into())
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_panic_becomes_its_message() {
        assert_eq!(super::quietly(|| 3), Ok(3));
        let err = super::quietly(|| -> u8 { panic!("boom {}", 1) }).unwrap_err();
        assert_eq!(err, "boom 1");
    }
}
