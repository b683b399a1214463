//! Per-query logic: parse, pick the zone (longest suffix per view), answer
//! from the cache, or forward and fill both caches.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Instant;

use dashmap::DashMap;
use dashmap::mapref::entry::Entry as MapEntry;
use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use localdns_common::{LogEvent, VIEW_KUBE};

use crate::cache::{Cache, Capacity, Entry, Key, is_denial, mono_ns};
use crate::config::{Config, Destination, QueryLogging, ServeStale, ViewKind, Zone, ZoneSettings};
use crate::fastpath::Fastpath;
use crate::forward::{ForwardError, Forwarder, Upstream};
use crate::loopdetect::{self, Loops};
use crate::metrics::{Answered, SlotKey, intern, metrics, type_label, view_label};
use crate::querylog;
use crate::synth::{self, Hosts};
use crate::wire::{
    self, HEADER_LEN, Query, RCODE_FORMERR, RCODE_NOTIMP, RCODE_NXDOMAIN, RCODE_REFUSED,
    RCODE_SERVFAIL, WireError,
};

/// Transport a query came in on (the UDP size limit applies only to UDP).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

impl Transport {
    pub fn proto(self) -> querylog::Proto {
        match self {
            Transport::Udp => querylog::Proto::Udp,
            Transport::Tcp => querylog::Proto::Tcp,
        }
    }
}

struct ZoneRt {
    zone: Zone,
    /// The zone as CoreDNS's metrics label it: "." or "cluster.local.".
    label: &'static str,
    fwd: Arc<Forwarder>,
}

/// A query with the cache key bits `kflags` (CD, EDNS, DO) for a name the
/// kernel reported: what the daemon forwards when it refreshes that key.
fn query_for_key(qname: &[u8], qtype: u16, qclass: u16, kflags: u8) -> Option<Query> {
    use localdns_common::{KEY_F_CD, KEY_F_DO, KEY_F_EDNS};
    let edns = kflags & KEY_F_EDNS != 0;
    let mut m = Vec::with_capacity(12 + qname.len() + 15);
    let flags = wire::F_RD
        | if kflags & KEY_F_CD != 0 {
            wire::F_CD
        } else {
            0
        };
    m.extend_from_slice(&[0, 0]);
    m.extend_from_slice(&flags.to_be_bytes());
    m.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, u8::from(edns)]);
    m.extend_from_slice(qname);
    m.extend_from_slice(&qtype.to_be_bytes());
    m.extend_from_slice(&qclass.to_be_bytes());
    if edns {
        let do_hi = if kflags & KEY_F_DO != 0 { 0x80 } else { 0 };
        let size = wire::OUR_UDP_SIZE.to_be_bytes();
        m.extend_from_slice(&[0, 0, 41, size[0], size[1], 0, 0, do_hi, 0, 0, 0]);
    }
    wire::parse_query(&m).ok()
}

/// `<name> HINFO` with RD, as CoreDNS `loop` asks.
fn loop_probe_query(name: &[u8]) -> Option<Query> {
    let mut m = Vec::with_capacity(12 + name.len() + 4);
    m.extend_from_slice(&rand::random::<u16>().to_be_bytes());
    m.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    m.extend_from_slice(name);
    m.extend_from_slice(&loopdetect::TYPE_HINFO.to_be_bytes());
    m.extend_from_slice(&wire::CLASS_IN.to_be_bytes());
    wire::parse_query(&m).ok()
}

/// One of our loop probes came back from `client`: the log line CoreDNS
/// `loop` prints (as an error: we keep running), and the metrics.
fn loop_detected((view, zone): loopdetect::ZoneId, client: SocketAddr, q: &Query) {
    let m = metrics();
    m.loops.inc();
    m.set_loop(view, zone, true);
    querylog::emit(format!(
        "[ERROR] plugin/loop: Loop ({client} -> {} view) detected for zone \"{zone}\", see https://coredns.io/plugins/loop#troubleshooting. Query: \"HINFO {}\"",
        view_label(view),
        q.name_text()
    ));
}

/// `health-check.localdns.local`: AKS's DNS probe, answered locally with
/// CoreDNS `whoami` semantics (never forwarded, never cached).
const HEALTH_CHECK_NAME: &[u8] = b"\x0chealth-check\x08localdns\x05local\x00";

