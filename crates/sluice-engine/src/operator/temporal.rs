//! The event-time temporal join, one worker's state: the right input is a versioned table (each
//! row a new version of its key, valid from its time on); each left row joins the version of its
//! key valid at the left row's time. Left rows wait until both watermarks pass their time, so
//! that every version up to then is known; then they are emitted (append-only). Versions that no
//! waiting or future row can see (older than the newest one at or below the watermark) are
//! dropped, so state holds about one version per key.

use std::collections::BTreeMap;

use hashbrown::HashMap;
use std::sync::Arc;

use arrow::array::{Array, AsArray, BinaryArray, Int64Array, UInt32Array};
use arrow::compute::{concat_batches, take};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use arrow::row::RowConverter;
use sluice_common::{ChangeBatch, Error, Op, Result};
use sluice_sql::{JoinKind, PhysExpr};

use crate::checkpoint::keyed::KeyedLayout;
use crate::operator::driver::{keyed_snapshots, Applied, Output, StatefulOperator};
use crate::operator::stateless::evaluate;

type Bytes = Box<[u8]>;

struct Versions {
    key_group: u16,
    /// Version time -> row.
    rows: BTreeMap<i64, Bytes>,
}

pub struct TemporalState {
    kind: JoinKind,
    keys: [Vec<PhysExpr>; 2],
    time: [usize; 2],
    filter: Option<PhysExpr>,
    schema: SchemaRef,
    inputs: [SchemaRef; 2],
    combined: SchemaRef,
    key_rows: RowConverter,
    right_rows: RowConverter,
    versions: HashMap<Bytes, Versions>,
    /// Left rows waiting for the watermark.
    pending: Vec<RecordBatch>,
    watermarks: [i64; 2],
    /// Versions dropped up to this watermark.
    cleaned: i64,
}

impl TemporalState {
    #[allow(clippy::too_many_arguments)]
    pub fn try_new(
        kind: JoinKind,
        left_keys: Vec<PhysExpr>,
        right_keys: Vec<PhysExpr>,
        time: [usize; 2],
        filter: Option<PhysExpr>,
        inputs: [SchemaRef; 2],
        schema: SchemaRef,
    ) -> Result<TemporalState> {
        let key_rows = crate::operator::rows::key_converter(&left_keys, &inputs[0])?;
        let right_rows = crate::operator::rows::row_converter(&inputs[1])?;
        let combined = crate::operator::rows::side_by_side(&inputs[0], &inputs[1]);
        Ok(TemporalState {
            kind,
            keys: [left_keys, right_keys],
            time,
            filter,
            schema,
            inputs,
            combined,
            key_rows,
            right_rows,
            versions: HashMap::new(),
            pending: vec![],
            watermarks: [i64::MIN; 2],
            cleaned: i64::MIN,
        })
    }

    fn watermark(&self) -> i64 {
        self.watermarks[0].min(self.watermarks[1])
    }

    /// Key bytes, key groups and null flags of a batch of input `side`.
    fn keys(&self, side: usize, batch: &RecordBatch) -> Result<(Vec<Bytes>, Vec<u16>, Vec<bool>)> {
        let arrays = crate::operator::rows::key_arrays(
            &self.keys[side],
            &ChangeBatch::inserts(batch.clone()),
        )?;
        let n = batch.num_rows();
        let groups = crate::operator::rows::key_groups(&arrays, n)?;
        let rows = self.key_rows.convert_columns(&arrays)?;
        let nulls = (0..n)
            .map(|i| arrays.iter().any(|a| a.is_null(i)))
            .collect();
        Ok((
            (0..n).map(|i| rows.row(i).data().into()).collect(),
            groups,
            nulls,
        ))
    }

    /// Rows (versions) held.
    pub fn rows_held(&self) -> u64 {
        self.versions
            .values()
            .map(|v| v.rows.len() as u64)
            .sum::<u64>()
            + self
                .pending
                .iter()
                .map(|b| b.num_rows() as u64)
                .sum::<u64>()
    }

