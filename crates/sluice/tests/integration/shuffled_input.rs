//! Property: for any input shuffled within the watermark bound, any worker count and any batch
//! size, the folded stream result equals the batch answer (computed here directly), and no row
//! is dropped as late.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use sluice_engine::JobOptions;

use crate::common::{run_job, Folded};

const START: i64 = 1_794_355_200_000; // 2026-11-11 00:00:00
const BOUND_MS: i64 = 500;

fn ts_text(ms: i64) -> String {
    sluice_common::time::format_millis(ms)
}

/// Rows (key, value, event time) in arrival order: event times advance 37 ms apart and each
/// row arrives up to `BOUND_MS` late, so no row is older than the latest one minus the bound.
fn arrival_order(rows: &[(i64, i64, i64)]) -> Vec<(i64, i64, i64)> {
    let mut v: Vec<(i64, (i64, i64, i64))> =
        rows.iter().map(|r| (r.2 + r.2 % BOUND_MS, *r)).collect();
    v.sort_by_key(|(arrival, r)| (*arrival, r.2));
    v.into_iter().map(|(_, r)| r).collect()
}

fn check(input: Vec<(i64, i64, i64)>, workers: usize, batch: usize) {
    let ordered = arrival_order(&input);
    let dir = tempfile::tempdir().unwrap();
    // Two files, each in arrival order, so that two workers read in parallel.
    let mut files = [String::new(), String::new()];
    for (i, (k, v, t)) in ordered.iter().enumerate() {
        files[i % 2].push_str(&format!(
            "{{\"k\": {k}, \"v\": {v}, \"ts\": \"{}\"}}\n",
            ts_text(*t)
        ));
    }
    for (i, f) in files.iter().enumerate() {
        std::fs::write(dir.path().join(format!("part-{i}.json")), f).unwrap();
    }
    let sql = format!(
        "SET 'table.exec.mini-batch.size' = '{batch}';
         CREATE TABLE t (k BIGINT, v BIGINT, ts TIMESTAMP(3), WATERMARK FOR ts AS ts - INTERVAL '{BOUND_MS}' MILLISECOND)
         WITH ('connector' = 'filesystem', 'path' = '{}', 'format' = 'json');
         SELECT TUMBLE_START(ts, INTERVAL '1' SECOND), k, COUNT(*), SUM(v), MAX(v) FROM t GROUP BY TUMBLE(ts, INTERVAL '1' SECOND), k;
         SELECT k, COUNT(*), MIN(v), SUM(v) FROM t GROUP BY k;",
        dir.path().display()
    );
    let plan = sluice_sql::plan_script(&sql).unwrap();
    let folded = Arc::new(Folded::default());
    let options = JobOptions {
        workers,
        ..Default::default()
    };
    let summary = run_job(plan, options, folded.clone(), Duration::from_secs(60)).unwrap();
    assert_eq!(summary.late_rows_dropped, 0);

    // The batch answers, computed directly.
    let mut windows: BTreeMap<(i64, i64), (i64, i64, i64)> = BTreeMap::new();
    let mut groups: BTreeMap<i64, (i64, i64, i64)> = BTreeMap::new();
    for &(k, v, t) in &input {
        let w = windows
            .entry((t.div_euclid(1000) * 1000, k))
            .or_insert((0, 0, i64::MIN));
        *w = (w.0 + 1, w.1 + v, w.2.max(v));
        let g = groups.entry(k).or_insert((0, i64::MAX, 0));
        *g = (g.0 + 1, g.1.min(v), g.2 + v);
    }
    let want_windows: BTreeMap<Vec<String>, i64> = windows
        .into_iter()
        .map(|((ws, k), (n, s, m))| {
            (
                vec![
                    ts_text(ws),
                    k.to_string(),
                    n.to_string(),
                    s.to_string(),
                    m.to_string(),
                ],
                1,
            )
        })
        .collect();
    let want_groups: BTreeMap<Vec<String>, i64> = groups
        .into_iter()
        .map(|(k, (n, lo, s))| {
            (
                vec![k.to_string(), n.to_string(), lo.to_string(), s.to_string()],
                1,
            )
        })
        .collect();
    assert_eq!(
        folded.take(1),
        want_groups,
        "updating GROUP BY, {workers} workers, batch {batch}"
    );
    assert_eq!(
        folded.take(0),
        want_windows,
        "tumbling window, {workers} workers, batch {batch}"
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn shuffled_within_the_bound_equals_batch(
        rows in proptest::collection::vec((0i64..5, -50i64..1000), 1..400),
        workers in prop_oneof![Just(1usize), Just(2), Just(4)],
        batch in prop_oneof![Just(1usize), Just(7), Just(8192)],
    ) {
        let input: Vec<(i64, i64, i64)> = rows.into_iter().enumerate().map(|(i, (k, v))| (k, v, START + i as i64 * 37)).collect();
        check(input, workers, batch);
    }
}
