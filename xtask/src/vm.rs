//! Runs a command on a second kernel: Debian's generic 6.1 kernel under
//! qemu (software emulation; no KVM here), with the host's root shared
//! read-only over virtio-9p and a tmpfs overlay on top, so host-built test
//! binaries run unchanged. The command's output comes back on the second
//! serial port (the kernel log goes to a file), its exit status through
//! the isa-debug-exit device.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// Modules the guest loads from the unpacked kernel package, in order.
const MODULES: &[&str] = &[
    "drivers/virtio/virtio_ring",
    "drivers/virtio/virtio",
    "drivers/virtio/virtio_pci_modern_dev",
    "drivers/virtio/virtio_pci_legacy_dev",
    "drivers/virtio/virtio_pci",
    "fs/netfs/netfs",
    "fs/fscache/fscache",
    "net/9p/9pnet",
    "net/9p/9pnet_virtio",
    "fs/9p/9p",
    "fs/overlayfs/overlay",
];

/// The kernel used: Debian's newest generic 6.1 package (the cloud
/// flavour has no 9p).
pub struct Kernel {
    pub version: String,
    pub vmlinuz: PathBuf,
    pub modules: PathBuf,
}

/// Downloads and unpacks the kernel into `cache` (once).
pub fn kernel(cache: &Path) -> Result<Kernel> {
    let out = Command::new("apt-cache")
        .args([
            "search",
            "--names-only",
            r"^linux-image-6\.1\.0-[0-9]+-amd64-unsigned$",
        ])
        .output()
        .context("apt-cache")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let abi = text
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter_map(|p| {
            let n = p
                .strip_prefix("linux-image-6.1.0-")?
                .strip_suffix("-amd64-unsigned")?;
            n.parse::<u32>().ok()
        })
        .max()
        .context("no linux-image-6.1.0-*-amd64-unsigned package (apt-get update?)")?;
    let version = format!("6.1.0-{abi}-amd64");
    let root = cache.join(&version);
    let vmlinuz = root.join(format!("boot/vmlinuz-{version}"));
    let modules = root.join(format!("lib/modules/{version}/kernel"));
    if !vmlinuz.exists() {
        std::fs::create_dir_all(cache)?;
        let pkg = format!("linux-image-{version}-unsigned");
        eprintln!("+ apt-get download {pkg} (into {})", cache.display());
        let st = Command::new("apt-get")
            .args(["download", &pkg])
            .current_dir(cache)
            .status()?;
        if !st.success() {
            bail!("apt-get download {pkg} failed");
        }
        let deb = std::fs::read_dir(cache)?
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with(&pkg))
            })
            .context("downloaded package not found")?;
        let tmp = cache.join(format!("{version}.tmp"));
        let _ = std::fs::remove_dir_all(&tmp);
        let st = Command::new("dpkg-deb")
            .arg("-x")
            .arg(&deb)
            .arg(&tmp)
            .status()?;
        if !st.success() {
            bail!("dpkg-deb -x {} failed", deb.display());
        }
        std::fs::rename(&tmp, &root)?;
        std::fs::remove_file(&deb)?;
    }
    Ok(Kernel {
        version,
        vmlinuz,
        modules,
    })
}

/// The guest's /init: modules, the host root read-only under a tmpfs
/// overlay (so every path, /tmp included, is the host's and writable), the
/// usual pseudo file systems, then `/cmd` run in `cwd` with its output on
/// ttyS1 and its exit status written to port 0xf4.
const INIT: &str = r#"#!/bin/busybox sh
B=/bin/busybox
$B mkdir -p /proc /sys /dev /host /ovl /newroot
$B mount -t proc proc /proc
$B mount -t sysfs sys /sys
$B mount -t devtmpfs dev /dev
for m in $($B cat /modules); do $B insmod /lib/mod/$m.ko || echo "insmod $m failed"; done
$B mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=1048576,cache=loose host /host || $B poweroff -f
$B mount -t tmpfs tmpfs /ovl
$B mkdir -p /ovl/upper /ovl/work
$B mount -t overlay overlay -o lowerdir=/host,upperdir=/ovl/upper,workdir=/ovl/work /newroot
$B mount -t proc proc /newroot/proc
$B mount -t sysfs sys /newroot/sys
$B mount -t devtmpfs dev /newroot/dev
$B mount -t bpf bpf /newroot/sys/fs/bpf
$B mount -t tracefs tracefs /newroot/sys/kernel/tracing 2>/dev/null
$B mount -t debugfs debugfs /newroot/sys/kernel/debug 2>/dev/null
$B stty -F /dev/ttyS1 raw -echo
$B chroot /newroot /bin/sh -c "cd $($B cat /cwd) && exec $($B cat /cmd)" > /dev/ttyS1 2>&1
rc=$?
[ $rc -gt 255 ] && rc=255
$B printf "\\$($B printf %o $rc)" | $B dd of=/dev/port bs=1 seek=244 count=1 2>/dev/null
$B poweroff -f
"#;

