//! The single kernel/user contract of localdns.
//!
//! Everything the XDP/TC program and the `localdns-user` daemon exchange is
//! declared here once: map names, key/value layouts, counter indices, global
//! variable names and the qname hash both sides must compute identically.
//!
//! Layout rules: `#[repr(C)]`, explicit `_pad` fields, integers instead of
//! `bool`/enums, and a `const` size assertion per struct. Byte order is part of
//! every field's name or doc comment.
#![no_std]

/// Cache map name (BTF array, `BPF_F_MMAPABLE`), small size class: a
/// two-choice hash table the daemon lays out and the program only reads.
///
/// - purpose: cached DNS responses the kernel may serve without the daemon,
///   those that fit 256 bytes ([`CacheValue::compact`]: name up to 80
///   bytes, tail up to 80, up to 8 records): nearly all of them
/// - key: `u32` slot; value: [`SmallValue`], empty when its `hash` is 0.
///   An entry of key hash `h` lives in one of the two slots
///   [`slot_pair`]`(h, mask)`, `mask` = slots − 1 ([`GLOBAL_SLOT_MASK`]):
///   both places are known from the hash alone, so the program reads both
///   slots' first lines at once instead of a bucket and then an element
///   (the hash map's two dependent cache misses, profile section 8)
/// - writer: `localdns-user` only, through a shared mapping of the array,
///   under the slot protocol of [`SLOT_BUSY`] (placement, displacement and
///   eviction; an entry lives in exactly one of the two cache maps);
///   reader: XDP/TC program (looks here first; writes only
///   [`EntryHead::hits`])
/// - capacity: [`cache_slots`] of `--fastpath-entries` (twice that many,
///   a power of two: 256-byte slots, page-aligned, lines never shared)
/// - eviction: by the daemon when both slots of a new entry are taken by
///   fresh entries and neither occupant can move to its other slot: the
///   one that expires first goes. The program also refuses entries older
///   than their TTL
pub const MAP_CACHE: &str = "LDNS_CACHE";
/// Cache map name (BTF LRU hash), big size class.
///
/// - purpose: the cached responses [`MAP_CACHE`] has no room for (long
///   names, CNAME chains, many records, up to a 1232-byte reply)
/// - key: [`CacheKey`]; value: [`CacheValue`]
/// - writer: `localdns-user`, as for [`MAP_CACHE`]; reader: XDP/TC program,
///   after a miss in [`MAP_CACHE`]
/// - capacity: [`big_entries`] of the small map's
/// - eviction: kernel LRU, independent of [`MAP_CACHE`]'s
pub const MAP_CACHE_BIG: &str = "LDNS_CACHE_BIG";

/// Slots of [`MAP_CACHE`] for `--fastpath-entries` `entries`: twice as
/// many, rounded up to a power of two (two-choice tables fill to about
/// half before new entries start to evict fresh ones).
pub const fn cache_slots(entries: u32) -> u32 {
    let e = if entries < 1 { 1 } else { entries };
    let e = if e > 1 << 29 { 1 << 29 } else { e };
    e.next_power_of_two() * 2
}

/// The two slots of [`MAP_CACHE`] an entry of key hash `hash` may occupy
/// (`mask` = slots − 1): the low and the high half of the hash. They may
/// coincide.
#[inline(always)]
pub const fn slot_pair(hash: u64, mask: u32) -> (u32, u32) {
    (hash as u32 & mask, (hash >> 32) as u32 & mask)
}

/// Global (`u32`): [`MAP_CACHE`]'s slots − 1, set at load.
pub const GLOBAL_SLOT_MASK: &str = "LDNS_SLOT_MASK";

/// Global (`u64`): nanoseconds per jiffy (the kernel's tick, `TICK_NSEC`),
/// set at load from the daemon's calibration. The program's clock is then
/// [`jiffies_ns`]: `bpf_jiffies64`, which the verifier inlines into one
/// load (no helper call: `bpf_ktime_get_coarse_ns` cost 34 of a hit's
/// 213 ns on a VM with return-thunk mitigations, profile section 10).
/// 0: no calibration; the program calls `bpf_ktime_get_coarse_ns`.
pub const GLOBAL_TICK_NS: &str = "LDNS_TICK_NS";
/// Global (`u64`): `CLOCK_MONOTONIC_COARSE` minus jiffies × tick, in ns
/// (wrapping), measured by the daemon at load; see [`GLOBAL_TICK_NS`].
pub const GLOBAL_JIFFY_BASE: &str = "LDNS_JIFFY_BASE";

/// `CLOCK_MONOTONIC_COARSE` in ns from the kernel's jiffies: both advance
/// at the tick, jiffies by exactly `tick_ns` of monotonic time each, so
/// their difference stays inside a window two ticks wide for as long as
/// the machine runs (the daemon's base puts the result 0 to 4 ticks
/// ahead of the coarse clock: `fastpath::clock`).
#[inline(always)]
pub const fn jiffies_ns(jiffies: u64, tick_ns: u64, base_ns: u64) -> u64 {
    jiffies.wrapping_mul(tick_ns).wrapping_add(base_ns)
}

/// [`EntryHead::generation`] of a [`MAP_CACHE`] slot being written. The
/// daemon writes a slot in place, through its mapping of the array: it
/// swaps the slot's generation to `SLOT_BUSY` (compare-and-swap, so two
/// writers, e.g. a daemon and `localdns-user cache flush`, never write one
/// slot at once), writes the rest, then stores the entry's new generation
/// (release). The program does not serve a slot whose generation is
/// `SLOT_BUSY`, and abandons a reply whose slot's generation changed
/// while it was copied; x86-64 keeps stores in order and loads in order,
/// so a reply is either the old entry's or the new one's.
pub const SLOT_BUSY: u64 = u64::MAX;

