//! The shipped deployment files: the systemd unit and slice pass
//! `systemd-analyze verify`, carry AKS LocalDNS's service settings, and the
//! capability set the unit grants is enough to run the daemon with its
//! kernel fast path, NOTRACK rules and teardown (run under `setpriv` with
//! exactly that bounding set). The Kubernetes manifests validate against
//! the OpenAPI schemas (kubernetes-validate, strict), the DaemonSet asks
//! for no more than it needs, the ConfigMap is the sample profile, and two
//! daemons started as the DaemonSet starts them hand over with no failed
//! query.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use localdns_tests::load::{Load, Spec, Target};
use localdns_tests::netns::{Proc, TempDir, wait_for};
use localdns_tests::topo::{Topo, UPSTREAM_IP, VNET, daemon_bin};
use serde_json::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// `key=value` lines of a unit file (later ones win, like systemd for
/// single-valued keys).
fn unit_keys(text: &str) -> HashMap<String, String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#') && !l.starts_with('['))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

#[test]
fn systemd_unit_and_slice_verify_and_match_aks() {
    let dir = TempDir::new("units");
    let unit = read("deploy/systemd/localdns.service").replace(
        "/usr/local/bin/localdns-user",
        daemon_bin().to_str().unwrap(),
    );
    std::fs::write(dir.path.join("localdns.service"), &unit).unwrap();
    std::fs::write(
        dir.path.join("localdns.slice"),
        read("deploy/systemd/localdns.slice"),
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(dir.path.join("localdns.service"))
        .env("SYSTEMD_UNIT_PATH", format!("{}:", dir.path.display()))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Complaints about our own files only (the host's units are not ours).
    let ours: Vec<&str> = stderr.lines().filter(|l| l.contains("localdns")).collect();
    assert!(out.status.success() && ours.is_empty(), "{stderr}");

    let k = unit_keys(&unit);
    for (key, want) in [
        ("Type", "notify"),
        ("WatchdogSec", "60"),
        ("Restart", "on-failure"),
        ("RestartSec", "2"),
        ("KillMode", "mixed"),
        ("TimeoutStopSec", "30"),
        ("Slice", "localdns.slice"),
        ("NoNewPrivileges", "yes"),
    ] {
        assert_eq!(k.get(key).map(String::as_str), Some(want), "{key}");
    }
    assert!(
        k["Before"]
            .split_whitespace()
            .any(|u| u == "kubelet.service")
    );
    let s = unit_keys(&read("deploy/systemd/localdns.slice"));
    assert_eq!(s["MemoryMax"], "128M");
    assert_eq!(s["CPUQuota"], "200%");
}

/// The capabilities the unit keeps, as `setpriv` names them (`+bpf,...`).
fn unit_caps() -> String {
    let k = unit_keys(&read("deploy/systemd/localdns.service"));
    k["CapabilityBoundingSet"]
        .split_whitespace()
        .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_lowercase()))
        .collect::<Vec<_>>()
        .join(",")
}

