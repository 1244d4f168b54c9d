//! `sluice worker`: one pipeline of `sluice serve`, in a process of its own. The server starts
//! it, watches it and restarts it from its checkpoints; it is not meant to be run by hand.
//!
//! The script's SELECT statements are the pipeline's materialized views: the n-th SELECT's
//! changelog goes to the n-th `--view NAME=DIR`, a `view` sink that the server folds.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use sluice_engine::JobOptions;
use sluice_sql::{SinkTarget, TableDef};

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
}

pub fn run(args: WorkerArgs) -> Result<Option<i32>, String> {
    let file = args.script.display().to_string();
    let sql = std::fs::read_to_string(&args.script).map_err(|e| format!("{file}: {e}"))?;
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
    for p in &mut plan.pipelines {
        let SinkTarget::Select { index } = p.sink else {
            continue;
        };
        let (name, dir) = views.get(index).ok_or_else(|| {
            format!(
                "{file}: SELECT number {} has no --view to write to",
                index + 1
            )
        })?;
        let schema = p.query.schema();
        p.sink = SinkTarget::Table(Arc::new(TableDef {
            name: name.clone(),
            physical_schema: schema.clone(),
            schema,
            computed: vec![],
            watermark: None,
            primary_key: vec![],
            partitioned_by: vec![],
            options: BTreeMap::from([
                ("connector".to_string(), "view".to_string()),
                ("path".to_string(), dir.clone()),
            ]),
            metadata: vec![],
            virtual_columns: vec![],
        }));
    }
    if plan.pipelines.is_empty() {
        return Err(format!("{file}: the pipeline has no INSERT INTO or SELECT"));
    }
    let checkpointing = plan
        .settings
        .contains_key("execution.checkpointing.interval");
    let control = sluice_engine::JobControl::new();
    let stopped_by = crate::stop_on_signals(control.clone(), checkpointing)?;
    let options = JobOptions {
        workers: args.workers,
        control,
        fresh: args.fresh,
        ..Default::default()
    };
    let summary = sluice_engine::run(plan, options).map_err(|e| e.to_string())?;
    crate::print_summary(&summary);
    let signal = stopped_by.load(std::sync::atomic::Ordering::SeqCst);
    Ok((signal != 0).then_some(signal))
}
