//! Upstream replies are checked once per miss, off the kernel's hot path,
//! with a complete decoder independent of `wire.rs` (hickory-proto): a
//! reply that does not decode, has bytes after its last record, or a
//! record the walk cannot follow is never cached or relayed; the client
//! gets SERVFAIL.
//!
//! What passes is re-encoded by hickory before anything else sees it:
//! compression pointers then point only at names hickory wrote. An
//! upstream's pointer may target any earlier byte, a TTL or a count
//! included, and the name it spells would change when we rewrite those
//! bytes (both cases found by fuzzing).

use hickory_proto::op::Message;
use thiserror::Error;

use crate::wire;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum Malformed {
    #[error("does not decode: {0}")]
    Decode(String),
    #[error("records end at byte {end} of {len}: trailing bytes")]
    Trailing { end: usize, len: usize },
    #[error("does not re-encode: {0}")]
    Encode(String),
    #[error("opcode {0} in a reply to a standard query")]
    Opcode(u8),
    #[error("{0}")]
    Walk(#[from] wire::WireError),
}

/// The reply to keep when `resp` is a well-formed DNS message to the last
/// byte: the same message, re-encoded.
pub fn upstream_reply(resp: &[u8]) -> Result<Vec<u8>, Malformed> {
    let m = Message::from_vec(resp).map_err(|e| Malformed::Decode(e.to_string()))?;
    // We only ask standard queries. hickory decodes other opcodes by
    // their own rules (UPDATE allows empty records), which a reply
    // rewritten to opcode QUERY would then break; found by fuzzing.
    let opcode = u8::from(m.metadata.op_code);
    if opcode != 0 {
        return Err(Malformed::Opcode(opcode));
    }
    let (_, walk) = wire::walk_response(resp)?;
    if walk.end != resp.len() {
        return Err(Malformed::Trailing {
            end: walk.end,
            len: resp.len(),
        });
    }
    let out = m.to_vec().map_err(|e| Malformed::Encode(e.to_string()))?;
    let (_, walk) = wire::walk_response(&out)?;
    if walk.end != out.len() {
        return Err(Malformed::Trailing {
            end: walk.end,
            len: out.len(),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::testmsg::query;

    fn good() -> Vec<u8> {
        crate::cache::tests::reply_a(&query("a.test", 1, None), &[(60, [1, 2, 3, 4])])
    }

    #[test]
    fn accepts_good_and_rejects_broken_replies() {
        assert_eq!(upstream_reply(&good()), Ok(good()));
        let mut trailing = good();
        trailing.extend_from_slice(&[0xde, 0xad]);
        assert!(matches!(
            upstream_reply(&trailing),
            Err(Malformed::Trailing { .. })
        ));
        let mut rdata = good();
        let n = rdata.len();
        rdata[n - 5] = 40; // RDLENGTH 4 -> 40: past the end
        assert!(upstream_reply(&rdata).is_err());
        let mut ptr = good();
        let qend = 12 + 8 + 4;
        ptr[qend..qend + 2].copy_from_slice(&[0xc3, 0xff]); // pointer past the end
        assert!(upstream_reply(&ptr).is_err(), "bad pointer accepted");
        // Found by the upstream_reply fuzz target: an owner name pointing
        // into the header reads ARCOUNT, which adding our OPT changes.
        let mut hdr = good();
        hdr[qend..qend + 2].copy_from_slice(&[0xc0, 0x09]);
        assert!(
            upstream_reply(&hdr).is_err(),
            "pointer into the header accepted"
        );
        assert!(upstream_reply(&good()[..11]).is_err());
        let mut update = good();
        update[2] |= 5 << 3; // opcode UPDATE
        assert_eq!(upstream_reply(&update), Err(Malformed::Opcode(5)));
        // Found by the fuzz target: an authority record's owner points at
        // the answer's TTL. hickory accepts it (an earlier byte); kept as
        // is, aging the TTL would rename the record. Re-encoded, the
        // owner is a real name.
        let mut ttl_ptr = good();
        assert_eq!(ttl_ptr.len(), 40);
        // The answer's TTL (bytes 30..34) is 0x0000_0141: its low half
        // reads as the name "A." (then RDLENGTH's 0 byte ends it).
        ttl_ptr[30..34].copy_from_slice(&[0, 0, 1, b'A']);
        ttl_ptr[9] = 1; // NSCOUNT
        ttl_ptr.extend_from_slice(&[0xc0, 32, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 10, 0, 0, 1]);
        let before = Message::from_vec(&ttl_ptr).expect("hickory reads it");
        assert_eq!(before.authorities[0].name.to_ascii(), "A.");
        let out = upstream_reply(&ttl_ptr).expect("well-formed");
        let mut aged = out.clone();
        let (_, w) = wire::walk_response(&out).unwrap();
        for t in w.ttl_offsets {
            aged[t..t + 4].copy_from_slice(&7u32.to_be_bytes());
        }
        let after = Message::from_vec(&aged).expect("aged reply decodes");
        assert_eq!(
            after.authorities[0].name.to_ascii(),
            "A.",
            "aging renamed a record"
        );
    }
}
