//! ChangelogNormalize, one worker's state: turns upserts and deletes by key (an `upsert-kafka`
//! table's records) into a changelog of whole rows, as Flink's operator of that name does.
//!
//! Each key keeps its last row. An upsert (`+I` or `+U`) of a new key emits `+I`; of a key with
//! another row, `-U` old and `+U` new; of a key with the same row, nothing. A delete (`-D`,
//! which may hold only the key's columns) emits `-D` of the key's row, and of a key without one,
//! nothing (counted as skipped). `-U` input is ignored: the `+U` after it says everything.

use hashbrown::HashMap;
use std::sync::Arc;

use arrow::array::{ArrayRef, BinaryArray};
use arrow::datatypes::{DataType, Field, SchemaRef};
use arrow::record_batch::RecordBatch;
use arrow::row::RowConverter;
use sluice_common::{ChangeBatch, Error, Op, Result};
use sluice_sql::PhysExpr;

use crate::checkpoint::keyed::KeyedLayout;
use crate::operator::driver::{keyed_snapshots, sampled_bytes, Applied, Output, StatefulOperator};

/// Bytes in Arrow row format.
type Bytes = Box<[u8]>;

pub struct NormalizeState {
    table: String,
    key: Vec<PhysExpr>,
    keys: RowConverter,
    /// Rows as they arrive: every column nullable (a delete holds only its key).
    rows: RowConverter,
    /// The columns emitted (positions in `input`) and their schema.
    projection: Option<Vec<usize>>,
    output: SchemaRef,
    /// Key -> (key group, last row in row format).
    last: HashMap<Bytes, (u16, Bytes)>,
}

impl NormalizeState {
    /// `key` over `input`; the output is `projection` of the rows, with `output`'s schema.
    pub fn try_new(
        table: &str,
        key: Vec<PhysExpr>,
        input: SchemaRef,
        projection: Option<Vec<usize>>,
        output: SchemaRef,
    ) -> Result<NormalizeState> {
        Ok(NormalizeState {
            table: table.to_string(),
            keys: crate::operator::rows::key_converter(&key, &input)?,
            rows: crate::operator::rows::row_converter(&input)?,
            key,
            projection,
            output,
            last: HashMap::new(),
        })
    }

    /// Keys held.
    pub fn keys_held(&self) -> usize {
        self.last.len()
    }

    /// Applies a batch of upserts and deletes: the changes, and deletes of keys without a row.
    pub fn apply(&mut self, batch: &ChangeBatch) -> Result<(Option<ChangeBatch>, u64)> {
        let n = batch.num_rows();
        if n == 0 {
            return Ok((None, 0));
        }
        let key_arrays = crate::operator::rows::key_arrays(&self.key, batch)?;
        let key_groups = crate::operator::rows::key_groups(&key_arrays, n)?;
        let keys = self.keys.convert_columns(&key_arrays)?;
        let rows = self.rows.convert_columns(batch.data.columns())?;
        let mut out_rows: Vec<Box<[u8]>> = vec![];
        let mut out_ops: Vec<Op> = vec![];
        let mut skipped = 0;
        for (i, key_group) in key_groups.into_iter().enumerate() {
            let key = keys.row(i);
            let key = key.as_ref();
            match batch.op(i) {
                Op::Insert | Op::UpdateAfter => {
                    let row: Box<[u8]> = rows.row(i).as_ref().into();
                    match self.last.get_mut(key) {
                        Some((_, old)) if *old == row => {}
                        Some((_, old)) => {
                            out_rows.push(std::mem::replace(old, row.clone()));
                            out_ops.push(Op::UpdateBefore);
                            out_rows.push(row);
                            out_ops.push(Op::UpdateAfter);
                        }
                        None => {
                            self.last.insert(key.into(), (key_group, row.clone()));
                            out_rows.push(row);
                            out_ops.push(Op::Insert);
                        }
                    }
                }
                Op::UpdateBefore => {}
                Op::Delete => match self.last.remove(key) {
                    Some((_, old)) => {
                        out_rows.push(old);
                        out_ops.push(Op::Delete);
                    }
                    None => skipped += 1,
                },
            }
        }
        Ok((self.output(out_rows, out_ops)?, skipped))
    }

