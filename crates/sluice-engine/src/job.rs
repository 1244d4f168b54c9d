//! Builds a [`JobPlan`] into one timely dataflow per worker and runs it to completion.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arrow::datatypes::SchemaRef;
use sluice_common::time::MAX_WATERMARK;
use sluice_common::{ChangeBatch, Error, Result};
use sluice_connectors::{open_sink, open_source, sink_accepts_updates, ConnectorSpec};
use sluice_sql::{JobPlan, SinkTarget, StreamNode, TableDef};
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::generic::{Operator, OutputBuilderSession};
use timely::dataflow::operators::CapabilityTrait;
use timely::dataflow::operators::{Concatenate, Probe};
use timely::dataflow::ProbeHandle;

use crate::aggregate::AggregateState;
use crate::checkpointing::{Alignment, CheckpointContext, Contribution};
use crate::dataflow::{
    cluster_config, exchange_by_key, tag_watermarks, DataflowScope, Epoch, Event, EventBuilder,
    EventStream,
};
use crate::metrics::JobMetrics;
use crate::source::{source_stream, table_prepare, ValuesReader};
use crate::stateless::{assign_windows, filter, map_batches, project};
use crate::watermark::WatermarkTracker;

/// Rows per source batch unless `'table.exec.mini-batch.size'` says otherwise.
const DEFAULT_BATCH_ROWS: usize = 8192;

/// Receives the changelog of each plain `SELECT` of a script.
pub trait SelectOutput: Send + Sync {
    /// Called once before any rows, with the query's index and schema.
    fn begin(&self, index: usize, schema: SchemaRef);
    /// Called with each batch of changes.
    fn emit(&self, index: usize, batch: &ChangeBatch);
}

/// How to run a job.
#[derive(Clone)]
pub struct JobOptions {
    /// Worker threads per process.
    pub workers: usize,
    /// This process's index, and the `host:port` of every process (cluster mode).
    pub process: usize,
    pub hosts: Option<Vec<String>>,
    pub select_output: Option<Arc<dyn SelectOutput>>,
    /// Counters; pass your own to watch a running job (the demo does).
    pub metrics: Arc<JobMetrics>,
    /// Ignore existing checkpoints and start from the beginning of the input.
    pub fresh: bool,
    /// Run the sources one after another, in plan order (for tests that show a changelog step
    /// by step; with one worker the order of a join's inputs is then deterministic).
    pub sequential_sources: bool,
}

impl Default for JobOptions {
    fn default() -> Self {
        JobOptions {
            workers: 1,
            process: 0,
            hosts: None,
            select_output: None,
            metrics: JobMetrics::new(),
            fresh: false,
            sequential_sources: false,
        }
    }
}

/// What a finished job reports.
#[derive(Debug, Clone, Default)]
pub struct JobSummary {
    pub rows_read: BTreeMap<String, u64>,
    pub rows_written: BTreeMap<String, u64>,
    pub late_rows_dropped: u64,
    /// Rows a window or an event-time operator dropped because their event time was NULL.
    pub null_time_rows_dropped: u64,
    pub records_skipped: u64,
    /// Aggregation state at the end of input (bounded jobs): bytes and groups.
    pub state_bytes: u64,
    pub state_groups: u64,
    /// Checkpoints committed, and the size of the last one.
    pub checkpoints: u64,
    pub checkpoint_bytes: u64,
    /// Worker time all snapshots took (the part of checkpointing that holds processing up).
    pub snapshot_ms: u64,
    pub elapsed: Duration,
}

impl JobSummary {
    /// Total rows read from all sources.
    pub fn total_read(&self) -> u64 {
        self.rows_read.values().sum()
    }
}

fn spec(table: &TableDef) -> ConnectorSpec {
    ConnectorSpec {
        table: table.name.clone(),
        schema: table.physical_schema.clone(),
        options: table.options.clone(),
        partitioned_by: table.partitioned_by.clone(),
        read_columns: None,
        decode_ahead: false,
        whole_files: false,
        sink_instance: 0,
    }
}

/// The physical columns a scan needs: those it keeps, and those the table's computed columns
/// and watermark are computed from. `None` when that is all of them.
fn read_columns(
    table: &TableDef,
    projection: &Option<Vec<usize>>,
    carry_source_row: bool,
) -> Option<Vec<usize>> {
    let physical = table.physical_schema.fields().len();
    let keep = projection.as_ref().filter(|_| !carry_source_row)?;
    let mut read: std::collections::BTreeSet<usize> =
        keep.iter().copied().filter(|c| *c < physical).collect();
    for e in table
        .computed
        .iter()
        .chain(table.watermark.iter().map(|(_, e)| e))
    {
        read.extend(
            datafusion_physical_expr::utils::collect_columns(e)
                .iter()
                .map(|c| c.index())
                .filter(|c| *c < physical),
        );
    }
    (read.len() < physical).then(|| read.into_iter().collect())
}

/// Checks a plan against the connectors before anything runs: options, and that every sink
/// accepts the kind of changes its query produces.
pub fn validate(plan: &JobPlan) -> Result<()> {
    let epoch_ms = crate::source::epoch_ms(&plan.settings)?;
    crate::checkpointing::CheckpointConfig::from_settings(&plan.settings, epoch_ms)?;
    for p in &plan.pipelines {
        let mut tables = vec![];
        collect_scans(&p.query, &mut tables);
        for t in tables {
            sluice_connectors::validate_source(&spec(&t))?;
            idle_timeout(&t)?;
        }
        let mut late = vec![];
        collect_late_sinks(&p.query, &mut late);
        for t in late {
            open_sink(&spec(&t), 0, 1)?;
        }
        if let SinkTarget::Table(t) = &p.sink {
            let s = spec(t);
            // Opening checks the options; sinks create nothing until written to, except the
            // filesystem sink's directory.
            open_sink(&s, 0, 1)?;
            if !p.query.is_append_only() && !sink_accepts_updates(&s) {
                return Err(Error::plan(format!(
                    "statement at line {}: INSERT INTO {}: the query produces an updating result (it retracts rows, e.g. a GROUP BY \
                     without a window), but connector '{}'{} only accepts inserts; use 'format' = 'debezium-json', \
                     or aggregate over a window",
                    p.line,
                    t.name,
                    t.connector(),
                    t.options.get("format").map(|f| format!(" with format '{f}'")).unwrap_or_default()
                )));
            }
        }
    }
    Ok(())
}

/// `'scan.watermark.idle-timeout'`: how long a source may go without data before it stops
/// holding back the watermark.
fn idle_timeout(table: &TableDef) -> Result<Option<Duration>> {
    match table.options.get("scan.watermark.idle-timeout") {
        None => Ok(None),
        Some(v) => match sluice_common::time::parse_duration_ms(v) {
            Some(ms) if ms > 0 => Ok(Some(Duration::from_millis(ms as u64))),
            _ => Err(Error::connector(
                &table.name,
                format!("option 'scan.watermark.idle-timeout' = '{v}' is not a positive duration such as '5 s'"),
            )),
        },
    }
}

/// Tables written as `'late-data.sink'` of windows in a plan.
fn collect_late_sinks(node: &StreamNode, out: &mut Vec<Arc<TableDef>>) {
    match node {
        StreamNode::Aggregate {
            input, late_sink, ..
        } => {
            out.extend(late_sink.iter().map(|l| l.table.clone()));
            collect_late_sinks(input, out)
        }
        StreamNode::Project { input, .. }
        | StreamNode::Filter { input, .. }
        | StreamNode::WindowAssign { input, .. }
        | StreamNode::Rank { input, .. }
        | StreamNode::Over { input, .. }
        | StreamNode::LookupJoin { input, .. } => collect_late_sinks(input, out),
        StreamNode::TemporalJoin { left, right, .. } => {
            collect_late_sinks(left, out);
            collect_late_sinks(right, out);
        }
        StreamNode::Union { inputs, .. } => inputs.iter().for_each(|i| collect_late_sinks(i, out)),
        StreamNode::Join { left, right, .. } => {
            collect_late_sinks(left, out);
            collect_late_sinks(right, out);
        }
        StreamNode::Scan { .. } | StreamNode::Values { .. } => {}
    }
}

fn collect_scans(node: &StreamNode, out: &mut Vec<Arc<TableDef>>) {
    match node {
        StreamNode::Scan { table, .. } => out.push(table.clone()),
        StreamNode::Values { .. } => {}
        StreamNode::Project { input, .. }
        | StreamNode::Filter { input, .. }
        | StreamNode::WindowAssign { input, .. }
        | StreamNode::Aggregate { input, .. }
        | StreamNode::Rank { input, .. }
        | StreamNode::Over { input, .. } => collect_scans(input, out),
        StreamNode::Union { inputs, .. } => inputs.iter().for_each(|i| collect_scans(i, out)),
        StreamNode::Join { left, right, .. }
        | StreamNode::TemporalJoin { left, right, .. }
        | StreamNode::LookupJoin {
            input: left,
            dim: right,
            ..
        } => {
            collect_scans(left, out);
            collect_scans(right, out);
        }
    }
}

/// Checkpointing for one run: the store, and what the run resumes from.
#[derive(Clone)]
struct RunCheckpoints {
    config: crate::checkpointing::CheckpointConfig,
    store: Arc<sluice_state::checkpoint::CheckpointStore>,
    restore: Option<sluice_state::checkpoint::Manifest>,
    base: Epoch,
    fingerprint: String,
    sources: BTreeMap<String, String>,
}

