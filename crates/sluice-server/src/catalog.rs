//! The server's catalog: tenants, users, tokens, each tenant's tables and views, and pipelines,
//! in embedded SQLite (`<data-dir>/catalog.db`) or in PostgreSQL (`--catalog postgres://...`),
//! where several servers share it and hold leases on the pipelines each one runs.
//!
//! Every read and write names its tenant: there is no query here that crosses tenants except
//! the admin's listings.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::catalog_db::Val;
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
    /// Options (and their secrets) that tables take with `'connection' = 'name'`.
    Connection,
}

impl ObjectKind {
    fn code(self) -> &'static str {
        match self {
            ObjectKind::Table => "table",
            ObjectKind::View => "view",
            ObjectKind::MaterializedView => "materialized_view",
            ObjectKind::Connection => "connection",
        }
    }

    fn from_code(s: &str) -> ObjectKind {
        match s {
            "view" => ObjectKind::View,
            "materialized_view" => ObjectKind::MaterializedView,
            "connection" => ObjectKind::Connection,
            _ => ObjectKind::Table,
        }
    }

    pub fn words(self) -> &'static str {
        match self {
            ObjectKind::Table => "table",
            ObjectKind::View => "view",
            ObjectKind::MaterializedView => "materialized view",
            ObjectKind::Connection => "connection",
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

/// The catalog, in SQLite or a shared PostgreSQL database.
pub struct Catalog {
    db: crate::catalog_db::Db,
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

impl std::fmt::Debug for Catalog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Catalog({:?})", self.db)
    }
}

fn text(v: &Val) -> String {
    v.text()
}

impl Catalog {
    /// Opens (or creates) the catalog in SQLite at `path`.
    pub fn open(path: &Path) -> Result<Catalog, String> {
        Ok(Catalog {
            db: crate::catalog_db::Db::sqlite(path)?,
        })
    }

    /// Opens (or creates) the catalog in the PostgreSQL database at `url`, which other servers
    /// may share.
    pub fn open_postgres(url: &str) -> Result<Catalog, String> {
        Ok(Catalog {
            db: crate::catalog_db::Db::postgres(url)?,
        })
    }

    /// Whether other servers may share this catalog (and so its pipelines).
    pub fn shared(&self) -> bool {
        self.db.shared()
    }

    fn exec(&self, sql: &str, args: &[Val]) -> Result<u64, ApiError> {
        self.db.exec(sql, args)
    }

    fn query(&self, sql: &str, args: &[Val]) -> Result<Vec<Vec<Val>>, ApiError> {
        self.db.query(sql, args)
    }

    pub fn create_tenant(&self, name: &str) -> Result<(), ApiError> {
        let n = self.exec(
            "INSERT INTO tenants (name, created_ms) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            &[name.into(), now_ms().into()],
        )?;
        if n == 0 {
            return Err(ApiError::duplicate(format!(
                "tenant '{name}' already exists"
            )));
        }
        Ok(())
    }

    pub fn tenant_exists(&self, name: &str) -> Result<bool, ApiError> {
        Ok(!self
            .query("SELECT 1 FROM tenants WHERE name = $1", &[name.into()])?
            .is_empty())
    }

    /// Every tenant's name, sorted.
    pub fn tenants(&self) -> Result<Vec<String>, ApiError> {
        Ok(self
            .query("SELECT name FROM tenants ORDER BY name", &[])?
            .iter()
            .map(|r| text(&r[0]))
            .collect())
    }

    pub fn drop_tenant(&self, name: &str) -> Result<(), ApiError> {
        let n = self.exec("DELETE FROM tenants WHERE name = $1", &[name.into()])?;
        if n == 0 {
            return Err(ApiError::not_found(format!(
                "tenant '{name}' does not exist"
            )));
        }
        Ok(())
    }

    pub fn quotas(&self, tenant: &str) -> Result<Quotas, ApiError> {
        let rows = self.query(
            "SELECT quotas FROM tenants WHERE name = $1",
            &[tenant.into()],
        )?;
        let text = rows
            .first()
            .map(|r| text(&r[0]))
            .ok_or_else(|| ApiError::not_found(format!("tenant '{tenant}' does not exist")))?;
        serde_json::from_str(&text).map_err(|e| ApiError::internal(format!("quotas: {e}")))
    }

