//! Guards that build and always tear down test topologies: network
//! namespaces, veth pairs, processes and temp directories. Names are unique
//! per run so parallel or crashed runs do not collide; everything is undone
//! in `Drop`, also when a test panics.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A short unique tag for this test run and topology.
pub fn unique_tag() -> String {
    format!(
        "ld{}x{}",
        std::process::id() % 100_000,
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `ip ARGS`, which must succeed.
pub fn ip(args: &[&str]) {
    run_ok(Command::new("ip").args(args));
}

/// A network namespace, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(name: String) -> Netns {
        ip(&["netns", "add", &name]);
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    pub fn ip(&self, args: &[&str]) {
        let mut a = vec!["-n", &self.name];
        a.extend_from_slice(args);
        ip(&a);
    }

    /// A command run inside the namespace.
    pub fn cmd(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// Runs to completion (bounded by the program's own timeouts).
    pub fn output(&self, program: &str, args: &[&str]) -> Output {
        self.cmd(program)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("{program}: {e}"))
    }

    pub fn sh_ok(&self, program: &str, args: &[&str]) -> String {
        let out = run_ok(self.cmd(program).args(args));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Netns {
    /// Files `ip netns exec` mounts over /etc for this namespace's
    /// processes (`resolv.conf`, `hosts`): /etc/netns/<name>/<file>.
    pub fn set_etc(&self, file: &str, text: &str) {
        let dir = Path::new("/etc/netns").join(&self.name);
        std::fs::create_dir_all(&dir).expect("/etc/netns/<name>");
        std::fs::write(dir.join(file), text).expect("netns etc file");
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
        let _ = std::fs::remove_dir_all(Path::new("/etc/netns").join(&self.name));
    }
}

/// Joins `other` to `node` by a veth (`host_if` on the node, `eth0` in
/// `other`) on `<prefix>.0/<len>`: node `.1`, other `.2`, whose default
/// route is the node.
pub fn join(node: &Netns, host_if: &str, other: &Netns, prefix: &str, len: u8) {
    ip(&[
        "link",
        "add",
        host_if,
        "netns",
        &node.name,
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        &other.name,
    ]);
    node.ip(&["addr", "add", &format!("{prefix}.1/{len}"), "dev", host_if]);
    node.ip(&["link", "set", host_if, "up"]);
    other.ip(&["addr", "add", &format!("{prefix}.2/{len}"), "dev", "eth0"]);
    other.ip(&["link", "set", "eth0", "up"]);
    other.ip(&["route", "add", "default", "via", &format!("{prefix}.1")]);
}

/// A child process, stopped (SIGCONT, SIGTERM, then SIGKILL) on drop.
pub struct Proc {
    pub child: Child,
    pub what: String,
}

impl Proc {
    pub fn spawn(mut cmd: Command, what: &str, log: &Path) -> Proc {
        let f = std::fs::File::create(log).expect("log file");
        let f2 = f.try_clone().expect("dup");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::from(f))
            .stderr(Stdio::from(f2))
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {what}: {e}"));
        Proc {
            child,
            what: what.into(),
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.pid(), sig) };
    }

    /// SIGTERM and wait up to `within`; true if it exited by itself.
    pub fn terminate(&mut self, within: Duration) -> bool {
        self.signal(libc::SIGCONT);
        self.signal(libc::SIGTERM);
        let t = Instant::now();
        while t.elapsed() < within {
            if let Ok(Some(_)) = self.child.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        if !self.terminate(Duration::from_secs(3)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A temp directory, removed on drop.
pub struct TempDir {
    pub path: PathBuf,
}

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let path = std::env::temp_dir().join(format!("localdns-test-{tag}"));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("temp dir");
        TempDir { path }
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::env::var_os("LOCALDNS_KEEP_TEST_DIRS").is_none() {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// A bpffs of its own, mounted in the host's mount namespace: pins in it
/// outlive daemons started with `ip netns exec` (which gives each process
/// a private /sys), as they do under systemd or a DaemonSet's hostPath
/// mount. Unmounted on drop, which unpins (and so detaches and frees)
/// whatever a test left, even when it failed.
pub struct BpfFs {
    pub path: PathBuf,
}

impl BpfFs {
    pub fn new(path: PathBuf) -> BpfFs {
        std::fs::create_dir_all(&path).expect("bpffs mount point");
        run_ok(Command::new("mount").args(["-t", "bpf", "bpf"]).arg(&path));
        BpfFs { path }
    }
}

impl Drop for BpfFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.path).output();
        let _ = std::fs::remove_dir(&self.path);
    }
}

/// Polls `f` every 50 ms until it returns `Some` or `timeout` passes.
pub fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let t = Instant::now();
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if t.elapsed() > timeout {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// True when `dig @server name` gets a non-empty answer from inside `ns`.
pub fn dig_ok(ns: &Netns, server: &str, name: &str) -> bool {
    let o = ns.output(
        "dig",
        &["+tries=1", "+time=1", "+short", &format!("@{server}"), name],
    );
    o.status.success() && !String::from_utf8_lossy(&o.stdout).trim().is_empty()
}

/// Starts NSD in `ns` on `ip:53` serving `zones` (name, zone file text) from
/// `dir`, with `tuning` lines added to its `server:` section, and waits until
/// `probe` resolves. The returned guard stops it.
pub fn start_nsd(
    ns: &Netns,
    dir: &Path,
    ip: &str,
    zones: &[(&str, &str)],
    tuning: &str,
    probe: &str,
) -> Proc {
    let d = dir.display();
    let mut conf = format!(
        "server:\n  ip-address: {ip}\n  port: 53\n  zonesdir: \"{d}\"\n  pidfile: \"{d}/nsd.pid\"\n  database: \"\"\n  username: \"\"\n  chroot: \"\"\n  zonelistfile: \"{d}/zone.list\"\n  xfrdfile: \"{d}/xfrd.state\"\n  verbosity: 1\n{tuning}remote-control:\n  control-enable: no\n"
    );
    for (name, text) in zones {
        std::fs::write(dir.join(format!("{name}.zone")), text).unwrap();
        conf.push_str(&format!("zone:\n  name: {name}\n  zonefile: {name}.zone\n"));
    }
    std::fs::write(dir.join("nsd.conf"), conf).unwrap();
    let mut cmd = ns.cmd("nsd");
    cmd.args(["-d", "-c"]).arg(dir.join("nsd.conf"));
    let nsd = Proc::spawn(cmd, "nsd", &dir.join("nsd.log"));
    let up = wait_for(Duration::from_secs(20), || {
        dig_ok(ns, ip, probe).then_some(())
    });
    assert!(
        up.is_some(),
        "nsd did not come up: {}",
        std::fs::read_to_string(dir.join("nsd.log")).unwrap_or_default()
    );
    nsd
}
