//! Top-N per partition (`ROW_NUMBER() ... <= N`), one worker's state.
//!
//! Each partition keeps its rows ordered by the sort key (Arrow row format, so that the byte order
//! is the SQL order; ties fall back to the whole row, so ranks are deterministic).
//!
//! - [`RankMode::Updating`]: after each batch, every partition the batch touched compares its old
//!   and new first N rows position by position: a changed position emits `-U` old / `+U` new
//!   (`-D` or `+I` where a side is empty). An append-only input keeps only N rows per partition
//!   (a row pushed out never comes back); an updating one keeps all.
//! - [`RankMode::Window`]: a window's partitions are emitted once, when the watermark passes the
//!   window's end.
//! - [`RankMode::FirstByTime`]: per key, the row with the smallest event time is emitted once the
//!   watermark has passed that time; later rows of the key are dropped (exact keep-first
//!   deduplication with append-only output).

use std::collections::BTreeMap;

use hashbrown::HashMap;
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, BinaryArray, Int64Array, UInt16Array, UInt32Array, UInt64Array,
};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit, TimestampMillisecondType};
use arrow::record_batch::RecordBatch;
use arrow::row::RowConverter;
use sluice_common::{ChangeBatch, Error, Op, Result};
use sluice_sql::{PhysExpr, RankMode, SortKey};

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
}

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
        let keys = crate::rows::key_converter(&partition, input)?;
        let sorts = crate::rows::sort_converter(&order, input)?;
        let rows = crate::rows::row_converter(input)?;
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
        })
    }

    /// Rows held over all partitions.
    pub fn rows_held(&self) -> u64 {
        self.partitions.values().map(|p| p.len() as u64).sum()
    }

    pub fn partitions(&self) -> usize {
        self.partitions.len()
    }

    fn times(&self, batch: &RecordBatch, column: usize) -> Result<Vec<Option<i64>>> {
        let t = cast(
            batch.column(column),
            &DataType::Timestamp(TimeUnit::Millisecond, None),
        )?;
        Ok(t.as_primitive::<TimestampMillisecondType>()
            .iter()
            .collect())
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
        let key_arrays = crate::rows::key_arrays(&self.partition, batch)?;
        let key_groups = crate::rows::key_groups(&key_arrays, n)?;
        let sort_arrays = crate::rows::key_arrays(&self.order, batch)?;
        let keys = self.keys.convert_columns(&key_arrays)?;
        let keys = crate::rows::key_bytes(&keys, key_arrays.is_empty(), n);
        let sorts = self.sorts.convert_columns(&sort_arrays)?;
        let rows = self.rows.convert_columns(batch.data.columns())?;
        let times = match self.mode {
            RankMode::Updating => None,
            RankMode::Window { end } => Some(self.times(&batch.data, end)?),
            RankMode::FirstByTime { time } => Some(self.times(&batch.data, time)?),
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
        if rows.is_empty() {
            return Ok(None);
        }
        let parser = self.rows.parser();
        let mut cols = self
            .rows
            .convert_rows(rows.iter().map(|r| parser.parse(r)))?;
        cols.push(cast(
            &(Arc::new(UInt64Array::from(ranks)) as ArrayRef),
            self.schema.field(cols.len()).data_type(),
        )?);
        let data = RecordBatch::try_new(self.schema.clone(), cols)?;
        Ok(Some(ChangeBatch::with_ops(data, ops)))
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
    pub fn snapshot(&self) -> Result<RecordBatch> {
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
        let cols: Vec<ArrayRef> = vec![
            Arc::new(UInt16Array::from(group)),
            Arc::new(BinaryArray::from(key)),
            Arc::new(BinaryArray::from(sort)),
            Arc::new(BinaryArray::from(row)),
            Arc::new(UInt32Array::from(count)),
            Arc::new(Int64Array::from(until)),
        ];
        Ok(RecordBatch::try_new(snapshot_schema(), cols)?)
    }

    /// Adds the partitions of a snapshot whose key group `owns` accepts.
    pub fn restore(&mut self, batch: &RecordBatch, owns: &dyn Fn(u16) -> bool) -> Result<()> {
        crate::rows::check_layout(batch, &snapshot_schema(), "Top-N")?;
        let group = batch
            .column(0)
            .as_primitive::<arrow::datatypes::UInt16Type>();
        let key = batch.column(1).as_binary::<i32>();
        let sort = batch.column(2).as_binary::<i32>();
        let row = batch.column(3).as_binary::<i32>();
        let count = batch
            .column(4)
            .as_primitive::<arrow::datatypes::UInt32Type>();
        let until = batch
            .column(5)
            .as_primitive::<arrow::datatypes::Int64Type>();
        for i in 0..batch.num_rows() {
            if !owns(group.value(i)) {
                continue;
            }
            let k: Box<[u8]> = key.value(i).into();
            let p = self.partitions.entry(k.clone()).or_default();
            let fresh = p.rows.is_empty() && !p.done;
            p.key_group = group.value(i);
            p.until = until.value(i);
            if row.is_null(i) {
                p.done = true;
                continue;
            }
            p.rows
                .insert((sort.value(i).into(), row.value(i).into()), count.value(i));
            if fresh && self.mode != RankMode::Updating {
                self.timers.entry(p.until).or_default().push(k);
            }
        }
        Ok(())
    }
}

fn snapshot_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("key_group", DataType::UInt16, false),
        Field::new("key", DataType::Binary, false),
        Field::new("sort", DataType::Binary, true),
        Field::new("row", DataType::Binary, true),
        Field::new("count", DataType::UInt32, false),
        Field::new("until", DataType::Int64, false),
    ]))
}

impl crate::keyed::KeyedState for RankState {
    const NAME: &'static str = "TopN";

    fn apply(&mut self, batch: &ChangeBatch) -> Result<(Option<ChangeBatch>, u64)> {
        let out = RankState::apply(self, batch)?;
        Ok((out.changes, out.dropped))
    }

    fn advance_watermark(&mut self, watermark: i64) -> Result<Option<ChangeBatch>> {
        RankState::advance_watermark(self, watermark)
    }

    fn snapshot(&self) -> Result<RecordBatch> {
        RankState::snapshot(self)
    }

    fn restore(&mut self, batch: &RecordBatch, owns: &dyn Fn(u16) -> bool) -> Result<()> {
        RankState::restore(self, batch, owns)
    }

    fn groups(&self) -> u64 {
        self.partitions() as u64
    }
}
