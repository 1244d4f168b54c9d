//! Materialized views as the server serves them: each view's rows folded from the log its
//! pipeline's `view` sink writes (see `sluice_connectors::view`), applied one committed
//! checkpoint epoch at a time, so a read always sees the view as of one epoch.
//!
//! The log survives the server: on start a view is rebuilt from its last compacted snapshot
//! and the log after it. Every so often the folded rows are written as a new snapshot and the
//! log before it is deleted.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use arrow::array::{Array, ArrayRef, Int8Array};
use arrow::compute::concat_batches;
use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use arrow_row::{OwnedRow, RowConverter, SortField};
use sluice_common::changelog::Op;
use sluice_connectors::view::{
    committed_epoch, log_files, read_log_file, split_ops, write_durably,
};
use tokio::sync::broadcast;

use crate::error::ApiError;

/// Log files applied before the view is compacted into a snapshot.
const COMPACT_AFTER_FILES: usize = 256;

/// One epoch's changes of a view, as its subscribers receive them.
#[derive(Debug, Clone)]
pub enum Change {
    /// The rows of one committed epoch: the view's columns then `__op`.
    Epoch { epoch: u64, batch: RecordBatch },
    /// The view was emptied (its pipeline started over).
    Reset,
}

struct State {
    converter: RowConverter,
    rows: HashMap<OwnedRow, i64>,
    /// The newest epoch applied (`None`: none; epochs start at 0).
    epoch: Option<u64>,
    /// Log files applied since the last snapshot.
    since_snapshot: usize,
    /// A problem reading the log, shown in the view's status.
    error: Option<String>,
}

/// A materialized view.
pub struct View {
    pub tenant: String,
    pub name: String,
    pub schema: SchemaRef,
    dir: PathBuf,
    state: RwLock<State>,
    changes: broadcast::Sender<Arc<Change>>,
}

/// A consistent read of a view.
pub struct Snapshot {
    pub epoch: u64,
    pub batch: RecordBatch,
}

impl View {
    /// A view whose log is in `dir`, loaded from its last snapshot, served by nobody (a
    /// console's preview reads one so).
    pub fn open(
        tenant: &str,
        name: &str,
        schema: SchemaRef,
        dir: PathBuf,
    ) -> Result<Arc<View>, ApiError> {
        let fields = schema
            .fields()
            .iter()
            .map(|f| SortField::new(f.data_type().clone()))
            .collect();
        let converter = RowConverter::new(fields)
            .map_err(|e| ApiError::unsupported(format!("view '{name}': {e}")))?;
        let (changes, _) = broadcast::channel(1024);
        let view = Arc::new(View {
            tenant: tenant.to_string(),
            name: name.to_string(),
            schema,
            dir,
            state: RwLock::new(State {
                converter,
                rows: HashMap::new(),
                epoch: None,
                since_snapshot: 0,
                error: None,
            }),
            changes,
        });
        view.load()?;
        Ok(view)
    }

    fn state(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    fn state_mut(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|p| p.into_inner())
    }

    /// The rows as of the newest applied epoch.
    pub fn snapshot(&self) -> Result<Snapshot, ApiError> {
        let s = self.state();
        self.materialize(&s)
    }

    fn materialize(&self, s: &State) -> Result<Snapshot, ApiError> {
        let mut rows = vec![];
        for (row, n) in &s.rows {
            for _ in 0..(*n).max(0) {
                rows.push(row.row());
            }
        }
        let columns = s
            .converter
            .convert_rows(rows)
            .map_err(|e| ApiError::internal(format!("view '{}': {e}", self.name)))?;
        let batch = if self.schema.fields().is_empty() {
            RecordBatch::new_empty(self.schema.clone())
        } else {
            RecordBatch::try_new(self.schema.clone(), columns)
                .map_err(|e| ApiError::internal(format!("view '{}': {e}", self.name)))?
        };
        Ok(Snapshot {
            epoch: s.epoch.unwrap_or(0),
            batch,
        })
    }

    /// The rows as of now and a receiver of every later epoch's changes, with nothing in
    /// between lost or repeated.
    pub fn subscribe(&self) -> Result<(Snapshot, broadcast::Receiver<Arc<Change>>), ApiError> {
        let s = self.state();
        let rx = self.changes.subscribe();
        Ok((self.materialize(&s)?, rx))
    }

    /// The newest applied epoch, and a problem reading the log if there is one.
    pub fn status(&self) -> (u64, Option<String>) {
        let s = self.state();
        (s.epoch.unwrap_or(0), s.error.clone())
    }

    fn apply(&self, s: &mut State, batch: &RecordBatch) -> Result<(), ApiError> {
        let bad =
            |e: arrow::error::ArrowError| ApiError::internal(format!("view '{}': {e}", self.name));
        let (data, ops) = split_ops(batch).map_err(|e| ApiError::internal(e.to_string()))?;
        let rows = s.converter.convert_columns(data.columns()).map_err(bad)?;
        for (i, row) in rows.iter().enumerate() {
            let sign = Op::from_i8(ops.value(i)).sign();
            let key = row.owned();
            let n = s.rows.entry(key.clone()).or_insert(0);
            *n += sign;
            if *n == 0 {
                s.rows.remove(&key);
            }
        }
        Ok(())
    }

