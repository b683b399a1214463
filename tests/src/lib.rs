//! Shared helpers of the localdns integration tests: packet and message
//! builders with independent (reference) checksums, and guards that build
//! and always tear down network namespaces and processes.

pub mod fake;
pub mod load;
pub mod netns;
pub mod topo;

use std::net::Ipv4Addr;

/// RFC 1071 checksum, written the textbook way (big-endian words), to
/// check the kernel's incremental arithmetic against.
pub fn inet_csum(chunks: &[&[u8]]) -> u16 {
    let mut all = Vec::new();
    for c in chunks {
        all.extend_from_slice(c);
    }
    if all.len() % 2 == 1 {
        all.push(0);
    }
    let mut sum: u32 = 0;
    for w in all.chunks(2) {
        sum += u32::from(u16::from_be_bytes([w[0], w[1]]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
pub const NODE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];

/// Knobs for an Ethernet/IPv4 frame around a payload.
#[derive(Clone)]
pub struct FrameSpec {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub ip_options: Vec<u8>,
    pub frag: u16,
    pub ethertype: u16,
}

impl FrameSpec {
    pub fn udp(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16) -> Self {
        FrameSpec {
            src,
            dst,
            sport,
            dport,
            proto: 17,
            ip_options: Vec::new(),
            frag: 0x4000,
            ethertype: 0x0800,
        }
    }

    /// The frame: Ethernet (client -> node), IPv4, UDP (or raw L4 bytes when
    /// `proto` is not UDP), with correct checksums.
    pub fn build(&self, payload: &[u8]) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&NODE_MAC);
        f.extend_from_slice(&CLIENT_MAC);
        f.extend_from_slice(&self.ethertype.to_be_bytes());
        let ihl = 5 + self.ip_options.len() / 4;
        let l4_len = if self.proto == 17 {
            8 + payload.len()
        } else {
            payload.len()
        };
        let tot = ihl * 4 + l4_len;
        let mut ip = vec![(4 << 4) | ihl as u8, 0];
        ip.extend_from_slice(&(tot as u16).to_be_bytes());
        ip.extend_from_slice(&0x1234u16.to_be_bytes());
        ip.extend_from_slice(&self.frag.to_be_bytes());
        ip.extend_from_slice(&[64, self.proto, 0, 0]);
        ip.extend_from_slice(&self.src.octets());
        ip.extend_from_slice(&self.dst.octets());
        ip.extend_from_slice(&self.ip_options);
        let c = inet_csum(&[&ip]);
        ip[10..12].copy_from_slice(&c.to_be_bytes());
        f.extend_from_slice(&ip);
        if self.proto == 17 {
            f.extend_from_slice(&udp_segment(
                self.src, self.dst, self.sport, self.dport, payload,
            ));
        } else {
            f.extend_from_slice(payload);
        }
        f
    }
}

/// UDP header + payload with the checksum over the pseudo-header.
pub fn udp_segment(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    sport: u16,
    dport: u16,
    payload: &[u8],
) -> Vec<u8> {
    let len = (8 + payload.len()) as u16;
    let mut u = Vec::new();
    u.extend_from_slice(&sport.to_be_bytes());
    u.extend_from_slice(&dport.to_be_bytes());
    u.extend_from_slice(&len.to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(payload);
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&[0, 17]);
    pseudo.extend_from_slice(&len.to_be_bytes());
    let mut c = inet_csum(&[&pseudo, &u]);
    if c == 0 {
        c = 0xffff;
    }
    u[6..8].copy_from_slice(&c.to_be_bytes());
    u
}

/// Wire name from text, case kept ("WwW.example.test" -> 3WwW7example4test0).
pub fn wire_name(name: &str) -> Vec<u8> {
    let mut w = Vec::new();
    for l in name
        .trim_end_matches('.')
        .split('.')
        .filter(|l| !l.is_empty())
    {
        w.push(l.len() as u8);
        w.extend_from_slice(l.as_bytes());
    }
    w.push(0);
    w
}

/// EDNS part of a test query.
#[derive(Clone)]
pub struct QEdns {
    pub udp_size: u16,
    pub do_bit: bool,
    /// Raw option bytes (e.g. a COOKIE, as dig sends by default).
    pub options: Vec<u8>,
}

/// A DNS query message.
pub fn dns_query(id: u16, name: &str, qtype: u16, flags: u16, edns: Option<&QEdns>) -> Vec<u8> {
    let mut m = Vec::new();
    m.extend_from_slice(&id.to_be_bytes());
    m.extend_from_slice(&flags.to_be_bytes());
    m.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, u8::from(edns.is_some())]);
    m.extend_from_slice(&wire_name(name));
    m.extend_from_slice(&qtype.to_be_bytes());
    m.extend_from_slice(&1u16.to_be_bytes());
    if let Some(e) = edns {
        m.push(0);
        m.extend_from_slice(&41u16.to_be_bytes());
        m.extend_from_slice(&e.udp_size.to_be_bytes());
        m.extend_from_slice(&[0, 0, if e.do_bit { 0x80 } else { 0 }, 0]);
        m.extend_from_slice(&(e.options.len() as u16).to_be_bytes());
        m.extend_from_slice(&e.options);
    }
    m
}

