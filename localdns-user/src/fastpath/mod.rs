//! The kernel fast path from userspace: load the embedded eBPF object with
//! the listener addresses and hash seed, on the pinned maps of an earlier
//! instance when they fit (so the kernel cache stays warm), attach it to
//! the ingress interfaces through pinned bpf_links (replacing the program
//! on links an earlier instance left), and keep the cache map in step with
//! the daemon's cache.
//!
//! Everything it creates outlives the process: a killed or stopped daemon
//! leaves the kernel answering cached names; the next one adopts it all;
//! `localdns-user teardown` removes it.

pub mod attach;
pub mod classes;
pub mod clock;
pub mod encode;
pub mod pins;
pub mod slots;

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use aya::maps::{Array, MapData, PerCpuArray, RingBuf};
use aya::programs::{ProgramError, SchedClassifier, Xdp};
use aya::{Ebpf, EbpfLoader};
use localdns_common::{
    FLOOR_SLOTS, GLOBAL_FAULT, GLOBAL_FLOOR_LINES, GLOBAL_HASH_SEED, GLOBAL_JIFFY_BASE,
    GLOBAL_LISTEN4, GLOBAL_LISTEN6, GLOBAL_SLOT_MASK, GLOBAL_TICK_NS, GLOBAL_VIEW4, GLOBAL_VIEW6,
    LAYOUT_VERSION, LogEvent, MAP_CACHE, MAP_CACHE_BIG, MAP_FLOOR, MAP_LOG, MAP_META, MAP_STATS,
    MAX_LISTEN, MAX_STAT_SLOTS, META_MAGIC, Meta, STAT_COUNT, STAT_HIT, STAT_NAMES, STAT_TRUNCATED,
    STAT_ZONE_BASE, big_entries, cache_slots,
};
use thiserror::Error;

use crate::cache::{Entry, Key, mono_ns};
use crate::ifaces::Iface;
use attach::{Attacher, Change};
use classes::CacheMaps;
use pins::{PINNED_MAPS, PinDir};

/// The eBPF object built by build.rs (BTF included).
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/localdns"));
pub const XDP_PROG: &str = "localdns_xdp";
pub const TC_PROG: &str = "localdns_tc";
/// The TC companion of the XDP modes: answers what XDP had no room for.
pub const TC_ROOM_PROG: &str = "localdns_tc_room";

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
    #[error("attaching to {iface} ({mode}): {source}")]
    Attach {
        iface: String,
        mode: &'static str,
        #[source]
        source: Box<ProgramError>,
    },
    #[error("link {path}: {error}")]
    Link { path: PathBuf, error: String },
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
    #[error("kernel cache slots: {source}")]
    Slots {
        #[source]
        source: Box<slots::SlotsError>,
    },
    #[error("no program or map {0} in the object")]
    Missing(&'static str),
    #[error("at most {MAX_LISTEN} listener addresses per family, got {0}")]
    TooManyListeners(usize),
}

fn map_err(name: &'static str) -> impl FnOnce(aya::maps::MapError) -> FastpathError {
    move |source| FastpathError::Map {
        name,
        source: Box::new(source),
    }
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
    /// TC ingress (TCX link on kernels >= 6.6, clsact filter before) with a
    /// redirect back out of the same device.
    Tc,
}

/// Load-time constants of the program.
#[derive(Clone, Debug)]
pub struct Globals {
    /// Listener addresses (either family) and their views.
    pub listen: Vec<(IpAddr, u8)>,
    pub seed: u64,
    /// Test-only fault injection ([`localdns_common::GLOBAL_FAULT`]).
    pub fault: u32,
}

/// Prepares the object: globals set, cache capacity set, and with `pins`
/// the shared maps taken from (or created at) their pin paths. Programs
/// are not yet loaded into the kernel.
pub fn open(g: &Globals, entries: u32, pins: Option<&PinDir>) -> Result<Ebpf, FastpathError> {
    load_object(g, entries, 0, pins)
}

/// Benchmark floor only: the object for the `localdns_floor` program, with
/// [`MAP_FLOOR`] sized for `lines` lines per name (1..=8).
pub fn open_floor(g: &Globals, lines: u32) -> Result<Ebpf, FastpathError> {
    load_object(g, 16, lines.clamp(1, 8), None)
}

