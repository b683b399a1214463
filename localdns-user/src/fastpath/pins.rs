//! The pin layout under `--pin-path` and the adoption decision.
//!
//! ```text
//! <pin-path>/LDNS_CACHE LDNS_CACHE_BIG LDNS_STATS LDNS_META
//!                                              maps (kept across restarts)
//! <pin-path>/prog_localdns_xdp, prog_localdns_tc, prog_localdns_tc_room
//!                                              the programs the links run
//! <pin-path>/links/<kind>_<ifindex>_<ifname>   the bpf_links of an interface
//!         kind: xdpg (generic XDP), xdpd (native XDP), tcx (TC, kernel >= 6.6),
//!               tcr (the XDP modes' TC companion, kernel >= 6.6)
//! ```
//!
//! A starting daemon reuses the maps when `LDNS_META` says they have this
//! build's layout and the cache map has the requested capacity; otherwise
//! it moves them aside (the running program keeps its references until its
//! links are updated) and creates fresh ones.

use std::path::{Path, PathBuf};

use aya::maps::{Array, Map, MapData};
use localdns_common::{
    CacheKey, CacheValue, LAYOUT_VERSION, MAP_CACHE, MAP_CACHE_BIG, MAP_META, MAP_STATS,
    META_MAGIC, Meta, SmallValue, big_entries, cache_slots,
};

/// Maps shared with later instances.
pub const PINNED_MAPS: [&str; 4] = [MAP_CACHE, MAP_CACHE_BIG, MAP_STATS, MAP_META];
pub const LINKS_DIR: &str = "links";

/// How an interface's link runs the program.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LinkKind {
    XdpGeneric,
    XdpNative,
    Tcx,
    /// The TC companion next to an XDP link.
    TcRoom,
}

impl LinkKind {
    pub fn tag(self) -> &'static str {
        match self {
            LinkKind::XdpGeneric => "xdpg",
            LinkKind::XdpNative => "xdpd",
            LinkKind::Tcx => "tcx",
            LinkKind::TcRoom => "tcr",
        }
    }

    /// What `--attach-mode` and logs call it.
    pub fn mode_name(self) -> &'static str {
        match self {
            LinkKind::XdpGeneric => "xdp-generic",
            LinkKind::XdpNative => "xdp",
            LinkKind::Tcx => "tc",
            LinkKind::TcRoom => "tc companion",
        }
    }

    fn from_tag(t: &str) -> Option<Self> {
        [
            LinkKind::XdpGeneric,
            LinkKind::XdpNative,
            LinkKind::Tcx,
            LinkKind::TcRoom,
        ]
        .into_iter()
        .find(|k| k.tag() == t)
    }
}

/// A link pin found on disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkPin {
    pub kind: LinkKind,
    pub ifindex: u32,
    pub path: PathBuf,
}

/// The paths of one pin directory.
#[derive(Clone, Debug)]
pub struct PinDir {
    pub root: PathBuf,
}

impl PinDir {
    pub fn new(root: &Path) -> Self {
        PinDir {
            root: root.to_path_buf(),
        }
    }

