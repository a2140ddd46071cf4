//! A guard before training: a row whose attention, kept for the backward pass, cannot fit in
//! the memory available is refused with the length that fits, not left to the kernel's
//! out-of-memory killer.
//!
//! Training runs a plain attention per sequence (candle ops), whose graph keeps at least
//! three `heads x tokens x tokens` f32 tensors per trainable layer until the backward pass:
//! the scores, the scaled scores and the softmax weights (a position bias or attention
//! dropout keeps one more each, and the backward pass makes a few more for one layer at a
//! time). For one row of `t` tokens that is at least `layers x 3 x heads x t^2 x 4` bytes: a
//! lower bound of a batch's needs (other rows and activations come on top), so a row refused
//! by it cannot train in that memory.

use std::path::Path;

/// Bytes kept per trainable layer, head and token pair, at least: three f32 tensors.
const BYTES_PER_PAIR: u64 = 3 * 4;

/// Overrides the memory available, in bytes (for tests, and for hosts whose limits are read
/// wrongly).
pub const MEMORY_ENV: &str = "FETCH_ML_MEMORY_AVAILABLE";

/// A row too long to train on in the memory available.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{row} has {tokens} tokens: training keeps at least {need_mb} MB of attention for it \
     ({layers} trainable layers x 3 x {heads} heads x tokens^2 x 4 bytes), more than the \
     {available_mb} MB of memory available; {}",
    fits_text(*.fits)
)]
pub struct RowTooLong {
    pub row: String,
    pub tokens: usize,
    pub layers: usize,
    pub heads: usize,
    pub need_mb: u64,
    pub available_mb: u64,
    /// The longest row that fits (0: none).
    pub fits: usize,
}

fn fits_text(fits: usize) -> String {
    match fits {
        0 => "no row fits while the encoder trains".into(),
        n => format!("rows of up to {n} tokens fit"),
    }
}

/// The override of the memory available is not a number of bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{MEMORY_ENV}={0:?} is not a number of bytes (for example 8000000000)")]
pub struct BadMemoryOverride(pub String);

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
/// available memory and its cgroup's room; `None` when neither can be read.
pub fn available() -> Result<Option<u64>, BadMemoryOverride> {
    if let Ok(v) = std::env::var(MEMORY_ENV) {
        return v.trim().parse().map(Some).map_err(|_| BadMemoryOverride(v));
    }
    let system = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| meminfo_available(&m));
    let cgroup = std::fs::read_to_string("/proc/self/cgroup")
        .ok()
        .and_then(|c| cgroup_dir(&c))
        .and_then(|d| cgroup_room(&Path::new("/sys/fs/cgroup").join(d)));
    Ok(match (system, cgroup) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    })
}

/// `MemAvailable` of a `/proc/meminfo` text, in bytes.
fn meminfo_available(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// This process's cgroup v2 folder (relative to the cgroup root) from `/proc/self/cgroup`'s
/// `0::/path` line; `None` under cgroup v1.
fn cgroup_dir(text: &str) -> Option<String> {
    let path = text.lines().find_map(|l| l.strip_prefix("0::"))?;
    Some(path.trim().trim_start_matches('/').to_string())
}

/// A cgroup v2 folder's limit less what it uses and cannot reclaim (`memory.current` less
/// `inactive_file` of `memory.stat`: page cache such as the weights file's counts as used
/// but is given back); `None` without a limit.
fn cgroup_room(dir: &Path) -> Option<u64> {
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).ok();
    let max: u64 = read("memory.max")?.trim().parse().ok()?;
    let current: u64 = read("memory.current")?.trim().parse().ok()?;
    let inactive = read("memory.stat")
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("inactive_file "))
                .and_then(|v| v.trim().parse::<u64>().ok())
        })
        .unwrap_or(0);
    Some(max.saturating_sub(current.saturating_sub(inactive)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_row_is_refused_only_past_the_memory_and_told_what_fits() {
        // 12 layers, 12 heads, 1,000 tokens: 1.728 GB.
        assert_eq!(attention_bytes(12, 12, 1000), 1_728_000_000);
        let name = || "train.jsonl, line 3".to_string();
        assert!(check_row(name, 1000, (12, 12), 1_728_000_000).is_ok());
        assert!(check_row(name, 1000, (0, 12), 1).is_ok(), "nothing trains");
        let e = check_row(name, 1000, (12, 12), 432_000_000).unwrap_err();
        assert_eq!(e.fits, 500);
        assert!(attention_bytes(12, 12, e.fits) <= 432_000_000);
        assert!(attention_bytes(12, 12, e.fits + 1) > 432_000_000);
        assert!(e
            .to_string()
            .contains("train.jsonl, line 3 has 1000 tokens"));
        let none = check_row(name, 1000, (12, 12), 100).unwrap_err();
        assert_eq!(none.fits, 0);
        assert!(none.to_string().contains("no row fits"));
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
        std::fs::write(d.path().join("memory.stat"), "anon 10\ninactive_file 60\n").unwrap();
        assert_eq!(
            cgroup_room(d.path()),
            Some(960),
            "reclaimable cache is room"
        );
        assert_eq!(
            cgroup_dir("0::/user.slice/x\n"),
            Some("user.slice/x".into())
        );
        assert_eq!(cgroup_dir("12:memory:/docker/abc\n"), None, "cgroup v1");
    }
}
