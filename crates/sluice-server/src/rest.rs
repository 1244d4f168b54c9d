//! The REST API (`axum`), under `/v1`. Every call but `/v1/health` carries a token
//! (`Authorization: Bearer <token>`) and acts within the token's tenant, exactly as a Postgres
//! session of the token's user would: the handlers run the same statements.
//!
//! Errors are JSON: `{"code": "<SQLSTATE>", "message": "...", "position": n}` with an HTTP
//! status that matches the code.

use std::sync::Arc;

use arrow::array::Array;
use arrow::record_batch::RecordBatch;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::auth::{principal_for_token, Principal};
use crate::error::ApiError;
use crate::statements::{split, Outcome, Server, Session, Stmt};

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.http_status()).unwrap_or(StatusCode::BAD_REQUEST);
        (status, Json(json!(self))).into_response()
    }
}

type ApiResult = Result<Json<Value>, ApiError>;

pub(crate) fn principal(server: &Server, headers: &HeaderMap) -> Result<Principal, ApiError> {
    let value = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| ApiError::auth("give a token: 'Authorization: Bearer <token>'"))?;
    let token = value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
        .ok_or_else(|| ApiError::auth("give a token: 'Authorization: Bearer <token>'"))?;
    principal_for_token(&server.catalog, token.trim())
}

/// A batch as JSON: column names and rows of values (numbers and booleans as such, other
/// types as their text).
pub fn batch_json(batch: &RecordBatch) -> Value {
    let columns: Vec<String> = batch
        .schema()
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .collect();
    let formatters: Vec<_> = match crate::statements::text_formatters(batch) {
        Ok(f) => f.into_iter().map(Some).collect(),
        Err(_) => batch.columns().iter().map(|_| None).collect(),
    };
    let rows: Vec<Value> = (0..batch.num_rows())
        .map(|r| {
            Value::Array(
                batch
                    .columns()
                    .iter()
                    .zip(&formatters)
                    .map(|(col, f)| {
                        if col.is_null(r) {
                            return Value::Null;
                        }
                        let text = f.as_ref().map_or(String::new(), |f| f.value(r).to_string());
                        let t = col.data_type();
                        if t.is_integer() || t.is_floating() {
                            serde_json::from_str(&text).unwrap_or(Value::String(text))
                        } else if *t == arrow::datatypes::DataType::Boolean {
                            Value::Bool(text == "true")
                        } else {
                            Value::String(text)
                        }
                    })
                    .collect(),
            )
        })
        .collect();
    json!({ "columns": columns, "rows": rows })
}

fn outcome_json(o: Outcome) -> Value {
    match o {
        Outcome::Command(tag) => json!({ "command": tag }),
        Outcome::Rows(b) => batch_json(&b),
    }
}

async fn run_one(
    server: &Arc<Server>,
    session: &mut Session,
    sql: &str,
) -> Result<Outcome, ApiError> {
    let stmt = Stmt {
        text: sql.to_string(),
        offset: 0,
    };
    server.execute(session, &stmt).await
}

/// Statements separated by `;`, run in one session.
#[derive(Deserialize, utoipa::ToSchema)]
pub struct SqlBody {
    sql: String,
}

/// `POST /v1/sql`: runs statements in one session; returns each one's result, up to the first
/// error.
#[utoipa::path(post, path = "/v1/sql", tag = "sql", request_body = SqlBody,
    responses((status = 200, description = "Each statement's result, in order", body = SqlResults),
              (status = 400, description = "A syntax or planning error, with its position", body = ErrorBody)),
    security(("token" = [])))]
async fn sql(
    State(server): State<Arc<Server>>,
    headers: HeaderMap,
    Json(body): Json<SqlBody>,
) -> ApiResult {
    let mut session = Session::new(principal(&server, &headers)?);
    let mut results = vec![];
    for stmt in split(&body.sql) {
        results.push(outcome_json(server.execute(&mut session, &stmt).await?));
    }
    Ok(Json(json!({ "results": results })))
}

fn pipeline_json(server: &Server, p: &crate::catalog::Pipeline) -> Value {
    // The rates of the last second or so (none unless it runs here).
    let latest = server.supervisor.history.latest(&p.tenant, &p.name);
    let uptime = server
        .supervisor
        .uptime(&p.tenant, &p.name)
        .map(|d| d.as_secs_f64());
    json!({
        "name": p.name,
        "tenant": p.tenant,
        "status": p.status,
        "desired": p.desired,
        "parallelism": p.parallelism,
        "restarts": p.restarts,
        "last_error": p.last_error,
        "uptime_seconds": uptime,
        "pid": server.supervisor.pid(&p.tenant, &p.name),
        "views": p.views,
        "sql": sluice_common::secrets::mask_sql(&p.statements),
        "rows_in_per_second": latest.map(|s| s.rows_in_per_second),
        "rows_out_per_second": latest.map(|s| s.rows_out_per_second),
        "lag_ms": latest.and_then(|s| s.lag_ms),
    })
}