fn load_object(
    g: &Globals,
    entries: u32,
    floor_lines: u32,
    pins: Option<&PinDir>,
) -> Result<Ebpf, FastpathError> {
    let (mut v4, mut view4) = ([0u32; MAX_LISTEN], [0u8; MAX_LISTEN]);
    let (mut v6, mut view6) = ([0u64; 2 * MAX_LISTEN], [0u8; MAX_LISTEN]);
    let (mut n4, mut n6) = (0, 0);
    for (ip, view) in &g.listen {
        match ip {
            IpAddr::V4(a) => {
                if n4 == MAX_LISTEN {
                    return Err(FastpathError::TooManyListeners(n4 + 1));
                }
                v4[n4] = u32::from_ne_bytes(a.octets());
                view4[n4] = *view;
                n4 += 1;
            }
            IpAddr::V6(a) => {
                if n6 == MAX_LISTEN {
                    return Err(FastpathError::TooManyListeners(n6 + 1));
                }
                let o = a.octets();
                v6[2 * n6] = u64::from_ne_bytes(o[..8].try_into().expect("8 bytes"));
                v6[2 * n6 + 1] = u64::from_ne_bytes(o[8..].try_into().expect("8 bytes"));
                view6[n6] = *view;
                n6 += 1;
            }
        }
    }
    let slot_mask = cache_slots(entries) - 1;
    let clock = clock::program_clock();
    let mut loader = EbpfLoader::new();
    loader
        .override_global(GLOBAL_LISTEN4, &v4, true)
        .override_global(GLOBAL_VIEW4, &view4, true)
        .override_global(GLOBAL_LISTEN6, &v6, true)
        .override_global(GLOBAL_VIEW6, &view6, true)
        .override_global(GLOBAL_HASH_SEED, &g.seed, true)
        .override_global(GLOBAL_FAULT, &g.fault, true)
        .override_global(GLOBAL_FLOOR_LINES, &floor_lines, true)
        .map_max_entries(MAP_FLOOR, (FLOOR_SLOTS * floor_lines).max(1))
        .override_global(GLOBAL_SLOT_MASK, &slot_mask, true)
        .override_global(GLOBAL_TICK_NS, &clock.tick_ns, true)
        .override_global(GLOBAL_JIFFY_BASE, &clock.base_ns, true)
        .map_max_entries(MAP_CACHE, cache_slots(entries))
        .map_max_entries(MAP_CACHE_BIG, big_entries(entries));
    let paths: Vec<(&str, PathBuf)> = pins
        .map(|p| PINNED_MAPS.iter().map(|m| (*m, p.map(m))).collect())
        .unwrap_or_default();
    for (m, path) in &paths {
        loader.map_pin_path(m, path.as_path());
    }
    loader.load(EBPF_OBJECT).map_err(|e| FastpathError::Object {
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
    load_classifier(ebpf, TC_PROG)
}

/// Loads (verifies) a TC program (`TC_PROG` or `TC_ROOM_PROG`).
pub fn load_classifier<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut SchedClassifier, FastpathError> {
    let p: &mut SchedClassifier = ebpf
        .program_mut(name)
        .ok_or(FastpathError::Missing(name))?
        .try_into()
        .map_err(|e| verifier(name, e))?;
    p.load().map_err(|e| verifier(name, e))?;
    Ok(p)
}

/// Where the kernel cache came from at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// The pinned maps of an earlier instance: the cache is warm.
    Adopted,
    /// New maps; `Some(why)` when pinned ones were found but not usable.
    Fresh(Option<String>),
}

/// What `--fastpath` asks for.
#[derive(Clone, Debug)]
pub struct Options {
    /// Listener addresses (either family) and their views.
    pub listen: Vec<(IpAddr, u8)>,
    pub pin_dir: PathBuf,
    pub entries: u32,
    pub mode: AttachMode,
    pub prefetch: Option<Prefetch>,
}

/// CoreDNS `prefetch AMOUNT ... PERCENTAGE%`: an entry answered `amount`
/// times by the kernel in the last `percent` of its TTL is reported to the
/// daemon, which refreshes it before it expires.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Prefetch {
    pub amount: u16,
    pub percent: u8,
}