    pub fn map(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// Where program `name` (`localdns_xdp`, ...) is pinned.
    pub fn program(&self, name: &str) -> PathBuf {
        self.root.join(format!("prog_{name}"))
    }

    pub fn links(&self) -> PathBuf {
        self.root.join(LINKS_DIR)
    }

    /// Where the link of `kind` on interface `ifindex`/`ifname` is pinned
    /// (bpffs reserves names with dots).
    pub fn link(&self, kind: LinkKind, ifindex: u32, ifname: &str) -> PathBuf {
        let name: String = ifname
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        self.links()
            .join(format!("{}_{ifindex}_{name}", kind.tag()))
    }

    /// Every link pin, in name order.
    pub fn link_pins(&self) -> Vec<LinkPin> {
        let mut out: Vec<LinkPin> = std::fs::read_dir(self.links())
            .into_iter()
            .flatten()
            .filter_map(|e| {
                let e = e.ok()?;
                let name = e.file_name().into_string().ok()?;
                let mut parts = name.splitn(3, '_');
                let kind = LinkKind::from_tag(parts.next()?)?;
                let ifindex = parts.next()?.parse().ok()?;
                Some(LinkPin {
                    kind,
                    ifindex,
                    path: e.path(),
                })
            })
            .collect();
        out.sort_by(|a, b| a.path.cmp(&b.path));
        out
    }

    /// Reads the metadata of the pinned maps, if there are any.
    pub fn meta(&self) -> Option<Meta> {
        let map = MapData::from_pin(self.map(MAP_META)).ok()?;
        let arr: Array<MapData, Meta> = Array::try_from(Map::Array(map)).ok()?;
        arr.get(&0, 0).ok()
    }

    /// Whether the pinned maps can be adopted by this build with a cache
    /// of `entries`: `Ok(seed)`, or why not (`None` when there are none).
    pub fn adoptable(&self, entries: u32) -> Result<u64, Option<String>> {
        if !PINNED_MAPS.iter().any(|m| self.map(m).exists()) {
            return Err(None);
        }
        let Some(meta) = self.meta() else {
            return Err(Some(
                "no readable LDNS_META (maps of an older build)".into(),
            ));
        };
        if meta.magic != META_MAGIC {
            return Err(Some("LDNS_META is not ours".into()));
        }
        if meta.layout != LAYOUT_VERSION {
            return Err(Some(format!(
                "map layout {} differs from this build's {LAYOUT_VERSION}",
                meta.layout
            )));
        }
        for m in PINNED_MAPS {
            if !self.map(m).exists() {
                return Err(Some(format!("{m} is missing")));
            }
        }
        let ks = size_of::<CacheKey>() as u32;
        for (m, k, vs, want) in [
            (
                MAP_CACHE,
                size_of::<u32>() as u32,
                size_of::<SmallValue>() as u32,
                cache_slots(entries),
            ),
            (
                MAP_CACHE_BIG,
                ks,
                size_of::<CacheValue>() as u32,
                big_entries(entries),
            ),
        ] {
            let info = MapData::from_pin(self.map(m))
                .and_then(|d| d.info())
                .map_err(|e| Some(format!("{m} unreadable: {e}")))?;
            if info.key_size() != k || info.value_size() != vs {
                return Err(Some(format!(
                    "{m} key/value sizes {}/{} differ from {k}/{vs}",
                    info.key_size(),
                    info.value_size()
                )));
            }
            if info.max_entries() != want {
                return Err(Some(format!(
                    "{m} holds {} entries, {want} requested",
                    info.max_entries()
                )));
            }
        }
        Ok(meta.seed)
    }

    /// Unpins the maps (a running program keeps them until it is replaced).
    pub fn remove_maps(&self) {
        for m in PINNED_MAPS {
            let _ = std::fs::remove_file(self.map(m));
        }
    }

    /// Removes every pin and the directory: links (detaching them once no
    /// process holds them), programs, maps.
    pub fn remove_all(&self) -> usize {
        let mut n = 0;
        for l in self.link_pins() {
            n += usize::from(std::fs::remove_file(&l.path).is_ok());
        }
        // Anything else in links/ (a pin of a later build) goes too.
        for e in std::fs::read_dir(self.links())
            .into_iter()
            .flatten()
            .flatten()
        {
            n += usize::from(std::fs::remove_file(e.path()).is_ok());
        }
        let _ = std::fs::remove_dir(self.links());
        for p in [super::XDP_PROG, super::TC_PROG, super::TC_ROOM_PROG] {
            n += usize::from(std::fs::remove_file(self.program(p)).is_ok());
        }
        for m in PINNED_MAPS {
            n += usize::from(std::fs::remove_file(self.map(m)).is_ok());
        }
        for e in std::fs::read_dir(&self.root)
            .into_iter()
            .flatten()
            .flatten()
        {
            n += usize::from(std::fs::remove_file(e.path()).is_ok());
        }
        let _ = std::fs::remove_dir(&self.root);
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_pin_names_round_trip_and_avoid_dots() {
        let d = PinDir::new(Path::new("/x"));
        let p = d.link(LinkKind::XdpGeneric, 12, "eth0.100");
        assert_eq!(p, Path::new("/x/links/xdpg_12_eth0_100"));
        let p = d.link(LinkKind::Tcx, 7, "azv3f-1");
        assert_eq!(p, Path::new("/x/links/tcx_7_azv3f-1"));
    }
}
