//! Grouped aggregation: updating (unwindowed), windowed, and session-windowed.
//!
//! Rows arrive partitioned by group key. Each batch is applied at once: keys are interned to
//! group ids, every accumulator is updated column-wise, and the changed groups emit their new
//! results. Windowed groups emit only when the watermark passes the window's end.

pub(crate) mod operator;
pub mod snapshot;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use arrow::array::{Array, ArrayRef, AsArray, StructArray, TimestampMillisecondArray};
use arrow::datatypes::{DataType, Field, Fields, SchemaRef, TimestampMillisecondType};
use arrow::record_batch::RecordBatch;
use arrow_row::{RowConverter, SortField};
use sluice_common::{ChangeBatch, Error, Op, Result};
use sluice_sql::{AggCall, AggFunc, AggWindow, EmitPolicy, PhysExpr, SessionOutput, WindowKind};
use sluice_state::{AccKind, Accumulator, ByteSlots, DistinctFamily, GroupTable};

use crate::operator::stateless::evaluate;

/// The aggregation state of one worker.
pub struct AggregateState {
    // Fields are crate-visible for `aggregate_snapshot`.
    group: Vec<PhysExpr>,
    calls: Vec<AggCall>,
    pub(crate) accs: Vec<Accumulator>,
    pub(crate) table: GroupTable,
    /// Net row count per group: a group exists while it is positive.
    pub(crate) rows: Vec<i64>,
    pub(crate) window: AggWindow,
    schema: SchemaRef,
    /// Assigned windows: groups by window end.
    pub(crate) by_end: BTreeMap<i64, Vec<u32>>,
    /// When windows emit updates (early firing, allowed lateness).
    pub(crate) emit: EmitPolicy,
    /// Fired windows kept for allowed lateness, by the watermark that ends their stay.
    pub(crate) cleanup: BTreeMap<i64, Vec<u32>>,
    /// The last result emitted per group (row-encoded aggregates), for `-U` rows.
    pub(crate) last: ByteSlots,
    /// Groups changed since they were last emitted.
    dirty: Vec<u32>,
    pub(crate) is_dirty: Vec<bool>,
    /// Scratch: groups already seen in the batch being applied.
    marks: Vec<bool>,
    /// The input column carrying source rows for `'late-data.sink'`.
    late_column: Option<usize>,
    pub(crate) sessions: Option<Sessions>,
    pub(crate) watermark: i64,
    gids: Vec<u32>,
    result_rows: Option<RowConverter>,
    /// No GROUP BY: one group under a constant key that is not part of the output.
    pub(crate) global: bool,
    /// What changed since the last snapshot (incremental checkpoints).
    pub(crate) changes: crate::operator::aggregate::snapshot::Changes,
    /// The group keys rows are partitioned by (positions), when not all of them: a windowed
    /// aggregation partitioned before its windows are assigned. Key groups hash these.
    pub(crate) partition_keys: Option<Vec<usize>>,
    /// HOP windows aggregated in panes (see [`Slicing`]).
    pub(crate) slicing: Option<Slicing>,
    /// HOP or CUMULATE windows aggregated as copies of each row (one per window): the input
    /// column of the row's time, and the windows, to tell a row's last window apart. A row is
    /// late when its last window has fired (as in Flink); it is counted, and written to a
    /// late-data sink, once.
    copies: Option<(Option<usize>, sluice_sql::WindowKind)>,
    /// DISTINCT aggregates over the same column, differing in their FILTER, that share one
    /// value table: the family and the positions of its calls.
    families: Vec<Family>,
    /// Whether each call is updated through a family.
    in_family: Vec<bool>,
}

/// A HOP window aggregated in slices, as Flink does: each row updates one group, its key's
/// *pane* (the slide-long stretch of time it falls in; the window assignment gives panes), and
/// a window's result merges the panes it spans when it fires. One state update per row instead
/// of one per window (size / slide of them). Groups are panes, listed in `by_end` by pane end;
/// a pane is dropped when the last window it is part of fired.
pub(crate) struct Slicing {
    size: i64,
    slide: i64,
    /// The end of the last window fired: every window ending at or before it has.
    pub(crate) fired_until: i64,
    /// Per pane restored from a checkpoint: the end of the last window the worker that held it
    /// had fired (after rescaling, panes come from workers whose watermarks differed).
    pub(crate) restored_fired: Vec<i64>,
    /// Pane keys without the window bounds, interned: the panes of one key share an id.
    keys: GroupTable,
    /// Per pane, its key's id (`NO_KEY` until its first window fires), and per key id, its
    /// panes.
    pane_key: Vec<u32>,
    key_panes: Vec<u32>,
    /// Scratch while a window fires: the merged group of each key id.
    merged_of_key: Vec<u32>,
}

const NO_KEY: u32 = u32::MAX;

/// Session windows: per key, its open sessions; each session owns an accumulator slot.
pub(crate) struct Sessions {
    gap: i64,
    time: PhysExpr,
    output: SessionOutput,
    pub(crate) open: HashMap<u32, Vec<Session>>,
    pub(crate) ends: BTreeSet<(i64, u32)>,
    pub(crate) slot_key: Vec<u32>,
    pub(crate) free_slots: Vec<u32>,
    pub(crate) slots: usize,
}

#[derive(Clone, Copy)]
pub(crate) struct Session {
    pub(crate) start: i64,
    pub(crate) end: i64,
    pub(crate) slot: u32,
}

