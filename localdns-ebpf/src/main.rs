//! localdns fast path: answers fresh cache hits for UDP/53 queries to the
//! listener addresses straight from the ingress hook (XDP or TC), and passes
//! everything else, untouched, to the stack and the `localdns-user` daemon.
//!
//! Fail open: any parse problem or doubt returns PASS (XDP_PASS / TC_ACT_OK)
//! before the packet is modified; after the first write, an error means
//! DROP (counted), never PASS of a half-rewritten packet. The daemon fills
//! the cache map with the same reply images it serves itself, so the kernel
//! never answers differently from the daemon.
//!
//! Kernel floor 5.15: direct packet access and helpers 5.15 has (a test
//! lists the helpers the object calls).
#![no_std]
#![no_main]
#![feature(asm_experimental_arch)]

mod answer;
mod packet;
mod query;

use aya_ebpf::{
    bindings::{BPF_F_MMAPABLE, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, xdp_action},
    btf_maps::{Array, LruHashMap, PerCpuArray, RingBuf},
    helpers::generated as h,
    macros::{btf_map, classifier, xdp},
    programs::{TcContext, XdpContext},
};
use localdns_common::{
    CACHE_MAP_ENTRIES, CacheKey, CacheValue, EVENT_PREFETCH, EVENT_QUERY, EntryHead,
    FAULT_STOP_CHECKED, FAULT_STOP_LOOKED_UP, FAULT_STOP_PARSED, FAULT_STOP_SUMMED, FLOOR_SLOTS,
    FloorLine, KEY_F_EDNS, LOG_RING_BYTES, LogEvent, MAX_LISTEN, MAX_QNAME, MAX_STAT_SLOTS,
    META_NEEDS_ROOM, Meta, STAT_ENTRIES, STAT_LOG_DROPPED, STAT_MISS, STAT_NOT_DNS,
    STAT_PASS_ERROR, STAT_PASS_ROOM, STAT_TRUNCATED, STAT_ZONE_BASE, Scratch, Slot, SmallValue,
    big_entries, cache_slots, csum_fold, jiffies_ns, slot_pair,
};

use answer::Verdict;
use packet::{Packet, Tc, Xdp, be16, ld16, ld64, opaque, ptr_at, st64};
use query::{IP_OFF, Listeners, MAX_QUERY, Off, Query, global};

// Map contracts (purpose, key, value, writer, reader, capacity, eviction) are
// documented on the MAP_* constants in localdns-common.
#[btf_map]
static LDNS_CACHE: Array<
    SmallValue,
    { cache_slots(CACHE_MAP_ENTRIES) as usize },
    { BPF_F_MMAPABLE as usize },
> = Array::new();
#[btf_map]
static LDNS_CACHE_BIG: LruHashMap<
    CacheKey,
    CacheValue,
    { big_entries(CACHE_MAP_ENTRIES) as usize },
> = LruHashMap::new();
#[btf_map]
static LDNS_STATS: PerCpuArray<u64, { STAT_ENTRIES as usize }> = PerCpuArray::new();
#[btf_map]
static LDNS_SCRATCH: PerCpuArray<Scratch, 1> = PerCpuArray::new();
#[btf_map]
static LDNS_LOG: RingBuf<LogEvent, { LOG_RING_BYTES as usize }> = RingBuf::new();
/// Benchmark floor only (`localdns_floor`); 1 entry when the daemon loads.
#[btf_map]
static LDNS_FLOOR: Array<FloorLine, 1, { BPF_F_MMAPABLE as usize }> = Array::new();
/// Never read here: declared so it is created and pinned with the others.
#[btf_map]
static LDNS_META: Array<Meta, 1> = Array::new();

// Set by the loader (EbpfLoader::override_global); see GLOBAL_* in
// localdns-common. Read through `query::global`, so the compiler cannot
// fold the zero initialisers; the verifier knows the loaded values (frozen
// .rodata) and removes dead branches, e.g. every fault-injection test.
#[unsafe(no_mangle)]
static LDNS_LISTEN4: [u32; MAX_LISTEN] = [0; MAX_LISTEN];
#[unsafe(no_mangle)]
static LDNS_VIEW4: [u8; MAX_LISTEN] = [0; MAX_LISTEN];
#[unsafe(no_mangle)]
static LDNS_LISTEN6: [u64; 2 * MAX_LISTEN] = [0; 2 * MAX_LISTEN];
#[unsafe(no_mangle)]
static LDNS_VIEW6: [u8; MAX_LISTEN] = [0; MAX_LISTEN];
#[unsafe(no_mangle)]
static LDNS_HASH_SEED: u64 = 0;
#[unsafe(no_mangle)]
static LDNS_FAULT: u32 = 0;
#[unsafe(no_mangle)]
static LDNS_FLOOR_LINES: u32 = 0;
#[unsafe(no_mangle)]
static LDNS_SLOT_MASK: u32 = 0;
#[unsafe(no_mangle)]
static LDNS_TICK_NS: u64 = 0;
#[unsafe(no_mangle)]
static LDNS_JIFFY_BASE: u64 = 0;

