//! The aggregation operator: applies batches to [`super::AggregateState`], fires windows by
//! watermark, wall clock or early-fire timer, and takes part in checkpoints.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::datatypes::SchemaRef;
use sluice_common::time::MAX_WATERMARK;
use sluice_common::{ChangeBatch, Error, Result};
use sluice_connectors::open_sink;
use sluice_sql::TableDef;
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::generic::{Operator, OutputBuilderSession};
use timely::dataflow::operators::CapabilityTrait;

use crate::checkpoint::{Alignment, CheckpointContext, Contribution};
use crate::operator::aggregate::AggregateState;
use crate::runtime::metrics::JobMetrics;
use crate::runtime::watermark::WatermarkTracker;
use crate::runtime::{Epoch, Event, EventBuilder, EventStream};

use crate::build::{spec, BuildContext};

/// How often processing-time windows check the clock.
pub(crate) const PROCTIME_TICK: Duration = Duration::from_millis(50);
/// How long after its end a processing-time window still takes rows (their way from where
/// `PROCTIME()` stamped them to the window).
pub(crate) const PROCTIME_GRACE: Duration = Duration::from_millis(200);

/// One worker's aggregation: its state, its watermark tracking and its late-row writer.
pub(crate) struct AggregateTask {
    pub(crate) state: AggregateState,
    pub(crate) tracker: WatermarkTracker,
    pub(crate) late_writer: Option<(
        Box<dyn sluice_connectors::SinkWriter>,
        Arc<std::sync::atomic::AtomicU64>,
        SchemaRef,
    )>,
    pub(crate) metrics: Arc<JobMetrics>,
    pub(crate) index: usize,
    pub(crate) peers: usize,
    /// Processing-time windows: only the end of input's watermark closes windows here.
    pub(crate) processing_time: bool,
    /// Copies of the state for full snapshots come back here from the writer thread once
    /// written, and the next copy reuses their buffers.
    pub(crate) frozen: (
        std::sync::mpsc::Sender<crate::operator::aggregate::snapshot::FrozenState>,
        std::sync::mpsc::Receiver<crate::operator::aggregate::snapshot::FrozenState>,
    ),
}

impl AggregateTask {
    pub(crate) fn handle<C: CapabilityTrait<Epoch>>(
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
    pub(crate) fn snapshot(
        &mut self,
        ck: &CheckpointContext,
        epoch: Epoch,
        id: &str,
    ) -> Result<()> {
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

pub(crate) fn aggregate<'scope>(
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
        let mut late_transactions = crate::checkpoint::SinkTransactions::default();
        let operator: std::rc::Rc<str> = "Aggregate".into();
        let mut gauge = crate::runtime::metrics::StateGauge::new("Aggregate", index);
        move |(input, frontier), output| {
            let _running = crate::runtime::panics::in_operator(&operator);
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
                        let done = crate::checkpoint::SinkTransactions::close(
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
