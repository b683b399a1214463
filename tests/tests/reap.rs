//! A run killed before its guards ran (SIGKILL, a CI timeout) leaves
//! namespaces with processes in them, a mounted bpffs, a temp directory and
//! a memory cgroup with a process in it. The next run removes exactly
//! those, and nothing of a run that is still alive.

use std::path::Path;
use std::process::{Child, Command, Stdio};

use localdns_tests::cgroup::MemCgroup;
use localdns_tests::netns::{BpfFs, Netns, TempDir, unique_tag};
use localdns_tests::reap::{live_runs, reap_run, reap_stale};

/// What one run holds: guards, and two processes (in the netns, in the
/// cgroup).
struct Held {
    dir: TempDir,
    bpffs: BpfFs,
    ns: Netns,
    cg: MemCgroup,
    in_ns: Child,
    in_cg: Child,
}

fn hold(tag: &str) -> Held {
    let dir = TempDir::new(tag);
    let bpffs = BpfFs::new(dir.path.join("bpffs"));
    let ns = Netns::new(format!("{tag}-r"));
    let in_ns = ns
        .cmd("sleep")
        .arg("120")
        .stdin(Stdio::null())
        .spawn()
        .expect("sleep in the netns");
    let cg = MemCgroup::new(tag, 64 << 20);
    let mut c = Command::new("sleep");
    c.arg("120").stdin(Stdio::null());
    cg.enter_on_spawn(&mut c);
    let in_cg = c.spawn().expect("sleep in the cgroup");
    Held {
        dir,
        bpffs,
        ns,
        cg,
        in_ns,
        in_cg,
    }
}

fn netns_exists(name: &str) -> bool {
    let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|l| l.split_whitespace().next() == Some(name))
}

fn mounted(p: &Path) -> bool {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let p = p.to_string_lossy();
    info.lines().any(|l| l.split(' ').nth(4) == Some(&*p))
}

/// Removes the fake dead run's resources even if the test fails.
struct Sweep(u32);

impl Drop for Sweep {
    fn drop(&mut self) {
        reap_run(self.0);
    }
}

/// Reaped child: exited (killed), not still running.
fn gone(c: &mut Child) -> bool {
    for _ in 0..100 {
        if let Ok(Some(_)) = c.try_wait() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    false
}

#[test]
fn a_killed_runs_leftovers_are_removed_and_a_live_runs_are_kept() {
    assert!(localdns_tests::is_root(), "needs root (CI runs as root)");
    // A run number no process has: the "killed" run.
    let live = live_runs();
    let dead = (1..100_000u32)
        .rev()
        .find(|n| !live.contains(n))
        .expect("a free run number");
    let _sweep = Sweep(dead);
    let stale = hold(&format!("ld{dead}x0"));
    let alive = hold(&unique_tag());
    let (stale_ns, stale_mount, stale_dir, stale_cg) = (
        stale.ns.name.clone(),
        stale.bpffs.path.clone(),
        stale.dir.path.clone(),
        stale.cg.path.clone(),
    );
    let (mut stale_in_ns, mut stale_in_cg) = (stale.in_ns, stale.in_cg);
    // The killed run's guards never run.
    std::mem::forget(stale.dir);
    std::mem::forget(stale.bpffs);
    std::mem::forget(stale.ns);
    std::mem::forget(stale.cg);
    assert!(netns_exists(&stale_ns) && mounted(&stale_mount) && stale_cg.exists());

    let removed = reap_stale();

    for what in [
        &stale_ns,
        &*stale_mount.to_string_lossy(),
        &*stale_cg.to_string_lossy(),
    ] {
        assert!(
            removed.iter().any(|r| r.contains(what)),
            "{what} not in {removed:?}"
        );
    }
    assert!(!netns_exists(&stale_ns), "netns left");
    assert!(gone(&mut stale_in_ns), "the netns's process still runs");
    assert!(!mounted(&stale_mount), "bpffs still mounted");
    assert!(!stale_dir.exists(), "temp dir left");
    assert!(gone(&mut stale_in_cg), "the cgroup's process still runs");
    assert!(!stale_cg.exists(), "cgroup left");

    // Nothing of the live run was touched.
    let Held {
        dir,
        bpffs,
        ns,
        cg,
        mut in_ns,
        mut in_cg,
    } = alive;
    assert!(netns_exists(&ns.name) && mounted(&bpffs.path) && dir.path.exists());
    assert!(cg.path.exists());
    assert!(matches!(in_ns.try_wait(), Ok(None)) && matches!(in_cg.try_wait(), Ok(None)));
    for c in [&mut in_ns, &mut in_cg] {
        let _ = c.kill();
        let _ = c.wait();
    }
    drop((bpffs, ns, cg, dir));
}
