//! The join as a timely operator with two inputs: both partitioned by the join key, watermarks
//! tracked per input (bounded joins expire rows by the other input's watermark) and combined
//! (the output watermark is the minimum, held back by the join's output delay).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use arrow::record_batch::RecordBatch;
use sluice_common::time::{MAX_WATERMARK, MIN_WATERMARK};
use sluice_common::{ChangeBatch, Result};
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::generic::{Operator, OutputBuilderSession};
use timely::dataflow::operators::{Capability, CapabilityTrait};

use crate::build::BuildContext;
use crate::checkpoint::{Alignment, CheckpointContext, CheckpointWriter, Contribution};
use crate::operator::join::JoinState;
use crate::runtime::metrics::JobMetrics;
use crate::runtime::watermark::WatermarkTracker;
use crate::runtime::{Epoch, Event, EventBuilder, EventStream};

/// The state of an operator with two keyed inputs (a join).
pub(crate) trait TwoInputState: 'static {
    /// Applies rows of a batch of input `side` from its first on, stopping once about
    /// `max_pairs` output candidates were made: the changes, how many rows were skipped, and
    /// how many were applied.
    fn apply(
        &mut self,
        side: usize,
        batch: &ChangeBatch,
        max_pairs: usize,
    ) -> Result<(Option<ChangeBatch>, u64, usize)>;
    /// Input `side`'s watermark advanced.
    fn advance_watermark(&mut self, side: usize, watermark: i64) -> Result<Option<ChangeBatch>>;
    fn snapshot(&self) -> Result<RecordBatch>;
    fn restore(&mut self, batch: &RecordBatch, owns: &dyn Fn(u16) -> bool) -> Result<()>;
    fn rows_held(&self) -> u64;
    fn size_bytes(&self) -> usize;
}

impl TwoInputState for JoinState {
    fn apply(
        &mut self,
        side: usize,
        batch: &ChangeBatch,
        max_pairs: usize,
    ) -> Result<(Option<ChangeBatch>, u64, usize)> {
        let out = JoinState::apply_some(self, side, batch, max_pairs)?;
        Ok((out.changes, out.unmatched_retractions, out.consumed))
    }
    fn advance_watermark(&mut self, side: usize, watermark: i64) -> Result<Option<ChangeBatch>> {
        JoinState::advance_watermark(self, side, watermark)
    }
    fn snapshot(&self) -> Result<RecordBatch> {
        JoinState::snapshot(self)
    }
    fn restore(&mut self, batch: &RecordBatch, owns: &dyn Fn(u16) -> bool) -> Result<()> {
        JoinState::restore(self, batch, owns)
    }
    fn rows_held(&self) -> u64 {
        JoinState::rows_held(self)
    }
    fn size_bytes(&self) -> usize {
        JoinState::size_bytes(self)
    }
}

/// How long a processing-time interval join keeps a row past its bound, for rows on their way
/// from where `PROCTIME()` stamped them.
const PROCTIME_GRACE_MS: i64 = 200;

/// Output rows a join emits in one activation before it yields: the rest of its input waits
/// (and holds its capability), so that downstream operators take the output in bounded batches
/// instead of all of it piling up (a constant-key join of 200 K by 200 K rows is 40 G rows).
const OUTPUT_BUDGET: usize = 64 * 1024;

struct JoinTask<S> {
    state: S,
    /// Output rows this activation may still emit.
    budget: usize,
    /// Input rows per call of the state: adapted to the output each row makes, so that one call
    /// stays near the budget.
    rows_per_call: usize,
    /// A processing-time interval join: rows expire by the wall clock, not by watermarks.
    processing_time: bool,
    /// Each input's watermark, and both together.
    inputs: [WatermarkTracker; 2],
    both: WatermarkTracker,
    output_delay: i64,
    metrics: Arc<JobMetrics>,
    index: usize,
    peers: usize,
}

