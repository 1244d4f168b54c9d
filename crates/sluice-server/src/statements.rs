//! The SQL the server understands, over the Postgres wire protocol and REST alike.
//!
//! - Administration: `CREATE TENANT`, `CREATE USER ... WITH PASSWORD ... IN TENANT ... ROLE ...`,
//!   `CREATE TOKEN FOR USER`, `REVOKE TOKEN`, `ALTER TENANT ... SET QUOTA (...)`, `DROP USER`,
//!   `DROP TENANT`, `SHOW TENANTS | USERS | TOKENS | QUOTAS`.
//! - A tenant's catalog: `CREATE TABLE`, `CREATE VIEW`, `CREATE MATERIALIZED VIEW`, `DROP ...`,
//!   `SHOW TABLES | VIEWS | MATERIALIZED VIEWS | PIPELINES | JOBS`, `DESCRIBE`, `EXPLAIN`.
//! - Pipelines: `INSERT INTO` and `CREATE PIPELINE name AS INSERT ...` start one;
//!   `STOP PIPELINE`, `START PIPELINE [FRESH]`, `ALTER PIPELINE ... SET PARALLELISM = n`,
//!   `DROP PIPELINE`.
//! - `SELECT` reads materialized views: a consistent snapshot of each, queried with
//!   DataFusion.
//! - `SET 'key' = 'value'` sets an option of the pipelines this session creates.
//!
//! Every statement acts within the caller's tenant; a name in another tenant never resolves.

use std::collections::{BTreeMap, HashMap};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arrow::array::{ArrayRef, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use arrow::record_batch::RecordBatch;
use sqlparser::dialect::GenericDialect;
use sqlparser::tokenizer::{Token, Tokenizer, Whitespace};

use crate::auth::{self, Principal};
use crate::catalog::{
    now_ms, Catalog, Desired, Object, ObjectKind, Pipeline, Quotas, Role, User, ADMIN_TENANT,
    QUOTA_NAMES,
};
use crate::error::ApiError;
use crate::supervisor::{Layout, Supervisor};
use crate::views::Views;

/// One statement of a query string, and where it starts in it (0-based, in characters).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stmt {
    pub text: String,
    pub offset: usize,
}

/// Splits a query string on top-level `;` (not inside quotes or comments).
pub fn split(sql: &str) -> Vec<Stmt> {
    let chars: Vec<char> = sql.chars().collect();
    let mut out = vec![];
    let mut start = 0;
    let mut i = 0;
    let push = |out: &mut Vec<Stmt>, from: usize, to: usize| {
        let text: String = chars[from..to].iter().collect();
        if !is_blank(&text) {
            out.push(Stmt { text, offset: from });
        }
    };
    while i < chars.len() {
        match chars[i] {
            q @ ('\'' | '"' | '`') => {
                i += 1;
                while i < chars.len() {
                    if chars[i] == q {
                        if chars.get(i + 1) == Some(&q) {
                            i += 2;
                            continue;
                        }
                        break;
                    }
                    i += 1;
                }
            }
            '-' if chars.get(i + 1) == Some(&'-') => {
                while i < chars.len() && chars[i] != '\n' {
                    i += 1;
                }
            }
            '/' if chars.get(i + 1) == Some(&'*') => {
                i += 2;
                while i + 1 < chars.len() && !(chars[i] == '*' && chars[i + 1] == '/') {
                    i += 1;
                }
                i += 1;
            }
            ';' => {
                push(&mut out, start, i);
                start = i + 1;
            }
            _ => {}
        }
        i += 1;
    }
    push(&mut out, start, chars.len());
    out
}

/// Whether a statement holds only whitespace and comments.
fn is_blank(text: &str) -> bool {
    words(text).map_or(text.trim().is_empty(), |t| t.is_empty())
}

/// The tokens of a statement without whitespace and comments.
fn words(text: &str) -> Result<Vec<Token>, ApiError> {
    let tokens = Tokenizer::new(&GenericDialect {}, text)
        .tokenize()
        .map_err(|e| ApiError::syntax(e.to_string()))?;
    Ok(tokens
        .into_iter()
        .filter(|t| !matches!(t, Token::Whitespace(_)))
        .filter(|t| !matches!(t, Token::Whitespace(Whitespace::SingleLineComment { .. })))
        .collect())
}

/// A script checked by [`Server::validate`].
pub struct Validated {
    /// Each statement's kind (`SET`, `CREATE TABLE`, `SELECT`, `SHOW TABLES`, ...) and text.
    pub statements: Vec<(String, String)>,
    /// The plan of the statements that would run, when there are any.
    pub plan: Option<sluice_sql::JobPlan>,
    /// What was planned: the script with the other statements blanked.
    pub body: String,
    /// The session's settings with the script's `SET`s.
    pub settings: BTreeMap<String, String>,
}

/// `SET 'key' = 'value'` (or `SET key = value`, `SET key TO value`): the pair.
pub fn set_pair(text: &str) -> Option<(String, String)> {
    let t = words(text).ok()?;
    let mut c = Cursor { t: &t, i: 0 };
    if !c.word("SET") {
        return None;
    }
    let key = c.name_or_string()?;
    if !(c.eat(&Token::Eq) || c.word("TO")) {
        return None;
    }
    let mut value = String::new();
    while let Some(tok) = c.next() {
        match tok {
            Token::SingleQuotedString(s) | Token::DoubleQuotedString(s) => value.push_str(s),
            Token::Word(w) => value.push_str(&w.value),
            other => value.push_str(&other.to_string()),
        }
    }
    Some((key, value))
}

/// A cursor over a statement's tokens.
struct Cursor<'a> {
    t: &'a [Token],
    i: usize,
}

impl<'a> Cursor<'a> {
    fn peek(&self) -> Option<&'a Token> {
        self.t.get(self.i)
    }
    fn next(&mut self) -> Option<&'a Token> {
        let t = self.t.get(self.i);
        self.i += 1;
        t
    }
    /// Consumes `w` (a keyword, any case) if it is next.
    fn word(&mut self, w: &str) -> bool {
        match self.peek() {
            Some(Token::Word(x)) if x.quote_style.is_none() && x.value.eq_ignore_ascii_case(w) => {
                self.i += 1;
                true
            }
            _ => false,
        }
    }
    fn words(&mut self, ws: &[&str]) -> bool {
        let at = self.i;
        for w in ws {
            if !self.word(w) {
                self.i = at;
                return false;
            }
        }
        true
    }
    fn eat(&mut self, t: &Token) -> bool {
        if self.peek() == Some(t) {
            self.i += 1;
            return true;
        }
        false
    }
    fn name(&mut self) -> Option<String> {
        match self.peek()? {
            Token::Word(w) => {
                self.i += 1;
                Some(w.value.clone())
            }
            _ => None,
        }
    }
    fn name_or_string(&mut self) -> Option<String> {
        match self.peek()? {
            Token::SingleQuotedString(s) | Token::DoubleQuotedString(s) => {
                self.i += 1;
                Some(s.clone())
            }
            _ => self.name(),
        }
    }
    fn string(&mut self) -> Option<String> {
        match self.peek()? {
            Token::SingleQuotedString(s) => {
                self.i += 1;
                Some(s.clone())
            }
            _ => None,
        }
    }
    fn expect_name(&mut self, what: &str) -> Result<String, ApiError> {
        self.name()
            .ok_or_else(|| ApiError::syntax(format!("expected {what}, found {}", self.found())))
    }
    fn found(&self) -> String {
        self.peek()
            .map_or("the end of the statement".to_string(), |t| format!("'{t}'"))
    }
    fn end(&self) -> Result<(), ApiError> {
        match self.peek() {
            None | Some(Token::EOF) => Ok(()),
            Some(_) => Err(ApiError::syntax(format!(
                "unexpected {} at the end of the statement",
                self.found()
            ))),
        }
    }
}

/// Whether a statement is `SUBSCRIBE` (or `COPY (SUBSCRIBE ...) TO STDOUT`).
pub fn is_subscribe(text: &str) -> bool {
    words(text).is_ok_and(|t| {
        let mut c = Cursor { t: &t, i: 0 };
        c.word("SUBSCRIBE") || (c.word("COPY") && c.eat(&Token::LParen) && c.word("SUBSCRIBE"))
    })
}

/// A parsed `SUBSCRIBE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscribe {
    pub view: String,
    /// Send the view's rows first.
    pub snapshot: bool,
    /// `COPY (SUBSCRIBE ...) TO STDOUT`: rows as COPY text, which psql prints as they come.
    pub copy: bool,
}

/// `[COPY (] SUBSCRIBE [TO] name [WITH (SNAPSHOT = true|false)] [) TO STDOUT]`.
pub fn parse_subscribe(text: &str) -> Result<Subscribe, ApiError> {
    let t = words(text)?;
    let mut c = Cursor { t: &t, i: 0 };
    let copy = c.word("COPY");
    if copy && !c.eat(&Token::LParen) {
        return Err(ApiError::syntax("expected COPY (SUBSCRIBE ...) TO STDOUT"));
    }
    c.word("SUBSCRIBE");
    c.word("TO");
    let view = c.expect_name("a materialized view's name")?;
    let mut snapshot = true;
    if c.word("WITH") {
        if !c.eat(&Token::LParen) || !c.word("SNAPSHOT") {
            return Err(ApiError::syntax("expected WITH (SNAPSHOT = true|false)"));
        }
        c.eat(&Token::Eq);
        snapshot = match c.next() {
            Some(Token::Word(w)) if w.value.eq_ignore_ascii_case("false") => false,
            Some(Token::Word(w)) if w.value.eq_ignore_ascii_case("true") => true,
            other => {
                return Err(ApiError::syntax(format!(
                    "SNAPSHOT: expected true or false, found {other:?}"
                )))
            }
        };
        if !c.eat(&Token::RParen) {
            return Err(ApiError::syntax("expected ')'"));
        }
    }
    if copy && !(c.eat(&Token::RParen) && c.words(&["TO", "STDOUT"])) {
        return Err(ApiError::syntax("expected COPY (SUBSCRIBE ...) TO STDOUT"));
    }
    c.end()?;
    Ok(Subscribe {
        view,
        snapshot,
        copy,
    })
}

/// What a statement returns.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// A command tag (`CREATE TABLE`, `INSERT 0 0`, ...).
    Command(String),
    /// Rows.
    Rows(RecordBatch),
}

/// Formatters of a batch's columns as text: timestamps as PostgreSQL prints them.
pub fn text_formatters(
    batch: &RecordBatch,
) -> Result<Vec<arrow::util::display::ArrayFormatter<'_>>, arrow::error::ArrowError> {
    let options = arrow::util::display::FormatOptions::default()
        .with_timestamp_format(Some("%Y-%m-%d %H:%M:%S%.f"))
        .with_timestamp_tz_format(Some("%Y-%m-%d %H:%M:%S%.f"));
    batch
        .columns()
        .iter()
        .map(|c| arrow::util::display::ArrayFormatter::try_new(c.as_ref(), &options))
        .collect()
}