    fn add_versions(&mut self, batch: &RecordBatch) -> Result<()> {
        let (keys, groups, nulls) = self.keys(1, batch)?;
        let times = crate::operator::rows::event_times(batch, self.time[1])?;
        let rows = self.right_rows.convert_columns(batch.columns())?;
        for i in 0..batch.num_rows() {
            let Some(t) = times[i].filter(|_| !nulls[i]) else {
                continue;
            };
            let v = self
                .versions
                .entry(keys[i].clone())
                .or_insert_with(|| Versions {
                    key_group: groups[i],
                    rows: BTreeMap::new(),
                });
            v.rows.insert(t, rows.row(i).data().into());
        }
        Ok(())
    }

    /// Joins left rows with the versions valid at their times.
    fn probe(&self, batch: &RecordBatch) -> Result<Option<ChangeBatch>> {
        let n = batch.num_rows();
        if n == 0 {
            return Ok(None);
        }
        let (keys, _, nulls) = self.keys(0, batch)?;
        let times = crate::operator::rows::event_times(batch, self.time[0])?;
        let parser = self.right_rows.parser();
        let mut found: Vec<Option<usize>> = vec![None; n];
        let mut rows = vec![];
        for i in 0..n {
            if nulls[i] {
                continue;
            }
            let (Some(t), Some(v)) = (times[i], self.versions.get(&keys[i])) else {
                continue;
            };
            if let Some((_, row)) = v.rows.range(..=t).next_back() {
                found[i] = Some(rows.len());
                rows.push(parser.parse(row));
            }
        }
        let right = self.right_rows.convert_rows(rows)?;
        let right_idx = UInt32Array::from(
            found
                .iter()
                .map(|f| f.map(|x| x as u32))
                .collect::<Vec<_>>(),
        );
        let right_cols = right
            .iter()
            .map(|c| take(c, &right_idx, None))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let mut cols = batch.columns().to_vec();
        cols.extend(right_cols);
        let mut matched: Vec<bool> = found.iter().map(|f| f.is_some()).collect();
        if let Some(filter) = &self.filter {
            let pairs = RecordBatch::try_new(self.combined.clone(), cols.clone());
            // Padded rows may break non-null fields of the combined schema: evaluate on a
            // nullable copy.
            let pairs = match pairs {
                Ok(p) => p,
                Err(_) => RecordBatch::try_new(nullable(&self.combined), cols.clone())?,
            };
            let ok = evaluate(filter, &ChangeBatch::inserts(pairs))?;
            let ok = ok.as_boolean();
            for (i, m) in matched.iter_mut().enumerate() {
                *m = *m && ok.is_valid(i) && ok.value(i);
            }
        }
        let keep_unmatched = self.kind == JoinKind::Left;
        let out: Vec<u32> = (0..n as u32)
            .filter(|i| matched[*i as usize] || keep_unmatched)
            .collect();
        if out.is_empty() {
            return Ok(None);
        }
        let left_idx = UInt32Array::from(out.clone());
        let right_idx: UInt32Array = out
            .iter()
            .map(|i| {
                let i = *i as usize;
                if matched[i] {
                    found[i].map(|x| x as u32)
                } else {
                    None
                }
            })
            .collect();
        let mut columns = vec![];
        for c in batch.columns() {
            columns.push(take(c, &left_idx, None)?);
        }
        for c in right.iter() {
            columns.push(take(c, &right_idx, None)?);
        }
        let n = columns.first().map_or(0, |c| c.len());
        let data = RecordBatch::try_new(self.schema.clone(), columns)?;
        Ok(Some(ChangeBatch::with_ops(data, vec![Op::Insert; n])))
    }

