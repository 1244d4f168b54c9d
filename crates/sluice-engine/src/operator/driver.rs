//! One timely shell for every stateful operator: aggregation, joins, Top-N, OVER and temporal
//! joins.
//!
//! An operator implements [`StatefulOperator`]: what it does with a batch, a watermark and a
//! timer, and how it writes and reads its state. The shell does the rest, the same way for all:
//! - restores the state at start (a failure fails the job);
//! - tracks watermarks per input and combined, and forwards its own (held back by the
//!   operator's output delay);
//! - aligns on checkpoint epochs: input of later epochs waits while a snapshot is due, counted
//!   in flight;
//! - bounds the output of one activation when the operator asks for it (a join of many matches):
//!   the rest of its input waits, in order, for the next activation;
//! - runs the operator's timer (early firing, processing-time windows);
//! - counts dropped rows, reports the state's size, and turns errors into the job's failure.

use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::record_batch::RecordBatch;
use sluice_common::time::{MAX_WATERMARK, MIN_WATERMARK};
use sluice_common::{ChangeBatch, Result};
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::generic::{Operator, OutputBuilderSession};
use timely::dataflow::operators::{Capability, CapabilityTrait, InputCapability};
use timely::progress::frontier::MutableAntichain;

use crate::build::BuildContext;
use crate::checkpoint::{Alignment, CheckpointContext, Contribution};
use crate::runtime::control::JobControl;
use crate::runtime::metrics::{InFlight, JobMetrics, StateGauge};
use crate::runtime::watermark::WatermarkTracker;
use crate::runtime::{Epoch, Event, EventBuilder, EventStream};

/// What an operator did with a batch.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Applied {
    /// Rows of the batch taken, from its first on: all of them unless the output budget ran out.
    pub consumed: usize,
    /// Rows dropped behind the watermark.
    pub late: u64,
    /// Rows dropped without an event time (as Flink drops them).
    pub null_time: u64,
    /// Retractions of rows not in state (dropped by a TTL, or never inserted).
    pub skipped: u64,
}

impl Applied {
    /// All `rows` taken, none dropped.
    pub fn all(rows: usize) -> Self {
        Applied {
            consumed: rows,
            ..Default::default()
        }
    }

    /// All `rows` taken, `late` of them dropped as late.
    pub fn with_late(rows: usize, late: u64) -> Self {
        Applied {
            late,
            ..Applied::all(rows)
        }
    }
}

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

/// The changes an operator emits, in order.
pub type Output = Vec<ChangeBatch>;

/// One worker's part of a stateful operator.
pub trait StatefulOperator: 'static {
    /// The operator's name in the dataflow, the metrics and errors.
    const NAME: &'static str;

    /// Applies a batch of input `side` (0 for an operator of one input). It may stop once its
    /// output reaches `budget` rows and say how many rows it took; the shell passes the rest
    /// again later. Without [`Self::output_budget`] the budget is unlimited.
    fn on_batch(
        &mut self,
        side: usize,
        batch: &ChangeBatch,
        budget: usize,
        out: &mut Output,
    ) -> Result<Applied>;

    /// Input `side`'s watermark advanced: emit what it completes. `made_at` is when the source
    /// made the watermark (wall clock, ms).
    fn on_watermark(
        &mut self,
        side: usize,
        watermark: i64,
        made_at: i64,
        out: &mut Output,
    ) -> Result<()>;

    /// Writes this worker's state into a checkpoint.
    fn snapshot(&mut self, to: &SnapshotTo<'_>) -> Result<()>;

    /// Adds the state of a checkpoint that this worker owns.
    fn restore(&mut self, from: &RestoreFrom<'_>) -> Result<()>;

    /// Bytes held (estimated) and keys (or rows) held.
    fn size(&self) -> (u64, u64);

    /// Output rows one activation may emit; the rest of the input waits for the next one.
    fn output_budget(&self) -> Option<usize> {
        None
    }

    /// How far the output watermark trails the inputs' combined one (an interval join emits
    /// rows up to its bound behind the watermark).
    fn output_delay(&self) -> i64 {
        0
    }

    /// How often [`Self::on_timer`] runs, without input (early firing, processing-time windows).
    fn timer(&self) -> Option<Duration> {
        None
    }

    fn on_timer(&mut self, _out: &mut Output) -> Result<()> {
        Ok(())
    }

    /// Checkpoint `epoch`'s snapshot was written: seal what the operator writes besides its
    /// output (the aggregation's late-row sink).
    fn sealed(&mut self, _epoch: Epoch) -> Result<()> {
        Ok(())
    }

    /// Every activation of a checkpointed job: publish what committed checkpoints released.
    /// Returns when to be activated again, if it waits for a commit.
    fn on_activation(&mut self, _ck: &CheckpointContext) -> Result<Option<Duration>> {
        Ok(None)
    }

    /// Every input ended.
    fn on_end(&mut self) -> Result<()> {
        Ok(())
    }
}

/// The `snapshot` and `restore` of a [`StatefulOperator`] whose state is one batch in the keyed
/// layout ([`crate::checkpoint::keyed`]): it has `snapshot_rows(&self)` and
/// `restore_rows(&mut self, batch, owns)`, and every worker's snapshot is offered to each
/// restoring worker, which keeps its key groups.
macro_rules! keyed_snapshots {
    () => {
        fn snapshot(&mut self, to: &$crate::operator::driver::SnapshotTo<'_>) -> Result<()> {
            to.write(self.snapshot_rows()?);
            Ok(())
        }

        fn restore(&mut self, from: &$crate::operator::driver::RestoreFrom<'_>) -> Result<()> {
            from.key_groups(|b, owns| self.restore_rows(b, owns))
        }
    };
}
pub(crate) use keyed_snapshots;

/// Where a snapshot goes: checkpoint `epoch`, under this worker's file name.
pub struct SnapshotTo<'a> {
    pub ck: &'a CheckpointContext,
    pub epoch: Epoch,
    /// The snapshot's file name, without a base epoch.
    pub stem: String,
}

