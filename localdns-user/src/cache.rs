//! The answer cache. An [`Entry`] is built once from an upstream reply and
//! rendered per query exactly as the kernel renders its copy of the same
//! entry: header flags from the upstream reply with the client's ID and RD
//! bit, the client's question bytes, then the stored records with every TTL
//! set to the entry TTL minus whole seconds elapsed (CoreDNS style). Daemon
//! and kernel answers are therefore byte-identical.

use std::sync::atomic::{AtomicU64, Ordering};
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

/// `CLOCK_MONOTONIC_COARSE` in nanoseconds: the clock the fast path
/// reads on every hit, from the jiffies (`fastpath::clock`; where
/// `bpf_ktime_get_ns` cost 28 of a 117 ns hit). It
/// advances once per tick (1-10 ms): plenty for TTLs in whole seconds, and
/// the kernel and the daemon age entries by the same clock.
pub fn mono_ns() -> u64 {
    let ts = rustix::time::clock_gettime(rustix::time::ClockId::MonotonicCoarse);
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
    /// When the daemon last wrote this entry to the kernel map.
    pub kernel_put: Stamp,
}

/// A time stamp (CLOCK_MONOTONIC ns) shared by the clones of an entry.
#[derive(Debug, Default)]
pub struct Stamp(AtomicU64);

impl Clone for Stamp {
    fn clone(&self) -> Self {
        Stamp(AtomicU64::new(self.get()))
    }
}

impl PartialEq for Stamp {
    fn eq(&self, _: &Self) -> bool {
        true // bookkeeping, not part of the answer
    }
}

impl Stamp {
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }

    pub fn set(&self, ns: u64) {
        self.0.store(ns, Ordering::Relaxed);
    }
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
            kernel_put: Default::default(),
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

/// What a userspace entry costs in weight: one unit per started
/// [`SLOT_BYTES`] of memory, so the entry capacity is also a memory bound
/// (a 60 KiB TCP-only answer counts as 60 small ones).
pub const SLOT_BYTES: usize = 1024;

/// Capacities of the two caches, in entries of up to [`SLOT_BYTES`] (as
/// CoreDNS's `success` and `denial`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacity {
    pub success: usize,
    pub denial: usize,
}

/// Bytes an entry holds, roughly (key, value, allocation overheads).
fn entry_bytes(k: &Key, e: &Entry) -> usize {
    160 + k.qname.len() + e.qname.len() + e.tail.len() + 2 * e.ttl_offsets.len()
}

#[derive(Clone)]
struct SlotWeigher;

impl quick_cache::Weighter<Key, Arc<Entry>> for SlotWeigher {
    fn weight(&self, k: &Key, e: &Arc<Entry>) -> u64 {
        entry_bytes(k, e).div_ceil(SLOT_BYTES) as u64
    }
}

/// Collects the keys the cache evicts during one call, so the caller can
/// take them out of the kernel map too.
#[derive(Clone, Default)]
struct Evictions;

impl quick_cache::Lifecycle<Key, Arc<Entry>> for Evictions {
    type RequestState = Vec<Key>;

    fn on_evict(&self, evicted: &mut Vec<Key>, key: Key, _: Arc<Entry>) {
        evicted.push(key);
    }
}

type Store = quick_cache::sync::Cache<
    Key,
    Arc<Entry>,
    SlotWeigher,
    quick_cache::DefaultHashBuilder,
    Evictions,
>;

fn store(cap: usize) -> Store {
    let cap = cap.max(1);
    Store::with(cap, cap as u64, SlotWeigher, Default::default(), Evictions)
}

/// Whether an entry is a denial (NXDOMAIN, or NOERROR without answers:
/// NODATA), as CoreDNS's cache classifies it.
pub fn is_denial(e: &Entry) -> bool {
    e.rcode == RCODE_NXDOMAIN || e.counts[1] == 0
}

/// What a sweep found.
#[derive(Debug, Default)]
pub struct Swept {
    /// Past their stale window: removed.
    pub gone: Vec<Key>,
    /// Expired since the last sweep: still kept (stale answers) but no
    /// longer the kernel's to serve.
    pub expired: Vec<Key>,
}

