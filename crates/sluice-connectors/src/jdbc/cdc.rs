//! What the CDC sources (`postgres-cdc`, `mysql-cdc`) share: their primary key's row encoding,
//! the batches with change kinds, and the positions a checkpoint records, including the
//! "windows" of snapshots resumed after a key.

use std::sync::Arc;

use arrow::array::{ArrayRef, BooleanArray, Int8Array};
use arrow::datatypes::{Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use arrow::row::{RowConverter, SortField};
use sluice_common::changelog::op_field;
use sluice_common::{Error, Result};

use crate::{Poll, SourceOffsets, SourceReader};

/// What every CDC table needs in its DDL: a PRIMARY KEY, and (for now) no metadata columns.
pub(super) fn check_table(
    spec: &crate::ConnectorSpec,
    opts: &crate::Options,
    connector: &str,
) -> Result<()> {
    if spec.primary_key.is_empty() {
        return Err(opts.error(format!(
            "a '{connector}' table needs a PRIMARY KEY (... NOT ENFORCED) naming the table's primary key: \
             the snapshot is read in its order and changes are matched by it"
        )));
    }
    if !spec.metadata.is_empty() {
        return Err(opts.error(format!("'{connector}' has no metadata columns yet")));
    }
    Ok(())
}

/// A CDC source's reader of its one ordered stream (a slot, a binlog).
pub(super) trait CdcReader: Send {
    fn poll(&mut self, max_rows: usize) -> Result<Poll>;
    /// Where the reader stands, for a checkpoint.
    fn offsets(&self) -> SourceOffsets;
    /// Resumes from a checkpoint's record; called before the first poll.
    fn restore(&mut self, restored: Restored);
    fn error(&self, message: String) -> Error;
    /// Checkpoint `epoch` records the reader's position now.
    fn checkpoint(&mut self, _epoch: u64) {}
    /// Checkpoint `epoch` committed: what it covers may be acknowledged.
    fn committed(&mut self, _epoch: u64) {}
    fn set_checkpointing(&mut self, _on: bool) {}
}

/// A CDC source: worker 0 reads the stream, the others nothing.
pub(super) struct CdcSource<R> {
    connector: &'static str,
    reader: Option<Box<R>>,
    silent: Vec<usize>,
}

impl<R: CdcReader> CdcSource<R> {
    /// Worker `worker` of `workers`: it keeps `reader` if it is worker 0.
    pub fn new(connector: &'static str, reader: R, worker: usize, workers: usize) -> Self {
        CdcSource {
            connector,
            reader: (worker == 0).then(|| Box::new(reader)),
            silent: match worker {
                0 => (1..workers).collect(),
                _ => vec![],
            },
        }
    }
}

impl<R: CdcReader> SourceReader for CdcSource<R> {
    fn poll(&mut self, max_rows: usize) -> Result<Poll> {
        match self.reader.as_mut() {
            None => Ok(Poll::Finished),
            Some(r) => r.poll(max_rows),
        }
    }

    fn offsets(&self) -> SourceOffsets {
        self.reader
            .as_ref()
            .map(|r| r.offsets())
            .unwrap_or_default()
    }

    fn seek(&mut self, offsets: &SourceOffsets) -> Result<()> {
        let Some(r) = self.reader.as_mut() else {
            return Ok(());
        };
        if offsets.is_empty() {
            return Ok(());
        }
        let restored = decode_offsets(offsets).ok_or_else(|| {
            r.error(format!(
                "the checkpoint's positions are not a {} source's: {offsets:?}",
                self.connector
            ))
        })?;
        r.restore(restored);
        Ok(())
    }

    fn checkpoint(&mut self, epoch: u64) {
        if let Some(r) = self.reader.as_mut() {
            r.checkpoint(epoch);
        }
    }

    fn committed(&mut self, epoch: u64) -> Result<()> {
        if let Some(r) = self.reader.as_mut() {
            r.committed(epoch);
        }
        Ok(())
    }

    fn set_checkpointing(&mut self, on: bool) {
        if let Some(r) = self.reader.as_mut() {
            r.set_checkpointing(on);
        }
    }

    fn silent_workers(&self) -> Vec<usize> {
        self.silent.clone()
    }
}

/// A CDC table's key and the batches its reader returns (its columns, then the change kinds).
pub(super) struct Keyed {
    /// The PRIMARY KEY's columns.
    pub key: Vec<usize>,
    /// The table's columns and the change kinds.
    pub schema: SchemaRef,
    rows: RowConverter,
}

impl Keyed {
    pub fn new(columns: &SchemaRef, key: Vec<usize>) -> Result<Self> {
        let rows = RowConverter::new(
            key.iter()
                .map(|k| SortField::new(columns.field(*k).data_type().clone()))
                .collect(),
        )?;
        let mut fields: Vec<_> = columns.fields().iter().cloned().collect();
        fields.push(Arc::new(op_field()));
        Ok(Keyed {
            key,
            schema: Arc::new(Schema::new(fields)),
            rows,
        })
    }

    /// The key columns of one row, from their row encoding.
    pub fn key_batch(&self, key: &[u8]) -> Result<RecordBatch> {
        let parser = self.rows.parser();
        let columns = self.rows.convert_rows([parser.parse(key)])?;
        let fields: Vec<_> = self
            .key
            .iter()
            .map(|k| self.schema.field(*k).clone())
            .collect();
        Ok(RecordBatch::try_new(
            Arc::new(Schema::new(fields)),
            columns,
        )?)
    }

    /// The encoded keys of `batch`'s rows, which order as the snapshot reads them.
    pub fn encode_keys(&self, batch: &RecordBatch) -> Result<arrow::row::Rows> {
        let columns: Vec<ArrayRef> = self.key.iter().map(|k| batch.column(*k).clone()).collect();
        Ok(self.rows.convert_columns(&columns)?)
    }

    /// The encoded key of `batch`'s last row.
    pub fn last_key(&self, batch: &RecordBatch) -> Result<Vec<u8>> {
        let keys = self.encode_keys(batch)?;
        Ok(keys.row(keys.num_rows() - 1).as_ref().to_vec())
    }

    /// A batch of the table's columns with each row's change kind.
    pub fn with_ops(&self, batch: RecordBatch, ops: Vec<i8>) -> Result<RecordBatch> {
        let mut columns = batch.columns().to_vec();
        columns.push(Arc::new(Int8Array::from(ops)));
        Ok(RecordBatch::try_new_with_options(
            self.schema.clone(),
            columns,
            &arrow::record_batch::RecordBatchOptions::new().with_row_count(Some(batch.num_rows())),
        )?)
    }

    /// `batch` without the rows the windows exclude: `windowed` holds a row's index and the
    /// position of its transaction.
    pub fn filter_windows(
        &self,
        batch: RecordBatch,
        windowed: Vec<(usize, u64)>,
        windows: &[Window],
    ) -> Result<RecordBatch> {
        if windowed.is_empty() {
            return Ok(batch);
        }
        let keys = self.encode_keys(&batch)?;
        let mut keep = vec![true; batch.num_rows()];
        for (i, at) in windowed {
            let k = keys.row(i);
            keep[i] = windows
                .iter()
                .filter(|w| at < w.lsn)
                .all(|w| w.key.as_deref().is_some_and(|bound| k.as_ref() <= bound));
        }
        Ok(arrow::compute::filter_record_batch(
            &batch,
            &BooleanArray::from(keep),
        )?)
    }
}

/// Changes that committed before position `lsn` keep only rows with keys at or before `key`
/// (`None`: no rows): a snapshot resumed after `key` at `lsn` holds the others.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Window {
    pub lsn: u64,
    pub key: Option<Vec<u8>>,
}

