//! Maps keyed by ids this process assigned itself (request ids, link ids, the master's pids).

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// A map from an id this process chose to `V`. No peer picks these keys, so the map needs
/// no defence against keys chosen to collide: one multiplication hashes a key, where the
/// default hasher spends over a hundred instructions, on every call.
/// (Keys a peer names, as a frame's destination, are only looked up: they make no
/// collisions.)
pub(crate) type IdMap<V, K = u64> = HashMap<K, V, BuildHasherDefault<IdHasher>>;

/// The keys of `map`, ascending (a hash map keeps no order of its own).
pub(crate) fn sorted_keys<K: Ord + Copy, V>(map: &IdMap<V, K>) -> Vec<K> {
    let mut keys: Vec<K> = map.keys().copied().collect();
    keys.sort_unstable();
    keys
}

/// Fibonacci hashing of one `u64`: consecutive ids spread over all the bits.
#[derive(Default)]
pub(crate) struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write_u64(&mut self, id: u64) {
        self.0 = (self.0 ^ id).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }

    fn write_u32(&mut self, id: u32) {
        self.write_u64(id.into());
    }

    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(word));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consecutive_ids_land_in_distinct_high_and_low_bits() {
        let hash = |id: u64| {
            let mut h = IdHasher::default();
            h.write_u64(id);
            h.finish()
        };
        let low: std::collections::HashSet<u64> = (0..1024).map(|id| hash(id) & 1023).collect();
        let high: std::collections::HashSet<u64> = (0..1024).map(|id| hash(id) >> 57).collect();
        assert_eq!(low.len(), 1024, "the bucket bits of 1024 consecutive ids are all distinct");
        assert_eq!(high.len(), 128, "the tag bits take every value");
    }
}