impl SnapshotTo<'_> {
    /// Writes the whole state as one batch.
    pub fn write(&self, batch: RecordBatch) {
        self.ck
            .writer
            .write_batch(self.epoch, self.stem.clone(), batch);
    }
}

/// Where a restore reads from: the operator's snapshots of every worker of the checkpoint.
pub struct RestoreFrom<'a> {
    pub ck: &'a CheckpointContext,
    pub id: &'a str,
    pub index: usize,
    pub peers: usize,
}

impl RestoreFrom<'_> {
    /// Passes each snapshot batch, with the test of the key groups this worker owns.
    pub fn key_groups(
        &self,
        restore: impl FnMut(&RecordBatch, &dyn Fn(u16) -> bool) -> Result<()>,
    ) -> Result<()> {
        self.ck
            .restore_key_groups(self.id, self.index, self.peers, restore)
    }
}

/// Runs `op` over streams already partitioned by its key: one input, or two (a join's sides).
pub(crate) fn stateful<'scope, O: StatefulOperator>(
    inputs: Vec<EventStream<'scope>>,
    op: Result<O>,
    ctx: &BuildContext,
) -> EventStream<'scope> {
    // Its own name (the second of a kind is `Kind #2`), so that two operators' figures never mix.
    let name = ctx.operator_name(O::NAME);
    let mut shell = Shell::new(op, inputs.len(), ctx, &name);
    let mut inputs = inputs.into_iter();
    let first = inputs.next().expect("an input");
    let scope = first.scope();
    match inputs.next() {
        None => {
            first.unary_frontier::<EventBuilder, _, _, _>(Pipeline, &name, move |initial, info| {
                shell.started(initial, scope.activator_for(info.address.clone()));
                move |(input, frontier), output| {
                    let _running = crate::runtime::panics::in_operator(&shell.operator);
                    if !shell.begin(output) {
                        input.for_each(|_, _| {});
                        return;
                    }
                    if shell.pending.is_empty() {
                        input.for_each(|cap, data| shell.arrive(0, cap, data, output));
                    }
                    shell.end(&[frontier], output);
                }
            })
        }
        Some(second) => first.binary_frontier::<Event, EventBuilder, _, _, _, _>(
            second,
            Pipeline,
            Pipeline,
            &name,
            move |initial, info| {
                shell.started(initial, scope.activator_for(info.address.clone()));
                move |(in1, f1), (in2, f2), output| {
                    let _running = crate::runtime::panics::in_operator(&shell.operator);
                    if !shell.begin(output) {
                        in1.for_each(|_, _| {});
                        in2.for_each(|_, _| {});
                        return;
                    }
                    // Newer input waits in timely's queues while older input waits here.
                    if shell.pending.is_empty() {
                        in1.for_each(|cap, data| shell.arrive(0, cap, data, output));
                        in2.for_each(|cap, data| shell.arrive(1, cap, data, output));
                    }
                    shell.end(&[f1, f2], output);
                }
            },
        ),
    }
}

