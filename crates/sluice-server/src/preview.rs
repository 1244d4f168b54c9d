//! The console's preview: a `SELECT` over the tenant's live streams, run for a few seconds in
//! a `sluice worker` process of its own (as a pipeline runs, with the tenant's memory cap and
//! file confinement), its changelog folded as a materialized view's is, and the rows it holds
//! then answered: a bounded sample of what the query computes, retractions applied. Nothing is
//! kept afterwards.

use std::collections::BTreeSet;
use std::process::Child;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::{json, Value};

use crate::error::ApiError;
use crate::statements::{Server, Session};
use crate::views::View;

/// `POST /v1/preview`'s body.
#[derive(Deserialize, utoipa::ToSchema)]
pub struct PreviewRequest {
    /// `SET`s and `CREATE TABLE`s, then one `SELECT`.
    pub sql: String,
    /// The most rows answered (100; at most 1000).
    pub limit: Option<usize>,
    /// How long the query runs (3 s; 1 to 30).
    pub seconds: Option<f64>,
}

/// How often the preview's process checkpoints, which is how often its result moves.
const INTERVAL: &str = "250 ms";
/// How long the process has for its final checkpoint once asked to stop.
const STOP_GRACE: Duration = Duration::from_secs(20);

/// Tenants with a preview running: one at a time each.
static RUNNING: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());

struct Slot(String);

impl Slot {
    fn take(tenant: &str) -> Result<Slot, ApiError> {
        let mut running = RUNNING.lock().unwrap_or_else(|p| p.into_inner());
        if !running.insert(tenant.to_string()) {
            return Err(ApiError::quota(format!(
                "tenant '{tenant}' has a preview running: one runs at a time"
            )));
        }
        Ok(Slot(tenant.to_string()))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        RUNNING
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.0);
    }
}

/// Runs a preview (blocking: call it off the async runtime).
pub fn run(
    server: &Arc<Server>,
    session: &Session,
    req: &PreviewRequest,
) -> Result<Value, ApiError> {
    let limit = req.limit.unwrap_or(100).clamp(1, 1000);
    let seconds = req.seconds.unwrap_or(3.0);
    if !(1.0..=30.0).contains(&seconds) {
        return Err(ApiError::invalid(format!(
            "seconds = {seconds}: a preview runs from 1 to 30 seconds"
        )));
    }
    let tenant = session.principal.tenant.clone();
    let name = format!("_preview-{}", crate::auth::new_password());
    let (script, schema) = server.preview_script(session, &req.sql, &name, INTERVAL)?;
    let _slot = Slot::take(&tenant)?;
    let dir = server.layout.pipeline(&tenant, &name);
    let result = run_in(server, &tenant, &dir, &script, schema, seconds, limit);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn run_in(
    server: &Arc<Server>,
    tenant: &str,
    dir: &std::path::Path,
    script: &str,
    schema: arrow::datatypes::SchemaRef,
    seconds: f64,
    limit: usize,
) -> Result<Value, ApiError> {
    let io = |e: std::io::Error| ApiError::internal(format!("preview: {e}"));
    let view_dir = dir.join("view");
    std::fs::create_dir_all(&view_dir).map_err(io)?;
    let script_path = dir.join("preview.sql");
    std::fs::write(&script_path, script).map_err(io)?;
    let log_path = dir.join("log");
    let log = std::fs::File::create(&log_path).map_err(io)?;
    let files = server.layout.files(tenant);
    std::fs::create_dir_all(&files).map_err(io)?;
    let cap = server
        .catalog
        .quotas(tenant)?
        .max_state_bytes
        .map(crate::supervisor::memory_cap);
    let mut cmd = crate::supervisor::worker_command(server.supervisor.exe(), &files, cap);
    cmd.arg(&script_path)
        .arg("--view")
        .arg(format!("preview={}", view_dir.display()))
        .arg("--pipeline")
        .arg(format!("{tenant}/preview"))
        .stdout(log.try_clone().map_err(io)?)
        .stderr(log);
    let started = Instant::now();
    let mut child = cmd.spawn().map_err(io)?;
    let ended_alone = wait_until(&mut child, started + Duration::from_secs_f64(seconds));
    let status = match ended_alone {
        Some(status) => status,
        None => {
            // A final checkpoint, so that what the query computed so far is in the log.
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            match wait_until(&mut child, Instant::now() + STOP_GRACE) {
                Some(s) => s,
                None => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(ApiError::internal(format!(
                        "the preview did not stop within {STOP_GRACE:?} of being asked to"
                    )));
                }
            }
        }
    };
    let took = started.elapsed().as_secs_f64();
    // Stopped by its SIGTERM, a worker ends with 0 or 128 + 15.
    let stopped = ended_alone.is_none() && status.code() == Some(128 + libc::SIGTERM);
    if !status.success() && !stopped {
        // The process's own message (its last error lines), secrets hidden.
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| l.contains("ERROR") || l.contains("error") || l.contains("panicked"))
            .collect();
        let shown = if lines.is_empty() {
            text.lines()
                .rev()
                .take(5)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect()
        } else {
            lines[lines.len().saturating_sub(5)..].to_vec()
        };
        let secrets = sluice_common::secrets::secret_values(script);
        return Err(ApiError::plan(format!(
            "the preview failed ({status}): {}",
            sluice_common::secrets::redact(&shown.join("\n"), &secrets)
        )));
    }
    let view = View::open(tenant, "preview", schema, view_dir)?;
    view.catch_up()?;
    let snap = view.snapshot()?;
    let total = snap.batch.num_rows();
    let batch = snap.batch.slice(0, total.min(limit));
    let mut out = crate::rest::batch_json(&batch);
    out["epoch"] = json!(view.status().0);
    out["rows_total"] = json!(total);
    out["truncated"] = json!(total > limit);
    out["seconds"] = json!((took * 10.0).round() / 10.0);
    Ok(out)
}

/// Waits for the child until `deadline`: its exit status, or None if it still runs.
fn wait_until(child: &mut Child, deadline: Instant) -> Option<std::process::ExitStatus> {
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
