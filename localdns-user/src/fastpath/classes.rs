//! The kernel cache as two maps, one per size class: `LDNS_CACHE` holds
//! the entries that fit 264 bytes ([`SmallValue`]), `LDNS_CACHE_BIG` the
//! rest ([`CacheValue`]). An entry lives in exactly one of them: writing it
//! to one removes it from the other, so the program (which looks in the
//! small map first) never serves an older copy from the other class.
//! Callers see one map of [`CacheValue`]s.

use std::collections::HashSet;

use aya::maps::{HashMap as BpfHashMap, Map, MapData};
use localdns_common::{CacheKey, CacheValue, MAP_CACHE, MAP_CACHE_BIG, SmallValue};

use super::{FastpathError, map_err};

/// The cache maps of one fast path.
pub struct CacheMaps {
    small: BpfHashMap<MapData, CacheKey, SmallValue>,
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
        let small = BpfHashMap::try_from(map(MAP_CACHE)?).map_err(map_err(MAP_CACHE))?;
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

    /// Writes the entry into its class's map and removes it from the
    /// other.
    pub fn insert(&mut self, key: &CacheKey, v: &CacheValue) -> Result<(), FastpathError> {
        match v.compact() {
            Some(s) => {
                self.small.insert(key, s, 0).map_err(map_err(MAP_CACHE))?;
                if self.big_keys.remove(key) {
                    let _ = self.big.remove(key);
                }
            }
            None => {
                self.big_keys.insert(*key);
                self.big.insert(key, v, 0).map_err(map_err(MAP_CACHE_BIG))?;
                let _ = self.small.remove(key);
            }
        }
        Ok(())
    }

    /// The entry under `key`, from whichever map holds it.
    pub fn get(&self, key: &CacheKey) -> Option<CacheValue> {
        if let Ok(s) = self.small.get(key, 0) {
            return Some(s.expand());
        }
        self.big.get(key, 0).ok()
    }

    /// Removes the entry from both maps; true if one held it.
    pub fn remove(&mut self, key: &CacheKey) -> bool {
        let small = self.small.remove(key).is_ok();
        let big = self.big_keys.remove(key) && self.big.remove(key).is_ok();
        small || big
    }

    /// Every readable entry of both maps, in the big class's layout.
    pub fn entries(&self) -> Vec<(CacheKey, CacheValue)> {
        let mut out: Vec<(CacheKey, CacheValue)> = self
            .small
            .iter()
            .filter_map(|r| r.ok())
            .map(|(k, s)| (k, s.expand()))
            .collect();
        out.extend(self.big.iter().filter_map(|r| r.ok()));
        out
    }

    /// Entries in (small, big) map (walks their keys).
    pub fn counts(&self) -> (usize, usize) {
        (
            self.small.keys().filter(Result::is_ok).count(),
            self.big.keys().filter(Result::is_ok).count(),
        )
    }

    /// Removes every entry; returns how many there were.
    pub fn clear(&mut self) -> usize {
        let small: Vec<CacheKey> = self.small.keys().filter_map(|k| k.ok()).collect();
        let big: Vec<CacheKey> = self.big.keys().filter_map(|k| k.ok()).collect();
        for k in &small {
            let _ = self.small.remove(k);
        }
        for k in &big {
            let _ = self.big.remove(k);
        }
        self.big_keys.clear();
        small.len() + big.len()
    }
}
