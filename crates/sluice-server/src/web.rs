//! The web pages and the screens behind them.
//!
//! The pages are built from `web/` (TypeScript, Vite) into `web-dist/`, which is committed and
//! embedded here, so that cargo alone builds the server ([`Bundle`]). `/screen/<name>` shows a
//! big screen: a document binding widgets to the tenant's materialized views, kept under
//! `tenants/<t>/screens/<name>.json` and managed through `/v1/screens`. The page reads each view's
//! change feed (`/v1/views/<v>/changes`) and redraws its widgets from the diffs.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::error::ApiError;
use crate::rest::principal;
use crate::statements::{check_name, Server};

/// The built pages (`web-dist/`, from `bash web/build.sh`).
#[derive(rust_embed::Embed)]
#[folder = "web-dist/"]
struct Bundle;

/// The kinds of widget a screen may hold, and the columns each binds.
const WIDGETS: [(&str, &[&str]); 9] = [
    ("ticker", &["column"]),
    ("number", &["column"]),
    ("rate", &["column"]),
    ("pie", &["name", "value"]),
    ("line", &["x", "y"]),
    ("map", &["name", "value"]),
    ("bars", &["name", "value"]),
    ("freshness", &["time"]),
    ("delay", &["time"]),
];

/// A screen: a title and widgets, each bound to a materialized view and its columns (the page's
/// `ScreenDoc`).
#[derive(Serialize, Deserialize, Clone, Debug)]
#[serde(deny_unknown_fields)]
pub struct ScreenDoc {
    pub title: String,
    pub widgets: Vec<Widget>,
}

#[derive(Serialize, Deserialize, Clone, Debug)]
#[serde(deny_unknown_fields)]
pub struct Widget {
    #[serde(rename = "type")]
    pub kind: String,
    pub title: String,
    pub view: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub column: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub x: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub y: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub time: Option<String>,
}

impl Widget {
    fn binding(&self, key: &str) -> Option<&String> {
        match key {
            "column" => self.column.as_ref(),
            "name" => self.name.as_ref(),
            "value" => self.value.as_ref(),
            "x" => self.x.as_ref(),
            "y" => self.y.as_ref(),
            _ => self.time.as_ref(),
        }
    }
}

