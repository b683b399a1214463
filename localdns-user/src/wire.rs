//! DNS wire format: just what a caching forwarder needs. Queries are parsed
//! strictly (the question must be uncompressed), responses are walked record
//! by record (compressed names skipped, never followed) to find TTL fields,
//! the OPT record and the SOA.

use thiserror::Error;

pub const HEADER_LEN: usize = 12;
pub const TYPE_SOA: u16 = 6;
pub const TYPE_OPT: u16 = 41;
pub const CLASS_IN: u16 = 1;

pub const F_QR: u16 = 0x8000;
pub const F_OPCODE: u16 = 0x7800;
pub const F_AA: u16 = 0x0400;
pub const F_TC: u16 = 0x0200;
pub const F_RD: u16 = 0x0100;
pub const F_RA: u16 = 0x0080;
pub const F_AD: u16 = 0x0020;
pub const F_CD: u16 = 0x0010;

pub const RCODE_NOERROR: u8 = 0;
pub const RCODE_FORMERR: u8 = 1;
pub const RCODE_SERVFAIL: u8 = 2;
pub const RCODE_NXDOMAIN: u8 = 3;
pub const RCODE_NOTIMP: u8 = 4;
pub const RCODE_REFUSED: u8 = 5;

/// UDP payload size we advertise, upstream and to clients (DNS flag day 2020).
pub const OUR_UDP_SIZE: u16 = 1232;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum WireError {
    #[error("message too short: {len} bytes, need {need}")]
    Short { len: usize, need: usize },
    #[error("not a query (QR=1)")]
    NotQuery,
    #[error("opcode {opcode} not implemented")]
    Opcode { opcode: u8 },
    #[error("expected 1 question, got {qdcount}")]
    QuestionCount { qdcount: u16 },
    #[error("bad name at offset {offset}: {why}")]
    Name { offset: usize, why: &'static str },
    #[error("record {index} truncated at offset {offset}")]
    Record { index: usize, offset: usize },
    #[error("EDNS version {version} not supported")]
    BadVersion { version: u8 },
    #[error("more than one OPT record")]
    MultipleOpt,
}

#[inline]
pub fn be16(b: &[u8], off: usize) -> u16 {
    u16::from_be_bytes([b[off], b[off + 1]])
}

#[inline]
fn be32(b: &[u8], off: usize) -> u32 {
    u32::from_be_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

/// EDNS facts of a message's OPT record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Edns {
    pub udp_size: u16,
    pub ext_rcode: u8,
    pub version: u8,
    pub do_bit: bool,
}

/// A parsed client query. Offsets index into the bytes it was parsed from.
#[derive(Clone, Debug)]
pub struct Query {
    pub id: u16,
    pub flags: u16,
    /// Wire qname as sent (case preserved).
    pub qname: Vec<u8>,
    /// Wire qname, ASCII lower-cased (the cache key's name).
    pub qname_lower: Vec<u8>,
    pub qtype: u16,
    pub qclass: u16,
    /// Offset just past QCLASS.
    pub question_end: usize,
    pub edns: Option<Edns>,
}

impl Query {
    /// Largest UDP reply this client accepts.
    pub fn max_udp(&self) -> usize {
        match self.edns {
            Some(e) => e.udp_size.max(512) as usize,
            None => 512,
        }
    }

    /// The question section as sent (qname, QTYPE, QCLASS).
    pub fn question_bytes(&self) -> Vec<u8> {
        let mut q = self.qname.clone();
        q.extend_from_slice(&self.qtype.to_be_bytes());
        q.extend_from_slice(&self.qclass.to_be_bytes());
        q
    }

    /// `KEY_F_*` bits of the cache key.
    pub fn key_flags(&self) -> u8 {
        use localdns_common::{KEY_F_CD, KEY_F_DO, KEY_F_EDNS};
        let mut f = 0;
        if self.flags & F_CD != 0 {
            f |= KEY_F_CD;
        }
        if let Some(e) = self.edns {
            f |= KEY_F_EDNS;
            if e.do_bit {
                f |= KEY_F_DO;
            }
        }
        f
    }

    /// Presentation form of the qname ("www.example.com."), for logs.
    pub fn name_text(&self) -> String {
        name_to_text(&self.qname)
    }
}

/// Reads an uncompressed wire name at `off`; returns its end offset.
pub fn name_end_uncompressed(b: &[u8], off: usize) -> Result<usize, WireError> {
    let mut p = off;
    loop {
        let l = *b.get(p).ok_or(WireError::Name {
            offset: p,
            why: "truncated",
        })? as usize;
        if l == 0 {
            p += 1;
            break;
        }
        if l > 63 {
            return Err(WireError::Name {
                offset: p,
                why: "compression or label > 63",
            });
        }
        p += 1 + l;
        if p - off >= localdns_common::MAX_QNAME {
            return Err(WireError::Name {
                offset: off,
                why: "name longer than 255 bytes",
            });
        }
    }
    if p > b.len() {
        return Err(WireError::Name {
            offset: off,
            why: "truncated",
        });
    }
    Ok(p)
}

/// Skips a possibly compressed name at `off`; returns the offset after it.
fn skip_name(b: &[u8], off: usize) -> Result<usize, WireError> {
    let mut p = off;
    for _ in 0..128 {
        let l = *b.get(p).ok_or(WireError::Name {
            offset: p,
            why: "truncated",
        })?;
        match l {
            0 => return Ok(p + 1),
            1..=63 => p += 1 + l as usize,
            0xc0..=0xff => {
                if p + 2 > b.len() {
                    return Err(WireError::Name {
                        offset: p,
                        why: "truncated pointer",
                    });
                }
                // Only back to an earlier name: a pointer into the header
                // would read counts we rewrite (ARCOUNT when adding OPT).
                let target = usize::from(l & 0x3f) << 8 | usize::from(b[p + 1]);
                if !(HEADER_LEN..p).contains(&target) {
                    return Err(WireError::Name {
                        offset: p,
                        why: "pointer into the header or forward",
                    });
                }
                return Ok(p + 2);
            }
            _ => {
                return Err(WireError::Name {
                    offset: p,
                    why: "reserved label type",
                });
            }
        }
    }
    Err(WireError::Name {
        offset: off,
        why: "too many labels",
    })
}

pub fn name_to_text(wire: &[u8]) -> String {
    let mut s = String::new();
    let mut p = 0;
    while p < wire.len() && wire[p] != 0 {
        let l = wire[p] as usize;
        for &c in wire.get(p + 1..p + 1 + l).unwrap_or(&[]) {
            if c.is_ascii_graphic() && c != b'.' && c != b'\\' {
                s.push(c as char);
            } else {
                s.push_str(&format!("\\{c:03}"));
            }
        }
        s.push('.');
        p += 1 + l;
    }
    if s.is_empty() {
        s.push('.');
    }
    s
}

/// Text zone/name ("cluster.local", "Example.COM.", ".") to lower-case wire.
pub fn text_to_wire_lower(name: &str) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    for label in name.trim_end_matches('.').split('.') {
        if label.is_empty() {
            if name.trim_end_matches('.').is_empty() {
                break;
            }
            return None;
        }
        if label.len() > 63 {
            return None;
        }
        out.push(label.len() as u8);
        out.extend(label.bytes().map(|c| c.to_ascii_lowercase()));
    }
    out.push(0);
    (out.len() <= localdns_common::MAX_QNAME).then_some(out)
}

