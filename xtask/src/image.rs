//! `cargo xtask image`: the container image, built from scratch with
//! Debian's buildah (no base image is pulled): the static (musl) daemon,
//! and `nft` with the shared libraries it loads (the NOTRACK rules are
//! applied through it), nothing else.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::{cargo, root, run};

pub const MUSL: &str = "x86_64-unknown-linux-musl";
/// The image the DaemonSet names and the image test runs.
pub const IMAGE: &str = concat!("localhost/localdns:", env!("CARGO_PKG_VERSION"));

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("{cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// `nft` and every shared object it loads, as ldd lists them.
fn nft_closure() -> Result<Vec<PathBuf>> {
    let nft = PathBuf::from("/usr/sbin/nft");
    let ldd = output(Command::new("ldd").arg(&nft))?;
    let mut files = vec![nft];
    for line in ldd.lines() {
        // "libx.so.1 => /lib/.../libx.so.1 (0x...)" or "/lib64/ld-linux... (0x...)"
        let path = line
            .split("=>")
            .last()
            .and_then(|s| s.split_whitespace().next())
            .filter(|p| p.starts_with('/'));
        if let Some(p) = path {
            files.push(PathBuf::from(p));
        }
    }
    Ok(files)
}

/// Copies `src` to the same absolute path under `root`, following links.
fn stage(root: &Path, src: &Path) -> Result<()> {
    let dst = root.join(src.strip_prefix("/")?);
    std::fs::create_dir_all(dst.parent().unwrap())?;
    std::fs::copy(src, &dst).with_context(|| format!("copy {}", src.display()))?;
    Ok(())
}

pub fn build() -> Result<()> {
    run(cargo().args([
        "build",
        "--release",
        "-p",
        "localdns-user",
        "--target",
        MUSL,
    ]))?;
    let bin = root().join(format!("target/{MUSL}/release/localdns-user"));
    let rootfs = root().join("target/image-root");
    if rootfs.exists() {
        std::fs::remove_dir_all(&rootfs)?;
    }
    for d in [
        "usr/bin",
        "sys/fs/bpf",
        "proc",
        "etc/localdns",
        "run",
        "tmp",
    ] {
        std::fs::create_dir_all(rootfs.join(d))?;
    }
    let dst = rootfs.join("usr/bin/localdns-user");
    run(Command::new("strip")
        .arg("--strip-debug")
        .arg(&bin)
        .arg("-o")
        .arg(&dst))?;
    for f in nft_closure()? {
        stage(&rootfs, &f)?;
    }
    std::fs::copy(
        root().join("localdns-user/default-localdnsconfig.json"),
        rootfs.join("etc/localdns/localdnsconfig.json"),
    )?;
    let ctr = output(Command::new("buildah").args(["from", "scratch"]))?;
    let result = (|| -> Result<()> {
        run(Command::new("buildah")
            .args(["copy", &ctr])
            .arg(&rootfs)
            .arg("/"))?;
        let version = env!("CARGO_PKG_VERSION");
        run(Command::new("buildah").args([
            "config",
            "--entrypoint",
            r#"["/usr/bin/localdns-user"]"#,
            "--cmd",
            "",
            "--user",
            "0:0",
            "--env",
            "PATH=/usr/sbin:/usr/bin",
            "--port",
            "53/udp",
            "--port",
            "53/tcp",
            "--port",
            "9253/tcp",
            "--label",
            "org.opencontainers.image.title=localdns",
            "--label",
            "org.opencontainers.image.description=Node-local DNS cache for Kubernetes answering cache hits in the kernel (XDP/TC)",
            "--label",
            &format!("org.opencontainers.image.version={version}"),
            "--label",
            "org.opencontainers.image.source=localdns",
            &ctr,
        ]))?;
        run(Command::new("buildah").args(["commit", "--rm", "-q", &ctr, IMAGE]))
    })();
    if result.is_err() {
        let _ = Command::new("buildah").args(["rm", &ctr]).output();
    }
    result?;
    println!("built {IMAGE}");
    Ok(())
}