/// A batch of text columns.
pub fn text_rows(columns: &[&str], rows: Vec<Vec<String>>) -> RecordBatch {
    let schema = Arc::new(Schema::new(
        columns
            .iter()
            .map(|c| Field::new(*c, DataType::Utf8, true))
            .collect::<Vec<_>>(),
    ));
    let arrays: Vec<ArrayRef> = (0..columns.len())
        .map(|i| {
            Arc::new(StringArray::from(
                rows.iter().map(|r| r[i].clone()).collect::<Vec<_>>(),
            )) as ArrayRef
        })
        .collect();
    RecordBatch::try_new(schema, arrays).expect("text rows")
}

/// A connection's state: who it is and the options its pipelines get.
#[derive(Debug, Clone)]
pub struct Session {
    pub principal: Principal,
    pub settings: BTreeMap<String, String>,
}

impl Session {
    pub fn new(principal: Principal) -> Session {
        Session {
            principal,
            settings: BTreeMap::new(),
        }
    }
}

/// The server's shared state.
pub struct Server {
    pub catalog: Arc<Catalog>,
    pub supervisor: Arc<Supervisor>,
    pub views: Arc<Views>,
    pub layout: Arc<Layout>,
    /// Worker threads all pipelines of the server may use together.
    pub max_parallelism: u64,
}

/// The checkpoint interval of a pipeline that does not set one: a materialized view shows each
/// checkpoint, so this is also how fresh it is.
pub const DEFAULT_CHECKPOINT_INTERVAL: &str = "1 s";

/// Names of tenants, users, pipelines and views: they name folders too.
pub fn check_name(what: &str, name: &str) -> Result<(), ApiError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if ok {
        return Ok(());
    }
    Err(ApiError::invalid(format!(
        "{what} name '{name}': use letters, digits and '_' (up to 63, not starting with a digit)"
    )))
}

pub fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

impl Server {
    /// Runs one statement for a session.
    pub async fn execute(
        self: &Arc<Self>,
        session: &mut Session,
        stmt: &Stmt,
    ) -> Result<Outcome, ApiError> {
        let explain = stmt
            .text
            .trim_start()
            .to_ascii_uppercase()
            .starts_with("EXPLAIN");
        match self.execute_unmasked(session, stmt).await {
            Err(e) => Err(self.without_secrets(&session.principal.tenant, &stmt.text, e)),
            Ok(Outcome::Rows(batch)) if explain => {
                let secrets = self.secrets_of(&session.principal.tenant, &stmt.text);
                Ok(Outcome::Rows(redact_batch(&batch, &secrets)))
            }
            ok => ok,
        }
    }

    /// The secret option values of a statement and of the tenant's objects.
    pub fn secrets_of(&self, tenant: &str, text: &str) -> Vec<String> {
        let mut secrets = sluice_common::secrets::secret_values(text);
        for o in self.catalog.objects(tenant).unwrap_or_default() {
            secrets.extend(sluice_common::secrets::secret_values(&o.sql));
        }
        secrets
    }

    /// An error whose message cannot show a secret of the statement or of the tenant.
    pub fn without_secrets(&self, tenant: &str, text: &str, e: ApiError) -> ApiError {
        let secrets = self.secrets_of(tenant, text);
        ApiError {
            message: sluice_common::secrets::redact(&e.message, &secrets),
            ..e
        }
    }

    async fn execute_unmasked(
        self: &Arc<Self>,
        session: &mut Session,
        stmt: &Stmt,
    ) -> Result<Outcome, ApiError> {
        let t = words(&stmt.text).map_err(|e| e.at(stmt.offset + 1))?;
        let mut c = Cursor { t: &t, i: 0 };
        if c.word("SELECT") || c.word("WITH") || c.word("VALUES") {
            return self.select(&session.principal, &stmt.text).await;
        }
        let server = self.clone();
        let mut s = session.clone();
        let st = stmt.clone();
        let (outcome, s) = tokio::task::spawn_blocking(move || {
            let r = server.execute_blocking(&mut s, &st);
            (r, s)
        })
        .await
        .map_err(|e| ApiError::internal(format!("statement panicked: {e}")))?;
        *session = s;
        outcome
    }

