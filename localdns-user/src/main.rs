//! `localdns-user`: the localdns daemon and its CLI.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use localdns_common::{KEY_F_CD, KEY_F_DO, KEY_F_EDNS, VIEW_KUBE, VIEW_VNET};
use localdns_user::addrs;
use localdns_user::cache::{Capacity, mono_ns};
use localdns_user::config::{self, Mode};
use localdns_user::corefile;
use localdns_user::fastpath::attach::Change;
use localdns_user::fastpath::pins::PinDir;
use localdns_user::fastpath::{self, AttachMode, Fastpath, Origin};
use localdns_user::ifaces::{self, Patterns};
use localdns_user::listen::{self, Ctx, InFlight};
use localdns_user::loopdetect;
use localdns_user::metrics::{self, Health};
use localdns_user::notrack;
use localdns_user::querylog::{self, type_name};
use localdns_user::resolvconf;
use localdns_user::resolver::Resolver;
use localdns_user::service;
use localdns_user::synth;
use localdns_user::wire::name_to_text;
use tokio::signal::unix::{SignalKind, signal};

#[derive(Parser)]
#[command(
    version,
    about = "Node-local DNS cache with an in-kernel (XDP/TC) fast path, configured by AKS localdnsconfig.json"
)]
#[command(args_conflicts_with_subcommands = true, args_override_self = true)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the daemon (the default).
    #[command(args_override_self = true)]
    Run(RunArgs),
    /// Validate a localdnsconfig.json: exit 0 when the daemon would start.
    CheckConfig { file: PathBuf },
    /// Print the CoreDNS Corefile the same config means (as AKS generates it).
    RenderCorefile {
        file: PathBuf,
        #[arg(long, default_value = "169.254.10.10")]
        vnet_listen: String,
        #[arg(long, default_value = "169.254.10.11")]
        kube_listen: String,
        /// Forward target of VnetDNS zones (Azure's DNS, as AKS renders it).
        #[arg(long, default_value = "168.63.129.16")]
        vnet_dns: String,
        /// Forward target of ClusterCoreDNS zones.
        #[arg(long, default_value = "10.0.0.10")]
        cluster_dns: String,
        /// A hosts file served before forwarding in the `.` blocks.
        #[arg(long)]
        hosts_file: Option<String>,
        #[arg(long, default_value_t = 9984)]
        cache_success: usize,
        #[arg(long, default_value_t = 9984)]
        cache_denial: usize,
    },
    /// Remove everything any earlier run left in the kernel: links (the
    /// fast path on every interface), programs, pinned maps, the listener
    /// addresses and the `localdns` device. Stop the daemon first.
    Teardown {
        #[arg(long, default_value = "/sys/fs/bpf/localdns")]
        pin_path: PathBuf,
        /// IPv6 listener addresses to remove from `lo` (IPv4 ones carry a
        /// label and are found without this).
        #[arg(long = "listen6")]
        listen6: Vec<std::net::Ipv6Addr>,
    },
    /// Do nothing until SIGTERM or SIGINT (keeps the pod of the teardown
    /// DaemonSet running once its init container has torn down).
    Pause,
    /// Inspect the running instance's pinned kernel maps.
    Cache {
        #[command(subcommand)]
        op: CacheOp,
        #[arg(long, global = true, default_value = "/sys/fs/bpf/localdns")]
        pin_path: PathBuf,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum FastpathMode {
    Auto,
    Required,
    Off,
}

#[derive(Subcommand, Clone, Copy)]
enum CacheOp {
    /// Kernel counters and the number of kernel cache entries.
    Stats,
    /// Every kernel cache entry.
    Dump,
    /// Delete every kernel cache entry.
    Flush,
}

#[derive(Args, Clone)]
struct RunArgs {
    /// localdnsconfig.json; without it, the AKS document's sample profile.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Ingress interface for the fast path (repeatable; globs like 'veth*').
    /// `lo` is always covered unless --no-fastpath.
    #[arg(long = "iface")]
    ifaces: Vec<String>,
    #[arg(long, value_enum, default_value = "auto")]
    attach_mode: AttachMode,
    /// VnetDNS upstream IP[:PORT] (repeatable); default: resolv.conf nameservers.
    #[arg(long = "vnet-dns")]
    vnet_dns: Vec<String>,
    /// ClusterCoreDNS upstream IP[:PORT] (repeatable).
    #[arg(long = "cluster-dns", default_values_t = vec!["10.0.0.10".to_string()])]
    cluster_dns: Vec<String>,
    /// Listener address of the vnet view (repeatable, IPv4 or IPv6).
    #[arg(long = "vnet-listen", default_values_t = vec![IpAddr::V4(Ipv4Addr::new(169, 254, 10, 10))])]
    vnet_listen: Vec<IpAddr>,
    /// Listener address of the kube view (repeatable, IPv4 or IPv6).
    #[arg(long = "kube-listen", default_values_t = vec![IpAddr::V4(Ipv4Addr::new(169, 254, 10, 11))])]
    kube_listen: Vec<IpAddr>,
    /// Prometheus metrics address ("none" to disable).
    #[arg(long, default_value = ":9253")]
    metrics: String,
    /// /health and /ready address, repeatable ("none" to disable); AKS
    /// probes 169.254.10.10:8181/ready.
    #[arg(long, default_values_t = vec!["169.254.10.10:8181".to_string(), "169.254.10.11:8181".to_string()])]
    health: Vec<String>,
    #[arg(long, default_value = "/sys/fs/bpf/localdns")]
    pin_path: PathBuf,
    /// The kernel fast path: `auto` runs userspace-only (with an error line
    /// and `localdns_kernel_fastpath_up 0`) when the program cannot load;
    /// `required` makes that fatal; `off` never loads it.
    #[arg(long, value_enum, default_value = "auto")]
    fastpath: FastpathMode,
    /// Same as `--fastpath off` (userspace only, for comparison).
    #[arg(long)]
    no_fastpath: bool,
    /// TCP client connections open at once, over all listeners; more are
    /// closed at accept.
    #[arg(long, default_value_t = 1024)]
    tcp_max_conns: usize,
    /// TCP connections one client address (a pod) may hold open at once.
    #[arg(long, default_value_t = 16)]
    tcp_max_conns_per_client: usize,
    /// Seconds a TCP client connection may stay idle before it is closed.
    #[arg(long, default_value_t = 10.0)]
    tcp_idle_timeout: f64,
    /// Capacity of the kernel cache (preallocated, charged to the daemon's
    /// memory cgroup): twice this many 256-byte slots for small entries
    /// (a power of two) plus a quarter as many big ones (1.7 KiB each).
    #[arg(long, default_value_t = localdns_common::CACHE_MAP_ENTRIES)]
    fastpath_entries: u32,
    /// Userspace cache capacity for answers (CoreDNS `success`), in entries
    /// of up to 1 KiB (larger answers count as several).
    #[arg(long, default_value_t = 30_000)]
    cache_success: usize,
    /// Userspace cache capacity for NXDOMAIN/NODATA answers (CoreDNS
    /// `denial`).
    #[arg(long, default_value_t = 10_000)]
    cache_denial: usize,
    /// A hosts file answered in the `.` zones of both views before
    /// forwarding (AKS: /etc/localdns/hosts; CoreDNS `hosts` with ttl 5,
    /// reload 5s, fallthrough). A missing file is picked up when it appears.
    #[arg(long)]
    hosts_file: Option<PathBuf>,
    /// Prefetch (CoreDNS `prefetch`): an entry the kernel answers this many
    /// times in the last --prefetch-percent of its TTL is refreshed before
    /// it expires, so hot names never leave the kernel. 0 disables.
    #[arg(long, default_value_t = 2)]
    prefetch_amount: u16,
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u8).range(1..=99))]
    prefetch_percent: u8,
    /// Seconds between loop probes (CoreDNS `loop`: a random name sent to
    /// each forwarded zone's upstreams; coming back means a loop).
    #[arg(long, default_value_t = loopdetect::REPROBE.as_secs_f64())]
    loop_probe_interval: f64,
    /// Do not install the NOTRACK rules (nftables table `inet localdns`).
    #[arg(long)]
    no_notrack: bool,
    /// Log as JSON lines.
    #[arg(long)]
    log_json: bool,
}

