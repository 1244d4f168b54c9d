//! PostgreSQL for the `jdbc` sink, through `tokio-postgres`.
//!
//! A flush runs in one transaction: its rows go by binary `COPY` into temporary tables (rows
//! to upsert, keys to delete), then one `INSERT ... SELECT ... ON CONFLICT DO UPDATE` and one
//! `DELETE ... USING` apply them (an append-only sink copies straight into the table); the
//! progress row, when there is one, is written in the same transaction.

use std::error::Error as StdError;

use arrow::array::{
    Array, ArrayRef, AsArray, BinaryArray, BooleanArray, Date32Array, Decimal128Array,
    Float32Array, Float64Array, Int16Array, Int32Array, Int64Array, StringArray,
};
use arrow::datatypes::{DataType, TimeUnit};
use arrow::record_batch::RecordBatch;
use bytes::BytesMut;
use chrono::Datelike;
use sluice_common::{ChangeBatch, Error, Result};
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::{to_sql_checked, IsNull, ToSql, Type};

use super::{
    cast_column, family, split_ops, sql_type, Attempt, Database, Failure, Family, Layout, Target,
};

/// A sink column and the database column it is written to.
struct Column {
    /// The database's name.
    name: String,
    /// The database's name, quoted.
    quoted: String,
    ty: Type,
    /// The type as PostgreSQL writes it (`numeric(12,2)`).
    type_name: String,
    /// What the sink's values are cast to before encoding.
    cast: DataType,
}

pub(crate) struct Postgres {
    rt: std::sync::Arc<tokio::runtime::Runtime>,
    target: Target,
    layout: Layout,
    client: Option<tokio_postgres::Client>,
    /// The table, as PostgreSQL quotes it.
    relation: String,
    columns: Vec<Column>,
    progress: String,
    progress_quoted: String,
    job: String,
    sink: String,
    /// The statements of a flush, made once.
    copy_rows: String,
    copy_keys: String,
    apply_rows: String,
    apply_deletes: String,
}

fn quote(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Whether a failure is worth a retry: the connection went, or the server asks for one.
fn retryable(e: &tokio_postgres::Error) -> bool {
    use tokio_postgres::error::SqlState;
    match e.code() {
        None => true,
        Some(c) => {
            *c == SqlState::T_R_SERIALIZATION_FAILURE
                || *c == SqlState::T_R_DEADLOCK_DETECTED
                || *c == SqlState::ADMIN_SHUTDOWN
                || *c == SqlState::CRASH_SHUTDOWN
                || *c == SqlState::CANNOT_CONNECT_NOW
                || c.code().starts_with("08")
        }
    }
}

/// The full text of a client error (a server error's message and detail).
fn text(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => match db.detail() {
            Some(d) => format!("{} ({d})", db.message()),
            None => db.message().to_string(),
        },
        None => match e.source() {
            Some(s) => format!("{e}: {s}"),
            None => e.to_string(),
        },
    }
}

/// The PostgreSQL type a sink column family may be written to, and what to cast it to first.
fn encoding(from: &DataType, to: &Type) -> Option<DataType> {
    let f = family(from);
    let ok = |families: &[Family]| f == Family::Null || families.contains(&f);
    use Family as F;
    let cast = match *to {
        Type::INT2 if ok(&[F::Int]) => DataType::Int16,
        Type::INT4 if ok(&[F::Int]) => DataType::Int32,
        Type::INT8 if ok(&[F::Int]) => DataType::Int64,
        Type::FLOAT4 if ok(&[F::Int, F::Float, F::Decimal]) => DataType::Float32,
        Type::FLOAT8 if ok(&[F::Int, F::Float, F::Decimal]) => DataType::Float64,
        Type::NUMERIC if ok(&[F::Int, F::Float, F::Decimal]) => match from {
            DataType::Decimal128(..) => from.clone(),
            DataType::Float16 | DataType::Float32 | DataType::Float64 => {
                DataType::Decimal128(38, 9)
            }
            _ => DataType::Decimal128(38, 0),
        },
        Type::BOOL if ok(&[F::Bool]) => DataType::Boolean,
        Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME if ok(&[F::Text]) => DataType::Utf8,
        Type::BYTEA if ok(&[F::Binary]) => DataType::Binary,
        Type::DATE if ok(&[F::Date]) => DataType::Date32,
        Type::TIMESTAMP if ok(&[F::Timestamp, F::Date]) => {
            DataType::Timestamp(TimeUnit::Microsecond, None)
        }
        Type::TIMESTAMPTZ if ok(&[F::TimestampTz, F::Timestamp]) => {
            DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
        }
        _ => return None,
    };
    Some(if f == Family::Null {
        DataType::Null
    } else {
        cast
    })
}

