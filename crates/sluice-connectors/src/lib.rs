//! Sources and sinks.
//!
//! A connector is chosen by the `'connector'` option of `CREATE TABLE` and configured by the
//! other options, with Flink's names where Flink has the connector. Each worker opens its own
//! [`SourceReader`] over its share of the splits (files, or slices of a generator's sequence)
//! and its own [`SinkWriter`]. Formats (`json`, `csv`, `debezium-json`) are separate from the
//! transports that carry them.
//!
//! Sources built in: `filesystem`, `kafka`, `upsert-kafka`, `nats`, `rabbitmq`, `mqtt`, `redis`
//! (streams), `jdbc` (a table read once), `postgres-cdc` and `mysql-cdc` (a table and its changes), `datagen`, `ecommerce`, `nexmark`. Sinks: `filesystem`, `kafka`, `upsert-kafka`,
//! `nats`, `rabbitmq`, `mqtt`, `redis`, `jdbc` (PostgreSQL, MySQL/MariaDB), `print`, `blackhole`, `memory` (an in-process
//! materialized table, used by the demo's live view).

pub mod avro;
mod csv_records;
pub mod datagen;
pub mod ecommerce;
pub mod filesystem;
pub mod format;
#[cfg(feature = "jdbc")]
pub mod jdbc;
#[cfg(feature = "kafka")]
pub mod kafka;
pub mod lookup;
pub mod memory;
pub mod message;
#[cfg(feature = "mqtt")]
pub mod mqtt;
#[cfg(feature = "nats")]
pub mod nats;
pub mod nexmark;
pub mod options;
pub mod partitions;
pub mod prefetch;
pub mod print;
#[cfg(feature = "rabbitmq")]
pub mod rabbitmq;
#[cfg(feature = "redis")]
pub mod redis_sink;
#[cfg(feature = "redis")]
pub mod redis_stream;
pub mod staged;
mod storage;
pub mod view;

use std::collections::BTreeMap;

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use sluice_common::{ChangeBatch, Error, Result};

pub use options::Options;

/// What a connector is given: the table's name, physical columns and options.
#[derive(Debug, Clone)]
pub struct ConnectorSpec {
    pub table: String,
    pub schema: SchemaRef,
    pub options: BTreeMap<String, String>,
    pub partitioned_by: Vec<String>,
    /// The physical columns the job reads (positions in `schema`), when not all: a source may
    /// skip decoding the others and leave them NULL (nullable ones only).
    pub read_columns: Option<Vec<usize>>,
    /// File sources: parse the next piece of a file on another thread while the current one is
    /// read (set when the machine has a core to spare for it).
    pub decode_ahead: bool,
    /// File sources: deal each file whole to one worker, which reads its pieces in file order.
    /// Set for tables with a watermark, so that which rows are late does not depend on the
    /// number of workers (pieces on different workers would hold each other's watermark back).
    pub whole_files: bool,
    /// Sinks: which of the job's INSERTs into this table this is (0 for the first), so that
    /// writers of several INSERTs into one table name their files apart.
    pub sink_instance: usize,
    /// Metadata columns (`METADATA FROM 'key'`): positions in `schema` and keys. A source fills
    /// them from its records' metadata, not from their values.
    pub metadata: Vec<(usize, String)>,
    /// The PRIMARY KEY's columns (positions in `schema`): the record key of `upsert-kafka`.
    pub primary_key: Vec<usize>,
}

impl ConnectorSpec {
    /// The names of the PRIMARY KEY's columns.
    pub fn primary_key_names(&self) -> Vec<String> {
        self.primary_key
            .iter()
            .map(|i| self.schema.field(*i).name().clone())
            .collect()
    }

    /// The columns a record's value holds: the physical ones that are not metadata columns.
    pub fn value_schema(&self) -> SchemaRef {
        std::sync::Arc::new(arrow::datatypes::Schema::new(
            self.schema
                .fields()
                .iter()
                .enumerate()
                .filter(|(i, _)| !self.metadata.iter().any(|(c, _)| c == i))
                .map(|(_, f)| f.clone())
                .collect::<Vec<_>>(),
        ))
    }
}

