//! The source operator: polls a reader, computes a table's computed columns and watermark, and
//! paces itself on the job's probe (timely has no backpressure).

use std::cell::Cell;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::AsArray;
use arrow::datatypes::{SchemaRef, TimestampMillisecondType};
use arrow::record_batch::RecordBatch;
use sluice_common::time::{MAX_WATERMARK, MIN_WATERMARK};
use sluice_common::{ChangeBatch, Result};
use sluice_connectors::{Poll, SourceReader};
use sluice_sql::{ChangelogMode, TableDef};
use timely::dataflow::operators::generic::operator::source;

use crate::build::BuildContext;
use crate::checkpoint::FINAL_SUFFIX;
use crate::checkpoint::{CheckpointContext, Contribution};
use crate::operator::stateless::evaluate;
use crate::runtime::{DataflowScope, Epoch, Event, EventBuilder, EventStream};

/// Epochs a source may run ahead of the slowest sink before it waits.
const MAX_EPOCHS_IN_FLIGHT: u64 = 4;
/// Turns a reader's raw batch into the rows to emit and the watermark they allow.
pub type Prepare = Box<dyn FnMut(RecordBatch) -> Result<(ChangeBatch, Option<i64>)>>;

/// For tests that show a changelog step by step: the job's sources run one after another, in plan
/// order, each starting only once everything the previous ones emitted has been processed. With
/// one worker this makes the order in which a join sees its two inputs deterministic.
#[derive(Default)]
pub struct SourceSequence {
    registered: Cell<usize>,
    finished: Cell<usize>,
    /// The running source's epoch: waiting sources keep their capability there, so that they
    /// do not hold the job back.
    epoch: Cell<Epoch>,
    /// The last epoch of the source that finished last.
    last: Cell<Option<Epoch>>,
}

impl SourceSequence {
    fn register(&self) -> usize {
        let turn = self.registered.get();
        self.registered.set(turn + 1);
        turn
    }

    fn may_run(&self, turn: usize, probe: &timely::dataflow::ProbeHandle<Epoch>) -> bool {
        self.finished.get() == turn && self.last.get().is_none_or(|l| !probe.less_equal(&l))
    }

    fn finish(&self, epoch: Epoch) {
        self.finished.set(self.finished.get() + 1);
        self.last.set(Some(epoch));
        self.epoch.set(epoch + 1);
    }
}

