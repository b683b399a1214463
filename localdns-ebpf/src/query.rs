//! Parsing a query in place, one small step per layer: Ethernet, IPv4 or
//! IPv6, UDP, the DNS header, the question, the OPT record. Every step only
//! reads; `Err(stat)` means "not ours to answer": PASS, counted under
//! `stat`. The steps are generic over the address family (`V6`), so each
//! family is compiled with constant offsets.

use localdns_common::{
    KEY_F_CD, KEY_F_DO, KEY_F_EDNS, MAX_LISTEN, MAX_QNAME, PLAIN_UDP_MAX, STAT_NOT_DNS,
    STAT_PASS_EDNS, STAT_PASS_HEADER, STAT_PASS_IP, STAT_PASS_QNAME, Scratch, csum_fold, key_hash,
    key_word, lower8, qname_hash_step,
};

use crate::packet::{Packet, be16, launder, ld16, ld64, opaque, ptr_at, st64};

pub const IP_OFF: usize = 14;
/// Queries longer than this are not fast-path material.
pub const MAX_QUERY: usize = 512;

pub const F_QR: u16 = 0x8000;
pub const F_OPCODE: u16 = 0x7800;
pub const F_TC: u16 = 0x0200;
pub const F_RD: u16 = 0x0100;
pub const F_RA: u16 = 0x0080;
pub const F_Z: u16 = 0x0040;
pub const F_AD: u16 = 0x0020;
pub const F_CD: u16 = 0x0010;
pub const F_RCODE: u16 = 0x000f;

/// Frame offsets of one address family.
#[derive(Clone, Copy)]
pub struct Off {
    /// UDP header.
    pub udp: usize,
    /// DNS header.
    pub dns: usize,
    /// The qname.
    pub q: usize,
}

impl Off {
    pub const fn of(v6: bool) -> Off {
        let udp = if v6 { IP_OFF + 40 } else { IP_OFF + 20 };
        Off {
            udp,
            dns: udp + 8,
            q: udp + 20,
        }
    }
}

/// The listener addresses and their views: the load-time globals, each
/// read where it is used (only the query's family).
pub struct Listeners {
    pub v4: &'static [u32; MAX_LISTEN],
    pub view4: &'static [u8; MAX_LISTEN],
    pub v6: &'static [u64; 2 * MAX_LISTEN],
    pub view6: &'static [u8; MAX_LISTEN],
}

/// A load-time global's value, read through `read_volatile` so the
/// compiler cannot fold its zero initialiser (the verifier knows the
/// loaded value: frozen `.rodata`).
#[inline(always)]
pub fn global<T: Copy>(g: &T) -> T {
    unsafe { core::ptr::read_volatile(g) }
}

/// Everything later steps need to know about an eligible query.
pub struct Query {
    pub view: u8,
    /// `KEY_F_*` bits.
    pub kflags: u8,
    /// Wire qname length, root label included (1..=255).
    pub qlen: usize,
    /// Frame offset just past QCLASS: where the reply's tail goes.
    pub qend: usize,
    /// Frame offset where the DNS message ends.
    pub dns_end: usize,
    /// Largest reply the client accepts.
    pub client_max: usize,
    /// The client's EDNS UDP size as sent (0 without EDNS).
    pub udp_size: u16,
    pub qtype: u16,
    pub qclass: u16,
    /// The map key: [`localdns_common::key_hash`] of the lower-cased
    /// qname and `key`.
    pub hash: u64,
    /// [`localdns_common::KeyFields::word`] of the query.
    pub key: u64,
    /// One's-complement partial sum of the qname as sent.
    pub q_sum: u64,
    /// One's-complement partial sum of QTYPE and QCLASS at their offset.
    pub qt_sum: u64,
}

