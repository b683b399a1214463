//! The answer cache. An [`Entry`] is built once from an upstream reply and
//! rendered per query exactly as the kernel renders its copy of the same
//! entry: header flags from the upstream reply with the client's ID and RD
//! bit, the client's question bytes, then the stored records with every TTL
//! set to the entry TTL minus whole seconds elapsed (CoreDNS style). Daemon
//! and kernel answers are therefore byte-identical.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use thiserror::Error;

use crate::wire::{
    self, F_AD, F_QR, F_RA, F_TC, HEADER_LEN, Query, RCODE_NOERROR, RCODE_NXDOMAIN, be16,
};

#[derive(Debug, Error, PartialEq, Eq)]
pub enum CacheError {
    #[error("upstream reply is malformed: {0}")]
    Wire(#[from] wire::WireError),
    #[error("not cacheable: {why}")]
    NotCacheable { why: &'static str },
}

/// `CLOCK_MONOTONIC` in nanoseconds: the clock of `bpf_ktime_get_ns`.
pub fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

const NS: u64 = 1_000_000_000;

/// Cache key: view, flags (DO, CD, EDNS), type, class and the lower-cased
/// name (the kernel keys on a hash of it).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Key {
    pub view: u8,
    pub flags: u8,
    pub qtype: u16,
    pub qclass: u16,
    pub qname: Box<[u8]>,
}

impl Key {
    pub fn of(view: u8, q: &Query) -> Self {
        Key {
            view,
            flags: q.key_flags(),
            qtype: q.qtype,
            qclass: q.qclass,
            qname: q.qname_lower.clone().into_boxed_slice(),
        }
    }
}

/// A cached answer.
#[derive(Clone, Debug)]
pub struct Entry {
    /// Lower-cased wire qname.
    pub qname: Vec<u8>,
    /// Header flags: QR, RA and the answer's own AD and RCODE; the bits
    /// that depend on the query come from [`wire::reply_flags`] per reply.
    pub flags: u16,
    /// QDCOUNT, ANCOUNT, NSCOUNT, ARCOUNT.
    pub counts: [u16; 4],
    /// Everything after the question, TTL fields included (values ignored).
    pub tail: Vec<u8>,
    /// Offsets of TTL fields in `tail`.
    pub ttl_offsets: Vec<u16>,
    /// TTL of every record at `insert_ns`, seconds.
    pub ttl: u32,
    pub insert_ns: u64,
    /// From here on the entry is stale: not served by the kernel, and by the
    /// daemon only under its zone's serveStale rules.
    pub expire_ns: u64,
    /// From here on the entry is gone.
    pub stale_until_ns: u64,
    pub rcode: u8,
}

impl Entry {
    /// Builds an entry from an upstream reply to `q` (already matched by ID
    /// and question). `max_ttl` caps TTLs (cacheDurationInSeconds), never
    /// extends them; `stale_secs` is how long past expiry it may be kept.
    pub fn from_upstream(
        q: &Query,
        resp: &[u8],
        max_ttl: u32,
        stale_secs: u32,
        now_ns: u64,
    ) -> Result<Entry, CacheError> {
        let (qend, walk) = wire::walk_response(resp)?;
        let flags = be16(resp, 2);
        if flags & F_TC != 0 {
            return Err(CacheError::NotCacheable { why: "truncated" });
        }
        let rcode = wire::rcode(resp);
        if let Some(opt) = walk.opt
            && opt.edns.ext_rcode != 0
        {
            return Err(CacheError::NotCacheable {
                why: "extended rcode",
            });
        }
        let ancount = be16(resp, 6);
        let ttl = match rcode {
            RCODE_NOERROR if ancount > 0 => walk.min_ttl.unwrap_or(0),
            RCODE_NOERROR | RCODE_NXDOMAIN => walk.soa_neg_ttl.ok_or(CacheError::NotCacheable {
                why: "negative answer without SOA",
            })?,
            _ => {
                return Err(CacheError::NotCacheable {
                    why: "rcode is not NOERROR/NXDOMAIN",
                });
            }
        };
        let ttl = ttl.min(max_ttl);
        if ttl == 0 {
            return Err(CacheError::NotCacheable { why: "TTL 0" });
        }
        // Records after the question, minus the upstream's OPT (its
        // options are the upstream's business), plus ours if the client
        // used EDNS. The OPT must be last so no compression pointer moves.
        let mut counts = [1, ancount, be16(resp, 8), be16(resp, 10)];
        let mut tail = Vec::with_capacity(resp.len() - qend + 11);
        match walk.opt {
            Some(opt) => {
                if opt.end != walk.end || walk.opt_index != Some(walk.records - 1) {
                    return Err(CacheError::NotCacheable {
                        why: "OPT is not the last record",
                    });
                }
                tail.extend_from_slice(&resp[qend..opt.start]);
                counts[3] -= 1;
            }
            None => tail.extend_from_slice(&resp[qend..walk.end]),
        }
        if let Some(e) = q.edns {
            tail.extend_from_slice(&wire::our_opt(e.do_bit, 0));
            counts[3] += 1;
        }
        let ttl_offsets = walk
            .ttl_offsets
            .iter()
            .map(|&o| (o - qend) as u16)
            .collect();
        // What of the answer's flags is the answer's: AD and RCODE (the
        // rest is the recursive service's, per query: wire::reply_flags).
        Ok(Entry {
            qname: q.qname_lower.clone(),
            flags: (flags & (F_AD | 0xf)) | F_QR | F_RA,
            counts,
            tail,
            ttl_offsets,
            ttl,
            insert_ns: now_ns,
            expire_ns: now_ns + ttl as u64 * NS,
            stale_until_ns: now_ns + (ttl as u64 + stale_secs as u64) * NS,
            rcode,
        })
    }

