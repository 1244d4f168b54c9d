//! The Postgres wire protocol endpoint (`pgwire`): SCRAM-SHA-256 logins against the catalog's
//! verifiers, and the server's SQL over the simple and extended query protocols.

/// The PostgreSQL version the server reports (the protocol and catalog it answers as).
pub const SERVER_VERSION: &str = "15.0 (Sluice)";

use std::fmt::Debug;
use std::sync::{Arc, Mutex};

use arrow::array::{
    Array, BinaryArray, BooleanArray, Date32Array, Decimal128Array, Float32Array, Float64Array,
    Int16Array, Int32Array, Int64Array, Int8Array, LargeStringArray, StringArray, StringViewArray,
    TimestampMicrosecondArray, UInt16Array, UInt32Array, UInt64Array, UInt8Array,
};
use arrow::datatypes::{DataType, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use async_trait::async_trait;
use futures_util::{stream, Sink, SinkExt};
use pgwire::api::auth::sasl::scram::{ScramAuth, ScramSecret};
use pgwire::api::auth::sasl::SASLAuthStartupHandler;
use pgwire::api::auth::{
    AuthSource, DefaultServerParameterProvider, LoginInfo, Password, StartupHandler,
};
use pgwire::api::cancel::{CancelHandler, DefaultCancelHandler};
use pgwire::api::portal::{Format, Portal};
use pgwire::api::query::{ExtendedQueryHandler, SimpleQueryHandler};
use pgwire::api::results::{DataRowEncoder, FieldFormat, FieldInfo, QueryResponse, Response, Tag};
use pgwire::api::stmt::QueryParser;
use pgwire::api::store::PortalStore;
use pgwire::api::ConnectionManager;
use pgwire::api::{
    ClientInfo, ClientPortalStore, ErrorHandler, PgWireConnectionState, PgWireServerHandlers, Type,
    METADATA_USER,
};
use pgwire::error::{ErrorInfo, PgWireError, PgWireResult};
use pgwire::messages::data::RowDescription;
use pgwire::messages::PgWireBackendMessage;

use crate::auth::{parse_verifier, principal_for_user};
use crate::catalog::Catalog;
use crate::error::ApiError;
use crate::statements::{split, Outcome, Server, Session, Stmt};

fn fatal(code: &str, message: String) -> PgWireError {
    PgWireError::UserError(Box::new(ErrorInfo::new(
        "FATAL".into(),
        code.into(),
        message,
    )))
}

fn error_info(e: &ApiError) -> ErrorInfo {
    let mut info = ErrorInfo::new("ERROR".into(), e.code.into(), e.message.clone());
    info.position = e.position.map(|p| p.to_string());
    info
}

/// Logins: each user's stored SCRAM verifier.
#[derive(Debug)]
struct Verifiers {
    catalog: Arc<Catalog>,
}

#[async_trait]
impl AuthSource for Verifiers {
    async fn get_password(&self, login: &LoginInfo) -> PgWireResult<Password> {
        Err(PgWireError::InvalidPassword(
            login.user().unwrap_or_default().to_owned(),
        ))
    }

    async fn get_scram_secret(&self, login: &LoginInfo) -> PgWireResult<(ScramSecret, Option<()>)> {
        let name = login.user().ok_or(PgWireError::UserNameRequired)?;
        let user = self
            .catalog
            .user(name)
            .map_err(|e| fatal("XX000", e.message))?;
        let Some(user) = user else {
            // An unknown user runs the whole exchange against random keys and fails as a
            // wrong password does: names cannot be probed.
            let r = |n| {
                let mut b = vec![0u8; n];
                ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b)
                    .expect("random");
                b
            };
            return Ok((
                ScramSecret::Verifier {
                    salt: r(16),
                    iterations: 4096,
                    stored_key: r(32),
                    server_key: r(32),
                },
                None,
            ));
        };
        if let Some(db) = login.database() {
            let other_tenant = db != user.tenant
                && db != user.name
                && db != "postgres"
                && self.catalog.tenant_exists(db).unwrap_or(false);
            if other_tenant {
                return Err(fatal(
                    "28000",
                    format!("user \"{}\" cannot log in to tenant \"{db}\"", user.name),
                ));
            }
        }
        let (salt, iterations, stored_key, server_key) = parse_verifier(&user.verifier)
            .ok_or_else(|| {
                fatal(
                    "XX000",
                    format!("the stored verifier of user {name} is damaged"),
                )
            })?;
        Ok((
            ScramSecret::Verifier {
                salt,
                iterations,
                stored_key,
                server_key,
            },
            None,
        ))
    }
}

