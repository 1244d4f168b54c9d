//! The `jdbc` sink: results into PostgreSQL (`tokio-postgres`) and MySQL/MariaDB
//! (`mysql_async`), with the option names of Flink's JDBC connector. There is no JDBC here:
//! the `url`'s scheme (`jdbc:postgresql://`, `jdbc:mysql://`, `jdbc:mariadb://`) picks the
//! client.
//!
//! - An append-only result is inserted. An updating one needs the table's `PRIMARY KEY` in the
//!   DDL (and a primary key or unique constraint on those columns in the database): each key's
//!   last change in a flush is upserted, or deleted.
//! - With checkpoints, a worker's rows of one checkpoint are staged beside the checkpoint when it
//!   is sealed, and written once it commits, in one database transaction that also records
//!   `(job, sink, worker, epoch)` in a progress table. A rerun after a crash writes the staged
//!   checkpoints the progress table does not show: every change lands exactly once. Prepared
//!   (XA) transactions are not needed.
//! - Without checkpoints, rows are flushed by a thread of the writer every
//!   `sink.buffer-flush.max-rows` rows or `sink.buffer-flush.interval` (at-least-once).
//! - A lost connection is retried `sink.max-retries` times with backoff, then fails the job.

mod cdc;
mod mysql;
mod mysql_cdc;
mod pg_cdc;
mod postgres;

pub use mysql_cdc::{open as open_mysql_cdc, CONNECTOR as MYSQL_CDC};
pub use pg_cdc::{open as open_postgres_cdc, CONNECTOR as POSTGRES_CDC};

use std::collections::HashMap;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::UInt32Array;
use arrow::datatypes::{DataType, SchemaRef};
use arrow::record_batch::RecordBatch;
use sluice_common::{ChangeBatch, Error, Op, Result};

use crate::options::{ConnectorDef, Kind, OptionDef, Options, Side};
use crate::staged::{IpcBatch, Staged};
use crate::{ConnectorSpec, SinkWriter};

/// The `jdbc` connector's options.
pub const CONNECTOR: ConnectorDef = ConnectorDef {
    name: "jdbc",
    reads: true,
    writes: true,
    metadata: &[],
    writable_metadata: &[],
    formats: false,
    lookup: true,
    options: &[
        OptionDef {
            key: "url",
            kind: Kind::Text,
            default: None,
            side: Side::Both,
            identity: true,
            doc: "the database: `jdbc:postgresql://host:port/db` or `jdbc:mysql://host:port/db` (also `jdbc:mariadb://`)",
        },
        OptionDef {
            key: "table-name",
            kind: Kind::Text,
            default: None,
            side: Side::Both,
            identity: true,
            doc: "the table in the database (`schema.table` in PostgreSQL); it must exist, with the sink's columns",
        },
        OptionDef {
            key: "username",
            kind: Kind::Text,
            default: None,
            side: Side::Both,
            identity: false,
            doc: "the database user (default: `user` in the url, else PostgreSQL's `postgres`, MySQL's `root`)",
        },
        OptionDef {
            key: "password",
            kind: Kind::Text,
            default: None,
            side: Side::Both,
            identity: false,
            doc: "the user's password (kept out of logs)",
        },
        OptionDef {
            key: "driver",
            kind: Kind::Text,
            default: None,
            side: Side::Both,
            identity: false,
            doc: "accepted for Flink DDL and not used: the url's scheme picks the client",
        },
        OptionDef {
            key: "sink.buffer-flush.max-rows",
            kind: Kind::Count,
            default: Some("100"),
            side: Side::Sink,
            identity: false,
            doc: "without checkpoints: a flush once this many rows are buffered (0: by interval only)",
        },
        OptionDef {
            key: "sink.buffer-flush.interval",
            kind: Kind::Duration,
            default: Some("1 s"),
            side: Side::Sink,
            identity: false,
            doc: "without checkpoints: buffered rows are flushed at least this often (0: by rows only)",
        },
        OptionDef {
            key: "sink.max-retries",
            kind: Kind::Count,
            default: Some("3"),
            side: Side::Sink,
            identity: false,
            doc: "how many times a write that lost its connection (or a deadlock) is retried, with backoff, before the job fails",
        },
        connect_timeout(Side::Both),
        OptionDef {
            key: "sluice.progress-table",
            kind: Kind::Text,
            default: Some("sluice_sink_progress"),
            side: Side::Sink,
            identity: false,
            doc: "with checkpoints: the table (created if missing) where each transaction records `(job, sink, worker, epoch)`",
        },
        OptionDef {
            key: "sluice.job-id",
            kind: Kind::Text,
            default: None,
            side: Side::Sink,
            identity: false,
            doc: "with checkpoints: the job's name in the progress table (default: its checkpoint directory, which no two jobs share)",
        },
    ],
};

