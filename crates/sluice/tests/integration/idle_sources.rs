//! `'scan.watermark.idle-timeout'`: a source split with no data stops holding back the
//! watermark, so windows fed by the other splits still fire. Without it they wait.
//! The filesystem source watches its directory (`'source.monitor-interval'`), so it never ends;
//! the test stops the job with `JobControl::cancel`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice_engine::{JobControl, JobOptions};

use crate::common::{run_job, Changelog};

/// Runs the query on two workers until `windows` results arrived or `patience` passed.
fn run(dir: &std::path::Path, idle: &str, windows: usize, patience: Duration) -> Vec<Vec<String>> {
    let sql = format!(
        "CREATE TABLE clicks (id BIGINT, ts TIMESTAMP(3), WATERMARK FOR ts AS ts - INTERVAL '1' SECOND)
         WITH ('connector' = 'filesystem', 'path' = '{}', 'format' = 'json', 'source.monitor-interval' = '100 ms'{idle});
         SELECT TUMBLE_START(ts, INTERVAL '5' SECOND) AS ws, COUNT(*) AS n FROM clicks GROUP BY TUMBLE(ts, INTERVAL '5' SECOND);",
        dir.display()
    );
    let plan = sluice_sql::plan_script(&sql).unwrap();
    let log = Arc::new(Changelog::default());
    let control = JobControl::new();
    let options = JobOptions {
        workers: 2,
        control: control.clone(),
        ..Default::default()
    };
    let job = {
        let log = log.clone();
        std::thread::spawn(move || run_job(plan, options, log, patience + Duration::from_secs(30)))
    };
    let started = Instant::now();
    while log.rows(0).len() < windows && started.elapsed() < patience {
        std::thread::sleep(Duration::from_millis(50));
    }
    control.cancel();
    job.join().unwrap().unwrap();
    let mut out = log.rows(0);
    out.sort();
    out
}

#[test]
fn an_idle_split_stops_holding_back_windows() {
    let dir = tempfile::tempdir().unwrap();
    // One file: one of the two workers owns it, the other has nothing to read.
    let lines: Vec<String> = (0..200)
        .map(|i| {
            format!(
                "{{\"id\": {i}, \"ts\": \"2026-11-11 00:00:{:02}.{:03}\"}}",
                i / 10,
                (i % 10) * 100
            )
        })
        .collect();
    std::fs::write(dir.path().join("clicks-0.json"), lines.join("\n") + "\n").unwrap();

    let without = run(dir.path(), "", 3, Duration::from_millis(1500));
    assert!(
        without.is_empty(),
        "without an idle timeout the empty split holds every window back: {without:?}"
    );

    let with = run(
        dir.path(),
        ", 'scan.watermark.idle-timeout' = '300 ms'",
        3,
        Duration::from_secs(20),
    );
    // The watermark reaches 00:00:18.9: windows up to [10 s, 15 s) close, 50 rows each.
    let expected: Vec<Vec<String>> = ["00", "05", "10"]
        .iter()
        .map(|s| vec![format!("2026-11-11 00:00:{s}.000"), "50".to_string()])
        .collect();
    assert_eq!(with, expected);
}