/// The caller's tenant's pipeline `name` (another tenant's is "does not exist").
fn own_pipeline(
    server: &Server,
    headers: &HeaderMap,
    name: &str,
) -> Result<(Principal, crate::catalog::Pipeline), ApiError> {
    let p = principal(server, headers)?;
    let pl = server
        .catalog
        .pipeline(&p.tenant, name)?
        .ok_or_else(|| ApiError::not_found(format!("pipeline '{name}' does not exist")))?;
    Ok((p, pl))
}

#[utoipa::path(get, path = "/v1/pipelines", tag = "pipelines",
    responses((status = 200, description = "The tenant's pipelines", body = PipelineList)), security(("token" = [])))]
async fn list_pipelines(State(server): State<Arc<Server>>, headers: HeaderMap) -> ApiResult {
    let p = principal(&server, &headers)?;
    let list = server.catalog.pipelines(Some(&p.tenant))?;
    Ok(Json(json!({
        "pipelines": list.iter().map(|pl| pipeline_json(&server, pl)).collect::<Vec<_>>()
    })))
}

#[utoipa::path(get, path = "/v1/pipelines/{name}", tag = "pipelines",
    params(("name" = String, Path, description = "The pipeline's name")),
    responses((status = 200, body = PipelineDoc), (status = 404, body = ErrorBody)), security(("token" = [])))]
async fn get_pipeline(
    State(server): State<Arc<Server>>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> ApiResult {
    let (_, pl) = own_pipeline(&server, &headers, &name)?;
    Ok(Json(pipeline_json(&server, &pl)))
}

#[derive(Deserialize, utoipa::ToSchema)]
pub struct NewPipeline {
    name: String,
    /// Statements: `SET`s, then one `INSERT INTO` (or a `SELECT` with `"view": true`).
    sql: String,
    parallelism: Option<u64>,
    /// Keep the SELECT's result as a materialized view of the pipeline's name.
    #[serde(default)]
    materialized_view: bool,
}

/// A pipeline's new statements.
#[derive(Deserialize, utoipa::ToSchema)]
pub struct PipelineEdit {
    /// Statements: `SET`s, then the `INSERT INTO`s (a materialized view's: its SELECT).
    sql: String,
    /// Start over without state (needed when the new plan does not fit the checkpoint).
    #[serde(default)]
    fresh: bool,
}

#[utoipa::path(patch, path = "/v1/pipelines/{name}", tag = "pipelines", request_body = PipelineEdit,
    params(("name" = String, Path)),
    responses((status = 200, description = "Stopped with a final checkpoint and resumed from it with the new statements", body = PipelineDoc),
              (status = 400, description = "Does not plan, or does not fit the pipeline's state (give fresh)", body = ErrorBody),
              (status = 404, body = ErrorBody)), security(("token" = [])))]
async fn edit_pipeline(
    State(server): State<Arc<Server>>,
    headers: HeaderMap,
    Path(name): Path<String>,
    Json(body): Json<PipelineEdit>,
) -> ApiResult {
    crate::statements::check_name("pipeline", &name)?;
    let fresh = if body.fresh { " FRESH" } else { "" };
    let _ = run_sql(
        &server,
        &headers,
        format!("ALTER PIPELINE {name}{fresh} AS {}", body.sql),
    )
    .await?;
    get_pipeline(State(server), headers, Path(name)).await
}

/// Runs one statement made from a request's fields (names checked first, strings quoted).
async fn run_sql(server: &Arc<Server>, headers: &HeaderMap, sql: String) -> ApiResult {
    let mut session = Session::new(principal(server, headers)?);
    Ok(Json(outcome_json(
        run_one(server, &mut session, &sql).await?,
    )))
}

#[derive(Deserialize, utoipa::ToSchema)]
pub struct NewTenant {
    name: String,
}

#[utoipa::path(post, path = "/v1/tenants", tag = "admin", request_body = NewTenant,
    responses((status = 200, body = CommandDoc), (status = 403, description = "Not an administrator", body = ErrorBody),
              (status = 409, body = ErrorBody)), security(("token" = [])))]
async fn create_tenant(
    State(server): State<Arc<Server>>,
    headers: HeaderMap,
    Json(body): Json<NewTenant>,
) -> ApiResult {
    crate::statements::check_name("tenant", &body.name)?;
    run_sql(&server, &headers, format!("CREATE TENANT {}", body.name)).await
}

#[utoipa::path(delete, path = "/v1/tenants/{name}", tag = "admin", params(("name" = String, Path)),
    responses((status = 200, body = CommandDoc), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("token" = [])))]
async fn drop_tenant(
    State(server): State<Arc<Server>>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> ApiResult {
    crate::statements::check_name("tenant", &name)?;
    run_sql(&server, &headers, format!("DROP TENANT {name}")).await
}

#[utoipa::path(get, path = "/v1/users", tag = "admin",
    responses((status = 200, description = "The tenant's users (every user for an administrator)", body = RowsDoc)),
    security(("token" = [])))]
async fn list_users(State(server): State<Arc<Server>>, headers: HeaderMap) -> ApiResult {
    run_sql(&server, &headers, "SHOW USERS".into()).await
}

