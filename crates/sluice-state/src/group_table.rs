//! Interning of group keys into dense ids.

use std::hash::BuildHasher;

use arrow::array::ArrayRef;
use arrow::error::ArrowError;
use arrow_row::{RowConverter, Rows, SortField};
use hashbrown::{DefaultHashBuilder, HashTable};

/// Maps group keys to dense `u32` ids and back, reusing the ids of removed groups.
pub struct GroupTable {
    converter: RowConverter,
    hasher: DefaultHashBuilder,
    table: HashTable<u32>,
    /// The row-encoded key of each group id (empty for free ids).
    keys: Vec<Box<[u8]>>,
    free: Vec<u32>,
}

impl GroupTable {
    /// A table for keys with the given column types.
    pub fn try_new(fields: Vec<SortField>) -> Result<Self, ArrowError> {
        Ok(GroupTable {
            converter: RowConverter::new(fields)?,
            hasher: DefaultHashBuilder::default(),
            table: HashTable::new(),
            keys: vec![],
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
        self.keys.len()
    }

    /// Row-encodes key columns.
    pub fn encode(&self, columns: &[ArrayRef]) -> Result<Rows, ArrowError> {
        self.converter.convert_columns(columns)
    }

    /// The group id of every row, creating groups for new keys.
    pub fn intern(&mut self, rows: &Rows, out: &mut Vec<u32>) {
        out.clear();
        out.reserve(rows.num_rows());
        for row in rows.iter() {
            let bytes = row.as_ref();
            let hash = self.hasher.hash_one(bytes);
            let keys = &self.keys;
            let gid = match self.table.find(hash, |&g| &*keys[g as usize] == bytes) {
                Some(&g) => g,
                None => {
                    let g = match self.free.pop() {
                        Some(g) => {
                            self.keys[g as usize] = bytes.into();
                            g
                        }
                        None => {
                            self.keys.push(bytes.into());
                            (self.keys.len() - 1) as u32
                        }
                    };
                    let keys = &self.keys;
                    let hasher = &self.hasher;
                    self.table
                        .insert_unique(hash, g, |&x| hasher.hash_one(&*keys[x as usize]));
                    g
                }
            };
            out.push(gid);
        }
    }

    /// Forgets a group; its id may be handed out again.
    pub fn remove(&mut self, gid: u32) {
        let bytes = std::mem::take(&mut self.keys[gid as usize]);
        let hash = self.hasher.hash_one(&*bytes);
        if let Ok(entry) = self.table.find_entry(hash, |&g| g == gid) {
            entry.remove();
        }
        self.free.push(gid);
    }

    /// The key columns of the given groups.
    pub fn keys(&self, gids: &[u32]) -> Result<Vec<ArrayRef>, ArrowError> {
        let parser = self.converter.parser();
        self.converter
            .convert_rows(gids.iter().map(|&g| parser.parse(&self.keys[g as usize])))
    }

    /// Approximate bytes held, for state-size metrics.
    pub fn size_bytes(&self) -> usize {
        self.keys.iter().map(|k| k.len() + 16).sum::<usize>()
            + self.table.capacity() * 8
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
        t.remove(1);
        assert_eq!(t.len(), 2);
        let cols: Vec<ArrayRef> = vec![
            Arc::new(StringArray::from(vec!["d"])),
            Arc::new(Int64Array::from(vec![9])),
        ];
        let rows = t.encode(&cols).unwrap();
        t.intern(&rows, &mut gids);
        assert_eq!(gids, vec![1], "the freed id is reused");
        let keys = t.keys(&[1, 2]).unwrap();
        assert_eq!(keys[0].as_string::<i32>().value(0), "d");
        assert_eq!(
            keys[1].as_primitive::<Int64Type>().values().to_vec(),
            vec![9, 2]
        );
        assert_eq!(keys[0].len(), 2);
    }
}
