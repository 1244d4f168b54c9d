//! The `filesystem` connector: JSON lines, CSV, raw lines or Avro files in, part files out.
//!
//! Source: `path` is a file or a directory; a directory's files are sorted, cut into pieces of
//! `source.split-size` bytes (8 MB unless set) on record boundaries, and the pieces dealt out to
//! workers round-robin, so one large file is parsed by every worker. Avro object container
//! files are read whole, each by one worker (their blocks are compressed).
//!
//! Sink: `path` is a directory; each worker writes `.part-<worker>-<n>.<ext>.inprogress` and
//! renames it to `part-<worker>-<n>.<ext>` when the file is published: when the job ends, or,
//! with checkpoints, when the checkpoint that sealed it commits. A failed job publishes nothing.

use std::fs::File;
use std::hash::BuildHasher;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use arrow::datatypes::SchemaRef;
use sluice_common::{ChangeBatch, Error, Result};

use crate::format::{encode_changelog, encode_csv, encode_json, encode_raw, JsonLines};
use crate::options::{ConnectorDef, Kind, OptionDef, Options, Side};
use crate::storage::Storage;
use crate::{ConnectorSpec, Poll, SinkWriter, SourceReader};

#[derive(Clone)]
enum Format {
    Json,
    Csv,
    /// Avro object container files.
    Avro,
    /// Parquet files (read whole; written with Snappy and statistics).
    Parquet,
    /// Each line is the value of the table's one STRING or BYTES column.
    Raw,
    /// `debezium-json` or `canal-json`: an updating table, read and written as changes.
    Changelog(crate::format::Changelog),
}

/// The `filesystem` connector's options.
pub const CONNECTOR: ConnectorDef = ConnectorDef {
    name: "filesystem",
    reads: true,
    writes: true,
    metadata: &[],
    writable_metadata: &[],
    formats: true,
    lookup: false,
    options: &[
        OptionDef {
            key: "path",
            kind: Kind::Text,
            default: None,
            side: Side::Both,
            identity: true,
            doc: "a file or directory to read, or the directory to write part files into: a plain path, a `file://` URI, or an `s3://bucket/prefix` on S3-compatible storage",
        },
        OptionDef {
            key: "format",
            kind: Kind::Choice(&[
                "json",
                "csv",
                "avro",
                "parquet",
                "raw",
                "debezium-json",
                "canal-json",
            ]),
            default: None,
            side: Side::Both,
            identity: true,
            doc: "JSON lines, CSV (no header), `raw` lines (each the value of the one STRING or BYTES column), Avro object container files (read with the file's schema resolved to the columns, written with the schema Flink derives from them), or Parquet files (columns matched by name); `debezium-json` and `canal-json` are changes, read as an updating table and written from an updating result",
        },
        crate::avro::LEGACY_TIMESTAMPS_OPTION,
        crate::avro::CODEC_OPTION,
        OptionDef {
            key: "parquet.compression",
            kind: Kind::Choice(&["SNAPPY", "UNCOMPRESSED"]),
            default: Some("SNAPPY"),
            side: Side::Sink,
            identity: false,
            doc: "`parquet`: how pages are compressed (Flink's default, Snappy, or none)",
        },
        OptionDef {
            key: "parquet.row-group.max-rows",
            kind: Kind::Count,
            default: Some("1048576"),
            side: Side::Sink,
            identity: false,
            doc: "`parquet`: rows per row group (readers skip row groups by their statistics)",
        },
        OptionDef {
            key: "json.ignore-parse-errors",
            kind: Kind::Bool,
            default: Some("false"),
            side: Side::Source,
            identity: false,
            doc: "skip and count a malformed JSON record instead of failing the job",
        },
        OptionDef {
            key: "csv.ignore-parse-errors",
            kind: Kind::Bool,
            default: Some("false"),
            side: Side::Source,
            identity: false,
            doc: "skip and count a malformed CSV record instead of failing the job",
        },
        OptionDef {
            key: "source.split-size",
            kind: Kind::MemorySize,
            default: Some("8mb"),
            side: Side::Source,
            identity: false,
            doc: "files larger than this are read in pieces of this size, dealt to the workers (at least `64kb`)",
        },
        OptionDef {
            key: "source.monitor-interval",
            kind: Kind::Duration,
            default: None,
            side: Side::Source,
            identity: false,
            doc: "keep watching the directory for new files this often (the source is then unbounded)",
        },
        OptionDef {
            key: "sink.rolling-policy.file-size",
            kind: Kind::MemorySize,
            default: Some("128mb"),
            side: Side::Sink,
            identity: false,
            doc: "without checkpoints, a worker starts a new part file past this size",
        },
        OptionDef {
            key: "sink.rolling-policy.rollover-interval",
            kind: Kind::Duration,
            default: Some("30 min"),
            side: Side::Sink,
            identity: false,
            doc: "without checkpoints, a worker starts a new part file when its file has been open this long",
        },
        S3_ENDPOINT,
        S3_ACCESS_KEY,
        S3_SECRET_KEY,
        S3_REGION,
        S3_PATH_STYLE,
        S3_ALLOW_HTTP,
        OptionDef {
            key: "sink.publish-on-stop",
            kind: Kind::Bool,
            default: Some("false"),
            side: Side::Sink,
            identity: false,
            doc: "a job stopped by a signal without checkpoints publishes what it wrote",
        },
    ],
};

/// An `s3.*` option: S3 storage is configured as checkpoint storage is, by the table's options
/// or else the job's `SET` statements, or else the `AWS_*` environment variables.
const fn s3_option(key: &'static str, kind: Kind, doc: &'static str) -> OptionDef {
    OptionDef {
        key,
        kind,
        default: None,
        side: Side::Both,
        identity: false,
        doc,
    }
}

const S3_ENDPOINT: OptionDef = s3_option(
    "s3.endpoint",
    Kind::Text,
    "`s3://` paths: the S3-compatible endpoint (`http://` ones allow plain HTTP); unset `s3.*` options come from the job's `SET 's3.*'` statements, as for checkpoints, then from `AWS_*` variables",
);
const S3_ACCESS_KEY: OptionDef = s3_option(
    "s3.access-key",
    Kind::Text,
    "`s3://` paths: the access key id",
);
const S3_SECRET_KEY: OptionDef = s3_option(
    "s3.secret-key",
    Kind::Text,
    "`s3://` paths: the secret access key",
);
const S3_REGION: OptionDef = s3_option(
    "s3.region",
    Kind::Text,
    "`s3://` paths: the bucket's region",
);
const S3_PATH_STYLE: OptionDef = s3_option(
    "s3.path.style.access",
    Kind::Bool,
    "`s3://` paths: address the bucket in the path (`endpoint/bucket/key`), as MinIO and most S3-compatible servers want",
);
const S3_ALLOW_HTTP: OptionDef = s3_option(
    "s3.allow-http",
    Kind::Bool,
    "`s3://` paths: allow a plain-HTTP endpoint",
);

/// The table's storage: local, or S3 for an `s3://` path (its `s3.*` options read).
fn storage(opts: &mut Options, path: &Path) -> Result<Storage> {
    let s3 = opts.with_prefix("s3.").into_iter().collect();
    Storage::of(&path.to_string_lossy(), &s3).map_err(|e| match e {
        Error::Plan(m) | Error::Runtime(m) => opts.error(m),
        other => other,
    })
}

