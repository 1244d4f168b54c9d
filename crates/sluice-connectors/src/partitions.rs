//! Partitioned filesystem tables (`PARTITIONED BY (dt, hr)`), as Flink lays them out: rows go to
//! `path/dt=2026-11-11/hr=10/part-...`, and the partition columns live in the folder names, not in
//! the files. Reading such a table puts them back from the path.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, StringArray, UInt32Array};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use sluice_common::{ChangeBatch, Error, Result};

use crate::SinkWriter;

/// The folder name of a NULL partition value (Flink's).
pub const DEFAULT_PARTITION: &str = "__DEFAULT_PARTITION__";

/// Which columns of a table are partition columns, and the schema of the rest (the file content).
#[derive(Clone, Debug)]
pub struct Layout {
    /// Positions of the partition columns in the table schema, in `PARTITIONED BY` order.
    pub keys: Vec<usize>,
    /// The table schema without the partition columns.
    pub data: SchemaRef,
    pub table: SchemaRef,
}

impl Layout {
    pub fn new(table: &SchemaRef, partitioned_by: &[String], name: &str) -> Result<Option<Layout>> {
        if partitioned_by.is_empty() {
            return Ok(None);
        }
        let keys = partitioned_by
            .iter()
            .map(|p| {
                table.index_of(p).map_err(|_| {
                    Error::connector(name, format!("PARTITIONED BY column '{p}' is not a column"))
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let data = Schema::new(
            table
                .fields()
                .iter()
                .enumerate()
                .filter(|(i, _)| !keys.contains(i))
                .map(|(_, f)| f.clone())
                .collect::<Vec<_>>(),
        );
        Ok(Some(Layout {
            keys,
            data: Arc::new(data),
            table: table.clone(),
        }))
    }

    /// A file's rows with the partition columns put back, from the folders `k=v` in its path.
    pub fn with_partition_columns(&self, path: &Path, batch: RecordBatch) -> Result<RecordBatch> {
        let mut values: HashMap<String, Option<String>> = HashMap::new();
        for c in path.components() {
            if let Some((k, v)) = c.as_os_str().to_str().and_then(|s| s.split_once('=')) {
                let v = (v != DEFAULT_PARTITION).then(|| unescape(v));
                values.insert(k.to_string(), v);
            }
        }
        let n = batch.num_rows();
        let mut data = batch.columns().iter();
        let mut cols: Vec<ArrayRef> = vec![];
        for (i, f) in self.table.fields().iter().enumerate() {
            if self.keys.contains(&i) {
                let v = values.get(f.name()).ok_or_else(|| {
                    Error::Runtime(format!(
                        "{}: no '{}=' folder in the path of a partitioned table",
                        path.display(),
                        f.name()
                    ))
                })?;
                let strings: ArrayRef = Arc::new(StringArray::from(vec![v.clone(); n]));
                cols.push(cast(&strings, f.data_type()).map_err(|e| {
                    Error::Runtime(format!(
                        "{}: partition value for '{}' is not a {}: {e}",
                        path.display(),
                        f.name(),
                        f.data_type()
                    ))
                })?);
            } else {
                cols.push(data.next().expect("data column").clone());
            }
        }
        Ok(RecordBatch::try_new(self.table.clone(), cols)?)
    }
}

/// Escapes what cannot appear in a folder name (`/`, `=`, `%` and control characters).
fn escape(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        if matches!(c, '/' | '\\' | '=' | '%' | ':' | '#' | '?') || c.is_control() {
            for b in c.to_string().bytes() {
                out.push_str(&format!("%{b:02X}"));
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn unescape(v: &str) -> String {
    let bytes = v.as_bytes();
    let mut out = vec![];
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let Ok(b) = u8::from_str_radix(&v[i + 1..i + 3], 16) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Files under a partitioned table's folder, at any depth (hidden files left out), sorted.
pub fn list_files_recursive(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut out = vec![];
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d)? {
            let p = entry?.path();
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if name.starts_with('.') || name.starts_with('_') {
                continue;
            }
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// A sink writing each partition's rows through its own writer, in its own folder.
pub struct PartitionedSink<F> {
    layout: Layout,
    dir: PathBuf,
    storage: crate::storage::Storage,
    open: F,
    writers: HashMap<PathBuf, Box<dyn SinkWriter>>,
    /// Set by `begin_transactions`: writers opened later join the transaction too.
    transactions: Option<(Option<u64>, usize, usize)>,
}

impl<F: FnMut(&Path) -> Result<Box<dyn SinkWriter>>> PartitionedSink<F> {
    pub(crate) fn new(
        layout: Layout,
        (dir, storage): (PathBuf, crate::storage::Storage),
        open: F,
    ) -> Self {
        PartitionedSink {
            layout,
            dir,
            storage,
            open,
            writers: HashMap::new(),
            transactions: None,
        }
    }

    fn writer(&mut self, folder: PathBuf) -> Result<&mut Box<dyn SinkWriter>> {
        if !self.writers.contains_key(&folder) {
            if let crate::storage::Storage::Local = self.storage {
                std::fs::create_dir_all(&folder).map_err(|e| Error::io(&folder, e))?;
            }
            let mut w = (self.open)(&folder)?;
            if let Some((committed, worker, workers)) = self.transactions {
                w.begin_transactions(committed, worker, workers)?;
            }
            self.writers.insert(folder.clone(), w);
        }
        Ok(self.writers.get_mut(&folder).expect("inserted"))
    }

    fn each(&mut self, f: impl FnMut(&mut Box<dyn SinkWriter>) -> Result<()>) -> Result<()> {
        self.writers.values_mut().try_for_each(f)
    }
}

impl<F: FnMut(&Path) -> Result<Box<dyn SinkWriter>> + Send> SinkWriter for PartitionedSink<F> {
    fn write(&mut self, batch: &ChangeBatch) -> Result<()> {
        let n = batch.num_rows();
        if n == 0 {
            return Ok(());
        }
        let strings = self
            .layout
            .keys
            .iter()
            .map(|k| cast(batch.data.column(*k), &DataType::Utf8).map_err(Error::from))
            .collect::<Result<Vec<_>>>()?;
        let strings: Vec<&arrow::array::StringArray> =
            strings.iter().map(|s| s.as_string::<i32>()).collect();
        let value = |i: usize, k: usize| (!strings[k].is_null(i)).then(|| strings[k].value(i));
        let same = |i: usize, j: usize| (0..strings.len()).all(|k| value(i, k) == value(j, k));
        // Rows by partition, in order of first appearance. Rows arrive mostly grouped (a time
        // partition), so a row is first compared with the one before it.
        let mut groups: Vec<(usize, Vec<u32>)> = vec![];
        let mut slot: HashMap<Vec<Option<&str>>, usize> = HashMap::new();
        let mut current = usize::MAX;
        for i in 0..n {
            if i == 0 || !same(i, i - 1) {
                let key: Vec<Option<&str>> = (0..strings.len()).map(|k| value(i, k)).collect();
                current = *slot.entry(key).or_insert_with(|| {
                    groups.push((i, vec![]));
                    groups.len() - 1
                });
            }
            groups[current].1.push(i as u32);
        }
        let data_columns: Vec<usize> = (0..self.layout.table.fields().len())
            .filter(|i| !self.layout.keys.contains(i))
            .collect();
        for (first, rows) in groups {
            let mut folder = self.dir.clone();
            for (k, key) in self.layout.keys.iter().enumerate() {
                let v = match value(first, k) {
                    None => DEFAULT_PARTITION.to_string(),
                    Some(v) => escape(v),
                };
                folder.push(format!("{}={v}", self.layout.table.field(*key).name()));
            }
            let idx = UInt32Array::from(rows);
            let part = batch.take(&idx)?;
            let cols = data_columns
                .iter()
                .map(|c| part.data.column(*c).clone())
                .collect();
            let part = part.with_columns(self.layout.data.clone(), cols)?;
            self.writer(folder)?.write(&part)?;
        }
        Ok(())
    }

    fn finish(&mut self) -> Result<()> {
        self.each(|w| w.finish())
    }

    fn begin_transactions(
        &mut self,
        committed: Option<u64>,
        worker: usize,
        workers: usize,
    ) -> Result<()> {
        self.transactions = Some((committed, worker, workers));
        // Settle what earlier runs left in every partition folder there is.
        let mut folders = std::collections::BTreeSet::new();
        if let crate::storage::Storage::S3(bucket) = &self.storage {
            // Folders on S3 are the prefixes of the objects under it.
            for object in bucket.entries(&self.dir, true)? {
                if let Some(folder) = object.parent().filter(|f| *f != self.dir) {
                    folders.insert(folder.to_path_buf());
                }
            }
        } else if self.dir.exists() {
            let mut stack = vec![self.dir.clone()];
            while let Some(d) = stack.pop() {
                for entry in std::fs::read_dir(&d).map_err(|e| Error::io(&d, e))? {
                    let p = entry.map_err(|e| Error::io(&d, e))?.path();
                    if p.is_dir() {
                        stack.push(p);
                    } else if d != self.dir {
                        folders.insert(d.clone());
                    }
                }
            }
        }
        for folder in folders {
            self.writer(folder)?;
        }
        Ok(())
    }

    fn pre_commit(&mut self, epoch: u64) -> Result<()> {
        self.each(|w| w.pre_commit(epoch))
    }

    fn commit(&mut self, epoch: u64) -> Result<()> {
        self.each(|w| w.commit(epoch))
    }

    fn abort(&mut self) -> Result<()> {
        self.each(|w| w.abort())
    }

    fn stop(&mut self) -> Result<()> {
        self.each(|w| w.stop())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folder_names_round_trip() {
        for v in ["2026-11-11", "10:30", "a/b=c%d", "plain", "中文"] {
            assert_eq!(unescape(&escape(v)), v);
            assert!(!escape(v).contains('/'));
        }
    }
}
