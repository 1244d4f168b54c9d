//! OVER aggregates ordered by event time, one worker's state.
//!
//! Rows wait until the watermark passes their time; then each partition's ready rows are taken
//! in time order and every row gets the aggregates over its frame: the `n` rows before it
//! (`ROWS`), or the rows at most an interval older, its peers (same time) included (`RANGE`), or
//! everything before it (`UNBOUNDED PRECEDING`). Aggregates are updated incrementally (a row
//! entering the frame adds, a row leaving retracts; MIN/MAX keep multisets), so a row costs the
//! same whatever the frame size. Each partition keeps the rows still in its frame. Output is
//! append-only: the input row followed by its aggregates.

use hashbrown::HashMap;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, BinaryArray, UInt32Array};
use arrow::compute::{concat, concat_batches};
use arrow::datatypes::{DataType, Field, SchemaRef};
use arrow::record_batch::RecordBatch;
use arrow::row::RowConverter;
use sluice_common::{ChangeBatch, Error, Op, Result};
use sluice_sql::{AggCall, OverFrame, PhysExpr};
use sluice_state::accumulator::Accumulator;

use crate::checkpoint::keyed::KeyedLayout;
use crate::operator::aggregate::acc_kind;
use crate::operator::driver::{
    keyed_snapshots, sampled_bytes, Applied, Dropped, Output, StatefulOperator,
};
use crate::operator::stateless::evaluate;

struct Part {
    gid: u32,
    key_group: u16,
    /// Input rows still in the frame (all of them are in the accumulators).
    frame: Option<RecordBatch>,
}

pub struct OverState {
    partition: Vec<PhysExpr>,
    time: usize,
    calls: Vec<AggCall>,
    frame: OverFrame,
    input: SchemaRef,
    schema: SchemaRef,
    accs: Vec<Accumulator>,
    keys: RowConverter,
    parts: HashMap<Box<[u8]>, Part>,
    /// Rows waiting for the watermark.
    pending: Vec<RecordBatch>,
    watermark: i64,
    next_gid: u32,
}

impl OverState {
    pub fn try_new(
        partition: Vec<PhysExpr>,
        time: usize,
        calls: Vec<AggCall>,
        frame: OverFrame,
        input: SchemaRef,
        schema: SchemaRef,
    ) -> Result<OverState> {
        let ty = |e: &PhysExpr| {
            e.data_type(&input)
                .map_err(|e| Error::plan(e.strip_backtrace()))
        };
        let keys = crate::operator::rows::key_converter(&partition, &input)?;
        let mut accs = vec![];
        for c in &calls {
            let input_type = match &c.arg {
                Some(a) => ty(a)?,
                None => DataType::Null,
            };
            accs.push(Accumulator::try_new(
                acc_kind(c.func),
                input_type,
                c.output_type.clone(),
                c.distinct,
            )?);
        }
        Ok(OverState {
            partition,
            time,
            calls,
            frame,
            input,
            schema,
            accs,
            keys,
            parts: HashMap::new(),
            pending: vec![],
            watermark: i64::MIN,
            next_gid: 0,
        })
    }

    /// Rows held: waiting for the watermark, or in a frame.
    pub fn rows_held(&self) -> usize {
        self.pending.iter().map(|b| b.num_rows()).sum::<usize>()
            + self
                .parts
                .values()
                .map(|p| p.frame.as_ref().map_or(0, |f| f.num_rows()))
                .sum::<usize>()
    }

    /// Keeps the rows for later; drops (and counts) those already behind the watermark, and
    /// those without an event time.
    pub fn apply(&mut self, batch: &ChangeBatch) -> Result<Dropped> {
        if !batch.is_append_only() {
            return Err(Error::Runtime(
                "an OVER aggregate received a retraction; its input must be append-only".into(),
            ));
        }
        let times = crate::operator::rows::event_times(&batch.data, self.time)?;
        let keep: Vec<bool> = times
            .iter()
            .map(|t| t.is_some_and(|t| t >= self.watermark))
            .collect();
        let dropped = keep.iter().filter(|k| !**k).count() as u64;
        if dropped == 0 {
            self.pending.push(batch.data.clone());
        } else if dropped < keep.len() as u64 {
            let mask = arrow::array::BooleanArray::from(keep);
            self.pending
                .push(arrow::compute::filter_record_batch(&batch.data, &mask)?);
        }
        let null_time = times.iter().filter(|t| t.is_none()).count() as u64;
        Ok(Dropped {
            late: dropped - null_time,
            null_time,
        })
    }