impl<S: TwoInputState> JoinTask<S> {
    /// Joins a batch, in slices, while the activation's output budget lasts; returns the rows
    /// not joined yet.
    fn apply<C: CapabilityTrait<Epoch>>(
        &mut self,
        side: usize,
        cap: &C,
        d: &crate::runtime::DataEvent,
        output: &mut OutputBuilderSession<'_, Epoch, EventBuilder>,
    ) -> Option<Event> {
        let n = d.batch.num_rows();
        let mut at = 0;
        while at < n {
            if self.budget == 0 {
                return Some(Event::data(d.batch.slice(at, n - at)));
            }
            let rows = self.rows_per_call.clamp(1, n - at);
            let slice = if rows == n {
                d.batch.clone()
            } else {
                d.batch.slice(at, rows)
            };
            match self
                .state
                .apply(side, &slice, self.budget.min(OUTPUT_BUDGET / 4).max(1))
            {
                Ok((changes, skipped, consumed)) => {
                    let rows = consumed.max(1);
                    at += rows;
                    if skipped > 0 {
                        self.metrics
                            .records_skipped
                            .fetch_add(skipped, Ordering::Relaxed);
                    }
                    let out = changes.as_ref().map_or(0, |c| c.num_rows());
                    self.budget = self.budget.saturating_sub(out);
                    // Aim the next call at a quarter of the budget.
                    self.rows_per_call = if out == 0 {
                        self.rows_per_call.saturating_mul(2).min(1 << 20)
                    } else {
                        (rows * OUTPUT_BUDGET / 4 / out).clamp(1, 1 << 20)
                    };
                    if let Some(changes) = changes {
                        output
                            .session(cap)
                            .give_container(&mut Event::data(changes));
                    }
                }
                Err(e) => {
                    self.metrics.fail(e);
                    return None;
                }
            }
        }
        None
    }

    /// Handles an event; returns the part of a data event left for a later activation.
    fn handle<C: CapabilityTrait<Epoch>>(
        &mut self,
        side: usize,
        cap: &C,
        data: &mut Event,
        output: &mut OutputBuilderSession<'_, Epoch, EventBuilder>,
    ) -> Option<Event> {
        match data {
            Event::Data(d) if self.processing_time => {
                let now = sluice_common::time::now_millis() - PROCTIME_GRACE_MS;
                for s in 0..2 {
                    match self.state.advance_watermark(s, now) {
                        Ok(Some(out)) => output.session(cap).give_container(&mut Event::data(out)),
                        Ok(None) => {}
                        Err(e) => self.metrics.fail(e),
                    }
                }
                self.apply(side, cap, d, output)
            }
            Event::Data(d) => self.apply(side, cap, d, output),
            Event::Watermark { from, ts, idle, .. } => {
                let expires = |wm: i64| !self.processing_time || wm == MAX_WATERMARK;
                if let Some(wm) = self.inputs[side]
                    .observe(*from, *ts, *idle)
                    .filter(|w| expires(*w))
                {
                    match self.state.advance_watermark(side, wm) {
                        Ok(Some(out)) => output.session(cap).give_container(&mut Event::data(out)),
                        Ok(None) => {}
                        Err(e) => self.metrics.fail(e),
                    }
                }
                let from = *from + (side * self.peers) as u32;
                if let Some((wm, idle)) = self.both.receive(from, *ts, *idle).forward {
                    let wm = if wm == MAX_WATERMARK || wm == MIN_WATERMARK {
                        wm
                    } else {
                        wm.saturating_sub(self.output_delay)
                    };
                    let mut event = Event::progress(self.index, wm, idle, self.peers);
                    output.session(cap).give_container(&mut event);
                }
                None
            }
            Event::Empty => None,
        }
    }

    fn snapshot(&self, writer: &CheckpointWriter, epoch: Epoch, id: &str) -> Result<()> {
        let started = std::time::Instant::now();
        writer.write_batch(
            epoch,
            CheckpointContext::file_name(Contribution::State, id, self.index),
            self.state.snapshot()?,
        );
        self.metrics.record_snapshot(epoch, started.elapsed());
        Ok(())
    }
}

/// Restores join state from every worker's snapshot, keeping this worker's key groups.
fn restore<S: TwoInputState>(
    state: &mut S,
    ctx: &CheckpointContext,
    id: &str,
    index: usize,
    peers: usize,
) -> Result<()> {
    let started = Instant::now();
    ctx.restore_key_groups(id, index, peers, |b, owns| state.restore(b, owns))?;
    eprintln!(
        "worker {index}: restored {} rows of join {id} in {} ms",
        state.rows_held(),
        started.elapsed().as_millis()
    );
    Ok(())
}

