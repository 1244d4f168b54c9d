//! `'connector' = 'postgres-cdc'`: a PostgreSQL table and then its changes, as an updating
//! table, read from a logical replication slot (`pgoutput`), with the option names of Flink CDC.
//!
//! - **Start** (`scan.startup.mode = 'initial'`): the slot is created on a replication session
//!   that exports its snapshot; the table is read in that snapshot, ordered by its primary key,
//!   and then the slot streams every transaction that committed after it. Nothing is missed or
//!   read twice. `'latest-offset'` creates the slot and streams only what follows.
//! - **Changes:** inserts are `+I`, updates `-U`/`+U`, deletes `-D`, with whole rows: the table
//!   needs `REPLICA IDENTITY FULL`, or `'changelog-mode' = 'upsert'`, where updates are upserts
//!   by primary key and deletes carry the key (Sluice keeps each key's last row).
//! - **Checkpoints** record the end of the last transaction read (and, in one under way, how
//!   many of its rows). The slot is acknowledged only up to the last committed checkpoint, so a
//!   restore replays exactly what followed it.
//! - **A restore in the middle of the snapshot** resumes it after the last key read: a temporary
//!   slot exports a newer snapshot, whose rows after that key are read; the changes streamed
//!   from the first slot keep, until the newer snapshot's position, only the rows at or before
//!   that key (the newer snapshot already holds the others). Each such resume is a "window"
//!   kept in the checkpoints until the stream passes it.
//!
//! Worker 0 reads: a slot is one ordered stream.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use arrow::datatypes::SchemaRef;
use pg_walstream::protocol::{LogicalReplicationMessage, LogicalReplicationParser, TupleData};
use pgwire_replication::{Lsn, ReplicationClient, ReplicationConfig, ReplicationEvent, TlsConfig};
use sluice_common::{Error, Op, Result};

use super::cdc::{encode_offsets, CdcReader, CdcSource, Keyed, Restored, Window};
use super::postgres::{Postgres, RawRow};
use super::{Failure, Layout, Target};
use crate::options::{ConnectorDef, Kind, OptionDef, Options, Side};
use crate::{ConnectorSpec, Poll, SourceOffsets, SourceReader};

/// The `postgres-cdc` connector's options.
pub const CONNECTOR: ConnectorDef = ConnectorDef {
    name: "postgres-cdc",
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
            doc: "the PostgreSQL server's host",
        },
        OptionDef {
            key: "port",
            kind: Kind::Count,
            default: Some("5432"),
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
            doc: "a user with the REPLICATION attribute (or a superuser)",
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
            key: "schema-name",
            kind: Kind::Text,
            default: Some("public"),
            side: Side::Source,
            identity: true,
            doc: "the table's schema",
        },
        OptionDef {
            key: "table-name",
            kind: Kind::Text,
            default: None,
            side: Side::Source,
            identity: true,
            doc: "the table; the DDL's PRIMARY KEY must be a primary key or unique key of it",
        },
        OptionDef {
            key: "slot.name",
            kind: Kind::Text,
            default: None,
            side: Side::Source,
            identity: true,
            doc: "the replication slot of this job (created at a start without a checkpoint; one left by an earlier run is dropped first)",
        },
        OptionDef {
            key: "decoding.plugin.name",
            kind: Kind::Choice(&["pgoutput"]),
            default: Some("pgoutput"),
            side: Side::Source,
            identity: false,
            doc: "the logical decoding plugin: PostgreSQL's built-in `pgoutput`",
        },
        OptionDef {
            key: "scan.startup.mode",
            kind: Kind::Choice(&["initial", "latest-offset"]),
            default: Some("initial"),
            side: Side::Source,
            identity: false,
            doc: "`initial`: the table's rows, then its changes; `latest-offset`: only changes from the start on",
        },
        OptionDef {
            key: "changelog-mode",
            kind: Kind::Choice(&["all", "upsert"]),
            default: Some("all"),
            side: Side::Source,
            identity: false,
            doc: "`all`: updates and deletes carry the old row (needs REPLICA IDENTITY FULL); `upsert`: they carry the key, and Sluice keeps each key's last row",
        },
        OptionDef {
            key: "debezium.publication.name",
            kind: Kind::Text,
            default: Some("dbz_publication"),
            side: Side::Source,
            identity: false,
            doc: "the publication the slot streams (created for the table if missing, or the table added to it)",
        },
        super::connect_timeout(Side::Source),
    ],
};