/// Errors during the login are fatal: the connection closes (pgwire would otherwise go on to
/// accept queries after a non-fatal error there).
struct LoginErrors;

impl ErrorHandler for LoginErrors {
    fn on_error<C: ClientInfo>(&self, client: &C, error: &mut PgWireError) {
        if !matches!(
            client.state(),
            PgWireConnectionState::AwaitingStartup
                | PgWireConnectionState::AuthenticationInProgress
        ) {
            return;
        }
        if let PgWireError::InvalidPassword(_) = error {
            let user = client
                .metadata()
                .get(METADATA_USER)
                .cloned()
                .unwrap_or_default();
            *error = fatal(
                "28P01",
                format!("password authentication failed for user \"{user}\""),
            );
        } else if !error.is_fatal() {
            *error = fatal(error.code(), error.to_string());
        }
    }
}

/// One connection: its session, created at the first statement from the logged-in user.
pub struct Connection {
    server: Arc<Server>,
    session: tokio::sync::Mutex<Option<Session>>,
    auth: Arc<SASLAuthStartupHandler<DefaultServerParameterProvider>>,
    cancel: Arc<DefaultCancelHandler>,
}

impl Connection {
    pub fn new(server: Arc<Server>, connections: Arc<ConnectionManager>) -> Arc<Connection> {
        let mut params = DefaultServerParameterProvider::default();
        params.server_version = SERVER_VERSION.into();
        let auth = SASLAuthStartupHandler::new(Arc::new(params))
            .with_scram(ScramAuth::new(Arc::new(Verifiers {
                catalog: server.catalog.clone(),
            })))
            .with_connection_manager(connections.clone());
        Arc::new(Connection {
            server,
            session: tokio::sync::Mutex::new(None),
            auth: Arc::new(auth),
            cancel: Arc::new(DefaultCancelHandler::new(connections)),
        })
    }

    /// The principal of this connection (its session is made at the first statement).
    async fn principal<C: ClientInfo>(
        &self,
        client: &C,
    ) -> Result<crate::auth::Principal, ApiError> {
        let mut guard = self.session.lock().await;
        if guard.is_none() {
            let user = client
                .metadata()
                .get(METADATA_USER)
                .cloned()
                .unwrap_or_default();
            let principal = principal_for_user(&self.server.catalog, &user)?
                .ok_or_else(|| ApiError::auth(format!("user '{user}' no longer exists")))?;
            *guard = Some(Session::new(principal));
        }
        Ok(guard.as_ref().expect("session").principal.clone())
    }

