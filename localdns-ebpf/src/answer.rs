//! Turning a parsed query into the reply from a cache entry, in place:
//! check the entry, compute the UDP checksum, save what the reply will
//! overwrite, then rewrite. Before the first write an error means PASS
//! (the packet is untouched); after it, DROP. The one exception is a
//! generation mismatch (the entry was replaced while being copied): the
//! saved bytes are put back, so the packet passed on is the query exactly
//! as it arrived. An answer larger than the client accepts becomes a TC=1
//! reply, as the daemon sends it.

use localdns_common::{
    FAULT_AFTER_COPY, FAULT_AFTER_RESIZE, FAULT_NO_GENERATION_CHECK, FAULT_RACE,
    FAULT_RACE_NO_UNDO, KEY_F_DO, KEY_F_EDNS, MAX_KERNEL_TTL, SAVE_MAX, SLOT_BUSY, STAT_DROP_ERROR,
    STAT_EXPIRED, STAT_PASS_COLLISION, STAT_PASS_ERROR, STAT_PASS_RACE, STAT_PASS_ROOM,
    STAT_PASS_SIZE, Scratch, Slot, csum_fold, name_span, whole_secs,
};

use crate::packet::{
    Packet, ResizeError, launder, ld16, ld32, ld64, opaque, ptr_at, st16, st32, st64, swap16,
};
use crate::query::{F_AD, F_CD, F_QR, F_RA, F_RD, F_TC, IP_OFF, Off, Query};

/// Compiler barrier: memory accesses are not moved across it (BPF has no
/// fence instruction, and LLVM's BPF backend cannot lower
/// `compiler_fence`). Orders the generation reads around the copy.
#[inline(always)]
fn barrier() {
    // SAFETY: an empty asm block without `nomem` clobbers nothing but
    // counts as a memory access for the compiler.
    unsafe { core::arch::asm!("", options(nostack, preserves_flags)) }
}

/// What the hook does with the packet.
pub enum Verdict {
    /// Send the rewritten packet back to the client; `truncated`: a TC=1
    /// reply.
    Reply { truncated: bool },
    /// Pass it on untouched, counted under the stat.
    Pass(u32),
    /// Drop it (it was partly rewritten), counted under the stat.
    Drop(u32),
}

/// A fresh entry that fits the query.
pub struct Fresh {
    /// The entry's generation when the checks began.
    pub generation: u64,
    /// TTL to write into every record.
    pub ttl_now: u32,
    pub tail_len: usize,
    pub ttl_count: usize,
    /// Length of the reply's DNS message.
    pub dns_len: usize,
    /// The answer is larger than the client accepts: reply TC=1 instead.
    pub truncate: bool,
}