/// Builds the initramfs for one command.
fn initramfs(k: &Kernel, dir: &Path, cmd: &str, cwd: &Path) -> Result<PathBuf> {
    let root = dir.join("initramfs");
    let _ = std::fs::remove_dir_all(&root);
    for d in ["bin", "lib/mod"] {
        std::fs::create_dir_all(root.join(d))?;
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).context("busybox-static")?;
    let mut names = Vec::new();
    for m in MODULES {
        let name = Path::new(m)
            .file_name()
            .unwrap()
            .to_string_lossy()
            .to_string();
        std::fs::copy(
            k.modules.join(format!("{m}.ko")),
            root.join(format!("lib/mod/{name}.ko")),
        )
        .with_context(|| format!("module {m}"))?;
        names.push(name);
    }
    std::fs::write(root.join("modules"), names.join("\n"))?;
    std::fs::write(root.join("cmd"), cmd)?;
    std::fs::write(root.join("cwd"), cwd.to_string_lossy().as_bytes())?;
    let init = root.join("init");
    std::fs::write(&init, INIT)?;
    std::fs::set_permissions(&init, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let cpio = dir.join("initramfs.cpio");
    let list = Command::new("find")
        .arg(".")
        .current_dir(&root)
        .output()?
        .stdout;
    let mut child = Command::new("/bin/busybox")
        .args(["cpio", "-o", "-H", "newc"])
        .current_dir(&root)
        .stdin(Stdio::piped())
        .stdout(std::fs::File::create(&cpio)?)
        .spawn()?;
    child.stdin.take().unwrap().write_all(&list)?;
    if !child.wait()?.success() {
        bail!("cpio failed");
    }
    Ok(cpio)
}

/// Runs `cmd` (a shell command line) in the guest with `cwd` as working
/// directory; returns its exit status. Output is streamed to our stdout;
/// the kernel log is kept in `dir/kernel.log`.
pub fn run(k: &Kernel, dir: &Path, cmd: &str, cwd: &Path, limit: Duration) -> Result<i32> {
    std::fs::create_dir_all(dir)?;
    let cpio = initramfs(k, dir, cmd, cwd)?;
    let klog = dir.join("kernel.log");
    let mut q = Command::new("qemu-system-x86_64");
    q.args([
        "-machine", "q35", "-accel", "tcg", "-cpu", "max", "-m", "1G", "-smp", "2",
    ])
    .args([
        "-nodefaults",
        "-no-reboot",
        "-display",
        "none",
        "-monitor",
        "none",
    ])
    .arg("-kernel")
    .arg(&k.vmlinuz)
    .arg("-initrd")
    .arg(&cpio)
    .args(["-append", "console=ttyS0 panic=-1 rdinit=/init"])
    .arg("-serial")
    .arg(format!("file:{}", klog.display()))
    .args(["-serial", "stdio"])
    .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"])
    .args([
        "-virtfs",
        "local,path=/,mount_tag=host,security_model=passthrough,readonly=on,multidevs=remap",
    ])
    .stdin(Stdio::null());
    eprintln!("+ qemu ({}): {cmd}", k.version);
    let mut child = q.spawn().context("qemu-system-x86_64")?;
    let t0 = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if t0.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "the VM run exceeded {limit:?}; kernel log: {}",
                klog.display()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    // isa-debug-exit: qemu exits with (code << 1) | 1.
    match status.code() {
        Some(c) if c % 2 == 1 => Ok(c >> 1),
        other => bail!(
            "the VM ended without an exit status ({other:?}); kernel log: {}",
            klog.display()
        ),
    }
}
