//! localdns fast path: answers fresh cache hits for UDP/53 queries to the
//! listener addresses straight from the ingress hook (XDP or TC), and passes
//! everything else, untouched, to the stack and the `localdns-user` daemon.
//!
//! Fail open: any parse problem, doubt or helper failure returns PASS
//! (XDP_PASS / TC_ACT_OK) before the packet is modified. The daemon fills the
//! cache map with the same reply images it serves itself, so the kernel never
//! answers differently from the daemon.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_REDIRECT, xdp_action},
    btf_maps::{LruHashMap, PerCpuArray, RingBuf},
    helpers::generated as h,
    macros::{btf_map, classifier, xdp},
    programs::{TcContext, XdpContext},
};
use localdns_common::{
    CACHE_MAP_ENTRIES, CacheKey, CacheValue, KEY_F_CD, KEY_F_DO, KEY_F_EDNS, LOG_RING_BYTES,
    LogEvent, MAX_QNAME, MAX_TAIL, MAX_TTLS, PLAIN_UDP_MAX, STAT_COUNT, STAT_EXPIRED, STAT_HIT,
    STAT_LOG_DROPPED, STAT_MISS, STAT_NOT_DNS, STAT_PASS_COLLISION, STAT_PASS_EDNS,
    STAT_PASS_ERROR, STAT_PASS_HEADER, STAT_PASS_IP, STAT_PASS_QNAME, STAT_PASS_SIZE, Scratch,
    VIEW_KUBE, VIEW_VNET, csum_fold, lower8, qname_hash_step,
};

// Map contracts (purpose, key, value, writer, reader, capacity, eviction) are
// documented on the MAP_* constants in localdns-common.
#[btf_map]
static LDNS_CACHE: LruHashMap<CacheKey, CacheValue, { CACHE_MAP_ENTRIES as usize }> =
    LruHashMap::new();
#[btf_map]
static LDNS_STATS: PerCpuArray<u64, { STAT_COUNT as usize }> = PerCpuArray::new();
#[btf_map]
static LDNS_SCRATCH: PerCpuArray<Scratch, 1> = PerCpuArray::new();
#[btf_map]
static LDNS_LOG: RingBuf<LogEvent, { LOG_RING_BYTES as usize }> = RingBuf::new();

// Set by the loader (EbpfLoader::set_global); see GLOBAL_* in localdns-common.
#[unsafe(no_mangle)]
static LDNS_LISTEN_VNET: u32 = 0;
#[unsafe(no_mangle)]
static LDNS_LISTEN_KUBE: u32 = 0;
#[unsafe(no_mangle)]
static LDNS_HASH_SEED: u64 = 0;

const ETH_LEN: usize = 14;
const IP_OFF: usize = 14;
const UDP_OFF: usize = 34;
const DNS_OFF: usize = 42;
const Q_OFF: usize = 54;
/// Queries longer than this are not fast-path material.
const MAX_QUERY: usize = 512;

const F_QR: u16 = 0x8000;
const F_OPCODE: u16 = 0x7800;
const F_TC: u16 = 0x0200;
const F_RD: u16 = 0x0100;
const F_Z: u16 = 0x0040;
const F_CD: u16 = 0x0010;
const F_RCODE: u16 = 0x000f;

/// What differs between the XDP and TC hooks.
trait Packet {
    fn data(&self) -> usize;
    fn data_end(&self) -> usize;
    /// Total frame length from the Ethernet header on.
    fn frame_len(&self) -> usize;
    fn load(&self, off: u32, dst: *mut u8, len: u32) -> Result<(), u32>;
    fn store(&self, off: u32, src: *const u8, len: u32) -> Result<(), u32>;
    /// Grows or shrinks the frame to `new_len` bytes.
    fn resize(&self, new_len: u32) -> Result<(), u32>;
}

struct Xdp<'a>(&'a XdpContext);

