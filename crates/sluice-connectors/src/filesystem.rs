//! The `filesystem` connector: JSON lines or CSV files in, part files out.
//!
//! Source: `path` is a file or a directory; a directory's files are sorted and dealt out to
//! workers round-robin, one split per file. Sink: `path` is a directory; each worker writes
//! `.part-<worker>-<n>.<ext>.inprogress` and renames it to `part-<worker>-<n>.<ext>` when the
//! file is published (on rolling, and when the job ends).

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use arrow::datatypes::SchemaRef;
use sluice_common::{ChangeBatch, Error, Result};

use crate::format::{encode_csv, encode_debezium, encode_json, JsonLines};
use crate::options::Options;
use crate::{ConnectorSpec, Poll, SinkWriter, SourceReader};

#[derive(Clone, Copy, PartialEq)]
enum Format {
    Json,
    Csv,
    Debezium,
}

fn format(opts: &mut Options, sink: bool) -> Result<Format> {
    match opts.required("format")?.as_str() {
        "json" => Ok(Format::Json),
        "csv" => Ok(Format::Csv),
        "debezium-json" if sink => Ok(Format::Debezium),
        other => Err(opts.error(format!(
            "option 'format' = '{other}' is not supported (use {})",
            if sink {
                "'json', 'csv' or 'debezium-json'"
            } else {
                "'json' or 'csv'"
            }
        ))),
    }
}

/// Files a reader keeps open at once; their splits are read round-robin, so each has its own
/// watermark, as if read in parallel.
const MAX_OPEN_SPLITS: usize = 16;

/// Reads this worker's files, each file one split.
pub struct FileSource {
    pending: std::collections::VecDeque<PathBuf>,
    open: Vec<OpenFile>,
    next_split: usize,
    cursor: usize,
    format: Format,
    schema: SchemaRef,
    json: JsonLines,
    csv_ignore_errors: bool,
    skipped: u64,
    /// `source.monitor-interval`: keep watching the directory for new files (unbounded).
    monitor: Option<Monitor>,
    /// Files read to their end.
    done: std::collections::BTreeSet<PathBuf>,
    /// Where to start files that a checkpoint had partly read: (position, line).
    resume: std::collections::HashMap<PathBuf, (u64, u64)>,
    /// `PARTITIONED BY`: partition columns come from the folder names.
    layout: Option<crate::partitions::Layout>,
}

/// A file being read.
struct OpenFile {
    split: usize,
    path: PathBuf,
    lines: Option<Box<dyn BufRead + Send>>,
    csv: Option<arrow::csv::reader::BufReader<Box<dyn BufRead + Send>>>,
    line: u64,
    /// Position after the rows returned so far: bytes (JSON lines) or records (CSV).
    position: u64,
}

/// What reading a file once gave.
enum Chunk {
    Rows(arrow::record_batch::RecordBatch),
    /// Lines were read but all were skipped as malformed.
    Nothing,
    Eof,
}

/// Continuous reading: new files in the directory are picked up as they appear.
struct Monitor {
    dir: PathBuf,
    interval: std::time::Duration,
    last_scan: std::time::Instant,
    seen: std::collections::HashSet<PathBuf>,
    worker: usize,
    workers: usize,
}

impl Monitor {
    /// Files that appeared since the last scan and belong to this worker. Ownership is a hash of
    /// the file name, so every worker agrees on it without talking to the others.
    fn new_files(&mut self) -> std::io::Result<Vec<PathBuf>> {
        self.last_scan = std::time::Instant::now();
        let mut found = vec![];
        for f in list_files(&self.dir)? {
            if !self.seen.contains(&f) && owner(&f, self.workers) == self.worker {
                self.seen.insert(f.clone());
                found.push(f);
            }
        }
        Ok(found)
    }
}

/// The worker that reads a file in continuous mode (FNV-1a of its name).
fn owner(path: &Path, workers: usize) -> usize {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
    }
    (h % workers as u64) as usize
}