/// The shell's state on one worker.
struct Shell<O> {
    /// `None` once building or restoring the operator failed (the job is failing).
    op: Option<O>,
    operator: Rc<str>,
    /// Each input's watermark (operators of two inputs), and all of them together.
    per_input: Vec<WatermarkTracker>,
    combined: WatermarkTracker,
    /// Output rows this activation may still emit.
    budget: usize,
    /// Input left for a later activation (the output budget ran out), in arrival order.
    pending: VecDeque<(Capability<Epoch>, usize, Event)>,
    pending_bytes: usize,
    align: Option<Alignment<(usize, Event)>>,
    checkpoint: Option<Rc<CheckpointContext>>,
    id: Option<String>,
    /// A capability for output without input (the timer), kept at the input frontier.
    timer_cap: Option<Capability<Epoch>>,
    next_timer: Instant,
    activator: Option<timely::scheduling::Activator>,
    held: Arc<InFlight>,
    gauge: StateGauge,
    out: Output,
    reported: bool,
    metrics: Arc<JobMetrics>,
    control: Arc<JobControl>,
    index: usize,
    peers: usize,
}

impl<O: StatefulOperator> Shell<O> {
    fn new(op: Result<O>, inputs: usize, ctx: &BuildContext, name: &str) -> Self {
        let (index, peers, metrics) = (ctx.index, ctx.peers, ctx.metrics.clone());
        let checkpoint = ctx.checkpoint.clone();
        let id = checkpoint.as_ref().map(|c| c.register(Contribution::State));
        let op = op.and_then(|mut op| {
            if let (Some(ck), Some(id)) = (&checkpoint, &id) {
                if ck.restore.is_some() {
                    let started = Instant::now();
                    op.restore(&RestoreFrom {
                        ck,
                        id,
                        index,
                        peers,
                    })?;
                    tracing::info!(
                        "worker {index}: restored {} keys of {} {id} in {} ms",
                        op.size().1,
                        O::NAME,
                        started.elapsed().as_millis()
                    );
                }
            }
            Ok(op)
        });
        let op = op.map_err(|e| ctx.control.fail(e)).ok();
        Shell {
            op,
            operator: name.into(),
            per_input: if inputs > 1 {
                (0..inputs).map(|_| WatermarkTracker::new(peers)).collect()
            } else {
                vec![]
            },
            combined: WatermarkTracker::new(inputs * peers),
            budget: usize::MAX,
            pending: VecDeque::new(),
            pending_bytes: 0,
            align: None,
            checkpoint,
            id,
            timer_cap: None,
            next_timer: Instant::now(),
            activator: None,
            held: metrics.in_flight_meter(&format!("{name} on worker {index}")),
            gauge: StateGauge::new(name, index),
            out: vec![],
            reported: false,
            metrics,
            control: ctx.control.clone(),
            index,
            peers,
        }
    }

    fn started(&mut self, initial: Capability<Epoch>, activator: timely::scheduling::Activator) {
        self.align = self
            .checkpoint
            .as_ref()
            .map(|c| Alignment::new(c, initial).metered(self.held.clone()));
        self.activator = Some(activator);
    }

    /// The start of an activation: the budget is renewed and input left from before goes
    /// first. False when the input is to be discarded (the operator failed to build).
    fn begin(&mut self, output: &mut OutputBuilderSession<'_, Epoch, EventBuilder>) -> bool {
        let Some(op) = self.op.as_ref() else {
            return false;
        };
        self.budget = op.output_budget().unwrap_or(usize::MAX);
        let (metrics, gauge) = (&self.metrics, &mut self.gauge);
        gauge.report(metrics, || op.size());
        while let Some((cap, side, mut event)) = self.pending.pop_front() {
            if self.control.failed() {
                self.pending.clear();
                break;
            }
            if let Some(rest) = self.handle(side, &cap, &mut event, output) {
                self.pending.push_front((cap, side, rest));
                break;
            }
        }
        true
    }