/// What a Sluice type becomes in a suggested `CREATE TABLE`.
fn pg_type_of(t: &DataType) -> String {
    match family(t) {
        Family::Bool => "boolean".into(),
        Family::Int => match t {
            DataType::Int8 | DataType::Int16 | DataType::UInt8 => "smallint".into(),
            DataType::Int32 | DataType::UInt16 => "integer".into(),
            _ => "bigint".into(),
        },
        Family::Float => match t {
            DataType::Float32 | DataType::Float16 => "real".into(),
            _ => "double precision".into(),
        },
        Family::Decimal => match t {
            DataType::Decimal128(p, s) => format!("numeric({p}, {s})"),
            _ => "numeric".into(),
        },
        Family::Binary => "bytea".into(),
        Family::Date => "date".into(),
        Family::Timestamp => "timestamp".into(),
        Family::TimestampTz => "timestamptz".into(),
        _ => "text".into(),
    }
}

impl Postgres {
    pub fn connect(target: Target, layout: Layout, progress: String, sink: String) -> Result<Self> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| Error::connector(&layout.table, e.to_string()))?;
        let mut pg = Postgres {
            rt: std::sync::Arc::new(rt),
            target,
            layout,
            client: None,
            relation: String::new(),
            columns: vec![],
            progress_quoted: String::new(),
            progress,
            job: String::new(),
            sink,
            copy_rows: String::new(),
            copy_keys: String::new(),
            apply_rows: String::new(),
            apply_deletes: String::new(),
        };
        let (table, retries) = (pg.layout.table.clone(), pg.layout.retries);
        super::open_with_retries(&table, retries, || pg.open())?;
        Ok(pg)
    }

    fn error(&self, message: impl Into<String>) -> Error {
        Error::connector(&self.layout.table, message)
    }

    /// Connects, checks the table against the sink's columns, and prepares the statements.
    fn open(&mut self) -> Attempt<()> {
        let mut config = tokio_postgres::Config::new();
        let user = self
            .target
            .user
            .clone()
            .unwrap_or_else(|| "postgres".into());
        config
            .host(&self.target.host)
            .port(self.target.port)
            .dbname(&self.target.database)
            .user(&user)
            .application_name("sluice")
            .connect_timeout(self.layout.connect_timeout);
        if let Some(p) = &self.target.password {
            config.password(p);
        }
        let timeout = self.layout.connect_timeout;
        let connected = self.rt.block_on(async {
            tokio::time::timeout(timeout, config.connect(tokio_postgres::NoTls)).await
        });
        let where_ = self.target.describe();
        let (client, connection) = match connected {
            Err(_) => {
                return Err(Failure::Retry(format!(
                    "cannot reach {where_} within {timeout:?} (options 'url', 'sluice.connect-timeout')"
                )))
            }
            Ok(Err(e)) => {
                use tokio_postgres::error::SqlState;
                let why = text(&e);
                return Err(match e.code() {
                    Some(c) if *c == SqlState::INVALID_PASSWORD || *c == SqlState::INVALID_AUTHORIZATION_SPECIFICATION => {
                        Failure::Fatal(self.error(format!(
                            "{where_} refused user '{user}': {why} (check options 'username' and 'password')"
                        )))
                    }
                    Some(c) if *c == SqlState::INVALID_CATALOG_NAME => Failure::Fatal(self.error(format!(
                        "{where_}: {why} (option 'url' names the database)"
                    ))),
                    Some(_) => Failure::Fatal(self.error(format!("{where_}: {why}"))),
                    None => Failure::Retry(format!(
                        "cannot reach {where_} (option 'url'): {why}"
                    )),
                });
            }
            Ok(Ok(pair)) => pair,
        };
        self.rt.spawn(async move {
            let _ = connection.await;
        });
        self.client = Some(client);
        if self.columns.is_empty() {
            self.describe_table()?;
        }
        if self.layout.sink {
            let stage = self.stage_sql();
            self.exec(&stage)?;
        }
        Ok(())
    }

    fn client(&self) -> &tokio_postgres::Client {
        self.client.as_ref().expect("connected")
    }

    fn exec(&self, sql: &str) -> Attempt<()> {
        self.rt
            .block_on(self.client().batch_execute(sql))
            .map_err(|e| self.failure(sql, e))
    }

    fn failure(&self, what: &str, e: tokio_postgres::Error) -> Failure {
        if retryable(&e) {
            Failure::Retry(text(&e))
        } else {
            let what = what.lines().next().unwrap_or(what);
            Failure::Fatal(self.error(format!("{} ({what}): {}", self.target.describe(), text(&e))))
        }
    }

    /// Reads the table's columns and unique keys; matches the sink's columns to them.
    fn describe_table(&mut self) -> Attempt<()> {
        let table = self.layout.target_table.clone();
        let found = self
            .rt
            .block_on(self.client().query_opt(
                "SELECT c.oid, c.oid::regclass::text FROM pg_class c WHERE c.oid = to_regclass($1)",
                &[&table],
            ))
            .map_err(|e| self.failure("to_regclass", e))?;
        let Some(found) = found else {
            let columns: Vec<String> = self
                .layout
                .schema
                .fields()
                .iter()
                .map(|f| format!("{} {}", quote(f.name()), pg_type_of(f.data_type())))
                .collect();
            let key = match self.layout.key.is_empty() {
                true => String::new(),
                false => format!(
                    ", PRIMARY KEY ({})",
                    self.key_names()
                        .iter()
                        .map(|k| quote(k))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            };
            return Err(Failure::Fatal(self.error(format!(
                "table '{table}' does not exist in {} (option 'table-name'); create it first, e.g. CREATE TABLE {table} ({}{key})",
                self.target.describe(),
                columns.join(", ")
            ))));
        };
        let oid: u32 = found.get(0);
        self.relation = found.get(1);
        let rows = self
            .rt
            .block_on(self.client().query(
                "SELECT attname::text, atttypid, format_type(atttypid, atttypmod) FROM pg_attribute \
                 WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
                &[&oid],
            ))
            .map_err(|e| self.failure("pg_attribute", e))?;
        let db: Vec<(String, u32, String)> = rows
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect();
        let mut columns = vec![];
        let mut names = vec![];
        for field in self.layout.schema.fields() {
            let name = field.name();
            let found = db.iter().find(|c| c.0 == *name).or_else(|| {
                let mut m = db.iter().filter(|c| c.0.eq_ignore_ascii_case(name));
                match (m.next(), m.next()) {
                    (Some(c), None) => Some(c),
                    _ => None,
                }
            });
            let Some((db_name, type_oid, type_name)) = found else {
                return Err(Failure::Fatal(self.error(format!(
                    "column '{name}' is not in table {} of {} (its columns: {})",
                    self.relation,
                    self.target.describe(),
                    db.iter().map(|c| c.0.as_str()).collect::<Vec<_>>().join(", ")
                ))));
            };
            let ty = Type::from_oid(*type_oid);
            let cast = ty.as_ref().and_then(|t| encoding(field.data_type(), t));
            let (Some(ty), Some(cast)) = (ty, cast) else {
                return Err(Failure::Fatal(self.error(format!(
                    "column '{name}' is {} in the DDL but {type_name} in table {}: Sluice writes {} to PostgreSQL columns of type {}",
                    sql_type(field.data_type()),
                    self.relation,
                    sql_type(field.data_type()),
                    accepted_pg_types(field.data_type()),
                ))));
            };
            names.push(db_name.clone());
            columns.push(Column {
                name: db_name.clone(),
                quoted: quote(db_name),
                ty,
                type_name: type_name.clone(),
                cast,
            });
        }
        self.columns = columns;
        if !self.layout.key.is_empty() {
            let keys = self
                .rt
                .block_on(self.client().query(
                    "SELECT array_agg(a.attname::text ORDER BY a.attname) FROM pg_index i \
                     JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) \
                     WHERE i.indrelid = $1 AND i.indisunique AND i.indpred IS NULL GROUP BY i.indexrelid",
                    &[&oid],
                ))
                .map_err(|e| self.failure("pg_index", e))?;
            let unique: Vec<Vec<String>> = keys.iter().map(|r| r.get(0)).collect();
            let mut want: Vec<String> = self.layout.key.iter().map(|i| names[*i].clone()).collect();
            want.sort();
            if !unique.contains(&want) {
                let what = match self.layout.sink {
                    true => "the sink upserts by its PRIMARY KEY",
                    false => "the source matches rows by its PRIMARY KEY",
                };
                return Err(Failure::Fatal(self.error(format!(
                    "{what} ({}), but table {} has no primary key or unique constraint on those columns{}; add one (ALTER TABLE {} ADD PRIMARY KEY ({})), or change the DDL's PRIMARY KEY",
                    self.key_names().join(", "),
                    self.relation,
                    match unique.is_empty() {
                        true => String::new(),
                        false => format!(" (its unique keys: {})", unique.iter().map(|u| format!("({})", u.join(", "))).collect::<Vec<_>>().join(", ")),
                    },
                    self.relation,
                    want.join(", ")
                ))));
            }
        }
        self.prepare_sql();
        Ok(())
    }

    fn key_names(&self) -> Vec<String> {
        self.layout
            .key
            .iter()
            .map(|i| self.layout.schema.field(*i).name().clone())
            .collect()
    }

    /// The temporary tables a flush copies into (per connection, emptied at commit).
    fn stage_sql(&self) -> String {
        let all: Vec<&str> = self.columns.iter().map(|c| c.quoted.as_str()).collect();
        let keys: Vec<&str> = self
            .layout
            .key
            .iter()
            .map(|i| self.columns[*i].quoted.as_str())
            .collect();
        let mut sql = format!(
            "CREATE TEMP TABLE IF NOT EXISTS sluice_rows ON COMMIT DELETE ROWS AS SELECT {} FROM {} WITH NO DATA;",
            all.join(", "),
            self.relation
        );
        if !keys.is_empty() {
            sql.push_str(&format!(
                "CREATE TEMP TABLE IF NOT EXISTS sluice_keys ON COMMIT DELETE ROWS AS SELECT {} FROM {} WITH NO DATA;",
                keys.join(", "),
                self.relation
            ));
        }
        sql
    }

    fn prepare_sql(&mut self) {
        let all: Vec<&str> = self.columns.iter().map(|c| c.quoted.as_str()).collect();
        let keys: Vec<&str> = self
            .layout
            .key
            .iter()
            .map(|i| self.columns[*i].quoted.as_str())
            .collect();
        let list = all.join(", ");
        if keys.is_empty() {
            self.copy_rows = format!("COPY {} ({list}) FROM STDIN (FORMAT binary)", self.relation);
            return;
        }
        self.copy_rows = format!("COPY sluice_rows ({list}) FROM STDIN (FORMAT binary)");
        self.copy_keys = format!(
            "COPY sluice_keys ({}) FROM STDIN (FORMAT binary)",
            keys.join(", ")
        );
        let updates: Vec<String> = all
            .iter()
            .filter(|c| !keys.contains(c))
            .map(|c| format!("{c} = EXCLUDED.{c}"))
            .collect();
        let action = match updates.is_empty() {
            true => "NOTHING".to_string(),
            false => format!("UPDATE SET {}", updates.join(", ")),
        };
        self.apply_rows = format!(
            "INSERT INTO {} ({list}) SELECT {list} FROM sluice_rows ON CONFLICT ({}) DO {action}",
            self.relation,
            keys.join(", ")
        );
        self.apply_deletes = format!(
            "DELETE FROM {} t USING sluice_keys k WHERE {}",
            self.relation,
            keys.iter()
                .map(|k| format!("t.{k} = k.{k}"))
                .collect::<Vec<_>>()
                .join(" AND ")
        );
    }

    /// Casts a batch's columns (`which`: positions in the sink's schema) for encoding.
    fn cast(&self, data: &RecordBatch, which: &[usize]) -> Result<Vec<ArrayRef>> {
        which
            .iter()
            .enumerate()
            .map(|(j, i)| {
                let to = &self.columns[*i].cast;
                if *to == DataType::Null {
                    return Ok(arrow::array::new_null_array(
                        &DataType::Null,
                        data.num_rows(),
                    ));
                }
                cast_column(
                    &self.layout.table,
                    self.layout.schema.field(*i).name(),
                    data.column(j),
                    to,
                )
            })
            .collect()
    }

    /// Copies `data` (columns `which` of the sink) with `copy`.
    async fn copy(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        copy: &str,
        data: &RecordBatch,
        which: &[usize],
    ) -> std::result::Result<(), CopyFailure> {
        let columns = self.cast(data, which).map_err(CopyFailure::Data)?;
        let types: Vec<Type> = which.iter().map(|i| self.columns[*i].ty.clone()).collect();
        let sink = tx.copy_in(copy).await.map_err(CopyFailure::Pg)?;
        let writer = BinaryCopyInWriter::new(sink, &types);
        let mut writer = std::pin::pin!(writer);
        let mut row: Vec<Cell<'_>> = Vec::with_capacity(columns.len());
        for r in 0..data.num_rows() {
            row.clear();
            for c in &columns {
                row.push(cell(c, r).map_err(|e| CopyFailure::Data(self.error(e)))?);
            }
            writer
                .as_mut()
                .write_raw(row.iter())
                .await
                .map_err(CopyFailure::Pg)?;
        }
        writer.as_mut().finish().await.map_err(CopyFailure::Pg)?;
        Ok(())
    }

    async fn transaction(
        &mut self,
        rows: &[ChangeBatch],
        mark: Option<(usize, u64)>,
    ) -> std::result::Result<(), CopyFailure> {
        let keyed = !self.layout.key.is_empty();
        let all: Vec<usize> = (0..self.columns.len()).collect();
        let mut client = self.client.take().expect("connected");
        let result = async {
            let tx = client.transaction().await.map_err(CopyFailure::Pg)?;
            let (mut upserts, mut deletes) = (0, 0);
            for batch in rows {
                if !keyed {
                    self.copy(&tx, &self.copy_rows, &batch.data, &all).await?;
                    continue;
                }
                let (ins, del) = split_ops(batch).map_err(CopyFailure::Data)?;
                if ins.num_rows() > 0 {
                    self.copy(&tx, &self.copy_rows, &ins, &all).await?;
                    upserts += ins.num_rows();
                }
                if del.num_rows() > 0 {
                    let keys = del
                        .project(&self.layout.key)
                        .map_err(|e| CopyFailure::Data(e.into()))?;
                    self.copy(&tx, &self.copy_keys, &keys, &self.layout.key).await?;
                    deletes += del.num_rows();
                }
            }
            if upserts > 0 {
                tx.execute(&self.apply_rows, &[]).await.map_err(CopyFailure::Pg)?;
            }
            if deletes > 0 {
                tx.execute(&self.apply_deletes, &[]).await.map_err(CopyFailure::Pg)?;
            }
            if let Some((worker, epoch)) = mark {
                let sql = format!(
                    "INSERT INTO {} (job, sink, worker, epoch) VALUES ($1, $2, $3, $4) \
                     ON CONFLICT (job, sink, worker) DO UPDATE SET epoch = EXCLUDED.epoch, committed_at = now()",
                    self.progress_quoted
                );
                tx.execute(
                    &sql,
                    &[&self.job, &self.sink, &(worker as i32), &(epoch as i64)],
                )
                .await
                .map_err(CopyFailure::Pg)?;
            }
            tx.commit().await.map_err(CopyFailure::Pg)
        }
        .await;
        self.client = Some(client);
        result
    }
}

