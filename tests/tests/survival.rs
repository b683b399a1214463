//! Survival on a node: the kernel fast path through a SIGKILL, a restart
//! that adopts what the killed daemon left, planned restarts and
//! overlapping hand-overs under load, teardown, interfaces that come and
//! go, and running without a fast path. Each test prints its figure.

use std::net::{Ipv4Addr, SocketAddr};
use std::process::Command;
use std::time::{Duration, Instant};

use localdns_tests::load::{Load, Report, Spec, Target};
use localdns_tests::netns::{Proc, wait_for};
use localdns_tests::topo::{Topo, VNET, daemon_bin};

const WWW: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
const NS: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 53);
const FRESH: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 77);

fn server() -> SocketAddr {
    SocketAddr::new(VNET.parse().unwrap(), 53)
}

/// Names the kernel will have cached (after [`warm`]).
fn cached() -> Vec<Target> {
    vec![
        Target::Fixed {
            name: "www.example.test.".into(),
            addr: WWW,
        },
        Target::Fixed {
            name: "ns.example.test.".into(),
            addr: NS,
        },
        Target::Fixed {
            name: "alias.example.test.".into(),
            addr: WWW,
        },
    ]
}

/// A new name per query: always the daemon's path (a wildcard upstream).
fn uncached() -> Vec<Target> {
    vec![Target::Unique {
        suffix: "fresh.example.test.".into(),
        addr: FRESH,
    }]
}

/// 2000 queries/s for `secs`: three cached names and one uncached (index
/// 3), in turn: 1500 + 500 per second.
fn mixed(secs: u64) -> Spec {
    let mut targets = cached();
    targets.extend(uncached());
    spec(2000, secs, targets)
}

fn spec(rate: u32, secs: u64, targets: Vec<Target>) -> Spec {
    Spec {
        server: server(),
        rate,
        duration: Duration::from_secs(secs),
        timeout: Duration::from_secs(1),
        targets,
    }
}

/// Asks each cached name until the kernel answers it.
fn warm(t: &Topo) {
    let r = Load::start(&t.pod, spec(100, 1, cached())).finish();
    assert!(
        r.failed(|_| true).is_empty(),
        "warm-up: {}",
        r.sample(|_| true)
    );
    let h0 = t.kernel_stat("hit");
    let r = Load::start(&t.pod, spec(100, 1, cached())).finish();
    assert!(
        r.failed(|_| true).is_empty(),
        "warm-up: {}",
        r.sample(|_| true)
    );
    assert!(
        t.kernel_stat("hit") >= h0 + r.outcomes.len() as u64,
        "cached names not answered by the kernel"
    );
}

fn daemon_args() -> Vec<&'static str> {
    let mut a = Topo::upstream_args().to_vec();
    a.extend(["--iface", "vpod*"]);
    a
}

fn kill(d: &mut Proc) {
    d.signal(libc::SIGKILL);
    let _ = d.child.wait();
}

/// The send time of the first query of the selected targets sent at or
/// after `from` (since the load started) that was answered.
fn first_answer_after(r: &Report, from: Duration, sel: impl Fn(usize) -> bool) -> Option<Duration> {
    let mut v: Vec<_> = r
        .outcomes
        .iter()
        .filter(|o| sel(o.target) && o.failure.is_none() && o.sent_at >= from)
        .map(|o| o.sent_at)
        .collect();
    v.sort();
    v.first().copied()
}

#[test]
fn sigkill_keeps_cached_names_and_a_restart_adopts_them() {
    let mut t = Topo::new();
    t.start_daemon(&["--iface", "vpod*"]);
    warm(&t);
    let hits0 = t.kernel_stat("hit");
    let cached_load = Load::start(&t.pod, spec(2000, 9, cached()));
    std::thread::sleep(Duration::from_secs(1));
    // An OOM kill: nothing of the daemon runs any more.
    let mut d = t.daemon.take().unwrap();
    kill(&mut d);
    let killed = cached_load.started.elapsed();
    std::thread::sleep(Duration::from_millis(500));
    let fresh_load = Load::start(&t.pod, spec(100, 7, uncached()));
    std::thread::sleep(Duration::from_millis(5000));
    // Restart on the same pins.
    let spawn_at = fresh_load.started.elapsed();
    let t0 = Instant::now();
    t.daemon = Some(t.spawn_daemon(&daemon_args(), "daemon-2.log"));
    let startup = t0.elapsed();
    let cached_r = cached_load.finish();
    let fresh_r = fresh_load.finish();
    let sent = cached_r.sent(|_| true);
    let failed = cached_r.failed(|_| true);
    let hits = t.kernel_stat("hit") - hits0;
    let first_fresh = first_answer_after(&fresh_r, spawn_at, |_| true)
        .map(|a| a - spawn_at)
        .expect("uncached names answered after the restart");
    let log2 = t.log("daemon-2.log");
    println!(
        "SIGKILL at {killed:?} under {sent} cached queries over 9 s (2000/s): {} failed, {hits} kernel hits; restart ready in {startup:?}, first uncached answer {first_fresh:?} after the restart began",
        failed.len()
    );
    assert!(sent >= 17_000, "load too thin: {sent}");
    assert!(
        failed.is_empty(),
        "{} cached queries failed: {}",
        failed.len(),
        cached_r.sample(|_| true)
    );
    assert!(hits >= sent as u64, "{hits} kernel hits for {sent} queries");
    assert!(
        first_fresh <= Duration::from_secs(1),
        "{first_fresh:?}\n{log2}"
    );
    assert!(log2.contains("adopted the pinned kernel maps"), "{log2}");
    assert!(log2.contains("adopted=true"), "links not reused:\n{log2}");
    assert!(
        log2.contains("adopted the kernel cache of an earlier instance kept=3")
            || log2.contains("kept=3"),
        "userspace cache not rebuilt from the kernel map:\n{log2}"
    );
    // Rebuilt, so the daemon answers those names from its own cache too:
    // over TCP (never the kernel) nothing goes upstream.
    let (st, a) = t.dig_in(&t.node, VNET, "www.example.test", "A").unwrap();
    assert_eq!((st.as_str(), a.len()), ("NOERROR", 1));
}