/// `sluice.connect-timeout`, of every database connector.
pub(crate) const fn connect_timeout(side: Side) -> OptionDef {
    OptionDef {
        key: "sluice.connect-timeout",
        kind: Kind::Duration,
        default: Some("10 s"),
        side,
        identity: false,
        doc: "how long connecting may take before the job fails",
    }
}

/// The `sluice.connect-timeout` option's value.
pub(crate) fn connect_timeout_of(opts: &mut Options) -> Result<Duration> {
    Ok(Duration::from_millis(
        opts.duration_ms("sluice.connect-timeout")?
            .expect("declared default")
            .max(1) as u64,
    ))
}

/// Which database a `url` names, and where.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Target {
    pub mysql: bool,
    pub host: String,
    pub port: u16,
    pub database: String,
    pub user: Option<String>,
    pub password: Option<String>,
}

impl Target {
    /// `host:port/db`, for messages.
    pub fn describe(&self) -> String {
        let system = if self.mysql { "MySQL" } else { "PostgreSQL" };
        format!(
            "{system} at {}:{}, database '{}'",
            self.host, self.port, self.database
        )
    }
}

/// Parses `jdbc:postgresql://host[:port]/db[?user=..&password=..]` and the MySQL forms.
pub(crate) fn parse_url(url: &str) -> std::result::Result<Target, String> {
    let rest = url.strip_prefix("jdbc:").unwrap_or(url);
    let (mysql, rest) = if let Some(r) = rest.strip_prefix("postgresql://") {
        (false, r)
    } else if let Some(r) = rest
        .strip_prefix("mysql://")
        .or_else(|| rest.strip_prefix("mariadb://"))
    {
        (true, r)
    } else {
        return Err(
            "is not a PostgreSQL or MySQL url (use jdbc:postgresql://host:port/db or jdbc:mysql://host:port/db)"
                .into(),
        );
    };
    let (address, rest) = rest
        .split_once('/')
        .ok_or("names no database (…://host:port/db)")?;
    let (database, query) = rest.split_once('?').unwrap_or((rest, ""));
    if database.is_empty() {
        return Err("names no database (…://host:port/db)".into());
    }
    let (host, port) = match address.rsplit_once(':') {
        Some((h, p)) => (
            h,
            p.parse::<u16>()
                .map_err(|_| format!("has port '{p}', which is not a port number"))?,
        ),
        None => (address, if mysql { 3306 } else { 5432 }),
    };
    if host.is_empty() {
        return Err("names no host".into());
    }
    let mut target = Target {
        mysql,
        host: host.to_string(),
        port,
        database: database.to_string(),
        user: None,
        password: None,
    };
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("user", v)) => target.user = Some(v.to_string()),
            Some(("password", v)) => target.password = Some(v.to_string()),
            _ => {}
        }
    }
    Ok(target)
}

/// The sink's columns, key and names, as each database's writer needs them.
pub(crate) struct Layout {
    pub table: String,
    /// The table in the database (`table-name`).
    pub target_table: String,
    pub schema: SchemaRef,
    /// PRIMARY KEY columns (positions in `schema`); empty: inserts only.
    pub key: Vec<usize>,
    pub connect_timeout: Duration,
    /// `sink.max-retries`: connecting is retried as often as writing.
    pub retries: u64,
    /// Whether it writes (and so needs its staging tables), or only reads.
    pub sink: bool,
}

/// How long to wait before retry `attempt` (1, 2, ...).
pub(crate) fn backoff(attempt: u64) -> Duration {
    Duration::from_millis((200u64 << attempt.min(5)).min(5_000))
}

/// Runs `open` until it connects, retrying a database that cannot be reached `retries` times.
pub(crate) fn open_with_retries(
    table: &str,
    retries: u64,
    mut open: impl FnMut() -> Attempt<()>,
) -> Result<()> {
    let mut attempt = 0;
    loop {
        match open() {
            Ok(()) => return Ok(()),
            Err(Failure::Fatal(e)) => return Err(e),
            Err(Failure::Retry(why)) if attempt >= retries => {
                return Err(Error::connector(table, why))
            }
            Err(Failure::Retry(why)) => {
                attempt += 1;
                tracing::warn!(table, attempt, "jdbc sink: {why}; retrying");
                std::thread::sleep(backoff(attempt));
            }
        }
    }
}

/// Why a database call failed: a lost connection (or a deadlock) is worth retrying.
pub(crate) enum Failure {
    Retry(String),
    Fatal(Error),
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        Failure::Fatal(e)
    }
}

pub(crate) type Attempt<T> = std::result::Result<T, Failure>;

