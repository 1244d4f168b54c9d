//! Early firing: a window emits partial results every delay (processing time) before its final
//! result, as updates, so a dashboard sees it grow.

use std::sync::Arc;
use std::time::Duration;

use sluice_common::Op;
use sluice_engine::JobOptions;

use crate::common::{run_job, Changelog};

#[test]
fn early_fire_emits_growing_partial_results() {
    // 6,000 orders paced at 4,000/s: about 1.5 s of wall time inside one 1-hour window.
    let sql = "SET 'table.exec.emit.early-fire.enabled' = 'true';
               SET 'table.exec.emit.early-fire.delay' = '200 ms';
               CREATE TABLE orders (order_id BIGINT, amount DOUBLE, event_time TIMESTAMP(3),
                 WATERMARK FOR event_time AS event_time - INTERVAL '5' SECOND)
               WITH ('connector' = 'ecommerce', 'rows-per-second' = '4000', 'number-of-rows' = '6000');
               SELECT TUMBLE_START(event_time, INTERVAL '1' HOUR) AS ws, COUNT(*) AS n
               FROM orders GROUP BY TUMBLE(event_time, INTERVAL '1' HOUR);";
    let plan = sluice_sql::plan_script(sql).unwrap();
    for workers in [1, 2] {
        let log = Arc::new(Changelog::default());
        let options = JobOptions {
            workers,
            ..Default::default()
        };
        run_job(plan.clone(), options, log.clone(), Duration::from_secs(60)).unwrap();
        let changes: Vec<(Op, Vec<String>)> =
            log.changes(0).into_iter().map(|c| (c.op, c.row)).collect();
        // Fold per window: the final result is exact.
        let mut current: std::collections::HashMap<(String, String), i64> = Default::default();
        for (op, row) in changes.iter() {
            *current.entry((row[0].clone(), row[1].clone())).or_default() += op.sign();
        }
        current.retain(|_, n| *n != 0);
        let total: i64 = current.keys().map(|(_, n)| n.parse::<i64>().unwrap()).sum();
        assert_eq!(
            total, 6000,
            "{workers} workers: the folded counts add up to every order"
        );
        assert!(
            current.values().all(|n| *n == 1),
            "one current row per window and worker"
        );
        let partial = changes
            .iter()
            .filter(|(op, _)| *op == Op::UpdateBefore)
            .count();
        assert!(partial >= 2, "{workers} workers: expected partial results to be retracted as the window grew, got {changes:?}");
        let first: i64 = changes[0].1[1].parse().unwrap();
        assert!(
            first < 6000,
            "the first emission came before the window closed ({first})"
        );
    }
}

#[test]
fn processing_time_windows_close_by_the_clock() {
    // 900 rows paced at 200/s: about 4.5 s of wall time, in 1 s windows of processing time.
    let sql = "CREATE TABLE gen (id BIGINT) WITH ('connector' = 'datagen', 'rows-per-second' = '200',
                 'number-of-rows' = '900', 'fields.id.kind' = 'sequence', 'fields.id.start' = '1',
                 'fields.id.end' = '900');
               SELECT TUMBLE_START(pt, INTERVAL '1' SECOND) AS ws, TUMBLE_END(pt, INTERVAL '1' SECOND) AS we,
                 COUNT(*) AS n, MIN(id) AS lo, MAX(id) AS hi
               FROM (SELECT *, PROCTIME() AS pt FROM gen) GROUP BY TUMBLE(pt, INTERVAL '1' SECOND);";
    let plan = sluice_sql::plan_script(sql).unwrap();
    for workers in [1, 2] {
        let log = Arc::new(Changelog::default());
        let options = JobOptions {
            workers,
            ..Default::default()
        };
        let summary = run_job(plan.clone(), options, log.clone(), Duration::from_secs(60)).unwrap();
        let ended = std::time::Instant::now();
        assert_eq!(summary.late_rows_dropped, 0, "no row missed its window");
        let out: Vec<(std::time::Instant, Op, Vec<String>)> = log
            .changes(0)
            .into_iter()
            .map(|c| (c.at, c.op, c.row))
            .collect();
        assert!(
            out.iter().all(|(_, op, _)| *op == Op::Insert),
            "append-only"
        );
        let total: i64 = out
            .iter()
            .map(|(_, _, r)| r[2].parse::<i64>().unwrap())
            .sum();
        assert_eq!(total, 900, "{workers} workers: every row counted once");
        let starts: std::collections::BTreeSet<&String> =
            out.iter().map(|(_, _, r)| &r[0]).collect();
        assert!(
            starts.len() >= 3,
            "rows spread over several 1 s windows: {out:?}"
        );
        // Windows close by the wall clock while rows still flow, not at the end of input.
        let first = out.iter().map(|(t, _, _)| *t).min().unwrap();
        assert!(
            ended.duration_since(first) >= std::time::Duration::from_millis(1500),
            "{workers} workers: the first window was emitted only {:?} before the end",
            ended.duration_since(first)
        );
    }
}
