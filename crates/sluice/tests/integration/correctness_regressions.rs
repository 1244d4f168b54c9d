//! Regressions of wrong or crashing results found by trying Sluice as a new user would: each
//! runs a whole job (with a timeout, so a hang fails the test) and checks it against an answer
//! computed here independently.

use std::collections::BTreeMap;
use std::time::Duration;

use sluice_engine::{JobOptions, JobSummary};

use crate::common;

/// Runs `script` with `workers` workers, failing the test if it takes over `limit`.
fn run(script: &str, workers: usize, limit: Duration) -> (JobSummary, BTreeMap<Vec<String>, i64>) {
    let plan = sluice_sql::plan_script(script).unwrap_or_else(|e| panic!("{e}"));
    common::run_folded(plan, workers, limit).unwrap_or_else(|e| panic!("{e}"))
}

/// The generator: 40 000 orders of 5 000 users, 180 ms apart plus up to 3 s of jitter.
fn session_orders() -> Vec<(i64, f64, i64)> {
    use rand::{Rng, SeedableRng};
    let mut r = rand::rngs::SmallRng::seed_from_u64(1);
    let base = 1_794_355_200_000i64; // 2026-11-11
    (0..40_000i64)
        .map(|i| {
            let ms = i * 180 + r.random_range(0..=3000);
            let user = r.random_range(1..=5000i64);
            let amount = (r.random_range(100..=10_000i64)) as f64 / 100.0;
            (user, amount, base + ms)
        })
        .collect()
}

/// Sessions per user with a gap, computed directly: rows of one user closer than the gap chain
/// into one session [first, last + gap).
fn sessions(orders: &[(i64, f64, i64)], gap: i64) -> BTreeMap<Vec<String>, i64> {
    let mut by_user: BTreeMap<i64, Vec<(i64, f64)>> = BTreeMap::new();
    for (u, a, t) in orders {
        by_user.entry(*u).or_default().push((*t, *a));
    }
    let mut out = BTreeMap::new();
    let fmt = sluice_common::time::format_millis;
    for (u, mut rows) in by_user {
        rows.sort_by_key(|r| r.0);
        let mut i = 0;
        while i < rows.len() {
            let (start, mut last, mut n, mut sum) = (rows[i].0, rows[i].0, 0i64, 0i64);
            while i < rows.len() && rows[i].0 < last + gap {
                last = rows[i].0;
                n += 1;
                sum += (rows[i].1 * 100.0).round() as i64;
                i += 1;
            }
            let row = vec![
                u.to_string(),
                fmt(start),
                fmt(last + gap),
                n.to_string(),
                format!("{:.11e}", sum as f64 / 100.0),
            ];
            *out.entry(row).or_insert(0) += 1;
        }
    }
    out
}

/// Session windows crashed (a group freed twice when two sessions of a key fired together)
/// from about 25 K rows on; both syntaxes, 1 and 2 workers, against the direct computation.
#[test]
fn session_windows_over_40k_orders_equal_the_direct_computation() {
    let orders = session_orders();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sess.jsonl");
    let mut text = String::new();
    for (u, a, t) in &orders {
        text.push_str(&format!(
            "{{\"user_id\": {u}, \"amount\": {a}, \"event_time\": \"{}\"}}\n",
            sluice_common::time::format_millis(*t)
        ));
    }
    std::fs::write(&path, text).unwrap();
    let ddl = format!(
        "CREATE TABLE orders (user_id BIGINT, amount DOUBLE, event_time TIMESTAMP(3), \
         WATERMARK FOR event_time AS event_time - INTERVAL '5' SECOND) \
         WITH ('connector' = 'filesystem', 'path' = '{}', 'format' = 'json', 'source.split-size' = '1mb');",
        path.display()
    );
    // Sums in cents, so that the float sum of each session is exact after rounding.
    let expected = sessions(&orders, 30_000);
    let queries = [
        "SELECT user_id, SESSION_START(event_time, INTERVAL '30' SECOND), SESSION_END(event_time, INTERVAL '30' SECOND), \
         COUNT(*), ROUND(SUM(amount), 2) FROM orders GROUP BY SESSION(event_time, INTERVAL '30' SECOND), user_id",
        "SELECT user_id, window_start, window_end, COUNT(*), ROUND(SUM(amount), 2) FROM TABLE(SESSION(TABLE orders \
         PARTITION BY user_id, DESCRIPTOR(event_time), INTERVAL '30' SECOND)) GROUP BY window_start, window_end, user_id",
    ];
    for q in queries {
        for workers in [1, 2] {
            let (summary, got) = run(&format!("{ddl}\n{q};"), workers, Duration::from_secs(120));
            assert_eq!(summary.late_rows_dropped, 0);
            assert_eq!(got.len(), expected.len(), "{workers} workers: {q}");
            assert!(got == expected, "{workers} workers: {q}: sessions differ");
        }
    }
}