/// One database's writer for a sink.
pub(crate) trait Database: Send {
    fn describe(&self) -> String;
    /// Connects again after a lost connection.
    fn reconnect(&mut self) -> Attempt<()>;
    /// Creates the progress table if it is missing.
    fn ensure_progress(&mut self) -> Attempt<()>;
    /// Writes folded rows (inserts, and with a key deletes) in one transaction; with `mark`,
    /// records `(worker, epoch)` in the progress table in the same transaction.
    fn write(&mut self, rows: &[ChangeBatch], mark: Option<(usize, u64)>) -> Attempt<()>;
    /// The newest epoch recorded for `worker`.
    fn recorded(&mut self, worker: usize) -> Attempt<Option<u64>>;
    /// The job's name in the progress table.
    fn set_job(&mut self, job: &str);
    /// Rows of the table in the table's columns: those whose `key_columns` equal a row of
    /// `keys` (one query), or with no keys all of them, ordered by the key columns (all
    /// columns without a key).
    fn select(&mut self, keys: Option<&RecordBatch>, key_columns: &[usize])
        -> Attempt<RecordBatch>;
}

/// Runs `f` on `db`, reconnecting and retrying with backoff while it fails to reach the
/// database, at most `retries` times.
fn retrying<T>(
    db: &mut dyn Database,
    table: &str,
    retries: u64,
    mut f: impl FnMut(&mut dyn Database, u64) -> Attempt<T>,
) -> Result<T> {
    let mut attempt = 0;
    // Whether the last reconnect failed: then `f` is not called (there is no connection), and
    // the next attempt connects again.
    let mut down: Option<String> = None;
    loop {
        let failure = match down.take() {
            Some(why) => why,
            None => match f(db, attempt) {
                Ok(v) => return Ok(v),
                Err(Failure::Fatal(e)) => return Err(e),
                Err(Failure::Retry(why)) => why,
            },
        };
        if attempt >= retries {
            return Err(Error::connector(
                table,
                format!(
                    "{} failed after {retries} retries (options 'sink.max-retries', 'lookup.max-retries'): {failure}",
                    db.describe()
                ),
            ));
        }
        attempt += 1;
        tracing::warn!(table, attempt, "jdbc: {failure}; retrying");
        std::thread::sleep(backoff(attempt));
        // A failed reconnect counts as a failed attempt.
        match db.reconnect() {
            Ok(()) => {}
            Err(Failure::Fatal(e)) => return Err(e),
            Err(Failure::Retry(why)) => down = Some(why),
        }
    }
}

/// Writes `rows` once: with `mark`, a retry after a lost connection first asks the progress
/// table whether the transaction committed before the connection went.
fn write_once(
    db: &mut dyn Database,
    table: &str,
    retries: u64,
    rows: &[ChangeBatch],
    mark: Option<(usize, u64)>,
) -> Result<()> {
    retrying(db, table, retries, |db, attempt| {
        if let (Some((worker, epoch)), true) = (mark, attempt > 0) {
            if db.recorded(worker)?.is_some_and(|e| e >= epoch) {
                return Ok(());
            }
        }
        db.write(rows, mark)
    })
}

/// Each key's last change in `batch`: an upsert (as an insert) or a delete, in the order of
/// those last changes. Without a key, the batch as it is.
pub(crate) fn fold(batch: &ChangeBatch, key: &[usize]) -> Result<ChangeBatch> {
    if key.is_empty() || batch.num_rows() == 0 {
        return Ok(batch.clone());
    }
    let fields = key
        .iter()
        .map(|i| arrow::row::SortField::new(batch.data.schema().field(*i).data_type().clone()))
        .collect();
    let converter = arrow::row::RowConverter::new(fields)?;
    let columns: Vec<_> = key.iter().map(|i| batch.data.column(*i).clone()).collect();
    let rows = converter.convert_columns(&columns)?;
    let mut last: HashMap<arrow::row::Row<'_>, u32> = HashMap::with_capacity(batch.num_rows());
    for i in 0..batch.num_rows() {
        last.insert(rows.row(i), i as u32);
    }
    let mut keep: Vec<u32> = last.into_values().collect();
    keep.sort_unstable();
    let ops = keep
        .iter()
        .map(|i| match batch.op(*i as usize) {
            Op::Insert | Op::UpdateAfter => Op::Insert,
            Op::Delete | Op::UpdateBefore => Op::Delete,
        })
        .collect();
    let data = arrow::compute::take_record_batch(&batch.data, &UInt32Array::from(keep))?;
    Ok(ChangeBatch::with_ops(data, ops))
}

/// Folds several batches into one.
fn fold_all(schema: &SchemaRef, batches: &[ChangeBatch], key: &[usize]) -> Result<ChangeBatch> {
    let all = ChangeBatch::concat(schema, batches)?;
    fold(&all, key)
}

/// The rows of a flush, without empty batches.
fn nonempty(batches: Vec<ChangeBatch>) -> Vec<ChangeBatch> {
    batches.into_iter().filter(|b| b.num_rows() > 0).collect()
}

/// A background writer for sinks without checkpoints: flushes by rows and by interval.
struct Flusher {
    sender: Option<mpsc::SyncSender<Flush>>,
    thread: Option<std::thread::JoinHandle<Result<()>>>,
}

enum Flush {
    Rows(ChangeBatch),
    /// Flush now, and say so.
    Now(mpsc::Sender<()>),
}

