//! A least-recently-used map bounded in bytes, with pinned entries that are never evicted.

use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;

struct Entry<V> {
    value: V,
    bytes: usize,
    /// Last use; `None` for pinned entries, which are not in the eviction order.
    tick: Option<u64>,
}

pub struct ByteLru<K, V> {
    map: HashMap<K, Entry<V>>,
    order: BTreeMap<u64, K>,
    tick: u64,
    used: usize,
    budget: usize,
    evictions: u64,
}

impl<K: Hash + Eq + Clone, V> ByteLru<K, V> {
    pub fn new(budget_bytes: usize) -> Self {
        ByteLru {
            map: HashMap::new(),
            order: BTreeMap::new(),
            tick: 0,
            used: 0,
            budget: budget_bytes,
            evictions: 0,
        }
    }

    pub fn budget(&self) -> usize {
        self.budget
    }

    pub fn used_bytes(&self) -> usize {
        self.used
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn evictions(&self) -> u64 {
        self.evictions
    }

    pub fn contains(&self, key: &K) -> bool {
        self.map.contains_key(key)
    }

    /// Looks up and marks as recently used.
    pub fn get(&mut self, key: &K) -> Option<&V> {
        let e = self.map.get_mut(key)?;
        if let Some(t) = e.tick {
            self.order.remove(&t);
            self.tick += 1;
            e.tick = Some(self.tick);
            self.order.insert(self.tick, key.clone());
        }
        Some(&e.value)
    }

    /// Looks up without changing the order.
    pub fn peek(&self, key: &K) -> Option<&V> {
        self.map.get(key).map(|e| &e.value)
    }

    /// Inserts (or replaces) and evicts the least recently used unpinned entries beyond the budget.
    pub fn insert(&mut self, key: K, value: V, bytes: usize, pinned: bool) {
        self.remove(&key);
        let tick = if pinned {
            None
        } else {
            self.tick += 1;
            self.order.insert(self.tick, key.clone());
            Some(self.tick)
        };
        self.used += bytes;
        self.map.insert(key, Entry { value, bytes, tick });
        self.shrink();
    }

    pub fn remove(&mut self, key: &K) -> Option<V> {
        let e = self.map.remove(key)?;
        if let Some(t) = e.tick {
            self.order.remove(&t);
        }
        self.used -= e.bytes;
        Some(e.value)
    }

    pub fn set_budget(&mut self, budget_bytes: usize) {
        self.budget = budget_bytes;
        self.shrink();
    }

    fn shrink(&mut self) {
        while self.used > self.budget {
            let Some((_, key)) = self.order.pop_first() else {
                break;
            };
            if let Some(e) = self.map.remove(&key) {
                self.used -= e.bytes;
                self.evictions += 1;
            }
        }
    }

    pub fn keys(&self) -> impl Iterator<Item = &K> {
        self.map.keys()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_least_recently_used_within_budget() {
        let mut c = ByteLru::new(300);
        c.insert("a", 1, 100, false);
        c.insert("b", 2, 100, false);
        c.insert("c", 3, 100, false);
        assert_eq!(c.get(&"a"), Some(&1)); // a is now the most recent
        c.insert("d", 4, 100, false);
        assert!(!c.contains(&"b"), "b was the least recently used");
        assert!(c.contains(&"a") && c.contains(&"c") && c.contains(&"d"));
        assert_eq!(c.used_bytes(), 300);
        assert_eq!(c.evictions(), 1);
    }

    #[test]
    fn pinned_entries_stay() {
        let mut c = ByteLru::new(150);
        c.insert("pin", 0, 100, true);
        c.insert("x", 1, 100, false);
        assert!(c.contains(&"pin"));
        assert!(!c.contains(&"x"), "only the unpinned entry can go");
        c.set_budget(0);
        assert!(c.contains(&"pin"));
    }

    #[test]
    fn replacing_updates_bytes() {
        let mut c = ByteLru::new(1000);
        c.insert(1, "a", 10, false);
        c.insert(1, "b", 30, false);
        assert_eq!(c.used_bytes(), 30);
        assert_eq!(c.peek(&1), Some(&"b"));
        assert_eq!(c.remove(&1), Some("b"));
        assert_eq!(c.used_bytes(), 0);
        assert!(c.is_empty());
    }
}