fn format(opts: &mut Options) -> Result<Format> {
    let name = opts.required("format")?;
    if let Some(changelog) = crate::format::Changelog::from_options(&name, opts)? {
        return Ok(Format::Changelog(changelog));
    }
    match name.as_str() {
        "json" => Ok(Format::Json),
        "csv" => Ok(Format::Csv),
        "parquet" => Ok(Format::Parquet),
        "avro" => Ok(Format::Avro),
        "raw" => Ok(Format::Raw),
        other => unreachable!("format '{other}' is declared but not read"),
    }
}

/// `raw` files hold the values of one STRING or BYTES column (besides partition columns).
fn raw_column(opts: &Options, columns: &SchemaRef) -> Result<()> {
    match columns.fields().iter().map(|f| f.data_type()).collect::<Vec<_>>()[..] {
        [arrow::datatypes::DataType::Utf8 | arrow::datatypes::DataType::Binary] => Ok(()),
        _ => Err(opts.error(
            "format 'raw' reads and writes a table of one STRING or BYTES column (besides partition columns): each line is its value",
        )),
    }
}

/// Files a reader keeps open at once; their splits are read round-robin, so each has its own
/// watermark, as if read in parallel. Pieces of one file are read one after another.
const MAX_OPEN_SPLITS: usize = 16;

/// The smallest `source.split-size`: smaller pieces cost more to find than to read.
const MIN_SPLIT_SIZE: u64 = 64 << 10;

/// A split: a whole file, or a byte range of one.
#[derive(Clone, Debug)]
struct Split {
    path: PathBuf,
    /// The nominal byte range. A piece starts after the first record boundary at or after its
    /// start (unless it starts the file) and ends at the first one at or after its end, so the
    /// pieces of a file cover each record once.
    range: Option<(u64, u64)>,
    /// The file's name under the table's path (offsets name files so, so that a checkpoint
    /// still fits when the folder moves and the override says it is the same data).
    name: String,
}

impl Split {
    fn whole(root: &Path, path: PathBuf) -> Split {
        Split {
            name: name_under(root, &path),
            path,
            range: None,
        }
    }

    /// The split's name in checkpointed offsets.
    fn key(&self) -> String {
        match self.range {
            None => self.name.clone(),
            Some((start, end)) => format!("{}#bytes={start}-{end}", self.name),
        }
    }
}

/// A file's name under the table's path `root` (its file name when `root` is the file).
fn name_under(root: &Path, path: &Path) -> String {
    match path.strip_prefix(root) {
        Ok(rel) if !rel.as_os_str().is_empty() => rel.display().to_string(),
        _ => path.file_name().map_or_else(
            || path.display().to_string(),
            |n| n.to_string_lossy().to_string(),
        ),
    }
}

/// A file's splits: pieces of `size` bytes, or the whole file when it is no larger.
fn file_splits(root: &Path, path: PathBuf, len: u64, size: u64) -> Vec<Split> {
    let whole = Split::whole(root, path);
    if len <= size {
        return vec![whole];
    }
    (0..len.div_ceil(size))
        .map(|i| Split {
            range: Some((i * size, ((i + 1) * size).min(len))),
            ..whole.clone()
        })
        .collect()
}

/// Reads this worker's splits.
pub struct FileSource {
    pending: std::collections::VecDeque<Split>,
    /// Whether a pending split may be openable (one finished, or none was opened yet).
    refill: bool,
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
    /// Splits read to their end, by key.
    done: std::collections::BTreeSet<String>,
    /// Where to start splits that a checkpoint had partly read, by key: (position, line).
    resume: std::collections::HashMap<String, (u64, u64)>,
    /// The keys of every worker's splits, to tell a checkpoint taken with other pieces.
    all_keys: std::collections::HashSet<String>,
    /// Workers the deal gave nothing (bounded reading).
    silent: Vec<usize>,
    /// The table's `path`: split names are relative to it.
    root: PathBuf,
    /// Per CSV file read in pieces: how far quotes were counted, and whether that point is
    /// inside a quoted field.
    quotes: std::collections::HashMap<PathBuf, (u64, crate::csv_records::CsvScan)>,
    /// `PARTITIONED BY`: partition columns come from the folder names.
    layout: Option<crate::partitions::Layout>,
    /// The columns decoded, when not all: the others are NULL in the rows returned (the job
    /// does not read them). Decoding text into values is most of a file source's work.
    read: Option<Vec<usize>>,
    /// The rows' schema when `read` is set.
    full_schema: SchemaRef,
    /// The watermark split of each file being read: one for all of this worker's pieces of
    /// the file, so that between two pieces the file still holds the watermark back (the next
    /// piece's rows are later in the file, and may be earlier than the other files' rows).
    file_splits: std::collections::HashMap<PathBuf, usize>,
    /// Parse the next piece of a file on a thread of its own while the current one is read
    /// (`ConnectorSpec::decode_ahead`): pieces decoded ahead, by key, until their turn.
    decode_ahead: bool,
    ahead: std::collections::HashMap<String, OpenFile>,
    /// Whether a piece may need decoding ahead (the open files changed).
    ahead_due: bool,
    /// What decoding ahead needs to decode JSON on its own.
    decoded_schema: SchemaRef,
    json_ignore_errors: bool,
    /// The records are changes in this format.
    changelog: Option<crate::format::Changelog>,
    /// The decoder of Avro files' records.
    avro: Option<crate::avro::Avro>,
    /// Where the files are.
    storage: Storage,
}

/// The decoder of a file's JSON lines: rows, or changes of rows.
fn json_decoder(
    schema: &SchemaRef,
    ignore_errors: bool,
    changelog: &Option<crate::format::Changelog>,
) -> Result<JsonLines> {
    match changelog {
        None => JsonLines::new(schema.clone(), ignore_errors),
        Some(c) => JsonLines::changelog(schema.clone(), ignore_errors, c.clone()),
    }
}

/// Batches of a piece decoded ahead of its turn, at most (a piece is about
/// `source.split-size` of text, 8 MB by default: a few batches).
const AHEAD_BATCHES: usize = 8;

/// Pieces decoded ahead at a time.
const MAX_AHEAD: usize = 1;

/// One read of a piece decoded ahead, and where the piece stood after it.
struct Ahead {
    chunk: Result<Chunk>,
    position: u64,
    line: u64,
    skipped: u64,
}