/// What a checkpoint recorded.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct Restored {
    pub lsn: u64,
    pub txn_rows: u64,
    pub windows: Vec<Window>,
    /// In the snapshot: the key of the last row returned (`Some(None)`: none yet).
    pub snapshot: Option<(u64, Option<Vec<u8>>)>,
}

fn hex(key: &Option<Vec<u8>>) -> String {
    match key {
        None => "-".into(),
        Some(k) => k.iter().map(|b| format!("{b:02x}")).collect(),
    }
}

fn unhex(text: &str) -> Option<Option<Vec<u8>>> {
    if text == "-" {
        return Some(None);
    }
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).ok())
        .collect::<Option<Vec<u8>>>()
        .map(Some)
}

/// A checkpoint's record of the reader: `lsn`, `lsn.rows`, a `window.<lsn>.<key>` per resumed
/// snapshot, and in a snapshot `snapshot.<key>` (rows read). Keys are hex row encodings (`-`:
/// none).
pub(super) fn encode_offsets(r: &Restored) -> SourceOffsets {
    let mut m = SourceOffsets::new();
    m.insert("lsn".into(), r.lsn);
    m.insert("lsn.rows".into(), r.txn_rows);
    for w in &r.windows {
        m.insert(format!("window.{}.{}", w.lsn, hex(&w.key)), w.lsn);
    }
    if let Some((rows, after)) = &r.snapshot {
        m.insert(format!("snapshot.{}", hex(after)), *rows);
    }
    m
}

pub(super) fn decode_offsets(m: &SourceOffsets) -> Option<Restored> {
    let mut r = Restored {
        lsn: *m.get("lsn")?,
        txn_rows: m.get("lsn.rows").copied().unwrap_or(0),
        ..Default::default()
    };
    for (name, value) in m {
        if let Some(rest) = name.strip_prefix("window.") {
            let (_, key) = rest.split_once('.')?;
            r.windows.push(Window {
                lsn: *value,
                key: unhex(key)?,
            });
        } else if let Some(key) = name.strip_prefix("snapshot.") {
            r.snapshot = Some((*value, unhex(key)?));
        }
    }
    r.windows.sort_by_key(|w| w.lsn);
    Some(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_round_trip() {
        let r = Restored {
            lsn: 0x1_6B37_4D48,
            txn_rows: 7,
            windows: vec![
                Window { lsn: 10, key: None },
                Window {
                    lsn: 20,
                    key: Some(vec![0, 1, 0xfe]),
                },
            ],
            snapshot: Some((1234, Some(vec![9, 8]))),
        };
        assert_eq!(decode_offsets(&encode_offsets(&r)), Some(r.clone()));
        let r = Restored {
            snapshot: Some((0, None)),
            windows: vec![],
            ..r
        };
        assert_eq!(decode_offsets(&encode_offsets(&r)), Some(r));
        assert_eq!(decode_offsets(&SourceOffsets::new()), None);
    }
}