    /// Applies the committed epochs not applied yet; compacts when the log has grown.
    pub(crate) fn catch_up(&self) -> Result<(), ApiError> {
        let Some(committed) = committed_epoch(&self.dir) else {
            return Ok(());
        };
        let applied = self.state().epoch;
        // Another server sharing the data (a shared catalog) may have changed the log under
        // this one: started the view over (its epochs begin again), or compacted past what was
        // applied here (a newer snapshot). Either way, read it again from what is there.
        let newer_snapshot = snapshots(&self.dir)
            .last()
            .is_some_and(|(e, _)| applied.is_none_or(|a| *e > a));
        if applied.is_some_and(|a| committed < a) || (applied.is_some() && newer_snapshot) {
            {
                let mut s = self.state_mut();
                s.rows.clear();
                s.epoch = None;
                s.since_snapshot = 0;
            }
            let _ = self.changes.send(Arc::new(Change::Reset));
            self.load()?;
            return self.catch_up_from(committed);
        }
        self.catch_up_from(committed)
    }

    fn catch_up_from(&self, committed: u64) -> Result<(), ApiError> {
        let applied = self.state().epoch;
        if applied.is_some_and(|a| committed <= a) {
            return Ok(());
        }
        let files: Vec<_> = log_files(&self.dir)
            .map_err(|e| ApiError::internal(e.to_string()))?
            .into_iter()
            .filter(|f| applied.is_none_or(|a| f.epoch > a) && f.epoch <= committed)
            .collect();
        let mut i = 0;
        while i < files.len() {
            let epoch = files[i].epoch;
            let mut batches = vec![];
            let mut n = 0;
            while i < files.len() && files[i].epoch == epoch {
                batches.extend(
                    read_log_file(&files[i].path).map_err(|e| ApiError::internal(e.to_string()))?,
                );
                n += 1;
                i += 1;
            }
            let mut s = self.state_mut();
            for b in &batches {
                self.apply(&mut s, b)?;
            }
            s.epoch = Some(epoch);
            s.since_snapshot += n;
            if let Some(first) = batches.first() {
                let batch = concat_batches(&first.schema(), &batches)
                    .map_err(|e| ApiError::internal(e.to_string()))?;
                let _ = self.changes.send(Arc::new(Change::Epoch { epoch, batch }));
            }
        }
        let mut s = self.state_mut();
        s.epoch = Some(s.epoch.map_or(committed, |e| e.max(committed)));
        if s.since_snapshot >= COMPACT_AFTER_FILES {
            self.compact(&mut s)?;
        }
        Ok(())
    }

    /// Writes the folded rows as `snapshot-e<epoch>.arrow` and deletes the log up to it.
    fn compact(&self, s: &mut State) -> Result<(), ApiError> {
        let snap = self.materialize(s)?;
        let with_ops = with_insert_ops(&snap.batch)?;
        let upto = s.epoch.unwrap_or(0);
        let path = self.dir.join(format!("snapshot-e{upto:020}.arrow"));
        write_durably(&path, &with_ops.schema(), &[with_ops])
            .map_err(|e| ApiError::internal(e.to_string()))?;
        for f in log_files(&self.dir).map_err(|e| ApiError::internal(e.to_string()))? {
            if f.epoch <= upto {
                let _ = std::fs::remove_file(&f.path);
            }
        }
        for (epoch, old) in snapshots(&self.dir) {
            if epoch < upto {
                let _ = std::fs::remove_file(old);
            }
        }
        s.since_snapshot = 0;
        Ok(())
    }

    fn load(&self) -> Result<(), ApiError> {
        let mut s = self.state_mut();
        if let Some((epoch, path)) = snapshots(&self.dir).pop() {
            for b in read_log_file(&path).map_err(|e| ApiError::internal(e.to_string()))? {
                self.apply(&mut s, &b)?;
            }
            s.epoch = Some(epoch);
        }
        Ok(())
    }
}

/// A batch of the view's rows as inserts (the log's shape).
fn with_insert_ops(batch: &RecordBatch) -> Result<RecordBatch, ApiError> {
    let mut fields: Vec<_> = batch.schema().fields().iter().cloned().collect();
    fields.push(Arc::new(sluice_common::changelog::op_field()));
    let mut columns: Vec<ArrayRef> = batch.columns().to_vec();
    columns.push(Arc::new(Int8Array::from(vec![0i8; batch.num_rows()])));
    RecordBatch::try_new(Arc::new(arrow::datatypes::Schema::new(fields)), columns)
        .map_err(|e| ApiError::internal(e.to_string()))
}

fn snapshots(dir: &Path) -> Vec<(u64, PathBuf)> {
    let mut out: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            let epoch = name
                .strip_prefix("snapshot-e")?
                .strip_suffix(".arrow")?
                .parse()
                .ok()?;
            Some((epoch, e.path()))
        })
        .collect();
    out.sort();
    out
}