    fn output(&self, rows: Vec<Box<[u8]>>, ops: Vec<Op>) -> Result<Option<ChangeBatch>> {
        if rows.is_empty() {
            return Ok(None);
        }
        let parser = self.rows.parser();
        let columns = self
            .rows
            .convert_rows(rows.iter().map(|r| parser.parse(r.as_ref())))?;
        let columns: Vec<ArrayRef> = match &self.projection {
            None => columns,
            Some(p) => p.iter().map(|i| columns[*i].clone()).collect(),
        };
        let options =
            arrow::record_batch::RecordBatchOptions::new().with_row_count(Some(rows.len()));
        let data = RecordBatch::try_new_with_options(self.output.clone(), columns, &options)
            .map_err(|e| {
                Error::Runtime(format!(
                    "table {}: an upsert record's row does not fit the table ({e})",
                    self.table
                ))
            })?;
        Ok(Some(ChangeBatch::with_ops(data, ops)))
    }

    /// This worker's state: key group, key, last row.
    pub fn snapshot_rows(&self) -> Result<RecordBatch> {
        let mut groups = Vec::with_capacity(self.last.len());
        let mut keys: Vec<&[u8]> = Vec::with_capacity(self.last.len());
        let mut rows: Vec<&[u8]> = Vec::with_capacity(self.last.len());
        for (k, (g, r)) in &self.last {
            groups.push(*g);
            keys.push(k);
            rows.push(r);
        }
        layout().batch(
            groups,
            BinaryArray::from(keys),
            vec![Arc::new(BinaryArray::from(rows))],
        )
    }

    /// Adds the keys of a snapshot whose key group `owns` accepts.
    pub fn restore_rows(&mut self, batch: &RecordBatch, owns: &dyn Fn(u16) -> bool) -> Result<()> {
        let rows = layout().read(batch)?;
        let values = rows.binary(0);
        let owned = rows.owned(owns);
        // Rows that do not decode would panic when emitted.
        crate::operator::rows::check_rows(
            &self.rows,
            owned.iter().map(|i| values.value(*i)),
            "ChangelogNormalize",
        )?;
        for i in owned {
            let key = rows.key(i).ok_or_else(|| rows.corrupt())?;
            self.last
                .insert(key.into(), (rows.group(i), values.value(i).into()));
        }
        Ok(())
    }
}

fn layout() -> KeyedLayout {
    KeyedLayout::new(
        "ChangelogNormalize",
        false,
        vec![Field::new("row", DataType::Binary, false)],
    )
}

impl StatefulOperator for NormalizeState {
    const NAME: &'static str = "ChangelogNormalize";

    fn on_batch(
        &mut self,
        _side: usize,
        batch: &ChangeBatch,
        _budget: usize,
        out: &mut Output,
    ) -> Result<Applied> {
        let (changes, skipped) = self.apply(batch)?;
        out.extend(changes);
        Ok(Applied {
            skipped,
            ..Applied::all(batch.num_rows())
        })
    }

    fn on_watermark(
        &mut self,
        _side: usize,
        _watermark: i64,
        _made_at: i64,
        _out: &mut Output,
    ) -> Result<()> {
        Ok(())
    }

    keyed_snapshots!();