    /// An input message: held for a pending checkpoint, queued behind input left from before,
    /// or handled.
    fn arrive(
        &mut self,
        side: usize,
        cap: InputCapability<Epoch>,
        data: &mut Event,
        output: &mut OutputBuilderSession<'_, Epoch, EventBuilder>,
    ) {
        if self.control.failed() {
            return;
        }
        // The timer's capability: taken from the first input, so that a job without input
        // never waits for it.
        if self.timer_cap.is_none() && self.op.as_ref().and_then(|op| op.timer()).is_some() {
            self.timer_cap = cap.retain_least(0);
        }
        if self
            .align
            .as_mut()
            .is_some_and(|al| al.hold(&cap, || (side, std::mem::take(data))))
        {
            return;
        }
        if !self.pending.is_empty() {
            if let Some(c) = cap.retain_least(0) {
                self.pending.push_back((c, side, std::mem::take(data)));
            }
        } else if let Some(rest) = self.handle(side, &cap, data, output) {
            if let Some(c) = cap.retain_least(0) {
                self.pending.push_back((c, side, rest));
            }
        }
    }

    /// Hands an event to the operator; returns the part of a batch left for later.
    fn handle<C: CapabilityTrait<Epoch>>(
        &mut self,
        side: usize,
        cap: &C,
        event: &mut Event,
        output: &mut OutputBuilderSession<'_, Epoch, EventBuilder>,
    ) -> Option<Event> {
        let op = self.op.as_mut()?;
        match event {
            Event::Data(d) => {
                let n = d.batch.num_rows();
                if self.budget == 0 {
                    return Some(Event::data(d.batch.clone()));
                }
                let applied = op.on_batch(side, &d.batch, self.budget, &mut self.out);
                let rest = match applied {
                    Ok(a) => {
                        self.count(&a);
                        (a.consumed < n)
                            .then(|| Event::data(d.batch.slice(a.consumed, n - a.consumed)))
                    }
                    Err(e) => {
                        self.control.fail(e);
                        None
                    }
                };
                self.emit(cap, output);
                rest
            }
            Event::Watermark {
                from, ts, idle, at, ..
            } => {
                let (from, ts, idle, at) = (*from, *ts, *idle, *at);
                let forward = if self.per_input.is_empty() {
                    let progress = self.combined.receive(from, ts, idle);
                    if let Some(wm) = progress.advanced {
                        if let Err(e) = op.on_watermark(0, wm, at, &mut self.out) {
                            self.control.fail(e);
                        }
                    }
                    progress.forward
                } else {
                    if let Some(wm) = self.per_input[side].observe(from, ts, idle) {
                        if let Err(e) = op.on_watermark(side, wm, at, &mut self.out) {
                            self.control.fail(e);
                        }
                    }
                    let from = from + (side * self.peers) as u32;
                    self.combined.receive(from, ts, idle).forward
                };
                let delay = op.output_delay();
                self.emit(cap, output);
                if forward.is_some_and(|(_, idle)| !idle) {
                    self.gauge.watermark(&self.metrics, self.combined.current());
                }
                if let Some((wm, idle)) = forward {
                    let wm = if wm == MAX_WATERMARK || wm == MIN_WATERMARK {
                        wm
                    } else {
                        wm.saturating_sub(delay)
                    };
                    let mut event = Event::progress(self.index, wm, idle, self.peers);
                    output.session(cap).give_container(&mut event);
                }
                None
            }
            Event::Empty => None,
        }
    }

    fn count(&self, a: &Applied) {
        if a.late > 0 {
            self.gauge.late(&self.metrics, a.late);
        }
        for (n, counter) in [
            (a.late, &self.metrics.late_rows_dropped),
            (a.null_time, &self.metrics.null_time_rows_dropped),
            (a.skipped, &self.metrics.records_skipped),
        ] {
            if n > 0 {
                counter.fetch_add(n, Ordering::Relaxed);
            }
        }
    }

    /// Sends what the operator emitted, at `cap`'s time, and spends the budget on it.
    fn emit<C: CapabilityTrait<Epoch>>(
        &mut self,
        cap: &C,
        output: &mut OutputBuilderSession<'_, Epoch, EventBuilder>,
    ) {
        if self.out.is_empty() {
            return;
        }
        let mut session = output.session(cap);
        for changes in self.out.drain(..) {
            if self.budget != usize::MAX {
                self.budget = self.budget.saturating_sub(changes.num_rows());
            }
            session.give_container(&mut Event::data(changes));
        }
    }