/// How often the cache is swept of entries past their stale window.
const SWEEP_EVERY: Duration = Duration::from_secs(10);

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Some(Cmd::CheckConfig { file }) => check_config(&file),
        Some(Cmd::Cache { op, pin_path }) => cache_cmd(op, &pin_path),
        Some(Cmd::Pause) => runtime()?.block_on(async {
            let mut term = signal(SignalKind::terminate())?;
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            Ok(())
        }),
        Some(Cmd::Teardown { pin_path, listen6 }) => {
            init_logging(false);
            runtime()?.block_on(teardown(&pin_path, &listen6))
        }
        Some(Cmd::RenderCorefile {
            file,
            vnet_listen,
            kube_listen,
            vnet_dns,
            cluster_dns,
            hosts_file,
            cache_success,
            cache_denial,
        }) => {
            let l = config::load_file(&file.to_string_lossy())?;
            for w in &l.warnings {
                eprintln!("warning: {w} (Preferred mode: default used)");
            }
            let ctx = corefile::Context {
                vnet_listen: &vnet_listen,
                kube_listen: &kube_listen,
                vnet_dns: &vnet_dns,
                cluster_dns: &cluster_dns,
                success_cap: cache_success,
                denial_cap: cache_denial,
                hosts_file: hosts_file.as_deref(),
                metrics_port: 9253,
                ready_port: 8181,
            };
            print!("{}", corefile::render(&l.config, &ctx));
            Ok(())
        }
        Some(Cmd::Run(args)) => run(args),
        None => run(cli.run),
    }
}

