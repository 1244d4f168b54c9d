//! The streaming join: one worker's state for an equi-join of two inputs partitioned by the key.
//!
//! Each input keeps its rows (Arrow row format, with multiplicities) in a map from the join key.
//! A row that arrives probes the other input's rows of its key, the non-equi condition is
//! evaluated on the candidate pairs as one batch, and the matches are emitted.
//!
//! - **Regular joins** take updating inputs: a retraction retracts the rows it joined. For outer
//!   joins every kept row counts its matches (its *degree*): a row without matches is emitted
//!   padded with NULLs, and that padded row is retracted when the first match arrives (and
//!   emitted again when the last match goes). Output rows are `+I` and `-D`, as in Flink.
//! - **Interval and window joins** ([`JoinBound`]) take append-only inputs. A row expires once the
//!   other input's watermark passes its bound; a kept row that never matched is emitted padded
//!   when it expires, so the output is append-only too. A side whose unmatched rows are not
//!   kept expires lazily: probes skip its expired rows, and it is swept in one sequential pass
//!   once about half of its rows have expired (visiting each expiring key at its own time is a
//!   cache miss per row).
//!
//! `'table.exec.state.ttl'` drops rows of a regular join that were not written for that long
//! (processing time), silently, as Flink does: results that depend on them are no longer exact.

use std::collections::BTreeMap;

use smallvec::SmallVec;
use std::time::{Duration, Instant};

use arrow::array::{
    Array, ArrayRef, AsArray, BinaryArray, BooleanArray, Int64Array, UInt32Array, UInt8Array,
};
use arrow::compute::{cast, take};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit, TimestampMillisecondType};
use arrow::record_batch::RecordBatch;
use arrow::row::RowConverter;
use sluice_common::{ChangeBatch, Error, Op, Result};
use sluice_sql::{JoinBound, JoinKind, PhysExpr};
use sluice_state::group_table::NO_TAG;
use sluice_state::GroupTable;

use crate::checkpoint::keyed::KeyedLayout;
use crate::operator::driver::{Applied, Output, RestoreFrom, SnapshotTo, StatefulOperator};
use crate::operator::stateless::evaluate;

/// One stored row and how often it is there.
struct Entry {
    /// The row, in its side's [`Rows`].
    row: u32,
    count: u32,
    /// Matching rows (with multiplicity) of the other input; kept only where it matters.
    degree: u32,
    /// Bounded joins: the row expires once the other input's watermark is past this.
    until: i64,
    /// Regular joins with a TTL: when the row was last written (seconds since the job began).
    touched: u32,
}

/// The rows of one key. Most keys of a join on a fine key hold one row: it is kept inline.
struct Bucket {
    entries: SmallVec<[Entry; 1]>,
    /// Bounded joins: the time the bucket is due in the expiry index (at most its entries'
    /// earliest `until`); it is re-registered at its next earliest when visited.
    due: i64,
}

/// The rows of one input.
/// The rows a side holds, in one arena (no allocation per row); removed rows' ids are reused.
#[derive(Default)]
struct Rows {
    bytes: sluice_state::ByteSlots,
    free: Vec<u32>,
}

impl Rows {
    fn add(&mut self, row: &[u8]) -> u32 {
        let id = self.free.pop().unwrap_or(self.bytes.capacity() as u32);
        self.bytes.set(id, row);
        id
    }

    #[inline]
    fn get(&self, id: u32) -> &[u8] {
        self.bytes.get(id).unwrap_or_default()
    }

    fn remove(&mut self, id: u32) {
        self.bytes.remove(id);
        self.free.push(id);
    }
}

struct Side {
    rows: RowConverter,
    held_rows: Rows,
    keys: RowConverter,
    key_fields: Vec<arrow::row::SortField>,
    /// Keys interned into dense ids (the tag is the key group); `buckets` is indexed by id.
    index: GroupTable,
    buckets: Vec<Bucket>,
    /// Bounded joins: key ids by the `until` of rows in them (an id removed, or reused by
    /// another key, since it was registered is skipped or visited harmlessly).
    expiry: BTreeMap<i64, Vec<u32>>,
    /// Bounded joins whose unmatched rows of this side are not kept: expired rows stay until a
    /// sweep, `expiry` is not used, and `due` counts rows by `until >> DUE_SHIFT` (rows come
    /// roughly in time order: counts gather in `due_last` while the slot stays the same).
    lazy: bool,
    due: BTreeMap<i64, u64>,
    due_last: (i64, u64),
    /// Rows known to have expired and not swept yet.
    expired: u64,
    held: u64,
    bytes: usize,
    width: usize,
    /// The input never retracts.
    append_only: bool,
}

