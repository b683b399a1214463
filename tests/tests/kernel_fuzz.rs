//! Random and mutated frames through the fast path (BPF_PROG_TEST_RUN),
//! 10^6 by default (`LOCALDNS_FUZZ_PACKETS`; `LOCALDNS_FUZZ_SEED` replays a
//! run). The oracle is the daemon: a frame the stack would deliver, whose
//! query the daemon would answer from the same cache entries. Every kernel
//! reply must be exactly the daemon's answer in a frame built here the
//! textbook way; every frame the oracle would not answer must pass
//! untouched; nothing is ever dropped.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use aya::Ebpf;
use aya::maps::{MapData, PerCpuArray};
use aya::programs::{SchedClassifier, TestRun, TestRunOptions, Xdp};
use localdns_common::{MAP_STATS, STAT_NAMES, VIEW_KUBE, VIEW_VNET};
use localdns_tests::msg::replies;
use localdns_tests::*;
use localdns_user::cache::{Entry, Key, mono_ns};
use localdns_user::fastpath::classes::CacheMaps;
use localdns_user::fastpath::{self, Globals, encode};
use localdns_user::wire::{error_reply, parse_query};

const VNET: Ipv4Addr = Ipv4Addr::new(169, 254, 10, 10);
const KUBE: Ipv4Addr = Ipv4Addr::new(169, 254, 10, 11);
const VNET6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0x10, 0x10);
const KUBE6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0x10, 0x11);
const SEED: u64 = 0x5eed_1234_abcd_0042;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const TC_ACT_OK: u32 = 0;
const TC_ACT_REDIRECT: u32 = 7;

fn view_of(dst: IpAddr) -> Option<u8> {
    match dst {
        d if d == IpAddr::from(VNET) || d == IpAddr::from(VNET6) => Some(VIEW_VNET),
        d if d == IpAddr::from(KUBE) || d == IpAddr::from(KUBE6) => Some(VIEW_KUBE),
        _ => None,
    }
}

/// xorshift64*: small, deterministic, good enough to pick mutations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn pct(&mut self, p: u64) -> bool {
        self.next() % 100 < p
    }
    fn byte(&mut self) -> u8 {
        self.next() as u8
    }
    fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
        &v[self.below(v.len())]
    }
}

/// A cached question: where it is asked, what it asks, how it was cached.
struct Seeded {
    dst: IpAddr,
    name: &'static str,
    qtype: u16,
    edns: Option<QEdns>,
    resp: fn(&[u8]) -> Vec<u8>,
}

fn edns(size: u16, do_bit: bool) -> Option<QEdns> {
    Some(QEdns {
        udp_size: size,
        do_bit,
        options: vec![],
    })
}

fn corpus() -> Vec<Seeded> {
    let s = |dst: IpAddr, name, qtype, edns, resp| Seeded {
        dst,
        name,
        qtype,
        edns,
        resp,
    };
    vec![
        s(
            VNET.into(),
            "www.example.test",
            1,
            edns(1232, false),
            replies::a2,
        ),
        s(VNET.into(), "www.example.test", 1, None, replies::a2),
        s(
            VNET6.into(),
            "www.example.test",
            28,
            edns(1232, true),
            replies::aaaa1,
        ),
        s(
            KUBE.into(),
            "kubernetes.default.svc.cluster.local",
            1,
            None,
            replies::a2,
        ),
        s(
            KUBE6.into(),
            "kubernetes.default.svc.cluster.local",
            1,
            edns(4096, false),
            replies::a2,
        ),
        s(
            VNET.into(),
            "alias.example.test",
            1,
            edns(1232, false),
            replies::cname_a,
        ),
        s(
            VNET6.into(),
            "nothere.example.test",
            1,
            edns(1232, true),
            replies::nxdomain,
        ),
        s(
            VNET.into(),
            "big.example.test",
            16,
            edns(1232, false),
            replies::txt_1200,
        ),
        s(
            VNET6.into(),
            "big.example.test",
            16,
            None,
            replies::txt_1200,
        ),
        s(
            KUBE.into(),
            "many.example.test",
            1,
            edns(1232, false),
            replies::big,
        ),
    ]
}

