//! Top-N per partition (`ROW_NUMBER() ... <= N`), one worker's state.
//!
//! Each partition keeps its rows ordered by the sort key (Arrow row format, so that the byte order
//! is the SQL order; ties fall back to the whole row, so ranks are deterministic).
//!
//! - [`RankMode::Updating`]: after each batch, every partition the batch touched compares its old
//!   and new first N rows position by position: a changed position emits `-U` old / `+U` new
//!   (`-D` or `+I` where a side is empty). An append-only input keeps only N rows per partition
//!   (a row pushed out never comes back); an updating one keeps all. The append-only case with
//!   a small N (keep-last deduplication, per-key Top-10s) keeps its rows in one arena
//!   ([`AppendOnlyTop`]): no allocation per row or per key.
//! - [`RankMode::Window`]: a window's partitions are emitted once, when the watermark passes the
//!   window's end.
//! - [`RankMode::FirstByTime`]: per key, the row with the smallest event time is emitted once the
//!   watermark has passed that time; later rows of the key are dropped (exact keep-first
//!   deduplication with append-only output).

use std::collections::BTreeMap;

use hashbrown::HashMap;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, BinaryArray, Int64Array, UInt32Array, UInt64Array};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use arrow::row::RowConverter;
use sluice_common::{ChangeBatch, Error, Op, Result};
use sluice_sql::{PhysExpr, RankMode, SortKey};
use sluice_state::group_table::NO_TAG;
use sluice_state::{ByteSlots, GroupTable};

use crate::checkpoint::keyed::KeyedLayout;
use crate::operator::driver::{keyed_snapshots, sampled_bytes, Applied, Output, StatefulOperator};

/// Bytes in Arrow row format.
type Bytes = Box<[u8]>;

#[derive(Default)]
struct Partition {
    key_group: u16,
    /// (sort key, row) -> copies.
    rows: BTreeMap<(Bytes, Bytes), u32>,
    /// Window end, or the candidate's event time (first-by-time).
    until: i64,
    /// First-by-time: the key's first row was emitted; later rows are dropped.
    done: bool,
}

impl Partition {
    fn top(&self, n: usize) -> Vec<Box<[u8]>> {
        let mut out = Vec::with_capacity(n);
        for ((_, row), copies) in &self.rows {
            for _ in 0..*copies {
                if out.len() == n {
                    return out;
                }
                out.push(row.clone());
            }
        }
        out
    }

    fn len(&self) -> usize {
        self.rows.values().map(|c| *c as usize).sum()
    }

    /// Keeps only the first `n` rows.
    fn trim(&mut self, n: usize) {
        while self.len() > n {
            let mut last = self.rows.last_entry().expect("non-empty");
            if *last.get() > 1 {
                *last.get_mut() -= 1;
            } else {
                last.remove();
            }
        }
    }
}

/// What a batch did.
pub struct RankOutput {
    pub changes: Option<ChangeBatch>,
    /// Rows dropped as late for their window or key, or retractions of rows not in state.
    pub dropped: u64,
}

pub struct RankState {
    partition: Vec<PhysExpr>,
    order: Vec<PhysExpr>,
    limit: usize,
    mode: RankMode,
    schema: SchemaRef,
    keys: RowConverter,
    sorts: RowConverter,
    rows: RowConverter,
    partitions: HashMap<Box<[u8]>, Partition>,
    /// Window and first-by-time modes: partitions by the time that emits them.
    timers: BTreeMap<i64, Vec<Box<[u8]>>>,
    watermark: i64,
    append_only_input: bool,
    /// Updating mode over an append-only input with a small N: the arena state instead of
    /// `partitions`.
    top: Option<AppendOnlyTop>,
}

/// The largest N kept in [`AppendOnlyTop`]; beyond it, the ordered map per partition.
const ARENA_TOP_MAX: usize = 16;

impl RankState {
    pub fn try_new(
        partition: Vec<PhysExpr>,
        order: Vec<SortKey>,
        limit: usize,
        mode: RankMode,
        input: &Schema,
        schema: SchemaRef,
        append_only_input: bool,
    ) -> Result<RankState> {
        let keys = crate::operator::rows::key_converter(&partition, input)?;
        let sorts = crate::operator::rows::sort_converter(&order, input)?;
        let rows = crate::operator::rows::row_converter(input)?;
        let top = (mode == RankMode::Updating
            && append_only_input
            && (1..=ARENA_TOP_MAX).contains(&limit))
        .then(|| AppendOnlyTop::try_new(&partition, input, limit))
        .transpose()?;
        Ok(RankState {
            partition,
            order: order.into_iter().map(|k| k.expr).collect(),
            limit,
            mode,
            schema,
            keys,
            sorts,
            rows,
            partitions: HashMap::new(),
            timers: BTreeMap::new(),
            watermark: i64::MIN,
            append_only_input,
            top,
        })
    }

