//! A memory cgroup of its own for a test (cgroup v1 `memory` controller, or
//! v2), limited, with its peak usage and OOM kills readable, removed on
//! drop. Processes are put in it before they exec, so everything they
//! allocate (BPF maps included: the kernel charges a map to the cgroup of
//! the process that creates it) is charged to it.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

pub struct MemCgroup {
    pub path: PathBuf,
    v2: bool,
}

impl MemCgroup {
    /// A child of this process's own memory cgroup, limited to `limit` bytes.
    pub fn new(tag: &str, limit: u64) -> MemCgroup {
        let own = std::fs::read_to_string("/proc/self/cgroup").expect("/proc/self/cgroup");
        let (base, rel, v2) = match own
            .lines()
            .find_map(|l| l.split_once(":memory:").map(|(_, p)| p.to_string()))
        {
            Some(rel) => ("/sys/fs/cgroup/memory", rel, false),
            None => {
                let rel = own
                    .lines()
                    .find_map(|l| l.strip_prefix("0::"))
                    .expect("no memory cgroup")
                    .to_string();
                ("/sys/fs/cgroup", rel, true)
            }
        };
        let path = Path::new(base)
            .join(rel.trim_start_matches('/'))
            .join(format!("localdns-test-{tag}"));
        std::fs::create_dir_all(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let cg = MemCgroup { path, v2 };
        let file = if v2 {
            "memory.max"
        } else {
            "memory.limit_in_bytes"
        };
        cg.write(file, &limit.to_string());
        if !v2 {
            // No swap to hide in: the limit is the limit.
            let _ = std::fs::write(
                cg.path.join("memory.memsw.limit_in_bytes"),
                limit.to_string(),
            );
        }
        cg
    }

    fn write(&self, file: &str, v: &str) {
        std::fs::write(self.path.join(file), v)
            .unwrap_or_else(|e| panic!("{}/{file}: {e}", self.path.display()));
    }

    fn read(&self, file: &str) -> String {
        std::fs::read_to_string(self.path.join(file)).unwrap_or_default()
    }

    /// Makes `cmd`'s process join the cgroup before it execs.
    pub fn enter_on_spawn(&self, cmd: &mut Command) {
        let procs = std::ffi::CString::new(
            self.path
                .join("cgroup.procs")
                .as_os_str()
                .as_encoded_bytes(),
        )
        .expect("no NUL in the path");
        // SAFETY: only async-signal-safe calls (open, write, close) on
        // memory prepared before the fork.
        unsafe {
            cmd.pre_exec(move || {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // "0": the writing process itself.
                let ok = libc::write(fd, b"0".as_ptr().cast(), 1) == 1;
                libc::close(fd);
                if ok {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
    }

    /// Peak memory charged to the cgroup, bytes.
    pub fn peak(&self) -> u64 {
        let f = if self.v2 {
            "memory.peak"
        } else {
            "memory.max_usage_in_bytes"
        };
        self.read(f).trim().parse().unwrap_or(0)
    }

    pub fn usage(&self) -> u64 {
        let f = if self.v2 {
            "memory.current"
        } else {
            "memory.usage_in_bytes"
        };
        self.read(f).trim().parse().unwrap_or(0)
    }

    /// OOM kills in the cgroup.
    pub fn oom_kills(&self) -> u64 {
        let f = if self.v2 {
            "memory.events"
        } else {
            "memory.oom_control"
        };
        self.read(f)
            .lines()
            .find_map(|l| l.strip_prefix("oom_kill "))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for MemCgroup {
    fn drop(&mut self) {
        // The processes are gone by now (their guards drop first); rmdir
        // fails while any remain, so try for a moment.
        for _ in 0..50 {
            if std::fs::remove_dir(&self.path).is_ok() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }
}