/// Where and what to replicate.
#[derive(Clone)]
struct Params {
    target: Target,
    user: String,
    slot: String,
    publication: String,
    initial: bool,
}

fn quote(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

fn literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// Opens worker `worker`'s (of `workers`) share of a `postgres-cdc` table: worker 0 reads the
/// slot, the others nothing.
pub fn open(
    spec: &ConnectorSpec,
    opts: &mut Options,
    worker: usize,
    workers: usize,
) -> Result<Box<dyn SourceReader>> {
    {
        let host = opts.required("hostname")?;
        let port = opts.value::<u16>("port")?;
        let user = opts.get("username")?.unwrap_or_else(|| "postgres".into());
        let password = opts.get("password")?;
        let database = opts.required("database-name")?;
        let schema_name = opts.value::<String>("schema-name")?;
        let table_name = opts.required("table-name")?;
        let slot = opts.required("slot.name")?;
        let _ = opts.value::<String>("decoding.plugin.name")?;
        let initial = opts.value::<String>("scan.startup.mode")? == "initial";
        let upsert = opts.value::<String>("changelog-mode")? == "upsert";
        let publication = opts.value::<String>("debezium.publication.name")?;
        let connect_timeout = super::connect_timeout_of(opts)?;
        super::cdc::check_table(spec, opts, "postgres-cdc")?;
        let target = Target {
            mysql: false,
            host,
            port,
            database,
            user: Some(user.clone()),
            password,
        };
        let params = Params {
            target: target.clone(),
            user,
            slot,
            publication,
            initial,
        };
        // Upsert deletes hold only the key: the other columns are NULL until normalized.
        let schema = match upsert {
            true => sluice_common::changelog::all_nullable(&spec.schema),
            false => spec.schema.clone(),
        };
        let layout = Layout {
            table: spec.table.clone(),
            target_table: format!("{}.{}", quote(&schema_name), quote(&table_name)),
            schema: schema.clone(),
            // The key is checked against the table's own by the reader.
            key: vec![],
            connect_timeout,
            retries: 0,
            sink: false,
        };
        // Every worker checks the server and the table (planning opens worker 0 only).
        let db = Postgres::connect(target, layout, String::new(), String::new())?;
        let reader = Reader::new(spec, params, db, schema, upsert)?;
        Ok(Box::new(CdcSource::new(
            "postgres-cdc",
            reader,
            worker,
            workers,
        )))
    }
}

/// Worker 0's reader of the slot.
struct Reader {
    table: String,
    params: Params,
    db: Postgres,
    /// The replication sessions' runtime: a thread of its own keeps a session answering the
    /// server while the job is busy elsewhere.
    rt: tokio::runtime::Runtime,
    oid: u32,
    /// The database's names of the DDL's columns.
    names: Vec<String>,
    upsert: bool,
    keyed: Keyed,
    phase: Phase,
    parser: LogicalReplicationParser,
    /// For each column of the table's relation as the stream describes it, its column in the
    /// DDL.
    columns: Option<Vec<Option<usize>>>,
    /// The end of the last transaction whose rows were all returned, or the stream's start.
    lsn: u64,
    /// Rows of the transaction under way that were returned.
    txn_rows: u64,
    /// On a restore inside a transaction: its rows already returned before.
    skip_rows: u64,
    /// The transaction under way: whether its rows were returned before, and its row count.
    in_txn: Option<bool>,
    txn_seen: u64,
    /// Resumed snapshots: changes committed before `lsn` keep only rows with keys at or before
    /// `key` (`None`: no rows).
    windows: Vec<Window>,
    /// The snapshot being read: rows returned, and the key of the last.
    snapshot_rows: u64,
    snapshot_after: Option<Vec<u8>>,
    checkpointing: bool,
    /// The position each checkpoint recorded, acknowledged when it commits.
    acks: BTreeMap<u64, u64>,
    restored: Option<Restored>,
}

enum Phase {
    /// The first poll starts reading.
    Start,
    /// Reading a snapshot; `stream` is the replication session that follows it.
    Snapshot {
        stream: Option<ReplicationClient>,
    },
    Stream {
        client: ReplicationClient,
    },
}

impl Reader {
    fn new(
        spec: &ConnectorSpec,
        params: Params,
        db: Postgres,
        schema: SchemaRef,
        upsert: bool,
    ) -> Result<Self> {
        let table = spec.table.clone();
        let err = |m: String| Error::connector(&table, m);
        let fatal = |f: Failure| match f {
            Failure::Fatal(e) => e,
            Failure::Retry(why) => Error::connector(&spec.table, why),
        };
        let where_ = params.target.describe();
        let one = |sql: &str| -> Result<Option<String>> {
            Ok(db
                .text_rows(sql)
                .map_err(fatal)?
                .into_iter()
                .next()
                .and_then(|r| r.into_iter().next().flatten()))
        };
        let wal = one("SHOW wal_level")?.unwrap_or_default();
        if wal != "logical" {
            return Err(err(format!(
                "{where_} runs with wal_level = {wal}, and logical replication needs wal_level = logical: \
                 run ALTER SYSTEM SET wal_level = logical, then restart the server"
            )));
        }
        let may =
            one("SELECT rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user")?;
        if may.as_deref() != Some("t") {
            return Err(err(format!(
                "user '{}' of {where_} may not read a replication slot: run ALTER ROLE {} REPLICATION \
                 (option 'username')",
                params.user,
                quote(&params.user)
            )));
        }
        let relation = db.relation().to_string();
        let oid: u32 = one(&format!("SELECT {}::regclass::oid", literal(&relation)))?
            .and_then(|o| o.parse().ok())
            .ok_or_else(|| err(format!("table {relation} has no oid")))?;
        let identity = one(&format!(
            "SELECT relreplident FROM pg_class WHERE oid = {oid}"
        ))?;
        if !upsert && identity.as_deref() != Some("f") {
            return Err(err(format!(
                "table {relation} of {where_} does not log whole old rows (REPLICA IDENTITY {}), which a changelog of \
                 updates and deletes ('changelog-mode' = 'all') needs: run ALTER TABLE {relation} REPLICA IDENTITY FULL, \
                 or set 'changelog-mode' = 'upsert'",
                match identity.as_deref() {
                    Some("d") => "DEFAULT",
                    Some("n") => "NOTHING",
                    Some("i") => "USING INDEX",
                    _ => "unknown",
                }
            )));
        }
        // The changelog's key is the table's: a delete's old row holds the primary key.
        let names = db.column_names();
        let mut want: Vec<String> = spec.primary_key.iter().map(|k| names[*k].clone()).collect();
        want.sort();
        let unique = db
            .text_rows(&format!(
                "SELECT i.indisprimary, array_to_string(array_agg(a.attname::text ORDER BY a.attname), ',') \
                 FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) \
                 WHERE i.indrelid = {oid} AND i.indisunique AND i.indpred IS NULL \
                 GROUP BY i.indexrelid, i.indisprimary ORDER BY 1 DESC"
            ))
            .map_err(fatal)?;
        let keys: Vec<(bool, String)> = unique
            .into_iter()
            .map(|r| {
                (
                    r[0].as_deref() == Some("t"),
                    r[1].clone().unwrap_or_default(),
                )
            })
            .collect();
        let want = want.join(",");
        match keys.first() {
            Some((true, p)) if *p != want => {
                return Err(err(format!(
                    "the DDL's PRIMARY KEY ({want}) is not table {relation}'s primary key ({p}): declare PRIMARY KEY ({p}) NOT ENFORCED"
                )))
            }
            None => {
                return Err(err(format!(
                    "table {relation} has no primary key or unique key, by which a changelog matches rows: add one \
                     (ALTER TABLE {relation} ADD PRIMARY KEY ({want}))"
                )))
            }
            Some((false, _)) if !keys.iter().any(|(_, k)| *k == want) => {
                return Err(err(format!(
                    "the DDL's PRIMARY KEY ({want}) is not a unique key of table {relation} (its unique keys: {})",
                    keys.iter().map(|(_, k)| format!("({k})")).collect::<Vec<_>>().join(", ")
                )))
            }
            Some((false, _)) if upsert && identity.as_deref() != Some("f") => {
                return Err(err(format!(
                    "table {relation} has no primary key, so its deletes would not carry the DDL's PRIMARY KEY: \
                     run ALTER TABLE {relation} REPLICA IDENTITY FULL"
                )))
            }
            _ => {}
        }
        if upsert && identity.as_deref() == Some("n") {
            return Err(err(format!(
                "table {relation} has REPLICA IDENTITY NOTHING: PostgreSQL logs no key for deletes; \
                 run ALTER TABLE {relation} REPLICA IDENTITY DEFAULT (or FULL)"
            )));
        }
        let keyed = Keyed::new(&schema, spec.primary_key.clone())?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("postgres-cdc")
            .enable_all()
            .build()
            .map_err(|e| err(e.to_string()))?;
        Ok(Reader {
            table: spec.table.clone(),
            params,
            db,
            rt,
            oid,
            names,
            upsert,
            keyed,
            phase: Phase::Start,
            parser: LogicalReplicationParser::with_protocol_version(1),
            columns: None,
            lsn: 0,
            txn_rows: 0,
            skip_rows: 0,
            in_txn: None,
            txn_seen: 0,
            windows: vec![],
            snapshot_rows: 0,
            snapshot_after: None,
            checkpointing: false,
            acks: BTreeMap::new(),
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

    fn text_rows(&self, sql: &str) -> Result<Vec<Vec<Option<String>>>> {
        self.db.text_rows(sql).map_err(|f| self.fatal(f))
    }

    fn config(&self, slot: &str, start: u64) -> ReplicationConfig {
        let t = &self.params.target;
        let mut cfg = ReplicationConfig::new(
            t.host.clone(),
            self.params.user.clone(),
            t.password.clone().unwrap_or_default(),
            t.database.clone(),
            slot.to_string(),
            self.params.publication.as_str(),
        )
        .with_port(t.port)
        .with_tls(TlsConfig::disabled())
        .with_start_lsn(Lsn(start))
        .with_ack_lsn(Lsn(start))
        .with_status_interval(Duration::from_secs(1))
        .with_wakeup_interval(Duration::from_secs(1));
        cfg.binary = true;
        cfg.application_name = Some("sluice".into());
        cfg
    }

    fn replication_error(&self, what: &str, e: pgwire_replication::PgWireError) -> Error {
        self.error(format!("{} ({what}): {e}", self.params.target.describe()))
    }

    /// A replication session that has not started streaming, on which commands run.
    fn gated(&self, slot: &str, start: u64) -> Result<ReplicationClient> {
        let cfg = self.config(slot, start);
        self.rt
            .block_on(ReplicationClient::connect_gated(cfg))
            .map_err(|e| self.replication_error("connecting for replication", e))
    }

    /// Runs a replication command; its first row, as text.
    fn command(&self, session: &mut ReplicationClient, sql: &str) -> Result<Vec<Option<String>>> {
        let rows = self
            .rt
            .block_on(session.simple_query(sql))
            .map_err(|e| self.replication_error(sql, e))?;
        Ok(rows
            .into_iter()
            .next()
            .map(|r| {
                r.into_iter()
                    .map(|c| c.map(|b| String::from_utf8_lossy(&b).into_owned()))
                    .collect()
            })
            .unwrap_or_default())
    }

    /// The publication exists and publishes the table.
    fn ensure_publication(&self) -> Result<()> {
        let name = &self.params.publication;
        let relation = self.db.relation().to_string();
        let found = self.text_rows(&format!(
            "SELECT puballtables FROM pg_publication WHERE pubname = {}",
            literal(name)
        ))?;
        let sql = match found.first().and_then(|r| r[0].as_deref()) {
            None => format!(
                "CREATE PUBLICATION {} FOR TABLE {relation} WITH (publish = 'insert, update, delete, truncate')",
                quote(name)
            ),
            Some("t") => return Ok(()),
            Some(_) => {
                let has = self.text_rows(&format!(
                    "SELECT 1 FROM pg_publication_rel WHERE prpubid = (SELECT oid FROM pg_publication WHERE pubname = {}) AND prrelid = {}",
                    literal(name),
                    self.oid
                ))?;
                if !has.is_empty() {
                    return Ok(());
                }
                format!("ALTER PUBLICATION {} ADD TABLE {relation}", quote(name))
            }
        };
        self.db.execute(&sql).map_err(|f| self.fatal(f))
    }

    /// The slot's state: `None` when missing, else whether a session holds it and where its
    /// acknowledged position is.
    fn slot_state(&self, slot: &str) -> Result<Option<(bool, u64)>> {
        let rows = self.text_rows(&format!(
            "SELECT active, confirmed_flush_lsn::text, database FROM pg_replication_slots WHERE slot_name = {}",
            literal(slot)
        ))?;
        let Some(row) = rows.into_iter().next() else {
            return Ok(None);
        };
        if row[2].as_deref() != Some(self.params.target.database.as_str()) {
            return Err(self.error(format!(
                "replication slot '{slot}' belongs to database '{}', not '{}' (option 'slot.name')",
                row[2].clone().unwrap_or_default(),
                self.params.target.database
            )));
        }
        let lsn = row[1]
            .as_deref()
            .and_then(|l| Lsn::parse(l).ok())
            .map(|l| l.0)
            .unwrap_or(0);
        Ok(Some((row[0].as_deref() == Some("t"), lsn)))
    }

    /// The first poll: a fresh slot (and snapshot), or a restore's.
    fn start(&mut self) -> Result<()> {
        self.ensure_publication()?;
        let slot = self.params.slot.clone();
        match self.restored.take() {
            None => {
                match self.slot_state(&slot)? {
                    Some((true, _)) => {
                        return Err(self.error(format!(
                            "replication slot '{slot}' is in use by another session (another job?); give this job a slot of its own (option 'slot.name')"
                        )))
                    }
                    Some((false, _)) => {
                        tracing::warn!(table = %self.table, slot, "postgres-cdc: dropping the replication slot an earlier run left: a start without a checkpoint reads anew");
                        self.db
                            .execute(&format!(
                                "SELECT pg_drop_replication_slot({})",
                                literal(&slot)
                            ))
                            .map_err(|f| self.fatal(f))?;
                    }
                    None => {}
                }
                let mut session = self.gated(&slot, 0)?;
                let export = if self.params.initial {
                    "EXPORT_SNAPSHOT"
                } else {
                    "NOEXPORT_SNAPSHOT"
                };
                let row = self.command(
                    &mut session,
                    &format!(
                        "CREATE_REPLICATION_SLOT {} LOGICAL pgoutput {export}",
                        quote(&slot)
                    ),
                )?;
                self.lsn = self.parse_lsn(row.get(1))?;
                if self.params.initial {
                    let snapshot = row.get(2).cloned().flatten().unwrap_or_default();
                    let key = self.keyed.key.clone();
                    self.db
                        .begin_snapshot(&snapshot, None, &key)
                        .map_err(|f| self.fatal(f))?;
                    self.phase = Phase::Snapshot {
                        stream: Some(session),
                    };
                } else {
                    self.start_stream(session)?;
                }
            }
            Some(restored) => {
                match self.slot_state(&slot)? {
                    None => {
                        return Err(self.error(format!(
                            "replication slot '{slot}' is gone, so the changes after the checkpoint (LSN {}) cannot be read again; \
                             start the job without its checkpoint to read the table anew",
                            Lsn(restored.lsn).to_pg_string()
                        )))
                    }
                    Some((true, _)) => {
                        return Err(self.error(format!(
                            "replication slot '{slot}' is in use by another session; give this job a slot of its own (option 'slot.name')"
                        )))
                    }
                    Some((false, acked)) if acked > restored.lsn => {
                        return Err(self.error(format!(
                            "replication slot '{slot}' was acknowledged up to {}, past the checkpoint's {}: the changes between are lost \
                             (was the slot read by something else?)",
                            Lsn(acked).to_pg_string(),
                            Lsn(restored.lsn).to_pg_string()
                        )))
                    }
                    Some(_) => {}
                }
                self.lsn = restored.lsn;
                self.skip_rows = restored.txn_rows;
                self.windows = restored.windows;
                match restored.snapshot {
                    None => {
                        let session = self.gated(&slot, self.lsn)?;
                        self.start_stream(session)?;
                    }
                    Some((rows, after)) => {
                        tracing::info!(table = %self.table, rows, "postgres-cdc: resuming the snapshot after the last key a checkpoint recorded");
                        // A newer snapshot, from a temporary slot, for the rows after `after`.
                        let temp = format!("{}_resume", slot);
                        let temp = &temp[..temp.len().min(63)];
                        let mut session = self.gated(temp, 0)?;
                        let row = self.command(
                            &mut session,
                            &format!(
                                "CREATE_REPLICATION_SLOT {} TEMPORARY LOGICAL pgoutput EXPORT_SNAPSHOT",
                                quote(temp)
                            ),
                        )?;
                        let at = self.parse_lsn(row.get(1))?;
                        let snapshot = row.get(2).cloned().flatten().unwrap_or_default();
                        let from = match &after {
                            None => None,
                            Some(k) => Some(self.keyed.key_batch(k)?),
                        };
                        let key = self.keyed.key.clone();
                        self.db
                            .begin_snapshot(&snapshot, from.as_ref(), &key)
                            .map_err(|f| self.fatal(f))?;
                        // Imported: the temporary slot may go.
                        drop(session);
                        self.windows.push(Window {
                            lsn: at,
                            key: after.clone(),
                        });
                        self.snapshot_rows = rows;
                        self.snapshot_after = after;
                        self.phase = Phase::Snapshot { stream: None };
                    }
                }
            }
        }
        Ok(())
    }

    fn parse_lsn(&self, text: Option<&Option<String>>) -> Result<u64> {
        text.cloned()
            .flatten()
            .and_then(|t| Lsn::parse(&t).ok())
            .map(|l| l.0)
            .ok_or_else(|| self.error("CREATE_REPLICATION_SLOT returned no position"))
    }

    fn start_stream(&mut self, mut session: ReplicationClient) -> Result<()> {
        self.rt
            .block_on(async {
                session.start().await?;
                session.wait_started().await
            })
            .map_err(|e| self.replication_error("START_REPLICATION", e))?;
        tracing::info!(table = %self.table, lsn = %Lsn(self.lsn).to_pg_string(), "postgres-cdc: streaming changes from the slot");
        self.phase = Phase::Stream { client: session };
        Ok(())
    }

    fn poll_snapshot(&mut self, max_rows: usize) -> Result<Poll> {
        match self.db.fetch(max_rows).map_err(|f| self.fatal(f))? {
            Some(batch) => {
                self.snapshot_after = Some(self.keyed.last_key(&batch)?);
                self.snapshot_rows += batch.num_rows() as u64;
                let n = batch.num_rows();
                let batch = self.keyed.with_ops(batch, vec![Op::Insert as i8; n])?;
                Ok(Poll::Batch { split: 0, batch })
            }
            None => {
                tracing::info!(table = %self.table, rows = self.snapshot_rows, "postgres-cdc: snapshot read; streaming changes");
                self.snapshot_after = None;
                let stream = match std::mem::replace(&mut self.phase, Phase::Start) {
                    Phase::Snapshot { stream } => stream,
                    _ => unreachable!("in the snapshot phase"),
                };
                let session = match stream {
                    Some(s) => s,
                    None => self.gated(&self.params.slot.clone(), self.lsn)?,
                };
                self.start_stream(session)?;
                Ok(Poll::Idle)
            }
        }
    }

    /// Acknowledges `lsn` to the server: the slot may drop what precedes it.
    fn ack(&self, lsn: u64) {
        if let Phase::Stream { client } = &self.phase {
            client.update_applied_lsn(Lsn(lsn));
        }
    }

    /// The stream has passed `lsn` (windows before it stop applying once the rows read are
    /// matched against them, at the end of the poll).
    fn advance(&mut self, lsn: u64) {
        self.lsn = lsn;
        if !self.checkpointing {
            self.ack(lsn);
        }
    }

    fn poll_stream(&mut self, max_rows: usize) -> Result<Poll> {
        let mut rows: Vec<RawRow> = vec![];
        let mut ops: Vec<i8> = vec![];
        // Images kept only when their key passes the windows: (index in rows, commit lsn).
        let mut windowed: Vec<(usize, u64)> = vec![];
        let mut commit_lsn = 0u64;
        let started = Instant::now();
        while rows.len() < max_rows {
            let wait = match rows.is_empty() {
                true => Duration::from_millis(20),
                false => Duration::from_millis(1),
            };
            if !rows.is_empty()
                && started.elapsed() > Duration::from_millis(50)
                && self.in_txn.is_none()
            {
                break;
            }
            let Phase::Stream { client } = &mut self.phase else {
                unreachable!("streaming")
            };
            let event = match self
                .rt
                .block_on(async { tokio::time::timeout(wait, client.recv()).await })
            {
                Err(_) => break,
                Ok(Ok(Some(ev))) => ev,
                Ok(Ok(None)) => {
                    return Err(self.error(format!(
                        "the replication stream of {} ended",
                        self.params.target.describe()
                    )))
                }
                Ok(Err(e)) => return Err(self.replication_error("replication stream", e)),
            };
            match event {
                ReplicationEvent::Begin { final_lsn, .. } => {
                    commit_lsn = final_lsn.0;
                    // Returned before: a transaction that committed before the position.
                    self.in_txn = Some(final_lsn.0 < self.lsn);
                    self.txn_seen = 0;
                }
                ReplicationEvent::Commit { end_lsn, .. } => {
                    let returned_before = self.in_txn.take();
                    if returned_before == Some(false) {
                        self.txn_rows = 0;
                        self.skip_rows = 0;
                        self.advance(end_lsn.0);
                    }
                }
                // Outside a transaction, everything before the server's position was sent.
                ReplicationEvent::KeepAlive { wal_end, .. }
                    if self.in_txn.is_none() && wal_end.0 > self.lsn =>
                {
                    self.advance(wal_end.0);
                }
                ReplicationEvent::XLogData { data, .. } => {
                    let message = self
                        .parser
                        .parse_wal_message_bytes(data)
                        .map_err(|e| self.error(format!("a pgoutput message: {e}")))?
                        .message;
                    let skip = self.in_txn != Some(false);
                    let before = rows.len();
                    self.change(message, skip, &mut rows, &mut ops)?;
                    if rows.len() > before && !self.windows.is_empty() {
                        windowed.extend((before..rows.len()).map(|i| (i, commit_lsn)));
                    }
                }
                _ => {}
            }
        }
        if rows.is_empty() {
            return Ok(Poll::Idle);
        }
        let db = &self.db;
        let batch = db.decode_raw(&rows).map_err(|f| self.fatal(f))?;
        let batch = self.keyed.with_ops(batch, ops)?;
        let batch = self.keyed.filter_windows(batch, windowed, &self.windows)?;
        let lsn = self.lsn;
        self.windows.retain(|w| w.lsn > lsn);
        if batch.num_rows() == 0 {
            return Ok(Poll::Idle);
        }
        Ok(Poll::Batch { split: 0, batch })
    }

    /// One pgoutput message: a change of the table adds its rows (unless `skip`: its
    /// transaction was returned before).
    fn change(
        &mut self,
        message: LogicalReplicationMessage,
        skip: bool,
        rows: &mut Vec<RawRow>,
        ops: &mut Vec<i8>,
    ) -> Result<()> {
        use LogicalReplicationMessage as M;
        match message {
            M::Relation {
                relation_id,
                columns,
                ..
            } if relation_id == self.oid => {
                let names = &self.names;
                let map: Vec<Option<usize>> = columns
                    .iter()
                    .map(|c| names.iter().position(|n| *n == *c.name))
                    .collect();
                if let Some(gone) = (0..names.len()).find(|p| !map.contains(&Some(*p))) {
                    return Err(self.error(format!(
                        "column '{}' is no longer in table {}",
                        names[gone],
                        self.db.relation()
                    )));
                }
                self.columns = Some(map);
            }
            M::Insert { relation_id, tuple } if relation_id == self.oid => {
                let new = self.raw(&tuple, None)?;
                let op = match self.upsert {
                    true => Op::UpdateAfter,
                    false => Op::Insert,
                };
                self.image(skip, new, op, rows, ops);
            }
            M::Update {
                relation_id,
                old_tuple,
                new_tuple,
                ..
            } if relation_id == self.oid => {
                let old = old_tuple.map(|t| self.raw(&t, None)).transpose()?;
                let new = self.raw(&new_tuple, old.as_ref())?;
                match (self.upsert, old) {
                    (true, old) => {
                        // The key changed: the old key's row goes.
                        if let Some(old) = old {
                            if self.keyed.key.iter().any(|k| old[*k] != new[*k]) {
                                self.image(skip, old, Op::Delete, rows, ops);
                            }
                        }
                        self.image(skip, new, Op::UpdateAfter, rows, ops);
                    }
                    (false, Some(old)) => {
                        self.image(skip, old, Op::UpdateBefore, rows, ops);
                        self.image(skip, new, Op::UpdateAfter, rows, ops);
                    }
                    (false, None) => {
                        return Err(self.error(format!(
                            "an update of table {} came without its old row: run ALTER TABLE {} REPLICA IDENTITY FULL, \
                             or set 'changelog-mode' = 'upsert'",
                            self.db.relation(),
                            self.db.relation()
                        )))
                    }
                }
            }
            M::Delete {
                relation_id,
                old_tuple,
                ..
            } if relation_id == self.oid => {
                let old = self.raw(&old_tuple, None)?;
                self.image(skip, old, Op::Delete, rows, ops);
            }
            M::Truncate { relation_ids, .. } if relation_ids.contains(&self.oid) && !skip => {
                return Err(self.error(format!(
                    "table {} was truncated, which a changelog cannot express; start the job without its checkpoint to read the table anew",
                    self.db.relation()
                )));
            }
            _ => {}
        }
        Ok(())
    }

    /// A row image of the transaction under way.
    fn image(
        &mut self,
        skip: bool,
        row: RawRow,
        op: Op,
        rows: &mut Vec<RawRow>,
        ops: &mut Vec<i8>,
    ) {
        let index = self.txn_seen;
        self.txn_seen += 1;
        if skip || index < self.skip_rows {
            return;
        }
        self.txn_rows = index + 1;
        rows.push(row);
        ops.push(op as i8);
    }

    /// A tuple's values in the DDL's columns; an unchanged (TOASTed) value is taken from `old`.
    fn raw(&self, tuple: &TupleData, old: Option<&RawRow>) -> Result<RawRow> {
        let Some(map) = self.columns.as_ref() else {
            return Err(
                self.error("a change arrived before its table's description (pgoutput Relation)")
            );
        };
        let names = &self.names;
        let mut row: RawRow = vec![None; names.len()];
        for (j, p) in map.iter().enumerate() {
            let (Some(p), Some(c)) = (p, tuple.get_column(j)) else {
                continue;
            };
            row[*p] = if c.is_null() {
                None
            } else if c.is_unchanged() {
                match old {
                    Some(old) => old[*p].clone(),
                    None => {
                        return Err(self.error(format!(
                            "column '{}' of an update was not sent (an unchanged large value): run ALTER TABLE {} REPLICA IDENTITY FULL",
                            names[*p],
                            self.db.relation()
                        )))
                    }
                }
            } else if c.is_binary() {
                Some(c.raw_bytes())
            } else {
                return Err(self.error(format!(
                    "column '{}' arrived as text, not in binary",
                    names[*p]
                )));
            };
        }
        Ok(row)
    }

    fn read(&mut self, max_rows: usize) -> Result<Poll> {
        if matches!(self.phase, Phase::Start) {
            self.start()?;
        }
        match self.phase {
            Phase::Snapshot { .. } => self.poll_snapshot(max_rows),
            Phase::Stream { .. } => self.poll_stream(max_rows),
            Phase::Start => unreachable!("started above"),
        }
    }

    fn position(&self) -> SourceOffsets {
        let mut m = SourceOffsets::new();
        if let (Phase::Start, Some(r)) = (&self.phase, &self.restored) {
            return encode_offsets(r);
        }
        if matches!(self.phase, Phase::Start) {
            return m;
        }
        let snapshot = match self.phase {
            Phase::Snapshot { .. } => Some((self.snapshot_rows, self.snapshot_after.clone())),
            _ => None,
        };
        m.extend(encode_offsets(&Restored {
            lsn: self.lsn,
            txn_rows: self.txn_rows,
            windows: self.windows.clone(),
            snapshot,
        }));
        m
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

    fn checkpoint(&mut self, epoch: u64) {
        if !matches!(self.phase, Phase::Start) {
            self.acks.insert(epoch, self.lsn);
        }
    }

    fn committed(&mut self, epoch: u64) {
        let later = self.acks.split_off(&(epoch + 1));
        let done = std::mem::replace(&mut self.acks, later);
        if let Some(lsn) = done.values().max() {
            self.ack(*lsn);
        }
    }

    fn set_checkpointing(&mut self, on: bool) {
        self.checkpointing = on;
    }
}