/// Capacity of [`MAP_CACHE_BIG`] for a [`MAP_CACHE`] of `entries`: a
/// quarter (big answers are the exception), at least 64.
pub const fn big_entries(entries: u32) -> u32 {
    let e = entries / 4;
    if e < 64 { 64 } else { e }
}
/// Counter map name (BTF per-CPU array of `u64`).
///
/// - purpose: hot-path counters (hits, misses, passes by reason)
/// - key: `u32` index, one of the `STAT_*` constants; value: `u64` count
/// - writer: XDP/TC program (per CPU, no atomics needed); reader: daemon,
///   `localdns-user cache stats`, `bpftool map dump`
/// - capacity: [`STAT_ENTRIES`]: reasons, then per stat slot and family
///   ([`STAT_ZONE_BASE`]); eviction: none (array)
pub const MAP_STATS: &str = "LDNS_STATS";
/// Scratch map name (BTF per-CPU array, one [`Scratch`]).
///
/// - purpose: room for the query bytes a reply overwrites, so a reply
///   abandoned half-way (generation mismatch) can be undone exactly (the
///   512-byte BPF stack cannot hold them)
/// - key: `u32` 0; value: [`Scratch`]; writer and reader: the program itself
/// - capacity: 1 per CPU; eviction: none
pub const MAP_SCRATCH: &str = "LDNS_SCRATCH";

/// Metadata map name (BTF array, one [`Meta`]).
///
/// - purpose: what a starting daemon needs to adopt the pinned maps of an
///   earlier instance: the layout version of the maps and the hash seed
///   their keys were computed with
/// - key: `u32` 0; value: [`Meta`]
/// - writer: the daemon that created the maps (once); reader: every later
///   daemon (adoption) and `localdns-user cache ...`; the program never
///   reads it (the seed reaches it as a load-time constant)
/// - capacity: 1; eviction: none
pub const MAP_META: &str = "LDNS_META";

/// Floor-probe map name (BTF array of [`FloorLine`], `BPF_F_MMAPABLE` so
/// the lines start page-aligned). Benchmark only: the daemon never
/// attaches the program that reads it.
///
/// - purpose: the cheapest conceivable cache lookup, for the benchmark's
///   floor: the null responder plus [`GLOBAL_FLOOR_LINES`] reads of one
///   line each at the slot of the query's name, so the bench can measure
///   what one cold touch of per-name memory costs on the machine, apart
///   from any cache design
/// - key: `u32` slot × lines + line; value: [`FloorLine`] (zeroes)
/// - writer: nobody (zero-filled at creation); reader: the `localdns_floor`
///   XDP program
/// - capacity: 1 (an unused 64-byte map) unless loaded for the floor, then
///   [`FLOOR_SLOTS`] × lines; eviction: none (array)
pub const MAP_FLOOR: &str = "LDNS_FLOOR";
/// Slots of [`MAP_FLOOR`] when loaded for the floor: more than the largest
/// warm set, so names rarely share a slot.
pub const FLOOR_SLOTS: u32 = 65536;
/// Global (`u32`): lines read per query by `localdns_floor` (1..=8; 0 in
/// production, where that program is never loaded).
pub const GLOBAL_FLOOR_LINES: &str = "LDNS_FLOOR_LINES";
/// Value of [`MAP_FLOOR`]: one cache line.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
pub struct FloorLine {
    pub words: [u64; 8],
}
const _: () = assert!(core::mem::size_of::<FloorLine>() == 64);

/// Version of everything pinned maps share between a running program and a
/// daemon: key/value layouts, counter indices, key semantics, the hash.
/// A daemon adopts pinned maps only when their [`Meta::layout`] equals
/// this; otherwise it creates fresh maps (a cold kernel cache) and swaps
/// the program on the existing links all the same.
pub const LAYOUT_VERSION: u32 = 10;
/// [`Meta::magic`]: "localdns" in ASCII.
pub const META_MAGIC: u64 = u64::from_le_bytes(*b"localdns");

/// Query-log ring buffer name (BTF ring buffer of [`LogEvent`]).
///
/// - purpose: one event per kernel-answered query of a zone with
///   `queryLogging: Log`, so those queries are logged like daemon-answered
///   ones (CoreDNS `log` format); and one per entry that reached its
///   prefetch amount ([`EVENT_PREFETCH`]), so the daemon refreshes it
/// - writer: XDP/TC program (entries with [`CacheValue::log`] set, and
///   prefetch reports); reader: the daemon
/// - capacity: [`LOG_RING_BYTES`]; when full, events are dropped and counted
///   in [`STAT_LOG_DROPPED`] (the reply is still sent)
pub const MAP_LOG: &str = "LDNS_LOG";
/// Size of [`MAP_LOG`] in bytes (a power-of-two number of pages).
pub const LOG_RING_BYTES: u32 = 256 * 1024;

/// Listener addresses the program knows per address family.
pub const MAX_LISTEN: usize = 4;
/// Global (`.rodata`, `[u32; MAX_LISTEN]`): IPv4 listener addresses as
/// loaded from the packet (`u32::from_ne_bytes(octets)`); 0 = unused.
pub const GLOBAL_LISTEN4: &str = "LDNS_LISTEN4";
/// Global (`[u8; MAX_LISTEN]`): the view (`VIEW_*`) of each IPv4 listener.
pub const GLOBAL_VIEW4: &str = "LDNS_VIEW4";
/// Global (`[u64; 2 * MAX_LISTEN]`): IPv6 listener addresses, each as two
/// 8-byte words loaded from the packet (`u64::from_ne_bytes`); `::` =
/// unused.
pub const GLOBAL_LISTEN6: &str = "LDNS_LISTEN6";
/// Global (`[u8; MAX_LISTEN]`): the view of each IPv6 listener.
pub const GLOBAL_VIEW6: &str = "LDNS_VIEW6";
/// Global with the 64-bit seed of [`qname_hash`]; chosen by the daemon that
/// creates the cache map, so remote clients cannot aim collisions at the
/// fast path, and kept in [`Meta::seed`] for the daemons that adopt it.
pub const GLOBAL_HASH_SEED: &str = "LDNS_HASH_SEED";
/// Written by the XDP program into the packet's metadata when it cannot
/// grow the frame for a reply (generic XDP has little tailroom): the TC
/// companion program on the same interface answers exactly those packets.
pub const META_NEEDS_ROOM: u32 = u32::from_le_bytes(*b"LDns");