impl Side {
    fn new(schema: &Schema, keys: &[PhysExpr]) -> Result<Side> {
        Ok(Side {
            rows: crate::operator::rows::row_converter(schema)?,
            held_rows: Rows::default(),
            keys: crate::operator::rows::key_converter(keys, schema)?,
            key_fields: crate::operator::rows::key_fields(keys, schema)?,
            index: GroupTable::try_new(crate::operator::rows::key_fields(keys, schema)?)?,
            buckets: vec![],
            expiry: BTreeMap::new(),
            lazy: false,
            due: BTreeMap::new(),
            due_last: (i64::MIN, 0),
            expired: 0,
            held: 0,
            bytes: 0,
            width: schema.fields().len(),
            append_only: false,
        })
    }

    /// Adds one copy of `row`; returns false if it was there already (its degree is known then).
    fn insert(
        &mut self,
        key: &[u8],
        key_group: u16,
        row: &[u8],
        degree: u32,
        until: i64,
        now: u32,
    ) {
        self.held += 1;
        let gid = self.index.intern_bytes(key);
        if gid as usize == self.buckets.len() {
            self.buckets.push(Bucket::default());
        }
        if self.index.tag(gid) == NO_TAG {
            self.index.set_tag(gid, key_group);
            self.bytes += key.len() + 48;
        }
        let bucket = &mut self.buckets[gid as usize];
        // An updating input may retract a row later, so copies of a row share one entry that
        // retraction finds; an append-only input never does, and saves the search (hot keys have
        // many rows).
        if !self.append_only {
            let held = &self.held_rows;
            if let Some(e) = bucket.entries.iter_mut().find(|e| held.get(e.row) == row) {
                e.count += 1;
                e.touched = now;
                return;
            }
        }
        self.bytes += row.len() + std::mem::size_of::<Entry>();
        bucket.entries.push(Entry {
            row: self.held_rows.add(row),
            count: 1,
            degree,
            until,
            touched: now,
        });
    }

    /// Bounded joins: makes sure the bucket of `key` is visited by time `until` (one index entry
    /// per bucket and due time, not one per row).
    fn expire_by(&mut self, key: &[u8], until: i64) {
        if let Some(gid) = self.index.get(key) {
            let bucket = &mut self.buckets[gid as usize];
            if until < bucket.due {
                bucket.due = until;
                self.expiry.entry(until).or_default().push(gid);
            }
        }
    }

    /// The bucket of a key id, if the id is a key.
    #[inline]
    fn bucket(&self, gid: u32) -> Option<&Bucket> {
        self.index
            .contains(gid)
            .then(|| &self.buckets[gid as usize])
    }

    /// Forgets an empty bucket; its id may be reused.
    fn remove_bucket(&mut self, gid: u32) {
        self.bytes -= self.index.key_bytes(gid).len() + 48;
        self.index.remove(gid);
        self.buckets[gid as usize] = Bucket::default();
    }

    /// Lazy sides: counts a row that expires after `until`.
    fn count_due(&mut self, until: i64) {
        let slot = until >> DUE_SHIFT;
        if slot != self.due_last.0 {
            self.flush_due();
            self.due_last.0 = slot;
        }
        self.due_last.1 += 1;
    }

    fn flush_due(&mut self) {
        let (slot, n) = std::mem::replace(&mut self.due_last, (i64::MIN, 0));
        if n > 0 {
            *self.due.entry(slot).or_default() += n;
        }
    }

    /// Lazy sides: the other input's watermark moved to `watermark`. Counts the rows that
    /// expired (those of slots wholly past it), and frees them once they are about half of
    /// what is held.
    fn expire_lazily(&mut self, watermark: i64) -> Result<()> {
        self.flush_due();
        while let Some(entry) = self.due.first_entry() {
            // Every `until` of the slot is below its end.
            let end = (*entry.key() + 1).saturating_mul(1 << DUE_SHIFT);
            if end > watermark {
                break;
            }
            self.expired += entry.remove();
        }
        if self.expired == 0 {
            return Ok(());
        }
        if self.expired >= self.held {
            // Everything held has expired (the end of the input, or a pause): start afresh
            // rather than visit every key id ever used.
            self.index = GroupTable::try_new(self.key_fields.clone())?;
            self.buckets = vec![];
            self.held_rows = Rows::default();
            (self.held, self.bytes, self.expired) = (0, 0, 0);
            return Ok(());
        }
        // A sweep visits every key id ever used: it waits until what it frees is worth that.
        let ids = self.buckets.len() as u64;
        if self.expired * 2 >= self.held && self.expired * 8 >= ids {
            // Rows of a partly passed slot expire in the sweep too: they leave that slot's
            // count, so that `expired` stays exact.
            let mut swept = Vec::new();
            self.retain(|e| {
                let live = e.until >= watermark;
                if !live {
                    swept.push((e.until >> DUE_SHIFT, e.count as u64));
                }
                live
            });
            for (slot, n) in swept {
                if let Some(c) = self.due.get_mut(&slot) {
                    *c -= n.min(*c);
                    if *c == 0 {
                        self.due.remove(&slot);
                    }
                }
            }
            self.expired = 0;
        }
        Ok(())
    }

