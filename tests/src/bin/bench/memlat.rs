//! This machine's random-access memory latency, for scale next to the
//! per-hit cost: a dependent pointer chase over a buffer of 4 KiB pages
//! (transparent huge pages refused, as the kernel's vmalloc'd map memory
//! has none), one pointer per slot, slots in a random cycle. A hit on an
//! entry that went cold since its last hit pays at least one such access.

use std::time::Instant;

use rand::seq::SliceRandom;
use serde_json::{Value, json};

/// (buffer bytes, slot stride): 1 MiB fits the L2, 8 MiB is about the
/// small map at 20,000 entries, 2 GiB at one slot per page is a TLB miss
/// and, past the last-level cache, a DRAM access each time.
const SPANS: [(usize, usize); 3] = [(1 << 20, 256), (8 << 20, 256), (2 << 30, 4096)];
/// Accesses timed per span (bounded: ~2 s at 400 ns).
const ACCESSES: usize = 5_000_000;

/// `[{bytes, stride, ns_per_access}]`.
pub(crate) fn measure() -> Value {
    let rows: Vec<Value> = SPANS
        .iter()
        .filter_map(|&(bytes, stride)| {
            let ns = chase(bytes, stride)?;
            eprintln!(
                "[bench] memory latency over {} KiB: {ns:.0} ns",
                bytes >> 10
            );
            Some(json!({ "bytes": bytes, "stride": stride, "ns_per_access": ns }))
        })
        .collect();
    json!(rows)
}

/// Mean ns per dependent load over `bytes` in slots `stride` apart, or
/// None if the buffer cannot be mapped.
fn chase(bytes: usize, stride: usize) -> Option<f64> {
    // SAFETY: a fresh private anonymous mapping, unmapped below; every
    // access stays inside it (slot offsets < bytes, 8-byte aligned).
    unsafe {
        let base = libc::mmap(
            std::ptr::null_mut(),
            bytes,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        if base == libc::MAP_FAILED {
            return None;
        }
        libc::madvise(base, bytes, libc::MADV_NOHUGEPAGE);
        let base = base.cast::<u8>();
        let slots = bytes / stride;
        let mut order: Vec<usize> = (0..slots).collect();
        order.shuffle(&mut rand::rng());
        for w in 0..slots {
            let from = base.add(order[w] * stride).cast::<usize>();
            *from = base.add(order[(w + 1) % slots] * stride) as usize;
        }
        let mut p = base.add(order[0] * stride) as usize;
        // One lap (bounded) to settle, then the timed accesses.
        for _ in 0..slots.min(ACCESSES) {
            p = *(p as *const usize);
        }
        let t = Instant::now();
        for _ in 0..ACCESSES {
            p = *(p as *const usize);
        }
        let ns = t.elapsed().as_nanos() as f64 / ACCESSES as f64;
        std::hint::black_box(p);
        libc::munmap(base.cast(), bytes);
        Some(ns)
    }
}