impl Flusher {
    fn start(
        mut db: Box<dyn Database>,
        table: String,
        schema: SchemaRef,
        key: Vec<usize>,
        max_rows: u64,
        interval: Option<Duration>,
        retries: u64,
    ) -> Flusher {
        // A few batches in flight: the job waits on a slow database instead of buffering
        // without bound.
        let (sender, receiver) = mpsc::sync_channel::<Flush>(4);
        let thread = std::thread::Builder::new()
            .name(format!("jdbc-{table}"))
            .spawn(move || -> Result<()> {
                let mut buffered: Vec<ChangeBatch> = vec![];
                let mut rows = 0u64;
                let mut since = Instant::now();
                loop {
                    let wait = interval
                        .map(|i| i.saturating_sub(since.elapsed()))
                        .unwrap_or(Duration::from_secs(3600));
                    let (flush, ack) = match receiver.recv_timeout(wait) {
                        Ok(Flush::Rows(b)) => {
                            rows += b.num_rows() as u64;
                            buffered.push(b);
                            (max_rows > 0 && rows >= max_rows, None)
                        }
                        Ok(Flush::Now(ack)) => (true, Some(ack)),
                        Err(mpsc::RecvTimeoutError::Timeout) => (true, None),
                        Err(mpsc::RecvTimeoutError::Disconnected) => return Ok(()),
                    };
                    if flush {
                        if !buffered.is_empty() {
                            let folded = fold_all(&schema, &std::mem::take(&mut buffered), &key)?;
                            write_once(
                                db.as_mut(),
                                &table,
                                retries,
                                &nonempty(vec![folded]),
                                None,
                            )?;
                        }
                        rows = 0;
                        since = Instant::now();
                    }
                    if let Some(ack) = ack {
                        let _ = ack.send(());
                    }
                }
            })
            .expect("spawn the jdbc flusher");
        Flusher {
            sender: Some(sender),
            thread: Some(thread),
        }
    }

    /// The flusher's error, once it has stopped.
    fn failure(&mut self, table: &str) -> Error {
        self.sender = None;
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(Err(e))) => e,
            Some(Err(_)) => Error::connector(table, "the jdbc flusher thread panicked"),
            _ => Error::connector(table, "the jdbc flusher stopped"),
        }
    }

    fn send(&mut self, table: &str, message: Flush) -> Result<()> {
        let sent = self
            .sender
            .as_ref()
            .is_some_and(|s| s.send(message).is_ok());
        match sent {
            true => Ok(()),
            false => Err(self.failure(table)),
        }
    }

    /// Flushes what is buffered, and waits until it is written.
    fn flush(&mut self, table: &str) -> Result<()> {
        let (ack, done) = mpsc::channel();
        self.send(table, Flush::Now(ack))?;
        done.recv().map_err(|_| self.failure(table))
    }

    /// Flushes, then stops the thread.
    fn close(&mut self, table: &str) -> Result<()> {
        self.flush(table)?;
        self.sender = None;
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err(Error::connector(table, "the jdbc flusher thread panicked")),
            None => Ok(()),
        }
    }
}

/// Connects to the table of `spec` and checks its columns: for a sink (with `progress`, the
/// progress table's name) upserting by `key`, or for reading.
fn connect(
    spec: &ConnectorSpec,
    opts: &mut Options,
    key: Vec<usize>,
    retries: u64,
    progress: Option<String>,
    sink: String,
) -> Result<Box<dyn Database>> {
    let url = opts.required("url")?;
    let mut target =
        parse_url(&url).map_err(|why| opts.error(format!("option 'url' = '{url}' {why}")))?;
    if let Some(user) = opts.get("username")? {
        target.user = Some(user);
    }
    if let Some(password) = opts.get("password")? {
        target.password = Some(password);
    }
    let _ = opts.get("driver")?;
    let target_table = opts.required("table-name")?;
    let connect_timeout = connect_timeout_of(opts)?;
    let layout = Layout {
        table: spec.table.clone(),
        target_table,
        schema: spec.schema.clone(),
        key,
        connect_timeout,
        retries,
        sink: progress.is_some(),
    };
    let progress = progress.unwrap_or_default();
    Ok(if target.mysql {
        Box::new(mysql::MySql::connect(target, layout, progress, sink)?)
    } else {
        Box::new(postgres::Postgres::connect(target, layout, progress, sink)?)
    })
}

/// Opens a table for lookups by `key_columns` (positions in `spec.schema`).
pub(crate) fn open_lookup(
    spec: &ConnectorSpec,
    opts: &mut Options,
    key_columns: &[usize],
) -> Result<Box<dyn crate::lookup::LookupTable>> {
    let retries = opts.value::<u64>("lookup.max-retries")?;
    let db = connect(spec, opts, vec![], retries, None, String::new())?;
    Ok(Box::new(JdbcLookup {
        table: spec.table.clone(),
        db,
        retries,
        key_columns: key_columns.to_vec(),
    }))
}