/// What a batch did: its changes, and the rows it dropped as late.
pub struct ApplyOutcome {
    pub late_rows: u64,
    /// Rows a session window dropped because their event time was NULL.
    pub null_time_rows: u64,
    pub output: Option<ChangeBatch>,
    /// With a `'late-data.sink'`: the late rows' source rows, to be written there.
    pub late: Option<RecordBatch>,
}

pub(crate) fn acc_kind(f: AggFunc) -> AccKind {
    match f {
        AggFunc::Count => AccKind::Count,
        AggFunc::Sum => AccKind::Sum,
        AggFunc::Avg => AccKind::Avg,
        AggFunc::Min => AccKind::Min,
        AggFunc::Max => AccKind::Max,
    }
}

impl AggregateState {
    pub fn try_new(
        group: Vec<PhysExpr>,
        calls: Vec<AggCall>,
        window: AggWindow,
        emit: EmitPolicy,
        late_column: Option<usize>,
        schema: SchemaRef,
        input_schema: &arrow::datatypes::Schema,
    ) -> Result<Self> {
        let global = group.is_empty();
        let key_fields = group
            .iter()
            .map(|g| g.data_type(input_schema).map(SortField::new))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| Error::Runtime(e.to_string()))?;
        // Without GROUP BY there is one group: key it by a constant, never output.
        let key_fields = if global {
            vec![SortField::new(DataType::Boolean)]
        } else {
            key_fields
        };
        let mut accs = vec![];
        for c in &calls {
            let input_type = match &c.arg {
                Some(a) => a
                    .data_type(input_schema)
                    .map_err(|e| Error::Runtime(e.to_string()))?,
                None => DataType::Null,
            };
            accs.push(Accumulator::try_new(
                acc_kind(c.func),
                input_type,
                c.output_type.clone(),
                c.distinct,
            )?);
        }
        let families = distinct_families(&calls, &mut accs, input_schema)?;
        let mut in_family = vec![false; calls.len()];
        for (_, members) in &families {
            for &m in members {
                in_family[m] = true;
            }
        }
        let sessions = match &window {
            AggWindow::Session { gap, time, output } => Some(Sessions {
                gap: *gap,
                time: time.clone(),
                output: *output,
                open: HashMap::new(),
                ends: BTreeSet::new(),
                slot_key: vec![],
                free_slots: vec![],
                slots: 0,
            }),
            _ => None,
        };
        let result_types: Vec<SortField> = calls
            .iter()
            .map(|c| SortField::new(c.output_type.clone()))
            .collect();
        let result_rows = if result_types.is_empty() {
            None
        } else {
            Some(RowConverter::new(result_types)?)
        };
        Ok(AggregateState {
            group,
            calls,
            accs,
            table: GroupTable::try_new(key_fields)?,
            rows: vec![],
            window,
            schema,
            by_end: BTreeMap::new(),
            emit,
            cleanup: BTreeMap::new(),
            last: ByteSlots::default(),
            dirty: vec![],
            is_dirty: vec![],
            marks: vec![],
            late_column,
            sessions,
            watermark: i64::MIN,
            gids: vec![],
            result_rows,
            global,
            partition_keys: None,
            changes: Default::default(),
            slicing: None,
            copies: None,
            families,
            in_family,
        })
    }

    /// Declares that the input never retracts (MIN/MAX then keep only their extreme).
    /// Rows arrive partitioned by these group keys only (positions among the group keys), so
    /// each group's key group is computed from them.
    pub fn partition_by(&mut self, keys: Vec<usize>) {
        self.partition_keys = Some(keys);
    }

    /// Aggregates HOP windows of `size` and `slide` (`size` a multiple of `slide`) in panes:
    /// the rows arrive with their pane as window bounds (a tumbling window of `slide`).
    pub fn slice(
        &mut self,
        size: i64,
        slide: i64,
        input_schema: &arrow::datatypes::Schema,
    ) -> Result<()> {
        let AggWindow::Assigned {
            start_key, end_key, ..
        } = self.window
        else {
            return Err(Error::Runtime(
                "internal: only assigned windows are sliced".into(),
            ));
        };
        let fields = self
            .group
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != start_key && *i != end_key)
            .map(|(_, g)| g.data_type(input_schema).map(SortField::new))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| Error::Runtime(e.to_string()))?;
        self.slicing = Some(Slicing {
            size,
            slide,
            fired_until: i64::MIN,
            restored_fired: vec![],
            keys: GroupTable::try_new(fields)?,
            pane_key: vec![],
            key_panes: vec![],
            merged_of_key: vec![],
        });
        Ok(())
    }

    /// Rows arrive as one copy per HOP or CUMULATE window, with their time in input column
    /// `time` when the input keeps it (a HOP row's copies are told apart by it; without it,
    /// each late copy counts).
    pub fn windows_as_copies(&mut self, time: Option<usize>, kind: sluice_sql::WindowKind) {
        self.copies = Some((time, kind));
    }

    pub fn assume_append_only_input(&mut self) {
        for a in &mut self.accs {
            a.set_append_only();
        }
        for (family, _) in &self.families {
            family
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .set_append_only();
        }
    }

    /// Approximate bytes of state.
    pub fn size_bytes(&self) -> usize {
        self.table.size_bytes()
            + self.rows.capacity() * 8
            + self.last.size_bytes()
            + self.accs.iter().map(|a| a.size_bytes()).sum::<usize>()
            + self.slicing.as_ref().map_or(0, |s| {
                s.keys.size_bytes() + (s.pane_key.capacity() + s.key_panes.capacity()) * 4
            })
    }

    /// Number of live groups.
    pub fn groups(&self) -> usize {
        self.table.len()
    }

    fn eval_keys(&self, batch: &ChangeBatch) -> Result<Vec<ArrayRef>> {
        if self.global {
            return Ok(vec![Arc::new(arrow::array::BooleanArray::from(vec![
                true;
                batch
                    .num_rows(
                    )
            ]))]);
        }
        self.group.iter().map(|g| evaluate(g, batch)).collect()
    }

    /// Key columns for output (none for a global aggregation).
    pub(crate) fn output_keys(&self, gids: &[u32]) -> Result<Vec<ArrayRef>> {
        if self.global || gids.is_empty() {
            return Ok(vec![]);
        }
        self.format_keys(self.table.keys(gids)?)
    }

    /// Group key columns as output: legacy group windows' bounds as one struct column.
    fn format_keys(&self, keys: Vec<ArrayRef>) -> Result<Vec<ArrayRef>> {
        let AggWindow::Assigned {
            start_key,
            end_key,
            as_struct: true,
        } = self.window
        else {
            return Ok(keys);
        };
        // Legacy group windows output their bounds as one struct column.
        let mut out = vec![];
        for (i, k) in keys.iter().enumerate() {
            if i == start_key {
                out.push(window_struct(k, &keys[end_key])?);
            } else if i != end_key {
                out.push(k.clone());
            }
        }
        Ok(out)
    }

    fn signs(batch: &ChangeBatch) -> Vec<i64> {
        // (see also `call_signs`, a call's signs after its FILTER)
        (0..batch.num_rows()).map(|i| batch.op(i).sign()).collect()
    }

    fn update_accumulators(
        &mut self,
        batch: &ChangeBatch,
        slots: &[u32],
        signs: &[i64],
        capacity: usize,
    ) -> Result<()> {
        for (i, (call, acc)) in self.calls.iter().zip(self.accs.iter_mut()).enumerate() {
            acc.resize(capacity);
            if self.in_family[i] {
                continue;
            }
            let values = match &call.arg {
                Some(a) => Some(evaluate(a, batch)?),
                None => None,
            };
            let s = call_signs(call, batch, signs)?;
            acc.update(slots, &s, values.as_ref())?;
        }
        for (family, members) in &self.families {
            let arg = self.calls[members[0]]
                .arg
                .as_ref()
                .expect("DISTINCT has an argument");
            let values = evaluate(arg, batch)?;
            let member_signs = members
                .iter()
                .map(|&m| call_signs(&self.calls[m], batch, signs))
                .collect::<Result<Vec<_>>>()?;
            let member_signs: Vec<&[i64]> = member_signs.iter().map(|s| &s[..]).collect();
            let effective = family.lock().unwrap_or_else(|p| p.into_inner()).update(
                slots,
                &member_signs,
                &values,
            )?;
            for (&m, effective) in members.iter().zip(&effective) {
                self.accs[m].update_distinct(slots, effective, &values)?;
            }
        }
        Ok(())
    }

    /// Applies a batch of input rows.
    pub fn apply(&mut self, batch: &ChangeBatch) -> Result<ApplyOutcome> {
        if self.sessions.is_some() {
            return self.apply_sessions(batch);
        }
        let keys = self.eval_keys(batch)?;
        let mut signs = Self::signs(batch);
        let mut late: Vec<u32> = vec![];
        let end_key = match self.window {
            AggWindow::Assigned { end_key, .. } => Some(end_key),
            _ => None,
        };
        let lateness = self.emit.allowed_lateness_ms;
        // A sliced pane's row is late once the last window the pane is part of has fired.
        let last_window = self.slicing.as_ref().map_or(0, |s| s.size - s.slide);
        if let Some(end_key) = end_key {
            let ends = keys[end_key].as_primitive::<TimestampMillisecondType>();
            for (i, s) in signs.iter_mut().enumerate() {
                if ends.value(i).saturating_add(last_window + lateness) <= self.watermark {
                    *s = 0;
                    late.push(i as u32);
                }
            }
            // Copies of one row: only its last window's copy counts (the others are late then
            // too, being earlier).
            if let (Some((time, kind)), false, AggWindow::Assigned { start_key, .. }) =
                (self.copies, late.is_empty(), &self.window)
            {
                let times = match time {
                    Some(t) => Some(sluice_common::time::to_millis(batch.data.column(t))?),
                    None => None,
                };
                let times = times
                    .as_ref()
                    .map(|t| t.as_primitive::<TimestampMillisecondType>());
                let starts = keys[*start_key].as_primitive::<TimestampMillisecondType>();
                late.retain(|&i| {
                    let (i, start) = (i as usize, starts.value(i as usize));
                    match (kind, times) {
                        (WindowKind::Hop { slide, .. }, Some(times)) => {
                            start == times.value(i).div_euclid(slide) * slide
                        }
                        (WindowKind::Cumulate { size, .. }, _) => ends.value(i) - start == size,
                        _ => true,
                    }
                });
            }
        }
        let rows = self.table.encode(&keys)?;
        let mut gids = std::mem::take(&mut self.gids);
        self.table.intern(&rows, &mut gids);
        let capacity = self.table.capacity();
        self.rows.resize(capacity, 0);
        self.is_dirty.resize(capacity, false);
        // Groups touched, in first-seen order; whether each existed before; its first row.
        self.marks.resize(capacity, false);
        let mut touched: Vec<u32> = vec![];
        let mut existed: Vec<bool> = vec![];
        let mut first_row: Vec<usize> = vec![];
        for (i, (&g, &s)) in gids.iter().zip(&signs).enumerate() {
            if s != 0 && !self.marks[g as usize] {
                self.marks[g as usize] = true;
                existed.push(self.rows[g as usize] > 0);
                first_row.push(i);
                touched.push(g);
            }
        }
        for &g in &touched {
            self.marks[g as usize] = false;
            self.changes.mark(g, self.table.len());
        }
        let Some(end_key) = end_key else {
            // Unwindowed: every change is emitted now.
            let before: Vec<u32> = touched
                .iter()
                .zip(&existed)
                .filter(|(_, e)| **e)
                .map(|(g, _)| *g)
                .collect();
            let old = if before.is_empty() {
                None
            } else {
                Some(self.results(&before)?)
            };
            self.update_accumulators(batch, &gids, &signs, capacity)?;
            for (&g, &s) in gids.iter().zip(&signs) {
                self.rows[g as usize] += s;
            }
            let output = self.emit_changes(&touched, &existed, old)?;
            for &g in &touched {
                if self.rows[g as usize] <= 0 {
                    self.free_group(g);
                }
            }
            self.gids = gids;
            let late = self.late_rows(batch, late)?;
            return Ok(ApplyOutcome {
                late_rows: late.0,
                null_time_rows: 0,
                output,
                late: late.1,
            });
        };
        self.update_accumulators(batch, &gids, &signs, capacity)?;
        for (&g, &s) in gids.iter().zip(&signs) {
            self.rows[g as usize] += s;
        }
        let ends = keys[end_key].as_primitive::<TimestampMillisecondType>();
        let mut refire = vec![];
        for (t, &g) in touched.iter().enumerate() {
            let end = ends.value(first_row[t]);
            // A pane stays listed by its end until its last window fired.
            let fired = end <= self.watermark && self.slicing.is_none();
            if !existed[t] {
                if fired {
                    self.cleanup.entry(end + lateness).or_default().push(g);
                } else {
                    self.by_end.entry(end).or_default().push(g);
                }
            }
            if fired {
                // A late row within the allowed lateness updates a fired window at once.
                refire.push(g);
            } else if self.emit.early_fire_ms.is_some() && !self.is_dirty[g as usize] {
                self.is_dirty[g as usize] = true;
                self.dirty.push(g);
            }
        }
        let output = if refire.is_empty() {
            None
        } else {
            self.emit_window_updates(&refire)?
        };
        self.gids = gids;
        let late = self.late_rows(batch, late)?;
        Ok(ApplyOutcome {
            late_rows: late.0,
            null_time_rows: 0,
            output,
            late: late.1,
        })
    }

    /// Emits each group's current result against the last one emitted for it: `+I` the first
    /// time, then `-U`/`+U` when it changed.
    fn emit_window_updates(&mut self, gids: &[u32]) -> Result<Option<ChangeBatch>> {
        let before: Vec<u32> = gids
            .iter()
            .copied()
            .filter(|g| self.last.contains(*g))
            .collect();
        let existed: Vec<bool> = gids.iter().map(|g| self.last.contains(*g)).collect();
        let old = match (&self.result_rows, before.is_empty()) {
            (Some(conv), false) => {
                let parser = conv.parser();
                Some(
                    conv.convert_rows(
                        before
                            .iter()
                            .map(|g| parser.parse(self.last.get(*g).unwrap_or_default())),
                    )?,
                )
            }
            _ => None,
        };
        let out = self.emit_changes(gids, &existed, old)?;
        let current = self.results(gids)?;
        let encoded = match &self.result_rows {
            Some(conv) => Some(conv.convert_columns(&current)?),
            None => None,
        };
        for (i, g) in gids.iter().enumerate() {
            let row = encoded.as_ref().map(|r| r.row(i));
            self.last
                .set(*g, row.as_ref().map_or(&[][..], |r| r.as_ref()));
            self.changes.mark(*g, self.table.len());
            self.is_dirty[*g as usize] = false;
        }
        Ok(out)
    }

    /// Early firing: the partial results of open windows that changed since they were last emitted.
    pub fn early_fire(&mut self) -> Result<Option<ChangeBatch>> {
        let dirty: Vec<u32> = std::mem::take(&mut self.dirty)
            .into_iter()
            .filter(|g| self.is_dirty[*g as usize])
            .collect();
        if dirty.is_empty() {
            return Ok(None);
        }
        self.emit_window_updates(&dirty)
    }

    /// The count of late rows and, with a late-data sink, their source rows.
    fn late_rows(&self, batch: &ChangeBatch, late: Vec<u32>) -> Result<(u64, Option<RecordBatch>)> {
        let n = late.len() as u64;
        let Some(column) = self.late_column.filter(|_| n > 0) else {
            return Ok((n, None));
        };
        let rows = arrow::compute::take(
            batch.data.column(column),
            &arrow::array::UInt32Array::from(late),
            None,
        )?;
        Ok((n, Some(RecordBatch::from(rows.as_struct().clone()))))
    }

    fn free_group(&mut self, g: u32) {
        self.changes.removed(&self.table, g);
        self.table.remove(g);
        self.rows[g as usize] = 0;
        self.last.remove(g);
        if let Some(d) = self.is_dirty.get_mut(g as usize) {
            *d = false;
        }
        for acc in &mut self.accs {
            acc.reset(g);
        }
        if let Some(s) = &mut self.slicing {
            if let Some(k) = s.pane_key.get_mut(g as usize) {
                let key = std::mem::replace(k, NO_KEY);
                if key != NO_KEY {
                    s.key_panes[key as usize] -= 1;
                    if s.key_panes[key as usize] == 0 {
                        s.keys.remove(key);
                    }
                }
            }
            if let Some(f) = s.restored_fired.get_mut(g as usize) {
                *f = i64::MIN;
            }
        }
    }

    /// Aggregate results for groups (or session slots).
    pub(crate) fn results(&self, slots: &[u32]) -> Result<Vec<ArrayRef>> {
        self.accs
            .iter()
            .map(|a| a.evaluate(slots).map_err(Error::from))
            .collect()
    }

    /// Emits `+I`, `-U`/`+U` pairs and `-D` for changed groups.
    fn emit_changes(
        &mut self,
        touched: &[u32],
        existed: &[bool],
        old: Option<Vec<ArrayRef>>,
    ) -> Result<Option<ChangeBatch>> {
        let after: Vec<u32> = touched
            .iter()
            .copied()
            .filter(|g| self.rows[*g as usize] > 0)
            .collect();
        let new = self.results(&after)?;
        let old = old.unwrap_or_default();
        let keys_before: Vec<u32> = touched
            .iter()
            .zip(existed)
            .filter(|(_, e)| **e)
            .map(|(g, _)| *g)
            .collect();
        // Results compare as row-encoded bytes, converted once for the whole batch.
        let (old_rows, new_rows) = match &self.result_rows {
            Some(conv) if !old.is_empty() && !new.is_empty() => (
                Some(conv.convert_columns(&old)?),
                Some(conv.convert_columns(&new)?),
            ),
            _ => (None, None),
        };
        let keys_old = self.output_keys(&keys_before)?;
        let keys_new = self.output_keys(&after)?;
        // (source 0 = old rows, 1 = new rows, row index, op)
        let mut picks: Vec<(usize, usize, Op)> = vec![];
        let (mut oi, mut ni) = (0, 0);
        for (g, &was) in touched.iter().zip(existed) {
            let is = self.rows[*g as usize] > 0;
            match (was, is) {
                (true, true) => {
                    let same = match (&old_rows, &new_rows) {
                        (Some(o), Some(n)) => o.row(oi) == n.row(ni),
                        _ => true,
                    };
                    if !same {
                        picks.push((0, oi, Op::UpdateBefore));
                        picks.push((1, ni, Op::UpdateAfter));
                    }
                    oi += 1;
                    ni += 1;
                }
                (false, true) => {
                    picks.push((1, ni, Op::Insert));
                    ni += 1;
                }
                (true, false) => {
                    picks.push((0, oi, Op::Delete));
                    oi += 1;
                }
                (false, false) => {}
            }
        }
        if picks.is_empty() {
            return Ok(None);
        }
        let old_cols: Vec<ArrayRef> = keys_old.into_iter().chain(old).collect();
        let new_cols: Vec<ArrayRef> = keys_new.into_iter().chain(new).collect();
        let indices: Vec<(usize, usize)> = picks.iter().map(|(s, r, _)| (*s, *r)).collect();
        let mut columns = vec![];
        for c in 0..self.schema.fields().len() {
            let sources: Vec<&dyn Array> = vec![
                old_cols
                    .get(c)
                    .map(|a| a.as_ref())
                    .unwrap_or_else(|| new_cols[c].as_ref()),
                new_cols
                    .get(c)
                    .map(|a| a.as_ref())
                    .unwrap_or_else(|| old_cols[c].as_ref()),
            ];
            columns.push(arrow::compute::interleave(&sources, &indices)?);
        }
        let columns = self.cast_columns(columns)?;
        let data = RecordBatch::try_new(self.schema.clone(), columns)?;
        Ok(Some(ChangeBatch::with_ops(
            data,
            picks.into_iter().map(|p| p.2).collect(),
        )))
    }

    fn cast_columns(&self, columns: Vec<ArrayRef>) -> Result<Vec<ArrayRef>> {
        columns
            .into_iter()
            .zip(self.schema.fields())
            .map(|(c, f)| {
                if c.data_type() == f.data_type() {
                    Ok(c)
                } else {
                    Ok(arrow::compute::cast(&c, f.data_type())?)
                }
            })
            .collect()
    }

    /// Advances the watermark; returns the results of windows it closed.
    pub fn advance_watermark(&mut self, watermark: i64) -> Result<Option<ChangeBatch>> {
        if watermark <= self.watermark {
            return Ok(None);
        }
        self.watermark = watermark;
        if self.sessions.is_some() {
            return self.fire_sessions();
        }
        if !matches!(self.window, AggWindow::Assigned { .. }) {
            return Ok(None);
        }
        if self.slicing.is_some() {
            return self.fire_slices(watermark);
        }
        let mut fired = vec![];
        while let Some((&end, _)) = self.by_end.first_key_value() {
            if end > watermark {
                break;
            }
            let gids = self.by_end.pop_first().expect("present").1;
            for g in &gids {
                self.changes.mark(*g, self.table.len());
            }
            let lateness = self.emit.allowed_lateness_ms;
            if lateness > 0 {
                self.cleanup
                    .entry(end + lateness)
                    .or_default()
                    .extend(gids.iter().copied());
            }
            fired.extend(gids.into_iter().filter(|g| self.rows[*g as usize] > 0));
        }
        let output = if fired.is_empty() {
            None
        } else if self.emit.is_updating() {
            // Only what changed since an early firing needs emitting.
            let pending: Vec<u32> = fired
                .iter()
                .copied()
                .filter(|g| self.is_dirty[*g as usize] || !self.last.contains(*g))
                .collect();
            if pending.is_empty() {
                None
            } else {
                self.emit_window_updates(&pending)?
            }
        } else {
            let mut columns = self.output_keys(&fired)?;
            columns.extend(self.results(&fired)?);
            let columns = self.cast_columns(columns)?;
            Some(ChangeBatch::inserts(RecordBatch::try_new(
                self.schema.clone(),
                columns,
            )?))
        };
        if self.emit.allowed_lateness_ms == 0 {
            for g in fired {
                self.free_group(g);
            }
        }
        while let Some((&until, _)) = self.cleanup.first_key_value() {
            if until > watermark {
                break;
            }
            for g in self.cleanup.pop_first().expect("present").1 {
                if self.rows[g as usize] > 0 {
                    self.free_group(g);
                }
            }
        }
        Ok(output)
    }

    /// Sliced HOP windows: fires every window that ends at or before `watermark` and holds a
    /// pane, oldest first, and drops the panes whose last window fired.
    fn fire_slices(&mut self, watermark: i64) -> Result<Option<ChangeBatch>> {
        let mut out = vec![];
        while let Some(s) = &self.slicing {
            let (size, slide) = (s.size, s.slide);
            let Some(&first_end) = self.by_end.keys().next() else {
                break;
            };
            // Windows between the last fired and the oldest pane's first hold no pane.
            let end = match s.fired_until {
                i64::MIN => first_end,
                f => (f + slide).max(first_end),
            };
            if end > watermark {
                break;
            }
            let panes: Vec<u32> = self
                .by_end
                .range(end - size + 1..=end)
                .flat_map(|(_, gids)| gids.iter().copied())
                .filter(|g| self.rows[*g as usize] > 0)
                .collect();
            if let Some(batch) = self.fire_window(end, size, &panes)? {
                out.push(batch);
            }
            if let Some(s) = &mut self.slicing {
                s.fired_until = end;
            }
            while let Some((&pane_end, _)) = self.by_end.first_key_value() {
                if pane_end + size - slide > end {
                    break;
                }
                for g in self.by_end.pop_first().expect("present").1 {
                    self.changes.mark(g, self.table.len());
                    if self.rows[g as usize] > 0 {
                        self.free_group(g);
                    }
                }
            }
        }
        match out.len() {
            0 => Ok(None),
            1 => Ok(out.pop().map(ChangeBatch::inserts)),
            _ => Ok(Some(ChangeBatch::inserts(arrow::compute::concat_batches(
                &self.schema,
                &out,
            )?))),
        }
    }

    /// The results of the window ending at `end`, per key: its panes merged into scratch
    /// accumulator slots past the group table's, which are cleared again.
    fn fire_window(&mut self, end: i64, size: i64, panes: &[u32]) -> Result<Option<RecordBatch>> {
        let AggWindow::Assigned {
            start_key, end_key, ..
        } = self.window
        else {
            return Ok(None);
        };
        let capacity = self.table.capacity();
        let s = self.slicing.as_mut().expect("sliced");
        s.pane_key.resize(capacity, NO_KEY);
        // Key ids of the panes in their first window.
        let new: Vec<u32> = panes
            .iter()
            .copied()
            .filter(|g| s.pane_key[*g as usize] == NO_KEY)
            .collect();
        if !new.is_empty() {
            let keys: Vec<ArrayRef> = self
                .table
                .keys(&new)?
                .into_iter()
                .enumerate()
                .filter(|(i, _)| *i != start_key && *i != end_key)
                .map(|(_, k)| k)
                .collect();
            let rows = s.keys.encode(&keys)?;
            let mut ids = vec![];
            s.keys.intern(&rows, &mut ids);
            s.key_panes.resize(s.keys.capacity(), 0);
            for (g, k) in new.iter().zip(ids) {
                s.pane_key[*g as usize] = k;
                s.key_panes[k as usize] += 1;
            }
        }
        // One scratch slot per key; a key whose window was fired before a restore is skipped.
        s.merged_of_key.resize(s.keys.capacity(), NO_KEY);
        let mut first_pane: Vec<u32> = vec![];
        let mut fired_before: Vec<bool> = vec![];
        for acc in &mut self.accs {
            acc.resize(capacity + panes.len());
        }
        for &g in panes {
            let k = s.pane_key[g as usize] as usize;
            if s.merged_of_key[k] == NO_KEY {
                s.merged_of_key[k] = first_pane.len() as u32;
                first_pane.push(g);
                fired_before.push(false);
            }
            let t = s.merged_of_key[k];
            if s.restored_fired.get(g as usize).is_some_and(|f| *f >= end) {
                fired_before[t as usize] = true;
            }
            for acc in &mut self.accs {
                acc.combine(capacity as u32 + t, g);
            }
        }
        for &g in panes {
            s.merged_of_key[s.pane_key[g as usize] as usize] = NO_KEY;
        }
        let (firsts, merged): (Vec<u32>, Vec<u32>) = first_pane
            .iter()
            .zip(&fired_before)
            .enumerate()
            .filter(|(_, (_, before))| !**before)
            .map(|(t, (g, _))| (*g, (capacity + t) as u32))
            .unzip();
        let batch = if firsts.is_empty() {
            None
        } else {
            let mut keys = self.table.keys(&firsts)?;
            for (i, at) in [(start_key, end - size), (end_key, end)] {
                let bound = TimestampMillisecondArray::from(vec![at; firsts.len()]);
                keys[i] = arrow::compute::cast(&bound, keys[i].data_type())?;
            }
            let mut columns = self.format_keys(keys)?;
            columns.extend(self.results(&merged)?);
            let columns = self.cast_columns(columns)?;
            Some(RecordBatch::try_new(self.schema.clone(), columns)?)
        };
        for t in 0..first_pane.len() {
            for acc in &mut self.accs {
                acc.reset((capacity + t) as u32);
            }
        }
        Ok(batch)
    }

    fn apply_sessions(&mut self, batch: &ChangeBatch) -> Result<ApplyOutcome> {
        let keys = self.eval_keys(batch)?;
        let signs = Self::signs(batch);
        let s = self.sessions.as_mut().expect("session state");
        let times = sluice_common::time::to_millis(&evaluate(&s.time, batch)?)?;
        let times = times.as_primitive::<TimestampMillisecondType>().clone();
        let rows = self.table.encode(&keys)?;
        let mut gids = std::mem::take(&mut self.gids);
        self.table.intern(&rows, &mut gids);
        self.rows.resize(self.table.capacity(), 0);
        let s = self.sessions.as_mut().expect("session state");
        let mut slots = vec![0u32; gids.len()];
        let mut row_signs = signs.clone();
        let mut forward: HashMap<u32, u32> = HashMap::new();
        let mut late: Vec<u32> = vec![];
        let mut merges: Vec<(u32, u32)> = vec![];
        let mut released: Vec<u32> = vec![];
        let mut null_time_rows = 0;
        for i in 0..gids.len() {
            null_time_rows += u64::from(times.is_null(i) && signs[i] > 0);
            if times.is_null(i) || signs[i] <= 0 {
                // Sessions take append-only input (checked by the planner); NULL times are dropped.
                row_signs[i] = 0;
                continue;
            }
            let t = times.value(i);
            if t + s.gap <= self.watermark {
                row_signs[i] = 0;
                late.push(i as u32);
                continue;
            }
            let key = gids[i];
            self.changes.mark(key, self.table.len());
            self.rows[key as usize] += 1;
            let list = s.open.entry(key).or_default();
            let (mut start, mut end) = (t, t + s.gap);
            let mut keep: Option<u32> = None;
            let mut rest = Vec::with_capacity(list.len());
            for sess in list.drain(..) {
                if sess.start < end && start < sess.end {
                    start = start.min(sess.start);
                    end = end.max(sess.end);
                    s.ends.remove(&(sess.end, sess.slot));
                    match keep {
                        None => keep = Some(sess.slot),
                        Some(k) => {
                            merges.push((k, sess.slot));
                            forward.insert(sess.slot, k);
                            // Freed only after this batch: reusing it now would make later
                            // rows of a new session follow the forward to the merged one.
                            released.push(sess.slot);
                        }
                    }
                } else {
                    rest.push(sess);
                }
            }
            let slot = keep.unwrap_or_else(|| match s.free_slots.pop() {
                Some(x) => x,
                None => {
                    s.slots += 1;
                    s.slot_key.push(0);
                    (s.slots - 1) as u32
                }
            });
            s.slot_key[slot as usize] = key;
            rest.push(Session { start, end, slot });
            s.ends.insert((end, slot));
            *list = rest;
            slots[i] = slot;
        }
        let capacity = s.slots;
        // Merges first (state of earlier batches), then this batch's rows into surviving slots.
        for acc in &mut self.accs {
            acc.resize(capacity);
        }
        for (dst, src) in merges {
            for acc in &mut self.accs {
                acc.merge(dst, src);
            }
        }
        for slot in slots.iter_mut() {
            while let Some(next) = forward.get(slot) {
                *slot = *next;
            }
        }
        self.update_accumulators(batch, &slots, &row_signs, capacity)?;
        if let Some(s) = self.sessions.as_mut() {
            s.free_slots.extend(released);
            // Keys interned only by rows that opened no session (late, NULL time) hold nothing.
            for (i, &g) in gids.iter().enumerate() {
                if row_signs[i] == 0 && !s.open.contains_key(&g) && self.table.contains(g) {
                    self.table.remove(g);
                }
            }
        }
        self.gids = gids;
        let late = self.late_rows(batch, late)?;
        Ok(ApplyOutcome {
            late_rows: late.0,
            null_time_rows,
            output: None,
            late: late.1,
        })
    }

    fn fire_sessions(&mut self) -> Result<Option<ChangeBatch>> {
        let s = self.sessions.as_mut().expect("session state");
        let mut fired: Vec<(u32, Session)> = vec![];
        while let Some(&(end, slot)) = s.ends.first() {
            if end > self.watermark {
                break;
            }
            s.ends.pop_first();
            let key = s.slot_key[slot as usize];
            let list = s.open.get_mut(&key).expect("open sessions of key");
            let pos = list
                .iter()
                .position(|x| x.slot == slot)
                .expect("session listed");
            let sess = list.swap_remove(pos);
            self.changes.mark(key, self.table.len());
            if list.is_empty() {
                s.open.remove(&key);
            }
            fired.push((key, sess));
        }
        if fired.is_empty() {
            return Ok(None);
        }
        let output = s.output;
        let key_gids: Vec<u32> = fired.iter().map(|f| f.0).collect();
        let slot_ids: Vec<u32> = fired.iter().map(|f| f.1.slot).collect();
        let mut keys = self.output_keys(&key_gids)?;
        let starts: ArrayRef = Arc::new(TimestampMillisecondArray::from(
            fired.iter().map(|f| f.1.start).collect::<Vec<_>>(),
        ));
        let ends: ArrayRef = Arc::new(TimestampMillisecondArray::from(
            fired.iter().map(|f| f.1.end).collect::<Vec<_>>(),
        ));
        match output {
            SessionOutput::Struct(at) => keys.insert(at, window_struct(&starts, &ends)?),
            SessionOutput::Columns { start, end } => {
                let ty = sluice_sql::functions::window_time_type();
                let mut bounds = [
                    (start, arrow::compute::cast(&starts, &ty)?),
                    (end, arrow::compute::cast(&ends, &ty)?),
                ];
                bounds.sort_by_key(|b| b.0);
                for (at, column) in bounds {
                    keys.insert(at, column);
                }
            }
        }
        keys.extend(self.results(&slot_ids)?);
        let columns = self.cast_columns(keys)?;
        let data = RecordBatch::try_new(self.schema.clone(), columns)?;
        let s = self.sessions.as_mut().expect("session state");
        for (key, sess) in &fired {
            s.free_slots.push(sess.slot);
            // A key whose last sessions fired together is listed once per session: free it once.
            if !s.open.contains_key(key) && self.table.contains(*key) {
                self.rows[*key as usize] = 0;
                self.changes.removed(&self.table, *key);
                self.table.remove(*key);
            }
        }
        for slot in slot_ids {
            for acc in &mut self.accs {
                acc.reset(slot);
            }
        }
        Ok(Some(ChangeBatch::inserts(data)))
    }

    /// Counts rows dropped as late into the job's metric.
    pub fn count_late(metrics: &crate::runtime::metrics::JobMetrics, n: u64) {
        if n > 0 {
            metrics.late_rows_dropped.fetch_add(n, Ordering::Relaxed);
        }
    }
}