    /// `SUBSCRIBE [TO] view [WITH (SNAPSHOT = false)]`: the view's rows as of now (unless the
    /// snapshot is off), then every committed epoch's changes as it is applied, until the
    /// client cancels or goes away. Rows: `sluice_epoch`, `sluice_op`, then the view's columns.
    async fn subscribe<C>(&self, client: &mut C, stmt: &Stmt) -> PgWireResult<Response>
    where
        C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let principal = match self.principal(client).await {
            Ok(p) => p,
            Err(e) => return Ok(Response::Error(Box::new(error_info(&e)))),
        };
        let sub = match crate::statements::parse_subscribe(&stmt.text) {
            Ok(x) => x,
            Err(e) => {
                return Ok(Response::Error(Box::new(error_info(
                    &e.at(stmt.offset + 1),
                ))))
            }
        };
        let name = sub.view.clone();
        let Some(view) = self.server.views.get(&principal.tenant, &name) else {
            let e = ApiError::undefined_table(format!("materialized view '{name}' does not exist"));
            return Ok(Response::Error(Box::new(error_info(&e))));
        };
        let (snap, mut rx) = match view.subscribe() {
            Ok(x) => x,
            Err(e) => return Ok(Response::Error(Box::new(error_info(&e)))),
        };
        let first = crate::views::feed_rows(snap.epoch, &snap.batch, true)
            .map_err(|e| PgWireError::ApiError(Box::new(e)))?;
        let f = Arc::new(fields(&first.schema(), &Format::UnifiedText));
        if sub.copy {
            let n = first.num_columns();
            let start = pgwire::messages::copy::CopyOutResponse::new(0, n as i16, vec![0; n]);
            client
                .send(PgWireBackendMessage::CopyOutResponse(start))
                .await?;
        } else {
            let desc = RowDescription::new(f.iter().map(Into::into).collect());
            client
                .send(PgWireBackendMessage::RowDescription(desc))
                .await?;
        }
        if sub.snapshot {
            send_rows(client, &first, &f, sub.copy).await?;
        }
        loop {
            let change = match rx.recv().await {
                Ok(c) => c,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    let e = ApiError::new(
                        "54000",
                        format!("the subscriber fell {n} epochs behind the view '{name}': SUBSCRIBE again"),
                    );
                    return Ok(Response::Error(Box::new(error_info(&e))));
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                    return Ok(Response::Execution(Tag::new("SUBSCRIBE")))
                }
            };
            match change.as_ref() {
                crate::views::Change::Epoch { epoch, batch } => {
                    let rows = crate::views::feed_rows(*epoch, batch, false)
                        .map_err(|e| PgWireError::ApiError(Box::new(e)))?;
                    send_rows(client, &rows, &f, sub.copy).await?;
                }
                crate::views::Change::Reset => {
                    let e = ApiError::new(
                        "57014",
                        format!("the view '{name}' started over (or was dropped): SUBSCRIBE again"),
                    );
                    return Ok(Response::Error(Box::new(error_info(&e))));
                }
            }
        }
    }

    async fn run<C: ClientInfo>(&self, client: &C, stmt: &Stmt) -> Result<Outcome, ApiError> {
        self.principal(client).await?;
        let mut guard = self.session.lock().await;
        let session = guard.as_mut().expect("session");
        // A user dropped or moved since the login loses its rights at once.
        let now = principal_for_user(&self.server.catalog, &session.principal.user)?;
        if now.as_ref() != Some(&session.principal) {
            return Err(ApiError::auth(format!(
                "user '{}' was dropped or changed: log in again",
                session.principal.user
            )));
        }
        self.server.execute(session, stmt).await
    }
}

/// The Postgres type and how values are sent, per Arrow type.
fn pg_type(t: &DataType) -> Type {
    match t {
        DataType::Boolean => Type::BOOL,
        DataType::Int8 | DataType::Int16 | DataType::UInt8 => Type::INT2,
        DataType::Int32 | DataType::UInt16 => Type::INT4,
        DataType::Int64 | DataType::UInt32 | DataType::UInt64 => Type::INT8,
        DataType::Float32 => Type::FLOAT4,
        DataType::Float64 => Type::FLOAT8,
        DataType::Binary | DataType::LargeBinary => Type::BYTEA,
        DataType::Timestamp(_, None) => Type::TIMESTAMP,
        DataType::Timestamp(_, Some(_)) => Type::TIMESTAMPTZ,
        DataType::Date32 => Type::DATE,
        // NUMERIC whatever the declared precision (a value past 28 digits is an error).
        DataType::Decimal128(_, _) => Type::NUMERIC,
        _ => Type::TEXT,
    }
}

fn fields(schema: &Schema, format: &Format) -> Vec<FieldInfo> {
    schema
        .fields()
        .iter()
        .enumerate()
        .map(|(i, f)| {
            FieldInfo::new(
                f.name().clone(),
                None,
                None,
                pg_type(f.data_type()),
                format.format_for(i),
            )
        })
        .collect()
}