fn prepare_checkpoints(plan: &JobPlan, fresh: bool) -> Result<Option<RunCheckpoints>> {
    let Some(config) = crate::checkpointing::CheckpointConfig::from_settings(
        &plan.settings,
        crate::source::epoch_ms(&plan.settings)?,
    )?
    else {
        return Ok(None);
    };
    let store = Arc::new(sluice_state::checkpoint::CheckpointStore::open(
        &config.dir,
        &plan.settings,
    )?);
    let fingerprint = crate::checkpointing::fingerprint(plan);
    let sources = crate::checkpointing::source_identities(plan);
    let latest =
        store.latest(|epoch, why| eprintln!("checkpoint {epoch} is damaged and skipped: {why}"))?;
    // A finished job's record is nothing to go on from: with --fresh, start over.
    let latest = match latest {
        Some(m) if fresh && m.epoch == crate::checkpointing::FINISHED => {
            store.clear()?;
            None
        }
        other => other,
    };
    let restore = match (&config.recovery_path, fresh) {
        (_, true) => None,
        (None, false) => latest.clone(),
        (Some(path), false) => {
            // An explicit checkpoint must exist and be whole: no silent fallback.
            let (root, epoch) = sluice_state::checkpoint::parse_checkpoint_path(path).ok_or_else(|| {
                Error::plan(format!(
                    "'execution.state-recovery.path' = '{path}' must name one checkpoint folder, like .../chk-0000000000000042"
                ))
            })?;
            if std::path::Path::new(&root) != std::path::Path::new(config.dir.trim_end_matches('/'))
            {
                return Err(Error::plan(format!(
                    "'execution.state-recovery.path' = '{path}' is outside 'execution.checkpointing.dir' = '{}'; \
                     copy the checkpoint there or point the checkpoint directory at its folder",
                    config.dir
                )));
            }
            let manifest = store.complete(epoch).map_err(|e| {
                Error::plan(format!("'execution.state-recovery.path' = '{path}': {e}"))
            })?;
            Some(manifest)
        }
    };
    if let Some(m) = &restore {
        if m.plan_fingerprint != fingerprint {
            return Err(Error::plan(format!(
                "the checkpoint in '{}' (epoch {}) was taken by a different pipeline: its operators or state layout differ \
                 from this script's; run the original script, or start over with --fresh",
                config.dir, m.epoch
            )));
        }
        let allow = plan
            .settings
            .get("sluice.state-recovery.allow-changed-sources")
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("true"));
        for (table, was) in &m.sources {
            match sources.get(table) {
                Some(now) if now != was && !allow => {
                    return Err(Error::plan(format!(
                        "the checkpoint in '{}' (epoch {}) read another input for source table '{table}': \
                         then {was}, now {now}. Its offsets would skip or repeat rows of this input: start over \
                         with --fresh, or, if the input is the same data moved, \
                         SET 'sluice.state-recovery.allow-changed-sources' = 'true'",
                        config.dir, m.epoch
                    )));
                }
                Some(now) if now != was => eprintln!(
                    "warning: source table '{table}' changed since checkpoint {} (then {was}, now {now}); \
                     restoring anyway ('sluice.state-recovery.allow-changed-sources')",
                    m.epoch
                ),
                _ => {}
            }
        }
        eprintln!(
            "resuming from checkpoint {} in {} (taken with {} workers)",
            m.epoch, config.dir, m.workers
        );
    }
    // New checkpoints sort after every existing one, restored or not.
    let base = latest.map(|m| m.epoch + 1).unwrap_or(0);
    Ok(Some(RunCheckpoints {
        config,
        store,
        restore,
        base,
        fingerprint,
        sources,
    }))
}

/// For the recovery tests: `SLUICE_CRASH_AT=<point>` ends the process at that point of the end
/// of a job, as a kill there would.
fn crash_point(point: &str) {
    if std::env::var("SLUICE_CRASH_AT").is_ok_and(|p| p == point) {
        eprintln!("stopping at {point} (SLUICE_CRASH_AT)");
        std::process::exit(137);
    }
}

/// How long one process of a cluster waits for the others at the end of a job.
const FINISH_TIMEOUT: Duration = Duration::from_secs(60);

/// The end of a job that checkpoints, run as `processes` processes (one or more) that share its
/// checkpoint store. Sinks sealed their last output for [`crate::checkpointing::FINISHED`];
/// publishing it must wait until the job has recorded that it finished, and that record may go
/// only once every process has sealed. The store is the meeting point: each process leaves
/// marker files in the `FINISHED` checkpoint folder (no manifest, so never a checkpoint).
struct Finish<'a> {
    plan: &'a JobPlan,
    c: &'a RunCheckpoints,
    process: usize,
    processes: usize,
    /// Workers in every process of this run.
    workers_per_process: usize,
}

impl Finish<'_> {
    /// A marker's name says which workers' output it speaks for.
    fn marker(&self, step: &str, process: usize) -> String {
        format!(
            "{step}-{process}-of-{}x{}",
            self.processes, self.workers_per_process
        )
    }

    /// At the start of a run that resumes or starts over: markers this process left in an
    /// earlier run that was killed before the job's end was recorded mean nothing now. (Process 0
    /// cannot reach the end of this run before every process has joined the cluster, that is,
    /// after this.)
    fn forget_earlier_markers(&self) -> Result<()> {
        for step in ["sealed", "published"] {
            self.c.store.remove(
                crate::checkpointing::FINISHED,
                &self.marker(step, self.process),
            )?;
        }
        Ok(())
    }

    /// Waits until `ready` holds, up to [`FINISH_TIMEOUT`].
    fn wait(&self, what: &str, mut ready: impl FnMut() -> Result<bool>) -> Result<()> {
        let deadline = Instant::now() + FINISH_TIMEOUT;
        while !ready()? {
            if Instant::now() >= deadline {
                return Err(Error::Runtime(format!(
                    "process {} of {}: {what} within {} s; run the same command again on every process to finish the job",
                    self.process,
                    self.processes,
                    FINISH_TIMEOUT.as_secs()
                )));
            }
            std::thread::sleep(sluice_state::checkpoint::COMMIT_POLL);
        }
        Ok(())
    }

    /// Waits for every process's `step` marker.
    fn wait_for_all(&self, step: &str, what: &str) -> Result<()> {
        let store = &self.c.store;
        let mut missing: Vec<usize> = (0..self.processes).collect();
        self.wait(what, || {
            let mut still = vec![];
            for p in missing.drain(..) {
                if store
                    .size(crate::checkpointing::FINISHED, &self.marker(step, p))?
                    .is_none()
                {
                    still.push(p);
                }
            }
            missing = still;
            Ok(missing.is_empty())
        })
    }

    /// After this run's workers ended: every process seals, process 0 records the job's end,
    /// every process publishes its workers' sealed output, and once all have, process 0 drops
    /// the checkpoints.
    fn run_to_end(&self) -> Result<()> {
        let finished = crate::checkpointing::FINISHED;
        let store = &self.c.store;
        crash_point("final-seal");
        store.put(finished, &self.marker("sealed", self.process), vec![])?;
        if self.process == 0 {
            self.wait_for_all("sealed", "not every process sealed its last output")?;
            store.commit(&sluice_state::checkpoint::Manifest {
                version: sluice_state::checkpoint::FORMAT_VERSION,
                epoch: finished,
                plan_fingerprint: self.c.fingerprint.clone(),
                sources: self.c.sources.clone(),
                checksums: Default::default(),
                workers: self.processes * self.workers_per_process,
                files: Default::default(),
                inherited: Default::default(),
            })?;
        } else {
            self.wait("process 0 did not record the end of the job", || {
                store.is_committed(finished)
            })?;
        }
        crash_point("final-marker");
        self.publish()
    }

    /// Publishes what this process's workers sealed for the job's end (with another worker
    /// count than the run that sealed it, what the workers they replace sealed, as a restore
    /// would), then, on process 0, drops the checkpoints once every process has published.
    fn publish(&self) -> Result<()> {
        let finished = crate::checkpointing::FINISHED;
        // Each table, and how many INSERTs write into it (each its own part files).
        let mut tables: BTreeMap<String, (Arc<TableDef>, usize)> = BTreeMap::new();
        for p in &self.plan.pipelines {
            if let SinkTarget::Table(t) = &p.sink {
                tables.entry(t.name.clone()).or_insert((t.clone(), 0)).1 += 1;
            }
            let mut late = vec![];
            collect_late_sinks(&p.query, &mut late);
            for t in late {
                tables.entry(t.name.clone()).or_insert((t, 1));
            }
        }
        let workers = self.processes * self.workers_per_process;
        let mine =
            self.process * self.workers_per_process..(self.process + 1) * self.workers_per_process;
        for (t, inserts) in tables.values() {
            for sink_instance in 0..*inserts {
                let spec = ConnectorSpec {
                    sink_instance,
                    ..spec(t)
                };
                for w in mine.clone() {
                    open_sink(&spec, w, workers)?.begin_transactions(Some(finished), w, workers)?;
                }
            }
        }
        self.c
            .store
            .put(finished, &self.marker("published", self.process), vec![])?;
        crash_point("final-published");
        if self.process == 0 {
            self.wait_for_all("published", "not every process published its last output")?;
            self.c.store.clear()?;
        }
        Ok(())
    }
}

