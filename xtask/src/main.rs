//! `cargo xtask`: set-up, build, run, test and lint for localdns.
//!
//! Every command first makes sure the prerequisites are there (idempotent,
//! quick when they are): the nightly `rust-src` component and `bpf-linker`
//! 0.10.3 for the eBPF crate, and the Debian packages the daemon and the
//! tests use.

mod image;
mod vm;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

const BPF_LINKER_VERSION: &str = "0.10.3";
/// The peers `cargo xtask bench` compares against, from Debian.
const BENCH_PACKAGES: &[&str] = &[
    "unbound",
    "dnsdist",
    "knot-resolver",
    "dnsmasq-base",
    "knot-dnsutils",
    "dnsperf",
];
/// cargo-fuzz targets in fuzz/ (the daemon's query and reply parsing).
const FUZZ_TARGETS: [&str; 2] = ["client_query", "upstream_reply"];
const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// Debian packages: the daemon needs iproute2 and nftables; the tests need
/// real DNS clients and servers, bpftool, nsenter and setpriv,
/// systemd-analyze for the unit files, dnsmasq as a second-hop forwarder,
/// python3-venv for kubernetes-validate (from PyPI), buildah and binutils
/// for the image,
/// and qemu with a static busybox to
/// run the kernel tests on a second kernel.
const DEBIAN_PACKAGES: &[&str] = &[
    "iproute2",
    "dnsutils",
    "knot-dnsutils",
    "dnsperf",
    "nsd",
    "ldnsutils",
    "nftables",
    "bpftool",
    "util-linux",
    "python3",
    "python3-prometheus-client",
    "qemu-system-x86",
    "busybox-static",
    "systemd",
    "dnsmasq-base",
    "python3-venv",
    "buildah",
    "binutils",
];

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install missing prerequisites (toolchain parts and Debian packages).
    Prereqs,
    /// Build the release binary (eBPF object embedded).
    Build,
    /// Build, then run the daemon (as root) with the given arguments.
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Lint (fmt, clippy on userspace and eBPF crates), then run every test:
    /// unit, BPF_PROG_TEST_RUN (with a 10^6-frame fuzz run) and
    /// network-namespace integration tests, each cargo-fuzz target for 15 s,
    /// and the BPF_PROG_TEST_RUN tests again on Debian's 6.1 kernel under
    /// qemu.
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// fmt check and clippy -D warnings on both userspace and eBPF crates.
    Lint,
    /// Build the container image (static musl binary, from scratch, with
    /// buildah) as localhost/localdns:<version>.
    Image,
    /// Run each cargo-fuzz target (fuzz/) for this long (by hand; the test
    /// command runs them for 15 s).
    Fuzz {
        #[arg(long, default_value_t = 600)]
        secs: u32,
    },
    /// Run a shell command on Debian's 6.1 kernel under qemu (host root
    /// shared read-only, working directory kept), e.g. a test binary.
    Vm {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
        cmd: Vec<String>,
    },
    /// Side-by-side benchmark against Unbound, dnsdist, Knot Resolver and
    /// dnsmasq (as root); writes docs/bench/ and the README table.
    Bench {
        /// Smoke run (< 3 min), written under target/bench-quick/.
        #[arg(long)]
        quick: bool,
        /// The daemon's `--fastpath-entries` (default 65,536: room for
        /// the sweep's 50,000 names); the kernel table is 512 bytes per
        /// entry.
        #[arg(long)]
        fastpath_entries: Option<u32>,
        /// Only this contender (plus the null responder), e.g. `unbound`.
        only: Option<String>,
    },
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("+ {cmd:?}");
    let st = cmd.status().with_context(|| format!("spawning {cmd:?}"))?;
    if !st.success() {
        bail!("{cmd:?} failed: {st}");
    }
    Ok(())
}

fn succeeds(cmd: &mut Command) -> bool {
    cmd.output().map(|o| o.status.success()).unwrap_or(false)
}