impl Packet for Xdp<'_> {
    #[inline(always)]
    fn data(&self) -> usize {
        self.0.data()
    }
    #[inline(always)]
    fn data_end(&self) -> usize {
        self.0.data_end()
    }
    #[inline(always)]
    fn frame_len(&self) -> usize {
        self.0.data_end() - self.0.data()
    }
    #[inline(always)]
    fn load(&self, off: u32, dst: *mut u8, len: u32) -> Result<(), u32> {
        let r = unsafe { h::bpf_xdp_load_bytes(self.0.ctx, off, dst.cast(), len) };
        if r == 0 { Ok(()) } else { Err(STAT_PASS_ERROR) }
    }
    #[inline(always)]
    fn store(&self, off: u32, src: *const u8, len: u32) -> Result<(), u32> {
        let r = unsafe { h::bpf_xdp_store_bytes(self.0.ctx, off, src as *mut _, len) };
        if r == 0 { Ok(()) } else { Err(STAT_PASS_ERROR) }
    }
    #[inline(always)]
    fn resize(&self, new_len: u32) -> Result<(), u32> {
        let delta = new_len as i32 - self.frame_len() as i32;
        if delta == 0 {
            return Ok(());
        }
        let r = unsafe { h::bpf_xdp_adjust_tail(self.0.ctx, delta) };
        if r == 0 { Ok(()) } else { Err(STAT_PASS_ERROR) }
    }
}

struct Tc<'a>(&'a TcContext);

impl Packet for Tc<'_> {
    #[inline(always)]
    fn data(&self) -> usize {
        self.0.data()
    }
    #[inline(always)]
    fn data_end(&self) -> usize {
        self.0.data_end()
    }
    #[inline(always)]
    fn frame_len(&self) -> usize {
        self.0.len() as usize
    }
    #[inline(always)]
    fn load(&self, off: u32, dst: *mut u8, len: u32) -> Result<(), u32> {
        let r = unsafe { h::bpf_skb_load_bytes(self.0.skb.skb.cast(), off, dst.cast(), len) };
        if r == 0 { Ok(()) } else { Err(STAT_PASS_ERROR) }
    }
    #[inline(always)]
    fn store(&self, off: u32, src: *const u8, len: u32) -> Result<(), u32> {
        let r = unsafe { h::bpf_skb_store_bytes(self.0.skb.skb, off, src.cast(), len, 0) };
        if r == 0 { Ok(()) } else { Err(STAT_PASS_ERROR) }
    }
    #[inline(always)]
    fn resize(&self, new_len: u32) -> Result<(), u32> {
        if new_len != self.0.len() {
            let r = unsafe { h::bpf_skb_change_tail(self.0.skb.skb, new_len, 0) };
            if r != 0 {
                return Err(STAT_PASS_ERROR);
            }
        }
        // Direct packet access below needs the whole reply linear.
        let r = unsafe { h::bpf_skb_pull_data(self.0.skb.skb, new_len) };
        if r == 0 { Ok(()) } else { Err(STAT_PASS_ERROR) }
    }
}

#[inline(always)]
fn count(idx: u32) {
    if let Some(p) = LDNS_STATS.get_ptr_mut(idx) {
        unsafe { *p += 1 };
    }
}

/// Pointer to `len` bytes at `off`, or `err` when the packet is shorter.
#[inline(always)]
fn ptr_at<P: Packet>(p: &P, off: usize, len: usize, err: u32) -> Result<*mut u8, u32> {
    let start = p.data() + off;
    if start + len > p.data_end() {
        return Err(err);
    }
    Ok(start as *mut u8)
}

/// Network-order u16 loaded natively (the unit of checksum arithmetic).
#[inline(always)]
fn ld16(ptr: *const u8) -> u16 {
    unsafe { (ptr as *const u16).read_unaligned() }
}

#[inline(always)]
fn be16(ptr: *const u8) -> u16 {
    u16::from_be(ld16(ptr))
}

#[inline(always)]
fn swap16(x: u16) -> u16 {
    x.rotate_left(8)
}

