//! The CPU feature probe: which vector code the row kernels and epilogues run ([`level`]),
//! and whether the CPU and its operating system allow Intel AMX ([`amx`]). Each is probed
//! once per process. The product kernels of `quant::isa` say in their own files which
//! features they need.

use std::sync::OnceLock;

/// The vector code of the row kernels (softmax, LayerNorm, GELU), the quantized epilogues
/// and the activation quantizer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// Plain Rust.
    Portable,
    /// AVX2 and FMA.
    Avx2,
    /// AVX-512 F, BW, DQ and VL, besides AVX2 and FMA.
    Avx512,
}

/// The level this CPU reaches (probed once).
pub fn level() -> Level {
    static LEVEL: OnceLock<Level> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
            let avx512 = is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512dq")
                && is_x86_feature_detected!("avx512vl");
            match (avx2, avx512) {
                (true, true) => Level::Avx512,
                (true, false) => Level::Avx2,
                _ => Level::Portable,
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        Level::Portable
    })
}

/// Whether the CPU has AVX2 and FMA.
pub fn has_avx2_fma() -> bool {
    level() >= Level::Avx2
}

/// Whether the CPU has AVX-512 F (all the row kernels' AVX-512 code needs; checked once).
pub fn has_avx512f() -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            is_x86_feature_detected!("avx512f")
        }
        #[cfg(not(target_arch = "x86_64"))]
        false
    })
}

/// What Intel AMX this process may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Amx {
    /// `tdpbusd` (u8 x s8 -> i32).
    pub int8: bool,
    /// `tdpbf16ps` (bf16 x bf16 -> f32).
    pub bf16: bool,
    /// The CPU has AMX, but the operating system did not grant the tile state; the kernels
    /// below AMX run instead (the caller may say so).
    pub refused: bool,
}

/// CPUID leaf 7 (EDX bits 24 amx-tile, 25 amx-int8, 22 amx-bf16), then the operating
/// system's part: XCR0 bits 17 and 18 (it saves the tile state) and, on Linux, the tile
/// permission (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`, once per process, for
/// all its threads). A sandbox that accepts the request without managing the state does not
/// get AMX.
pub fn amx() -> Amx {
    static AMX: OnceLock<Amx> = OnceLock::new();
    *AMX.get_or_init(probe_amx)
}

#[cfg(target_arch = "x86_64")]
fn probe_amx() -> Amx {
    use std::arch::x86_64::{__cpuid, __cpuid_count};
    // Leaf 7 only where the CPU reports it (max leaf >= 7).
    if __cpuid(0).eax < 7 {
        return Amx::default();
    }
    let edx = __cpuid_count(7, 0).edx;
    let (tile, int8, bf16) = (
        (edx >> 24) & 1 == 1,
        (edx >> 25) & 1 == 1,
        (edx >> 22) & 1 == 1,
    );
    if !tile || !(int8 || bf16) {
        return Amx::default();
    }
    if !os_tile_state() || !request_permission() {
        return Amx {
            refused: true,
            ..Amx::default()
        };
    }
    Amx {
        int8,
        bf16,
        refused: false,
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn probe_amx() -> Amx {
    Amx::default()
}

/// XCR0 bits 17 (XTILECFG) and 18 (XTILEDATA): the operating system saves the tile state.
#[cfg(target_arch = "x86_64")]
fn os_tile_state() -> bool {
    // XGETBV needs OSXSAVE (CPUID leaf 1, ECX bit 27).
    if (std::arch::x86_64::__cpuid(1).ecx >> 27) & 1 == 0 {
        return false;
    }
    let (eax, _edx): (u32, u32);
    // SAFETY: OSXSAVE is set, so XGETBV with ECX = 0 (XCR0) is a valid instruction here; it
    // only writes EAX and EDX.
    unsafe {
        std::arch::asm!("xgetbv", in("ecx") 0u32, out("eax") eax, out("edx") _edx,
             options(nomem, nostack, preserves_flags));
    }
    eax & (3 << 17) == 3 << 17
}

/// Asks Linux for the AMX tile data state for this process (all its threads).
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn request_permission() -> bool {
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: arch_prctl with this code only changes the process's permitted xstate
    // features; it reads no memory of ours.
    let r = unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        )
    };
    r == 0
}