impl FileSource {
    pub fn open(
        spec: &ConnectorSpec,
        opts: &mut Options,
        worker: usize,
        workers: usize,
    ) -> Result<Self> {
        let path = PathBuf::from(opts.required("path")?);
        let format = format(opts, false)?;
        let ignore = opts.flag("json.ignore-parse-errors", false)?;
        let csv_ignore_errors = opts.flag("csv.ignore-parse-errors", false)?;
        let interval = match opts.get("source.monitor-interval") {
            None => None,
            Some(v) => Some(
                sluice_common::time::parse_duration_ms(&v)
                    .filter(|ms| *ms > 0)
                    .map(|ms| std::time::Duration::from_millis(ms as u64))
                    .ok_or_else(|| opts.error(format!("option 'source.monitor-interval' = '{v}' is not a positive duration such as '10 s'")))?,
            ),
        };
        let layout =
            crate::partitions::Layout::new(&spec.schema, &spec.partitioned_by, &spec.table)?;
        let all = match &layout {
            None => list_files(&path),
            Some(_) => crate::partitions::list_files_recursive(&path),
        }
        .map_err(|e| opts.error(format!("option 'path' = '{}': {e}", path.display())))?;
        let data_schema = layout
            .as_ref()
            .map_or(spec.schema.clone(), |l| l.data.clone());
        let (files, monitor): (Vec<PathBuf>, _) = match interval {
            // Bounded: the files there now, dealt out round-robin.
            None => (
                all.into_iter()
                    .enumerate()
                    .filter(|(i, _)| i % workers == worker)
                    .map(|(_, f)| f)
                    .collect(),
                None,
            ),
            Some(interval) => {
                if !path.is_dir() {
                    return Err(
                        opts.error("'source.monitor-interval' needs 'path' to be a directory")
                    );
                }
                let mut m = Monitor {
                    dir: path.clone(),
                    interval,
                    last_scan: std::time::Instant::now(),
                    seen: Default::default(),
                    worker,
                    workers,
                };
                let files = m.new_files().map_err(|e| {
                    opts.error(format!("option 'path' = '{}': {e}", path.display()))
                })?;
                (files, Some(m))
            }
        };
        Ok(FileSource {
            pending: files.into(),
            open: vec![],
            next_split: 0,
            cursor: 0,
            format,
            schema: data_schema.clone(),
            json: JsonLines::new(data_schema, ignore)?,
            layout,
            csv_ignore_errors,
            skipped: 0,
            monitor,
            done: Default::default(),
            resume: Default::default(),
        })
    }
}

/// An empty CSV field of a string column is the empty string, as in Flink's CSV format (the
/// CSV reader makes it NULL); empty fields of other types stay NULL.
fn empty_strings(
    batch: arrow::record_batch::RecordBatch,
) -> Result<arrow::record_batch::RecordBatch> {
    use arrow::array::{Array, AsArray};
    if !batch
        .columns()
        .iter()
        .any(|c| c.data_type() == &arrow::datatypes::DataType::Utf8 && c.null_count() > 0)
    {
        return Ok(batch);
    }
    let columns = batch
        .columns()
        .iter()
        .map(|c| {
            if c.data_type() == &arrow::datatypes::DataType::Utf8 && c.null_count() > 0 {
                let filled: arrow::array::StringArray = c
                    .as_string::<i32>()
                    .iter()
                    .map(|v| Some(v.unwrap_or("")))
                    .collect();
                std::sync::Arc::new(filled) as arrow::array::ArrayRef
            } else {
                c.clone()
            }
        })
        .collect();
    Ok(arrow::record_batch::RecordBatch::try_new(
        batch.schema(),
        columns,
    )?)
}

fn list_files(path: &Path) -> std::io::Result<Vec<PathBuf>> {
    let meta = std::fs::metadata(path)?;
    if meta.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut files = vec![];
    for entry in std::fs::read_dir(path)? {
        let p = entry?.path();
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
        // Hidden files are in-progress output of a writer, not input.
        if p.is_file() && !name.starts_with('.') && !name.starts_with('_') {
            files.push(p);
        }
    }
    files.sort();
    Ok(files)
}