    pub fn set_quotas(&self, tenant: &str, quotas: &Quotas) -> Result<(), ApiError> {
        let text = serde_json::to_string(quotas).expect("quotas serialize");
        let n = self.exec(
            "UPDATE tenants SET quotas = $2 WHERE name = $1",
            &[tenant.into(), text.into()],
        )?;
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
        let n = self.exec(
            "INSERT INTO users (name, tenant, role, verifier) VALUES ($1, $2, $3, $4)
             ON CONFLICT DO NOTHING",
            &[
                (&user.name).into(),
                (&user.tenant).into(),
                user.role.name().into(),
                (&user.verifier).into(),
            ],
        )?;
        if n == 0 {
            return Err(ApiError::duplicate(format!(
                "user '{}' already exists",
                user.name
            )));
        }
        Ok(())
    }

    pub fn set_verifier(&self, user: &str, verifier: &str) -> Result<(), ApiError> {
        self.exec(
            "UPDATE users SET verifier = $2 WHERE name = $1",
            &[user.into(), verifier.into()],
        )?;
        Ok(())
    }

    pub fn user(&self, name: &str) -> Result<Option<User>, ApiError> {
        Ok(self
            .query(
                "SELECT name, tenant, role, verifier FROM users WHERE name = $1",
                &[name.into()],
            )?
            .first()
            .map(|r| User {
                name: text(&r[0]),
                tenant: text(&r[1]),
                role: Role::parse(&text(&r[2])).unwrap_or(Role::Viewer),
                verifier: text(&r[3]),
            }))
    }

    /// The users of `tenant` (every tenant's when `None`): name, tenant, role.
    pub fn users(&self, tenant: Option<&str>) -> Result<Vec<(String, String, Role)>, ApiError> {
        Ok(self
            .query(
                "SELECT name, tenant, role FROM users WHERE CAST($1 AS TEXT) IS NULL OR tenant = $1
                 ORDER BY tenant, name",
                &[tenant.into()],
            )?
            .iter()
            .map(|r| {
                (
                    text(&r[0]),
                    text(&r[1]),
                    Role::parse(&text(&r[2])).unwrap_or(Role::Viewer),
                )
            })
            .collect())
    }

    pub fn drop_user(&self, name: &str) -> Result<(), ApiError> {
        self.exec("DELETE FROM users WHERE name = $1", &[name.into()])?;
        Ok(())
    }

    pub fn add_token(&self, id: &str, hash: &str, user: &str) -> Result<(), ApiError> {
        self.exec(
            "INSERT INTO tokens (id, hash, user_name, created_ms) VALUES ($1, $2, $3, $4)",
            &[id.into(), hash.into(), user.into(), now_ms().into()],
        )?;
        Ok(())
    }

    /// The user a live (not revoked) token with this hash belongs to.
    pub fn token_user(&self, hash: &str) -> Result<Option<String>, ApiError> {
        Ok(self
            .query(
                "SELECT user_name FROM tokens WHERE hash = $1 AND revoked = 0",
                &[hash.into()],
            )?
            .first()
            .map(|r| text(&r[0])))
    }

    /// The owner of token `id`, whether or not it is revoked.
    pub fn token_owner(&self, id: &str) -> Result<Option<String>, ApiError> {
        Ok(self
            .query("SELECT user_name FROM tokens WHERE id = $1", &[id.into()])?
            .first()
            .map(|r| text(&r[0])))
    }

    pub fn revoke_token(&self, id: &str) -> Result<(), ApiError> {
        self.exec("UPDATE tokens SET revoked = 1 WHERE id = $1", &[id.into()])?;
        Ok(())
    }

    /// Revokes the token with this hash (a console session logging out).
    pub fn revoke_token_hash(&self, hash: &str) -> Result<(), ApiError> {
        self.exec(
            "UPDATE tokens SET revoked = 1 WHERE hash = $1",
            &[hash.into()],
        )?;
        Ok(())
    }

