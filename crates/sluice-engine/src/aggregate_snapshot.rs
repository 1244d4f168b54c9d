//! Checkpointing an aggregation: its state as an Arrow batch, one row per group (or session),
//! each tagged with the key group its key hashes to. Restoring keeps only the rows whose key
//! group the worker owns, so a snapshot taken with N workers restores on M.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, BinaryArray, BooleanArray, Int64Array, UInt16Array};
use arrow::datatypes::{DataType, Field, Int64Type, Schema, SchemaRef, UInt16Type};
use arrow::record_batch::RecordBatch;
use sluice_common::{Error, Result};
use sluice_state::snapshot::{Reader, Writer};

use crate::aggregate::{AggregateState, Session};
use crate::dataflow::{key_hash_state, KEY_GROUPS};

/// The layout of an aggregation snapshot.
pub fn snapshot_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("key_group", DataType::UInt16, false),
        Field::new("key", DataType::Binary, false),
        Field::new("rows", DataType::Int64, false),
        // Assigned windows: the window's end, and whether it already fired (allowed lateness).
        Field::new("window_end", DataType::Int64, true),
        Field::new("fired", DataType::Boolean, true),
        // Session windows: the session's bounds.
        Field::new("session_start", DataType::Int64, true),
        Field::new("session_end", DataType::Int64, true),
        Field::new("accumulators", DataType::Binary, false),
        // The result emitted last (early firing and allowed lateness), row-encoded.
        Field::new("last_emitted", DataType::Binary, true),
    ]))
}

/// Key group of each group's key.
fn key_groups(state: &AggregateState, gids: &[u32]) -> Result<Vec<u16>> {
    if state.global || gids.is_empty() {
        // No GROUP BY: everything lives on the worker that owns key group 0.
        return Ok(vec![0; gids.len()]);
    }
    let keys = state.table.keys(gids)?;
    let mut hashes = vec![0u64; gids.len()];
    datafusion_common::hash_utils::create_hashes(&keys, &key_hash_state(), &mut hashes)
        .map_err(|e| Error::Runtime(e.to_string()))?;
    Ok(hashes.iter().map(|h| (h % KEY_GROUPS) as u16).collect())
}

impl AggregateState {
    fn accumulator_bytes(&self, slot: u32) -> Vec<u8> {
        let mut out = vec![];
        for acc in &self.accs {
            let mut one = vec![];
            acc.snapshot_group(slot, &mut one);
            Writer(&mut out).bytes(&one);
        }
        out
    }

    /// The whole state as one batch (see [`snapshot_schema`]).
    pub fn snapshot(&self) -> Result<RecordBatch> {
        let mut key_group_of = vec![];
        let (mut keys, mut rows, mut ends, mut fired, mut s_start, mut s_end, mut accs, mut last) = (
            vec![],
            vec![],
            vec![],
            vec![],
            vec![],
            vec![],
            vec![],
            vec![],
        );
        if let Some(s) = &self.sessions {
            for (key, sessions) in &s.open {
                for sess in sessions {
                    key_group_of.push(*key);
                    keys.push(self.table.key_bytes(*key).to_vec());
                    rows.push(self.rows[*key as usize]);
                    ends.push(None);
                    fired.push(None);
                    s_start.push(Some(sess.start));
                    s_end.push(Some(sess.end));
                    accs.push(self.accumulator_bytes(sess.slot));
                    last.push(None);
                }
            }
        } else {
            let mut windows: Vec<(u32, i64, bool)> = vec![];
            for (end, gids) in &self.by_end {
                windows.extend(gids.iter().map(|g| (*g, *end, false)));
            }
            for (until, gids) in &self.cleanup {
                windows.extend(
                    gids.iter()
                        .map(|g| (*g, until - self.emit.allowed_lateness_ms, true)),
                );
            }
            let groups: Vec<(u32, Option<i64>, Option<bool>)> = if windows.is_empty() {
                (0..self.rows.len() as u32)
                    .filter(|g| self.rows[*g as usize] > 0)
                    .map(|g| (g, None, None))
                    .collect()
            } else {
                windows
                    .into_iter()
                    .filter(|(g, _, _)| self.rows[*g as usize] > 0)
                    .map(|(g, e, f)| (g, Some(e), Some(f)))
                    .collect()
            };
            for (g, end, was_fired) in groups {
                key_group_of.push(g);
                keys.push(self.table.key_bytes(g).to_vec());
                rows.push(self.rows[g as usize]);
                ends.push(end);
                fired.push(was_fired);
                s_start.push(None);
                s_end.push(None);
                accs.push(self.accumulator_bytes(g));
                last.push(self.last.get(&g).map(|b| b.to_vec()));
            }
        }
        let key_group: UInt16Array = key_groups(self, &key_group_of)?.into_iter().collect();
        let columns: Vec<ArrayRef> = vec![
            Arc::new(key_group),
            Arc::new(BinaryArray::from_iter_values(keys)),
            Arc::new(Int64Array::from(rows)),
            Arc::new(Int64Array::from(ends)),
            Arc::new(BooleanArray::from(fired)),
            Arc::new(Int64Array::from(s_start)),
            Arc::new(Int64Array::from(s_end)),
            Arc::new(BinaryArray::from_iter_values(accs)),
            Arc::new(last.into_iter().collect::<BinaryArray>()),
        ];
        Ok(RecordBatch::try_new(snapshot_schema(), columns)?)
    }

