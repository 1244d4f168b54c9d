//! MySQL and MariaDB for the `jdbc` sink, through `mysql_async`.
//!
//! A flush runs in one transaction of multi-row statements with bound parameters:
//! `INSERT ... ON DUPLICATE KEY UPDATE` for upserts, `DELETE ... WHERE (key) IN (...)` for
//! deletes, plain `INSERT` for an append-only sink; then the progress row, when there is one.
//! The session's time zone is UTC, so TIMESTAMP_LTZ values are written as UTC.

use arrow::array::{
    Array, ArrayRef, AsArray, BinaryArray, BooleanArray, Date32Array, Float64Array, Int64Array,
    StringArray,
};
use arrow::datatypes::{DataType, TimeUnit};
use arrow::record_batch::RecordBatch;
use chrono::{Datelike, Timelike};
use mysql_async::prelude::Queryable;
use mysql_async::Value;
use sluice_common::{ChangeBatch, Error, Result};

use super::{
    cast_column, family, split_ops, sql_type, Attempt, Database, Failure, Family, Layout, Target,
};

/// Bound parameters per statement (the protocol allows 65535).
const MAX_PARAMS: usize = 16_000;

struct Column {
    /// The database's name.
    name: String,
    quoted: String,
    cast: DataType,
}

pub(crate) struct MySql {
    rt: std::sync::Arc<tokio::runtime::Runtime>,
    target: Target,
    layout: Layout,
    conn: Option<mysql_async::Conn>,
    relation: String,
    columns: Vec<Column>,
    /// Every column of the table, in the table's order (as the binlog's rows hold them).
    table_columns: Vec<String>,
    progress: String,
    progress_quoted: String,
    job: String,
    sink: String,
}

fn quote(name: &str) -> String {
    format!("`{}`", name.replace('`', "``"))
}

fn retryable(e: &mysql_async::Error) -> bool {
    match e {
        mysql_async::Error::Server(s) => matches!(s.code, 1205 | 1213 | 1053 | 1927),
        other => other.is_fatal(),
    }
}

/// The MySQL data types a sink column family may be written to, and what to cast it to.
fn encoding(from: &DataType, data_type: &str, column_type: &str) -> Option<DataType> {
    let f = family(from);
    let ok = |families: &[Family]| f == Family::Null || families.contains(&f);
    use Family as F;
    let cast = match data_type {
        "tinyint" | "smallint" | "mediumint" | "int" | "integer" | "bigint"
            if ok(&[F::Int]) || (f == F::Bool && column_type.starts_with("tinyint(1)")) =>
        {
            if f == F::Bool {
                DataType::Boolean
            } else {
                DataType::Int64
            }
        }
        "bit" if column_type == "bit(1)" && ok(&[F::Bool]) => DataType::Boolean,
        "decimal" | "numeric" if ok(&[F::Int, F::Float, F::Decimal]) => DataType::Utf8,
        "float" | "double" | "real" if ok(&[F::Int, F::Float, F::Decimal]) => DataType::Float64,
        "char" | "varchar" | "tinytext" | "text" | "mediumtext" | "longtext" | "enum" | "set"
        | "json"
            if ok(&[F::Text]) =>
        {
            DataType::Utf8
        }
        "binary" | "varbinary" | "tinyblob" | "blob" | "mediumblob" | "longblob"
            if ok(&[F::Binary]) =>
        {
            DataType::Binary
        }
        "date" if ok(&[F::Date]) => DataType::Date32,
        "datetime" | "timestamp" if ok(&[F::Timestamp, F::TimestampTz, F::Date]) => match f {
            F::TimestampTz => DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            _ => DataType::Timestamp(TimeUnit::Microsecond, None),
        },
        _ => return None,
    };
    Some(if f == Family::Null {
        DataType::Null
    } else {
        cast
    })
}

fn mysql_type_of(t: &DataType) -> String {
    match family(t) {
        Family::Bool => "BOOLEAN".into(),
        Family::Int => "BIGINT".into(),
        Family::Float => "DOUBLE".into(),
        Family::Decimal => match t {
            DataType::Decimal128(p, s) => format!("DECIMAL({}, {s})", (*p).min(65)),
            _ => "DECIMAL(38, 10)".into(),
        },
        Family::Binary => "BLOB".into(),
        Family::Date => "DATE".into(),
        Family::Timestamp | Family::TimestampTz => "DATETIME(6)".into(),
        _ => "VARCHAR(255)".into(),
    }
}