#[test]
fn daemon_runs_with_only_the_units_capabilities() {
    let mut t = Topo::new();
    let bounding = format!("--bounding-set=-all,{}", unit_caps());
    let wrapper = ["setpriv", bounding.as_str(), "--"];
    let mut args = Topo::upstream_args().to_vec();
    args.extend(["--iface", "vpod*", "--fastpath", "required"]);
    t.daemon = Some(t.spawn_daemon_wrapped(&wrapper, &args, "daemon.log"));
    let status = std::fs::read_to_string(format!(
        "/proc/{}/status",
        t.daemon.as_ref().unwrap().child.id()
    ))
    .unwrap_or_default();
    let caps = status
        .lines()
        .find(|l| l.starts_with("CapBnd:"))
        .unwrap_or("")
        .to_string();
    // The whole set would be 000001ffffffffff: this one is smaller.
    assert!(!caps.is_empty() && !caps.ends_with("1ffffffffff"), "{caps}");
    assert_eq!(t.dig(VNET, "www.example.test", "A").unwrap().0, "NOERROR");
    assert_eq!(t.dig(VNET, "www.example.test", "A").unwrap().0, "NOERROR");
    assert!(
        t.kernel_stat("hit") >= 1,
        "no kernel hit:\n{}",
        t.daemon_log()
    );
    let rules = t.node.sh_ok("nft", &["list", "table", "inet", "localdns"]);
    assert!(rules.contains("notrack"), "{rules}");
    assert!(
        !t.daemon_log().contains("ERROR"),
        "errors with the unit's capabilities:\n{}",
        t.daemon_log()
    );
    assert!(
        t.daemon
            .as_mut()
            .unwrap()
            .terminate(std::time::Duration::from_secs(10))
    );
    let out = t
        .node
        .cmd("setpriv")
        .args([bounding.as_str(), "--"])
        .arg(daemon_bin())
        .args(["teardown", "--pin-path", &t.pin_path()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let link = t.node.sh_ok("ip", &["-d", "link", "show", "vpod0"]);
    assert!(!link.contains("prog/xdp"), "{link}");
}

const MANIFESTS: [&str; 6] = [
    "namespace.yaml",
    "serviceaccount.yaml",
    "configmap.yaml",
    "daemonset.yaml",
    "service.yaml",
    "teardown/daemonset.yaml",
];

/// The virtualenv `cargo xtask` prepares (kubernetes-validate, PyYAML).
fn pyenv(tool: &str) -> PathBuf {
    let p = repo().join("target/pyenv/bin").join(tool);
    assert!(
        p.exists(),
        "{} missing: run cargo xtask prereqs",
        p.display()
    );
    p
}

/// A manifest as JSON (read by PyYAML, not by us).
fn manifest(name: &str) -> Value {
    let script = "import sys, json, yaml; print(json.dumps(yaml.safe_load(open(sys.argv[1]))))";
    let out = Command::new(pyenv("python3"))
        .args(["-c", script])
        .arg(repo().join("deploy/kubernetes").join(name))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    serde_json::from_slice(&out.stdout).unwrap()
}

fn validate(path: &Path) -> std::process::Output {
    Command::new(pyenv("kubernetes-validate"))
        .args(["--strict", "-k", "1.31.0"])
        .arg(path)
        .output()
        .unwrap()
}

#[test]
fn kubernetes_manifests_validate_against_the_openapi_schemas() {
    for m in MANIFESTS {
        let out = validate(&repo().join("deploy/kubernetes").join(m));
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && text.contains("passed"),
            "{m}: {out:?}"
        );
    }
    // The validator does reject: a misspelt field fails.
    let dir = TempDir::new("k8s");
    let bad = dir.path.join("bad.yaml");
    std::fs::write(
        &bad,
        read("deploy/kubernetes/daemonset.yaml").replace("hostNetwork: true", "hostNetwrk: true"),
    )
    .unwrap();
    assert!(!validate(&bad).status.success(), "misspelt field accepted");
    // kustomize applies exactly these.
    let k = read("deploy/kubernetes/kustomization.yaml");
    for m in MANIFESTS.iter().filter(|m| !m.starts_with("teardown/")) {
        assert!(k.contains(&format!("  - {m}")), "{m} not in kustomization");
    }
    // The teardown DaemonSet runs `teardown` with the same capabilities
    // and mounts only the host's bpffs.
    let td = manifest("teardown/daemonset.yaml");
    let pod = &td["spec"]["template"]["spec"];
    let init = &pod["initContainers"][0];
    assert_eq!(init["args"], serde_json::json!(["teardown"]));
    assert_eq!(
        init["securityContext"]["capabilities"],
        manifest("daemonset.yaml")["spec"]["template"]["spec"]["containers"][0]["securityContext"]
            ["capabilities"]
    );
    assert_eq!(pod["containers"][0]["args"], serde_json::json!(["pause"]));
    assert_eq!(pod["volumes"].as_array().unwrap().len(), 1);
}

#[test]
fn daemonset_asks_only_for_what_it_needs() {
    let ds = manifest("daemonset.yaml");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"], true);
    assert_eq!(pod["priorityClassName"], "system-node-critical");
    for k in ["hostPID", "hostIPC"] {
        assert!(pod.get(k).is_none_or(|v| v == false), "{k}");
    }
    let u = &ds["spec"]["updateStrategy"];
    assert_eq!(u["type"], "RollingUpdate");
    assert_eq!(u["rollingUpdate"]["maxSurge"], 1);
    assert_eq!(u["rollingUpdate"]["maxUnavailable"], 0);
    let containers = pod["containers"].as_array().unwrap();
    assert_eq!(containers.len(), 1);
    let c = &containers[0];
    let sc = &c["securityContext"];
    assert_eq!(sc["privileged"], false);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["capabilities"]["drop"], serde_json::json!(["ALL"]));
    // The same capabilities the systemd unit keeps (tested to suffice).
    let mut add: Vec<String> = sc["capabilities"]["add"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_lowercase())
        .collect();
    add.sort();
    let mut unit: Vec<String> = unit_caps()
        .split(',')
        .map(|c| c.trim_start_matches('+').to_string())
        .collect();
    unit.sort();
    assert_eq!(add, unit);
    // Volumes: the host's bpffs and the config, nothing else from the host.
    let vols = pod["volumes"].as_array().unwrap();
    assert_eq!(vols.len(), 2, "{vols:?}");
    let host: Vec<&str> = vols
        .iter()
        .filter_map(|v| v["hostPath"]["path"].as_str())
        .collect();
    assert_eq!(host, ["/sys/fs/bpf"]);
    assert!(
        vols.iter()
            .any(|v| v["configMap"]["name"] == "localdns-config")
    );
    let mounts = c["volumeMounts"].as_array().unwrap();
    assert!(mounts.iter().any(|m| m["mountPath"] == "/sys/fs/bpf"));
    assert!(
        mounts
            .iter()
            .any(|m| m["mountPath"] == "/etc/localdns" && m["readOnly"] == true)
    );
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/ready");
    assert_eq!(c["readinessProbe"]["httpGet"]["port"], 8181);
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/health");
    // Within AKS's 128 MiB, above the measured peak (67 MiB).
    assert_eq!(c["resources"]["limits"]["memory"], "128Mi");
    assert_eq!(c["resources"]["requests"]["memory"], "64Mi");
    let args: Vec<&str> = c["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert!(args.contains(&"--config=/etc/localdns/localdnsconfig.json"));
}

#[test]
fn configmap_is_the_sample_profile_and_passes_check_config() {
    let cm = manifest("configmap.yaml");
    let json = cm["data"]["localdnsconfig.json"].as_str().unwrap();
    assert_eq!(json, read("localdns-user/default-localdnsconfig.json"));
    let dir = TempDir::new("cm");
    let f = dir.path.join("localdnsconfig.json");
    std::fs::write(&f, json).unwrap();
    let out = Command::new(daemon_bin())
        .arg("check-config")
        .arg(&f)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
}

/// The DaemonSet's container arguments with its environment substituted
/// the way the kubelet does (`$(VAR)`), for this test network.
fn daemonset_args(config: &Path) -> Vec<String> {
    let ds = manifest("daemonset.yaml");
    let c = &ds["spec"]["template"]["spec"]["containers"][0];
    c["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            a.as_str()
                .unwrap()
                .replace("$(LOCALDNS_IFACE)", "vpod*")
                .replace("$(CLUSTER_DNS)", UPSTREAM_IP)
                .replace(
                    "/etc/localdns/localdnsconfig.json",
                    config.to_str().unwrap(),
                )
        })
        .collect()
}

