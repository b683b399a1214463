//! The kernel cache as two maps, one per size class: `LDNS_CACHE` holds
//! the entries that fit 256 bytes ([`SmallValue`], a two-choice slot
//! table, [`SlotTable`]), `LDNS_CACHE_BIG` the rest ([`CacheValue`], an
//! LRU hash map). An entry lives in exactly one of them: writing it
//! to one removes it from the other, so the program (which looks in the
//! small map first) never serves an older copy from the other class.
//! Callers see one map of [`CacheValue`]s.

use std::collections::HashSet;

use aya::maps::{HashMap as BpfHashMap, Map, MapData, MapError};
use localdns_common::{CacheKey, CacheValue, MAP_CACHE, MAP_CACHE_BIG};

use super::slots::SlotTable;
use super::{FastpathError, map_err};
use crate::cache::mono_ns;

/// The cache maps of one fast path.
pub struct CacheMaps {
    small: SlotTable,
    big: BpfHashMap<MapData, CacheKey, CacheValue>,
    /// Keys that may be in the big map: what this instance wrote there
    /// (plus, after an adoption, what it held), less what it removed. A
    /// superset (the kernel's LRU evicts without telling), so the common
    /// small write deletes from the big map only when the key may be
    /// there: one syscall, not two.
    big_keys: HashSet<CacheKey>,
}

impl CacheMaps {
    /// Takes both cache maps out of a loaded object.
    pub fn take(ebpf: &mut aya::Ebpf, adopted: bool) -> Result<Self, FastpathError> {
        CacheMaps::from_maps(
            |name| ebpf.take_map(name).ok_or(FastpathError::Missing(name)),
            adopted,
        )
    }

    /// Builds the pair from `map(name)` for each of the two map names.
    /// `adopted`: the maps come from an earlier instance (the big one may
    /// hold entries).
    pub fn from_maps(
        mut map: impl FnMut(&'static str) -> Result<Map, FastpathError>,
        adopted: bool,
    ) -> Result<Self, FastpathError> {
        let small = match map(MAP_CACHE)? {
            Map::Array(data) => {
                let slots = data.info().map_err(map_err(MAP_CACHE))?.max_entries();
                SlotTable::map(data.fd(), slots).map_err(|e| FastpathError::Slots {
                    source: Box::new(e),
                })?
            }
            _ => {
                return Err(map_err(MAP_CACHE)(MapError::InvalidMapType { map_type: 0 }));
            }
        };
        let big: BpfHashMap<MapData, CacheKey, CacheValue> =
            BpfHashMap::try_from(map(MAP_CACHE_BIG)?).map_err(map_err(MAP_CACHE_BIG))?;
        let big_keys = if adopted {
            big.keys().filter_map(|k| k.ok()).collect()
        } else {
            HashSet::new()
        };
        Ok(CacheMaps {
            small,
            big,
            big_keys,
        })
    }

    /// A generation no entry written through these maps has had: the
    /// slot table's source, so moves inside it never reuse one.
    pub fn next_generation(&self) -> u64 {
        self.small.next_generation()
    }

    /// Writes the entry into its class's map and removes it from the
    /// other. A key whose hash is 0 (the empty slot's) goes to the big
    /// class.
    pub fn insert(&mut self, key: &CacheKey, v: &CacheValue) -> Result<(), FastpathError> {
        match v.compact().filter(|_| key.hash != 0) {
            Some(mut s) => {
                s.hash = key.hash;
                self.small.insert(&s, mono_ns());
                if self.big_keys.remove(key) {
                    let _ = self.big.remove(key);
                }
            }
            None => {
                self.big_keys.insert(*key);
                self.big.insert(key, v, 0).map_err(map_err(MAP_CACHE_BIG))?;
                self.small.remove(key.hash);
            }
        }
        Ok(())
    }

    /// The entry under `key`, from whichever map holds it.
    pub fn get(&self, key: &CacheKey) -> Option<CacheValue> {
        if let Some(s) = self.small.get(key.hash) {
            return Some(s.expand());
        }
        self.big.get(key, 0).ok()
    }

    /// Removes the entry from both maps; true if one held it.
    pub fn remove(&mut self, key: &CacheKey) -> bool {
        let small = self.small.remove(key.hash);
        let big = self.big_keys.remove(key) && self.big.remove(key).is_ok();
        small || big
    }

    /// Every readable entry of both maps, in the big class's layout.
    pub fn entries(&self) -> Vec<(CacheKey, CacheValue)> {
        let mut out: Vec<(CacheKey, CacheValue)> = self
            .small
            .entries()
            .iter()
            .map(|s| (CacheKey { hash: s.hash }, s.expand()))
            .collect();
        out.extend(self.big.iter().filter_map(|r| r.ok()));
        out
    }

    /// Entries in (small, big) map (occupied slots; the big map's keys).
    pub fn counts(&self) -> (usize, usize) {
        (
            self.small.count(),
            self.big.keys().filter(Result::is_ok).count(),
        )
    }

    /// Removes every entry; returns how many there were.
    pub fn clear(&mut self) -> usize {
        let big: Vec<CacheKey> = self.big.keys().filter_map(|k| k.ok()).collect();
        for k in &big {
            let _ = self.big.remove(k);
        }
        self.big_keys.clear();
        self.small.clear_all() + big.len()
    }
}