    /// Rows held over all partitions.
    pub fn rows_held(&self) -> u64 {
        if let Some(top) = &self.top {
            return top.rows_held();
        }
        self.partitions.values().map(|p| p.len() as u64).sum()
    }

    pub fn partitions(&self) -> usize {
        if let Some(top) = &self.top {
            return top.partitions.len();
        }
        self.partitions.len()
    }

    pub fn apply(&mut self, batch: &ChangeBatch) -> Result<RankOutput> {
        let n = batch.num_rows();
        let mut dropped = 0;
        if n == 0 {
            return Ok(RankOutput {
                changes: None,
                dropped,
            });
        }
        let key_arrays = crate::operator::rows::key_arrays(&self.partition, batch)?;
        let key_groups = crate::operator::rows::key_groups(&key_arrays, n)?;
        let sort_arrays = crate::operator::rows::key_arrays(&self.order, batch)?;
        let keys = self.keys.convert_columns(&key_arrays)?;
        let keys = crate::operator::rows::key_bytes(&keys, key_arrays.is_empty(), n);
        let sorts = self.sorts.convert_columns(&sort_arrays)?;
        let rows = self.rows.convert_columns(batch.data.columns())?;
        if let Some(top) = &mut self.top {
            let (rows, ranks, ops, dropped) =
                top.apply(batch, &keys, &key_groups, &sorts, &rows)?;
            let changes = output_mixed(&self.rows, &self.schema, batch, rows, ranks, ops)?;
            top.end_batch();
            return Ok(RankOutput { changes, dropped });
        }
        let times = match self.mode {
            RankMode::Updating => None,
            RankMode::Window { end } => Some(crate::operator::rows::event_times(&batch.data, end)?),
            RankMode::FirstByTime { time } => {
                Some(crate::operator::rows::event_times(&batch.data, time)?)
            }
        };
        // Updating mode: each touched partition's first N rows before the batch.
        // Keys are looked up by reference: a partition's key is copied only when it is new.
        let mut before: Vec<(&[u8], Vec<Bytes>)> = vec![];
        let mut touched: HashMap<&[u8], usize> = HashMap::new();
        for i in 0..n {
            let key: &[u8] = keys[i];
            let entry = (sorts.row(i).as_ref().into(), rows.row(i).as_ref().into());
            let accumulate = batch.op(i).sign() > 0;
            let key_group = key_groups[i];
            match self.mode {
                RankMode::Updating => {
                    if !touched.contains_key(key) {
                        let top = self
                            .partitions
                            .get(key)
                            .map(|p| p.top(self.limit))
                            .unwrap_or_default();
                        touched.insert(key, before.len());
                        before.push((key, top));
                    }
                    let p = self.partitions.entry_ref(key).or_default();
                    p.key_group = key_group;
                    if accumulate {
                        *p.rows.entry(entry).or_insert(0) += 1;
                        if self.append_only_input {
                            p.trim(self.limit);
                        }
                    } else {
                        match p.rows.get_mut(&entry) {
                            Some(c) if *c > 1 => *c -= 1,
                            Some(_) => {
                                p.rows.remove(&entry);
                            }
                            None => dropped += 1,
                        }
                        if p.rows.is_empty() {
                            self.partitions.remove(key);
                        }
                    }
                }
                RankMode::Window { .. } | RankMode::FirstByTime { .. } => {
                    let key: Box<[u8]> = key.into();
                    if !accumulate {
                        return Err(Error::Runtime(
                            "a window Top-N or deduplication received a retraction; its input must be append-only"
                                .into(),
                        ));
                    }
                    let Some(t) = times.as_ref().and_then(|t| t[i]) else {
                        dropped += 1;
                        continue;
                    };
                    let first = matches!(self.mode, RankMode::FirstByTime { .. });
                    // A window is closed once the watermark reached its end; a key's first row is
                    // final once the watermark passed it.
                    let late = if first {
                        t < self.watermark
                    } else {
                        t <= self.watermark
                    };
                    let p = self.partitions.entry(key.clone()).or_default();
                    if p.done {
                        // A later row of a key whose first row is out: a duplicate.
                        continue;
                    }
                    if late {
                        if p.rows.is_empty() {
                            self.partitions.remove(&key);
                        }
                        dropped += 1;
                        continue;
                    }
                    let new = p.rows.is_empty();
                    p.key_group = key_group;
                    if first {
                        if !new && t >= p.until {
                            continue;
                        }
                        p.rows.clear();
                        p.rows.insert(entry, 1);
                        p.until = t;
                        self.timers.entry(t).or_default().push(key);
                    } else {
                        *p.rows.entry(entry).or_insert(0) += 1;
                        p.trim(self.limit);
                        if new {
                            p.until = t;
                            self.timers.entry(t).or_default().push(key);
                        }
                    }
                }
            }
        }
        if self.mode != RankMode::Updating {
            return Ok(RankOutput {
                changes: None,
                dropped,
            });
        }
        let mut out_rows: Vec<Box<[u8]>> = vec![];
        let mut out_rank: Vec<u64> = vec![];
        let mut out_ops: Vec<Op> = vec![];
        for (key, old) in before {
            let new = self
                .partitions
                .get(key)
                .map(|p| p.top(self.limit))
                .unwrap_or_default();
            for r in 0..old.len().max(new.len()) {
                let (o, w) = (old.get(r), new.get(r));
                if o == w {
                    continue;
                }
                let both = o.is_some() && w.is_some();
                if let Some(o) = o {
                    out_rows.push(o.clone());
                    out_rank.push(r as u64 + 1);
                    out_ops.push(if both { Op::UpdateBefore } else { Op::Delete });
                }
                if let Some(w) = w {
                    out_rows.push(w.clone());
                    out_rank.push(r as u64 + 1);
                    out_ops.push(if both { Op::UpdateAfter } else { Op::Insert });
                }
            }
        }
        Ok(RankOutput {
            changes: self.output(out_rows, out_rank, out_ops)?,
            dropped,
        })
    }