enum CopyFailure {
    Pg(tokio_postgres::Error),
    Data(Error),
}

/// The PostgreSQL types a Sluice type is written to, for messages.
fn accepted_pg_types(t: &DataType) -> &'static str {
    match family(t) {
        Family::Int => "smallint, integer, bigint, numeric, real or double precision",
        Family::Float | Family::Decimal => "numeric, real or double precision",
        Family::Bool => "boolean",
        Family::Text => "text, varchar or char",
        Family::Binary => "bytea",
        Family::Date => "date or timestamp",
        Family::Timestamp => "timestamp or timestamptz",
        Family::TimestampTz => "timestamptz",
        _ => "(none: this type cannot be written to PostgreSQL)",
    }
}

impl Database for Postgres {
    fn describe(&self) -> String {
        self.target.describe()
    }

    fn reconnect(&mut self) -> Attempt<()> {
        self.client = None;
        self.open()
    }

    fn ensure_progress(&mut self) -> Attempt<()> {
        self.progress_quoted = self
            .progress
            .split('.')
            .map(quote)
            .collect::<Vec<_>>()
            .join(".");
        if self.job.is_empty() {
            self.job = "sluice".into();
        }
        let sql = format!(
            "CREATE TABLE IF NOT EXISTS {} (job text NOT NULL, sink text NOT NULL, worker integer NOT NULL, \
             epoch bigint NOT NULL, committed_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (job, sink, worker))",
            self.progress_quoted
        );
        match self.exec(&sql) {
            Ok(()) => Ok(()),
            // Another worker created it at the same moment.
            Err(Failure::Fatal(e)) if e.to_string().contains("already exists") => Ok(()),
            Err(f) => Err(f),
        }
    }

