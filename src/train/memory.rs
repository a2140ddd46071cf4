//! A guard before training: a row whose attention, kept for the backward pass, cannot fit in
//! the memory available is refused with the length that fits, not left to the kernel's
//! out-of-memory killer.
//!
//! Training runs a plain attention per sequence and keeps about five tensors of
//! `heads x tokens x tokens` f32 values per trainable layer (scores, weights, their
//! gradients' inputs). For one row of `t` tokens that is `layers x 5 x heads x t^2 x 4`
//! bytes: a lower bound of a batch's needs (other rows and activations come on top), so a
//! refusal is certain to be right.

use std::path::Path;

/// Bytes kept per trainable layer, head and token pair.
const BYTES_PER_PAIR: u64 = 5 * 4;

/// Overrides the memory available, in bytes (for tests, and for hosts whose limits are read
/// wrongly).
pub const MEMORY_ENV: &str = "FETCH_ML_MEMORY_AVAILABLE";

/// A row too long to train on in the memory available.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{row} has {tokens} tokens: training keeps about {need_mb} MB of attention for it \
     ({layers} trainable layers x 5 x {heads} heads x tokens^2 x 4 bytes), more than the \
     {available_mb} MB of memory available; rows of up to {fits} tokens fit"
)]
pub struct RowTooLong {
    pub row: String,
    pub tokens: usize,
    pub layers: usize,
    pub heads: usize,
    pub need_mb: u64,
    pub available_mb: u64,
    /// The longest row that fits.
    pub fits: usize,
}

/// The attention memory training keeps for one row of `tokens` tokens.
pub fn attention_bytes(layers: usize, heads: usize, tokens: usize) -> u64 {
    let t = tokens as u64;
    layers as u64 * heads as u64 * BYTES_PER_PAIR * t * t
}

/// Refuses the longest row (`row` names it) when its attention does not fit in `available`
/// bytes.
pub fn check_row(
    row: impl FnOnce() -> String,
    tokens: usize,
    (layers, heads): (usize, usize),
    available: u64,
) -> Result<(), RowTooLong> {
    let need = attention_bytes(layers, heads, tokens);
    if layers == 0 || need <= available {
        return Ok(());
    }
    let per_pair = (layers as u64 * heads as u64 * BYTES_PER_PAIR).max(1);
    Err(RowTooLong {
        row: row(),
        tokens,
        layers,
        heads,
        need_mb: need >> 20,
        available_mb: available >> 20,
        fits: ((available / per_pair) as f64).sqrt() as usize,
    })
}

/// The memory available to this process: the override, else the smaller of the system's
/// available memory and the cgroup's room (`memory.max` less `memory.current`); `None` when
/// neither can be read.
pub fn available() -> Option<u64> {
    if let Ok(v) = std::env::var(MEMORY_ENV) {
        return v.trim().parse().ok();
    }
    let system = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| meminfo_available(&m));
    let cgroup = cgroup_room(Path::new("/sys/fs/cgroup"));
    match (system, cgroup) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// `MemAvailable` of a `/proc/meminfo` text, in bytes.
fn meminfo_available(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// A cgroup v2 folder's limit less its use (`None` without a limit).
fn cgroup_room(dir: &Path) -> Option<u64> {
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).ok();
    let max: u64 = read("memory.max")?.trim().parse().ok()?;
    let current: u64 = read("memory.current")?.trim().parse().ok()?;
    Some(max.saturating_sub(current))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_row_is_refused_only_past_the_memory_and_told_what_fits() {
        // 12 layers, 12 heads, 1,000 tokens: 2.88 GB.
        assert_eq!(attention_bytes(12, 12, 1000), 2_880_000_000);
        let name = || "train.jsonl, line 3".to_string();
        assert!(check_row(name, 1000, (12, 12), 2_880_000_000).is_ok());
        assert!(check_row(name, 1000, (0, 12), 1).is_ok(), "nothing trains");
        let e = check_row(name, 1000, (12, 12), 720_000_000).unwrap_err();
        assert_eq!(e.fits, 500);
        assert!(attention_bytes(12, 12, e.fits) <= 720_000_000);
        assert!(attention_bytes(12, 12, e.fits + 1) > 720_000_000);
        assert!(e
            .to_string()
            .contains("train.jsonl, line 3 has 1000 tokens"));
    }

    #[test]
    fn memory_is_read_from_meminfo_and_the_cgroup() {
        let m = "MemTotal:       24000000 kB\nMemAvailable:   20000000 kB\n";
        assert_eq!(meminfo_available(m), Some(20_000_000 * 1024));
        assert_eq!(meminfo_available("MemTotal: 1 kB\n"), None);
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("memory.max"), "max\n").unwrap();
        std::fs::write(d.path().join("memory.current"), "100\n").unwrap();
        assert_eq!(cgroup_room(d.path()), None, "no limit");
        std::fs::write(d.path().join("memory.max"), "1000\n").unwrap();
        assert_eq!(cgroup_room(d.path()), Some(900));
    }
}
