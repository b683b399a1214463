//! `localdns-user`: the localdns daemon and its CLI.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use localdns_common::{CacheKey, CacheValue, KEY_F_CD, KEY_F_DO, KEY_F_EDNS, VIEW_KUBE, VIEW_VNET};
use localdns_user::cache::mono_ns;
use localdns_user::config::{self, Mode};
use localdns_user::fastpath::{self, AttachMode, Fastpath};
use localdns_user::listen::{self, ListenerAddrs};
use localdns_user::metrics::{self, Health};
use localdns_user::resolver::{LogFields, Resolver, Transport, log_line, type_name};
use localdns_user::wire::name_to_text;
use tokio::signal::unix::{SignalKind, signal};

#[derive(Parser)]
#[command(
    version,
    about = "Node-local DNS cache with an in-kernel (XDP/TC) fast path, configured by AKS localdnsconfig.json"
)]
#[command(args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the daemon (the default).
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
        /// Forward target of VnetDNS zones.
        #[arg(long, default_value = "/etc/resolv.conf")]
        vnet_dns: String,
        /// Forward target of ClusterCoreDNS zones.
        #[arg(long, default_value = "10.0.0.10")]
        cluster_dns: String,
    },
    /// Inspect the running instance's pinned kernel maps.
    Cache {
        #[command(subcommand)]
        op: CacheOp,
        #[arg(long, global = true, default_value = "/sys/fs/bpf/localdns")]
        pin_path: PathBuf,
    },
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
    #[arg(long, default_value = "169.254.10.10")]
    vnet_listen: Ipv4Addr,
    #[arg(long, default_value = "169.254.10.11")]
    kube_listen: Ipv4Addr,
    /// Prometheus metrics address ("none" to disable).
    #[arg(long, default_value = ":9253")]
    metrics: String,
    /// /health and /ready address ("none" to disable).
    #[arg(long, default_value = "169.254.10.10:8181")]
    health: String,
    #[arg(long, default_value = "/sys/fs/bpf/localdns")]
    pin_path: PathBuf,
    /// Serve from userspace only (for comparison).
    #[arg(long)]
    no_fastpath: bool,
    /// Capacity of the kernel cache map.
    #[arg(long, default_value_t = localdns_common::CACHE_MAP_ENTRIES)]
    fastpath_entries: u32,
    /// Log as JSON lines.
    #[arg(long)]
    log_json: bool,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Some(Cmd::CheckConfig { file }) => check_config(&file),
        Some(Cmd::Cache { op, pin_path }) => cache_cmd(op, &pin_path),
        Some(Cmd::RenderCorefile {
            file,
            vnet_listen,
            kube_listen,
            vnet_dns,
            cluster_dns,
        }) => {
            let l = config::load_file(&file.to_string_lossy())?;
            for w in &l.warnings {
                eprintln!("warning: {w} (Preferred mode: default used)");
            }
            let ctx = config::CorefileContext {
                vnet_listen: &vnet_listen,
                kube_listen: &kube_listen,
                vnet_dns: &vnet_dns,
                cluster_dns: &cluster_dns,
            };
            print!("{}", config::render_corefile(&l.config, &ctx));
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

fn resolv_conf_upstreams(exclude: &[Ipv4Addr]) -> Vec<SocketAddr> {
    let text = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    text.lines()
        .filter_map(|l| l.strip_prefix("nameserver"))
        .filter_map(|ip| ip.trim().parse::<IpAddr>().ok())
        .filter(|ip| !matches!(ip, IpAddr::V4(v4) if exclude.contains(v4)))
        .map(|ip| SocketAddr::new(ip, 53))
        .collect()
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
        disable_cleanup(&args);
        return Ok(());
    }
    let listen = [args.vnet_listen, args.kube_listen];
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
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(serve(args, loaded.config, vnet, cluster))
}