/// Global (test builds of the table only; 0 in production, where the
/// verifier removes every branch on it): makes the program fail at one
/// step after its first write, so the tests can show that such a packet is
/// dropped (or, for a generation mismatch, restored and passed), never
/// passed half-rewritten. One of the `FAULT_*` values.
pub const GLOBAL_FAULT: &str = "LDNS_FAULT";
/// [`GLOBAL_FAULT`]: no fault (production).
pub const FAULT_NONE: u32 = 0;
/// Fail right after the frame was resized.
pub const FAULT_AFTER_RESIZE: u32 = 1;
/// Fail after the tail was copied into the frame.
pub const FAULT_AFTER_COPY: u32 = 2;
/// Act as if the entry's generation changed during the copy.
pub const FAULT_RACE: u32 = 3;
/// Like [`FAULT_RACE`], and the undo fails too.
pub const FAULT_RACE_NO_UNDO: u32 = 4;
/// Skip the generation check (to show the torn-read test detects what
/// the check prevents).
pub const FAULT_NO_GENERATION_CHECK: u32 = 5;
/// Profiling (per-step timing in `BPF_PROG_TEST_RUN`): return PASS, the
/// packet untouched, right after parsing the query. Untouched packets can
/// be timed with `repeat`, so the differences between the `STOP_*` values
/// say what each step of a hit costs.
pub const FAULT_STOP_PARSED: u32 = 16;
/// Profiling: stop after the cache lookup (of a present key).
pub const FAULT_STOP_LOOKED_UP: u32 = 17;
/// Profiling: stop after the entry was checked (clock, freshness, name).
pub const FAULT_STOP_CHECKED: u32 = 18;
/// Profiling: stop after the reply's checksum and flags were computed.
pub const FAULT_STOP_SUMMED: u32 = 19;

/// Default `--fastpath-entries`: [`MAP_CACHE`] gets twice as many
/// 256-byte slots (8 MiB), [`MAP_CACHE_BIG`] a quarter as many 1,680-byte
/// elements (6.6 MiB).
pub const CACHE_MAP_ENTRIES: u32 = 16384;

/// View index of 169.254.10.10 (`vnetDNSOverrides`).
pub const VIEW_VNET: u8 = 0;
/// View index of 169.254.10.11 (`kubeDNSOverrides`).
pub const VIEW_KUBE: u8 = 1;

/// [`KeyFields::flags`]: the query carried the DO bit.
pub const KEY_F_DO: u8 = 1;
/// [`KeyFields::flags`]: the query carried the CD bit.
pub const KEY_F_CD: u8 = 2;
/// [`KeyFields::flags`]: the query carried an OPT record (EDNS).
pub const KEY_F_EDNS: u8 = 4;

/// Longest TTL (seconds) of an entry the kernel serves: 11.5 days, above
/// the 7-day `cacheDurationInSeconds` limit. It keeps the age of a fresh
/// entry under 2^50 ns, the range of [`whole_secs`].
pub const MAX_KERNEL_TTL: u32 = 1_000_000;

/// `ns / 1_000_000_000` for `ns < 2^50` (13 days), without a division: a
/// 64-bit divide is the slowest instruction of a hit (4 ns on the bench
/// machine). The product estimate is exact or one short (`ns >> 16` loses
/// under 66 µs, the multiplier under 2^-29 relative), and one comparison
/// corrects it.
#[inline(always)]
pub const fn whole_secs(ns: u64) -> u64 {
    // floor(2^43 / (1e9 / 2^16)): never overestimates; (ns >> 16) < 2^34
    // and the multiplier < 2^30, so the product fits.
    const M: u64 = 576_460_752;
    let est = ((ns >> 16) * M) >> 43;
    if (est + 1) * 1_000_000_000 <= ns {
        est + 1
    } else {
        est
    }
}

/// Longest wire-format qname (RFC 1035 §3.1), root label included.
pub const MAX_QNAME: usize = 255;
/// Largest reply (DNS message) the kernel sends: the DNS flag day 2020 UDP
/// size. Larger cached answers are the daemon's.
pub const MAX_REPLY: usize = 1232;
/// Largest response part after the question that the kernel serves (a
/// reply of at most [`MAX_REPLY`] bytes, rounded up to whole words).
pub const MAX_TAIL: usize = 1216;
/// Largest number of TTL fields a kernel-served response may carry (28:
/// head and offsets fill 120 bytes).
pub const MAX_TTLS: usize = 28;
/// UDP payload size limit for clients without EDNS (RFC 1035).
pub const PLAIN_UDP_MAX: u16 = 512;

/// Key of [`MAP_CACHE`] and [`MAP_CACHE_BIG`]: one seeded 64-bit hash
/// ([`key_hash`]) of everything a cached answer depends on. 8 bytes
/// because the kernel hashes the key again on every lookup (jhash): a
/// 16-byte key cost 8 ns more per hit in `BPF_PROG_TEST_RUN`. What the
/// hash covers is stored in the value ([`EntryHead::key`] and the name)
/// and compared on every hit, so a collision can only cause a PASS.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CacheKey {
    /// [`key_hash`] of the lower-cased wire qname and the [`KeyFields`]
    /// with the loaded seed.
    pub hash: u64,
}
const _: () = assert!(core::mem::size_of::<CacheKey>() == 8);