fn accepted_mysql_types(t: &DataType) -> &'static str {
    match family(t) {
        Family::Int => "TINYINT … BIGINT, DECIMAL, FLOAT or DOUBLE",
        Family::Float | Family::Decimal => "DECIMAL, FLOAT or DOUBLE",
        Family::Bool => "BOOLEAN (TINYINT(1)) or BIT(1)",
        Family::Text => "CHAR, VARCHAR, TEXT, ENUM, SET or JSON",
        Family::Binary => "BINARY, VARBINARY or BLOB",
        Family::Date => "DATE, DATETIME or TIMESTAMP",
        Family::Timestamp | Family::TimestampTz => "DATETIME or TIMESTAMP",
        _ => "(none: this type cannot be written to MySQL)",
    }
}

impl MySql {
    pub fn connect(target: Target, layout: Layout, progress: String, sink: String) -> Result<Self> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| Error::connector(&layout.table, e.to_string()))?;
        let mut db = MySql {
            rt: std::sync::Arc::new(rt),
            target,
            layout,
            conn: None,
            relation: String::new(),
            columns: vec![],
            table_columns: vec![],
            progress_quoted: quote(&progress),
            progress,
            job: "sluice".into(),
            sink,
        };
        let (table, retries) = (db.layout.table.clone(), db.layout.retries);
        super::open_with_retries(&table, retries, || db.open())?;
        Ok(db)
    }

    fn error(&self, message: impl Into<String>) -> Error {
        Error::connector(&self.layout.table, message)
    }

    fn failure(&self, what: &str, e: mysql_async::Error) -> Failure {
        if retryable(&e) {
            Failure::Retry(e.to_string())
        } else {
            Failure::Fatal(self.error(format!("{} ({what}): {e}", self.target.describe())))
        }
    }

    fn opts(&self) -> mysql_async::OptsBuilder {
        let user = self.target.user.clone().unwrap_or_else(|| "root".into());
        mysql_async::OptsBuilder::default()
            .ip_or_hostname(self.target.host.clone())
            .tcp_port(self.target.port)
            .user(Some(user))
            .pass(self.target.password.clone())
            .db_name(Some(self.target.database.clone()))
            .prefer_socket(false)
            .init(vec!["SET time_zone = '+00:00'"])
    }

    fn open(&mut self) -> Attempt<()> {
        let user = self.target.user.clone().unwrap_or_else(|| "root".into());
        let opts = self.opts();
        let timeout = self.layout.connect_timeout;
        let connected = self
            .rt
            .block_on(async { tokio::time::timeout(timeout, mysql_async::Conn::new(opts)).await });
        let where_ = self.target.describe();
        let conn = match connected {
            Err(_) => {
                return Err(Failure::Retry(format!(
                    "cannot reach {where_} within {timeout:?} (options 'url', 'sluice.connect-timeout')"
                )))
            }
            Ok(Err(mysql_async::Error::Server(s))) if s.code == 1045 => {
                return Err(Failure::Fatal(self.error(format!(
                    "{where_} refused user '{user}': {} (check options 'username' and 'password')",
                    s.message
                ))))
            }
            Ok(Err(mysql_async::Error::Server(s))) if s.code == 1049 => {
                return Err(Failure::Fatal(self.error(format!(
                    "{where_}: {} (option 'url' names the database)",
                    s.message
                ))))
            }
            Ok(Err(e)) if e.is_fatal() => {
                return Err(Failure::Retry(format!("cannot reach {where_} (option 'url'): {e}")))
            }
            Ok(Err(e)) => return Err(Failure::Fatal(self.error(format!("{where_}: {e}")))),
            Ok(Ok(conn)) => conn,
        };
        self.conn = Some(conn);
        if self.columns.is_empty() {
            self.describe_table()?;
        }
        Ok(())
    }

    fn conn(&mut self) -> &mut mysql_async::Conn {
        self.conn.as_mut().expect("connected")
    }

    fn describe_table(&mut self) -> Attempt<()> {
        let table = self.layout.target_table.clone();
        let (schema_name, table_name) = match table.split_once('.') {
            Some((s, t)) => (Some(s.to_string()), t.to_string()),
            None => (None, table.clone()),
        };
        self.relation = match &schema_name {
            Some(s) => format!("{}.{}", quote(s), quote(&table_name)),
            None => quote(&table_name),
        };
        let rt = self.rt.clone();
        let conn = self.conn.as_mut().expect("connected");
        let columns: Vec<(String, String, String)> = rt
            .block_on(conn.exec(
                "SELECT column_name, data_type, column_type FROM information_schema.columns \
                 WHERE table_schema = COALESCE(?, DATABASE()) AND table_name = ? ORDER BY ordinal_position",
                (schema_name.clone(), table_name.clone()),
            ))
            .map_err(|e| self.failure("information_schema.columns", e))?;
        if columns.is_empty() {
            let cols: Vec<String> = self
                .layout
                .schema
                .fields()
                .iter()
                .map(|f| format!("{} {}", quote(f.name()), mysql_type_of(f.data_type())))
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
                "table '{table}' does not exist in {} (option 'table-name'); create it first, e.g. CREATE TABLE {} ({}{key})",
                self.target.describe(),
                self.relation,
                cols.join(", ")
            ))));
        }
        let mut out = vec![];
        let mut names = vec![];
        for field in self.layout.schema.fields() {
            let name = field.name();
            // MySQL's column names are case-insensitive.
            let Some((db_name, data_type, column_type)) =
                columns.iter().find(|c| c.0.eq_ignore_ascii_case(name))
            else {
                return Err(Failure::Fatal(self.error(format!(
                    "column '{name}' of the sink is not in table {} of {} (its columns: {})",
                    self.relation,
                    self.target.describe(),
                    columns.iter().map(|c| c.0.as_str()).collect::<Vec<_>>().join(", ")
                ))));
            };
            let Some(cast) = encoding(
                field.data_type(),
                &data_type.to_lowercase(),
                &column_type.to_lowercase(),
            ) else {
                return Err(Failure::Fatal(self.error(format!(
                    "column '{name}' is {} in the sink but {column_type} in table {}: Sluice writes {} to MySQL columns of type {}",
                    sql_type(field.data_type()),
                    self.relation,
                    sql_type(field.data_type()),
                    accepted_mysql_types(field.data_type())
                ))));
            };
            names.push(db_name.to_lowercase());
            out.push(Column {
                name: db_name.clone(),
                quoted: quote(db_name),
                cast,
            });
        }
        self.columns = out;
        self.table_columns = columns.iter().map(|c| c.0.clone()).collect();
        if !self.layout.key.is_empty() {
            let conn = self.conn.as_mut().expect("connected");
            let unique: Vec<(String, String)> = rt
                .block_on(conn.exec(
                    "SELECT index_name, LOWER(GROUP_CONCAT(column_name ORDER BY LOWER(column_name) SEPARATOR ','))
                     FROM information_schema.statistics WHERE table_schema = COALESCE(?, DATABASE()) AND table_name = ? \
                     AND non_unique = 0 GROUP BY index_name",
                    (schema_name, table_name),
                ))
                .map_err(|e| self.failure("information_schema.statistics", e))?;
            let mut want: Vec<String> = self.layout.key.iter().map(|i| names[*i].clone()).collect();
            want.sort();
            let want = want.join(",");
            if !unique.iter().any(|(_, cols)| *cols == want) {
                return Err(Failure::Fatal(self.error(format!(
                    "the sink upserts by its PRIMARY KEY ({}), but table {} has no primary key or unique index on those columns{}; add one (ALTER TABLE {} ADD PRIMARY KEY ({})), or change the DDL's PRIMARY KEY",
                    self.key_names().join(", "),
                    self.relation,
                    match unique.is_empty() {
                        true => String::new(),
                        false => format!(" (its unique keys: {})", unique.iter().map(|u| format!("({})", u.1)).collect::<Vec<_>>().join(", ")),
                    },
                    self.relation,
                    want
                ))));
            }
        }
        Ok(())
    }

    fn key_names(&self) -> Vec<String> {
        self.layout
            .key
            .iter()
            .map(|i| self.layout.schema.field(*i).name().clone())
            .collect()
    }

    /// The rows of `data` (columns `which` of the sink) as parameter values, row by row.
    fn values(&self, data: &RecordBatch, which: &[usize]) -> Result<Vec<Vec<Value>>> {
        let columns: Vec<ArrayRef> = which
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
            .collect::<Result<_>>()?;
        (0..data.num_rows())
            .map(|r| {
                columns
                    .iter()
                    .map(|c| value(c, r).map_err(|e| self.error(e)))
                    .collect()
            })
            .collect()
    }

    /// Runs `head` + `(?, ...)` groups for `rows`, in chunks, with `tail` after each chunk.
    async fn chunked(
        tx: &mut mysql_async::Transaction<'_>,
        head: &str,
        group: &str,
        tail: &str,
        rows: Vec<Vec<Value>>,
    ) -> std::result::Result<(), mysql_async::Error> {
        let width = rows.first().map_or(1, |r| r.len()).max(1);
        let per = (MAX_PARAMS / width).clamp(1, 2_000);
        let mut rows = rows.into_iter().peekable();
        while rows.peek().is_some() {
            let chunk: Vec<Vec<Value>> = rows.by_ref().take(per).collect();
            let sql = format!("{head}{}{tail}", vec![group; chunk.len()].join(", "));
            let params: Vec<Value> = chunk.into_iter().flatten().collect();
            tx.exec_drop(sql, mysql_async::Params::Positional(params))
                .await?;
        }
        Ok(())
    }

    async fn transaction(
        &mut self,
        rows: &[ChangeBatch],
        mark: Option<(usize, u64)>,
    ) -> std::result::Result<(), TxFailure> {
        let keyed = !self.layout.key.is_empty();
        let all: Vec<usize> = (0..self.columns.len()).collect();
        let list = self
            .columns
            .iter()
            .map(|c| c.quoted.as_str())
            .collect::<Vec<_>>()
            .join(", ");
        let group = format!("({})", vec!["?"; self.columns.len()].join(", "));
        let keys: Vec<&str> = self
            .layout
            .key
            .iter()
            .map(|i| self.columns[*i].quoted.as_str())
            .collect();
        let key_group = format!("({})", vec!["?"; keys.len()].join(", "));
        let updates: Vec<String> = self
            .columns
            .iter()
            .map(|c| c.quoted.as_str())
            .filter(|c| !keys.contains(c))
            .map(|c| format!("{c} = VALUES({c})"))
            .collect();
        let on_duplicate = match (keyed, updates.is_empty()) {
            (false, _) => String::new(),
            (true, true) => format!(" ON DUPLICATE KEY UPDATE {0} = {0}", keys[0]),
            (true, false) => format!(" ON DUPLICATE KEY UPDATE {}", updates.join(", ")),
        };
        let mut batches = vec![];
        for batch in rows {
            if !keyed {
                batches.push((
                    self.values(&batch.data, &all).map_err(TxFailure::Data)?,
                    vec![],
                ));
                continue;
            }
            let (ins, del) = split_ops(batch).map_err(TxFailure::Data)?;
            let del = del
                .project(&self.layout.key)
                .map_err(|e| TxFailure::Data(e.into()))?;
            batches.push((
                self.values(&ins, &all).map_err(TxFailure::Data)?,
                self.values(&del, &self.layout.key)
                    .map_err(TxFailure::Data)?,
            ));
        }
        let insert = format!("INSERT INTO {} ({list}) VALUES ", self.relation);
        let delete = format!(
            "DELETE FROM {} WHERE ({}) IN (",
            self.relation,
            keys.join(", ")
        );
        let progress = format!(
            "INSERT INTO {} (job, sink, worker, epoch) VALUES (?, ?, ?, ?) \
             ON DUPLICATE KEY UPDATE epoch = VALUES(epoch), committed_at = CURRENT_TIMESTAMP(6)",
            self.progress_quoted
        );
        let (job, sink) = (self.job.clone(), self.sink.clone());
        let conn = self.conn.as_mut().expect("connected");
        let mut tx = conn
            .start_transaction(mysql_async::TxOpts::default())
            .await
            .map_err(TxFailure::Db)?;
        for (upserts, deletes) in batches {
            if !deletes.is_empty() {
                Self::chunked(&mut tx, &delete, &key_group, ")", deletes)
                    .await
                    .map_err(TxFailure::Db)?;
            }
            if !upserts.is_empty() {
                Self::chunked(&mut tx, &insert, &group, &on_duplicate, upserts)
                    .await
                    .map_err(TxFailure::Db)?;
            }
        }
        if let Some((worker, epoch)) = mark {
            tx.exec_drop(progress, (job, sink, worker as i64, epoch as i64))
                .await
                .map_err(TxFailure::Db)?;
        }
        tx.commit().await.map_err(TxFailure::Db)
    }
}

