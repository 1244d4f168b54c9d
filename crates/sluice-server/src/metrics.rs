//! `/metrics`: the server's pipelines and views in Prometheus's text format, labelled by
//! tenant, pipeline and operator. A tenant's token sees only its own series.

use prometheus::{Encoder, GaugeVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder};

use crate::error::ApiError;
use crate::statements::Server;

fn bad(e: prometheus::Error) -> ApiError {
    ApiError::internal(format!("metrics: {e}"))
}

/// The metrics of `tenant`'s pipelines and views (every tenant's when `None`).
pub fn render(server: &Server, tenant: Option<&str>) -> Result<String, ApiError> {
    let registry = Registry::new();
    let labels = ["tenant", "pipeline"];
    let up = IntGaugeVec::new(
        Opts::new("sluice_pipeline_up", "1 while the pipeline's process runs"),
        &labels,
    )
    .map_err(bad)?;
    let restarts = IntCounterVec::new(
        Opts::new("sluice_pipeline_restarts_total", "restarts after failures"),
        &labels,
    )
    .map_err(bad)?;
    let parallelism = IntGaugeVec::new(
        Opts::new("sluice_pipeline_parallelism", "worker threads"),
        &labels,
    )
    .map_err(bad)?;
    let read = IntCounterVec::new(
        Opts::new(
            "sluice_pipeline_rows_read_total",
            "rows read, per source table",
        ),
        &["tenant", "pipeline", "table"],
    )
    .map_err(bad)?;
    let written = IntCounterVec::new(
        Opts::new(
            "sluice_pipeline_rows_written_total",
            "rows written, per sink",
        ),
        &["tenant", "pipeline", "sink"],
    )
    .map_err(bad)?;
    let state = IntGaugeVec::new(
        Opts::new(
            "sluice_pipeline_state_bytes",
            "state held, per operator and worker",
        ),
        &["tenant", "pipeline", "operator"],
    )
    .map_err(bad)?;
    let checkpoints = IntCounterVec::new(
        Opts::new(
            "sluice_pipeline_checkpoints_total",
            "checkpoints committed by the current process",
        ),
        &labels,
    )
    .map_err(bad)?;
    let late = IntCounterVec::new(
        Opts::new(
            "sluice_pipeline_late_rows_dropped_total",
            "rows behind the watermark, dropped",
        ),
        &labels,
    )
    .map_err(bad)?;
    let watermark = GaugeVec::new(
        Opts::new(
            "sluice_pipeline_watermark_seconds",
            "the sources' smallest watermark (Unix seconds)",
        ),
        &labels,
    )
    .map_err(bad)?;
    let backpressured = IntGaugeVec::new(
        Opts::new(
            "sluice_pipeline_backpressured",
            "1 while the pipeline's state is past 80% of its quota and its sources are slowed",
        ),
        &labels,
    )
    .map_err(bad)?;
    let op_labels = ["tenant", "pipeline", "operator"];
    let op_watermark = GaugeVec::new(
        Opts::new(
            "sluice_operator_watermark_seconds",
            "the watermark a stateful operator reached, per worker (Unix seconds)",
        ),
        &op_labels,
    )
    .map_err(bad)?;
    let op_lag = GaugeVec::new(
        Opts::new(
            "sluice_operator_watermark_lag_seconds",
            "how far a stateful operator's watermark is behind the wall clock, per worker",
        ),
        &op_labels,
    )
    .map_err(bad)?;
    let op_late = IntCounterVec::new(
        Opts::new(
            "sluice_operator_late_rows_dropped_total",
            "rows behind the watermark a stateful operator dropped, per worker",
        ),
        &op_labels,
    )
    .map_err(bad)?;
    let op_busy = prometheus::CounterVec::new(
        Opts::new(
            "sluice_operator_busy_seconds_total",
            "time the operator was scheduled, on all workers of the current process",
        ),
        &op_labels,
    )
    .map_err(bad)?;
    let view_epoch = IntGaugeVec::new(
        Opts::new(
            "sluice_view_epoch",
            "the newest epoch a materialized view shows",
        ),
        &["tenant", "view"],
    )
    .map_err(bad)?;
    for c in [
        Box::new(up.clone()) as Box<dyn prometheus::core::Collector>,
        Box::new(restarts.clone()),
        Box::new(parallelism.clone()),
        Box::new(read.clone()),
        Box::new(written.clone()),
        Box::new(state.clone()),
        Box::new(checkpoints.clone()),
        Box::new(late.clone()),
        Box::new(watermark.clone()),
        Box::new(backpressured.clone()),
        Box::new(op_watermark.clone()),
        Box::new(op_lag.clone()),
        Box::new(op_busy.clone()),
        Box::new(op_late.clone()),
        Box::new(view_epoch.clone()),
    ] {
        registry.register(c).map_err(bad)?;
    }
    for p in server.catalog.pipelines(tenant)? {
        let l = [p.tenant.as_str(), p.name.as_str()];
        let running = server.supervisor.pid(&p.tenant, &p.name).is_some();
        up.with_label_values(&l).set(running as i64);
        restarts.with_label_values(&l).inc_by(p.restarts);
        parallelism.with_label_values(&l).set(p.parallelism as i64);
        for v in &p.views {
            if let Some(view) = server.views.get(&p.tenant, v) {
                view_epoch
                    .with_label_values(&[p.tenant.as_str(), v.as_str()])
                    .set(view.status().0 as i64);
            }
        }
        let Some(stats) = server.supervisor.stats(&p.tenant, &p.name) else {
            continue;
        };
        let count = |v: &serde_json::Value| v.as_u64().unwrap_or(0);
        for (table, n) in stats["rows_read"].as_object().into_iter().flatten() {
            read.with_label_values(&[l[0], l[1], table])
                .inc_by(count(n));
        }
        for (sink, n) in stats["rows_written"].as_object().into_iter().flatten() {
            written
                .with_label_values(&[l[0], l[1], sink])
                .inc_by(count(n));
        }
        for (op, s) in stats["operators"].as_object().into_iter().flatten() {
            state
                .with_label_values(&[l[0], l[1], op])
                .set(count(&s["state_bytes"]) as i64);
        }
        checkpoints
            .with_label_values(&l)
            .inc_by(count(&stats["checkpoints"]));
        late.with_label_values(&l)
            .inc_by(count(&stats["late_rows_dropped"]));
        if let Some(ms) = stats["watermark_ms"].as_i64() {
            watermark.with_label_values(&l).set(ms as f64 / 1000.0);
        }
        backpressured
            .with_label_values(&l)
            .set(stats["backpressured"].as_bool().unwrap_or(false) as i64);
        for (op, w) in stats["operator_watermarks"]
            .as_object()
            .into_iter()
            .flatten()
        {
            let labels = [l[0], l[1], op.as_str()];
            if let Some(ms) = w["watermark_ms"].as_i64() {
                op_watermark
                    .with_label_values(&labels)
                    .set(ms as f64 / 1000.0);
            }
            if let Some(ms) = w["lag_ms"].as_i64() {
                op_lag.with_label_values(&labels).set(ms as f64 / 1000.0);
            }
        }
        for (op, n) in stats["late_rows_by_operator"]
            .as_object()
            .into_iter()
            .flatten()
        {
            op_late
                .with_label_values(&[l[0], l[1], op.as_str()])
                .inc_by(count(n));
        }
        for (op, ms) in stats["busy_ms"].as_object().into_iter().flatten() {
            op_busy
                .with_label_values(&[l[0], l[1], op.as_str()])
                .inc_by(ms.as_f64().unwrap_or(0.0).max(0.0) / 1000.0);
        }
    }
    let mut out = vec![];
    TextEncoder::new()
        .encode(&registry.gather(), &mut out)
        .map_err(bad)?;
    String::from_utf8(out).map_err(|e| ApiError::internal(e.to_string()))
}