fn check_config(file: &Path) -> Result<()> {
    match config::load_file(&file.to_string_lossy()) {
        Ok(l) => {
            for w in &l.warnings {
                println!("warning: {w} (Preferred mode: default used)");
            }
            println!("{}: OK (mode {:?})", file.display(), l.config.mode);
            Ok(())
        }
        Err(e) => {
            eprintln!("{}: {e}", file.display());
            std::process::exit(1);
        }
    }
}

fn parse_upstream(s: &str) -> Result<SocketAddr> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    let ip: IpAddr = s
        .trim_matches(|c| c == '[' || c == ']')
        .parse()
        .with_context(|| format!("upstream {s:?} is not IP[:PORT]"))?;
    Ok(SocketAddr::new(ip, 53))
}

fn resolv_conf_upstreams(exclude: &[(IpAddr, u8)]) -> Vec<SocketAddr> {
    let ours: Vec<IpAddr> = exclude.iter().map(|(ip, _)| *ip).collect();
    resolvconf::upstreams(
        Path::new(resolvconf::RESOLV_CONF),
        Path::new(resolvconf::RESOLVED_UPLINKS),
        &ours,
    )
    .into_iter()
    .map(|ip| SocketAddr::new(ip, 53))
    .collect()
}

impl RunArgs {
    /// Every listener address with its view.
    fn listeners(&self) -> Vec<(IpAddr, u8)> {
        let v = self.vnet_listen.iter().map(|a| (*a, VIEW_VNET));
        v.chain(self.kube_listen.iter().map(|a| (*a, VIEW_KUBE)))
            .collect()
    }
}

fn listen_addr(s: &str) -> Result<Option<SocketAddr>> {
    if s == "none" {
        return Ok(None);
    }
    let s = if s.starts_with(':') {
        format!("0.0.0.0{s}")
    } else {
        s.to_string()
    };
    Ok(Some(
        s.parse()
            .with_context(|| format!("{s:?} is not ADDR:PORT"))?,
    ))
}