    fn execute_blocking(&self, session: &mut Session, stmt: &Stmt) -> Result<Outcome, ApiError> {
        let t = words(&stmt.text)?;
        let mut c = Cursor { t: &t, i: 0 };
        let p = session.principal.clone();
        if c.word("SET") {
            let (k, v) = set_pair(&stmt.text)
                .ok_or_else(|| ApiError::syntax("expected SET 'key' = 'value'"))?;
            return self.set(session, k, v);
        }
        if c.word("RESET") {
            session.settings.clear();
            return Ok(Outcome::Command("RESET".into()));
        }
        if c.words(&["CREATE", "TENANT"]) {
            p.require_admin()?;
            let name = c.expect_name("a tenant name")?;
            c.end()?;
            check_name("tenant", &name)?;
            self.catalog.create_tenant(&name)?;
            std::fs::create_dir_all(self.layout.files(&name))
                .map_err(|e| ApiError::internal(e.to_string()))?;
            return Ok(Outcome::Command("CREATE TENANT".into()));
        }
        if c.words(&["DROP", "TENANT"]) {
            p.require_admin()?;
            let name = c.expect_name("a tenant name")?;
            c.end()?;
            if name == ADMIN_TENANT {
                return Err(ApiError::invalid("the admin tenant cannot be dropped"));
            }
            for pl in self.catalog.pipelines(Some(&name))? {
                self.supervisor
                    .stop(&name, &pl.name, Duration::from_secs(30));
                for v in &pl.views {
                    self.views.remove(&name, v);
                }
            }
            self.catalog.drop_tenant(&name)?;
            let _ = std::fs::remove_dir_all(self.layout.tenant(&name));
            return Ok(Outcome::Command("DROP TENANT".into()));
        }
        if c.words(&["CREATE", "USER"]) {
            return self.create_user(&p, &mut c);
        }
        if c.words(&["ALTER", "USER"]) {
            let name = c.expect_name("a user name")?;
            if !(c.words(&["WITH", "PASSWORD"]) || c.word("PASSWORD")) {
                return Err(ApiError::syntax(
                    "expected ALTER USER name WITH PASSWORD '...'",
                ));
            }
            let password = c
                .string()
                .ok_or_else(|| ApiError::syntax("expected the password as a string"))?;
            c.end()?;
            let user = self.visible_user(&p, &name)?;
            if user.name != p.user {
                p.require_owner()?;
            }
            self.catalog
                .set_verifier(&name, &auth::verifier(&password))?;
            return Ok(Outcome::Command("ALTER ROLE".into()));
        }
        if c.words(&["DROP", "USER"]) {
            let if_exists = c.words(&["IF", "EXISTS"]);
            let name = c.expect_name("a user name")?;
            c.end()?;
            p.require_owner()?;
            match self.visible_user(&p, &name) {
                Ok(_) => {}
                Err(_) if if_exists => return Ok(Outcome::Command("DROP ROLE".into())),
                Err(e) => return Err(e),
            }
            if name == p.user {
                return Err(ApiError::invalid("a user cannot drop itself"));
            }
            self.catalog.drop_user(&name)?;
            return Ok(Outcome::Command("DROP ROLE".into()));
        }
        if c.words(&["CREATE", "TOKEN"]) {
            let user = if c.words(&["FOR", "USER"]) {
                c.expect_name("a user name")?
            } else {
                p.user.clone()
            };
            c.end()?;
            let target = self.visible_user(&p, &user)?;
            if target.name != p.user {
                p.require_owner()?;
            }
            let (id, secret) = auth::create_token(&self.catalog, &user)?;
            return Ok(Outcome::Rows(text_rows(
                &["token_id", "token", "user", "tenant", "role"],
                vec![vec![
                    id,
                    secret,
                    target.name,
                    target.tenant,
                    target.role.name().into(),
                ]],
            )));
        }
        if c.words(&["REVOKE", "TOKEN"]) {
            let id = c
                .name_or_string()
                .ok_or_else(|| ApiError::syntax("expected REVOKE TOKEN 'token_id'"))?;
            c.end()?;
            let owner = self
                .catalog
                .token_owner(&id)?
                .ok_or_else(|| ApiError::not_found(format!("token '{id}' does not exist")))?;
            let target = self
                .visible_user(&p, &owner)
                .map_err(|_| ApiError::not_found(format!("token '{id}' does not exist")))?;
            if target.name != p.user {
                p.require_owner()?;
            }
            self.catalog.revoke_token(&id)?;
            return Ok(Outcome::Command("REVOKE TOKEN".into()));
        }
        if c.words(&["ALTER", "TENANT"]) {
            p.require_admin()?;
            let tenant = c.expect_name("a tenant name")?;
            if !c.words(&["SET", "QUOTA"]) {
                return Err(ApiError::syntax(
                    "expected ALTER TENANT name SET QUOTA (max_pipelines = 2, ...)",
                ));
            }
            let mut quotas = self.catalog.quotas(&tenant)?;
            if !c.eat(&Token::LParen) {
                return Err(ApiError::syntax("expected '(' after SET QUOTA"));
            }
            loop {
                let key = c.expect_name("a quota name")?.to_ascii_lowercase();
                if !c.eat(&Token::Eq) {
                    return Err(ApiError::syntax(format!("expected '=' after {key}")));
                }
                let value = match c.next() {
                    Some(Token::Number(n, _)) => n.clone(),
                    Some(Token::SingleQuotedString(s)) => s.clone(),
                    Some(Token::Word(w)) => w.value.clone(),
                    other => {
                        return Err(ApiError::syntax(format!(
                            "expected a value for {key}, found {other:?}"
                        )))
                    }
                };
                let parsed = if value.eq_ignore_ascii_case("unlimited")
                    || value.eq_ignore_ascii_case("null")
                {
                    None
                } else if key.ends_with("_bytes") {
                    Some(parse_bytes(&value).ok_or_else(|| {
                        ApiError::invalid(format!(
                            "{key} = '{value}': give bytes such as '512mb' or '2gb'"
                        ))
                    })?)
                } else {
                    Some(value.parse::<u64>().map_err(|_| {
                        ApiError::invalid(format!("{key} = {value}: give a whole number"))
                    })?)
                };
                quotas.set(&key, parsed)?;
                if c.eat(&Token::RParen) {
                    break;
                }
                if !c.eat(&Token::Comma) {
                    return Err(ApiError::syntax(format!(
                        "expected ',' or ')', found {}",
                        c.found()
                    )));
                }
            }
            c.end()?;
            self.catalog.set_quotas(&tenant, &quotas)?;
            self.supervisor.share_ingest(&tenant);
            return Ok(Outcome::Command("ALTER TENANT".into()));
        }
        if c.word("SHOW") {
            return self.show(&p, &mut c);
        }
        if c.words(&["CHECKPOINT", "PIPELINE"]) {
            p.require_developer()?;
            let name = c.expect_name("a pipeline name")?;
            c.end()?;
            return self.checkpoint_pipeline(&p.tenant, &name);
        }
        if c.words(&["STOP", "PIPELINE"]) || c.words(&["STOP", "JOB"]) {
            p.require_developer()?;
            let name = c.expect_name("a pipeline name")?;
            c.end()?;
            self.stop_pipeline(&p.tenant, &name)?;
            return Ok(Outcome::Command("STOP PIPELINE".into()));
        }
        if c.words(&["START", "PIPELINE"]) || c.words(&["RESUME", "PIPELINE"]) {
            p.require_developer()?;
            let name = c.expect_name("a pipeline name")?;
            let fresh = c.word("FRESH");
            c.end()?;
            self.start_pipeline(&p.tenant, &name, fresh)?;
            return Ok(Outcome::Command("START PIPELINE".into()));
        }
        if c.words(&["ALTER", "PIPELINE"]) {
            p.require_developer()?;
            let name = c.expect_name("a pipeline name")?;
            let fresh = c.word("FRESH");
            if c.word("AS") {
                let (at, statements) = after_keyword_as(&stmt.text)
                    .ok_or_else(|| ApiError::syntax("expected AS statements"))?;
                self.alter_pipeline(session, &name, &statements, fresh)
                    .map_err(|e| shift(e, stmt.offset + at))?;
                return Ok(Outcome::Command("ALTER PIPELINE".into()));
            }
            if fresh || !c.words(&["SET", "PARALLELISM"]) {
                return Err(ApiError::syntax(
                    "expected ALTER PIPELINE name SET PARALLELISM = n, or ALTER PIPELINE name [FRESH] AS statements",
                ));
            }
            c.eat(&Token::Eq);
            let n = match c.next() {
                Some(Token::Number(n, _)) => n.parse::<u64>().ok().filter(|n| *n >= 1),
                _ => None,
            }
            .ok_or_else(|| ApiError::syntax("expected a parallelism of at least 1"))?;
            c.end()?;
            self.rescale(&p.tenant, &name, n)?;
            return Ok(Outcome::Command("ALTER PIPELINE".into()));
        }
        if c.words(&["DROP", "PIPELINE"]) || c.words(&["DROP", "JOB"]) {
            p.require_developer()?;
            let if_exists = c.words(&["IF", "EXISTS"]);
            let name = c.expect_name("a pipeline name")?;
            c.end()?;
            let pl = self.catalog.pipeline(&p.tenant, &name)?;
            match pl {
                None if if_exists => {}
                None => return Err(no_pipeline(&name)),
                Some(pl) if !pl.views.is_empty() => {
                    return Err(ApiError::invalid(format!(
                        "pipeline '{name}' keeps materialized view '{}': DROP MATERIALIZED VIEW {} instead",
                        pl.views[0], pl.views[0]
                    )))
                }
                Some(_) => self.drop_pipeline(&p.tenant, &name)?,
            }
            return Ok(Outcome::Command("DROP PIPELINE".into()));
        }
        if c.word("DROP") {
            p.require_developer()?;
            let kind = if c.words(&["MATERIALIZED", "VIEW"]) {
                ObjectKind::MaterializedView
            } else if c.word("CONNECTION") {
                ObjectKind::Connection
            } else if c.word("VIEW") {
                ObjectKind::View
            } else if c.word("TABLE") {
                ObjectKind::Table
            } else {
                return Err(ApiError::syntax(format!(
                    "expected TABLE, VIEW, MATERIALIZED VIEW, CONNECTION, PIPELINE, USER or TENANT after DROP, found {}",
                    c.found()
                )));
            };
            let if_exists = c.words(&["IF", "EXISTS"]);
            let name = c.expect_name("a name")?;
            c.end()?;
            return self.drop_object(&p.tenant, kind, &name, if_exists);
        }
        if c.words(&["CREATE", "MATERIALIZED", "VIEW"]) {
            p.require_developer()?;
            let name = c.expect_name("a view name")?;
            if !c.word("AS") {
                return Err(ApiError::syntax(format!(
                    "expected AS after the view's name, found {}",
                    c.found()
                )));
            }
            let query = after_keyword_as(&stmt.text)
                .ok_or_else(|| ApiError::syntax("expected AS query"))?;
            check_name("materialized view", &name)?;
            self.create_pipeline(session, &name, &query.1, Some(&name))
                .map_err(|e| shift(e, stmt.offset + query.0))?;
            return Ok(Outcome::Command("CREATE MATERIALIZED VIEW".into()));
        }
        if c.words(&["CREATE", "PIPELINE"]) {
            p.require_developer()?;
            let name = c.expect_name("a pipeline name")?;
            if !c.word("AS") {
                return Err(ApiError::syntax(
                    "expected CREATE PIPELINE name AS INSERT INTO ...",
                ));
            }
            let body = after_keyword_as(&stmt.text)
                .ok_or_else(|| ApiError::syntax("expected AS INSERT INTO ..."))?;
            check_name("pipeline", &name)?;
            self.create_pipeline(session, &name, &body.1, None)
                .map_err(|e| shift(e, stmt.offset + body.0))?;
            return Ok(Outcome::Command("CREATE PIPELINE".into()));
        }
        if c.word("INSERT") {
            p.require_developer()?;
            let n = self.catalog.pipelines(Some(&p.tenant))?.len();
            let name = (n + 1..)
                .map(|i| format!("insert_{i}"))
                .find(|n| self.catalog.pipeline(&p.tenant, n).ok().flatten().is_none())
                .expect("a free name");
            self.create_pipeline(session, &name, &stmt.text, None)
                .map_err(|e| shift(e, stmt.offset))?;
            return Ok(Outcome::Command("INSERT 0 0".into()));
        }
        if c.words(&["CREATE", "CONNECTION"]) {
            p.require_developer()?;
            let if_not_exists = c.words(&["IF", "NOT", "EXISTS"]);
            let name = c.expect_name("a connection name")?;
            if !c.word("WITH") {
                return Err(ApiError::syntax(format!(
                    "expected CREATE CONNECTION name WITH ('key' = 'value', ...), found {}",
                    c.found()
                )));
            }
            return self.create_connection(&p.tenant, &name, &stmt.text, if_not_exists);
        }
        if c.word("CREATE") {
            p.require_developer()?;
            return self
                .create_object(&p.tenant, &stmt.text)
                .map_err(|e| shift(e, stmt.offset));
        }
        if c.word("DESCRIBE") || c.word("DESC") {
            let name = c.expect_name("a table or view name")?;
            c.end()?;
            return self.describe(&p.tenant, &name);
        }
        if c.word("EXPLAIN") {
            let plan = self
                .plan_for(&p.tenant, &session.settings, &stmt.text)
                .map_err(|e| shift(e, stmt.offset))?;
            let text = sluice_sql::plan::explain::explain_pipelines(&plan.explained);
            return Ok(Outcome::Rows(text_rows(
                &["plan"],
                text.lines().map(|l| vec![l.to_string()]).collect(),
            )));
        }
        Err(ApiError::syntax(format!(
            "unknown statement starting with {}",
            Cursor { t: &t, i: 0 }.found()
        ))
        .at(stmt.offset + 1))
    }

    fn set(&self, session: &mut Session, key: String, value: String) -> Result<Outcome, ApiError> {
        if key == "execution.checkpointing.dir" || key == "execution.state-recovery.path" {
            return Err(ApiError::denied(format!(
                "SET '{key}': the server keeps each pipeline's checkpoints in the tenant's storage"
            )));
        }
        let known = key.starts_with("restart-strategy.")
            || key == "parallelism.default"
            || sluice_sql::config::check(&key, &value).is_ok();
        if !known {
            // Parameters that Postgres clients set (application_name, extra_float_digits, ...).
            if !key.contains('.') {
                return Ok(Outcome::Command("SET".into()));
            }
            sluice_sql::config::check(&key, &value)
                .map_err(|e| ApiError::invalid(e.to_string()))?;
        }
        if key == "parallelism.default" {
            value
                .trim()
                .parse::<u64>()
                .ok()
                .filter(|n| *n >= 1)
                .ok_or_else(|| {
                    ApiError::invalid(format!(
                        "SET '{key}' = '{value}': give a whole number of at least 1"
                    ))
                })?;
        }
        session.settings.insert(key, value);
        Ok(Outcome::Command("SET".into()))
    }

    /// A user the principal may see: its own tenant's (every tenant's for the admin).
    fn visible_user(&self, p: &Principal, name: &str) -> Result<User, ApiError> {
        match self.catalog.user(name)? {
            Some(u) if u.tenant == p.tenant || p.is_admin() => Ok(u),
            _ => Err(ApiError::not_found(format!("user '{name}' does not exist"))),
        }
    }

    fn create_user(&self, p: &Principal, c: &mut Cursor) -> Result<Outcome, ApiError> {
        let name = c.expect_name("a user name")?;
        check_name("user", &name)?;
        let mut password = None;
        let mut tenant = p.tenant.clone();
        let mut role = Role::Developer;
        loop {
            if c.words(&["WITH", "PASSWORD"]) || c.word("PASSWORD") {
                password = Some(
                    c.string()
                        .ok_or_else(|| ApiError::syntax("expected the password as a string"))?,
                );
            } else if c.words(&["IN", "TENANT"]) {
                tenant = c.expect_name("a tenant name")?;
            } else if c.word("ROLE") {
                role = Role::parse(&c.expect_name("a role")?)?;
            } else {
                break;
            }
        }
        c.end()?;
        let password = password.ok_or_else(|| {
            ApiError::syntax("expected CREATE USER name WITH PASSWORD '...' [IN TENANT t] [ROLE r]")
        })?;
        if tenant != p.tenant {
            p.require_admin()?;
        }
        p.require_owner()?;
        self.catalog.create_user(&User {
            name,
            tenant,
            role,
            verifier: auth::verifier(&password),
        })?;
        Ok(Outcome::Command("CREATE ROLE".into()))
    }

