//! The CLI contract: check-config and render-corefile (no root needed).

use std::process::Command;

use localdns_tests::topo::daemon_bin;

fn run(args: &[&str]) -> (i32, String, String) {
    let o = Command::new(daemon_bin()).args(args).output().unwrap();
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into(),
        String::from_utf8_lossy(&o.stderr).into(),
    )
}

fn write(name: &str, text: &str) -> std::path::PathBuf {
    let p = std::env::temp_dir().join(format!("localdns-cli-{}-{name}", std::process::id()));
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn check_config_accepts_the_sample_with_warnings() {
    let sample = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../localdns-user/default-localdnsconfig.json"
    );
    let (code, out, _) = run(&["check-config", sample]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(out.matches("warning: ").count(), 2, "{out}");
    assert!(out.contains("OK (mode Preferred)"), "{out}");
}

#[test]
fn check_config_lists_every_error_and_fails() {
    let p = write(
        "bad.json",
        r#"{"localDNSProfile":{"mode":"Required","vnetDNSOverrides":{".":{"forwardDestination":"ClusterCoreDNS","maxConcurrent":0,"cacheDurationInSeconds":99999999}},"kubeDNSOverrides":{"cluster.local":{"forwardDestination":"VnetDNS","typo":1}}}}"#,
    );
    let (code, _, err) = run(&["check-config", p.to_str().unwrap()]);
    std::fs::remove_file(&p).unwrap();
    assert_eq!(code, 1, "{err}");
    for path in [
        r#"vnetDNSOverrides["."].forwardDestination"#,
        r#"vnetDNSOverrides["."].maxConcurrent"#,
        r#"vnetDNSOverrides["."].cacheDurationInSeconds"#,
        r#"kubeDNSOverrides["cluster.local"].forwardDestination"#,
        r#"kubeDNSOverrides["cluster.local"].typo"#,
    ] {
        assert!(err.contains(path), "missing {path} in:\n{err}");
    }
    let p = write("syntax.json", "{ nope");
    let (code, _, err) = run(&["check-config", p.to_str().unwrap()]);
    std::fs::remove_file(&p).unwrap();
    assert_eq!(code, 1);
    assert!(err.contains("not valid JSON"), "{err}");
}

#[test]
fn render_corefile_prints_one_block_per_zone_and_view() {
    let sample = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../localdns-user/default-localdnsconfig.json"
    );
    let (code, out, _) = run(&["render-corefile", sample, "--cluster-dns", "10.0.0.10"]);
    assert_eq!(code, 0);
    assert_eq!(out.matches(":53 {").count(), 4, "{out}");
    assert_eq!(out.matches("bind 169.254.10.10").count(), 2);
    assert_eq!(out.matches("bind 169.254.10.11").count(), 2);
    assert_eq!(out.matches("force_tcp").count(), 2);
}