    /// Emits the rows the watermark passed, each with its aggregates.
    pub fn advance_watermark(&mut self, watermark: i64) -> Result<Option<ChangeBatch>> {
        if watermark <= self.watermark {
            return Ok(None);
        }
        self.watermark = watermark;
        if self.pending.is_empty() {
            return Ok(None);
        }
        let all = concat_batches(&self.input, &self.pending)?;
        self.pending.clear();
        let times = crate::operator::rows::event_times(&all, self.time)?;
        let (ready, wait): (Vec<u32>, Vec<u32>) = (0..all.num_rows() as u32)
            .partition(|i| times[*i as usize].is_some_and(|t| t < watermark));
        if !wait.is_empty() {
            self.pending.push(arrow::compute::take_record_batch(
                &all,
                &UInt32Array::from(wait),
            )?);
        }
        if ready.is_empty() {
            return Ok(None);
        }
        let ready = arrow::compute::take_record_batch(&all, &UInt32Array::from(ready))?;
        let key_arrays = crate::operator::rows::key_arrays(
            &self.partition,
            &ChangeBatch::inserts(ready.clone()),
        )?;
        let n = ready.num_rows();
        let key_groups = crate::operator::rows::key_groups(&key_arrays, n)?;
        let rows = self.keys.convert_columns(&key_arrays)?;
        let keys = crate::operator::rows::key_bytes(&rows, key_arrays.is_empty(), n);
        // Rows per partition, in time order (stable: ties keep arrival order).
        let times = crate::operator::rows::event_times(&ready, self.time)?;
        let mut groups: Vec<(&[u8], Vec<u32>)> = vec![];
        let mut slot: HashMap<&[u8], usize> = HashMap::new();
        for (i, k) in keys.iter().enumerate() {
            let g = *slot.entry(k).or_insert_with(|| {
                groups.push((k, vec![]));
                groups.len() - 1
            });
            groups[g].1.push(i as u32);
        }
        let mut out_batches = vec![];
        for (key, mut idx) in groups {
            idx.sort_by_key(|i| times[*i as usize]);
            let key_group = key_groups[idx[0] as usize];
            let rows = arrow::compute::take_record_batch(&ready, &UInt32Array::from(idx))?;
            out_batches.push(self.partition_rows(key, key_group, rows)?);
        }
        let data = concat_batches(&self.schema, &out_batches)?;
        Ok(Some(ChangeBatch::inserts(data)))
    }