/// What a source produced on one poll.
pub enum Poll {
    /// Rows from split `split` (splits are numbered within this reader).
    Batch { split: usize, batch: RecordBatch },
    /// Split `split` is exhausted: its watermark no longer holds the source back.
    SplitDone { split: usize },
    /// Nothing right now; poll again later.
    Idle,
    /// The reader's splits are exhausted (bounded sources only).
    Finished,
}

/// A worker's reader over its splits.
pub trait SourceReader: Send {
    /// The splits being read now. Each has its own watermark, and a split that has produced no
    /// rows yet holds the source's watermark back until it does.
    fn open_splits(&self) -> Vec<usize> {
        vec![0]
    }
    /// The next batch, up to `max_rows` rows.
    fn poll(&mut self, max_rows: usize) -> Result<Poll>;
    /// Records skipped as malformed so far (`json.ignore-parse-errors`).
    fn skipped(&self) -> u64 {
        0
    }
    /// Where the reader is: a position per split name, covering every row returned so far.
    /// Checkpoints record these; [`SourceReader::seek`] resumes from them.
    fn offsets(&self) -> SourceOffsets;
    /// Resumes from recorded offsets; called before the first poll.
    fn seek(&mut self, offsets: &SourceOffsets) -> Result<()>;
    /// Checkpoint `epoch` records [`SourceReader::offsets`] as they are now.
    fn checkpoint(&mut self, _epoch: u64) {}
    /// Checkpoint `epoch` committed: what it covers will never be read again, so a source may
    /// acknowledge it or report the progress (Kafka's group offsets). Called for the newest
    /// committed one (it covers the older ones).
    fn committed(&mut self, _epoch: u64) -> Result<()> {
        Ok(())
    }
    /// Whether the job takes checkpoints, told before the first poll. A queue that acknowledges
    /// messages only once a checkpoint covering them commits acknowledges them on receipt
    /// without checkpoints.
    fn set_checkpointing(&mut self, _on: bool) {}
    /// The job ran to its end and recorded that it did: everything this reader returned is
    /// covered, and will never be read again (a queue acknowledges its last messages here).
    /// Called once, for a reader that returned [`Poll::Finished`], with checkpoints only.
    fn job_finished(&mut self) -> Result<()> {
        Ok(())
    }
    /// Workers to which this source's deal gives nothing to read (a bounded source whose splits
    /// are fewer than the workers). Every worker knows the deal, so a worker that reads can
    /// announce their end of input before its first rows, instead of its receivers waiting to
    /// hear it from them: otherwise its first rows' lateness would depend on thread timing.
    fn silent_workers(&self) -> Vec<usize> {
        vec![]
    }
}

/// Positions per split name (a file path, or a generator's stream), as recorded in checkpoints.
pub type SourceOffsets = BTreeMap<String, u64>;

/// The offset of a split read to its end.
pub const SPLIT_DONE: u64 = u64::MAX;

/// Offsets of a generator that deals rows to workers by index: rows produced by worker `worker`
/// of `workers`. Such a stream resumes only on the same number of workers.
pub(crate) fn generator_offsets(worker: u64, workers: u64, produced: u64) -> SourceOffsets {
    [(format!("rows@{worker}/{workers}"), produced)]
        .into_iter()
        .collect()
}

/// Where a generator worker stands in its stream: worker `w` of `n` makes rows `w, w+n, ...`
/// below `limit`, at most `pacer`'s rate.
pub(crate) struct GeneratorCursor {
    table: String,
    next: u64,
    step: u64,
    limit: Option<u64>,
    pacer: Option<datagen::Pacer>,
    produced: u64,
}

