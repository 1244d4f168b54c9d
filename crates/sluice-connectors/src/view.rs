//! The `view` sink: the changelog of a materialized view of `sluice serve`, kept as a log of
//! checkpoint epochs that the server folds into the view it serves.
//!
//! Each writer seals its changes of a checkpoint epoch into one Arrow IPC stream file,
//! `e<epoch>-w<worker>.arrow` in the view's folder (the rows, then [`OP_COLUMN`]), before the
//! checkpoint's manifest is written. When the checkpoint commits, each writer records the epoch
//! in its marker `_committed-w<worker>` (a sink is told only once every writer has sealed the
//! epoch). A reader applies the files of every epoch up to the newest recorded one, one whole
//! epoch at a time, so what it serves is always the view as of one checkpoint.
//!
//! A run restored from checkpoint `c` first removes the files of epochs after `c` that the
//! failed run left (they were never committed) and records `c` (the failed run may have died
//! between the manifest and the marker), so each change is applied once.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{ArrayRef, Int8Array};
use arrow::datatypes::{Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use sluice_common::changelog::{op_field, OP_COLUMN};
use sluice_common::{ChangeBatch, Error, Result};

use crate::options::{ConnectorDef, Kind, OptionDef, Options, Side};
use crate::{ConnectorSpec, SinkWriter};

/// The `view` connector's options.
pub const CONNECTOR: ConnectorDef = ConnectorDef {
    name: "view",
    reads: false,
    writes: true,
    metadata: &[],
    writable_metadata: &[],
    formats: false,
    lookup: false,
    options: &[OptionDef {
        key: "path",
        kind: Kind::Text,
        default: None,
        side: Side::Sink,
        identity: true,
        doc: "the folder of the view's log (`sluice serve` sets it; needs checkpoints)",
    }],
};

/// One log file: the epoch it belongs to, the writer, and where it is.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct LogFile {
    pub epoch: u64,
    pub worker: usize,
    pub path: PathBuf,
}

/// The log files in `dir`, oldest epoch first (none when the folder does not exist yet).
pub fn log_files(dir: &Path) -> Result<Vec<LogFile>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
        Err(e) => return Err(Error::io(dir, e)),
    };
    let mut out = vec![];
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let name = entry.file_name();
        let Some((epoch, worker)) = parse_name(&name.to_string_lossy()) else {
            continue;
        };
        out.push(LogFile {
            epoch,
            worker,
            path: entry.path(),
        });
    }
    out.sort();
    Ok(out)
}

fn parse_name(name: &str) -> Option<(u64, usize)> {
    let rest = name.strip_prefix('e')?.strip_suffix(".arrow")?;
    let (epoch, worker) = rest.split_once("-w")?;
    Some((epoch.parse().ok()?, worker.parse().ok()?))
}

/// The newest epoch recorded as committed in `dir` (`None`: none yet).
pub fn committed_epoch(dir: &Path) -> Option<u64> {
    std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("_committed-w"))
        .filter_map(|e| std::fs::read_to_string(e.path()).ok()?.trim().parse().ok())
        .max()
}

fn file_name(epoch: u64, worker: usize) -> String {
    format!("e{epoch:020}-w{worker:04}.arrow")
}

/// Reads one log file: batches of the view's columns followed by [`OP_COLUMN`].
pub fn read_log_file(path: &Path) -> Result<Vec<RecordBatch>> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let bad = |e: arrow::error::ArrowError| Error::Runtime(format!("{}: {e}", path.display()));
    let reader = arrow::ipc::reader::StreamReader::try_new(std::io::BufReader::new(file), None)
        .map_err(bad)?;
    reader.map(|b| b.map_err(bad)).collect()
}

/// Writes `batches` as an Arrow IPC stream to `path` durably: a temporary file, synced, renamed
/// into place, and the folder synced.
pub fn write_durably(path: &Path, schema: &SchemaRef, batches: &[RecordBatch]) -> Result<()> {
    let io = |e: std::io::Error| Error::io(path, e);
    let tmp = path.with_extension("tmp");
    {
        let file = std::fs::File::create(&tmp).map_err(io)?;
        let mut out = std::io::BufWriter::new(file);
        let mut w = arrow::ipc::writer::StreamWriter::try_new(&mut out, schema)?;
        for b in batches {
            w.write(b)?;
        }
        w.finish()?;
        drop(w);
        let file = out.into_inner().map_err(|e| io(e.into_error()))?;
        file.sync_all().map_err(io)?;
    }
    std::fs::rename(&tmp, path).map_err(io)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io)?;
    }
    Ok(())
}