/// Checks a screen against the tenant's views: every widget of a known kind, bound to a view
/// that exists and to columns it has.
fn check_screen(server: &Server, tenant: &str, doc: &ScreenDoc) -> Result<(), ApiError> {
    for (i, w) in doc.widgets.iter().enumerate() {
        let at = format!("widget {} ('{}')", i + 1, w.title);
        let Some((_, keys)) = WIDGETS.iter().find(|(k, _)| *k == w.kind) else {
            return Err(ApiError::invalid(format!(
                "{at}: unknown type '{}' (types: {})",
                w.kind,
                WIDGETS.map(|(k, _)| k).join(", ")
            )));
        };
        let view = server.views.get(tenant, &w.view).ok_or_else(|| {
            ApiError::undefined_table(format!(
                "{at}: materialized view '{}' does not exist",
                w.view
            ))
        })?;
        let schema = view.snapshot()?.batch.schema();
        for key in keys.iter() {
            let column = w.binding(key).ok_or_else(|| {
                ApiError::invalid(format!("{at}: a '{}' widget needs '{key}'", w.kind))
            })?;
            if schema.index_of(column).is_err() {
                return Err(ApiError::invalid(format!(
                    "{at}: view '{}' has no column '{column}' (it has: {})",
                    w.view,
                    schema
                        .fields()
                        .iter()
                        .map(|f| f.name().as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            }
        }
    }
    Ok(())
}

fn screens_dir(server: &Server, tenant: &str) -> std::path::PathBuf {
    server.layout.tenant(tenant).join("screens")
}

fn io_error(path: &std::path::Path, e: std::io::Error) -> ApiError {
    ApiError::internal(format!("{}: {e}", path.display()))
}

/// Saves a screen of a tenant (replacing one of the same name), after checking it.
pub fn save_screen(
    server: &Server,
    tenant: &str,
    name: &str,
    doc: &ScreenDoc,
) -> Result<(), ApiError> {
    check_name("screen", name)?;
    check_screen(server, tenant, doc)?;
    let dir = screens_dir(server, tenant);
    std::fs::create_dir_all(&dir).map_err(|e| io_error(&dir, e))?;
    let path = dir.join(format!("{name}.json"));
    let staged = dir.join(format!(".{name}.json.tmp"));
    let text = serde_json::to_string_pretty(doc).expect("a screen serializes");
    std::fs::write(&staged, text).map_err(|e| io_error(&staged, e))?;
    std::fs::rename(&staged, &path).map_err(|e| io_error(&path, e))
}

fn load_screen(server: &Server, tenant: &str, name: &str) -> Result<ScreenDoc, ApiError> {
    check_name("screen", name)?;
    let path = screens_dir(server, tenant).join(format!("{name}.json"));
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(ApiError::not_found(format!(
                "screen '{name}' does not exist"
            )))
        }
        Err(e) => return Err(io_error(&path, e)),
    };
    serde_json::from_str(&text).map_err(|e| ApiError::internal(format!("{}: {e}", path.display())))
}

/// Share tokens open one screen, read-only, for a wall display that cannot log in:
/// `sluice_share.<tenant>.<screen>.<secret>`. Their hashes are kept beside the screen.
const SHARE_PREFIX: &str = "sluice_share.";

fn shares_path(server: &Server, tenant: &str, name: &str) -> std::path::PathBuf {
    screens_dir(server, tenant).join(format!("{name}.shares"))
}

fn load_shares(server: &Server, tenant: &str, name: &str) -> Result<Vec<String>, ApiError> {
    let path = shares_path(server, tenant, name);
    match std::fs::read_to_string(&path) {
        Ok(text) => serde_json::from_str(&text)
            .map_err(|e| ApiError::internal(format!("{}: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(vec![]),
        Err(e) => Err(io_error(&path, e)),
    }
}

/// Who asks for a screen or its views: a user of a tenant, or a share token of one screen.
enum Viewer {
    User(crate::auth::Principal),
    Share { tenant: String, screen: String },
}

fn viewer(server: &Server, headers: &HeaderMap) -> Result<Viewer, ApiError> {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let Some(share) = token.filter(|t| t.starts_with(SHARE_PREFIX)) else {
        return principal(server, headers).map(Viewer::User);
    };
    let refused = || ApiError::auth("the share token is not valid (unknown or revoked)");
    let mut parts = share[SHARE_PREFIX.len()..].splitn(3, '.');
    let (Some(tenant), Some(screen), Some(_)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(refused());
    };
    if check_name("tenant", tenant).is_err() || check_name("screen", screen).is_err() {
        return Err(refused());
    }
    let hash = crate::auth::token_hash(share);
    if !load_shares(server, tenant, screen)?.contains(&hash) {
        return Err(refused());
    }
    Ok(Viewer::Share {
        tenant: tenant.to_string(),
        screen: screen.to_string(),
    })
}

/// The tenant whose materialized view `view` the caller may read: its own tenant's, or, with a
/// share token, the shared screen's tenant's when that screen shows the view.
pub(crate) fn view_reader(
    server: &Server,
    headers: &HeaderMap,
    view: &str,
) -> Result<String, ApiError> {
    match viewer(server, headers)? {
        Viewer::User(p) => Ok(p.tenant),
        Viewer::Share { tenant, screen } => {
            let doc = load_screen(server, &tenant, &screen)?;
            if doc.widgets.iter().any(|w| w.view == view) {
                Ok(tenant)
            } else {
                Err(ApiError::denied(format!(
                    "a share token of screen '{screen}' reads only the views that screen shows"
                )))
            }
        }
    }
}

async fn share_screen(
    State(server): State<Arc<Server>>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let p = principal(&server, &headers)?;
    p.require_developer()?;
    load_screen(&server, &p.tenant, &name)?;
    let token = format!(
        "{SHARE_PREFIX}{}.{name}.{}{}",
        p.tenant,
        crate::auth::new_password(),
        crate::auth::new_password()
    );
    let mut shares = load_shares(&server, &p.tenant, &name)?;
    shares.push(crate::auth::token_hash(&token));
    let path = shares_path(&server, &p.tenant, &name);
    std::fs::write(
        &path,
        serde_json::to_string(&shares).expect("hashes serialize"),
    )
    .map_err(|e| io_error(&path, e))?;
    Ok(Json(json!({
        "token": token,
        "url": format!("/screen/{name}?token={token}"),
    })))
}

async fn unshare_screen(
    State(server): State<Arc<Server>>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let p = principal(&server, &headers)?;
    p.require_developer()?;
    load_screen(&server, &p.tenant, &name)?;
    let revoked = load_shares(&server, &p.tenant, &name)?.len();
    let path = shares_path(&server, &p.tenant, &name);
    match std::fs::remove_file(&path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io_error(&path, e)),
        _ => {}
    }
    Ok(Json(json!({ "revoked": revoked })))
}

async fn list_screens(
    State(server): State<Arc<Server>>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let p = principal(&server, &headers)?;
    let dir = screens_dir(&server, &p.tenant);
    let mut names = vec![];
    if let Ok(entries) = std::fs::read_dir(&dir) {
        for e in entries.flatten() {
            let file = e.file_name().to_string_lossy().to_string();
            if let Some(name) = file.strip_suffix(".json").filter(|n| !n.starts_with('.')) {
                names.push(name.to_string());
            }
        }
    }
    names.sort();
    Ok(Json(json!({ "screens": names })))
}

async fn get_screen(
    State(server): State<Arc<Server>>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let tenant = match viewer(&server, &headers)? {
        Viewer::User(p) => p.tenant,
        Viewer::Share { tenant, screen } if screen == name => tenant,
        Viewer::Share { screen, .. } => {
            return Err(ApiError::denied(format!(
                "a share token opens screen '{screen}' only"
            )))
        }
    };
    let doc = load_screen(&server, &tenant, &name)?;
    Ok(Json(json!({ "name": name, "screen": doc })))
}

async fn put_screen(
    State(server): State<Arc<Server>>,
    headers: HeaderMap,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<Value>, ApiError> {
    let p = principal(&server, &headers)?;
    p.require_developer()?;
    let doc: ScreenDoc = serde_json::from_slice(&body)
        .map_err(|e| ApiError::invalid(format!("screen '{name}': {e}")))?;
    save_screen(&server, &p.tenant, &name, &doc)?;
    Ok(Json(json!({ "name": name, "screen": doc })))
}

async fn delete_screen(
    State(server): State<Arc<Server>>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let p = principal(&server, &headers)?;
    p.require_developer()?;
    load_screen(&server, &p.tenant, &name)?;
    let path = screens_dir(&server, &p.tenant).join(format!("{name}.json"));
    std::fs::remove_file(&path).map_err(|e| io_error(&path, e))?;
    // Its share tokens go with it.
    let _ = std::fs::remove_file(shares_path(&server, &p.tenant, &name));
    Ok(Json(json!({ "dropped": name })))
}

/// A file of the bundle, with its type. Hashed asset names never change content, so they are
/// cached for good; the page itself is not cached.
fn bundled(path: &str) -> Response {
    let Some(file) = Bundle::get(path) else {
        return (StatusCode::NOT_FOUND, "no such file").into_response();
    };
    let kind = match path.rsplit('.').next() {
        Some("html") => "text/html; charset=utf-8",
        Some("js") => "text/javascript; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("json") => "application/json",
        Some("svg") => "image/svg+xml",
        Some("png") => "image/png",
        _ => "application/octet-stream",
    };
    let cache = match path.starts_with("assets/") {
        true => "public, max-age=31536000, immutable",
        false => "no-cache",
    };
    (
        [(header::CONTENT_TYPE, kind), (header::CACHE_CONTROL, cache)],
        file.data.into_owned(),
    )
        .into_response()
}

/// The page (a screen or the console): it asks for the token, then for what it shows.
async fn page() -> Response {
    bundled("index.html")
}

async fn asset(Path(file): Path<String>) -> Response {
    bundled(&format!("assets/{file}"))
}

/// The web routes.
pub fn routes() -> Router<Arc<Server>> {
    Router::new()
        .route("/screen/{name}", get(page))
        .route("/console", get(page))
        .route("/console/", get(page))
        .route(
            "/",
            get(|| async { axum::response::Redirect::to("/console") }),
        )
        .route("/assets/{file}", get(asset))
        .route("/v1/screens", get(list_screens))
        .route(
            "/v1/screens/{name}",
            get(get_screen).put(put_screen).delete(delete_screen),
        )
        .route(
            "/v1/screens/{name}/share",
            axum::routing::post(share_screen).delete(unshare_screen),
        )
}

/// The Double-11 demo's views and screen (`sluice serve --demo`, `sluice demo --web`).
const DEMO_SQL: &str = include_str!("../../../examples/double11_views.sql");
const DEMO_SCREEN: &str = include_str!("../../../examples/screens/double11.json");
/// The demo's tenant, its owner, and its screen.
pub const DEMO_TENANT: &str = "double11";

/// Sets up the demo once (tenant `double11` with its owner, the views of
/// `examples/double11_views.sql`, and the screen of `examples/screens/double11.json`), and
/// makes a fresh token of the demo's owner. Returns the token.
pub async fn start_demo(server: &Arc<Server>) -> Result<String, String> {
    use crate::auth::Principal;
    use crate::catalog::{Role, User};
    let catalog = &server.catalog;
    if !catalog.tenant_exists(DEMO_TENANT).map_err(|e| e.message)? {
        catalog.create_tenant(DEMO_TENANT).map_err(|e| e.message)?;
    }
    if catalog.user(DEMO_TENANT).map_err(|e| e.message)?.is_none() {
        catalog
            .create_user(&User {
                name: DEMO_TENANT.into(),
                tenant: DEMO_TENANT.into(),
                role: Role::Owner,
                verifier: crate::auth::verifier(&crate::auth::new_password()),
            })
            .map_err(|e| e.message)?;
    }
    let principal = Principal {
        user: DEMO_TENANT.into(),
        tenant: DEMO_TENANT.into(),
        role: Role::Owner,
    };
    // The views come back with the server after the first start.
    if server.views.get(DEMO_TENANT, "gmv_total").is_none() {
        let mut session = crate::statements::Session::new(principal);
        for stmt in crate::statements::split(DEMO_SQL) {
            server
                .execute(&mut session, &stmt)
                .await
                .map_err(|e| format!("examples/double11_views.sql: {}", e.message))?;
        }
    }
    let doc: ScreenDoc = serde_json::from_str(DEMO_SCREEN)
        .map_err(|e| format!("examples/screens/double11.json: {e}"))?;
    save_screen(server, DEMO_TENANT, "double11", &doc)
        .map_err(|e| format!("examples/screens/double11.json: {}", e.message))?;
    let (_, secret) = crate::auth::create_token(catalog, DEMO_TENANT).map_err(|e| e.message)?;
    Ok(secret)
}