/// A loaded fast path. Dropping it leaves everything in the kernel: the
/// links keep the program on its interfaces and the pins keep the maps.
pub struct Fastpath {
    cache: Mutex<CacheMaps>,
    stats: PerCpuArray<MapData, u64>,
    log_ring: Mutex<Option<RingBuf<MapData>>>,
    attacher: Mutex<Attacher>,
    seed: u64,
    prefetch: Option<Prefetch>,
    pub origin: Origin,
}

impl Fastpath {
    /// Loads the program on the pinned maps (adopted when they fit, else
    /// fresh) and pins it. Interfaces come with [`Fastpath::reconcile`].
    pub fn start(o: &Options) -> Result<Self, FastpathError> {
        let pins = PinDir::new(&o.pin_dir);
        let pin_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| FastpathError::Pin { path, source }
        };
        ensure_bpffs(&o.pin_dir).map_err(pin_err(&o.pin_dir))?;
        std::fs::create_dir_all(pins.links()).map_err(pin_err(&pins.links()))?;
        let (seed, origin) = match pins.adoptable(o.entries) {
            Ok(seed) => (seed, Origin::Adopted),
            Err(why) => {
                if why.is_some() {
                    pins.remove_maps();
                }
                (rand::random(), Origin::Fresh(why))
            }
        };
        let g = Globals {
            listen: o.listen.clone(),
            seed,
            fault: 0,
        };
        let mut ebpf = open(&g, o.entries, Some(&pins))?;
        // TC mode runs the TC program; the XDP modes run the XDP program
        // and its TC companion (for replies XDP has no room to build).
        let progs: &[&'static str] = if o.mode == AttachMode::Tc {
            &[TC_PROG]
        } else {
            &[XDP_PROG, TC_ROOM_PROG]
        };
        for name in [XDP_PROG, TC_PROG, TC_ROOM_PROG] {
            let path = pins.program(name);
            let _ = std::fs::remove_file(&path);
            if !progs.contains(&name) {
                // Pinned by an earlier instance in another mode: its links
                // keep it until reconcile replaces them.
                continue;
            }
            let pinned = if name == XDP_PROG {
                load_xdp(&mut ebpf)?.pin(&path)
            } else {
                load_classifier(&mut ebpf, name)?.pin(&path)
            };
            pinned.map_err(|e| FastpathError::Pin {
                path: path.clone(),
                source: std::io::Error::other(e.to_string()),
            })?;
        }
        let take = |ebpf: &mut Ebpf, name: &'static str| {
            ebpf.take_map(name).ok_or(FastpathError::Missing(name))
        };
        if origin != Origin::Adopted {
            let mut meta: Array<MapData, Meta> =
                Array::try_from(take(&mut ebpf, MAP_META)?).map_err(map_err(MAP_META))?;
            let m = Meta {
                magic: META_MAGIC,
                layout: LAYOUT_VERSION,
                _pad: 0,
                seed,
                created_ns: mono_ns(),
            };
            meta.set(0, m, 0).map_err(map_err(MAP_META))?;
        }
        let cache = CacheMaps::take(&mut ebpf, origin == Origin::Adopted)?;
        let stats =
            PerCpuArray::try_from(take(&mut ebpf, MAP_STATS)?).map_err(map_err(MAP_STATS))?;
        let log_ring = RingBuf::try_from(take(&mut ebpf, MAP_LOG)?).map_err(map_err(MAP_LOG))?;
        Ok(Fastpath {
            cache: Mutex::new(cache),
            stats,
            log_ring: Mutex::new(Some(log_ring)),
            attacher: Mutex::new(Attacher::new(ebpf, pins, o.mode)),
            seed,
            prefetch: o.prefetch,
            origin,
        })
    }

    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Brings the program onto exactly the `wanted` interfaces.
    pub fn reconcile(&self, wanted: &[Iface]) -> Vec<Change> {
        self.attacher
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .reconcile(wanted)
    }

    /// (interface, mode) of every attachment.
    pub fn attached(&self) -> Vec<(String, &'static str)> {
        self.attacher
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .attached()
    }

    /// The entries in the kernel map that this build can read back (all of
    /// them, after an adoption): the daemon rebuilds its cache from them.
    pub fn entries(&self) -> Vec<(Key, Entry)> {
        let maps = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        maps.entries()
            .iter()
            .filter_map(|(k, v)| encode::decode(k, v, self.seed))
            .collect()
    }

    /// Writes (or replaces) the kernel copy of an entry; `log` makes the
    /// kernel report each hit on the query-log ring. Entries the kernel
    /// cannot serve are removed instead, so it never serves an old version.
    pub fn put(&self, key: &Key, entry: &Entry, log: bool, stat: u16) {
        let bkey = encode::key(key, self.seed);
        let mut map = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        match encode::value(key, entry) {
            Ok(mut v) => {
                v.head.log = u8::from(log);
                v.head.stat = stat;
                if let Some(p) = self.prefetch {
                    v.head.prefetch_amount = p.amount;
                    // ms into the TTL at which its last `percent` begins.
                    let ms = u64::from(v.head.ttl) * 10 * u64::from(100 - p.percent.min(100));
                    v.head.prefetch_ms = u32::try_from(ms).unwrap_or(u32::MAX);
                }
                v.head.generation = map.next_generation();
                if let Err(e) = map.insert(&bkey, &v) {
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
            .remove(&encode::key(key, self.seed));
    }

    pub fn stats(&self) -> Vec<(&'static str, u64)> {
        read_stats(&self.stats)
    }

    /// Kernel answers per stat slot and family.
    pub fn slot_counts(&self) -> Vec<u64> {
        read_slots(&self.stats)
    }

    /// Entries in the kernel maps, (small, big) (walks their keys).
    pub fn kernel_entries(&self) -> (usize, usize) {
        self.cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .counts()
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

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const BPF_FS_ROOT: &str = "/sys/fs/bpf";

/// Mounts bpffs on /sys/fs/bpf when the pin directory is under it and it is
/// not mounted (a fresh mount namespace, e.g. `ip netns exec`); systemd
/// mounts it on a normal node.
fn ensure_bpffs(pin_dir: &Path) -> std::io::Result<()> {
    if !pin_dir.starts_with(BPF_FS_ROOT) {
        return Ok(());
    }
    if rustix::fs::statfs(BPF_FS_ROOT).is_ok_and(|st| st.f_type == BPF_FS_MAGIC) {
        return Ok(());
    }
    rustix::mount::mount(
        "bpf",
        BPF_FS_ROOT,
        "bpf",
        rustix::mount::MountFlags::empty(),
        None,
    )?;
    tracing::info!("mounted bpffs on {BPF_FS_ROOT}");
    Ok(())
}

/// Sums the per-CPU counters by reason; `hit` is the sum of the per-slot
/// answer counts minus the TC=1 replies (see `STAT_ZONE_BASE`).
pub fn read_stats(stats: &PerCpuArray<MapData, u64>) -> Vec<(&'static str, u64)> {
    let sum = |i: u32| -> u64 { stats.get(&i, 0).map(|v| v.iter().sum()).unwrap_or(0) };
    let answers: u64 = read_slots(stats).iter().sum();
    (0..STAT_COUNT)
        .map(|i| {
            let v = if i == STAT_HIT {
                answers.saturating_sub(sum(STAT_TRUNCATED))
            } else {
                sum(i)
            };
            (STAT_NAMES[i as usize], v)
        })
        .collect()
}

/// Kernel answers per stat slot and family (`slot * 2 + is_ipv6`), summed
/// over CPUs.
pub fn read_slots(stats: &PerCpuArray<MapData, u64>) -> Vec<u64> {
    (0..2 * MAX_STAT_SLOTS)
        .map(|i| {
            stats
                .get(&(STAT_ZONE_BASE + i), 0)
                .map(|v| v.iter().sum())
                .unwrap_or(0)
        })
        .collect()
}

/// The cache and counter maps of a running instance.
pub type PinnedMaps = (CacheMaps, PerCpuArray<MapData, u64>);

/// Opens the pinned maps of a running instance (`cache stats|dump|flush`).
pub fn open_pinned(pin_dir: &Path) -> Result<PinnedMaps, FastpathError> {
    let pins = PinDir::new(pin_dir);
    let open = |name: &'static str| {
        MapData::from_pin(pins.map(name))
            .and_then(aya::maps::Map::from_map_data)
            .map_err(map_err(name))
    };
    let cache = CacheMaps::from_maps(open, true)?;
    let stats = PerCpuArray::try_from(open(MAP_STATS)?).map_err(map_err(MAP_STATS))?;
    Ok((cache, stats))
}
