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

fn principal(server: &Server, headers: &HeaderMap) -> Result<Principal, ApiError> {
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

#[derive(Deserialize)]
struct SqlBody {
    sql: String,
}

/// `POST /v1/sql`: runs statements in one session; returns each one's result, up to the first
/// error.
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
        "sql": p.statements,
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

async fn list_pipelines(State(server): State<Arc<Server>>, headers: HeaderMap) -> ApiResult {
    let p = principal(&server, &headers)?;
    let list = server.catalog.pipelines(Some(&p.tenant))?;
    Ok(Json(json!({
        "pipelines": list.iter().map(|pl| pipeline_json(&server, pl)).collect::<Vec<_>>()
    })))
}

async fn get_pipeline(
    State(server): State<Arc<Server>>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> ApiResult {
    let (_, pl) = own_pipeline(&server, &headers, &name)?;
    Ok(Json(pipeline_json(&server, &pl)))
}

#[derive(Deserialize)]
struct NewPipeline {
    name: String,
    /// Statements: `SET`s, then one `INSERT INTO` (or a `SELECT` with `"view": true`).
    sql: String,
    parallelism: Option<u64>,
    /// Keep the SELECT's result as a materialized view of the pipeline's name.
    #[serde(default)]
    materialized_view: bool,
}

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

async fn pipeline_action(
    State(server): State<Arc<Server>>,
    headers: HeaderMap,
    Path((name, action)): Path<(String, String)>,
) -> ApiResult {
    let mut session = Session::new(principal(&server, &headers)?);
    let sql = match action.as_str() {
        "start" => format!("START PIPELINE {name}"),
        "start-fresh" => format!("START PIPELINE {name} FRESH"),
        "stop" => format!("STOP PIPELINE {name}"),
        other => {
            return Err(ApiError::not_found(format!(
                "no action '{other}': give start, start-fresh or stop"
            )))
        }
    };
    run_one(&server, &mut session, &sql).await?;
    get_pipeline(State(server), headers, Path(name)).await
}

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
async fn view_rows(
    State(server): State<Arc<Server>>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> ApiResult {
    let p = principal(&server, &headers)?;
    let view = server.views.get(&p.tenant, &name).ok_or_else(|| {
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
async fn view_changes(
    State(server): State<Arc<Server>>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    use axum::response::sse::{Event, KeepAlive, Sse};
    let p = principal(&server, &headers)?;
    let view = server.views.get(&p.tenant, &name).ok_or_else(|| {
        ApiError::undefined_table(format!("materialized view '{name}' does not exist"))
    })?;
    let (snap, rx) = view.subscribe()?;
    let first = crate::views::feed_rows(snap.epoch, &snap.batch, true)?;
    let first = Event::default()
        .event("snapshot")
        .data(batch_json(&first).to_string());
    let rest = futures_util::stream::unfold(Some(rx), |rx| async move {
        let mut rx = rx?;
        let event = match rx.recv().await {
            Ok(change) => match change.as_ref() {
                crate::views::Change::Epoch { epoch, batch } => {
                    match crate::views::feed_rows(*epoch, batch, false) {
                        Ok(rows) => Event::default()
                            .event("changes")
                            .data(batch_json(&rows).to_string()),
                        Err(e) => Event::default().event("error").data(e.message),
                    }
                }
                crate::views::Change::Reset => {
                    return Some((Ok(Event::default().event("reset").data("{}")), None))
                }
            },
            Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                let e = Event::default()
                    .event("error")
                    .data(format!("fell {n} epochs behind: subscribe again"));
                return Some((Ok(e), None));
            }
            Err(_) => return None,
        };
        Some((Ok::<_, std::convert::Infallible>(event), Some(rx)))
    });
    let stream =
        futures_util::StreamExt::chain(futures_util::stream::once(async move { Ok(first) }), rest);
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response())
}

async fn list_tables(State(server): State<Arc<Server>>, headers: HeaderMap) -> ApiResult {
    let p = principal(&server, &headers)?;
    let objects = server.catalog.objects(&p.tenant)?;
    Ok(Json(json!({ "tables": objects })))
}

async fn list_tenants(State(server): State<Arc<Server>>, headers: HeaderMap) -> ApiResult {
    let mut session = Session::new(principal(&server, &headers)?);
    Ok(Json(outcome_json(
        run_one(&server, &mut session, "SHOW TENANTS").await?,
    )))
}

async fn quotas(State(server): State<Arc<Server>>, headers: HeaderMap) -> ApiResult {
    let mut session = Session::new(principal(&server, &headers)?);
    Ok(Json(outcome_json(
        run_one(&server, &mut session, "SHOW QUOTAS").await?,
    )))
}

/// `GET /v1/pipelines/{name}/stats`: the pipeline's status and its process's counters.
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

/// `GET /v1/pipelines/{name}/logs`: the last lines its processes wrote (`?lines=n`, 200 by
/// default, at most 10000).
async fn pipeline_logs(
    State(server): State<Arc<Server>>,
    headers: HeaderMap,
    Path(name): Path<String>,
    axum::extract::Query(q): axum::extract::Query<std::collections::HashMap<String, String>>,
) -> ApiResult {
    let (p, _) = own_pipeline(&server, &headers, &name)?;
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
    let lines = &lines[lines.len().saturating_sub(n)..];
    Ok(Json(json!({ "lines": lines })))
}

/// `GET /metrics`: Prometheus's text format, for the token's tenant only (every tenant for
/// an administrator).
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
            get(get_pipeline).delete(delete_pipeline),
        )
        .route("/v1/pipelines/{name}/{action}", post(pipeline_action))
        .route("/v1/pipelines/{name}/stats", get(pipeline_stats))
        .route("/v1/pipelines/{name}/logs", get(pipeline_logs))
        .route("/metrics", get(metrics))
        .route("/v1/views/{name}/rows", get(view_rows))
        .route("/v1/views/{name}/changes", get(view_changes))
        .route("/v1/tables", get(list_tables))
        .route("/v1/tenants", get(list_tenants))
        .route("/v1/quotas", get(quotas))
        .fallback(not_found)
        .with_state(server)
}