/// The kernel stat slot for entries of `key` in `zone` (see
/// `localdns_common::STAT_ZONE_BASE`).
fn stat_slot(key: &Key, zone: &'static str, e: &Entry) -> u16 {
    let kind = if e.rcode == wire::RCODE_NXDOMAIN {
        2
    } else {
        u8::from(is_denial(e))
    };
    metrics().slot(SlotKey {
        view: key.view,
        zone,
        qtype: type_label(key.qtype),
        kind,
    })
}

/// How long serveStale Verify waits for the upstream before it serves the
/// stale answer (one upstream try).
const VERIFY_WAIT: std::time::Duration = crate::forward::TRY_TIMEOUT;

/// An upstream fetch in flight, shared by every identical miss that
/// arrives meanwhile: one upstream query, one store, the same outcome.
type Flight = Shared<BoxFuture<'static, Result<Stored, Arc<ForwardError>>>>;

/// Daemon-side counters (the kernel's are in the stats map).
#[derive(Default)]
pub struct Counters {
    pub queries: AtomicU64,
    pub cache_hits: AtomicU64,
    pub stale_served: AtomicU64,
    pub forwarded: AtomicU64,
    pub servfail: AtomicU64,
    pub refused: AtomicU64,
    pub formerr: AtomicU64,
    /// Upstream replies that did not decode (answered SERVFAIL).
    pub malformed: AtomicU64,
    /// Misses answered by joining an identical miss already in flight.
    pub coalesced: AtomicU64,
    pub prefetched: AtomicU64,
}

/// The zones of both views, swapped as a whole on reload.
type Views = [Vec<ZoneRt>; 2];

pub struct Resolver {
    views: RwLock<Arc<Views>>,
    vnet_upstreams: Vec<Arc<Upstream>>,
    cluster_upstreams: Vec<Arc<Upstream>>,
    pub cache: Cache,
    pub fastpath: Option<Arc<Fastpath>>,
    refreshing: Mutex<HashSet<Key>>,
    flights: DashMap<Key, Flight>,
    /// When [`Resolver::sweep`] last ran (CLOCK_MONOTONIC ns).
    last_sweep_ns: AtomicU64,
    pub counters: Counters,
    pub loops: Loops,
    /// `--hosts-file`, answered in the `.` zones before forwarding.
    pub hosts: OnceLock<Arc<Hosts>>,
}

impl Resolver {
    pub fn new(
        config: &Config,
        vnet_upstreams: &[SocketAddr],
        cluster_upstreams: &[SocketAddr],
        fastpath: Option<Arc<Fastpath>>,
        capacity: Capacity,
    ) -> Arc<Self> {
        // One Upstream (and TCP connection) per address, shared by zones and
        // kept across reloads.
        let vnet: Vec<_> = vnet_upstreams.iter().map(|a| Upstream::new(*a)).collect();
        let cluster: Vec<_> = cluster_upstreams
            .iter()
            .map(|a| Upstream::new(*a))
            .collect();
        let views = build_views(config, &vnet, &cluster);
        Arc::new(Resolver {
            views: RwLock::new(Arc::new(views)),
            vnet_upstreams: vnet,
            cluster_upstreams: cluster,
            cache: Cache::new(capacity),
            fastpath,
            refreshing: Mutex::new(HashSet::new()),
            flights: DashMap::new(),
            last_sweep_ns: AtomicU64::new(0),
            counters: Counters::default(),
            loops: Loops::default(),
            hosts: OnceLock::new(),
        })
    }

