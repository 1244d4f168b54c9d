//! The aggregation operator: applies batches to [`super::AggregateState`], fires windows by
//! watermark, wall clock or early-fire timer, snapshots (in full or as a delta), and writes the
//! rows it drops as late to the late-data sink.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use arrow::datatypes::SchemaRef;
use sluice_common::time::MAX_WATERMARK;
use sluice_common::{ChangeBatch, Result};
use sluice_connectors::open_sink;
use sluice_sql::TableDef;

use crate::build::{sink_spec, BuildContext};
use crate::checkpoint::{CheckpointContext, SinkTransactions};
use crate::operator::aggregate::snapshot::FrozenState;
use crate::operator::aggregate::AggregateState;
use crate::operator::driver::{Applied, Output, RestoreFrom, SnapshotTo, StatefulOperator};
use crate::runtime::control::JobControl;
use crate::runtime::metrics::JobMetrics;

/// How often processing-time windows check the clock.
pub(crate) const PROCTIME_TICK: Duration = Duration::from_millis(50);
/// How long after its end a processing-time window still takes rows (their way from where
/// `PROCTIME()` stamped them to the window).
pub(crate) const PROCTIME_GRACE: Duration = Duration::from_millis(200);

/// One worker's aggregation: its state, how it fires, and its late-row writer.
pub(crate) struct AggregateOperator {
    state: AggregateState,
    /// 'late-data.sink': rows dropped as late are written here, in the same two-phase commit
    /// as the job's sinks.
    late_writer: Option<LateWriter>,
    late_transactions: SinkTransactions,
    metrics: Arc<JobMetrics>,
    control: Arc<JobControl>,
    /// The job is checkpointed: the late-row writer's last rows are sealed at the end.
    seal_at_end: bool,
    /// Processing-time windows: only the end of input's watermark closes windows here; the
    /// wall clock closes the others.
    processing_time: bool,
    early_fire: Option<Duration>,
    /// Copies of the state for full snapshots come back here from the writer thread once
    /// written, and the next copy reuses their buffers.
    frozen: (
        std::sync::mpsc::Sender<FrozenState>,
        std::sync::mpsc::Receiver<FrozenState>,
    ),
}

struct LateWriter {
    writer: Box<dyn sluice_connectors::SinkWriter>,
    written: Arc<std::sync::atomic::AtomicU64>,
    schema: SchemaRef,
}

impl AggregateOperator {
    /// The aggregation of `state`, firing by `emit`; its late rows go to `late_table`.
    pub(crate) fn new(
        state: Result<AggregateState>,
        emit: sluice_sql::EmitPolicy,
        late_table: Option<Arc<TableDef>>,
        ctx: &BuildContext,
    ) -> Result<Self> {
        let mut state = state?;
        if ctx.checkpoint.is_some() {
            state.track_changes();
        }
        let late_writer = match &late_table {
            None => None,
            Some(t) => {
                let mut writer = open_sink(&sink_spec(t), ctx.index, ctx.peers)?;
                if let Some(c) = &ctx.checkpoint {
                    crate::checkpoint::transactions::begin(
                        writer.as_mut(),
                        &c.store,
                        c.restore.as_ref().map(|m| m.epoch),
                        ctx.index,
                        ctx.peers,
                    )?;
                }
                Some(LateWriter {
                    writer,
                    written: ctx.metrics.write_counter(&t.name),
                    schema: t.sink_schema(),
                })
            }
        };
        Ok(AggregateOperator {
            state,
            late_writer,
            late_transactions: SinkTransactions::default(),
            metrics: ctx.metrics.clone(),
            control: ctx.control.clone(),
            seal_at_end: ctx.checkpoint.is_some(),
            processing_time: emit.processing_time,
            early_fire: emit.early_fire_ms.map(Duration::from_millis),
            frozen: std::sync::mpsc::channel(),
        })
    }

    fn write_late(&mut self, rows: arrow::record_batch::RecordBatch) -> Result<()> {
        let Some(late) = self.late_writer.as_mut() else {
            return Ok(());
        };
        late.written
            .fetch_add(rows.num_rows() as u64, Ordering::Relaxed);
        let rows = arrow::record_batch::RecordBatch::try_new(
            late.schema.clone(),
            rows.columns().to_vec(),
        )?;
        late.writer.write(&ChangeBatch::inserts(rows))
    }
}