/// Is the entry fresh, really for this name and consistent? The query's
/// name is in `scratch` (lower-cased words, see
/// [`crate::query::take_name`]).
#[inline(always)]
pub fn check<V: Slot>(q: &Query, v: &V, now: u64, scratch: *mut Scratch) -> Result<Fresh, u32> {
    let slot = unsafe { &raw mut (*scratch).launder };
    let name = unsafe { (*scratch).qname.as_ptr() };
    let h = v.head();
    let generation = unsafe { core::ptr::read_volatile(&h.generation) };
    if generation == SLOT_BUSY {
        return Err(STAT_PASS_RACE);
    }
    barrier();
    // The map key is only a hash: the type, class, name length, view and
    // flags are compared here, the name below.
    let key = unsafe { (&raw const h.key).cast::<u64>().read() };
    // The entry's class holds names of at most V::SPAN_MAX bytes.
    if key != q.key || name_span(q.qlen) > V::SPAN_MAX {
        return Err(STAT_PASS_COLLISION);
    }
    // Both sides read the coarse clock, so `now` is never behind the
    // insert; if it were, the entry would be new.
    let age_ns = now.saturating_sub(h.insert_ns);
    if h.ttl > MAX_KERNEL_TTL || age_ns >= h.ttl as u64 * 1_000_000_000 {
        return Err(STAT_EXPIRED);
    }
    // age_ns < 2^50 now: the range of whole_secs.
    let elapsed = whole_secs(age_ns);
    let nwords = launder(slot, q.qlen.div_ceil(8));
    let data = v.data_ptr();
    let mut diff = 0u64;
    for i in 0..V::SPAN_MAX / 8 {
        if i >= opaque(nwords) {
            break;
        }
        // Both names are zero-padded to whole words.
        diff |= ld64(unsafe { name.add(i * 8) }) ^ ld64(unsafe { data.add(i * 8) });
    }
    if diff != 0 {
        return Err(STAT_PASS_COLLISION);
    }
    let tail_len = h.tail_len as usize;
    let ttl_count = h.ttl_count as usize;
    // Every tail holds at least one record, so at least 11 bytes.
    if !(8..=V::TAIL_MAX).contains(&tail_len) || ttl_count > V::TTLS {
        return Err(STAT_PASS_ERROR);
    }
    let dns_len = 12 + q.qlen + 4 + tail_len;
    Ok(Fresh {
        generation,
        ttl_now: h.ttl - elapsed as u32,
        tail_len,
        ttl_count,
        dns_len,
        truncate: dns_len > q.client_max,
    })
}

/// What the reply's headers get besides its body.
pub struct Stamp {
    /// UDP checksum.
    pub udp_csum: u16,
    /// DNS header flags, network order.
    pub rflags: u16,
}

/// The one's-complement sum of the addresses and ports (unchanged by their
/// swap) and the query's ID.
#[inline(always)]
fn sum_ends<P: Packet, const V6: bool>(p: &P) -> Result<(u64, u16, u16), u32> {
    let o = Off::of(V6);
    let head = ptr_at(p, 0, o.q, STAT_PASS_ERROR)?;
    let (first, words) = if V6 {
        (IP_OFF + 8, 16)
    } else {
        (IP_OFF + 12, 4)
    };
    let mut sum: u64 = 0;
    for i in 0..16 {
        if i < words {
            sum += ld16(unsafe { head.add(first + 2 * i) }) as u64;
        }
    }
    sum += ld16(unsafe { head.add(o.udp) }) as u64 + ld16(unsafe { head.add(o.udp + 2) }) as u64;
    let id = ld16(unsafe { head.add(o.dns) });
    let qf = ld16(unsafe { head.add(o.dns + 2) });
    Ok((sum, id, qf))
}

/// The reply's UDP checksum, from the entry's partial sum plus what the
/// query contributes (RFC 1624 style, no pass over the reply's bytes),
/// and its header flags: a recursive service's (the daemon's
/// `wire::reply_flags`): the entry's QR, RA, RCODE; RD and CD from the
/// query; AD only when the query set DO or AD (RFC 6840 §5.8).
#[inline(always)]
pub fn checksum<P: Packet, const V6: bool, V: Slot>(
    p: &P,
    q: &Query,
    v: &V,
    f: &Fresh,
) -> Result<Stamp, u32> {
    let v = v.head();
    let (ends, id, qf) = sum_ends::<P, V6>(p)?;
    let ad_wanted = q.kflags & KEY_F_DO != 0 || qf & F_AD.to_be() != 0;
    let base = if ad_wanted {
        v.flags_be
    } else {
        v.flags_be & !F_AD.to_be()
    };
    let rflags = base | (qf & (F_RD | F_CD).to_be());
    let ttl_be = f.ttl_now.to_be();
    let ttl_w = csum_fold((ttl_be & 0xffff) as u64 + (ttl_be >> 16) as u64) as u64;
    let ttl_sum = v.ttl_even as u64 * ttl_w + v.ttl_odd as u64 * swap16(ttl_w as u16) as u64;
    let udp_len_n = ((8 + f.dns_len) as u16).to_be() as u64;
    let sum = v.csum_partial as u64
        + id as u64
        + rflags as u64
        + question_sum(q)
        + ttl_sum
        + ends
        + 17u16.to_be() as u64
        + 2 * udp_len_n;
    Ok(Stamp {
        udp_csum: finish(sum),
        rflags,
    })
}