/// Parses a client query. Errors that still allow an answer carry enough
/// for [`error_reply`] (the header is at least 12 bytes then).
pub fn parse_query(b: &[u8]) -> Result<Query, WireError> {
    if b.len() < HEADER_LEN {
        return Err(WireError::Short {
            len: b.len(),
            need: HEADER_LEN,
        });
    }
    let flags = be16(b, 2);
    if flags & F_QR != 0 {
        return Err(WireError::NotQuery);
    }
    let opcode = ((flags & F_OPCODE) >> 11) as u8;
    if opcode != 0 {
        return Err(WireError::Opcode { opcode });
    }
    let qdcount = be16(b, 4);
    if qdcount != 1 {
        return Err(WireError::QuestionCount { qdcount });
    }
    let qend = name_end_uncompressed(b, HEADER_LEN)?;
    if qend + 4 > b.len() {
        return Err(WireError::Short {
            len: b.len(),
            need: qend + 4,
        });
    }
    let qname = b[HEADER_LEN..qend].to_vec();
    let qname_lower = qname.to_ascii_lowercase();
    let qtype = be16(b, qend);
    let qclass = be16(b, qend + 2);
    let question_end = qend + 4;
    let counts = [be16(b, 6), be16(b, 8), be16(b, 10)];
    let walk = walk_records(b, question_end, counts)?;
    let edns = walk.opt.map(|o| o.edns);
    if let Some(e) = edns
        && e.version != 0
    {
        return Err(WireError::BadVersion { version: e.version });
    }
    Ok(Query {
        id: be16(b, 0),
        flags,
        qname,
        qname_lower,
        qtype,
        qclass,
        question_end,
        edns,
    })
}

