//! Where the catalog is kept: embedded SQLite (`<data-dir>/catalog.db`, the default), or a
//! PostgreSQL database (`--catalog postgres://...`) that several servers share.
//!
//! The catalog's statements are written once, in the SQL both understand, with `$1`, `$2`, ...
//! parameters; integers are 64-bit and text is text on both.

use std::path::Path;
use std::sync::mpsc;
use std::sync::Mutex;

use crate::error::ApiError;

/// A parameter or a column value.
#[derive(Debug, Clone, PartialEq)]
pub enum Val {
    Null,
    Int(i64),
    Text(String),
}

impl Val {
    pub fn text(&self) -> String {
        match self {
            Val::Text(s) => s.clone(),
            Val::Int(n) => n.to_string(),
            Val::Null => String::new(),
        }
    }

    pub fn opt_text(&self) -> Option<String> {
        match self {
            Val::Null => None,
            v => Some(v.text()),
        }
    }

    pub fn int(&self) -> i64 {
        match self {
            Val::Int(n) => *n,
            Val::Text(s) => s.parse().unwrap_or(0),
            Val::Null => 0,
        }
    }
}

impl From<&str> for Val {
    fn from(s: &str) -> Val {
        Val::Text(s.to_string())
    }
}

impl From<String> for Val {
    fn from(s: String) -> Val {
        Val::Text(s)
    }
}

impl From<&String> for Val {
    fn from(s: &String) -> Val {
        Val::Text(s.clone())
    }
}

impl From<i64> for Val {
    fn from(n: i64) -> Val {
        Val::Int(n)
    }
}

impl From<Option<&str>> for Val {
    fn from(s: Option<&str>) -> Val {
        s.map_or(Val::Null, Val::from)
    }
}

pub type Row = Vec<Val>;

/// The tables, in SQL both stores run once `{int}` and `{serial}` are spelled their way.
const TABLES: &str = "
     CREATE TABLE IF NOT EXISTS tenants (
         name TEXT PRIMARY KEY,
         quotas TEXT NOT NULL DEFAULT '{}',
         created_ms {int} NOT NULL);
     CREATE TABLE IF NOT EXISTS users (
         name TEXT PRIMARY KEY,
         tenant TEXT NOT NULL REFERENCES tenants(name) ON DELETE CASCADE,
         role TEXT NOT NULL,
         verifier TEXT NOT NULL);
     CREATE TABLE IF NOT EXISTS tokens (
         id TEXT PRIMARY KEY,
         hash TEXT NOT NULL UNIQUE,
         user_name TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE,
         revoked {int} NOT NULL DEFAULT 0,
         created_ms {int} NOT NULL);
     CREATE TABLE IF NOT EXISTS objects (
         seq {serial},
         tenant TEXT NOT NULL REFERENCES tenants(name) ON DELETE CASCADE,
         name TEXT NOT NULL,
         kind TEXT NOT NULL,
         sql TEXT NOT NULL,
         UNIQUE (tenant, name));
     CREATE TABLE IF NOT EXISTS pipelines (
         tenant TEXT NOT NULL REFERENCES tenants(name) ON DELETE CASCADE,
         name TEXT NOT NULL,
         script TEXT NOT NULL,
         statements TEXT NOT NULL,
         views TEXT NOT NULL,
         parallelism {int} NOT NULL,
         desired TEXT NOT NULL,
         status TEXT NOT NULL,
         restarts {int} NOT NULL DEFAULT 0,
         last_error TEXT,
         created_ms {int} NOT NULL,
         PRIMARY KEY (tenant, name));
     CREATE TABLE IF NOT EXISTS leases (
         tenant TEXT NOT NULL,
         name TEXT NOT NULL,
         holder TEXT NOT NULL,
         expires_ms {int} NOT NULL,
         PRIMARY KEY (tenant, name));";

fn sqlite_schema() -> String {
    format!(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON; {}",
        TABLES
            .replace("{int}", "INTEGER")
            .replace("{serial}", "INTEGER PRIMARY KEY AUTOINCREMENT")
    )
}

fn postgres_schema() -> String {
    TABLES
        .replace("{int}", "BIGINT")
        .replace("{serial}", "BIGSERIAL PRIMARY KEY")
}

/// A catalog store.
pub enum Db {
    Sqlite(Mutex<rusqlite::Connection>),
    Postgres(PgStore),
}

impl std::fmt::Debug for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Db::Sqlite(_) => f.write_str("Db::Sqlite"),
            Db::Postgres(p) => write!(f, "Db::Postgres({})", p.shown),
        }
    }
}

fn sqlite_error(e: rusqlite::Error) -> ApiError {
    ApiError::internal(format!("catalog: {e}"))
}