/// A source stream over `reader`; a failed `reader` fails the job and emits nothing.
pub(crate) fn source_stream<'scope>(
    scope: DataflowScope<'scope>,
    name: &str,
    reader: Result<Box<dyn SourceReader>>,
    mut prepare: Prepare,
    idle_timeout: Option<Duration>,
    ctx: &BuildContext,
) -> EventStream<'scope> {
    let (index, peers, metrics, probe, batch_rows) = (
        ctx.index,
        ctx.peers,
        ctx.metrics.clone(),
        ctx.probe.clone(),
        ctx.batch_rows,
    );
    #[cfg(feature = "fault-injection")]
    crate::runtime::panics::inject_at_build();
    let control = ctx.control.clone();
    let checkpoint = ctx.checkpoint.clone();
    let id = checkpoint
        .as_ref()
        .map(|c| c.register(Contribution::SourceOffsets));
    // Resume from the restored checkpoint: the offsets of every worker, merged.
    let reader = reader.and_then(|mut r| {
        if let (Some(c), Some(id)) = (&checkpoint, &id) {
            let mut offsets = sluice_connectors::SourceOffsets::new();
            for file in c.restored(Contribution::SourceOffsets, id)? {
                let part: sluice_connectors::SourceOffsets = serde_json::from_slice(&file)
                    .map_err(|e| {
                        sluice_common::Error::Runtime(format!(
                            "checkpoint: source offsets of {name}: {e}"
                        ))
                    })?;
                offsets.extend(part);
            }
            if c.restore.is_some() {
                r.seek(&offsets)?;
            }
        }
        r.set_checkpointing(checkpoint.is_some());
        Ok(r)
    });
    let mut silent = reader
        .as_ref()
        .map(|r| r.silent_workers())
        .unwrap_or_default();
    silent.retain(|w| *w != ctx.index);
    let mut reader = match reader {
        Ok(r) => Some(r),
        Err(e) => {
            control.fail(e);
            None
        }
    };
    let sequence: Option<(Rc<SourceSequence>, usize)> =
        ctx.sequence.as_ref().map(|s| (s.clone(), s.register()));
    let epoch_length = ctx.epoch_length;
    let read_counter = metrics.read_counter(name);
    let operator: Rc<str> = format!("Source({name})").into();
    source::<_, EventBuilder, _, _>(scope, &format!("Source({name})"), move |cap, info| {
        let activator = scope.activator_for(info.address.clone());
        let mut cap = Some(cap);
        let mut epoch: Epoch = checkpoint.as_ref().map_or(0, |c| c.base);
        let mut checkpoints_asked = control.checkpoint_requests();
        if let Some(c) = cap.as_mut() {
            c.downgrade(&epoch);
        }
        let mut epoch_started = Instant::now();
        let mut splits = SplitWatermarks::default();
        let mut skipped_reported = 0;
        let mut last_data = Instant::now();
        let mut stopped = false;
        // Checkpoints that recorded this reader's offsets and are not known to be committed.
        let mut recorded: std::collections::VecDeque<Epoch> = Default::default();
        #[cfg(feature = "fault-injection")]
        let mut rows_seen = 0u64;
        move |output| {
            let _running = crate::runtime::panics::in_operator(&operator);
            let Some(c) = cap.as_mut() else { return };
            let Some(r) = reader.as_mut() else {
                cap = None;
                return;
            };
            if control.failed() {
                cap = None;
                return;
            }
            // Before any rows: the end of input of the workers that read nothing of this source,
            // so that receivers need not wait to hear it from them (see `silent_workers`).
            for w in silent.drain(..) {
                output
                    .session(c)
                    .give_container(&mut Event::watermark(w, MAX_WATERMARK, peers));
            }
            if control.is_cancelled() {
                // A graceful stop. Without checkpoints, just stop (no final watermark: stopping is
                // not the end of event time). With them, every source of the process stops after
                // the same checkpoint epoch, writing its (final) offsets there, and holds the next
                // epoch for one more step so that operators see the frontier pass it.
                let Some(ck) = checkpoint.as_ref() else {
                    cap = None;
                    return;
                };
                if stopped {
                    cap = None;
                    return;
                }
                let proposal = ck.next_checkpoint(epoch + 2 * MAX_EPOCHS_IN_FLIGHT + 1);
                let stop = control.propose_stop(proposal).max(epoch);
                if let Some(id) = &id {
                    if ck.is_checkpoint(stop) {
                        c.downgrade(&stop);
                        let name =
                            CheckpointContext::file_name(Contribution::SourceOffsets, id, index);
                        let offsets = serde_json::to_vec(&r.offsets()).expect("offsets serialize");
                        ck.writer.write(stop, name, offsets);
                        r.checkpoint(stop);
                        if let Some(r) = reader.take() {
                            ck.ended.lock().expect("not poisoned").push((r, Some(stop)));
                        }
                    }
                }
                c.downgrade(&(stop + 1));
                stopped = true;
                activator.activate_after(Duration::from_millis(5));
                return;
            }
            if let Some((seq, turn)) = &sequence {
                if !seq.may_run(*turn, &probe) {
                    if seq.epoch.get() > epoch {
                        epoch = seq.epoch.get();
                        c.downgrade(&epoch);
                    }
                    activator.activate_after(Duration::from_millis(1));
                    return;
                }
                seq.epoch.set(seq.epoch.get().max(epoch));
            }
            // Tell the reader about committed checkpoints: the newest one known, or (a storage
            // question, rate-limited by the store) the newest recorded.
            if let (Some(ck), Some(&newest)) = (checkpoint.as_ref(), recorded.back()) {
                let done = recorded
                    .iter()
                    .rev()
                    .copied()
                    .find(|e| ck.store.known_committed(*e))
                    .or_else(|| {
                        ck.store
                            .is_committed(newest)
                            .unwrap_or(false)
                            .then_some(newest)
                    });
                if let Some(e) = done {
                    recorded.retain(|r| *r > e);
                    if let Err(err) = r.committed(e) {
                        control.fail(err);
                        cap = None;
                        return;
                    }
                }
            }
            if epoch >= MAX_EPOCHS_IN_FLIGHT && probe.less_than(&(epoch - MAX_EPOCHS_IN_FLIGHT)) {
                activator.activate_after(Duration::from_millis(1));
                return;
            }
            let mut idle = false;
            let mut finished = false;
            let mut throttled = None;
            for _ in 0..8 {
                if let Some(wait) = control.ingest.wait() {
                    throttled = Some(wait);
                    break;
                }
                match r.poll(batch_rows) {
                    Ok(Poll::Batch { split, batch }) => {
                        control.ingest.consume(batch.num_rows());
                        read_counter.fetch_add(batch.num_rows() as u64, Ordering::Relaxed);
                        #[cfg(feature = "fault-injection")]
                        {
                            rows_seen += batch.num_rows() as u64;
                            crate::runtime::panics::inject(rows_seen);
                        }
                        last_data = Instant::now();
                        match prepare(batch) {
                            Ok((out, wm)) => {
                                if out.num_rows() > 0 {
                                    output.session(c).give_container(&mut Event::data(out));
                                }
                                splits.open(&r.open_splits());
                                if let Some(wm) = wm {
                                    splits.observe(split, wm);
                                }
                                if let Some(wm) = splits.take_pending() {
                                    metrics.source_watermark.store(wm, Ordering::Relaxed);
                                    output
                                        .session(c)
                                        .give_container(&mut Event::watermark(index, wm, peers));
                                }
                            }
                            Err(e) => {
                                control.fail(e);
                                cap = None;
                                return;
                            }
                        }
                    }
                    Ok(Poll::SplitDone { split }) => {
                        splits.done(split);
                        if let Some(wm) = splits.take_pending() {
                            metrics.source_watermark.store(wm, Ordering::Relaxed);
                            output
                                .session(c)
                                .give_container(&mut Event::watermark(index, wm, peers));
                        }
                    }
                    Ok(Poll::Idle) => {
                        idle = true;
                        break;
                    }
                    Ok(Poll::Finished) => {
                        finished = true;
                        break;
                    }
                    Err(e) => {
                        control.fail(e);
                        cap = None;
                        return;
                    }
                }
            }
            let skipped = r.skipped();
            if skipped > skipped_reported {
                metrics
                    .records_skipped
                    .fetch_add(skipped - skipped_reported, Ordering::Relaxed);
                skipped_reported = skipped;
            }
            if finished {
                // This worker's final offsets count for every later checkpoint: written once,
                // into the first checkpoint it will not reach, and inherited after that.
                if let (Some(ck), Some(id)) = (&checkpoint, &id) {
                    let name = format!(
                        "{}{FINAL_SUFFIX}",
                        CheckpointContext::file_name(Contribution::SourceOffsets, id, index)
                    );
                    let offsets = serde_json::to_vec(&r.offsets()).expect("offsets serialize");
                    ck.writer.write(ck.next_checkpoint(epoch), name, offsets);
                }
                // End of input: every window downstream may fire.
                output.session(c).give_container(&mut Event::watermark(
                    index,
                    MAX_WATERMARK,
                    peers,
                ));
                if let Some((seq, _)) = &sequence {
                    seq.finish(epoch);
                }
                // Kept until the job's end is recorded, then told so.
                if let (Some(ck), Some(r)) = (&checkpoint, reader.take()) {
                    ck.ended.lock().expect("not poisoned").push((r, None));
                }
                cap = None;
                return;
            }
            if idle && !splits.idle && idle_timeout.is_some_and(|t| last_data.elapsed() >= t) {
                // 'scan.watermark.idle-timeout': stop holding back downstream watermarks.
                splits.idle = true;
                output
                    .session(c)
                    .give_container(&mut Event::idle(index, splits.current, peers));
            }
            if epoch_started.elapsed() >= epoch_length {
                // Leaving a checkpoint epoch: record where this worker's reading stands.
                if let (Some(ck), Some(id)) = (&checkpoint, &id) {
                    if ck.is_checkpoint(epoch) {
                        let name =
                            CheckpointContext::file_name(Contribution::SourceOffsets, id, index);
                        let offsets = serde_json::to_vec(&r.offsets()).expect("offsets serialize");
                        ck.writer.write(epoch, name, offsets);
                        r.checkpoint(epoch);
                        recorded.push_back(epoch);
                    }
                }
                epoch += 1;
                // A checkpoint asked for: the epochs up to the next checkpoint epoch stay empty.
                let asked = control.checkpoint_requests();
                if asked != checkpoints_asked {
                    checkpoints_asked = asked;
                    if let Some(ck) = &checkpoint {
                        epoch = ck.next_checkpoint(epoch);
                    }
                }
                c.downgrade(&epoch);
                epoch_started = Instant::now();
            }
            if let Some(wait) = throttled {
                activator.activate_after(wait.min(Duration::from_millis(50)));
            } else if idle {
                activator.activate_after(Duration::from_millis(2));
            } else {
                activator.activate();
            }
        }
    })
}