    /// Keeps the entries `live` accepts, in one pass over the buckets.
    fn retain(&mut self, mut live: impl FnMut(&Entry) -> bool) {
        let (mut held, mut bytes) = (0u64, 0usize);
        for gid in 0..self.buckets.len() as u32 {
            if !self.index.contains(gid) {
                continue;
            }
            let held_rows = &mut self.held_rows;
            let bucket = &mut self.buckets[gid as usize];
            bucket.entries.retain(|e| {
                if live(e) {
                    return true;
                }
                held += e.count as u64;
                bytes += held_rows.get(e.row).len() + std::mem::size_of::<Entry>();
                held_rows.remove(e.row);
                false
            });
            if bucket.entries.is_empty() {
                self.remove_bucket(gid);
            }
        }
        self.held -= held;
        self.bytes -= bytes;
    }

    /// Removes one copy of `row`; false if it is not there.
    fn remove(&mut self, key: &[u8], row: &[u8]) -> bool {
        let Some(gid) = self.index.get(key) else {
            return false;
        };
        let bucket = &mut self.buckets[gid as usize];
        let held = &mut self.held_rows;
        let Some(pos) = bucket.entries.iter().position(|e| held.get(e.row) == row) else {
            return false;
        };
        self.held -= 1;
        let e = &mut bucket.entries[pos];
        e.count -= 1;
        if e.count == 0 {
            self.bytes -= row.len() + std::mem::size_of::<Entry>();
            held.remove(e.row);
            bucket.entries.swap_remove(pos);
            if bucket.entries.is_empty() {
                self.remove_bucket(gid);
            }
        }
        true
    }
}

impl Default for Bucket {
    fn default() -> Self {
        Bucket {
            entries: SmallVec::new(),
            due: i64::MAX,
        }
    }
}

/// Lazy expiry counts rows per 16 ms of `until`: an expired row is skipped by probes (and held)
/// until its slot has passed, at most 16 ms longer than it could match.
const DUE_SHIFT: u32 = 4;

/// What a batch or a watermark produced.
pub struct JoinOutput {
    pub changes: Option<ChangeBatch>,
    /// Retractions of rows that were not in state (dropped by the TTL, or never inserted).
    pub unmatched_retractions: u64,
    /// The input rows joined (all of them, unless the pairs reached the call's limit).
    pub consumed: usize,
}

/// One worker's join state.
pub struct JoinState {
    kind: JoinKind,
    keys: [Vec<PhysExpr>; 2],
    filter: Option<PhysExpr>,
    bound: Option<JoinBound>,
    sides: [Side; 2],
    schema: SchemaRef,
    /// The inputs' columns side by side, as the condition sees them.
    combined: SchemaRef,
    watermarks: [i64; 2],
    ttl: Option<Duration>,
    started: Instant,
    last_sweep: u32,
    /// A lookup join: the left input is only probed, never kept.
    lookup: bool,
}

impl JoinState {
    #[allow(clippy::too_many_arguments)]
    pub fn try_new(
        kind: JoinKind,
        left_keys: Vec<PhysExpr>,
        right_keys: Vec<PhysExpr>,
        filter: Option<PhysExpr>,
        bound: Option<JoinBound>,
        inputs: [SchemaRef; 2],
        schema: SchemaRef,
        ttl: Option<Duration>,
    ) -> Result<JoinState> {
        let mut sides = [
            Side::new(&inputs[0], &left_keys)?,
            Side::new(&inputs[1], &right_keys)?,
        ];
        for (i, s) in sides.iter_mut().enumerate() {
            s.lazy = bound.is_some() && !kind.keeps_unmatched(i);
        }
        let combined = crate::operator::rows::side_by_side(&inputs[0], &inputs[1]);
        Ok(JoinState {
            kind,
            keys: [left_keys, right_keys],
            filter,
            bound,
            sides,
            schema,
            combined,
            watermarks: [i64::MIN; 2],
            ttl,
            started: Instant::now(),
            last_sweep: 0,
            lookup: false,
        })
    }