    /// One partition's ready rows (in time order): each with the aggregates over its frame.
    fn partition_rows(
        &mut self,
        key: &[u8],
        key_group: u16,
        rows: RecordBatch,
    ) -> Result<RecordBatch> {
        let next_gid = &mut self.next_gid;
        let part = self.parts.entry_ref(key).or_insert_with(|| {
            *next_gid += 1;
            Part {
                gid: *next_gid - 1,
                key_group,
                frame: None,
            }
        });
        let gid = part.gid;
        let old = part.frame.take();
        let held = old.as_ref().map_or(0, |f| f.num_rows());
        let seq = match old {
            Some(f) => concat_batches(&self.input, &[f, rows.clone()])?,
            None => rows.clone(),
        };
        let times = crate::operator::rows::event_times(&seq, self.time)?;
        let times: Vec<i64> = times.into_iter().map(|t| t.unwrap_or(i64::MIN)).collect();
        let as_changes = ChangeBatch::inserts(seq.clone());
        let mut values = vec![];
        let mut counted = vec![];
        for (call, acc) in self.calls.iter().zip(self.accs.iter_mut()) {
            acc.resize(self.next_gid as usize);
            values.push(match &call.arg {
                Some(a) => Some(evaluate(a, &as_changes)?),
                None => None,
            });
            counted.push(match &call.filter {
                Some(f) => {
                    let m = evaluate(f, &as_changes)?;
                    let m = m.as_boolean();
                    (0..seq.num_rows())
                        .map(|i| m.is_valid(i) && m.value(i))
                        .collect()
                }
                None => vec![true; seq.num_rows()],
            });
        }
        let change = |accs: &mut [Accumulator], row: usize, sign: i64| -> Result<()> {
            for (c, acc) in accs.iter_mut().enumerate() {
                let s = if counted[c][row] { sign } else { 0 };
                let v = values[c].as_ref().map(|v| v.slice(row, 1));
                acc.update(&[gid], &[s], v.as_ref())?;
            }
            Ok(())
        };
        let mut results: Vec<Vec<ArrayRef>> = vec![vec![]; self.calls.len()];
        let mut lo = 0; // first row of `seq` still in the frame
        let mut j = held;
        while j < seq.num_rows() {
            // RANGE frames treat rows of the same time (peers) together.
            let mut end = j + 1;
            if matches!(self.frame, OverFrame::Range(_)) {
                while end < seq.num_rows() && times[end] == times[j] {
                    end += 1;
                }
            }
            for row in j..end {
                change(&mut self.accs, row, 1)?;
                if let OverFrame::Rows(Some(n)) = self.frame {
                    while row - lo > n as usize {
                        change(&mut self.accs, lo, -1)?;
                        lo += 1;
                    }
                }
            }
            if let OverFrame::Range(Some(ms)) = self.frame {
                while times[lo] < times[j].saturating_sub(ms) {
                    change(&mut self.accs, lo, -1)?;
                    lo += 1;
                }
            }
            for (c, acc) in self.accs.iter().enumerate() {
                let v = acc.evaluate(&[gid])?;
                for _ in j..end {
                    results[c].push(v.clone());
                }
            }
            j = end;
        }
        // Unbounded frames need no rows: the accumulators hold everything.
        let part = self.parts.get_mut(key).expect("partition");
        part.frame = match self.frame {
            OverFrame::Rows(None) | OverFrame::Range(None) => None,
            _ if lo == seq.num_rows() => None,
            _ => {
                let keep = UInt32Array::from_iter_values(lo as u32..seq.num_rows() as u32);
                Some(arrow::compute::take_record_batch(&seq, &keep)?)
            }
        };
        let mut cols = rows.columns().to_vec();
        for r in results {
            let refs: Vec<&dyn Array> = r.iter().map(|a| a.as_ref()).collect();
            cols.push(concat(&refs)?);
        }
        Ok(RecordBatch::try_new(self.schema.clone(), cols)?)
    }
}

/// Snapshot layout: one row per partition (its aggregate states and frame rows as Arrow IPC),
/// plus one row per waiting batch (key group 0, no key).
fn layout() -> KeyedLayout {
    KeyedLayout::new(
        "OVER",
        true,
        vec![
            Field::new("accumulators", DataType::Binary, true),
            Field::new("rows", DataType::Binary, true),
        ],
    )
}

/// The snapshot of an updating OVER aggregate: one row per distinct (sort key, row) of a
/// partition, with its number of copies.
fn updating_layout() -> KeyedLayout {
    KeyedLayout::new(
        "OVER",
        false,
        vec![
            Field::new("sort", DataType::Binary, false),
            Field::new("row", DataType::Binary, false),
            Field::new("count", DataType::UInt32, false),
        ],
    )
}