/// The watermark of a source: the minimum over its live splits, each at the highest watermark
/// its rows allowed. Finished splits stop counting.
struct SplitWatermarks {
    splits: std::collections::BTreeMap<usize, i64>,
    current: i64,
    /// Whether the source told receivers it is idle.
    idle: bool,
}

impl Default for SplitWatermarks {
    fn default() -> Self {
        SplitWatermarks {
            splits: Default::default(),
            current: MIN_WATERMARK,
            idle: false,
        }
    }
}

impl SplitWatermarks {
    /// Splits that are open but have produced nothing hold the watermark at its minimum.
    fn open(&mut self, open: &[usize]) {
        for s in open {
            self.splits.entry(*s).or_insert(MIN_WATERMARK);
        }
    }

    fn observe(&mut self, split: usize, wm: i64) {
        let slot = self.splits.entry(split).or_insert(wm);
        *slot = (*slot).max(wm);
    }

    fn done(&mut self, split: usize) {
        self.splits.remove(&split);
    }

    /// The watermark to send: when it advanced, or after an idle spell (to say "back").
    fn take_pending(&mut self) -> Option<i64> {
        let advanced = self
            .splits
            .values()
            .copied()
            .min()
            .filter(|w| *w > self.current);
        if let Some(wm) = advanced {
            self.current = wm;
        }
        if advanced.is_some() || self.idle {
            self.idle = false;
            return Some(self.current);
        }
        None
    }
}