    fn output(
        &self,
        rows: Vec<Box<[u8]>>,
        ranks: Vec<u64>,
        ops: Vec<Op>,
    ) -> Result<Option<ChangeBatch>> {
        output(&self.rows, &self.schema, rows, ranks, ops)
    }

    /// Emits the windows (or first rows) the watermark finished.
    pub fn advance_watermark(&mut self, watermark: i64) -> Result<Option<ChangeBatch>> {
        if watermark <= self.watermark {
            return Ok(None);
        }
        self.watermark = watermark;
        let first = matches!(self.mode, RankMode::FirstByTime { .. });
        let mut rows = vec![];
        let mut ranks = vec![];
        while let Some(entry) = self.timers.first_entry() {
            let t = *entry.key();
            // Windows end at `t` (exclusive); a first row at `t` is final once the watermark is past it.
            if (first && t >= watermark) || (!first && t > watermark) {
                break;
            }
            for key in entry.remove() {
                let Some(p) = self.partitions.get_mut(&key) else {
                    continue;
                };
                if p.done || p.until != t {
                    continue;
                }
                for (r, row) in p.top(self.limit).into_iter().enumerate() {
                    rows.push(row);
                    ranks.push(r as u64 + 1);
                }
                if first {
                    p.rows.clear();
                    p.done = true;
                } else {
                    self.partitions.remove(&key);
                }
            }
        }
        let ops = vec![Op::Insert; rows.len()];
        self.output(rows, ranks, ops)
    }

    /// This worker's state: key group, partition key, sort key, row, copies, until, done.
    pub fn snapshot_rows(&self) -> Result<RecordBatch> {
        if let Some(top) = &self.top {
            return top.snapshot_rows();
        }
        let mut group = vec![];
        let mut key: Vec<&[u8]> = vec![];
        let mut sort: Vec<Option<&[u8]>> = vec![];
        let mut row: Vec<Option<&[u8]>> = vec![];
        let mut count = vec![];
        let mut until = vec![];
        for (k, p) in &self.partitions {
            let entries = p.done.then_some((None, None, 0)).into_iter().chain(
                p.rows
                    .iter()
                    .map(|((s, r), c)| (Some(s.as_ref()), Some(r.as_ref()), *c)),
            );
            for (s, r, c) in entries {
                group.push(p.key_group);
                key.push(k.as_ref());
                sort.push(s);
                row.push(r);
                count.push(c);
                until.push(p.until);
            }
        }
        layout().batch(
            group,
            BinaryArray::from(key),
            vec![
                Arc::new(BinaryArray::from(sort)),
                Arc::new(BinaryArray::from(row)),
                Arc::new(UInt32Array::from(count)),
                Arc::new(Int64Array::from(until)),
            ],
        )
    }