/// Runs a job until its bounded inputs are exhausted (or forever, for unbounded ones).
pub fn run(plan: JobPlan, options: JobOptions) -> Result<JobSummary> {
    validate(&plan)?;
    let started = Instant::now();
    let metrics = options.metrics.clone();
    let plan = Arc::new(plan);
    let final_plan = plan.clone();
    let config = cluster_config(
        options.workers.max(1),
        options.process,
        options.hosts.clone(),
    );
    let batch_rows = match plan.settings.get("table.exec.mini-batch.size") {
        None => DEFAULT_BATCH_ROWS,
        Some(v) => v
            .trim()
            .parse::<usize>()
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| {
                Error::plan(format!(
                    "'table.exec.mini-batch.size' = '{v}' must be a positive whole number of rows"
                ))
            })?,
    };
    let state_ttl = match plan.settings.get("table.exec.state.ttl") {
        None => None,
        Some(v) => {
            let ms = sluice_common::time::parse_duration_ms(v).ok_or_else(|| {
                Error::plan(format!(
                    "'table.exec.state.ttl' = '{v}' is not a duration such as '1 h' or '30 min'"
                ))
            })?;
            (ms > 0).then(|| Duration::from_millis(ms as u64))
        }
    };
    let select_output = options.select_output.clone();
    let sequential_sources = options.sequential_sources;
    let epoch_length = Duration::from_millis(crate::source::epoch_ms(&plan.settings)?);
    let fetch_threads =
        options.workers.max(1) < std::thread::available_parallelism().map_or(1, |n| n.get());
    if let Some(out) = &select_output {
        for p in &plan.pipelines {
            if let SinkTarget::Select { index } = p.sink {
                out.begin(index, p.query.schema());
            }
        }
    }
    let checkpointing = prepare_checkpoints(&plan, options.fresh)?;
    let processes = options.hosts.as_ref().map_or(1, |h| h.len().max(1));
    let finished_checkpointing = checkpointing.clone();
    let finish = finished_checkpointing.as_ref().map(|c| Finish {
        plan: &final_plan,
        c,
        process: options.process,
        processes,
        workers_per_process: options.workers.max(1),
    });
    if let Some(f) = &finish {
        if f.c
            .restore
            .as_ref()
            .is_some_and(|m| m.epoch == crate::checkpointing::FINISHED)
        {
            // Killed after it finished, before it had published everything: publish, and that
            // is all. Every process decides this before any can drop the checkpoints: the
            // processes meet as a cluster first (a late one would otherwise find nothing and
            // run the whole job again).
            if processes > 1 {
                timely::execute(config, |_| {})
                    .map_err(|e| Error::Runtime(format!("could not start the workers: {e}")))?
                    .join();
            }
            f.publish()?;
            eprintln!(
                "the job checkpointing to {} had already run to its end; published its final output",
                f.c.config.dir
            );
            return Ok(JobSummary {
                elapsed: started.elapsed(),
                ..Default::default()
            });
        }
        f.forget_earlier_markers()?;
    }
    let writer = checkpointing.as_ref().map(|c| {
        crate::checkpointing::CheckpointWriter::start(
            c.store.clone(),
            metrics.clone(),
            c.config.compression,
        )
    });
    let (writer, writer_thread) = match writer {
        Some((w, t)) => (Some(w), Some(t)),
        None => (None, None),
    };
    let worker_metrics = metrics.clone();
    let workers_per_process = options.workers.max(1);
    crate::panics::install_hook();
    let watching = MemoryWatch::start(memory_limit(&plan.settings)?, metrics.clone());
    let connected = Arc::new(std::sync::atomic::AtomicBool::new(false));
    if let Some(hosts) = &options.hosts {
        check_hosts(hosts, connected.clone())?;
    }
    let guards = timely::execute(config, move |worker| {
        // A panic fails the job with its message: the other workers stop at their next step
        // instead of waiting for this one forever.
        let index = worker.index();
        crate::panics::set_worker(index);
        let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let peers = worker.peers();
        let probe = ProbeHandle::<Epoch>::new();
        let checkpoint = checkpointing.as_ref().map(|c| {
            std::rc::Rc::new(CheckpointContext {
                store: c.store.clone(),
                writer: writer.clone().expect("a writer when checkpointing"),
                every: c.config.every,
                base: c.base,
                restore: c.restore.clone(),
                contributors: Default::default(),
                finished: Default::default(),
            })
        });
        let ctx = BuildContext {
            index,
            peers,
            metrics: worker_metrics.clone(),
            probe: probe.clone(),
            batch_rows,
            checkpoint: checkpoint.clone(),
            state_ttl,
            sequence: sequential_sources.then(Default::default),
            epoch_length,
            fetch_threads,
            local_workers: {
                let first = index / workers_per_process * workers_per_process;
                first..first + workers_per_process
            },
        };
        worker.dataflow::<Epoch, _, _>(|scope| {
            let reuse = Reuse::new(&plan);
            // INSERTs into one table so far: each writes its own part files.
            let mut inserts: std::collections::HashMap<&str, usize> = Default::default();
            for p in plan.pipelines.iter() {
                let stream = build(scope, &p.query, &ctx, &reuse);
                match &p.sink {
                    SinkTarget::Table(t) => {
                        let instance = inserts.entry(t.name.as_str()).or_default();
                        *instance += 1;
                        table_sink(stream, t, *instance - 1, &ctx).probe_with(&probe)
                    }
                    SinkTarget::Select { index: q } => {
                        select_sink(stream, *q, select_output.clone(), &ctx).probe_with(&probe)
                    }
                };
            }
        });
        // Worker 0 commits checkpoints: once the probe passes a checkpoint epoch, every operator
        // has handed over its files; they reach storage in the background, so the epoch stays
        // pending until all are there. The newest complete one wins; older pending ones go.
        let mut next_due = checkpoint.as_ref().map(|c| c.next_checkpoint(c.base));
        let mut pending: std::collections::VecDeque<Epoch> = Default::default();
        let mut failed_in_a_row = 0usize;
        // Looking for a checkpoint's files costs a storage request per pending epoch: not on
        // every step, and less often while none completes (a finished source never completes
        // later checkpoints).
        let first_poll = sluice_state::checkpoint::COMMIT_POLL / 2;
        let (mut last_try, mut poll) = (Instant::now(), first_poll);
        // When each pending checkpoint epoch ended (every operator had taken its snapshot).
        let mut since: BTreeMap<Epoch, Instant> = BTreeMap::new();
        while !probe.done() && !worker_metrics.failed() {
            worker.step_or_park(Some(Duration::from_millis(20)));
            let (0, Some(ck), Some(due), Some(c)) = (index, checkpoint.as_ref(), next_due.as_mut(), checkpointing.as_ref()) else {
                continue;
            };
            while !probe.done() && !probe.less_equal(due) {
                since.insert(*due, Instant::now());
                pending.push_back(*due);
                *due += ck.every;
                poll = first_poll;
            }
            if last_try.elapsed() < poll {
                continue;
            }
            last_try = Instant::now();
            poll = (poll * 2).min(first_poll * 32);
            // Storage failures fail checkpoints; only too many in a row fail the job.
            pending.retain(|epoch| {
                if !worker_metrics.take_checkpoint_failure(*epoch) {
                    return true;
                }
                failed_in_a_row += 1;
                if failed_in_a_row > c.config.tolerable_failures {
                    worker_metrics.fail(Error::Runtime(format!(
                        "{failed_in_a_row} checkpoints in a row failed (more than \
                         'execution.checkpointing.tolerable-failed-checkpoints' = {}); check '{}'",
                        c.config.tolerable_failures, c.config.dir
                    )));
                }
                false
            });
            for epoch in pending.iter().rev().copied().collect::<Vec<_>>() {
                match ck.try_commit(epoch, peers, (&c.fingerprint, &c.sources), c.config.retained) {
                    Ok(Some((files, bytes))) => {
                        failed_in_a_row = 0;
                        worker_metrics.checkpoints.fetch_add(1, Ordering::Relaxed);
                        worker_metrics.checkpoint_bytes.store(bytes, Ordering::Relaxed);
                        let took = worker_metrics.take_snapshot_time(epoch);
                        eprintln!(
                            "checkpoint {epoch} committed: {files} files (source offsets and state of {peers} workers), {bytes} bytes; \
                             snapshots took {:.1} ms of worker time, commit {} ms after the epoch",
                            took.as_secs_f64() * 1000.0,
                            since.get(&epoch).map_or(0, |t| t.elapsed().as_millis())
                        );
                        since.retain(|e, _| *e > epoch);
                        pending.retain(|e| *e > epoch);
                        break;
                    }
                    Ok(None) => {}
                    Err(e) => worker_metrics.checkpoint_failed(epoch, e),
                }
            }
            // A finished source never completes later checkpoints: do not wait for them forever.
            while pending.len() > 8 {
                pending.pop_front();
            }
        }
        // A graceful stop leaves a final checkpoint behind; its files may still be landing.
        if let (0, true, Some(ck), Some(c)) = (index, worker_metrics.is_cancelled(), checkpoint.as_ref(), checkpointing.as_ref()) {
            let stop = worker_metrics.stop_epoch.load(Ordering::SeqCst);
            if stop != u64::MAX {
                pending.push_back(stop);
            }
            // Wait while this process's files are still being written (large state takes a
            // while), then up to 10 s more for the other processes' files.
            let mut deadline = Instant::now() + Duration::from_secs(10);
            'finals: while !pending.is_empty() {
                if ck.writer.in_flight() > 0 {
                    deadline = Instant::now() + Duration::from_secs(10);
                } else if Instant::now() >= deadline {
                    break;
                }
                for epoch in pending.iter().rev().copied().collect::<Vec<_>>() {
                    if let Ok(Some((files, bytes))) = ck.try_commit(epoch, peers, (&c.fingerprint, &c.sources), c.config.retained) {
                        worker_metrics.checkpoints.fetch_add(1, Ordering::Relaxed);
                        worker_metrics.checkpoint_bytes.store(bytes, Ordering::Relaxed);
                        eprintln!("final checkpoint {epoch} committed: {files} files, {bytes} bytes");
                        break 'finals;
                    }
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        }));
        if let Err(panic) = ran {
            let text = crate::panics::take(&*panic);
            worker_metrics.fail(Error::Runtime(if crate::panics::lost_peer(&text) {
                format!(
                    "worker {index} lost its connection to another process of the cluster \
                     (that process failed or was killed: its log says why): {text}"
                )
            } else {
                format!("worker {index} panicked: {text}")
            }));
        }
        // A failed job's dataflows never complete (a panicked operator keeps what it held):
        // drop them, or timely would wait for them after this returns. In a cluster the
        // process ends at once instead: a clean shutdown would tell the peers that all is well,
        // and they would wait for this process's data forever; a lost connection fails them.
        if worker_metrics.failed() {
            if processes > 1 {
                end_failed_cluster_process(&worker_metrics);
            }
            for id in worker.installed_dataflows() {
                worker.drop_dataflow(id);
            }
        }
    })
    .map_err(|e| Error::Runtime(format!("could not start the workers: {e}")))?;
    connected.store(true, Ordering::SeqCst);
    for r in guards.join() {
        r.map_err(|e| Error::Runtime(format!("a worker failed: {e}")))?;
    }
    drop(watching);
    // The workers dropped their writers: the thread finishes the queued files and ends.
    if let Some(t) = writer_thread {
        let _ = t.join();
    }
    if let Some(e) = metrics.error.lock().expect("metrics").take() {
        return Err(e);
    }
    // A job that ran to its end needs no checkpoint to resume from (Flink drops them too): it
    // records that it finished, publishes its sinks' sealed output, then drops them.
    if let Some(f) = &finish {
        if !metrics.is_cancelled() {
            f.run_to_end()?;
        }
    }
    Ok(JobSummary {
        rows_read: metrics.rows_read(),
        rows_written: metrics.rows_written(),
        late_rows_dropped: metrics.late_rows_dropped.load(Ordering::Relaxed),
        null_time_rows_dropped: metrics.null_time_rows_dropped.load(Ordering::Relaxed),
        records_skipped: metrics.records_skipped.load(Ordering::Relaxed),
        state_bytes: metrics.state_bytes.load(Ordering::Relaxed),
        state_groups: metrics.state_groups.load(Ordering::Relaxed),
        checkpoints: metrics.checkpoints.load(Ordering::Relaxed),
        checkpoint_bytes: metrics.checkpoint_bytes.load(Ordering::Relaxed),
        snapshot_ms: metrics.snapshot_micros.load(Ordering::Relaxed) / 1000,
        elapsed: started.elapsed(),
    })
}