/// Encodes a batch's rows.
fn encode_rows(
    batch: &RecordBatch,
    fields: Arc<Vec<FieldInfo>>,
) -> PgWireResult<Vec<PgWireResult<pgwire::messages::data::DataRow>>> {
    let formatters = crate::statements::text_formatters(batch)
        .map_err(|e| PgWireError::ApiError(Box::new(e)))?;
    // Timestamps of any unit, as microseconds (PostgreSQL's own precision).
    let timestamps: Vec<TimestampMicrosecondArray> = batch
        .columns()
        .iter()
        .map(|c| match c.data_type() {
            DataType::Timestamp(_, _) => arrow::compute::cast(
                c,
                &DataType::Timestamp(arrow::datatypes::TimeUnit::Microsecond, None),
            )
            .map(|a| {
                a.as_any()
                    .downcast_ref::<TimestampMicrosecondArray>()
                    .expect("cast")
                    .clone()
            }),
            _ => Ok(TimestampMicrosecondArray::from(Vec::<i64>::new())),
        })
        .collect::<Result<_, _>>()
        .map_err(|e| PgWireError::ApiError(Box::new(e)))?;
    let mut rows = Vec::with_capacity(batch.num_rows());
    for r in 0..batch.num_rows() {
        let mut enc = DataRowEncoder::new(fields.clone());
        for (c, col) in batch.columns().iter().enumerate() {
            let null = col.is_null(r);
            macro_rules! put {
                ($arr:ty, $conv:expr) => {{
                    let a = col.as_any().downcast_ref::<$arr>().expect("array type");
                    let v = (!null).then(|| $conv(a.value(r)));
                    enc.encode_field(&v)?
                }};
            }
            match col.data_type() {
                DataType::Boolean => put!(BooleanArray, |v: bool| v),
                DataType::Int8 => put!(Int8Array, |v: i8| v as i16),
                DataType::Int16 => put!(Int16Array, |v: i16| v),
                DataType::UInt8 => put!(UInt8Array, |v: u8| v as i16),
                DataType::Int32 => put!(Int32Array, |v: i32| v),
                DataType::UInt16 => put!(UInt16Array, |v: u16| v as i32),
                DataType::Int64 => put!(Int64Array, |v: i64| v),
                DataType::UInt32 => put!(UInt32Array, |v: u32| v as i64),
                DataType::UInt64 => put!(UInt64Array, |v: u64| v as i64),
                DataType::Float32 => put!(Float32Array, |v: f32| v),
                DataType::Float64 => put!(Float64Array, |v: f64| v),
                DataType::Utf8 => put!(StringArray, |v: &str| v.to_string()),
                DataType::LargeUtf8 => put!(LargeStringArray, |v: &str| v.to_string()),
                DataType::Utf8View => put!(StringViewArray, |v: &str| v.to_string()),
                DataType::Binary => put!(BinaryArray, |v: &[u8]| v.to_vec()),
                DataType::Date32 => {
                    let a = col.as_any().downcast_ref::<Date32Array>().expect("dates");
                    enc.encode_field(&a.value_as_date(r).filter(|_| !null))?
                }
                DataType::Timestamp(_, tz) => {
                    let micros = &timestamps[c];
                    let v = (!null).then(|| micros.value_as_datetime(r)).flatten();
                    if fields[c].format() == FieldFormat::Text {
                        // As PostgreSQL prints them: no trailing zero fractions.
                        let suffix = if tz.is_some() { "+00" } else { "" };
                        let text =
                            v.map(|t| format!("{}{suffix}", t.format("%Y-%m-%d %H:%M:%S%.f")));
                        enc.encode_field(&text)?
                    } else {
                        match tz {
                            None => enc.encode_field(&v)?,
                            Some(_) => enc.encode_field(&v.map(|t| t.and_utc()))?,
                        }
                    }
                }
                DataType::Decimal128(_, s) => {
                    let a = col
                        .as_any()
                        .downcast_ref::<Decimal128Array>()
                        .expect("decimals");
                    let v = (!null)
                        .then(|| {
                            rust_decimal::Decimal::try_from_i128_with_scale(
                                a.value(r),
                                (*s).max(0) as u32,
                            )
                        })
                        .transpose()
                        .map_err(|e| PgWireError::ApiError(Box::new(e)))?;
                    enc.encode_field(&v)?
                }
                _ => {
                    let v = (!null).then(|| formatters[c].value(r).to_string());
                    enc.encode_field(&v)?
                }
            }
        }
        rows.push(Ok(enc.take_row()));
    }
    Ok(rows)
}