fn prereqs() -> Result<()> {
    prereqs_with(DEBIAN_PACKAGES)
}

fn prereqs_with(packages: &[&str]) -> Result<()> {
    // rust-src builds core for the BPF target; clippy lints the eBPF crate.
    let installed = Command::new("rustup")
        .args(["component", "list", "--toolchain", "nightly", "--installed"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    for component in ["rust-src", "clippy"] {
        if !installed.lines().any(|l| l.starts_with(component)) {
            run(Command::new("rustup").args([
                "component",
                "add",
                component,
                "--toolchain",
                "nightly",
            ]))?;
        }
    }
    // The container image's static binary.
    let targets = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    if !targets.lines().any(|t| t.trim() == image::MUSL) {
        run(Command::new("rustup").args(["target", "add", image::MUSL]))?;
    }
    let linker_ok = Command::new("bpf-linker")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION))
        .unwrap_or(false);
    if !linker_ok {
        // Newer releases need a system LLVM 21+; this one uses rustc's LLVM.
        run(Command::new("cargo").args([
            "install",
            &format!("bpf-linker@{BPF_LINKER_VERSION}"),
            "--locked",
            "--force",
        ]))?;
    }
    let fuzz_ok = Command::new("cargo")
        .args(["fuzz", "--version"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains(CARGO_FUZZ_VERSION))
        .unwrap_or(false);
    if !fuzz_ok {
        run(Command::new("cargo").args([
            "install",
            &format!("cargo-fuzz@{CARGO_FUZZ_VERSION}"),
            "--locked",
        ]))?;
    }
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| !succeeds(Command::new("dpkg").args(["-s", p])))
        .collect();
    if !missing.is_empty() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc_geteuid() } != 0 {
            bail!("missing Debian packages {missing:?}: run as root or apt-get install them");
        }
        run(Command::new("apt-get").args(["update", "-q"]))?;
        run(Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }
    if packages.contains(&"python3-venv") {
        python_tools()?;
    }
    Ok(())
}

/// kubernetes-validate (it bundles the Kubernetes OpenAPI schemas) in a
/// virtualenv under target/, for the manifest tests.
const KUBERNETES_VALIDATE: &str = "kubernetes-validate==1.37.0";

fn python_tools() -> Result<()> {
    let venv = root().join("target/pyenv");
    if venv.join("bin/kubernetes-validate").exists() {
        return Ok(());
    }
    run(Command::new("/usr/bin/python3")
        .args(["-m", "venv"])
        .arg(&venv))?;
    run(Command::new(venv.join("bin/pip")).args(["install", "-q", KUBERNETES_VALIDATE]))
}

unsafe extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root());
    c
}

fn build() -> Result<()> {
    run(cargo().args(["build", "--release", "-p", "localdns-user"]))
}