    fn size(&self) -> (u64, u64) {
        let bytes = sampled_bytes(self.last.len(), self.last.iter(), |(k, (_, r))| {
            k.len() + r.len() + 48
        });
        (bytes, self.last.len() as u64)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use arrow::array::{AsArray, Int64Array};
    use arrow::datatypes::{Int64Type, Schema};
    use datafusion_physical_expr::expressions::Column;
    use rand::{Rng, SeedableRng};

    use super::*;

    fn input() -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new("k", DataType::Int64, true),
            Field::new("v", DataType::Int64, true),
        ]))
    }

    fn state() -> NormalizeState {
        let output = Arc::new(Schema::new(vec![
            Field::new("k", DataType::Int64, false),
            Field::new("v", DataType::Int64, false),
        ]));
        let key: Vec<PhysExpr> = vec![Arc::new(Column::new("k", 0))];
        NormalizeState::try_new("t", key, input(), None, output).unwrap()
    }

    /// Upserts `(k, Some(v))` and deletes `(k, None)` (a delete holds only its key).
    fn batch(rows: &[(i64, Option<i64>)]) -> ChangeBatch {
        let data = RecordBatch::try_new(
            input(),
            vec![
                Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.0))),
                Arc::new(Int64Array::from_iter(rows.iter().map(|r| r.1))),
            ],
        )
        .unwrap();
        let ops = rows
            .iter()
            .map(|r| {
                if r.1.is_some() {
                    Op::UpdateAfter
                } else {
                    Op::Delete
                }
            })
            .collect();
        ChangeBatch::with_ops(data, ops)
    }

    fn fold(into: &mut BTreeMap<(i64, i64), i64>, changes: &Option<ChangeBatch>) {
        let Some(c) = changes else { return };
        let k = c.data.column(0).as_primitive::<Int64Type>();
        let v = c.data.column(1).as_primitive::<Int64Type>();
        for i in 0..c.num_rows() {
            let e = into.entry((k.value(i), v.value(i))).or_insert(0);
            *e += c.op(i).sign();
            if *e == 0 {
                into.remove(&(k.value(i), v.value(i)));
            }
        }
    }

    /// Random upserts (often of an unchanged row) and deletes (often of absent keys) over
    /// enough keys that the table resizes and deleted keys come back: the folded output always
    /// equals each key's last row, and a snapshot split over two workers by key group goes on
    /// to the same table.
    #[test]
    fn the_folded_output_is_each_keys_last_row_across_a_split_restore() {
        let mut rng = rand::rngs::SmallRng::seed_from_u64(7);
        let mut one = state();
        let mut model: BTreeMap<i64, i64> = BTreeMap::new();
        let mut folded = BTreeMap::new();
        let mut skipped_expected = 0;
        let mut skipped = 0;
        let mut random_batch = |model: &mut BTreeMap<i64, i64>, skipped_expected: &mut u64| {
            let rows: Vec<(i64, Option<i64>)> = (0..rng.random_range(1..400))
                .map(|_| {
                    let k = rng.random_range(0..3000i64);
                    let v = match rng.random_range(0..10) {
                        0..=2 => None,
                        3 => model.get(&k).copied().or(Some(0)),
                        _ => Some(rng.random_range(0..5i64)),
                    };
                    match v {
                        Some(v) => {
                            model.insert(k, v);
                        }
                        None => {
                            if model.remove(&k).is_none() {
                                *skipped_expected += 1;
                            }
                        }
                    }
                    (k, v)
                })
                .collect();
            rows
        };
        for _ in 0..60 {
            let rows = random_batch(&mut model, &mut skipped_expected);
            let (changes, s) = one.apply(&batch(&rows)).unwrap();
            skipped += s;
            fold(&mut folded, &changes);
            let want: BTreeMap<(i64, i64), i64> =
                model.iter().map(|(k, v)| ((*k, *v), 1)).collect();
            assert_eq!(folded, want);
        }
        assert_eq!(skipped, skipped_expected);
        assert_eq!(one.keys_held(), model.len());
        // Restore into two workers, each owning half the key groups.
        let snapshot = one.snapshot_rows().unwrap();
        let mut halves = [state(), state()];
        for (w, h) in halves.iter_mut().enumerate() {
            h.restore_rows(&snapshot, &|g| g as usize % 2 == w).unwrap();
        }
        assert_eq!(halves[0].keys_held() + halves[1].keys_held(), model.len());
        for _ in 0..30 {
            let rows = random_batch(&mut model, &mut skipped_expected);
            let b = batch(&rows);
            let keys = crate::operator::rows::key_arrays(&one.key, &b).unwrap();
            let groups = crate::operator::rows::key_groups(&keys, b.num_rows()).unwrap();
            for (w, h) in halves.iter_mut().enumerate() {
                let mine: Vec<(i64, Option<i64>)> = rows
                    .iter()
                    .zip(&groups)
                    .filter(|(_, g)| **g as usize % 2 == w)
                    .map(|(r, _)| *r)
                    .collect();
                let (changes, _) = h.apply(&batch(&mine)).unwrap();
                fold(&mut folded, &changes);
            }
            let want: BTreeMap<(i64, i64), i64> =
                model.iter().map(|(k, v)| ((*k, *v), 1)).collect();
            assert_eq!(folded, want);
        }
    }

    /// Snapshots altered inside their bytes restore, or fail with an error; a restored state
    /// still runs (its rows come out again as updates and deletes), or fails with an error.
    #[test]
    fn altered_snapshot_bytes_restore_or_fail_cleanly() {
        let rows: Vec<(i64, Option<i64>)> = (0..5_000).map(|i| (i, Some(i * 7))).collect();
        let mut s = state();
        s.apply(&batch(&rows)).unwrap();
        let again: Vec<(i64, Option<i64>)> = (0..5_000)
            .map(|i| (i, if i % 2 == 0 { None } else { Some(i) }))
            .collect();
        crate::checkpoint::fuzz::altered_snapshots_restore_or_fail(
            &s.snapshot_rows().unwrap(),
            150,
            |b| {
                let mut s = state();
                let restored = s.restore_rows(b, &|_| true).is_ok();
                if restored {
                    let _ = s.apply(&batch(&again));
                }
                restored
            },
        );
    }

    /// 200 K keys: the table grows through many resizes, and deleted keys come back (their
    /// entries reused); the folded output is each key's last row, and the keys held are the
    /// live ones.
    #[test]
    fn a_large_table_resizes_and_reuses_deleted_keys() {
        let mut rng = rand::rngs::SmallRng::seed_from_u64(17);
        let mut s = state();
        let mut model: BTreeMap<i64, i64> = BTreeMap::new();
        let mut folded = BTreeMap::new();
        for round in 0..12 {
            let rows: Vec<(i64, Option<i64>)> = (0..50_000)
                .map(|_| {
                    let k = rng.random_range(0..200_000i64);
                    // Early rounds mostly insert; later ones delete a third.
                    let v = (round < 4 || rng.random_range(0..3) > 0)
                        .then(|| rng.random_range(0..9i64));
                    match v {
                        Some(v) => model.insert(k, v),
                        None => model.remove(&k),
                    };
                    (k, v)
                })
                .collect();
            let (changes, _) = s.apply(&batch(&rows)).unwrap();
            fold(&mut folded, &changes);
        }
        let want: BTreeMap<(i64, i64), i64> = model.iter().map(|(k, v)| ((*k, *v), 1)).collect();
        assert_eq!(folded.len(), want.len());
        assert!(
            folded == want,
            "the folded output differs from each key's last row"
        );
        assert_eq!(s.keys_held(), model.len());
        assert!(
            model.len() > 50_000,
            "the table held many keys: {}",
            model.len()
        );
    }

    /// An upsert of a key's unchanged row emits nothing; a changed one `-U`/`+U`.
    #[test]
    fn an_unchanged_upsert_emits_nothing() {
        let mut s = state();
        let (c, _) = s.apply(&batch(&[(1, Some(10))])).unwrap();
        assert_eq!(c.unwrap().op(0), Op::Insert);
        let (c, _) = s.apply(&batch(&[(1, Some(10))])).unwrap();
        assert!(c.is_none());
        let (c, _) = s.apply(&batch(&[(1, Some(11)), (1, None)])).unwrap();
        let c = c.unwrap();
        let ops: Vec<Op> = (0..c.num_rows()).map(|i| c.op(i)).collect();
        assert_eq!(ops, [Op::UpdateBefore, Op::UpdateAfter, Op::Delete]);
        let v = c.data.column(1).as_primitive::<Int64Type>();
        assert_eq!(v.values().to_vec(), vec![10, 11, 11]);
    }
}