enum TxFailure {
    Db(mysql_async::Error),
    Data(Error),
}

impl Drop for MySql {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            let _ = self.rt.block_on(conn.disconnect());
        }
    }
}

impl Database for MySql {
    fn describe(&self) -> String {
        self.target.describe()
    }

    fn reconnect(&mut self) -> Attempt<()> {
        // The old connection is gone; dropping it must not wait for it.
        if let Some(conn) = self.conn.take() {
            let rt = self.rt.clone();
            let _ = rt.block_on(async {
                tokio::time::timeout(std::time::Duration::from_millis(100), conn.disconnect()).await
            });
        }
        self.open()
    }

    fn ensure_progress(&mut self) -> Attempt<()> {
        let sql = format!(
            "CREATE TABLE IF NOT EXISTS {} (job VARCHAR(255) NOT NULL, sink VARCHAR(255) NOT NULL, \
             worker INT NOT NULL, epoch BIGINT NOT NULL, committed_at DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6), \
             PRIMARY KEY (job, sink, worker))",
            self.progress_quoted
        );
        let rt = self.rt.clone();
        rt.block_on(self.conn().query_drop(sql))
            .map_err(|e| self.failure(&format!("creating the progress table {}", self.progress), e))
    }

    fn write(&mut self, rows: &[ChangeBatch], mark: Option<(usize, u64)>) -> Attempt<()> {
        if rows.is_empty() && mark.is_none() {
            return Ok(());
        }
        let rt = self.rt.clone();
        match rt.block_on(self.transaction(rows, mark)) {
            Ok(()) => Ok(()),
            Err(TxFailure::Data(e)) => Err(Failure::Fatal(e)),
            Err(TxFailure::Db(e)) => Err(self.failure("writing rows", e)),
        }
    }