#[derive(Deserialize, utoipa::ToSchema)]
pub struct NewUser {
    name: String,
    password: String,
    /// The caller's tenant when absent (another one needs an administrator).
    tenant: Option<String>,
    /// owner, developer or viewer (developer when absent).
    role: Option<String>,
}

#[utoipa::path(post, path = "/v1/users", tag = "admin", request_body = NewUser,
    responses((status = 200, body = CommandDoc), (status = 403, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("token" = [])))]
async fn create_user(
    State(server): State<Arc<Server>>,
    headers: HeaderMap,
    Json(body): Json<NewUser>,
) -> ApiResult {
    crate::statements::check_name("user", &body.name)?;
    let mut sql = format!(
        "CREATE USER {} WITH PASSWORD {}",
        body.name,
        crate::statements::quote(&body.password)
    );
    if let Some(t) = &body.tenant {
        crate::statements::check_name("tenant", t)?;
        sql.push_str(&format!(" IN TENANT {t}"));
    }
    if let Some(r) = &body.role {
        crate::statements::check_name("role", r)?;
        sql.push_str(&format!(" ROLE {r}"));
    }
    run_sql(&server, &headers, sql).await
}

#[utoipa::path(delete, path = "/v1/users/{name}", tag = "admin", params(("name" = String, Path)),
    responses((status = 200, body = CommandDoc), (status = 404, body = ErrorBody)), security(("token" = [])))]
async fn drop_user(
    State(server): State<Arc<Server>>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> ApiResult {
    crate::statements::check_name("user", &name)?;
    run_sql(&server, &headers, format!("DROP USER {name}")).await
}

#[utoipa::path(get, path = "/v1/tokens", tag = "admin",
    responses((status = 200, description = "Token ids (never the secrets): the tenant's for an owner, one's own otherwise", body = RowsDoc)),
    security(("token" = [])))]
async fn list_tokens(State(server): State<Arc<Server>>, headers: HeaderMap) -> ApiResult {
    run_sql(&server, &headers, "SHOW TOKENS".into()).await
}

#[derive(Deserialize, utoipa::ToSchema)]
pub struct NewToken {
    /// The caller when absent (another user needs an owner).
    user: Option<String>,
}

#[utoipa::path(post, path = "/v1/tokens", tag = "admin", request_body = NewToken,
    responses((status = 200, description = "The token, shown this once", body = RowsDoc), (status = 403, body = ErrorBody)),
    security(("token" = [])))]
async fn create_token(
    State(server): State<Arc<Server>>,
    headers: HeaderMap,
    Json(body): Json<NewToken>,
) -> ApiResult {
    let sql = match &body.user {
        Some(u) => {
            crate::statements::check_name("user", u)?;
            format!("CREATE TOKEN FOR USER {u}")
        }
        None => "CREATE TOKEN".into(),
    };
    run_sql(&server, &headers, sql).await
}

#[utoipa::path(delete, path = "/v1/tokens/{id}", tag = "admin", params(("id" = String, Path)),
    responses((status = 200, body = CommandDoc), (status = 404, body = ErrorBody)), security(("token" = [])))]
async fn revoke_token(
    State(server): State<Arc<Server>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult {
    run_sql(
        &server,
        &headers,
        format!("REVOKE TOKEN {}", crate::statements::quote(&id)),
    )
    .await
}

#[utoipa::path(put, path = "/v1/quotas/{tenant}", tag = "admin", params(("tenant" = String, Path)),
    request_body(content = Object, description = "Quotas to set, e.g. {\"max_pipelines\": 2, \"max_state_bytes\": \"512mb\"}; null lifts one"),
    responses((status = 200, body = CommandDoc), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody)),
    security(("token" = [])))]
async fn set_quotas(
    State(server): State<Arc<Server>>,
    headers: HeaderMap,
    Path(tenant): Path<String>,
    Json(body): Json<serde_json::Map<String, Value>>,
) -> ApiResult {
    crate::statements::check_name("tenant", &tenant)?;
    if body.is_empty() {
        return Err(ApiError::invalid("give at least one quota"));
    }
    let mut items = vec![];
    for (k, v) in &body {
        crate::statements::check_name("quota", k)?;
        let value = match v {
            Value::Null => "unlimited".to_string(),
            Value::Number(n) => n.to_string(),
            Value::String(s) => crate::statements::quote(s),
            other => {
                return Err(ApiError::invalid(format!(
                    "{k}: give a number, a string such as '512mb', or null, not {other}"
                )))
            }
        };
        items.push(format!("{k} = {value}"));
    }
    run_sql(
        &server,
        &headers,
        format!("ALTER TENANT {tenant} SET QUOTA ({})", items.join(", ")),
    )
    .await
}

/// The shapes the OpenAPI document names (the handlers build the same JSON).
#[allow(dead_code)]
mod doc {
    use serde::Serialize;
    use utoipa::ToSchema;

    /// An error: its SQLSTATE, message, and position in the SQL (1-based characters) if any.
    #[derive(Serialize, ToSchema)]
    pub struct ErrorBody {
        pub code: String,
        pub message: String,
        pub position: Option<u64>,
    }