/// The struct a legacy group window outputs: `{window_start, window_end, window_time}`.
fn window_struct(starts: &ArrayRef, ends: &ArrayRef) -> Result<ArrayRef> {
    let ty = sluice_sql::functions::window_time_type();
    let starts = arrow::compute::cast(starts, &ty)?;
    let ends = arrow::compute::cast(ends, &ty)?;
    let times: ArrayRef = Arc::new(TimestampMillisecondArray::from(
        ends.as_primitive::<TimestampMillisecondType>()
            .values()
            .iter()
            .map(|e| e - 1)
            .collect::<Vec<_>>(),
    ));
    let fields = Fields::from(
        sluice_sql::functions::WINDOW_FIELDS
            .iter()
            .map(|n| Field::new(*n, ty.clone(), false))
            .collect::<Vec<_>>(),
    );
    Ok(Arc::new(StructArray::try_new(
        fields,
        vec![starts, ends, times],
        None,
    )?))
}

/// A shared DISTINCT table and the positions of the calls it serves.
type Family = (Arc<Mutex<DistinctFamily>>, Vec<usize>);

/// A call's row signs after its FILTER (0 where the filter is false or NULL).
fn call_signs<'a>(
    call: &AggCall,
    batch: &ChangeBatch,
    signs: &'a [i64],
) -> Result<std::borrow::Cow<'a, [i64]>> {
    let Some(f) = &call.filter else {
        return Ok(std::borrow::Cow::Borrowed(signs));
    };
    let mask = evaluate(f, batch)?;
    let mask = mask.as_boolean();
    Ok(signs
        .iter()
        .enumerate()
        .map(|(i, s)| {
            if mask.is_valid(i) && mask.value(i) {
                *s
            } else {
                0
            }
        })
        .collect())
}

/// Groups DISTINCT calls over the same input column (COUNT(DISTINCT bidder) with different
/// FILTERs) into families of up to [`sluice_state::accumulator::FAMILY_MAX`] that share one value
/// table, so that a row is looked up once for all of them.
fn distinct_families(
    calls: &[AggCall],
    accs: &mut [Accumulator],
    input: &arrow::datatypes::Schema,
) -> Result<Vec<Family>> {
    let mut by_column: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for (i, c) in calls.iter().enumerate() {
        let column = c
            .arg
            .as_ref()
            .and_then(|a| a.downcast_ref::<datafusion_physical_expr::expressions::Column>());
        if let (true, Some(column)) = (c.distinct, column) {
            by_column.entry(column.index()).or_default().push(i);
        }
    }
    let mut families = vec![];
    for (column, calls) in by_column {
        for members in calls.chunks(sluice_state::accumulator::FAMILY_MAX) {
            if members.len() < 2 {
                continue;
            }
            let family = DistinctFamily::try_new(input.field(column).data_type())?;
            for (m, &call) in members.iter().enumerate() {
                accs[call].share_distinct(family.clone(), m);
            }
            families.push((family, members.to_vec()));
        }
    }
    Ok(families)
}