/// The question's share of the checksum: the name as sent, then QTYPE and
/// QCLASS (at an odd offset when the name's length is odd).
#[inline(always)]
fn question_sum(q: &Query) -> u64 {
    let qt = if q.qlen & 1 == 1 {
        swap16(csum_fold(q.qt_sum)) as u64
    } else {
        q.qt_sum
    };
    q.q_sum + qt
}

#[inline(always)]
fn finish(sum: u64) -> u16 {
    let c = !csum_fold(sum);
    if c == 0 { 0xffff } else { c }
}

/// Copies `len` frame bytes from `off` into `buf` (or back, `to_frame`):
/// whole words, then the last 8 bytes once more (overlapping), so `len`
/// must be 0 or at least 8. Bounded by [`SAVE_MAX`].
#[inline(always)]
fn copy_saved<P: Packet>(
    p: &P,
    off: usize,
    len: usize,
    buf: *mut u8,
    to_frame: bool,
    slot: *mut u64,
) -> Result<(), u32> {
    if len == 0 {
        return Ok(());
    }
    if !(8..=SAVE_MAX).contains(&len) {
        return Err(STAT_DROP_ERROR);
    }
    let off = off & 0x1ff;
    let words = launder(slot, len / 8);
    let last = (len - 8) & (SAVE_MAX - 1);
    for i in 0..SAVE_MAX / 8 + 1 {
        // One more round than whole words: the overlapping last word.
        let at = if i < opaque(words) {
            i * 8
        } else if i == words {
            last
        } else {
            break;
        };
        let at = at & (SAVE_MAX - 1);
        if at + 8 > SAVE_MAX {
            return Err(STAT_DROP_ERROR);
        }
        let f = ptr_at(p, off + at, 8, STAT_DROP_ERROR)?;
        let b = unsafe { buf.add(at) };
        if to_frame {
            st64(f, ld64(b));
        } else {
            st64(b, ld64(f));
        }
    }
    Ok(())
}

/// Copies the entry's tail into the (resized) frame right after the
/// question: whole words, then the last 8 bytes once more (overlapping) so
/// no write passes the frame's end.
#[inline(always)]
fn copy_tail<P: Packet, V: Slot>(
    p: &P,
    q: &Query,
    v: &V,
    tail_len: usize,
    slot: *mut u64,
) -> Result<(), u32> {
    let qend = q.qend & 0x1ff;
    // Checks on the registers themselves: masks would bound them too
    // loosely (MAX_TAIL is no power of two; the span could reach 504).
    let span = opaque(name_span(q.qlen & 0xff));
    if span > V::SPAN_MAX {
        return Err(STAT_DROP_ERROR);
    }
    // One comparison on the register used (a tail under 8 bytes wraps
    // around): LLVM turns range checks into a check on a derived value,
    // which the 6.1 verifier does not carry back.
    let last = opaque(tail_len.wrapping_sub(8));
    if last > V::TAIL_MAX - 8 {
        return Err(STAT_DROP_ERROR);
    }
    let tail_len = last + 8;
    let src = unsafe { v.data_ptr().add(span) };
    // 64-byte chunks (one bounds check each), then words, then the last
    // word once more.
    let chunks = launder(slot, tail_len / 64);
    for c in 0..V::TAIL_MAX / 64 {
        if c >= opaque(chunks) {
            break;
        }
        let d = ptr_at(p, qend + c * 64, 64, STAT_DROP_ERROR)?;
        let s = unsafe { src.add(c * 64) };
        for k in 0..8 {
            st64(unsafe { d.add(k * 8) }, ld64(unsafe { s.add(k * 8) }));
        }
    }
    let done = (tail_len / 64) * 64;
    let words = launder(slot, (tail_len - done) / 8);
    for i in 0..8 {
        if i >= opaque(words) {
            break;
        }
        let at = opaque(done + i * 8);
        if at > V::TAIL_MAX - 8 {
            return Err(STAT_DROP_ERROR);
        }
        let d = ptr_at(p, qend + at, 8, STAT_DROP_ERROR)?;
        st64(d, ld64(unsafe { src.add(at) }));
    }
    let d = ptr_at(p, qend + last, 8, STAT_DROP_ERROR)?;
    st64(d, ld64(unsafe { src.add(last) }));
    Ok(())
}