    /// Rows: column names, then each row's values (numbers and booleans as such, other types
    /// as text).
    #[derive(Serialize, ToSchema)]
    pub struct RowsDoc {
        pub columns: Vec<String>,
        #[schema(value_type = Vec<Vec<Object>>)]
        pub rows: Vec<Vec<serde_json::Value>>,
        /// For a view: the committed epoch the rows are as of.
        pub epoch: Option<u64>,
    }

    /// A statement that returns no rows: its command tag.
    #[derive(Serialize, ToSchema)]
    pub struct CommandDoc {
        pub command: String,
    }

    /// Each statement's result: a `RowsDoc` or a `CommandDoc`.
    #[derive(Serialize, ToSchema)]
    pub struct SqlResults {
        #[schema(value_type = Vec<Object>)]
        pub results: Vec<serde_json::Value>,
    }

    #[derive(Serialize, ToSchema)]
    pub struct PipelineDoc {
        pub name: String,
        pub tenant: String,
        /// starting, running, restarting, stopped, failed or finished.
        pub status: String,
        /// running or stopped: what its owner asked for.
        pub desired: String,
        pub parallelism: u64,
        pub restarts: u64,
        pub last_error: Option<String>,
        pub uptime_seconds: Option<f64>,
        pub pid: Option<u32>,
        /// The materialized views it keeps.
        pub views: Vec<String>,
        pub sql: String,
        /// Rows its sources read, and its sinks wrote, per second, over the last second or
        /// so (none unless it runs on this server).
        pub rows_in_per_second: Option<f64>,
        pub rows_out_per_second: Option<f64>,
        /// How far its sources' watermark is behind the clock.
        pub lag_ms: Option<i64>,
    }

    #[derive(Serialize, ToSchema)]
    pub struct PipelineList {
        pub pipelines: Vec<PipelineDoc>,
    }
}
use doc::*;

struct TokenAuth;

impl utoipa::Modify for TokenAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "token",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The REST API's OpenAPI document, served at `/v1/openapi.json` and browsed at `/v1/docs`.
#[derive(utoipa::OpenApi)]
#[openapi(
    info(title = "Sluice", description = "The Sluice platform server's REST API. Every call but /v1/health takes a token: `Authorization: Bearer <token>`."),
    paths(sql, list_pipelines, create_pipeline, get_pipeline, delete_pipeline, edit_pipeline, pipeline_action,
          pipeline_stats, pipeline_logs, view_rows, view_changes, list_tables, list_tenants,
          create_tenant, drop_tenant, list_users, create_user, drop_user, list_tokens,
          create_token, revoke_token, quotas, set_quotas, metrics, health, login, logout, me,
          validate, preview, pipeline_history, feeds),
    components(schemas(SqlBody, NewPipeline, PipelineEdit, NewTenant, NewUser, NewToken, ErrorBody, RowsDoc,
                       CommandDoc, SqlResults, PipelineDoc, PipelineList, Login,
                       crate::preview::PreviewRequest)),
    modifiers(&TokenAuth)
)]
pub struct ApiDoc;

#[utoipa::path(post, path = "/v1/pipelines", tag = "pipelines", request_body = NewPipeline,
    responses((status = 201, description = "Created and started", body = PipelineDoc),
              (status = 400, description = "Syntax or planning error, with its position", body = ErrorBody),
              (status = 403, description = "Over a quota, or the role may not", body = ErrorBody)), security(("token" = [])))]
async fn create_pipeline(
    State(server): State<Arc<Server>>,
    headers: HeaderMap,
    Json(body): Json<NewPipeline>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let mut session = Session::new(principal(&server, &headers)?);
    if let Some(n) = body.parallelism {
        run_one(
            &server,
            &mut session,
            &format!("SET 'parallelism.default' = '{n}'"),
        )
        .await?;
    }
    let mut statements = String::new();
    for s in split(&body.sql) {
        if crate::statements::set_pair(&s.text).is_some() {
            run_one(&server, &mut session, &s.text).await?;
        } else {
            statements.push_str(&s.text);
            statements.push_str(";\n");
        }
    }
    let kind = if body.materialized_view {
        "MATERIALIZED VIEW"
    } else {
        "PIPELINE"
    };
    run_one(
        &server,
        &mut session,
        &format!(
            "CREATE {kind} {} AS {}",
            body.name,
            statements.trim_end().trim_end_matches(';')
        ),
    )
    .await?;
    let pl = server
        .catalog
        .pipeline(&session.principal.tenant, &body.name)?
        .ok_or_else(|| ApiError::internal("the pipeline vanished"))?;
    Ok((StatusCode::CREATED, Json(pipeline_json(&server, &pl))))
}

#[utoipa::path(post, path = "/v1/pipelines/{name}/{action}", tag = "pipelines",
    params(("name" = String, Path), ("action" = String, Path, description = "start, start-fresh, stop, or checkpoint (a checkpoint now; answers with its epoch, bytes and files once it committed)")),
    responses((status = 200, description = "The pipeline (start, stop); the checkpoint's epoch, bytes and files (checkpoint)", body = PipelineDoc), (status = 404, body = ErrorBody)), security(("token" = [])))]