/// A split being read.
struct OpenFile {
    split: usize,
    key: String,
    path: PathBuf,
    lines: Option<Box<dyn BufRead + Send>>,
    csv: Option<crate::csv_records::CsvRecords>,
    /// Lines read in this split.
    line: u64,
    /// Where the split's first record starts, and the lines of the file before it (counted
    /// only when an error message needs them).
    start: u64,
    lines_before: Option<u64>,
    /// Position after the rows returned so far: bytes in the file (JSON lines) or records in
    /// the split (CSV).
    position: u64,
    /// Decoded ahead on another thread: its reads arrive here (`lines` and `csv` are there).
    ahead: Option<std::sync::mpsc::Receiver<Ahead>>,
    /// An Avro container file's records (`position` counts them).
    avro: Option<(
        apache_avro::Reader<'static, Box<dyn BufRead + Send>>,
        crate::avro::Resolver,
    )>,
    /// A Parquet file's rows (`position` counts them).
    parquet: Option<parquet::arrow::arrow_reader::ParquetRecordBatchReader>,
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
    storage: Storage,
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
        for (f, _) in self.storage.list(&self.dir, false)? {
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
        let path = table_path(opts)?;
        let storage = storage(opts, &path)?;
        let format = format(opts)?;
        // Each format reads its own options: `csv.*` on a JSON table is unknown (an error).
        let (ignore, csv_ignore_errors) = match &format {
            Format::Csv => (false, opts.flag("csv.ignore-parse-errors")?),
            Format::Json => (opts.flag("json.ignore-parse-errors")?, false),
            // A container file's records all read, or the file is corrupt; a raw line is
            // always a value: nothing to skip.
            Format::Avro | Format::Parquet | Format::Raw => (false, false),
            Format::Changelog(c) => (
                opts.flag(&format!("{}.ignore-parse-errors", c.name()))?,
                false,
            ),
        };
        let changelog = match &format {
            Format::Changelog(c) => Some(c.clone()),
            _ => None,
        };
        if changelog.is_some() && !spec.partitioned_by.is_empty() {
            return Err(opts.error(
                "a 'debezium-json' or 'canal-json' table cannot be PARTITIONED BY (its rows come from change records, not folders)",
            ));
        }
        let mut split_size = opts.memory_size("source.split-size")?;
        if split_size < MIN_SPLIT_SIZE {
            return Err(opts.error(format!(
                "option 'source.split-size' = {split_size} bytes is below the minimum of 64kb \
                 (each piece costs a file open and a search for its first record)"
            )));
        }
        let interval =
            match opts.duration_ms("source.monitor-interval")? {
                None => None,
                Some(ms) if ms > 0 => Some(std::time::Duration::from_millis(ms as u64)),
                Some(_) => return Err(opts.error(
                    "option 'source.monitor-interval' must be a positive duration such as '10 s'",
                )),
            };
        let layout =
            crate::partitions::Layout::new(&spec.schema, &spec.partitioned_by, &spec.table)?;
        let path_error = |opts: &Options, e: std::io::Error| {
            opts.error(format!("option 'path' = '{}': {e}", path.display()))
        };
        let all = storage
            .list(&path, layout.is_some())
            .map_err(|e| path_error(opts, e))?;
        if let Storage::S3(_) = storage {
            // Objects are read whole (one request each).
            split_size = u64::MAX;
        }
        let data_schema = layout
            .as_ref()
            .map_or(spec.schema.clone(), |l| l.data.clone());
        // Columns left out must be nullable; with partition folders or changes, everything is
        // read.
        let read = spec
            .read_columns
            .as_ref()
            .filter(|_| layout.is_none() && changelog.is_none() && !matches!(format, Format::Raw))
            .map(|cols| {
                (0..data_schema.fields().len())
                    .filter(|c| cols.contains(c) || !data_schema.field(*c).is_nullable())
                    .collect::<Vec<usize>>()
            })
            .filter(|cols| cols.len() < data_schema.fields().len());
        let decoded_schema = match &read {
            None => data_schema.clone(),
            Some(cols) => std::sync::Arc::new(data_schema.project(cols)?),
        };
        let raw = matches!(format, Format::Raw);
        if raw {
            raw_column(opts, &data_schema)?;
        }
        let avro = match format {
            Format::Avro => {
                // Avro files are read whole: their blocks are compressed.
                split_size = u64::MAX;
                Some(crate::avro::Avro::from_options(
                    opts,
                    &decoded_schema,
                    &spec.primary_key_names(),
                )?)
            }
            // Parquet files are read whole (their footer says where everything is).
            Format::Parquet => {
                split_size = u64::MAX;
                None
            }
            _ => None,
        };
        let mut all_keys = std::collections::HashSet::new();
        let mut silent = vec![];
        let (splits, monitor): (Vec<Split>, _) = match interval {
            // Bounded: the files there now, in pieces, dealt out round-robin: the pieces, or
            // (`whole_files`) the files with all their pieces.
            None => {
                let mut splits = vec![];
                for (n, (f, len)) in all.into_iter().enumerate() {
                    splits.extend(
                        file_splits(&path, f, len, split_size)
                            .into_iter()
                            .map(|s| (n, s)),
                    );
                }
                all_keys.extend(splits.iter().map(|(_, s)| s.key()));
                let owner =
                    |i: usize, file: usize| (if spec.whole_files { file } else { i }) % workers;
                let mut dealt = vec![false; workers];
                let mut mine = vec![];
                for (i, (file, s)) in splits.into_iter().enumerate() {
                    let w = owner(i, file);
                    dealt[w] = true;
                    if w == worker {
                        mine.push(s);
                    }
                }
                silent = (0..workers).filter(|w| !dealt[*w]).collect();
                (mine, None)
            }
            // Continuous: whole files, each owned by one worker.
            Some(interval) => {
                if !storage.is_dir(&path) {
                    return Err(
                        opts.error("'source.monitor-interval' needs 'path' to be a directory")
                    );
                }
                let mut m = Monitor {
                    dir: path.clone(),
                    storage: storage.clone(),
                    interval,
                    last_scan: std::time::Instant::now(),
                    seen: Default::default(),
                    worker,
                    workers,
                };
                let files = m.new_files().map_err(|e| path_error(opts, e))?;
                let splits = files.into_iter().map(|f| Split::whole(&path, f)).collect();
                (splits, Some(m))
            }
        };
        Ok(FileSource {
            pending: splits.into(),
            refill: true,
            open: vec![],
            next_split: 0,
            cursor: 0,
            format,
            schema: data_schema.clone(),
            json: match raw {
                true => JsonLines::raw(decoded_schema.clone())?,
                false => json_decoder(&decoded_schema, ignore, &changelog)?,
            },
            changelog,
            read,
            full_schema: data_schema,
            layout,
            csv_ignore_errors,
            skipped: 0,
            monitor,
            done: Default::default(),
            resume: Default::default(),
            all_keys,
            silent,
            root: path.clone(),
            quotes: Default::default(),
            file_splits: Default::default(),
            decode_ahead: spec.decode_ahead && avro.is_none() && !raw,
            avro,
            ahead: Default::default(),
            ahead_due: false,
            decoded_schema,
            json_ignore_errors: ignore,
            storage,
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

/// The rows of `batch` (columns `read` of `schema`) with NULL in the other columns.
fn with_nulls(
    batch: arrow::record_batch::RecordBatch,
    read: &[usize],
    schema: &SchemaRef,
) -> Result<arrow::record_batch::RecordBatch> {
    let mut decoded = batch.columns().iter();
    let columns = schema
        .fields()
        .iter()
        .enumerate()
        .map(|(i, f)| match read.contains(&i) {
            true => decoded.next().cloned().expect("a decoded column"),
            false => arrow::array::new_null_array(f.data_type(), batch.num_rows()),
        })
        .collect();
    Ok(arrow::record_batch::RecordBatch::try_new_with_options(
        schema.clone(),
        columns,
        &arrow::record_batch::RecordBatchOptions::new().with_row_count(Some(batch.num_rows())),
    )?)
}

/// Counts `byte` in `path` from `from` to `to`.
fn count_in(path: &Path, from: u64, to: u64, byte: u8) -> Result<u64> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = File::open(path).map_err(|e| Error::io(path, e))?;
    f.seek(SeekFrom::Start(from))
        .map_err(|e| Error::io(path, e))?;
    let mut f = f.take(to - from);
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let got = f.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if got == 0 {
            return Ok(n);
        }
        n += memchr::memchr_iter(byte, &buf[..got]).count() as u64;
    }
}

/// Feeds bytes `from..to` of a file to a CSV scan.
fn scan_in(path: &Path, from: u64, to: u64, scan: &mut crate::csv_records::CsvScan) -> Result<()> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = File::open(path).map_err(|e| Error::io(path, e))?;
    f.seek(SeekFrom::Start(from))
        .map_err(|e| Error::io(path, e))?;
    let mut f = f.take(to - from);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let got = f.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if got == 0 {
            return Ok(());
        }
        scan.feed(&buf[..got]);
    }
}