    pub fn is_fresh(&self, now_ns: u64) -> bool {
        now_ns < self.expire_ns && now_ns >= self.insert_ns
    }

    /// TTL to write at `now_ns`: entry TTL minus whole elapsed seconds, 0
    /// once expired (stale answers carry TTL 0, as CoreDNS serves them).
    pub fn ttl_at(&self, now_ns: u64) -> u32 {
        let elapsed = now_ns.saturating_sub(self.insert_ns) / NS;
        self.ttl.saturating_sub(elapsed.min(u32::MAX as u64) as u32)
    }

    /// The reply to `q` (received as `raw`) at `now_ns`: the bytes the
    /// kernel would send for a fresh entry. `None` when it does not fit the
    /// client's UDP size (`max_len`): the caller answers TC=1 then.
    pub fn render(&self, raw: &[u8], q: &Query, now_ns: u64, max_len: usize) -> Option<Vec<u8>> {
        let len = HEADER_LEN + q.question_end - HEADER_LEN + self.tail.len();
        if len > max_len {
            return None;
        }
        let mut m = Vec::with_capacity(len);
        m.extend_from_slice(&raw[0..2]);
        let do_bit = q.edns.is_some_and(|e| e.do_bit);
        m.extend_from_slice(&wire::reply_flags(self.flags, q.flags, do_bit).to_be_bytes());
        for c in self.counts {
            m.extend_from_slice(&c.to_be_bytes());
        }
        m.extend_from_slice(&raw[HEADER_LEN..q.question_end]);
        let tail_at = m.len();
        m.extend_from_slice(&self.tail);
        let ttl = self.ttl_at(now_ns).to_be_bytes();
        for &o in &self.ttl_offsets {
            let o = tail_at + o as usize;
            m[o..o + 4].copy_from_slice(&ttl);
        }
        Some(m)
    }
}

/// Lock shards of the userspace cache: queries on different names rarely
/// wait for each other, and sweeping holds each lock only briefly.
const SHARDS: usize = 32;

/// One shard: the entries plus their insertion order, oldest first, for
/// O(1) eviction (FIFO). The order may hold keys already removed (swept or
/// flushed); they are skipped when met.
#[derive(Default)]
struct ShardMap {
    map: HashMap<Key, Arc<Entry>>,
    order: std::collections::VecDeque<Key>,
}

/// The userspace cache: every cached answer, fresh or within its stale
/// window. Bounded; a full shard drops its oldest entry.
pub struct Cache {
    shards: Vec<Mutex<ShardMap>>,
    shard_cap: usize,
    hasher: std::collections::hash_map::RandomState,
}

impl Cache {
    pub fn new(capacity: usize) -> Self {
        Cache {
            shards: (0..SHARDS)
                .map(|_| Mutex::new(ShardMap::default()))
                .collect(),
            shard_cap: capacity.div_ceil(SHARDS).max(1),
            hasher: std::collections::hash_map::RandomState::new(),
        }
    }