    fn views(&self) -> Arc<Views> {
        self.views.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Applies a new configuration at once (queries in flight finish on the
    /// old one). Cached answers of zones whose settings did not change are
    /// kept; the others are dropped, from the kernel map too. Returns how
    /// many entries were dropped.
    pub fn reload(&self, config: &Config) -> usize {
        let new = Arc::new(build_views(
            config,
            &self.vnet_upstreams,
            &self.cluster_upstreams,
        ));
        let old = std::mem::replace(
            &mut *self.views.write().unwrap_or_else(|e| e.into_inner()),
            new.clone(),
        );
        let changed = |k: &Key| {
            let a = &find_zone(&old, k.view, &k.qname).zone;
            let b = &find_zone(&new, k.view, &k.qname).zone;
            a.name != b.name || a.settings != b.settings
        };
        let gone = self.cache.remove_if(changed);
        if let Some(fp) = &self.fastpath {
            for k in &gone {
                fp.remove(k);
            }
        }
        gone.len()
    }

    /// Rebuilds the cache from the kernel map of an earlier instance so
    /// both agree. Each entry is judged by today's zone settings: one whose
    /// TTL exceeds its zone's cap is dropped (from the kernel too); the
    /// others are kept with the zone's stale window and rewritten to the
    /// kernel with its query-log flag. Returns (kept, dropped).
    pub fn adopt(&self, entries: Vec<(Key, Entry)>) -> (usize, usize) {
        let views = self.views();
        let (mut kept, mut dropped) = (0, 0);
        for (key, mut e) in entries {
            let z = find_zone(&views, key.view, &key.qname);
            let s = &z.zone.settings;
            if e.ttl > s.cache_secs {
                if let Some(fp) = &self.fastpath {
                    fp.remove(&key);
                }
                dropped += 1;
                continue;
            }
            e.stale_until_ns = e.expire_ns + u64::from(s.stale_secs) * 1_000_000_000;
            if let Some(fp) = &self.fastpath {
                let slot = stat_slot(&key, z.label, &e);
                fp.put(&key, &e, s.query_logging == QueryLogging::Log, slot);
            }
            for gone in self.cache.insert(key, Arc::new(e)) {
                if let Some(fp) = &self.fastpath {
                    fp.remove(&gone);
                }
            }
            kept += 1;
        }
        (kept, dropped)
    }

    /// Answers a query. `None`: drop it (not a query, or too short to say
    /// anything back).
    pub async fn handle(
        self: &Arc<Self>,
        view: u8,
        raw: &[u8],
        client: SocketAddr,
        tr: Transport,
    ) -> Option<Vec<u8>> {
        let q = match wire::parse_query(raw) {
            Ok(q) => q,
            Err(e) => {
                self.counters.queries.fetch_add(1, Ordering::Relaxed);
                return self.reject(raw, e);
            }
        };
        self.handle_parsed(view, raw, q, client, tr).await
    }

    /// [`Resolver::handle`] for a query already parsed from `raw`.
    pub async fn handle_parsed(
        self: &Arc<Self>,
        view: u8,
        raw: &[u8],
        q: Query,
        client: SocketAddr,
        tr: Transport,
    ) -> Option<Vec<u8>> {
        let start = Instant::now();
        self.counters.queries.fetch_add(1, Ordering::Relaxed);
        let views = self.views();
        let zone = find_zone(&views, view, &q.qname_lower);
        let (reply, plugin) = if q.qname_lower == HEALTH_CHECK_NAME {
            (whoami(raw, &q, client, tr), "whoami")
        } else if let Some(looped) = (q.qtype == loopdetect::TYPE_HINFO)
            .then(|| self.loops.arrived(&q.qname_lower, client))
            .flatten()
        {
            loop_detected(looped, client, &q);
            let r = wire::error_reply(raw, Some(&q), RCODE_SERVFAIL, false).unwrap_or_default();
            (r, "loop")
        } else {
            self.answer(view, raw, &q, zone, client, tr).await
        };
        metrics().answered(&Answered {
            view,
            zone: zone.label,
            client: &client,
            proto: tr.proto(),
            qtype: q.qtype,
            rcode: if reply.len() >= HEADER_LEN {
                u16::from(reply[3] & 0xf)
            } else {
                RCODE_SERVFAIL.into()
            },
            plugin,
            took: start.elapsed(),
        });
        if zone.zone.settings.query_logging == QueryLogging::Log {
            log_query(client, tr, raw, &q, &reply, start.elapsed().as_secs_f64());
        }
        Some(reply)
    }

    /// The cached answer, without touching the network: lets the UDP loop
    /// answer hits inline. Otherwise it hands back what it parsed (the
    /// async path then does not parse again); `Err(None)`: not parseable.
    pub fn answer_cached(
        &self,
        view: u8,
        raw: &[u8],
        client: SocketAddr,
    ) -> Result<Vec<u8>, Option<Query>> {
        let start = Instant::now();
        let q = wire::parse_query(raw).map_err(|_| None)?;
        let views = self.views();
        let zone = find_zone(&views, view, &q.qname_lower);
        if zone.zone.settings.query_logging == QueryLogging::Log {
            return Err(Some(q));
        }
        let key = Key::of(view, &q);
        let Some(e) = self.cache.get(&key) else {
            return Err(Some(q));
        };
        let now = mono_ns();
        if !e.is_fresh(now) {
            return Err(Some(q));
        }
        let Some(out) = e.render(raw, &q, now, q.max_udp()) else {
            return Err(Some(q));
        };
        self.counters.queries.fetch_add(1, Ordering::Relaxed);
        self.counters.cache_hits.fetch_add(1, Ordering::Relaxed);
        self.back_to_kernel(&key, &e, zone.label, now);
        let m = metrics();
        m.cache_lookup(view, client.is_ipv6(), zone.label, Some(is_denial(&e)));
        m.answered(&Answered {
            view,
            zone: zone.label,
            client: &client,
            proto: querylog::Proto::Udp,
            qtype: q.qtype,
            rcode: e.rcode.into(),
            plugin: "cache",
            took: start.elapsed(),
        });
        Ok(out)
    }

    fn reject(&self, raw: &[u8], e: WireError) -> Option<Vec<u8>> {
        match e {
            WireError::NotQuery
            | WireError::Short {
                len: 0..HEADER_LEN, ..
            } => None,
            WireError::Opcode { .. } => wire::error_reply(raw, None, RCODE_NOTIMP, false),
            WireError::BadVersion { .. } => wire::badvers_reply(raw),
            _ => {
                self.counters.formerr.fetch_add(1, Ordering::Relaxed);
                wire::error_reply(raw, None, RCODE_FORMERR, false)
            }
        }
    }

    /// The reply, and which part of the service gave it (the `plugin` label
    /// of CoreDNS's response counter).
    async fn answer(
        self: &Arc<Self>,
        view: u8,
        raw: &[u8],
        q: &Query,
        zone: &ZoneRt,
        client: SocketAddr,
        tr: Transport,
    ) -> (Vec<u8>, &'static str) {
        let max = match tr {
            Transport::Udp => q.max_udp(),
            Transport::Tcp => 65535,
        };
        if zone.label == "." && synth::nxdomain_template(&q.qname_lower).is_some() {
            let r = wire::error_reply(raw, Some(q), RCODE_NXDOMAIN, false).unwrap_or_default();
            return (r, "template");
        }
        let m = metrics();
        let v6 = client.is_ipv6();
        let key = Key::of(view, q);
        let now = mono_ns();
        let cached = self.cache.get(&key).filter(|e| now < e.stale_until_ns);
        if let Some(e) = &cached {
            if e.is_fresh(now) {
                self.counters.cache_hits.fetch_add(1, Ordering::Relaxed);
                m.cache_lookup(view, v6, zone.label, Some(is_denial(e)));
                if tr == Transport::Udp && zone.zone.settings.query_logging != QueryLogging::Log {
                    self.back_to_kernel(&key, e, zone.label, now);
                }
                return (self.render(e, raw, q, now, max), "cache");
            }
            if zone.zone.settings.serve_stale == ServeStale::Immediate {
                self.refresh_in_background(view, q.clone(), key.clone());
                self.counters.stale_served.fetch_add(1, Ordering::Relaxed);
                m.cache_lookup(view, v6, zone.label, Some(is_denial(e)));
                m.stale(view, v6, zone.label);
                return (self.render(e, raw, q, now, max), "cache");
            }
        }
        m.cache_lookup(view, v6, zone.label, None);
        self.counters.forwarded.fetch_add(1, Ordering::Relaxed);
        let looping = self.loops.is_looping((view, zone.label));
        let fetch = async move {
            if looping {
                return Err(Arc::new(ForwardError::Loop { zone: zone.label }));
            }
            self.forward_and_store(zone, q, key).await
        };
        // serveStale Verify with a stale answer at hand: the upstream gets
        // one try's time; after that the stale answer goes out and the
        // fetch goes on (its flight stores the fresh answer when it comes).
        let fetched = match (&cached, zone.zone.settings.serve_stale) {
            (Some(e), ServeStale::Verify) => {
                match tokio::time::timeout(VERIFY_WAIT, fetch.boxed()).await {
                    Ok(r) => r,
                    Err(_) => {
                        self.counters.stale_served.fetch_add(1, Ordering::Relaxed);
                        m.stale(view, v6, zone.label);
                        return (self.render(e, raw, q, mono_ns(), max), "cache");
                    }
                }
            }
            _ => fetch.await,
        };
        match fetched {
            Ok(Stored::Entry(e)) => (self.render(&e, raw, q, mono_ns(), max), "forward"),
            Ok(Stored::Relay(resp)) => {
                let stale_ok = zone.zone.settings.serve_stale != ServeStale::Disable;
                if let (Some(e), true, RCODE_SERVFAIL) = (&cached, stale_ok, wire::rcode(&resp)) {
                    self.counters.stale_served.fetch_add(1, Ordering::Relaxed);
                    m.stale(view, v6, zone.label);
                    return (self.render(e, raw, q, mono_ns(), max), "cache");
                }
                (relay(&resp, raw, q, max), "forward")
            }
            Err(err) if matches!(*err, ForwardError::Overloaded { .. }) => {
                self.counters.refused.fetch_add(1, Ordering::Relaxed);
                m.fwd_max_concurrent_rejects.inc();
                tracing::debug!(zone = %zone.zone.text, %err, "maxConcurrent reached: REFUSED");
                let r = wire::error_reply(raw, Some(q), RCODE_REFUSED, false).unwrap_or_default();
                (r, "forward")
            }
            Err(err) => {
                if err.is_malformed() {
                    self.counters.malformed.fetch_add(1, Ordering::Relaxed);
                    m.malformed_replies.inc();
                }
                let stale_ok = zone.zone.settings.serve_stale != ServeStale::Disable;
                if let (Some(e), true) = (&cached, stale_ok) {
                    self.counters.stale_served.fetch_add(1, Ordering::Relaxed);
                    m.stale(view, v6, zone.label);
                    return (self.render(e, raw, q, mono_ns(), max), "cache");
                }
                self.counters.servfail.fetch_add(1, Ordering::Relaxed);
                querylog::emit(querylog::error_line(2, &q.qname, q.qtype, &err));
                let r = wire::error_reply(raw, Some(q), RCODE_SERVFAIL, false).unwrap_or_default();
                (r, "forward")
            }
        }
    }

    fn render(&self, e: &Entry, raw: &[u8], q: &Query, now: u64, max: usize) -> Vec<u8> {
        e.render(raw, q, now, max)
            .or_else(|| wire::error_reply(raw, Some(q), e.rcode, true))
            .unwrap_or_default()
    }

    /// Fetches `q` upstream and stores a cacheable answer, once for all
    /// identical misses in flight together.
    async fn forward_and_store(
        self: &Arc<Self>,
        zone: &ZoneRt,
        q: &Query,
        key: Key,
    ) -> Result<Stored, Arc<ForwardError>> {
        let flight = match self.flights.entry(key.clone()) {
            MapEntry::Occupied(f) => {
                self.counters.coalesced.fetch_add(1, Ordering::Relaxed);
                f.get().clone()
            }
            MapEntry::Vacant(v) => {
                let (me, fwd, s, label, q, k) = (
                    self.clone(),
                    zone.fwd.clone(),
                    zone.zone.settings.clone(),
                    zone.label,
                    q.clone(),
                    key.clone(),
                );
                // A task of its own: it finishes (and stores) even when every
                // waiter has given up, then retires itself from the map.
                let task = tokio::spawn(async move {
                    let r = me
                        .fetch(&fwd, &s, label, &q, k.clone())
                        .await
                        .map_err(Arc::new);
                    me.flights.remove(&k);
                    r
                });
                let f = async move {
                    task.await
                        .unwrap_or_else(|e| Err(Arc::new(ForwardError::Aborted(e.to_string()))))
                }
                .boxed()
                .shared();
                v.insert(f.clone());
                f
            }
        };
        flight.await
    }

    async fn fetch(
        &self,
        fwd: &Forwarder,
        s: &ZoneSettings,
        label: &'static str,
        q: &Query,
        key: Key,
    ) -> Result<Stored, ForwardError> {
        let hosts = self.hosts.get().filter(|_| label == ".");
        let resp = match hosts.and_then(|h| h.answer(q)) {
            Some(r) => r,
            None => fwd.resolve(q).await?,
        };
        match Entry::from_upstream(q, &resp, s.cache_secs, s.stale_secs, mono_ns()) {
            Ok(e) => {
                let e = Arc::new(e);
                if let Some(fp) = &self.fastpath {
                    let slot = stat_slot(&key, label, &e);
                    fp.put(&key, &e, s.query_logging == QueryLogging::Log, slot);
                    e.kernel_put.set(mono_ns());
                }
                for gone in self.cache.insert(key, e.clone()) {
                    if let Some(fp) = &self.fastpath {
                        fp.remove(&gone);
                    }
                }
                Ok(Stored::Entry(e))
            }
            Err(why) => {
                tracing::trace!(%why, "answer not cached");
                Ok(Stored::Relay(Arc::new(resp)))
            }
        }
    }

    /// The kernel reports an entry it answered `prefetch_amount` times near
    /// its expiry: refresh it in the background (one flight per key), so
    /// the kernel map gets the fresh answer before the old one expires.
    pub fn prefetch(self: &Arc<Self>, ev: &LogEvent) {
        let qn = &ev.qname[..(ev.qname_len as usize).min(ev.qname.len())];
        let Some(q) = query_for_key(qn, ev.qtype, ev.qclass, ev.kflags) else {
            return;
        };
        let key = Key::of(ev.view, &q);
        if self.cache.get(&key).is_none() {
            return; // evicted meanwhile: the next query fetches it anyway
        }
        let views = self.views();
        let zone = find_zone(&views, ev.view, &q.qname_lower);
        metrics().prefetch(ev.view, zone.label);
        self.counters.prefetched.fetch_add(1, Ordering::Relaxed);
        self.refresh_in_background(ev.view, q, key);
    }

    /// serveStale Immediate: one background refresh per entry at a time.
    fn refresh_in_background(self: &Arc<Self>, view: u8, q: Query, key: Key) {
        {
            let mut r = self.refreshing.lock().unwrap_or_else(|e| e.into_inner());
            if !r.insert(key.clone()) {
                return;
            }
        }
        let me = self.clone();
        tokio::spawn(async move {
            let views = me.views();
            let zone = find_zone(&views, view, &q.qname_lower);
            if let Err(e) = me.forward_and_store(zone, &q, key.clone()).await {
                tracing::debug!(error = %e, "background refresh failed");
            }
            me.refreshing
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&key);
        });
    }

    /// Readiness (`/ready`): every view has at least one upstream that is
    /// not marked down.
    pub fn ready_check(&self) -> Result<(), String> {
        if let Some(&(view, zone)) = self.loops.looping().first() {
            return Err(format!(
                "forwarding loop for zone {zone} of the {} view",
                view_label(view)
            ));
        }
        let views = self.views();
        for (i, zones) in views.iter().enumerate() {
            let up = zones
                .iter()
                .flat_map(|z| z.fwd.upstreams.iter())
                .any(|u| !u.is_down());
            if !up {
                let name = view_label(i as u8);
                return Err(format!("no healthy upstream for the {name} view"));
            }
        }
        Ok(())
    }

    /// Sends every forwarded zone of both views its loop probe and waits
    /// for the answers; a probe that came back marks its zone looping, one
    /// that did not clears it (see [`crate::loopdetect`]).
    pub async fn probe_loops(self: &Arc<Self>) {
        let views = self.views();
        let mut probes = Vec::new();
        for (view, zones) in views.iter().enumerate() {
            let mut done = HashSet::new();
            for z in zones {
                if !done.insert(z.label) {
                    continue;
                }
                let Some(zone_wire) = wire::text_to_wire_lower(z.label) else {
                    continue;
                };
                let name = loopdetect::probe_name(&zone_wire);
                let Some(q) = loop_probe_query(&name) else {
                    continue;
                };
                self.loops.start(name.clone(), (view as u8, z.label));
                let fwd = z.fwd.clone();
                let me = self.clone();
                probes.push(tokio::spawn(async move {
                    let _ = fwd.resolve(&q).await;
                    if let Some(((view, zone), looping)) = me.loops.finish(&name) {
                        metrics().set_loop(view, zone, looping);
                        if !looping {
                            tracing::info!(view = view_label(view), zone, "forwarding loop gone");
                        }
                    }
                }));
            }
        }
        for p in probes {
            let _ = p.await;
        }
    }

    /// A fresh entry the daemon answered over UDP although the kernel could
    /// have: the kernel map lost it (its LRU is smaller than this cache), so
    /// it goes back, at most once a second per entry.
    fn back_to_kernel(&self, key: &Key, e: &Entry, zone: &'static str, now: u64) {
        let Some(fp) = &self.fastpath else {
            return;
        };
        if now.saturating_sub(e.kernel_put.get()) < 1_000_000_000 {
            return;
        }
        e.kernel_put.set(now);
        fp.put(key, e, false, stat_slot(key, zone, e));
    }

    /// Drops entries past their stale window, and takes entries that
    /// expired since the last sweep out of the kernel map (the kernel refuses
    /// expired entries anyway; this frees LRU room, once per entry).
    pub fn sweep(&self) {
        let now = mono_ns();
        let since = self.last_sweep_ns.swap(now, Ordering::Relaxed);
        let swept = self.cache.sweep(since, now);
        if let Some(fp) = &self.fastpath {
            for k in swept.gone.iter().chain(swept.expired.iter()) {
                fp.remove(k);
            }
        }
    }
}

fn build_views(config: &Config, vnet: &[Arc<Upstream>], cluster: &[Arc<Upstream>]) -> Views {
    let build = |view: ViewKind| -> Vec<ZoneRt> {
        config
            .zones(view)
            .iter()
            .map(|z| {
                let ups = match z.settings.destination {
                    Destination::VnetDns => vnet.to_vec(),
                    Destination::ClusterCoreDns => cluster.to_vec(),
                };
                let s = &z.settings;
                ZoneRt {
                    zone: z.clone(),
                    label: intern(&wire::name_to_text(&z.name).to_ascii_lowercase()),
                    fwd: Arc::new(Forwarder::new(ups, s.policy, s.protocol, s.max_concurrent)),
                }
            })
            .collect()
    };
    [build(ViewKind::Vnet), build(ViewKind::Kube)]
}

/// Longest-suffix zone of `qname` (lower-case wire) in `view`; zones are
/// sorted longest first and every view has the root zone.
fn find_zone<'a>(views: &'a Views, view: u8, qname: &[u8]) -> &'a ZoneRt {
    let zones = &views[usize::from(view == VIEW_KUBE)];
    zones
        .iter()
        .find(|z| is_subdomain(qname, &z.zone.name))
        .unwrap_or_else(|| zones.last().expect("every view has the root zone"))
}