impl FileSource {
    /// Where the record that follows byte `at` of a file starts: just after the first line end
    /// at or after `at - 1` (so a piece that starts on a line start starts there). In CSV, a line
    /// end inside a quoted field ends no record: where the reader stands at a point is found by
    /// reading the file up to it as the CSV reader does (kept per file, so each piece reads on
    /// from the previous one).
    fn record_start(&mut self, path: &Path, at: u64, len: u64) -> Result<u64> {
        use std::io::{Seek, SeekFrom};
        if at == 0 || at >= len {
            return Ok(at.min(len));
        }
        let from = at - 1;
        let mut scan = crate::csv_records::CsvScan::default();
        if matches!(self.format, Format::Csv) {
            let (mut scanned, mut state) = self
                .quotes
                .get(path)
                .copied()
                .filter(|(pos, _)| *pos <= from)
                .unwrap_or_default();
            if scanned < from {
                scan_in(path, scanned, from, &mut state)?;
                scanned = from;
            }
            self.quotes.insert(path.to_path_buf(), (scanned, state));
            scan = state;
        }
        let mut f = File::open(path).map_err(|e| Error::io(path, e))?;
        f.seek(SeekFrom::Start(from))
            .map_err(|e| Error::io(path, e))?;
        let mut f = std::io::BufReader::with_capacity(1 << 16, f);
        let mut pos = from;
        loop {
            let buf = f.fill_buf().map_err(|e| Error::io(path, e))?;
            if buf.is_empty() {
                return Ok(len);
            }
            for &b in buf {
                pos += 1;
                let ends = match &self.format {
                    Format::Csv => scan.step(b),
                    _ => b == b'\n',
                };
                if ends {
                    return Ok(pos);
                }
            }
            let n = buf.len();
            f.consume(n);
        }
    }

    fn open_file(&mut self, split: Split, max_rows: usize) -> Result<OpenFile> {
        use std::io::{Read, Seek, SeekFrom};
        let key = split.key();
        let path = split.path;
        let (resume_at, line) = self.resume.remove(&key).unwrap_or((0, 0));
        // An object on S3 is fetched whole (and never read in pieces); a local file is read as
        // it goes.
        let object = match &self.storage {
            Storage::S3(bucket) => Some(bucket.read(&path)?),
            Storage::Local => None,
        };
        let (start, end) = match split.range {
            None => (0, u64::MAX),
            Some((from, to)) => {
                let len = std::fs::metadata(&path)
                    .map_err(|e| Error::io(&path, e))?
                    .len();
                (
                    self.record_start(&path, from, len)?,
                    self.record_start(&path, to, len)?,
                )
            }
        };
        // JSON lines resume at a byte position; CSV at a record count within the split.
        let (seek_to, position) = match &self.format {
            Format::Csv | Format::Avro => (start, resume_at),
            _ => {
                let at = resume_at.max(start);
                (at, at)
            }
        };
        let buffered: Box<dyn BufRead + Send> = match &object {
            Some(bytes) => {
                let mut cursor = std::io::Cursor::new(bytes.clone());
                cursor.set_position(seek_to);
                Box::new(cursor)
            }
            None => {
                let mut f = File::open(&path).map_err(|e| Error::io(&path, e))?;
                if seek_to > 0 {
                    f.seek(SeekFrom::Start(seek_to))
                        .map_err(|e| Error::io(&path, e))?;
                }
                Box::new(BufReader::with_capacity(
                    1 << 20,
                    f.take(end.saturating_sub(seek_to)),
                ))
            }
        };
        let split = match self.file_splits.get(&path) {
            Some(id) => *id,
            None => {
                self.next_split += 1;
                self.file_splits.insert(path.clone(), self.next_split - 1);
                self.next_split - 1
            }
        };
        let mut avro = None;
        let mut parquet = None;
        let (lines, csv) = match &self.format {
            Format::Parquet => {
                parquet = Some(match object {
                    Some(bytes) => {
                        open_parquet(&path, bytes, &self.decoded_schema, position, max_rows)?
                    }
                    None => {
                        let f = File::open(&path).map_err(|e| Error::io(&path, e))?;
                        open_parquet(&path, f, &self.decoded_schema, position, max_rows)?
                    }
                });
                (None, None)
            }
            Format::Avro => {
                let input: Box<dyn BufRead + Send> = match object {
                    Some(bytes) => Box::new(std::io::Cursor::new(bytes)),
                    None => {
                        let f = File::open(&path).map_err(|e| Error::io(&path, e))?;
                        Box::new(BufReader::with_capacity(1 << 20, f))
                    }
                };
                let mut reader = apache_avro::Reader::new(input).map_err(|e| Error::BadRecord {
                    location: path.display().to_string(),
                    message: format!("not an Avro object container file ({e})"),
                })?;
                // A checkpoint that had read part of the file resumes after the records it read.
                for n in 0..position {
                    if let Some(Err(e)) = reader.next() {
                        return Err(Error::BadRecord {
                            location: format!("{}: record {}", path.display(), n + 1),
                            message: format!("not a readable Avro record ({e})"),
                        });
                    }
                }
                let resolver = self
                    .avro
                    .as_ref()
                    .expect("an avro table has a decoder")
                    .resolver(reader.writer_schema())
                    .map_err(|e| Error::BadRecord {
                        location: path.display().to_string(),
                        message: format!("the file's schema does not fit the table: {e}"),
                    })?;
                avro = Some((reader, resolver));
                (None, None)
            }
            Format::Csv => {
                let r = crate::csv_records::CsvRecords::new(
                    buffered,
                    self.schema.clone(),
                    self.read.clone(),
                    max_rows,
                    self.csv_ignore_errors,
                    position,
                )
                .map_err(|e| Error::io(&path, e))?;
                (None, Some(r))
            }
            _ => (Some(buffered), None),
        };
        Ok(OpenFile {
            split,
            key,
            path,
            lines,
            csv,
            line,
            start,
            lines_before: (start == 0).then_some(0),
            position,
            ahead: None,
            avro,
            parquet,
        })
    }