/// Where an OPT record sits in a message.
#[derive(Clone, Copy, Debug)]
pub struct OptPos {
    pub start: usize,
    pub end: usize,
    pub edns: Edns,
}

/// What [`walk_records`] finds past the question.
#[derive(Clone, Debug, Default)]
pub struct Walk {
    /// Offsets of TTL fields of all records except OPT.
    pub ttl_offsets: Vec<usize>,
    /// Smallest TTL of those records.
    pub min_ttl: Option<u32>,
    pub opt: Option<OptPos>,
    /// min(SOA TTL, SOA MINIMUM) of the first SOA in the authority section.
    pub soa_neg_ttl: Option<u32>,
    /// Offset after the last record.
    pub end: usize,
    /// Index (0-based over all records) of the OPT record, and record count.
    pub opt_index: Option<usize>,
    pub records: usize,
}

fn walk_records(b: &[u8], start: usize, counts: [u16; 3]) -> Result<Walk, WireError> {
    let mut w = Walk::default();
    let mut p = start;
    let mut index = 0;
    for (section, &n) in counts.iter().enumerate() {
        for _ in 0..n {
            let rstart = p;
            p = skip_name(b, p)?;
            if p + 10 > b.len() {
                return Err(WireError::Record { index, offset: p });
            }
            let rtype = be16(b, p);
            let rdlen = be16(b, p + 8) as usize;
            let rdata = p + 10;
            if rdata + rdlen > b.len() {
                return Err(WireError::Record { index, offset: p });
            }
            if rtype == TYPE_OPT {
                if w.opt.is_some() {
                    return Err(WireError::MultipleOpt);
                }
                let ttl = be32(b, p + 4);
                w.opt = Some(OptPos {
                    start: rstart,
                    end: rdata + rdlen,
                    edns: Edns {
                        udp_size: be16(b, p + 2),
                        ext_rcode: (ttl >> 24) as u8,
                        version: (ttl >> 16) as u8,
                        do_bit: ttl & 0x8000 != 0,
                    },
                });
                w.opt_index = Some(index);
            } else {
                // RFC 2181 §8: a TTL with the top bit set means 0.
                let ttl = sane_ttl(be32(b, p + 4));
                w.ttl_offsets.push(p + 4);
                w.min_ttl = Some(w.min_ttl.map_or(ttl, |m| m.min(ttl)));
                if section == 1 && rtype == TYPE_SOA && w.soa_neg_ttl.is_none() {
                    let mname_end = skip_name(b, rdata)?;
                    let rname_end = skip_name(b, mname_end)?;
                    if rname_end + 20 <= rdata + rdlen {
                        w.soa_neg_ttl = Some(ttl.min(be32(b, rname_end + 16)));
                    }
                }
            }
            p = rdata + rdlen;
            index += 1;
        }
    }
    w.end = p;
    w.records = index;
    Ok(w)
}