struct JdbcLookup {
    table: String,
    db: Box<dyn Database>,
    retries: u64,
    key_columns: Vec<usize>,
}

impl crate::lookup::LookupTable for JdbcLookup {
    fn lookup(&mut self, keys: &RecordBatch) -> Result<RecordBatch> {
        let columns = self.key_columns.clone();
        retrying(self.db.as_mut(), &self.table, self.retries, |db, _| {
            db.select(Some(keys), &columns)
        })
    }
}

/// A table read whole, once (a bounded source): worker 0 reads it, ordered by its PRIMARY KEY
/// (or every column), and a restore skips the rows already read.
pub struct JdbcScan {
    table: String,
    db: Option<Box<dyn Database>>,
    key: Vec<usize>,
    retries: u64,
    rows: Option<RecordBatch>,
    /// Rows returned so far.
    at: u64,
    /// Worker 0 reads the table: the others have nothing to read.
    silent: Vec<usize>,
}

impl JdbcScan {
    pub fn open(
        spec: &ConnectorSpec,
        opts: &mut Options,
        worker: usize,
        workers: usize,
    ) -> Result<Self> {
        let retries = opts.value::<u64>("lookup.max-retries")?;
        // Every worker checks the table; worker 0 reads it.
        let db = connect(spec, opts, vec![], retries, None, String::new())?;
        // The lookup options are read (and checked) on a scanned table too.
        crate::lookup::CacheOptions::read(opts)?;
        Ok(JdbcScan {
            table: spec.table.clone(),
            db: (worker == 0).then_some(db),
            key: spec.primary_key.clone(),
            retries,
            rows: None,
            at: 0,
            silent: match worker {
                0 => (1..workers).collect(),
                _ => vec![],
            },
        })
    }
}

impl crate::SourceReader for JdbcScan {
    fn poll(&mut self, max_rows: usize) -> Result<crate::Poll> {
        let Some(db) = self.db.as_mut() else {
            return Ok(crate::Poll::Finished);
        };
        if self.rows.is_none() {
            let key = self.key.clone();
            let all = retrying(db.as_mut(), &self.table, self.retries, |db, _| {
                db.select(None, &key)
            })?;
            self.rows = Some(all);
        }
        let rows = self.rows.as_ref().expect("read above");
        let at = self.at as usize;
        if at >= rows.num_rows() {
            return Ok(crate::Poll::Finished);
        }
        let n = max_rows.max(1).min(rows.num_rows() - at);
        self.at += n as u64;
        Ok(crate::Poll::Batch {
            split: 0,
            batch: rows.slice(at, n),
        })
    }

    fn offsets(&self) -> crate::SourceOffsets {
        [("rows".to_string(), self.at)].into_iter().collect()
    }

    fn seek(&mut self, offsets: &crate::SourceOffsets) -> Result<()> {
        self.at = offsets.get("rows").copied().unwrap_or(0);
        Ok(())
    }

    fn silent_workers(&self) -> Vec<usize> {
        self.silent.clone()
    }
}

/// A worker's writer into a database table.
pub struct JdbcSink {
    table: String,
    schema: SchemaRef,
    key: Vec<usize>,
    /// `None` once handed to the flusher.
    db: Option<Box<dyn Database>>,
    max_rows: u64,
    interval: Option<Duration>,
    retries: u64,
    job: Option<String>,
    /// With checkpoints: rows since the last seal, folded when they grow.
    pending: Vec<ChangeBatch>,
    pending_rows: usize,
    transactional: bool,
    worker: usize,
    staged: Staged<IpcBatch>,
    flusher: Option<Flusher>,
}

/// Rows buffered for a checkpoint before they are folded (upserts only).
const FOLD_AT: usize = 1 << 17;

impl JdbcSink {
    pub fn open(spec: &ConnectorSpec, opts: &mut Options) -> Result<Self> {
        let max_rows = opts.value::<u64>("sink.buffer-flush.max-rows")?;
        let interval = opts
            .duration_ms("sink.buffer-flush.interval")?
            .filter(|ms| *ms > 0)
            .map(|ms| Duration::from_millis(ms as u64));
        let retries = opts.value::<u64>("sink.max-retries")?;
        let progress = opts.value::<String>("sluice.progress-table")?;
        let job = opts.get("sluice.job-id")?;
        let sink = format!("{}#{}", spec.table, spec.sink_instance);
        let db = connect(
            spec,
            opts,
            spec.primary_key.clone(),
            retries,
            Some(progress),
            sink,
        )?;
        Ok(JdbcSink {
            table: spec.table.clone(),
            schema: spec.schema.clone(),
            key: spec.primary_key.clone(),
            db: Some(db),
            max_rows,
            interval,
            retries,
            job,
            pending: vec![],
            pending_rows: 0,
            transactional: false,
            worker: 0,
            staged: Staged::new("jdbc", &spec.table, spec.sink_instance),
            flusher: None,
        })
    }