    /// Declares which inputs are append-only (they never retract), which spares a search per
    /// stored row.
    pub fn with_append_only(mut self, inputs: [bool; 2]) -> Self {
        for (side, append_only) in self.sides.iter_mut().zip(inputs) {
            side.append_only = append_only;
        }
        self
    }

    /// Makes this a lookup join's state: left rows probe the right input's rows and are not kept,
    /// so the right input's later changes do not revise earlier results.
    pub fn for_lookup(mut self) -> Self {
        self.lookup = true;
        self
    }

    /// Row copies held, over both inputs.
    pub fn rows_held(&self) -> u64 {
        self.sides[0].held + self.sides[1].held
    }

    /// Approximate bytes of state.
    pub fn size_bytes(&self) -> usize {
        self.sides[0].bytes + self.sides[1].bytes
    }

    fn now(&self) -> u32 {
        self.started.elapsed().as_secs() as u32
    }

    /// `until` of each row of a batch of input `side` (bounded joins).
    fn until(&self, side: usize, batch: &RecordBatch) -> Result<Option<Vec<i64>>> {
        let Some(bound) = &self.bound else {
            return Ok(None);
        };
        let by = bound.expire[side];
        let times = cast(
            batch.column(by.column),
            &DataType::Timestamp(TimeUnit::Millisecond, None),
        )?;
        let times = times.as_primitive::<TimestampMillisecondType>();
        Ok(Some(
            (0..batch.num_rows())
                .map(|i| {
                    if times.is_null(i) {
                        i64::MIN
                    } else {
                        times.value(i).saturating_add(by.offset)
                    }
                })
                .collect(),
        ))
    }

    /// Joins a batch of input `side` (0 = left, 1 = right) against the other input's rows.
    pub fn apply(&mut self, side: usize, batch: &ChangeBatch) -> Result<JoinOutput> {
        self.apply_some(side, batch, usize::MAX)
    }