/// The userspace cache: every cached answer, fresh or within its stale
/// window, in two stores (success and denial) with their own capacities.
/// Eviction is quick_cache's (CLOCK-Pro style: a name asked again and again
/// stays, one-off names go first); evicted keys are handed back so the
/// kernel map stays a subset of this cache.
pub struct Cache {
    success: Store,
    denial: Store,
    /// Entries evicted for room, since start.
    pub evictions: AtomicU64,
}

impl Cache {
    pub fn new(cap: Capacity) -> Self {
        Cache {
            success: store(cap.success),
            denial: store(cap.denial),
            evictions: AtomicU64::new(0),
        }
    }

    fn stores_for(&self, e: &Entry) -> (&Store, &Store) {
        if is_denial(e) {
            (&self.denial, &self.success)
        } else {
            (&self.success, &self.denial)
        }
    }

    pub fn get(&self, key: &Key) -> Option<Arc<Entry>> {
        self.success.get(key).or_else(|| self.denial.get(key))
    }

    /// Inserts or replaces; returns the keys evicted to make room.
    pub fn insert(&self, key: Key, entry: Arc<Entry>) -> Vec<Key> {
        let (mine, other) = self.stores_for(&entry);
        // An answer that changed kind (NXDOMAIN now, an address before).
        other.remove(&key);
        let mut evicted = Vec::new();
        mine.insert_with_lifecycle(key.clone(), entry.clone(), &mut evicted);
        // The key itself shows up in two cases. Replacing an older entry
        // reports the old one: not an eviction, and the key stays (the
        // caller has just written the new entry to the kernel; removing
        // it there would send the name to the daemon until it is put back).
        // An entry heavier than the whole store is refused and reported as
        // evicted at once: never cached, not counted, but its key is
        // returned (an older kernel copy must go).
        let stored = mine.peek(&key).is_some_and(|e| Arc::ptr_eq(&e, &entry));
        let before = evicted.len();
        evicted.retain(|k| *k != key);
        let own = (before - evicted.len()) as u64;
        if !stored && own > 0 {
            evicted.push(key);
        }
        let counted = evicted.len() as u64 - u64::from(!stored && own > 0);
        self.evictions.fetch_add(counted, Ordering::Relaxed);
        evicted
    }

    fn remove_where(&self, f: impl Fn(&Key, &Entry) -> bool) -> Vec<Key> {
        let gone = Mutex::new(Vec::new());
        for s in [&self.success, &self.denial] {
            s.retain(|k, e| {
                let drop = f(k, e);
                if drop {
                    gone.lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(k.clone());
                }
                !drop
            });
        }
        gone.into_inner().unwrap_or_else(|p| p.into_inner())
    }

    /// Removes entries past their stale window and lists those that
    /// expired in `[since_ns, now_ns)`.
    pub fn sweep(&self, since_ns: u64, now_ns: u64) -> Swept {
        let expired = Mutex::new(Vec::new());
        let gone = self.remove_where(|k, e| {
            if e.expire_ns >= since_ns && e.expire_ns < now_ns {
                expired
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(k.clone());
            }
            e.stale_until_ns <= now_ns
        });
        Swept {
            gone,
            expired: expired.into_inner().unwrap_or_else(|p| p.into_inner()),
        }
    }

    /// Removes the entries whose key matches `f`; returns their keys.
    pub fn remove_if(&self, f: impl Fn(&Key) -> bool) -> Vec<Key> {
        self.remove_where(|k, _| f(k))
    }

    /// (success, denial) entries.
    pub fn lens(&self) -> (usize, usize) {
        (self.success.len(), self.denial.len())
    }