#[derive(Clone)]
enum Stored {
    Entry(Arc<Entry>),
    Relay(Arc<Vec<u8>>),
}

/// `qname` equals `zone` or lies below it (both lower-case wire).
pub fn is_subdomain(qname: &[u8], zone: &[u8]) -> bool {
    if zone.len() > qname.len() {
        return false;
    }
    let mut p = 0;
    loop {
        if qname.len() - p == zone.len() {
            return &qname[p..] == zone;
        }
        let l = qname[p] as usize;
        if l == 0 {
            return false;
        }
        p += 1 + l;
        if p > qname.len() {
            return false;
        }
    }
}

/// An uncacheable upstream reply as a recursive service passes it on
/// ([`wire::relay`]); TC=1 when it does not fit the client.
fn relay(resp: &[u8], raw: &[u8], q: &Query, max: usize) -> Vec<u8> {
    match wire::relay(resp, raw, q) {
        Some(out) if out.len() <= max => out,
        Some(_) => wire::error_reply(raw, Some(q), wire::rcode(resp), true).unwrap_or_default(),
        None => wire::error_reply(raw, Some(q), RCODE_SERVFAIL, false).unwrap_or_default(),
    }
}

/// CoreDNS `whoami`: no answers; in the additional section the client's
/// address (A or AAAA) and `_<proto>.<qname>` SRV with its port, TTL 0.
/// Flags and OPT as every reply of ours (RA=1, RD and CD from the query).
fn whoami(raw: &[u8], q: &Query, client: SocketAddr, tr: Transport) -> Vec<u8> {
    let mut m = Vec::with_capacity(q.question_end + 80);
    m.extend_from_slice(&raw[..2]);
    m.extend_from_slice(&wire::reply_flags(wire::F_QR | wire::F_RA, q.flags, false).to_be_bytes());
    let extra: u16 = 2 + u16::from(q.edns.is_some());
    m.extend_from_slice(&[0, 1, 0, 0, 0, 0]);
    m.extend_from_slice(&extra.to_be_bytes());
    m.extend_from_slice(&raw[HEADER_LEN..q.question_end]);
    let class = q.qclass.to_be_bytes();
    // The address record, owned by the question name (pointer to 12).
    m.extend_from_slice(&[0xc0, 0x0c]);
    match client.ip() {
        std::net::IpAddr::V4(a) => {
            m.extend_from_slice(&[0, 1, class[0], class[1], 0, 0, 0, 0, 0, 4]);
            m.extend_from_slice(&a.octets());
        }
        std::net::IpAddr::V6(a) => {
            m.extend_from_slice(&[0, 28, class[0], class[1], 0, 0, 0, 0, 0, 16]);
            m.extend_from_slice(&a.octets());
        }
    }
    // _udp.<qname> SRV 0 0 <port> .
    let proto = tr.proto().as_str();
    m.push(1 + proto.len() as u8);
    m.push(b'_');
    m.extend_from_slice(proto.as_bytes());
    m.extend_from_slice(&[
        0xc0, 0x0c, 0, 33, class[0], class[1], 0, 0, 0, 0, 0, 7, 0, 0, 0, 0,
    ]);
    m.extend_from_slice(&client.port().to_be_bytes());
    m.push(0);
    if let Some(e) = q.edns {
        m.extend_from_slice(&wire::our_opt(e.do_bit, 0));
    }
    m
}