/// Ethernet, IP, UDP: a datagram to port 53 of a listener address of the
/// family? Returns the view and the UDP length. IPv6 with any extension
/// header (fragments included) is passed.
#[inline(always)]
pub fn l4<P: Packet, const V6: bool>(
    p: &P,
    l: &Listeners,
    slot: *mut u64,
) -> Result<(u8, usize), u32> {
    let o = Off::of(V6);
    let ip = ptr_at(p, IP_OFF, o.udp - IP_OFF, STAT_NOT_DNS)?;
    let (view, next, frag, ip_payload) = if V6 {
        if unsafe { *ip } >> 4 != 6 {
            return Err(STAT_NOT_DNS);
        }
        let d0 = ld64(unsafe { ip.add(24) });
        let d1 = ld64(unsafe { ip.add(32) });
        let mut view = 0xff;
        for i in 0..MAX_LISTEN {
            if d0 == global(&l.v6[2 * i]) && d1 == global(&l.v6[2 * i + 1]) {
                view = global(&l.view6[i]);
            }
        }
        // The stack drops unspecified and multicast sources: so do we (a
        // reply must never go to a group).
        let s0 = ld64(unsafe { ip.add(8) });
        let s1 = ld64(unsafe { ip.add(16) });
        if view != 0xff && ((s0 | s1) == 0 || s0 & 0xff == 0xff) {
            return Err(STAT_PASS_IP);
        }
        let payload = be16(unsafe { ip.add(4) }) as usize;
        (view, unsafe { *ip.add(6) }, 0, payload)
    } else {
        let vihl = unsafe { *ip };
        if vihl >> 4 != 4 {
            return Err(STAT_NOT_DNS);
        }
        let daddr = unsafe { (ip.add(16) as *const u32).read_unaligned() };
        let mut view = 0xff;
        for i in 0..MAX_LISTEN {
            if daddr == global(&l.v4[i]) {
                view = global(&l.view4[i]);
            }
        }
        let tot = be16(unsafe { ip.add(2) }) as usize;
        if view != 0xff && vihl != 0x45 {
            return Err(STAT_PASS_IP); // options: the UDP header is elsewhere
        }
        if view != 0xff && !ipv4_header_ok(ip) {
            return Err(STAT_PASS_IP);
        }
        let frag = be16(unsafe { ip.add(6) }) & 0x3fff; // MF or offset
        (view, unsafe { *ip.add(9) }, frag, tot.wrapping_sub(20))
    };
    if view == 0xff {
        return Err(STAT_NOT_DNS);
    }
    // One state for every listener from here on, not one per view.
    let view = launder(slot, view as usize) as u8;
    if next != 17 {
        // IPv6 extension headers land here too: passed, not parsed.
        return if V6 {
            Err(STAT_PASS_IP)
        } else {
            Err(STAT_NOT_DNS)
        };
    }
    let udp = ptr_at(p, o.udp, 8, STAT_PASS_IP)?;
    if be16(unsafe { udp.add(2) }) != 53 {
        return Err(STAT_NOT_DNS);
    }
    if ld16(udp) == 0 {
        return Err(STAT_PASS_IP); // source port 0: nowhere to answer
    }
    if frag != 0 {
        return Err(STAT_PASS_IP);
    }
    let udp_len = be16(unsafe { udp.add(4) }) as usize;
    if ip_payload != udp_len || o.udp + udp_len > p.frame_len() {
        return Err(STAT_PASS_IP);
    }
    if !(8 + 12 + 5..=8 + MAX_QUERY).contains(&udp_len) {
        return Err(STAT_PASS_HEADER);
    }
    Ok((view, udp_len))
}

/// What the stack checks of an IPv4 header (20 bytes at `ip`) before a
/// socket would see it: a correct checksum, and a source that is neither
/// 0.0.0.0/8 nor multicast, reserved or broadcast (224.0.0.0 and up).
#[inline(always)]
fn ipv4_header_ok(ip: *const u8) -> bool {
    let w = |i: usize| unsafe { (ip.add(4 * i) as *const u32).read_unaligned() } as u64;
    // One's-complement sum in either byte order: all ones when correct.
    if csum_fold(w(0) + w(1) + w(2) + w(3) + w(4)) != 0xffff {
        return false;
    }
    let src0 = unsafe { *ip.add(12) };
    src0 != 0 && src0 < 224
}