    /// Adds the partitions of a snapshot whose key group `owns` accepts.
    pub fn restore_rows(&mut self, batch: &RecordBatch, owns: &dyn Fn(u16) -> bool) -> Result<()> {
        let rows = layout().read(batch)?;
        let (sort, row, count, until) = (rows.binary(0), rows.binary(1), rows.u32(2), rows.i64(3));
        if let Some(top) = &mut self.top {
            for i in 0..batch.num_rows() {
                if !owns(rows.group(i)) || row.is_null(i) {
                    continue;
                }
                let gid = top.partition(rows.key(i).unwrap_or_default(), rows.group(i))?;
                // Copies past the first N would fall out again.
                for _ in 0..(count.value(i) as usize).min(top.limit) {
                    top.insert(gid, sort.value(i), row.value(i), 0);
                }
            }
            return Ok(());
        }
        for i in 0..batch.num_rows() {
            if !owns(rows.group(i)) {
                continue;
            }
            let k: Box<[u8]> = rows.key(i).unwrap_or_default().into();
            let p = self.partitions.entry(k.clone()).or_default();
            let fresh = p.rows.is_empty() && !p.done;
            p.key_group = rows.group(i);
            p.until = until.value(i);
            if row.is_null(i) {
                p.done = true;
                continue;
            }
            *p.rows
                .entry((sort.value(i).into(), row.value(i).into()))
                .or_insert(0) += count.value(i);
            if fresh && self.mode != RankMode::Updating {
                self.timers.entry(p.until).or_default().push(k);
            }
        }
        Ok(())
    }
}

/// Rows in Arrow row format, with their ranks and ops, as a change batch of `schema`.
fn output<R: AsRef<[u8]>>(
    converter: &RowConverter,
    schema: &SchemaRef,
    rows: Vec<R>,
    ranks: Vec<u64>,
    ops: Vec<Op>,
) -> Result<Option<ChangeBatch>> {
    if rows.is_empty() {
        return Ok(None);
    }
    let parser = converter.parser();
    let cols = converter.convert_rows(rows.iter().map(|r| parser.parse(r.as_ref())))?;
    with_ranks(cols, schema, ranks, ops)
}

/// Output columns with the row number column added, as a change batch of `schema`.
fn with_ranks(
    mut cols: Vec<ArrayRef>,
    schema: &SchemaRef,
    ranks: Vec<u64>,
    ops: Vec<Op>,
) -> Result<Option<ChangeBatch>> {
    cols.push(cast(
        &(Arc::new(UInt64Array::from(ranks)) as ArrayRef),
        schema.field(cols.len()).data_type(),
    )?);
    let data = RecordBatch::try_new(schema.clone(), cols)?;
    Ok(Some(ChangeBatch::with_ops(data, ops)))
}

/// Where an output row comes from: the batch being applied, or state (Arrow row format).
enum Source<'a> {
    Batch(u32),
    State(&'a [u8]),
}

/// [`output`] for rows of both sources: those of the batch are taken from its columns.
fn output_mixed(
    converter: &RowConverter,
    schema: &SchemaRef,
    batch: &ChangeBatch,
    rows: Vec<Source>,
    ranks: Vec<u64>,
    ops: Vec<Op>,
) -> Result<Option<ChangeBatch>> {
    if rows.is_empty() {
        return Ok(None);
    }
    let stored: Vec<&[u8]> = rows
        .iter()
        .filter_map(|r| match r {
            Source::State(b) => Some(*b),
            Source::Batch(_) => None,
        })
        .collect();
    let cols = if stored.is_empty() {
        let idx = arrow::array::UInt32Array::from_iter_values(rows.iter().map(|r| match r {
            Source::Batch(i) => *i,
            Source::State(_) => unreachable!("no rows from state"),
        }));
        arrow::compute::take_arrays(batch.data.columns(), &idx, None)?
    } else {
        let parser = converter.parser();
        let decoded = converter.convert_rows(stored.iter().map(|r| parser.parse(r)))?;
        let mut k = 0;
        let idx: Vec<(usize, usize)> = rows
            .iter()
            .map(|r| match r {
                Source::Batch(i) => (1, *i as usize),
                Source::State(_) => {
                    k += 1;
                    (0, k - 1)
                }
            })
            .collect();
        decoded
            .iter()
            .zip(batch.data.columns())
            .map(|(d, b)| arrow::compute::interleave(&[d.as_ref(), b.as_ref()], &idx))
            .collect::<std::result::Result<Vec<_>, _>>()?
    };
    with_ranks(cols, schema, ranks, ops)
}

