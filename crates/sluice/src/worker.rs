//! `sluice worker`: one pipeline of `sluice serve`, in a process of its own. The server starts
//! it, watches it and restarts it from its checkpoints; it is not meant to be run by hand.
//!
//! The script's SELECT statements are the pipeline's materialized views: the n-th SELECT's
//! changelog goes to the n-th `--view NAME=DIR`, a `view` sink that the server folds.

use std::path::PathBuf;
use std::sync::Arc;

use sluice_engine::JobOptions;

/// `sluice worker`.
#[derive(clap::Args)]
pub struct WorkerArgs {
    /// The pipeline's SQL script (written by the server).
    script: PathBuf,
    /// Worker threads.
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// Where the n-th SELECT's changelog goes: `NAME=DIR`, a view's name and its log folder.
    #[arg(long = "view")]
    views: Vec<String>,
    /// Ignore existing checkpoints.
    #[arg(long)]
    fresh: bool,
    /// The pipeline's name in messages (`tenant/pipeline`).
    #[arg(long, default_value = "pipeline")]
    pipeline: String,
    /// Write the job's counters as JSON to this file every second.
    #[arg(long)]
    stats: Option<PathBuf>,
    /// The tenant's `max_state_bytes` quota: past it the job fails, naming the largest state;
    /// past 80% of it a warning is logged.
    #[arg(long)]
    max_state_bytes: Option<u64>,
    /// A file holding the rows per second the job's sources may read together (0: no limit);
    /// read again every 250 ms, so the server can change it.
    #[arg(long)]
    ingest_rate_file: Option<PathBuf>,
}