    /// Tokens of `tenant`'s users: id, user, revoked.
    pub fn tokens(&self, tenant: Option<&str>) -> Result<Vec<(String, String, bool)>, ApiError> {
        Ok(self
            .query(
                "SELECT t.id, t.user_name, t.revoked FROM tokens t JOIN users u ON u.name = t.user_name
                 WHERE CAST($1 AS TEXT) IS NULL OR u.tenant = $1 ORDER BY t.created_ms, t.id",
                &[tenant.into()],
            )?
            .iter()
            .map(|r| (text(&r[0]), text(&r[1]), r[2].int() != 0))
            .collect())
    }

    pub fn put_object(&self, tenant: &str, object: &Object) -> Result<(), ApiError> {
        let n = self.exec(
            "INSERT INTO objects (tenant, name, kind, sql) VALUES ($1, $2, $3, $4)
             ON CONFLICT DO NOTHING",
            &[
                tenant.into(),
                (&object.name).into(),
                object.kind.code().into(),
                (&object.sql).into(),
            ],
        )?;
        if n == 0 {
            return Err(ApiError::duplicate(format!(
                "'{}' already exists",
                object.name
            )));
        }
        Ok(())
    }

    pub fn objects(&self, tenant: &str) -> Result<Vec<Object>, ApiError> {
        Ok(self
            .query(
                "SELECT name, kind, sql FROM objects WHERE tenant = $1 ORDER BY seq",
                &[tenant.into()],
            )?
            .iter()
            .map(|r| Object {
                name: text(&r[0]),
                kind: ObjectKind::from_code(&text(&r[1])),
                sql: text(&r[2]),
            })
            .collect())
    }

    pub fn object(&self, tenant: &str, name: &str) -> Result<Option<Object>, ApiError> {
        Ok(self.objects(tenant)?.into_iter().find(|o| o.name == name))
    }

    pub fn drop_object(&self, tenant: &str, name: &str) -> Result<bool, ApiError> {
        let n = self.exec(
            "DELETE FROM objects WHERE tenant = $1 AND name = $2",
            &[tenant.into(), name.into()],
        )?;
        Ok(n > 0)
    }