/// Puts the saved query bytes back after an abandoned reply.
#[inline(always)]
fn undo<P: Packet>(
    p: &P,
    q: &Query,
    frame_len: usize,
    saved: *mut u8,
    fault: u32,
    slot: *mut u64,
) -> Verdict {
    if fault == FAULT_RACE_NO_UNDO || p.resize(frame_len as u32).is_err() {
        return Verdict::Drop(STAT_DROP_ERROR);
    }
    match copy_saved(p, q.qend, frame_len - q.qend, saved, true, slot) {
        Ok(()) => Verdict::Pass(STAT_PASS_RACE),
        Err(_) => Verdict::Drop(STAT_DROP_ERROR),
    }
}

/// Writes the reply's Ethernet, IP and UDP headers (addresses and ports
/// swapped in place: resizing moves only the frame's end, and the bytes
/// before it stay as they were; lengths, checksums) and its DNS flags and
/// counts. The headers are the last thing written, after the generation
/// check, so an undo never has to put them back.
#[inline(always)]
fn finish_headers<P: Packet, const V6: bool>(
    p: &P,
    dns_len: usize,
    stamp: &Stamp,
    counts: &[u16; 4],
) -> Result<(), u32> {
    let o = Off::of(V6);
    let eth = ptr_at(p, 0, o.q, STAT_DROP_ERROR)?;
    unsafe {
        let (d0, d1) = (ld32(eth), ld16(eth.add(4)));
        let (s0, s1) = (ld32(eth.add(6)), ld16(eth.add(10)));
        st32(eth, s0);
        st16(eth.add(4), s1);
        st32(eth.add(6), d0);
        st16(eth.add(10), d1);
        let ip = eth.add(IP_OFF);
        if V6 {
            st16(ip.add(4), ((8 + dns_len) as u16).to_be());
            *ip.add(7) = 64; // hop limit
            let (a0, a1) = (ld64(ip.add(8)), ld64(ip.add(16)));
            let (b0, b1) = (ld64(ip.add(24)), ld64(ip.add(32)));
            st64(ip.add(8), b0);
            st64(ip.add(16), b1);
            st64(ip.add(24), a0);
            st64(ip.add(32), a1);
        } else {
            // The header checksum from the words as loaded plus the new
            // fields, all in registers: loading the header again after the
            // narrower stores below would stall on store forwarding.
            let tot_len = ((20 + 8 + dns_len) as u16).to_be();
            let ttl_proto = u16::from_ne_bytes([64, 17]); // TTL 64, UDP
            let (a, b) = (ld32(ip.add(12)), ld32(ip.add(16)));
            let ip_sum = ld16(ip) as u64
                + tot_len as u64
                + ld32(ip.add(4)) as u64
                + ttl_proto as u64
                + a as u64
                + b as u64;
            st16(ip.add(2), tot_len);
            st16(ip.add(8), ttl_proto);
            st16(ip.add(10), !csum_fold(ip_sum));
            st32(ip.add(12), b);
            st32(ip.add(16), a);
        }
        let udp = eth.add(o.udp);
        let (sp, dp) = (ld16(udp), ld16(udp.add(2)));
        st16(udp, dp);
        st16(udp.add(2), sp);
        st16(udp.add(4), ((8 + dns_len) as u16).to_be());
        st16(udp.add(6), stamp.udp_csum);
        let hdr = eth.add(o.dns);
        st16(hdr.add(2), stamp.rflags);
        for (i, c) in counts.iter().enumerate() {
            st16(hdr.add(4 + i * 2), *c);
        }
    }
    Ok(())
}

