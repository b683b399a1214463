//! Turning a parsed query into the reply from a cache entry, in place:
//! check the entry, compute the UDP checksum, save what the reply will
//! overwrite, then rewrite. Before the first write an error means PASS
//! (the packet is untouched); after it, DROP. The one exception is a
//! generation mismatch (the entry was replaced while being copied): the
//! saved bytes are put back, so the packet passed on is the query exactly
//! as it arrived.

use localdns_common::{
    CacheValue, FAULT_AFTER_COPY, FAULT_AFTER_RESIZE, FAULT_NO_GENERATION_CHECK, FAULT_RACE,
    FAULT_RACE_NO_UNDO, KEY_F_DO, MAX_QNAME, MAX_TAIL, MAX_TTLS, SAVE_MAX, STAT_DROP_ERROR,
    STAT_EXPIRED, STAT_PASS_COLLISION, STAT_PASS_ERROR, STAT_PASS_RACE, STAT_PASS_SIZE, Scratch,
    csum_fold, name_span,
};

use crate::packet::{Packet, ResizeError, launder, ld16, ld64, opaque, ptr_at, st16, st64, swap16};
use crate::query::{DNS_OFF, F_AD, F_CD, F_RD, IP_OFF, Q_OFF, Query, UDP_OFF};

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
    /// Send the rewritten packet back to the client.
    Reply,
    /// Pass it on untouched, counted under the stat.
    Pass(u32),
    /// Drop it (it was partly rewritten), counted under the stat.
    Drop(u32),
}

/// A fresh entry that fits the query and the client.
pub struct Fresh {
    /// The entry's generation when the checks began.
    pub generation: u64,
    /// TTL to write into every record.
    pub ttl_now: u32,
    pub tail_len: usize,
    pub ttl_count: usize,
    /// Length of the reply's DNS message.
    pub dns_len: usize,
}

/// Is the entry fresh, really for this name, consistent and small enough?
/// The query's name is in `scratch` (lower-cased words, see
/// [`crate::query::take_name`]).
#[inline(always)]
pub fn check(q: &Query, v: &CacheValue, now: u64, scratch: *mut Scratch) -> Result<Fresh, u32> {
    let slot = unsafe { &raw mut (*scratch).launder };
    let name = unsafe { (*scratch).qname.as_ptr() };
    let generation = unsafe { core::ptr::read_volatile(&v.generation) };
    barrier();
    if now >= v.expire_ns || now < v.insert_ns {
        return Err(STAT_EXPIRED);
    }
    let elapsed = (now - v.insert_ns) / 1_000_000_000;
    if elapsed >= v.ttl as u64 {
        return Err(STAT_EXPIRED);
    }
    if v.qname_len as usize != q.qlen {
        return Err(STAT_PASS_COLLISION);
    }
    let nwords = launder(slot, q.qlen.div_ceil(8));
    for i in 0..32 {
        if i >= opaque(nwords) {
            break;
        }
        let a = ld64(unsafe { name.add(i * 8) });
        // Both names are zero-padded to whole words.
        let b = ld64(unsafe { v.data.as_ptr().add(i * 8) });
        if a != b {
            return Err(STAT_PASS_COLLISION);
        }
    }
    let tail_len = v.tail_len as usize;
    let ttl_count = v.ttl_count as usize;
    // Every tail holds at least one record, so at least 11 bytes.
    if !(8..=MAX_TAIL).contains(&tail_len) || ttl_count > MAX_TTLS {
        return Err(STAT_PASS_ERROR);
    }
    let n = launder(slot, ttl_count);
    for i in 0..MAX_TTLS {
        if i >= opaque(n) {
            break;
        }
        if v.ttl_off[i] as usize + 4 > tail_len {
            return Err(STAT_PASS_ERROR);
        }
    }
    let dns_len = 12 + q.qlen + 4 + tail_len;
    if dns_len > q.client_max {
        return Err(STAT_PASS_SIZE);
    }
    Ok(Fresh {
        generation,
        ttl_now: v.ttl - elapsed as u32,
        tail_len,
        ttl_count,
        dns_len,
    })
}

/// What the reply's headers get besides the entry's fields.
pub struct Stamp {
    /// UDP checksum.
    pub udp_csum: u16,
    /// DNS header flags, network order (the entry's, with the query's RD).
    pub rflags: u16,
}