fn read_rate(path: &std::path::Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// The job's counters as the server reads them.
fn stats_json(metrics: &sluice_engine::JobMetrics) -> serde_json::Value {
    use std::sync::atomic::Ordering::Relaxed;
    let (state_bytes, state_keys) = metrics.state_now();
    let operators: serde_json::Map<String, serde_json::Value> = metrics
        .states()
        .iter()
        .map(|(name, (bytes, keys))| {
            (
                name.clone(),
                serde_json::json!({ "state_bytes": bytes, "state_keys": keys }),
            )
        })
        .collect();
    let watermark = metrics.source_watermark.load(Relaxed);
    let now_ms = chrono::Utc::now().timestamp_millis();
    let watermarks: serde_json::Map<String, serde_json::Value> = metrics
        .watermarks()
        .into_iter()
        .filter(|(_, wm)| *wm > i64::MIN && *wm < i64::MAX)
        .map(|(op, wm)| {
            (
                op,
                serde_json::json!({ "watermark_ms": wm, "lag_ms": now_ms - wm }),
            )
        })
        .collect();
    let busy: serde_json::Map<String, serde_json::Value> = metrics
        .busy()
        .into_iter()
        .map(|(op, t)| (op, serde_json::json!(t.as_secs_f64() * 1000.0)))
        .collect();
    let history: Vec<serde_json::Value> = metrics
        .checkpoint_history()
        .into_iter()
        .map(|c| {
            serde_json::json!({
                "epoch": c.epoch,
                "bytes": c.bytes,
                "files": c.files,
                "snapshot_ms": c.snapshot_ms,
                "duration_ms": c.duration_ms,
                "committed_at_ms": c.committed_at_ms,
            })
        })
        .collect();
    serde_json::json!({
        "rows_read": metrics.rows_read(),
        "rows_written": metrics.rows_written(),
        "state_bytes": state_bytes,
        "state_keys": state_keys,
        "operators": operators,
        "late_rows_dropped": metrics.late_rows_dropped.load(Relaxed),
        "records_skipped": metrics.records_skipped.load(Relaxed),
        "checkpoints": metrics.checkpoints.load(Relaxed),
        "last_checkpoint_bytes": metrics.checkpoint_bytes.load(Relaxed),
        "watermark_ms": (watermark != i64::MIN).then_some(watermark),
        "operator_watermarks": watermarks,
        "late_rows_by_operator": metrics.late_by_operator(),
        "busy_ms": busy,
        "checkpoint_history": history,
        "written_at_ms": now_ms,
    })
}

/// The live plan's `rows=N` per line, with the rows per second since `last` (the same plan's
/// counts then) after each; and the counts now.
fn with_rates(
    plan: &str,
    last: Option<&(std::time::Instant, Vec<Option<u64>>)>,
) -> (String, Vec<Option<u64>>) {
    let count = |line: &str| -> Option<u64> {
        line.split("rows=")
            .nth(1)?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    };
    let counts: Vec<Option<u64>> = plan.lines().map(count).collect();
    let mut out = String::with_capacity(plan.len() + 16 * counts.len());
    for (i, line) in plan.lines().enumerate() {
        out.push_str(line);
        if let (Some(now), Some((at, before))) = (counts[i], last) {
            if let Some(Some(then)) = before.get(i) {
                let secs = at.elapsed().as_secs_f64().max(0.001);
                out.push_str(&format!(
                    " ({:.0} rows/s)",
                    now.saturating_sub(*then) as f64 / secs
                ));
            }
        }
        out.push('\n');
    }
    (out, counts)
}

/// The counts a graph's rates are taken against: when, rows per node, busy ms per node.
type GraphCounts = (
    std::time::Instant,
    std::collections::HashMap<u64, u64>,
    std::collections::HashMap<u64, f64>,
);

/// The dataflow graph as the console draws it: each plan node with its rows and rows per
/// second, and its stateful operator's figures (state, watermark, late rows, busy share of the
/// last second over all workers), which the operators record under their names.
fn graph_json(
    pipelines: &[sluice_sql::Pipeline],
    metrics: &sluice_engine::JobMetrics,
    workers: usize,
    last: &mut Option<GraphCounts>,
) -> serde_json::Value {
    use std::collections::HashMap;
    let rows = metrics.node_rows();
    let (nodes, sinks) = sluice_sql::plan::explain::graph(pipelines, &rows);
    let names = metrics.node_names();
    // "GroupAggregate #2 on worker 1" -> the node of "GroupAggregate #2".
    let node_of = |key: &str| -> Option<u64> {
        let name = key.rsplit_once(" on worker ").map_or(key, |(n, _)| n);
        names.get(name).copied()
    };
    let mut state: HashMap<u64, (u64, u64)> = HashMap::new();
    for (key, (bytes, keys)) in metrics.states() {
        if let Some(n) = node_of(&key) {
            let e = state.entry(n).or_default();
            e.0 += bytes;
            e.1 += keys;
        }
    }
    let mut watermark: HashMap<u64, i64> = HashMap::new();
    for (key, wm) in metrics.watermarks() {
        if let (Some(n), true) = (node_of(&key), wm > i64::MIN && wm < i64::MAX) {
            let e = watermark.entry(n).or_insert(wm);
            *e = (*e).min(wm);
        }
    }
    let mut late: HashMap<u64, u64> = HashMap::new();
    for (key, n) in metrics.late_by_operator() {
        if let Some(node) = node_of(&key) {
            *late.entry(node).or_default() += n;
        }
    }
    let mut busy: HashMap<u64, f64> = HashMap::new();
    for (key, t) in metrics.busy() {
        if let Some(n) = node_of(&key) {
            *busy.entry(n).or_default() += t.as_secs_f64() * 1000.0;
        }
    }
    let now = std::time::Instant::now();
    let since = last
        .as_ref()
        .map(|(at, r, b)| (at.elapsed().as_secs_f64().max(0.001), r, b));
    let json_nodes: Vec<serde_json::Value> = nodes
        .iter()
        .map(|n| {
            let per_second = since.and_then(|(secs, before, _)| {
                Some(n.rows?.saturating_sub(*before.get(&n.id)?) as f64 / secs)
            });
            let busy_share = since.and_then(|(secs, _, before)| {
                let now = busy.get(&n.id)?;
                Some((now - before.get(&n.id).copied().unwrap_or(0.0)).max(0.0) / 1000.0 / secs)
            });
            serde_json::json!({
                "id": n.id.to_string(),
                "label": n.label,
                "details": n.details,
                "inputs": n.inputs.iter().map(|i| i.to_string()).collect::<Vec<_>>(),
                "exchange": n.partitioning,
                "rows": n.rows,
                "rows_per_second": per_second,
                "state_bytes": state.get(&n.id).map(|s| s.0),
                "state_keys": state.get(&n.id).map(|s| s.1),
                "watermark_ms": watermark.get(&n.id),
                "late_rows": late.get(&n.id),
                "busy": busy_share,
            })
        })
        .collect();
    *last = Some((now, rows, busy));
    serde_json::json!({
        "nodes": json_nodes,
        "sinks": sinks.iter().map(|s| serde_json::json!({
            "node": s.node.to_string(),
            "label": s.label,
        })).collect::<Vec<_>>(),
        "workers": workers,
    })
}

/// The source rate a pipeline past the soft limit of its state quota (80%) is slowed to: a
/// quarter of what it read just before, at least this.
const BACKPRESSURE_FLOOR: u64 = 100;

/// Writes the stats every second and enforces the state quota, until `done`: past 80% of it
/// the sources are slowed (backpressure) and a warning is logged, until the state is back
/// under 72%; past it the job fails.
fn watch(
    args: &WorkerArgs,
    pipelines: Vec<sluice_sql::Pipeline>,
    metrics: Arc<sluice_engine::JobMetrics>,
    control: Arc<sluice_engine::JobControl>,
    done: Arc<std::sync::atomic::AtomicBool>,
) {
    let stats = args.stats.clone();
    let rate_file = args.ingest_rate_file.clone();
    let max = args.max_state_bytes;
    let pipeline = args.pipeline.clone();
    let args_workers = args.workers;
    let _ = std::thread::Builder::new()
        .name("pipeline-watch".into())
        .spawn(move || {
            let mut throttle: Option<u64> = None;
            let mut last_write = std::time::Instant::now() - std::time::Duration::from_secs(1);
            let mut last_read = (std::time::Instant::now(), 0u64);
            let mut per_second = 0u64;
            let mut last_plan: Option<(std::time::Instant, Vec<Option<u64>>)> = None;
            let mut last_graph: Option<GraphCounts> = None;
            let workers = args_workers;
            loop {
                let finished = done.load(std::sync::atomic::Ordering::SeqCst);
                // The sources' rate over the last second or so.
                let read: u64 = metrics.rows_read().values().sum();
                let window = last_read.0.elapsed().as_secs_f64();
                if window >= 1.0 {
                    per_second = (read.saturating_sub(last_read.1) as f64 / window) as u64;
                    last_read = (std::time::Instant::now(), read);
                }
                if let Some(max) = max {
                    let (bytes, _) = metrics.state_now();
                    let soft = max / 10 * 8;
                    if bytes > max && !control.failed() {
                        let largest = metrics
                            .largest_state()
                            .map(|(name, b, keys)| format!("; the largest is {name}'s, {b} bytes in {keys} keys"))
                            .unwrap_or_default();
                        control.fail(sluice_common::Error::Runtime(format!(
                            "quota max_state_bytes is {max}: pipeline {pipeline} holds {bytes} bytes of state{largest}"
                        )));
                    } else if bytes > soft && throttle.is_none() {
                        // Before a whole second was measured: what was read so far.
                        let rate = if per_second > 0 {
                            per_second
                        } else {
                            (read.saturating_sub(last_read.1) as f64 / window.max(0.001)) as u64
                        };
                        let slowed = (rate / 4).max(BACKPRESSURE_FLOOR);
                        throttle = Some(slowed);
                        // Shown in the stats at once.
                        last_write -= std::time::Duration::from_secs(1);
                        tracing::warn!(
                            "pipeline {pipeline} holds {bytes} bytes of state, past 80% of its quota max_state_bytes = {max}: its sources are slowed to {slowed} rows/s until it is under 72%"
                        );
                    } else if bytes < soft / 10 * 9 && throttle.is_some() {
                        throttle = None;
                        tracing::info!(
                            "pipeline {pipeline} holds {bytes} bytes of state, back under 72% of its quota: its sources run at full speed"
                        );
                    }
                }
                // The tenant's share of its ingest quota (0: none), and the backpressure.
                let share = rate_file.as_deref().and_then(read_rate).unwrap_or(0);
                let rate = match (share, throttle) {
                    (0, t) => t.unwrap_or(0),
                    (s, Some(t)) => s.min(t),
                    (s, None) => s,
                };
                control.ingest.set_rate(rate);
                if let Some(path) = &stats {
                    if finished || last_write.elapsed() >= std::time::Duration::from_secs(1) {
                        last_write = std::time::Instant::now();
                        let tmp = path.with_extension("tmp");
                        let mut value = stats_json(&metrics);
                        value["backpressured"] = serde_json::json!(throttle.is_some());
                        value["ingest_limit"] = serde_json::json!((rate > 0).then_some(rate));
                        // EXPLAIN ANALYZE as the job runs: the rows each operator produced,
                        // and per second since the last stats.
                        let plan = sluice_sql::plan::explain::explain_analyzed(
                            &pipelines,
                            &metrics.node_rows(),
                        );
                        let (plan, counts) = with_rates(&plan, last_plan.as_ref());
                        last_plan = Some((std::time::Instant::now(), counts));
                        value["plan"] = serde_json::json!(plan);
                        value["graph"] =
                            graph_json(&pipelines, &metrics, workers, &mut last_graph);
                        if std::fs::write(&tmp, value.to_string()).is_ok() {
                            let _ = std::fs::rename(&tmp, path);
                        }
                    }
                }
                if finished {
                    return;
                }
                std::thread::sleep(std::time::Duration::from_millis(250));
            }
        });
}

pub fn run(args: WorkerArgs) -> Result<Option<i32>, String> {
    let file = args.script.display().to_string();
    let sql = std::fs::read_to_string(&args.script).map_err(|e| format!("{file}: {e}"))?;
    // The options' secrets never reach the log (the server serves it to the tenant).
    sluice_common::secrets::hide(sluice_common::secrets::secret_values(&sql));
    let mut plan = sluice_sql::plan_script(&sql).map_err(|e| format!("{file}: {e}"))?;
    for warning in &plan.warnings {
        tracing::warn!("{file}: {warning}");
    }
    let views: Vec<(String, String)> = args
        .views
        .iter()
        .map(|v| {
            v.split_once('=')
                .map(|(n, d)| (n.to_string(), d.to_string()))
                .ok_or_else(|| format!("--view {v}: give NAME=DIR"))
        })
        .collect::<Result<_, _>>()?;
    plan.selects_into_views(&views)
        .map_err(|e| format!("{file}: {e} (give --view NAME=DIR)"))?;
    if plan.pipelines.is_empty() {
        return Err(format!("{file}: the pipeline has no INSERT INTO or SELECT"));
    }
    let checkpointing = plan
        .settings
        .contains_key("execution.checkpointing.interval");
    let control = sluice_engine::JobControl::new();
    let stopped_by = crate::stop_on_signals(control.clone(), checkpointing)?;
    // SIGUSR1: a checkpoint now (the server's `POST /v1/pipelines/{name}/checkpoint`).
    {
        let mut signals = signal_hook::iterator::Signals::new([signal_hook::consts::SIGUSR1])
            .map_err(|e| format!("could not install the signal handlers: {e}"))?;
        let control = control.clone();
        std::thread::Builder::new()
            .name("checkpoint-signal".into())
            .spawn(move || {
                for _ in signals.forever() {
                    tracing::info!("a checkpoint was asked for");
                    control.request_checkpoint();
                }
            })
            .map_err(|e| format!("could not start the signal thread: {e}"))?;
    }
    let metrics = sluice_engine::JobMetrics::new();
    if let Some(rate) = args.ingest_rate_file.as_deref().and_then(read_rate) {
        control.ingest.set_rate(rate);
    }
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    watch(
        &args,
        plan.pipelines.clone(),
        metrics.clone(),
        control.clone(),
        done.clone(),
    );
    let options = JobOptions {
        workers: args.workers,
        control,
        metrics,
        fresh: args.fresh,
        operator_busy: true,
        count_rows: true,
        ..Default::default()
    };
    let summary = sluice_engine::run(plan, options);
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    // The watch writes the last stats.
    std::thread::sleep(std::time::Duration::from_millis(300));
    let summary = summary.map_err(|e| e.to_string())?;
    crate::print_summary(&summary);
    let signal = stopped_by.load(std::sync::atomic::Ordering::SeqCst);
    Ok((signal != 0).then_some(signal))
}