/// Rewrites the query into the reply. `fault` is the test-only
/// [`localdns_common::GLOBAL_FAULT`] (0 in production).
#[inline(always)]
pub fn rewrite<P: Packet, const V6: bool, V: Slot>(
    p: &P,
    q: &Query,
    v: &V,
    f: &Fresh,
    stamp: &Stamp,
    scratch: *mut Scratch,
    fault: u32,
) -> Verdict {
    let o = Off::of(V6);
    // What the reply overwrites from the end of the question on (the OPT
    // record, link-layer padding), saved for an undo.
    let frame_len = p.frame_len();
    let save_len = frame_len - q.qend;
    // 1 to 7 bytes (link-layer padding behind a query without EDNS) cannot
    // be saved as words: such a reply is not undone on a race but dropped.
    let undoable = save_len == 0 || (8..=SAVE_MAX).contains(&save_len);
    if save_len > SAVE_MAX {
        return Verdict::Pass(STAT_PASS_SIZE);
    }
    let saved = unsafe { (*scratch).saved.as_mut_ptr() };
    let slot = unsafe { &raw mut (*scratch).launder };
    if undoable && copy_saved(p, q.qend, save_len, saved, false, slot).is_err() {
        return Verdict::Pass(STAT_PASS_ERROR);
    }
    // --- first write: from here on an error means DROP ---
    let new_len = o.dns + f.dns_len;
    match p.resize(new_len as u32) {
        Ok(()) => {}
        // Too little room to grow (generic XDP): the TC companion answers.
        Err(ResizeError::Untouched) if new_len > frame_len => {
            return Verdict::Pass(STAT_PASS_ROOM);
        }
        Err(ResizeError::Untouched) => return Verdict::Pass(STAT_PASS_ERROR),
        Err(ResizeError::Touched) => return Verdict::Drop(STAT_DROP_ERROR),
    }
    if fault == FAULT_AFTER_RESIZE {
        return Verdict::Drop(STAT_DROP_ERROR);
    }
    if let Err(stat) = copy_tail(p, q, v, f.tail_len, slot) {
        return Verdict::Drop(stat);
    }
    if fault == FAULT_AFTER_COPY {
        return Verdict::Drop(STAT_DROP_ERROR);
    }
    // Every read of the entry happens before the second generation read:
    // the TTL offsets (their writes land in the tail, which an undo puts
    // back) and the record counts.
    let ttl_be = f.ttl_now.to_be();
    let n = launder(slot, f.ttl_count);
    let ttl_off = v.ttl_off_ptr();
    for i in 0..V::TTLS {
        if i >= opaque(n) {
            break;
        }
        let off = q.qend + (unsafe { *ttl_off.add(i) } as usize & 0x7ff);
        let Ok(t) = ptr_at(p, off, 4, STAT_DROP_ERROR) else {
            return Verdict::Drop(STAT_DROP_ERROR);
        };
        unsafe { (t as *mut u32).write_unaligned(ttl_be) };
    }
    let counts = v.head().counts_be;
    barrier();
    let generation = unsafe { core::ptr::read_volatile(&v.head().generation) };
    let torn = generation != f.generation && fault != FAULT_NO_GENERATION_CHECK;
    if torn || fault == FAULT_RACE || fault == FAULT_RACE_NO_UNDO {
        if !undoable {
            return Verdict::Drop(STAT_DROP_ERROR);
        }
        return undo(p, q, frame_len, saved, fault, slot);
    }
    // The copy is consistent: finish the reply.
    match finish_headers::<P, V6>(p, f.dns_len, stamp, &counts) {
        Ok(()) => Verdict::Reply { truncated: false },
        Err(stat) => Verdict::Drop(stat),
    }
}