/// Updating Top-N over an append-only input, for a small N.
///
/// A partition only ever loses a row by its being pushed out of the first N, so each keeps at
/// most N rows. Partition keys are interned into dense ids ([`GroupTable`], its tag the key
/// group), and entry `j` of partition `g` is slot `g * N + j` of one arena: the sort key's
/// bytes followed by the row's (Arrow row format is prefix-free and order-preserving, so the
/// concatenation compares as the pair), in ascending order. A row that does not make a full
/// partition's first N costs a hash probe and a comparison; one that does costs a copy into the
/// arena (in place when it fits).
struct AppendOnlyTop {
    limit: usize,
    partitions: GroupTable,
    /// Rows held, per partition.
    filled: Vec<u8>,
    entries: ByteSlots,
    /// Length of the sort key at the start of each entry.
    sort_lens: Vec<u32>,
    /// Per entry: 1 + its row in the batch being applied, or 0 (it was there before). Output
    /// rows of the batch are taken from its columns rather than decoded from the row format.
    origin: Vec<u32>,
    /// The batch that last touched each partition (`u32::MAX`: none).
    stamp: Vec<u32>,
    batch: u32,
    /// This batch's touched partitions, each with its rows before the batch (in `before`).
    touched: Vec<(u32, std::ops::Range<usize>)>,
    before: Vec<u8>,
    before_ends: Vec<usize>,
    scratch: Vec<u8>,
}

impl AppendOnlyTop {
    fn try_new(partition: &[PhysExpr], input: &Schema, limit: usize) -> Result<AppendOnlyTop> {
        let fields = crate::operator::rows::key_fields(partition, input)?;
        Ok(AppendOnlyTop {
            limit,
            partitions: GroupTable::try_new(fields)?,
            filled: vec![],
            entries: ByteSlots::default(),
            sort_lens: vec![],
            origin: vec![],
            stamp: vec![],
            batch: 0,
            touched: vec![],
            before: vec![],
            before_ends: vec![],
            scratch: vec![],
        })
    }

    fn rows_held(&self) -> u64 {
        self.filled.iter().map(|&f| f as u64).sum()
    }

    fn size_bytes(&self) -> usize {
        self.partitions.size_bytes()
            + self.entries.size_bytes()
            + self.filled.capacity()
            + (self.sort_lens.capacity() + self.origin.capacity()) * 4
    }

    /// The id of a partition, created if new.
    fn partition(&mut self, key: &[u8], key_group: u16) -> Result<u32> {
        let gid = self.partitions.intern_bytes(key);
        if (gid as u64 + 1) * self.limit as u64 > u32::MAX as u64 {
            return Err(Error::Runtime(format!(
                "a Top-{} holds more than {} partitions on one worker: use more workers",
                self.limit,
                u32::MAX as usize / self.limit
            )));
        }
        if self.partitions.tag(gid) == NO_TAG {
            self.partitions.set_tag(gid, key_group);
        }
        let g = gid as usize;
        if g >= self.filled.len() {
            self.filled.resize(g + 1, 0);
            self.stamp.resize(g + 1, u32::MAX);
            self.sort_lens.resize((g + 1) * self.limit, 0);
            self.origin.resize((g + 1) * self.limit, 0);
        }
        Ok(gid)
    }

    fn slot(&self, gid: u32, j: usize) -> u32 {
        (gid as usize * self.limit + j) as u32
    }

    /// Entry `j` of a partition: sort key and row bytes together.
    fn entry(&self, gid: u32, j: usize) -> &[u8] {
        self.entries.get(self.slot(gid, j)).unwrap_or_default()
    }

    /// The row of entry `j`.
    fn row(&self, gid: u32, j: usize) -> &[u8] {
        let slot = self.slot(gid, j);
        &self.entry(gid, j)[self.sort_lens[slot as usize] as usize..]
    }

    /// Puts a row in a partition's first N, if it belongs there. For row `origin - 1` of the
    /// batch being applied (0: a restore), a partition's first change in the batch saves its
    /// rows before, for the batch's output.
    fn insert(&mut self, gid: u32, sort: &[u8], row: &[u8], origin: u32) -> bool {
        let track = origin > 0;
        let filled = self.filled[gid as usize] as usize;
        // Equal rows rank after those already held (a copy).
        let mut pos = filled;
        while pos > 0 {
            let slot = self.slot(gid, pos - 1) as usize;
            let e = self.entry(gid, pos - 1);
            let (es, er) = e.split_at(self.sort_lens[slot] as usize);
            let later = match es.cmp(sort) {
                std::cmp::Ordering::Equal => er > row,
                o => o == std::cmp::Ordering::Greater,
            };
            if !later {
                break;
            }
            pos -= 1;
        }
        if pos == self.limit {
            return false;
        }
        if track && self.stamp[gid as usize] != self.batch {
            self.stamp[gid as usize] = self.batch;
            let start = self.before_ends.len();
            for j in 0..filled {
                let slot = self.slot(gid, j);
                let e = self.entries.get(slot).unwrap_or_default();
                self.before
                    .extend_from_slice(&e[self.sort_lens[slot as usize] as usize..]);
                self.before_ends.push(self.before.len());
            }
            self.touched.push((gid, start..self.before_ends.len()));
        }
        // Shift the entries after `pos` down by one; the last falls out when full.
        let last = filled.min(self.limit - 1);
        for j in (pos + 1..=last).rev() {
            let (from, to) = (self.slot(gid, j - 1), self.slot(gid, j));
            self.scratch.clear();
            self.scratch
                .extend_from_slice(self.entries.get(from).unwrap_or_default());
            self.entries.set(to, &self.scratch);
            self.sort_lens[to as usize] = self.sort_lens[from as usize];
            self.origin[to as usize] = self.origin[from as usize];
        }
        let at = self.slot(gid, pos);
        self.entries.set_parts(at, &[sort, row]);
        self.sort_lens[at as usize] = sort.len() as u32;
        self.origin[at as usize] = origin;
        self.filled[gid as usize] = (filled + 1).min(self.limit) as u8;
        true
    }