/// `'sluice.memory.limit'`: a size, or by default 80% of the machine's memory.
fn memory_limit(settings: &BTreeMap<String, String>) -> Result<u64> {
    match settings.get("sluice.memory.limit") {
        Some(v) => sluice_common::text::memory_size(v)
            .filter(|n| *n > 0)
            .ok_or_else(|| {
                Error::plan(format!(
                    "'sluice.memory.limit' = '{v}' is not a size such as '4gb' or '512mb'"
                ))
            }),
        None => Ok(machine_memory().map_or(u64::MAX, |m| m / 10 * 8)),
    }
}

/// The machine's memory (`MemTotal`), where the system says.
fn machine_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    kilobytes(&info, "MemTotal:")
}

/// This process's resident memory (`VmRSS`).
pub fn resident_memory() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    kilobytes(&status, "VmRSS:")
}

fn kilobytes(text: &str, field: &str) -> Option<u64> {
    let line = text.lines().find_map(|l| l.strip_prefix(field))?;
    let kb: u64 = line.trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kb * 1024)
}

fn megabytes(bytes: u64) -> String {
    format!("{:.0} MB", bytes as f64 / (1u64 << 20) as f64)
}

/// Watches the process's memory while the job runs: past the limit, the job fails with a
/// message naming the operator with the largest state, rather than the system killing it.
struct MemoryWatch {
    done: Arc<std::sync::atomic::AtomicBool>,
}

impl MemoryWatch {
    fn start(limit: u64, metrics: Arc<JobMetrics>) -> MemoryWatch {
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop = done.clone();
        let _ = std::thread::Builder::new()
            .name("memory-limit".into())
            .spawn(move || {
                while !stop.load(Ordering::Relaxed) && !metrics.failed() {
                    let used = resident_memory().unwrap_or(0);
                    if used > limit {
                        let largest = match metrics.largest_state() {
                            Some((name, bytes, keys)) if bytes > 0 => {
                                format!("the largest state is {name}'s, {} in {keys} keys", megabytes(bytes))
                            }
                            Some((name, _, keys)) => format!("the largest state is {name}'s, {keys} keys"),
                            None => "no operator reported its state yet".to_string(),
                        };
                        let in_flight = match metrics.largest_in_flight() {
                            Some((place, bytes)) if bytes > 0 => format!(
                                "; the most rows in flight wait in {place}, {}",
                                megabytes(bytes as u64)
                            ),
                            _ => String::new(),
                        };
                        metrics.fail(Error::Runtime(format!(
                            "the job uses {} of memory, more than 'sluice.memory.limit' = {}; {largest}{in_flight}. \
                             Raise the limit, run more processes, or bound the state (windows, \
                             'table.exec.state.ttl')",
                            megabytes(used),
                            megabytes(limit)
                        )));
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            });
        MemoryWatch { done }
    }
}

impl Drop for MemoryWatch {
    fn drop(&mut self) {
        self.done.store(true, Ordering::Relaxed);
    }
}

/// How long the processes of a cluster may take to find each other.
const CLUSTER_CONNECT_TIMEOUT: Duration = Duration::from_secs(60);

/// Every host of `--hosts` must resolve (an error at once, naming it), and the processes must
/// reach each other within [`CLUSTER_CONNECT_TIMEOUT`] (timely would retry forever): after that
/// the process ends with a message. `connected` is set once they have.
fn check_hosts(hosts: &[String], connected: Arc<std::sync::atomic::AtomicBool>) -> Result<()> {
    use std::net::ToSocketAddrs;
    for (i, host) in hosts.iter().enumerate() {
        let resolved = host.to_socket_addrs().map(|mut a| a.next().is_some());
        if !matches!(resolved, Ok(true)) {
            return Err(Error::Runtime(format!(
                "--hosts: process {i}'s address '{host}' does not resolve ({}); give host:port",
                resolved
                    .err()
                    .map_or("no address".to_string(), |e| e.to_string())
            )));
        }
    }
    let listed = hosts.join(", ");
    std::thread::Builder::new()
        .name("cluster-connect".into())
        .spawn(move || {
            let started = Instant::now();
            while started.elapsed() < CLUSTER_CONNECT_TIMEOUT {
                if connected.load(Ordering::SeqCst) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            eprintln!(
                "error: the processes of the cluster did not all connect within {} s ({listed}): \
                 start every process, each with its --process-id and the same --hosts",
                CLUSTER_CONNECT_TIMEOUT.as_secs()
            );
            std::process::exit(1);
        })
        .map_err(|e| Error::Runtime(format!("could not start a thread: {e}")))?;
    Ok(())
}

/// Ends a process of a cluster whose job failed, with the error: its peers lose the connection
/// and fail too. (Its sinks' in-progress files stay hidden; a rerun's recovery settles them.)
fn end_failed_cluster_process(metrics: &JobMetrics) -> ! {
    let message = metrics
        .error
        .lock()
        .map(|e| e.as_ref().map(|e| e.to_string()))
        .unwrap_or_default()
        .unwrap_or_default();
    eprintln!("error: {message}");
    std::process::exit(1);
}

/// What every operator of one worker needs to know.
#[derive(Clone)]
pub(crate) struct BuildContext {
    pub index: usize,
    pub peers: usize,
    pub metrics: Arc<JobMetrics>,
    pub probe: ProbeHandle<Epoch>,
    /// Rows per source batch.
    pub batch_rows: usize,
    /// Checkpointing, when enabled.
    pub checkpoint: Option<std::rc::Rc<crate::checkpointing::CheckpointContext>>,
    /// `'table.exec.state.ttl'`: how long regular joins keep rows that are not written.
    pub state_ttl: Option<Duration>,
    /// Processing time per epoch (`'sluice.epoch-length'`).
    pub epoch_length: Duration,
    /// Sources run one after another ([`JobOptions::sequential_sources`]).
    pub sequence: Option<std::rc::Rc<crate::source::SourceSequence>>,
    /// File sources read and parse on a thread of their own (the process's workers leave a
    /// core spare), as Flink's split fetchers do.
    pub fetch_threads: bool,
    /// The workers of this process (global indexes).
    pub local_workers: std::ops::Range<usize>,
}

impl BuildContext {
    /// Routes rows by key to the workers owning them ([`crate::dataflow::exchange_by_key`]),
    /// counting the bytes between this process's workers in flight into operator `into`.
    pub fn exchange<'scope>(
        &self,
        stream: EventStream<'scope>,
        keys: Vec<sluice_sql::PhysExpr>,
        into: &str,
    ) -> EventStream<'scope> {
        exchange_by_key(
            stream,
            keys,
            into,
            &self.metrics,
            self.local_workers.clone(),
        )
    }
}

/// Sub-plans computed once per worker, whatever number of places read them (as Flink's
/// `table.optimizer.reuse-sub-plan-enabled`, on by default): a self-join of a windowed
/// aggregation (Nexmark q5) aggregates once, and scans of one table share one reader.
pub(crate) struct Reuse<'scope> {
    /// Built streams by the plan they compute (its `Debug` text: operators, expressions,
    /// schemas and tables).
    built: std::cell::RefCell<std::collections::HashMap<String, EventStream<'scope>>>,
    /// Tables read more than once with different columns: the columns one shared reader keeps
    /// (sorted positions in the table's schema; `None`, all of them).
    scans: std::collections::HashMap<String, Option<Vec<usize>>>,
}

impl Reuse<'_> {
    pub fn new(plan: &JobPlan) -> Self {
        type Projections<'a> = BTreeMap<String, Vec<&'a Option<Vec<usize>>>>;
        fn collect<'a>(n: &'a StreamNode, out: &mut Projections<'a>) {
            if let StreamNode::Scan {
                table,
                projection,
                carry_source_row: false,
                ..
            } = n
            {
                out.entry(table.name.clone()).or_default().push(projection);
            }
            n.inputs().into_iter().for_each(|i| collect(i, out));
        }
        let mut by_table = Projections::new();
        for p in &plan.pipelines {
            collect(&p.query, &mut by_table);
        }
        let mut scans = std::collections::HashMap::new();
        for (name, projections) in by_table {
            if projections.iter().all(|p| *p == projections[0]) {
                continue;
            }
            // The union of their columns (`None`: one of them reads all).
            let union = projections.iter().try_fold(vec![], |mut u, p| {
                u.extend(p.as_ref()?);
                Some(u)
            });
            scans.insert(
                name,
                union.map(|mut u| {
                    u.sort_unstable();
                    u.dedup();
                    u
                }),
            );
        }
        Reuse {
            built: Default::default(),
            scans,
        }
    }
}

