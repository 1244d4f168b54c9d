//! Interning of group keys into dense ids.

use std::hash::BuildHasher;

use arrow::array::ArrayRef;
use arrow::error::ArrowError;
use arrow_row::{RowConverter, Rows, SortField};
use hashbrown::{DefaultHashBuilder, HashTable};

use crate::ByteSlots;

/// Keys up to this long are kept in the hash table's slot as well, so that a probe compares
/// them without touching the arena (row-encoded BIGINT keys are 9 bytes).
const INLINE: usize = 15;

/// A hash table slot: the group id and, for short keys, the key itself.
#[derive(Clone, Copy)]
struct Slot {
    gid: u32,
    /// The key's length when it is inline, else `u8::MAX`.
    len: u8,
    inline: [u8; INLINE],
}

impl Slot {
    fn new(gid: u32, key: &[u8]) -> Slot {
        let mut inline = [0; INLINE];
        let len = if key.len() <= INLINE {
            inline[..key.len()].copy_from_slice(key);
            key.len() as u8
        } else {
            u8::MAX
        };
        Slot { gid, len, inline }
    }

    /// The key, when it is inline.
    #[inline]
    fn key(&self) -> Option<&[u8]> {
        (self.len != u8::MAX).then(|| &self.inline[..self.len as usize])
    }
}

/// The tag of a key that was never tagged.
pub const NO_TAG: u16 = u16::MAX;

/// Maps group keys to dense `u32` ids and back, reusing the ids of removed groups.
///
/// Keys live row-encoded in one arena ([`ByteSlots`]: no allocation per key), with each group's
/// hash kept so that probes compare hashes before bytes and growth never re-hashes keys.
pub struct GroupTable {
    converter: RowConverter,
    hasher: DefaultHashBuilder,
    table: HashTable<Slot>,
    keys: ByteSlots,
    hashes: Vec<u64>,
    /// A caller's value per key (the aggregation caches each key's key group here), reset to
    /// [`NO_TAG`] whenever an id gets a new key.
    tags: Vec<u16>,
    free: Vec<u32>,
}

impl GroupTable {
    /// A table for keys with the given column types.
    pub fn try_new(fields: Vec<SortField>) -> Result<Self, ArrowError> {
        Ok(GroupTable {
            converter: RowConverter::new(fields)?,
            hasher: DefaultHashBuilder::default(),
            table: HashTable::new(),
            keys: ByteSlots::default(),
            hashes: vec![],
            tags: vec![],
            free: vec![],
        })
    }

    /// Number of live groups.
    pub fn len(&self) -> usize {
        self.table.len()
    }

    /// True when there are no groups.
    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    /// One past the largest group id ever handed out: the length per-group vectors need.
    pub fn capacity(&self) -> usize {
        self.hashes.len()
    }

    /// Row-encodes key columns.
    pub fn encode(&self, columns: &[ArrayRef]) -> Result<Rows, ArrowError> {
        self.converter.convert_columns(columns)
    }

    #[inline]
    fn key(&self, gid: u32) -> &[u8] {
        self.keys.get(gid).unwrap_or_default()
    }

    /// Stores `bytes` as the key of `gid`.
    fn store(&mut self, gid: u32, bytes: &[u8], hash: u64) {
        let g = gid as usize;
        self.keys.set(gid, bytes);
        if g == self.hashes.len() {
            self.hashes.push(hash);
            self.tags.push(NO_TAG);
        } else {
            self.hashes[g] = hash;
            self.tags[g] = NO_TAG;
        }
    }

    /// The group id of every row, creating groups for new keys.
    pub fn intern(&mut self, rows: &Rows, out: &mut Vec<u32>) {
        out.clear();
        out.reserve(rows.num_rows());
        for row in rows.iter() {
            out.push(self.intern_bytes(row.as_ref()));
        }
    }

    /// Forgets a group; its id may be handed out again. Removing an id that is not a live group
    /// is a caller's bug (its id would be handed out twice): it changes nothing.
    pub fn remove(&mut self, gid: u32) {
        if !self.keys.contains(gid) {
            debug_assert!(false, "group {gid} removed twice");
            return;
        }
        let hash = self.hashes[gid as usize];
        if let Ok(entry) = self.table.find_entry(hash, |s| s.gid == gid) {
            entry.remove();
        }
        self.keys.remove(gid);
        self.free.push(gid);
    }

    /// The group id of a row-encoded key, if it is a group.
    pub fn get(&self, bytes: &[u8]) -> Option<u32> {
        self.find(bytes, self.hasher.hash_one(bytes))
    }

    fn find(&self, bytes: &[u8], hash: u64) -> Option<u32> {
        // Short keys compare as fixed-size arrays (no call, no arena access).
        let probe = Slot::new(0, bytes);
        let (hashes, keys) = (&self.hashes, &self.keys);
        self.table
            .find(hash, |s| match probe.key() {
                Some(_) => s.len == probe.len && s.inline == probe.inline,
                None => {
                    s.key().is_none()
                        && hashes[s.gid as usize] == hash
                        && keys.get(s.gid) == Some(bytes)
                }
            })
            .map(|s| s.gid)
    }

    /// Makes room for `additional` more groups (a restore knows how many come).
    pub fn reserve(&mut self, additional: usize) {
        let hashes = &self.hashes;
        self.table.reserve(additional, |s| hashes[s.gid as usize]);
        self.hashes.reserve(additional);
        self.tags.reserve(additional);
    }