impl FileSource {
    fn open_file(&mut self, path: PathBuf, max_rows: usize) -> Result<OpenFile> {
        use std::io::{Seek, SeekFrom};
        let (position, line) = self.resume.remove(&path).unwrap_or((0, 0));
        let mut f = File::open(&path).map_err(|e| Error::io(&path, e))?;
        if position > 0 && self.format != Format::Csv {
            f.seek(SeekFrom::Start(position))
                .map_err(|e| Error::io(&path, e))?;
        }
        let buffered: Box<dyn BufRead + Send> = Box::new(BufReader::with_capacity(1 << 20, f));
        let split = self.next_split;
        self.next_split += 1;
        let (lines, csv) = match self.format {
            Format::Csv => {
                let r = arrow::csv::ReaderBuilder::new(self.schema.clone())
                    .with_header(false)
                    .with_batch_size(max_rows)
                    .with_bounds(position as usize, usize::MAX)
                    .build_buffered(buffered)?;
                (None, Some(r))
            }
            _ => (Some(buffered), None),
        };
        Ok(OpenFile {
            split,
            path,
            lines,
            csv,
            line,
            position,
        })
    }

    fn read_chunk(&mut self, at: usize, max_rows: usize) -> Result<Chunk> {
        let f = &mut self.open[at];
        if let Some(csv) = f.csv.as_mut() {
            return match csv.next() {
                Some(Ok(batch)) => {
                    f.position += batch.num_rows() as u64;
                    Ok(Chunk::Rows(empty_strings(batch)?))
                }
                Some(Err(_)) if self.csv_ignore_errors => {
                    self.skipped += 1;
                    Ok(Chunk::Nothing)
                }
                Some(Err(e)) => Err(Error::BadRecord {
                    location: f.path.display().to_string(),
                    message: format!("malformed CSV record: {e}"),
                }),
                None => Ok(Chunk::Eof),
            };
        }
        let reader = f.lines.as_mut().expect("a JSON file has a line reader");
        let mut lines = Vec::with_capacity(max_rows.min(8192));
        let first_line = f.line + 1;
        while lines.len() < max_rows {
            let mut l = String::new();
            let n = reader
                .read_line(&mut l)
                .map_err(|e| Error::io(&f.path, e))?;
            if n == 0 {
                break;
            }
            f.line += 1;
            f.position += n as u64;
            while l.ends_with('\n') || l.ends_with('\r') {
                l.pop();
            }
            lines.push(l);
        }
        if lines.is_empty() {
            return Ok(Chunk::Eof);
        }
        let display = f.path.display().to_string();
        match self.json.decode(&lines, &display, first_line)? {
            Some(batch) if batch.num_rows() > 0 => Ok(Chunk::Rows(batch)),
            _ => Ok(Chunk::Nothing),
        }
    }
}

impl SourceReader for FileSource {
    fn open_splits(&self) -> Vec<usize> {
        self.open.iter().map(|f| f.split).collect()
    }

    fn poll(&mut self, max_rows: usize) -> Result<Poll> {
        loop {
            while self.open.len() < MAX_OPEN_SPLITS {
                let Some(path) = self.pending.pop_front() else {
                    break;
                };
                let f = self.open_file(path, max_rows)?;
                self.open.push(f);
            }
            if self.open.is_empty() {
                let Some(m) = self.monitor.as_mut() else {
                    return Ok(Poll::Finished);
                };
                if m.last_scan.elapsed() < m.interval {
                    return Ok(Poll::Idle);
                }
                let found = m.new_files().map_err(|e| Error::io(&m.dir, e))?;
                if found.is_empty() {
                    return Ok(Poll::Idle);
                }
                self.pending.extend(found);
                continue;
            }
            let at = self.cursor % self.open.len();
            match self.read_chunk(at, max_rows)? {
                Chunk::Rows(batch) => {
                    self.cursor = at + 1;
                    let batch = match &self.layout {
                        None => batch,
                        Some(l) => l.with_partition_columns(&self.open[at].path, batch)?,
                    };
                    return Ok(Poll::Batch {
                        split: self.open[at].split,
                        batch,
                    });
                }
                Chunk::Nothing => self.cursor = at + 1,
                Chunk::Eof => {
                    let done = self.open.remove(at);
                    self.done.insert(done.path);
                    return Ok(Poll::SplitDone { split: done.split });
                }
            }
        }
    }