/// Parses the query and, on a fresh hit, turns the packet into the reply.
/// `Ok` means "send it back"; `Err(stat)` means PASS, packet untouched.
#[inline(always)]
fn try_answer<P: Packet>(p: &P) -> Result<(), u32> {
    // --- Ethernet, IPv4, UDP: is this a query to one of our listeners? ---
    let eth = ptr_at(p, 0, ETH_LEN, STAT_NOT_DNS)?;
    if ld16(unsafe { eth.add(12) }) != 0x0800u16.to_be() {
        return Err(STAT_NOT_DNS); // IPv6, ARP, VLAN-tagged: not ours
    }
    let ip = ptr_at(p, IP_OFF, 20, STAT_NOT_DNS)?;
    let vihl = unsafe { *ip };
    if vihl >> 4 != 4 || unsafe { *ip.add(9) } != 17 {
        return Err(STAT_NOT_DNS);
    }
    let daddr = unsafe { (ip.add(16) as *const u32).read_unaligned() };
    let view = if daddr == unsafe { core::ptr::read_volatile(&LDNS_LISTEN_KUBE) } {
        VIEW_KUBE
    } else if daddr == unsafe { core::ptr::read_volatile(&LDNS_LISTEN_VNET) } {
        VIEW_VNET
    } else {
        return Err(STAT_NOT_DNS);
    };
    let udp = ptr_at(p, UDP_OFF, 8, STAT_NOT_DNS)?;
    if vihl != 0x45 {
        return Err(STAT_PASS_IP); // options: the UDP header is elsewhere
    }
    if be16(unsafe { udp.add(2) }) != 53 {
        return Err(STAT_NOT_DNS);
    }
    if be16(unsafe { ip.add(6) }) & 0x3fff != 0 {
        return Err(STAT_PASS_IP); // fragment (MF or offset)
    }
    let tot_len = be16(unsafe { ip.add(2) }) as usize;
    let udp_len = be16(unsafe { udp.add(4) }) as usize;
    if tot_len != 20 + udp_len || ETH_LEN + tot_len > p.frame_len() {
        return Err(STAT_PASS_IP);
    }
    if !(8 + 12 + 5..=8 + MAX_QUERY).contains(&udp_len) {
        return Err(STAT_PASS_HEADER);
    }
    let dns_end = UDP_OFF + udp_len;

    // --- DNS header: a plain standard query with one question ---
    let hdr = ptr_at(p, DNS_OFF, 12, STAT_PASS_HEADER)?;
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

    // --- qname: labels of <= 63 bytes, no compression, <= 255 bytes ---
    let mut pos: usize = 0;
    let mut ended = false;
    for _ in 0..128 {
        let l = unsafe { *ptr_at(p, Q_OFF + pos, 1, STAT_PASS_QNAME)? } as usize;
        if l == 0 {
            ended = true;
            break;
        }
        if l > 63 {
            return Err(STAT_PASS_QNAME);
        }
        pos += l + 1;
        if pos >= MAX_QNAME {
            return Err(STAT_PASS_QNAME);
        }
    }
    if !ended {
        return Err(STAT_PASS_QNAME);
    }
    let qlen = pos + 1;
    let qend = Q_OFF + qlen + 4; // past QTYPE, QCLASS
    let qt = ptr_at(p, Q_OFF + qlen, 4, STAT_PASS_QNAME)?;
    let qtype = be16(qt);
    let qclass = be16(unsafe { qt.add(2) });
    let qt_sum = ld16(qt) as u64 + ld16(unsafe { qt.add(2) }) as u64;

    // --- optional OPT record ending exactly at the end of the datagram ---
    let mut kflags = if qflags & F_CD != 0 { KEY_F_CD } else { 0 };
    let mut client_max = PLAIN_UDP_MAX as usize;
    let mut udp_size_raw = 0usize;
    if arcount == 1 {
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
        let udp_size = be16(unsafe { opt.add(3) }) as usize;
        udp_size_raw = udp_size;
        if udp_size > client_max {
            client_max = udp_size;
        }
        kflags |= KEY_F_EDNS;
        if be16(unsafe { opt.add(7) }) & 0x8000 != 0 {
            kflags |= KEY_F_DO;
        }
    } else if qend != dns_end {
        return Err(STAT_PASS_HEADER); // trailing bytes
    }

    // --- key: lower-cased qname hashed in 8-byte words (scratch map) ---
    let scratch = LDNS_SCRATCH.get_ptr_mut(0).ok_or(STAT_PASS_ERROR)?;
    let sq = unsafe { (*scratch).qname.as_mut_ptr() };
    if !(1..=MAX_QNAME).contains(&qlen) {
        return Err(STAT_PASS_QNAME);
    }
    p.load(Q_OFF as u32, sq, qlen as u32)?;
    let nwords = qlen.div_ceil(8);
    let tail_bits = (qlen % 8) * 8;
    let mut hash = unsafe { core::ptr::read_volatile(&LDNS_HASH_SEED) };
    let mut q_sum: u64 = 0;
    for i in 0..32 {
        if i >= nwords {
            break;
        }
        let wp = unsafe { sq.add(i * 8) } as *mut u64;
        let mut w = unsafe { wp.read_unaligned() };
        if i == nwords - 1 && tail_bits != 0 {
            w &= (1u64 << tail_bits) - 1;
        }
        q_sum += (w & 0xffff_ffff) + (w >> 32);
        let lw = lower8(w);
        unsafe { wp.write_unaligned(lw) };
        hash = qname_hash_step(hash, lw);
    }
    let key = CacheKey {
        qname_hash: hash,
        qtype,
        qclass,
        qname_len: qlen as u8,
        view,
        flags: kflags,
        _pad: 0,
    };
    let v = match LDNS_CACHE.get_ptr(key) {
        Some(v) => unsafe { &*v },
        None => return Err(STAT_MISS),
    };

    // --- is the entry fresh, really ours, and small enough? ---
    let now = unsafe { h::bpf_ktime_get_ns() };
    if now >= v.expire_ns || now < v.insert_ns {
        return Err(STAT_EXPIRED);
    }
    let elapsed = (now - v.insert_ns) / 1_000_000_000;
    if elapsed >= v.ttl as u64 {
        return Err(STAT_EXPIRED);
    }
    let ttl_now = v.ttl - elapsed as u32;
    if v.qname_len as usize != qlen {
        return Err(STAT_PASS_COLLISION);
    }
    for i in 0..32 {
        if i >= nwords {
            break;
        }
        let a = unsafe { (sq.add(i * 8) as *const u64).read_unaligned() };
        let mut b = unsafe { (v.data.as_ptr().add(i * 8) as *const u64).read_unaligned() };
        // The tail follows the name in `data`: compare name bytes only.
        if i == nwords - 1 && tail_bits != 0 {
            b &= (1u64 << tail_bits) - 1;
        }
        if a != b {
            return Err(STAT_PASS_COLLISION);
        }
    }
    let tail_len = v.tail_len as usize;
    let ttl_count = v.ttl_count as usize;
    if tail_len == 0 || tail_len > MAX_TAIL || ttl_count > MAX_TTLS {
        return Err(STAT_PASS_ERROR);
    }
    for i in 0..MAX_TTLS {
        if i >= ttl_count {
            break;
        }
        if v.ttl_off[i] as usize + 4 > tail_len {
            return Err(STAT_PASS_ERROR);
        }
    }
    let dns_len = 12 + qlen + 4 + tail_len;
    if dns_len > client_max {
        return Err(STAT_PASS_SIZE);
    }

    // --- UDP checksum, incrementally from the entry's partial sum ---
    let rflags = v.flags_be | (ld16(unsafe { hdr.add(2) }) & F_RD.to_be());
    let ttl_be = ttl_now.to_be();
    let ttl_w = csum_fold((ttl_be & 0xffff) as u64 + (ttl_be >> 16) as u64) as u64;
    let ttl_sum = v.ttl_even as u64 * ttl_w + v.ttl_odd as u64 * swap16(ttl_w as u16) as u64;
    // QTYPE/QCLASS sit at an odd offset when the qname length is odd.
    let qt_sum = if qlen & 1 == 1 {
        swap16(csum_fold(qt_sum)) as u64
    } else {
        qt_sum
    };
    let new_udp_len = ((8 + dns_len) as u16).to_be() as u64;
    let addr_sum = ld16(unsafe { ip.add(12) }) as u64
        + ld16(unsafe { ip.add(14) }) as u64
        + ld16(unsafe { ip.add(16) }) as u64
        + ld16(unsafe { ip.add(18) }) as u64;
    let port_sum = ld16(udp) as u64 + ld16(unsafe { udp.add(2) }) as u64;
    let id_n = ld16(hdr);
    let sum = v.csum_partial as u64
        + id_n as u64 // query ID
        + rflags as u64
        + q_sum
        + qt_sum
        + ttl_sum
        + addr_sum
        + 17u16.to_be() as u64
        + 2 * new_udp_len
        + port_sum;
    let mut udp_csum = !csum_fold(sum);
    if udp_csum == 0 {
        udp_csum = 0xffff;
    }

    // --- build the reply in place ---
    let mut macs = [0u8; 12];
    unsafe { core::ptr::copy_nonoverlapping(eth, macs.as_mut_ptr(), 12) };
    let mut addrs = [0u8; 8];
    unsafe { core::ptr::copy_nonoverlapping(ip.add(12), addrs.as_mut_ptr(), 8) };
    let ports = [ld16(udp), ld16(unsafe { udp.add(2) })];

    p.resize((DNS_OFF + dns_len) as u32)?;
    let eth = ptr_at(p, 0, Q_OFF, STAT_PASS_ERROR)?;
    unsafe {
        core::ptr::copy_nonoverlapping(macs.as_ptr().add(6), eth, 6);
        core::ptr::copy_nonoverlapping(macs.as_ptr(), eth.add(6), 6);
        let ip = eth.add(IP_OFF);
        (ip.add(2) as *mut u16).write_unaligned(((20 + 8 + dns_len) as u16).to_be());
        *ip.add(8) = 64; // TTL
        (ip.add(10) as *mut u16).write_unaligned(0);
        core::ptr::copy_nonoverlapping(addrs.as_ptr().add(4), ip.add(12), 4);
        core::ptr::copy_nonoverlapping(addrs.as_ptr(), ip.add(16), 4);
        let mut ip_sum: u64 = 0;
        for i in 0..10 {
            ip_sum += ld16(ip.add(i * 2)) as u64;
        }
        (ip.add(10) as *mut u16).write_unaligned(!csum_fold(ip_sum));
        let udp = eth.add(UDP_OFF);
        (udp as *mut u16).write_unaligned(ports[1]);
        (udp.add(2) as *mut u16).write_unaligned(ports[0]);
        (udp.add(4) as *mut u16).write_unaligned(new_udp_len as u16);
        (udp.add(6) as *mut u16).write_unaligned(udp_csum);
        let hdr = eth.add(DNS_OFF);
        (hdr.add(2) as *mut u16).write_unaligned(rflags);
        for i in 0..4 {
            (hdr.add(4 + i * 2) as *mut u16).write_unaligned(v.counts_be[i]);
        }
    }
    // The tail follows the qname in `data`; both bounds are checked above
    // (qlen <= 255, tail_len <= 512), which keeps the read inside `data`.
    let tail = unsafe { v.data.as_ptr().add(qlen & 0xff) };
    p.store(qend as u32, tail, tail_len as u32)?;
    for i in 0..MAX_TTLS {
        if i >= ttl_count {
            break;
        }
        let off = qend + (v.ttl_off[i] as usize & (MAX_TAIL - 1));
        let t = ptr_at(p, off, 4, STAT_PASS_ERROR)?;
        unsafe { (t as *mut u32).write_unaligned(ttl_be) };
    }
    if v.log != 0 {
        // The question is still in place, as the client sent it.
        log_hit(
            p,
            now,
            &addrs,
            ports[0],
            id_n,
            [qtype, qclass, (udp_len - 8) as u16, dns_len as u16],
            if kflags & KEY_F_EDNS != 0 {
                udp_size_raw as u16
            } else {
                0
            },
            u16::from_be(rflags),
            [view, kflags],
            qlen,
        );
    }
    Ok(())
}