/// A writer of a view's log.
pub struct ViewSink {
    table: String,
    dir: PathBuf,
    worker: usize,
    /// The view's columns, then [`OP_COLUMN`].
    schema: SchemaRef,
    pending: Vec<RecordBatch>,
    transactional: bool,
}

impl ViewSink {
    pub fn open(spec: &ConnectorSpec, opts: &mut Options, worker: usize) -> Result<Self> {
        let dir = opts
            .get("path")?
            .ok_or_else(|| Error::connector(&spec.table, "the 'view' sink needs 'path'"))?;
        let dir = PathBuf::from(dir);
        std::fs::create_dir_all(&dir)
            .map_err(|e| Error::connector(&spec.table, format!("{}: {e}", dir.display())))?;
        let mut fields: Vec<_> = spec.schema.fields().iter().cloned().collect();
        fields.push(Arc::new(op_field()));
        Ok(ViewSink {
            table: spec.table.clone(),
            dir,
            worker,
            schema: Arc::new(Schema::new(fields)),
            pending: vec![],
            transactional: false,
        })
    }
}

impl ViewSink {
    /// Records that the epochs up to `epoch` are committed (this writer's marker).
    fn record_committed(&mut self, epoch: u64) -> Result<()> {
        let path = self.dir.join(format!("_committed-w{:04}", self.worker));
        let tmp = self.dir.join(format!("_committed-w{:04}.tmp", self.worker));
        let io =
            |e: std::io::Error| Error::connector(&self.table, format!("{}: {e}", path.display()));
        {
            let mut f = std::fs::File::create(&tmp).map_err(io)?;
            std::io::Write::write_all(&mut f, epoch.to_string().as_bytes()).map_err(io)?;
            f.sync_all().map_err(io)?;
        }
        std::fs::rename(&tmp, &path).map_err(io)?;
        std::fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io)
    }
}

impl SinkWriter for ViewSink {
    fn write(&mut self, batch: &ChangeBatch) -> Result<()> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        let ops = batch
            .ops
            .clone()
            .unwrap_or_else(|| Int8Array::from(vec![0i8; batch.num_rows()]));
        let mut columns: Vec<ArrayRef> = batch.data.columns().to_vec();
        columns.push(Arc::new(ops));
        self.pending
            .push(RecordBatch::try_new(self.schema.clone(), columns)?);
        Ok(())
    }

    fn finish(&mut self) -> Result<()> {
        if self.transactional || self.pending.is_empty() {
            return Ok(());
        }
        Err(Error::connector(
            &self.table,
            "the 'view' sink needs checkpoints ('execution.checkpointing.interval')",
        ))
    }

    fn begin_transactions(
        &mut self,
        committed: Option<u64>,
        worker: usize,
        workers: usize,
    ) -> Result<()> {
        self.transactional = true;
        // Files of epochs after the restored checkpoint were never committed; each writer removes
        // those of the earlier writers it replaces, before it writes any of its own.
        for f in log_files(&self.dir)? {
            if f.worker % workers.max(1) == worker && committed.is_none_or(|c| f.epoch > c) {
                std::fs::remove_file(&f.path).map_err(|e| {
                    Error::connector(&self.table, format!("{}: {e}", f.path.display()))
                })?;
            }
        }
        match committed {
            Some(c) => self.record_committed(c),
            None => Ok(()),
        }
    }

    fn commit(&mut self, epoch: u64) -> Result<()> {
        self.record_committed(epoch)
    }

    fn pre_commit(&mut self, epoch: u64) -> Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let path = self.dir.join(file_name(epoch, self.worker));
        write_durably(&path, &self.schema, &self.pending)
            .map_err(|e| Error::connector(&self.table, e.to_string()))?;
        self.pending.clear();
        Ok(())
    }

    fn abort(&mut self) -> Result<()> {
        self.pending.clear();
        Ok(())
    }
}

/// The view's columns of a log batch (without [`OP_COLUMN`]) and its change kinds.
pub fn split_ops(batch: &RecordBatch) -> Result<(RecordBatch, Int8Array)> {
    let n = batch.num_columns();
    let schema = batch.schema();
    if n == 0 || schema.field(n - 1).name() != OP_COLUMN {
        return Err(Error::Runtime(format!(
            "a view log batch ends with '{OP_COLUMN}'"
        )));
    }
    let ops = batch
        .column(n - 1)
        .as_any()
        .downcast_ref::<Int8Array>()
        .cloned()
        .ok_or_else(|| Error::Runtime(format!("'{OP_COLUMN}' is not Int8")))?;
    Ok((batch.project(&(0..n - 1).collect::<Vec<_>>())?, ops))
}