    /// Applies a batch; returns the changed positions of the partitions it touched (row, rank,
    /// op), and how many retractions it dropped (none: the input is append-only).
    #[allow(clippy::type_complexity)]
    fn apply<'a>(
        &'a mut self,
        batch: &ChangeBatch,
        keys: &[&[u8]],
        key_groups: &[u16],
        sorts: &arrow::row::Rows,
        rows: &arrow::row::Rows,
    ) -> Result<(Vec<Source<'a>>, Vec<u64>, Vec<Op>, u64)> {
        // Checked before any state changes.
        if (0..batch.num_rows()).any(|i| batch.op(i).sign() < 0) {
            return Err(Error::Runtime(
                "a Top-N over an append-only input received a retraction".into(),
            ));
        }
        for i in 0..batch.num_rows() {
            let gid = self.partition(keys[i], key_groups[i])?;
            self.insert(gid, sorts.row(i).data(), rows.row(i).data(), i as u32 + 1);
        }
        let (mut out, mut ranks, mut ops) = (vec![], vec![], vec![]);
        let this = &*self;
        for (gid, before) in &this.touched {
            let old = &this.before_ends[before.clone()];
            let new = this.filled[*gid as usize] as usize;
            for r in 0..old.len().max(new) {
                let o = (r < old.len()).then(|| {
                    let start = if before.start + r == 0 {
                        0
                    } else {
                        this.before_ends[before.start + r - 1]
                    };
                    &this.before[start..old[r]]
                });
                let w = (r < new).then(|| this.row(*gid, r));
                if o == w {
                    continue;
                }
                let both = o.is_some() && w.is_some();
                if let Some(o) = o {
                    out.push(Source::State(o));
                    ranks.push(r as u64 + 1);
                    ops.push(if both { Op::UpdateBefore } else { Op::Delete });
                }
                if let Some(w) = w {
                    out.push(match this.origin[this.slot(*gid, r) as usize] {
                        0 => Source::State(w),
                        i => Source::Batch(i - 1),
                    });
                    ranks.push(r as u64 + 1);
                    ops.push(if both { Op::UpdateAfter } else { Op::Insert });
                }
            }
        }
        Ok((out, ranks, ops, 0))
    }

    /// Forgets the batch's touched partitions and their rows before.
    fn end_batch(&mut self) {
        for (gid, _) in &self.touched {
            let first = *gid as usize * self.limit;
            self.origin[first..first + self.limit].fill(0);
        }
        self.touched.clear();
        self.before.clear();
        self.before_ends.clear();
        self.batch = self.batch.wrapping_add(1);
        if self.batch == u32::MAX {
            self.batch = 0;
            self.stamp.fill(u32::MAX);
        }
    }

    fn snapshot_rows(&self) -> Result<RecordBatch> {
        let mut group = vec![];
        let mut key: Vec<&[u8]> = vec![];
        let mut sort: Vec<Option<&[u8]>> = vec![];
        let mut row: Vec<Option<&[u8]>> = vec![];
        for gid in 0..self.filled.len() as u32 {
            if !self.partitions.contains(gid) {
                continue;
            }
            for j in 0..self.filled[gid as usize] as usize {
                let e = self.entry(gid, j);
                let (s, r) = e.split_at(self.sort_lens[self.slot(gid, j) as usize] as usize);
                group.push(self.partitions.tag(gid));
                key.push(self.partitions.key_bytes(gid));
                sort.push(Some(s));
                row.push(Some(r));
            }
        }
        let n = group.len();
        layout().batch(
            group,
            BinaryArray::from(key),
            vec![
                Arc::new(BinaryArray::from(sort)),
                Arc::new(BinaryArray::from(row)),
                Arc::new(UInt32Array::from(vec![1; n])),
                Arc::new(Int64Array::from(vec![0; n])),
            ],
        )
    }
}