    fn write(&mut self, rows: &[ChangeBatch], mark: Option<(usize, u64)>) -> Attempt<()> {
        if rows.is_empty() && mark.is_none() {
            return Ok(());
        }
        let rt = self.rt.clone();
        let result = rt.block_on(self.transaction(rows, mark));
        match result {
            Ok(()) => Ok(()),
            Err(CopyFailure::Data(e)) => Err(Failure::Fatal(e)),
            Err(CopyFailure::Pg(e)) => Err(self.failure("writing rows", e)),
        }
    }

    fn recorded(&mut self, worker: usize) -> Attempt<Option<u64>> {
        let sql = format!(
            "SELECT epoch FROM {} WHERE job = $1 AND sink = $2 AND worker = $3",
            self.progress_quoted
        );
        let row = self
            .rt
            .block_on(
                self.client()
                    .query_opt(&sql, &[&self.job, &self.sink, &(worker as i32)]),
            )
            .map_err(|e| self.failure("reading the progress table", e))?;
        Ok(row.map(|r| r.get::<_, i64>(0) as u64))
    }

    fn set_job(&mut self, job: &str) {
        self.job = job.to_string();
    }

    fn select(
        &mut self,
        keys: Option<&RecordBatch>,
        key_columns: &[usize],
    ) -> Attempt<RecordBatch> {
        let list = self
            .columns
            .iter()
            .map(|c| c.quoted.as_str())
            .collect::<Vec<_>>()
            .join(", ");
        let quoted = |i: &usize| self.columns[*i].quoted.clone();
        let (sql, arrays) = match keys {
            None => {
                let order: Vec<String> = match key_columns.is_empty() {
                    true => (0..self.columns.len()).map(|i| quoted(&i)).collect(),
                    false => key_columns.iter().map(quoted).collect(),
                };
                (
                    format!(
                        "SELECT {list} FROM {} ORDER BY {}",
                        self.relation,
                        order.join(", ")
                    ),
                    vec![],
                )
            }
            Some(keys) => {
                let arrays = self.cast(keys, key_columns).map_err(Failure::Fatal)?;
                let sql = match key_columns {
                    [k] => format!(
                        "SELECT {list} FROM {} WHERE {} = ANY($1)",
                        self.relation,
                        quoted(k)
                    ),
                    _ => format!(
                        "SELECT {list} FROM {} WHERE ({}) IN (SELECT * FROM unnest({}))",
                        self.relation,
                        key_columns
                            .iter()
                            .map(quoted)
                            .collect::<Vec<_>>()
                            .join(", "),
                        key_columns
                            .iter()
                            .enumerate()
                            .map(|(n, k)| format!("${}::{}[]", n + 1, self.columns[*k].type_name))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                };
                (sql, arrays)
            }
        };
        let mut params: Vec<Vec<Cell<'_>>> = vec![];
        for a in &arrays {
            let cells = (0..a.len())
                .map(|r| cell(a, r))
                .collect::<std::result::Result<Vec<_>, String>>()
                .map_err(|e| Failure::Fatal(self.error(e)))?;
            params.push(cells);
        }
        let refs: Vec<&(dyn ToSql + Sync)> =
            params.iter().map(|p| p as &(dyn ToSql + Sync)).collect();
        let rows = self
            .rt
            .block_on(self.client().query(&sql, &refs))
            .map_err(|e| self.failure("looking up rows", e))?;
        super::read_rows(&self.layout, &self.relation, rows.len(), |i| {
            decode(rows.as_slice(), i, &self.columns[i].ty)
        })
    }
}

/// A row as pgoutput's binary mode sends it: each column's value in PostgreSQL's binary
/// format (`None`: NULL), in the table's columns' order.
pub(crate) type RawRow = Vec<Option<bytes::Bytes>>;

/// Rows whose columns decode with `tokio-postgres`'s `FromSql`: query results, and rows of
/// binary values from logical replication.
trait Values {
    /// Column `i` of every row, read with `T`'s `FromSql`.
    fn column<'a, T: tokio_postgres::types::FromSql<'a>>(
        &'a self,
        i: usize,
    ) -> std::result::Result<Vec<Option<T>>, String>;
}

impl Values for [tokio_postgres::Row] {
    fn column<'a, T: tokio_postgres::types::FromSql<'a>>(
        &'a self,
        i: usize,
    ) -> std::result::Result<Vec<Option<T>>, String> {
        self.iter()
            .map(|r| r.try_get::<_, Option<T>>(i).map_err(|e| e.to_string()))
            .collect()
    }
}

/// Raw rows with the type of each column.
struct Raw<'r> {
    rows: &'r [RawRow],
    types: &'r [Type],
}

