//! State cleanup of interval and window joins: over a long bounded input fed in event-time order
//! with advancing watermarks, the rows a join holds stay bounded by the interval (or window),
//! whatever the input length, and the output is still exactly the expected set of pairs.

use std::sync::Arc;

use arrow::array::{ArrayRef, Int64Array, TimestampMillisecondArray};
use arrow::datatypes::{DataType, Field, Schema, TimeUnit};
use arrow::record_batch::RecordBatch;
use sluice_common::time::MAX_WATERMARK;
use sluice_common::ChangeBatch;
use sluice_engine::operator::join::JoinState;
use sluice_engine::operator::stateless::{assign_windows, filter, project};
use sluice_sql::{JoinBound, StreamNode};

const ROWS: i64 = 100_000;
const BATCH: i64 = 1_000;
/// Ten milliseconds between rows; key `i % 100`.
const STEP_MS: i64 = 10;

const DDL: &str = "CREATE TABLE t (k BIGINT, ts TIMESTAMP(3), WATERMARK FOR ts AS ts) \
                   WITH ('connector' = 'filesystem', 'path' = '/nonexistent', 'format' = 'json');";

fn rows(from: i64, to: i64) -> ChangeBatch {
    let schema = Arc::new(Schema::new(vec![
        Field::new("k", DataType::Int64, true),
        Field::new("ts", DataType::Timestamp(TimeUnit::Millisecond, None), true),
    ]));
    let cols: Vec<ArrayRef> = vec![
        Arc::new(Int64Array::from_iter_values((from..to).map(|i| i % 100))),
        Arc::new(TimestampMillisecondArray::from_iter_values(
            (from..to).map(|i| i * STEP_MS),
        )),
    ];
    ChangeBatch::inserts(RecordBatch::try_new(schema, cols).unwrap())
}

/// Runs the stateless part of a plan (scan projection, projections, filters, window assignment)
/// over a batch of the scanned table.
fn stateless(node: &StreamNode, batch: &ChangeBatch) -> ChangeBatch {
    match node {
        StreamNode::Scan {
            projection, schema, ..
        } => {
            let cols = match projection {
                Some(p) => p.iter().map(|i| batch.data.column(*i).clone()).collect(),
                None => batch.data.columns().to_vec(),
            };
            batch.with_columns(schema.clone(), cols).unwrap()
        }
        StreamNode::Project {
            input,
            exprs,
            schema,
        } => project(&stateless(input, batch), exprs, schema).unwrap(),
        StreamNode::Filter { input, predicate } => {
            filter(&stateless(input, batch), predicate).unwrap()
        }
        StreamNode::WindowAssign {
            input,
            time,
            kind,
            schema,
        } => assign_windows(
            &stateless(input, batch),
            time,
            *kind,
            schema,
            &Default::default(),
        )
        .unwrap(),
        other => panic!("not stateless: {other:?}"),
    }
}

fn find_join(node: &StreamNode) -> &StreamNode {
    match node {
        StreamNode::Join { .. } => node,
        StreamNode::Project { input, .. } | StreamNode::Filter { input, .. } => find_join(input),
        other => panic!("no join in {other:?}"),
    }
}

/// The join a query plans to, and a fresh state for it (with a TTL, if given).
fn join_state(query: &str, ttl: Option<std::time::Duration>) -> (StreamNode, JoinState) {
    let plan = sluice_sql::plan_script(&format!("{DDL}\n{query};")).unwrap();
    let join = find_join(&plan.pipelines[0].query).clone();
    let StreamNode::Join {
        left,
        right,
        kind,
        left_keys,
        right_keys,
        filter,
        bound,
        schema,
    } = &join
    else {
        unreachable!()
    };
    let state = JoinState::try_new(
        *kind,
        left_keys.clone(),
        right_keys.clone(),
        filter.clone(),
        *bound,
        [left.schema(), right.schema()],
        schema.clone(),
        ttl,
    )
    .unwrap();
    (join, state)
}