fn run(args: RunArgs) -> Result<()> {
    init_logging(args.log_json);
    let loaded = match &args.config {
        Some(p) => config::load_file(&p.to_string_lossy())?,
        None => config::parse(config::DEFAULT_CONFIG)?,
    };
    for w in &loaded.warnings {
        tracing::warn!("config: {w} (Preferred mode: using the default)");
    }
    if loaded.config.mode == Mode::Disabled {
        tracing::info!("mode Disabled: removing anything an earlier run left, then exiting");
        let v6: Vec<std::net::Ipv6Addr> = args
            .listeners()
            .iter()
            .filter_map(|(a, _)| match a {
                IpAddr::V6(v6) => Some(*v6),
                IpAddr::V4(_) => None,
            })
            .collect();
        return runtime()?.block_on(teardown(&args.pin_path, &v6));
    }
    let listen = args.listeners();
    let vnet: Vec<SocketAddr> = if args.vnet_dns.is_empty() {
        resolv_conf_upstreams(&listen)
    } else {
        args.vnet_dns
            .iter()
            .map(|s| parse_upstream(s))
            .collect::<Result<_>>()?
    };
    if vnet.is_empty() {
        tracing::warn!(
            "no VnetDNS upstream (--vnet-dns or resolv.conf): VnetDNS zones will SERVFAIL"
        );
    }
    let cluster: Vec<SocketAddr> = args
        .cluster_dns
        .iter()
        .map(|s| parse_upstream(s))
        .collect::<Result<_>>()?;
    // The obvious loop, refused before it starts; the loop probes find the
    // ones that go through another server.
    for (flag, ups) in [("--vnet-dns", &vnet), ("--cluster-dns", &cluster)] {
        if let Some(u) = ups
            .iter()
            .find(|u| u.port() == 53 && listen.iter().any(|(ip, _)| *ip == u.ip()))
        {
            anyhow::bail!(
                "{flag} {u} is one of this daemon's own listeners: every query would loop"
            );
        }
    }
    runtime()?.block_on(serve(args, loaded.config, vnet, cluster))
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

async fn serve(
    args: RunArgs,
    cfg: config::Config,
    vnet: Vec<SocketAddr>,
    cluster: Vec<SocketAddr>,
) -> Result<()> {
    let nl = ifaces::connect()?;
    let listeners = args.listeners();
    let ips: Vec<IpAddr> = listeners.iter().map(|(a, _)| *a).collect();
    let lst = addrs::ensure(&nl, &ips).await?;
    tracing::info!(device = %lst.device, added = ?lst.added, "listener addresses ready");
    listen::enable_tcp_migration();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut bound = Vec::new();
    for (ip, view) in &listeners {
        let (u, t) = listen::bind(SocketAddr::new(*ip, 53), cores)?;
        bound.push((u, t, *view));
    }
    let patterns = Patterns::new(&args.ifaces)?;
    let fastpath = start_fastpath(&args)?;
    let cap = Capacity {
        success: args.cache_success,
        denial: args.cache_denial,
    };
    let res = Resolver::new(&cfg, &vnet, &cluster, fastpath.clone(), cap);
    if let Some(path) = &args.hosts_file {
        let h = Arc::new(synth::Hosts::open(path)?);
        let _ = res.hosts.set(h.clone());
        // CoreDNS `hosts ... { reload 5s }`.
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(5)).await;
                let h = h.clone();
                match tokio::task::spawn_blocking(move || h.reload()).await {
                    Ok(Err(e)) => tracing::error!(error = %e, "hosts file not reloaded"),
                    Err(e) => tracing::error!(error = %e, "hosts file not reloaded"),
                    Ok(Ok(_)) => {}
                }
            }
        });
    }
    if let Some(fp) = &fastpath {
        if fp.origin == Origin::Adopted {
            let (kept, dropped) = res.adopt(fp.entries());
            tracing::info!(
                kept,
                dropped,
                "adopted the kernel cache of an earlier instance"
            );
        }
        let all = ifaces::list(&nl).await?;
        for p in patterns.unmatched(&all) {
            tracing::warn!(
                pattern = p,
                "--iface matches no interface yet; it gets the fast path when one appears"
            );
        }
        log_changes(&fp.reconcile(&patterns.select(&all)));
    }
    let health = Arc::new(Health::default());
    metrics::metrics().set_servers(&listeners);
    metrics::metrics()
        .kernel_up
        .set(i64::from(fastpath.is_some()));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let inflight = Arc::new(InFlight::default());
    let ctx = Ctx {
        res: res.clone(),
        stop: stop_rx,
        inflight: inflight.clone(),
        tcp: listen::TcpLimits::new(
            args.tcp_max_conns,
            args.tcp_max_conns_per_client,
            Duration::from_secs_f64(args.tcp_idle_timeout.clamp(0.1, 3600.0)),
        ),
    };
    // Serving tasks finish by themselves once stopped (draining); the
    // others are aborted.
    let mut serving = Vec::new();
    for (socks, tcp, view) in bound {
        serving.push(tokio::spawn(listen::serve_tcp(tcp, view, ctx.clone())));
        for s in socks {
            serving.push(tokio::spawn(listen::serve_udp(s, view, ctx.clone())));
        }
    }
    let mut tasks = Vec::new();
    let router = metrics::router(
        health.clone(),
        {
            let res = res.clone();
            Arc::new(move || res.ready_check())
        },
        {
            let (res, fp) = (res.clone(), fastpath.clone());
            let first = std::sync::atomic::AtomicBool::new(true);
            // The counters pinned maps hold from earlier instances are the
            // starting point, not news.
            let refresh =
                move || refresh_metrics(&res, fp.as_deref(), first.swap(false, Ordering::Relaxed));
            refresh();
            Arc::new(refresh)
        },
    );
    let mut http = vec![listen_addr(&args.metrics)?];
    http.extend(
        args.health
            .iter()
            .map(|h| listen_addr(h))
            .collect::<Result<Vec<_>>>()?,
    );
    let mut seen = Vec::new();
    for a in http.into_iter().flatten() {
        if seen.contains(&a) {
            continue;
        }
        seen.push(a);
        let router = router.clone();
        tasks.push(tokio::spawn(async move {
            if let Err(e) = metrics::serve(a, router).await {
                tracing::warn!(addr = %a, error = %e, "metrics/health listener not started");
            }
        }));
    }
    if let Some(fp) = &fastpath {
        let fp2 = fp.clone();
        let r = res.clone();
        tasks.push(tokio::spawn(async move {
            fp2.drain_log(|ev| match ev.kind {
                localdns_common::EVENT_PREFETCH => r.prefetch(ev),
                _ => log_kernel_hit(ev),
            })
            .await
        }));
        tasks.push(tokio::spawn(follow_interfaces(
            nl.clone(),
            fp.clone(),
            patterns,
        )));
    }
    let sweeper = res.clone();
    tasks.push(tokio::spawn(async move {
        // A sweep walks the whole cache (~0.5 µs per entry): every second it
        // was the daemon's main cost during pure kernel hits (~30 ms/s with
        // 40,000 entries). Nothing waits for it: lookups check expiry and
        // the stale window themselves, and the kernel refuses expired
        // entries; it only frees memory and LRU room.
        let mut t = tokio::time::interval(SWEEP_EVERY);
        loop {
            t.tick().await;
            sweeper.sweep();
        }
    }));
    if !args.no_notrack {
        let l = ips.clone();
        match tokio::task::spawn_blocking(move || notrack::install(&l)).await? {
            Ok(()) => {
                tracing::info!(
                    table = notrack::TABLE,
                    "NOTRACK rules installed for the listener addresses"
                );
                tasks.push(tokio::spawn(notrack::keep(
                    ips.clone(),
                    Duration::from_secs(10),
                )));
            }
            Err(e) => {
                tracing::error!(error = %e, "NOTRACK rules not installed: daemon-path DNS creates conntrack entries (--no-notrack silences this)")
            }
        }
    }
    // Ready means answering: the daemon asks itself the health-check name
    // through its first listener before it says so (to systemd too).
    let probe_at = SocketAddr::new(listeners[0].0, 53);
    let mut attempt = 0u32;
    while let Err(e) = service::self_check(probe_at, Duration::from_secs(1)).await {
        attempt += 1;
        if attempt % 5 == 1 {
            tracing::error!(error = %e, "not answering its own health check yet");
        }
    }
    health.started.store(true, Ordering::Relaxed);
    service::ready();
    tasks.push(tokio::spawn(service::watchdog(probe_at)));
    let r = res.clone();
    let every = Duration::from_secs_f64(args.loop_probe_interval.max(0.1));
    tasks.push(tokio::spawn(async move {
        loop {
            r.probe_loops().await;
            tokio::time::sleep(every).await;
        }
    }));
    tracing::info!(
        vnet = ?args.vnet_listen, kube = ?args.kube_listen,
        vnet_upstreams = ?vnet, cluster_upstreams = ?cluster,
        fastpath = fastpath.is_some(), "localdns ready"
    );
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => reload(&args, &res),
        }
    }
    // Hand over: stop taking queries (a successor bound to the same
    // addresses gets them all from now on), answer what was already
    // received, leave the kernel fast path and the addresses in place.
    tracing::info!(
        "stopping: leaving the listeners to any successor, answering queries in flight; the kernel fast path stays"
    );
    health.stopping.store(true, Ordering::Relaxed);
    service::stopping();
    for t in &tasks {
        t.abort();
    }
    let _ = stop_tx.send(true);
    for t in serving {
        let _ = tokio::time::timeout(Duration::from_secs(2), t).await;
    }
    let idle = inflight.wait_idle(Duration::from_secs(4)).await;
    tracing::info!(in_flight_left = inflight.count(), drained = idle, "stopped");
    Ok(())
}