impl Values for Raw<'_> {
    fn column<'a, T: tokio_postgres::types::FromSql<'a>>(
        &'a self,
        i: usize,
    ) -> std::result::Result<Vec<Option<T>>, String> {
        self.rows
            .iter()
            .map(|r| {
                <Option<T> as tokio_postgres::types::FromSql>::from_sql_nullable(
                    &self.types[i],
                    r[i].as_deref(),
                )
                .map_err(|e| e.to_string())
            })
            .collect()
    }
}

/// Column `i` of `rows`, of PostgreSQL type `ty`, as the Arrow type nearest it.
fn decode<V: Values + ?Sized>(
    rows: &V,
    i: usize,
    ty: &Type,
) -> std::result::Result<ArrayRef, String> {
    use std::sync::Arc;
    fn get<'a, T: tokio_postgres::types::FromSql<'a>, V: Values + ?Sized>(
        rows: &'a V,
        i: usize,
    ) -> std::result::Result<Vec<Option<T>>, String> {
        rows.column(i)
    }
    Ok(match *ty {
        Type::INT2 => Arc::new(Int16Array::from(get::<i16, V>(rows, i)?)),
        Type::INT4 => Arc::new(Int32Array::from(get::<i32, V>(rows, i)?)),
        Type::INT8 => Arc::new(Int64Array::from(get::<i64, V>(rows, i)?)),
        Type::FLOAT4 => Arc::new(Float32Array::from(get::<f32, V>(rows, i)?)),
        Type::FLOAT8 => Arc::new(Float64Array::from(get::<f64, V>(rows, i)?)),
        Type::BOOL => Arc::new(BooleanArray::from(get::<bool, V>(rows, i)?)),
        Type::NUMERIC => Arc::new(StringArray::from(
            get::<rust_decimal::Decimal, V>(rows, i)?
                .into_iter()
                .map(|d| d.map(|d| d.to_string()))
                .collect::<Vec<_>>(),
        )),
        Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME => {
            Arc::new(StringArray::from(get::<&str, V>(rows, i)?))
        }
        Type::BYTEA => Arc::new(BinaryArray::from(get::<&[u8], V>(rows, i)?)),
        Type::DATE => Arc::new(Date32Array::from(
            get::<chrono::NaiveDate, V>(rows, i)?
                .into_iter()
                .map(|d| d.map(|d| d.num_days_from_ce() - 719_163))
                .collect::<Vec<_>>(),
        )),
        Type::TIMESTAMP => Arc::new(arrow::array::TimestampMicrosecondArray::from(
            get::<chrono::NaiveDateTime, V>(rows, i)?
                .into_iter()
                .map(|t| t.map(|t| t.and_utc().timestamp_micros()))
                .collect::<Vec<_>>(),
        )),
        Type::TIMESTAMPTZ => Arc::new(
            arrow::array::TimestampMicrosecondArray::from(
                get::<chrono::DateTime<chrono::Utc>, V>(rows, i)?
                    .into_iter()
                    .map(|t| t.map(|t| t.timestamp_micros()))
                    .collect::<Vec<_>>(),
            )
            .with_timezone("UTC"),
        ),
        ref other => return Err(format!("type {other} cannot be read")),
    })
}

