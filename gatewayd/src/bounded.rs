//! A map with a fixed capacity that evicts its least recently used entry to make room.
//!
//! Every table gatewayd keys by a LAN source address (the filter's token buckets in userspace
//! mode, handshake-failure counters, the per-address connection rate, addresses suspected of
//! failing handshakes) is one of these: a flood of distinct (possibly forged) source addresses
//! costs a fixed amount of memory and evicts old entries instead of growing the table. The
//! caller counts evictions (`gatewayd_address_table_evictions_total{table}`).
//!
//! Recency is kept in a queue of `(key, stamp)`: a touched key gets a new stamp and a new queue
//! entry, and older queue entries of that key are skipped at eviction. The queue is rebuilt from
//! the map once it holds more than twice the capacity (amortised O(1) per operation).

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;

/// A map of at most `capacity` entries that evicts the least recently used one to make room.
#[derive(Debug)]
pub struct BoundedMap<K, V> {
    map: HashMap<K, (V, u64)>,
    order: VecDeque<(K, u64)>,
    capacity: usize,
    stamp: u64,
}

impl<K: Eq + Hash + Copy, V> BoundedMap<K, V> {
    /// An empty map holding at most `capacity` entries (at least 1).
    pub fn new(capacity: usize) -> Self {
        Self {
            map: HashMap::new(),
            order: VecDeque::new(),
            capacity: capacity.max(1),
            stamp: 0,
        }
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether no entry is held.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Most entries held at once.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Changes the capacity; returns how many entries were evicted to fit.
    pub fn set_capacity(&mut self, capacity: usize) -> usize {
        self.capacity = capacity.max(1);
        let mut evicted = 0;
        while self.map.len() > self.capacity {
            if self.evict_one().is_none() {
                break;
            }
            evicted += 1;
        }
        evicted
    }

    fn next_stamp(&mut self) -> u64 {
        self.stamp += 1;
        self.stamp
    }

    /// The value of `k` (not a use: recency unchanged).
    pub fn peek(&self, k: &K) -> Option<&V> {
        self.map.get(k).map(|(v, _)| v)
    }

    /// Whether `k` is held (not a use: recency unchanged).
    pub fn contains_key(&self, k: &K) -> bool {
        self.map.contains_key(k)
    }

    /// The value of `k`, marked as most recently used.
    pub fn get_mut(&mut self, k: &K) -> Option<&mut V> {
        if !self.map.contains_key(k) {
            return None;
        }
        let s = self.next_stamp();
        self.order.push_back((*k, s));
        self.compact();
        let e = self.map.get_mut(k)?;
        e.1 = s;
        Some(&mut e.0)
    }

    /// Inserts or replaces `k` as the most recently used entry. Returns the entry evicted to
    /// make room, if any.
    pub fn insert(&mut self, k: K, v: V) -> Option<(K, V)> {
        let evicted = if !self.map.contains_key(&k) && self.map.len() >= self.capacity {
            self.evict_one()
        } else {
            None
        };
        let s = self.next_stamp();
        self.map.insert(k, (v, s));
        self.order.push_back((k, s));
        self.compact();
        evicted
    }

    /// Removes `k`, returning its value.
    pub fn remove(&mut self, k: &K) -> Option<V> {
        // Its queue entries become stale and are skipped (or dropped at the next compaction).
        self.map.remove(k).map(|(v, _)| v)
    }

    /// Keeps only the entries for which `f` is true.
    pub fn retain(&mut self, mut f: impl FnMut(&K, &mut V) -> bool) {
        self.map.retain(|k, (v, _)| f(k, v));
        self.compact();
    }

    /// The keys, in no particular order.
    pub fn keys(&self) -> impl Iterator<Item = &K> {
        self.map.keys()
    }

    /// The entries, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.map.iter().map(|(k, (v, _))| (k, v))
    }

    /// Removes the least recently used entry.
    fn evict_one(&mut self) -> Option<(K, V)> {
        while let Some((k, s)) = self.order.pop_front() {
            if self.map.get(&k).is_some_and(|(_, cur)| *cur == s) {
                return self.map.remove(&k).map(|(v, _)| (k, v));
            }
        }
        None
    }

    /// Rebuilds the recency queue from the map once stale entries dominate it.
    fn compact(&mut self) {
        if self.order.len() <= 2 * self.capacity.max(self.map.len()) + 16 {
            return;
        }
        let mut live: Vec<(K, u64)> = self.map.iter().map(|(k, (_, s))| (*k, *s)).collect();
        live.sort_unstable_by_key(|(_, s)| *s);
        self.order = live.into();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_the_least_recently_used_entry_and_never_grows_past_capacity() {
        let mut m = BoundedMap::new(3);
        assert!(m.insert(1, "a").is_none());
        assert!(m.insert(2, "b").is_none());
        assert!(m.insert(3, "c").is_none());
        // 1 used again: 2 is now the oldest.
        assert_eq!(m.get_mut(&1).copied(), Some("a"));
        assert_eq!(m.insert(4, "d"), Some((2, "b")));
        assert_eq!(m.len(), 3);
        // Replacing an existing key evicts nothing.
        assert!(m.insert(4, "e").is_none());
        assert_eq!(m.insert(5, "f"), Some((3, "c")));
        assert_eq!(m.insert(6, "g"), Some((1, "a")));
        assert_eq!(m.peek(&4), Some(&"e"));
        // A removed key's stale queue entries are skipped.
        m.remove(&4);
        assert!(m.insert(7, "h").is_none());
        assert_eq!(m.insert(8, "i"), Some((5, "f")));
    }

    #[test]
    fn a_long_flood_keeps_memory_bounded() {
        let mut m = BoundedMap::new(100);
        let mut evicted = 0;
        for i in 0..100_000u32 {
            if m.insert(i, ()).is_some() {
                evicted += 1;
            }
            // A hot key touched all along survives the flood.
            m.insert(u32::MAX, ());
            m.get_mut(&u32::MAX);
        }
        assert_eq!(m.len(), 100);
        assert!(m.contains_key(&u32::MAX));
        assert!(evicted > 99_000);
        assert!(m.order.len() <= 2 * 100 + 16 + 1, "queue {}", m.order.len());
    }

    #[test]
    fn shrinking_evicts_the_oldest() {
        let mut m = BoundedMap::new(10);
        for i in 0..10 {
            m.insert(i, i);
        }
        assert_eq!(m.set_capacity(4), 6);
        let mut left: Vec<_> = m.keys().copied().collect();
        left.sort_unstable();
        assert_eq!(left, vec![6, 7, 8, 9]);
    }
}