fn lint() -> Result<()> {
    run(cargo().args(["fmt", "--all", "--check"]))?;
    run(Command::new("cargo")
        .current_dir(root().join("fuzz"))
        .args(["fmt", "--check"]))?;
    run(cargo().args([
        "clippy",
        "--release",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    run(Command::new("cargo")
        .current_dir(root().join("localdns-ebpf"))
        .env_remove("RUSTC")
        .env_remove("CARGO")
        .args([
            "+nightly",
            "clippy",
            "--release",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
            "--",
            "-D",
            "warnings",
        ]))
}

/// Each cargo-fuzz target of fuzz/ for `secs` seconds, from the committed
/// seeds (fuzz/corpus/<target>, read only) plus what earlier runs found
/// (target/fuzz-corpus/<target>). A crash fails the run and leaves the
/// input in fuzz/artifacts/.
fn fuzz_briefly(secs: u32) -> Result<()> {
    for t in FUZZ_TARGETS {
        let work = root().join("target/fuzz-corpus").join(t);
        std::fs::create_dir_all(&work)?;
        run(Command::new("cargo")
            .current_dir(root().join("fuzz"))
            .env_remove("RUSTC")
            .env_remove("CARGO")
            .args(["+nightly", "fuzz", "run", "--sanitizer", "none", t])
            .arg(&work)
            .arg(root().join("fuzz/corpus").join(t))
            .args(["--", &format!("-max_total_time={secs}")]))?;
    }
    Ok(())
}

fn in_vm(cmd: &str) -> Result<i32> {
    let k = vm::kernel(&root().join("target/vm-kernel"))?;
    vm::run(
        &k,
        &root().join("target/vm"),
        cmd,
        &root(),
        // Room for a slow CI machine: the torn-read test alone may run
        // 60 s there.
        Duration::from_secs(600),
    )
}

/// The BPF_PROG_TEST_RUN tests (tests/tests/kernel.rs, and a shorter
/// kernel_fuzz.rs run: software emulation is slow) on Debian's 6.1
/// kernel: the same binaries that just ran on this machine's kernel.
fn kernel_tests_in_vm() -> Result<()> {
    let exe = |name: &str| -> Result<String> {
        let out = cargo()
            .args([
                "test",
                "--release",
                "-p",
                "localdns-tests",
                "--test",
                name,
                "--no-run",
                "--message-format=json",
            ])
            .output()
            .context("cargo test --no-run")?;
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|m| m["target"]["name"] == name && m["executable"].is_string())
            .and_then(|m| m["executable"].as_str().map(String::from))
            .with_context(|| format!("{name} test binary not found"))
    };
    let (kernel, fuzz) = (exe("kernel")?, exe("kernel_fuzz")?);
    let code = in_vm(&format!(
        // The timing reports are skipped: under software emulation they
        // measure the emulator.
        "sh -c '{kernel} --test-threads=1 --skip hit_cost_report --skip warm_set_cost_report && LOCALDNS_FUZZ_PACKETS=300000 {fuzz} --nocapture'"
    ))?;
    if code != 0 {
        bail!("kernel tests on Linux 6.1 failed (exit status {code})");
    }
    eprintln!("kernel tests passed on Linux 6.1 (qemu)");
    Ok(())
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Prereqs => prereqs(),
        Cmd::Build => {
            prereqs()?;
            build()
        }
        Cmd::Run { args } => {
            prereqs()?;
            build()?;
            let bin = root().join("target/release/localdns-user");
            run(Command::new(bin).args(args))
        }
        Cmd::Image => {
            prereqs()?;
            image::build()
        }
        Cmd::Lint => {
            prereqs()?;
            lint()
        }
        Cmd::Fuzz { secs } => {
            prereqs()?;
            fuzz_briefly(secs)
        }
        Cmd::Bench {
            quick,
            fastpath_entries,
            only,
        } => {
            prereqs_with(&[DEBIAN_PACKAGES, BENCH_PACKAGES].concat())?;
            build()?;
            run(cargo().args(["build", "--release", "-p", "localdns-tests", "--bins"]))?;
            let mut c = Command::new(root().join("target/release/bench"));
            if quick {
                c.arg("--quick");
            }
            if let Some(n) = fastpath_entries {
                c.arg(format!("--fastpath-entries={n}"));
            }
            c.args(only);
            run(&mut c)
        }
        Cmd::Vm { cmd } => {
            prereqs()?;
            let code = in_vm(&cmd.join(" "))?;
            std::process::exit(code);
        }
        Cmd::Test { args } => {
            prereqs()?;
            lint()?;
            build()?;
            // The image test runs the image this builds.
            image::build()?;
            let bin = root().join("target/release/localdns-user");
            run(cargo()
                .args(["test", "--release"])
                .env("LOCALDNS_BIN", bin)
                .arg("--")
                .args(&args))?;
            if args.is_empty() {
                fuzz_briefly(15)?;
                kernel_tests_in_vm()
            } else {
                Ok(())
            }
        }
    }
}