    pub fn put_pipeline(&self, p: &Pipeline) -> Result<(), ApiError> {
        let n = self.exec(
            "INSERT INTO pipelines (tenant, name, script, statements, views, parallelism,
               desired, status, restarts, last_error, created_ms)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 0, NULL, $9) ON CONFLICT DO NOTHING",
            &[
                (&p.tenant).into(),
                (&p.name).into(),
                (&p.script).into(),
                (&p.statements).into(),
                serde_json::to_string(&p.views).expect("names").into(),
                (p.parallelism as i64).into(),
                desired_code(p.desired).into(),
                (&p.status).into(),
                p.created_ms.into(),
            ],
        )?;
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
        self.exec(
            "UPDATE pipelines SET script = $3, statements = $4 WHERE tenant = $1 AND name = $2",
            &[
                (&p.tenant).into(),
                (&p.name).into(),
                (&p.script).into(),
                (&p.statements).into(),
            ],
        )?;
        Ok(())
    }

    /// Replaces the SQL an object is recorded with.
    pub fn set_object_sql(&self, tenant: &str, name: &str, sql: &str) -> Result<(), ApiError> {
        self.exec(
            "UPDATE objects SET sql = $3 WHERE tenant = $1 AND name = $2",
            &[tenant.into(), name.into(), sql.into()],
        )?;
        Ok(())
    }

    fn pipelines_where(&self, filter: &str, args: &[Val]) -> Result<Vec<Pipeline>, ApiError> {
        Ok(self
            .query(
                &format!(
                    "SELECT tenant, name, script, statements, views, parallelism, desired, status,
                       restarts, last_error, created_ms FROM pipelines {filter} ORDER BY created_ms, name"
                ),
                args,
            )?
            .iter()
            .map(|r| Pipeline {
                tenant: text(&r[0]),
                name: text(&r[1]),
                script: text(&r[2]),
                statements: text(&r[3]),
                views: serde_json::from_str(&text(&r[4])).unwrap_or_default(),
                parallelism: r[5].int() as u64,
                desired: if text(&r[6]) == "running" {
                    Desired::Running
                } else {
                    Desired::Stopped
                },
                status: text(&r[7]),
                restarts: r[8].int() as u64,
                last_error: r[9].opt_text(),
                created_ms: r[10].int(),
            })
            .collect())
    }

    /// The pipelines of `tenant`, or of every tenant.
    pub fn pipelines(&self, tenant: Option<&str>) -> Result<Vec<Pipeline>, ApiError> {
        match tenant {
            Some(t) => self.pipelines_where("WHERE tenant = $1", &[t.into()]),
            None => self.pipelines_where("", &[]),
        }
    }

    pub fn pipeline(&self, tenant: &str, name: &str) -> Result<Option<Pipeline>, ApiError> {
        Ok(self
            .pipelines_where(
                "WHERE tenant = $1 AND name = $2",
                &[tenant.into(), name.into()],
            )?
            .pop())
    }

    pub fn set_desired(&self, tenant: &str, name: &str, desired: Desired) -> Result<(), ApiError> {
        self.exec(
            "UPDATE pipelines SET desired = $3 WHERE tenant = $1 AND name = $2",
            &[tenant.into(), name.into(), desired_code(desired).into()],
        )?;
        Ok(())
    }

    pub fn set_parallelism(&self, tenant: &str, name: &str, n: u64) -> Result<(), ApiError> {
        self.exec(
            "UPDATE pipelines SET parallelism = $3 WHERE tenant = $1 AND name = $2",
            &[tenant.into(), name.into(), (n as i64).into()],
        )?;
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
        self.exec(
            "UPDATE pipelines SET status = $3 WHERE tenant = $1 AND name = $2",
            &[tenant.into(), name.into(), status.into()],
        )?;
        if let Some(n) = restarts {
            self.exec(
                "UPDATE pipelines SET restarts = $3 WHERE tenant = $1 AND name = $2",
                &[tenant.into(), name.into(), (n as i64).into()],
            )?;
        }
        if let Some(e) = error {
            self.exec(
                "UPDATE pipelines SET last_error = $3 WHERE tenant = $1 AND name = $2",
                &[tenant.into(), name.into(), e.into()],
            )?;
        }
        Ok(())
    }

    pub fn drop_pipeline(&self, tenant: &str, name: &str) -> Result<bool, ApiError> {
        let n = self.exec(
            "DELETE FROM pipelines WHERE tenant = $1 AND name = $2",
            &[tenant.into(), name.into()],
        )?;
        self.exec(
            "DELETE FROM leases WHERE tenant = $1 AND name = $2",
            &[tenant.into(), name.into()],
        )?;
        Ok(n > 0)
    }

    /// Takes or renews the lease on running pipeline `tenant/name` for `holder` until
    /// `now + ttl_ms`: granted when no other server holds a lease that has not expired.
    pub fn lease(
        &self,
        tenant: &str,
        name: &str,
        holder: &str,
        ttl_ms: i64,
    ) -> Result<bool, ApiError> {
        let now = now_ms();
        let n = self.exec(
            "INSERT INTO leases (tenant, name, holder, expires_ms) VALUES ($1, $2, $3, $4)
             ON CONFLICT (tenant, name) DO UPDATE SET holder = $3, expires_ms = $4
             WHERE leases.holder = $3 OR leases.expires_ms < $5",
            &[
                tenant.into(),
                name.into(),
                holder.into(),
                (now + ttl_ms).into(),
                now.into(),
            ],
        )?;
        Ok(n > 0)
    }

    /// Gives up `holder`'s lease on `tenant/name`.
    pub fn release(&self, tenant: &str, name: &str, holder: &str) -> Result<(), ApiError> {
        self.exec(
            "DELETE FROM leases WHERE tenant = $1 AND name = $2 AND holder = $3",
            &[tenant.into(), name.into(), holder.into()],
        )?;
        Ok(())
    }

    /// Who holds a lease on `tenant/name` that has not expired.
    pub fn lease_holder(&self, tenant: &str, name: &str) -> Result<Option<String>, ApiError> {
        Ok(self
            .query(
                "SELECT holder FROM leases WHERE tenant = $1 AND name = $2 AND expires_ms >= $3",
                &[tenant.into(), name.into(), now_ms().into()],
            )?
            .first()
            .map(|r| text(&r[0])))
    }
}

fn desired_code(d: Desired) -> &'static str {
    match d {
        Desired::Running => "running",
        Desired::Stopped => "stopped",
    }
}