    /// Whether `gid` is a live group.
    pub fn contains(&self, gid: u32) -> bool {
        self.keys.contains(gid)
    }

    /// The tag of a group's key ([`NO_TAG`] until set).
    #[inline]
    pub fn tag(&self, gid: u32) -> u16 {
        self.tags[gid as usize]
    }

    /// Tags a group's key; the tag stays until the id is given to another key.
    pub fn set_tag(&mut self, gid: u32, tag: u16) {
        self.tags[gid as usize] = tag;
    }

    /// The row-encoded key of a group (for snapshots).
    pub fn key_bytes(&self, gid: u32) -> &[u8] {
        self.key(gid)
    }

    /// Every group's row-encoded key, by group id (for snapshots taken by copying).
    pub fn key_slots(&self) -> &ByteSlots {
        &self.keys
    }

    /// Every group's tag, by group id.
    pub fn tags(&self) -> &[u16] {
        &self.tags
    }

    /// The group id of a row-encoded key, creating the group if needed (for restores).
    pub fn intern_bytes(&mut self, bytes: &[u8]) -> u32 {
        let hash = self.hasher.hash_one(bytes);
        if let Some(g) = self.find(bytes, hash) {
            return g;
        }
        let g = self.free.pop().unwrap_or(self.hashes.len() as u32);
        self.store(g, bytes, hash);
        let hashes = &self.hashes;
        self.table
            .insert_unique(hash, Slot::new(g, bytes), |s| hashes[s.gid as usize]);
        g
    }

    /// The key columns of the given groups.
    pub fn keys(&self, gids: &[u32]) -> Result<Vec<ArrayRef>, ArrowError> {
        let parser = self.converter.parser();
        self.converter
            .convert_rows(gids.iter().map(|&g| parser.parse(self.key(g))))
    }

    /// Approximate bytes held, for state-size metrics.
    pub fn size_bytes(&self) -> usize {
        self.keys.size_bytes()
            + self.hashes.capacity() * 8
            + self.tags.capacity() * 2
            + self.table.capacity() * (std::mem::size_of::<Slot>() + 1)
            + self.free.capacity() * 4
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::{Array, AsArray, Int64Array, StringArray};
    use arrow::datatypes::{DataType, Int64Type};

    use super::*;

    #[test]
    fn interns_and_reuses_ids() {
        let mut t = GroupTable::try_new(vec![
            SortField::new(DataType::Utf8),
            SortField::new(DataType::Int64),
        ])
        .unwrap();
        let cols: Vec<ArrayRef> = vec![
            Arc::new(StringArray::from(vec!["a", "b", "a", "c"])),
            Arc::new(Int64Array::from(vec![1, 1, 1, 2])),
        ];
        let rows = t.encode(&cols).unwrap();
        let mut gids = vec![];
        t.intern(&rows, &mut gids);
        assert_eq!(gids, vec![0, 1, 0, 2]);
        assert_eq!(t.len(), 3);
        assert_eq!(t.tag(1), NO_TAG);
        t.set_tag(1, 7);
        t.set_tag(2, 9);
        t.remove(1);
        assert_eq!(t.len(), 2);
        let cols: Vec<ArrayRef> = vec![
            Arc::new(StringArray::from(vec!["d"])),
            Arc::new(Int64Array::from(vec![9])),
        ];
        let rows = t.encode(&cols).unwrap();
        t.intern(&rows, &mut gids);
        assert_eq!(gids, vec![1], "the freed id is reused");
        assert_eq!(t.tag(1), NO_TAG, "a reused id loses the old key's tag");
        assert_eq!(t.tag(2), 9);
        let keys = t.keys(&[1, 2]).unwrap();
        assert_eq!(keys[0].as_string::<i32>().value(0), "d");
        assert_eq!(
            keys[1].as_primitive::<Int64Type>().values().to_vec(),
            vec![9, 2]
        );
        assert_eq!(keys[0].len(), 2);
    }

    #[test]
    fn longer_keys_move_and_compaction_keeps_live_keys() {
        let mut t = GroupTable::try_new(vec![SortField::new(DataType::Utf8)]).unwrap();
        let names: Vec<String> = (0..300_000).map(|i| format!("key-{i}")).collect();
        let cols: Vec<ArrayRef> = vec![Arc::new(StringArray::from(names.clone()))];
        let mut gids = vec![];
        t.intern(&t.encode(&cols).unwrap(), &mut gids);
        for g in 0..299_990u32 {
            t.remove(g);
        }
        // A longer key reuses an id whose slot is too small.
        let cols: Vec<ArrayRef> = vec![Arc::new(StringArray::from(vec![
            "a much longer key than any before",
        ]))];
        t.intern(&t.encode(&cols).unwrap(), &mut gids);
        let cols: Vec<ArrayRef> = vec![Arc::new(StringArray::from(names[299_990..].to_vec()))];
        let mut again = vec![];
        t.intern(&t.encode(&cols).unwrap(), &mut again);
        assert_eq!(
            again,
            (299_990..300_000).collect::<Vec<u32>>(),
            "live keys keep their ids"
        );
        let keys = t.keys(&[gids[0]]).unwrap();
        assert_eq!(
            keys[0].as_string::<i32>().value(0),
            "a much longer key than any before"
        );
        assert_eq!(t.len(), 11);
    }
}