impl OverState {
    /// This worker's state in the snapshot layout.
    pub fn snapshot_rows(&self) -> Result<RecordBatch> {
        let mut group = vec![];
        let mut key: Vec<Option<Vec<u8>>> = vec![];
        let mut accs: Vec<Option<Vec<u8>>> = vec![];
        let mut rows: Vec<Option<Vec<u8>>> = vec![];
        for (k, p) in &self.parts {
            let mut state = vec![];
            for acc in &self.accs {
                let mut one = vec![];
                acc.snapshot_group(p.gid, &mut one);
                state.extend_from_slice(&(one.len() as u64).to_le_bytes());
                state.extend_from_slice(&one);
            }
            group.push(p.key_group);
            key.push(Some(k.to_vec()));
            accs.push(Some(state));
            rows.push(
                p.frame
                    .as_ref()
                    .map(crate::checkpoint::ipc_bytes)
                    .transpose()?,
            );
        }
        // Waiting rows are restored by every worker that owns their key: they are split by key
        // group on restore, so they go in whole here.
        for b in &self.pending {
            group.push(0);
            key.push(None);
            accs.push(None);
            rows.push(Some(crate::checkpoint::ipc_bytes(b)?));
        }
        layout().batch(
            group,
            BinaryArray::from_iter(key),
            vec![
                Arc::new(BinaryArray::from_iter(accs)),
                Arc::new(BinaryArray::from_iter(rows)),
            ],
        )
    }

    /// Adds the rows of a snapshot whose key group `owns` accepts.
    pub fn restore_rows(&mut self, batch: &RecordBatch, owns: &dyn Fn(u16) -> bool) -> Result<()> {
        let snapshot = layout().read(batch)?;
        let (accs, rows) = (snapshot.binary(0), snapshot.binary(1));
        for i in 0..snapshot.len() {
            let Some(key) = snapshot.key(i) else {
                // Waiting rows: keep those of this worker's key groups.
                let b = crate::operator::rows::ipc_batch(rows.value(i))?;
                if let Some(mine) = b
                    .map(|b| crate::operator::rows::owned_rows(&b, &self.partition, owns))
                    .transpose()?
                    .flatten()
                {
                    self.pending.push(mine);
                }
                continue;
            };
            if !owns(snapshot.group(i)) {
                continue;
            }
            let gid = self.next_gid;
            self.next_gid += 1;
            let mut state = accs.value(i);
            for acc in self.accs.iter_mut() {
                acc.resize(self.next_gid as usize);
                let len = state
                    .get(..8)
                    .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")) as usize)
                    .filter(|l| state.len() >= 8 + l)
                    .ok_or_else(|| snapshot.corrupt())?;
                acc.restore_group(gid, &state[8..8 + len])
                    .map_err(|_| snapshot.corrupt())?;
                state = &state[8 + len..];
            }
            let frame = if rows.is_null(i) {
                None
            } else {
                crate::operator::rows::ipc_batch(rows.value(i))?
            };
            self.parts.insert(
                key.into(),
                Part {
                    gid,
                    key_group: snapshot.group(i),
                    frame,
                },
            );
        }
        Ok(())
    }

    pub fn groups(&self) -> u64 {
        self.parts.len() as u64
    }

    pub fn size_bytes(&self) -> u64 {
        let parts = sampled_bytes(self.parts.len(), self.parts.iter(), |(k, p)| {
            k.len() + 48 + p.frame.as_ref().map_or(0, |f| f.get_array_memory_size())
        });
        let pending: usize = self.pending.iter().map(|b| b.get_array_memory_size()).sum();
        let accs: usize = self.accs.iter().map(|a| a.size_bytes()).sum();
        parts + (pending + accs) as u64
    }
}

impl StatefulOperator for OverState {
    const NAME: &'static str = "Over";

    fn on_batch(
        &mut self,
        _side: usize,
        batch: &ChangeBatch,
        _budget: usize,
        _out: &mut Output,
    ) -> Result<Applied> {
        let dropped = OverState::apply(self, batch)?;
        Ok(Applied {
            consumed: batch.num_rows(),
            late: dropped.late,
            null_time: dropped.null_time,
            skipped: 0,
        })
    }

    fn on_watermark(
        &mut self,
        _side: usize,
        watermark: i64,
        _made_at: i64,
        out: &mut Output,
    ) -> Result<()> {
        out.extend(OverState::advance_watermark(self, watermark)?);
        Ok(())
    }