/// Rows whose rowtime is NULL are dropped by windows, as in Flink, and counted as such.
#[test]
fn rows_without_event_time_are_counted_when_windows_drop_them() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("orders.jsonl");
    let mut text = String::new();
    let mut with_time = 0;
    for i in 0..1000 {
        if i % 333 == 7 {
            text.push_str(&format!("{{\"id\": {i}, \"event_time\": null}}\n"));
        } else {
            with_time += 1;
            text.push_str(&format!(
                "{{\"id\": {i}, \"event_time\": \"2026-11-11 00:{:02}:{:02}.000\"}}\n",
                i / 60 % 60,
                i % 60
            ));
        }
    }
    std::fs::write(&path, text).unwrap();
    let script = format!(
        "CREATE TABLE orders (id BIGINT, event_time TIMESTAMP(3), WATERMARK FOR event_time AS event_time) \
         WITH ('connector' = 'filesystem', 'path' = '{}', 'format' = 'json');\n\
         SELECT COUNT(*) FROM TABLE(TUMBLE(TABLE orders, DESCRIPTOR(event_time), INTERVAL '1' DAY)) \
         GROUP BY window_start, window_end;",
        path.display()
    );
    for workers in [1, 2] {
        let (summary, got) = run(&script, workers, Duration::from_secs(60));
        assert_eq!(with_time, 997);
        assert_eq!(got.keys().next().unwrap(), &vec![with_time.to_string()]);
        assert_eq!(summary.null_time_rows_dropped, 3, "{workers} workers");
        assert_eq!(summary.late_rows_dropped, 0);
    }
    // OVER aggregates drop them too (they used to be counted as late).
    let over = script.replace(
        "SELECT COUNT(*) FROM TABLE(TUMBLE(TABLE orders, DESCRIPTOR(event_time), INTERVAL '1' DAY)) \
         GROUP BY window_start, window_end;",
        "SELECT id, COUNT(*) OVER (ORDER BY event_time ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW) FROM orders;",
    );
    assert_ne!(over, script);
    for workers in [1, 2] {
        let (summary, got) = run(&over, workers, Duration::from_secs(60));
        assert_eq!(got.len(), 997, "{workers} workers");
        assert!(got.keys().all(|r| r[0].parse::<i64>().unwrap() % 333 != 7));
        let counts: std::collections::BTreeSet<i64> =
            got.keys().map(|r| r[1].parse().unwrap()).collect();
        assert_eq!(
            counts,
            (1..=997).collect(),
            "a running count over the rows in time order"
        );
        assert_eq!(summary.null_time_rows_dropped, 3, "{workers} workers");
        assert_eq!(summary.late_rows_dropped, 0);
    }
}

/// `csv.ignore-parse-errors` skips exactly the bad records (once a whole batch of 8 192 went),
/// in every malformed shape, and counts them.
#[test]
fn csv_ignore_parse_errors_skips_exactly_the_bad_records() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rows.csv");
    let mut text = String::new();
    let mut good = 0u64;
    let mut sum = 0i64;
    let bad = ["x,not a number\n", "5\n", "6,a,b\n"];
    for i in 0..20_000i64 {
        if i % 4_999 == 17 {
            text.push_str(bad[(i / 4_999) as usize % bad.len()]);
        } else {
            good += 1;
            sum += i;
            text.push_str(&format!("{i},row {i}\n"));
        }
    }
    std::fs::write(&path, text).unwrap();
    let script = format!(
        "CREATE TABLE src (id BIGINT, s STRING) WITH ('connector' = 'filesystem', 'path' = '{}', \
         'format' = 'csv', 'csv.ignore-parse-errors' = 'true', 'source.split-size' = '64kb');\n\
         SELECT COUNT(*), SUM(id) FROM (SELECT id, 1 AS one FROM src) GROUP BY one;",
        path.display()
    );
    for workers in [1, 2] {
        let (summary, got) = run(&script, workers, Duration::from_secs(60));
        assert_eq!(
            got.keys().next().unwrap(),
            &vec![good.to_string(), sum.to_string()],
            "{workers} workers"
        );
        assert_eq!(summary.records_skipped, 20_000 - good, "{workers} workers");
    }
    // Without the option, the first bad record fails the job, naming its file and line.
    let strict = script.replace(", 'csv.ignore-parse-errors' = 'true'", "");
    let plan = sluice_sql::plan_script(&strict).unwrap();
    let e = common::run_job(
        plan,
        JobOptions::default(),
        std::sync::Arc::new(common::Folded::default()),
        Duration::from_secs(60),
    )
    .unwrap_err();
    assert!(e.contains("rows.csv:18:"), "{e}");
}