/// The name with each letter's case flipped at random (the cache ignores
/// case; the reply must echo the question as sent).
fn random_case(r: &mut Rng, name: &str) -> String {
    name.chars()
        .map(|c| if r.pct(30) { c.to_ascii_uppercase() } else { c })
        .collect()
}

/// A query for a cached question: random ID, case, RD/AD, EDNS size and
/// options (cookie, padding), from a random client.
fn valid_query(r: &mut Rng, s: &Seeded) -> (FrameSpec, Vec<u8>) {
    let flags = [0, msg::F_RD, msg::F_AD, msg::F_RD | msg::F_AD][r.below(4)];
    let e = s.edns.as_ref().map(|e| {
        let mut e = e.clone();
        e.udp_size = *r.pick(&[e.udp_size, 512, 1232, 1400, 4096, 65535, 100]);
        match r.below(3) {
            0 => e.options = vec![0, 10, 0, 8, 1, 2, 3, 4, 5, 6, 7, 8],
            1 => e.options = vec![0, 12, 0, 4, 0, 0, 0, 0],
            _ => {}
        }
        e
    });
    let dns = dns_query(
        r.next() as u16,
        &random_case(r, s.name),
        s.qtype,
        flags,
        e.as_ref(),
    );
    let mut spec = match s.dst {
        IpAddr::V4(d) => {
            let src = Ipv4Addr::new(169, 254, r.byte(), r.byte().max(1));
            FrameSpec::udp(src, d, (r.next() as u16).max(1), 53)
        }
        IpAddr::V6(d) => {
            let src = Ipv6Addr::new(0xfd00, 0, 0, r.next() as u16, 0, 0, 0, r.next() as u16 | 1);
            FrameSpec::udp(src, d, (r.next() as u16).max(1), 53)
        }
    };
    spec.src_mac[5] = r.byte();
    spec.frag = if r.pct(50) { 0x4000 } else { 0 };
    (spec, dns)
}

/// Mutates DNS message bytes: flips, overwrites with telling values,
/// inserts, deletes, truncates, extends, or edits the header counts.
fn mutate_dns(r: &mut Rng, d: &mut Vec<u8>) {
    for _ in 0..1 + r.below(3) {
        let n = d.len().max(1);
        match r.below(8) {
            0 => {
                let i = r.below(n);
                if let Some(b) = d.get_mut(i) {
                    *b ^= 1 << r.below(8);
                }
            }
            1 => {
                let i = r.below(n);
                let v = *r.pick(&[0u8, 1, 0x3f, 0x40, 0x80, 0xc0, 0xff, 0x29, 63, 64]);
                if let Some(b) = d.get_mut(i) {
                    *b = v;
                }
            }
            2 => {
                let i = r.below(n + 1).min(d.len());
                d.insert(i, r.byte());
            }
            3 if !d.is_empty() => {
                let i = r.below(d.len());
                d.remove(i);
            }
            4 => d.truncate(r.below(n)),
            5 => {
                for _ in 0..1 + r.below(40) {
                    d.push(r.byte());
                }
            }
            6 if d.len() >= 12 => {
                // A header count or flag byte.
                let i = 2 + r.below(10);
                d[i] = *r.pick(&[0u8, 1, 2, 0xff, 0x80, 0x10, 0x20]);
            }
            _ => {
                // The OPT record's fields, when there is one at the end.
                if d.len() > 11 + 17 {
                    let i = d.len() - 1 - r.below(11 + 12);
                    d[i] = r.byte();
                }
            }
        }
    }
}