    pub fn len(&self) -> usize {
        self.success.len() + self.denial.len()
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

    fn entry(name: &str, exp: u64, stale: u64, answers: u16, rcode: u8) -> (Key, Arc<Entry>) {
        let mut q = vec![name.len() as u8];
        q.extend_from_slice(name.as_bytes());
        q.push(0);
        let e = Entry {
            qname: q.clone(),
            flags: 0,
            counts: [1, answers, 0, 0],
            tail: vec![],
            ttl_offsets: vec![],
            ttl: 1,
            insert_ns: 0,
            expire_ns: exp,
            stale_until_ns: stale,
            rcode,
            kernel_put: Default::default(),
        };
        let key = Key {
            view: 0,
            flags: 0,
            qtype: 1,
            qclass: 1,
            qname: q.into(),
        };
        (key, Arc::new(e))
    }

    fn cap(success: usize, denial: usize) -> Capacity {
        Capacity { success, denial }
    }

    #[test]
    fn sweep_reports_each_expiry_once_and_drops_past_stale() {
        let c = Cache::new(cap(100, 100));
        for (i, exp) in [10u64, 20, 30].iter().enumerate() {
            let (k, e) = entry(&format!("n{i}"), *exp, 100, 1, 0);
            c.insert(k, e);
        }
        let s = c.sweep(15, 25);
        assert_eq!(s.expired.len(), 1);
        assert_eq!(&*s.expired[0].qname, b"\x02n1\x00");
        assert!(s.gone.is_empty());
        assert!(c.sweep(25, 26).expired.is_empty(), "already reported");
        assert_eq!(c.sweep(26, 100).gone.len(), 3);
        assert!(c.is_empty());
    }

    #[test]
    fn replacing_an_entry_does_not_report_its_key() {
        let c = Cache::new(cap(100, 100));
        let (k, e) = entry("a", u64::MAX, u64::MAX, 1, 0);
        assert!(c.insert(k.clone(), e).is_empty());
        // A refresh (prefetch, serve-stale) replaces the entry: the caller
        // has put the new one in the kernel and must not remove it.
        let (_, e2) = entry("a", u64::MAX - 1, u64::MAX, 1, 0);
        assert!(c.insert(k.clone(), e2.clone()).is_empty());
        assert!(c.get(&k).is_some_and(|e| Arc::ptr_eq(&e, &e2)));
        assert_eq!(c.evictions.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn success_and_denial_have_their_own_capacity() {
        let c = Cache::new(cap(200, 50));
        let mut evicted = 0;
        for i in 0..1000 {
            let (k, e) = entry(&format!("s{i}"), u64::MAX, u64::MAX, 1, 0);
            evicted += c.insert(k, e).len();
            let (k, e) = entry(&format!("d{i}"), u64::MAX, u64::MAX, 0, 3);
            evicted += c.insert(k, e).len();
        }
        let (s, d) = c.lens();
        assert!((150..=200).contains(&s), "{s}");
        assert!((30..=50).contains(&d), "{d}");
        assert_eq!(evicted, 2000 - s - d, "every eviction is reported");
        // An answer that changes kind moves to the other store.
        let (k, e) = entry("s999", u64::MAX, u64::MAX, 0, 3);
        let _ = c.insert(k.clone(), e);
        assert!(c.get(&k).is_some_and(|e| is_denial(&e)));
        assert!(c.success.get(&k).is_none());
    }

    #[test]
    fn names_asked_again_outlive_one_off_names() {
        let c = Cache::new(cap(100, 1));
        let hot: Vec<_> = (0..20)
            .map(|i| entry(&format!("hot{i}"), u64::MAX, u64::MAX, 1, 0))
            .collect();
        for (k, e) in &hot {
            c.insert(k.clone(), e.clone());
        }
        // A flood of one-off names while the hot ones are asked all along.
        for i in 0..5000 {
            let (k, e) = entry(&format!("once{i}"), u64::MAX, u64::MAX, 1, 0);
            c.insert(k, e);
            let _ = c.get(&hot[i % hot.len()].0);
        }
        let kept = hot.iter().filter(|(k, _)| c.get(k).is_some()).count();
        assert!(kept >= 18, "only {kept} of 20 hot names kept");
    }

    #[test]
    fn big_entries_weigh_more() {
        let c = Cache::new(cap(10, 1));
        let (k, e) = entry("big", u64::MAX, u64::MAX, 1, 0);
        let mut big = (*e).clone();
        big.tail = vec![0; 5 * SLOT_BYTES];
        c.insert(k, Arc::new(big));
        for i in 0..3 {
            let (k, e) = entry(&format!("n{i}"), u64::MAX, u64::MAX, 1, 0);
            c.insert(k, e);
        }
        // 6 units for the big one, 3 small: all fit in 10; 3 more do not.
        assert_eq!(c.len(), 4);
        for i in 3..6 {
            let (k, e) = entry(&format!("n{i}"), u64::MAX, u64::MAX, 1, 0);
            c.insert(k, e);
        }
        assert!(c.len() < 7, "{}", c.len());
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