/// Which rows are late must not depend on the worker count. A file's pieces were dealt to
/// different workers, and a piece read early held the combined watermark back for the rows of
/// another, so with 2 workers fewer rows were late than with 1. With a watermark, a file is now
/// read in order by one worker, as in Flink (a file is one split). 100 K orders, every 97th an
/// hour late, in 5-minute windows, at 1, 2 and 4 workers, JSON and CSV, against the in-order
/// answer computed here.
#[test]
fn the_worker_count_does_not_change_which_rows_are_late() {
    use rand::{Rng, SeedableRng};
    const BATCH: usize = 1000;
    const DELAY: i64 = 5_000;
    const WINDOW: i64 = 300_000;
    let mut r = rand::rngs::SmallRng::seed_from_u64(5);
    let base = 1_794_355_200_000i64;
    let times: Vec<i64> = (0..100_000i64)
        .map(|i| {
            let t = base + i * 100 + r.random_range(0..2_000);
            if i % 97 == 96 {
                t - 3_600_000
            } else {
                t
            }
        })
        .collect();
    // In file order: a row is late when its window closed under the watermark of the rows
    // before its batch (the watermark moves once per batch, and the first batch sees none).
    let (mut expected, mut late, mut max) = (BTreeMap::new(), 0u64, i64::MIN);
    for chunk in times.chunks(BATCH) {
        let wm = max.saturating_sub(DELAY);
        for t in chunk {
            let start = t.div_euclid(WINDOW) * WINDOW;
            if start + WINDOW <= wm {
                late += 1;
            } else {
                *expected.entry(start).or_insert(0i64) += 1;
            }
        }
        max = max.max(*chunk.iter().max().unwrap());
    }
    assert!(
        late > 1_000,
        "the hour-late rows past the first batch: {late}"
    );
    let expected: BTreeMap<Vec<String>, i64> = expected
        .into_iter()
        .map(|(start, n)| {
            let row = vec![sluice_common::time::format_millis(start), n.to_string()];
            (row, 1)
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let fmt = sluice_common::time::format_millis;
    let json: String = times
        .iter()
        .enumerate()
        .map(|(i, t)| format!("{{\"id\": {i}, \"ts\": \"{}\"}}\n", fmt(*t)))
        .collect();
    let csv: String = times
        .iter()
        .enumerate()
        .map(|(i, t)| format!("{i},{}\n", fmt(*t)))
        .collect();
    for (format, text) in [("json", json), ("csv", csv)] {
        let path = dir.path().join(format!("orders.{format}"));
        std::fs::write(&path, text).unwrap();
        // Pieces of 256 KB: about 30 of them (the first holds more than one batch).
        let script = format!(
            "SET 'table.exec.mini-batch.size' = '{BATCH}';\n\
             CREATE TABLE orders (id BIGINT, ts TIMESTAMP(3), WATERMARK FOR ts AS ts - INTERVAL '5' SECOND) \
             WITH ('connector' = 'filesystem', 'path' = '{}', 'format' = '{format}', 'source.split-size' = '256kb');\n\
             SELECT window_start, COUNT(*) FROM TABLE(TUMBLE(TABLE orders, DESCRIPTOR(ts), INTERVAL '5' MINUTE)) \
             GROUP BY window_start, window_end;",
            path.display()
        );
        for workers in [1, 2, 4] {
            let (summary, got) = run(&script, workers, Duration::from_secs(120));
            assert_eq!(
                summary.late_rows_dropped, late,
                "{format}, {workers} workers"
            );
            assert!(
                got == expected,
                "{format}, {workers} workers: window counts differ"
            );
        }
    }
}
