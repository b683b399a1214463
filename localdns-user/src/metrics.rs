//! Prometheus metrics with CoreDNS's names and labels (prometheus-client),
//! so AKS LocalDNS dashboards keep working, plus `localdns_*` for what
//! CoreDNS does not have. Queries the kernel answered are counted in the
//! request, response, duration and cache-hit metrics too: the program
//! counts each hit under the stat slot the daemon gave the entry (zone,
//! type, kind of answer) and address family; every scrape adds what the
//! kernel counted since the previous one.
//!
//! Served with `/health` (liveness) and `/ready` (readiness) by axum.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use localdns_common::{MAX_STAT_SLOTS, VIEW_KUBE};
use prometheus_client::encoding::{EncodeLabelSet, EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;

use crate::querylog;

/// Upper bounds of CoreDNS's duration buckets: 0.25 ms doubling 16 times.
fn duration_bounds() -> impl Iterator<Item = f64> {
    (0..16).map(|i| 0.00025 * f64::from(1u32 << i))
}

/// Query types CoreDNS reports by name; others are "other".
const MONITORED_TYPES: [u16; 19] = [
    28, 1, 5, 48, 43, 15, 50, 47, 2, 12, 46, 6, 33, 16, 65, 64, 251, 252, 255,
];

/// The `type` label of a query type, as CoreDNS's `qTypeString`.
pub fn type_label(qtype: u16) -> &'static str {
    static NAMES: LazyLock<HashMap<u16, &'static str>> = LazyLock::new(|| {
        MONITORED_TYPES
            .iter()
            .map(|t| (*t, &*Box::leak(querylog::type_name(*t).into_boxed_str())))
            .collect()
    });
    NAMES.get(&qtype).copied().unwrap_or("other")
}

/// The `rcode` label (miekg/dns names).
pub fn rcode_label(rcode: u16) -> &'static str {
    static NAMES: LazyLock<Vec<&'static str>> = LazyLock::new(|| {
        (0..24)
            .map(|r| &*Box::leak(querylog::rcode_name(r).into_boxed_str()))
            .collect()
    });
    NAMES.get(usize::from(rcode)).copied().unwrap_or("OTHER")
}