    fn show(&self, p: &Principal, c: &mut Cursor) -> Result<Outcome, ApiError> {
        let what = c.expect_name("what to show")?.to_ascii_uppercase();
        let what = if what == "MATERIALIZED" && c.word("VIEWS") {
            "MATERIALIZED VIEWS".to_string()
        } else {
            what
        };
        c.end()?;
        let scope = (!p.is_admin()).then_some(p.tenant.as_str());
        match what.as_str() {
            "TENANTS" => {
                let names = match scope {
                    None => self.catalog.tenants()?,
                    Some(t) => vec![t.to_string()],
                };
                Ok(Outcome::Rows(text_rows(
                    &["tenant"],
                    names.into_iter().map(|n| vec![n]).collect(),
                )))
            }
            "USERS" => Ok(Outcome::Rows(text_rows(
                &["user", "tenant", "role"],
                self.catalog
                    .users(scope)?
                    .into_iter()
                    .map(|(u, t, r)| vec![u, t, r.name().to_string()])
                    .collect(),
            ))),
            "TOKENS" => {
                if p.role != Role::Owner {
                    let own: Vec<_> = self
                        .catalog
                        .tokens(Some(&p.tenant))?
                        .into_iter()
                        .filter(|(_, u, _)| *u == p.user)
                        .collect();
                    return Ok(Outcome::Rows(tokens_rows(own)));
                }
                Ok(Outcome::Rows(tokens_rows(self.catalog.tokens(scope)?)))
            }
            "QUOTAS" => {
                let tenants = match scope {
                    None => self.catalog.tenants()?,
                    Some(t) => vec![t.to_string()],
                };
                let mut rows = vec![];
                for t in tenants {
                    let q = self.catalog.quotas(&t)?;
                    let usage = self.usage(&t)?;
                    for name in QUOTA_NAMES {
                        rows.push(vec![
                            t.clone(),
                            name.to_string(),
                            q.get(name).map_or("unlimited".into(), |v| v.to_string()),
                            usage.get(name).map_or(String::new(), |v| v.to_string()),
                        ]);
                    }
                }
                Ok(Outcome::Rows(text_rows(
                    &["tenant", "quota", "limit", "used"],
                    rows,
                )))
            }
            "CONNECTIONS" => {
                let tenant = scope.unwrap_or(p.tenant.as_str());
                let rows = self
                    .catalog
                    .objects(tenant)?
                    .into_iter()
                    .filter(|o| o.kind == ObjectKind::Connection)
                    .map(|o| {
                        let options: Vec<String> = sluice_common::secrets::option_pairs(
                            &sluice_common::secrets::mask_sql(&o.sql),
                        )
                        .into_iter()
                        .map(|p| format!("'{}' = '{}'", p.key, p.value))
                        .collect();
                        vec![o.name, options.join(", ")]
                    })
                    .collect();
                Ok(Outcome::Rows(text_rows(&["connection", "options"], rows)))
            }
            "TABLES" | "VIEWS" | "MATERIALIZED VIEWS" => {
                let kind = match what.as_str() {
                    "TABLES" => ObjectKind::Table,
                    "VIEWS" => ObjectKind::View,
                    _ => ObjectKind::MaterializedView,
                };
                let rows = self
                    .catalog
                    .objects(&p.tenant)?
                    .into_iter()
                    .filter(|o| o.kind == kind || (what == "VIEWS" && o.kind == ObjectKind::MaterializedView))
                    .map(|o| vec![o.name, o.kind.words().to_string()])
                    .collect();
                Ok(Outcome::Rows(text_rows(&["name", "kind"], rows)))
            }
            "PIPELINES" | "JOBS" => {
                let rows = self
                    .catalog
                    .pipelines(scope)?
                    .into_iter()
                    .map(|pl| {
                        let uptime = self
                            .supervisor
                            .uptime(&pl.tenant, &pl.name)
                            .map_or(String::new(), |d| format!("{} s", d.as_secs()));
                        let pid = self
                            .supervisor
                            .pid(&pl.tenant, &pl.name)
                            .map_or(String::new(), |p| p.to_string());
                        vec![
                            pl.tenant,
                            pl.name,
                            pl.status,
                            pl.parallelism.to_string(),
                            pl.restarts.to_string(),
                            uptime,
                            pid,
                            pl.last_error.unwrap_or_default(),
                        ]
                    })
                    .collect();
                Ok(Outcome::Rows(text_rows(
                    &[
                        "tenant",
                        "pipeline",
                        "status",
                        "parallelism",
                        "restarts",
                        "uptime",
                        "pid",
                        "last_error",
                    ],
                    rows,
                )))
            }
            other => Err(ApiError::syntax(format!(
                "SHOW {other}: give TENANTS, USERS, TOKENS, QUOTAS, TABLES, VIEWS, MATERIALIZED VIEWS, CONNECTIONS or PIPELINES"
            ))),
        }
    }