    fn db(&mut self) -> &mut dyn Database {
        self.db
            .as_deref_mut()
            .expect("the database is not with the flusher")
    }

    /// The pending rows, folded into one batch.
    fn take_pending(&mut self) -> Result<Vec<ChangeBatch>> {
        let batches = std::mem::take(&mut self.pending);
        self.pending_rows = 0;
        if batches.is_empty() {
            return Ok(vec![]);
        }
        Ok(nonempty(vec![fold_all(&self.schema, &batches, &self.key)?]))
    }

    fn staged_rows(items: &[IpcBatch]) -> Vec<ChangeBatch> {
        items.iter().map(|b| b.0.clone()).collect()
    }
}

impl SinkWriter for JdbcSink {
    fn set_staging(&mut self, staging: Arc<dyn crate::Staging>) {
        if self.job.is_none() {
            self.job = Some(staging.job_id());
        }
        self.staged.set_staging(staging);
    }

    fn write(&mut self, batch: &ChangeBatch) -> Result<()> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        if self.transactional {
            self.pending_rows += batch.num_rows();
            self.pending.push(batch.clone());
            if !self.key.is_empty() && self.pending_rows >= FOLD_AT {
                let folded = self.take_pending()?;
                self.pending_rows = folded.iter().map(|b| b.num_rows()).sum();
                self.pending = folded;
            }
            return Ok(());
        }
        if self.flusher.is_none() {
            let db = self.db.take().expect("the database");
            self.flusher = Some(Flusher::start(
                db,
                self.table.clone(),
                self.schema.clone(),
                self.key.clone(),
                self.max_rows,
                self.interval,
                self.retries,
            ));
        }
        let table = self.table.clone();
        self.flusher
            .as_mut()
            .expect("started above")
            .send(&table, Flush::Rows(batch.clone()))
    }

    fn begin_transactions(
        &mut self,
        committed: Option<u64>,
        worker: usize,
        workers: usize,
    ) -> Result<()> {
        self.transactional = true;
        self.worker = worker;
        let (table, retries) = (self.table.clone(), self.retries);
        let job = self.job.clone().unwrap_or_else(|| "sluice".into());
        self.db().set_job(&job);
        retrying(self.db(), &table, retries, |db, _| db.ensure_progress())?;
        tracing::debug!(
            table,
            job,
            worker,
            "jdbc sink: exactly-once through the progress table"
        );
        // Checkpoints that committed but whose transaction the progress table does not show
        // (a crash between the two) are written now.
        let mut staged = std::mem::replace(&mut self.staged, Staged::new("jdbc", "", 0));
        let settled = staged.settle(committed, worker, workers, |old, epoch, items| {
            let db = self.db.as_deref_mut().expect("the database");
            let done = retrying(db, &table, retries, |db, _| db.recorded(old))?;
            if done.is_none_or(|d| d < epoch) {
                let rows = Self::staged_rows(&items);
                write_once(db, &table, retries, &rows, Some((old, epoch)))?;
            }
            Ok(())
        });
        self.staged = staged;
        settled
    }

    fn pre_commit(&mut self, epoch: u64) -> Result<()> {
        if !self.transactional {
            return Ok(());
        }
        let rows = self.take_pending()?;
        self.staged.push(rows.into_iter().map(IpcBatch));
        self.staged.seal(epoch)
    }

    fn commit(&mut self, epoch: u64) -> Result<()> {
        if !self.transactional {
            return Ok(());
        }
        let (table, retries) = (self.table.clone(), self.retries);
        let mut staged = std::mem::replace(&mut self.staged, Staged::new("jdbc", "", 0));
        let db = self.db.as_deref_mut().expect("the database");
        let done = staged.commit(epoch, |worker, e, items| {
            let rows = Self::staged_rows(items);
            write_once(db, &table, retries, &rows, Some((worker, e)))
        });
        self.staged = staged;
        done
    }

    fn finish(&mut self) -> Result<()> {
        let table = self.table.clone();
        if let Some(f) = self.flusher.as_mut() {
            return f.close(&table);
        }
        // Transactional without a checkpoint taken: as at-least-once.
        let rows = self.take_pending()?;
        if rows.is_empty() {
            return Ok(());
        }
        let retries = self.retries;
        write_once(self.db(), &table, retries, &rows, None)
    }

    fn abort(&mut self) -> Result<()> {
        // Buffered rows are dropped: with checkpoints they come again from the sources.
        if let Some(mut f) = self.flusher.take() {
            f.sender = None;
        }
        Ok(())
    }
}

/// What a flush writes, split into upserts (inserts) and deletes.
pub(crate) fn split_ops(
    batch: &ChangeBatch,
) -> Result<(
    arrow::record_batch::RecordBatch,
    arrow::record_batch::RecordBatch,
)> {
    let mask: arrow::array::BooleanArray = (0..batch.num_rows())
        .map(|i| Some(matches!(batch.op(i), Op::Insert | Op::UpdateAfter)))
        .collect();
    let inserts = arrow::compute::filter_record_batch(&batch.data, &mask)?;
    let not = arrow::compute::not(&mask)?;
    let deletes = arrow::compute::filter_record_batch(&batch.data, &not)?;
    Ok((inserts, deletes))
}