#[inline(always)]
fn listeners() -> Listeners {
    Listeners {
        v4: &LDNS_LISTEN4,
        view4: &LDNS_VIEW4,
        v6: &LDNS_LISTEN6,
        view6: &LDNS_VIEW6,
    }
}

#[inline(always)]
fn count(idx: u32) {
    if let Some(p) = LDNS_STATS.get_ptr_mut(idx) {
        unsafe { *p += 1 };
    }
}

/// The query's address family, from the Ethertype: IPv4, IPv6, or not ours.
#[inline(always)]
fn family<P: Packet>(p: &P) -> Option<bool> {
    let eth = ptr_at(p, 0, IP_OFF, STAT_NOT_DNS).ok()?;
    match ld16(unsafe { eth.add(12) }) {
        t if t == 0x0800u16.to_be() => Some(false),
        t if t == 0x86ddu16.to_be() => Some(true),
        _ => None, // ARP, VLAN-tagged, ...
    }
}

/// Answers a query of either family, or says why not.
#[inline(always)]
fn try_answer<P: Packet>(p: &P) -> Verdict {
    match family(p) {
        Some(false) => answer::<P, false>(p),
        Some(true) => answer::<P, true>(p),
        None => Verdict::Pass(STAT_NOT_DNS),
    }
}

/// Parses the query and, on a fresh hit, turns the packet into the reply.
#[inline(always)]
fn answer<P: Packet, const V6: bool>(p: &P) -> Verdict {
    let Some(scratch) = LDNS_SCRATCH.get_ptr_mut(0) else {
        return Verdict::Pass(STAT_PASS_ERROR);
    };
    let fault = global(&LDNS_FAULT);
    let q = match query::parse::<P, V6>(p, &listeners(), global(&LDNS_HASH_SEED), scratch) {
        Ok(q) => q,
        Err(stat) => return Verdict::Pass(stat),
    };
    if fault == FAULT_STOP_PARSED {
        return Verdict::Pass(STAT_MISS);
    }
    // Small class first: nearly every entry is there, in one of two slots
    // known from the hash alone, so both first lines load at once.
    if let Some(vp) = small_slot(q.hash) {
        return hit::<P, V6, SmallValue>(p, &q, vp, scratch, fault);
    }
    let key = CacheKey { hash: q.hash };
    if let Some(vp) = LDNS_CACHE_BIG.get_ptr_mut(key) {
        return hit::<P, V6, CacheValue>(p, &q, vp, scratch, fault);
    }
    Verdict::Pass(STAT_MISS)
}

/// The slot of `LDNS_CACHE` holding the entry of key hash `hash`, if one
/// of its two slots does (by the hash; [`answer::check`] compares the rest).
#[inline(always)]
fn small_slot(hash: u64) -> Option<*mut SmallValue> {
    let (i, j) = slot_pair(hash, global(&LDNS_SLOT_MASK));
    let a = LDNS_CACHE.get_ptr_mut(i)?;
    let b = LDNS_CACHE.get_ptr_mut(j)?;
    // Both loads are issued before either compare.
    let (ha, hb) = unsafe { ((*a).hash, (*b).hash) };
    if ha == hash {
        Some(a)
    } else if hb == hash {
        Some(b)
    } else {
        None
    }
}