/// Our OPT record (the daemon's `wire::our_opt`: UDP size 1232, version 0,
/// no options) as two words and a byte, and its checksum share when it
/// starts at an even offset.
const fn our_opt(do_bit: bool) -> (u64, u16, u8, u64) {
    let b: [u8; 11] = [
        0,
        0,
        41,
        0x04,
        0xd0,
        0,
        0,
        if do_bit { 0x80 } else { 0 },
        0,
        0,
        0,
    ];
    let w0 = u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]);
    let w1 = u16::from_le_bytes([b[8], b[9]]);
    let mut sum: u64 = 0;
    let mut i = 0;
    while i < 11 {
        let hi = if i + 1 < 11 { b[i + 1] } else { 0 };
        sum += u16::from_le_bytes([b[i], hi]) as u64;
        i += 2;
    }
    (w0, w1, b[10], sum)
}

/// The reply when the cached answer does not fit the client: the header
/// with TC=1 and the entry's RCODE, the question, our OPT if the client
/// used EDNS; no records (the daemon's `wire::error_reply(.., tc)`). Built
/// from the query alone: the entry gives only its RCODE, read before the
/// generation is checked again (and before any write).
#[inline(always)]
pub fn truncated<P: Packet, const V6: bool, V: Slot>(
    p: &P,
    q: &Query,
    v: &V,
    f: &Fresh,
) -> Verdict {
    let o = Off::of(V6);
    let v = v.head();
    let rcode = v.flags_be & (0x000fu16).to_be();
    barrier();
    if unsafe { core::ptr::read_volatile(&v.generation) } != f.generation {
        return Verdict::Pass(STAT_PASS_RACE);
    }
    let Ok((ends_sum, id, qf)) = sum_ends::<P, V6>(p) else {
        return Verdict::Pass(STAT_PASS_ERROR);
    };
    let edns = q.kflags & KEY_F_EDNS != 0;
    let (w0, w1, b10, opt_even) = our_opt(q.kflags & KEY_F_DO != 0);
    let rflags = (F_QR | F_RA | F_TC).to_be() | rcode | (qf & (F_RD | F_CD).to_be());
    let counts = [1u16.to_be(), 0, 0, u16::from(edns).to_be()];
    let dns_len = 12 + q.qlen + 4 + if edns { 11 } else { 0 };
    let udp_len_n = ((8 + dns_len) as u16).to_be() as u64;
    let opt_sum = if !edns {
        0
    } else if q.qlen & 1 == 1 {
        swap16(csum_fold(opt_even)) as u64
    } else {
        opt_even
    };
    let sum = id as u64
        + rflags as u64
        + counts[0] as u64
        + counts[3] as u64
        + question_sum(q)
        + opt_sum
        + ends_sum
        + 17u16.to_be() as u64
        + 2 * udp_len_n;
    let stamp = Stamp {
        udp_csum: finish(sum),
        rflags,
    };
    match p.resize((o.dns + dns_len) as u32) {
        Ok(()) => {}
        Err(ResizeError::Untouched) => return Verdict::Pass(STAT_PASS_ERROR),
        Err(ResizeError::Touched) => return Verdict::Drop(STAT_DROP_ERROR),
    }
    if edns {
        let Ok(opt) = ptr_at(p, q.qend, 11, STAT_DROP_ERROR) else {
            return Verdict::Drop(STAT_DROP_ERROR);
        };
        unsafe {
            st64(opt, w0);
            st16(opt.add(8), w1);
            *opt.add(10) = b10;
        }
    }
    match finish_headers::<P, V6>(p, dns_len, &stamp, &counts) {
        Ok(()) => Verdict::Reply { truncated: true },
        Err(stat) => Verdict::Drop(stat),
    }
}