/// For a table scan: computed columns, the watermark, then the scan's projection (and, for a
/// `'late-data.sink'`, the whole physical row as a last struct column).
pub fn table_prepare(
    table: Arc<TableDef>,
    projection: Option<Vec<usize>>,
    schema: SchemaRef,
    carry_source_row: bool,
) -> Prepare {
    let mode = table.changelog_mode();
    // Upsert rows are whole only after ChangelogNormalize (a delete holds only its key).
    let full_schema = match mode {
        ChangelogMode::Upsert => sluice_common::changelog::all_nullable(&table.schema),
        _ => table.schema.clone(),
    };
    Box::new(move |batch| {
        // A changelog format's rows carry their change kinds in a last column.
        let mut full = match mode {
            ChangelogMode::InsertOnly => ChangeBatch::inserts(batch),
            _ => ChangeBatch::from_op_column(batch)?,
        };
        let source_row = carry_source_row.then(|| {
            Arc::new(arrow::array::StructArray::from(full.data.clone())) as arrow::array::ArrayRef
        });
        if !table.computed.is_empty() {
            let mut columns = full.data.columns().to_vec();
            for e in &table.computed {
                columns.push(evaluate(e, &full)?);
            }
            full = full.with_columns(full_schema.clone(), columns)?;
        }
        let wm = match &table.watermark {
            None => None,
            Some((_, expr)) => {
                let w = sluice_common::time::to_millis(&evaluate(expr, &full)?)?;
                arrow::compute::max(w.as_primitive::<TimestampMillisecondType>())
            }
        };
        let mut columns = match &projection {
            None => full.data.columns().to_vec(),
            Some(p) => full.data.project(p)?.columns().to_vec(),
        };
        columns.extend(source_row);
        let out = full.with_columns(schema.clone(), columns)?;
        Ok((out, wm))
    })
}

/// Rows of a `VALUES` clause, read by worker 0 in batches of the job's batch size.
pub struct ValuesReader {
    rows: Option<RecordBatch>,
    offset: usize,
}

impl ValuesReader {
    pub fn new(rows: RecordBatch, worker: usize) -> Self {
        ValuesReader {
            rows: (worker == 0).then_some(rows),
            offset: 0,
        }
    }
}

impl SourceReader for ValuesReader {
    fn offsets(&self) -> sluice_connectors::SourceOffsets {
        [("values".to_string(), self.offset as u64)]
            .into_iter()
            .collect()
    }

    fn seek(&mut self, offsets: &sluice_connectors::SourceOffsets) -> Result<()> {
        self.offset = offsets.get("values").copied().unwrap_or(0) as usize;
        Ok(())
    }

    fn poll(&mut self, max_rows: usize) -> Result<Poll> {
        let Some(rows) = &self.rows else {
            return Ok(Poll::Finished);
        };
        if self.offset >= rows.num_rows() {
            return Ok(Poll::Finished);
        }
        let n = max_rows.min(rows.num_rows() - self.offset);
        let batch = rows.slice(self.offset, n);
        self.offset += n;
        Ok(Poll::Batch { split: 0, batch })
    }
}