    /// Joins the rows of a batch from its first on, stopping after the row with which the
    /// candidate pairs reach `max_pairs` (at least one row): `JoinOutput::consumed` says how many.
    pub fn apply_some(
        &mut self,
        side: usize,
        batch: &ChangeBatch,
        max_pairs: usize,
    ) -> Result<JoinOutput> {
        let other = 1 - side;
        let n = batch.num_rows();
        let mut unmatched_retractions = 0;
        if n == 0 {
            return Ok(JoinOutput {
                changes: None,
                unmatched_retractions,
                consumed: 0,
            });
        }
        if self.bound.is_some() && !batch.is_append_only() {
            return Err(Error::Runtime(
                "an interval or window join received a retraction; its inputs must be append-only"
                    .into(),
            ));
        }
        let now = self.now();
        self.sweep(now);
        let key_arrays = crate::operator::rows::key_arrays(&self.keys[side], batch)?;
        let key_groups = crate::operator::rows::key_groups(&key_arrays, n)?;
        let null_key: Vec<bool> = (0..n)
            .map(|i| key_arrays.iter().any(|a| a.is_null(i)))
            .collect();
        let keys = self.sides[side].keys.convert_columns(&key_arrays)?;
        let keys = crate::operator::rows::key_bytes(&keys, key_arrays.is_empty(), n);
        let rows = self.sides[side]
            .rows
            .convert_columns(batch.data.columns())?;
        let until = self.until(side, &batch.data)?;

        // Candidate pairs: (row of the batch, entry of the other input), in batch order.
        let mut pair_row: Vec<u32> = vec![];
        let mut pair_entry: Vec<u32> = vec![];
        // Each row's bucket of the other input (`u32::MAX`: none).
        let mut probed = vec![u32::MAX; n];
        // The rows joined in this call: up to the one with which the pairs reach `max_pairs`.
        let mut upto = n;
        let other_cols = {
            let o = &self.sides[other];
            let parser = o.rows.parser();
            let mut candidates = vec![];
            for (i, null) in null_key.iter().enumerate() {
                if *null {
                    continue;
                }
                if let Some(gid) = o.index.get(keys[i]) {
                    probed[i] = gid;
                    let b = &o.buckets[gid as usize];
                    for (e, entry) in b.entries.iter().enumerate() {
                        if o.lazy && entry.until < self.watermarks[side] {
                            continue; // expired, not swept yet
                        }
                        pair_row.push(i as u32);
                        pair_entry.push(e as u32);
                        candidates.push(parser.parse(o.held_rows.get(entry.row)));
                    }
                }
                if candidates.len() >= max_pairs {
                    upto = i + 1;
                    break;
                }
            }
            o.rows.convert_rows(candidates)?
        };
        let passes = self.condition(side, batch, &pair_row, &other_cols)?;

        // Walk the rows in order, emitting (this row | NULL, candidate | NULL, op).
        let mut out_this: Vec<Option<u32>> = vec![];
        let mut out_other: Vec<Option<u32>> = vec![];
        let mut out_ops: Vec<Op> = vec![];
        let keep_this = self.kind.keeps_unmatched(side);
        let keep_other = self.kind.keeps_unmatched(other);
        let bounded = self.bound.is_some();
        let mut p = 0;
        for i in 0..upto {
            let start = p;
            while p < pair_row.len() && pair_row[p] as usize == i {
                p += 1;
            }
            let accumulate = batch.op(i).sign() > 0;
            let key = keys[i];
            let row = rows.row(i);
            let probe_only = self.lookup && side == 0;
            if !accumulate
                && !null_key[i]
                && !probe_only
                && !self.sides[side].remove(key, row.as_ref())
            {
                // Nothing to retract: the row is not in state.
                unmatched_retractions += 1;
                continue;
            }
            let op = if accumulate { Op::Insert } else { Op::Delete };
            let mut matched: u32 = 0;
            for q in start..p {
                if !passes.value(q) {
                    continue;
                }
                let entry = &mut self.sides[other].buckets[probed[i] as usize].entries
                    [pair_entry[q] as usize];
                let copies = entry.count;
                matched += copies;
                // With an outer join, the other row's padded version goes away with its first
                // match and comes back when its last match is retracted (bounded joins pad only
                // on expiry).
                let (mut unpad, mut repad) = (false, false);
                if keep_other {
                    let before = entry.degree;
                    if accumulate {
                        entry.degree += 1;
                        unpad = !bounded && before == 0;
                    } else {
                        entry.degree = before.saturating_sub(1);
                        repad = !bounded && before == 1;
                    }
                }
                let mut emit = |this: Option<u32>, op: Op| {
                    for _ in 0..copies {
                        out_this.push(this);
                        out_other.push(Some(q as u32));
                        out_ops.push(op);
                    }
                };
                if unpad {
                    emit(None, Op::Delete);
                }
                emit(Some(i as u32), op);
                if repad {
                    emit(None, Op::Insert);
                }
            }
            let expired = until
                .as_ref()
                .is_some_and(|u| u[i] < self.watermarks[other]);
            if matched == 0 && keep_this && (!bounded || expired || null_key[i]) {
                out_this.push(Some(i as u32));
                out_other.push(None);
                out_ops.push(op);
            }
            if accumulate && !null_key[i] && !expired && !probe_only {
                let u = until.as_ref().map_or(0, |u| u[i]);
                let key_group = key_groups[i];
                let s = &mut self.sides[side];
                s.insert(key, key_group, row.as_ref(), matched, u, now);
                if s.lazy {
                    s.count_due(u);
                } else if bounded {
                    s.expire_by(key, u);
                }
            }
        }
        let changes = if out_ops.is_empty() {
            None
        } else {
            let this_idx = UInt32Array::from(out_this);
            let other_idx = UInt32Array::from(out_other);
            let this_cols = batch
                .data
                .columns()
                .iter()
                .map(|c| take(c, &this_idx, None))
                .collect::<std::result::Result<Vec<_>, _>>()?;
            let other_cols = other_cols
                .iter()
                .map(|c| take(c, &other_idx, None))
                .collect::<std::result::Result<Vec<_>, _>>()?;
            Some(self.output(side, this_cols, other_cols, out_ops)?)
        };
        Ok(JoinOutput {
            changes,
            unmatched_retractions,
            consumed: upto,
        })
    }

    /// The non-equi condition on each candidate pair (true without a condition).
    fn condition(
        &self,
        side: usize,
        batch: &ChangeBatch,
        pair_row: &[u32],
        other_cols: &[ArrayRef],
    ) -> Result<BooleanArray> {
        let Some(filter) = &self.filter else {
            return Ok(BooleanArray::from(vec![true; pair_row.len()]));
        };
        if pair_row.is_empty() {
            return Ok(BooleanArray::from(Vec::<bool>::new()));
        }
        let idx = UInt32Array::from(pair_row.to_vec());
        let this_cols = batch
            .data
            .columns()
            .iter()
            .map(|c| take(c, &idx, None))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let cols = if side == 0 {
            [this_cols, other_cols.to_vec()].concat()
        } else {
            [other_cols.to_vec(), this_cols].concat()
        };
        let pairs = RecordBatch::try_new(self.combined.clone(), cols)?;
        let result = evaluate(filter, &ChangeBatch::inserts(pairs))?;
        let result = result
            .as_boolean_opt()
            .ok_or_else(|| Error::Runtime("a join condition must be a boolean".into()))?;
        // NULL is not a match.
        Ok(result.iter().map(|v| Some(v == Some(true))).collect())
    }

