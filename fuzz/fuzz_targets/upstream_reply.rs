//! Any bytes as an upstream's reply to one of a few queries: the daemon
//! validates it once; what passes is cached (daemon entry and kernel map
//! value), rendered for clients of every buffer size, or relayed, and each
//! of those must decode with hickory-proto and carry the client's ID and
//! question. Nothing panics on the way.
#![no_main]

use hickory_proto::op::Message;
use libfuzzer_sys::fuzz_target;
use localdns_user::cache::{Entry, Key};
use localdns_user::fastpath::encode;
use localdns_user::{validate, wire};

/// Client queries (ID 0x1234, RD): www.example.test A without EDNS, with
/// EDNS 1232, with EDNS 1232 and DO; example.test TXT with EDNS 512.
const QUERIES: [&[u8]; 4] = [
    b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x03www\x07example\x04test\x00\x00\x01\x00\x01",
    b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x01\x03www\x07example\x04test\x00\x00\x01\x00\x01\x00\x00\x29\x04\xd0\x00\x00\x00\x00\x00\x00",
    b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x01\x03WwW\x07example\x04test\x00\x00\x01\x00\x01\x00\x00\x29\x04\xd0\x00\x00\x80\x00\x00\x00",
    b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x01\x07example\x04test\x00\x00\x10\x00\x01\x00\x00\x29\x02\x00\x00\x00\x00\x00\x00\x00",
];

fn check(what: &str, out: &[u8], raw: &[u8]) {
    let m = Message::from_vec(out)
        .unwrap_or_else(|e| panic!("{what} does not decode: {e}: {out:02x?}"));
    assert_eq!(&out[..2], &raw[..2], "{what}: ID");
    assert!(m.metadata.message_type == hickory_proto::op::MessageType::Response);
    assert_eq!(m.queries.len(), 1, "{what}: question");
}

fuzz_target!(|data: &[u8]| {
    let Some((&sel, resp)) = data.split_first() else {
        return;
    };
    let raw = QUERIES[sel as usize % QUERIES.len()];
    let q = wire::parse_query(raw).expect("fixed query parses");
    // The upstream query's ID is 0x1234 too, so replies can match.
    if !wire::response_matches(resp, &q, 0x1234) {
        return;
    }
    let Ok(kept) = validate::upstream_reply(resp) else {
        return; // the client gets SERVFAIL
    };
    let resp = kept.as_slice();
    if let Some(out) = wire::relay(resp, raw, &q) {
        check("relayed reply", &out, raw);
    }
    let now = 1_000_000_000_000u64;
    if let Ok(e) = Entry::from_upstream(&q, resp, 3600, 300, now) {
        let _ = encode::value(&Key::of(0, &q), &e);
        for (max, later) in [(512, 0), (1232, 1), (65535, 7200)] {
            if let Some(out) = e.render(raw, &q, now + later * 1_000_000_000, max) {
                assert!(out.len() <= max, "rendered {} bytes for {max}", out.len());
                check("cached reply", &out, raw);
            }
        }
    }
});