/// One value of a row, encoded as the database column's type.
#[derive(Debug)]
enum Cell<'a> {
    Null,
    Bool(bool),
    I16(i16),
    I32(i32),
    I64(i64),
    F32(f32),
    F64(f64),
    Numeric(rust_decimal::Decimal),
    Text(&'a str),
    Bytes(&'a [u8]),
    Date(chrono::NaiveDate),
    Timestamp(chrono::NaiveDateTime),
    TimestampTz(chrono::DateTime<chrono::Utc>),
}

impl ToSql for Cell<'_> {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut BytesMut,
    ) -> std::result::Result<IsNull, Box<dyn StdError + Sync + Send>> {
        match self {
            Cell::Null => Ok(IsNull::Yes),
            Cell::Bool(v) => v.to_sql(ty, out),
            Cell::I16(v) => v.to_sql(ty, out),
            Cell::I32(v) => v.to_sql(ty, out),
            Cell::I64(v) => v.to_sql(ty, out),
            Cell::F32(v) => v.to_sql(ty, out),
            Cell::F64(v) => v.to_sql(ty, out),
            Cell::Numeric(v) => v.to_sql(ty, out),
            Cell::Text(v) => v.to_sql(ty, out),
            Cell::Bytes(v) => v.to_sql(ty, out),
            Cell::Date(v) => v.to_sql(ty, out),
            Cell::Timestamp(v) => v.to_sql(ty, out),
            Cell::TimestampTz(v) => v.to_sql(ty, out),
        }
    }

    fn accepts(_: &Type) -> bool {
        true
    }

    to_sql_checked!();
}