/// Two daemons as a `maxSurge: 1` rollout runs them on one node: the new
/// pod starts (same pins, same ports, probes included) while the old one
/// still answers, the old one then gets SIGTERM. Under 2,000 queries/s (a
/// quarter of them uncached) nothing fails, and the new pod's /ready is
/// reachable while both run.
#[test]
fn daemonset_rollout_hands_over_with_no_failed_query() {
    let mut t = Topo::new();
    let config = t.dir.path.join("localdnsconfig.json");
    std::fs::write(&config, read("localdns-user/default-localdnsconfig.json")).unwrap();
    let mut args = daemonset_args(&config);
    // dnsPolicy Default gives the node's resolv.conf; here, the test's NSD.
    args.push(format!("--vnet-dns={UPSTREAM_IP}"));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    t.start_daemon_raw(&args);
    let ready = |t: &Topo| {
        t.node
            .output(
                "/usr/bin/python3",
                &[
                    "-c",
                    "import urllib.request as u; print(u.urlopen('http://169.254.10.10:8181/ready', timeout=2).status)",
                ],
            )
            .status
            .success()
    };
    assert!(ready(&t), "first pod not ready");
    let targets = vec![
        Target::Fixed {
            name: "www.example.test.".into(),
            addr: Ipv4Addr::new(192, 0, 2, 10),
        },
        Target::Fixed {
            name: "ns.example.test.".into(),
            addr: Ipv4Addr::new(192, 0, 2, 53),
        },
        Target::Fixed {
            name: "alias.example.test.".into(),
            addr: Ipv4Addr::new(192, 0, 2, 10),
        },
        Target::Unique {
            suffix: "fresh.example.test.".into(),
            addr: Ipv4Addr::new(192, 0, 2, 77),
        },
    ];
    let load = Load::start(
        &t.pod,
        Spec {
            server: SocketAddr::new(VNET.parse().unwrap(), 53),
            rate: 2000,
            duration: Duration::from_secs(6),
            timeout: Duration::from_secs(1),
            targets,
        },
    );
    std::thread::sleep(Duration::from_secs(2));
    let next = t.spawn_daemon(&args, "daemon-2.log");
    let log2 = t.log("daemon-2.log");
    assert!(
        !log2.contains("metrics/health listener not started"),
        "the new pod could not bind its probe port:\n{log2}"
    );
    assert!(ready(&t), "/ready unreachable with both pods up");
    let mut old = t.daemon.replace(next).unwrap();
    assert!(
        old.terminate(Duration::from_secs(30)),
        "old pod did not stop"
    );
    let r = load.finish();
    let failed = r.failed(|_| true);
    println!(
        "DaemonSet rollout under {} queries: {} failed",
        r.sent(|_| true),
        failed.len()
    );
    assert!(failed.is_empty(), "{}", r.sample(|_| true));
    assert!(t.daemon_alive());
    let back = wait_for(Duration::from_secs(5), || ready(&t).then_some(()));
    assert!(back.is_some(), "new pod not ready after the hand-over");
}