async fn pipeline_action(
    State(server): State<Arc<Server>>,
    headers: HeaderMap,
    Path((name, action)): Path<(String, String)>,
) -> ApiResult {
    let mut session = Session::new(principal(&server, &headers)?);
    if action == "checkpoint" {
        crate::statements::check_name("pipeline", &name)?;
        let sql = format!("CHECKPOINT PIPELINE {name}");
        return Ok(Json(outcome_json(
            run_one(&server, &mut session, &sql).await?,
        )));
    }
    let sql = match action.as_str() {
        "start" => format!("START PIPELINE {name}"),
        "start-fresh" => format!("START PIPELINE {name} FRESH"),
        "stop" => format!("STOP PIPELINE {name}"),
        other => {
            return Err(ApiError::not_found(format!(
                "no action '{other}': give start, start-fresh, stop or checkpoint"
            )))
        }
    };
    run_one(&server, &mut session, &sql).await?;
    get_pipeline(State(server), headers, Path(name)).await
}

#[utoipa::path(delete, path = "/v1/pipelines/{name}", tag = "pipelines",
    params(("name" = String, Path)),
    responses((status = 200, body = CommandDoc), (status = 404, body = ErrorBody)), security(("token" = [])))]
async fn delete_pipeline(
    State(server): State<Arc<Server>>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> ApiResult {
    let (p, pl) = own_pipeline(&server, &headers, &name)?;
    let mut session = Session::new(p);
    let sql = if pl.views.is_empty() {
        format!("DROP PIPELINE {name}")
    } else {
        format!("DROP MATERIALIZED VIEW {name}")
    };
    Ok(Json(outcome_json(
        run_one(&server, &mut session, &sql).await?,
    )))
}

/// `GET /v1/views/{name}/rows`: the view as of one epoch.
#[utoipa::path(get, path = "/v1/views/{name}/rows", tag = "views",
    params(("name" = String, Path, description = "A materialized view")),
    responses((status = 200, description = "The view as of one committed epoch", body = RowsDoc),
              (status = 404, body = ErrorBody)), security(("token" = [])))]
async fn view_rows(
    State(server): State<Arc<Server>>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> ApiResult {
    let tenant = crate::web::view_reader(&server, &headers, &name)?;
    let view = server.views.get(&tenant, &name).ok_or_else(|| {
        ApiError::undefined_table(format!("materialized view '{name}' does not exist"))
    })?;
    let snap = view.snapshot()?;
    let mut out = batch_json(&snap.batch);
    out["epoch"] = json!(snap.epoch);
    Ok(Json(out))
}

/// `GET /v1/views/{name}/changes`: server-sent events, a `snapshot` event with the view's rows,
/// then a `changes` event per committed epoch, each row led by its change kind (`+I`, `-U`,
/// `+U`, `-D`). A `reset` event means the view started over: read the snapshot again.
#[utoipa::path(get, path = "/v1/views/{name}/changes", tag = "views",
    params(("name" = String, Path, description = "A materialized view")),
    responses((status = 200, description = "Server-sent events: `snapshot` (the rows), then `changes` per committed epoch (each row led by `+I`, `-U`, `+U` or `-D`), `reset` when the view starts over", content_type = "text/event-stream", body = String),
              (status = 404, body = ErrorBody)), security(("token" = [])))]
async fn view_changes(
    State(server): State<Arc<Server>>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    use axum::response::sse::{Event, KeepAlive, Sse};
    let stream = view_events(&server, &headers, &name)?;
    let stream = futures_util::StreamExt::map(stream, |(kind, data)| {
        Ok::<_, std::convert::Infallible>(Event::default().event(kind).data(data))
    });
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response())
}

/// One view's change feed as (event, data) pairs: `snapshot`, then `changes` per epoch; it
/// ends after `reset` (the view started over) or `error` (the reader fell behind), after which
/// the client subscribes again.
fn view_events(
    server: &Arc<Server>,
    headers: &HeaderMap,
    name: &str,
) -> Result<impl futures_util::Stream<Item = (&'static str, String)> + Send + 'static, ApiError> {
    let tenant = crate::web::view_reader(server, headers, name)?;
    let view = server.views.get(&tenant, name).ok_or_else(|| {
        ApiError::undefined_table(format!("materialized view '{name}' does not exist"))
    })?;
    let (snap, rx) = view.subscribe()?;
    let first = crate::views::feed_rows(snap.epoch, &snap.batch, true)?;
    let first = ("snapshot", batch_json(&first).to_string());
    let rest = futures_util::stream::unfold(Some(rx), |rx| async move {
        let mut rx = rx?;
        let event = match rx.recv().await {
            Ok(change) => match change.as_ref() {
                crate::views::Change::Epoch { epoch, batch } => {
                    match crate::views::feed_rows(*epoch, batch, false) {
                        Ok(rows) => ("changes", batch_json(&rows).to_string()),
                        Err(e) => return Some((("error", e.message), None)),
                    }
                }
                crate::views::Change::Reset => return Some((("reset", "{}".to_string()), None)),
            },
            Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                let e = format!("fell {n} epochs behind: subscribe again");
                return Some((("error", e), None));
            }
            Err(_) => return None,
        };
        Some((event, Some(rx)))
    });
    Ok(futures_util::StreamExt::chain(
        futures_util::stream::once(async move { first }),
        rest,
    ))
}