/// A string label value that lives as long as the process (zone names,
/// listener addresses, upstreams: a bounded set).
pub fn intern(s: &str) -> &'static str {
    static SEEN: LazyLock<Mutex<HashMap<String, &'static str>>> = LazyLock::new(Default::default);
    let mut seen = SEEN.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(v) = seen.get(s) {
        return v;
    }
    let v: &'static str = Box::leak(s.to_string().into_boxed_str());
    seen.insert(s.to_string(), v);
    v
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub server: &'static str,
    pub zone: &'static str,
    pub view: &'static str,
    pub proto: &'static str,
    pub family: &'static str,
    pub r#type: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResponseLabels {
    pub server: &'static str,
    pub zone: &'static str,
    pub view: &'static str,
    pub rcode: &'static str,
    pub plugin: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DurationLabels {
    pub server: &'static str,
    pub zone: &'static str,
    pub view: &'static str,
    pub r#type: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CacheLabels {
    pub server: &'static str,
    pub r#type: &'static str,
    pub zones: &'static str,
    pub view: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CacheZoneLabels {
    pub server: &'static str,
    pub zones: &'static str,
    pub view: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ViewZoneLabels {
    pub view: &'static str,
    pub zone: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ToLabels {
    pub to: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ToRcodeLabels {
    pub to: &'static str,
    pub rcode: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProxyLabels {
    pub proxy_name: &'static str,
    pub to: &'static str,
    pub rcode: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub r#type: &'static str,
}

/// `class`: the kernel cache map's size class, `small` or `big`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClassLabels {
    pub class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabels {
    pub version: &'static str,
    pub revision: &'static str,
    pub goversion: &'static str,
}

/// CoreDNS's request-duration histogram, plus answers the kernel gave:
/// those count in the lowest bucket and add nothing to the sum (their cost
/// is a fraction of a microsecond, not measured per packet).
#[derive(Debug)]
pub struct Latency {
    bounds: Vec<f64>,
    buckets: Vec<AtomicU64>,
    count: AtomicU64,
    sum_ns: AtomicU64,
}

impl Default for Latency {
    fn default() -> Self {
        let bounds: Vec<f64> = duration_bounds().collect();
        Latency {
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            bounds,
            count: AtomicU64::new(0),
            sum_ns: AtomicU64::new(0),
        }
    }
}

impl Latency {
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = self
            .bounds
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(self.bounds.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_ns
            .fetch_add(d.as_nanos() as u64, Ordering::Relaxed);
    }

    /// `n` answers from the kernel.
    pub fn add_kernel(&self, n: u64) {
        self.buckets[0].fetch_add(n, Ordering::Relaxed);
        self.count.fetch_add(n, Ordering::Relaxed);
    }
}

impl TypedMetric for Latency {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for Latency {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let buckets: Vec<(f64, u64)> = self
            .bounds
            .iter()
            .copied()
            .chain([f64::INFINITY])
            .zip(self.buckets.iter().map(|b| b.load(Ordering::Relaxed)))
            .collect();
        encoder.encode_histogram::<NoLabelSet>(
            self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9,
            self.count.load(Ordering::Relaxed),
            &buckets,
            None,
        )
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

fn histogram() -> Histogram {
    Histogram::new(duration_bounds())
}

/// What a kernel stat slot stands for (see [`Metrics::slot`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SlotKey {
    pub view: u8,
    pub zone: &'static str,
    pub qtype: &'static str,
    /// 0 answer, 1 NODATA, 2 NXDOMAIN.
    pub kind: u8,
}

impl SlotKey {
    fn rcode(&self) -> &'static str {
        if self.kind == 2 {
            "NXDOMAIN"
        } else {
            "NOERROR"
        }
    }

    fn cache_type(&self) -> &'static str {
        if self.kind == 0 { "success" } else { "denial" }
    }
}

/// Every metric the daemon reports.
pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub responses: Family<ResponseLabels, Counter>,
    pub duration: Family<DurationLabels, Latency>,
    pub cache_hits: Family<CacheLabels, Counter>,
    pub cache_misses: Family<CacheZoneLabels, Counter>,
    pub cache_requests: Family<CacheZoneLabels, Counter>,
    pub cache_stale: Family<CacheZoneLabels, Counter>,
    pub cache_prefetch: Family<CacheZoneLabels, Counter>,
    pub cache_entries: Family<KindLabels, Gauge>,
    pub cache_evictions: Counter,
    pub fwd_requests: Family<ToLabels, Counter>,
    pub fwd_responses: Family<ToRcodeLabels, Counter>,
    pub fwd_duration: Family<ToRcodeLabels, Histogram>,
    pub proxy_duration: Family<ProxyLabels, Histogram>,
    pub fwd_health_failures: Family<ToLabels, Counter>,
    pub fwd_health_broken: Counter,
    pub fwd_max_concurrent_rejects: Counter,
    pub malformed_replies: Counter,
    pub loops: Counter,
    pub looping: Family<ViewZoneLabels, Gauge>,
    pub kernel_packets: Family<ResultLabels, Counter>,
    pub kernel_entries: Family<ClassLabels, Gauge>,
    pub kernel_up: Gauge,
    pub log_dropped: Counter,
    pub tcp_refused: Counter,
    /// Stat slots handed out, and the kernel counts already reported.
    slots: Mutex<Slots>,
    /// The `server` label per (view, IPv6?): `dns://<listener>:53`.
    servers: Mutex<[[&'static str; 2]; 2]>,
}

#[derive(Default)]
struct Slots {
    by_key: HashMap<SlotKey, u16>,
    keys: Vec<SlotKey>,
    /// Per slot and family: what the kernel had counted at the last sync.
    seen: Vec<u64>,
    /// Per pass reason: the same.
    seen_packets: HashMap<&'static str, u64>,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// The process's metrics.
pub fn metrics() -> &'static Metrics {
    &METRICS
}

impl Metrics {
    fn new() -> Metrics {
        let mut registry = Registry::default();
        let m = Metrics {
            requests: Family::default(),
            responses: Family::default(),
            duration: Family::default(),
            cache_hits: Family::default(),
            cache_misses: Family::default(),
            cache_requests: Family::default(),
            cache_stale: Family::default(),
            cache_prefetch: Family::default(),
            cache_entries: Family::default(),
            cache_evictions: Counter::default(),
            fwd_requests: Family::default(),
            fwd_responses: Family::default(),
            fwd_duration: Family::new_with_constructor(histogram),
            proxy_duration: Family::new_with_constructor(histogram),
            fwd_health_failures: Family::default(),
            fwd_health_broken: Counter::default(),
            fwd_max_concurrent_rejects: Counter::default(),
            malformed_replies: Counter::default(),
            loops: Counter::default(),
            looping: Family::default(),
            kernel_packets: Family::default(),
            kernel_entries: Family::default(),
            kernel_up: Gauge::default(),
            log_dropped: Counter::default(),
            tcp_refused: Counter::default(),
            slots: Mutex::new(Slots {
                keys: vec![SlotKey {
                    view: 0,
                    zone: ".",
                    qtype: "other",
                    kind: 0,
                }],
                seen: vec![0; 2 * MAX_STAT_SLOTS as usize],
                ..Default::default()
            }),
            servers: Mutex::new([["dns://:53"; 2]; 2]),
            registry: Registry::default(),
        };
        let r = &mut registry;
        r.register(
            "coredns_dns_requests",
            "Counter of DNS requests made per zone, protocol and family.",
            m.requests.clone(),
        );
        r.register(
            "coredns_dns_responses",
            "Counter of response status codes.",
            m.responses.clone(),
        );
        r.register(
            "coredns_dns_request_duration_seconds",
            "Histogram of the time (in seconds) each request took per zone.",
            m.duration.clone(),
        );
        r.register(
            "coredns_cache_hits",
            "The count of cache hits.",
            m.cache_hits.clone(),
        );
        r.register(
            "coredns_cache_misses",
            "The count of cache misses. Deprecated, derive misses from cache hits/requests counters.",
            m.cache_misses.clone(),
        );
        r.register(
            "coredns_cache_requests",
            "The count of cache requests.",
            m.cache_requests.clone(),
        );
        r.register(
            "coredns_cache_served_stale",
            "The number of requests served from stale cache entries.",
            m.cache_stale.clone(),
        );
        r.register(
            "coredns_cache_prefetch",
            "The number of times the cache has prefetched a cached item.",
            m.cache_prefetch.clone(),
        );
        r.register(
            "coredns_cache_entries",
            "The number of elements in the cache.",
            m.cache_entries.clone(),
        );
        r.register(
            "coredns_cache_evictions",
            "The count of cache evictions.",
            m.cache_evictions.clone(),
        );
        r.register(
            "coredns_forward_requests",
            "Counter of requests made per upstream.",
            m.fwd_requests.clone(),
        );
        r.register(
            "coredns_forward_responses",
            "Counter of responses received per upstream.",
            m.fwd_responses.clone(),
        );
        r.register(
            "coredns_forward_request_duration_seconds",
            "Histogram of the time each request took.",
            m.fwd_duration.clone(),
        );
        r.register(
            "coredns_proxy_request_duration_seconds",
            "Histogram of the time each request took.",
            m.proxy_duration.clone(),
        );
        r.register(
            "coredns_forward_healthcheck_failures",
            "Counter of the number of failed healthchecks.",
            m.fwd_health_failures.clone(),
        );
        r.register(
            "coredns_forward_healthcheck_broken",
            "Counter of the number of complete failures of the healthchecks.",
            m.fwd_health_broken.clone(),
        );
        r.register(
            "coredns_forward_max_concurrent_rejects",
            "Counter of the number of queries rejected because the concurrent queries were at maximum.",
            m.fwd_max_concurrent_rejects.clone(),
        );
        let build = Family::<BuildLabels, Gauge>::default();
        build
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
                revision: "",
                goversion: "",
            })
            .set(1);
        r.register(
            "coredns_build_info",
            "A metric with a constant '1' value labeled by version, revision, and goversion from which CoreDNS was built.",
            build,
        );
        r.register(
            "localdns_upstream_malformed_replies",
            "Upstream replies that did not decode (answered SERVFAIL, never relayed or cached).",
            m.malformed_replies.clone(),
        );
        r.register(
            "localdns_loops_detected",
            "Queries recognised as our own forwarded queries coming back (answered SERVFAIL).",
            m.loops.clone(),
        );
        r.register(
            "localdns_forward_loop",
            "1 while the zone's upstreams send our loop probe back (its misses get SERVFAIL without forwarding).",
            m.looping.clone(),
        );
        r.register(
            "localdns_kernel_packets",
            "Packets the kernel program saw, by what it did: hit, truncated (TC=1 reply), or why it passed or dropped.",
            m.kernel_packets.clone(),
        );
        r.register(
            "localdns_kernel_cache_entries",
            "Entries in the kernel cache maps, by size class (small: LDNS_CACHE, big: LDNS_CACHE_BIG).",
            m.kernel_entries.clone(),
        );
        r.register(
            "localdns_kernel_fastpath_up",
            "1 when the kernel fast path is loaded and attached.",
            m.kernel_up.clone(),
        );
        r.register(
            "localdns_querylog_dropped",
            "Query-log lines dropped because stdout fell behind.",
            m.log_dropped.clone(),
        );
        r.register(
            "localdns_tcp_connections_refused",
            "Client TCP connections closed at accept (per-client or total bound).",
            m.tcp_refused.clone(),
        );
        Metrics { registry, ..m }
    }

    /// Whether `zone` of `view` forwards in a loop.
    pub fn set_loop(&self, view: u8, zone: &'static str, looping: bool) {
        self.looping
            .get_or_create(&ViewZoneLabels {
                view: view_label(view),
                zone,
            })
            .set(i64::from(looping));
    }

    /// Sets the `server` labels from the listener addresses (the first of
    /// each view and family).
    pub fn set_servers(&self, listen: &[(IpAddr, u8)]) {
        let mut s = self.servers.lock().unwrap_or_else(|p| p.into_inner());
        for (ip, view) in listen.iter().rev() {
            let label = intern(&format!("dns://{}", SocketAddr::new(*ip, 53)));
            s[usize::from(*view == VIEW_KUBE)][usize::from(ip.is_ipv6())] = label;
        }
    }

    pub fn server(&self, view: u8, v6: bool) -> &'static str {
        self.servers.lock().unwrap_or_else(|p| p.into_inner())[usize::from(view == VIEW_KUBE)]
            [usize::from(v6)]
    }

    /// The kernel stat slot of entries of `key`: handed out on first use,
    /// kept for the process's life; 0 ("other" in ".") once all are taken.
    pub fn slot(&self, key: SlotKey) -> u16 {
        let mut s = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = s.by_key.get(&key) {
            return *i;
        }
        if s.keys.len() >= MAX_STAT_SLOTS as usize {
            return 0;
        }
        let i = s.keys.len() as u16;
        s.keys.push(key);
        s.by_key.insert(key, i);
        i
    }

    /// Adds what the kernel counted since the last call: `zone` holds the
    /// per-slot counts (slot * 2 + IPv6?), `packets` the program's counters
    /// by name. The first call only takes the starting point (counters in
    /// pinned maps outlive a daemon).
    pub fn sync_kernel(&self, zone: &[u64], packets: &[(&'static str, u64)], first: bool) {
        let mut s = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        for (i, now) in zone.iter().enumerate() {
            let Some(seen) = s.seen.get_mut(i) else {
                break;
            };
            let d = now.saturating_sub(*seen);
            *seen = *now;
            if d == 0 || first {
                continue;
            }
            let Some(k) = s.keys.get(i / 2).copied() else {
                continue;
            };
            let v6 = i % 2 == 1;
            self.count_kernel(&k, v6, d);
        }
        for (name, now) in packets {
            let seen = s.seen_packets.entry(name).or_insert(0);
            let d = now.saturating_sub(*seen);
            *seen = *now;
            if d > 0 && !first {
                self.kernel_packets
                    .get_or_create(&ResultLabels { result: name })
                    .inc_by(d);
            }
        }
    }

    fn count_kernel(&self, k: &SlotKey, v6: bool, n: u64) {
        let server = self.server(k.view, v6);
        let view = view_label(k.view);
        self.requests
            .get_or_create(&RequestLabels {
                server,
                zone: k.zone,
                view,
                proto: "udp",
                family: if v6 { "2" } else { "1" },
                r#type: k.qtype,
            })
            .inc_by(n);
        self.responses
            .get_or_create(&ResponseLabels {
                server,
                zone: k.zone,
                view,
                rcode: k.rcode(),
                plugin: "cache",
            })
            .inc_by(n);
        self.duration
            .get_or_create(&DurationLabels {
                server,
                zone: k.zone,
                view,
                r#type: k.qtype,
            })
            .add_kernel(n);
        let z = CacheZoneLabels {
            server,
            zones: k.zone,
            view,
        };
        self.cache_requests.get_or_create(&z).inc_by(n);
        self.cache_hits
            .get_or_create(&CacheLabels {
                server,
                r#type: k.cache_type(),
                zones: k.zone,
                view,
            })
            .inc_by(n);
    }

    /// The exposition text (OpenMetrics, which Prometheus scrapes).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

pub fn view_label(view: u8) -> &'static str {
    if view == VIEW_KUBE { "kube" } else { "vnet" }
}

/// One answered query, as the daemon reports it.
pub struct Answered<'a> {
    pub view: u8,
    pub zone: &'static str,
    pub client: &'a SocketAddr,
    pub proto: querylog::Proto,
    pub qtype: u16,
    pub rcode: u16,
    /// Which part answered: "cache", "forward", "whoami", "template", ...
    pub plugin: &'static str,
    pub took: Duration,
}

impl Metrics {
    pub fn answered(&self, a: &Answered<'_>) {
        let v6 = a.client.is_ipv6();
        let server = self.server(a.view, v6);
        let view = view_label(a.view);
        let t = type_label(a.qtype);
        self.requests
            .get_or_create(&RequestLabels {
                server,
                zone: a.zone,
                view,
                proto: a.proto.as_str(),
                family: if v6 { "2" } else { "1" },
                r#type: t,
            })
            .inc();
        self.responses
            .get_or_create(&ResponseLabels {
                server,
                zone: a.zone,
                view,
                rcode: rcode_label(a.rcode),
                plugin: a.plugin,
            })
            .inc();
        self.duration
            .get_or_create(&DurationLabels {
                server,
                zone: a.zone,
                view,
                r#type: t,
            })
            .observe(a.took);
    }

    /// A cache lookup: `hit` of kind `denial`, or a miss.
    pub fn cache_lookup(&self, view: u8, v6: bool, zone: &'static str, hit: Option<bool>) {
        let server = self.server(view, v6);
        let z = CacheZoneLabels {
            server,
            zones: zone,
            view: view_label(view),
        };
        self.cache_requests.get_or_create(&z).inc();
        match hit {
            Some(denial) => {
                self.cache_hits
                    .get_or_create(&CacheLabels {
                        server,
                        r#type: if denial { "denial" } else { "success" },
                        zones: zone,
                        view: view_label(view),
                    })
                    .inc();
            }
            None => {
                self.cache_misses.get_or_create(&z).inc();
            }
        }
    }

    pub fn stale(&self, view: u8, v6: bool, zone: &'static str) {
        self.cache_stale
            .get_or_create(&CacheZoneLabels {
                server: self.server(view, v6),
                zones: zone,
                view: view_label(view),
            })
            .inc();
    }

    pub fn prefetch(&self, view: u8, zone: &'static str) {
        self.cache_prefetch
            .get_or_create(&CacheZoneLabels {
                server: self.server(view, false),
                zones: zone,
                view: view_label(view),
            })
            .inc();
    }

    /// One upstream exchange.
    pub fn forwarded(&self, to: &'static str, rcode: Option<u16>, took: Duration) {
        self.fwd_requests.get_or_create(&ToLabels { to }).inc();
        let Some(rcode) = rcode else {
            return;
        };
        let rcode = rcode_label(rcode);
        self.fwd_responses
            .get_or_create(&ToRcodeLabels { to, rcode })
            .inc();
        let secs = took.as_secs_f64();
        self.fwd_duration
            .get_or_create(&ToRcodeLabels { to, rcode })
            .observe(secs);
        self.proxy_duration
            .get_or_create(&ProxyLabels {
                proxy_name: "forward",
                to,
                rcode,
            })
            .observe(secs);
    }
}

/// Process readiness and liveness, for `/ready` and `/health`.
#[derive(Default)]
pub struct Health {
    /// Listeners bound and the fast path (if any) up.
    pub started: AtomicBool,
    /// Set on stop: not ready any more (a successor takes over).
    pub stopping: AtomicBool,
}

/// What `/ready` needs to know besides [`Health`]: whether every view has
/// an upstream that is not marked down.
pub type ViewsHealthy = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

/// Refreshes scrape-time values (cache sizes, kernel counts) then encodes.
pub type Refresh = Arc<dyn Fn() + Send + Sync>;

/// The HTTP endpoints: `/metrics`, `/health`, `/ready`.
pub fn router(health: Arc<Health>, views_ok: ViewsHealthy, refresh: Refresh) -> axum::Router {
    use axum::http::{StatusCode, header};
    use axum::routing::get;
    let h2 = health.clone();
    axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let refresh = refresh.clone();
                async move {
                    refresh();
                    (
                        [(
                            header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        metrics().encode(),
                    )
                }
            }),
        )
        .route(
            "/health",
            get(move || {
                let h = health.clone();
                async move {
                    if h.started.load(Ordering::Relaxed) || !h.stopping.load(Ordering::Relaxed) {
                        (StatusCode::OK, "OK".to_string())
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, "stopping".to_string())
                    }
                }
            }),
        )
        .route(
            "/ready",
            get(move || {
                let (h, views_ok) = (h2.clone(), views_ok.clone());
                async move {
                    if h.stopping.load(Ordering::Relaxed) {
                        return (StatusCode::SERVICE_UNAVAILABLE, "stopping".to_string());
                    }
                    if !h.started.load(Ordering::Relaxed) {
                        return (StatusCode::SERVICE_UNAVAILABLE, "starting".to_string());
                    }
                    match views_ok() {
                        Ok(()) => (StatusCode::OK, "OK".to_string()),
                        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, why),
                    }
                }
            }),
        )
}