async fn serve(
    args: RunArgs,
    cfg: config::Config,
    vnet: Vec<SocketAddr>,
    cluster: Vec<SocketAddr>,
) -> Result<()> {
    let addrs = ListenerAddrs::setup(&[args.vnet_listen, args.kube_listen])?;
    tracing::info!(device = %addrs.device, "listener addresses ready");
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let (vu, vt) = listen::bind(SocketAddr::new(args.vnet_listen.into(), 53), cores).await?;
    let (ku, kt) = listen::bind(SocketAddr::new(args.kube_listen.into(), 53), cores).await?;
    let fastpath = if args.no_fastpath {
        None
    } else {
        let mut ifaces = fastpath::expand_ifaces(&args.ifaces)?;
        if !ifaces.iter().any(|i| i == "lo") {
            ifaces.push("lo".into());
        }
        let fp = Fastpath::start(
            args.vnet_listen,
            args.kube_listen,
            &ifaces,
            args.attach_mode,
            &args.pin_path,
            args.fastpath_entries,
        )?;
        for (iface, how) in &fp.attached {
            tracing::info!(%iface, mode = how, "fast path attached");
        }
        Some(Arc::new(fp))
    };
    let res = Resolver::new(&cfg, &vnet, &cluster, fastpath.clone());
    let health = Arc::new(Health {
        ready: false.into(),
    });
    let mut tasks = vec![
        tokio::spawn(listen::serve_tcp(vt, VIEW_VNET, res.clone())),
        tokio::spawn(listen::serve_tcp(kt, VIEW_KUBE, res.clone())),
    ];
    for (socks, view) in [(vu, VIEW_VNET), (ku, VIEW_KUBE)] {
        for s in socks {
            tasks.push(tokio::spawn(listen::serve_udp(s, view, res.clone())));
        }
    }
    for a in [listen_addr(&args.metrics)?, listen_addr(&args.health)?]
        .into_iter()
        .flatten()
    {
        match metrics::bind(a).await {
            Ok(l) => tasks.push(tokio::spawn(metrics::serve(l, res.clone(), health.clone()))),
            Err(e) => tracing::warn!(addr = %a, error = %e, "metrics/health listener not started"),
        }
    }
    if let Some(fp) = &fastpath {
        let fp = fp.clone();
        tasks.push(tokio::spawn(
            async move { fp.drain_log(log_kernel_hit).await },
        ));
    }
    let sweeper = res.clone();
    tasks.push(tokio::spawn(async move {
        let mut t = tokio::time::interval(Duration::from_secs(1));
        loop {
            t.tick().await;
            sweeper.sweep();
        }
    }));
    health.ready.store(true, Ordering::Relaxed);
    tracing::info!(
        vnet = %args.vnet_listen, kube = %args.kube_listen,
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
    tracing::info!("shutting down: detaching the fast path and removing listener addresses");
    for t in &tasks {
        t.abort();
    }
    drop(res);
    drop(fastpath);
    drop(addrs);
    Ok(())
}

/// A kernel-answered query of a `Log` zone, in CoreDNS's format (duration
/// 0: the kernel answers within the packet's own processing).
fn log_kernel_hit(ev: &localdns_common::LogEvent) {
    let qn = &ev.qname[..(ev.qname_len as usize).min(ev.qname.len())];
    let f = LogFields {
        client: SocketAddr::new(
            IpAddr::V4(Ipv4Addr::from(ev.saddr_ne.to_ne_bytes())),
            ev.sport,
        ),
        tr: Transport::Udp,
        id: ev.id,
        qtype: ev.qtype,
        qclass: ev.qclass,
        name: name_to_text(qn),
        size: ev.query_len as usize,
        do_bit: ev.kflags & KEY_F_DO != 0,
        bufsize: if ev.udp_size == 0 {
            512
        } else {
            ev.udp_size.max(512)
        },
        rflags: Some(ev.rflags),
        rsize: ev.reply_len as usize,
        secs: 0.0,
    };
    tracing::info!("{}", log_line(&f));
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

/// mode Disabled: take over nothing and remove what an earlier run left.
fn disable_cleanup(args: &RunArgs) {
    tracing::info!("mode Disabled: removing anything an earlier run left, then exiting");
    let _ = std::fs::remove_dir_all(&args.pin_path);
    for a in [args.vnet_listen, args.kube_listen] {
        for dev in ["localdns", "lo"] {
            let _ = std::process::Command::new("ip")
                .args(["addr", "del", &format!("{a}/32"), "dev", dev])
                .output();
        }
    }
    let _ = std::process::Command::new("ip")
        .args(["link", "del", "localdns"])
        .output();
}

fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    if json {
        tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .init();
    } else {
        // Colours only for a terminal, not for files or journald.
        let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
        tracing_subscriber::fmt()
            .with_ansi(ansi)
            .with_env_filter(filter)
            .init();
    }
}

fn view_name(v: u8) -> &'static str {
    if v == VIEW_KUBE { "kube" } else { "vnet" }
}

fn cache_cmd(op: CacheOp, pin: &Path) -> Result<()> {
    let (mut cache, stats) = fastpath::open_pinned(pin)
        .with_context(|| format!("no running instance's maps under {}", pin.display()))?;
    match op {
        CacheOp::Stats => {
            let entries = cache.keys().filter(|k| k.is_ok()).count();
            println!("kernel cache entries: {entries}");
            for (name, v) in fastpath::read_stats(&stats) {
                println!("{name:>16}: {v}");
            }
        }
        CacheOp::Dump => {
            let now = mono_ns();
            let items: Vec<(CacheKey, CacheValue)> = cache.iter().filter_map(|r| r.ok()).collect();
            for (k, v) in items {
                let qn = v.qname();
                let left = v.expire_ns.saturating_sub(now) / 1_000_000_000;
                let mut fl = Vec::new();
                for (b, n) in [(KEY_F_EDNS, "edns"), (KEY_F_DO, "do"), (KEY_F_CD, "cd")] {
                    if k.flags & b != 0 {
                        fl.push(n);
                    }
                }
                println!(
                    "{} {} {} flags={} ttl={} expires_in={}s bytes={} records={}",
                    view_name(k.view),
                    name_to_text(qn),
                    type_name(k.qtype),
                    if fl.is_empty() {
                        "-".into()
                    } else {
                        fl.join(",")
                    },
                    v.ttl,
                    left,
                    v.tail_len,
                    v.ttl_count
                );
            }
        }
        CacheOp::Flush => {
            let keys: Vec<CacheKey> = cache.keys().filter_map(|k| k.ok()).collect();
            for k in &keys {
                let _ = cache.remove(k);
            }
            println!("removed {} kernel cache entries", keys.len());
        }
    }
    Ok(())
}