/// Emits a query-log event straight into the ring buffer (no stack copy);
/// the qname is copied from the packet.
#[inline(always)]
#[expect(
    clippy::too_many_arguments,
    reason = "flat scalars keep the BPF stack small"
)]
fn log_hit<P: Packet>(
    p: &P,
    now: u64,
    addrs: &[u8; 8],
    sport_be: u16,
    id_be: u16,
    // QTYPE, QCLASS, query length, reply length
    q: [u16; 4],
    udp_size: u16,
    rflags: u16,
    view_flags: [u8; 2],
    qlen: usize,
) {
    let Some(mut slot) = LDNS_LOG.reserve(0) else {
        count(STAT_LOG_DROPPED);
        return;
    };
    let ev = slot.as_mut_ptr();
    unsafe {
        (*ev).ktime_ns = now;
        (*ev).saddr_ne = u32::from_ne_bytes([addrs[0], addrs[1], addrs[2], addrs[3]]);
        (*ev).sport = u16::from_be(sport_be);
        (*ev).id = u16::from_be(id_be);
        (*ev).qtype = q[0];
        (*ev).qclass = q[1];
        (*ev).query_len = q[2];
        (*ev).reply_len = q[3];
        (*ev).udp_size = udp_size;
        (*ev).rflags = rflags;
        (*ev).view = view_flags[0];
        (*ev).kflags = view_flags[1];
        (*ev).qname_len = qlen as u8;
        (*ev)._pad = 0;
        let qn = (*ev).qname.as_mut_ptr();
        if !(1..=MAX_QNAME).contains(&qlen) || p.load(Q_OFF as u32, qn, qlen as u32).is_err() {
            slot.discard(0);
            count(STAT_LOG_DROPPED);
            return;
        }
    }
    slot.submit(0);
}