/// Answers from the entry `vp` of either size class, or says why not.
#[inline(always)]
fn hit<P: Packet, const V6: bool, V: Slot>(
    p: &P,
    q: &Query,
    vp: *mut V,
    scratch: *mut Scratch,
    fault: u32,
) -> Verdict {
    if fault == FAULT_STOP_LOOKED_UP {
        return Verdict::Pass(STAT_MISS);
    }
    let v = unsafe { &*vp };
    let now = clock_ns();
    let fresh = match answer::check(q, v, now, scratch) {
        Ok(f) => f,
        Err(stat) => return Verdict::Pass(stat),
    };
    if fault == FAULT_STOP_CHECKED {
        return Verdict::Pass(STAT_MISS);
    }
    if fresh.truncate {
        let verdict = answer::truncated::<P, V6, V>(p, q, v, &fresh);
        count_answer::<V6>(&verdict, v.head());
        return verdict;
    }
    let stamp = match answer::checksum::<P, V6, V>(p, q, v, &fresh) {
        Ok(s) => s,
        Err(stat) => return Verdict::Pass(stat),
    };
    if fault == FAULT_STOP_SUMMED {
        return Verdict::Pass(STAT_MISS);
    }
    let verdict = answer::rewrite::<P, V6, V>(p, q, v, &fresh, &stamp, scratch, fault);
    count_answer::<V6>(&verdict, v.head());
    if matches!(verdict, Verdict::Reply { .. }) {
        let rflags = u16::from_be(stamp.rflags);
        if v.head().log != 0 {
            log_hit::<P, V6>(p, q, now, fresh.dns_len, rflags, EVENT_QUERY);
        }
        if prefetch_due(unsafe { V::head_ptr(vp) }, now) {
            log_hit::<P, V6>(p, q, now, fresh.dns_len, rflags, EVENT_PREFETCH);
        }
    }
    verdict
}

/// `CLOCK_MONOTONIC_COARSE`, the daemon's cache clock: from jiffies (one
/// load, no helper call) when the daemon calibrated them at load, else
/// from the helper. The branch is on frozen `.rodata`: the verifier keeps
/// only one side.
#[inline(always)]
fn clock_ns() -> u64 {
    let tick = global(&LDNS_TICK_NS);
    if tick == 0 {
        return unsafe { h::bpf_ktime_get_coarse_ns() };
    }
    jiffies_ns(
        unsafe { h::bpf_jiffies64() },
        tick,
        global(&LDNS_JIFFY_BASE),
    )
}

/// Counts a hit in the entry's prefetch window; true once, when the count
/// reaches the entry's prefetch amount (the daemon then refreshes it and
/// the new value starts from 0).
#[inline(always)]
fn prefetch_due(vp: *mut EntryHead, now: u64) -> bool {
    let v = unsafe { &*vp };
    let amount = v.prefetch_amount;
    if amount == 0 || now < v.insert_ns + u64::from(v.prefetch_ms) * 1_000_000 {
        return false;
    }
    let hits = v.hits.wrapping_add(1);
    unsafe { core::ptr::write_volatile(core::ptr::addr_of_mut!((*vp).hits), hits) };
    hits == amount
}

/// Counts an answer under the entry's stat slot and the family: the only
/// counter update of a hit (see `STAT_ZONE_BASE`).
#[inline(always)]
fn count_answer<const V6: bool>(verdict: &Verdict, v: &EntryHead) {
    if matches!(verdict, Verdict::Reply { .. }) {
        let slot = u32::from(v.stat) & (MAX_STAT_SLOTS - 1);
        count(STAT_ZONE_BASE + (slot << 1) + u32::from(V6));
    }
}

/// Emits a query-log (or prefetch) event straight into the ring buffer (no
/// stack copy).
/// The reply still carries the question as the client sent it.
#[inline(always)]
fn log_hit<P: Packet, const V6: bool>(
    p: &P,
    q: &Query,
    now: u64,
    reply_len: usize,
    rflags: u16,
    kind: u8,
) {
    let o = Off::of(V6);
    let Some(mut slot) = LDNS_LOG.reserve(0) else {
        count(STAT_LOG_DROPPED);
        return;
    };
    let ev = slot.as_mut_ptr();
    // The reply's addresses and ports are swapped: the client is the
    // destination now.
    let Ok(head) = ptr_at(p, 0, o.q, STAT_LOG_DROPPED) else {
        slot.discard(0);
        count(STAT_LOG_DROPPED);
        return;
    };
    unsafe {
        (*ev).ktime_ns = now;
        (*ev).addr = [0; 16];
        if V6 {
            core::ptr::copy_nonoverlapping(head.add(IP_OFF + 24), (*ev).addr.as_mut_ptr(), 16);
        } else {
            core::ptr::copy_nonoverlapping(head.add(IP_OFF + 16), (*ev).addr.as_mut_ptr(), 4);
        }
        (*ev).family = if V6 { 6 } else { 4 };
        (*ev).sport = be16(head.add(o.udp + 2));
        (*ev).id = be16(head.add(o.dns));
        (*ev).qtype = q.qtype;
        (*ev).qclass = q.qclass;
        (*ev).query_len = (q.dns_end - o.dns) as u16;
        (*ev).reply_len = reply_len as u16;
        (*ev).udp_size = if q.kflags & KEY_F_EDNS != 0 {
            q.udp_size
        } else {
            0
        };
        (*ev).rflags = rflags;
        (*ev).view = q.view;
        (*ev).kflags = q.kflags;
        (*ev).qname_len = q.qlen as u8;
        (*ev).kind = kind;
        (*ev)._pad = [0; 3];
    }
    // Name words: QTYPE, QCLASS and the tail follow the name in the reply,
    // so whole words can be read.
    let qn = unsafe { (*ev).qname.as_mut_ptr() };
    let nwords = q.qlen.div_ceil(8);
    for i in 0..(MAX_QNAME + 1) / 8 {
        if i >= opaque(nwords) {
            break;
        }
        let Ok(w) = ptr_at(p, o.q + i * 8, 8, STAT_LOG_DROPPED) else {
            slot.discard(0);
            count(STAT_LOG_DROPPED);
            return;
        };
        st64(unsafe { qn.add(i * 8) }, ld64(w));
    }
    slot.submit(0);
}