/// Row `r` of a column already cast to its encoding type.
fn cell(c: &ArrayRef, r: usize) -> std::result::Result<Cell<'_>, String> {
    if c.is_null(r) {
        return Ok(Cell::Null);
    }
    Ok(match c.data_type() {
        DataType::Null => Cell::Null,
        DataType::Boolean => Cell::Bool(
            c.as_any()
                .downcast_ref::<BooleanArray>()
                .expect("bool")
                .value(r),
        ),
        DataType::Int16 => Cell::I16(
            c.as_any()
                .downcast_ref::<Int16Array>()
                .expect("i16")
                .value(r),
        ),
        DataType::Int32 => Cell::I32(
            c.as_any()
                .downcast_ref::<Int32Array>()
                .expect("i32")
                .value(r),
        ),
        DataType::Int64 => Cell::I64(
            c.as_any()
                .downcast_ref::<Int64Array>()
                .expect("i64")
                .value(r),
        ),
        DataType::Float32 => Cell::F32(
            c.as_any()
                .downcast_ref::<Float32Array>()
                .expect("f32")
                .value(r),
        ),
        DataType::Float64 => Cell::F64(
            c.as_any()
                .downcast_ref::<Float64Array>()
                .expect("f64")
                .value(r),
        ),
        DataType::Decimal128(_, s) => {
            let v = c
                .as_any()
                .downcast_ref::<Decimal128Array>()
                .expect("decimal")
                .value(r);
            let d = rust_decimal::Decimal::try_from_i128_with_scale(v, (*s).max(0) as u32)
                .map_err(|e| {
                    format!("DECIMAL value {v}e-{s} does not fit PostgreSQL's encoder: {e}")
                })?;
            Cell::Numeric(d)
        }
        DataType::Utf8 => Cell::Text(
            c.as_any()
                .downcast_ref::<StringArray>()
                .expect("utf8")
                .value(r),
        ),
        DataType::Binary => Cell::Bytes(
            c.as_any()
                .downcast_ref::<BinaryArray>()
                .expect("binary")
                .value(r),
        ),
        DataType::Date32 => {
            let days = c
                .as_any()
                .downcast_ref::<Date32Array>()
                .expect("date")
                .value(r);
            Cell::Date(
                chrono::NaiveDate::from_num_days_from_ce_opt(days + 719_163)
                    .ok_or_else(|| format!("date {days} is out of range"))?,
            )
        }
        DataType::Timestamp(TimeUnit::Microsecond, tz) => {
            let us = c
                .as_primitive::<arrow::datatypes::TimestampMicrosecondType>()
                .value(r);
            let t = chrono::DateTime::from_timestamp_micros(us)
                .ok_or_else(|| format!("timestamp {us} µs is out of range"))?;
            match tz {
                Some(_) => Cell::TimestampTz(t),
                None => Cell::Timestamp(t.naive_utc()),
            }
        }
        other => return Err(format!("no PostgreSQL encoding for {other}")),
    })
}