/// A planned restart: SIGTERM, then a new instance. Cached names never
/// fail; uncached ones may for at most 1 s.
#[test]
fn planned_restart_loses_no_cached_query() {
    let mut t = Topo::new();
    t.start_daemon(&["--iface", "vpod*"]);
    warm(&t);
    let load = Load::start(&t.pod, mixed(7));
    std::thread::sleep(Duration::from_secs(2));
    let mut d = t.daemon.take().unwrap();
    let t0 = Instant::now();
    assert!(
        d.terminate(Duration::from_secs(10)),
        "SIGTERM did not stop it"
    );
    let stop = t0.elapsed();
    t.daemon = Some(t.spawn_daemon(&daemon_args(), "daemon-2.log"));
    let downtime = t0.elapsed();
    let r = load.finish();
    let is_cached = |i| i < 3;
    let cached_failed = r.failed(is_cached);
    let gap = r.longest_gap(|i| i == 3);
    println!(
        "SIGTERM + start: stop took {stop:?}, no daemon for {downtime:?}; cached {} sent / {} failed; uncached {} sent / {} failed, longest gap without uncached answers {gap:?}",
        r.sent(is_cached),
        cached_failed.len(),
        r.sent(|i| i == 3),
        r.failed(|i| i == 3).len()
    );
    assert!(cached_failed.is_empty(), "{}", r.sample(is_cached));
    assert!(gap <= Duration::from_secs(1), "uncached gap {gap:?}");
}

/// A rolling update with maxSurge: the new instance starts next to the old
/// one, which is told to stop once the new one is ready. No query of any
/// kind fails.
#[test]
fn overlapping_handover_loses_nothing() {
    let mut t = Topo::new();
    t.start_daemon(&["--iface", "vpod*"]);
    warm(&t);
    let load = Load::start(&t.pod, mixed(7));
    std::thread::sleep(Duration::from_secs(2));
    let next = t.spawn_daemon(&daemon_args(), "daemon-2.log");
    let mut old = t.daemon.replace(next).unwrap();
    let t0 = Instant::now();
    assert!(
        old.terminate(Duration::from_secs(10)),
        "old instance did not stop"
    );
    let drain = t0.elapsed();
    let r = load.finish();
    let failed = r.failed(|_| true);
    let gap = r.longest_gap(|i| i == 3);
    let old_log = t.daemon_log();
    println!(
        "hand-over under {} queries (2000/s, 1/4 uncached): {} failed; the old instance drained and exited in {drain:?}; longest gap without uncached answers {gap:?}",
        r.sent(|_| true),
        failed.len()
    );
    assert!(failed.is_empty(), "{}", r.sample(|_| true));
    assert!(old_log.contains("drained=true"), "{old_log}");
    assert!(t.daemon_alive());
}

/// `teardown` after a SIGKILL removes the programs, links, pins and
/// addresses the killed instance left.
#[test]
fn teardown_after_sigkill_leaves_nothing() {
    let mut t = Topo::new();
    t.start_daemon(&["--iface", "vpod*"]);
    warm(&t);
    // dig asks with EDNS: another cache key than the warm-up's.
    assert!(t.dig(VNET, "www.example.test", "A").is_some());
    let mut d = t.daemon.take().unwrap();
    kill(&mut d);
    // What the kernel holds now, by id.
    let link = t.node.sh_ok("ip", &["-d", "link", "show", "vpod0"]);
    let prog_id = link
        .split("prog/xdp id ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .unwrap_or_else(|| panic!("no XDP program on vpod0 after the kill:\n{link}"))
        .to_string();
    let pins: Vec<String> = walk(&t.bpffs.path);
    assert!(pins.iter().any(|p| p.contains("/links/")), "{pins:?}");
    assert!(
        t.dig(VNET, "www.example.test", "A").is_some(),
        "kernel stopped answering after the kill"
    );
    let out = t.node.output(
        daemon_bin().to_str().unwrap(),
        &["teardown", "--pin-path", &t.pin_path()],
    );
    assert!(out.status.success(), "{out:?}");
    let link = t.node.sh_ok("ip", &["-d", "link", "show", "vpod0"]);
    assert!(!link.contains("prog/xdp"), "{link}");
    let lo = t.node.sh_ok("ip", &["-d", "link", "show", "lo"]);
    assert!(!lo.contains("prog/xdp"), "{lo}");
    let prog = Command::new("bpftool")
        .args(["prog", "show", "id", &prog_id])
        .output()
        .unwrap();
    assert!(!prog.status.success(), "program {prog_id} still loaded");
    assert_eq!(walk(&t.bpffs.path), Vec::<String>::new(), "pins left");
    let addrs = t.node.sh_ok("ip", &["-o", "addr", "show"]);
    assert!(!addrs.contains("169.254.10.1"), "{addrs}");
    assert!(t.dig(VNET, "www.example.test", "A").is_none());
    println!("teardown after SIGKILL: program {prog_id}, links, pins and addresses gone");
}

/// Everything under `dir`, recursively (pins and pin directories), except
/// the kernel's own `*.debug` iterator files at a bpffs root.
fn walk(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.file_name().to_string_lossy().ends_with(".debug") {
            continue;
        }
        out.push(e.path().display().to_string());
        if e.path().is_dir() {
            out.extend(walk(&e.path()));
        }
    }
    out
}