/// Mutates the frame itself (headers included), lengths and checksums left
/// as they fall.
fn mutate_frame(r: &mut Rng, f: &mut Vec<u8>) {
    for _ in 0..1 + r.below(3) {
        let n = f.len().max(1);
        let head = n.min(14 + 40 + 8 + 12);
        match r.below(5) {
            0 | 1 => {
                let i = r.below(head);
                if let Some(b) = f.get_mut(i) {
                    *b ^= 1 << r.below(8);
                }
            }
            2 => {
                let i = r.below(n);
                if let Some(b) = f.get_mut(i) {
                    *b = r.byte();
                }
            }
            3 => f.truncate(r.below(n)),
            _ => {
                for _ in 0..1 + r.below(64) {
                    f.push(r.byte());
                }
            }
        }
    }
}

/// What the daemon would send back for `frame` if the stack delivered it
/// (the stack's checks, made here independently of the program) and the
/// daemon answered it from `cache` at `now`: the reply frame, with MACs,
/// addresses and ports swapped, TTL/hop limit 64, other IP fields kept.
fn daemon_reply(frame: &[u8], cache: &HashMap<Key, Entry>, now: u64) -> Option<Vec<u8>> {
    let be = |b: &[u8], at: usize| u16::from_be_bytes([b[at], b[at + 1]]) as usize;
    let (src, dst, udp_off, ip_payload) = match be(frame.get(..14)?, 12) {
        0x0800 => {
            let ip = frame.get(14..34)?;
            if ip[0] != 0x45 || inet_csum(&[ip]) != 0 || be(ip, 6) & 0x3fff != 0 || ip[9] != 17 {
                return None;
            }
            let tot = be(ip, 2);
            let src = Ipv4Addr::from(<[u8; 4]>::try_from(&ip[12..16]).unwrap());
            if tot < 28 || 14 + tot > frame.len() || src.octets()[0] == 0 || src.octets()[0] >= 224
            {
                return None;
            }
            let dst = Ipv4Addr::from(<[u8; 4]>::try_from(&ip[16..20]).unwrap());
            (IpAddr::from(src), IpAddr::from(dst), 34, tot - 20)
        }
        0x86dd => {
            let ip = frame.get(14..54)?;
            if ip[0] >> 4 != 6 || ip[6] != 17 {
                return None;
            }
            let src = Ipv6Addr::from(<[u8; 16]>::try_from(&ip[8..24]).unwrap());
            let dst = Ipv6Addr::from(<[u8; 16]>::try_from(&ip[24..40]).unwrap());
            let plen = be(ip, 4);
            if src.is_unspecified() || src.is_multicast() || 54 + plen > frame.len() {
                return None;
            }
            (IpAddr::from(src), IpAddr::from(dst), 54, plen)
        }
        _ => return None,
    };
    let view = view_of(dst)?;
    let udp = frame.get(udp_off..udp_off + 8)?;
    let (sport, dport, ulen) = (be(udp, 0), be(udp, 2), be(udp, 4));
    if sport == 0 || dport != 53 || ulen < 8 || ulen > ip_payload {
        return None;
    }
    let dns = &frame[udp_off + 8..udp_off + ulen];
    let q = parse_query(dns).ok()?;
    let e = cache.get(&Key::of(view, &q))?;
    if !e.is_fresh(now) {
        return None;
    }
    let payload = e
        .render(dns, &q, now, q.max_udp())
        .or_else(|| error_reply(dns, Some(&q), e.rcode, true))?;
    let seg = udp_segment(dst, src, dport as u16, sport as u16, &payload);
    let mut out = frame[..udp_off].to_vec();
    out[0..6].copy_from_slice(&frame[6..12]);
    out[6..12].copy_from_slice(&frame[0..6]);
    let ip = &mut out[14..];
    if udp_off == 34 {
        ip[2..4].copy_from_slice(&((20 + seg.len()) as u16).to_be_bytes());
        ip[8] = 64;
        ip[12..16].copy_from_slice(&frame[30..34]);
        ip[16..20].copy_from_slice(&frame[26..30]);
        ip[10..12].copy_from_slice(&[0, 0]);
        let c = inet_csum(&[&ip[..20]]);
        ip[10..12].copy_from_slice(&c.to_be_bytes());
    } else {
        ip[4..6].copy_from_slice(&(seg.len() as u16).to_be_bytes());
        ip[7] = 64;
        ip[8..24].copy_from_slice(&frame[38..54]);
        ip[24..40].copy_from_slice(&frame[22..38]);
    }
    out.extend_from_slice(&seg);
    Some(out)
}