/// Builds `node`, or returns the stream already built for an identical plan. Plans that call a
/// volatile function are built each time.
fn build<'scope>(
    scope: DataflowScope<'scope>,
    node: &StreamNode,
    ctx: &BuildContext,
    reuse: &Reuse<'scope>,
) -> EventStream<'scope> {
    let key = (!node.calls_volatile()).then(|| format!("{node:?}"));
    if let Some(s) = key
        .as_ref()
        .and_then(|k| reuse.built.borrow().get(k).cloned())
    {
        return s;
    }
    let stream = build_node(scope, node, ctx, reuse);
    if let Some(k) = key {
        reuse.built.borrow_mut().insert(k, stream.clone());
    }
    stream
}

fn build_node<'scope>(
    scope: DataflowScope<'scope>,
    node: &StreamNode,
    ctx: &BuildContext,
    reuse: &Reuse<'scope>,
) -> EventStream<'scope> {
    match node {
        // A table that other scans read with other columns: one reader keeps all of them.
        StreamNode::Scan {
            table,
            projection,
            schema,
            carry_source_row: false,
        } if reuse
            .scans
            .get(&table.name)
            .is_some_and(|shared| shared != projection) =>
        {
            let shared = reuse.scans[&table.name].clone();
            let wide = StreamNode::Scan {
                table: table.clone(),
                schema: match &shared {
                    None => table.schema.clone(),
                    Some(p) => Arc::new(table.schema.project(p).expect("columns of the table")),
                },
                projection: shared.clone(),
                carry_source_row: false,
            };
            let all: Vec<usize> = (0..table.schema.fields().len()).collect();
            let shared = shared.unwrap_or(all.clone());
            let positions: Vec<usize> = projection
                .as_ref()
                .unwrap_or(&all)
                .iter()
                .map(|c| {
                    shared
                        .binary_search(c)
                        .expect("the shared scan keeps every column")
                })
                .collect();
            let schema = schema.clone();
            map_batches(
                build(scope, &wide, ctx, reuse),
                "ScanColumns",
                ctx.metrics.clone(),
                move |b| {
                    let columns = positions
                        .iter()
                        .map(|&i| b.data.column(i).clone())
                        .collect();
                    Ok(Some(b.with_columns(schema.clone(), columns)?))
                },
            )
        }
        StreamNode::Scan {
            table,
            projection,
            schema,
            carry_source_row,
        } => source_stream(
            scope,
            &table.name,
            open_source(
                &ConnectorSpec {
                    read_columns: read_columns(table, projection, *carry_source_row),
                    // With a watermark, a file is read in order by one worker (as in Flink, where
                    // a file is one split), so that the worker count cannot change which rows are
                    // late; its next piece is parsed on another thread meanwhile.
                    decode_ahead: ctx.fetch_threads || table.watermark.is_some(),
                    whole_files: table.watermark.is_some(),
                    ..spec(table)
                },
                ctx.index,
                ctx.peers,
            )
            .map(|r| {
                // Files are read and parsed on a fetcher thread when a core is spare (and the
                // next piece of a file on another, see `decode_ahead`).
                if ctx.fetch_threads && table.connector() == "filesystem" {
                    Box::new(sluice_connectors::prefetch::Prefetched::new(r, &table.name))
                } else {
                    r
                }
            }),
            table_prepare(
                table.clone(),
                projection.clone(),
                schema.clone(),
                *carry_source_row,
            ),
            idle_timeout(table).unwrap_or(None),
            ctx,
        ),
        StreamNode::Values { rows } => source_stream(
            scope,
            "VALUES",
            Ok(Box::new(ValuesReader::new(rows.clone(), ctx.index))),
            Box::new(|b| Ok((ChangeBatch::inserts(b), None))),
            None,
            ctx,
        ),
        StreamNode::Project {
            input,
            exprs,
            schema,
        } => {
            // A projection over a filter: the calls both make are computed once.
            if let StreamNode::Filter {
                input: below,
                predicate,
            } = input.as_ref()
            {
                match crate::stateless::FilterProject::new(
                    &below.schema(),
                    predicate,
                    exprs,
                    schema,
                ) {
                    Ok(Some(fused)) => {
                        return map_batches(
                            build(scope, below, ctx, reuse),
                            "FilterProject",
                            ctx.metrics.clone(),
                            move |b| fused.apply(b).map(Some),
                        )
                    }
                    Ok(None) => {}
                    Err(e) => ctx.metrics.fail(e),
                }
            }
            let (exprs, schema) = (exprs.clone(), schema.clone());
            map_batches(
                build(scope, input, ctx, reuse),
                "Project",
                ctx.metrics.clone(),
                move |b| project(b, &exprs, &schema).map(Some),
            )
        }
        StreamNode::Filter { input, predicate } => {
            let predicate = predicate.clone();
            map_batches(
                build(scope, input, ctx, reuse),
                "Filter",
                ctx.metrics.clone(),
                move |b| filter(b, &predicate).map(Some),
            )
        }
        StreamNode::WindowAssign {
            input,
            time,
            kind,
            schema,
        } => {
            let (time, kind, schema) = (time.clone(), *kind, schema.clone());
            let metrics = ctx.metrics.clone();
            map_batches(
                build(scope, input, ctx, reuse),
                "WindowAssign",
                ctx.metrics.clone(),
                move |b| {
                    assign_windows(b, &time, kind, &schema, &metrics.null_time_rows_dropped)
                        .map(Some)
                },
            )
        }
        StreamNode::Union { inputs, .. } => {
            let n = inputs.len();
            let streams: Vec<EventStream<'scope>> = inputs
                .iter()
                .enumerate()
                .map(|(i, input)| {
                    tag_watermarks(build(scope, input, ctx, reuse), i as u32, ctx.peers as u32)
                })
                .collect();
            let merged = scope.concatenate(streams);
            merge_watermarks(merged, n, ctx)
        }
        StreamNode::Aggregate {
            input,
            group,
            aggs,
            window,
            emit,
            late_sink,
            schema,
        } => {
            let input_schema = input.schema();
            let below_window = keys_below_window(input, group, window);
            let slices = below_window.as_ref().and_then(|(chain, _, _)| {
                hop_slices(chain, group, window, aggs, emit, late_sink.is_some())
            });
            let stream = match &below_window {
                Some((chain, keys, _)) => build_window_chain(
                    scope,
                    chain,
                    keys.clone(),
                    slices.map(|(_, slide)| slide),
                    ctx,
                    reuse,
                ),
                None => ctx.exchange(build(scope, input, ctx, reuse), group.clone(), "Aggregate"),
            };
            let state = AggregateState::try_new(
                group.clone(),
                aggs.clone(),
                window.clone(),
                *emit,
                late_sink.as_ref().map(|l| l.column),
                schema.clone(),
                &input_schema,
            )
            .map(|mut s| {
                if input.is_append_only() {
                    s.assume_append_only_input();
                }
                if let Some((_, _, positions)) = below_window {
                    s.partition_by(positions);
                }
                s
            })
            .and_then(|mut s| {
                if let Some((size, slide)) = slices {
                    s.slice(size, slide, &input_schema)?;
                } else if let Some((time, kind)) = window_copies(input) {
                    s.windows_as_copies(time, kind);
                }
                Ok(s)
            });
            let late = late_sink.as_ref().map(|l| l.table.clone());
            aggregate(stream, state, *emit, late, ctx)
        }
        StreamNode::Join {
            left,
            right,
            kind,
            left_keys,
            right_keys,
            filter,
            bound,
            schema,
        } => {
            let state = crate::join::JoinState::try_new(
                *kind,
                left_keys.clone(),
                right_keys.clone(),
                filter.clone(),
                *bound,
                [left.schema(), right.schema()],
                schema.clone(),
                ctx.state_ttl,
            )
            .map(|s| s.with_append_only([left.is_append_only(), right.is_append_only()]));
            let l = ctx.exchange(build(scope, left, ctx, reuse), left_keys.clone(), "Join");
            let r = ctx.exchange(build(scope, right, ctx, reuse), right_keys.clone(), "Join");
            let delay = bound.map_or(0, |b| b.output_delay);
            let proctime = bound.is_some_and(|b| b.processing_time);
            crate::join_operator::join(l, r, state, delay, proctime, ctx)
        }
        StreamNode::Rank {
            input,
            partition,
            order,
            limit,
            mode,
            schema,
        } => {
            let state = crate::rank::RankState::try_new(
                partition.clone(),
                order.clone(),
                *limit,
                *mode,
                &input.schema(),
                schema.clone(),
                input.is_append_only(),
            );
            let stream = ctx.exchange(build(scope, input, ctx, reuse), partition.clone(), "Rank");
            crate::keyed::keyed(stream, state, ctx)
        }
        StreamNode::TemporalJoin {
            left,
            right,
            kind,
            left_keys,
            right_keys,
            left_time,
            right_time,
            filter,
            schema,
        } => {
            let state = crate::temporal::TemporalState::try_new(
                *kind,
                left_keys.clone(),
                right_keys.clone(),
                [*left_time, *right_time],
                filter.clone(),
                [left.schema(), right.schema()],
                schema.clone(),
            );
            let l = ctx.exchange(
                build(scope, left, ctx, reuse),
                left_keys.clone(),
                "TemporalJoin",
            );
            let r = ctx.exchange(
                build(scope, right, ctx, reuse),
                right_keys.clone(),
                "TemporalJoin",
            );
            crate::join_operator::join(l, r, state, 0, false, ctx)
        }
        StreamNode::LookupJoin {
            input,
            dim,
            kind,
            left_keys,
            right_keys,
            filter,
            reload_ms,
            schema,
        } => {
            let (kind, dim, input_schema) = (*kind, (**dim).clone(), input.schema());
            let (lk, rk, filter, schema) = (
                left_keys.clone(),
                right_keys.clone(),
                filter.clone(),
                schema.clone(),
            );
            let load = move || -> Result<crate::join::JoinState> {
                let mut state = crate::join::JoinState::try_new(
                    kind,
                    lk.clone(),
                    rk.clone(),
                    filter.clone(),
                    None,
                    [input_schema.clone(), dim.schema()],
                    schema.clone(),
                    None,
                )?
                .for_lookup();
                for b in load_table(&dim)? {
                    state.apply(1, &b)?;
                }
                Ok(state)
            };
            let reload = reload_ms.map(|ms| Duration::from_millis(ms as u64));
            let mut state = None;
            let mut loaded = Instant::now();
            map_batches(
                build(scope, input, ctx, reuse),
                "LookupJoin",
                ctx.metrics.clone(),
                move |b| {
                    if state.is_none() || reload.is_some_and(|r| loaded.elapsed() >= r) {
                        state = Some(load()?);
                        loaded = Instant::now();
                    }
                    Ok(state.as_mut().expect("loaded").apply(0, b)?.changes)
                },
            )
        }
        StreamNode::Over {
            input,
            partition,
            order,
            aggs,
            frame,
            schema,
        } => {
            let stream = ctx.exchange(build(scope, input, ctx, reuse), partition.clone(), "Over");
            match order {
                sluice_sql::OverOrder::EventTime(time) => {
                    let state = crate::over::OverState::try_new(
                        partition.clone(),
                        *time,
                        aggs.clone(),
                        *frame,
                        input.schema(),
                        schema.clone(),
                    );
                    crate::keyed::keyed(stream, state, ctx)
                }
                sluice_sql::OverOrder::Updating(keys) => {
                    let state = crate::over::UpdatingOverState::try_new(
                        partition.clone(),
                        keys.clone(),
                        aggs.clone(),
                        *frame,
                        input.schema(),
                        schema.clone(),
                    );
                    crate::keyed::keyed(stream, state, ctx)
                }
            }
        }
    }
}