#[xdp]
pub fn localdns_xdp(ctx: XdpContext) -> u32 {
    match try_answer(&Xdp(&ctx)) {
        Ok(()) => {
            count(STAT_HIT);
            xdp_action::XDP_TX
        }
        Err(stat) => {
            count(stat);
            xdp_action::XDP_PASS
        }
    }
}

/// Benchmark ceiling only (never attached by the daemon): turns every UDP/53
/// query to a listener address straight around as a "reply" (QR set), so
/// the harness can measure what the machine delivers with zero DNS work.
#[xdp]
pub fn localdns_null(ctx: XdpContext) -> u32 {
    match try_null(&Xdp(&ctx)) {
        Ok(()) => xdp_action::XDP_TX,
        Err(_) => xdp_action::XDP_PASS,
    }
}

#[inline(always)]
fn try_null<P: Packet>(p: &P) -> Result<(), u32> {
    let f = ptr_at(p, 0, Q_OFF, STAT_NOT_DNS)?;
    unsafe {
        if ld16(f.add(12)) != 0x0800u16.to_be()
            || *f.add(IP_OFF) != 0x45
            || *f.add(IP_OFF + 9) != 17
        {
            return Err(STAT_NOT_DNS);
        }
        let daddr = (f.add(IP_OFF + 16) as *const u32).read_unaligned();
        if daddr != core::ptr::read_volatile(&LDNS_LISTEN_VNET)
            && daddr != core::ptr::read_volatile(&LDNS_LISTEN_KUBE)
        {
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
        let new = old | 0x8000u16.to_be();
        (f.add(DNS_OFF + 2) as *mut u16).write_unaligned(new);
        let c = ld16(f.add(UDP_OFF + 6));
        if c != 0 {
            let sum = (!c) as u64 + (!old) as u64 + new as u64;
            (f.add(UDP_OFF + 6) as *mut u16).write_unaligned(!csum_fold(sum));
        }
    }
    Ok(())
}

#[classifier]
pub fn localdns_tc(ctx: TcContext) -> i32 {
    let p = Tc(&ctx);
    // Small queries are normally linear already; pull only when not.
    if p.data_end() - p.data() < p.frame_len() {
        let len = if p.frame_len() > DNS_OFF + MAX_QUERY {
            DNS_OFF + MAX_QUERY
        } else {
            p.frame_len()
        };
        if unsafe { h::bpf_skb_pull_data(ctx.skb.skb, len as u32) } != 0 {
            count(STAT_PASS_ERROR);
            return TC_ACT_OK;
        }
    }
    match try_answer(&p) {
        Ok(()) => {
            count(STAT_HIT);
            // Out of the interface it came in on, back to the client.
            let ifindex = unsafe { (*ctx.skb.skb).ifindex };
            unsafe { h::bpf_redirect(ifindex, 0) as i32 }
        }
        Err(stat) => {
            count(stat);
            TC_ACT_OK
        }
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