/// Every materialized view of the server, and the thread that keeps them current.
#[derive(Default)]
pub struct Views {
    views: RwLock<HashMap<(String, String), Arc<View>>>,
}

impl Views {
    /// Registers a view whose log is in `dir`.
    pub fn register(
        &self,
        tenant: &str,
        name: &str,
        schema: SchemaRef,
        dir: PathBuf,
    ) -> Result<Arc<View>, ApiError> {
        let view = View::open(tenant, name, schema, dir)?;
        self.views
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert((tenant.to_string(), name.to_string()), view.clone());
        Ok(view)
    }

    pub fn get(&self, tenant: &str, name: &str) -> Option<Arc<View>> {
        self.views
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&(tenant.to_string(), name.to_string()))
            .cloned()
    }

    /// Stops serving a view and deletes its log (it was dropped).
    pub fn remove(&self, tenant: &str, name: &str) {
        if let Some(v) = self.take(tenant, name) {
            let _ = std::fs::remove_dir_all(&v.dir);
        }
    }

    /// Empties a view and its log (its pipeline starts over).
    pub fn reset(&self, tenant: &str, name: &str) -> Result<(), ApiError> {
        let Some(v) = self.get(tenant, name) else {
            return Ok(());
        };
        let mut s = v.state_mut();
        let _ = std::fs::remove_dir_all(&v.dir);
        s.rows.clear();
        s.epoch = None;
        s.since_snapshot = 0;
        let _ = v.changes.send(Arc::new(Change::Reset));
        Ok(())
    }

    /// The views served, as (tenant, name).
    pub fn names(&self) -> Vec<(String, String)> {
        self.views
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect()
    }

    /// Stops serving a view (another server dropped it), leaving its files alone.
    pub fn forget(&self, tenant: &str, name: &str) {
        self.take(tenant, name);
    }

    /// Takes a view out of those served; its subscribers are told it started over.
    fn take(&self, tenant: &str, name: &str) -> Option<Arc<View>> {
        let v = self
            .views
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&(tenant.to_string(), name.to_string()))?;
        let _ = v.changes.send(Arc::new(Change::Reset));
        Some(v)
    }

    fn all(&self) -> Vec<Arc<View>> {
        self.views
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// Applies new committed epochs to every view, every `period`, until the process ends.
    pub fn start_tailing(self: &Arc<Self>, period: Duration) {
        let views = self.clone();
        std::thread::Builder::new()
            .name("views".into())
            .spawn(move || loop {
                for v in views.all() {
                    let result = v.catch_up();
                    let mut s = v.state_mut();
                    match result {
                        Ok(()) => s.error = None,
                        Err(e) => {
                            if s.error.as_deref() != Some(&e.message) {
                                tracing::warn!("view {}/{}: {}", v.tenant, v.name, e.message);
                            }
                            s.error = Some(e.message);
                        }
                    }
                }
                std::thread::sleep(period);
            })
            .expect("start the views thread");
    }
}

/// A change feed's rows: `sluice_epoch`, `sluice_op` (Flink's `+I`, `-U`, `+U`, `-D`), then the
/// view's columns. `batch` holds the view's columns, then `__op` when `ops` is absent.
pub fn feed_rows(epoch: u64, batch: &RecordBatch, inserts: bool) -> Result<RecordBatch, ApiError> {
    let (data, ops) = if inserts {
        let n = batch.num_rows();
        (batch.clone(), Int8Array::from(vec![0i8; n]))
    } else {
        split_ops(batch).map_err(|e| ApiError::internal(e.to_string()))?
    };
    let mut fields = vec![
        Arc::new(arrow::datatypes::Field::new(
            "sluice_epoch",
            arrow::datatypes::DataType::Int64,
            false,
        )),
        Arc::new(arrow::datatypes::Field::new(
            "sluice_op",
            arrow::datatypes::DataType::Utf8,
            false,
        )),
    ];
    fields.extend(data.schema().fields().iter().cloned());
    let mut columns: Vec<ArrayRef> = vec![
        Arc::new(arrow::array::Int64Array::from(vec![
            epoch as i64;
            data.num_rows()
        ])),
        Arc::new(arrow::array::StringArray::from_iter_values(
            (0..ops.len()).map(|i| Op::from_i8(ops.value(i)).short_name()),
        )),
    ];
    columns.extend(data.columns().iter().cloned());
    RecordBatch::try_new(Arc::new(arrow::datatypes::Schema::new(fields)), columns)
        .map_err(|e| ApiError::internal(e.to_string()))
}

/// The number of rows of a batch with `__op`, signed (for tests and stats).
pub fn signed_rows(batch: &RecordBatch) -> i64 {
    let n = batch.num_columns();
    let Some(ops) = batch.column(n - 1).as_any().downcast_ref::<Int8Array>() else {
        return 0;
    };
    (0..ops.len())
        .map(|i| Op::from_i8(ops.value(i)).sign())
        .sum()
}