/// Serves `router` on `addr` until the task is aborted. The socket has
/// SO_REUSEPORT, like the DNS listeners: during a hand-over the successor
/// binds the same probe and metrics ports while its predecessor drains
/// (a DaemonSet's readiness probe must reach the new pod).
pub async fn serve(addr: SocketAddr, router: axum::Router) -> std::io::Result<()> {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    s.set_nonblocking(true)?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    // The health address may be a listener address not yet routable here.
    let _ = s.set_freebind_v4(true);
    s.bind(&addr.into())?;
    s.listen(1024)?;
    let l = tokio::net::TcpListener::from_std(std::net::TcpListener::from(s))?;
    axum::serve(l, router).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_follow_coredns() {
        assert_eq!(type_label(1), "A");
        assert_eq!(type_label(65), "HTTPS");
        assert_eq!(type_label(99), "other");
        assert_eq!(rcode_label(3), "NXDOMAIN");
    }

    #[test]
    fn kernel_counts_land_in_the_coredns_totals() {
        let m = Metrics::new();
        m.set_servers(&[("169.254.10.10".parse().unwrap(), 0)]);
        let k = SlotKey {
            view: 0,
            zone: "example.test.",
            qtype: "A",
            kind: 0,
        };
        let slot = usize::from(m.slot(k));
        let mut zone = vec![0u64; 2 * MAX_STAT_SLOTS as usize];
        zone[slot * 2] = 7;
        // The starting point is not reported (a pinned map's old counts).
        m.sync_kernel(&zone, &[("hit", 7)], true);
        zone[slot * 2] = 12;
        m.sync_kernel(&zone, &[("hit", 12)], false);
        let text = m.encode();
        let line = |prefix: &str| {
            text.lines()
                .find(|l| l.starts_with(prefix))
                .unwrap_or_else(|| panic!("no {prefix} in\n{text}"))
                .to_string()
        };
        assert!(
            line("coredns_dns_requests_total{").ends_with(" 5"),
            "{text}"
        );
        assert!(line("coredns_dns_requests_total{").contains("zone=\"example.test.\""));
        assert!(line("coredns_dns_requests_total{").contains("server=\"dns://169.254.10.10:53\""));
        assert!(line("coredns_cache_hits_total{").contains("type=\"success\""));
        assert!(line("coredns_dns_request_duration_seconds_count{").ends_with(" 5"));
        assert!(line("localdns_kernel_packets_total{result=\"hit\"}").ends_with(" 5"));
    }
}
