//! Byte strings indexed by dense ids, in one arena: no allocation per entry, updated in place
//! when the new value fits, compacted when dead bytes dominate.

/// The length of an empty slot.
const ABSENT: u32 = u32::MAX;

/// An optional byte string per id (group keys, the last result emitted per group).
#[derive(Default)]
pub struct ByteSlots {
    arena: Vec<u8>,
    offsets: Vec<usize>,
    lens: Vec<u32>,
    /// Arena bytes no live slot uses.
    garbage: usize,
    live: usize,
}

/// A copy in three bulk copies; `clone_from` reuses the target's buffers (snapshots copy the
/// keys of every group each checkpoint).
impl Clone for ByteSlots {
    fn clone(&self) -> Self {
        let mut copy = ByteSlots::default();
        copy.clone_from(self);
        copy
    }

    fn clone_from(&mut self, source: &Self) {
        self.arena.clone_from(&source.arena);
        self.offsets.clone_from(&source.offsets);
        self.lens.clone_from(&source.lens);
        self.garbage = source.garbage;
        self.live = source.live;
    }
}

impl ByteSlots {
    /// The bytes of `id`, if set.
    #[inline]
    pub fn get(&self, id: u32) -> Option<&[u8]> {
        let i = id as usize;
        match self.lens.get(i) {
            Some(&len) if len != ABSENT => {
                Some(&self.arena[self.offsets[i]..self.offsets[i] + len as usize])
            }
            _ => None,
        }
    }

    /// Whether `id` is set.
    #[inline]
    pub fn contains(&self, id: u32) -> bool {
        self.lens.get(id as usize).is_some_and(|l| *l != ABSENT)
    }

    /// Number of ids set.
    pub fn len(&self) -> usize {
        self.live
    }

    /// True when no id is set.
    pub fn is_empty(&self) -> bool {
        self.live == 0
    }

    /// One past the largest id ever set.
    pub fn capacity(&self) -> usize {
        self.lens.len()
    }

    /// Sets `id` to `bytes`, in place when its old value was at least as long.
    pub fn set(&mut self, id: u32, bytes: &[u8]) {
        self.set_parts(id, &[bytes]);
    }

    /// Sets `id` to the concatenation of `parts` (no intermediate copy).
    pub fn set_parts(&mut self, id: u32, parts: &[&[u8]]) {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        let i = id as usize;
        if i >= self.lens.len() {
            self.offsets.resize(i + 1, 0);
            self.lens.resize(i + 1, ABSENT);
        }
        let old = self.lens[i];
        if old == ABSENT {
            self.live += 1;
        } else if len <= old as usize {
            let mut off = self.offsets[i];
            for p in parts {
                self.arena[off..off + p.len()].copy_from_slice(p);
                off += p.len();
            }
            self.garbage += old as usize - len;
            self.lens[i] = len as u32;
            return;
        } else {
            self.garbage += old as usize;
        }
        self.offsets[i] = self.arena.len();
        for p in parts {
            self.arena.extend_from_slice(p);
        }
        self.lens[i] = len as u32;
        self.maybe_compact();
    }

    /// Clears `id`.
    pub fn remove(&mut self, id: u32) {
        let i = id as usize;
        match self.lens.get(i) {
            Some(&len) if len != ABSENT => {
                self.garbage += len as usize;
                self.lens[i] = ABSENT;
                self.live -= 1;
                self.maybe_compact();
            }
            _ => {}
        }
    }

    fn maybe_compact(&mut self) {
        if self.garbage > 1 << 20 && self.garbage * 2 > self.arena.len() {
            let mut arena = Vec::with_capacity(self.arena.len() - self.garbage);
            for (off, len) in self.offsets.iter_mut().zip(&self.lens) {
                let start = arena.len();
                if *len != ABSENT {
                    arena.extend_from_slice(&self.arena[*off..*off + *len as usize]);
                }
                *off = start;
            }
            self.arena = arena;
            self.garbage = 0;
        }
    }

    /// Approximate bytes held, for state-size metrics.
    pub fn size_bytes(&self) -> usize {
        self.arena.capacity() + self.offsets.capacity() * 8 + self.lens.capacity() * 4
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use rand::{Rng, SeedableRng};

    use super::*;

    /// Random sets and removes agree with a map, across in-place updates, moves and compactions.
    #[test]
    fn behaves_like_a_map() {
        let mut rng = rand::rngs::SmallRng::seed_from_u64(3);
        let mut slots = ByteSlots::default();
        let mut want: HashMap<u32, Vec<u8>> = HashMap::new();
        for step in 0..400_000 {
            let id = rng.random_range(0..2_000u32);
            if rng.random_bool(0.3) {
                slots.remove(id);
                want.remove(&id);
            } else {
                let len = rng.random_range(0..(if step % 1000 == 0 { 4000 } else { 40 }));
                let bytes: Vec<u8> = (0..len).map(|_| rng.random()).collect();
                slots.set(id, &bytes);
                want.insert(id, bytes);
            }
        }
        assert_eq!(slots.len(), want.len());
        for id in 0..2_100u32 {
            assert_eq!(slots.get(id), want.get(&id).map(|v| &v[..]), "id {id}");
            assert_eq!(slots.contains(id), want.contains_key(&id));
        }
        assert!(slots.garbage * 2 <= slots.arena.len() || slots.garbage <= 1 << 20);
    }
}