impl StatefulOperator for AggregateOperator {
    const NAME: &'static str = "Aggregate";

    fn on_batch(
        &mut self,
        _side: usize,
        batch: &ChangeBatch,
        _budget: usize,
        out: &mut Output,
    ) -> Result<Applied> {
        let outcome = self.state.apply(batch)?;
        if let Some(rows) = outcome.late {
            self.write_late(rows)?;
        }
        out.extend(outcome.output);
        Ok(Applied {
            consumed: batch.num_rows(),
            late: outcome.late_rows,
            null_time: outcome.null_time_rows,
            skipped: 0,
        })
    }

    fn on_watermark(
        &mut self,
        _side: usize,
        watermark: i64,
        made_at: i64,
        out: &mut Output,
    ) -> Result<()> {
        if self.processing_time && watermark != MAX_WATERMARK {
            return Ok(());
        }
        if let Some(fired) = self.state.advance_watermark(watermark)? {
            if watermark != MAX_WATERMARK && !self.processing_time {
                let took = (sluice_common::time::now_millis() - made_at).max(0);
                self.metrics
                    .window_fire_ms
                    .lock()
                    .expect("metrics")
                    .push(took as u32);
            }
            out.push(fired);
        }
        Ok(())
    }

    /// Writes this worker's state into the checkpoint, as Arrow IPC (in the background): only
    /// what changed since an earlier snapshot in a committed checkpoint when that is worth it
    /// (`delta_base`), else all of it.
    fn snapshot(&mut self, to: &SnapshotTo<'_>) -> Result<()> {
        let (ck, epoch) = (to.ck, to.epoch);
        let base = self
            .state
            .delta_base(|e| ck.store.is_committed(e).unwrap_or(false));
        match base {
            Some(b) => {
                let batch = self.state.snapshot_delta(b, epoch)?;
                ck.writer
                    .write_batch(epoch, format!("{}+{b}", to.stem), batch);
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
                        ck.writer.write_deferred(epoch, to.stem.clone(), build);
                    }
                    None => to.write(self.state.snapshot_full(epoch)?),
                }
            }
        }
        Ok(())
    }

    fn restore(&mut self, from: &RestoreFrom<'_>) -> Result<()> {
        let chains = from.ck.restored_chain_batches(from.id)?;
        self.state
            .restore_chains(&chains, CheckpointContext::owner(from.index, from.peers))
    }

    fn size(&self) -> (u64, u64) {
        (self.state.size_bytes() as u64, self.state.groups() as u64)
    }

    /// Processing-time windows close by the wall clock, checked this often; early firing emits
    /// partial results every delay.
    fn timer(&self) -> Option<Duration> {
        let proctime = self.processing_time.then_some(PROCTIME_TICK);
        match (self.early_fire, proctime) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn on_timer(&mut self, out: &mut Output) -> Result<()> {
        if self.processing_time {
            // A row may take up to PROCTIME_GRACE from being stamped to reaching this operator.
            let now = sluice_common::time::now_millis();
            out.extend(
                self.state
                    .advance_watermark(now - PROCTIME_GRACE.as_millis() as i64)?,
            );
        }
        if self.early_fire.is_some() {
            out.extend(self.state.early_fire()?);
        }
        Ok(())
    }

    fn sealed(&mut self, epoch: crate::runtime::Epoch) -> Result<()> {
        match self.late_writer.as_mut() {
            Some(late) => self.late_transactions.seal(late.writer.as_mut(), epoch),
            None => Ok(()),
        }
    }

    fn on_activation(&mut self, ck: &CheckpointContext) -> Result<Option<Duration>> {
        let Some(late) = self.late_writer.as_mut() else {
            return Ok(None);
        };
        let waiting = self
            .late_transactions
            .publish(late.writer.as_mut(), &ck.store)?;
        Ok(waiting.then_some(Duration::from_millis(20)))
    }

    fn on_end(&mut self) -> Result<()> {
        match self.late_writer.take() {
            Some(mut late) => {
                SinkTransactions::close(late.writer.as_mut(), &self.control, self.seal_at_end)
            }
            None => Ok(()),
        }
    }
}