/// Counts a verdict; `room` is set when the packet is passed for want of
/// room to grow (the XDP program then marks it for the TC companion).
#[inline(always)]
fn account(v: &Verdict) {
    match v {
        // Hits were counted under their stat slot already.
        Verdict::Reply { truncated: false } => {}
        Verdict::Reply { truncated: true } => count(STAT_TRUNCATED),
        Verdict::Pass(stat) | Verdict::Drop(stat) => count(*stat),
    }
}

#[xdp]
// Inlined into the macro's entry point: no call per packet.
#[inline(always)]
pub fn localdns_xdp(ctx: XdpContext) -> u32 {
    let verdict = try_answer(&Xdp(&ctx));
    account(&verdict);
    match verdict {
        Verdict::Reply { .. } => xdp_action::XDP_TX,
        Verdict::Pass(STAT_PASS_ROOM) => {
            mark_needs_room(&ctx);
            xdp_action::XDP_PASS
        }
        Verdict::Pass(_) => xdp_action::XDP_PASS,
        Verdict::Drop(_) => xdp_action::XDP_DROP,
    }
}

/// Leaves [`META_NEEDS_ROOM`] in the packet's metadata, where the TC
/// companion program looks for it.
#[inline(always)]
fn mark_needs_room(ctx: &XdpContext) {
    if unsafe { h::bpf_xdp_adjust_meta(ctx.ctx, -4) } != 0 {
        return;
    }
    let (meta, data) = (ctx.metadata(), ctx.data());
    if meta + 4 > data {
        return;
    }
    unsafe { (meta as *mut u32).write_unaligned(META_NEEDS_ROOM) };
}

/// Benchmark ceiling only (never attached by the daemon): turns every UDP/53
/// query to a listener address straight around as a "reply" (QR set), so
/// the harness can measure what the machine delivers with zero DNS work.
#[xdp]
pub fn localdns_null(ctx: XdpContext) -> u32 {
    match try_null(&Xdp(&ctx), 0) {
        Ok(()) => xdp_action::XDP_TX,
        Err(_) => xdp_action::XDP_PASS,
    }
}

/// Benchmark floor only (never attached by the daemon): the null responder
/// plus [`GLOBAL_FLOOR_LINES`](localdns_common::GLOBAL_FLOOR_LINES) reads
/// of per-name memory, the least any cache lookup needs. The slot is a
/// hash of the 8 bytes after the qname's first length byte (the bench's
/// warm-set names, `h<i>.bench.test`, differ there); the lines read (all
/// zero) go into the reply's flags, so the reply waits for them as a real
/// hit's copy does.
#[xdp]
pub fn localdns_floor(ctx: XdpContext) -> u32 {
    let p = Xdp(&ctx);
    const O: Off = Off::of(false);
    let Ok(f) = ptr_at(&p, 0, O.q + 9, STAT_NOT_DNS) else {
        return xdp_action::XDP_PASS;
    };
    let lines = global(&LDNS_FLOOR_LINES);
    // The hash's top bits index the slots.
    const _: () = assert!(FLOOR_SLOTS.is_power_of_two());
    const SHIFT: u32 = 64 - FLOOR_SLOTS.trailing_zeros();
    let slot =
        (ld64(unsafe { f.add(O.q + 1) }).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> SHIFT) as u32;
    let mut z = 0u64;
    let mut l = 0;
    while l < 8 && l < lines {
        if let Some(v) = LDNS_FLOOR.get(slot * lines + l) {
            z |= v.words[0];
        }
        l += 1;
    }
    match try_null(&p, z as u16) {
        Ok(()) => xdp_action::XDP_TX,
        Err(_) => xdp_action::XDP_PASS,
    }
}