/// The snapshot: per partition, each distinct (sort key, row) with its copies and the time its
/// state expires; a partition whose first row was emitted (keep-first) has a row without them.
fn layout() -> KeyedLayout {
    KeyedLayout::new(
        "Top-N",
        false,
        vec![
            Field::new("sort", DataType::Binary, true),
            Field::new("row", DataType::Binary, true),
            Field::new("count", DataType::UInt32, false),
            Field::new("until", DataType::Int64, false),
        ],
    )
}

impl StatefulOperator for RankState {
    const NAME: &'static str = "TopN";

    fn on_batch(
        &mut self,
        _side: usize,
        batch: &ChangeBatch,
        _budget: usize,
        out: &mut Output,
    ) -> Result<Applied> {
        let applied = RankState::apply(self, batch)?;
        out.extend(applied.changes);
        Ok(Applied::with_late(batch.num_rows(), applied.dropped))
    }

    fn on_watermark(
        &mut self,
        _side: usize,
        watermark: i64,
        _made_at: i64,
        out: &mut Output,
    ) -> Result<()> {
        out.extend(RankState::advance_watermark(self, watermark)?);
        Ok(())
    }

    keyed_snapshots!();

    fn size(&self) -> (u64, u64) {
        let bytes = match &self.top {
            Some(top) => top.size_bytes() as u64,
            None => sampled_bytes(self.partitions.len(), self.partitions.iter(), |(k, p)| {
                k.len()
                    + 64
                    + p.rows
                        .keys()
                        .map(|(a, b)| a.len() + b.len() + 48)
                        .sum::<usize>()
            }),
        };
        (bytes, self.partitions() as u64)
    }
}

#[cfg(test)]
mod tests {
    use arrow::array::AsArray;
    use std::collections::BTreeMap;

    use arrow::array::Int64Array;
    use arrow::datatypes::Int64Type;
    use datafusion_physical_expr::expressions::Column;
    use rand::{Rng, SeedableRng};

    use super::*;

