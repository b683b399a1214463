//! Any bytes as a client query: the daemon parses them, and whatever it
//! would send back (an upstream query, an error reply, BADVERS) must be a
//! message hickory-proto decodes, with the client's ID.
#![no_main]

use hickory_proto::op::Message;
use libfuzzer_sys::fuzz_target;
use localdns_user::cache::Key;
use localdns_user::wire;

fn decodes(what: &str, m: &[u8]) -> Message {
    Message::from_vec(m).unwrap_or_else(|e| panic!("{what} does not decode: {e}: {m:02x?}"))
}

fuzz_target!(|data: &[u8]| {
    match wire::parse_query(data) {
        Ok(q) => {
            let id = u16::from_be_bytes([data[0], data[1]]);
            let _ = Key::of(0, &q);
            let _ = q.max_udp();
            let up = decodes("upstream query", &wire::upstream_query(&q, 0x4242));
            assert_eq!(up.metadata.id, 0x4242);
            assert_eq!(up.queries.len(), 1);
            for (rcode, tc) in [(2, false), (2, true), (5, false)] {
                if let Some(r) = wire::error_reply(data, Some(&q), rcode, tc) {
                    let m = decodes("error reply", &r);
                    assert_eq!(m.metadata.id, id);
                    assert_eq!(u8::from(m.metadata.response_code.low()), rcode);
                }
            }
        }
        Err(_) => {
            // What the daemon's reject path may send.
            if let Some(r) = wire::error_reply(data, None, 1, false) {
                let m = decodes("FORMERR", &r);
                assert_eq!(&r[..2], &data[..2]);
                assert!(m.queries.len() <= 1);
            }
            if let Some(r) = wire::badvers_reply(data) {
                decodes("BADVERS", &r);
            }
        }
    }
});