struct Rig {
    ebpf: Ebpf,
    cache: CacheMaps,
    stats: PerCpuArray<MapData, u64>,
}

impl Rig {
    fn new() -> Rig {
        let g = Globals {
            listen: vec![
                (VNET.into(), VIEW_VNET),
                (KUBE.into(), VIEW_KUBE),
                (VNET6.into(), VIEW_VNET),
                (KUBE6.into(), VIEW_KUBE),
            ],
            seed: SEED,
            fault: localdns_common::FAULT_NONE,
        };
        let mut ebpf = fastpath::open(&g, 1024, None).expect("open object");
        fastpath::load_xdp(&mut ebpf).expect("XDP program verifies");
        fastpath::load_tc(&mut ebpf).expect("TC program verifies");
        let cache = CacheMaps::take(&mut ebpf, false).unwrap();
        let stats = PerCpuArray::try_from(ebpf.take_map(MAP_STATS).unwrap()).unwrap();
        Rig { ebpf, cache, stats }
    }

    fn run(&self, tc: bool, frame: &[u8], out: &mut [u8]) -> (u32, usize) {
        let opts = TestRunOptions {
            data_in: Some(frame),
            data_out: Some(out),
            ..Default::default()
        };
        let r = if tc {
            let p: &SchedClassifier = self
                .ebpf
                .program(fastpath::TC_PROG)
                .unwrap()
                .try_into()
                .unwrap();
            p.test_run(opts)
        } else {
            let p: &Xdp = self
                .ebpf
                .program(fastpath::XDP_PROG)
                .unwrap()
                .try_into()
                .unwrap();
            p.test_run(opts)
        };
        // The kernel refuses some frames outright (shorter than Ethernet).
        match r {
            Ok(r) => (r.return_value, r.data_size_out as usize),
            Err(_) => (u32::MAX, 0),
        }
    }
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

#[test]
fn a_million_frames_never_get_a_reply_the_daemon_would_not_send() {
    assert!(is_root(), "BPF_PROG_TEST_RUN needs root (CI runs as root)");
    let packets = env_u64("LOCALDNS_FUZZ_PACKETS").unwrap_or(1_000_000);
    let seed = env_u64("LOCALDNS_FUZZ_SEED").unwrap_or_else(|| mono_ns() | 1);
    eprintln!("fuzz: {packets} frames, LOCALDNS_FUZZ_SEED={seed}");
    let mut r = Rng(seed);
    let mut rig = Rig::new();
    let ahead = fastpath::clock::program_clock().max_ahead_ns();

    // The same entries in the kernel map and in the daemon's view of them.
    let corpus = corpus();
    let mut cache = HashMap::new();
    for s in &corpus {
        let q = dns_query(1, s.name, s.qtype, msg::F_RD, s.edns.as_ref());
        let pq = parse_query(&q).unwrap();
        let e = Entry::from_upstream(&pq, &(s.resp)(&q), 3600, 3600, mono_ns()).unwrap();
        let key = Key::of(view_of(s.dst).unwrap(), &pq);
        rig.cache
            .insert(&encode::key(&key, SEED), &encode::value(&key, &e).unwrap())
            .unwrap();
        cache.insert(key, e);
    }

    let stats = |rig: &Rig| -> Vec<u64> {
        fastpath::read_stats(&rig.stats)
            .into_iter()
            .map(|(_, v)| v)
            .collect()
    };
    let before = stats(&rig);
    let mut out = vec![0u8; 4096];
    let (mut replies, mut passes, mut refused, mut failures) = (0u64, 0u64, 0u64, Vec::new());
    let started = Instant::now();
    for n in 0..packets {
        let s = r.pick(&corpus);
        let (spec, mut dns) = valid_query(&mut r, s);
        let frame = match r.below(100) {
            0..25 => spec.build(&dns),
            25..70 => {
                mutate_dns(&mut r, &mut dns);
                spec.build(&dns)
            }
            70..90 => {
                let mut f = spec.build(&dns);
                mutate_frame(&mut r, &mut f);
                f
            }
            90..95 => {
                // Valid headers, random message.
                let len = r.below(600);
                spec.build(&(0..len).map(|_| r.byte()).collect::<Vec<_>>())
            }
            _ => (0..r.below(700)).map(|_| r.byte()).collect(),
        };
        let tc = n % 4 == 3;
        let t0 = mono_ns();
        let (rc, len) = rig.run(tc, &frame, &mut out);
        let t1 = mono_ns();
        let got = &out[..len.min(out.len())];
        let (pass_rc, reply_rc) = if tc {
            (TC_ACT_OK, TC_ACT_REDIRECT)
        } else {
            (XDP_PASS, XDP_TX)
        };
        if rc == u32::MAX {
            // The test harness refused the frame before the program ran
            // (an skb needs a whole Ethernet and IP header).
            refused += 1;
            continue;
        }
        if rc == pass_rc {
            passes += 1;
            if got != frame.as_slice() {
                failures.push(format!("passed but modified: {frame:02x?}"));
            }
        } else if rc == reply_rc {
            replies += 1;
            // TTLs count whole seconds: the program's clock read falls
            // between t0 and t1, or up to its bound ahead of the daemon's
            // (`fastpath::clock`; never behind).
            let want = [t0, t1 + ahead].map(|t| daemon_reply(&frame, &cache, t));
            match &want {
                [None, None] => failures.push(format!(
                    "reply to a frame the daemon would not answer:\n in  {frame:02x?}\n out {got:02x?}"
                )),
                [a, b] if a.as_deref() != Some(got) && b.as_deref() != Some(got) => {
                    failures.push(format!(
                        "reply differs from the daemon's:\n in   {frame:02x?}\n got  {got:02x?}\n want {:02x?}",
                        a.as_ref().or(b.as_ref()).unwrap()
                    ))
                }
                _ => {}
            }
        } else {
            failures.push(format!("action {rc} (tc: {tc}) for {frame:02x?}"));
        }
        if failures.len() >= 5 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(1200),
            "fuzz run over its time bound"
        );
    }
    let after = stats(&rig);
    let by_reason: Vec<String> = (0..after.len())
        .filter(|&i| after[i] > before[i])
        .map(|i| format!("{} {}", STAT_NAMES[i], after[i] - before[i]))
        .collect();
    eprintln!(
        "fuzz: {replies} replies, {passes} passes, {refused} refused by the harness in {:.1} s; counters: {}",
        started.elapsed().as_secs_f64(),
        by_reason.join(", ")
    );
    assert!(
        failures.is_empty(),
        "LOCALDNS_FUZZ_SEED={seed}: {} failure(s):\n{}",
        failures.len(),
        failures.join("\n")
    );
    // The run reached the reply paths, not only the early exits.
    let hits =
        after[localdns_common::STAT_HIT as usize] - before[localdns_common::STAT_HIT as usize];
    let tcs = after[localdns_common::STAT_TRUNCATED as usize]
        - before[localdns_common::STAT_TRUNCATED as usize];
    assert!(
        refused * 20 < packets,
        "{refused} frames refused by the harness"
    );
    assert!(hits * 10 >= packets, "only {hits} kernel hits");
    assert!(tcs * 1000 >= packets, "only {tcs} TC=1 replies");
    assert!(by_reason.len() >= 8, "few pass reasons seen: {by_reason:?}");
}