/// The DNS header: a plain standard query with one question and at most
/// one additional record. Returns (flags, ARCOUNT).
#[inline(always)]
pub fn header<P: Packet, const V6: bool>(p: &P) -> Result<(u16, u16), u32> {
    let hdr = ptr_at(p, Off::of(V6).dns, 12, STAT_PASS_HEADER)?;
    let qflags = be16(unsafe { hdr.add(2) });
    if qflags & (F_QR | F_OPCODE | F_TC | F_Z | F_RCODE) != 0 {
        return Err(STAT_PASS_HEADER);
    }
    let arcount = be16(unsafe { hdr.add(10) });
    if be16(unsafe { hdr.add(4) }) != 1
        || be16(unsafe { hdr.add(6) }) != 0
        || be16(unsafe { hdr.add(8) }) != 0
        || arcount > 1
    {
        return Err(STAT_PASS_HEADER);
    }
    Ok((qflags, arcount))
}

/// The qname: labels of at most 63 bytes, no compression, at most 255
/// bytes. Returns its length, root label included.
#[inline(always)]
pub fn qname_len<P: Packet, const V6: bool>(p: &P) -> Result<usize, u32> {
    let q = Off::of(V6).q;
    let mut pos: usize = 0;
    for _ in 0..128 {
        let l = unsafe { *ptr_at(p, q + pos, 1, STAT_PASS_QNAME)? } as usize;
        if l == 0 {
            return Ok(pos + 1);
        }
        if l > 63 {
            return Err(STAT_PASS_QNAME);
        }
        pos += l + 1;
        if pos >= MAX_QNAME {
            return Err(STAT_PASS_QNAME);
        }
    }
    Err(STAT_PASS_QNAME)
}

/// Word `i` of the qname as sent (little-endian load, bytes past the name
/// zeroed). QTYPE and QCLASS follow the name, so 8 bytes can be read at
/// the word's start unless fewer than 4 name bytes remain; then the 8
/// bytes ending after QCLASS are read and shifted. The branches are on a
/// laundered copy of the remaining length, so they do not narrow `qlen`
/// itself (which would split the verifier's state once per word).
#[inline(always)]
fn qname_word<P: Packet, const V6: bool>(
    p: &P,
    i: usize,
    qlen: usize,
    slot: *mut u64,
) -> Result<u64, u32> {
    let q = Off::of(V6).q;
    let qlen = qlen & 0xff;
    let i = i & 31;
    // Name bytes from this word on, >= 1.
    let rest = launder(slot, qlen - i * 8) & 0xff;
    let w = if rest >= 4 {
        ld64(ptr_at(p, q + i * 8, 8, STAT_PASS_QNAME)?)
    } else {
        let end = q + qlen + 4 - 8;
        let w = ld64(ptr_at(p, end, 8, STAT_PASS_QNAME)?);
        w >> (8 * ((4 - rest) & 7))
    };
    Ok(if rest < 8 {
        w & ((1u64 << (8 * rest)) - 1)
    } else {
        w
    })
}

/// Copies the qname into scratch as lower-cased words (bytes past the
/// name zeroed), hashing it and summing it as sent on the way: the only
/// pass over the name in the packet.
#[inline(always)]
pub fn take_name<P: Packet, const V6: bool>(
    p: &P,
    qlen: usize,
    seed: u64,
    scratch: *mut Scratch,
) -> Result<(u64, u64), u32> {
    let slot = unsafe { &raw mut (*scratch).launder };
    let dst = unsafe { (*scratch).qname.as_mut_ptr() };
    let nwords = launder(slot, qlen.div_ceil(8));
    let mut hash = seed;
    let mut sum: u64 = 0;
    for i in 0..(MAX_QNAME + 1) / 8 {
        if i >= opaque(nwords) {
            break;
        }
        let w = qname_word::<P, V6>(p, i, qlen, slot)?;
        sum += (w & 0xffff_ffff) + (w >> 32);
        let lw = lower8(w);
        st64(unsafe { dst.add(i * 8) }, lw);
        hash = qname_hash_step(hash, lw);
    }
    Ok((hash, sum))
}