    fn input() -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new("k", DataType::Int64, false),
            Field::new("ts", DataType::Int64, false),
            Field::new("v", DataType::Int64, false),
        ]))
    }

    /// `ROW_NUMBER() OVER (PARTITION BY k ORDER BY ts DESC) <= limit`, updating.
    fn state(limit: usize, append_only: bool) -> RankState {
        let col = |n: &str, i: usize| Arc::new(Column::new(n, i)) as PhysExpr;
        let mut fields = input().fields().to_vec();
        fields.push(Arc::new(Field::new("rn", DataType::UInt64, false)));
        RankState::try_new(
            vec![col("k", 0)],
            vec![SortKey {
                expr: col("ts", 1),
                asc: false,
                nulls_first: false,
            }],
            limit,
            RankMode::Updating,
            &input(),
            Arc::new(Schema::new(fields)),
            append_only,
        )
        .unwrap()
    }

    fn batch(rows: &[(i64, i64, i64)]) -> ChangeBatch {
        let col = |f: fn(&(i64, i64, i64)) -> i64| {
            Arc::new(Int64Array::from_iter_values(rows.iter().map(f))) as ArrayRef
        };
        ChangeBatch::inserts(
            RecordBatch::try_new(input(), vec![col(|r| r.0), col(|r| r.1), col(|r| r.2)]).unwrap(),
        )
    }

    /// Top-N snapshots (updating, and append-only Top-1) altered inside their bytes restore or
    /// fail with an error, never a panic.
    #[test]
    fn altered_snapshot_bytes_restore_or_fail_cleanly() {
        let rows: Vec<(i64, i64, i64)> = (0..20_000).map(|i| (i % 4_000, i, i * 7)).collect();
        for (limit, append_only) in [(3, false), (1, true)] {
            let mut s = state(limit, append_only);
            s.apply(&batch(&rows)).unwrap();
            crate::checkpoint::fuzz::altered_snapshots_restore_or_fail(
                &s.snapshot_rows().unwrap(),
                150,
                |b| {
                    let mut s = state(limit, append_only);
                    let restored = s.restore_rows(b, &|_| true).is_ok();
                    if restored {
                        // A restored state still runs: new rows displace the restored ones.
                        let _ = s.apply(&batch(&rows[..2_000]));
                    }
                    restored
                },
            );
        }
    }

    /// Folds a changelog into (row, rank) -> count; a retraction must find what it retracts.
    fn fold(into: &mut BTreeMap<(i64, i64, i64, u64), i64>, changes: &ChangeBatch) {
        let c = |i: usize| changes.data.column(i).as_primitive::<Int64Type>();
        let rank = cast(changes.data.column(3), &DataType::Int64).unwrap();
        let rank = rank.as_primitive::<Int64Type>();
        for i in 0..changes.num_rows() {
            let key = (
                c(0).value(i),
                c(1).value(i),
                c(2).value(i),
                rank.value(i) as u64,
            );
            let n = into.entry(key).or_default();
            *n += changes.op(i).sign();
            assert!(*n >= 0, "retracted a row never emitted: {key:?}");
            if *n == 0 {
                into.remove(&key);
            }
        }
    }

    /// The batch answer: per key, rows by `ts` descending (ties by the whole row), first `limit`.
    fn batch_top(rows: &[(i64, i64, i64)], limit: usize) -> BTreeMap<(i64, i64, i64, u64), i64> {
        let mut by_key: BTreeMap<i64, Vec<(i64, i64, i64)>> = BTreeMap::new();
        for r in rows {
            by_key.entry(r.0).or_default().push(*r);
        }
        let mut out = BTreeMap::new();
        for (_, mut rs) in by_key {
            rs.sort_by(|a, b| b.1.cmp(&a.1).then(a.cmp(b)));
            for (i, r) in rs.into_iter().take(limit).enumerate() {
                *out.entry((r.0, r.1, r.2, i as u64 + 1)).or_default() += 1;
            }
        }
        out
    }

    /// Random append-only batches (with duplicate rows and tied times), through the arena state
    /// and the ordered-map state, with a snapshot and restore half way: both fold to the batch
    /// answer.
    #[test]
    fn append_only_top_n_folds_to_the_batch_answer() {
        let mut rng = rand::rngs::SmallRng::seed_from_u64(7);
        for limit in [1, 3, 20] {
            for append_only in [true, false] {
                let mut s = state(limit, append_only);
                assert_eq!(s.top.is_some(), append_only && limit <= ARENA_TOP_MAX);
                let mut seen = vec![];
                let mut folded = BTreeMap::new();
                for b in 0..40 {
                    let rows: Vec<_> = (0..rng.random_range(0..60))
                        .map(|_| {
                            (
                                rng.random_range(0..12),
                                rng.random_range(0..30),
                                rng.random_range(0..3),
                            )
                        })
                        .collect();
                    seen.extend_from_slice(&rows);
                    if let Some(c) = s.apply(&batch(&rows)).unwrap().changes {
                        fold(&mut folded, &c);
                    }
                    assert_eq!(folded, batch_top(&seen, limit), "limit {limit}, batch {b}");
                    if b == 20 {
                        // Restore on two workers that split the key groups, then merge back.
                        let snap = s.snapshot_rows().unwrap();
                        let (mut even, mut odd) =
                            (state(limit, append_only), state(limit, append_only));
                        even.restore_rows(&snap, &|g| g % 2 == 0).unwrap();
                        odd.restore_rows(&snap, &|g| g % 2 == 1).unwrap();
                        assert_eq!(even.rows_held() + odd.rows_held(), s.rows_held());
                        assert!(even.partitions() > 0 && odd.partitions() > 0);
                        s = state(limit, append_only);
                        s.restore_rows(&even.snapshot_rows().unwrap(), &|_| true)
                            .unwrap();
                        s.restore_rows(&odd.snapshot_rows().unwrap(), &|_| true)
                            .unwrap();
                    }
                }
                if append_only {
                    assert_eq!(
                        s.rows_held() as usize,
                        folded.values().sum::<i64>() as usize
                    );
                }
            }
        }
    }

    /// Hand-checked keep-last: a newer row replaces the key's row (-U old, +U new), an older one
    /// changes nothing, and several rows of a key in one batch emit only the net change.
    #[test]
    fn keep_last_emits_the_net_change_per_batch() {
        let mut s = state(1, true);
        let rows = |c: &ChangeBatch| {
            let col = |i: usize| {
                c.data
                    .column(i)
                    .as_primitive::<Int64Type>()
                    .values()
                    .to_vec()
            };
            let ops: Vec<Op> = (0..c.num_rows()).map(|i| c.op(i)).collect();
            (col(0), col(1), col(2), ops)
        };
        let out = s
            .apply(&batch(&[(1, 10, 0), (2, 5, 0), (1, 12, 1)]))
            .unwrap();
        assert_eq!(
            rows(&out.changes.unwrap()),
            (
                vec![1, 2],
                vec![12, 5],
                vec![1, 0],
                vec![Op::Insert, Op::Insert]
            )
        );
        assert!(s.apply(&batch(&[(1, 11, 9)])).unwrap().changes.is_none());
        let out = s.apply(&batch(&[(2, 6, 3), (2, 7, 4)])).unwrap();
        assert_eq!(
            rows(&out.changes.unwrap()),
            (
                vec![2, 2],
                vec![5, 7],
                vec![0, 4],
                vec![Op::UpdateBefore, Op::UpdateAfter]
            )
        );
        assert_eq!((s.partitions(), s.rows_held()), (2, 2));
    }
}