/// `views=a,b,c`.
#[derive(Deserialize)]
pub struct FeedsQuery {
    views: String,
}

/// `GET /v1/feeds?views=a,b,c`: the change feeds of several views in one stream of server-sent
/// events (a browser holds only six HTTP/1.1 connections to a server, so a screen of many views
/// shares one). Each event's data is the view's event with `"view": name` added; a `reset` or
/// `error` of any view ends the stream, and the client subscribes again (fresh snapshots).
#[utoipa::path(get, path = "/v1/feeds", tag = "views",
    params(("views" = String, Query, description = "The views' names, separated by commas")),
    responses((status = 200, description = "text/event-stream: snapshot and changes events, each with its view"),
              (status = 404, body = ErrorBody)), security(("token" = [])))]
async fn feeds(
    State(server): State<Arc<Server>>,
    headers: HeaderMap,
    axum::extract::Query(q): axum::extract::Query<FeedsQuery>,
) -> Result<Response, ApiError> {
    use axum::response::sse::{Event, KeepAlive, Sse};
    let mut names: Vec<&str> = q
        .views
        .split(',')
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .collect();
    names.sort_unstable();
    names.dedup();
    if names.is_empty() || names.len() > 64 {
        return Err(ApiError::invalid("give views=a,b,c: from 1 to 64 views"));
    }
    let mut all = futures_util::stream::SelectAll::new();
    for name in names {
        let view = name.to_string();
        let events = view_events(&server, &headers, name)?;
        all.push(Box::pin(futures_util::StreamExt::map(
            events,
            move |(kind, data)| {
                let mut doc: Value =
                    serde_json::from_str(&data).unwrap_or_else(|_| json!({ "message": data }));
                doc["view"] = json!(view);
                (kind, doc.to_string())
            },
        )));
    }
    // Up to and including the first reset or error.
    let stream = futures_util::stream::unfold(Some(all), |all| async move {
        let mut all = all?;
        let (kind, data) = futures_util::StreamExt::next(&mut all).await?;
        let event = Event::default().event(kind).data(data);
        let next = (kind != "reset" && kind != "error").then_some(all);
        Some((Ok::<_, std::convert::Infallible>(event), next))
    });
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response())
}

#[utoipa::path(get, path = "/v1/tables", tag = "catalog",
    responses((status = 200, description = "The tenant's tables, views and materialized views with their DDL", body = Object)), security(("token" = [])))]
async fn list_tables(State(server): State<Arc<Server>>, headers: HeaderMap) -> ApiResult {
    let p = principal(&server, &headers)?;
    let mut objects = server.catalog.objects(&p.tenant)?;
    for o in &mut objects {
        o.sql = sluice_common::secrets::mask_sql(&o.sql);
    }
    Ok(Json(json!({ "tables": objects })))
}

#[utoipa::path(get, path = "/v1/tenants", tag = "admin",
    responses((status = 200, description = "Every tenant (an administrator), or the caller's own", body = RowsDoc)), security(("token" = [])))]
async fn list_tenants(State(server): State<Arc<Server>>, headers: HeaderMap) -> ApiResult {
    let mut session = Session::new(principal(&server, &headers)?);
    Ok(Json(outcome_json(
        run_one(&server, &mut session, "SHOW TENANTS").await?,
    )))
}

#[utoipa::path(get, path = "/v1/quotas", tag = "admin",
    responses((status = 200, description = "Each quota's limit and use, per tenant", body = RowsDoc)), security(("token" = [])))]
async fn quotas(State(server): State<Arc<Server>>, headers: HeaderMap) -> ApiResult {
    let mut session = Session::new(principal(&server, &headers)?);
    Ok(Json(outcome_json(
        run_one(&server, &mut session, "SHOW QUOTAS").await?,
    )))
}

/// `GET /v1/pipelines/{name}/stats`: the pipeline's status and its process's counters.
#[utoipa::path(get, path = "/v1/pipelines/{name}/stats", tag = "pipelines",
    params(("name" = String, Path)),
    responses((status = 200, description = "Status and the process's counters (rows, state per operator, checkpoints, watermark)", body = Object),
              (status = 404, body = ErrorBody)), security(("token" = [])))]
async fn pipeline_stats(
    State(server): State<Arc<Server>>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> ApiResult {
    let (p, pl) = own_pipeline(&server, &headers, &name)?;
    let mut out = pipeline_json(&server, &pl);
    out["stats"] = server
        .supervisor
        .stats(&p.tenant, &name)
        .unwrap_or(Value::Null);
    out["views"] = Value::Array(
        pl.views
            .iter()
            .filter_map(|v| server.views.get(&p.tenant, v))
            .map(|v| {
                let (epoch, error) = v.status();
                json!({ "name": v.name, "epoch": epoch, "error": error })
            })
            .collect(),
    );
    Ok(Json(out))
}

/// A user's name and password.
#[derive(Deserialize, utoipa::ToSchema)]
pub struct Login {
    user: String,
    password: String,
}

/// `POST /v1/login`: a user's password for a new token of that user (the console's session;
/// `POST /v1/logout` revokes it).
#[utoipa::path(post, path = "/v1/login", tag = "session", request_body = Login,
    responses((status = 200, description = "The token (shown once), its id, and who it stands for", body = Object),
              (status = 401, description = "The user name or the password is wrong", body = ErrorBody)))]