    fn output(
        &self,
        side: usize,
        this_cols: Vec<ArrayRef>,
        other_cols: Vec<ArrayRef>,
        ops: Vec<Op>,
    ) -> Result<ChangeBatch> {
        let cols = if side == 0 {
            [this_cols, other_cols].concat()
        } else {
            [other_cols, this_cols].concat()
        };
        let data = RecordBatch::try_new(self.schema.clone(), cols)?;
        Ok(ChangeBatch::with_ops(data, ops))
    }

    /// Input `side`'s watermark advanced: rows of the other input that can no longer match
    /// expire (bounded joins); those of a kept input that never matched are emitted padded.
    pub fn advance_watermark(
        &mut self,
        side: usize,
        watermark: i64,
    ) -> Result<Option<ChangeBatch>> {
        if watermark <= self.watermarks[side] {
            return Ok(None);
        }
        self.watermarks[side] = watermark;
        if self.bound.is_none() {
            return Ok(None);
        }
        let expiring = 1 - side;
        let keep = self.kind.keeps_unmatched(expiring);
        let s = &mut self.sides[expiring];
        if s.lazy {
            s.expire_lazily(watermark)?;
            return Ok(None);
        }
        let mut padded: Vec<Box<[u8]>> = vec![];
        while let Some(entry) = s.expiry.first_entry() {
            if *entry.key() >= watermark {
                break;
            }
            let due = *entry.key();
            for gid in entry.remove() {
                if !s.index.contains(gid) {
                    continue;
                }
                let bucket = &mut s.buckets[gid as usize];
                if bucket.due != due {
                    continue; // registered again, earlier; visited then
                }
                let mut freed = 0;
                let held_rows = &mut s.held_rows;
                bucket.entries.retain(|e| {
                    if e.until >= watermark {
                        return true;
                    }
                    let row = held_rows.get(e.row);
                    if keep && e.degree == 0 {
                        for _ in 0..e.count {
                            padded.push(Box::<[u8]>::from(row));
                        }
                    }
                    s.held -= e.count as u64;
                    freed += row.len() + std::mem::size_of::<Entry>();
                    held_rows.remove(e.row);
                    false
                });
                s.bytes -= freed;
                if bucket.entries.is_empty() {
                    s.remove_bucket(gid);
                } else {
                    // Due again when its earliest remaining row expires.
                    let next = bucket
                        .entries
                        .iter()
                        .map(|e| e.until)
                        .min()
                        .expect("entries");
                    bucket.due = next;
                    s.expiry.entry(next).or_default().push(gid);
                }
            }
        }
        if padded.is_empty() {
            return Ok(None);
        }
        let parser = s.rows.parser();
        let these = s
            .rows
            .convert_rows(padded.iter().map(|r| parser.parse(r)))?;
        let n = padded.len();
        let other_schema = if expiring == 0 {
            &self.schema.fields()[self.sides[0].width..]
        } else {
            &self.schema.fields()[..self.sides[0].width]
        };
        let nulls = other_schema
            .iter()
            .map(|f| arrow::array::new_null_array(f.data_type(), n))
            .collect();
        Ok(Some(self.output(
            expiring,
            these,
            nulls,
            vec![Op::Insert; n],
        )?))
    }

    /// Drops rows of a regular join not written within the TTL (checked every few seconds).
    fn sweep(&mut self, now: u32) {
        let Some(ttl) = self.ttl else { return };
        let ttl = ttl.as_secs().max(1) as u32;
        if now < self.last_sweep + (ttl / 4).max(1) {
            return;
        }
        self.last_sweep = now;
        for s in &mut self.sides {
            s.retain(|e| now.saturating_sub(e.touched) <= ttl);
        }
    }

