//! Runs a [`JobPlan`]: prepares checkpoints, starts the workers (each builds its dataflow with
//! [`crate::build`]), watches memory and signals, and ends the job (`finish`) with a summary.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::datatypes::SchemaRef;
use sluice_common::{ChangeBatch, Error, Result};
use sluice_connectors::{open_sink, sink_accepts_updates};
use sluice_sql::{JobPlan, SinkTarget, StreamNode, TableDef};
use timely::dataflow::operators::Probe;
use timely::dataflow::ProbeHandle;

use crate::checkpoint::CheckpointContext;
use crate::runtime::control::JobControl;
use crate::runtime::metrics::JobMetrics;
use crate::runtime::Epoch;
use sluice_sql::config::JobConfig;

mod checkpoints;
mod cluster;
pub(crate) mod finish;
mod memory;

use crate::build::*;
use crate::operator::sink::{select_sink, table_sink};
use checkpoints::*;
use cluster::*;
use finish::*;
pub use memory::resident_memory;
use memory::*;

/// Rows per source batch unless `'table.exec.mini-batch.size'` says otherwise.
pub(crate) use sluice_sql::config::DEFAULT_BATCH_ROWS;

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
    /// Stops the job: `cancel()` for a graceful stop (a final checkpoint when checkpointing);
    /// it also carries the first error.
    pub control: Arc<JobControl>,
    /// Ignore existing checkpoints and start from the beginning of the input.
    pub fresh: bool,
    /// Run the sources one after another, in plan order (for tests that show a changelog step
    /// by step; with one worker the order of a join's inputs is then deterministic).
    pub sequential_sources: bool,
    /// Measure the time each operator is scheduled ([`JobMetrics::busy`]), from timely's
    /// event log (which costs a little on every scheduling).
    pub operator_busy: bool,
    /// Count the rows each plan node produces ([`JobMetrics::node_rows`]), as `EXPLAIN
    /// ANALYZE` does, while the job runs.
    pub count_rows: bool,
}