/// Joins two streams already partitioned by their join keys.
pub(crate) fn join<'scope, S: TwoInputState>(
    left: EventStream<'scope>,
    right: EventStream<'scope>,
    state: Result<S>,
    output_delay: i64,
    processing_time: bool,
    ctx: &BuildContext,
) -> EventStream<'scope> {
    let (index, peers, metrics) = (ctx.index, ctx.peers, ctx.metrics.clone());
    let checkpoint = ctx.checkpoint.clone();
    let id = checkpoint.as_ref().map(|c| c.register(Contribution::State));
    let state = state.and_then(|mut s| {
        if let (Some(c), Some(id)) = (&checkpoint, &id) {
            if c.restore.is_some() {
                restore(&mut s, c, id, index, peers)?;
            }
        }
        Ok(s)
    });
    let mut task = match state {
        Ok(state) => Some(JoinTask {
            state,
            budget: OUTPUT_BUDGET,
            rows_per_call: usize::MAX,
            processing_time,
            inputs: [WatermarkTracker::new(peers), WatermarkTracker::new(peers)],
            both: WatermarkTracker::new(2 * peers),
            output_delay,
            metrics: metrics.clone(),
            index,
            peers,
        }),
        Err(e) => {
            metrics.fail(e);
            None
        }
    };
    let scope = left.scope();
    left.binary_frontier::<Event, EventBuilder, _, _, _, _>(
        right,
        Pipeline,
        Pipeline,
        "Join",
        move |initial, info| {
            // Input held back for a checkpoint or left for later counts in flight.
            let held = metrics.in_flight_meter(&format!("Join on worker {index}"));
            let mut align: Option<Alignment<(usize, Event)>> = checkpoint
                .as_ref()
                .map(|c| Alignment::new(c, initial).metered(held.clone()));
            let mut pending_bytes = 0;
            let count_pending = move |pending: &std::collections::VecDeque<(_, _, Event)>,
                                      counted: &mut usize| {
                let now = pending.iter().map(|(_, _, e)| e.bytes()).sum();
                if now != *counted {
                    held.add(now);
                    held.sub(*counted);
                    *counted = now;
                }
            };
            let mut reported = false;
            let operator: std::rc::Rc<str> = "Join".into();
            let activator = scope.activator_for(info.address.clone());
            let mut gauge = crate::runtime::metrics::StateGauge::new("Join", index);
            // Input left for later activations (the output budget ran out), in arrival order.
            let mut pending: std::collections::VecDeque<(Capability<Epoch>, usize, Event)> =
                Default::default();
            move |(in1, f1), (in2, f2), output| {
                let _running = crate::runtime::panics::in_operator(&operator);
                let Some(task) = task.as_mut() else {
                    in1.for_each(|_, _| {});
                    in2.for_each(|_, _| {});
                    return;
                };
                task.budget = OUTPUT_BUDGET;
                gauge.report(&metrics, || {
                    (task.state.size_bytes() as u64, task.state.rows_held())
                });
                while let Some((cap, side, mut event)) = pending.pop_front() {
                    if metrics.failed() {
                        pending.clear();
                        break;
                    }
                    if let Some(rest) = task.handle(side, &cap, &mut event, output) {
                        pending.push_front((cap, side, rest));
                        break;
                    }
                }
                if !pending.is_empty() {
                    // Newer input waits in timely's queues until this is done.
                    activator.activate();
                    count_pending(&pending, &mut pending_bytes);
                    return;
                }
                // Handles an event, or queues it behind input already waiting.
                let mut handle = |pending: &mut std::collections::VecDeque<_>,
                                  task: &mut JoinTask<S>,
                                  cap: Capability<Epoch>,
                                  side: usize,
                                  mut event: Event| {
                    if !pending.is_empty() {
                        pending.push_back((cap, side, event));
                    } else if let Some(rest) = task.handle(side, &cap, &mut event, output) {
                        pending.push_back((cap, side, rest));
                    }
                };
                for (side, input) in [(0, in1), (1, in2)] {
                    input.for_each(|cap, data| {
                        if metrics.failed() {
                            return;
                        }
                        if align
                            .as_mut()
                            .is_some_and(|al| al.hold(&cap, || (side, std::mem::take(data))))
                        {
                            return;
                        }
                        if let Some(cap) = cap.retain_least(0) {
                            handle(&mut pending, task, cap, side, std::mem::take(data));
                        }
                    });
                }
                // A checkpoint's snapshot waits until the input before it is all joined.
                if let (Some(al), true) = (align.as_mut(), pending.is_empty()) {
                    while let Some(epoch) = al.due(&[f1, f2]) {
                        if let (Some(ck), Some(id)) = (checkpoint.as_ref(), id.as_ref()) {
                            if let Err(e) = task.snapshot(&ck.writer, epoch, id) {
                                metrics.checkpoint_failed(epoch, e);
                            }
                        }
                        for (c, (side, event)) in al.advance() {
                            handle(&mut pending, task, c, side, event);
                        }
                        if !pending.is_empty() {
                            break;
                        }
                    }
                    if pending.is_empty() {
                        for (c, (side, event)) in al.finish(&[f1, f2]) {
                            handle(&mut pending, task, c, side, event);
                        }
                    }
                }
                if !pending.is_empty() {
                    activator.activate();
                }
                count_pending(&pending, &mut pending_bytes);
                if f1.frontier().is_empty()
                    && f2.frontier().is_empty()
                    && pending.is_empty()
                    && !reported
                {
                    reported = true;
                    {
                        metrics
                            .state_bytes
                            .fetch_add(task.state.size_bytes() as u64, Ordering::Relaxed);
                        metrics
                            .state_groups
                            .fetch_add(task.state.rows_held(), Ordering::Relaxed);
                    }
                }
            }
        },
    )
}