/// A pod created after the daemon started gets the fast path within 1 s;
/// deleting it leaves the daemon healthy. A pattern that matches nothing
/// yet is a warning, not a failure.
#[test]
fn pods_that_come_and_go_get_the_fast_path() {
    let mut t = Topo::new();
    t.start_daemon(&["--iface", "vpod*", "--iface", "azv*"]);
    let log = t.daemon_log();
    assert!(
        log.contains("--iface matches no interface yet") && log.contains("azv*"),
        "{log}"
    );
    // A second pod, on a veth named like Azure CNI names them.
    let t0 = Instant::now();
    let pod2 = t.add_pod("pod2", "azv7f3", 101);
    // Cache the name from the first pod, then ask from the new one until
    // the kernel answers it there.
    assert!(t.dig(VNET, "www.example.test", "A").is_some());
    let first_hit = wait_for(Duration::from_secs(5), || {
        let h = t.kernel_stat("hit");
        let ok = t.dig_in(&pod2, VNET, "www.example.test", "A").is_some();
        (ok && t.kernel_stat("hit") > h).then(|| t0.elapsed())
    })
    .unwrap_or_else(|| panic!("no kernel hit from the new pod:\n{}", t.daemon_log()));
    println!("new veth: first kernel hit {first_hit:?} after the link was created");
    assert!(first_hit <= Duration::from_secs(1), "{first_hit:?}");
    let pins = walk(&t.bpffs.path);
    assert!(pins.iter().any(|p| p.contains("azv7f3")), "{pins:?}");
    // The pod goes away.
    drop(pod2);
    let gone = wait_for(Duration::from_secs(3), || {
        (!walk(&t.bpffs.path).iter().any(|p| p.contains("azv7f3"))).then_some(())
    });
    assert!(gone.is_some(), "link pin left: {:?}", walk(&t.bpffs.path));
    assert!(t.daemon_alive(), "{}", t.daemon_log());
    assert!(
        t.daemon_log().contains("fast path detached"),
        "{}",
        t.daemon_log()
    );
    assert!(t.dig(VNET, "www.example.test", "A").is_some());
}

/// Without a usable fast path (here: the pin path cannot be created),
/// `--fastpath auto` serves from userspace with an error line and
/// `localdns_kernel_fastpath_up 0`; `--fastpath required` refuses to run.
#[test]
fn fastpath_auto_degrades_and_required_refuses() {
    let mut t = Topo::new();
    let blocker = t.dir.path.join("not-a-dir");
    std::fs::write(&blocker, "x").unwrap();
    let pin = blocker.join("pins");
    let mut args = Topo::upstream_args().to_vec();
    let pin_s = pin.display().to_string();
    args.extend([
        "--iface",
        "vpod*",
        "--pin-path",
        &pin_s,
        "--metrics",
        "127.0.0.1:19253",
    ]);
    t.daemon = Some(t.spawn_daemon(&args, "daemon.log"));
    let log = t.daemon_log();
    assert!(log.contains("kernel fast path unavailable"), "{log}");
    assert!(log.contains("ERROR"), "{log}");
    assert!(t.dig(VNET, "www.example.test", "A").is_some());
    let metrics = t.node.sh_ok(
        "python3",
        &[
            "-c",
            "import urllib.request;print(urllib.request.urlopen('http://127.0.0.1:19253/metrics',timeout=3).read().decode())",
        ],
    );
    assert!(
        metrics.contains("localdns_kernel_fastpath_up 0"),
        "{metrics}"
    );
    drop(t.daemon.take());
    let out = t.node.output(
        daemon_bin().to_str().unwrap(),
        &[
            "--vnet-dns",
            "169.254.200.2",
            "--pin-path",
            &pin_s,
            "--fastpath",
            "required",
            "--metrics",
            "none",
            "--health",
            "none",
        ],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--fastpath required"), "{err}");
}