impl GeneratorCursor {
    /// `rate` rows per second for the whole job (`0`: unpaced).
    pub(crate) fn new(
        table: &str,
        worker: usize,
        workers: usize,
        limit: Option<u64>,
        rate: f64,
    ) -> Self {
        GeneratorCursor {
            table: table.to_string(),
            next: worker as u64,
            step: workers as u64,
            limit,
            pacer: (rate > 0.0).then(|| datagen::Pacer::new(rate / workers as f64)),
            produced: 0,
        }
    }

    /// How many rows to make now (at most `max_rows`): `None` at the end of a bounded stream.
    pub(crate) fn budget(&self, max_rows: usize) -> Option<u64> {
        let mut n = max_rows as u64;
        if let Some(limit) = self.limit {
            if self.next >= limit {
                return None;
            }
            n = n.min((limit - self.next).div_ceil(self.step));
        }
        if let Some(p) = &self.pacer {
            n = n.min(p.allowed().saturating_sub(self.produced));
        }
        Some(n)
    }

    /// The next row's index, moving past it.
    pub(crate) fn take(&mut self) -> u64 {
        let i = self.next;
        self.next += self.step;
        self.produced += 1;
        i
    }

    pub(crate) fn offsets(&self) -> SourceOffsets {
        let worker = self.next % self.step;
        generator_offsets(worker, self.step, self.next / self.step)
    }

    pub(crate) fn seek(&mut self, offsets: &SourceOffsets) -> Result<()> {
        let worker = self.next % self.step;
        let done = generator_seek(&self.table, offsets, worker, self.step)?;
        self.next = worker + done * self.step;
        Ok(())
    }
}

/// The rows worker `worker` of `workers` had produced, from recorded generator offsets.
pub(crate) fn generator_seek(
    table: &str,
    offsets: &SourceOffsets,
    worker: u64,
    workers: u64,
) -> Result<u64> {
    if let Some(n) = offsets.get(&format!("rows@{worker}/{workers}")) {
        return Ok(*n);
    }
    match offsets.keys().next() {
        None => Ok(0),
        Some(other) => Err(Error::connector(
            table,
            format!("generated streams resume only on the worker count they were checkpointed with (found '{other}', running {workers} workers)"),
        )),
    }
}

/// Durable storage beside the checkpoints for what a transactional sink must keep until its
/// output is committed (the Kafka sink's records of a sealed checkpoint): it survives a crash,
/// and is cleared when the job ends.
pub trait Staging: Send + Sync {
    fn put(&self, name: &str, bytes: Vec<u8>) -> Result<()>;
    fn get(&self, name: &str) -> Result<Vec<u8>>;
    /// Names starting with `prefix`.
    fn list(&self, prefix: &str) -> Result<Vec<String>>;
    fn remove(&self, name: &str) -> Result<()>;
    /// A name of the job that no other job shares (its checkpoint directory), under which a
    /// sink records its progress in an external system.
    fn job_id(&self) -> String {
        "sluice".to_string()
    }
}

/// Staged checkpoints of a sink (names `<prefix><worker>-e<epoch>`) that worker `worker` of
/// `workers` settles at the start of a run: its own and those of the earlier workers it replaces
/// (`w % workers == worker`), by earlier worker, oldest epoch first.
pub fn staged_checkpoints(
    staging: &dyn Staging,
    prefix: &str,
    worker: usize,
    workers: usize,
) -> Result<BTreeMap<usize, Vec<(u64, String)>>> {
    let mut staged: BTreeMap<usize, Vec<(u64, String)>> = BTreeMap::new();
    for name in staging.list(prefix)? {
        let Some((w, e)) = name[prefix.len()..].split_once("-e") else {
            continue;
        };
        let (Ok(w), Ok(e)) = (w.parse::<usize>(), e.parse::<u64>()) else {
            continue;
        };
        if w % workers.max(1) == worker {
            staged.entry(w).or_default().push((e, name));
        }
    }
    for files in staged.values_mut() {
        files.sort();
    }
    Ok(staged)
}