/// A resource record for [`dns_response`]; `name` is wire bytes (a
/// compression pointer such as `[0xc0, 12]` is fine).
pub struct Rr {
    pub name: Vec<u8>,
    pub rtype: u16,
    pub ttl: u32,
    pub rdata: Vec<u8>,
}

impl Rr {
    pub fn new(name: &[u8], rtype: u16, ttl: u32, rdata: &[u8]) -> Self {
        Rr {
            name: name.to_vec(),
            rtype,
            ttl,
            rdata: rdata.to_vec(),
        }
    }
}

/// An upstream reply to `query` (its ID and question copied), with an OPT
/// record at the end when the query had one.
pub fn dns_response(query: &[u8], rcode: u8, answers: &[Rr], authority: &[Rr]) -> Vec<u8> {
    let q = localdns_user::wire::parse_query(query).expect("test query parses");
    let mut m = Vec::new();
    m.extend_from_slice(&query[0..2]);
    m.extend_from_slice(&(0x8580u16 | u16::from(rcode)).to_be_bytes()); // QR AA RD RA
    m.extend_from_slice(&1u16.to_be_bytes());
    m.extend_from_slice(&(answers.len() as u16).to_be_bytes());
    m.extend_from_slice(&(authority.len() as u16).to_be_bytes());
    m.extend_from_slice(&u16::from(q.edns.is_some()).to_be_bytes());
    m.extend_from_slice(&query[12..q.question_end]);
    for rr in answers.iter().chain(authority) {
        m.extend_from_slice(&rr.name);
        m.extend_from_slice(&rr.rtype.to_be_bytes());
        m.extend_from_slice(&1u16.to_be_bytes());
        m.extend_from_slice(&rr.ttl.to_be_bytes());
        m.extend_from_slice(&(rr.rdata.len() as u16).to_be_bytes());
        m.extend_from_slice(&rr.rdata);
    }
    if let Some(e) = q.edns {
        m.extend_from_slice(&localdns_user::wire::our_opt(e.do_bit, 0));
    }
    m
}

/// SOA rdata with the given MINIMUM.
pub fn soa_rdata(minimum: u32) -> Vec<u8> {
    let mut r = wire_name("ns.example.test");
    r.extend_from_slice(&wire_name("admin.example.test"));
    for v in [1u32, 3600, 600, 86400, minimum] {
        r.extend_from_slice(&v.to_be_bytes());
    }
    r
}

/// True when running as root (needed for BPF and namespaces).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Durations (ns, sorted) of `runs` single BPF_PROG_TEST_RUN invocations of
/// `prog` on `frame`, each asserted to return `want`. Single runs because a
/// program that rewrites the packet cannot be timed with `repeat`: the next
/// repetition would see its own output.
pub fn single_run_ns(prog: &aya::programs::Xdp, frame: &[u8], runs: usize, want: u32) -> Vec<u64> {
    use aya::programs::{TestRun, TestRunOptions};
    let mut ns: Vec<u64> = (0..runs)
        .map(|_| {
            let mut out = vec![0u8; 512];
            let opts = TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ..Default::default()
            };
            let r = prog.test_run(opts).expect("BPF_PROG_TEST_RUN");
            assert_eq!(r.return_value, want, "unexpected XDP action");
            r.duration.as_nanos() as u64
        })
        .collect();
    ns.sort_unstable();
    ns
}