    keyed_snapshots!();

    fn size(&self) -> (u64, u64) {
        (self.size_bytes(), self.groups())
    }
}

/// OVER aggregates over an updating input (which Flink does not run): each partition keeps its
/// rows in ORDER BY order; a change re-computes the rows from the first changed position on
/// (frames only look back), and emits the difference: `-D` for output rows that no longer hold,
/// `+I` for new ones.
pub struct UpdatingOverState {
    partition: Vec<PhysExpr>,
    order: Vec<PhysExpr>,
    calls: Vec<AggCall>,
    frame: OverFrame,
    input: SchemaRef,
    schema: SchemaRef,
    keys: RowConverter,
    sorts: RowConverter,
    rows: RowConverter,
    outputs: RowConverter,
    parts: HashMap<Box<[u8]>, UpdatingPart>,
}

#[derive(Default)]
struct UpdatingPart {
    key_group: u16,
    /// (sort key, row) -> copies.
    rows: std::collections::BTreeMap<Entry, u32>,
}

/// (sort key, row), in Arrow row format.
type Entry = (Box<[u8]>, Box<[u8]>);

impl UpdatingOverState {
    pub fn try_new(
        partition: Vec<PhysExpr>,
        order: Vec<sluice_sql::SortKey>,
        calls: Vec<AggCall>,
        frame: OverFrame,
        input: SchemaRef,
        schema: SchemaRef,
    ) -> Result<UpdatingOverState> {
        let keys = crate::operator::rows::key_converter(&partition, &input)?;
        let sorts = crate::operator::rows::sort_converter(&order, &input)?;
        Ok(UpdatingOverState {
            partition,
            order: order.into_iter().map(|k| k.expr).collect(),
            calls,
            frame,
            rows: crate::operator::rows::row_converter(&input)?,
            outputs: crate::operator::rows::row_converter(&schema)?,
            input,
            schema,
            keys,
            sorts,
            parts: HashMap::new(),
        })
    }

