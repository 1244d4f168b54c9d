//! The server's catalog: tenants, users, tokens, each tenant's tables and views, and pipelines,
//! in embedded SQLite (`<data-dir>/catalog.db`).
//!
//! Every read and write names its tenant: there is no query here that crosses tenants except
//! the admin's listings.

use std::path::Path;
use std::sync::Mutex;

use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};

use crate::error::ApiError;

/// A user's role within a tenant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Everything in the tenant, including its users and tokens.
    Owner,
    /// Tables, views and pipelines.
    Developer,
    /// Reads only.
    Viewer,
}

impl Role {
    pub fn parse(s: &str) -> Result<Role, ApiError> {
        match s.to_ascii_lowercase().as_str() {
            "owner" => Ok(Role::Owner),
            "developer" => Ok(Role::Developer),
            "viewer" => Ok(Role::Viewer),
            other => Err(ApiError::invalid(format!(
                "unknown role '{other}': give owner, developer or viewer"
            ))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Role::Owner => "owner",
            Role::Developer => "developer",
            Role::Viewer => "viewer",
        }
    }
}

/// The tenant of the server's administrators: its owners may manage every tenant.
pub const ADMIN_TENANT: &str = "admin";

/// Per-tenant limits (absent: unlimited).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Quotas {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_pipelines: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_parallelism: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_state_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_ingest_rows_per_second: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_checkpoint_bytes: Option<u64>,
}

/// The quota names, as `ALTER TENANT ... SET QUOTA (...)` and `SHOW QUOTAS` spell them.
pub const QUOTA_NAMES: [&str; 5] = [
    "max_pipelines",
    "max_parallelism",
    "max_state_bytes",
    "max_ingest_rows_per_second",
    "max_checkpoint_bytes",
];

impl Quotas {
    pub fn get(&self, name: &str) -> Option<u64> {
        match name {
            "max_pipelines" => self.max_pipelines,
            "max_parallelism" => self.max_parallelism,
            "max_state_bytes" => self.max_state_bytes,
            "max_ingest_rows_per_second" => self.max_ingest_rows_per_second,
            "max_checkpoint_bytes" => self.max_checkpoint_bytes,
            _ => None,
        }
    }

    pub fn set(&mut self, name: &str, value: Option<u64>) -> Result<(), ApiError> {
        let slot = match name {
            "max_pipelines" => &mut self.max_pipelines,
            "max_parallelism" => &mut self.max_parallelism,
            "max_state_bytes" => &mut self.max_state_bytes,
            "max_ingest_rows_per_second" => &mut self.max_ingest_rows_per_second,
            "max_checkpoint_bytes" => &mut self.max_checkpoint_bytes,
            other => {
                return Err(ApiError::invalid(format!(
                    "unknown quota '{other}': give one of {}",
                    QUOTA_NAMES.join(", ")
                )))
            }
        };
        *slot = value;
        Ok(())
    }
}

/// A user as stored.
#[derive(Debug, Clone)]
pub struct User {
    pub name: String,
    pub tenant: String,
    pub role: Role,
    /// The SCRAM-SHA-256 verifier (see [`crate::auth`]).
    pub verifier: String,
}

/// What a catalog object is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ObjectKind {
    Table,
    View,
    MaterializedView,
}

impl ObjectKind {
    fn code(self) -> &'static str {
        match self {
            ObjectKind::Table => "table",
            ObjectKind::View => "view",
            ObjectKind::MaterializedView => "materialized_view",
        }
    }

    fn from_code(s: &str) -> ObjectKind {
        match s {
            "view" => ObjectKind::View,
            "materialized_view" => ObjectKind::MaterializedView,
            _ => ObjectKind::Table,
        }
    }

    pub fn words(self) -> &'static str {
        match self {
            ObjectKind::Table => "table",
            ObjectKind::View => "view",
            ObjectKind::MaterializedView => "materialized view",
        }
    }
}

/// A table or view of a tenant, with the statement that made it.
#[derive(Debug, Clone, Serialize)]
pub struct Object {
    pub name: String,
    pub kind: ObjectKind,
    pub sql: String,
}

/// What a pipeline should be doing, as its owner asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Desired {
    Running,
    Stopped,
}