/// The reply's UDP checksum, from the entry's partial sum plus what the
/// query contributes (RFC 1624 style, no pass over the reply's bytes),
/// and its header flags.
#[inline(always)]
pub fn checksum<P: Packet>(p: &P, q: &Query, v: &CacheValue, f: &Fresh) -> Result<Stamp, u32> {
    let head = ptr_at(p, 0, Q_OFF, STAT_PASS_ERROR)?;
    let ip = unsafe { head.add(IP_OFF) };
    let udp = unsafe { head.add(UDP_OFF) };
    let hdr = unsafe { head.add(DNS_OFF) };
    // A recursive service's flags (the daemon's wire::reply_flags): the
    // entry's QR, RA, RCODE; RD and CD from the query; AD only when the
    // query set DO or AD (RFC 6840 §5.8).
    let qf = ld16(unsafe { hdr.add(2) });
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
    // QTYPE/QCLASS sit at an odd offset when the qname length is odd.
    let qt_sum = if q.qlen & 1 == 1 {
        swap16(csum_fold(q.qt_sum)) as u64
    } else {
        q.qt_sum
    };
    let udp_len_n = ((8 + f.dns_len) as u16).to_be() as u64;
    let addr_sum = ld16(unsafe { ip.add(12) }) as u64
        + ld16(unsafe { ip.add(14) }) as u64
        + ld16(unsafe { ip.add(16) }) as u64
        + ld16(unsafe { ip.add(18) }) as u64;
    let port_sum = ld16(udp) as u64 + ld16(unsafe { udp.add(2) }) as u64;
    let sum = v.csum_partial as u64
        + ld16(hdr) as u64 // query ID
        + rflags as u64
        + q.q_sum
        + qt_sum
        + ttl_sum
        + addr_sum
        + 17u16.to_be() as u64
        + 2 * udp_len_n
        + port_sum;
    let c = !csum_fold(sum);
    Ok(Stamp {
        udp_csum: if c == 0 { 0xffff } else { c },
        rflags,
    })
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
        let at = if i < words {
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
fn copy_tail<P: Packet>(
    p: &P,
    q: &Query,
    v: &CacheValue,
    tail_len: usize,
    slot: *mut u64,
) -> Result<(), u32> {
    let qend = q.qend & 0x1ff;
    // A check on the register itself: masks would bound it at 504.
    let span = opaque(name_span(q.qlen & 0xff));
    if span > MAX_QNAME + 1 {
        return Err(STAT_DROP_ERROR);
    }
    let src = unsafe { v.data.as_ptr().add(span) };
    let words = launder(slot, tail_len / 8);
    for i in 0..MAX_TAIL / 8 {
        if i >= opaque(words) {
            break;
        }
        let d = ptr_at(p, qend + i * 8, 8, STAT_DROP_ERROR)?;
        st64(d, ld64(unsafe { src.add(i * 8) }));
    }
    let last = (tail_len - 8) & (MAX_TAIL - 1);
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

/// Rewrites the query into the reply. `fault` is the test-only
/// [`localdns_common::GLOBAL_FAULT`] (0 in production).
#[inline(always)]
pub fn rewrite<P: Packet>(
    p: &P,
    q: &Query,
    v: &CacheValue,
    f: &Fresh,
    stamp: &Stamp,
    scratch: *mut Scratch,
    fault: u32,
) -> Verdict {
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
    // Addresses and ports before anything moves.
    let Ok(head) = ptr_at(p, 0, Q_OFF, STAT_PASS_ERROR) else {
        return Verdict::Pass(STAT_PASS_ERROR);
    };
    let mut macs = [0u8; 12];
    let mut addrs = [0u8; 8];
    unsafe {
        core::ptr::copy_nonoverlapping(head, macs.as_mut_ptr(), 12);
        core::ptr::copy_nonoverlapping(head.add(IP_OFF + 12), addrs.as_mut_ptr(), 8);
    }
    let ports = [
        ld16(unsafe { head.add(UDP_OFF) }),
        ld16(unsafe { head.add(UDP_OFF + 2) }),
    ];

    // --- first write: from here on an error means DROP ---
    match p.resize((DNS_OFF + f.dns_len) as u32) {
        Ok(()) => {}
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
    for i in 0..MAX_TTLS {
        if i >= opaque(n) {
            break;
        }
        let off = q.qend + (v.ttl_off[i] as usize & (MAX_TAIL - 1));
        let Ok(t) = ptr_at(p, off, 4, STAT_DROP_ERROR) else {
            return Verdict::Drop(STAT_DROP_ERROR);
        };
        unsafe { (t as *mut u32).write_unaligned(ttl_be) };
    }
    let counts = v.counts_be;
    barrier();
    let generation = unsafe { core::ptr::read_volatile(&v.generation) };
    let torn = generation != f.generation && fault != FAULT_NO_GENERATION_CHECK;
    if torn || fault == FAULT_RACE || fault == FAULT_RACE_NO_UNDO {
        if !undoable {
            return Verdict::Drop(STAT_DROP_ERROR);
        }
        return undo(p, q, frame_len, saved, fault, slot);
    }
    // The copy is consistent: finish the reply.
    let Ok(eth) = ptr_at(p, 0, Q_OFF, STAT_DROP_ERROR) else {
        return Verdict::Drop(STAT_DROP_ERROR);
    };
    unsafe {
        core::ptr::copy_nonoverlapping(macs.as_ptr().add(6), eth, 6);
        core::ptr::copy_nonoverlapping(macs.as_ptr(), eth.add(6), 6);
        let ip = eth.add(IP_OFF);
        st16(ip.add(2), ((20 + 8 + f.dns_len) as u16).to_be());
        *ip.add(8) = 64; // TTL
        st16(ip.add(10), 0);
        core::ptr::copy_nonoverlapping(addrs.as_ptr().add(4), ip.add(12), 4);
        core::ptr::copy_nonoverlapping(addrs.as_ptr(), ip.add(16), 4);
        let mut ip_sum: u64 = 0;
        for i in 0..10 {
            ip_sum += ld16(ip.add(i * 2)) as u64;
        }
        st16(ip.add(10), !csum_fold(ip_sum));
        let udp = eth.add(UDP_OFF);
        st16(udp, ports[1]);
        st16(udp.add(2), ports[0]);
        st16(udp.add(4), ((8 + f.dns_len) as u16).to_be());
        st16(udp.add(6), stamp.udp_csum);
        let hdr = eth.add(DNS_OFF);
        st16(hdr.add(2), stamp.rflags);
        for (i, c) in counts.iter().enumerate() {
            st16(hdr.add(4 + i * 2), *c);
        }
    }
    Verdict::Reply
}