/// `$n` parameters as SQLite's `?n` (outside quotes).
fn sqlite_params(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut quoted = false;
    for c in sql.chars() {
        if c == '\'' {
            quoted = !quoted;
        }
        out.push(if c == '$' && !quoted { '?' } else { c });
    }
    out
}

impl Db {
    /// SQLite at `path`, created if need be.
    pub fn sqlite(path: &Path) -> Result<Db, String> {
        let conn =
            rusqlite::Connection::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
        conn.execute_batch(&sqlite_schema())
            .map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(Db::Sqlite(Mutex::new(conn)))
    }

    /// The PostgreSQL database at `url` (`postgres://user:password@host:port/db`); the tables
    /// are created if need be.
    pub fn postgres(url: &str) -> Result<Db, String> {
        let store = PgStore::connect(url)?;
        store
            .batch(&format!(
                "SELECT pg_advisory_lock(4242); {} SELECT pg_advisory_unlock(4242);",
                postgres_schema()
            ))
            .map_err(|e| format!("--catalog {}: {}", store.shown, e.message))?;
        Ok(Db::Postgres(store))
    }

    /// Whether several servers may share this store.
    pub fn shared(&self) -> bool {
        matches!(self, Db::Postgres(_))
    }

    /// Runs a statement; returns the rows it changed.
    pub fn exec(&self, sql: &str, args: &[Val]) -> Result<u64, ApiError> {
        match self {
            Db::Sqlite(conn) => {
                let conn = conn.lock().unwrap_or_else(|p| p.into_inner());
                let n = conn
                    .execute(
                        &sqlite_params(sql),
                        rusqlite::params_from_iter(args.iter().map(to_sqlite)),
                    )
                    .map_err(sqlite_error)?;
                Ok(n as u64)
            }
            Db::Postgres(store) => store
                .call(Request::Exec(sql.to_string(), args.to_vec()))
                .map(|r| match r {
                    Reply::Count(n) => n,
                    Reply::Rows(_) => 0,
                }),
        }
    }

    /// Runs a query; returns its rows.
    pub fn query(&self, sql: &str, args: &[Val]) -> Result<Vec<Row>, ApiError> {
        match self {
            Db::Sqlite(conn) => {
                let conn = conn.lock().unwrap_or_else(|p| p.into_inner());
                let mut st = conn.prepare(&sqlite_params(sql)).map_err(sqlite_error)?;
                let columns = st.column_count();
                let rows = st
                    .query_map(
                        rusqlite::params_from_iter(args.iter().map(to_sqlite)),
                        |r| {
                            (0..columns)
                                .map(|i| {
                                    Ok(match r.get::<_, rusqlite::types::Value>(i)? {
                                        rusqlite::types::Value::Null => Val::Null,
                                        rusqlite::types::Value::Integer(n) => Val::Int(n),
                                        rusqlite::types::Value::Text(s) => Val::Text(s),
                                        rusqlite::types::Value::Real(f) => Val::Text(f.to_string()),
                                        rusqlite::types::Value::Blob(b) => {
                                            Val::Text(String::from_utf8_lossy(&b).into_owned())
                                        }
                                    })
                                })
                                .collect::<rusqlite::Result<Row>>()
                        },
                    )
                    .map_err(sqlite_error)?;
                rows.collect::<Result<_, _>>().map_err(sqlite_error)
            }
            Db::Postgres(store) => store
                .call(Request::Query(sql.to_string(), args.to_vec()))
                .map(|r| match r {
                    Reply::Rows(rows) => rows,
                    Reply::Count(_) => vec![],
                }),
        }
    }
}

fn to_sqlite(v: &Val) -> rusqlite::types::Value {
    match v {
        Val::Null => rusqlite::types::Value::Null,
        Val::Int(n) => rusqlite::types::Value::Integer(*n),
        Val::Text(s) => rusqlite::types::Value::Text(s.clone()),
    }
}

enum Request {
    Exec(String, Vec<Val>),
    Query(String, Vec<Val>),
    Batch(String),
}

enum Reply {
    Count(u64),
    Rows(Vec<Row>),
}

/// A request to the catalog thread, with where its answer goes.
type Call = (Request, mpsc::Sender<Result<Reply, ApiError>>);

/// A PostgreSQL connection on a thread of its own (the `postgres` client runs its own event
/// loop, which must not run inside the server's); callers wait for their answer. A lost
/// connection is made again for the next statement.
pub struct PgStore {
    requests: Mutex<mpsc::Sender<Call>>,
    /// The URL without its password, for messages.
    shown: String,
}