    fn shard(&self, key: &Key) -> std::sync::MutexGuard<'_, ShardMap> {
        use std::hash::BuildHasher;
        let i = self.hasher.hash_one(key) as usize % SHARDS;
        self.shards[i].lock().unwrap_or_else(|e| e.into_inner())
    }

    fn each_shard(&self) -> impl Iterator<Item = std::sync::MutexGuard<'_, ShardMap>> {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()))
    }

    pub fn get(&self, key: &Key) -> Option<Arc<Entry>> {
        self.shard(key).map.get(key).cloned()
    }

    /// Inserts or replaces; returns keys evicted to make room.
    pub fn insert(&self, key: Key, entry: Arc<Entry>) -> Vec<Key> {
        let mut sh = self.shard(&key);
        let mut evicted = Vec::new();
        if let Some(slot) = sh.map.get_mut(&key) {
            *slot = entry;
            return evicted;
        }
        while sh.map.len() >= self.shard_cap {
            let Some(old) = sh.order.pop_front() else {
                break;
            };
            if sh.map.remove(&old).is_some() {
                evicted.push(old);
            }
        }
        // Keys removed by sweeps linger in `order`; rebuild it when they
        // outnumber the live ones.
        if sh.order.len() > 2 * self.shard_cap {
            let live: Vec<Key> = sh
                .order
                .iter()
                .filter(|k| sh.map.contains_key(*k))
                .cloned()
                .collect();
            sh.order = live.into();
        }
        sh.order.push_back(key.clone());
        sh.map.insert(key, entry);
        evicted
    }

    /// Removes entries past their stale window; returns their keys.
    pub fn sweep(&self, now_ns: u64) -> Vec<Key> {
        self.remove_where(|_, e| e.stale_until_ns <= now_ns)
    }

    /// Removes the entries whose key matches `f`; returns their keys.
    pub fn remove_if(&self, f: impl Fn(&Key) -> bool) -> Vec<Key> {
        self.remove_where(|k, _| f(k))
    }

    fn remove_where(&self, f: impl Fn(&Key, &Entry) -> bool) -> Vec<Key> {
        let mut gone = Vec::new();
        for mut sh in self.each_shard() {
            sh.map.retain(|k, e| {
                let drop = f(k, e);
                if drop {
                    gone.push(k.clone());
                }
                !drop
            });
        }
        gone
    }

    /// Keys of entries that expired in `[since_ns, now_ns)` (kept as stale).
    pub fn expired_between(&self, since_ns: u64, now_ns: u64) -> Vec<Key> {
        let mut out = Vec::new();
        for sh in self.each_shard() {
            out.extend(
                sh.map
                    .iter()
                    .filter(|(_, e)| e.expire_ns >= since_ns && e.expire_ns < now_ns)
                    .map(|(k, _)| k.clone()),
            );
        }
        out
    }

    pub fn len(&self) -> usize {
        self.each_shard().map(|s| s.map.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::wire::{parse_query, testmsg::query};

    /// An upstream reply to `q`: `answers` A records of TTL `ttl` each.
    pub(crate) use crate::wire::testmsg::reply_a;

    #[test]
    fn render_copies_id_question_case_rd_and_counts_ttl_down() {
        let raw = query("WWW.example.test", 1, Some((1232, false)));
        let q = parse_query(&raw).unwrap();
        let resp = reply_a(&raw, &[(300, [192, 0, 2, 1]), (100, [192, 0, 2, 2])]);
        let now = 1_000 * NS;
        let e = Entry::from_upstream(&q, &resp, 3600, 3600, now).unwrap();
        assert_eq!(e.ttl, 100, "minimum TTL of the answer");
        assert_eq!(e.ttl_offsets.len(), 2);
        let out = e
            .render(&raw, &q, now + 7 * NS + 500_000_000, 4096)
            .unwrap();
        assert_eq!(&out[0..2], &[0x12, 0x34]);
        assert_eq!(be16(&out, 2) & wire::F_RD, wire::F_RD);
        assert_eq!(&out[12..q.question_end], &raw[12..q.question_end]);
        let parsed = wire::walk_response(&out).unwrap().1;
        for o in parsed.ttl_offsets {
            assert_eq!(u32::from_be_bytes(out[o..o + 4].try_into().unwrap()), 93);
        }
        assert_eq!(parsed.opt.unwrap().edns.udp_size, wire::OUR_UDP_SIZE);
    }

    #[test]
    fn expired_between_reports_each_expiry_once() {
        let c = Cache::new(10);
        for (i, exp) in [10u64, 20, 30].iter().enumerate() {
            let e = Entry {
                qname: vec![1, b'a' + i as u8, 0],
                flags: 0,
                counts: [1, 0, 0, 0],
                tail: vec![],
                ttl_offsets: vec![],
                ttl: 1,
                insert_ns: 0,
                expire_ns: *exp,
                stale_until_ns: 100,
                rcode: 0,
            };
            let key = Key {
                view: 0,
                flags: 0,
                qtype: 1,
                qclass: 1,
                qname: e.qname.clone().into(),
            };
            c.insert(key, Arc::new(e));
        }
        let got = c.expired_between(15, 25);
        assert_eq!(got.len(), 1);
        assert_eq!(&*got[0].qname, &[1, b'b', 0]);
        assert!(c.expired_between(31, 40).is_empty(), "already reported");
        assert_eq!(c.sweep(100).len(), 3);
    }

    #[test]
    fn bounded_capacity_evicts_without_scanning_everything() {
        let c = Cache::new(64);
        let now = mono_ns();
        for i in 0..10_000u32 {
            let name = format!("n{i}");
            let mut q = vec![name.len() as u8];
            q.extend_from_slice(name.as_bytes());
            q.push(0);
            let e = Entry {
                qname: q.clone(),
                flags: 0,
                counts: [1, 0, 0, 0],
                tail: vec![],
                ttl_offsets: vec![],
                ttl: 60,
                insert_ns: now,
                expire_ns: now + 60_000_000_000,
                stale_until_ns: now + 60_000_000_000,
                rcode: 0,
            };
            c.insert(
                Key {
                    view: 0,
                    flags: 0,
                    qtype: 1,
                    qclass: 1,
                    qname: q.into(),
                },
                Arc::new(e),
            );
        }
        // Never more than the per-shard cap in any shard.
        assert!(c.len() <= 64 + SHARDS, "{}", c.len());
        assert!(c.len() >= 32);
    }

    #[test]
    fn ttl_cap_never_extends() {
        let raw = query("a.test", 1, None);
        let q = parse_query(&raw).unwrap();
        let resp = reply_a(&raw, &[(300, [1, 2, 3, 4])]);
        assert_eq!(Entry::from_upstream(&q, &resp, 30, 0, 0).unwrap().ttl, 30);
        assert_eq!(
            Entry::from_upstream(&q, &resp, 3600, 0, 0).unwrap().ttl,
            300
        );
    }

    #[test]
    fn uncacheable_replies() {
        let raw = query("a.test", 1, None);
        let q = parse_query(&raw).unwrap();
        let mut resp = reply_a(&raw, &[(300, [1, 2, 3, 4])]);
        resp[3] = 0x82; // SERVFAIL
        assert!(Entry::from_upstream(&q, &resp, 3600, 0, 0).is_err());
        let mut resp = reply_a(&raw, &[]);
        resp[3] = 0x83; // NXDOMAIN without SOA
        assert_eq!(
            Entry::from_upstream(&q, &resp, 3600, 0, 0).unwrap_err(),
            CacheError::NotCacheable {
                why: "negative answer without SOA"
            }
        );
        let mut resp = reply_a(&raw, &[(300, [1, 2, 3, 4])]);
        resp[2] |= 0x02; // TC
        assert!(Entry::from_upstream(&q, &resp, 3600, 0, 0).is_err());
        let resp = reply_a(&raw, &[(0, [1, 2, 3, 4])]);
        assert!(Entry::from_upstream(&q, &resp, 3600, 0, 0).is_err());
    }

    #[test]
    fn too_big_for_client_renders_none() {
        let raw = query("a.test", 1, None);
        let q = parse_query(&raw).unwrap();
        let recs: Vec<_> = (0..40).map(|i| (60, [10, 0, 0, i as u8])).collect();
        let resp = reply_a(&raw, &recs);
        let e = Entry::from_upstream(&q, &resp, 3600, 0, 0).unwrap();
        assert!(e.render(&raw, &q, 0, 512).is_none());
    }
}