/// Feeds the input to both sides in event-time order, advancing both watermarks after each
/// batch. Returns the bound the planner chose, the output rows and the most rows ever held.
fn run(query: &str) -> (Option<JoinBound>, u64, u64) {
    let (join, mut state) = join_state(query, None);
    let StreamNode::Join {
        left, right, bound, ..
    } = join
    else {
        unreachable!()
    };
    let mut output = 0u64;
    let mut max_held = 0;
    let mut count = |c: Option<ChangeBatch>| {
        if let Some(c) = c {
            assert!(c.is_append_only(), "a bounded join's output is append-only");
            output += c.num_rows() as u64;
        }
    };
    for from in (0..ROWS).step_by(BATCH as usize) {
        let batch = rows(from, from + BATCH);
        for (side, node) in [(0, &left), (1, &right)] {
            count(state.apply(side, &stateless(node, &batch)).unwrap().changes);
        }
        let watermark = (from + BATCH - 1) * STEP_MS;
        for side in 0..2 {
            count(state.advance_watermark(side, watermark).unwrap());
        }
        max_held = max_held.max(state.rows_held());
    }
    for side in 0..2 {
        count(state.advance_watermark(side, MAX_WATERMARK).unwrap());
    }
    if bound.is_some() {
        assert_eq!(state.rows_held(), 0, "the end of input empties the state");
    }
    (bound, output, max_held)
}

#[test]
fn interval_join_state_stays_bounded() {
    let (bound, output, max_held) = run("SELECT a.k, a.ts, b.ts FROM t a JOIN t b \
         ON a.k = b.k AND b.ts BETWEEN a.ts AND a.ts + INTERVAL '1' SECOND");
    let bound = bound.expect("planned as an interval join");
    assert!(!bound.window);
    assert_eq!(bound.output_delay, 1000);
    // Row i meets rows j of its key (j = i mod 100) with 0 <= (j - i) * 10 ms <= 1 s: itself and
    // the row 100 later.
    assert_eq!(output as i64, ROWS + (ROWS - 100));
    // Left rows live 1 s (100 rows) past the watermark; right rows none. 200 000 rows went in.
    assert!(max_held <= 250, "held {max_held} rows");
}

#[test]
fn window_join_state_stays_bounded() {
    let (bound, output, max_held) = run("SELECT a.k, a.window_start, b.ts FROM \
         (SELECT * FROM TABLE(TUMBLE(TABLE t, DESCRIPTOR(ts), INTERVAL '1' SECOND))) a JOIN \
         (SELECT * FROM TABLE(TUMBLE(TABLE t, DESCRIPTOR(ts), INTERVAL '1' SECOND))) b \
         ON a.k = b.k AND a.window_start = b.window_start AND a.window_end = b.window_end");
    assert!(bound.expect("planned as a window join").window);
    // A 1 s window holds 100 rows with 100 different keys: each row meets only itself.
    assert_eq!(output as i64, ROWS);
    // Only the open window's rows (at most 100 per side) are held.
    assert!(max_held <= 200, "held {max_held} rows");
}

#[test]
fn a_join_without_a_time_bound_is_a_regular_join() {
    let (bound, output, max_held) =
        run("SELECT a.k, a.ts, b.ts FROM t a JOIN t b ON a.k = b.k AND a.ts = b.ts");
    assert!(bound.is_none());
    assert_eq!(output as i64, ROWS);
    assert_eq!(max_held as i64, 2 * ROWS, "a regular join keeps every row");
}

#[test]
fn an_interval_join_on_processing_time_is_planned_as_one() {
    let plan = sluice_sql::plan_script(&format!(
        "{DDL}\nSELECT a.k FROM (SELECT *, PROCTIME() AS pt FROM t) a JOIN (SELECT *, PROCTIME() AS pt FROM t) b \
         ON a.k = b.k AND b.pt BETWEEN a.pt AND a.pt + INTERVAL '1' SECOND;"
    ))
    .unwrap();
    let StreamNode::Join { bound, .. } = find_join(&plan.pipelines[0].query) else {
        unreachable!()
    };
    let bound = bound.expect("an interval join");
    assert!(bound.processing_time);
    // The same join on event time is not.
    let (bound, _, _) = run("SELECT a.k, a.ts, b.ts FROM t a JOIN t b \
         ON a.k = b.k AND b.ts BETWEEN a.ts AND a.ts + INTERVAL '1' SECOND");
    assert!(!bound.unwrap().processing_time);
}