/// The image `cargo xtask image` builds (and `cargo xtask test` before the
/// tests run).
const IMAGE: &str = concat!("localhost/localdns:", env!("CARGO_PKG_VERSION"));

fn buildah(args: &[&str]) -> String {
    let out = Command::new("buildah").args(args).output().unwrap();
    assert!(out.status.success(), "buildah {args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A working container of the image, mounted; unmounted and removed on
/// drop.
struct Mounted {
    ctr: String,
    root: PathBuf,
}

impl Mounted {
    fn new(image: &str) -> Mounted {
        let ctr = buildah(&["from", "--pull-never", image]);
        let root = PathBuf::from(buildah(&["mount", &ctr]));
        Mounted { ctr, root }
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("buildah").args(["umount", &self.ctr]).output();
        let _ = Command::new("buildah").args(["rm", &self.ctr]).output();
    }
}

/// Files of a tree, relative, sorted.
fn files(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p.strip_prefix(root).unwrap().display().to_string());
            }
        }
    }
    out.sort();
    out
}

/// The image's entrypoint in `t`'s node netns as a runtime would start it:
/// its own root (chroot) with sysfs, the node's bpffs and proc mounted, and
/// the image's environment only. Arguments go after.
fn run_image(t: &Topo, root: &Path, cfg: &Value) -> Command {
    let root = root.display();
    let script = format!(
        "mount -t sysfs sysfs {root}/sys && mount --bind {bpffs} {root}/sys/fs/bpf && \
         mount -t proc proc {root}/proc && exec chroot {root} /usr/bin/localdns-user \"$@\"",
        bpffs = t.bpffs.path.display()
    );
    let mut cmd = t.node.cmd("unshare");
    cmd.env_clear();
    for kv in cfg["Env"].as_array().unwrap() {
        let (k, v) = kv.as_str().unwrap().split_once('=').unwrap();
        cmd.env(k, v);
    }
    cmd.args([
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        &script,
        "sh",
    ]);
    cmd
}

