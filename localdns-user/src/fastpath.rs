//! The kernel fast path from userspace: load the embedded eBPF object with
//! the listener addresses and hash seed, attach it to the ingress
//! interfaces, pin its maps for `localdns-user cache ...` and `bpftool`, and
//! keep the cache map in step with the daemon's cache.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use aya::maps::{HashMap as BpfHashMap, Map, MapData, PerCpuArray, RingBuf};
use aya::programs::{ProgramError, SchedClassifier, TcAttachType, Xdp, XdpMode, tc};
use aya::{Ebpf, EbpfLoader};
use localdns_common::{
    CacheKey, CacheValue, GLOBAL_HASH_SEED, GLOBAL_LISTEN_KUBE, GLOBAL_LISTEN_VNET, LogEvent,
    MAP_CACHE, MAP_LOG, MAP_STATS, STAT_COUNT, STAT_NAMES,
};
use thiserror::Error;

use crate::cache::{Entry, Key};

/// The eBPF object built by build.rs (BTF included).
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/localdns"));
pub const XDP_PROG: &str = "localdns_xdp";
pub const TC_PROG: &str = "localdns_tc";

#[derive(Debug, Error)]
pub enum FastpathError {
    #[error("loading the eBPF object: {source}")]
    Object {
        #[source]
        source: Box<aya::EbpfError>,
    },
    #[error("program {prog} rejected by the kernel: {source}\nverifier log:\n{log}")]
    Verifier {
        prog: &'static str,
        log: String,
        #[source]
        source: Box<ProgramError>,
    },
    #[error("attaching {prog} to {iface} ({mode}): {source}")]
    Attach {
        prog: &'static str,
        iface: String,
        mode: &'static str,
        #[source]
        source: Box<ProgramError>,
    },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: Box<aya::maps::MapError>,
    },
    #[error("pinning under {path}: {source}")]
    Pin {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("interface pattern {pattern:?} matches no interface")]
    NoInterface { pattern: String },
    #[error("no program {0} in the object")]
    Missing(&'static str),
}

/// `--attach-mode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum AttachMode {
    /// Generic XDP on virtual devices (veth, lo, ...), where native XDP_TX
    /// replies are lost unless the peer runs XDP too; native XDP elsewhere,
    /// falling back to generic.
    Auto,
    /// Native (driver) XDP.
    Xdp,
    /// Generic (skb) XDP.
    XdpGeneric,
    /// TC clsact ingress with a redirect back out of the same device.
    Tc,
}

/// Loads the object with the listener addresses and seed set; programs are
/// not yet loaded into the kernel.
pub fn open(
    vnet: Ipv4Addr,
    kube: Ipv4Addr,
    seed: u64,
    entries: u32,
) -> Result<Ebpf, FastpathError> {
    let vnet_ne = u32::from_ne_bytes(vnet.octets());
    let kube_ne = u32::from_ne_bytes(kube.octets());
    EbpfLoader::new()
        .override_global(GLOBAL_LISTEN_VNET, &vnet_ne, true)
        .override_global(GLOBAL_LISTEN_KUBE, &kube_ne, true)
        .override_global(GLOBAL_HASH_SEED, &seed, true)
        .map_max_entries(MAP_CACHE, entries)
        .load(EBPF_OBJECT)
        .map_err(|e| FastpathError::Object {
            source: Box::new(e),
        })
}

fn verifier(prog: &'static str, source: ProgramError) -> FastpathError {
    let log = match &source {
        ProgramError::LoadError { verifier_log, .. } => verifier_log.to_string(),
        _ => String::new(),
    };
    FastpathError::Verifier {
        prog,
        log,
        source: Box::new(source),
    }
}

/// Loads (verifies) the XDP program and returns it.
pub fn load_xdp(ebpf: &mut Ebpf) -> Result<&mut Xdp, FastpathError> {
    let p: &mut Xdp = ebpf
        .program_mut(XDP_PROG)
        .ok_or(FastpathError::Missing(XDP_PROG))?
        .try_into()
        .map_err(|e| verifier(XDP_PROG, e))?;
    p.load().map_err(|e| verifier(XDP_PROG, e))?;
    Ok(p)
}

/// Loads (verifies) the TC program and returns it.
pub fn load_tc(ebpf: &mut Ebpf) -> Result<&mut SchedClassifier, FastpathError> {
    let p: &mut SchedClassifier = ebpf
        .program_mut(TC_PROG)
        .ok_or(FastpathError::Missing(TC_PROG))?
        .try_into()
        .map_err(|e| verifier(TC_PROG, e))?;
    p.load().map_err(|e| verifier(TC_PROG, e))?;
    Ok(p)
}

