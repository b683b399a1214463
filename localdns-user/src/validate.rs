//! Upstream replies are checked once per miss, off the kernel's hot path,
//! with a complete decoder independent of `wire.rs` (hickory-proto): a
//! reply that does not decode, has bytes after its last record, or a
//! record the walk cannot follow is never cached or relayed; the client
//! gets SERVFAIL.

use hickory_proto::op::Message;
use thiserror::Error;

use crate::wire;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum Malformed {
    #[error("does not decode: {0}")]
    Decode(String),
    #[error("records end at byte {end} of {len}: trailing bytes")]
    Trailing { end: usize, len: usize },
    #[error("opcode {0} in a reply to a standard query")]
    Opcode(u8),
    #[error("{0}")]
    Walk(#[from] wire::WireError),
}

/// `Ok` when `resp` is a well-formed DNS message to the last byte.
pub fn upstream_reply(resp: &[u8]) -> Result<(), Malformed> {
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
    Ok(())
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
        assert_eq!(upstream_reply(&good()), Ok(()));
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
    }
}