    fn recorded(&mut self, worker: usize) -> Attempt<Option<u64>> {
        let sql = format!(
            "SELECT epoch FROM {} WHERE job = ? AND sink = ? AND worker = ?",
            self.progress_quoted
        );
        let (job, sink) = (self.job.clone(), self.sink.clone());
        let rt = self.rt.clone();
        let row: Option<i64> = rt
            .block_on(self.conn().exec_first(sql, (job, sink, worker as i64)))
            .map_err(|e| self.failure("reading the progress table", e))?;
        Ok(row.map(|e| e as u64))
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
        let key_list = key_columns
            .iter()
            .map(quoted)
            .collect::<Vec<_>>()
            .join(", ");
        let mut queries: Vec<(String, Vec<Value>)> = vec![];
        match keys {
            None => {
                let order = match key_columns.is_empty() {
                    true => list.clone(),
                    false => key_list.clone(),
                };
                queries.push((
                    format!("SELECT {list} FROM {} ORDER BY {order}", self.relation),
                    vec![],
                ));
            }
            Some(keys) => {
                let rows = self.values(keys, key_columns).map_err(Failure::Fatal)?;
                let group = format!("({})", vec!["?"; key_columns.len()].join(", "));
                let per = (MAX_PARAMS / key_columns.len().max(1)).clamp(1, 2_000);
                for chunk in rows.chunks(per) {
                    queries.push((
                        format!(
                            "SELECT {list} FROM {} WHERE ({key_list}) IN ({})",
                            self.relation,
                            vec![group.as_str(); chunk.len()].join(", ")
                        ),
                        chunk.iter().flatten().cloned().collect(),
                    ));
                }
            }
        }
        let rt = self.rt.clone();
        let mut got: Vec<mysql_async::Row> = vec![];
        for (sql, params) in queries {
            let conn = self.conn.as_mut().expect("connected");
            let rows: Vec<mysql_async::Row> = rt
                .block_on(conn.exec(sql, mysql_async::Params::Positional(params)))
                .map_err(|e| self.failure("looking up rows", e))?;
            got.extend(rows);
        }
        let got: Vec<Vec<Value>> = got.into_iter().map(mysql_async::Row::unwrap).collect();
        super::read_rows(&self.layout, &self.relation, got.len(), |i| {
            decode(&got, i, &self.columns[i].cast)
        })
    }
}