/// Sends a batch's rows at once: as data rows, or as COPY text lines.
async fn send_rows<C>(
    client: &mut C,
    batch: &RecordBatch,
    fields: &Arc<Vec<FieldInfo>>,
    copy: bool,
) -> PgWireResult<()>
where
    C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
    C::Error: Debug,
    PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
{
    if copy {
        for line in copy_lines(batch)? {
            let data = pgwire::messages::copy::CopyData::new(line.into());
            client.feed(PgWireBackendMessage::CopyData(data)).await?;
        }
    } else {
        for row in encode_rows(batch, fields.clone())? {
            client.feed(PgWireBackendMessage::DataRow(row?)).await?;
        }
    }
    client.flush().await?;
    Ok(())
}

/// Rows in COPY's text format: tab-separated, `\N` for NULL, escaped.
fn copy_lines(batch: &RecordBatch) -> PgWireResult<Vec<String>> {
    let formatters = crate::statements::text_formatters(batch)
        .map_err(|e| PgWireError::ApiError(Box::new(e)))?;
    Ok((0..batch.num_rows())
        .map(|r| {
            let mut line = batch
                .columns()
                .iter()
                .zip(&formatters)
                .map(|(c, f)| {
                    if c.is_null(r) {
                        return "\\N".to_string();
                    }
                    f.value(r)
                        .to_string()
                        .replace('\\', "\\\\")
                        .replace('\t', "\\t")
                        .replace('\n', "\\n")
                        .replace('\r', "\\r")
                })
                .collect::<Vec<_>>()
                .join("\t");
            line.push('\n');
            line
        })
        .collect())
}

fn respond(outcome: Result<Outcome, ApiError>, format: &Format) -> PgWireResult<Response> {
    match outcome {
        Ok(Outcome::Command(tag)) => Ok(Response::Execution(Tag::new(&tag))),
        Ok(Outcome::Rows(batch)) => {
            let f = Arc::new(fields(&batch.schema(), format));
            let rows = encode_rows(&batch, f.clone())?;
            Ok(Response::Query(QueryResponse::new(f, stream::iter(rows))))
        }
        Err(e) => Ok(Response::Error(Box::new(error_info(&e)))),
    }
}

#[async_trait]
impl SimpleQueryHandler for Connection {
    async fn do_query<C>(&self, client: &mut C, query: &str) -> PgWireResult<Vec<Response>>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let mut out = vec![];
        for stmt in split(query) {
            if crate::statements::is_subscribe(&stmt.text) {
                let r = self.subscribe(client, &stmt).await?;
                let failed = matches!(r, Response::Error(_));
                out.push(r);
                if failed {
                    break;
                }
                continue;
            }
            let outcome = self.run(client, &stmt).await;
            let failed = outcome.is_err();
            out.push(respond(outcome, &Format::UnifiedText)?);
            if failed {
                break;
            }
        }
        if out.is_empty() {
            // Only comments (pgx pings with `-- ping`): PostgreSQL answers an empty query.
            out.push(Response::EmptyQuery);
        }
        Ok(out)
    }
}

/// A statement of the extended protocol. Statements that only read run when they are parsed
/// (their columns are needed to describe them), and the first execution returns those rows.
#[derive(Debug, Clone)]
pub struct Prepared {
    stmt: Stmt,
    schema: SchemaRef,
    ran: Arc<Mutex<Option<Result<Outcome, ApiError>>>>,
}