/// The optional OPT record, which must end exactly at the end of the
/// datagram. Returns (key flags, largest reply, EDNS UDP size as sent).
#[inline(always)]
pub fn opt<P: Packet>(
    p: &P,
    qend: usize,
    dns_end: usize,
    arcount: u16,
    qflags: u16,
) -> Result<(u8, usize, u16), u32> {
    let mut kflags = if qflags & F_CD != 0 { KEY_F_CD } else { 0 };
    if arcount == 0 {
        if qend != dns_end {
            return Err(STAT_PASS_HEADER); // trailing bytes
        }
        return Ok((kflags, PLAIN_UDP_MAX as usize, 0));
    }
    let opt = ptr_at(p, qend, 11, STAT_PASS_EDNS)?;
    let rdlen = be16(unsafe { opt.add(9) }) as usize;
    if unsafe { *opt } != 0
        || be16(unsafe { opt.add(1) }) != 41
        || unsafe { *opt.add(5) } != 0 // extended RCODE
        || unsafe { *opt.add(6) } != 0 // version: BADVERS is the daemon's job
        || qend + 11 + rdlen != dns_end
    {
        return Err(STAT_PASS_EDNS);
    }
    let udp_size = be16(unsafe { opt.add(3) });
    kflags |= KEY_F_EDNS;
    if be16(unsafe { opt.add(7) }) & 0x8000 != 0 {
        kflags |= KEY_F_DO;
    }
    let max = if udp_size > PLAIN_UDP_MAX {
        udp_size
    } else {
        PLAIN_UDP_MAX
    };
    Ok((kflags, max as usize, udp_size))
}

/// All parse steps: an eligible query, or why not. The qname goes to
/// `scratch`; the name length is laundered there too, so the up to 128
/// ways out of the qname walk continue as one verifier state.
#[inline(always)]
pub fn parse<P: Packet, const V6: bool>(
    p: &P,
    l: &Listeners,
    seed: u64,
    scratch: *mut Scratch,
) -> Result<Query, u32> {
    let o = Off::of(V6);
    let slot = unsafe { &raw mut (*scratch).launder };
    let (view, udp_len) = l4::<P, V6>(p, l, slot)?;
    let dns_end = o.udp + udp_len;
    let (qflags, arcount) = header::<P, V6>(p)?;
    // The mask, not a range check, bounds it for the verifier: kernels
    // before ~6.10 do not carry a check on `qlen - 1` back to `qlen`.
    let qlen = launder(slot, qname_len::<P, V6>(p)?) & 0xff;
    if qlen == 0 {
        return Err(STAT_PASS_QNAME);
    }
    let qend = o.q + qlen + 4;
    let qt = ptr_at(p, o.q + qlen, 4, STAT_PASS_QNAME)?;
    let qtype = be16(qt);
    let qclass = be16(unsafe { qt.add(2) });
    let qt_sum = ld16(qt) as u64 + ld16(unsafe { qt.add(2) }) as u64;
    let (kflags, client_max, udp_size) = opt(p, qend, dns_end, arcount, qflags)?;
    let (hash, q_sum) = take_name::<P, V6>(p, qlen, seed, scratch)?;
    // Branches gave these exact values per path (flags, sizes): the
    // verifier would check everything after once per combination.
    let kflags = launder(slot, kflags as usize) as u8;
    let client_max = launder(slot, client_max) & 0xffff;
    let udp_size = launder(slot, udp_size as usize) as u16;
    let key = key_word(qtype, qclass, qlen as u8, view, kflags);
    Ok(Query {
        view,
        kflags,
        qlen,
        qend,
        dns_end,
        client_max,
        udp_size,
        qtype,
        qclass,
        hash: key_hash(hash, key),
        key,
        q_sum,
        qt_sum,
    })
}