/// Loads the fast path as `--fastpath` says: `auto` carries on without it
/// (userspace only) when the kernel refuses it.
fn start_fastpath(args: &RunArgs) -> Result<Option<Arc<Fastpath>>> {
    if args.no_fastpath || args.fastpath == FastpathMode::Off {
        return Ok(None);
    }
    let o = fastpath::Options {
        listen: args.listeners(),
        pin_dir: args.pin_path.clone(),
        entries: args.fastpath_entries,
        mode: args.attach_mode,
        prefetch: (args.prefetch_amount > 0).then_some(fastpath::Prefetch {
            amount: args.prefetch_amount,
            percent: args.prefetch_percent,
        }),
    };
    match Fastpath::start(&o) {
        Ok(fp) => {
            match &fp.origin {
                Origin::Adopted => {
                    tracing::info!(pin_path = %o.pin_dir.display(), "adopted the pinned kernel maps")
                }
                Origin::Fresh(Some(why)) => {
                    tracing::info!(pin_path = %o.pin_dir.display(), %why, "pinned maps not adoptable: new maps (cold kernel cache)")
                }
                Origin::Fresh(None) => {}
            }
            Ok(Some(Arc::new(fp)))
        }
        Err(e) if args.fastpath == FastpathMode::Auto => {
            tracing::error!(error = %e, "kernel fast path unavailable: serving from userspace only (--fastpath required makes this fatal)");
            Ok(None)
        }
        Err(e) => Err(e).context("--fastpath required"),
    }
}