/// For `postgres-cdc`: the table read through a replication slot's exported snapshot, and rows
/// of logical replication decoded as the table's columns.
impl Postgres {
    pub(super) fn relation(&self) -> &str {
        &self.relation
    }

    /// The database's names of the table's columns, in the DDL's order.
    pub(super) fn column_names(&self) -> Vec<String> {
        self.columns.iter().map(|c| c.name.clone()).collect()
    }

    pub(super) fn column_types(&self) -> Vec<Type> {
        self.columns.iter().map(|c| c.ty.clone()).collect()
    }

    /// A query's rows, each cell as text (`None` for NULL).
    pub(super) fn text_rows(&self, sql: &str) -> Attempt<Vec<Vec<Option<String>>>> {
        let messages = self
            .rt
            .block_on(self.client().simple_query(sql))
            .map_err(|e| self.failure(sql, e))?;
        Ok(messages
            .into_iter()
            .filter_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => {
                    Some((0..r.len()).map(|i| r.get(i).map(str::to_string)).collect())
                }
                _ => None,
            })
            .collect())
    }

    pub(super) fn execute(&self, sql: &str) -> Attempt<()> {
        self.exec(sql)
    }

    /// Opens a read-only transaction on exported snapshot `snapshot` and a cursor over the table
    /// ordered by `key` (text in byte order), after the key of `after`'s last row when given.
    pub(super) fn begin_snapshot(
        &mut self,
        snapshot: &str,
        after: Option<&RecordBatch>,
        key: &[usize],
    ) -> Attempt<()> {
        let list = self
            .columns
            .iter()
            .map(|c| c.quoted.as_str())
            .collect::<Vec<_>>()
            .join(", ");
        // Text keys compare as bytes, as the source's resume point does.
        let ordered: Vec<String> = key
            .iter()
            .map(|k| {
                let c = &self.columns[*k];
                match family(self.layout.schema.field(*k).data_type()) {
                    Family::Text => format!("{} COLLATE \"C\"", c.quoted),
                    _ => c.quoted.clone(),
                }
            })
            .collect();
        let mut filter = String::new();
        if let Some(after) = after {
            let mut literals = vec![];
            for (j, k) in key.iter().enumerate() {
                let column = after.column(j);
                let text = arrow::compute::cast(column, &DataType::Utf8)
                    .map_err(|e| Failure::Fatal(e.into()))?;
                let text = text.as_string::<i32>();
                let value = text.value(text.len() - 1).replace('\'', "''");
                literals.push(format!("'{value}'::{}", self.columns[*k].type_name));
            }
            filter = format!(
                " WHERE ({}) > ({})",
                ordered.join(", "),
                literals.join(", ")
            );
        }
        let sql = format!(
            "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; \
             SET TRANSACTION SNAPSHOT '{}'; \
             DECLARE sluice_snapshot NO SCROLL CURSOR FOR SELECT {list} FROM {}{filter} ORDER BY {}",
            snapshot.replace('\'', "''"),
            self.relation,
            ordered.join(", ")
        );
        self.exec(&sql)
    }

    /// The next `n` rows of the snapshot's cursor; `None` (and the transaction ended) after the
    /// last.
    pub(super) fn fetch(&mut self, n: usize) -> Attempt<Option<RecordBatch>> {
        let sql = format!("FETCH {} FROM sluice_snapshot", n.max(1));
        let rows = self
            .rt
            .block_on(self.client().query(&sql, &[]))
            .map_err(|e| self.failure("reading the snapshot", e))?;
        if rows.is_empty() {
            self.exec("COMMIT")?;
            return Ok(None);
        }
        super::read_rows(&self.layout, &self.relation, rows.len(), |i| {
            decode(rows.as_slice(), i, &self.columns[i].ty)
        })
        .map(Some)
    }

    /// Rows of binary values (in the table's columns' order) as a batch of the table's columns.
    pub(super) fn decode_raw(&self, rows: &[RawRow]) -> Attempt<RecordBatch> {
        let types = self.column_types();
        let raw = Raw {
            rows,
            types: &types,
        };
        super::read_rows(&self.layout, &self.relation, rows.len(), |i| {
            decode(&raw, i, &types[i])
        })
    }
}