    fn skipped(&self) -> u64 {
        self.json.skipped() + self.skipped
    }

    fn offsets(&self) -> crate::SourceOffsets {
        let mut out = crate::SourceOffsets::new();
        for path in &self.done {
            out.insert(path.display().to_string(), crate::SPLIT_DONE);
        }
        for f in &self.open {
            out.insert(f.path.display().to_string(), f.position);
            out.insert(format!("{}#line", f.path.display()), f.line);
        }
        for (path, (position, line)) in &self.resume {
            out.insert(path.display().to_string(), *position);
            out.insert(format!("{}#line", path.display()), *line);
        }
        out
    }

    fn seek(&mut self, offsets: &crate::SourceOffsets) -> Result<()> {
        let pending = std::mem::take(&mut self.pending);
        for path in pending {
            let key = path.display().to_string();
            match offsets.get(&key) {
                Some(&crate::SPLIT_DONE) => {
                    self.done.insert(path);
                }
                Some(&position) => {
                    let line = offsets.get(&format!("{key}#line")).copied().unwrap_or(0);
                    self.resume.insert(path.clone(), (position, line));
                    self.pending.push_back(path);
                }
                None => self.pending.push_back(path),
            }
        }
        if let Some(m) = self.monitor.as_mut() {
            // Files already finished must not come back through the directory watch.
            m.seen.extend(self.done.iter().cloned());
        }
        Ok(())
    }
}

/// Writes this worker's part files.
pub struct FileSink {
    dir: PathBuf,
    worker: usize,
    format: Format,
    sequence: u64,
    buffer: Vec<u8>,
    file: Option<(PathBuf, File)>,
    written: u64,
    roll_bytes: u64,
    /// Two-phase commit (with checkpoints): no rolling; files are sealed per checkpoint epoch
    /// (`.pending-<epoch>`) and published when that checkpoint commits.
    transactional: bool,
    pending: Vec<(u64, PathBuf)>,
}

/// Publishes a hidden part file under its visible name.
fn make_visible(dir: &Path, hidden: &Path) -> Result<()> {
    let name = hidden
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    let target = dir.join(visible_name(name));
    std::fs::rename(hidden, &target).map_err(|e| Error::io(&target, e))
}

/// The visible name of a hidden part file (`.part-0-3.json.inprogress` → `part-0-3.json`).
fn visible_name(hidden: &str) -> String {
    let name = hidden.trim_start_matches('.');
    let end = name
        .find(".inprogress")
        .or_else(|| name.find(".pending-"))
        .unwrap_or(name.len());
    name[..end].to_string()
}

impl FileSink {
    /// The sink of a filesystem table: one writer, or one per partition folder with
    /// `PARTITIONED BY`.
    pub fn open(
        spec: &ConnectorSpec,
        opts: &mut Options,
        worker: usize,
        _workers: usize,
    ) -> Result<Box<dyn SinkWriter>> {
        let dir = PathBuf::from(opts.required("path")?);
        let format = format(opts, true)?;
        let roll_bytes = opts.parse("sink.rolling-policy.file-size", 128u64 << 20)?;
        std::fs::create_dir_all(&dir)
            .map_err(|e| opts.error(format!("option 'path' = '{}': {e}", dir.display())))?;
        match crate::partitions::Layout::new(&spec.schema, &spec.partitioned_by, &spec.table)? {
            None => Ok(Box::new(FileSink::in_dir(dir, worker, format, roll_bytes))),
            Some(layout) => Ok(Box::new(crate::partitions::PartitionedSink::new(
                layout,
                dir,
                move |folder: &Path| -> Result<Box<dyn SinkWriter>> {
                    Ok(Box::new(FileSink::in_dir(
                        folder.to_path_buf(),
                        worker,
                        format,
                        roll_bytes,
                    )))
                },
            ))),
        }
    }

    fn in_dir(dir: PathBuf, worker: usize, format: Format, roll_bytes: u64) -> Self {
        FileSink {
            dir,
            worker,
            format,
            sequence: 0,
            buffer: vec![],
            file: None,
            written: 0,
            roll_bytes,
            transactional: false,
            pending: vec![],
        }
    }