    /// This worker's rows as one Arrow batch: key group, key, input, row, count, degree, until.
    pub fn snapshot(&self) -> Result<RecordBatch> {
        let mut side = vec![];
        let mut group = vec![];
        let mut key: Vec<&[u8]> = vec![];
        let mut row: Vec<&[u8]> = vec![];
        let mut count = vec![];
        let mut degree = vec![];
        let mut until = vec![];
        for (i, s) in self.sides.iter().enumerate() {
            // Expired rows not swept yet are not state.
            let expired = |e: &Entry| s.lazy && e.until < self.watermarks[1 - i];
            for gid in 0..s.buckets.len() as u32 {
                let Some(b) = s.bucket(gid) else { continue };
                for e in b.entries.iter().filter(|e| !expired(e)) {
                    side.push(i as u8);
                    group.push(s.index.tag(gid));
                    key.push(s.index.key_bytes(gid));
                    row.push(s.held_rows.get(e.row));
                    count.push(e.count);
                    degree.push(e.degree);
                    until.push(e.until);
                }
            }
        }
        layout().batch(
            group,
            BinaryArray::from(key),
            vec![
                std::sync::Arc::new(UInt8Array::from(side)),
                std::sync::Arc::new(BinaryArray::from(row)),
                std::sync::Arc::new(UInt32Array::from(count)),
                std::sync::Arc::new(UInt32Array::from(degree)),
                std::sync::Arc::new(Int64Array::from(until)),
            ],
        )
    }

    /// Adds the rows of a snapshot whose key group `owns` accepts.
    pub fn restore(&mut self, batch: &RecordBatch, owns: &dyn Fn(u16) -> bool) -> Result<()> {
        let snapshot = layout().read(batch)?;
        let (side, row, count, degree, until) = (
            snapshot.u8(0),
            snapshot.binary(1),
            snapshot.u32(2),
            snapshot.u32(3),
            snapshot.i64(4),
        );
        let mine = snapshot.owned(owns);
        for (n, s) in self.sides.iter().enumerate() {
            let of_side = mine
                .iter()
                .filter(|i| (side.value(**i) as usize).min(1) == n);
            crate::operator::rows::check_rows(&s.rows, of_side.map(|i| row.value(*i)), "join")?;
        }
        let now = self.now();
        let bounded = self.bound.is_some();
        for i in mine {
            let key = snapshot.key(i).expect("an owned row has a key");
            let s = &mut self.sides[(side.value(i) as usize).min(1)];
            for _ in 0..count.value(i) {
                s.insert(
                    key,
                    snapshot.group(i),
                    row.value(i),
                    degree.value(i),
                    until.value(i),
                    now,
                );
            }
            if s.lazy {
                for _ in 0..count.value(i) {
                    s.count_due(until.value(i));
                }
            } else if bounded {
                s.expire_by(key, until.value(i));
            }
        }
        Ok(())
    }
}

/// The snapshot: each distinct row of each input by key, with its copies, its number of
/// matches (outer joins) and the time it expires (interval joins).
fn layout() -> KeyedLayout {
    KeyedLayout::new(
        "join",
        false,
        vec![
            Field::new("side", DataType::UInt8, false),
            Field::new("row", DataType::Binary, false),
            Field::new("count", DataType::UInt32, false),
            Field::new("degree", DataType::UInt32, false),
            Field::new("until", DataType::Int64, false),
        ],
    )
}

/// How long a processing-time interval join keeps a row past its bound, for rows on their way
/// from where `PROCTIME()` stamped them.
const PROCTIME_GRACE_MS: i64 = 200;

/// Output rows a join emits in one activation before it yields: the rest of its input waits
/// (and holds its capability), so that downstream operators take the output in bounded batches
/// instead of all of it piling up (a constant-key join of 200 K by 200 K rows is 40 G rows).
const OUTPUT_BUDGET: usize = 64 * 1024;

/// The join as a stateful operator: its state, and the pace of its output.
pub struct JoinOperator {
    state: JoinState,
    /// Input rows per call of the state: adapted to the output each row makes, so that one call
    /// stays near a quarter of the budget.
    rows_per_call: usize,
    /// A processing-time interval join: rows expire by the wall clock, not by watermarks.
    processing_time: bool,
    /// How far an interval join's output trails its inputs' watermark.
    output_delay: i64,
}

impl JoinOperator {
    pub fn new(state: JoinState, output_delay: i64, processing_time: bool) -> Self {
        JoinOperator {
            state,
            rows_per_call: usize::MAX,
            processing_time,
            output_delay,
        }
    }
}

impl StatefulOperator for JoinOperator {
    const NAME: &'static str = "Join";