    /// Emits the waiting left rows the watermark has passed, and drops versions nobody can see.
    fn release(&mut self) -> Result<Option<ChangeBatch>> {
        let wm = self.watermark();
        let mut out = None;
        if !self.pending.is_empty() {
            let all = concat_batches(&self.inputs[0], &self.pending)?;
            self.pending.clear();
            let times = crate::operator::rows::event_times(&all, self.time[0])?;
            let (ready, wait): (Vec<u32>, Vec<u32>) =
                (0..all.num_rows() as u32).partition(|i| times[*i as usize].is_none_or(|t| t < wm));
            if !wait.is_empty() {
                self.pending.push(arrow::compute::take_record_batch(
                    &all,
                    &UInt32Array::from(wait),
                )?);
            }
            if !ready.is_empty() {
                let ready = arrow::compute::take_record_batch(&all, &UInt32Array::from(ready))?;
                out = self.probe(&ready)?;
            }
        }
        // Rows still to come have times >= the left watermark: versions older than the newest
        // one at or below it are never seen again.
        let horizon = self
            .pending
            .iter()
            .filter_map(|b| crate::operator::rows::event_times(b, self.time[0]).ok())
            .flatten()
            .flatten()
            .min()
            .map_or(self.watermarks[0], |p| p.min(self.watermarks[0]));
        if horizon > self.cleaned {
            self.cleaned = horizon;
            for v in self.versions.values_mut() {
                if let Some((&keep, _)) = v.rows.range(..=horizon).next_back() {
                    v.rows = v.rows.split_off(&keep);
                }
            }
        }
        Ok(out)
    }
}

fn nullable(schema: &SchemaRef) -> SchemaRef {
    Arc::new(Schema::new(
        schema
            .fields()
            .iter()
            .map(|f| f.as_ref().clone().with_nullable(true))
            .collect::<Vec<_>>(),
    ))
}

/// The snapshot: each version of the right side by key and time; waiting left rows go whole,
/// without a key (a restoring worker keeps those of its key groups).
fn layout() -> KeyedLayout {
    KeyedLayout::new(
        "temporal join",
        true,
        vec![
            Field::new("time", DataType::Int64, true),
            Field::new("row", DataType::Binary, false),
        ],
    )
}

impl TemporalState {
    /// Takes a batch of input `side`: versions of the right side, or left rows that wait for
    /// the watermark.
    pub fn apply(&mut self, side: usize, batch: &ChangeBatch) -> Result<()> {
        if !batch.is_append_only() {
            return Err(Error::Runtime(
                "an event-time temporal join received a retraction; both inputs must be append-only"
                    .into(),
            ));
        }
        if side == 1 {
            return self.add_versions(&batch.data);
        }
        self.pending.push(batch.data.clone());
        Ok(())
    }

    /// Input `side`'s watermark advanced: the left rows it completes, joined.
    pub fn advance_watermark(
        &mut self,
        side: usize,
        watermark: i64,
    ) -> Result<Option<ChangeBatch>> {
        if watermark <= self.watermarks[side] {
            return Ok(None);
        }
        self.watermarks[side] = watermark;
        self.release()
    }

    /// This worker's state in the snapshot layout.
    pub fn snapshot_rows(&self) -> Result<RecordBatch> {
        let mut group = vec![];
        let mut key: Vec<Option<&[u8]>> = vec![];
        let mut time = vec![];
        let mut row: Vec<Vec<u8>> = vec![];
        for (k, v) in &self.versions {
            for (t, r) in &v.rows {
                group.push(v.key_group);
                key.push(Some(k));
                time.push(Some(*t));
                row.push(r.to_vec());
            }
        }
        for b in &self.pending {
            group.push(0);
            key.push(None);
            time.push(None);
            row.push(crate::checkpoint::ipc_bytes(b)?);
        }
        layout().batch(
            group,
            BinaryArray::from(key),
            vec![
                Arc::new(Int64Array::from(time)),
                Arc::new(BinaryArray::from_iter_values(row)),
            ],
        )
    }