/// Everything besides the name a query must match to be answered from an
/// entry. Kept in [`EntryHead::key`]; the program compares it as one word
/// ([`KeyFields::word`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct KeyFields {
    /// QTYPE, host byte order.
    pub qtype: u16,
    /// QCLASS, host byte order.
    pub qclass: u16,
    /// Length of the wire qname in bytes, root label included (1..=255).
    pub qname_len: u8,
    /// [`VIEW_VNET`] or [`VIEW_KUBE`].
    pub view: u8,
    /// `KEY_F_*` bits.
    pub flags: u8,
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<KeyFields>() == 8);

impl KeyFields {
    /// The fields as the little-endian word they occupy in memory (what
    /// the program compares and hashes; both sides are little-endian).
    #[inline(always)]
    pub const fn word(&self) -> u64 {
        key_word(
            self.qtype,
            self.qclass,
            self.qname_len,
            self.view,
            self.flags,
        )
    }
}

/// [`KeyFields::word`] from loose fields (the program has no struct).
#[inline(always)]
pub const fn key_word(qtype: u16, qclass: u16, qname_len: u8, view: u8, flags: u8) -> u64 {
    qtype as u64
        | (qclass as u64) << 16
        | (qname_len as u64) << 32
        | (view as u64) << 40
        | (flags as u64) << 48
}

/// [`CacheKey::hash`]: the seeded [`qname_hash`] of the lower-cased name,
/// then one more step with the [`KeyFields`] word.
#[inline(always)]
pub const fn key_hash(name_hash: u64, key_word: u64) -> u64 {
    qname_hash_step(name_hash, key_word)
}

/// Bytes of [`CacheValue::data`]: the longest qname in whole words plus the
/// largest tail, plus 8 spare bytes: the program masks offsets (tail
/// offsets `& (MAX_TAIL - 1)`) so the verifier sees them bounded, and a
/// word read at the largest masked offset must stay inside the value.
pub const DATA_LEN: usize = MAX_QNAME + 1 + MAX_TAIL + 8;

/// Where the tail starts in [`CacheValue::data`]: the name rounded up to
/// whole 8-byte words (the padding is zero), so the program compares the
/// query's name with the entry's word by word without masking a last,
/// partial word (a branch that multiplied the verifier's states on 6.1).
pub const fn name_span(qname_len: usize) -> usize {
    (qname_len + 7) & !7
}

/// The 64 bytes after [`VALUE_HEAD_OFF`] of every cache value, both size
/// classes (one cache line of the kernel's element): everything a hit
/// reads besides the TTL offsets, the name and the tail.
///
/// Reply = header (query ID, `flags_be` with the query's RD bit, counts) +
/// the query's question bytes + the tail with every TTL field at
/// `ttl_off[..ttl_count]` set to `ttl - elapsed_seconds`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EntryHead {
    /// Generation: a number the daemon never writes twice (strictly
    /// increasing, from `CLOCK_MONOTONIC`). First in the head, at the start
    /// of a cache line of the element, so a copy into a reused element
    /// changes it before the rest. The program reads it before and after
    /// copying the entry into a reply; a difference means the element was
    /// reused meanwhile (preallocated elements are recycled at once) and
    /// the reply is abandoned. [`SLOT_BUSY`] while the daemon writes a
    /// [`MAP_CACHE`] slot in place.
    pub generation: u64,
    /// What besides the name the entry answers for: compared with the
    /// query on every hit (the map key is only their hash). After
    /// `generation`, which a copy into the element changes first.
    pub key: KeyFields,
    /// `CLOCK_MONOTONIC_COARSE` nanoseconds at insertion (the program
    /// reads it as [`jiffies_ns`], or `bpf_ktime_get_coarse_ns`). The entry is served while fewer than
    /// `ttl` whole seconds have passed since.
    pub insert_ns: u64,
    /// TTL in seconds of every record at `insert_ns` (already capped).
    pub ttl: u32,
    /// Partial one's-complement sum (folded, native loads of network-order
    /// words) of the reply's DNS payload except ID, flags, question and TTL
    /// fields: QDCOUNT..ARCOUNT plus the tail with TTL fields zeroed, each
    /// byte at its parity in the reply.
    pub csum_partial: u32,
    /// Header flags, network byte order, with RD cleared.
    pub flags_be: u16,
    /// QDCOUNT, ANCOUNT, NSCOUNT, ARCOUNT, network byte order.
    pub counts_be: [u16; 4],
    /// Bytes of the tail in use (1..=[`MAX_TAIL`]).
    pub tail_len: u16,
    /// Entries of `ttl_off` in use (0..=[`MAX_TTLS`]).
    pub ttl_count: u16,
    /// TTL fields at even DNS-payload offsets (for the checksum).
    pub ttl_even: u16,
    /// TTL fields at odd DNS-payload offsets.
    pub ttl_odd: u16,
    /// Stat slot of the entry's answers (see [`STAT_ZONE_BASE`]).
    pub stat: u16,
    /// Prefetch (CoreDNS `prefetch`): answers the kernel gave from this
    /// entry since its prefetch window opened. Written by the program
    /// (plain read-modify-write: a lost count only delays the report).
    pub hits: u16,
    /// Hits in the window at which the program reports the entry on
    /// `LDNS_LOG` ([`EVENT_PREFETCH`]) so the daemon refreshes it before
    /// it expires; 0: never.
    pub prefetch_amount: u16,
    /// Milliseconds after `insert_ns` at which the prefetch window opens
    /// (the last `percentage` of the TTL).
    pub prefetch_ms: u32,
    /// 1: emit a [`LogEvent`] for every hit (zone has `queryLogging: Log`).
    pub log: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<EntryHead>() == 64);
const _: () = assert!(core::mem::offset_of!(EntryHead, key) == 8);