    /// Output rows (row format) of `part` from entry `from` on.
    fn region(&self, part: &UpdatingPart, from: &Entry) -> Result<Vec<Box<[u8]>>> {
        fn expand<'a>(e: (&'a Entry, &'a u32)) -> std::iter::RepeatN<&'a Entry> {
            std::iter::repeat_n(e.0, *e.1 as usize)
        }
        let before: Vec<&Entry> = match self.frame {
            OverFrame::Rows(Some(n)) => {
                let mut v: Vec<&Entry> = part
                    .rows
                    .range(..from.clone())
                    .rev()
                    .flat_map(expand)
                    .take(n as usize)
                    .collect();
                v.reverse();
                v
            }
            _ => part.rows.range(..from.clone()).flat_map(expand).collect(),
        };
        let region: Vec<&Entry> = part.rows.range(from.clone()..).flat_map(expand).collect();
        if region.is_empty() {
            return Ok(vec![]);
        }
        let seq_entries: Vec<&Entry> = before.iter().chain(region.iter()).copied().collect();
        let parser = self.rows.parser();
        let cols = self
            .rows
            .convert_rows(seq_entries.iter().map(|e| parser.parse(&e.1)))?;
        let seq = RecordBatch::try_new(self.input.clone(), cols)?;
        let changes = ChangeBatch::inserts(seq.clone());
        let mut accs = vec![];
        let mut values = vec![];
        let mut counted = vec![];
        for c in &self.calls {
            let input_type = match &c.arg {
                Some(a) => a
                    .data_type(&self.input)
                    .map_err(|e| Error::plan(e.strip_backtrace()))?,
                None => DataType::Null,
            };
            let mut acc = Accumulator::try_new(
                acc_kind(c.func),
                input_type,
                c.output_type.clone(),
                c.distinct,
            )?;
            acc.resize(1);
            accs.push(acc);
            values.push(match &c.arg {
                Some(a) => Some(evaluate(a, &changes)?),
                None => None,
            });
            counted.push(match &c.filter {
                Some(f) => {
                    let m = evaluate(f, &changes)?;
                    let m = m.as_boolean();
                    (0..seq.num_rows())
                        .map(|i| m.is_valid(i) && m.value(i))
                        .collect::<Vec<_>>()
                }
                None => vec![true; seq.num_rows()],
            });
        }
        let change = |accs: &mut [Accumulator], row: usize, sign: i64| -> Result<()> {
            for (c, acc) in accs.iter_mut().enumerate() {
                let s = if counted[c][row] { sign } else { 0 };
                let v = values[c].as_ref().map(|v| v.slice(row, 1));
                acc.update(&[0], &[s], v.as_ref())?;
            }
            Ok(())
        };
        let n = seq_entries.len();
        let mut results: Vec<Vec<ArrayRef>> = vec![vec![]; self.calls.len()];
        let (mut lo, mut j) = (0, 0);
        while j < n {
            // RANGE frames take rows with the same sort key (peers) together.
            let mut end = j + 1;
            if matches!(self.frame, OverFrame::Range(_)) {
                while end < n && seq_entries[end].0 == seq_entries[j].0 {
                    end += 1;
                }
            }
            for row in j..end {
                change(&mut accs, row, 1)?;
                if let OverFrame::Rows(Some(f)) = self.frame {
                    while row - lo > f as usize {
                        change(&mut accs, lo, -1)?;
                        lo += 1;
                    }
                }
            }
            for (c, acc) in accs.iter().enumerate() {
                let v = acc.evaluate(&[0])?;
                for row in j..end {
                    if row >= before.len() {
                        results[c].push(v.clone());
                    }
                }
            }
            j = end;
        }
        let keep = UInt32Array::from_iter_values(before.len() as u32..n as u32);
        let mut cols: Vec<ArrayRef> = arrow::compute::take_record_batch(&seq, &keep)?
            .columns()
            .to_vec();
        for r in results {
            let refs: Vec<&dyn Array> = r.iter().map(|a| a.as_ref()).collect();
            cols.push(concat(&refs)?);
        }
        let out = self.outputs.convert_columns(&cols)?;
        Ok((0..out.num_rows())
            .map(|i| out.row(i).data().into())
            .collect())
    }

    fn apply(&mut self, batch: &ChangeBatch) -> Result<(Option<ChangeBatch>, u64)> {
        let n = batch.num_rows();
        if n == 0 {
            return Ok((None, 0));
        }
        let key_arrays = crate::operator::rows::key_arrays(&self.partition, batch)?;
        let key_groups = crate::operator::rows::key_groups(&key_arrays, n)?;
        let key_rows = self.keys.convert_columns(&key_arrays)?;
        let keys = crate::operator::rows::key_bytes(&key_rows, key_arrays.is_empty(), n);
        let sort_arrays = crate::operator::rows::key_arrays(&self.order, batch)?;
        let sorts = self.sorts.convert_columns(&sort_arrays)?;
        let rows = self.rows.convert_columns(batch.data.columns())?;
        // Changes per partition, in order; and the first position each one touches.
        // (partition key, key group, its changes with their signs)
        type Touched<'a> = (&'a [u8], u16, Vec<(Entry, i64)>);
        let mut touched: Vec<Touched> = vec![];
        let mut slot: HashMap<&[u8], usize> = HashMap::new();
        for i in 0..n {
            let s = *slot.entry(keys[i]).or_insert_with(|| {
                touched.push((keys[i], key_groups[i], vec![]));
                touched.len() - 1
            });
            let entry: Entry = (sorts.row(i).data().into(), rows.row(i).data().into());
            touched[s].2.push((entry, batch.op(i).sign()));
        }
        let mut dropped = 0;
        let mut deleted: Vec<Box<[u8]>> = vec![];
        let mut inserted: Vec<Box<[u8]>> = vec![];
        for (key, key_group, changes) in touched {
            let from: Entry = (
                changes
                    .iter()
                    .map(|(e, _)| e.0.clone())
                    .min()
                    .expect("a change"),
                Box::new([]),
            );
            let empty = UpdatingPart::default();
            let old = self.region(self.parts.get(key).unwrap_or(&empty), &from)?;
            let part = self.parts.entry_ref(key).or_default();
            part.key_group = key_group;
            for (entry, sign) in changes {
                if sign > 0 {
                    *part.rows.entry(entry).or_insert(0) += 1;
                } else {
                    match part.rows.get_mut(&entry) {
                        Some(c) if *c > 1 => *c -= 1,
                        Some(_) => {
                            part.rows.remove(&entry);
                        }
                        None => dropped += 1,
                    }
                }
            }
            let new = self.region(&self.parts[key], &from)?;
            if self.parts[key].rows.is_empty() {
                self.parts.remove(key);
            }
            // The difference, as multisets.
            let mut diff: HashMap<Box<[u8]>, i64> = HashMap::new();
            for r in old {
                *diff.entry(r).or_default() -= 1;
            }
            for r in new {
                *diff.entry(r).or_default() += 1;
            }
            for (r, d) in diff {
                for _ in 0..d.unsigned_abs() {
                    if d < 0 {
                        deleted.push(r.clone());
                    } else {
                        inserted.push(r.clone());
                    }
                }
            }
        }
        if deleted.is_empty() && inserted.is_empty() {
            return Ok((None, dropped));
        }
        let mut ops = vec![Op::Delete; deleted.len()];
        ops.extend(vec![Op::Insert; inserted.len()]);
        let parser = self.outputs.parser();
        let cols = self.outputs.convert_rows(
            deleted
                .iter()
                .chain(inserted.iter())
                .map(|r| parser.parse(r)),
        )?;
        let data = RecordBatch::try_new(self.schema.clone(), cols)?;
        Ok((Some(ChangeBatch::with_ops(data, ops)), dropped))
    }
}