/// Expands `--iface` patterns (shell globs) against /sys/class/net.
pub fn expand_ifaces(patterns: &[String]) -> Result<Vec<String>, FastpathError> {
    let mut all: Vec<String> = std::fs::read_dir("/sys/class/net")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default();
    all.sort();
    let mut out: Vec<String> = Vec::new();
    for pat in patterns {
        let g = glob::Pattern::new(pat).ok();
        let matched: Vec<&String> = all
            .iter()
            .filter(|i| g.as_ref().map_or(*i == pat, |g| g.matches(i)))
            .collect();
        if matched.is_empty() {
            return Err(FastpathError::NoInterface {
                pattern: pat.clone(),
            });
        }
        for m in matched {
            if !out.contains(m) {
                out.push(m.clone());
            }
        }
    }
    Ok(out)
}

/// Virtual devices (veth, lo, bridges, ...) have no `device` link in sysfs.
fn is_virtual(iface: &str) -> bool {
    !Path::new(&format!("/sys/class/net/{iface}/device")).exists()
}

/// A loaded and attached fast path. Dropping it detaches the programs and
/// removes the pins.
pub struct Fastpath {
    _ebpf: Ebpf,
    cache: Mutex<BpfHashMap<MapData, CacheKey, CacheValue>>,
    stats: PerCpuArray<MapData, u64>,
    log_ring: Mutex<Option<RingBuf<MapData>>>,
    seed: u64,
    pins: Vec<PathBuf>,
    pub attached: Vec<(String, &'static str)>,
}

impl Fastpath {
    pub fn start(
        vnet: Ipv4Addr,
        kube: Ipv4Addr,
        ifaces: &[String],
        mode: AttachMode,
        pin_dir: &Path,
        entries: u32,
    ) -> Result<Self, FastpathError> {
        let seed: u64 = rand::random();
        let mut ebpf = open(vnet, kube, seed, entries)?;
        let mut attached = Vec::new();
        if mode == AttachMode::Tc {
            let p = load_tc(&mut ebpf)?;
            for iface in ifaces {
                // Kernels >= 6.6 attach through TCX; older need clsact.
                let _ = tc::qdisc_add_clsact(iface);
                p.attach(iface, TcAttachType::Ingress)
                    .map_err(|source| FastpathError::Attach {
                        prog: TC_PROG,
                        iface: iface.clone(),
                        mode: "tc",
                        source: Box::new(source),
                    })?;
                attached.push((iface.clone(), "tc"));
            }
        } else {
            let p = load_xdp(&mut ebpf)?;
            for iface in ifaces {
                let native = match mode {
                    AttachMode::Xdp => true,
                    AttachMode::XdpGeneric => false,
                    _ => !is_virtual(iface),
                };
                let res = if native {
                    match p.attach(iface, XdpMode::Driver) {
                        Ok(_) => Ok("xdp"),
                        Err(e) if mode == AttachMode::Auto => {
                            tracing::info!(%iface, error = %e, "native XDP unavailable, using generic XDP");
                            p.attach(iface, XdpMode::Skb).map(|_| "xdp-generic")
                        }
                        Err(e) => Err(e),
                    }
                } else {
                    p.attach(iface, XdpMode::Skb).map(|_| "xdp-generic")
                };
                let how = res.map_err(|source| FastpathError::Attach {
                    prog: XDP_PROG,
                    iface: iface.clone(),
                    mode: if native { "xdp" } else { "xdp-generic" },
                    source: Box::new(source),
                })?;
                attached.push((iface.clone(), how));
            }
        }
        let pin_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| FastpathError::Pin { path, source }
        };
        ensure_bpffs(pin_dir).map_err(pin_err(pin_dir))?;
        std::fs::create_dir_all(pin_dir).map_err(pin_err(pin_dir))?;
        let mut pins = Vec::new();
        let mut take = |name: &'static str| -> Result<Map, FastpathError> {
            let map = ebpf.take_map(name).ok_or(FastpathError::Missing(name))?;
            let path = pin_dir.join(name);
            let _ = std::fs::remove_file(&path); // a crashed run's leftover
            map.pin(&path).map_err(|e| FastpathError::Pin {
                path: path.clone(),
                source: std::io::Error::other(e.to_string()),
            })?;
            pins.push(path);
            Ok(map)
        };
        let cache_map = take(MAP_CACHE)?;
        let stats_map = take(MAP_STATS)?;
        let log_map = ebpf
            .take_map(MAP_LOG)
            .ok_or(FastpathError::Missing(MAP_LOG))?;
        let log_ring = RingBuf::try_from(log_map).map_err(|source| FastpathError::Map {
            name: MAP_LOG,
            source: Box::new(source),
        })?;
        let cache = BpfHashMap::try_from(cache_map).map_err(|source| FastpathError::Map {
            name: MAP_CACHE,
            source: Box::new(source),
        })?;
        let stats = PerCpuArray::try_from(stats_map).map_err(|source| FastpathError::Map {
            name: MAP_STATS,
            source: Box::new(source),
        })?;
        Ok(Fastpath {
            _ebpf: ebpf,
            cache: Mutex::new(cache),
            stats,
            log_ring: Mutex::new(Some(log_ring)),
            seed,
            pins,
            attached,
        })
    }

    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Writes (or replaces) the kernel copy of an entry; `log` makes the
    /// kernel report each hit on the query-log ring. Entries the kernel
    /// cannot serve are removed instead, so it never serves an old version.
    pub fn put(&self, key: &Key, entry: &Entry, log: bool) {
        let bkey = key.bpf(self.seed);
        let mut map = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        match entry.to_bpf(key) {
            Ok(mut v) => {
                v.log = u8::from(log);
                if let Err(e) = map.insert(bkey, v, 0) {
                    tracing::warn!(error = %e, "writing the kernel cache failed");
                }
            }
            Err(why) => {
                tracing::trace!(%why, "entry stays in userspace only");
                let _ = map.remove(&bkey);
            }
        }
    }

    pub fn remove(&self, key: &Key) {
        let _ = self
            .cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&key.bpf(self.seed));
    }

    pub fn stats(&self) -> Vec<(&'static str, u64)> {
        read_stats(&self.stats)
    }

    /// Reads the query-log ring until the task is aborted, handing each
    /// event to `sink`. Only the first call gets the ring.
    pub async fn drain_log(&self, sink: impl Fn(&LogEvent)) {
        let Some(ring) = self
            .log_ring
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        else {
            return;
        };
        // SAFETY: the ring owns its map fd for as long as the AsyncFd owns
        // the ring, and always reports that same fd.
        let fd = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE)
        };
        let mut fd = match fd {
            Ok(fd) => fd,
            Err(e) => {
                let e = e.into_parts().1;
                tracing::warn!(error = %e, "query-log ring not readable: kernel-answered queries will not be logged");
                return;
            }
        };
        loop {
            let Ok(mut guard) = fd.readable_mut().await else {
                return;
            };
            let ring = guard.get_inner_mut();
            while let Some(item) = ring.next() {
                if item.len() >= std::mem::size_of::<LogEvent>() {
                    // SAFETY: the program writes exactly one LogEvent per record.
                    let ev: LogEvent = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
                    sink(&ev);
                }
            }
            guard.clear_ready();
        }
    }
}