impl EntryHead {
    /// `CLOCK_MONOTONIC_COARSE` nanoseconds from which the entry is not
    /// served (`insert_ns` plus the TTL; the program compares the age with
    /// the TTL instead).
    pub const fn expire_ns(&self) -> u64 {
        self.insert_ns + self.ttl as u64 * 1_000_000_000
    }
}

/// Value of [`MAP_CACHE_BIG`], and the daemon's working form of every
/// entry: a response's wire image minus what the kernel takes from the
/// query (ID, RD bit, question bytes as sent), plus what it needs to
/// finish the reply in place.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct CacheValue {
    /// Unused, zero: see [`VALUE_HEAD_OFF`].
    pub _lead: u64,
    pub head: EntryHead,
    /// Offsets of TTL fields from the start of the tail, host byte order.
    pub ttl_off: [u16; MAX_TTLS],
    /// `data[..qname_len]`: the lower-cased wire qname, checked against the
    /// query so a hash collision can only cause a PASS; zero up to
    /// [`name_span`]`(qname_len)`.
    /// `data[name_span..name_span + tail_len]`: the tail — answer,
    /// authority and additional sections (OPT included) as sent. Zero after.
    pub data: [u8; DATA_LEN],
}
const _: () = assert!(core::mem::size_of::<CacheValue>() == 1608);
const _: () = assert!(core::mem::offset_of!(CacheValue, head) == VALUE_HEAD_OFF);
const _: () = assert!(core::mem::offset_of!(CacheValue, data) == 128);

/// Where the head starts in every value. In [`MAP_CACHE_BIG`] the kernel's
/// hash element is a 48-byte header, the 8-byte key, then the value: 8
/// bytes of lead put the head, and its `generation`, at the start of the
/// element's second cache line (elements are whole lines: 1,664 bytes); in
/// a [`MAP_CACHE`] slot the hash fills those 8 bytes. With the
/// head at the value's start instead (element offset 56), the torn-read
/// stress test saw about one torn reply in ten runs of a few million: the
/// kernel's copy of a new value into a reused element did not make the
/// generation visible before the rest.
pub const VALUE_HEAD_OFF: usize = 8;

/// TTL fields a [`SmallValue`] holds.
pub const SMALL_TTLS: usize = 8;
/// Longest name span ([`name_span`]) of a [`SmallValue`]: names of up to
/// 80 bytes (`my-service.my-namespace.svc.cluster.local.` is 43).
pub const SMALL_SPAN_MAX: usize = 80;
/// Longest tail of a [`SmallValue`]: a few A/AAAA records with our OPT
/// (one A + OPT is 27 bytes, two AAAA + OPT 67).
pub const SMALL_TAIL_MAX: usize = 80;
/// Bytes of [`SmallValue::data`]: name, tail and the 8 spare bytes a word
/// read at the largest checked offset needs.
pub const SMALL_DATA_LEN: usize = SMALL_SPAN_MAX + SMALL_TAIL_MAX + 8;

/// Value of [`MAP_CACHE`] (one slot): the same entry as a [`CacheValue`]
/// in 256 bytes, for the common small answers. Slots are four whole cache
/// lines: the hash, the generation and the key fields in the first, the
/// rest of the head, `ttl_off` and the name's first bytes in the second,
/// the rest of the name and the tail in the next two.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct SmallValue {
    /// [`CacheKey::hash`] of the entry; 0: the slot is empty (the daemon
    /// keeps an entry whose hash is 0 in the big class). The program picks
    /// the one of an entry's two slots whose `hash` equals the query's,
    /// then checks the key fields and the name as in either class.
    pub hash: u64,
    pub head: EntryHead,
    /// As [`CacheValue::ttl_off`], at most [`SMALL_TTLS`].
    pub ttl_off: [u16; SMALL_TTLS],
    /// As [`CacheValue::data`], name span at most [`SMALL_SPAN_MAX`], tail
    /// at most [`SMALL_TAIL_MAX`].
    pub data: [u8; SMALL_DATA_LEN],
}
const _: () = assert!(core::mem::size_of::<SmallValue>() == 256);
const _: () = assert!(core::mem::offset_of!(SmallValue, head) == VALUE_HEAD_OFF);

/// What the program needs of either size class: the head at
/// [`VALUE_HEAD_OFF`],
/// and where the TTL offsets and data are, with the bounds of the class.
/// Offsets into `data` the program reads are checked against `SPAN_MAX`
/// and `TAIL_MAX` separately, so `SPAN_MAX + TAIL_MAX + 8` must fit.
pub trait Slot {
    /// Most TTL offsets.
    const TTLS: usize;
    /// Longest name span.
    const SPAN_MAX: usize;
    /// Longest tail.
    const TAIL_MAX: usize;
    fn head(&self) -> &EntryHead;
    /// The head of the value at `p`, for the program's one write to it
    /// (the prefetch hit count).
    ///
    /// # Safety
    /// `p` points to a value of this class (a map lookup's result).
    unsafe fn head_ptr(p: *mut Self) -> *mut EntryHead;
    fn ttl_off_ptr(&self) -> *const u16;
    fn data_ptr(&self) -> *const u8;
}