/// Turns the query around; `extra` (zero) is or-ed into the flags.
#[inline(always)]
fn try_null<P: Packet>(p: &P, extra: u16) -> Result<(), u32> {
    const O: Off = Off::of(false);
    const UDP_OFF: usize = O.udp;
    const DNS_OFF: usize = O.dns;
    let f = ptr_at(p, 0, O.q, STAT_NOT_DNS)?;
    unsafe {
        if ld16(f.add(12)) != 0x0800u16.to_be()
            || *f.add(IP_OFF) != 0x45
            || *f.add(IP_OFF + 9) != 17
        {
            return Err(STAT_NOT_DNS);
        }
        let daddr = (f.add(IP_OFF + 16) as *const u32).read_unaligned();
        if !global(&LDNS_LISTEN4).contains(&daddr) {
            return Err(STAT_NOT_DNS);
        }
        if be16(f.add(UDP_OFF + 2)) != 53 || *f.add(DNS_OFF + 2) & 0x80 != 0 {
            return Err(STAT_NOT_DNS);
        }
        let mut tmp = [0u8; 6];
        core::ptr::copy_nonoverlapping(f, tmp.as_mut_ptr(), 6);
        core::ptr::copy_nonoverlapping(f.add(6), f, 6);
        core::ptr::copy_nonoverlapping(tmp.as_ptr(), f.add(6), 6);
        let mut a = [0u8; 4];
        core::ptr::copy_nonoverlapping(f.add(IP_OFF + 12), a.as_mut_ptr(), 4);
        core::ptr::copy_nonoverlapping(f.add(IP_OFF + 16), f.add(IP_OFF + 12), 4);
        core::ptr::copy_nonoverlapping(a.as_ptr(), f.add(IP_OFF + 16), 4);
        let sp = ld16(f.add(UDP_OFF));
        (f.add(UDP_OFF) as *mut u16).write_unaligned(ld16(f.add(UDP_OFF + 2)));
        (f.add(UDP_OFF + 2) as *mut u16).write_unaligned(sp);
        // Set QR; patch the UDP checksum incrementally (RFC 1624). Address
        // and port swaps leave the sum unchanged.
        let old = ld16(f.add(DNS_OFF + 2));
        let new = old | 0x8000u16.to_be() | extra;
        (f.add(DNS_OFF + 2) as *mut u16).write_unaligned(new);
        let c = ld16(f.add(UDP_OFF + 6));
        if c != 0 {
            let sum = (!c) as u64 + (!old) as u64 + new as u64;
            (f.add(UDP_OFF + 6) as *mut u16).write_unaligned(!csum_fold(sum));
        }
    }
    Ok(())
}

/// TC mode: every query to a listener address.
#[classifier]
// Inlined into the macro's entry point: no call per packet.
#[inline(always)]
pub fn localdns_tc(ctx: TcContext) -> i32 {
    tc_answer(&ctx)
}

/// The TC companion of the XDP modes: answers only the queries the XDP
/// program passed for want of room to grow the frame (marked in the
/// metadata); everything else goes on untouched and uncounted.
#[classifier]
// Inlined into the macro's entry point: no call per packet.
#[inline(always)]
pub fn localdns_tc_room(ctx: TcContext) -> i32 {
    let skb = ctx.skb.skb;
    let (meta, data) = unsafe { ((*skb).data_meta as usize, (*skb).data as usize) };
    if meta + 4 > data || unsafe { (meta as *const u32).read_unaligned() } != META_NEEDS_ROOM {
        return TC_ACT_OK;
    }
    tc_answer(&ctx)
}

#[inline(always)]
fn tc_answer(ctx: &TcContext) -> i32 {
    let p = Tc(ctx);
    // Small queries are normally linear already; pull only when not.
    if p.data_end() - p.data() < p.frame_len() {
        let max = Off::of(true).dns + MAX_QUERY;
        let len = if p.frame_len() > max {
            max
        } else {
            p.frame_len()
        };
        if unsafe { h::bpf_skb_pull_data(ctx.skb.skb, len as u32) } != 0 {
            count(STAT_PASS_ERROR);
            return TC_ACT_OK;
        }
    }
    let verdict = try_answer(&p);
    account(&verdict);
    match verdict {
        Verdict::Reply { .. } => {
            // Out of the interface it came in on, back to the client.
            let ifindex = unsafe { (*ctx.skb.skb).ifindex };
            unsafe { h::bpf_redirect(ifindex, 0) as i32 }
        }
        Verdict::Pass(_) => TC_ACT_OK,
        Verdict::Drop(_) => TC_ACT_SHOT,
    }
}

const _: () = assert!(TC_ACT_REDIRECT == 7);

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
