//! The program's clock. The cache ages entries by `CLOCK_MONOTONIC_COARSE`
//! on both sides; the program reads it as jiffies (`bpf_jiffies64`, which
//! the verifier inlines into one load) scaled by the tick and shifted by a
//! base the daemon measures here, at load. A helper call
//! (`bpf_ktime_get_coarse_ns`) cost a sixth of a hit where every kernel
//! return goes through a mitigation thunk (profile section 10).
//!
//! Why the two agree, and by how much. A jiffy is exactly one tick of
//! monotonic time: the jiffies are brought up to date at every tick (or,
//! after an idle CPU wakes, caught up to the last tick boundary before
//! now), so at an update the boundary `S = jiffies × tick + C` (C fixed
//! for the boot) lies less than a tick before the true time `T`. The
//! coarse clock is updated in the same interrupt, by whole accumulation
//! intervals of one tick, so it lies less than a tick before `T` too.
//! Hence `off = coarse − jiffies × tick` stays inside `(C − tick, C +
//! tick)`, between updates as well (both stand still). Measured here: two
//! values a tick apart (the larger after an idle wake-up), drifting with
//! NTP's frequency correction (some 15 ppm) across that window and round.
//!
//! The base is the smallest `off` seen at calibration plus two ticks:
//! that is more than `C + tick`, so the program's clock is never behind
//! the daemon's (an entry never lives in the kernel past its TTL), and
//! at most [`AHEAD_TICKS`] ticks ahead of it. Entries live whole seconds:
//! one may leave the fast path a few ms early (the daemon answers it
//! then), and a reply whose TTL is counted down across a whole second
//! inside that margin carries the TTL the daemon would give a few ms
//! later: one lower.
//!
//! The pair is read from `/proc/timer_list` (root only; masked in
//! unprivileged containers) between two reads of the coarse clock that see
//! the same tick. When that fails the program keeps the helper.

use std::{fs::File, io::Read};

use rustix::time::{ClockId, clock_getres};

use crate::cache::mono_ns;

/// Where the kernel prints its jiffies (`jiffies: N`, once per CPU).
pub const TIMER_LIST: &str = "/proc/timer_list";
/// Samples taken (the smallest base is kept: see the module's text).
const SAMPLES: usize = 8;
/// Attempts at the samples, each inside one tick.
const TRIES: u32 = 100;
/// Pause between attempts: not a divisor of any tick length.
const SPREAD: std::time::Duration = std::time::Duration::from_micros(1_300);
/// Bytes of the file read at most per sample (the first CPU's section).
const READ_MAX: usize = 256 * 1024;

/// The program's clock runs at most this many ticks ahead of the daemon's
/// (never behind): the module's text gives the bound.
pub const AHEAD_TICKS: u64 = 4;