/// The columns of the statements that change something and answer with a row.
fn row_columns(text: &str) -> Option<&'static [&'static str]> {
    let upper: String = text
        .split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ")
        .to_ascii_uppercase();
    match upper.as_str() {
        "CREATE TOKEN" => Some(&["token_id", "token", "user", "tenant", "role"]),
        "CHECKPOINT PIPELINE" => Some(&["epoch", "bytes", "files"]),
        _ => None,
    }
}

/// Whether a statement only reads (it can run to be described).
fn reads_only(text: &str) -> bool {
    let first = text
        .split(|c: char| c.is_whitespace() || c == '(')
        .find(|w| !w.is_empty())
        .unwrap_or("")
        .to_ascii_uppercase();
    matches!(
        first.as_str(),
        "SELECT" | "WITH" | "VALUES" | "SHOW" | "DESCRIBE" | "DESC" | "EXPLAIN"
    )
}

pub struct Parser {
    conn: Arc<Connection>,
}

#[async_trait]
impl QueryParser for Parser {
    type Statement = Prepared;

    async fn parse_sql<C>(
        &self,
        client: &C,
        sql: &str,
        _types: &[Option<Type>],
    ) -> PgWireResult<Option<Prepared>>
    where
        C: ClientInfo + Unpin + Send + Sync,
    {
        let mut parts = split(sql);
        if parts.len() > 1 {
            return Err(PgWireError::UserError(Box::new(ErrorInfo::new(
                "ERROR".into(),
                "42601".into(),
                "cannot insert multiple commands into a prepared statement".into(),
            ))));
        }
        let Some(stmt) = parts.pop() else {
            return Ok(None);
        };
        if crate::statements::is_subscribe(&stmt.text) {
            return Err(PgWireError::UserError(Box::new(error_info(&ApiError::unsupported(
                "SUBSCRIBE streams over the simple query protocol (psql, or simple_query in drivers)",
            )))));
        }
        let (schema, ran) = if reads_only(&stmt.text) {
            let outcome = self.conn.run(client, &stmt).await;
            let schema = match &outcome {
                Ok(Outcome::Rows(b)) => b.schema(),
                Err(e) => return Err(PgWireError::UserError(Box::new(error_info(e)))),
                _ => Arc::new(Schema::empty()),
            };
            (schema, Some(outcome))
        } else if let Some(columns) = row_columns(&stmt.text) {
            // Statements that change something and answer with rows: described by their
            // columns, run when executed.
            (crate::statements::text_rows(columns, vec![]).schema(), None)
        } else {
            (Arc::new(Schema::empty()), None)
        };
        Ok(Some(Prepared {
            stmt,
            schema,
            ran: Arc::new(Mutex::new(ran)),
        }))
    }

    fn get_parameter_types(&self, _stmt: &Prepared) -> PgWireResult<Vec<Type>> {
        Ok(vec![])
    }

    fn get_result_schema(
        &self,
        stmt: &Prepared,
        format: Option<&Format>,
    ) -> PgWireResult<Vec<FieldInfo>> {
        Ok(fields(&stmt.schema, format.unwrap_or(&Format::UnifiedText)))
    }
}

/// The handlers of one connection.
pub struct Handlers {
    conn: Arc<Connection>,
}

impl Handlers {
    pub fn new(server: Arc<Server>, connections: Arc<ConnectionManager>) -> Handlers {
        Handlers {
            conn: Connection::new(server, connections),
        }
    }
}

/// The extended-protocol handler: the connection, with a parser that runs through it.
pub struct Extended {
    conn: Arc<Connection>,
    parser: Arc<Parser>,
}

#[async_trait]
impl ExtendedQueryHandler for Extended {
    type Statement = Prepared;
    type QueryParser = Parser;

    fn query_parser(&self) -> Arc<Parser> {
        self.parser.clone()
    }