impl UpdatingOverState {
    /// This worker's state in the snapshot layout.
    pub fn snapshot_rows(&self) -> Result<RecordBatch> {
        let mut group = vec![];
        let mut key: Vec<&[u8]> = vec![];
        let mut sort: Vec<&[u8]> = vec![];
        let mut row: Vec<&[u8]> = vec![];
        let mut count: Vec<u32> = vec![];
        for (k, p) in &self.parts {
            for ((s, r), c) in &p.rows {
                group.push(p.key_group);
                key.push(k);
                sort.push(s);
                row.push(r);
                count.push(*c);
            }
        }
        updating_layout().batch(
            group,
            BinaryArray::from(key),
            vec![
                Arc::new(BinaryArray::from(sort)),
                Arc::new(BinaryArray::from(row)),
                Arc::new(UInt32Array::from(count)),
            ],
        )
    }

    /// Adds the rows of a snapshot whose key group `owns` accepts.
    pub fn restore_rows(&mut self, batch: &RecordBatch, owns: &dyn Fn(u16) -> bool) -> Result<()> {
        let snapshot = updating_layout().read(batch)?;
        let (sort, row, count) = (snapshot.binary(0), snapshot.binary(1), snapshot.u32(2));
        let mine = snapshot.owned(owns);
        crate::operator::rows::check_rows(
            &self.sorts,
            mine.iter().map(|i| sort.value(*i)),
            "OVER",
        )?;
        crate::operator::rows::check_rows(&self.rows, mine.iter().map(|i| row.value(*i)), "OVER")?;
        for i in mine {
            if count.value(i) == 0 {
                return Err(snapshot.corrupt());
            }
            let key = snapshot.key(i).expect("an owned row has a key");
            let part = self.parts.entry_ref(key).or_default();
            part.key_group = snapshot.group(i);
            part.rows
                .insert((sort.value(i).into(), row.value(i).into()), count.value(i));
        }
        Ok(())
    }

    pub fn groups(&self) -> u64 {
        self.parts.len() as u64
    }

    pub fn size_bytes(&self) -> u64 {
        sampled_bytes(self.parts.len(), self.parts.iter(), |(k, p)| {
            k.len()
                + 48
                + p.rows
                    .keys()
                    .map(|(a, b)| a.len() + b.len() + 48)
                    .sum::<usize>()
        })
    }
}