/// Keeps the fast path on every interface the patterns select, as
/// interfaces appear and disappear (pods come and go).
async fn follow_interfaces(nl: rtnetlink::Handle, fp: Arc<Fastpath>, patterns: Patterns) {
    let mut events = match ifaces::watch() {
        Ok(rx) => Some(rx),
        Err(e) => {
            tracing::error!(error = %e, "cannot watch interfaces: re-checking every 10 s instead");
            None
        }
    };
    let mut tick = tokio::time::interval(Duration::from_secs(10));
    tick.tick().await;
    loop {
        match &mut events {
            Some(rx) => tokio::select! {
                ev = rx.recv() => if ev.is_none() { events = None; },
                _ = tick.tick() => {}
            },
            None => {
                tick.tick().await;
            }
        }
        match ifaces::list(&nl).await {
            Ok(all) => log_changes(&fp.reconcile(&patterns.select(&all))),
            Err(e) => tracing::warn!(error = %e, "listing interfaces failed"),
        }
    }
}

fn log_changes(changes: &[Change]) {
    for c in changes {
        match c {
            Change::Attached {
                iface,
                how,
                adopted,
            } => tracing::info!(%iface, mode = how.name(), adopted, "fast path attached"),
            Change::Detached { iface } => tracing::info!(%iface, "fast path detached"),
            Change::Failed { iface, error } => {
                tracing::warn!(%iface, %error, "fast path not attached")
            }
        }
    }
}

/// `teardown` and mode Disabled: remove what any earlier run left.
async fn teardown(pin_path: &Path, listen6: &[std::net::Ipv6Addr]) -> Result<()> {
    let nl = ifaces::connect()?;
    let all = ifaces::list(&nl).await?;
    let filters = fastpath::attach::detach_netlink_tc(&all);
    let pins = PinDir::new(pin_path).remove_all();
    let addrs = addrs::remove(&nl, listen6).await?;
    let nft = match notrack::remove() {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, "removing the NOTRACK table failed");
            false
        }
    };
    tracing::info!(
        pins,
        netlink_tc_filters = filters,
        removed = ?addrs,
        notrack_table = nft,
        pin_path = %pin_path.display(),
        "teardown done"
    );
    Ok(())
}

/// A kernel-answered query of a `Log` zone, in CoreDNS's format (duration
/// 0: the kernel answers within the packet's own processing).
fn log_kernel_hit(ev: &localdns_common::LogEvent) {
    let qn = &ev.qname[..(ev.qname_len as usize).min(ev.qname.len())];
    let ip = if ev.family == 6 {
        IpAddr::from(ev.addr)
    } else {
        IpAddr::from([ev.addr[0], ev.addr[1], ev.addr[2], ev.addr[3]])
    };
    querylog::emit(
        querylog::QueryLine {
            client: SocketAddr::new(ip, ev.sport),
            proto: querylog::Proto::Udp,
            id: ev.id,
            qtype: ev.qtype,
            qclass: ev.qclass,
            qname: qn.to_vec(),
            size: ev.query_len as usize,
            do_bit: ev.kflags & KEY_F_DO != 0,
            edns_size: (ev.kflags & KEY_F_EDNS != 0).then_some(ev.udp_size),
            rflags: Some(ev.rflags),
            rsize: ev.reply_len as usize,
            secs: 0.0,
        }
        .format(),
    );
}