/// For a window aggregation over assigned windows (a window TVF), when its group keys other
/// than the window bounds are columns that pass unchanged through the projections and filters
/// down to the window assignment: the nodes from the aggregation's input down to the window
/// assignment, those keys as columns of the assignment's input, and their positions among the
/// group keys. Rows can then be partitioned before the windows are assigned, as Flink does: a
/// HOP window copies each row into size/slide windows, and those copies need not cross workers.
#[allow(clippy::type_complexity)]
/// Below a window aggregation, HOP or CUMULATE windows assigned as copies of each row: the
/// windows, and the column of the rows' time in the aggregation's input when it passes through
/// the projections unchanged (HOP needs it to tell a row's last window). `None` for other
/// windows.
fn window_copies(node: &StreamNode) -> Option<(Option<usize>, sluice_sql::WindowKind)> {
    use datafusion_physical_expr::expressions::Column;
    let column = |e: &sluice_sql::PhysExpr| e.downcast_ref::<Column>().map(|c| c.index());
    match node {
        StreamNode::WindowAssign { time, kind, .. } => match kind {
            sluice_sql::WindowKind::Hop { .. } | sluice_sql::WindowKind::Cumulate { .. } => {
                Some((column(time), *kind))
            }
            _ => None,
        },
        StreamNode::Filter { input, .. } => window_copies(input),
        StreamNode::Project { input, exprs, .. } => {
            let (time, kind) = window_copies(input)?;
            let at = time.and_then(|t| exprs.iter().position(|e| column(e) == Some(t)));
            Some((at, kind))
        }
        _ => None,
    }
}

fn keys_below_window<'a>(
    input: &'a StreamNode,
    group: &[sluice_sql::PhysExpr],
    window: &sluice_sql::AggWindow,
) -> Option<(Vec<&'a StreamNode>, Vec<sluice_sql::PhysExpr>, Vec<usize>)> {
    use datafusion_physical_expr::expressions::Column;
    let sluice_sql::AggWindow::Assigned {
        start_key, end_key, ..
    } = window
    else {
        return None;
    };
    let positions: Vec<usize> = (0..group.len())
        .filter(|i| i != start_key && i != end_key)
        .collect();
    let column = |e: &sluice_sql::PhysExpr| e.downcast_ref::<Column>().map(|c| c.index());
    let mut columns: Vec<usize> = positions
        .iter()
        .map(|&i| column(&group[i]))
        .collect::<Option<_>>()?;
    if columns.is_empty() {
        return None;
    }
    let mut chain = vec![];
    let mut node = input;
    loop {
        chain.push(node);
        match node {
            StreamNode::Project { input, exprs, .. } => {
                columns = columns
                    .iter()
                    .map(|&c| exprs.get(c).and_then(column))
                    .collect::<Option<_>>()?;
                node = input;
            }
            StreamNode::Filter { input, .. } => node = input,
            StreamNode::WindowAssign { input: below, .. } => {
                // The assignment appends the window columns after its input's.
                let schema = below.schema();
                if columns.iter().any(|c| *c >= schema.fields().len()) {
                    return None;
                }
                let keys = columns
                    .iter()
                    .map(|&c| {
                        Arc::new(Column::new(schema.field(c).name(), c)) as sluice_sql::PhysExpr
                    })
                    .collect();
                return Some((chain, keys, positions));
            }
            _ => return None,
        }
    }
}

/// The size and slide of a HOP window aggregation that can be aggregated in panes (see
/// `aggregate::Slicing`): the window assignment at the bottom of `chain` (from
/// [`keys_below_window`]) is a HOP whose size is a multiple of its slide; its bounds reach the
/// aggregation unchanged as the window keys and nothing else reads them (a pane's bounds are
/// not its windows'); results are final when the window closes (no early firing, lateness or
/// late-data sink); and every aggregate merges (no DISTINCT but COUNT's).
fn hop_slices(
    chain: &[&StreamNode],
    group: &[sluice_sql::PhysExpr],
    window: &sluice_sql::AggWindow,
    aggs: &[sluice_sql::AggCall],
    emit: &sluice_sql::EmitPolicy,
    late_sink: bool,
) -> Option<(i64, i64)> {
    use datafusion_physical_expr::expressions::Column;
    let sluice_sql::AggWindow::Assigned {
        start_key, end_key, ..
    } = window
    else {
        return None;
    };
    if late_sink || emit.is_updating() || emit.processing_time {
        return None;
    }
    if aggs
        .iter()
        .any(|a| a.distinct && a.func != sluice_sql::AggFunc::Count)
    {
        return None;
    }
    let (
        StreamNode::WindowAssign {
            input: below,
            kind: sluice_sql::WindowKind::Hop { size, slide },
            ..
        },
        above,
    ) = chain.split_last()?
    else {
        return None;
    };
    if *slide <= 0 || *size <= *slide || size % slide != 0 {
        return None;
    }
    // Which column holds which window column (0 start, 1 end, 2 time), going up the chain.
    let n = below.schema().fields().len();
    let mut bound: Vec<Option<usize>> = (0..n + 3).map(|c| c.checked_sub(n)).collect();
    let reads_bounds = |e: &sluice_sql::PhysExpr, bound: &[Option<usize>]| {
        datafusion_physical_expr::utils::collect_columns(e)
            .iter()
            .any(|c| bound.get(c.index()).copied().flatten().is_some())
    };
    let column = |e: &sluice_sql::PhysExpr| e.downcast_ref::<Column>().map(|c| c.index());
    for node in above.iter().rev() {
        match node {
            StreamNode::Filter { predicate, .. } if reads_bounds(predicate, &bound) => return None,
            StreamNode::Filter { .. } => {}
            StreamNode::Project { exprs, .. } => {
                let mut next = Vec::with_capacity(exprs.len());
                for e in exprs {
                    match column(e) {
                        Some(c) => next.push(bound.get(c).copied().flatten()),
                        None if reads_bounds(e, &bound) => return None,
                        None => next.push(None),
                    }
                }
                bound = next;
            }
            _ => return None,
        }
    }
    let key_is = |i: usize, which: usize| {
        column(&group[i]).is_some_and(|c| bound.get(c).copied().flatten() == Some(which))
    };
    let others_read_bounds = group
        .iter()
        .enumerate()
        .filter(|(i, _)| i != start_key && i != end_key)
        .map(|(_, g)| g)
        .chain(
            aggs.iter()
                .flat_map(|a| a.arg.iter().chain(a.filter.iter())),
        )
        .any(|e| reads_bounds(e, &bound));
    (key_is(*start_key, 0) && key_is(*end_key, 1) && !others_read_bounds).then_some((*size, *slide))
}