/// The kinds of values, for matching a sink column's type with the database column's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Family {
    Null,
    Bool,
    Int,
    Float,
    Decimal,
    Text,
    Binary,
    Date,
    Timestamp,
    TimestampTz,
    Other,
}

pub(crate) fn family(t: &DataType) -> Family {
    use DataType as D;
    match t {
        D::Null => Family::Null,
        D::Boolean => Family::Bool,
        D::Int8 | D::Int16 | D::Int32 | D::Int64 | D::UInt8 | D::UInt16 | D::UInt32 | D::UInt64 => {
            Family::Int
        }
        D::Float16 | D::Float32 | D::Float64 => Family::Float,
        D::Decimal32(..) | D::Decimal64(..) | D::Decimal128(..) | D::Decimal256(..) => {
            Family::Decimal
        }
        D::Utf8 | D::LargeUtf8 | D::Utf8View => Family::Text,
        D::Binary | D::LargeBinary | D::BinaryView | D::FixedSizeBinary(_) => Family::Binary,
        D::Date32 | D::Date64 => Family::Date,
        D::Timestamp(_, None) => Family::Timestamp,
        D::Timestamp(_, Some(_)) => Family::TimestampTz,
        _ => Family::Other,
    }
}

/// The SQL name of a Sluice column type, for messages.
pub(crate) fn sql_type(t: &DataType) -> String {
    use DataType as D;
    match t {
        D::Null => "NULL".into(),
        D::Boolean => "BOOLEAN".into(),
        D::Int8 => "TINYINT".into(),
        D::Int16 => "SMALLINT".into(),
        D::Int32 => "INT".into(),
        D::Int64 => "BIGINT".into(),
        D::Float32 => "FLOAT".into(),
        D::Float64 => "DOUBLE".into(),
        D::Decimal128(p, s) => format!("DECIMAL({p}, {s})"),
        D::Utf8 | D::LargeUtf8 | D::Utf8View => "STRING".into(),
        D::Binary | D::LargeBinary | D::BinaryView => "BYTES".into(),
        D::Date32 | D::Date64 => "DATE".into(),
        D::Timestamp(u, None) => format!("TIMESTAMP({})", unit_digits(u)),
        D::Timestamp(u, Some(_)) => format!("TIMESTAMP_LTZ({})", unit_digits(u)),
        other => other.to_string(),
    }
}

fn unit_digits(u: &arrow::datatypes::TimeUnit) -> u8 {
    use arrow::datatypes::TimeUnit as U;
    match u {
        U::Second => 0,
        U::Millisecond => 3,
        U::Microsecond => 6,
        U::Nanosecond => 9,
    }
}

/// Casts a column to the type the database's encoder takes, failing on values that do not fit
/// (naming the column).
pub(crate) fn cast_column(
    table: &str,
    name: &str,
    column: &arrow::array::ArrayRef,
    to: &DataType,
) -> Result<arrow::array::ArrayRef> {
    if column.data_type() == to {
        return Ok(column.clone());
    }
    let options = arrow::compute::CastOptions {
        safe: false,
        ..Default::default()
    };
    arrow::compute::cast_with_options(column, to, &options).map_err(|e| {
        Error::connector(
            table,
            format!("column '{name}': a value does not fit the database column: {e}"),
        )
    })
}

/// Rows read from the database as a batch of the table's columns: `decode(i)` gives column
/// `i` as the Arrow type nearest the database's, which is then cast to the table's type.
pub(crate) fn read_rows(
    layout: &Layout,
    relation: &str,
    rows: usize,
    mut decode: impl FnMut(usize) -> std::result::Result<arrow::array::ArrayRef, String>,
) -> Attempt<RecordBatch> {
    let columns = (0..layout.schema.fields().len())
        .map(|i| {
            let field = layout.schema.field(i);
            let natural = decode(i).map_err(|e| {
                Error::connector(
                    &layout.table,
                    format!("column '{}' of table {relation}: {e}", field.name()),
                )
            })?;
            read_column(&layout.table, field.name(), &natural, field.data_type())
        })
        .collect::<Result<Vec<_>>>()
        .map_err(Failure::Fatal)?;
    RecordBatch::try_new_with_options(
        layout.schema.clone(),
        columns,
        &arrow::record_batch::RecordBatchOptions::new().with_row_count(Some(rows)),
    )
    .map_err(|e| Failure::Fatal(e.into()))
}