/// Both classes have the same three fields; only their sizes differ.
macro_rules! impl_slot {
    ($t:ty, ttls = $ttls:expr, span = $span:expr, tail = $tail:expr) => {
        impl Slot for $t {
            const TTLS: usize = $ttls;
            const SPAN_MAX: usize = $span;
            const TAIL_MAX: usize = $tail;
            #[inline(always)]
            fn head(&self) -> &EntryHead {
                &self.head
            }
            #[inline(always)]
            unsafe fn head_ptr(p: *mut Self) -> *mut EntryHead {
                // SAFETY: the caller's contract; no reference is made.
                unsafe { &raw mut (*p).head }
            }
            #[inline(always)]
            fn ttl_off_ptr(&self) -> *const u16 {
                self.ttl_off.as_ptr()
            }
            #[inline(always)]
            fn data_ptr(&self) -> *const u8 {
                self.data.as_ptr()
            }
        }
    };
}
impl_slot!(
    CacheValue,
    ttls = MAX_TTLS,
    span = MAX_QNAME + 1,
    tail = MAX_TAIL
);
impl_slot!(
    SmallValue,
    ttls = SMALL_TTLS,
    span = SMALL_SPAN_MAX,
    tail = SMALL_TAIL_MAX
);
const _: () = assert!(CacheValue::SPAN_MAX + CacheValue::TAIL_MAX + 8 <= DATA_LEN);
const _: () = assert!(SMALL_SPAN_MAX + SMALL_TAIL_MAX + 8 <= SMALL_DATA_LEN);
const _: () = assert!(SMALL_SPAN_MAX.is_multiple_of(8) && SMALL_TAIL_MAX.is_multiple_of(8));

impl CacheValue {
    pub const fn zeroed() -> Self {
        Self {
            _lead: 0,
            head: EntryHead {
                generation: 0,
                key: KeyFields {
                    qtype: 0,
                    qclass: 0,
                    qname_len: 0,
                    view: 0,
                    flags: 0,
                    _pad: 0,
                },
                insert_ns: 0,
                ttl: 0,
                csum_partial: 0,
                flags_be: 0,
                counts_be: [0; 4],
                tail_len: 0,
                ttl_count: 0,
                ttl_even: 0,
                ttl_odd: 0,
                stat: 0,
                hits: 0,
                prefetch_amount: 0,
                prefetch_ms: 0,
                log: 0,
                _pad: [0; 3],
            },
            ttl_off: [0; MAX_TTLS],
            data: [0; DATA_LEN],
        }
    }

    /// The stored lower-case qname.
    pub fn qname(&self) -> &[u8] {
        &self.data[..(self.head.key.qname_len as usize).min(MAX_QNAME)]
    }

    /// The stored tail (as far as it lies inside `data`).
    pub fn tail(&self) -> &[u8] {
        let at = name_span((self.head.key.qname_len as usize).min(MAX_QNAME));
        &self.data[at..(at + self.head.tail_len as usize).min(DATA_LEN)]
    }

    /// The entry in the small class, when it fits there (the daemon writes
    /// it to [`MAP_CACHE`] then, else to [`MAP_CACHE_BIG`]).
    pub fn compact(&self) -> Option<SmallValue> {
        let h = &self.head;
        let span = name_span(h.key.qname_len as usize);
        let tail = h.tail_len as usize;
        let ttls = h.ttl_count as usize;
        if span > SMALL_SPAN_MAX || tail > SMALL_TAIL_MAX || ttls > SMALL_TTLS {
            return None;
        }
        let mut s = SmallValue {
            hash: 0,
            head: *h,
            ttl_off: [0; SMALL_TTLS],
            data: [0; SMALL_DATA_LEN],
        };
        s.ttl_off[..ttls].copy_from_slice(&self.ttl_off[..ttls]);
        s.data[..span + tail].copy_from_slice(&self.data[..span + tail]);
        Some(s)
    }
}

impl SmallValue {
    /// The same entry in the big class's layout (what the daemon reads
    /// back, whichever map held it).
    pub fn expand(&self) -> CacheValue {
        let mut v = CacheValue::zeroed();
        v.head = self.head;
        v.ttl_off[..SMALL_TTLS].copy_from_slice(&self.ttl_off);
        v.data[..SMALL_DATA_LEN].copy_from_slice(&self.data);
        v
    }
}

/// Event of [`MAP_LOG`]: what a CoreDNS `log` line needs about one
/// kernel-answered query.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct LogEvent {
    /// The program's clock ([`jiffies_ns`]) when answered.
    pub ktime_ns: u64,
    /// Client address in network order: the first 4 bytes for IPv4.
    pub addr: [u8; 16],
    /// Client UDP port, host byte order.
    pub sport: u16,
    /// Query ID, host byte order.
    pub id: u16,
    /// QTYPE, QCLASS, host byte order.
    pub qtype: u16,
    pub qclass: u16,
    /// Sizes of the query and the reply DNS messages in bytes.
    pub query_len: u16,
    pub reply_len: u16,
    /// The client's EDNS UDP size, 0 without EDNS.
    pub udp_size: u16,
    /// Reply header flags (with RCODE), host byte order.
    pub rflags: u16,
    pub view: u8,
    /// `KEY_F_*` bits of the query.
    pub kflags: u8,
    pub qname_len: u8,
    /// 4 or 6.
    pub family: u8,
    /// The qname as the client sent it (case preserved), wire format.
    pub qname: [u8; MAX_QNAME + 1],
    /// [`EVENT_QUERY`] or [`EVENT_PREFETCH`].
    pub kind: u8,
    pub _pad: [u8; 3],
}
/// [`LogEvent::kind`]: a kernel-answered query of a `Log` zone.
pub const EVENT_QUERY: u8 = 0;
/// [`LogEvent::kind`]: an entry reached its prefetch amount; the daemon
/// refreshes it (the other fields describe the query that did it).
pub const EVENT_PREFETCH: u8 = 1;
const _: () = assert!(core::mem::size_of::<LogEvent>() == 304);

/// Most query bytes after the question the program saves for an undo
/// (the OPT record and any link-layer padding). A query with more (a long
/// padding option) is left to the daemon: real clients send an OPT record
/// with a cookie, well under this.
pub const SAVE_MAX: usize = 128;