/// A TTL as RFC 2181 §8 reads it: values with the top bit set are 0.
pub fn sane_ttl(ttl: u32) -> u32 {
    if ttl >= 1 << 31 { 0 } else { ttl }
}

/// The header flags a recursive service sends (RFC 1035, 4035 §3.2.2,
/// 6840 §5.8): QR, RA; RD and CD as the query had them; AA never; AD only
/// when the answer carried it and the query asked for it (DO or AD set);
/// TC and RCODE as given. `answer` is the flags of the answer being sent,
/// `query` those of the query. The kernel applies the same rule.
pub fn reply_flags(answer: u16, query: u16, do_bit: bool) -> u16 {
    let ad_wanted = do_bit || query & F_AD != 0;
    let mut f = F_QR | F_RA | (query & (F_RD | F_CD)) | (answer & (F_TC | 0xf));
    if ad_wanted {
        f |= answer & F_AD;
    }
    f
}

/// `. IN NS`, recursion desired: the health-check query CoreDNS `forward`
/// sends to an upstream marked down.
pub fn probe_query() -> Vec<u8> {
    let mut m = vec![0, 0, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0, 0];
    m.extend_from_slice(&2u16.to_be_bytes());
    m.extend_from_slice(&CLASS_IN.to_be_bytes());
    m
}

/// An OPT record as we send it: our UDP size, DO as given, no options.
pub fn our_opt(do_bit: bool, ext_rcode: u8) -> [u8; 11] {
    let mut o = [0u8; 11];
    o[1..3].copy_from_slice(&TYPE_OPT.to_be_bytes());
    o[3..5].copy_from_slice(&OUR_UDP_SIZE.to_be_bytes());
    o[5] = ext_rcode;
    if do_bit {
        o[7] = 0x80;
    }
    o
}

/// The query we send upstream for `q`: lower-cased question, RD and CD as
/// the client set them, EDNS only when the client used it (EDNS is part of
/// the cache key, so the answer fits exactly that kind of client).
pub fn upstream_query(q: &Query, id: u16) -> Vec<u8> {
    let mut m = Vec::with_capacity(HEADER_LEN + q.qname.len() + 4 + 11);
    m.extend_from_slice(&id.to_be_bytes());
    m.extend_from_slice(&(q.flags & (F_RD | F_CD | F_AD)).to_be_bytes());
    m.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, u8::from(q.edns.is_some())]);
    m.extend_from_slice(&q.qname_lower);
    m.extend_from_slice(&q.qtype.to_be_bytes());
    m.extend_from_slice(&q.qclass.to_be_bytes());
    if let Some(e) = q.edns {
        m.extend_from_slice(&our_opt(e.do_bit, 0));
    }
    m
}

/// True when `resp` answers exactly `q` (case-insensitive name) as sent
/// with `id`: the only replies accepted from an upstream.
pub fn response_matches(resp: &[u8], q: &Query, id: u16) -> bool {
    if resp.len() < HEADER_LEN || be16(resp, 0) != id || be16(resp, 2) & F_QR == 0 {
        return false;
    }
    if be16(resp, 4) != 1 {
        return false;
    }
    let Ok(end) = name_end_uncompressed(resp, HEADER_LEN) else {
        return false;
    };
    end + 4 <= resp.len()
        && resp[HEADER_LEN..end].eq_ignore_ascii_case(&q.qname_lower)
        && be16(resp, end) == q.qtype
        && be16(resp, end + 2) == q.qclass
}

pub fn rcode(resp: &[u8]) -> u8 {
    (be16(resp, 2) & 0xf) as u8
}