/// Column `i` of `rows` as `ty` (the column's encoding type).
fn decode(rows: &[Vec<Value>], i: usize, ty: &DataType) -> std::result::Result<ArrayRef, String> {
    use std::sync::Arc;
    let values = rows.iter().map(|r| r[i].clone());
    let text = |v: &Value| -> Option<String> {
        match v {
            Value::NULL => None,
            Value::Bytes(b) => Some(String::from_utf8_lossy(b).into_owned()),
            Value::Int(v) => Some(v.to_string()),
            Value::UInt(v) => Some(v.to_string()),
            Value::Float(v) => Some(v.to_string()),
            Value::Double(v) => Some(v.to_string()),
            other => Some(other.as_sql(true)),
        }
    };
    let micros = |v: &Value| -> Option<i64> {
        match v {
            Value::Date(y, mo, d, h, mi, s, us) => {
                chrono::NaiveDate::from_ymd_opt(*y as i32, *mo as u32, *d as u32)
                    .and_then(|d| d.and_hms_micro_opt(*h as u32, *mi as u32, *s as u32, *us))
                    .map(|t| t.and_utc().timestamp_micros())
            }
            _ => None,
        }
    };
    Ok(match ty {
        DataType::Null => arrow::array::new_null_array(&DataType::Null, rows.len()),
        DataType::Boolean | DataType::Int64 => {
            let ints: Vec<Option<i64>> = values
                .map(|v| match v {
                    Value::NULL => Ok(None),
                    Value::Int(v) => Ok(Some(v)),
                    Value::UInt(v) => Ok(Some(v as i64)),
                    other => text(&other)
                        .unwrap_or_default()
                        .parse::<i64>()
                        .map(Some)
                        .map_err(|e| format!("{other:?}: {e}")),
                })
                .collect::<std::result::Result<_, String>>()?;
            if *ty == DataType::Boolean {
                Arc::new(BooleanArray::from(
                    ints.into_iter()
                        .map(|v| v.map(|v| v != 0))
                        .collect::<Vec<_>>(),
                ))
            } else {
                Arc::new(Int64Array::from(ints))
            }
        }
        DataType::Float64 => Arc::new(Float64Array::from(
            values
                .map(|v| match v {
                    Value::NULL => Ok(None),
                    Value::Double(v) => Ok(Some(v)),
                    Value::Float(v) => Ok(Some(v as f64)),
                    Value::Int(v) => Ok(Some(v as f64)),
                    Value::UInt(v) => Ok(Some(v as f64)),
                    other => text(&other)
                        .unwrap_or_default()
                        .parse::<f64>()
                        .map(Some)
                        .map_err(|e| format!("{other:?}: {e}")),
                })
                .collect::<std::result::Result<Vec<_>, String>>()?,
        )),
        DataType::Utf8 => Arc::new(StringArray::from(
            values.map(|v| text(&v)).collect::<Vec<_>>(),
        )),
        DataType::Binary => Arc::new(BinaryArray::from(
            values
                .map(|v| match v {
                    Value::NULL => None,
                    Value::Bytes(b) => Some(b),
                    other => text(&other).map(String::into_bytes),
                })
                .collect::<Vec<_>>()
                .iter()
                .map(|b| b.as_deref())
                .collect::<Vec<_>>(),
        )),
        DataType::Date32 => Arc::new(Date32Array::from(
            values
                .map(|v| micros(&v).map(|us| us.div_euclid(86_400_000_000) as i32))
                .collect::<Vec<_>>(),
        )),
        DataType::Timestamp(TimeUnit::Microsecond, tz) => {
            let a = arrow::array::TimestampMicrosecondArray::from(
                values.map(|v| micros(&v)).collect::<Vec<_>>(),
            );
            match tz {
                Some(tz) => Arc::new(a.with_timezone(tz.clone())),
                None => Arc::new(a),
            }
        }
        other => return Err(format!("type {other} cannot be read")),
    })
}