/// The image's OCI config says what the DaemonSet relies on; its content
/// is the static daemon plus nft and its libraries (no shell, no package
/// manager); and its entrypoint, run with chroot in a test node netns the
/// way a runtime would (sysfs, the host's bpffs, proc), answers queries,
/// attaches its fast path (kernel hits) and installs NOTRACK through the
/// image's own nft.
#[test]
fn image_runs_chrooted_in_a_test_netns_with_its_fast_path() {
    let inspect: Value =
        serde_json::from_str(&buildah(&["inspect", "--type", "image", IMAGE])).unwrap();
    let cfg = &inspect["OCIv1"]["config"];
    assert_eq!(
        cfg["Entrypoint"],
        serde_json::json!(["/usr/bin/localdns-user"])
    );
    assert_eq!(cfg["User"], "0:0");
    assert_eq!(cfg["Labels"]["org.opencontainers.image.title"], "localdns");
    assert_eq!(
        cfg["Labels"]["org.opencontainers.image.version"],
        env!("CARGO_PKG_VERSION")
    );
    let m = Mounted::new(IMAGE);
    let content = files(&m.root);
    assert!(
        content.contains(&"usr/bin/localdns-user".to_string()),
        "{content:?}"
    );
    assert!(content.contains(&"usr/sbin/nft".to_string()), "{content:?}");
    for f in &content {
        assert!(
            f.starts_with("usr/bin/localdns-user")
                || f.starts_with("usr/sbin/nft")
                || f.starts_with("lib")
                || f.starts_with("usr/lib")
                || f == "etc/localdns/localdnsconfig.json",
            "unexpected file in the image: {f}"
        );
    }
    let file = Command::new("file")
        .arg(m.root.join("usr/bin/localdns-user"))
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    assert!(file.is_empty() || file.contains("static"), "{file}");

    let t = Topo::new();
    let mut cmd = run_image(&t, &m.root, cfg);
    cmd.args(["--vnet-dns", UPSTREAM_IP, "--cluster-dns", UPSTREAM_IP]);
    cmd.args(["--iface", "vpod*", "--fastpath", "required"]);
    cmd.args(["--metrics", "none", "--health", "none"]);
    let log = t.dir.path.join("image.log");
    let mut d = Proc::spawn(cmd, "localdns-user (image)", &log);
    let ready = wait_for(Duration::from_secs(20), || {
        let l = std::fs::read_to_string(&log).unwrap_or_default();
        l.contains("localdns ready").then_some(())
    });
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
    assert!(ready.is_some(), "image daemon not ready:\n{}", log_text());
    assert_eq!(t.dig(VNET, "www.example.test", "A").unwrap().0, "NOERROR");
    let hits = t.kernel_stat("hit");
    assert_eq!(t.dig(VNET, "www.example.test", "A").unwrap().0, "NOERROR");
    assert_eq!(
        t.kernel_stat("hit"),
        hits + 1,
        "no kernel hit:\n{}",
        log_text()
    );
    let link = t.node.sh_ok("ip", &["-d", "link", "show", "vpod0"]);
    assert!(link.contains("prog/xdp"), "{link}");
    assert!(!log_text().contains("ERROR"), "{}", log_text());
    let rules = t.node.output("nft", &["list", "table", "inet", "localdns"]);
    let rules = String::from_utf8_lossy(&rules.stdout);
    assert!(rules.contains("notrack"), "{rules}\n{}", log_text());
    assert!(d.terminate(Duration::from_secs(10)));
    // The teardown DaemonSet's command, from the same image.
    let mut cmd = run_image(&t, &m.root, cfg);
    let out = cmd.arg("teardown").output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let link = t.node.sh_ok("ip", &["-d", "link", "show", "vpod0"]);
    assert!(!link.contains("prog/xdp"), "{link}");
    let gone = t.node.output("nft", &["list", "table", "inet", "localdns"]);
    assert!(!gone.status.success(), "NOTRACK table left");
}