    fn extension(&self) -> &'static str {
        match self.format {
            Format::Csv => "csv",
            _ => "json",
        }
    }

    fn publish(&mut self) -> Result<()> {
        if let Some((path, mut file)) = self.file.take() {
            file.flush().map_err(|e| Error::io(&path, e))?;
            file.sync_all().map_err(|e| Error::io(&path, e))?;
            make_visible(&self.dir, &path)?;
            self.written = 0;
        }
        Ok(())
    }
}

impl SinkWriter for FileSink {
    fn write(&mut self, batch: &ChangeBatch) -> Result<()> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        self.buffer.clear();
        match self.format {
            Format::Json => encode_json(batch, &mut self.buffer)?,
            Format::Csv => encode_csv(batch, &mut self.buffer)?,
            Format::Debezium => encode_debezium(batch, &mut self.buffer)?,
        }
        if self.file.is_none() {
            // Never reuse a name a previous run published.
            loop {
                let name = format!(
                    "part-{}-{}.{}",
                    self.worker,
                    self.sequence,
                    self.extension()
                );
                self.sequence += 1;
                if !self.dir.join(&name).exists() {
                    let path = self.dir.join(format!(".{name}.inprogress"));
                    let f = File::create(&path).map_err(|e| Error::io(&path, e))?;
                    self.file = Some((path, f));
                    break;
                }
            }
        }
        let (path, file) = self.file.as_mut().expect("opened above");
        file.write_all(&self.buffer)
            .map_err(|e| Error::io(&*path, e))?;
        self.written += self.buffer.len() as u64;
        if self.written >= self.roll_bytes && !self.transactional {
            self.publish()?;
        }
        Ok(())
    }

    fn finish(&mut self) -> Result<()> {
        self.publish()?;
        self.commit(u64::MAX)
    }

    fn begin_transactions(
        &mut self,
        committed: Option<u64>,
        worker: usize,
        workers: usize,
    ) -> Result<()> {
        self.transactional = true;
        let entries = std::fs::read_dir(&self.dir).map_err(|e| Error::io(&self.dir, e))?;
        for entry in entries {
            let path = entry.map_err(|e| Error::io(&self.dir, e))?.path();
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default()
                .to_string();
            let Some(rest) = name.strip_prefix(".part-") else {
                continue;
            };
            // Each worker settles the files of the workers it replaces (rescaling).
            let owner: usize = rest
                .split('-')
                .next()
                .and_then(|w| w.parse().ok())
                .unwrap_or(usize::MAX);
            if owner % workers.max(1) != worker {
                continue;
            }
            let sealed_for = name
                .rsplit_once(".pending-")
                .and_then(|(_, e)| e.parse::<u64>().ok());
            match sealed_for {
                Some(epoch) if committed.is_some_and(|c| epoch <= c) => {
                    make_visible(&self.dir, &path)?
                }
                _ => std::fs::remove_file(&path).map_err(|e| Error::io(&path, e))?,
            }
        }
        Ok(())
    }

    fn pre_commit(&mut self, epoch: u64) -> Result<()> {
        if let Some((path, mut file)) = self.file.take() {
            file.flush().map_err(|e| Error::io(&path, e))?;
            file.sync_all().map_err(|e| Error::io(&path, e))?;
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default();
            let sealed = self
                .dir
                .join(format!(".{}.pending-{epoch}", visible_name(name)));
            std::fs::rename(&path, &sealed).map_err(|e| Error::io(&sealed, e))?;
            self.pending.push((epoch, sealed));
            self.written = 0;
        }
        Ok(())
    }

    fn commit(&mut self, epoch: u64) -> Result<()> {
        let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.pending)
            .into_iter()
            .partition(|(e, _)| *e <= epoch);
        self.pending = later;
        for (_, path) in due {
            make_visible(&self.dir, &path)?;
        }
        Ok(())
    }

    fn abort(&mut self) -> Result<()> {
        if !self.transactional {
            // At-least-once without checkpoints: keep what was written.
            return self.publish();
        }
        // Unsealed output belongs to no checkpoint: recovery would discard it anyway.
        if let Some((path, _)) = self.file.take() {
            std::fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
        }
        Ok(())
    }
}