/// Row `r` of a column already cast to its encoding type.
fn value(c: &ArrayRef, r: usize) -> std::result::Result<Value, String> {
    if c.is_null(r) {
        return Ok(Value::NULL);
    }
    Ok(match c.data_type() {
        DataType::Null => Value::NULL,
        DataType::Boolean => Value::Int(
            c.as_any()
                .downcast_ref::<BooleanArray>()
                .expect("bool")
                .value(r) as i64,
        ),
        DataType::Int64 => Value::Int(
            c.as_any()
                .downcast_ref::<Int64Array>()
                .expect("i64")
                .value(r),
        ),
        DataType::Float64 => Value::Double(
            c.as_any()
                .downcast_ref::<Float64Array>()
                .expect("f64")
                .value(r),
        ),
        DataType::Utf8 => Value::Bytes(
            c.as_any()
                .downcast_ref::<StringArray>()
                .expect("utf8")
                .value(r)
                .as_bytes()
                .to_vec(),
        ),
        DataType::Binary => Value::Bytes(
            c.as_any()
                .downcast_ref::<BinaryArray>()
                .expect("binary")
                .value(r)
                .to_vec(),
        ),
        DataType::Date32 => {
            let days = c
                .as_any()
                .downcast_ref::<Date32Array>()
                .expect("date")
                .value(r);
            let d = chrono::NaiveDate::from_num_days_from_ce_opt(days + 719_163)
                .ok_or_else(|| format!("date {days} is out of range"))?;
            Value::Date(d.year() as u16, d.month() as u8, d.day() as u8, 0, 0, 0, 0)
        }
        DataType::Timestamp(TimeUnit::Microsecond, _) => {
            let us = c
                .as_primitive::<arrow::datatypes::TimestampMicrosecondType>()
                .value(r);
            let t = chrono::DateTime::from_timestamp_micros(us)
                .ok_or_else(|| format!("timestamp {us} µs is out of range"))?
                .naive_utc();
            Value::Date(
                t.year() as u16,
                t.month() as u8,
                t.day() as u8,
                t.hour() as u8,
                t.minute() as u8,
                t.second() as u8,
                t.nanosecond() / 1000,
            )
        }
        other => return Err(format!("no MySQL encoding for {other}")),
    })
}