/// Logs a daemon-answered query (queryLogging `Log`) in CoreDNS's format.
fn log_query(client: SocketAddr, tr: Transport, raw: &[u8], q: &Query, reply: &[u8], secs: f64) {
    querylog::emit(
        querylog::QueryLine {
            client,
            proto: tr.proto(),
            id: q.id,
            qtype: q.qtype,
            qclass: q.qclass,
            qname: q.qname.clone(),
            size: raw.len(),
            do_bit: q.edns.is_some_and(|e| e.do_bit),
            edns_size: q.edns.map(|e| e.udp_size),
            rflags: (reply.len() >= HEADER_LEN).then(|| wire::be16(reply, 2)),
            rsize: reply.len(),
            secs,
        }
        .format(),
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use localdns_common::VIEW_VNET;

    fn entry(qname: &[u8]) -> Arc<Entry> {
        Arc::new(Entry {
            qname: qname.to_vec(),
            flags: 0x8180,
            counts: [1, 0, 0, 0],
            tail: vec![],
            ttl_offsets: vec![],
            ttl: 60,
            insert_ns: mono_ns(),
            expire_ns: mono_ns() + 60_000_000_000,
            stale_until_ns: mono_ns() + 60_000_000_000,
            rcode: 0,
            kernel_put: Default::default(),
        })
    }

    fn key(view: u8, qname: &[u8]) -> Key {
        Key {
            view,
            flags: 0,
            qtype: 1,
            qclass: 1,
            qname: qname.into(),
        }
    }

    #[test]
    fn reload_keeps_the_cache_of_unchanged_zones() {
        let before = crate::config::parse(crate::config::DEFAULT_CONFIG)
            .unwrap()
            .config;
        let cap = Capacity {
            success: 1000,
            denial: 1000,
        };
        let r = Resolver::new(&before, &[], &[], None, cap);
        let www = b"\x03www\x07example\x04test\x00".as_slice();
        let svc = b"\x03svc\x07cluster\x05local\x00".as_slice();
        for (view, name) in [
            (VIEW_VNET, www),
            (VIEW_KUBE, www),
            (VIEW_KUBE, svc),
            (VIEW_VNET, svc),
        ] {
            r.cache.insert(key(view, name), entry(name));
        }
        // Same file again: nothing dropped.
        assert_eq!(r.reload(&before), 0);
        // Change cluster.local of the kube view only.
        let d = crate::config::DEFAULT_CONFIG;
        let pat = "\"cacheDurationInSeconds\": 3600";
        let i = d.rfind(pat).unwrap(); // the last block: kube cluster.local
        let text = format!(
            "{}\"cacheDurationInSeconds\": 30{}",
            &d[..i],
            &d[i + pat.len()..]
        );
        let after = crate::config::parse(&text).unwrap().config;
        assert_eq!(r.reload(&after), 1);
        assert!(r.cache.get(&key(VIEW_KUBE, svc)).is_none());
        for (view, name) in [(VIEW_VNET, www), (VIEW_KUBE, www), (VIEW_VNET, svc)] {
            assert!(r.cache.get(&key(view, name)).is_some());
        }
    }

    #[test]
    fn a_prefetch_report_names_the_reported_key() {
        use crate::wire::testmsg::query;
        for (edns, cd) in [
            (None, false),
            (Some((1232, false)), true),
            (Some((512, true)), false),
        ] {
            let mut raw = query("WwW.Example.test", 28, edns);
            if cd {
                raw[3] |= 0x10;
            }
            let q = wire::parse_query(&raw).unwrap();
            let want = Key::of(VIEW_KUBE, &q);
            let again = query_for_key(&q.qname, q.qtype, q.qclass, q.key_flags()).expect("a query");
            assert_eq!(Key::of(VIEW_KUBE, &again), want, "{edns:?} cd={cd}");
        }
    }

    #[test]
    fn subdomain_on_label_boundaries() {
        let cl = b"\x07cluster\x05local\x00";
        assert!(is_subdomain(b"\x03svc\x07cluster\x05local\x00", cl));
        assert!(is_subdomain(cl, cl));
        assert!(!is_subdomain(b"\x08xcluster\x05local\x00", cl));
        assert!(is_subdomain(b"\x01a\x00", b"\x00"));
        assert!(!is_subdomain(b"\x05local\x00", cl));
    }
}