/// Value of [`MAP_SCRATCH`].
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Scratch {
    /// The query's qname, lower-cased, in 8-byte words with the bytes past
    /// the name zeroed: hashed and compared with the entry's name without
    /// touching the packet again.
    pub qname: [u8; MAX_QNAME + 1],
    /// The query bytes from the end of the question to the end of the
    /// frame, saved before the reply overwrites them.
    pub saved: [u8; SAVE_MAX],
    /// A value passed through memory the verifier does not track, so every
    /// path after a variable-length loop continues with the same bounds
    /// and the verifier can prune (the qname length, for one).
    pub launder: u64,
}
const _: () = assert!(core::mem::size_of::<Scratch>() == 392);

/// Value of [`MAP_META`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Meta {
    /// [`META_MAGIC`].
    pub magic: u64,
    /// [`LAYOUT_VERSION`] of the daemon that created the maps.
    pub layout: u32,
    pub _pad: u32,
    /// [`qname_hash`] seed of every key in the cache maps.
    pub seed: u64,
    /// `CLOCK_MONOTONIC` nanoseconds when the maps were created.
    pub created_ns: u64,
}
const _: () = assert!(core::mem::size_of::<Meta>() == 32);

// Counter indices of MAP_STATS.
/// Reply built and sent by the kernel.
pub const STAT_HIT: u32 = 0;
/// Eligible query, no entry for its key.
pub const STAT_MISS: u32 = 1;
/// Eligible query, entry past `expire_ns`.
pub const STAT_EXPIRED: u32 = 2;
/// Not IPv4/UDP to a listener address and port 53 (ordinary traffic).
pub const STAT_NOT_DNS: u32 = 3;
/// IPv4 with options, a fragment, or inconsistent lengths.
pub const STAT_PASS_IP: u32 = 4;
/// DNS header not eligible (QR, opcode, TC, counts, short packet).
pub const STAT_PASS_HEADER: u32 = 5;
/// Question not eligible (compression, label > 63, name > 255, truncated).
pub const STAT_PASS_QNAME: u32 = 6;
/// OPT record malformed, not version 0, or trailing bytes.
pub const STAT_PASS_EDNS: u32 = 7;
/// Entry's qname differs (hash collision).
pub const STAT_PASS_COLLISION: u32 = 8;
/// The query has more bytes after its question than an undo can save.
pub const STAT_PASS_SIZE: u32 = 9;
/// Entry inconsistent, or the frame could not be resized; passed untouched.
pub const STAT_PASS_ERROR: u32 = 10;
/// Query-log event lost because the ring buffer was full (reply still sent).
pub const STAT_LOG_DROPPED: u32 = 11;
/// The entry changed while it was copied into the reply (generation
/// mismatch); the query bytes were restored exactly and passed on.
pub const STAT_PASS_RACE: u32 = 12;
/// Something failed after the first write to the packet: dropped, never
/// passed half-rewritten.
pub const STAT_DROP_ERROR: u32 = 13;
/// XDP could not grow the frame for the reply: marked and passed to the TC
/// companion program on the same interface, which answers it.
pub const STAT_PASS_ROOM: u32 = 14;
/// Answered with TC=1 (the cached reply is larger than the client's UDP
/// size): the client retries over TCP.
pub const STAT_TRUNCATED: u32 = 15;
/// Number of counters by reason.
pub const STAT_COUNT: u32 = 16;

/// Kernel answers are counted per stat slot (zone, query type, kind of
/// answer; handed out by the daemon and stored in [`CacheValue::stat`]) and
/// address family, at `STAT_ZONE_BASE + slot * 2 + is_ipv6`, instead of
/// under [`STAT_HIT`]: one counter update per hit. `hit` is their sum minus
/// [`STAT_TRUNCATED`] (TC=1 replies count in their slot too).
pub const STAT_ZONE_BASE: u32 = STAT_COUNT;
/// Stat slots (a power of two: the program masks the slot).
pub const MAX_STAT_SLOTS: u32 = 512;
/// Entries of [`MAP_STATS`].
pub const STAT_ENTRIES: u32 = STAT_ZONE_BASE + 2 * MAX_STAT_SLOTS;

/// Counter names, indexed by `STAT_*`, for `cache stats` and metrics.
pub const STAT_NAMES: [&str; STAT_COUNT as usize] = [
    "hit",
    "miss",
    "expired",
    "not_dns",
    "pass_ip",
    "pass_header",
    "pass_qname",
    "pass_edns",
    "pass_collision",
    "pass_size",
    "pass_error",
    "log_dropped",
    "pass_race",
    "drop_error",
    "pass_room",
    "truncated",
];

const HASH_MUL: u64 = 0x9E37_79B9_7F4A_7C15;

/// One step of [`qname_hash`]: mixes one 8-byte word (loaded little-endian,
/// bytes past the name zeroed).
#[inline(always)]
pub const fn qname_hash_step(h: u64, word: u64) -> u64 {
    let h = (h ^ word).wrapping_mul(HASH_MUL);
    h ^ (h >> 29)
}

/// Hash of a lower-cased wire qname; the kernel computes the same thing
/// word by word with [`qname_hash_step`].
pub fn qname_hash(seed: u64, name: &[u8]) -> u64 {
    let mut h = seed;
    for chunk in name.chunks(8) {
        let mut w = [0u8; 8];
        w[..chunk.len()].copy_from_slice(chunk);
        h = qname_hash_step(h, u64::from_le_bytes(w));
    }
    h
}

/// ASCII lower-casing of 8 bytes at once (bytes >= 0x80 and label lengths,
/// which are <= 63, are left alone), as CoreDNS lower-cases cache keys.
#[inline(always)]
pub const fn lower8(w: u64) -> u64 {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let low7 = w & !HIGH;
    // High bit of each byte set where the byte is >= 'A' / > 'Z'.
    let ge_a = low7.wrapping_add((0x80 - b'A' as u64) * ONES);
    let gt_z = low7.wrapping_add((0x7f - b'Z' as u64) * ONES);
    let upper = (ge_a ^ gt_z) & !w & HIGH;
    w | (upper >> 2)
}

