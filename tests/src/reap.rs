//! What a test run leaves when it is killed before its guards run (SIGKILL,
//! a CI timeout, an interrupted bench): network namespaces and the
//! processes still in them, bpffs mounts (which keep programs attached and
//! maps pinned), temp directories and memory cgroups. All of them are named
//! after their run's tag (`ld<pid>x<n>`, [`crate::netns::unique_tag`]);
//! [`reap_stale`] removes those whose process is gone, [`reap_run`] those of
//! one run (a bench interrupted by a signal cleans up after itself).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Once;
use std::time::{Duration, Instant};

/// The run number in a tag-named resource: `N` of the first `ld<N>x<digit>`
/// in `name`.
pub fn run_of(name: &str) -> Option<u32> {
    let mut rest = name;
    while let Some(i) = rest.find("ld") {
        rest = &rest[i + 2..];
        let n = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        let after = &rest[n..];
        if n > 0 && after.starts_with('x') && after[1..].starts_with(|c: char| c.is_ascii_digit()) {
            return rest[..n].parse().ok();
        }
    }
    None
}

/// The run number this process's tags carry.
pub fn own_run() -> u32 {
    std::process::id() % 100_000
}

/// Run numbers that may belong to a live process (every pid, reduced as
/// tags reduce it: a false "alive" only keeps a leftover).
pub fn live_runs() -> HashSet<u32> {
    std::fs::read_dir("/proc")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
                .map(|pid| pid % 100_000)
                .collect()
        })
        .unwrap_or_default()
}

/// Removes the leftovers of runs whose process is gone; once per process
/// (later calls return nothing). Returns what was removed.
pub fn reap_stale_once() -> Vec<String> {
    static ONCE: Once = Once::new();
    let mut out = Vec::new();
    ONCE.call_once(|| out = reap_stale());
    out
}

/// Removes the leftovers of every run whose process is gone.
pub fn reap_stale() -> Vec<String> {
    let live = live_runs();
    let own = own_run();
    reap(|run| run != own && !live.contains(&run))
}

/// Removes everything of run `run` (this process's own, on a signal).
pub fn reap_run(run: u32) -> Vec<String> {
    reap(|r| r == run)
}

fn reap(stale: impl Fn(u32) -> bool) -> Vec<String> {
    let is_stale = |name: &str| run_of(name).is_some_and(&stale);
    let mut done = Vec::new();
    for ns in netns_names().into_iter().filter(|n| is_stale(n)) {
        let pids = netns_pids(&ns);
        for &pid in &pids {
            // SAFETY: kill(2); the pid was read from the namespace just now.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        let _ = Command::new("ip").args(["netns", "del", &ns]).output();
        let _ = std::fs::remove_dir_all(Path::new("/etc/netns").join(&ns));
        done.push(format!("netns {ns} ({} processes killed)", pids.len()));
    }
    // Mounts before the directories that hold them.
    for m in test_mounts()
        .into_iter()
        .filter(|m| is_stale(&m.to_string_lossy()))
    {
        let _ = Command::new("umount").arg(&m).output();
        done.push(format!("mount {}", m.display()));
    }
    for d in temp_dirs()
        .into_iter()
        .filter(|d| is_stale(&d.to_string_lossy()))
    {
        if std::fs::remove_dir_all(&d).is_ok() {
            done.push(format!("dir {}", d.display()));
        }
    }
    for cg in cgroups()
        .into_iter()
        .filter(|c| is_stale(&c.to_string_lossy()))
    {
        if remove_cgroup(&cg) {
            done.push(format!("cgroup {}", cg.display()));
        }
    }
    done
}

fn netns_names() -> Vec<String> {
    let out = Command::new("ip").args(["netns", "list"]).output();
    out.map(|o| {
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .filter_map(|l| l.split_whitespace().next().map(str::to_string))
            .collect()
    })
    .unwrap_or_default()
}

fn netns_pids(ns: &str) -> Vec<i32> {
    let out = Command::new("ip").args(["netns", "pids", ns]).output();
    out.map(|o| {
        String::from_utf8_lossy(&o.stdout)
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect()
    })
    .unwrap_or_default()
}

/// Mount points of ours (under a `localdns-test-*` directory), deepest
/// first.
fn test_mounts() -> Vec<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut v: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|p| p.contains("/localdns-test-"))
        // mountinfo escapes space, tab, newline and backslash as octal.
        .map(|p| PathBuf::from(p.replace("\\040", " ")))
        .collect();
    v.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    v
}

fn temp_dirs() -> Vec<PathBuf> {
    std::fs::read_dir(std::env::temp_dir())
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| {
                    e.file_name()
                        .to_string_lossy()
                        .starts_with("localdns-test-")
                })
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default()
}

/// `localdns-test-*` cgroups under the memory hierarchies (v1 `memory`,
/// v2 at the root or under `unified`), a few levels deep.
fn cgroups() -> Vec<PathBuf> {
    fn walk(dir: &Path, depth: u32, out: &mut Vec<PathBuf>) {
        let Ok(rd) = std::fs::read_dir(dir) else {
            return;
        };
        for e in rd.filter_map(|e| e.ok()) {
            if !e.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let p = e.path();
            if e.file_name()
                .to_string_lossy()
                .starts_with("localdns-test-")
            {
                out.push(p);
            } else if depth > 0 {
                walk(&p, depth - 1, out);
            }
        }
    }
    let mut out = Vec::new();
    for root in ["/sys/fs/cgroup/memory", "/sys/fs/cgroup/unified"] {
        walk(Path::new(root), 6, &mut out);
    }
    if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        walk(Path::new("/sys/fs/cgroup"), 6, &mut out);
    }
    out
}

/// Kills what is left in the cgroup and removes it (within 3 s).
fn remove_cgroup(cg: &Path) -> bool {
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(3) {
        let procs = std::fs::read_to_string(cg.join("cgroup.procs")).unwrap_or_default();
        for pid in procs.lines().filter_map(|p| p.trim().parse::<i32>().ok()) {
            // SAFETY: kill(2) on a process of a test's own cgroup.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        if std::fs::remove_dir(cg).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

#[cfg(test)]
mod tests {
    use super::run_of;

    #[test]
    fn run_of_finds_the_tag() {
        assert_eq!(run_of("ld17878x0-bnode"), Some(17878));
        assert_eq!(
            run_of("/tmp/localdns-test-bench-ld17878x12/bpffs"),
            Some(17878)
        );
        assert_eq!(run_of("localdns-test-ld5x0"), Some(5));
        assert_eq!(run_of("localdns-test-units"), None);
        assert_eq!(run_of("ld12x"), None);
        assert_eq!(run_of("ldx1"), None);
        assert_eq!(run_of("localdns"), None);
    }
}