/// A worker's writer into a sink.
pub trait SinkWriter: Send {
    /// Gives the sink durable staging, before [`SinkWriter::begin_transactions`] (sinks that
    /// keep their sealed output elsewhere ignore it).
    fn set_staging(&mut self, _staging: std::sync::Arc<dyn Staging>) {}
    /// Writes a changelog batch.
    fn write(&mut self, batch: &ChangeBatch) -> Result<()>;
    /// Makes everything written so far visible (publishes in-progress files).
    fn finish(&mut self) -> Result<()>;
    /// Switches to two-phase commit tied to checkpoints, after settling what earlier runs left:
    /// output pre-committed for checkpoints up to `committed` is published, the rest discarded.
    /// Sinks that cannot take part keep their default (print, blackhole, memory).
    fn begin_transactions(
        &mut self,
        _committed: Option<u64>,
        _worker: usize,
        _workers: usize,
    ) -> Result<()> {
        Ok(())
    }
    /// Seals what was written so far as belonging to checkpoint `epoch` (still invisible).
    fn pre_commit(&mut self, _epoch: u64) -> Result<()> {
        Ok(())
    }
    /// Checkpoint `epoch` is durable: publishes what was sealed for it and earlier ones.
    fn commit(&mut self, _epoch: u64) -> Result<()> {
        Ok(())
    }
    /// The job failed: leaves sealed output for recovery (with checkpoints), drops the rest.
    fn abort(&mut self) -> Result<()> {
        self.finish()
    }
    /// The job was stopped (a signal) before its input ended: by default as [`abort`]; a sink
    /// may publish what it has when its table says so (`'sink.publish-on-stop'`).
    ///
    /// [`abort`]: SinkWriter::abort
    fn stop(&mut self) -> Result<()> {
        self.abort()
    }
}

/// Every connector, with the options it declares.
pub const CONNECTORS: &[options::ConnectorDef] = &[
    filesystem::CONNECTOR,
    #[cfg(feature = "kafka")]
    kafka::CONNECTOR,
    #[cfg(feature = "kafka")]
    kafka::UPSERT,
    datagen::CONNECTOR,
    ecommerce::CONNECTOR,
    nexmark::CONNECTOR,
    print::PRINT,
    print::BLACKHOLE,
    memory::CONNECTOR,
    view::CONNECTOR,
    #[cfg(feature = "nats")]
    nats::CONNECTOR,
    #[cfg(feature = "redis")]
    redis_sink::CONNECTOR,
    #[cfg(feature = "rabbitmq")]
    rabbitmq::CONNECTOR,
    #[cfg(feature = "mqtt")]
    mqtt::CONNECTOR,
    #[cfg(feature = "jdbc")]
    jdbc::CONNECTOR,
    #[cfg(feature = "jdbc")]
    jdbc::POSTGRES_CDC,
    #[cfg(feature = "jdbc")]
    jdbc::MYSQL_CDC,
];

/// Opens worker `worker`'s (of `workers`) share of a source.
pub fn open_source(
    spec: &ConnectorSpec,
    worker: usize,
    workers: usize,
) -> Result<Box<dyn SourceReader>> {
    let mut opts = Options::new(spec, false)?;
    let reader: Box<dyn SourceReader> = match opts.connector() {
        "filesystem" => Box::new(filesystem::FileSource::open(
            spec, &mut opts, worker, workers,
        )?),
        #[cfg(feature = "kafka")]
        "kafka" | "upsert-kafka" => {
            Box::new(kafka::KafkaSource::open(spec, &mut opts, worker, workers)?)
        }
        #[cfg(feature = "nats")]
        "nats" => Box::new(nats::NatsSource::open(spec, &mut opts, worker, workers)?),
        #[cfg(feature = "redis")]
        "redis" => Box::new(redis_stream::RedisStreamSource::open(
            spec, &mut opts, worker, workers,
        )?),
        #[cfg(feature = "rabbitmq")]
        "rabbitmq" => Box::new(rabbitmq::RabbitSource::open(
            spec, &mut opts, worker, workers,
        )?),
        #[cfg(feature = "mqtt")]
        "mqtt" => Box::new(mqtt::MqttSource::open(spec, &mut opts, worker, workers)?),
        #[cfg(feature = "jdbc")]
        "jdbc" => Box::new(jdbc::JdbcScan::open(spec, &mut opts, worker, workers)?),
        #[cfg(feature = "jdbc")]
        "postgres-cdc" => jdbc::open_postgres_cdc(spec, &mut opts, worker, workers)?,
        #[cfg(feature = "jdbc")]
        "mysql-cdc" => jdbc::open_mysql_cdc(spec, &mut opts, worker, workers)?,
        "datagen" => Box::new(datagen::DatagenSource::open(
            spec, &mut opts, worker, workers,
        )?),
        "ecommerce" => Box::new(ecommerce::EcommerceSource::open(
            spec, &mut opts, worker, workers,
        )?),
        "nexmark" => Box::new(nexmark::NexmarkSource::open(
            spec, &mut opts, worker, workers,
        )?),
        other => unreachable!("connector '{other}' is declared as a source but not opened"),
    };
    opts.finish()?;
    Ok(reader)
}