    /// Starts decoding, on a thread of its own, the next piece of a file being read whose turn
    /// has not come (and that a checkpoint did not leave half read). Its batches wait in a
    /// short queue; they are handed over in file order, when the piece's turn comes.
    fn decode_next_pieces(&mut self, max_rows: usize) -> Result<()> {
        self.ahead_due = false;
        let paths: Vec<PathBuf> = self.open.iter().map(|f| f.path.clone()).collect();
        for path in paths {
            // One piece ahead keeps one more core busy; the reader decodes the others.
            if self.ahead.len() >= MAX_AHEAD {
                break;
            }
            let Some(split) = self.pending.iter().find(|s| s.path == path) else {
                continue;
            };
            let key = split.key();
            if self.ahead.contains_key(&key) || self.resume.contains_key(&key) {
                continue;
            }
            let split = split.clone();
            let mut f = self.open_file(split, max_rows)?;
            let (tx, rx) = std::sync::mpsc::sync_channel(AHEAD_BATCHES);
            let mut json = json_decoder(
                &self.decoded_schema,
                self.json_ignore_errors,
                &self.changelog,
            )?;
            let placeholder = OpenFile {
                split: f.split,
                key: f.key.clone(),
                path: f.path.clone(),
                lines: None,
                csv: None,
                line: f.line,
                start: f.start,
                lines_before: f.lines_before,
                position: f.position,
                ahead: Some(rx),
                avro: None,
                parquet: None,
            };
            std::thread::Builder::new()
                .name("decode-ahead".into())
                .spawn(move || loop {
                    let mut skipped = 0;
                    let before = json.skipped();
                    let chunk = read_chunk(&mut f, &mut json, &mut skipped, max_rows);
                    let last = matches!(chunk, Ok(Chunk::Eof) | Err(_));
                    let read = Ahead {
                        chunk,
                        position: f.position,
                        line: f.line,
                        skipped: skipped + json.skipped() - before,
                    };
                    // The reader went away (the job stopped), or the piece is done.
                    if tx.send(read).is_err() || last {
                        return;
                    }
                })
                .map_err(|e| Error::io(&path, e))?;
            self.ahead.insert(key, placeholder);
        }
        Ok(())
    }

    fn read_chunk(&mut self, at: usize, max_rows: usize) -> Result<Chunk> {
        let f = &mut self.open[at];
        if let Some(reader) = f.parquet.as_mut() {
            return read_parquet(&f.path, reader, &mut f.position, &self.decoded_schema);
        }
        if let (Some((reader, resolver)), Some(avro)) = (f.avro.as_mut(), self.avro.as_mut()) {
            return read_avro(&f.path, reader, resolver, &mut f.position, avro, max_rows);
        }
        let Some(rx) = &f.ahead else {
            return read_chunk(f, &mut self.json, &mut self.skipped, max_rows);
        };
        let Ok(read) = rx.recv() else {
            return Err(Error::Runtime(format!(
                "{}: the thread decoding a piece of it stopped unexpectedly",
                f.path.display()
            )));
        };
        f.position = read.position;
        f.line = read.line;
        self.skipped += read.skipped;
        read.chunk
    }
}

/// The `'path'` option: a plain path or a `file://` URI, as Flink users write them, or an
/// `s3://bucket/prefix` URL (kept as it is: see [`crate::storage`]). An empty path, or a URI of
/// another scheme, is an error.
fn table_path(opts: &mut Options) -> Result<PathBuf> {
    let raw = opts.required("path")?;
    let text = raw.trim();
    if text.is_empty() {
        return Err(opts.error("option 'path' is empty: name a file or directory".to_string()));
    }
    if text.starts_with("s3://") {
        return Ok(PathBuf::from(text.trim_end_matches('/')));
    }
    if let Some(rest) = text.strip_prefix("file://") {
        // file:///data/x, or file://localhost/data/x.
        let rest = rest.strip_prefix("localhost").unwrap_or(rest);
        if !rest.starts_with('/') {
            return Err(opts.error(format!(
                "option 'path' = '{raw}': a file:// URI names a host; write file:///absolute/path"
            )));
        }
        return Ok(PathBuf::from(rest));
    }
    if let Some(rest) = text.strip_prefix("file:") {
        return Ok(PathBuf::from(rest));
    }
    if let Some((scheme, _)) = text.split_once("://") {
        if !scheme.is_empty()
            && scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
        {
            return Err(opts.error(format!(
                "option 'path' = '{raw}': the filesystem connector reads local paths, file:// URIs and s3:// URLs; \
                 '{scheme}://' is not supported (use s3:// for S3-compatible storage)"
            )));
        }
    }
    Ok(PathBuf::from(text))
}