/// Folds a 64-bit one's-complement accumulator to 16 bits.
#[inline(always)]
pub const fn csum_fold(mut s: u64) -> u16 {
    s = (s & 0xffff_ffff) + (s >> 32);
    s = (s & 0xffff_ffff) + (s >> 32);
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    s as u16
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain-old-data, repr(C), every bit pattern valid, no padding
    // holes (explicit `_pad` fields).
    unsafe impl aya::Pod for super::CacheKey {}
    unsafe impl aya::Pod for super::CacheValue {}
    unsafe impl aya::Pod for super::SmallValue {}
    unsafe impl aya::Pod for super::LogEvent {}
    unsafe impl aya::Pod for super::Meta {}
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;

    #[test]
    fn lower8_matches_ascii_lowercase() {
        for b in 0u16..=255 {
            let b = b as u8;
            let w = u64::from_le_bytes([b, b'Q', 0x3f, 0x80 | b'A', b'z', b'@', b'[', b]);
            let got = lower8(w).to_le_bytes();
            let mut want = w.to_le_bytes();
            want.make_ascii_lowercase();
            assert_eq!(got, want, "byte {b:#x}");
        }
    }

    #[test]
    fn hash_depends_on_seed_and_name() {
        let n = b"\x07example\x04test\x00";
        assert_ne!(qname_hash(1, n), qname_hash(2, n));
        assert_ne!(qname_hash(1, n), qname_hash(1, b"\x07exbmple\x04test\x00"));
        assert_eq!(qname_hash(7, n), qname_hash(7, n));
    }

    fn entry(qlen: usize, tail: usize, ttls: usize) -> CacheValue {
        let mut v = CacheValue::zeroed();
        v.head.generation = 7;
        v.head.key.qname_len = qlen as u8;
        v.head.tail_len = tail as u16;
        v.head.ttl_count = ttls as u16;
        for i in 0..ttls {
            v.ttl_off[i] = (i * 11) as u16;
        }
        for i in 0..qlen {
            v.data[i] = b'a' + (i % 26) as u8;
        }
        let at = name_span(qlen);
        for i in 0..tail {
            v.data[at + i] = i as u8 ^ 0x5a;
        }
        v
    }

    #[test]
    fn small_class_round_trips_what_fits() {
        for (qlen, tail, ttls) in [(1, 8, 0), (17, 27, 1), (80, 80, 8), (73, 80, 8)] {
            let v = entry(qlen, tail, ttls);
            let s = v.compact().expect("fits the small class");
            let back = s.expand();
            assert_eq!(back.head, v.head);
            assert_eq!(back.ttl_off, v.ttl_off);
            assert_eq!(back.data, v.data, "{qlen}/{tail}/{ttls}");
            assert_eq!(back.qname(), v.qname());
            assert_eq!(back.tail(), v.tail());
        }
    }

    #[test]
    fn big_entries_stay_big() {
        // Name span 88, tail 81, 9 TTL fields: each alone is one too many.
        for (qlen, tail, ttls) in [(81, 8, 0), (1, 81, 1), (1, 80, 9), (255, 1216, 28)] {
            assert!(
                entry(qlen, tail, ttls).compact().is_none(),
                "{qlen}/{tail}/{ttls}"
            );
        }
    }

    #[test]
    fn slots_are_twice_the_entries_in_a_power_of_two() {
        assert_eq!(cache_slots(CACHE_MAP_ENTRIES), 32768);
        assert_eq!(cache_slots(20_000), 65536);
        assert_eq!(cache_slots(0), 2);
        assert_eq!(cache_slots(u32::MAX), 1 << 30);
        assert_eq!(slot_pair(0x0000_0005_0000_0003, 3), (3, 1));
    }

    #[test]
    fn big_class_capacity() {
        assert_eq!(big_entries(CACHE_MAP_ENTRIES), 4096);
        assert_eq!(big_entries(16), 64);
    }

    #[test]
    fn key_word_is_the_fields_in_memory() {
        let k = KeyFields {
            qtype: 0x1c01,
            qclass: 0x00fe,
            qname_len: 255,
            view: 1,
            flags: KEY_F_DO | KEY_F_EDNS,
            _pad: 0,
        };
        // SAFETY: 8 bytes of plain integers either way.
        let mem: u64 = unsafe { core::mem::transmute(k) };
        assert_eq!(k.word(), mem);
        let mut other = k;
        other.view = 0;
        assert_ne!(key_hash(9, other.word()), key_hash(9, k.word()));
    }

    #[test]
    fn whole_secs_is_exact_below_2_pow_50() {
        const NS: u64 = 1_000_000_000;
        let limit = 1u64 << 50;
        // Every second boundary up to MAX_KERNEL_TTL + 1, both sides.
        for k in 0..=u64::from(MAX_KERNEL_TTL) + 1 {
            for x in [
                k * NS,
                (k * NS).saturating_sub(1),
                k * NS + 1,
                k * NS + NS / 2,
            ] {
                assert_eq!(whole_secs(x), x / NS, "{x}");
            }
        }
        // The top of the range and a pseudo-random spread over it.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..1_000_000 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let v = x % limit;
            assert_eq!(whole_secs(v), v / NS, "{v}");
        }
        for v in [
            limit - 1,
            limit - NS,
            (limit / NS) * NS,
            (limit / NS) * NS - 1,
        ] {
            assert_eq!(whole_secs(v), v / NS, "{v}");
        }
        assert!(u64::from(MAX_KERNEL_TTL) * NS < limit);
    }

    #[test]
    fn fold_handles_carries() {
        assert_eq!(csum_fold(0xffff), 0xffff);
        assert_eq!(csum_fold(0x1_0000), 1);
        assert_eq!(csum_fold(u64::MAX), 0xffff);
    }
}