impl PgStore {
    fn connect(url: &str) -> Result<PgStore, String> {
        let config: postgres::Config = url
            .parse()
            .map_err(|e| format!("--catalog: not a PostgreSQL URL ({e})"))?;
        let shown = {
            let hosts: Vec<String> = config
                .get_hosts()
                .iter()
                .map(|h| match h {
                    postgres::config::Host::Tcp(h) => h.clone(),
                    postgres::config::Host::Unix(p) => p.display().to_string(),
                })
                .collect();
            format!(
                "postgres://{}@{}:{}/{}",
                config.get_user().unwrap_or(""),
                hosts.join(","),
                config.get_ports().first().copied().unwrap_or(5432),
                config.get_dbname().unwrap_or("")
            )
        };
        let mut client = config
            .connect(postgres::NoTls)
            .map_err(|e| format!("--catalog {shown}: {e}"))?;
        let (tx, rx) = mpsc::channel::<Call>();
        let name = shown.clone();
        std::thread::Builder::new()
            .name("catalog".into())
            .spawn(move || {
                for (request, reply) in rx {
                    if client.is_closed() {
                        match config.connect(postgres::NoTls) {
                            Ok(c) => client = c,
                            Err(e) => {
                                let _ = reply.send(Err(ApiError::internal(format!(
                                    "catalog {name}: the connection was lost and could not be made again: {e}"
                                ))));
                                continue;
                            }
                        }
                    }
                    let _ = reply.send(run(&mut client, request).map_err(|e| {
                        let detail = e
                            .as_db_error()
                            .map_or(e.to_string(), |d| d.message().to_string());
                        ApiError::internal(format!("catalog {name}: {detail}"))
                    }));
                }
            })
            .map_err(|e| format!("could not start the catalog thread: {e}"))?;
        Ok(PgStore {
            requests: Mutex::new(tx),
            shown,
        })
    }

    fn call(&self, request: Request) -> Result<Reply, ApiError> {
        let (tx, rx) = mpsc::channel();
        self.requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send((request, tx))
            .map_err(|_| ApiError::internal("the catalog thread has stopped"))?;
        rx.recv()
            .map_err(|_| ApiError::internal("the catalog thread has stopped"))?
    }

    fn batch(&self, sql: &str) -> Result<(), ApiError> {
        self.call(Request::Batch(sql.to_string())).map(|_| ())
    }
}

fn run(client: &mut postgres::Client, request: Request) -> Result<Reply, postgres::Error> {
    use postgres::types::ToSql;
    let params = |args: &[Val]| -> Vec<Box<dyn ToSql + Sync>> {
        args.iter()
            .map(|v| -> Box<dyn ToSql + Sync> {
                match v {
                    Val::Null => Box::new(None::<String>),
                    Val::Int(n) => Box::new(*n),
                    Val::Text(s) => Box::new(s.clone()),
                }
            })
            .collect()
    };
    match request {
        Request::Batch(sql) => {
            client.batch_execute(&sql)?;
            Ok(Reply::Count(0))
        }
        Request::Exec(sql, args) => {
            let boxed = params(&args);
            let refs: Vec<&(dyn ToSql + Sync)> = boxed.iter().map(|b| b.as_ref()).collect();
            Ok(Reply::Count(client.execute(sql.as_str(), &refs)?))
        }
        Request::Query(sql, args) => {
            let boxed = params(&args);
            let refs: Vec<&(dyn ToSql + Sync)> = boxed.iter().map(|b| b.as_ref()).collect();
            let rows = client.query(sql.as_str(), &refs)?;
            let mut out = Vec::with_capacity(rows.len());
            for row in rows {
                let mut values = Vec::with_capacity(row.len());
                for (i, column) in row.columns().iter().enumerate() {
                    use postgres::types::Type;
                    let v = match *column.type_() {
                        Type::INT8 => row.try_get::<_, Option<i64>>(i)?.map(Val::Int),
                        Type::INT4 => row
                            .try_get::<_, Option<i32>>(i)?
                            .map(|n| Val::Int(n as i64)),
                        Type::INT2 => row
                            .try_get::<_, Option<i16>>(i)?
                            .map(|n| Val::Int(n as i64)),
                        _ => row.try_get::<_, Option<String>>(i)?.map(Val::Text),
                    };
                    values.push(v.unwrap_or(Val::Null));
                }
                out.push(values);
            }
            Ok(Reply::Rows(out))
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn parameters_become_sqlites_outside_quotes() {
        assert_eq!(
            super::sqlite_params("SELECT '$1', $1 WHERE x = $2"),
            "SELECT '$1', ?1 WHERE x = ?2"
        );
    }
}
