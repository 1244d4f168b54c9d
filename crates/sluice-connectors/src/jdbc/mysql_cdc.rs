//! `'connector' = 'mysql-cdc'`: a MySQL/MariaDB table and then its changes, as an updating
//! table, read from the binlog in ROW format (`mysql_async`'s binlog stream), with the option
//! names of Flink CDC.
//!
//! - **Start** (`scan.startup.mode = 'initial'`): a transaction `WITH CONSISTENT SNAPSHOT` reads
//!   the table, and MariaDB reports the binlog position that snapshot saw up to; the binlog is
//!   then read from there. `'latest-offset'` reads from the binlog's end at the start.
//! - **Changes** are `+I`, `-U`/`+U`, `-D` with whole rows (`binlog_row_image = FULL`).
//! - **Checkpoints** record the binlog position at the end of the last transaction read (file
//!   number and offset in one number) and, inside a transaction a checkpoint splits, how many of
//!   its rows were read. A restore reads the binlog from there.
//! - **A restore in the middle of the snapshot** resumes it after the last key read, as
//!   `postgres-cdc` does: a new consistent snapshot reads the rows after that key, and the
//!   changes before its binlog position keep only rows at or before the key.
//!
//! Worker 0 reads: the binlog is one ordered stream.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use mysql_async::binlog::events::{EventData, RowsEventData};
use mysql_async::{BinlogStream, BinlogStreamRequest, Value};
use sluice_common::{Error, Op, Result};

use super::cdc::{encode_offsets, CdcReader, CdcSource, Keyed, Restored, Window};
use super::mysql::MySql;
use super::{Failure, Layout, Target};
use crate::options::{ConnectorDef, Kind, OptionDef, Options, Side};
use crate::{ConnectorSpec, Poll, SourceOffsets, SourceReader};

/// The `mysql-cdc` connector's options.
pub const CONNECTOR: ConnectorDef = ConnectorDef {
    name: "mysql-cdc",
    reads: true,
    writes: false,
    metadata: &[],
    writable_metadata: &[],
    formats: false,
    lookup: false,
    options: &[
        OptionDef {
            key: "hostname",
            kind: Kind::Text,
            default: None,
            side: Side::Source,
            identity: true,
            doc: "the MySQL or MariaDB server's host",
        },
        OptionDef {
            key: "port",
            kind: Kind::Count,
            default: Some("3306"),
            side: Side::Source,
            identity: true,
            doc: "its port",
        },
        OptionDef {
            key: "username",
            kind: Kind::Text,
            default: None,
            side: Side::Source,
            identity: false,
            doc: "a user with REPLICATION SLAVE, REPLICATION CLIENT and SELECT (default `root`)",
        },
        OptionDef {
            key: "password",
            kind: Kind::Text,
            default: None,
            side: Side::Source,
            identity: false,
            doc: "the user's password (kept out of logs)",
        },
        OptionDef {
            key: "database-name",
            kind: Kind::Text,
            default: None,
            side: Side::Source,
            identity: true,
            doc: "the database",
        },
        OptionDef {
            key: "table-name",
            kind: Kind::Text,
            default: None,
            side: Side::Source,
            identity: true,
            doc: "the table; the DDL's PRIMARY KEY must be its primary key",
        },
        OptionDef {
            key: "server-id",
            kind: Kind::Text,
            default: None,
            side: Side::Source,
            identity: false,
            doc: "the replica id the binlog is read as (a number, or Flink's range `5400-5408`, whose first is used); unique among the server's replicas (default: from the process id)",
        },
        OptionDef {
            key: "scan.startup.mode",
            kind: Kind::Choice(&["initial", "latest-offset"]),
            default: Some("initial"),
            side: Side::Source,
            identity: false,
            doc: "`initial`: the table's rows, then its changes; `latest-offset`: only changes from the start on",
        },
        super::connect_timeout(Side::Source),
    ],
};

/// A binlog position as one ordered number: the file's number, then the offset in it.
fn pack(file: u64, offset: u64) -> u64 {
    (file << 32) | (offset & 0xffff_ffff)
}