    /// The end of an activation: checkpoints now due, input released by them, side outputs,
    /// the end of input and the timer.
    fn end(
        &mut self,
        frontiers: &[&MutableAntichain<Epoch>],
        output: &mut OutputBuilderSession<'_, Epoch, EventBuilder>,
    ) {
        // A checkpoint's snapshot waits until the input before it is all applied.
        if self.pending.is_empty() {
            self.checkpoints(frontiers, output);
        }
        let activator = self.activator.as_ref().expect("started");
        if !self.pending.is_empty() {
            activator.activate();
        }
        let now: usize = self.pending.iter().map(|(_, _, e)| e.bytes()).sum();
        if now != self.pending_bytes {
            self.held.add(now);
            self.held.sub(self.pending_bytes);
            self.pending_bytes = now;
        }
        let Some(op) = self.op.as_mut() else { return };
        if let Some(ck) = self.checkpoint.as_ref() {
            match op.on_activation(ck) {
                Ok(Some(after)) => activator.activate_after(after),
                Ok(None) => {}
                Err(e) => self.control.fail(e),
            }
        }
        let ended = frontiers.iter().all(|f| f.frontier().is_empty());
        if ended && self.pending.is_empty() && !self.reported {
            self.reported = true;
            if let Err(e) = op.on_end() {
                self.control.fail(e);
            }
            let (bytes, keys) = op.size();
            self.metrics.state_bytes.fetch_add(bytes, Ordering::Relaxed);
            self.metrics.state_groups.fetch_add(keys, Ordering::Relaxed);
        }
        self.timer(frontiers, output);
    }

    fn checkpoints(
        &mut self,
        frontiers: &[&MutableAntichain<Epoch>],
        output: &mut OutputBuilderSession<'_, Epoch, EventBuilder>,
    ) {
        while let Some(epoch) = self.align.as_ref().and_then(|al| al.due(frontiers)) {
            let (Some(ck), Some(id), Some(op)) =
                (self.checkpoint.as_ref(), self.id.as_ref(), self.op.as_mut())
            else {
                return;
            };
            let started = Instant::now();
            let to = SnapshotTo {
                ck,
                epoch,
                stem: CheckpointContext::file_name(Contribution::State, id, self.index),
            };
            match op.snapshot(&to) {
                Ok(()) => self.metrics.record_snapshot(epoch, started.elapsed()),
                Err(e) => self.control.checkpoint_failed(epoch, e),
            }
            if let Err(e) = op.sealed(epoch) {
                self.control.fail(e);
            }
            let released = self.align.as_mut().expect("aligned").advance();
            self.release(released, output);
            if !self.pending.is_empty() {
                return;
            }
        }
        let finished = self.align.as_mut().map(|al| al.finish(frontiers));
        if let Some(all) = finished {
            self.release(all, output);
        }
    }

    /// Handles input that waited for a checkpoint, or queues it behind input left for later.
    fn release(
        &mut self,
        events: Vec<(Capability<Epoch>, (usize, Event))>,
        output: &mut OutputBuilderSession<'_, Epoch, EventBuilder>,
    ) {
        for (cap, (side, mut event)) in events {
            if !self.pending.is_empty() {
                self.pending.push_back((cap, side, event));
            } else if let Some(rest) = self.handle(side, &cap, &mut event, output) {
                self.pending.push_back((cap, side, rest));
            }
        }
    }

    /// Runs the operator's timer when it is due; its capability follows the input frontier, so
    /// that it never holds the job back.
    fn timer(
        &mut self,
        frontiers: &[&MutableAntichain<Epoch>],
        output: &mut OutputBuilderSession<'_, Epoch, EventBuilder>,
    ) {
        let Some(every) = self.op.as_ref().and_then(|op| op.timer()) else {
            return;
        };
        let least = frontiers
            .iter()
            .filter_map(|f| f.frontier().first().copied())
            .min();
        match least {
            None => self.timer_cap = None,
            Some(t) => {
                if let Some(c) = self.timer_cap.as_mut() {
                    if *c.time() < t {
                        c.downgrade(&t);
                    }
                }
            }
        }
        let (Some(cap), Some(op)) = (self.timer_cap.clone(), self.op.as_mut()) else {
            return;
        };
        if Instant::now() >= self.next_timer {
            if let Err(e) = op.on_timer(&mut self.out) {
                self.control.fail(e);
            }
            self.emit(&cap, output);
            self.next_timer = Instant::now() + every;
        }
        let wait = self.next_timer.saturating_duration_since(Instant::now());
        self.activator
            .as_ref()
            .expect("started")
            .activate_after(wait);
    }
}
