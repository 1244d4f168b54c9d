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
use timely::dataflow::operators::CapabilityTrait;

use crate::checkpointing::{Alignment, CheckpointContext, CheckpointWriter, Contribution};
use crate::dataflow::{Epoch, Event, EventBuilder, EventStream};
use crate::job::BuildContext;
use crate::join::JoinState;
use crate::metrics::JobMetrics;
use crate::watermark::WatermarkTracker;

/// The state of an operator with two keyed inputs (a join).
pub(crate) trait TwoInputState: 'static {
    /// Applies a batch of input `side`: the changes, and how many rows were skipped.
    fn apply(&mut self, side: usize, batch: &ChangeBatch) -> Result<(Option<ChangeBatch>, u64)>;
    /// Input `side`'s watermark advanced.
    fn advance_watermark(&mut self, side: usize, watermark: i64) -> Result<Option<ChangeBatch>>;
    fn snapshot(&self) -> Result<RecordBatch>;
    fn restore(&mut self, batch: &RecordBatch, owns: &dyn Fn(u16) -> bool) -> Result<()>;
    fn rows_held(&self) -> u64;
    fn size_bytes(&self) -> usize;
}

impl TwoInputState for JoinState {
    fn apply(&mut self, side: usize, batch: &ChangeBatch) -> Result<(Option<ChangeBatch>, u64)> {
        let out = JoinState::apply(self, side, batch)?;
        Ok((out.changes, out.unmatched_retractions))
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

struct JoinTask<S> {
    state: S,
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
    fn apply<C: CapabilityTrait<Epoch>>(
        &mut self,
        side: usize,
        cap: &C,
        d: &crate::dataflow::DataEvent,
        output: &mut OutputBuilderSession<'_, Epoch, EventBuilder>,
    ) {
        match self.state.apply(side, &d.batch) {
            Ok((changes, skipped)) => {
                if skipped > 0 {
                    self.metrics
                        .records_skipped
                        .fetch_add(skipped, Ordering::Relaxed);
                }
                if let Some(changes) = changes {
                    output
                        .session(cap)
                        .give_container(&mut Event::data(changes));
                }
            }
            Err(e) => self.metrics.fail(e),
        }
    }

    fn handle<C: CapabilityTrait<Epoch>>(
        &mut self,
        side: usize,
        cap: &C,
        data: &mut Event,
        output: &mut OutputBuilderSession<'_, Epoch, EventBuilder>,
    ) {
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
                self.apply(side, cap, d, output);
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
            }
            Event::Empty => {}
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
    left.binary_frontier::<Event, EventBuilder, _, _, _, _>(
        right,
        Pipeline,
        Pipeline,
        "Join",
        move |initial, _info| {
            let mut align: Option<Alignment<(usize, Event)>> =
                checkpoint.as_ref().map(|c| Alignment::new(c, initial));
            let mut reported = false;
            let operator: std::rc::Rc<str> = "Join".into();
            move |(in1, f1), (in2, f2), output| {
                let _running = crate::panics::in_operator(&operator);
                for (side, input) in [(0, in1), (1, in2)] {
                    input.for_each(|cap, data| {
                        let Some(task) = task.as_mut() else { return };
                        if metrics.failed() {
                            return;
                        }
                        if align
                            .as_mut()
                            .is_some_and(|al| al.hold(&cap, || (side, std::mem::take(data))))
                        {
                            return;
                        }
                        task.handle(side, &cap, data, output);
                    });
                }
                if let (Some(al), Some(task)) = (align.as_mut(), task.as_mut()) {
                    while let Some(epoch) = al.due(&[f1, f2]) {
                        if let (Some(ck), Some(id)) = (checkpoint.as_ref(), id.as_ref()) {
                            if let Err(e) = task.snapshot(&ck.writer, epoch, id) {
                                metrics.checkpoint_failed(epoch, e);
                            }
                        }
                        for (c, (side, mut event)) in al.advance() {
                            task.handle(side, &c, &mut event, output);
                        }
                    }
                    for (c, (side, mut event)) in al.finish(&[f1, f2]) {
                        task.handle(side, &c, &mut event, output);
                    }
                }
                if f1.frontier().is_empty() && f2.frontier().is_empty() && !reported {
                    reported = true;
                    if let Some(task) = task.as_ref() {
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