/// The number of binlog file `name` of base name `base` (`mysql-bin.000012`: 12).
fn file_number(base: &str, name: &str) -> Option<u64> {
    let tail = name.strip_prefix(base)?.strip_prefix('.')?;
    let digits: String = tail.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// The file a rotate event names (its raw name), given the file being read, `current`. The
/// rotate event the server sends first, before the stream's format is known, names the file
/// asked for and carries its 4-byte checksum after the name; those bytes may well be digits
/// (`mysql-bin.000001` then `0\x9f..` must not read as file 10), so a name that is the current
/// file's followed by 4 bytes is the current file.
fn rotated_to(base: &str, current: &str, raw: &[u8]) -> Option<u64> {
    let name = match raw.strip_prefix(current.as_bytes()) {
        Some(rest) if rest.is_empty() || rest.len() == 4 => current.as_bytes(),
        _ => raw,
    };
    file_number(base, std::str::from_utf8(name).ok()?)
}

/// Opens worker `worker`'s (of `workers`) share of a `mysql-cdc` table: worker 0 reads the
/// binlog, the others nothing.
pub fn open(
    spec: &ConnectorSpec,
    opts: &mut Options,
    worker: usize,
    workers: usize,
) -> Result<Box<dyn SourceReader>> {
    {
        let host = opts.required("hostname")?;
        let port = opts.value::<u16>("port")?;
        let user = opts.get("username")?.unwrap_or_else(|| "root".into());
        let password = opts.get("password")?;
        let database = opts.required("database-name")?;
        let table_name = opts.required("table-name")?;
        let server_id = match opts.get("server-id")? {
            None => 5400 + std::process::id() % 1000,
            Some(text) => text
                .split('-')
                .next()
                .and_then(|n| n.trim().parse::<u32>().ok())
                .ok_or_else(|| {
                    opts.error(format!(
                        "option 'server-id' = '{text}' is not a number or a range like '5400-5408'"
                    ))
                })?,
        };
        let initial = opts.value::<String>("scan.startup.mode")? == "initial";
        let connect_timeout = super::connect_timeout_of(opts)?;
        super::cdc::check_table(spec, opts, "mysql-cdc")?;
        let target = Target {
            mysql: true,
            host,
            port,
            database: database.clone(),
            user: Some(user.clone()),
            password,
        };
        let layout = Layout {
            table: spec.table.clone(),
            target_table: format!("{database}.{table_name}"),
            schema: spec.schema.clone(),
            // The key is checked against the table's primary key by the reader.
            key: vec![],
            connect_timeout,
            retries: 0,
            sink: false,
        };
        let db = MySql::connect(target.clone(), layout, String::new(), String::new())?;
        let reader = Reader::new(spec, target, db, database, table_name, server_id, initial)?;
        Ok(Box::new(CdcSource::new(
            "mysql-cdc",
            reader,
            worker,
            workers,
        )))
    }
}

enum Phase {
    Start,
    Snapshot,
    Stream(Box<BinlogStream>),
}

struct Reader {
    table: String,
    target: Target,
    db: MySql,
    database: String,
    table_name: String,
    server_id: u32,
    initial: bool,
    /// For each column of the table (in its order), its column in the DDL.
    map: Vec<Option<usize>>,
    keyed: Keyed,
    phase: Phase,
    /// The binlog files' name before their number (`mysql-bin`), and the file being read.
    base: String,
    file: u64,
    /// The position after the last transaction whose rows were all returned.
    lsn: u64,
    txn_rows: u64,
    skip_rows: u64,
    /// The transaction under way: the position where it starts, and its rows seen.
    txn_start: Option<u64>,
    txn_seen: u64,
    windows: Vec<Window>,
    snapshot_rows: u64,
    snapshot_after: Option<Vec<u8>>,
    restored: Option<Restored>,
}

impl Reader {
    fn new(
        spec: &ConnectorSpec,
        target: Target,
        mut db: MySql,
        database: String,
        table_name: String,
        server_id: u32,
        initial: bool,
    ) -> Result<Self> {
        let table = spec.table.clone();
        let err = |m: String| Error::connector(&table, m);
        let fatal = |f: Failure| match f {
            Failure::Fatal(e) => e,
            Failure::Retry(why) => Error::connector(&spec.table, why),
        };
        let where_ = target.describe();
        let vars = db
            .text_rows("SELECT @@log_bin, @@binlog_format, @@binlog_row_image")
            .map_err(fatal)?;
        let var = |i: usize| vars.first().and_then(|r| r[i].clone()).unwrap_or_default();
        if var(0) != "1" {
            return Err(err(format!(
                "{where_} writes no binlog: start it with --log-bin --binlog-format=ROW (log_bin = ON in its configuration)"
            )));
        }
        if !var(1).eq_ignore_ascii_case("ROW") {
            return Err(err(format!(
                "{where_} writes its binlog as {}, and changes need ROW: set binlog_format = ROW (--binlog-format=ROW)",
                var(1)
            )));
        }
        if !var(2).eq_ignore_ascii_case("FULL") {
            return Err(err(format!(
                "{where_} logs rows with binlog_row_image = {}, and updates and deletes need whole rows: set binlog_row_image = FULL",
                var(2)
            )));
        }
        let relation = db.relation().to_string();
        let primary = db
            .text_rows(&format!(
                "SELECT LOWER(GROUP_CONCAT(column_name ORDER BY LOWER(column_name) SEPARATOR ',')) \
                 FROM information_schema.statistics WHERE table_schema = '{}' AND table_name = '{}' \
                 AND index_name = 'PRIMARY'",
                database.replace('\'', "''"),
                table_name.replace('\'', "''")
            ))
            .map_err(fatal)?
            .into_iter()
            .next()
            .and_then(|r| r[0].clone());
        let names = db.column_names();
        let mut want: Vec<String> = spec
            .primary_key
            .iter()
            .map(|k| names[*k].to_lowercase())
            .collect();
        want.sort();
        let want = want.join(",");
        match primary {
            Some(p) if p != want => {
                return Err(err(format!(
                    "the DDL's PRIMARY KEY ({want}) is not table {relation}'s primary key ({p}): declare PRIMARY KEY ({p}) NOT ENFORCED"
                )))
            }
            None => {
                return Err(err(format!(
                    "table {relation} has no primary key, by which a changelog matches rows: add one (ALTER TABLE {relation} ADD PRIMARY KEY ({want}))"
                )))
            }
            _ => {}
        }
        let map: Vec<Option<usize>> = db
            .table_columns()
            .iter()
            .map(|c| names.iter().position(|n| n == c))
            .collect();
        let keyed = Keyed::new(&spec.schema, spec.primary_key.clone())?;
        Ok(Reader {
            table: spec.table.clone(),
            target,
            db,
            database,
            table_name,
            server_id,
            initial,
            map,
            keyed,
            phase: Phase::Start,
            base: String::new(),
            file: 0,
            lsn: 0,
            txn_rows: 0,
            skip_rows: 0,
            txn_start: None,
            txn_seen: 0,
            windows: vec![],
            snapshot_rows: 0,
            snapshot_after: None,
            restored: None,
        })
    }

    fn error(&self, message: impl Into<String>) -> Error {
        Error::connector(&self.table, message)
    }

    fn fatal(&self, f: Failure) -> Error {
        match f {
            Failure::Fatal(e) => e,
            Failure::Retry(why) => self.error(why),
        }
    }

    fn text_rows(&mut self, sql: &str) -> Result<Vec<Vec<Option<String>>>> {
        let got = self.db.text_rows(sql);
        got.map_err(|f| self.fatal(f))
    }

    /// Sets the binlog base name and file from a file name; the position in it.
    fn at(&mut self, file: &str, offset: u64) -> Result<u64> {
        let (base, _) = file
            .rsplit_once('.')
            .ok_or_else(|| self.error(format!("binlog file '{file}' has no number")))?;
        self.base = base.to_string();
        self.file = file_number(base, file)
            .ok_or_else(|| self.error(format!("binlog file '{file}' has no number")))?;
        Ok(pack(self.file, offset))
    }

    fn file_name(&self, file: u64) -> String {
        format!("{}.{file:06}", self.base)
    }

    fn start(&mut self) -> Result<()> {
        let master = self.text_rows("SHOW MASTER STATUS")?;
        let Some(file) = master.first().and_then(|r| r[0].clone()) else {
            return Err(self.error("SHOW MASTER STATUS names no binlog file"));
        };
        let end: u64 = master[0][1]
            .as_deref()
            .and_then(|p| p.parse().ok())
            .unwrap_or(4);
        match self.restored.take() {
            None if self.initial => {
                let (file, pos) = self.db.begin_snapshot().map_err(|f| self.fatal(f))?;
                self.lsn = self.at(&file, pos)?;
                self.phase = Phase::Snapshot;
            }
            None => {
                self.lsn = self.at(&file, end)?;
                self.start_stream()?;
            }
            Some(restored) => {
                self.at(&file, end)?;
                self.lsn = restored.lsn;
                self.skip_rows = restored.txn_rows;
                self.windows = restored.windows;
                let logs = self.text_rows("SHOW BINARY LOGS")?;
                let wanted = self.file_name(self.lsn >> 32);
                if !logs
                    .iter()
                    .any(|r| r[0].as_deref() == Some(wanted.as_str()))
                {
                    return Err(self.error(format!(
                        "binlog file {wanted}, where the checkpoint's changes continue, is no longer on {} (purged?); \
                         start the job without its checkpoint to read the table anew",
                        self.target.describe()
                    )));
                }
                match restored.snapshot {
                    None => self.start_stream()?,
                    Some((rows, after)) => {
                        tracing::info!(table = %self.table, rows, "mysql-cdc: resuming the snapshot after the last key a checkpoint recorded");
                        let (file, pos) = self.db.begin_snapshot().map_err(|f| self.fatal(f))?;
                        let at = self.at(&file, pos)?;
                        self.windows.push(Window {
                            lsn: at,
                            key: after.clone(),
                        });
                        self.snapshot_rows = rows;
                        self.snapshot_after = after;
                        self.phase = Phase::Snapshot;
                    }
                }
            }
        }
        Ok(())
    }

    fn start_stream(&mut self) -> Result<()> {
        let conn = self.db.new_conn().map_err(|f| self.fatal(f))?;
        let file = self.file_name(self.lsn >> 32);
        let offset = self.lsn & 0xffff_ffff;
        self.file = self.lsn >> 32;
        let request = BinlogStreamRequest::new(self.server_id)
            .with_filename(file.as_bytes())
            .with_pos(offset);
        let stream = self
            .db
            .runtime()
            .block_on(conn.get_binlog_stream(request))
            .map_err(|e| {
                self.error(format!(
                    "{}: reading the binlog from {file}:{offset} as replica {} (option 'server-id'): {e}",
                    self.target.describe(),
                    self.server_id
                ))
            })?;
        tracing::info!(table = %self.table, file = %file, offset, "mysql-cdc: streaming changes from the binlog");
        self.phase = Phase::Stream(Box::new(stream));
        Ok(())
    }

    fn poll_snapshot(&mut self, max_rows: usize) -> Result<Poll> {
        let after = match &self.snapshot_after {
            Some(k) => Some(self.keyed.key_batch(k)?),
            None => None,
        };
        let key = self.keyed.key.clone();
        let got = self.db.fetch_after(after.as_ref(), &key, max_rows);
        match got.map_err(|f| self.fatal(f))? {
            Some(batch) => {
                self.snapshot_after = Some(self.keyed.last_key(&batch)?);
                self.snapshot_rows += batch.num_rows() as u64;
                let n = batch.num_rows();
                let batch = self.keyed.with_ops(batch, vec![Op::Insert as i8; n])?;
                Ok(Poll::Batch { split: 0, batch })
            }
            None => {
                tracing::info!(table = %self.table, rows = self.snapshot_rows, "mysql-cdc: snapshot read; streaming changes");
                self.snapshot_after = None;
                self.start_stream()?;
                Ok(Poll::Idle)
            }
        }
    }

    /// A binlog row (the table's columns in its order) as the DDL's columns.
    fn values(&self, row: mysql_async::binlog::row::BinlogRow) -> Result<Vec<Value>> {
        let mut out = vec![Value::NULL; self.db.column_names().len()];
        for (j, v) in row.unwrap().into_iter().enumerate() {
            if let Some(Some(p)) = self.map.get(j) {
                out[*p] = Value::try_from(v)
                    .map_err(|e| self.error(format!("a binlog value of column {j}: {e}")))?;
            }
        }
        Ok(out)
    }

    fn image(&mut self, row: Vec<Value>, op: Op, rows: &mut Vec<Vec<Value>>, ops: &mut Vec<i8>) {
        let index = self.txn_seen;
        self.txn_seen += 1;
        if index < self.skip_rows {
            return;
        }
        self.txn_rows = index + 1;
        rows.push(row);
        ops.push(op as i8);
    }

    fn commit(&mut self, end: u64) {
        self.txn_start = None;
        self.txn_rows = 0;
        self.skip_rows = 0;
        self.lsn = end;
    }

    fn poll_stream(&mut self, max_rows: usize) -> Result<Poll> {
        let mut rows: Vec<Vec<Value>> = vec![];
        let mut ops: Vec<i8> = vec![];
        let mut windowed: Vec<(usize, u64)> = vec![];
        let started = Instant::now();
        let rt = self.db.runtime();
        while rows.len() < max_rows {
            if !rows.is_empty()
                && self.txn_start.is_none()
                && started.elapsed() > Duration::from_millis(50)
            {
                break;
            }
            let wait = match rows.is_empty() {
                true => Duration::from_millis(20),
                false => Duration::from_millis(1),
            };
            let Phase::Stream(stream) = &mut self.phase else {
                unreachable!("streaming")
            };
            let event = match rt.block_on(async { tokio::time::timeout(wait, stream.next()).await })
            {
                Err(_) => break,
                Ok(None) => {
                    return Err(self.error(format!(
                        "the binlog stream of {} ended",
                        self.target.describe()
                    )))
                }
                Ok(Some(Err(e))) => {
                    return Err(self.error(format!(
                        "{}: the binlog stream: {e}",
                        self.target.describe()
                    )))
                }
                Ok(Some(Ok(event))) => event,
            };
            let end = pack(self.file, event.header().log_pos() as u64);
            // MariaDB's GTID event starts a transaction.
            if event.header().event_type_raw() == 162 {
                self.txn_start = Some(end);
                self.txn_seen = 0;
                continue;
            }
            let data = event
                .read_data()
                .map_err(|e| self.error(format!("a binlog event: {e}")))?;
            match data {
                Some(EventData::RotateEvent(r)) => {
                    let current = self.file_name(self.file);
                    self.file =
                        rotated_to(&self.base, &current, r.name_raw()).ok_or_else(|| {
                            self.error(format!("binlog file '{}' has no number", r.name()))
                        })?;
                    if self.txn_start.is_none() {
                        self.lsn = pack(self.file, r.position());
                    }
                }
                Some(EventData::QueryEvent(q)) => {
                    let sql = q.query();
                    if sql == "BEGIN" {
                        self.txn_start = Some(end);
                        self.txn_seen = 0;
                    } else if sql == "COMMIT" || self.txn_start.is_none() {
                        if sql.trim().to_uppercase().starts_with("TRUNCATE")
                            && sql.contains(self.table_name.as_str())
                        {
                            return Err(self.error(format!(
                                "table {} was truncated, which a changelog cannot express; start the job without its checkpoint",
                                self.db.relation()
                            )));
                        }
                        self.commit(end);
                    }
                }
                Some(EventData::XidEvent(_)) => self.commit(end),
                Some(EventData::RowsEvent(re)) => {
                    let Phase::Stream(stream) = &self.phase else {
                        unreachable!("streaming")
                    };
                    let Some(tme) = stream.get_tme(re.table_id()) else {
                        return Err(self.error("a rows event without its table map"));
                    };
                    if tme.database_name() != self.database || tme.table_name() != self.table_name {
                        continue;
                    }
                    let mut images: Vec<(Vec<Value>, Op)> = vec![];
                    for pair in re.rows(tme) {
                        let (before, after) =
                            pair.map_err(|e| self.error(format!("a binlog row: {e}")))?;
                        let (before, after) = (
                            before.map(|r| self.values(r)).transpose()?,
                            after.map(|r| self.values(r)).transpose()?,
                        );
                        match (&re, before, after) {
                            (RowsEventData::WriteRowsEvent(_) | RowsEventData::WriteRowsEventV1(_), _, Some(a)) => {
                                images.push((a, Op::Insert))
                            }
                            (
                                RowsEventData::UpdateRowsEvent(_)
                                | RowsEventData::UpdateRowsEventV1(_)
                                | RowsEventData::PartialUpdateRowsEvent(_),
                                Some(b),
                                Some(a),
                            ) => {
                                images.push((b, Op::UpdateBefore));
                                images.push((a, Op::UpdateAfter));
                            }
                            (RowsEventData::DeleteRowsEvent(_) | RowsEventData::DeleteRowsEventV1(_), Some(b), _) => {
                                images.push((b, Op::Delete))
                            }
                            _ => {
                                return Err(self.error(
                                    "a binlog row event without the row images it needs (binlog_row_image = FULL)",
                                ))
                            }
                        }
                    }
                    let txn = self.txn_start.unwrap_or(end);
                    for (row, op) in images {
                        let before = rows.len();
                        self.image(row, op, &mut rows, &mut ops);
                        if rows.len() > before && !self.windows.is_empty() {
                            windowed.push((before, txn));
                        }
                    }
                }
                _ => {}
            }
        }
        if rows.is_empty() {
            return Ok(Poll::Idle);
        }
        let batch = self.db.decode_values(&rows).map_err(|f| self.fatal(f))?;
        let batch = self.keyed.with_ops(batch, ops)?;
        let batch = self.keyed.filter_windows(batch, windowed, &self.windows)?;
        let lsn = self.lsn;
        self.windows.retain(|w| w.lsn > lsn);
        if batch.num_rows() == 0 {
            return Ok(Poll::Idle);
        }
        Ok(Poll::Batch { split: 0, batch })
    }

    fn read(&mut self, max_rows: usize) -> Result<Poll> {
        if matches!(self.phase, Phase::Start) {
            self.start()?;
        }
        match self.phase {
            Phase::Snapshot => self.poll_snapshot(max_rows),
            Phase::Stream(_) => self.poll_stream(max_rows),
            Phase::Start => unreachable!("started above"),
        }
    }

    fn position(&self) -> SourceOffsets {
        match (&self.phase, &self.restored) {
            (Phase::Start, Some(r)) => encode_offsets(r),
            (Phase::Start, None) => SourceOffsets::new(),
            _ => encode_offsets(&Restored {
                lsn: self.lsn,
                txn_rows: self.txn_rows,
                windows: self.windows.clone(),
                snapshot: match self.phase {
                    Phase::Snapshot => Some((self.snapshot_rows, self.snapshot_after.clone())),
                    _ => None,
                },
            }),
        }
    }
}

impl CdcReader for Reader {
    fn poll(&mut self, max_rows: usize) -> Result<Poll> {
        self.read(max_rows)
    }

    fn offsets(&self) -> SourceOffsets {
        self.position()
    }

    fn restore(&mut self, restored: Restored) {
        self.restored = Some(restored);
    }

    fn error(&self, message: String) -> Error {
        Error::connector(&self.table, message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_order_by_file_then_offset() {
        assert!(pack(1, 4_000_000) < pack(2, 4));
        assert_eq!(pack(3, 328) >> 32, 3);
        assert_eq!(pack(3, 328) & 0xffff_ffff, 328);
        assert_eq!(file_number("mysql-bin", "mysql-bin.000012"), Some(12));
        assert_eq!(file_number("mysql-bin", "binlog"), None);
        // The first rotate event carries a checksum after the name, which may be digits.
        let current = "mysql-bin.000001";
        for checksum in [*b"\x07.9u", *b"0\x9f\x12a", *b"0123"] {
            let raw = [current.as_bytes(), &checksum].concat();
            assert_eq!(rotated_to("mysql-bin", current, &raw), Some(1));
        }
        assert_eq!(
            rotated_to("mysql-bin", current, b"mysql-bin.000002"),
            Some(2)
        );
        assert_eq!(
            rotated_to("mysql-bin", "mysql-bin.999999", b"mysql-bin.1000000"),
            Some(1_000_000)
        );
        assert_eq!(file_number("a.b-bin", "a.b-bin.000003"), Some(3));
    }
}