    /// Joins the batch in slices while the budget lasts.
    fn on_batch(
        &mut self,
        side: usize,
        batch: &ChangeBatch,
        mut budget: usize,
        out: &mut Output,
    ) -> Result<Applied> {
        if self.processing_time {
            let now = sluice_common::time::now_millis() - PROCTIME_GRACE_MS;
            for s in 0..2 {
                out.extend(self.state.advance_watermark(s, now)?);
            }
        }
        let n = batch.num_rows();
        let mut applied = Applied::default();
        while applied.consumed < n && budget > 0 {
            let at = applied.consumed;
            let rows = self.rows_per_call.clamp(1, n - at);
            let slice = if rows == n {
                batch.clone()
            } else {
                batch.slice(at, rows)
            };
            let joined = self
                .state
                .apply_some(side, &slice, budget.clamp(1, OUTPUT_BUDGET / 4))?;
            let rows = joined.consumed.max(1);
            applied.consumed += rows;
            applied.skipped += joined.unmatched_retractions;
            let made = joined.changes.as_ref().map_or(0, |c| c.num_rows());
            budget = budget.saturating_sub(made);
            // Aim the next call at a quarter of the budget.
            self.rows_per_call = match (rows * OUTPUT_BUDGET / 4).checked_div(made) {
                None => self.rows_per_call.saturating_mul(2).min(1 << 20),
                Some(aim) => aim.clamp(1, 1 << 20),
            };
            out.extend(joined.changes);
        }
        Ok(applied)
    }

    fn on_watermark(
        &mut self,
        side: usize,
        watermark: i64,
        _made_at: i64,
        out: &mut Output,
    ) -> Result<()> {
        // A processing-time join expires rows by the clock; only the end of input counts here.
        if !self.processing_time || watermark == sluice_common::time::MAX_WATERMARK {
            out.extend(self.state.advance_watermark(side, watermark)?);
        }
        Ok(())
    }

    fn snapshot(&mut self, to: &SnapshotTo<'_>) -> Result<()> {
        to.write(self.state.snapshot()?);
        Ok(())
    }

    fn restore(&mut self, from: &RestoreFrom<'_>) -> Result<()> {
        from.key_groups(|b, owns| self.state.restore(b, owns))
    }

    fn size(&self) -> (u64, u64) {
        (self.state.size_bytes() as u64, self.state.rows_held())
    }

    fn output_budget(&self) -> Option<usize> {
        Some(OUTPUT_BUDGET)
    }

    fn output_delay(&self) -> i64 {
        self.output_delay
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::Int64Array;
    use datafusion_physical_expr::expressions::Column;

    use super::*;

    fn input() -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new("k", DataType::Int64, true),
            Field::new("v", DataType::Int64, true),
        ]))
    }

    /// A full outer join on `k`.
    fn state() -> JoinState {
        let k: PhysExpr = Arc::new(Column::new("k", 0));
        let out = Arc::new(Schema::new(vec![
            Field::new("k", DataType::Int64, true),
            Field::new("v", DataType::Int64, true),
            Field::new("k2", DataType::Int64, true),
            Field::new("v2", DataType::Int64, true),
        ]));
        JoinState::try_new(
            sluice_sql::JoinKind::Full,
            vec![k.clone()],
            vec![k],
            None,
            None,
            [input(), input()],
            out,
            None,
        )
        .unwrap()
    }

    fn batch(rows: impl Iterator<Item = (i64, i64)>) -> ChangeBatch {
        let (k, v): (Vec<i64>, Vec<i64>) = rows.unzip();
        ChangeBatch::inserts(
            RecordBatch::try_new(
                input(),
                vec![Arc::new(Int64Array::from(k)), Arc::new(Int64Array::from(v))],
            )
            .unwrap(),
        )
    }

    /// Join snapshots altered inside their bytes restore or fail with an error, never a panic.
    #[test]
    fn altered_snapshot_bytes_restore_or_fail_cleanly() {
        let mut s = state();
        s.apply(0, &batch((0..10_000).map(|i| (i % 3_000, i))))
            .unwrap();
        s.apply(1, &batch((0..10_000).map(|i| (i % 5_000, -i))))
            .unwrap();
        crate::checkpoint::fuzz::altered_snapshots_restore_or_fail(
            &s.snapshot().unwrap(),
            150,
            |b| {
                let mut s = state();
                let restored = s.restore(b, &|_| true).is_ok();
                if restored {
                    // A restored state still runs: new rows join (and retract) the restored ones.
                    let _ = s.apply(0, &batch((0..2_000).map(|i| (i % 3_000, i))));
                    let _ = s.apply(1, &batch((0..2_000).map(|i| (i % 5_000, -i))));
                }
                restored
            },
        );
    }
}