async fn login(State(server): State<Arc<Server>>, Json(body): Json<Login>) -> ApiResult {
    let catalog = server.catalog.clone();
    let answer = tokio::task::spawn_blocking(move || {
        crate::auth::login(&catalog, &body.user, &body.password)
    })
    .await
    .map_err(|e| ApiError::internal(e.to_string()))?;
    match answer {
        Ok((p, id, token)) => Ok(Json(json!({
            "token": token, "id": id, "user": p.user, "tenant": p.tenant,
            "role": p.role.name(), "admin": p.is_admin(),
        }))),
        Err(e) => {
            // Guessing passwords is slow.
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            Err(e)
        }
    }
}

/// `POST /v1/logout`: revokes the token the call carries.
#[utoipa::path(post, path = "/v1/logout", tag = "session",
    responses((status = 200, body = CommandDoc), (status = 401, body = ErrorBody)), security(("token" = [])))]
async fn logout(State(server): State<Arc<Server>>, headers: HeaderMap) -> ApiResult {
    principal(&server, &headers)?;
    let token = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.get(7..))
        .unwrap_or_default()
        .trim();
    server
        .catalog
        .revoke_token_hash(&crate::auth::token_hash(token))?;
    Ok(Json(json!({ "command": "LOGOUT" })))
}

/// `GET /v1/me`: who the token stands for.
#[utoipa::path(get, path = "/v1/me", tag = "session",
    responses((status = 200, description = "user, tenant, role, admin", body = Object), (status = 401, body = ErrorBody)),
    security(("token" = [])))]
async fn me(State(server): State<Arc<Server>>, headers: HeaderMap) -> ApiResult {
    let p = principal(&server, &headers)?;
    Ok(Json(json!({
        "user": p.user, "tenant": p.tenant, "role": p.role.name(), "admin": p.is_admin(),
    })))
}

/// `POST /v1/validate`: checks statements without running them: each one's kind, and the
/// plan (`EXPLAIN`) of those that would run, planned over the tenant's catalog. Errors carry
/// their position in `sql`.
#[utoipa::path(post, path = "/v1/validate", tag = "sql", request_body = SqlBody,
    responses((status = 200, description = "statements (kind, text), plan (text), warnings", body = Object),
              (status = 400, description = "A syntax or planning error, with its position", body = ErrorBody)),
    security(("token" = [])))]
async fn validate(
    State(server): State<Arc<Server>>,
    headers: HeaderMap,
    Json(body): Json<SqlBody>,
) -> ApiResult {
    let session = Session::new(principal(&server, &headers)?);
    let tenant = session.principal.tenant.clone();
    let sql = body.sql.clone();
    let server2 = server.clone();
    let v = tokio::task::spawn_blocking(move || server2.validate(&session, &sql))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
        .map_err(|e| server.without_secrets(&tenant, &body.sql, e))?;
    let plan = v
        .plan
        .as_ref()
        .map(|p| sluice_sql::plan::explain::explain_pipelines(&p.pipelines))
        .unwrap_or_default();
    let secrets = server.secrets_of(&tenant, &body.sql);
    Ok(Json(json!({
        "statements": v.statements.iter().map(|(kind, text)| json!({
            "kind": kind, "text": sluice_common::secrets::mask_sql(text),
        })).collect::<Vec<_>>(),
        "plan": sluice_common::secrets::redact(&plan, &secrets),
        "warnings": v.plan.map(|p| p.warnings).unwrap_or_default(),
    })))
}

/// `POST /v1/preview`: runs one `SELECT` over the tenant's live streams for a few seconds, in
/// a process of its own, and answers the rows its result holds then (a bounded sample).
#[utoipa::path(post, path = "/v1/preview", tag = "sql", request_body = crate::preview::PreviewRequest,
    responses((status = 200, description = "columns, rows (at most limit), rows_total, epoch, seconds", body = RowsDoc),
              (status = 400, description = "Not one SELECT, or it does not plan, or its run failed", body = ErrorBody),
              (status = 429, description = "The tenant has a preview running", body = ErrorBody)),
    security(("token" = [])))]
async fn preview(
    State(server): State<Arc<Server>>,
    headers: HeaderMap,
    Json(body): Json<crate::preview::PreviewRequest>,
) -> ApiResult {
    let session = Session::new(principal(&server, &headers)?);
    let tenant = session.principal.tenant.clone();
    let sql = body.sql.clone();
    let server2 = server.clone();
    tokio::task::spawn_blocking(move || crate::preview::run(&server2, &session, &body))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
        .map(Json)
        .map_err(|e| server.without_secrets(&tenant, &sql, e))
}

/// `GET /v1/pipelines/{name}/history`: throughput, lag and state over the last hour.
#[utoipa::path(get, path = "/v1/pipelines/{name}/history", tag = "pipelines",
    params(("name" = String, Path)),
    responses((status = 200, description = "samples, oldest first: at_ms, rows_in_per_second, rows_out_per_second, lag_ms, state_bytes", body = Object),
              (status = 404, body = ErrorBody)), security(("token" = [])))]