    /// Loads the rows of a snapshot whose key group `owns` accepts. The state must be empty.
    pub fn restore(&mut self, batch: &RecordBatch, owns: impl Fn(u16) -> bool) -> Result<()> {
        if batch.schema().fields() != snapshot_schema().fields() {
            return Err(Error::Runtime(
                "aggregation snapshot has an unexpected layout".into(),
            ));
        }
        let corrupt = |e: sluice_state::snapshot::CorruptSnapshot| Error::Runtime(e.to_string());
        let col = |i: usize| batch.column(i);
        let key_group = col(0).as_primitive::<UInt16Type>();
        let keys = col(1).as_binary::<i32>();
        let rows = col(2).as_primitive::<Int64Type>();
        let ends = col(3).as_primitive::<Int64Type>();
        let fired = col(4).as_boolean();
        let (s_start, s_end) = (
            col(5).as_primitive::<Int64Type>(),
            col(6).as_primitive::<Int64Type>(),
        );
        let accs = col(7).as_binary::<i32>();
        let last = col(8).as_binary::<i32>();
        for i in 0..batch.num_rows() {
            if !owns(key_group.value(i)) {
                continue;
            }
            let g = self.table.intern_bytes(keys.value(i));
            let capacity = self.table.capacity();
            self.rows.resize(capacity, 0);
            self.is_dirty.resize(capacity, false);
            self.rows[g as usize] = rows.value(i);
            let slot = match self.sessions.as_mut() {
                Some(s) => {
                    let slot = s.free_slots.pop().unwrap_or_else(|| {
                        s.slots += 1;
                        s.slot_key.push(0);
                        (s.slots - 1) as u32
                    });
                    s.slot_key[slot as usize] = g;
                    let sess = Session {
                        start: s_start.value(i),
                        end: s_end.value(i),
                        slot,
                    };
                    s.open.entry(g).or_default().push(sess);
                    s.ends.insert((sess.end, slot));
                    slot
                }
                None => {
                    if ends.is_valid(i) {
                        let end = ends.value(i);
                        if fired.value(i) {
                            self.cleanup
                                .entry(end + self.emit.allowed_lateness_ms)
                                .or_default()
                                .push(g);
                        } else {
                            self.by_end.entry(end).or_default().push(g);
                        }
                    }
                    if last.is_valid(i) {
                        self.last.insert(g, last.value(i).into());
                    }
                    g
                }
            };
            let mut r = Reader(accs.value(i));
            for acc in self.accs.iter_mut() {
                let bytes = r.bytes().map_err(corrupt)?;
                acc.restore_group(slot, bytes).map_err(corrupt)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use arrow::array::Int64Array;
    use datafusion_physical_expr::expressions::Column;
    use sluice_common::ChangeBatch;
    use sluice_sql::{AggCall, AggFunc, AggWindow, EmitPolicy, PhysExpr};

    use super::*;
    use crate::dataflow::worker_for_hash;

    fn input_schema() -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new("k", DataType::Int64, false),
            Field::new("v", DataType::Int64, false),
        ]))
    }

    fn state() -> AggregateState {
        let k: PhysExpr = Arc::new(Column::new("k", 0));
        let v: PhysExpr = Arc::new(Column::new("v", 1));
        let call = |func, arg: Option<PhysExpr>, distinct| AggCall {
            func,
            arg,
            distinct,
            filter: None,
            output_type: DataType::Int64,
        };
        let calls = vec![
            call(AggFunc::Count, None, false),
            call(AggFunc::Sum, Some(v.clone()), false),
            call(AggFunc::Max, Some(v.clone()), false),
            call(AggFunc::Count, Some(v), true),
        ];
        let out = Arc::new(Schema::new(
            ["k", "n", "s", "m", "d"]
                .iter()
                .map(|n| Field::new(*n, DataType::Int64, true))
                .collect::<Vec<_>>(),
        ));
        AggregateState::try_new(
            vec![k],
            calls,
            AggWindow::None,
            EmitPolicy::default(),
            None,
            out,
            &input_schema(),
        )
        .unwrap()
    }

    fn batch(rows: &[(i64, i64)]) -> ChangeBatch {
        let k = Int64Array::from_iter_values(rows.iter().map(|r| r.0));
        let v = Int64Array::from_iter_values(rows.iter().map(|r| r.1));
        ChangeBatch::inserts(
            RecordBatch::try_new(input_schema(), vec![Arc::new(k), Arc::new(v)]).unwrap(),
        )
    }

    /// Every live group's key and results.
    fn current(s: &AggregateState) -> BTreeMap<i64, Vec<i64>> {
        let gids: Vec<u32> = (0..s.rows.len() as u32)
            .filter(|g| s.rows[*g as usize] > 0)
            .collect();
        let keys = s.output_keys(&gids).unwrap();
        let results = s.results(&gids).unwrap();
        (0..gids.len())
            .map(|i| {
                let key = keys[0].as_primitive::<Int64Type>().value(i);
                (
                    key,
                    results
                        .iter()
                        .map(|r| r.as_primitive::<Int64Type>().value(i))
                        .collect(),
                )
            })
            .collect()
    }

    #[test]
    fn a_snapshot_restores_on_another_worker_count() {
        let first: Vec<(i64, i64)> = (0..500).map(|i| (i % 37, (i * 7919) % 101)).collect();
        let second: Vec<(i64, i64)> = (0..500).map(|i| (i % 53, (i * 104729) % 97)).collect();
        let mut one = state();
        one.apply(&batch(&first)).unwrap();
        let snap = one.snapshot().unwrap();
        assert_eq!(snap.num_rows(), 37);
        one.apply(&batch(&second)).unwrap();

        // Restore on two workers, each keeping the key groups it owns, and route the rest of the
        // input the way the exchange does.
        let mut parts = vec![];
        for w in 0..2 {
            let mut s = state();
            s.restore(&snap, |kg| worker_for_hash(kg as u64, 2) == w)
                .unwrap();
            let keys = Int64Array::from_iter_values(second.iter().map(|r| r.0));
            let mut hashes = vec![0u64; second.len()];
            datafusion_common::hash_utils::create_hashes(
                &[Arc::new(keys) as ArrayRef],
                &key_hash_state(),
                &mut hashes,
            )
            .unwrap();
            let mine: Vec<(i64, i64)> = second
                .iter()
                .zip(&hashes)
                .filter(|(_, h)| worker_for_hash(**h, 2) == w)
                .map(|(r, _)| *r)
                .collect();
            s.apply(&batch(&mine)).unwrap();
            parts.push(current(&s));
        }
        let mut merged = parts[0].clone();
        for (k, v) in &parts[1] {
            assert!(
                merged.insert(*k, v.clone()).is_none(),
                "key {k} restored on both workers"
            );
        }
        assert_eq!(merged, current(&one));
    }

    /// Sessions (and their merging after a restore) and assigned windows survive a snapshot.
    #[test]
    fn windows_and_sessions_survive_a_snapshot() {
        use arrow::array::TimestampMillisecondArray;
        use sluice_sql::SessionOutput;
        let schema = Arc::new(Schema::new(vec![
            Field::new("k", DataType::Int64, false),
            Field::new(
                "ts",
                DataType::Timestamp(arrow::datatypes::TimeUnit::Millisecond, None),
                false,
            ),
        ]));
        let k: PhysExpr = Arc::new(Column::new("k", 0));
        let ts: PhysExpr = Arc::new(Column::new("ts", 1));
        let count = AggCall {
            func: AggFunc::Count,
            arg: None,
            distinct: false,
            filter: None,
            output_type: DataType::Int64,
        };
        let out = Arc::new(Schema::new(vec![
            Field::new("k", DataType::Int64, false),
            Field::new(
                "window_start",
                sluice_sql::functions::window_time_type(),
                false,
            ),
            Field::new(
                "window_end",
                sluice_sql::functions::window_time_type(),
                false,
            ),
            Field::new("n", DataType::Int64, false),
        ]));
        let make = || {
            AggregateState::try_new(
                vec![k.clone()],
                vec![count.clone()],
                AggWindow::Session {
                    gap: 10,
                    time: ts.clone(),
                    output: SessionOutput::Columns { start: 1, end: 2 },
                },
                EmitPolicy::default(),
                None,
                out.clone(),
                &schema,
            )
            .unwrap()
        };
        let rows = |r: &[(i64, i64)]| {
            let k = Int64Array::from_iter_values(r.iter().map(|x| x.0));
            let t = TimestampMillisecondArray::from_iter_values(r.iter().map(|x| x.1));
            ChangeBatch::inserts(
                RecordBatch::try_new(schema.clone(), vec![Arc::new(k), Arc::new(t)]).unwrap(),
            )
        };
        let render = |b: Option<ChangeBatch>| {
            let mut v = sluice_connectors::memory::row_strings(&b.unwrap().data).unwrap();
            v.sort();
            v
        };
        // A bridging row and a new session in one batch: the new session must not inherit the
        // slot of the session merged away in the same batch.
        {
            let mut s = make();
            s.apply(&rows(&[(1, 0), (1, 15)])).unwrap();
            s.apply(&rows(&[(1, 8), (1, 100)])).unwrap();
            let out = render(s.advance_watermark(i64::MAX).unwrap());
            assert_eq!(
                out,
                vec![
                    vec![
                        "1",
                        "1970-01-01 00:00:00.000",
                        "1970-01-01 00:00:00.025",
                        "3"
                    ],
                    vec![
                        "1",
                        "1970-01-01 00:00:00.100",
                        "1970-01-01 00:00:00.110",
                        "1"
                    ],
                ]
            );
        }
        // Sessions [0, 10) and [15, 25) for key 1; a row at 8 bridges them after the restore.
        let mut a = make();
        a.apply(&rows(&[(1, 0), (1, 15), (2, 5)])).unwrap();
        let mut b = make();
        b.restore(&a.snapshot().unwrap(), |_| true).unwrap();
        for s in [&mut a, &mut b] {
            s.apply(&rows(&[(1, 8)])).unwrap();
        }
        let (fa, fb) = (
            a.advance_watermark(i64::MAX).unwrap(),
            b.advance_watermark(i64::MAX).unwrap(),
        );
        let (ra, rb) = (render(fa), render(fb));
        assert_eq!(ra, rb);
        assert_eq!(ra.len(), 2, "key 1 merged into one session: {ra:?}");
        assert_eq!(
            ra[0],
            vec![
                "1",
                "1970-01-01 00:00:00.000",
                "1970-01-01 00:00:00.025",
                "3"
            ]
        );
    }

    #[test]
    fn a_damaged_snapshot_is_an_error() {
        let mut s = state();
        s.apply(&batch(&[(1, 5), (1, 6)])).unwrap();
        let snap = s.snapshot().unwrap();
        let accs = snap.column(7).as_binary::<i32>();
        let cut = BinaryArray::from_iter_values([&accs.value(0)[..accs.value(0).len() - 3]]);
        let mut columns = snap.columns().to_vec();
        columns[7] = Arc::new(cut);
        let damaged = RecordBatch::try_new(snap.schema(), columns).unwrap();
        let err = state().restore(&damaged, |_| true).unwrap_err();
        assert!(err.to_string().contains("corrupt state snapshot"), "{err}");
    }
}