    async fn do_query<C>(
        &self,
        client: &mut C,
        portal: &Portal<Prepared>,
        max_rows: usize,
    ) -> PgWireResult<Response>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore<Statement = Prepared>,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let _ = max_rows;
        let prepared = &portal.statement.statement;
        let cached = prepared
            .ran
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let outcome = match cached {
            Some(o) => o,
            None => self.conn.run(client, &prepared.stmt).await,
        };
        respond(outcome, &portal.result_column_format)
    }
}

impl PgWireServerHandlers for Handlers {
    fn simple_query_handler(&self) -> Arc<impl SimpleQueryHandler> {
        self.conn.clone()
    }
    fn extended_query_handler(&self) -> Arc<impl ExtendedQueryHandler> {
        Arc::new(Extended {
            conn: self.conn.clone(),
            parser: Arc::new(Parser {
                conn: self.conn.clone(),
            }),
        })
    }
    fn startup_handler(&self) -> Arc<impl StartupHandler> {
        self.conn.auth.clone()
    }
    fn error_handler(&self) -> Arc<impl ErrorHandler> {
        Arc::new(LoginErrors)
    }
    fn cancel_handler(&self) -> Arc<impl CancelHandler> {
        self.conn.cancel.clone()
    }
}

/// Serves the wire protocol on `listener` until the process ends.
pub async fn serve(
    listener: tokio::net::TcpListener,
    server: Arc<Server>,
    tls: Option<pgwire::tokio::TlsAcceptor>,
    require_tls: bool,
) {
    let connections = Arc::new(ConnectionManager::new());
    loop {
        let Ok((mut socket, _)) = listener.accept().await else {
            continue;
        };
        let handlers = Handlers::new(server.clone(), connections.clone());
        let tls = tls.clone();
        tokio::spawn(async move {
            if require_tls && !asks_for_tls(&mut socket).await {
                refuse_plain(socket).await;
                return;
            }
            if let Err(e) = pgwire::tokio::process_socket(socket, tls, handlers).await {
                tracing::debug!("postgres connection: {e}");
            }
        });
    }
}

/// The codes of the requests a client sends before its startup message to ask for encryption.
const SSL_REQUEST: u32 = 80877103;
const GSSENC_REQUEST: u32 = 80877104;

/// Whether the client's first request (looked at, not read) asks for TLS. A request for GSS
/// encryption is answered "no" first, as PostgreSQL without GSSAPI does; the client then asks
/// for TLS or gives up on encryption.
async fn asks_for_tls(socket: &mut tokio::net::TcpStream) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    loop {
        let mut head = [0u8; 8];
        let got =
            tokio::time::timeout(std::time::Duration::from_secs(30), socket.peek(&mut head)).await;
        if !matches!(got, Ok(Ok(8))) {
            // Fewer than 8 bytes: wait for the rest (a request is 8 bytes in all).
            if matches!(got, Ok(Ok(n)) if n > 0 && n < 8) {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
            return false;
        }
        let length = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
        let code = u32::from_be_bytes([head[4], head[5], head[6], head[7]]);
        match (length, code) {
            (8, SSL_REQUEST) => return true,
            (8, GSSENC_REQUEST) => {
                let _ = socket.read_exact(&mut head).await;
                if socket.write_all(b"N").await.is_err() {
                    return false;
                }
            }
            _ => return false,
        }
    }
}

/// Ends a connection that did not ask for TLS on a server that requires it, with PostgreSQL's
/// error for a connection its `hostssl` rules refuse.
async fn refuse_plain(mut socket: tokio::net::TcpStream) {
    use pgwire::messages::Message;
    use tokio::io::AsyncWriteExt;
    let error: pgwire::messages::response::ErrorResponse = ErrorInfo::new(
        "FATAL".into(),
        "28000".into(),
        "this server requires TLS: connect with sslmode=require (or verify-full)".into(),
    )
    .into();
    let mut buf = bytes::BytesMut::new();
    if error.encode(&mut buf).is_ok() {
        let _ = socket.write_all(&buf).await;
    }
    let _ = socket.shutdown().await;
}