/// Casts a column read from the database to the table's column type. Decimal text (PostgreSQL
/// NUMERIC, MySQL DECIMAL) goes through a decimal first, so that `123.0000` reads into a BIGINT.
pub(crate) fn read_column(
    table: &str,
    name: &str,
    column: &arrow::array::ArrayRef,
    to: &DataType,
) -> Result<arrow::array::ArrayRef> {
    let numeric = matches!(family(to), Family::Int | Family::Float);
    if column.data_type() == &DataType::Utf8 && numeric {
        let decimal = cast_column(table, name, column, &DataType::Decimal128(38, 10))?;
        return cast_column(table, name, &decimal, to);
    }
    cast_column(table, name, column, to)
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Int64Array, StringArray};
    use arrow::datatypes::{Field, Schema};
    use arrow::record_batch::RecordBatch;

    /// A database that loses its connection, and cannot be reached for `down` reconnects.
    struct Flaky {
        connected: bool,
        down: u32,
        writes: u32,
    }

    impl Database for Flaky {
        fn describe(&self) -> String {
            "flaky".into()
        }
        fn reconnect(&mut self) -> Attempt<()> {
            if self.down > 0 {
                self.down -= 1;
                return Err(Failure::Retry("refused".into()));
            }
            self.connected = true;
            Ok(())
        }
        fn ensure_progress(&mut self) -> Attempt<()> {
            Ok(())
        }
        fn write(&mut self, _: &[ChangeBatch], _: Option<(usize, u64)>) -> Attempt<()> {
            // Like the real clients, writing without a connection would panic.
            assert!(self.connected, "written without a connection");
            self.writes += 1;
            if self.writes == 1 {
                self.connected = false;
                return Err(Failure::Retry("connection lost".into()));
            }
            Ok(())
        }
        fn recorded(&mut self, _: usize) -> Attempt<Option<u64>> {
            assert!(self.connected, "asked without a connection");
            Ok(None)
        }
        fn set_job(&mut self, _: &str) {}
        fn select(&mut self, _: Option<&RecordBatch>, _: &[usize]) -> Attempt<RecordBatch> {
            unreachable!()
        }
    }

    #[test]
    fn a_database_down_for_a_while_is_reconnected_to_before_writing_again() {
        let mut db = Flaky {
            connected: true,
            down: 2,
            writes: 0,
        };
        write_once(&mut db, "t", 5, &[], Some((0, 7))).unwrap();
        assert_eq!(db.writes, 2);
        // Down for longer than the retries allow: an error naming the options, not a panic.
        let mut db = Flaky {
            connected: true,
            down: 10,
            writes: 0,
        };
        let e = write_once(&mut db, "t", 2, &[], None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("failed after 2 retries") && e.contains("refused"),
            "{e}"
        );
    }

    #[test]
    fn urls_name_the_database() {
        let t = parse_url("jdbc:postgresql://127.0.0.1:5433/shop?user=u&password=p").unwrap();
        assert_eq!(
            t,
            Target {
                mysql: false,
                host: "127.0.0.1".into(),
                port: 5433,
                database: "shop".into(),
                user: Some("u".into()),
                password: Some("p".into()),
            }
        );
        let m = parse_url("jdbc:mariadb://db.local/shop").unwrap();
        assert!(m.mysql);
        assert_eq!(m.port, 3306);
        assert!(parse_url("jdbc:oracle:thin:@x:1521:y")
            .unwrap_err()
            .contains("not a PostgreSQL or MySQL url"));
        assert!(parse_url("jdbc:postgresql://h:5432/")
            .unwrap_err()
            .contains("no database"));
        assert!(parse_url("jdbc:mysql://h:port/db")
            .unwrap_err()
            .contains("not a port"));
    }

    #[test]
    fn folding_keeps_each_keys_last_change() {
        let schema = Arc::new(Schema::new(vec![
            Field::new("k", DataType::Utf8, false),
            Field::new("v", DataType::Int64, false),
        ]));
        let data = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(StringArray::from(vec!["a", "b", "a", "a", "c", "b", "c"])),
                Arc::new(Int64Array::from(vec![1, 2, 1, 5, 7, 2, 7])),
            ],
        )
        .unwrap();
        let ops = vec![
            Op::Insert,
            Op::Insert,
            Op::UpdateBefore,
            Op::UpdateAfter,
            Op::Insert,
            Op::Delete,
            Op::UpdateBefore,
        ];
        let folded = fold(&ChangeBatch::with_ops(data, ops), &[0]).unwrap();
        let keys = folded
            .data
            .column(0)
            .as_any()
            .downcast_ref::<StringArray>()
            .unwrap();
        let values = folded
            .data
            .column(1)
            .as_any()
            .downcast_ref::<Int64Array>()
            .unwrap();
        let got: Vec<(String, i64, Op)> = (0..folded.num_rows())
            .map(|i| (keys.value(i).to_string(), values.value(i), folded.op(i)))
            .collect();
        assert_eq!(
            got,
            vec![
                ("a".into(), 5, Op::Insert),
                ("b".into(), 2, Op::Delete),
                ("c".into(), 7, Op::Delete),
            ]
        );
    }
}