/// A minimal reply carrying only `rcode` (FORMERR, SERVFAIL, REFUSED, ...)
/// or the TC bit: header, the client's question if it has one, and an OPT
/// when the client sent one.
pub fn error_reply(raw: &[u8], q: Option<&Query>, rcode: u8, tc: bool) -> Option<Vec<u8>> {
    if raw.len() < HEADER_LEN {
        return None;
    }
    let qflags = be16(raw, 2);
    let answer = u16::from(rcode & 0xf) | if tc { F_TC } else { 0 };
    let flags = reply_flags(answer, qflags, false) | (qflags & F_OPCODE);
    let mut m = Vec::with_capacity(64);
    m.extend_from_slice(&raw[0..2]);
    m.extend_from_slice(&flags.to_be_bytes());
    match q {
        Some(q) => {
            let has_opt = q.edns.is_some();
            m.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, u8::from(has_opt)]);
            m.extend_from_slice(&q.question_bytes());
            if let Some(e) = q.edns {
                m.extend_from_slice(&our_opt(e.do_bit, rcode >> 4));
            }
        }
        None => m.extend_from_slice(&[0; 8]),
    }
    Some(m)
}

/// The reply to a query whose EDNS version we do not speak (RFC 6891 §6.1.3).
pub fn badvers_reply(raw: &[u8]) -> Option<Vec<u8>> {
    if raw.len() < HEADER_LEN {
        return None;
    }
    let mut m = Vec::with_capacity(HEADER_LEN + 11);
    m.extend_from_slice(&raw[0..2]);
    let flags = reply_flags(0, be16(raw, 2), false);
    m.extend_from_slice(&flags.to_be_bytes());
    m.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 1]);
    m.extend_from_slice(&our_opt(false, 1)); // BADVERS = 16: ext rcode 1, rcode 0
    Some(m)
}

/// An upstream reply that is not cached, as a recursive service sends it:
/// the client's ID and question, [`reply_flags`], the upstream's records
/// with TTLs sanitised (RFC 2181 §8), and our OPT in place of the
/// upstream's when the client used EDNS (keeping an extended RCODE).
/// `None` when `resp` does not walk (validated replies always do).
pub fn relay(resp: &[u8], raw: &[u8], q: &Query) -> Option<Vec<u8>> {
    let (qend, walk) = walk_response(resp).ok()?;
    let mut counts = [1, be16(resp, 6), be16(resp, 8), be16(resp, 10)];
    let mut body = Vec::with_capacity(resp.len());
    let mut ttls = walk.ttl_offsets.clone();
    let ext_rcode = walk.opt.map_or(0, |o| o.edns.ext_rcode);
    match walk.opt {
        // Last record: dropped without moving anything a pointer names.
        Some(o) if o.end == walk.end => {
            body.extend_from_slice(&resp[qend..o.start]);
            counts[3] -= 1;
        }
        // Elsewhere (rare): left where it is.
        Some(_) => body.extend_from_slice(&resp[qend..walk.end]),
        None => body.extend_from_slice(&resp[qend..walk.end]),
    }
    let kept_opt = walk.opt.is_some_and(|o| o.end != walk.end);
    if !kept_opt && let Some(e) = q.edns {
        body.extend_from_slice(&our_opt(e.do_bit, ext_rcode));
        counts[3] += 1;
    }
    let do_bit = q.edns.is_some_and(|e| e.do_bit);
    let mut m = Vec::with_capacity(q.question_end + body.len());
    m.extend_from_slice(&raw[0..2]);
    m.extend_from_slice(&reply_flags(be16(resp, 2), q.flags, do_bit).to_be_bytes());
    for c in counts {
        m.extend_from_slice(&c.to_be_bytes());
    }
    m.extend_from_slice(&raw[HEADER_LEN..q.question_end]);
    // The upstream's question is ours lower-cased: same length, so record
    // offsets (and compression pointers) do not move.
    let shift = m.len() as isize - qend as isize;
    m.extend_from_slice(&body);
    for o in ttls.drain(..) {
        let at = (o as isize + shift) as usize;
        let t = u32::from_be_bytes([m[at], m[at + 1], m[at + 2], m[at + 3]]);
        m[at..at + 4].copy_from_slice(&sane_ttl(t).to_be_bytes());
    }
    Some(m)
}