/// Opens worker `worker`'s (of `workers`) writer for a sink.
pub fn open_sink(
    spec: &ConnectorSpec,
    worker: usize,
    workers: usize,
) -> Result<Box<dyn SinkWriter>> {
    let mut opts = Options::new(spec, true)?;
    let writer: Box<dyn SinkWriter> = match opts.connector() {
        "filesystem" => filesystem::FileSink::open(spec, &mut opts, worker, workers)?,
        #[cfg(feature = "kafka")]
        "kafka" | "upsert-kafka" => Box::new(kafka::KafkaSink::open(spec, &mut opts, worker)?),
        "print" => Box::new(print::PrintSink::open(spec, &mut opts, worker)?),
        #[cfg(feature = "nats")]
        "nats" => Box::new(nats::NatsSink::open(spec, &mut opts, worker)?),
        #[cfg(feature = "redis")]
        "redis" => Box::new(redis_sink::RedisSink::open(spec, &mut opts)?),
        #[cfg(feature = "rabbitmq")]
        "rabbitmq" => Box::new(rabbitmq::RabbitSink::open(spec, &mut opts)?),
        #[cfg(feature = "mqtt")]
        "mqtt" => Box::new(mqtt::MqttSink::open(spec, &mut opts, worker)?),
        #[cfg(feature = "jdbc")]
        "jdbc" => Box::new(jdbc::JdbcSink::open(spec, &mut opts)?),
        "blackhole" => Box::new(print::Blackhole),
        "memory" => Box::new(memory::MemorySink::open(spec, &mut opts)?),
        "view" => Box::new(view::ViewSink::open(spec, &mut opts, worker)?),
        other => unreachable!("connector '{other}' is declared as a sink but not opened"),
    };
    opts.finish()?;
    Ok(writer)
}

/// Whether a sink accepts updating (retracting) input, or only inserts.
pub fn sink_accepts_updates(spec: &ConnectorSpec) -> bool {
    match spec.options.get("connector").map(String::as_str) {
        Some("filesystem" | "kafka" | "nats" | "rabbitmq" | "mqtt") => {
            let format = spec
                .options
                .get("format")
                .or_else(|| spec.options.get("value.format"));
            format.is_some_and(|f| ["debezium-json", "canal-json"].contains(&f.as_str()))
        }
        Some("print" | "blackhole" | "memory" | "view" | "upsert-kafka") => true,
        // Upserts by the table's PRIMARY KEY.
        Some("jdbc") => !spec.primary_key.is_empty(),
        Some("redis") => !matches!(
            spec.options.get("command").map(String::as_str),
            Some("xadd" | "publish")
        ),
        _ => false,
    }
}

/// Checks a source's options without opening it for reading (for planning).
pub fn validate_source(spec: &ConnectorSpec) -> Result<()> {
    open_source(spec, 0, 1).map(|_| ())
}