/// For `mysql-cdc`: the table read in a consistent snapshot whose binlog position MariaDB
/// reports, and binlog rows decoded as the table's columns.
impl MySql {
    pub(super) fn relation(&self) -> &str {
        &self.relation
    }

    /// The database's names of the DDL's columns, in the DDL's order.
    pub(super) fn column_names(&self) -> Vec<String> {
        self.columns.iter().map(|c| c.name.clone()).collect()
    }

    /// Every column of the table, in its order.
    pub(super) fn table_columns(&self) -> &[String] {
        &self.table_columns
    }

    /// A new connection of the same user and database (a binlog stream takes one whole).
    pub(super) fn new_conn(&self) -> Attempt<mysql_async::Conn> {
        let opts = self.opts();
        self.rt
            .block_on(mysql_async::Conn::new(opts))
            .map_err(|e| self.failure("connecting", e))
    }

    pub(super) fn runtime(&self) -> std::sync::Arc<tokio::runtime::Runtime> {
        self.rt.clone()
    }

    /// A query's rows, each cell as text (`None` for NULL).
    pub(super) fn text_rows(&mut self, sql: &str) -> Attempt<Vec<Vec<Option<String>>>> {
        let rt = self.rt.clone();
        let rows: Vec<mysql_async::Row> = rt
            .block_on(self.conn().query(sql))
            .map_err(|e| self.failure(sql, e))?;
        Ok(rows
            .into_iter()
            .map(|r| {
                r.unwrap()
                    .into_iter()
                    .map(|v| match v {
                        Value::NULL => None,
                        Value::Bytes(b) => Some(String::from_utf8_lossy(&b).into_owned()),
                        other => Some(other.as_sql(true)),
                    })
                    .collect()
            })
            .collect())
    }

