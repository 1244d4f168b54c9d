//! Early firing: a window emits partial results every delay (processing time) before its final
//! result, as updates, so a dashboard sees it grow.

use std::sync::{Arc, Mutex};

use arrow::datatypes::SchemaRef;
use sluice_common::{ChangeBatch, Op};
use sluice_engine::{JobOptions, SelectOutput};

#[derive(Default)]
struct Changes(Mutex<Vec<(Op, Vec<String>)>>);

impl SelectOutput for Changes {
    fn begin(&self, _index: usize, _schema: SchemaRef) {}
    fn emit(&self, _index: usize, batch: &ChangeBatch) {
        let rows = sluice_connectors::memory::row_strings(&batch.data).unwrap();
        let mut all = self.0.lock().unwrap();
        for (i, r) in rows.into_iter().enumerate() {
            all.push((batch.op(i), r));
        }
    }
}

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
        let changes = Arc::new(Changes::default());
        let options = JobOptions {
            workers,
            select_output: Some(changes.clone()),
            ..Default::default()
        };
        sluice_engine::run(plan.clone(), options).unwrap();
        let changes = changes.0.lock().unwrap();
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