impl Drop for Fastpath {
    fn drop(&mut self) {
        for p in &self.pins {
            let _ = std::fs::remove_file(p);
        }
    }
}

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const BPF_FS_ROOT: &str = "/sys/fs/bpf";

/// Mounts bpffs on /sys/fs/bpf when the pin directory is under it and it is
/// not mounted (a fresh mount namespace, e.g. `ip netns exec`); systemd
/// mounts it on a normal node.
fn ensure_bpffs(pin_dir: &Path) -> std::io::Result<()> {
    if !pin_dir.starts_with(BPF_FS_ROOT) {
        return Ok(());
    }
    let root = std::ffi::CString::new(BPF_FS_ROOT).expect("no NUL");
    // SAFETY: statfs/mount with valid NUL-terminated strings and buffers.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        if libc::statfs(root.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC {
            return Ok(());
        }
        let fstype = std::ffi::CString::new("bpf").expect("no NUL");
        if libc::mount(
            fstype.as_ptr(),
            root.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        ) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
    }
    tracing::info!("mounted bpffs on {BPF_FS_ROOT}");
    Ok(())
}

/// Sums the per-CPU counters.
pub fn read_stats(stats: &PerCpuArray<MapData, u64>) -> Vec<(&'static str, u64)> {
    (0..STAT_COUNT)
        .map(|i| {
            let v = stats.get(&i, 0).map(|v| v.iter().sum()).unwrap_or(0);
            (STAT_NAMES[i as usize], v)
        })
        .collect()
}

/// The cache and counter maps of a running instance.
pub type PinnedMaps = (
    BpfHashMap<MapData, CacheKey, CacheValue>,
    PerCpuArray<MapData, u64>,
);

/// Opens the pinned maps of a running instance (`cache stats|dump|flush`).
pub fn open_pinned(pin_dir: &Path) -> Result<PinnedMaps, FastpathError> {
    let open = |name: &'static str| {
        MapData::from_pin(pin_dir.join(name))
            .and_then(Map::from_map_data)
            .map_err(|source| FastpathError::Map {
                name,
                source: Box::new(source),
            })
    };
    let cache = BpfHashMap::try_from(open(MAP_CACHE)?).map_err(|source| FastpathError::Map {
        name: MAP_CACHE,
        source: Box::new(source),
    })?;
    let stats = PerCpuArray::try_from(open(MAP_STATS)?).map_err(|source| FastpathError::Map {
        name: MAP_STATS,
        source: Box::new(source),
    })?;
    Ok((cache, stats))
}