#[derive(Debug, thiserror::Error)]
pub enum ClockError {
    #[error("reading {path}")]
    Read {
        path: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{0} has no `jiffies:` line")]
    NoJiffies(&'static str),
    #[error("the coarse clock's resolution, {0} ns, is not a tick of HZ 100 to 1000")]
    Tick(u64),
    #[error("{SAMPLES} reads of {0} within one tick not had in {TRIES} tries")]
    Unsteady(&'static str),
}

/// The load-time globals `GLOBAL_TICK_NS` and `GLOBAL_JIFFY_BASE`
/// (`localdns_common`); [`JiffyClock::HELPER`] keeps the helper.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JiffyClock {
    pub tick_ns: u64,
    pub base_ns: u64,
}

impl JiffyClock {
    /// Tick 0: the program calls `bpf_ktime_get_coarse_ns`.
    pub const HELPER: JiffyClock = JiffyClock {
        tick_ns: 0,
        base_ns: 0,
    };

    /// The coarse clock in ns at `jiffies`.
    pub fn at(&self, jiffies: u64) -> u64 {
        localdns_common::jiffies_ns(jiffies, self.tick_ns, self.base_ns)
    }

    /// How far the program's clock may run ahead of the daemon's
    /// `CLOCK_MONOTONIC_COARSE` (0 with the helper: the same clock).
    pub fn max_ahead_ns(&self) -> u64 {
        AHEAD_TICKS * self.tick_ns
    }
}

/// The program's clock for this boot, measured once per process; where
/// that fails, [`JiffyClock::HELPER`] (logged once).
pub fn program_clock() -> JiffyClock {
    static CLOCK: std::sync::OnceLock<JiffyClock> = std::sync::OnceLock::new();
    *CLOCK.get_or_init(|| match calibrate() {
        Ok(c) => {
            tracing::debug!(tick_ns = c.tick_ns, "fast path clock: jiffies");
            c
        }
        Err(e) => {
            tracing::warn!(error = %e, "fast path clock: jiffies not calibrated, calling bpf_ktime_get_coarse_ns per hit");
            JiffyClock::HELPER
        }
    })
}

/// Measures the clock of this boot from [`TIMER_LIST`].
pub fn calibrate() -> Result<JiffyClock, ClockError> {
    let res = clock_getres(ClockId::MonotonicCoarse);
    let tick_ns = res.tv_sec as u64 * 1_000_000_000 + res.tv_nsec as u64;
    if !(1_000_000..=10_000_000).contains(&tick_ns) {
        return Err(ClockError::Tick(tick_ns));
    }
    let (mut least, mut seen) = (u64::MAX, 0);
    for _ in 0..TRIES {
        let before = mono_ns();
        let jiffies = read_jiffies(TIMER_LIST)?;
        let steady = mono_ns() == before;
        std::thread::sleep(SPREAD);
        if !steady {
            continue; // a tick came between: the pair may be a tick apart
        }
        least = least.min(before.wrapping_sub(jiffies.wrapping_mul(tick_ns)));
        seen += 1;
        if seen == SAMPLES {
            // Never behind: the window of `off` is two ticks wide.
            let base_ns = least.wrapping_add(2 * tick_ns);
            return Ok(JiffyClock { tick_ns, base_ns });
        }
    }
    Err(ClockError::Unsteady(TIMER_LIST))
}

/// The first `jiffies:` value of the file, read only as far as needed.
fn read_jiffies(path: &'static str) -> Result<u64, ClockError> {
    let read = |source| ClockError::Read { path, source };
    let mut f = File::open(path).map_err(read)?;
    let mut text = Vec::with_capacity(8192);
    let mut chunk = [0u8; 4096];
    loop {
        let n = f.read(&mut chunk).map_err(read)?;
        text.extend_from_slice(&chunk[..n]);
        if let Some(j) = jiffies_line(&text) {
            return Ok(j);
        }
        if n == 0 || text.len() >= READ_MAX {
            return Err(ClockError::NoJiffies(path));
        }
    }
}

/// The value of the first complete `jiffies: N` line of `text`.
fn jiffies_line(text: &[u8]) -> Option<u64> {
    // Only lines followed by a newline: the last may be cut off.
    let whole = &text[..text.iter().rposition(|&b| b == b'\n')?];
    whole.split(|&b| b == b'\n').find_map(|l| {
        let v = l.strip_prefix(b"jiffies: ")?;
        std::str::from_utf8(v).ok()?.trim().parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_first_whole_jiffies_line() {
        let t = b"Timer List Version: v0.9\nnow at 16754157176275 nsecs\n  .idle_jiffies   : 4299080755\n  .last_jiffies   : 4299080756\njiffies: 4299081078\n\ncpu: 1\njiffies: 4299081079\n";
        assert_eq!(jiffies_line(t), Some(4_299_081_078));
        // Not yet the whole line: wait for more of the file.
        assert_eq!(jiffies_line(b"cpu: 0\njiffies: 42990"), None);
        assert_eq!(jiffies_line(b"  .idle_jiffies   : 1\n"), None);
    }

    #[test]
    fn clock_maps_jiffies_onto_the_coarse_clock() {
        let c = JiffyClock {
            tick_ns: 4_000_000,
            base_ns: 5u64.wrapping_sub(4_000_000 * 10),
        };
        assert_eq!(c.at(10), 5);
        assert_eq!(c.at(11), 4_000_005);
    }

    /// On this machine (root, as CI runs) the calibration succeeds, and the
    /// clock it gives is never behind the coarse clock, nor more than
    /// [`AHEAD_TICKS`] ahead, over reads spaced to let the CPU idle (the
    /// jiffies catch up late then).
    #[test]
    fn calibration_agrees_with_the_coarse_clock() {
        if !rustix::process::geteuid().is_root() {
            eprintln!("skipped: {TIMER_LIST} is root only");
            return;
        }
        let c = calibrate().expect("calibration");
        for _ in 0..20 {
            let before = mono_ns();
            let j = read_jiffies(TIMER_LIST).unwrap();
            let after = mono_ns();
            let t = c.at(j);
            assert!(
                t >= before && t <= after + c.max_ahead_ns(),
                "{t} not within {AHEAD_TICKS} ticks ahead of {before}..{after}"
            );
            // Long enough for the CPU to idle: the jiffies may lag then.
            std::thread::sleep(std::time::Duration::from_millis(3));
        }
    }
}