/// A pipeline as stored.
#[derive(Debug, Clone, Serialize)]
pub struct Pipeline {
    pub tenant: String,
    pub name: String,
    /// The whole script the worker runs (the tables and views it reads, then its statements).
    pub script: String,
    /// The statements the user gave.
    pub statements: String,
    /// The materialized views its SELECTs feed, in order.
    pub views: Vec<String>,
    pub parallelism: u64,
    pub desired: Desired,
    /// `created`, `starting`, `running`, `restarting`, `stopped`, `finished` or `failed`.
    pub status: String,
    pub restarts: u64,
    pub last_error: Option<String>,
    pub created_ms: i64,
}

/// The catalog in SQLite.
pub struct Catalog {
    conn: Mutex<Connection>,
}

fn db(e: rusqlite::Error) -> ApiError {
    ApiError::internal(format!("catalog: {e}"))
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

impl std::fmt::Debug for Catalog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Catalog")
    }
}

impl Catalog {
    /// Opens (or creates) the catalog at `path`.
    pub fn open(path: &Path) -> Result<Catalog, String> {
        let conn = Connection::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
        conn.execute_batch(
            "PRAGMA journal_mode = WAL;
             PRAGMA synchronous = FULL;
             PRAGMA foreign_keys = ON;
             CREATE TABLE IF NOT EXISTS tenants (
                 name TEXT PRIMARY KEY,
                 quotas TEXT NOT NULL DEFAULT '{}',
                 created_ms INTEGER NOT NULL);
             CREATE TABLE IF NOT EXISTS users (
                 name TEXT PRIMARY KEY,
                 tenant TEXT NOT NULL REFERENCES tenants(name) ON DELETE CASCADE,
                 role TEXT NOT NULL,
                 verifier TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS tokens (
                 id TEXT PRIMARY KEY,
                 hash TEXT NOT NULL UNIQUE,
                 user_name TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE,
                 revoked INTEGER NOT NULL DEFAULT 0,
                 created_ms INTEGER NOT NULL);
             CREATE TABLE IF NOT EXISTS objects (
                 seq INTEGER PRIMARY KEY AUTOINCREMENT,
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
                 parallelism INTEGER NOT NULL,
                 desired TEXT NOT NULL,
                 status TEXT NOT NULL,
                 restarts INTEGER NOT NULL DEFAULT 0,
                 last_error TEXT,
                 created_ms INTEGER NOT NULL,
                 PRIMARY KEY (tenant, name));",
        )
        .map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(Catalog {
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn create_tenant(&self, name: &str) -> Result<(), ApiError> {
        let n = self
            .conn()
            .execute(
                "INSERT INTO tenants (name, created_ms) VALUES (?1, ?2) ON CONFLICT DO NOTHING",
                params![name, now_ms()],
            )
            .map_err(db)?;
        if n == 0 {
            return Err(ApiError::duplicate(format!(
                "tenant '{name}' already exists"
            )));
        }
        Ok(())
    }

    pub fn tenant_exists(&self, name: &str) -> Result<bool, ApiError> {
        self.conn()
            .query_row("SELECT 1 FROM tenants WHERE name = ?1", [name], |_| Ok(()))
            .optional()
            .map(|r| r.is_some())
            .map_err(db)
    }

    /// Every tenant's name, sorted.
    pub fn tenants(&self) -> Result<Vec<String>, ApiError> {
        let conn = self.conn();
        let mut st = conn
            .prepare("SELECT name FROM tenants ORDER BY name")
            .map_err(db)?;
        let rows = st.query_map([], |r| r.get(0)).map_err(db)?;
        rows.collect::<Result<_, _>>().map_err(db)
    }

    pub fn drop_tenant(&self, name: &str) -> Result<(), ApiError> {
        let n = self
            .conn()
            .execute("DELETE FROM tenants WHERE name = ?1", [name])
            .map_err(db)?;
        if n == 0 {
            return Err(ApiError::not_found(format!(
                "tenant '{name}' does not exist"
            )));
        }
        Ok(())
    }

    pub fn quotas(&self, tenant: &str) -> Result<Quotas, ApiError> {
        let text: Option<String> = self
            .conn()
            .query_row(
                "SELECT quotas FROM tenants WHERE name = ?1",
                [tenant],
                |r| r.get(0),
            )
            .optional()
            .map_err(db)?;
        let text =
            text.ok_or_else(|| ApiError::not_found(format!("tenant '{tenant}' does not exist")))?;
        serde_json::from_str(&text).map_err(|e| ApiError::internal(format!("quotas: {e}")))
    }

    pub fn set_quotas(&self, tenant: &str, quotas: &Quotas) -> Result<(), ApiError> {
        let text = serde_json::to_string(quotas).expect("quotas serialize");
        let n = self
            .conn()
            .execute(
                "UPDATE tenants SET quotas = ?2 WHERE name = ?1",
                params![tenant, text],
            )
            .map_err(db)?;
        if n == 0 {
            return Err(ApiError::not_found(format!(
                "tenant '{tenant}' does not exist"
            )));
        }
        Ok(())
    }

    pub fn create_user(&self, user: &User) -> Result<(), ApiError> {
        if !self.tenant_exists(&user.tenant)? {
            return Err(ApiError::not_found(format!(
                "tenant '{}' does not exist",
                user.tenant
            )));
        }
        let n = self
            .conn()
            .execute(
                "INSERT INTO users (name, tenant, role, verifier) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT DO NOTHING",
                params![user.name, user.tenant, user.role.name(), user.verifier],
            )
            .map_err(db)?;
        if n == 0 {
            return Err(ApiError::duplicate(format!(
                "user '{}' already exists",
                user.name
            )));
        }
        Ok(())
    }

    pub fn set_verifier(&self, user: &str, verifier: &str) -> Result<(), ApiError> {
        self.conn()
            .execute(
                "UPDATE users SET verifier = ?2 WHERE name = ?1",
                params![user, verifier],
            )
            .map_err(db)?;
        Ok(())
    }

    pub fn user(&self, name: &str) -> Result<Option<User>, ApiError> {
        self.conn()
            .query_row(
                "SELECT name, tenant, role, verifier FROM users WHERE name = ?1",
                [name],
                |r| {
                    Ok(User {
                        name: r.get(0)?,
                        tenant: r.get(1)?,
                        role: Role::parse(&r.get::<_, String>(2)?).unwrap_or(Role::Viewer),
                        verifier: r.get(3)?,
                    })
                },
            )
            .optional()
            .map_err(db)
    }

    /// The users of `tenant` (every tenant's when `None`): name, tenant, role.
    pub fn users(&self, tenant: Option<&str>) -> Result<Vec<(String, String, Role)>, ApiError> {
        let conn = self.conn();
        let mut st = conn
            .prepare(
                "SELECT name, tenant, role FROM users WHERE ?1 IS NULL OR tenant = ?1
                 ORDER BY tenant, name",
            )
            .map_err(db)?;
        let rows = st
            .query_map([tenant], |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    Role::parse(&r.get::<_, String>(2)?).unwrap_or(Role::Viewer),
                ))
            })
            .map_err(db)?;
        rows.collect::<Result<_, _>>().map_err(db)
    }

    pub fn drop_user(&self, name: &str) -> Result<(), ApiError> {
        self.conn()
            .execute("DELETE FROM users WHERE name = ?1", [name])
            .map_err(db)?;
        Ok(())
    }

    pub fn add_token(&self, id: &str, hash: &str, user: &str) -> Result<(), ApiError> {
        self.conn()
            .execute(
                "INSERT INTO tokens (id, hash, user_name, created_ms) VALUES (?1, ?2, ?3, ?4)",
                params![id, hash, user, now_ms()],
            )
            .map_err(db)?;
        Ok(())
    }

    /// The user a live (not revoked) token with this hash belongs to.
    pub fn token_user(&self, hash: &str) -> Result<Option<String>, ApiError> {
        self.conn()
            .query_row(
                "SELECT user_name FROM tokens WHERE hash = ?1 AND revoked = 0",
                [hash],
                |r| r.get(0),
            )
            .optional()
            .map_err(db)
    }

    /// The owner of token `id`, whether or not it is revoked.
    pub fn token_owner(&self, id: &str) -> Result<Option<String>, ApiError> {
        self.conn()
            .query_row("SELECT user_name FROM tokens WHERE id = ?1", [id], |r| {
                r.get(0)
            })
            .optional()
            .map_err(db)
    }

    pub fn revoke_token(&self, id: &str) -> Result<(), ApiError> {
        self.conn()
            .execute("UPDATE tokens SET revoked = 1 WHERE id = ?1", [id])
            .map_err(db)?;
        Ok(())
    }

    /// Tokens of `tenant`'s users: id, user, revoked.
    pub fn tokens(&self, tenant: Option<&str>) -> Result<Vec<(String, String, bool)>, ApiError> {
        let conn = self.conn();
        let mut st = conn
            .prepare(
                "SELECT t.id, t.user_name, t.revoked FROM tokens t JOIN users u ON u.name = t.user_name
                 WHERE ?1 IS NULL OR u.tenant = ?1 ORDER BY t.created_ms",
            )
            .map_err(db)?;
        let rows = st
            .query_map([tenant], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get::<_, i64>(2)? != 0))
            })
            .map_err(db)?;
        rows.collect::<Result<_, _>>().map_err(db)
    }

    pub fn put_object(&self, tenant: &str, object: &Object) -> Result<(), ApiError> {
        let n = self
            .conn()
            .execute(
                "INSERT INTO objects (tenant, name, kind, sql) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT DO NOTHING",
                params![tenant, object.name, object.kind.code(), object.sql],
            )
            .map_err(db)?;
        if n == 0 {
            return Err(ApiError::duplicate(format!(
                "'{}' already exists",
                object.name
            )));
        }
        Ok(())
    }

    /// A tenant's tables and views, in the order they were made.
    pub fn objects(&self, tenant: &str) -> Result<Vec<Object>, ApiError> {
        let conn = self.conn();
        let mut st = conn
            .prepare("SELECT name, kind, sql FROM objects WHERE tenant = ?1 ORDER BY seq")
            .map_err(db)?;
        let rows = st
            .query_map([tenant], |r| {
                Ok(Object {
                    name: r.get(0)?,
                    kind: ObjectKind::from_code(&r.get::<_, String>(1)?),
                    sql: r.get(2)?,
                })
            })
            .map_err(db)?;
        rows.collect::<Result<_, _>>().map_err(db)
    }

    pub fn object(&self, tenant: &str, name: &str) -> Result<Option<Object>, ApiError> {
        Ok(self.objects(tenant)?.into_iter().find(|o| o.name == name))
    }

    pub fn drop_object(&self, tenant: &str, name: &str) -> Result<bool, ApiError> {
        let n = self
            .conn()
            .execute(
                "DELETE FROM objects WHERE tenant = ?1 AND name = ?2",
                params![tenant, name],
            )
            .map_err(db)?;
        Ok(n > 0)
    }

    pub fn put_pipeline(&self, p: &Pipeline) -> Result<(), ApiError> {
        let n = self
            .conn()
            .execute(
                "INSERT INTO pipelines (tenant, name, script, statements, views, parallelism,
                   desired, status, restarts, last_error, created_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, 0, NULL, ?9) ON CONFLICT DO NOTHING",
                params![
                    p.tenant,
                    p.name,
                    p.script,
                    p.statements,
                    serde_json::to_string(&p.views).expect("names"),
                    p.parallelism as i64,
                    desired_code(p.desired),
                    p.status,
                    p.created_ms
                ],
            )
            .map_err(db)?;
        if n == 0 {
            return Err(ApiError::duplicate(format!(
                "pipeline '{}' already exists",
                p.name
            )));
        }
        Ok(())
    }

    /// Replaces a pipeline's statements and the script they make.
    pub fn set_pipeline_statements(&self, p: &Pipeline) -> Result<(), ApiError> {
        self.conn()
            .execute(
                "UPDATE pipelines SET script = ?3, statements = ?4 WHERE tenant = ?1 AND name = ?2",
                params![p.tenant, p.name, p.script, p.statements],
            )
            .map_err(db)?;
        Ok(())
    }

    /// Replaces the SQL an object is recorded with.
    pub fn set_object_sql(&self, tenant: &str, name: &str, sql: &str) -> Result<(), ApiError> {
        self.conn()
            .execute(
                "UPDATE objects SET sql = ?3 WHERE tenant = ?1 AND name = ?2",
                params![tenant, name, sql],
            )
            .map_err(db)?;
        Ok(())
    }

    fn pipelines_where(&self, filter: &str, args: &[&str]) -> Result<Vec<Pipeline>, ApiError> {
        let conn = self.conn();
        let mut st = conn
            .prepare(&format!(
                "SELECT tenant, name, script, statements, views, parallelism, desired, status,
                   restarts, last_error, created_ms FROM pipelines {filter} ORDER BY created_ms, name"
            ))
            .map_err(db)?;
        let rows = st
            .query_map(rusqlite::params_from_iter(args), |r| {
                Ok(Pipeline {
                    tenant: r.get(0)?,
                    name: r.get(1)?,
                    script: r.get(2)?,
                    statements: r.get(3)?,
                    views: serde_json::from_str(&r.get::<_, String>(4)?).unwrap_or_default(),
                    parallelism: r.get::<_, i64>(5)? as u64,
                    desired: if r.get::<_, String>(6)? == "running" {
                        Desired::Running
                    } else {
                        Desired::Stopped
                    },
                    status: r.get(7)?,
                    restarts: r.get::<_, i64>(8)? as u64,
                    last_error: r.get(9)?,
                    created_ms: r.get(10)?,
                })
            })
            .map_err(db)?;
        rows.collect::<Result<_, _>>().map_err(db)
    }

    /// The pipelines of `tenant`, or of every tenant.
    pub fn pipelines(&self, tenant: Option<&str>) -> Result<Vec<Pipeline>, ApiError> {
        match tenant {
            Some(t) => self.pipelines_where("WHERE tenant = ?1", &[t]),
            None => self.pipelines_where("", &[]),
        }
    }

    pub fn pipeline(&self, tenant: &str, name: &str) -> Result<Option<Pipeline>, ApiError> {
        Ok(self
            .pipelines_where("WHERE tenant = ?1 AND name = ?2", &[tenant, name])?
            .pop())
    }

    pub fn set_desired(&self, tenant: &str, name: &str, desired: Desired) -> Result<(), ApiError> {
        self.conn()
            .execute(
                "UPDATE pipelines SET desired = ?3 WHERE tenant = ?1 AND name = ?2",
                params![tenant, name, desired_code(desired)],
            )
            .map_err(db)?;
        Ok(())
    }

    pub fn set_parallelism(&self, tenant: &str, name: &str, n: u64) -> Result<(), ApiError> {
        self.conn()
            .execute(
                "UPDATE pipelines SET parallelism = ?3 WHERE tenant = ?1 AND name = ?2",
                params![tenant, name, n as i64],
            )
            .map_err(db)?;
        Ok(())
    }

    /// Records a pipeline's status; `restarts` and `error` only when given.
    pub fn set_status(
        &self,
        tenant: &str,
        name: &str,
        status: &str,
        restarts: Option<u64>,
        error: Option<&str>,
    ) -> Result<(), ApiError> {
        let conn = self.conn();
        conn.execute(
            "UPDATE pipelines SET status = ?3 WHERE tenant = ?1 AND name = ?2",
            params![tenant, name, status],
        )
        .map_err(db)?;
        if let Some(n) = restarts {
            conn.execute(
                "UPDATE pipelines SET restarts = ?3 WHERE tenant = ?1 AND name = ?2",
                params![tenant, name, n as i64],
            )
            .map_err(db)?;
        }
        if let Some(e) = error {
            conn.execute(
                "UPDATE pipelines SET last_error = ?3 WHERE tenant = ?1 AND name = ?2",
                params![tenant, name, e],
            )
            .map_err(db)?;
        }
        Ok(())
    }

    pub fn drop_pipeline(&self, tenant: &str, name: &str) -> Result<bool, ApiError> {
        let n = self
            .conn()
            .execute(
                "DELETE FROM pipelines WHERE tenant = ?1 AND name = ?2",
                params![tenant, name],
            )
            .map_err(db)?;
        Ok(n > 0)
    }
}

fn desired_code(d: Desired) -> &'static str {
    match d {
        Desired::Running => "running",
        Desired::Stopped => "stopped",
    }
}