impl Default for JobOptions {
    fn default() -> Self {
        JobOptions {
            workers: 1,
            process: 0,
            hosts: None,
            select_output: None,
            metrics: JobMetrics::new(),
            control: JobControl::new(),
            fresh: false,
            sequential_sources: false,
            operator_busy: false,
            count_rows: false,
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

/// The physical columns a scan needs: those it keeps, and those the table's computed columns
/// and watermark are computed from. `None` when that is all of them.
pub(crate) fn read_columns(
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
    JobConfig::parse(&plan.settings)?;
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
            open_sink(&sink_spec(&t), 0, 1)?;
        }
        if let SinkTarget::Table(t) = &p.sink {
            let s = sink_spec(t);
            // Opening checks the options; sinks create nothing until written to, except the
            // filesystem sink's directory.
            open_sink(&s, 0, 1)?;
            if !p.query.is_append_only() && !sink_accepts_updates(&s) && t.connector() == "jdbc" {
                return Err(Error::plan(format!(
                    "statement at line {}: INSERT INTO {}: the query produces an updating result (it retracts rows), and \
                     connector 'jdbc' writes one only by key: declare the table's PRIMARY KEY (...) NOT ENFORCED, \
                     the columns of a primary key or unique constraint of the database table (each key's latest \
                     row is upserted, and a retracted key deleted)",
                    p.line, t.name
                )));
            }
            if !p.query.is_append_only() && !sink_accepts_updates(&s) {
                return Err(Error::plan(format!(
                    "statement at line {}: INSERT INTO {}: the query produces an updating result (it retracts rows, e.g. a GROUP BY \
                     without a window), but connector '{}'{} only accepts inserts; aggregate over a window, or write \
                     to a sink that takes updates (filesystem with 'format' = 'debezium-json', redis with 'set', \
                     'hset' or 'zadd')",
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
pub(crate) fn idle_timeout(table: &TableDef) -> Result<Option<Duration>> {
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
pub(crate) fn collect_late_sinks(node: &StreamNode, out: &mut Vec<Arc<TableDef>>) {
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

pub(crate) fn collect_scans(node: &StreamNode, out: &mut Vec<Arc<TableDef>>) {
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

/// Runs a job until its bounded inputs are exhausted (or forever, for unbounded ones).
pub fn run(plan: JobPlan, options: JobOptions) -> Result<JobSummary> {
    validate(&plan)?;
    let started = Instant::now();
    let metrics = options.metrics.clone();
    let control = options.control.clone();
    let plan = Arc::new(plan);
    let final_plan = plan.clone();
    let config = cluster_config(
        options.workers.max(1),
        options.process,
        options.hosts.clone(),
    );
    let job_config = JobConfig::parse(&plan.settings)?;
    let (batch_rows, state_ttl) = (job_config.batch_rows, job_config.state_ttl);
    let select_output = options.select_output.clone();
    let sequential_sources = options.sequential_sources;
    let epoch_length = job_config.epoch_length;
    let fetch_threads =
        options.workers.max(1) < std::thread::available_parallelism().map_or(1, |n| n.get());
    if let Some(out) = &select_output {
        for p in &plan.pipelines {
            if let (SinkTarget::Select { index }, false) = (&p.sink, p.analyze) {
                out.begin(*index, p.query.schema());
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
            .is_some_and(|m| m.epoch == crate::checkpoint::FINISHED)
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
            tracing::info!(
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
        crate::checkpoint::CheckpointWriter::start(
            c.store.clone(),
            control.clone(),
            c.config.compression,
        )
    });
    let (writer, writer_thread) = match writer {
        Some((w, t)) => (Some(w), Some(t)),
        None => (None, None),
    };
    let worker_metrics = metrics.clone();
    let worker_control = control.clone();
    let workers_per_process = options.workers.max(1);
    crate::runtime::panics::install_hook();
    let watching = MemoryWatch::start(
        memory_limit(job_config.memory_limit),
        metrics.clone(),
        control.clone(),
    );
    let connected = Arc::new(std::sync::atomic::AtomicBool::new(false));
    if let Some(hosts) = &options.hosts {
        check_hosts(hosts, connected.clone())?;
    }
    let operator_busy = options.operator_busy;
    let count_rows = options.count_rows;
    let guards = timely::execute(config, move |worker| {
        // A panic fails the job with its message: the other workers stop at their next step
        // instead of waiting for this one forever.
        let index = worker.index();
        crate::runtime::panics::set_worker(index);
        if operator_busy {
            track_busy(worker, worker_metrics.clone());
        }
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
                ended: c.ended.clone(),
                control: worker_control.clone(),
            })
        });
        let ctx = BuildContext {
            index,
            peers,
            metrics: worker_metrics.clone(),
            control: worker_control.clone(),
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
            count_rows: count_rows || plan.pipelines.iter().any(|p| p.analyze),
            building: Default::default(),
            named: Default::default(),
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
                        // EXPLAIN ANALYZE SELECT: the rows are counted, not printed.
                        let out = select_output.clone().filter(|_| !p.analyze);
                        select_sink(stream, *q, out, &ctx).probe_with(&probe)
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
        while !probe.done() && !worker_control.failed() {
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
                if !worker_control.take_checkpoint_failure(*epoch) {
                    return true;
                }
                failed_in_a_row += 1;
                if failed_in_a_row > c.config.tolerable_failures {
                    worker_control.fail(Error::Runtime(format!(
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
                        let duration = since.get(&epoch).map_or(0, |t| t.elapsed().as_millis());
                        tracing::info!(
                            "checkpoint {epoch} committed: {files} files (source offsets and state of {peers} workers), {bytes} bytes; \
                             snapshots took {:.1} ms of worker time, commit {duration} ms after the epoch",
                            took.as_secs_f64() * 1000.0,
                        );
                        worker_metrics.record_checkpoint(crate::runtime::metrics::CheckpointRecord {
                            epoch,
                            bytes,
                            files: files as u64,
                            snapshot_ms: took.as_secs_f64() * 1000.0,
                            duration_ms: duration as u64,
                            committed_at_ms: std::time::SystemTime::now()
                                .duration_since(std::time::UNIX_EPOCH)
                                .map_or(0, |d| d.as_millis() as i64),
                        });
                        since.retain(|e, _| *e > epoch);
                        pending.retain(|e| *e > epoch);
                        break;
                    }
                    Ok(None) => {}
                    Err(e) => worker_control.checkpoint_failed(epoch, e),
                }
            }
            // A finished source never completes later checkpoints: do not wait for them forever.
            while pending.len() > 8 {
                pending.pop_front();
            }
        }
        // A graceful stop leaves a final checkpoint behind; its files may still be landing.
        if let (0, true, Some(ck), Some(c)) = (index, worker_control.is_cancelled(), checkpoint.as_ref(), checkpointing.as_ref()) {
            if let Some(stop) = worker_control.stop_epoch() {
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
                        tracing::info!("final checkpoint {epoch} committed: {files} files, {bytes} bytes");
                        break 'finals;
                    }
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        }));
        if let Err(panic) = ran {
            let text = crate::runtime::panics::take(&*panic);
            worker_control.fail(Error::Runtime(if crate::runtime::panics::lost_peer(&text) {
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
        if worker_control.failed() {
            if processes > 1 {
                end_failed_cluster_process(&worker_control);
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
    if let Some(e) = control.take_error() {
        return Err(e);
    }
    // A job that ran to its end needs no checkpoint to resume from (Flink drops them too): it
    // records that it finished, publishes its sinks' sealed output, then drops them.
    if let Some(f) = &finish {
        if !control.is_cancelled() {
            f.run_to_end()?;
        }
        f.tell_ended_readers(control.is_cancelled())?;
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

/// Sums the time each operator of `worker` is scheduled into `metrics`, from timely's log.
fn track_busy(worker: &mut timely::worker::Worker, metrics: Arc<JobMetrics>) {
    use std::collections::HashMap;
    use std::time::Duration;
    use timely::logging::{StartStop, TimelyEvent, TimelyEventBuilder};
    let Some(mut registry) = worker.log_register() else {
        return;
    };
    let mut names: HashMap<usize, String> = HashMap::new();
    let mut started: HashMap<usize, Duration> = HashMap::new();
    registry.insert::<TimelyEventBuilder, _>("timely", move |_, events| {
        let Some(events) = events else { return };
        let mut busy: HashMap<usize, Duration> = HashMap::new();
        for (at, event) in events.iter() {
            match event {
                TimelyEvent::Operates(op) => {
                    names.insert(op.id, op.name.clone());
                }
                TimelyEvent::Schedule(s) => match s.start_stop {
                    StartStop::Start => {
                        started.insert(s.id, *at);
                    }
                    StartStop::Stop => {
                        if let Some(from) = started.remove(&s.id) {
                            *busy.entry(s.id).or_default() += at.saturating_sub(from);
                        }
                    }
                },
                _ => {}
            }
        }
        if !busy.is_empty() {
            metrics.add_busy(
                busy.into_iter()
                    .filter_map(|(id, t)| Some((names.get(&id)?.clone(), t))),
            );
        }
    });
}
