//! The kernel's copy of a cache entry: [`Key`]/[`Entry`] to the
//! [`CacheKey`]/[`CacheValue`] layout of `localdns-common`, and back (a
//! starting daemon rebuilds its cache from the maps it adopts). The cache
//! module knows nothing of these layouts.

use std::sync::atomic::{AtomicU64, Ordering};

use localdns_common::{
    CacheKey, CacheValue, DATA_LEN, KeyFields, MAX_KERNEL_TTL, MAX_QNAME, MAX_REPLY, MAX_TAIL,
    MAX_TTLS, csum_fold, key_hash, name_span, qname_hash,
};
use thiserror::Error;

use crate::cache::{Entry, Key, mono_ns};
use crate::wire::HEADER_LEN;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum EncodeError {
    /// The kernel cannot serve this entry (the daemon still does).
    #[error("entry stays in userspace: {why}")]
    NotForKernel { why: &'static str },
}

fn not(why: &'static str) -> EncodeError {
    EncodeError::NotForKernel { why }
}

/// What of `key` besides the name the kernel compares (names longer than
/// [`MAX_QNAME`] never reach the kernel: [`value`] refuses them).
fn fields(key: &Key) -> KeyFields {
    KeyFields {
        qtype: key.qtype,
        qclass: key.qclass,
        qname_len: key.qname.len().min(MAX_QNAME) as u8,
        view: key.view,
        flags: key.flags,
        _pad: 0,
    }
}

/// The kernel's key for `key` with the maps' hash seed.
pub fn key(key: &Key, seed: u64) -> CacheKey {
    CacheKey {
        hash: key_hash(qname_hash(seed, &key.qname), fields(key).word()),
    }
}

/// The kernel's value for `entry` under `key`, generation 0: the
/// writer stamps it with [`Generations::next`].
pub fn value(key: &Key, entry: &Entry) -> Result<CacheValue, EncodeError> {
    if entry.tail.len() < 8 || entry.tail.len() > MAX_TAIL {
        return Err(not("reply too large for the kernel"));
    }
    if entry.ttl_offsets.len() > MAX_TTLS {
        return Err(not("too many records for the kernel"));
    }
    let qlen = entry.qname.len();
    if qlen > MAX_QNAME {
        return Err(not("name too long"));
    }
    let reply_len = HEADER_LEN + qlen + 4 + entry.tail.len();
    // Larger than a client takes is fine: the kernel answers TC=1 then,
    // as the daemon does.
    if reply_len > MAX_REPLY {
        return Err(not("reply over 1232 bytes"));
    }
    // The program refuses longer TTLs (its age arithmetic's range); the
    // 7-day cacheDurationInSeconds limit keeps every entry under it.
    if entry.ttl > MAX_KERNEL_TTL {
        return Err(not("TTL over 1,000,000 s"));
    }
    let mut v = CacheValue::zeroed();
    v.head.key = fields(key);
    v.head.insert_ns = entry.insert_ns;
    v.head.ttl = entry.ttl;
    v.head.flags_be = u16::from_ne_bytes(entry.flags.to_be_bytes());
    for (i, c) in entry.counts.iter().enumerate() {
        v.head.counts_be[i] = u16::from_ne_bytes(c.to_be_bytes());
    }
    v.head.tail_len = entry.tail.len() as u16;
    v.head.ttl_count = entry.ttl_offsets.len() as u16;
    let tail_at = HEADER_LEN + qlen + 4;
    for (i, &o) in entry.ttl_offsets.iter().enumerate() {
        v.ttl_off[i] = o;
        if (tail_at + o as usize).is_multiple_of(2) {
            v.head.ttl_even += 1;
        } else {
            v.head.ttl_odd += 1;
        }
    }
    v.data[..qlen].copy_from_slice(&entry.qname);
    let at = name_span(qlen);
    v.data[at..at + entry.tail.len()].copy_from_slice(&entry.tail);
    // Checksum of the reply payload with ID, flags, question and TTLs
    // zeroed: the kernel adds those per query.
    let mut img = vec![0u8; tail_at];
    for (i, c) in entry.counts.iter().enumerate() {
        img[4 + 2 * i..6 + 2 * i].copy_from_slice(&c.to_be_bytes());
    }
    img.extend_from_slice(&entry.tail);
    for &o in &entry.ttl_offsets {
        let o = tail_at + o as usize;
        img[o..o + 4].fill(0);
    }
    v.head.csum_partial = u32::from(csum_fold(ones_sum(&img)));
    Ok(v)
}

/// The entry a kernel value holds, for a daemon adopting the maps of an
/// earlier instance. `None` when the pair is not one [`key`]/[`value`]
/// could have produced with `seed` (then it is not adopted). The stale
/// window is the caller's (it depends on the zone); it is set to expiry.
pub fn decode(k: &CacheKey, v: &CacheValue, seed: u64) -> Option<(Key, Entry)> {
    let f = v.head.key;
    let qlen = f.qname_len as usize;
    let tail_len = v.head.tail_len as usize;
    let ttls = v.head.ttl_count as usize;
    if qlen == 0 || tail_len > MAX_TAIL || name_span(qlen) + tail_len > DATA_LEN || ttls > MAX_TTLS
    {
        return None;
    }
    let qname = v.data[..qlen].to_vec();
    if key_hash(qname_hash(seed, &qname), f.word()) != k.hash {
        return None;
    }
    let tail = v.tail().to_vec();
    let ttl_offsets: Vec<u16> = v.ttl_off[..ttls].to_vec();
    if ttl_offsets.iter().any(|&o| o as usize + 4 > tail_len) {
        return None;
    }
    let flags = u16::from_be_bytes(v.head.flags_be.to_ne_bytes());
    let key = Key {
        view: f.view,
        flags: f.flags,
        qtype: f.qtype,
        qclass: f.qclass,
        qname: qname.clone().into_boxed_slice(),
    };
    let entry = Entry {
        qname,
        flags,
        counts: v
            .head
            .counts_be
            .map(|c| u16::from_be_bytes(c.to_ne_bytes())),
        tail,
        ttl_offsets,
        ttl: v.head.ttl,
        insert_ns: v.head.insert_ns,
        expire_ns: v.head.expire_ns(),
        stale_until_ns: v.head.expire_ns(),
        rcode: (flags & 0xf) as u8,
        kernel_put: Default::default(),
    };
    // Only what this daemon would have written itself.
    let again = value(&key, &entry).ok()?;
    (again.head.csum_partial == v.head.csum_partial && again.head.key == f).then_some((key, entry))
}

/// One's-complement sum (unfolded) of `b` as native-loaded 16-bit words.
pub fn ones_sum(b: &[u8]) -> u64 {
    let mut s = 0u64;
    let mut chunks = b.chunks_exact(2);
    for c in &mut chunks {
        s += u64::from(u16::from_ne_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        s += u64::from(u16::from_ne_bytes([*last, 0]));
    }
    s
}

/// Source of [`CacheValue::generation`]: strictly increasing and tied to
/// `CLOCK_MONOTONIC`, so a value is never written twice, not even by two
/// daemons sharing the maps during a hand-over.
#[derive(Debug, Default)]
pub struct Generations(AtomicU64);

impl Generations {
    pub fn next(&self) -> u64 {
        let now = mono_ns();
        let mut prev = self.0.load(Ordering::Relaxed);
        loop {
            let next = now.max(prev + 1);
            match self
                .0
                .compare_exchange_weak(prev, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return next,
                Err(p) => prev = p,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{parse_query, testmsg::query};

    fn entry(name: &str, edns: bool) -> (Key, Entry) {
        let raw = query(name, 1, edns.then_some((1232, true)));
        let q = parse_query(&raw).unwrap();
        let resp = crate::cache::tests::reply_a(&raw, &[(300, [1, 2, 3, 4]), (77, [5, 6, 7, 8])]);
        (
            Key::of(0, &q),
            Entry::from_upstream(&q, &resp, 3600, 0, 0).unwrap(),
        )
    }

    #[test]
    fn value_checksum_matches_full_computation() {
        // The kernel adds ID, flags, question and TTLs to csum_partial; do
        // the same here and compare with a checksum over the rendered reply.
        for name in ["a.test", "ab.test", "Mixed.Case.example"] {
            let raw = query(name, 1, Some((1232, true)));
            let q = parse_query(&raw).unwrap();
            let (k, e) = entry(name, true);
            let v = value(&k, &e).unwrap();
            let out = e.render(&raw, &q, 0, 4096).unwrap();
            let mut z = out.clone();
            z[0..4].fill(0);
            z[12..q.question_end].fill(0);
            for &o in &e.ttl_offsets {
                let o = q.question_end + o as usize;
                z[o..o + 4].fill(0);
            }
            assert_eq!(
                u32::from(csum_fold(ones_sum(&z))),
                v.head.csum_partial,
                "{name}"
            );
            assert_eq!(v.head.ttl_even + v.head.ttl_odd, 2);
        }
    }

    #[test]
    fn decode_inverts_encode_and_refuses_foreign_values() {
        let (k, e) = entry("www.example.test", true);
        let v = value(&k, &e).unwrap();
        let (k2, e2) = decode(&key(&k, 42), &v, 42).unwrap();
        assert_eq!(k2, k);
        assert_eq!(
            (e2.tail, e2.ttl_offsets, e2.ttl),
            (e.tail, e.ttl_offsets, e.ttl)
        );
        assert_eq!(
            (e2.flags, e2.counts, e2.expire_ns),
            (e.flags, e.counts, e.expire_ns)
        );
        // Another seed (maps of another instance): not ours.
        assert!(decode(&key(&k, 42), &v, 43).is_none());
        // A corrupted tail no longer matches its checksum.
        let mut bad = v;
        bad.data[name_span(v.head.key.qname_len as usize) + 20] ^= 0xff;
        assert!(decode(&key(&k, 42), &bad, 42).is_none());
        // Fields that do not hash to the map key (another type's entry
        // under this key): not adopted.
        let mut other = v;
        other.head.key.qtype = 28;
        assert!(decode(&key(&k, 42), &other, 42).is_none());
    }

    #[test]
    fn ttl_past_the_kernel_range_stays_in_userspace() {
        let raw = query("a.test", 1, None);
        let q = parse_query(&raw).unwrap();
        for (ttl, kernel) in [(MAX_KERNEL_TTL, true), (MAX_KERNEL_TTL + 1, false)] {
            let resp = crate::cache::tests::reply_a(&raw, &[(ttl, [10, 0, 0, 1])]);
            let e = Entry::from_upstream(&q, &resp, u32::MAX, 0, 0).unwrap();
            assert_eq!(e.ttl, ttl);
            assert_eq!(value(&Key::of(0, &q), &e).is_ok(), kernel, "{ttl}");
        }
    }

    #[test]
    fn over_1232_stays_in_userspace() {
        let raw = query("a.test", 1, None);
        let q = parse_query(&raw).unwrap();
        let recs: Vec<_> = (0..80).map(|i| (60, [10, 0, 0, i as u8])).collect();
        let resp = crate::cache::tests::reply_a(&raw, &recs);
        let e = Entry::from_upstream(&q, &resp, 3600, 0, 0).unwrap();
        assert!(value(&Key::of(0, &q), &e).is_err());
    }

    #[test]
    fn generations_strictly_increase() {
        let g = Generations::default();
        let mut last = 0;
        for _ in 0..10_000 {
            let n = g.next();
            assert!(n > last);
            last = n;
        }
    }
}