/// Walks a response past its question; used on upstream replies.
pub fn walk_response(resp: &[u8]) -> Result<(usize, Walk), WireError> {
    if resp.len() < HEADER_LEN {
        return Err(WireError::Short {
            len: resp.len(),
            need: HEADER_LEN,
        });
    }
    let qdcount = be16(resp, 4);
    if qdcount != 1 {
        return Err(WireError::QuestionCount { qdcount });
    }
    let qend = name_end_uncompressed(resp, HEADER_LEN)? + 4;
    if qend > resp.len() {
        return Err(WireError::Short {
            len: resp.len(),
            need: qend,
        });
    }
    let counts = [be16(resp, 6), be16(resp, 8), be16(resp, 10)];
    let w = walk_records(resp, qend, counts)?;
    Ok((qend, w))
}

#[cfg(test)]
pub(crate) mod testmsg {
    //! Messages for unit tests, built by hickory-proto (not by this module,
    //! so the parser is not checked against itself).
    use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query as HQuery};
    use hickory_proto::rr::rdata::A;
    use hickory_proto::rr::{Name, RData, Record, RecordType};

    /// A query (ID 0x1234, RD) for `name`/`qtype`, with EDNS (UDP size,
    /// DO) when given.
    pub fn query(name: &str, qtype: u16, edns: Option<(u16, bool)>) -> Vec<u8> {
        let mut m = Message::new(0x1234, MessageType::Query, OpCode::Query);
        m.metadata.recursion_desired = true;
        m.add_query(HQuery::query(
            Name::from_ascii(name).expect("test name"),
            RecordType::from(qtype),
        ));
        if let Some((size, do_bit)) = edns {
            let mut o = Edns::new();
            o.set_max_payload(size);
            o.set_dnssec_ok(do_bit);
            m.edns = Some(o);
        }
        m.to_vec().expect("encode test query")
    }

    /// An upstream's NOERROR reply to `qraw` (ID 0x4242, RA) with A
    /// records (TTL, address) owned by the question name.
    pub fn reply_a(qraw: &[u8], answers: &[(u32, [u8; 4])]) -> Vec<u8> {
        let q = Message::from_vec(qraw).expect("test query decodes");
        let mut r = Message::new(0x4242, MessageType::Response, OpCode::Query);
        r.metadata.recursion_desired = q.metadata.recursion_desired;
        r.metadata.recursion_available = true;
        r.queries = q.queries.clone();
        let owner = q.queries[0].name().clone();
        r.answers = answers
            .iter()
            .map(|(ttl, ip)| {
                Record::from_rdata(
                    owner.clone(),
                    *ttl,
                    RData::A(A::from(std::net::Ipv4Addr::from(*ip))),
                )
            })
            .collect();
        if let Some(e) = &q.edns {
            let mut o = Edns::new();
            o.set_max_payload(1232);
            o.set_dnssec_ok(e.flags().dnssec_ok);
            r.edns = Some(o);
        }
        r.to_vec().expect("encode test reply")
    }
}

#[cfg(test)]
mod tests {
    use super::testmsg::query;
    use super::*;

    #[test]
    fn parses_query_with_edns_and_keeps_case() {
        let b = query("WwW.Example.TEST", 1, Some((4096, true)));
        let q = parse_query(&b).unwrap();
        assert_eq!(q.qname, b"\x03WwW\x07Example\x04TEST\x00");
        assert_eq!(q.qname_lower, b"\x03www\x07example\x04test\x00");
        assert_eq!(q.edns.unwrap().udp_size, 4096);
        assert!(q.edns.unwrap().do_bit);
        assert_eq!(q.max_udp(), 4096);
        assert_eq!(q.name_text(), "WwW.Example.TEST.");
    }