/// Scrape-time values: cache sizes, evictions, what the kernel counted.
fn refresh_metrics(res: &Resolver, fp: Option<&Fastpath>, first: bool) {
    let m = metrics::metrics();
    let (success, denial) = res.cache.lens();
    for (kind, n) in [("success", success), ("denial", denial)] {
        m.cache_entries
            .get_or_create(&metrics::KindLabels { r#type: kind })
            .set(n as i64);
    }
    let ev = res.cache.evictions.load(Ordering::Relaxed);
    m.cache_evictions
        .inc_by(ev.saturating_sub(m.cache_evictions.get()));
    let dropped = querylog::DROPPED.load(Ordering::Relaxed);
    m.log_dropped
        .inc_by(dropped.saturating_sub(m.log_dropped.get()));
    if let Some(fp) = fp {
        m.sync_kernel(&fp.slot_counts(), &fp.stats(), first);
        let (small, big) = fp.kernel_entries();
        for (class, n) in [("small", small), ("big", big)] {
            m.kernel_entries
                .get_or_create(&metrics::ClassLabels { class })
                .set(n as i64);
        }
    }
}

/// SIGHUP: re-read --config; apply it if valid, else keep the old one.
fn reload(args: &RunArgs, res: &Resolver) {
    let Some(path) = &args.config else {
        tracing::info!("SIGHUP: running on the embedded config, nothing to reload");
        return;
    };
    match config::load_file(&path.to_string_lossy()) {
        Ok(l) if l.config.mode == Mode::Disabled => {
            tracing::warn!(
                "reload: mode Disabled takes effect on restart; still running on the previous config"
            )
        }
        Ok(l) => {
            for w in &l.warnings {
                tracing::warn!("config: {w} (Preferred mode: using the default)");
            }
            let dropped = res.reload(&l.config);
            tracing::info!(dropped_cache_entries = dropped, "configuration reloaded");
        }
        Err(e) => tracing::error!("reload failed, still running on the previous config: {e}"),
    }
}

fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    if json {
        tracing_subscriber::fmt()
            .json()
            .with_writer(std::io::stderr)
            .with_env_filter(filter)
            .init();
    } else {
        // Colours only for a terminal, not for files or journald.
        let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
        tracing_subscriber::fmt()
            .with_ansi(ansi)
            .with_writer(std::io::stderr)
            .with_env_filter(filter)
            .init();
    }
}

fn cache_cmd(op: CacheOp, pin: &Path) -> Result<()> {
    let (mut cache, stats) = fastpath::open_pinned(pin)
        .with_context(|| format!("no running instance's maps under {}", pin.display()))?;
    match op {
        CacheOp::Stats => {
            let (small, big) = cache.counts();
            println!(
                "kernel cache entries: {} ({small} small, {big} big)",
                small + big
            );
            for (name, v) in fastpath::read_stats(&stats) {
                println!("{name:>16}: {v}");
            }
        }
        CacheOp::Dump => {
            let now = mono_ns();
            for (_, v) in cache.entries() {
                let qn = v.qname();
                let k = v.head.key;
                let left = v.head.expire_ns().saturating_sub(now) / 1_000_000_000;
                let mut fl = Vec::new();
                for (b, n) in [(KEY_F_EDNS, "edns"), (KEY_F_DO, "do"), (KEY_F_CD, "cd")] {
                    if k.flags & b != 0 {
                        fl.push(n);
                    }
                }
                println!(
                    "{} {} {} flags={} ttl={} expires_in={}s bytes={} records={}",
                    metrics::view_label(k.view),
                    name_to_text(qn),
                    type_name(k.qtype),
                    if fl.is_empty() {
                        "-".into()
                    } else {
                        fl.join(",")
                    },
                    v.head.ttl,
                    left,
                    v.head.tail_len,
                    v.head.ttl_count
                );
            }
        }
        CacheOp::Flush => {
            let n = cache.clear();
            println!("removed {n} kernel cache entries");
        }
    }
    Ok(())
}