    /// Starts a consistent-snapshot transaction; the binlog position it sees up to (MariaDB's
    /// `binlog_snapshot_file` and `_position`).
    pub(super) fn begin_snapshot(&mut self) -> Attempt<(String, u64)> {
        let rt = self.rt.clone();
        rt.block_on(
            self.conn()
                .query_drop("SET SESSION TRANSACTION ISOLATION LEVEL REPEATABLE READ"),
        )
        .map_err(|e| self.failure("SET TRANSACTION", e))?;
        rt.block_on(
            self.conn()
                .query_drop("START TRANSACTION WITH CONSISTENT SNAPSHOT"),
        )
        .map_err(|e| self.failure("START TRANSACTION WITH CONSISTENT SNAPSHOT", e))?;
        let status = self.text_rows("SHOW STATUS LIKE 'binlog_snapshot_%'")?;
        let get = |name: &str| {
            status
                .iter()
                .find(|r| {
                    r[0].as_deref()
                        .is_some_and(|n| n.eq_ignore_ascii_case(name))
                })
                .and_then(|r| r[1].clone())
        };
        match (get("binlog_snapshot_file"), get("binlog_snapshot_position")) {
            (Some(file), Some(pos)) if !file.is_empty() => Ok((file, pos.parse().unwrap_or(0))),
            _ => Err(Failure::Fatal(self.error(format!(
                "{} reports no binlog_snapshot_file: the snapshot's binlog position needs MariaDB (or Percona Server)",
                self.target.describe()
            )))),
        }
    }

    /// The next `n` rows of the snapshot in `key` order (text as bytes), after the key of
    /// `after`'s last row when given; the transaction ends after the last.
    pub(super) fn fetch_after(
        &mut self,
        after: Option<&RecordBatch>,
        key: &[usize],
        n: usize,
    ) -> Attempt<Option<RecordBatch>> {
        let list = self
            .columns
            .iter()
            .map(|c| c.quoted.as_str())
            .collect::<Vec<_>>()
            .join(", ");
        let ordered: Vec<String> = key
            .iter()
            .map(|k| match family(self.layout.schema.field(*k).data_type()) {
                Family::Text => format!("BINARY {}", self.columns[*k].quoted),
                _ => self.columns[*k].quoted.clone(),
            })
            .collect();
        let mut params = vec![];
        let mut filter = String::new();
        if let Some(after) = after {
            let last = after.slice(after.num_rows() - 1, 1);
            let casts: Vec<DataType> = key.iter().map(|k| self.columns[*k].cast.clone()).collect();
            params = last
                .columns()
                .iter()
                .zip(&casts)
                .map(|(c, to)| {
                    let c = cast_column(&self.layout.table, "key", c, to)?;
                    value(&c, 0).map_err(|e| self.error(e))
                })
                .collect::<Result<Vec<_>>>()
                .map_err(Failure::Fatal)?;
            let marks: Vec<String> = key
                .iter()
                .map(|k| match family(self.layout.schema.field(*k).data_type()) {
                    Family::Text => "BINARY ?".to_string(),
                    _ => "?".to_string(),
                })
                .collect();
            filter = format!(" WHERE ({}) > ({})", ordered.join(", "), marks.join(", "));
        }
        let sql = format!(
            "SELECT {list} FROM {}{filter} ORDER BY {} LIMIT {}",
            self.relation,
            ordered.join(", "),
            n.max(1)
        );
        let rt = self.rt.clone();
        let rows: Vec<mysql_async::Row> = rt
            .block_on(
                self.conn()
                    .exec(sql, mysql_async::Params::Positional(params)),
            )
            .map_err(|e| self.failure("reading the snapshot", e))?;
        if rows.is_empty() {
            rt.block_on(self.conn().query_drop("COMMIT"))
                .map_err(|e| self.failure("COMMIT", e))?;
            return Ok(None);
        }
        let rows: Vec<Vec<Value>> = rows.into_iter().map(mysql_async::Row::unwrap).collect();
        self.decode_values(&rows).map(Some)
    }

    /// Rows of values (in the DDL's columns' order) as a batch of the table's columns.
    pub(super) fn decode_values(&self, rows: &[Vec<Value>]) -> Attempt<RecordBatch> {
        super::read_rows(&self.layout, &self.relation, rows.len(), |i| {
            decode(rows, i, &self.columns[i].cast)
        })
    }
}