    #[test]
    fn rejects_bad_queries() {
        assert!(matches!(parse_query(&[0; 5]), Err(WireError::Short { .. })));
        let mut b = query("a.test", 1, None);
        b[2] |= 0x80;
        assert_eq!(parse_query(&b).unwrap_err(), WireError::NotQuery);
        let mut b = query("a.test", 1, None);
        b[12] = 0xc0;
        assert!(matches!(parse_query(&b), Err(WireError::Name { .. })));
        let mut b = query("a.test", 1, None);
        b.truncate(b.len() - 2);
        assert!(parse_query(&b).is_err());
        let mut b = query("a.test", 1, None);
        b[5] = 2;
        assert!(matches!(
            parse_query(&b),
            Err(WireError::QuestionCount { qdcount: 2 })
        ));
        let mut b = query("a.test", 1, Some((1232, false)));
        let n = b.len();
        b[n - 5] = 1; // EDNS version 1
        assert!(matches!(
            parse_query(&b),
            Err(WireError::BadVersion { version: 1 })
        ));
    }

    #[test]
    fn recursive_service_flags() {
        // (answer flags, query flags, DO) -> reply flags
        let cases = [
            // AA from an authoritative upstream never passes; RA always set.
            (F_QR | F_AA, F_RD, false, F_QR | F_RA | F_RD),
            // RD and CD come from the query, not the answer.
            (F_QR | F_RD | F_CD, 0, false, F_QR | F_RA),
            (F_QR, F_RD | F_CD, false, F_QR | F_RA | F_RD | F_CD),
            // AD only when the query set DO or AD (RFC 6840 §5.8).
            (F_QR | F_AD, F_RD, false, F_QR | F_RA | F_RD),
            (F_QR | F_AD, F_RD | F_AD, false, F_QR | F_RA | F_RD | F_AD),
            (F_QR | F_AD, F_RD, true, F_QR | F_RA | F_RD | F_AD),
            (F_QR, F_RD | F_AD, true, F_QR | F_RA | F_RD),
            // RCODE and TC are the answer's.
            (F_QR | F_TC | 3, 0, false, F_QR | F_RA | F_TC | 3),
        ];
        for (answer, query, do_bit, want) in cases {
            assert_eq!(
                reply_flags(answer, query, do_bit),
                want,
                "{answer:#06x} {query:#06x} {do_bit}"
            );
        }
        assert_eq!(sane_ttl(0x7fff_ffff), 0x7fff_ffff);
        assert_eq!(sane_ttl(0x8000_0000), 0);
        assert_eq!(sane_ttl(u32::MAX), 0);
    }

    #[test]
    fn text_names() {
        assert_eq!(text_to_wire_lower(".").unwrap(), vec![0]);
        assert_eq!(
            text_to_wire_lower("Cluster.Local.").unwrap(),
            b"\x07cluster\x05local\x00"
        );
        assert_eq!(
            text_to_wire_lower("cluster.local").unwrap(),
            b"\x07cluster\x05local\x00"
        );
        assert!(text_to_wire_lower("a..b").is_none());
        assert_eq!(name_to_text(b"\x01a\x00"), "a.");
        assert_eq!(name_to_text(b"\x00"), ".");
    }

    #[test]
    fn upstream_query_is_lowercase_and_matches() {
        let q = parse_query(&query("Foo.Test", 28, Some((512, false)))).unwrap();
        let u = upstream_query(&q, 0xbeef);
        assert_eq!(&u[12..22], b"\x03foo\x04test\x00");
        let mut resp = u.clone();
        resp[2] |= 0x80;
        assert!(response_matches(&resp, &q, 0xbeef));
        assert!(!response_matches(&resp, &q, 0xbeee));
        resp[13] = b'g';
        assert!(!response_matches(&resp, &q, 0xbeef));
    }
}