#[cfg(all(target_arch = "x86_64", not(target_os = "linux")))]
fn request_permission() -> bool {
    false
}

/// Whether /proc/cpuinfo lists every one of `flags` (Linux; false elsewhere): a second
/// opinion, independent of the probes above, for tests that must not skip a kernel the CPU
/// has.
pub fn cpuinfo_lists(flags: &[&str]) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/cpuinfo") else {
        return false;
    };
    let Some(line) = info.lines().find(|l| l.starts_with("flags")) else {
        return false;
    };
    let listed: Vec<&str> = line.split_whitespace().collect();
    flags.iter().all(|f| listed.contains(f))
}

/// Runs `$body` compiled for the best of the listed levels this CPU reaches (each with its
/// `target_feature` list), else as plain Rust. The same IEEE operations either way: Rust
/// does not contract `a * b + c` into an FMA or reorder float sums, so every version gives
/// the same bits.
macro_rules! multiversion {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?)
     for [$($level:ident => $features:literal),*] $body:block) => {
        $(#[$meta])*
        #[allow(clippy::too_many_arguments)]
        $vis fn $name($($arg: $ty),*) {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            fn imp($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                $crate::cpu::multiversion!(@levels ($($arg: $ty),*) [$($level => $features),*]);
            }
            imp($($arg),*)
        }
    };
    // One `if` per level, best first: the first the CPU reaches runs and returns.
    (@levels ($($arg:ident : $ty:ty),*)
     [$level:ident => $features:literal $(, $more:ident => $more_features:literal)*]) => {
        if $crate::cpu::level() >= $crate::cpu::Level::$level {
            #[target_feature(enable = $features)]
            #[allow(clippy::too_many_arguments)]
            unsafe fn fast($($arg: $ty),*) {
                imp($($arg),*)
            }
            // SAFETY: the CPU reaches this level, which has these features.
            return unsafe { fast($($arg),*) };
        }
        $crate::cpu::multiversion!(@levels ($($arg: $ty),*) [$($more => $more_features),*]);
    };
    (@levels ($($arg:ident : $ty:ty),*) []) => {};
}
pub(crate) use multiversion;

/// For tests that call AVX2 code directly (so that an AVX-512 machine tests it too): whether
/// this CPU can run it. Under `CI` a machine without AVX2 and FMA fails instead of skipping;
/// elsewhere the skip is said on stderr.
#[cfg(test)]
pub(crate) fn avx2_or_fail_in_ci() -> bool {
    let ok = has_avx2_fma();
    assert!(
        ok || std::env::var_os("CI").is_none(),
        "CI machines have AVX2 and FMA"
    );
    if !ok {
        eprintln!("SKIPPED: this CPU lacks avx2/fma");
    }
    ok
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The row kernels, epilogues and quantizer run (so their tests test) the probed level: a
    /// probe that fell short of what /proc/cpuinfo lists would leave the CPU's best vector
    /// code untested. (The product kernels check the same per kernel: `quant::tests`.)
    #[test]
    fn the_probed_level_is_the_one_cpuinfo_lists() {
        if !std::path::Path::new("/proc/cpuinfo").exists() {
            eprintln!("SKIPPED: no /proc/cpuinfo to compare the probe with");
            return;
        }
        let avx2 = cpuinfo_lists(&["avx2", "fma"]);
        let avx512 = avx2 && cpuinfo_lists(&["avx512f", "avx512bw", "avx512dq", "avx512vl"]);
        let listed = match (avx2, avx512) {
            (_, true) => Level::Avx512,
            (true, false) => Level::Avx2,
            _ => Level::Portable,
        };
        assert_eq!(level(), listed, "/proc/cpuinfo lists {listed:?}");
        assert_eq!(has_avx512f(), cpuinfo_lists(&["avx512f"]));
    }
}