    /// Adds the rows of a snapshot whose key group `owns` accepts.
    pub fn restore_rows(&mut self, batch: &RecordBatch, owns: &dyn Fn(u16) -> bool) -> Result<()> {
        let snapshot = layout().read(batch)?;
        let (time, row) = (snapshot.i64(0), snapshot.binary(1));
        let versions = snapshot.owned(owns);
        crate::operator::rows::check_rows(
            &self.right_rows,
            versions.iter().map(|i| row.value(*i)),
            "temporal join",
        )?;
        for i in 0..snapshot.len() {
            if snapshot.key(i).is_none() {
                // Waiting left rows: keep those of this worker's key groups.
                let b = crate::operator::rows::ipc_batch(row.value(i))?;
                if let Some(mine) = b
                    .map(|b| crate::operator::rows::owned_rows(&b, &self.keys[0], owns))
                    .transpose()?
                    .flatten()
                {
                    self.pending.push(mine);
                }
            }
        }
        for i in versions {
            let key = snapshot.key(i).expect("an owned row has a key");
            self.versions
                .entry_ref(key)
                .or_insert_with(|| Versions {
                    key_group: snapshot.group(i),
                    rows: BTreeMap::new(),
                })
                .rows
                .insert(time.value(i), row.value(i).into());
        }
        Ok(())
    }

    pub fn size_bytes(&self) -> u64 {
        self.versions
            .iter()
            .map(|(k, v)| k.len() + v.rows.values().map(|r| r.len() + 16).sum::<usize>())
            .sum::<usize>() as u64
    }
}

impl StatefulOperator for TemporalState {
    const NAME: &'static str = "TemporalJoin";

    fn on_batch(
        &mut self,
        side: usize,
        batch: &ChangeBatch,
        _budget: usize,
        _out: &mut Output,
    ) -> Result<Applied> {
        TemporalState::apply(self, side, batch)?;
        Ok(Applied::all(batch.num_rows()))
    }

    fn on_watermark(
        &mut self,
        side: usize,
        watermark: i64,
        _made_at: i64,
        out: &mut Output,
    ) -> Result<()> {
        out.extend(TemporalState::advance_watermark(self, side, watermark)?);
        Ok(())
    }

    keyed_snapshots!();

    fn size(&self) -> (u64, u64) {
        (self.size_bytes(), self.rows_held())
    }
}

#[cfg(test)]
mod tests {
    use datafusion_physical_expr::expressions::Column;

    use super::*;
    use crate::checkpoint::fuzz::{timed_batch as batch, timed_input as input};

    fn state() -> TemporalState {
        let key = || vec![Arc::new(Column::new("k", 0)) as PhysExpr];
        let schema = crate::operator::rows::side_by_side(&input(), &input());
        TemporalState::try_new(
            JoinKind::Left,
            key(),
            key(),
            [1, 1],
            None,
            [input(), input()],
            schema,
        )
        .unwrap()
    }

    /// Snapshots altered inside their bytes (keys, versions, waiting left rows) restore or
    /// fail with an error, never a panic; a restored state still joins.
    #[test]
    fn altered_snapshots_restore_or_fail() {
        let mut s = state();
        s.apply(1, &batch((0..10_000).map(|i| (i % 1_000, i, -i))))
            .unwrap();
        s.apply(0, &batch((0..10_000).map(|i| (i % 3_000, i, i))))
            .unwrap();
        s.advance_watermark(1, 4_000).unwrap();
        let snap = s.snapshot_rows().unwrap();
        assert!(snap.num_rows() > 1_000, "versions and waiting rows");
        crate::checkpoint::fuzz::altered_snapshots_restore_or_fail(&snap, 150, |b| {
            let mut s = state();
            let restored = s.restore_rows(b, &|_| true).is_ok();
            if restored {
                let _ = s.apply(0, &batch((0..100).map(|i| (i, 20_000 + i, i))));
                let _ = s.advance_watermark(1, i64::MAX);
                let _ = s.advance_watermark(0, i64::MAX);
            }
            restored
        });
    }
}