/// Builds the chain [`keys_below_window`] found (projections and filters over a window
/// assignment, top first), with the rows partitioned by `keys` before the assignment. Not
/// shared with other plans: elsewhere the same nodes are built without the exchange. With
/// `pane`, the HOP assignment gives each row its pane, a tumbling window of that length
/// (see [`hop_slices`]).
fn build_window_chain<'scope>(
    scope: DataflowScope<'scope>,
    chain: &[&StreamNode],
    keys: Vec<sluice_sql::PhysExpr>,
    pane: Option<i64>,
    ctx: &BuildContext,
    reuse: &Reuse<'scope>,
) -> EventStream<'scope> {
    let Some((
        StreamNode::WindowAssign {
            input,
            time,
            kind,
            schema,
        },
        above,
    )) = chain.split_last()
    else {
        unreachable!("a window chain ends at the window assignment")
    };
    let (time, schema) = (time.clone(), schema.clone());
    let metrics = ctx.metrics.clone();
    let kind = match pane {
        Some(size) => sluice_sql::WindowKind::Tumble { size, offset: 0 },
        None => *kind,
    };
    let mut stream = map_batches(
        ctx.exchange(build(scope, input, ctx, reuse), keys, "WindowAssign"),
        "WindowAssign",
        ctx.metrics.clone(),
        move |b| assign_windows(b, &time, kind, &schema, &metrics.null_time_rows_dropped).map(Some),
    );
    for node in above.iter().rev() {
        stream = match node {
            StreamNode::Project { exprs, schema, .. } => {
                let (exprs, schema) = (exprs.clone(), schema.clone());
                map_batches(stream, "Project", ctx.metrics.clone(), move |b| {
                    project(b, &exprs, &schema).map(Some)
                })
            }
            StreamNode::Filter { predicate, .. } => {
                let predicate = predicate.clone();
                map_batches(stream, "Filter", ctx.metrics.clone(), move |b| {
                    filter(b, &predicate).map(Some)
                })
            }
            _ => unreachable!("a window chain holds projections and filters"),
        };
    }
    stream
}

/// Reads a lookup join's table whole, as it is now.
fn load_table(node: &StreamNode) -> Result<Vec<ChangeBatch>> {
    let StreamNode::Scan {
        table,
        projection,
        schema,
        ..
    } = node
    else {
        return Err(Error::Runtime(
            "internal: a lookup join reads a table scan".into(),
        ));
    };
    let mut reader = open_source(&spec(table), 0, 1)?;
    let mut prepare = table_prepare(table.clone(), projection.clone(), schema.clone(), false);
    let mut out = vec![];
    loop {
        match reader.poll(DEFAULT_BATCH_ROWS)? {
            sluice_connectors::Poll::Batch { batch, .. } => out.push(prepare(batch)?.0),
            sluice_connectors::Poll::SplitDone { .. } => {}
            sluice_connectors::Poll::Idle | sluice_connectors::Poll::Finished => return Ok(out),
        }
    }
}

/// Emits the minimum watermark over a union's inputs.
fn merge_watermarks<'scope>(
    stream: EventStream<'scope>,
    inputs: usize,
    ctx: &BuildContext,
) -> EventStream<'scope> {
    let (index, peers) = (ctx.index, ctx.peers);
    stream.unary::<EventBuilder, _, _, _>(Pipeline, "UnionWatermark", move |_cap, _info| {
        let mut tracker = WatermarkTracker::new(inputs);
        move |input, output| {
            input.for_each(|cap, data| match data {
                // A source's word for another worker (`SourceReader::silent_workers`): that
                // worker's own union reports it; here only this worker's inputs count.
                Event::Watermark { from, .. } if *from as usize % peers != index => {}
                Event::Watermark { from, ts, idle, .. } => {
                    if let Some((wm, idle)) = tracker.receive(*from, *ts, *idle).forward {
                        let mut event = Event::progress(index, wm, idle, peers);
                        output.session(&cap).give_container(&mut event);
                    }
                }
                _ => output.session(&cap).give_container(data),
            });
        }
    })
}

/// How often processing-time windows check the clock.
const PROCTIME_TICK: Duration = Duration::from_millis(50);
/// How long after its end a processing-time window still takes rows (their way from where
/// `PROCTIME()` stamped them to the window).
const PROCTIME_GRACE: Duration = Duration::from_millis(200);

/// One worker's aggregation: its state, its watermark tracking and its late-row writer.
struct AggregateTask {
    state: AggregateState,
    tracker: WatermarkTracker,
    late_writer: Option<(
        Box<dyn sluice_connectors::SinkWriter>,
        Arc<std::sync::atomic::AtomicU64>,
        SchemaRef,
    )>,
    metrics: Arc<JobMetrics>,
    index: usize,
    peers: usize,
    /// Processing-time windows: only the end of input's watermark closes windows here.
    processing_time: bool,
    /// Copies of the state for full snapshots come back here from the writer thread once
    /// written, and the next copy reuses their buffers.
    frozen: (
        std::sync::mpsc::Sender<crate::aggregate_snapshot::FrozenState>,
        std::sync::mpsc::Receiver<crate::aggregate_snapshot::FrozenState>,
    ),
}

impl AggregateTask {
    fn handle<C: CapabilityTrait<Epoch>>(
        &mut self,
        cap: &C,
        data: &mut Event,
        output: &mut OutputBuilderSession<'_, Epoch, EventBuilder>,
    ) {
        let metrics = self.metrics.clone();
        match data {
            Event::Data(d) => match self.state.apply(&d.batch) {
                Ok(outcome) => {
                    AggregateState::count_late(&metrics, outcome.late_rows);
                    if outcome.null_time_rows > 0 {
                        metrics
                            .null_time_rows_dropped
                            .fetch_add(outcome.null_time_rows, Ordering::Relaxed);
                    }
                    if let (Some(rows), Some((w, counter, schema))) =
                        (outcome.late, self.late_writer.as_mut())
                    {
                        counter.fetch_add(rows.num_rows() as u64, Ordering::Relaxed);
                        let rows = arrow::record_batch::RecordBatch::try_new(
                            schema.clone(),
                            rows.columns().to_vec(),
                        );
                        if let Err(e) = rows
                            .map_err(Error::from)
                            .and_then(|r| w.write(&ChangeBatch::inserts(r)))
                        {
                            metrics.fail(e);
                        }
                    }
                    if let Some(out) = outcome.output {
                        output.session(cap).give_container(&mut Event::data(out));
                    }
                }
                Err(e) => metrics.fail(e),
            },
            Event::Watermark {
                from, ts, idle, at, ..
            } => {
                let progress = self.tracker.receive(*from, *ts, *idle);
                let closes = |wm: i64| !self.processing_time || wm == MAX_WATERMARK;
                if let Some(wm) = progress.advanced.filter(|wm| closes(*wm)) {
                    match self.state.advance_watermark(wm) {
                        Ok(Some(out)) => {
                            if wm != MAX_WATERMARK && !self.processing_time {
                                let took = (sluice_common::time::now_millis() - *at).max(0);
                                metrics
                                    .window_fire_ms
                                    .lock()
                                    .expect("metrics")
                                    .push(took as u32);
                            }
                            output.session(cap).give_container(&mut Event::data(out))
                        }
                        Ok(None) => {}
                        Err(e) => metrics.fail(e),
                    }
                }
                if let Some((wm, idle)) = progress.forward {
                    let mut event = Event::progress(self.index, wm, idle, self.peers);
                    output.session(cap).give_container(&mut event);
                }
            }
            Event::Empty => {}
        }
    }

    /// Writes this worker's state into checkpoint `epoch`, as Arrow IPC (in the background):
    /// only what changed since an earlier snapshot in a committed checkpoint when that is worth
    /// it (`delta_base`), else all of it.
    fn snapshot(&mut self, ck: &CheckpointContext, epoch: Epoch, id: &str) -> Result<()> {
        let started = Instant::now();
        let stem = CheckpointContext::file_name(Contribution::State, id, self.index);
        let base = self
            .state
            .delta_base(|e| ck.store.is_committed(e).unwrap_or(false));
        match base {
            Some(b) => {
                let batch = self.state.snapshot_delta(b, epoch)?;
                ck.writer.write_batch(epoch, format!("{stem}+{b}"), batch);
            }
            None => {
                // A full snapshot: copied here, encoded on the writer thread, and the copy's
                // buffers come back for the next one.
                let spare = self.frozen.1.try_iter().last();
                match self.state.freeze(epoch, spare)? {
                    Some(frozen) => {
                        let back = self.frozen.0.clone();
                        let build = Box::new(move || {
                            let batch = frozen.encode();
                            let _ = back.send(frozen);
                            batch
                        });
                        ck.writer.write_deferred(epoch, stem, build);
                    }
                    None => ck
                        .writer
                        .write_batch(epoch, stem, self.state.snapshot_full(epoch)?),
                }
            }
        }
        self.metrics.record_snapshot(epoch, started.elapsed());
        Ok(())
    }
}

