//! The snapshot layout every keyed operator shares: one row per entry of its state, led by the
//! entry's key group and key, then the operator's own columns. A restoring worker keeps the rows
//! whose key group it owns, so that a checkpoint restores on any number of workers.

use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, BinaryArray, BooleanArray, Int64Array, UInt16Array, UInt32Array,
    UInt8Array,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use sluice_common::{Error, Result};

/// The columns that lead every keyed snapshot: the entry's key group, and its key (null for rows
/// that belong to no key yet, when the layout allows them).
pub fn key_columns(keyless_rows: bool) -> [Field; 2] {
    [
        Field::new("key_group", DataType::UInt16, false),
        Field::new("key", DataType::Binary, keyless_rows),
    ]
}

/// The layout of one operator's snapshots.
pub struct KeyedLayout {
    /// The operator, as errors name it ("a corrupt Top-N snapshot").
    what: &'static str,
    schema: SchemaRef,
}

impl KeyedLayout {
    /// The key columns, then `payload`. With `keyless_rows`, rows may have a null key: input
    /// that waits whole (for a watermark), which each restoring worker splits by key itself.
    pub fn new(what: &'static str, keyless_rows: bool, payload: Vec<Field>) -> Self {
        let mut fields = key_columns(keyless_rows).to_vec();
        fields.extend(payload);
        KeyedLayout {
            what,
            schema: Arc::new(Schema::new(fields)),
        }
    }

    pub fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    /// A snapshot batch: each row's key group and key, then the payload columns in order.
    pub fn batch(
        &self,
        groups: Vec<u16>,
        keys: BinaryArray,
        payload: Vec<ArrayRef>,
    ) -> Result<RecordBatch> {
        let mut columns: Vec<ArrayRef> = vec![Arc::new(UInt16Array::from(groups)), Arc::new(keys)];
        columns.extend(payload);
        Ok(RecordBatch::try_new(self.schema.clone(), columns)?)
    }

    /// The rows of a snapshot batch, once its layout is checked to be this one.
    pub fn read<'a>(&self, batch: &'a RecordBatch) -> Result<KeyedRows<'a>> {
        if batch.schema().fields() != self.schema.fields() {
            return Err(Error::Runtime(format!(
                "checkpoint: a {} snapshot has an unexpected layout",
                self.what
            )));
        }
        Ok(KeyedRows {
            what: self.what,
            batch,
            groups: batch.column(0).as_primitive(),
            keys: batch.column(1).as_binary(),
        })
    }
}

/// The rows of a snapshot in a checked [`KeyedLayout`]. Payload columns are numbered from 0 after
/// the key columns.
pub struct KeyedRows<'a> {
    what: &'static str,
    batch: &'a RecordBatch,
    groups: &'a UInt16Array,
    keys: &'a BinaryArray,
}

impl<'a> KeyedRows<'a> {
    pub fn len(&self) -> usize {
        self.batch.num_rows()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn group(&self, row: usize) -> u16 {
        self.groups.value(row)
    }

    /// The row's key; `None` for a row of no key.
    pub fn key(&self, row: usize) -> Option<&'a [u8]> {
        self.keys.is_valid(row).then(|| self.keys.value(row))
    }

    /// The rows with a key in a key group that `owns` accepts, in order.
    pub fn owned(&self, owns: &dyn Fn(u16) -> bool) -> Vec<usize> {
        (0..self.len())
            .filter(|i| self.keys.is_valid(*i) && owns(self.groups.value(*i)))
            .collect()
    }

    fn column(&self, payload: usize) -> &'a ArrayRef {
        self.batch.column(2 + payload)
    }

    pub fn binary(&self, payload: usize) -> &'a BinaryArray {
        self.column(payload).as_binary()
    }

    pub fn u8(&self, payload: usize) -> &'a UInt8Array {
        self.column(payload).as_primitive()
    }

    pub fn u32(&self, payload: usize) -> &'a UInt32Array {
        self.column(payload).as_primitive()
    }

    pub fn i64(&self, payload: usize) -> &'a Int64Array {
        self.column(payload).as_primitive()
    }

    pub fn bool(&self, payload: usize) -> &'a BooleanArray {
        self.column(payload).as_boolean()
    }

    /// The error for a snapshot whose values make no sense.
    pub fn corrupt(&self) -> Error {
        Error::Runtime(format!("checkpoint: a corrupt {} snapshot", self.what))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> KeyedLayout {
        KeyedLayout::new(
            "test",
            true,
            vec![Field::new("count", DataType::UInt32, false)],
        )
    }

    #[test]
    fn rows_are_kept_by_key_group_and_keyless_rows_are_left_to_the_operator() {
        let l = layout();
        let batch = l
            .batch(
                vec![1, 2, 0, 3],
                BinaryArray::from(vec![Some(&b"a"[..]), Some(b"b"), None, Some(b"c")]),
                vec![Arc::new(UInt32Array::from(vec![10, 20, 30, 40]))],
            )
            .unwrap();
        let rows = l.read(&batch).unwrap();
        assert_eq!(rows.owned(&|g| g % 2 == 1), vec![0, 3]);
        assert_eq!(rows.key(2), None);
        assert_eq!(rows.key(3), Some(&b"c"[..]));
        assert_eq!(rows.u32(0).value(1), 20);
    }

    #[test]
    fn another_layout_is_refused_naming_the_operator() {
        let other = KeyedLayout::new("other", false, vec![]);
        let batch = other
            .batch(vec![1], BinaryArray::from(vec![&b"a"[..]]), vec![])
            .unwrap();
        let err = layout().read(&batch).err().unwrap().to_string();
        assert!(
            err.contains("a test snapshot has an unexpected layout"),
            "{err}"
        );
    }
}
