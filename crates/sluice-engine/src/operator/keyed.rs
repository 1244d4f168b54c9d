//! A timely operator around any keyed state with one input (Top-N, OVER aggregates): it applies
//! batches, advances the watermark, takes part in checkpoints (aligned snapshots of its key
//! groups) and restores on any worker count.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use arrow::record_batch::RecordBatch;
use sluice_common::{ChangeBatch, Result};
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::generic::{Operator, OutputBuilderSession};
use timely::dataflow::operators::CapabilityTrait;

use crate::build::BuildContext;
use crate::checkpoint::{Alignment, CheckpointContext, Contribution};
use crate::runtime::metrics::JobMetrics;
use crate::runtime::watermark::WatermarkTracker;
use crate::runtime::{Epoch, Event, EventBuilder, EventStream};

/// Rows an operator dropped from a batch: behind the watermark, or without an event time (as
/// Flink does; counted apart, so that no row vanishes unexplained).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Dropped {
    pub late: u64,
    pub null_time: u64,
}

impl Dropped {
    pub fn late(late: u64) -> Self {
        Dropped { late, null_time: 0 }
    }
}

/// The bytes of a map of `n` entries, estimated from its first entries (a walk over all of them
/// would cost as much as the state is large).
pub(crate) fn sampled_bytes<T>(
    n: usize,
    entries: impl Iterator<Item = T>,
    bytes: impl Fn(T) -> usize,
) -> u64 {
    const SAMPLE: usize = 64;
    let (mut seen, mut total) = (0usize, 0usize);
    for e in entries.take(SAMPLE) {
        seen += 1;
        total += bytes(e);
    }
    if seen == 0 {
        return 0;
    }
    (total as f64 / seen as f64 * n as f64) as u64
}

/// One worker's state of a keyed operator.
pub trait KeyedState: 'static {
    /// The operator's name in the dataflow.
    const NAME: &'static str;
    /// Applies a batch: its changes, and the rows it dropped.
    fn apply(&mut self, batch: &ChangeBatch) -> Result<(Option<ChangeBatch>, Dropped)>;
    /// The input watermark advanced: what it completes.
    fn advance_watermark(&mut self, watermark: i64) -> Result<Option<ChangeBatch>>;
    /// This worker's state as one batch, each row tagged with its key group.
    fn snapshot(&self) -> Result<RecordBatch>;
    /// Adds the rows of a snapshot whose key group `owns` accepts.
    fn restore(&mut self, batch: &RecordBatch, owns: &dyn Fn(u16) -> bool) -> Result<()>;
    /// Keys held, for the job summary.
    fn groups(&self) -> u64;
    /// Bytes held, estimated (for the memory limit's message and quotas).
    fn size_bytes(&self) -> u64 {
        0
    }
}

struct Task<S> {
    state: S,
    tracker: WatermarkTracker,
    metrics: Arc<JobMetrics>,
    index: usize,
    peers: usize,
}

impl<S: KeyedState> Task<S> {
    fn handle<C: CapabilityTrait<Epoch>>(
        &mut self,
        cap: &C,
        data: &mut Event,
        output: &mut OutputBuilderSession<'_, Epoch, EventBuilder>,
    ) {
        match data {
            Event::Data(d) => match self.state.apply(&d.batch) {
                Ok((changes, dropped)) => {
                    if dropped.late > 0 {
                        self.metrics
                            .late_rows_dropped
                            .fetch_add(dropped.late, Ordering::Relaxed);
                    }
                    if dropped.null_time > 0 {
                        self.metrics
                            .null_time_rows_dropped
                            .fetch_add(dropped.null_time, Ordering::Relaxed);
                    }
                    if let Some(c) = changes {
                        output.session(cap).give_container(&mut Event::data(c));
                    }
                }
                Err(e) => self.metrics.fail(e),
            },
            Event::Watermark { from, ts, idle, .. } => {
                let progress = self.tracker.receive(*from, *ts, *idle);
                if let Some(wm) = progress.advanced {
                    match self.state.advance_watermark(wm) {
                        Ok(Some(c)) => output.session(cap).give_container(&mut Event::data(c)),
                        Ok(None) => {}
                        Err(e) => self.metrics.fail(e),
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
}

/// Runs `state` over a stream already partitioned by its key.
pub(crate) fn keyed<'scope, S: KeyedState>(
    stream: EventStream<'scope>,
    state: Result<S>,
    ctx: &BuildContext,
) -> EventStream<'scope> {
    let (index, peers, metrics) = (ctx.index, ctx.peers, ctx.metrics.clone());
    let checkpoint = ctx.checkpoint.clone();
    let id = checkpoint.as_ref().map(|c| c.register(Contribution::State));
    let state = state.and_then(|mut s| {
        if let (Some(c), Some(id)) = (&checkpoint, &id) {
            if c.restore.is_some() {
                c.restore_key_groups(id, index, peers, |b, owns| s.restore(b, owns))?;
            }
        }
        Ok(s)
    });
    let mut task = match state {
        Ok(state) => Some(Task {
            state,
            tracker: WatermarkTracker::new(peers),
            metrics: metrics.clone(),
            index,
            peers,
        }),
        Err(e) => {
            metrics.fail(e);
            None
        }
    };
    let operator: std::rc::Rc<str> = S::NAME.into();
    stream.unary_frontier::<EventBuilder, _, _, _>(Pipeline, S::NAME, move |initial, _info| {
        let held = metrics.in_flight_meter(&format!("{} on worker {index}", S::NAME));
        let mut align: Option<Alignment> = checkpoint
            .as_ref()
            .map(|c| Alignment::new(c, initial).metered(held));
        let mut reported = false;
        let mut gauge = crate::runtime::metrics::StateGauge::new(S::NAME, index);
        move |(input, frontier), output| {
            let _running = crate::runtime::panics::in_operator(&operator);
            if let Some(task) = task.as_ref() {
                gauge.report(&metrics, || (task.state.size_bytes(), task.state.groups()));
            }
            input.for_each(|cap, data| {
                let Some(task) = task.as_mut() else { return };
                if metrics.failed() {
                    return;
                }
                if align
                    .as_mut()
                    .is_some_and(|al| al.hold(&cap, || std::mem::take(data)))
                {
                    return;
                }
                task.handle(&cap, data, output);
            });
            if let (Some(al), Some(task)) = (align.as_mut(), task.as_mut()) {
                while let Some(epoch) = al.due(&[frontier]) {
                    if let (Some(ck), Some(id)) = (checkpoint.as_ref(), id.as_ref()) {
                        let started = std::time::Instant::now();
                        match task.state.snapshot() {
                            Ok(batch) => {
                                ck.writer.write_batch(
                                    epoch,
                                    CheckpointContext::file_name(Contribution::State, id, index),
                                    batch,
                                );
                                metrics.record_snapshot(epoch, started.elapsed());
                            }
                            Err(e) => metrics.checkpoint_failed(epoch, e),
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
            if frontier.frontier().is_empty() && !reported {
                reported = true;
                if let Some(task) = task.as_ref() {
                    metrics
                        .state_groups
                        .fetch_add(task.state.groups(), Ordering::Relaxed);
                }
            }
        }
    })
}