fn aggregate<'scope>(
    stream: EventStream<'scope>,
    state: Result<AggregateState>,
    emit: sluice_sql::EmitPolicy,
    late_table: Option<Arc<TableDef>>,
    ctx: &BuildContext,
) -> EventStream<'scope> {
    let (index, peers, metrics) = (ctx.index, ctx.peers, ctx.metrics.clone());
    let checkpoint = ctx.checkpoint.clone();
    let seal_at_end = checkpoint.is_some();
    let id = checkpoint.as_ref().map(|c| c.register(Contribution::State));
    // 'late-data.sink': this operator writes the rows it drops as late itself, in the same
    // two-phase commit as the job's sinks.
    let late_writer = match &late_table {
        None => None,
        Some(t) => match open_sink(&spec(t), index, peers).and_then(|mut w| {
            if let Some(c) = &checkpoint {
                w.begin_transactions(c.restore.as_ref().map(|m| m.epoch), index, peers)?;
            }
            Ok(w)
        }) {
            Ok(w) => Some((w, metrics.write_counter(&t.name), t.physical_schema.clone())),
            Err(e) => {
                metrics.fail(e);
                None
            }
        },
    };
    let state = state.and_then(|mut s| {
        if let (Some(c), Some(id)) = (&checkpoint, &id) {
            s.track_changes();
            if c.restore.is_some() {
                let started = Instant::now();
                let chains = c.restored_chain_batches(id)?;
                s.restore_chains(&chains, CheckpointContext::owner(index, peers))?;
                eprintln!(
                    "worker {index}: restored {} groups of aggregation {id} in {} ms",
                    s.groups(),
                    started.elapsed().as_millis()
                );
            }
        }
        Ok(s)
    });
    let mut task = match state {
        Ok(state) => Some(AggregateTask {
            state,
            tracker: WatermarkTracker::new(peers),
            late_writer,
            metrics: metrics.clone(),
            index,
            peers,
            processing_time: emit.processing_time,
            frozen: std::sync::mpsc::channel(),
        }),
        Err(e) => {
            metrics.fail(e);
            None
        }
    };
    let scope = stream.scope();
    let early_fire = emit.early_fire_ms.map(Duration::from_millis);
    // Processing-time windows close by the wall clock, checked this often; a row may take up to
    // PROCTIME_GRACE from being stamped to reaching this operator.
    let proctime_tick = emit.processing_time.then_some(PROCTIME_TICK);
    let timer = match (early_fire, proctime_tick) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    stream.unary_frontier::<EventBuilder, _, _, _>(Pipeline, "Aggregate", move |initial, info| {
        let activator = scope.activator_for(info.address.clone());
        let held = metrics.in_flight_meter(&format!("Aggregate on worker {index}"));
        let mut align = checkpoint
            .as_ref()
            .map(|c| Alignment::new(c, initial).metered(held));
        // Early firing emits without an input message, so it holds a capability, kept at the
        // input frontier so that it never holds the job back.
        let mut held: Option<timely::dataflow::operators::Capability<Epoch>> = None;
        let mut next_fire = Instant::now();
        let mut reported = false;
        let mut late_transactions = crate::checkpointing::SinkTransactions::default();
        let operator: std::rc::Rc<str> = "Aggregate".into();
        let mut gauge = crate::metrics::StateGauge::new("Aggregate", index);
        move |(input, frontier), output| {
            let _running = crate::panics::in_operator(&operator);
            if let Some(task) = task.as_ref() {
                gauge.report(&metrics, || {
                    (task.state.size_bytes() as u64, task.state.groups() as u64)
                });
            }
            input.for_each(|cap, data| {
                let Some(task) = task.as_mut() else { return };
                if metrics.failed() {
                    return;
                }
                if timer.is_some() && held.is_none() {
                    held = cap.retain_least(0);
                }
                if align
                    .as_mut()
                    .is_some_and(|al| al.hold(&cap, || std::mem::take(data)))
                {
                    return;
                }
                task.handle(&cap, data, output);
            });
            if let (Some(al), Some(task), Some(ck), Some(id)) = (
                align.as_mut(),
                task.as_mut(),
                checkpoint.as_ref(),
                id.as_ref(),
            ) {
                while let Some(epoch) = al.due(&[frontier]) {
                    if let Err(e) = task.snapshot(ck, epoch, id) {
                        metrics.checkpoint_failed(epoch, e);
                    }
                    if let Some((w, _, _)) = task.late_writer.as_mut() {
                        if let Err(e) = late_transactions.seal(w.as_mut(), epoch) {
                            metrics.fail(e);
                        }
                    }
                    for (c, mut event) in al.advance() {
                        task.handle(&c, &mut event, output);
                    }
                }
                for (c, mut event) in al.finish(&[frontier]) {
                    task.handle(&c, &mut event, output);
                }
            }
            if let (Some(ck), Some(task)) = (checkpoint.as_ref(), task.as_mut()) {
                if let Some((w, _, _)) = task.late_writer.as_mut() {
                    match late_transactions.publish(w.as_mut(), &ck.store) {
                        Ok(true) => activator.activate_after(Duration::from_millis(20)),
                        Ok(false) => {}
                        Err(e) => metrics.fail(e),
                    }
                }
            }
            if frontier.frontier().is_empty() && !reported {
                reported = true;
                if let Some(task) = task.as_mut() {
                    if let Some((mut w, _, _)) = task.late_writer.take() {
                        let done = crate::checkpointing::SinkTransactions::close(
                            w.as_mut(),
                            &metrics,
                            seal_at_end,
                        );
                        if let Err(e) = done {
                            metrics.fail(e);
                        }
                    }
                    metrics
                        .state_bytes
                        .fetch_add(task.state.size_bytes() as u64, Ordering::Relaxed);
                    metrics
                        .state_groups
                        .fetch_add(task.state.groups() as u64, Ordering::Relaxed);
                }
            }
            let Some(delay) = timer else { return };
            match frontier.frontier().first() {
                None => held = None,
                Some(t) => {
                    if let Some(h) = held.as_mut() {
                        if h.time() < t {
                            h.downgrade(t);
                        }
                    }
                }
            }
            if let (Some(h), Some(task)) = (held.as_ref(), task.as_mut()) {
                if Instant::now() >= next_fire {
                    if emit.processing_time {
                        let now = sluice_common::time::now_millis();
                        let wm = now - PROCTIME_GRACE.as_millis() as i64;
                        match task.state.advance_watermark(wm) {
                            Ok(Some(out)) => {
                                output.session(h).give_container(&mut Event::data(out))
                            }
                            Ok(None) => {}
                            Err(e) => metrics.fail(e),
                        }
                    }
                    if early_fire.is_some() {
                        match task.state.early_fire() {
                            Ok(Some(out)) => {
                                output.session(h).give_container(&mut Event::data(out))
                            }
                            Ok(None) => {}
                            Err(e) => metrics.fail(e),
                        }
                    }
                    next_fire = Instant::now() + delay;
                }
                activator.activate_after(next_fire.saturating_duration_since(Instant::now()));
            }
        }
    })
}

fn table_sink<'scope>(
    stream: EventStream<'scope>,
    table: &TableDef,
    instance: usize,
    ctx: &BuildContext,
) -> EventStream<'scope> {
    let (metrics, counter) = (ctx.metrics.clone(), ctx.metrics.write_counter(&table.name));
    let checkpoint = ctx.checkpoint.clone();
    let seal_at_end = checkpoint.is_some();
    let (index, peers) = (ctx.index, ctx.peers);
    let spec = ConnectorSpec {
        sink_instance: instance,
        ..spec(table)
    };
    let writer = open_sink(&spec, index, peers).and_then(|mut w| {
        if let Some(c) = &checkpoint {
            // Two-phase commit: settle what earlier runs left, against the restored checkpoint.
            w.begin_transactions(c.restore.as_ref().map(|m| m.epoch), index, peers)?;
        }
        Ok(w)
    });
    let mut writer = match writer {
        Ok(w) => Some(w),
        Err(e) => {
            metrics.fail(e);
            None
        }
    };
    let schema = table.physical_schema.clone();
    let table_name = table.name.clone();
    let scope = stream.scope();
    let write = move |writer: &mut Option<Box<dyn sluice_connectors::SinkWriter>>,
                      data: &mut Event| {
        if let (Event::Data(d), Some(w)) = (data, writer.as_mut()) {
            counter.fetch_add(d.batch.num_rows() as u64, Ordering::Relaxed);
            // Columns keep the table's declared names and nullability.
            let result = d
                .batch
                .with_columns(schema.clone(), d.batch.data.columns().to_vec())
                .map_err(Error::from)
                .and_then(|b| w.write(&b));
            if let Err(e) = result {
                metrics.fail(e);
            }
        }
    };
    let metrics = ctx.metrics.clone();
    stream.unary_frontier::<EventBuilder, _, _, _>(
        Pipeline,
        &format!("Sink({})", table.name),
        move |initial, info| {
            let activator = scope.activator_for(info.address.clone());
            let operator: std::rc::Rc<str> = format!("Sink({table_name})").into();
            let held = metrics.in_flight_meter(&format!("{operator} on worker {index}"));
            let mut align = checkpoint
                .as_ref()
                .map(|c| Alignment::new(c, initial).metered(held));
            let mut transactions = crate::checkpointing::SinkTransactions::default();
            move |(input, frontier), _output| {
                let _running = crate::panics::in_operator(&operator);
                input.for_each(|cap, data| {
                    if align
                        .as_mut()
                        .is_some_and(|al| al.hold(&cap, || std::mem::take(data)))
                    {
                        return;
                    }
                    write(&mut writer, data);
                });
                if let Some(al) = align.as_mut() {
                    while let Some(epoch) = al.due(&[frontier]) {
                        if let Some(w) = writer.as_mut() {
                            if let Err(e) = transactions.seal(w.as_mut(), epoch) {
                                metrics.fail(e);
                            }
                        }
                        for (_, mut event) in al.advance() {
                            write(&mut writer, &mut event);
                        }
                    }
                    for (_, mut event) in al.finish(&[frontier]) {
                        write(&mut writer, &mut event);
                    }
                }
                // Publish what checkpoints worker 0 has committed since.
                if let (Some(ck), Some(w)) = (checkpoint.as_ref(), writer.as_mut()) {
                    match transactions.publish(w.as_mut(), &ck.store) {
                        Ok(true) => activator.activate_after(Duration::from_millis(20)),
                        Ok(false) => {}
                        Err(e) => metrics.fail(e),
                    }
                }
                if frontier.is_empty() {
                    if let Some(mut w) = writer.take() {
                        let done = crate::checkpointing::SinkTransactions::close(
                            w.as_mut(),
                            &metrics,
                            seal_at_end,
                        );
                        if let Err(e) = done {
                            metrics.fail(e);
                        }
                    }
                }
            }
        },
    )
}

fn select_sink<'scope>(
    stream: EventStream<'scope>,
    query: usize,
    out: Option<Arc<dyn SelectOutput>>,
    ctx: &BuildContext,
) -> EventStream<'scope> {
    // Everything goes to worker 0 so the printed changelog is one ordered stream.
    let stream = ctx.exchange(stream, vec![], "SelectSink");
    let counter = ctx.metrics.write_counter(&format!("select #{}", query + 1));
    let out = Mutex::new(out);
    stream.unary::<EventBuilder, _, _, _>(Pipeline, "SelectOutput", move |_cap, _info| {
        move |input, _output| {
            input.for_each(|_cap, data| {
                if let Event::Data(d) = data {
                    counter.fetch_add(d.batch.num_rows() as u64, Ordering::Relaxed);
                    if let Some(o) = out.lock().expect("select output").as_ref() {
                        o.emit(query, &d.batch);
                    }
                }
            });
        }
    })
}
