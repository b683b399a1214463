//! DNS messages for every test, the fake upstream and the load generator,
//! built and read with hickory-proto: a codec independent of the daemon's
//! `wire.rs`, so tests do not check the parser against itself.

use std::net::{Ipv4Addr, Ipv6Addr};

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::opt::EdnsOption;
use hickory_proto::rr::rdata::{A, AAAA, CNAME, SOA, TXT};
use hickory_proto::rr::{Name, RData, Record, RecordType};

/// Header flag bits as sent in a query.
pub const F_RD: u16 = 0x0100;
pub const F_AD: u16 = 0x0020;
pub const F_CD: u16 = 0x0010;

/// EDNS part of a test query.
#[derive(Clone, Debug)]
pub struct QEdns {
    pub udp_size: u16,
    pub do_bit: bool,
    /// Raw option bytes: (code, length, data)... (a COOKIE as dig sends,
    /// PADDING, ...).
    pub options: Vec<u8>,
}

/// A name as given (case kept).
pub fn name(s: &str) -> Name {
    Name::from_ascii(s).unwrap_or_else(|e| panic!("name {s:?}: {e}"))
}

/// A query message: `flags` may set RD, AD, CD.
pub fn dns_query(id: u16, qname: &str, qtype: u16, flags: u16, edns: Option<&QEdns>) -> Vec<u8> {
    let mut m = Message::new(id, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = flags & F_RD != 0;
    m.metadata.authentic_data = flags & F_AD != 0;
    m.metadata.checking_disabled = flags & F_CD != 0;
    m.add_query(Query::query(name(qname), RecordType::from(qtype)));
    if let Some(e) = edns {
        let mut o = Edns::new();
        o.set_max_payload(e.udp_size);
        o.set_dnssec_ok(e.do_bit);
        let mut rest = e.options.as_slice();
        while rest.len() >= 4 {
            let code = u16::from_be_bytes([rest[0], rest[1]]);
            let len = u16::from_be_bytes([rest[2], rest[3]]) as usize;
            let data = rest[4..4 + len].to_vec();
            o.options_mut().insert(EdnsOption::Unknown(code, data));
            rest = &rest[4 + len..];
        }
        m.edns = Some(o);
    }
    m.to_vec().expect("encode query")
}

/// An upstream's reply to `query` (its ID, flags and question copied; AA
/// set as an authoritative server would), with an OPT when the query had
/// one. Names are compressed by the encoder, as real servers do.
pub fn dns_response(query: &[u8], rcode: u8, answers: &[Record], authority: &[Record]) -> Vec<u8> {
    let q = Message::from_vec(query).expect("test query decodes");
    let mut r = Message::new(q.metadata.id, MessageType::Response, OpCode::Query);
    r.metadata.authoritative = true;
    r.metadata.recursion_desired = q.metadata.recursion_desired;
    r.metadata.checking_disabled = q.metadata.checking_disabled;
    r.metadata.response_code = ResponseCode::from(0, rcode);
    r.queries = q.queries.clone();
    r.answers = answers.to_vec();
    r.authorities = authority.to_vec();
    if let Some(e) = &q.edns {
        let mut o = Edns::new();
        o.set_max_payload(1232);
        o.set_dnssec_ok(e.flags().dnssec_ok);
        r.edns = Some(o);
    }
    r.to_vec().expect("encode response")
}

/// The question name of an encoded query (case as sent).
pub fn qname_of(query: &[u8]) -> Name {
    Message::from_vec(query).expect("query decodes").queries[0]
        .name()
        .clone()
}

pub fn a(owner: &Name, ttl: u32, ip: [u8; 4]) -> Record {
    Record::from_rdata(owner.clone(), ttl, RData::A(A(Ipv4Addr::from(ip))))
}

pub fn aaaa(owner: &Name, ttl: u32, ip: Ipv6Addr) -> Record {
    Record::from_rdata(owner.clone(), ttl, RData::AAAA(AAAA(ip)))
}

pub fn cname(owner: &Name, ttl: u32, target: &str) -> Record {
    Record::from_rdata(owner.clone(), ttl, RData::CNAME(CNAME(name(target))))
}

pub fn txt(owner: &Name, ttl: u32, strings: &[String]) -> Record {
    Record::from_rdata(owner.clone(), ttl, RData::TXT(TXT::new(strings.to_vec())))
}

/// An SOA of `zone` whose MINIMUM (negative TTL) is `minimum`.
pub fn soa(zone: &str, ttl: u32, minimum: u32) -> Record {
    let z = name(zone);
    let base = zone.trim_end_matches('.');
    let under = |label: &str| {
        if base.is_empty() {
            name(&format!("{label}."))
        } else {
            name(&format!("{label}.{base}."))
        }
    };
    let soa = SOA::new(under("ns"), under("admin"), 1, 3600, 600, 86400, minimum);
    Record::from_rdata(z, ttl, RData::SOA(soa))
}

/// Upstream replies the kernel tests seed their cache entries with (the
/// BPF_PROG_TEST_RUN table and the kernel fuzz run share them).
pub mod replies {
    use super::{a, aaaa, cname, dns_response, name, qname_of, soa, txt};

    /// Two A records (TTLs 300 and 120) for the question name.
    pub fn a2(q: &[u8]) -> Vec<u8> {
        let n = qname_of(q);
        let answers = [a(&n, 300, [192, 0, 2, 10]), a(&n, 120, [192, 0, 2, 11])];
        dns_response(q, 0, &answers, &[])
    }

    pub fn aaaa1(q: &[u8]) -> Vec<u8> {
        let ip6 = "2001:db8::10".parse().unwrap();
        dns_response(q, 0, &[aaaa(&qname_of(q), 600, ip6)], &[])
    }

    /// The question name CNAME www.example.test; www A 192.0.2.10 (the
    /// encoder compresses both names into the question's).
    pub fn cname_a(q: &[u8]) -> Vec<u8> {
        let www = name("www.example.test.");
        let answers = [
            cname(&qname_of(q), 3600, "www.example.test."),
            a(&www, 45, [192, 0, 2, 10]),
        ];
        dns_response(q, 0, &answers, &[])
    }

    pub fn nxdomain(q: &[u8]) -> Vec<u8> {
        dns_response(q, 3, &[], &[soa("example.test.", 300, 60)])
    }

    /// A TXT answer of about 1150 bytes: a reply of about 1200.
    pub fn txt_1200(q: &[u8]) -> Vec<u8> {
        let strings: Vec<String> = (0..5).map(|i| format!("{i}").repeat(220)).collect();
        dns_response(q, 0, &[txt(&qname_of(q), 300, &strings)], &[])
    }

    /// About 600 bytes in 21 records (the kernel takes up to 28 TTL
    /// fields): TC=1 for a 512-byte client, a hit for a larger one.
    pub fn big(q: &[u8]) -> Vec<u8> {
        let n = qname_of(q);
        let mut rrs: Vec<_> = (0..20).map(|i| a(&n, 300, [10, 0, 0, i])).collect();
        rrs.push(txt(&n, 300, &["t".repeat(250)]));
        dns_response(q, 0, &rrs, &[])
    }
}