impl StatefulOperator for UpdatingOverState {
    const NAME: &'static str = "Over";

    fn on_batch(
        &mut self,
        _side: usize,
        batch: &ChangeBatch,
        _budget: usize,
        out: &mut Output,
    ) -> Result<Applied> {
        let (changes, late) = UpdatingOverState::apply(self, batch)?;
        out.extend(changes);
        Ok(Applied::with_late(batch.num_rows(), late))
    }

    fn on_watermark(
        &mut self,
        _side: usize,
        watermark: i64,
        _made_at: i64,
        out: &mut Output,
    ) -> Result<()> {
        let _ = (watermark, out);
        Ok(())
    }

    keyed_snapshots!();

    fn size(&self) -> (u64, u64) {
        (self.size_bytes(), self.groups())
    }
}

#[cfg(test)]
mod tests {
    use arrow::datatypes::Schema;
    use datafusion_physical_expr::expressions::Column;
    use sluice_sql::AggFunc;

    use super::*;
    use crate::checkpoint::fuzz::{timed_batch as batch, timed_input as input};

    fn calls() -> Vec<AggCall> {
        let v = Arc::new(Column::new("v", 2)) as PhysExpr;
        vec![
            AggCall {
                func: AggFunc::Sum,
                arg: Some(v.clone()),
                distinct: false,
                filter: None,
                output_type: DataType::Int64,
            },
            AggCall {
                func: AggFunc::Max,
                arg: Some(v),
                distinct: false,
                filter: None,
                output_type: DataType::Int64,
            },
        ]
    }

    fn output() -> SchemaRef {
        let mut fields = input().fields().to_vec();
        fields.push(Arc::new(Field::new("s", DataType::Int64, true)));
        fields.push(Arc::new(Field::new("m", DataType::Int64, true)));
        Arc::new(Schema::new(fields))
    }

    /// Snapshots altered inside their bytes (keys, accumulators, frame and waiting rows)
    /// restore or fail with an error, never a panic; a restored state still runs.
    #[test]
    fn altered_snapshots_restore_or_fail() {
        let key = || vec![Arc::new(Column::new("k", 0)) as PhysExpr];
        let event_time = || {
            OverState::try_new(
                key(),
                1,
                calls(),
                OverFrame::Range(Some(5_000)),
                input(),
                output(),
            )
            .unwrap()
        };
        let mut s = event_time();
        s.apply(&batch((0..20_000).map(|i| (i % 2_000, i, i * 7 % 101))))
            .unwrap();
        s.advance_watermark(12_000).unwrap();
        let snap = s.snapshot_rows().unwrap();
        assert!(snap.num_rows() > 2_000, "frames and waiting rows");
        crate::checkpoint::fuzz::altered_snapshots_restore_or_fail(&snap, 150, |b| {
            let mut s = event_time();
            let restored = s.restore_rows(b, &|_| true).is_ok();
            if restored {
                let _ = s.apply(&batch((0..100).map(|i| (i, 20_000 + i, i))));
                let _ = s.advance_watermark(i64::MAX);
            }
            restored
        });

        let updating = || {
            UpdatingOverState::try_new(
                key(),
                vec![sluice_sql::SortKey {
                    expr: Arc::new(Column::new("v", 2)),
                    asc: true,
                    nulls_first: false,
                }],
                calls(),
                OverFrame::Rows(Some(3)),
                input(),
                output(),
            )
            .unwrap()
        };
        let mut s = updating();
        s.apply(&batch((0..5_000).map(|i| (i % 300, i, i * 7 % 101))))
            .unwrap();
        let snap = s.snapshot_rows().unwrap();
        crate::checkpoint::fuzz::altered_snapshots_restore_or_fail(&snap, 150, |b| {
            let mut s = updating();
            let restored = s.restore_rows(b, &|_| true).is_ok();
            if restored {
                let _ = s.apply(&batch((0..100).map(|i| (i, i, i))));
            }
            restored
        });
    }
}