    /// What a tenant uses of each quota that is counted so far.
    pub fn usage(&self, tenant: &str) -> Result<BTreeMap<&'static str, u64>, ApiError> {
        let running: Vec<Pipeline> = self
            .catalog
            .pipelines(Some(tenant))?
            .into_iter()
            .filter(|p| p.desired == Desired::Running)
            .collect();
        let checkpoints: u64 = running
            .iter()
            .map(|p| crate::supervisor::dir_bytes(&self.layout.checkpoints(tenant, &p.name)))
            .sum();
        Ok(BTreeMap::from([
            ("max_checkpoint_bytes", checkpoints),
            ("max_pipelines", running.len() as u64),
            (
                "max_parallelism",
                running.iter().map(|p| p.parallelism).sum::<u64>(),
            ),
        ]))
    }

    /// Refuses to run one more pipeline of `parallelism` workers when a quota would be passed.
    fn admit(&self, tenant: &str, name: &str, parallelism: u64) -> Result<(), ApiError> {
        let quotas: Quotas = self.catalog.quotas(tenant)?;
        let usage = self.usage(tenant)?;
        let others: Vec<Pipeline> = self
            .catalog
            .pipelines(Some(tenant))?
            .into_iter()
            .filter(|p| p.desired == Desired::Running && p.name != name)
            .collect();
        if let Some(max) = quotas.max_pipelines {
            let used = others.len() as u64;
            if used + 1 > max {
                return Err(ApiError::quota(format!(
                    "quota max_pipelines of tenant '{tenant}' is {max} and {used} pipelines are running: stop one, or ask an administrator to raise it"
                )));
            }
        }
        if let Some(max) = quotas.max_parallelism {
            let used: u64 = others.iter().map(|p| p.parallelism).sum();
            if used + parallelism > max {
                return Err(ApiError::quota(format!(
                    "quota max_parallelism of tenant '{tenant}' is {max}: {used} workers are in use and pipeline '{name}' asks for {parallelism}"
                )));
            }
        }
        let _ = usage;
        let all: u64 = self
            .catalog
            .pipelines(None)?
            .into_iter()
            .filter(|p| p.desired == Desired::Running && !(p.tenant == tenant && p.name == name))
            .map(|p| p.parallelism)
            .sum();
        if all + parallelism > self.max_parallelism {
            return Err(ApiError::quota(format!(
                "the server runs at most {} workers in all ({all} in use): pipeline '{name}' asks for {parallelism}",
                self.max_parallelism
            )));
        }
        Ok(())
    }

    /// The tenant's tables and views, replayed into a planner catalog with `settings` first.
    fn planner(&self, tenant: &str, settings: &str) -> Result<sluice_sql::Catalog, ApiError> {
        let mut catalog = sluice_sql::Catalog::new();
        catalog
            .execute(settings)
            .map_err(|e| ApiError::internal(format!("pipeline settings: {e}")))?;
        for o in self.catalog.objects(tenant)? {
            if matches!(
                o.kind,
                ObjectKind::MaterializedView | ObjectKind::Connection
            ) {
                continue;
            }
            catalog
                .execute(&self.expand_connections(tenant, &o.sql)?)
                .map_err(|e| {
                    ApiError::plan(format!(
                        "the stored definition of '{}' no longer plans: {e}",
                        o.name
                    ))
                })?;
        }
        Ok(catalog)
    }

    /// The `SET`s a pipeline's script starts with.
    fn settings_sql(
        &self,
        tenant: &str,
        name: &str,
        settings: &BTreeMap<String, String>,
    ) -> String {
        let mut s = BTreeMap::new();
        s.insert(
            "execution.checkpointing.interval".to_string(),
            DEFAULT_CHECKPOINT_INTERVAL.to_string(),
        );
        for (k, v) in settings {
            if k.starts_with("restart-strategy.") || k == "parallelism.default" {
                continue;
            }
            s.insert(k.clone(), v.clone());
        }
        s.insert(
            "execution.checkpointing.dir".to_string(),
            self.layout.checkpoints(tenant, name).display().to_string(),
        );
        s.iter()
            .map(|(k, v)| format!("SET {} = {};\n", quote(k), quote(v)))
            .collect()
    }

    /// Plans `statements` (a pipeline's, or one to explain) over the tenant's catalog.
    fn plan_for(
        &self,
        tenant: &str,
        settings: &BTreeMap<String, String>,
        statements: &str,
    ) -> Result<sluice_sql::JobPlan, ApiError> {
        let mut planner = self.planner(tenant, &self.settings_sql(tenant, "_plan", settings))?;
        planner
            .execute(statements)
            .map_err(|e| ApiError::from_sql(&e, statements))?;
        Ok(planner.into_job())
    }

    /// Checks a script as the console's editor holds it, without running it: each statement's
    /// kind, and the statements that would run (tables, views, `INSERT`s, materialized views'
    /// and pipelines' queries, `SELECT`s) planned together over the tenant's catalog with the
    /// script's `SET`s. The planner sees them where they stand in `sql`, the rest blanked, so
    /// every error's position and line are the editor's. Statements that manage the platform
    /// (`SHOW`, `STOP PIPELINE`, `CREATE USER`, ...) are only named: they are checked when run.
    pub fn validate(&self, session: &Session, sql: &str) -> Result<Validated, ApiError> {
        let p = &session.principal;
        let chars: Vec<char> = sql.chars().collect();
        let mut layout: Vec<char> = chars
            .iter()
            .map(|c| if *c == '\n' { '\n' } else { ' ' })
            .collect();
        let mut settings = session.settings.clone();
        let mut statements = vec![];
        for stmt in split(sql) {
            let t = words(&stmt.text).map_err(|e| e.at(stmt.offset + 1))?;
            let mut c = Cursor { t: &t, i: 0 };
            let after_as = || {
                after_keyword_as(&stmt.text)
                    .map(|(at, _)| at)
                    .ok_or_else(|| ApiError::syntax("expected AS and a query").at(stmt.offset + 1))
            };
            let (kind, from) = if let Some((k, v)) = set_pair(&stmt.text) {
                let mut tmp = Session::new(p.clone());
                self.set(&mut tmp, k.clone(), v.clone())
                    .map_err(|e| e.at(stmt.offset + 1))?;
                settings.insert(k, v);
                ("SET".to_string(), None)
            } else if c.words(&["CREATE", "MATERIALIZED", "VIEW"]) {
                ("CREATE MATERIALIZED VIEW".into(), Some(after_as()?))
            } else if c.words(&["CREATE", "PIPELINE"]) {
                ("CREATE PIPELINE".into(), Some(after_as()?))
            } else if c.word("INSERT") {
                ("INSERT".into(), Some(0))
            } else if c.word("SELECT") || c.word("WITH") || c.word("VALUES") {
                ("SELECT".into(), Some(0))
            } else if c.words(&["CREATE", "TABLE"])
                || c.words(&["CREATE", "TEMPORARY", "TABLE"])
                || c.words(&["CREATE", "VIEW"])
                || c.words(&["CREATE", "TEMPORARY", "VIEW"])
            {
                let kind =
                    if t.iter().take(3).any(
                        |w| matches!(w, Token::Word(w) if w.value.eq_ignore_ascii_case("VIEW")),
                    ) {
                        "CREATE VIEW"
                    } else {
                        "CREATE TABLE"
                    };
                (kind.into(), Some(0))
            } else {
                let head: Vec<String> = t
                    .iter()
                    .take(2)
                    .map(|w| w.to_string().to_ascii_uppercase())
                    .collect();
                (head.join(" "), None)
            };
            if let Some(from) = from {
                let start = stmt.offset + from;
                let end = stmt.offset + stmt.text.chars().count();
                layout[start..end].copy_from_slice(&chars[start..end]);
                // Its `;`, so that the planner sees the statements apart.
                if let Some(semi) = layout.get_mut(end) {
                    *semi = ';';
                }
            }
            statements.push((kind, stmt.text.trim().to_string()));
        }
        let body: String = layout.into_iter().collect();
        let plan = if statements.iter().any(|(k, _)| k != "SET") && !is_blank(&body) {
            self.check_reads(&p.tenant, &body)?;
            let plan = self.plan_for(&p.tenant, &settings, &body)?;
            for pl in &plan.pipelines {
                if let sluice_sql::SinkTarget::Table(t) = &pl.sink {
                    self.check_paths(&p.tenant, t)?;
                }
            }
            Some(plan)
        } else {
            None
        };
        Ok(Validated {
            statements,
            plan,
            body,
            settings,
        })
    }

    /// A preview's script (as a pipeline's, with its own checkpoint folder and `interval`), and
    /// the schema of its one `SELECT`. The script may create tables for itself; it may not write
    /// anywhere (`INSERT`, materialized views and pipelines are created with Run).
    pub fn preview_script(
        &self,
        session: &Session,
        sql: &str,
        name: &str,
        interval: &str,
    ) -> Result<(String, arrow::datatypes::SchemaRef), ApiError> {
        let v = self.validate(session, sql)?;
        if let Some((kind, _)) = v.statements.iter().find(|(k, _)| {
            !matches!(
                k.as_str(),
                "SET" | "SELECT" | "CREATE TABLE" | "CREATE VIEW"
            )
        }) {
            return Err(ApiError::invalid(format!(
                "a preview runs one SELECT (after SETs and CREATE TABLE or VIEW); {kind} changes the platform: run it instead"
            )));
        }
        let plan = v
            .plan
            .as_ref()
            .filter(|pl| pl.pipelines.len() == 1)
            .ok_or_else(|| {
                ApiError::invalid("a preview runs one SELECT over the tenant's tables: write one")
            })?;
        let schema = plan.pipelines[0].query.schema();
        let mut settings = v.settings.clone();
        settings.insert(
            "execution.checkpointing.interval".into(),
            interval.to_string(),
        );
        let mut script = self.settings_sql(&session.principal.tenant, name, &settings);
        for o in self.catalog.objects(&session.principal.tenant)? {
            if !matches!(
                o.kind,
                ObjectKind::MaterializedView | ObjectKind::Connection
            ) {
                script.push_str(&self.expand_connections(&session.principal.tenant, &o.sql)?);
                script.push_str(";\n");
            }
        }
        script.push_str(&v.body);
        Ok((script, schema))
    }

    /// Plans a pipeline's statements (its `SET`s first) as the caller's tenant and writes the
    /// script its process runs; nothing is stored or started.
    fn prepare_pipeline(
        &self,
        session: &Session,
        name: &str,
        statements: &str,
        view: Option<&str>,
    ) -> Result<(Pipeline, sluice_sql::JobPlan), ApiError> {
        let p = &session.principal;
        let mut settings = session.settings.clone();
        let mut body = String::new();
        for s in split(statements) {
            if let Some((k, v)) = set_pair(&s.text) {
                let mut tmp = Session::new(p.clone());
                self.set(&mut tmp, k.clone(), v.clone())?;
                settings.insert(k, v);
                continue;
            }
            body.push_str(&s.text);
            body.push_str(";\n");
        }
        self.check_reads(&p.tenant, statements)?;
        let plan = self.plan_for(&p.tenant, &settings, &body)?;
        let selects = plan
            .pipelines
            .iter()
            .filter(|pl| matches!(pl.sink, sluice_sql::SinkTarget::Select { .. }))
            .count();
        if plan.pipelines.is_empty() {
            return Err(ApiError::invalid(format!(
                "pipeline '{name}' has no INSERT INTO to run"
            )));
        }
        if view.is_none() && selects > 0 {
            return Err(ApiError::unsupported(
                "a SELECT streams into a materialized view here: CREATE MATERIALIZED VIEW name AS SELECT ...",
            ));
        }
        if view.is_some() && (selects != 1 || plan.pipelines.len() != 1) {
            return Err(ApiError::invalid(
                "a materialized view is one SELECT".to_string(),
            ));
        }
        for pl in &plan.pipelines {
            if let sluice_sql::SinkTarget::Table(t) = &pl.sink {
                self.check_paths(&p.tenant, t)?;
            }
        }
        let parallelism = settings
            .get("parallelism.default")
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(1);
        let mut script = self.settings_sql(&p.tenant, name, &settings);
        for o in self.catalog.objects(&p.tenant)? {
            if !matches!(
                o.kind,
                ObjectKind::MaterializedView | ObjectKind::Connection
            ) {
                script.push_str(&self.expand_connections(&p.tenant, &o.sql)?);
                script.push_str(";\n");
            }
        }
        script.push_str(&body);
        // The restart strategy is the supervisor's: it stays with the statements.
        let mut recorded: String = settings
            .iter()
            .filter(|(k, _)| k.starts_with("restart-strategy."))
            .map(|(k, v)| format!("SET {} = {};\n", quote(k), quote(v)))
            .collect();
        recorded.push_str(statements);
        let pipeline = Pipeline {
            tenant: p.tenant.clone(),
            name: name.to_string(),
            script,
            statements: recorded,
            views: view.map(|v| vec![v.to_string()]).unwrap_or_default(),
            parallelism,
            desired: Desired::Running,
            status: "created".into(),
            restarts: 0,
            last_error: None,
            created_ms: now_ms(),
        };
        Ok((pipeline, plan))
    }

    fn create_pipeline(
        &self,
        session: &Session,
        name: &str,
        statements: &str,
        view: Option<&str>,
    ) -> Result<(), ApiError> {
        let p = &session.principal;
        check_name("pipeline", name)?;
        if self.catalog.pipeline(&p.tenant, name)?.is_some()
            || self.catalog.object(&p.tenant, name)?.is_some()
        {
            return Err(ApiError::duplicate(format!("'{name}' already exists")));
        }
        let (pipeline, plan) = self.prepare_pipeline(session, name, statements, view)?;
        self.admit(&p.tenant, name, pipeline.parallelism)?;
        if let Some(v) = view {
            let schema = plan.pipelines[0].query.schema();
            self.views
                .register(&p.tenant, v, schema, self.layout.view(&p.tenant, v))?;
            self.views.reset(&p.tenant, v)?;
        }
        let _ = std::fs::remove_dir_all(self.layout.pipeline(&p.tenant, name));
        if let Some(v) = view {
            self.catalog.put_object(
                &p.tenant,
                &Object {
                    name: v.to_string(),
                    kind: ObjectKind::MaterializedView,
                    sql: statements.to_string(),
                },
            )?;
        }
        if let Err(e) = self.catalog.put_pipeline(&pipeline) {
            if let Some(v) = view {
                let _ = self.catalog.drop_object(&p.tenant, v);
            }
            return Err(e);
        }
        self.supervisor.start(&pipeline, true)
    }

    /// `ALTER PIPELINE name [FRESH] AS statements`: the pipeline runs the new statements. It is
    /// stopped with a final checkpoint and started again from it, if the new plan fits that
    /// checkpoint's state and inputs; otherwise it is refused, unless FRESH starts it over
    /// without state. A materialized view's pipeline keeps the view's columns.
    fn alter_pipeline(
        &self,
        session: &Session,
        name: &str,
        statements: &str,
        fresh: bool,
    ) -> Result<(), ApiError> {
        let p = &session.principal;
        let old = self
            .catalog
            .pipeline(&p.tenant, name)?
            .ok_or_else(|| no_pipeline(name))?;
        self.check_local(&p.tenant, name)?;
        let view = old.views.first().map(String::as_str);
        let (mut new, plan) = self.prepare_pipeline(session, name, statements, view)?;
        new.parallelism = old.parallelism;
        new.desired = old.desired;
        new.created_ms = old.created_ms;
        if let Some(v) = view {
            let was = self
                .views
                .get(&p.tenant, v)
                .map(|v| v.schema.clone())
                .ok_or_else(|| ApiError::internal(format!("view '{v}' is not loaded")))?;
            let now = plan.pipelines[0].query.schema();
            let columns = |s: &arrow::datatypes::SchemaRef| -> Vec<(String, DataType)> {
                s.fields()
                    .iter()
                    .map(|f| (f.name().clone(), f.data_type().clone()))
                    .collect()
            };
            if columns(&was) != columns(&now) {
                return Err(ApiError::invalid(format!(
                    "materialized view '{v}' has the columns ({}); the new query gives ({}): DROP MATERIALIZED VIEW {v} and create it again to change them",
                    columns(&was).iter().map(|(n, t)| format!("{n} {}", flink_type(t))).collect::<Vec<_>>().join(", "),
                    columns(&now).iter().map(|(n, t)| format!("{n} {}", flink_type(t))).collect::<Vec<_>>().join(", "),
                )));
            }
        }
        if !fresh {
            if let Some(why) = self.state_misfit(&new)? {
                return Err(ApiError::invalid(format!(
                    "pipeline '{name}' cannot resume with the new statements: {why}. ALTER PIPELINE {name} FRESH AS ... runs them from the start, without its state"
                )));
            }
        }
        let was_running = self.supervisor.is_active(&p.tenant, name);
        if was_running {
            self.supervisor
                .stop_keeping_lease(&p.tenant, name, Duration::from_secs(60));
            // The final checkpoint was taken by the old plan: it must still fit.
            if !fresh {
                if let Some(why) = self.state_misfit(&new)? {
                    let _ = self.supervisor.start(&old, false);
                    return Err(ApiError::invalid(format!(
                        "pipeline '{name}' cannot resume with the new statements: {why}; it runs the old ones again"
                    )));
                }
            }
        }
        self.catalog.set_pipeline_statements(&new)?;
        if let Some(v) = view {
            self.catalog.set_object_sql(&p.tenant, v, statements)?;
        }
        if was_running || old.desired == Desired::Running {
            if fresh {
                if let Some(v) = view {
                    self.views.reset(&p.tenant, v)?;
                }
            }
            self.supervisor.start(&new, fresh)?;
        }
        Ok(())
    }

    /// The pipeline's newest complete checkpoint.
    fn latest_checkpoint(
        &self,
        tenant: &str,
        name: &str,
    ) -> Result<Option<sluice_state::checkpoint::Manifest>, ApiError> {
        let dir = self.layout.checkpoints(tenant, name);
        if !dir.exists() {
            return Ok(None);
        }
        let store = sluice_state::checkpoint::CheckpointStore::open(
            &dir.display().to_string(),
            &BTreeMap::new(),
        )
        .map_err(|e| ApiError::internal(e.to_string()))?;
        store
            .latest(|_, _| {})
            .map_err(|e| ApiError::internal(e.to_string()))
    }

    /// `CHECKPOINT PIPELINE name`: a checkpoint now rather than at the next interval; returns
    /// once it has committed, with its epoch, bytes and files.
    fn checkpoint_pipeline(&self, tenant: &str, name: &str) -> Result<Outcome, ApiError> {
        self.catalog
            .pipeline(tenant, name)?
            .ok_or_else(|| no_pipeline(name))?;
        self.check_local(tenant, name)?;
        let before = self.latest_checkpoint(tenant, name)?.map(|m| m.epoch);
        if !self.supervisor.request_checkpoint(tenant, name) {
            return Err(ApiError::invalid(format!(
                "pipeline '{name}' has no running process to checkpoint: START PIPELINE {name} first"
            )));
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        loop {
            if let Some(m) = self.latest_checkpoint(tenant, name)? {
                if before.is_none_or(|b| m.epoch > b) {
                    let bytes: u64 =
                        m.files.values().sum::<u64>() + m.inherited.values().sum::<u64>();
                    return Ok(Outcome::Rows(text_rows(
                        &["epoch", "bytes", "files"],
                        vec![vec![
                            m.epoch.to_string(),
                            bytes.to_string(),
                            (m.files.len() + m.inherited.len()).to_string(),
                        ]],
                    )));
                }
            }
            if std::time::Instant::now() > deadline {
                return Err(ApiError::internal(format!(
                    "pipeline '{name}': no checkpoint committed within 120 s of asking; its log may say why"
                )));
            }
            if !self.supervisor.is_active(tenant, name) {
                return Err(ApiError::invalid(format!(
                    "pipeline '{name}' stopped before its checkpoint committed"
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Why the pipeline's last checkpoint cannot restore into `pl`'s plan, if it cannot:
    /// another plan structure (the engine's fingerprint) or another input for a source.
    fn state_misfit(&self, pl: &Pipeline) -> Result<Option<String>, ApiError> {
        let Some(manifest) = self.latest_checkpoint(&pl.tenant, &pl.name)? else {
            return Ok(None);
        };
        let mut plan = sluice_sql::plan_script(&pl.script)
            .map_err(|e| ApiError::internal(format!("pipeline '{}': {e}", pl.name)))?;
        let views: Vec<(String, String)> = pl
            .views
            .iter()
            .map(|v| {
                (
                    v.clone(),
                    self.layout.view(&pl.tenant, v).display().to_string(),
                )
            })
            .collect();
        plan.selects_into_views(&views)
            .map_err(|e| ApiError::internal(format!("pipeline '{}': {e}", pl.name)))?;
        if sluice_engine::checkpoint::fingerprint(&plan) != manifest.plan_fingerprint {
            return Ok(Some(format!(
                "its operators or their state differ from those of its checkpoint (epoch {})",
                manifest.epoch
            )));
        }
        // Its process runs in the tenant's storage, where relative paths start.
        let now = sluice_engine::checkpoint::source_identities_at(
            &plan,
            Some(&self.layout.files(&pl.tenant)),
        );
        for (table, was) in &manifest.sources {
            if let Some(now) = now.get(table) {
                if now != was {
                    return Ok(Some(format!(
                        "source table '{table}' reads another input (then {was}, now {now}), so its checkpointed offsets do not apply"
                    )));
                }
            }
        }
        Ok(None)
    }

    /// Refuses a pipeline that reads a materialized view (views are served, not streamed, yet).
    fn check_reads(&self, tenant: &str, statements: &str) -> Result<(), ApiError> {
        let mvs: Vec<String> = self
            .catalog
            .objects(tenant)?
            .into_iter()
            .filter(|o| o.kind == ObjectKind::MaterializedView)
            .map(|o| o.name)
            .collect();
        for t in words(statements)? {
            if let Token::Word(w) = t {
                if let Some(v) = mvs.iter().find(|v| **v == w.value) {
                    return Err(ApiError::unsupported(format!(
                        "'{v}' is a materialized view: pipelines read tables and views, not materialized views (yet)"
                    )));
                }
            }
        }
        Ok(())
    }

    pub fn start_pipeline(&self, tenant: &str, name: &str, fresh: bool) -> Result<(), ApiError> {
        let pl = self
            .catalog
            .pipeline(tenant, name)?
            .ok_or_else(|| no_pipeline(name))?;
        if self.supervisor.is_active(tenant, name) {
            return Err(ApiError::invalid(format!(
                "pipeline '{name}' is already running"
            )));
        }
        if pl.status == "finished" && !fresh {
            return Err(ApiError::invalid(format!(
                "pipeline '{name}' read all of its input and finished: START PIPELINE {name} FRESH runs it again from the start"
            )));
        }
        self.admit(tenant, name, pl.parallelism)?;
        self.catalog.set_desired(tenant, name, Desired::Running)?;
        self.supervisor.start(&pl, fresh)
    }

    pub fn stop_pipeline(&self, tenant: &str, name: &str) -> Result<(), ApiError> {
        self.catalog
            .pipeline(tenant, name)?
            .ok_or_else(|| no_pipeline(name))?;
        self.catalog.set_desired(tenant, name, Desired::Stopped)?;
        self.wait_remote_stop(tenant, name)?;
        self.supervisor.stop(tenant, name, Duration::from_secs(60));
        self.catalog
            .set_status(tenant, name, "stopped", None, None)?;
        Ok(())
    }

    /// Changes a pipeline's parallelism: stopped with a final checkpoint, restarted from it.
    pub fn rescale(&self, tenant: &str, name: &str, n: u64) -> Result<(), ApiError> {
        let pl = self
            .catalog
            .pipeline(tenant, name)?
            .ok_or_else(|| no_pipeline(name))?;
        self.check_local(tenant, name)?;
        if n != pl.parallelism {
            self.check_rescalable(&pl)?;
        }
        let was_running = self.supervisor.is_active(tenant, name);
        if was_running {
            self.admit(tenant, name, n)?;
            self.supervisor
                .stop_keeping_lease(tenant, name, Duration::from_secs(60));
        }
        self.catalog.set_parallelism(tenant, name, n)?;
        if was_running || pl.desired == Desired::Running {
            let pl = self
                .catalog
                .pipeline(tenant, name)?
                .ok_or_else(|| no_pipeline(name))?;
            self.supervisor.start(&pl, false)?;
        }
        Ok(())
    }

    /// Refuses to move a pipeline that reads a generator to another worker count: generated
    /// streams resume only on the count they were checkpointed with.
    fn check_rescalable(&self, pl: &Pipeline) -> Result<(), ApiError> {
        let plan = sluice_sql::plan_script(&pl.script)
            .map_err(|e| ApiError::internal(format!("pipeline '{}': {e}", pl.name)))?;
        let mut generated = vec![];
        for p in &plan.pipelines {
            scans(&p.query, &mut |t| {
                if matches!(t.connector(), "datagen" | "ecommerce" | "nexmark") {
                    generated.push(t.name.clone());
                }
            });
        }
        if let Some(t) = generated.first() {
            return Err(ApiError::invalid(format!(
                "pipeline '{}' reads the generated table '{t}', whose streams resume only on the worker count they were checkpointed with: change 'parallelism.default' and START PIPELINE {} FRESH to run it again from the start",
                pl.name, pl.name
            )));
        }
        Ok(())
    }

    /// With a shared catalog: waits until the server running the pipeline has seen that it
    /// is to stop, and stopped it (a final checkpoint, then its lease is given up).
    fn wait_remote_stop(&self, tenant: &str, name: &str) -> Result<(), ApiError> {
        let Some(holder) = self.supervisor.remote_holder(tenant, name)? else {
            return Ok(());
        };
        let deadline =
            std::time::Instant::now() + self.supervisor.lease_ttl + Duration::from_secs(90);
        while self.catalog.lease_holder(tenant, name)?.is_some() {
            if std::time::Instant::now() > deadline {
                return Err(ApiError::internal(format!(
                    "pipeline '{name}' runs on server {holder}, which has not stopped it: it is marked stopped and will stop when that server sees it"
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    /// Refuses to change a pipeline that another server runs.
    fn check_local(&self, tenant: &str, name: &str) -> Result<(), ApiError> {
        match self.supervisor.remote_holder(tenant, name)? {
            Some(holder) => Err(ApiError::invalid(format!(
                "pipeline '{name}' runs on server {holder}: change it there, or STOP PIPELINE {name} first"
            ))),
            None => Ok(()),
        }
    }

    fn drop_pipeline(&self, tenant: &str, name: &str) -> Result<(), ApiError> {
        self.catalog.set_desired(tenant, name, Desired::Stopped)?;
        self.wait_remote_stop(tenant, name)?;
        self.supervisor.stop(tenant, name, Duration::from_secs(10));
        self.catalog.drop_pipeline(tenant, name)?;
        self.supervisor.history.forget(tenant, name);
        let _ = std::fs::remove_dir_all(self.layout.pipeline(tenant, name));
        Ok(())
    }

    fn drop_object(
        &self,
        tenant: &str,
        kind: ObjectKind,
        name: &str,
        if_exists: bool,
    ) -> Result<Outcome, ApiError> {
        let tag = format!("DROP {}", kind.words().to_ascii_uppercase());
        let Some(o) = self.catalog.object(tenant, name)? else {
            if if_exists {
                return Ok(Outcome::Command(tag));
            }
            return Err(ApiError::undefined_table(format!(
                "{} '{name}' does not exist",
                kind.words()
            )));
        };
        if o.kind != kind {
            return Err(ApiError::invalid(format!(
                "'{name}' is a {}, not a {}",
                o.kind.words(),
                kind.words()
            )));
        }
        if kind == ObjectKind::Connection {
            let users: Vec<String> = self
                .catalog
                .objects(tenant)?
                .into_iter()
                .filter(|o| {
                    sluice_common::secrets::option_pairs(&o.sql)
                        .iter()
                        .any(|p| p.key == "connection" && p.value == name)
                })
                .map(|o| o.name)
                .collect();
            if !users.is_empty() {
                return Err(ApiError::invalid(format!(
                    "connection '{name}' is used by {}: drop them first",
                    users.join(", ")
                )));
            }
        }
        if kind == ObjectKind::MaterializedView {
            self.drop_pipeline(tenant, name)?;
            self.views.remove(tenant, name);
        } else {
            // A table or view still read by a pipeline's definition stays.
            let users: Vec<String> = self
                .catalog
                .pipelines(Some(tenant))?
                .into_iter()
                .filter(|p| {
                    words(&p.statements)
                        .unwrap_or_default()
                        .iter()
                        .any(|t| matches!(t, Token::Word(w) if w.value == name))
                })
                .map(|p| p.name)
                .collect();
            if !users.is_empty() {
                return Err(ApiError::invalid(format!(
                    "{} '{name}' is used by pipeline(s) {}: drop them first",
                    kind.words(),
                    users.join(", ")
                )));
            }
        }
        self.catalog.drop_object(tenant, name)?;
        Ok(Outcome::Command(tag))
    }

    /// `CREATE CONNECTION name WITH (...)`: options (often with secrets) kept once, that tables
    /// take with `'connection' = 'name'`.
    fn create_connection(
        &self,
        tenant: &str,
        name: &str,
        text: &str,
        if_not_exists: bool,
    ) -> Result<Outcome, ApiError> {
        check_name("connection", name)?;
        let options = sluice_common::secrets::option_pairs(text);
        if options.is_empty() {
            return Err(ApiError::syntax(
                "expected CREATE CONNECTION name WITH ('key' = 'value', ...)",
            ));
        }
        if let Some(o) = options.iter().find(|o| o.key == "connection") {
            return Err(ApiError::invalid(format!(
                "connection '{name}' may not take another connection ('{}')",
                o.value
            )));
        }
        if self.catalog.object(tenant, name)?.is_some() {
            if if_not_exists {
                return Ok(Outcome::Command("CREATE CONNECTION".into()));
            }
            return Err(ApiError::duplicate(format!("'{name}' already exists")));
        }
        self.catalog.put_object(
            tenant,
            &Object {
                name: name.to_string(),
                kind: ObjectKind::Connection,
                sql: text.trim().to_string(),
            },
        )?;
        Ok(Outcome::Command("CREATE CONNECTION".into()))
    }

    /// A table's DDL with `'connection' = 'name'` replaced by the connection's options (those
    /// the table does not set itself).
    fn expand_connections(&self, tenant: &str, sql: &str) -> Result<String, ApiError> {
        let pairs = sluice_common::secrets::option_pairs(sql);
        let Some(uses) = pairs.iter().find(|p| p.key == "connection") else {
            return Ok(sql.to_string());
        };
        let connection = self
            .catalog
            .object(tenant, &uses.value)?
            .filter(|o| o.kind == ObjectKind::Connection)
            .ok_or_else(|| {
                ApiError::not_found(format!(
                    "connection '{}' does not exist (CREATE CONNECTION {} WITH (...) first)",
                    uses.value, uses.value
                ))
            })?;
        let own: std::collections::HashSet<&str> = pairs.iter().map(|p| p.key.as_str()).collect();
        let taken: Vec<String> = sluice_common::secrets::option_pairs(&connection.sql)
            .into_iter()
            .filter(|o| !own.contains(o.key.as_str()))
            .map(|o| format!("{} = {}", quote(&o.key), quote(&o.value)))
            .collect();
        let mut out = String::with_capacity(sql.len() + 64);
        out.push_str(&sql[..uses.at.start]);
        if taken.is_empty() {
            // Nothing to add: the pair goes, with one comma beside it.
            let rest = sql[uses.at.end..].trim_start();
            match rest.strip_prefix(',') {
                Some(after) => out.push_str(after),
                None => {
                    let kept = out.trim_end().trim_end_matches(',').len();
                    out.truncate(kept);
                    out.push_str(&sql[uses.at.end..]);
                }
            }
        } else {
            out.push_str(&taken.join(", "));
            out.push_str(&sql[uses.at.end..]);
        }
        Ok(out)
    }

    fn create_object(&self, tenant: &str, text: &str) -> Result<Outcome, ApiError> {
        let parsed =
            sluice_sql::parser::parse_script(text).map_err(|e| ApiError::from_sql(&e, text))?;
        let [located] = parsed.as_slice() else {
            return Err(ApiError::syntax("give one statement at a time"));
        };
        let (name, kind, if_not_exists) = match &located.statement {
            sluice_sql::parser::Statement::CreateTable(t) => {
                (t.name.clone(), ObjectKind::Table, t.if_not_exists)
            }
            sluice_sql::parser::Statement::CreateView { name, .. } => {
                (name.clone(), ObjectKind::View, false)
            }
            _ => {
                return Err(ApiError::syntax(
                    "expected CREATE TABLE, CREATE VIEW, CREATE MATERIALIZED VIEW, CREATE PIPELINE, CREATE USER, CREATE TOKEN or CREATE TENANT",
                ))
            }
        };
        check_name(kind.words(), &name)?;
        if self.catalog.object(tenant, &name)?.is_some()
            || self.catalog.pipeline(tenant, &name)?.is_some()
        {
            if if_not_exists {
                return Ok(Outcome::Command(format!(
                    "CREATE {}",
                    kind.words().to_ascii_uppercase()
                )));
            }
            return Err(ApiError::duplicate(format!("'{name}' already exists")));
        }
        let mut planner = self.planner(tenant, "")?;
        let expanded = self.expand_connections(tenant, text)?;
        planner
            .execute(&expanded)
            .map_err(|e| ApiError::from_sql(&e, &expanded))?;
        if let Some(t) = planner.table(&name) {
            self.check_paths(tenant, &t)?;
        }
        self.catalog.put_object(
            tenant,
            &Object {
                name,
                kind,
                sql: text.trim().to_string(),
            },
        )?;
        Ok(Outcome::Command(format!(
            "CREATE {}",
            kind.words().to_ascii_uppercase()
        )))
    }

    /// Confines a table's local paths to the tenant's storage root: relative paths are taken
    /// from it, absolute ones must lie in it, `..` is refused, and no symlink may lead out.
    pub fn check_paths(&self, tenant: &str, t: &sluice_sql::TableDef) -> Result<(), ApiError> {
        let root = self.layout.files(tenant);
        for (key, value) in &t.options {
            // Client options passed through to a connector's library (Kafka's `properties.*`):
            // some run code or a command of the server's; those naming files are paths too.
            if let Some(property) = key.strip_prefix("properties.") {
                if matches!(
                    property,
                    "plugin.library.paths" | "sasl.kerberos.kinit.cmd" | "ssl_engine_location"
                ) {
                    return Err(ApiError::denied(format!(
                        "table '{}': '{key}' would load or run a program on the server; it is not allowed here",
                        t.name
                    )));
                }
                let names_file = property.ends_with(".location") || property.ends_with(".keytab");
                if !names_file || (property == "ssl.ca.location" && value == "probe") {
                    continue;
                }
            } else if key != "path" && !key.ends_with(".path") {
                continue;
            }
            if value.contains("://") && !value.starts_with("file://") {
                continue;
            }
            let raw = value.strip_prefix("file://").unwrap_or(value);
            let refuse = |why: &str| {
                ApiError::denied(format!(
                    "table '{}': '{key}' = '{value}' {why}; tenant '{tenant}' may use paths in its storage only (relative paths start there)",
                    t.name
                ))
            };
            let path = Path::new(raw);
            if path.components().any(|c| c == Component::ParentDir) {
                return Err(refuse("goes up with '..'"));
            }
            let full = if path.is_absolute() {
                path.to_path_buf()
            } else {
                root.join(path)
            };
            if !full.starts_with(&root) {
                return Err(refuse("is outside the tenant's storage"));
            }
            let real_root = root.canonicalize().unwrap_or(root.clone());
            // The deepest part of the path that exists, resolved: no symlink leads out.
            let mut probe: PathBuf = full.clone();
            loop {
                if let Ok(real) = probe.canonicalize() {
                    if !real.starts_with(&real_root) {
                        return Err(refuse("leads out of the tenant's storage through a link"));
                    }
                    break;
                }
                if !probe.pop() {
                    break;
                }
            }
        }
        Ok(())
    }

    fn describe(&self, tenant: &str, name: &str) -> Result<Outcome, ApiError> {
        let schema = if let Some(v) = self.views.get(tenant, name) {
            v.schema.clone()
        } else {
            let planner = self.planner(tenant, "")?;
            match planner.table(name) {
                Some(t) => t.schema.clone(),
                None => {
                    let plan = self
                        .plan_for(tenant, &BTreeMap::new(), &format!("SELECT * FROM {name}"))
                        .map_err(|_| {
                            ApiError::undefined_table(format!("'{name}' does not exist"))
                        })?;
                    plan.pipelines[0].query.schema()
                }
            }
        };
        let rows = schema
            .fields()
            .iter()
            .map(|f| {
                vec![
                    f.name().clone(),
                    flink_type(f.data_type()),
                    if f.is_nullable() { "YES" } else { "NO" }.to_string(),
                ]
            })
            .collect();
        Ok(Outcome::Rows(text_rows(
            &["column", "type", "nullable"],
            rows,
        )))
    }

    /// A SELECT over the tenant's materialized views, each read as one consistent snapshot, or
    /// over the catalog (`pg_catalog`, `information_schema`) of the tenant's objects.
    async fn select(&self, p: &Principal, sql: &str) -> Result<Outcome, ApiError> {
        let parser = crate::pg_catalog::parser();
        let sql = crate::pg_catalog::replace_client_fragments(sql);
        let mut statements = parser
            .parse(&sql)
            .map_err(|e| ApiError::syntax(e.to_string()))?;
        if statements.len() != 1 {
            return Err(ApiError::syntax(format!(
                "expected one statement, found {}",
                statements.len()
            )));
        }
        let statement = parser.rewrite(statements.remove(0));
        let ctx = crate::pg_catalog::context(&p.tenant);
        let state = ctx.state();
        let statement = datafusion::sql::parser::Statement::Statement(Box::new(statement));
        let tables = state
            .resolve_table_references(&statement)
            .map_err(|e| ApiError::syntax(e.to_string()))?;
        let mut read = BTreeMap::new();
        let mut reads_catalog = false;
        for t in &tables {
            let name = t.table().to_string();
            if crate::pg_catalog::is_catalog_table(t.schema(), &name) {
                reads_catalog = true;
                continue;
            }
            if t.catalog().is_some_and(|c| c != p.tenant)
                || t.schema().is_some_and(|s| s != crate::pg_catalog::SCHEMA)
            {
                return Err(ApiError::undefined_table(format!(
                    "relation '{t}' does not exist"
                )));
            }
            if read.contains_key(&name) {
                continue;
            }
            let Some(view) = self.views.get(&p.tenant, &name) else {
                return Err(match self.catalog.object(&p.tenant, &name)? {
                    Some(o) => {
                        ApiError::unsupported(crate::pg_catalog::unreadable_message(&name, o.kind))
                    }
                    None => ApiError::undefined_table(format!("relation '{name}' does not exist")),
                });
            };
            let snapshot = view.snapshot()?;
            let table = datafusion::datasource::MemTable::try_new(
                snapshot.batch.schema(),
                vec![vec![snapshot.batch]],
            )
            .map_err(|e| ApiError::internal(e.to_string()))?;
            read.insert(
                name,
                Arc::new(table) as Arc<dyn datafusion::catalog::TableProvider>,
            );
        }
        let mut kinds = HashMap::new();
        if reads_catalog {
            // Every object is listed with its columns; only those the query reads hold rows.
            let planner = self.planner(&p.tenant, "")?;
            for o in self.catalog.objects(&p.tenant)? {
                if o.kind == ObjectKind::Connection {
                    continue;
                }
                kinds.insert(o.name.clone(), o.kind);
                if read.contains_key(&o.name) {
                    continue;
                }
                let schema = match o.kind {
                    ObjectKind::Connection => None,
                    ObjectKind::Table => planner.table(&o.name).map(|t| t.schema.clone()),
                    ObjectKind::View => planner.view_schema(&o.name),
                    ObjectKind::MaterializedView => {
                        self.views.get(&p.tenant, &o.name).map(|v| v.schema.clone())
                    }
                };
                let Some(schema) = schema else { continue };
                read.insert(
                    o.name.clone(),
                    Arc::new(crate::pg_catalog::Unreadable {
                        name: o.name,
                        kind: o.kind,
                        schema,
                    }),
                );
            }
        }
        for (name, table) in read {
            ctx.register_table(name, table)
                .map_err(|e| ApiError::internal(e.to_string()))?;
        }
        crate::pg_catalog::register(&ctx, &p.tenant, kinds)?;
        let plan = ctx
            .state()
            .statement_to_plan(statement)
            .await
            .map_err(|e| ApiError::plan(e.to_string()))?;
        let df = ctx
            .execute_logical_plan(plan)
            .await
            .map_err(|e| ApiError::plan(e.to_string()))?;
        let schema: arrow::datatypes::SchemaRef = Arc::new(df.schema().as_arrow().clone());
        let batches = df
            .collect()
            .await
            .map_err(|e| ApiError::plan(e.to_string()))?;
        let batch = arrow::compute::concat_batches(&schema, &batches)
            .map_err(|e| ApiError::internal(e.to_string()))?;
        Ok(Outcome::Rows(batch))
    }
}

/// A batch of text columns with every secret replaced.
fn redact_batch(batch: &RecordBatch, secrets: &[String]) -> RecordBatch {
    let columns: Vec<ArrayRef> = batch
        .columns()
        .iter()
        .map(|c| match c.as_any().downcast_ref::<StringArray>() {
            Some(text) => Arc::new(
                text.iter()
                    .map(|v| v.map(|v| sluice_common::secrets::redact(v, secrets)))
                    .collect::<StringArray>(),
            ) as ArrayRef,
            None => c.clone(),
        })
        .collect();
    RecordBatch::try_new(batch.schema(), columns).unwrap_or_else(|_| batch.clone())
}

/// A column type as Flink SQL spells it.
pub fn flink_type(t: &DataType) -> String {
    use arrow::datatypes::TimeUnit;
    let precision = |u: &TimeUnit| match u {
        TimeUnit::Second => 0,
        TimeUnit::Millisecond => 3,
        TimeUnit::Microsecond => 6,
        TimeUnit::Nanosecond => 9,
    };
    match t {
        DataType::Boolean => "BOOLEAN".into(),
        DataType::Int8 => "TINYINT".into(),
        DataType::Int16 => "SMALLINT".into(),
        DataType::Int32 => "INT".into(),
        DataType::Int64 => "BIGINT".into(),
        DataType::Float32 => "FLOAT".into(),
        DataType::Float64 => "DOUBLE".into(),
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => "STRING".into(),
        DataType::Binary | DataType::LargeBinary | DataType::BinaryView => "BYTES".into(),
        DataType::Decimal128(p, s) | DataType::Decimal256(p, s) => format!("DECIMAL({p}, {s})"),
        DataType::Date32 | DataType::Date64 => "DATE".into(),
        DataType::Timestamp(u, None) => format!("TIMESTAMP({})", precision(u)),
        DataType::Timestamp(u, Some(_)) => format!("TIMESTAMP_LTZ({})", precision(u)),
        DataType::Null => "NULL".into(),
        other => other.to_string(),
    }
}

/// Calls `f` with every table a plan scans.
fn scans(node: &sluice_sql::StreamNode, f: &mut dyn FnMut(&sluice_sql::TableDef)) {
    if let sluice_sql::StreamNode::Scan { table, .. } = node {
        f(table);
    }
    for child in node.inputs() {
        scans(child, f);
    }
}

fn tokens_rows(tokens: Vec<(String, String, bool)>) -> RecordBatch {
    text_rows(
        &["token_id", "user", "revoked"],
        tokens
            .into_iter()
            .map(|(id, u, r)| vec![id, u, r.to_string()])
            .collect(),
    )
}

fn no_pipeline(name: &str) -> ApiError {
    ApiError::not_found(format!("pipeline '{name}' does not exist"))
}

/// Moves an error's position by where its text starts in the statement sent.
fn shift(e: ApiError, by: usize) -> ApiError {
    match e.position {
        Some(p) => ApiError {
            position: Some(p + by),
            ..e
        },
        None => e,
    }
}

/// The text after the first top-level `AS` keyword, and its offset in characters.
fn after_keyword_as(text: &str) -> Option<(usize, String)> {
    let chars: Vec<char> = text.chars().collect();
    let mut i = 0;
    while i + 1 < chars.len() {
        // Comments and quoted text hold no keyword (`-- counts as of today` before the statement).
        match chars[i] {
            '-' if chars[i + 1] == '-' => {
                while i < chars.len() && chars[i] != '\n' {
                    i += 1;
                }
                continue;
            }
            '/' if chars[i + 1] == '*' => {
                i += 2;
                while i + 1 < chars.len() && !(chars[i] == '*' && chars[i + 1] == '/') {
                    i += 1;
                }
                i += 2;
                continue;
            }
            q @ ('\'' | '"' | '`') => {
                i += 1;
                while i < chars.len() && chars[i] != q {
                    i += 1;
                }
                i += 1;
                continue;
            }
            _ => {}
        }
        let boundary_before = i == 0 || chars[i - 1].is_whitespace();
        let boundary_after = chars.get(i + 2).is_none_or(|c| c.is_whitespace());
        if boundary_before
            && boundary_after
            && chars[i].eq_ignore_ascii_case(&'a')
            && chars[i + 1].eq_ignore_ascii_case(&'s')
        {
            let rest: String = chars[i + 2..].iter().collect();
            let skip = rest.chars().take_while(|c| c.is_whitespace()).count();
            return Some((i + 2 + skip, rest.trim_start().to_string()));
        }
        i += 1;
    }
    None
}

/// `'512mb'`, `'2 GB'`, `1048576` as bytes.
pub fn parse_bytes(text: &str) -> Option<u64> {
    let t = text.trim().to_ascii_lowercase();
    let digits: String = t.chars().take_while(|c| c.is_ascii_digit()).collect();
    let n: u64 = digits.parse().ok()?;
    let unit = t[digits.len()..].trim();
    let mult: u64 = match unit {
        "" | "b" => 1,
        "kb" | "k" | "kib" => 1 << 10,
        "mb" | "m" | "mib" => 1 << 20,
        "gb" | "g" | "gib" => 1 << 30,
        "tb" | "t" | "tib" => 1 << 40,
        _ => return None,
    };
    n.checked_mul(mult)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_split_outside_quotes_and_comments() {
        let s = split("SELECT ';' AS a; -- x; y\n CREATE TENANT t ; /* ; */ ;");
        let texts: Vec<_> = s.iter().map(|s| s.text.trim().to_string()).collect();
        assert_eq!(texts, vec!["SELECT ';' AS a", "-- x; y\n CREATE TENANT t"]);
        assert_eq!(s[1].offset, 16);
    }

    #[test]
    fn set_pairs_and_bytes() {
        assert_eq!(
            set_pair("SET 'parallelism.default' = '2'"),
            Some(("parallelism.default".into(), "2".into()))
        );
        assert_eq!(
            set_pair("set extra_float_digits to 3"),
            Some(("extra_float_digits".into(), "3".into()))
        );
        assert_eq!(parse_bytes("512mb"), Some(512 << 20));
        assert_eq!(parse_bytes("2 GB"), Some(2 << 30));
        assert_eq!(parse_bytes("12x"), None);
    }

    #[test]
    fn names_that_could_name_other_folders_are_refused() {
        for bad in ["../a", "a/b", "", "1a", "a.b", &"x".repeat(64)] {
            assert!(check_name("tenant", bad).is_err(), "{bad}");
        }
        check_name("tenant", "team_a1").unwrap();
    }

    #[test]
    fn the_query_after_as() {
        assert_eq!(
            after_keyword_as("CREATE MATERIALIZED VIEW v AS\n SELECT a AS b FROM t"),
            Some((31, "SELECT a AS b FROM t".to_string()))
        );
        // The word in a comment or a quoted name before the keyword is not the keyword.
        let text = "-- updated as orders arrive; /* as */\nCREATE PIPELINE \"as\" AS INSERT INTO t SELECT 1";
        let (at, query) = after_keyword_as(text).unwrap();
        assert_eq!(query, "INSERT INTO t SELECT 1");
        assert_eq!(&text[at..], query);
    }
}