async fn pipeline_history(
    State(server): State<Arc<Server>>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> ApiResult {
    let (p, _) = own_pipeline(&server, &headers, &name)?;
    Ok(Json(json!({
        "samples": server.supervisor.history.samples(&p.tenant, &name),
    })))
}

/// `GET /v1/pipelines/{name}/logs`: the last lines its processes wrote (`?lines=n`, 200 by
/// default, at most 10000).
#[utoipa::path(get, path = "/v1/pipelines/{name}/logs", tag = "pipelines",
    params(("name" = String, Path), ("lines" = Option<u64>, Query, description = "How many of the last lines (200; at most 10000)")),
    responses((status = 200, body = Object), (status = 404, body = ErrorBody)), security(("token" = [])))]
async fn pipeline_logs(
    State(server): State<Arc<Server>>,
    headers: HeaderMap,
    Path(name): Path<String>,
    axum::extract::Query(q): axum::extract::Query<std::collections::HashMap<String, String>>,
) -> ApiResult {
    let (p, pl) = own_pipeline(&server, &headers, &name)?;
    let n: usize = q
        .get("lines")
        .map(|v| {
            v.parse()
                .map_err(|_| ApiError::invalid(format!("lines={v}: give a number")))
        })
        .transpose()?
        .unwrap_or(200)
        .min(10_000);
    let path = server.layout.pipeline(&p.tenant, &name).join("log");
    let text = std::fs::read(&path).unwrap_or_default();
    // The tail only: a long-running pipeline's log can be large.
    let tail = &text[text.len().saturating_sub(4 << 20)..];
    let text = String::from_utf8_lossy(tail);
    let lines: Vec<&str> = text.lines().collect();
    // The process hides its secrets itself; this is a second guard.
    let secrets = sluice_common::secrets::secret_values(&pl.script);
    let lines: Vec<String> = lines[lines.len().saturating_sub(n)..]
        .iter()
        .map(|l| sluice_common::secrets::redact(l, &secrets))
        .collect();
    Ok(Json(json!({ "lines": lines })))
}

/// `GET /metrics`: Prometheus's text format, for the token's tenant only (every tenant for
/// an administrator).
#[utoipa::path(get, path = "/metrics", tag = "metrics",
    responses((status = 200, description = "Prometheus text format, the token's tenant only (every tenant for an administrator)", content_type = "text/plain", body = String)), security(("token" = [])))]
async fn metrics(
    State(server): State<Arc<Server>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let p = principal(&server, &headers)?;
    let scope = (!p.is_admin()).then_some(p.tenant.clone());
    let text = crate::metrics::render(&server, scope.as_deref())?;
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        text,
    )
        .into_response())
}

#[utoipa::path(get, path = "/v1/health", tag = "metrics", responses((status = 200, body = Object)))]
async fn health() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

async fn not_found() -> ApiError {
    ApiError::not_found("no such endpoint (the API is under /v1)")
}

/// The REST routes.
pub fn router(server: Arc<Server>) -> Router {
    Router::new()
        .route("/v1/health", get(health))
        .route("/v1/sql", post(sql))
        .route("/v1/pipelines", get(list_pipelines).post(create_pipeline))
        .route(
            "/v1/pipelines/{name}",
            get(get_pipeline)
                .delete(delete_pipeline)
                .patch(edit_pipeline),
        )
        .route("/v1/pipelines/{name}/{action}", post(pipeline_action))
        .route("/v1/pipelines/{name}/stats", get(pipeline_stats))
        .route("/v1/pipelines/{name}/logs", get(pipeline_logs))
        .route("/v1/pipelines/{name}/history", get(pipeline_history))
        .route("/v1/login", post(login))
        .route("/v1/logout", post(logout))
        .route("/v1/me", get(me))
        .route("/v1/validate", post(validate))
        .route("/v1/preview", post(preview))
        .route("/metrics", get(metrics))
        .route("/v1/views/{name}/rows", get(view_rows))
        .route("/v1/views/{name}/changes", get(view_changes))
        .route("/v1/feeds", get(feeds))
        .route("/v1/tables", get(list_tables))
        .route("/v1/tenants", get(list_tenants).post(create_tenant))
        .route("/v1/tenants/{name}", axum::routing::delete(drop_tenant))
        .route("/v1/users", get(list_users).post(create_user))
        .route("/v1/users/{name}", axum::routing::delete(drop_user))
        .route("/v1/tokens", get(list_tokens).post(create_token))
        .route("/v1/tokens/{id}", axum::routing::delete(revoke_token))
        .route("/v1/quotas", get(quotas))
        .route("/v1/quotas/{tenant}", axum::routing::put(set_quotas))
        .merge(crate::web::routes())
        .merge(
            utoipa_swagger_ui::SwaggerUi::new("/v1/docs")
                .url("/v1/openapi.json", <ApiDoc as utoipa::OpenApi>::openapi()),
        )
        .fallback(not_found)
        .with_state(server)
}