/// Opens a Parquet file (`input`: the file, or an object's bytes) for reading the table's
/// columns (`schema`, matched by name) from row `position` on.
fn open_parquet<T: parquet::file::reader::ChunkReader + 'static>(
    path: &Path,
    input: T,
    schema: &SchemaRef,
    position: u64,
    max_rows: usize,
) -> Result<parquet::arrow::arrow_reader::ParquetRecordBatchReader> {
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    let bad = |message: String| Error::BadRecord {
        location: path.display().to_string(),
        message,
    };
    let builder = ParquetRecordBatchReaderBuilder::try_new(input)
        .map_err(|e| bad(format!("not a readable Parquet file ({e})")))?;
    let file_schema = builder.schema().clone();
    let mut roots = vec![];
    for field in schema.fields() {
        match file_schema.index_of(field.name()) {
            Ok(i) => {
                let found = file_schema.field(i).data_type();
                if !arrow::compute::can_cast_types(found, field.data_type()) {
                    return Err(bad(format!(
                        "column '{}' is {found} in the file, which does not read as {}",
                        field.name(),
                        field.data_type()
                    )));
                }
                roots.push(i);
            }
            // A nullable column the file lacks reads as NULL (files written before it was added).
            Err(_) if field.is_nullable() => {}
            Err(_) => {
                return Err(bad(format!(
                    "the file has no column '{}' (its columns: {})",
                    field.name(),
                    file_schema
                        .fields()
                        .iter()
                        .map(|f| f.name().as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )))
            }
        }
    }
    let mask = parquet::arrow::ProjectionMask::roots(builder.parquet_schema(), roots);
    builder
        .with_projection(mask)
        .with_batch_size(max_rows.max(1))
        .with_offset(position as usize)
        .build()
        .map_err(|e| bad(format!("not a readable Parquet file ({e})")))
}

/// Reads the next rows of a Parquet file as the table's columns.
fn read_parquet(
    path: &Path,
    reader: &mut parquet::arrow::arrow_reader::ParquetRecordBatchReader,
    position: &mut u64,
    schema: &SchemaRef,
) -> Result<Chunk> {
    let batch = match reader.next() {
        None => return Ok(Chunk::Eof),
        Some(Err(e)) => {
            return Err(Error::BadRecord {
                location: format!("{}: after row {}", path.display(), *position),
                message: format!("not a readable Parquet file ({e})"),
            })
        }
        Some(Ok(b)) => b,
    };
    *position += batch.num_rows() as u64;
    let columns = schema
        .fields()
        .iter()
        .map(|field| match batch.column_by_name(field.name()) {
            Some(c) => Ok(arrow::compute::cast(c, field.data_type())?),
            None => Ok(arrow::array::new_null_array(
                field.data_type(),
                batch.num_rows(),
            )),
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Chunk::Rows(
        arrow::record_batch::RecordBatch::try_new_with_options(
            schema.clone(),
            columns,
            &arrow::record_batch::RecordBatchOptions::new().with_row_count(Some(batch.num_rows())),
        )?,
    ))
}

/// Reads the next records of an Avro container file (`position` counts those read before).
fn read_avro(
    path: &Path,
    reader: &mut apache_avro::Reader<'static, Box<dyn BufRead + Send>>,
    resolver: &crate::avro::Resolver,
    position: &mut u64,
    avro: &mut crate::avro::Avro,
    max_rows: usize,
) -> Result<Chunk> {
    let first = *position;
    let mut values = Vec::with_capacity(max_rows.min(8192));
    while values.len() < max_rows {
        match reader.next() {
            None => break,
            Some(Ok(v)) => values.push(v),
            Some(Err(e)) => {
                return Err(Error::BadRecord {
                    location: format!("{}: record {}", path.display(), *position + 1),
                    message: format!("not a readable Avro record ({e})"),
                })
            }
        }
        *position += 1;
    }
    if values.is_empty() {
        return Ok(Chunk::Eof);
    }
    let location = |i: usize| format!("{}: record {}", path.display(), first + i as u64 + 1);
    match avro.resolved_rows(resolver, values, &location)? {
        Some(batch) => Ok(Chunk::Rows(batch)),
        None => Ok(Chunk::Nothing),
    }
}

/// Reads the next chunk of an open split: a CSV batch, or up to `max_rows` JSON lines decoded.
fn read_chunk(
    f: &mut OpenFile,
    json: &mut JsonLines,
    skipped: &mut u64,
    max_rows: usize,
) -> Result<Chunk> {
    if let Some(csv) = f.csv.as_mut() {
        use crate::csv_records::{CsvRead, ReadError};
        let before = csv.skipped;
        let read = csv.read();
        *skipped += csv.skipped - before;
        f.position = csv.records;
        return match read {
            Ok(CsvRead::Rows(batch)) => Ok(Chunk::Rows(empty_strings(batch)?)),
            Ok(CsvRead::Nothing) => Ok(Chunk::Nothing),
            Ok(CsvRead::Eof) => Ok(Chunk::Eof),
            Err(ReadError::Io(e)) => Err(Error::io(&f.path, e)),
            Err(ReadError::Bad(bad)) => {
                let before = match f.lines_before {
                    Some(n) => n,
                    None => count_in(&f.path, 0, f.start, b'\n')?,
                };
                Err(Error::BadRecord {
                    location: format!("{}:{}", f.path.display(), before + bad.line),
                    message: format!(
                        "malformed CSV record ({}); set 'csv.ignore-parse-errors' = 'true' to skip such records",
                        bad.message
                    ),
                })
            }
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
    let decoded = match f.lines_before {
        Some(before) => json.decode(&lines, &display, before + first_line),
        // A piece that starts inside the file: its line numbers are known only once the
        // lines before it are counted, which only an error message needs.
        None => match json.decode(&lines, &display, first_line) {
            Err(Error::BadRecord { .. }) => {
                let before = count_in(&f.path, 0, f.start, b'\n')?;
                f.lines_before = Some(before);
                json.decode(&lines, &display, before + first_line)
            }
            other => other,
        },
    };
    match decoded? {
        Some(batch) if batch.num_rows() > 0 => Ok(Chunk::Rows(batch)),
        _ => Ok(Chunk::Nothing),
    }
}

impl SourceReader for FileSource {
    fn open_splits(&self) -> Vec<usize> {
        self.open.iter().map(|f| f.split).collect()
    }

    fn poll(&mut self, max_rows: usize) -> Result<Poll> {
        loop {
            while self.refill && self.open.len() < MAX_OPEN_SPLITS {
                // The next split of a file none of whose pieces is being read.
                let next = self
                    .pending
                    .iter()
                    .position(|s| !self.open.iter().any(|f| f.path == s.path));
                let Some(split) = next.and_then(|i| self.pending.remove(i)) else {
                    self.refill = false;
                    break;
                };
                let f = match self.ahead.remove(&split.key()) {
                    Some(f) => f,
                    None => self.open_file(split, max_rows)?,
                };
                self.open.push(f);
                self.ahead_due = self.decode_ahead;
            }
            if self.ahead_due {
                self.decode_next_pieces(max_rows)?;
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
                self.pending
                    .extend(found.into_iter().map(|f| Split::whole(&self.root, f)));
                self.refill = true;
                continue;
            }
            let at = self.cursor % self.open.len();
            match self.read_chunk(at, max_rows)? {
                Chunk::Rows(batch) => {
                    self.cursor = at + 1;
                    let batch = match (&self.layout, &self.read) {
                        (Some(l), _) => l.with_partition_columns(&self.open[at].path, batch)?,
                        (None, Some(read)) => with_nulls(batch, read, &self.full_schema)?,
                        (None, None) => batch,
                    };
                    return Ok(Poll::Batch {
                        split: self.open[at].split,
                        batch,
                    });
                }
                Chunk::Nothing => self.cursor = at + 1,
                Chunk::Eof => {
                    let done = self.open.remove(at);
                    self.done.insert(done.key);
                    self.refill = true;
                    // The file's split ends with this worker's last piece of it.
                    if self.pending.iter().any(|s| s.path == done.path) {
                        continue;
                    }
                    self.file_splits.remove(&done.path);
                    return Ok(Poll::SplitDone { split: done.split });
                }
            }
        }
    }

    fn skipped(&self) -> u64 {
        self.json.skipped() + self.skipped + self.avro.as_ref().map_or(0, |a| a.skipped())
    }

    fn silent_workers(&self) -> Vec<usize> {
        self.silent.clone()
    }

    fn offsets(&self) -> crate::SourceOffsets {
        let mut out = crate::SourceOffsets::new();
        for key in &self.done {
            out.insert(key.clone(), crate::SPLIT_DONE);
        }
        for f in &self.open {
            out.insert(f.key.clone(), f.position);
            out.insert(format!("{}#line", f.key), f.line);
        }
        for (key, (position, line)) in &self.resume {
            out.insert(key.clone(), *position);
            out.insert(format!("{key}#line"), *line);
        }
        out
    }

    fn seek(&mut self, offsets: &crate::SourceOffsets) -> Result<()> {
        // A checkpoint that read a file in other pieces (another 'source.split-size', or the
        // file changed size) cannot say which rows were read.
        for key in offsets.keys().filter(|k| !k.ends_with("#line")) {
            let file = key.split("#bytes=").next().unwrap_or(key);
            let ours = self
                .all_keys
                .iter()
                .any(|k| k.split("#bytes=").next() == Some(file));
            if ours && !self.all_keys.contains(key) {
                return Err(Error::Runtime(format!(
                    "the checkpoint read '{file}' in other pieces than this job would ({key}): \
                     'source.split-size' or the file's size changed since; restore the old \
                     setting and file, or start over with --fresh"
                )));
            }
        }
        let pending = std::mem::take(&mut self.pending);
        for split in pending {
            let key = split.key();
            match offsets.get(&key) {
                Some(&crate::SPLIT_DONE) => {
                    self.done.insert(key);
                }
                Some(&position) => {
                    let line = offsets.get(&format!("{key}#line")).copied().unwrap_or(0);
                    self.resume.insert(key, (position, line));
                    self.pending.push_back(split);
                }
                None => self.pending.push_back(split),
            }
        }
        if let Some(m) = self.monitor.as_mut() {
            // Files already finished must not come back through the directory watch.
            m.seen.extend(self.done.iter().map(|k| self.root.join(k)));
        }
        Ok(())
    }
}

/// When a sink without checkpoints starts a new part file.
#[derive(Clone, Copy)]
struct Rolling {
    bytes: u64,
    age: std::time::Duration,
}

/// Writes this worker's part files.
pub struct FileSink {
    dir: PathBuf,
    /// Where `dir` is. On S3, the file being written is a local spool file (`spool`), uploaded
    /// under its hidden name when rolled or sealed.
    storage: Storage,
    spool: Option<tempfile::TempPath>,
    worker: usize,
    format: Format,
    sequence: u64,
    buffer: Vec<u8>,
    file: Option<(PathBuf, File)>,
    /// Bytes written into the current file, and when it was opened.
    written: u64,
    opened: std::time::Instant,
    roll: Rolling,
    /// Two-phase commit (with checkpoints): no rolling; files are sealed per checkpoint epoch
    /// (`.pending-<epoch>`) and published when that checkpoint commits.
    transactional: bool,
    pending: Vec<(u64, PathBuf)>,
    /// Without checkpoints: files rolled but not yet published (hidden until the job ends).
    rolled: Vec<PathBuf>,
    /// `'sink.publish-on-stop'`: a job stopped by a signal without checkpoints publishes what
    /// it wrote (by default it does not, as in Flink: uncommitted output stays invisible).
    publish_on_stop: bool,
    /// Names part files apart when several INSERTs write into one table: `part-<worker>-<seq>`
    /// for the first, `part-<worker>-i<n>-<seq>` for the n-th after it.
    instance: usize,
    /// Finished, stopped or aborted: nothing is left to clean up when dropped.
    closed: bool,
    /// `avro`: the columns' format and the blocks' codec, the sync marker of the file being
    /// written, and whether its header is still to write.
    avro: Option<(std::sync::Arc<crate::avro::Avro>, apache_avro::Codec)>,
    marker: [u8; 16],
    header_due: bool,
    /// `parquet`: the writer of the file being written (over a second handle of it), and the
    /// files' properties.
    parquet: Option<parquet::arrow::ArrowWriter<File>>,
    parquet_props: Option<parquet::file::properties::WriterProperties>,
}

/// How a sink encodes its files: the format, Avro's columns and codec, Parquet's properties.
type Encoding = (
    Format,
    Option<(std::sync::Arc<crate::avro::Avro>, apache_avro::Codec)>,
    Option<parquet::file::properties::WriterProperties>,
);

/// Publishes a hidden part file under its visible name.
fn make_visible(storage: &Storage, dir: &Path, hidden: &Path) -> Result<()> {
    let name = hidden
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    let target = dir.join(visible_name(name));
    match storage {
        Storage::Local => std::fs::rename(hidden, &target).map_err(|e| Error::io(&target, e)),
        Storage::S3(bucket) => bucket.rename(hidden, &target),
    }
}

/// Deletes a file (one already gone is no error).
fn remove(storage: &Storage, path: &Path) -> Result<()> {
    match storage {
        Storage::Local => match std::fs::remove_file(path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::io(path, e)),
            _ => Ok(()),
        },
        Storage::S3(bucket) => bucket.remove(path),
    }
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
        let dir = table_path(opts)?;
        let storage = storage(opts, &dir)?;
        let format = format(opts)?;
        let roll = Rolling {
            bytes: opts.memory_size("sink.rolling-policy.file-size")?,
            age: std::time::Duration::from_millis(
                opts.duration_ms("sink.rolling-policy.rollover-interval")?
                    .expect("declared default")
                    .max(1) as u64,
            ),
        };
        let publish_on_stop = opts.flag("sink.publish-on-stop")?;
        let instance = spec.sink_instance;
        let layout =
            crate::partitions::Layout::new(&spec.schema, &spec.partitioned_by, &spec.table)?;
        if matches!(format, Format::Raw) {
            raw_column(
                opts,
                &layout
                    .as_ref()
                    .map_or(spec.schema.clone(), |l| l.data.clone()),
            )?;
        }
        let parquet_props = match format {
            Format::Parquet => {
                let compression = match opts.value::<String>("parquet.compression")?.as_str() {
                    "UNCOMPRESSED" => parquet::basic::Compression::UNCOMPRESSED,
                    _ => parquet::basic::Compression::SNAPPY,
                };
                let rows = opts.value::<u64>("parquet.row-group.max-rows")?.max(1) as usize;
                Some(
                    parquet::file::properties::WriterProperties::builder()
                        .set_compression(compression)
                        .set_max_row_group_row_count(Some(rows))
                        .set_statistics_enabled(parquet::file::properties::EnabledStatistics::Page)
                        .set_created_by("sluice".to_string())
                        .build(),
                )
            }
            _ => None,
        };
        let avro = match format {
            Format::Avro => {
                let columns = layout
                    .as_ref()
                    .map_or(spec.schema.clone(), |l| l.data.clone());
                let avro =
                    crate::avro::Avro::from_options(opts, &columns, &spec.primary_key_names())?;
                Some((std::sync::Arc::new(avro), crate::avro::codec(opts)?))
            }
            _ => None,
        };
        if let Storage::Local = storage {
            std::fs::create_dir_all(&dir)
                .map_err(|e| opts.error(format!("option 'path' = '{}': {e}", dir.display())))?;
        }
        match layout {
            None => Ok(Box::new(FileSink::in_dir(
                (dir, storage),
                worker,
                (format, avro, parquet_props),
                roll,
                (publish_on_stop, instance),
            ))),
            Some(layout) => Ok(Box::new(crate::partitions::PartitionedSink::new(
                layout,
                (dir, storage.clone()),
                move |folder: &Path| -> Result<Box<dyn SinkWriter>> {
                    Ok(Box::new(FileSink::in_dir(
                        (folder.to_path_buf(), storage.clone()),
                        worker,
                        (format.clone(), avro.clone(), parquet_props.clone()),
                        roll,
                        (publish_on_stop, instance),
                    )))
                },
            ))),
        }
    }

    fn in_dir(
        (dir, storage): (PathBuf, Storage),
        worker: usize,
        (format, avro, parquet_props): Encoding,
        roll: Rolling,
        (publish_on_stop, instance): (bool, usize),
    ) -> Self {
        FileSink {
            dir,
            storage,
            spool: None,
            worker,
            format,
            sequence: 0,
            buffer: vec![],
            file: None,
            written: 0,
            opened: std::time::Instant::now(),
            roll,
            transactional: false,
            pending: vec![],
            rolled: vec![],
            publish_on_stop,
            instance,
            closed: false,
            avro,
            marker: [0; 16],
            header_due: false,
            parquet: None,
            parquet_props,
        }
    }

    /// Writes a Parquet file's footer: the file is whole.
    fn close_parquet(&mut self) -> Result<()> {
        if let Some(w) = self.parquet.take() {
            let path = self
                .file
                .as_ref()
                .map(|(p, _)| p.clone())
                .unwrap_or_default();
            w.close()
                .map_err(|e| Error::Runtime(format!("{}: {e}", path.display())))?;
        }
        Ok(())
    }

    /// Closes the file being written and puts it, still hidden, at the path `to` gives for its
    /// hidden path (on S3: uploads it there). Returns where it went.
    fn close_file(&mut self, to: impl FnOnce(&Path) -> PathBuf) -> Result<Option<PathBuf>> {
        self.close_parquet()?;
        let Some((path, mut file)) = self.file.take() else {
            return Ok(None);
        };
        self.written = 0;
        file.flush().map_err(|e| Error::io(&path, e))?;
        let target = to(&path);
        match &self.storage {
            Storage::Local => {
                file.sync_all().map_err(|e| Error::io(&path, e))?;
                if target != path {
                    std::fs::rename(&path, &target).map_err(|e| Error::io(&target, e))?;
                }
            }
            Storage::S3(bucket) => {
                let spool = self.spool.take().expect("an S3 file is spooled");
                bucket.upload(&spool, &target)?;
            }
        }
        Ok(Some(target))
    }

    /// Closes the file being written; it stays hidden until the job ends.
    fn roll(&mut self) -> Result<()> {
        if let Some(path) = self.close_file(Path::to_path_buf)? {
            self.rolled.push(path);
        }
        Ok(())
    }

    /// Deletes this run's unpublished files (a failed job leaves no visible output, and no
    /// hidden files that no checkpoint refers to).
    fn discard(&mut self) -> Result<()> {
        self.closed = true;
        self.parquet = None;
        // On S3 the file being written is only the local spool (deleted when dropped).
        self.spool = None;
        let current = self
            .file
            .take()
            .map(|(path, _)| path)
            .filter(|_| matches!(self.storage, Storage::Local));
        for path in current.into_iter().chain(std::mem::take(&mut self.rolled)) {
            remove(&self.storage, &path)?;
        }
        Ok(())
    }

    fn extension(&self) -> &'static str {
        match &self.format {
            Format::Csv => "csv",
            Format::Avro => "avro",
            Format::Parquet => "parquet",
            Format::Raw => "txt",
            _ => "json",
        }
    }

    /// Publishes everything written: the rolled files and the current one.
    fn publish(&mut self) -> Result<()> {
        self.roll()?;
        for path in std::mem::take(&mut self.rolled) {
            make_visible(&self.storage, &self.dir, &path)?;
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
        match &self.format {
            Format::Json => encode_json(batch, &mut self.buffer)?,
            Format::Csv => encode_csv(batch, &mut self.buffer)?,
            Format::Changelog(c) => encode_changelog(batch, c, &mut self.buffer)?,
            Format::Raw => encode_raw(batch, &mut self.buffer)?,
            // Encoded below, once the file (and whether it needs its header) is known.
            Format::Avro | Format::Parquet => {}
        }
        if self.file.is_none() {
            // Never reuse a name a previous run published.
            loop {
                let instance = match self.instance {
                    0 => String::new(),
                    n => format!("i{n}-"),
                };
                let name = format!(
                    "part-{}-{instance}{}.{}",
                    self.worker,
                    self.sequence,
                    self.extension()
                );
                self.sequence += 1;
                let taken = match &self.storage {
                    Storage::Local => self.dir.join(&name).exists(),
                    Storage::S3(bucket) => bucket.exists(&self.dir.join(&name))?,
                };
                if !taken {
                    let path = self.dir.join(format!(".{name}.inprogress"));
                    let f = match &self.storage {
                        Storage::Local => File::create(&path).map_err(|e| Error::io(&path, e))?,
                        Storage::S3(_) => {
                            let spool = tempfile::Builder::new()
                                .prefix(".sluice-spool-")
                                .tempfile()
                                .map_err(|e| Error::io(&path, e))?;
                            let (f, spool) = spool.into_parts();
                            self.spool = Some(spool);
                            f
                        }
                    };
                    self.file = Some((path, f));
                    self.opened = std::time::Instant::now();
                    // A sync marker unlike any other file's (it only has to differ from the
                    // file's data).
                    let seed = std::collections::hash_map::RandomState::new();
                    let (a, b) = (seed.hash_one(&name), seed.hash_one((&name, self.worker)));
                    self.marker[..8].copy_from_slice(&a.to_le_bytes());
                    self.marker[8..].copy_from_slice(&b.to_le_bytes());
                    self.header_due = true;
                    break;
                }
            }
        }
        if let Some(props) = &self.parquet_props {
            let (path, file) = self.file.as_ref().expect("opened above");
            if self.parquet.is_none() {
                let handle = file.try_clone().map_err(|e| Error::io(path, e))?;
                let w = parquet::arrow::ArrowWriter::try_new(
                    handle,
                    batch.data.schema(),
                    Some(props.clone()),
                )
                .map_err(|e| Error::Runtime(format!("{}: {e}", path.display())))?;
                self.parquet = Some(w);
            }
            let w = self.parquet.as_mut().expect("made above");
            w.write(&batch.data)
                .map_err(|e| Error::Runtime(format!("{}: {e}", path.display())))?;
            self.written = (w.bytes_written() + w.in_progress_size()) as u64;
            let full = self.written >= self.roll.bytes || self.opened.elapsed() >= self.roll.age;
            if full && !self.transactional {
                self.roll()?;
            }
            return Ok(());
        }
        if let Some((avro, codec)) = &self.avro {
            self.buffer =
                avro.container_block(&batch.data, *codec, self.marker, self.header_due)?;
            self.header_due = false;
        }
        let (path, file) = self.file.as_mut().expect("opened above");
        file.write_all(&self.buffer)
            .map_err(|e| Error::io(&*path, e))?;
        self.written += self.buffer.len() as u64;
        let full = self.written >= self.roll.bytes || self.opened.elapsed() >= self.roll.age;
        if full && !self.transactional {
            self.roll()?;
        }
        Ok(())
    }

    fn finish(&mut self) -> Result<()> {
        self.closed = true;
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
        let entries = match &self.storage {
            Storage::Local => std::fs::read_dir(&self.dir)
                .and_then(|d| d.map(|e| e.map(|e| e.path())).collect())
                .map_err(|e| Error::io(&self.dir, e))?,
            Storage::S3(bucket) => bucket.entries(&self.dir, false)?,
        };
        for path in entries {
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default()
                .to_string();
            let Some(rest) = name.strip_prefix(".part-") else {
                continue;
            };
            // Each worker settles the files of the workers it replaces (rescaling), and each
            // INSERT into the table its own.
            let mut parts = rest.split('-');
            let owner: usize = parts
                .next()
                .and_then(|w| w.parse().ok())
                .unwrap_or(usize::MAX);
            let instance: usize = parts
                .next()
                .and_then(|p| p.strip_prefix('i'))
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            if owner % workers.max(1) != worker || instance != self.instance {
                continue;
            }
            let sealed_for = name
                .rsplit_once(".pending-")
                .and_then(|(_, e)| e.parse::<u64>().ok());
            match sealed_for {
                Some(epoch) if committed.is_some_and(|c| epoch <= c) => {
                    make_visible(&self.storage, &self.dir, &path)?
                }
                _ => remove(&self.storage, &path)?,
            }
        }
        Ok(())
    }

    fn pre_commit(&mut self, epoch: u64) -> Result<()> {
        let dir = self.dir.clone();
        let sealed = self.close_file(|path| {
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default();
            dir.join(format!(".{}.pending-{epoch}", visible_name(name)))
        })?;
        if let Some(sealed) = sealed {
            self.pending.push((epoch, sealed));
        }
        Ok(())
    }

    fn commit(&mut self, epoch: u64) -> Result<()> {
        let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.pending)
            .into_iter()
            .partition(|(e, _)| *e <= epoch);
        self.pending = later;
        for (_, path) in due {
            make_visible(&self.storage, &self.dir, &path)?;
        }
        Ok(())
    }

    fn abort(&mut self) -> Result<()> {
        // Without checkpoints nothing was published, and nothing is; with them, unsealed output
        // belongs to no checkpoint (recovery would discard it anyway).
        self.discard()
    }

    fn stop(&mut self) -> Result<()> {
        if self.publish_on_stop && !self.transactional {
            return self.finish();
        }
        self.abort()
    }
}

impl Drop for FileSink {
    /// A sink dropped before it was closed belongs to a job that failed: its files go.
    fn drop(&mut self) {
        if !self.closed {
            let _ = self.discard();
        }
    }
}
