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
fn render_corefile_prints_the_aks_corefile() {
    let sample = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../localdns-user/default-localdnsconfig.json"
    );
    let golden = include_str!("../../localdns-user/testdata/sample.Corefile");
    let (code, out, _) = run(&["render-corefile", sample]);
    assert_eq!(code, 0);
    assert_eq!(out, golden);
    // The health-check block plus one block per zone and view.
    assert_eq!(out.matches(":53 {").count(), 5, "{out}");
}

#[test]
fn an_invalid_mode_is_an_error() {
    let dir = std::env::temp_dir().join(format!("ldns-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join("bad-mode.json");
    std::fs::write(&f, r#"{"localDNSProfile":{"mode":"Sometimes"}}"#).unwrap();
    let (code, _, err) = run(&["check-config", f.to_str().unwrap()]);
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(code, 1);
    assert!(err.contains("$.localDNSProfile.mode"), "{err}");
}