#[test]
fn state_ttl_drops_rows_not_written_for_that_long() {
    let query = "SELECT a.k, a.ts, b.ts FROM t a JOIN t b ON a.k = b.k";
    let (_, mut kept) = join_state(query, None);
    let (_, mut expiring) = join_state(query, Some(std::time::Duration::from_secs(1)));
    for s in [&mut kept, &mut expiring] {
        assert!(s.apply(0, &rows(0, 10)).unwrap().changes.is_none());
    }
    // Rows not written for more than the TTL are gone: the right rows find no partner.
    std::thread::sleep(std::time::Duration::from_millis(2600));
    let matched = |s: &mut JoinState| {
        s.apply(1, &rows(0, 10))
            .unwrap()
            .changes
            .map_or(0, |c| c.num_rows())
    };
    assert_eq!(matched(&mut kept), 10, "without a TTL every row is kept");
    assert_eq!(
        matched(&mut expiring),
        0,
        "with a 1 s TTL the left rows expired"
    );
    assert_eq!(expiring.rows_held(), 10, "only the new right rows are held");
}

/// Rows `(k, ts)` as a batch of `t`.
fn rows_of(rows: &[(i64, i64)]) -> ChangeBatch {
    let schema = Arc::new(Schema::new(vec![
        Field::new("k", DataType::Int64, true),
        Field::new("ts", DataType::Timestamp(TimeUnit::Millisecond, None), true),
    ]));
    let cols: Vec<ArrayRef> = vec![
        Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.0))),
        Arc::new(TimestampMillisecondArray::from_iter_values(
            rows.iter().map(|r| r.1),
        )),
    ];
    ChangeBatch::inserts(RecordBatch::try_new(schema, cols).unwrap())
}

/// An inner interval join expires rows lazily (a sweep once about half have expired): a row that
/// expired but is still in memory must neither match a late row of the other input nor be in a
/// snapshot, and the sweep frees it.
#[test]
fn an_expired_row_not_yet_swept_is_gone_for_matches_and_snapshots() {
    let (join, mut state) = join_state(
        "SELECT a.k, a.ts, b.ts FROM t a JOIN t b \
         ON a.k = b.k AND b.ts BETWEEN a.ts AND a.ts + INTERVAL '1' SECOND",
        None,
    );
    let StreamNode::Join { left, right, .. } = join else {
        unreachable!()
    };
    // Left: key 1 at 0 s (expires once the right watermark passes 1 s), keys 2..=11 at 100 s.
    let mut l = vec![(1, 0)];
    l.extend((2..=11).map(|k| (k, 100_000)));
    assert!(state
        .apply(0, &stateless(&left, &rows_of(&l)))
        .unwrap()
        .changes
        .is_none());
    // The right watermark passes the first row's bound: 1 of 11 rows expired, not swept.
    state.advance_watermark(1, 5_000).unwrap();
    assert_eq!(state.rows_held(), 11, "swept before half had expired");
    // A late right row of key 1 at 0.5 s would have matched it; one of key 2 at 100.5 s matches.
    let out = state
        .apply(1, &stateless(&right, &rows_of(&[(1, 500), (2, 100_500)])))
        .unwrap()
        .changes
        .expect("the key 2 match");
    assert_eq!(out.num_rows(), 1);
    let k = out
        .data
        .column(0)
        .as_any()
        .downcast_ref::<Int64Array>()
        .unwrap();
    assert_eq!(k.value(0), 2);
    // The snapshot holds the 10 live left rows and the 2 right rows, not the expired one.
    let snap = state.snapshot().unwrap();
    assert_eq!(snap.num_rows(), 12);
    // Past 101 s every left row has expired: the sweep frees them all.
    state.advance_watermark(1, 102_000).unwrap();
    assert_eq!(state.rows_held(), 2);
}
