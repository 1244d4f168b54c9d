//! Every column type through both CDC sources' change streams (`scan.startup.mode =
//! 'latest-offset'`, so only streamed rows), against the same table read by the `jdbc`
//! connector's scan, which has its own type test.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::jdbc::{unique, MyDb, PgDb};

/// Runs `script` until `ready` is in its log, then calls `write`, and stops the job once it
/// printed `rows` rows; the printed rows, sorted.
fn streamed(
    dir: &Path,
    script: &str,
    ready: &str,
    rows: usize,
    write: impl FnOnce(),
) -> Vec<String> {
    let file = dir.join("cdc.sql");
    std::fs::write(&file, script).unwrap();
    let (out, log) = (dir.join("cdc.out"), dir.join("cdc.log"));
    let mut child = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .arg("run")
        .arg(&file)
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let text = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
    while !text(&log).contains(ready) {
        assert!(child.try_wait().unwrap().is_none(), "{}", text(&log));
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "{}",
            text(&log)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    write();
    while text(&out).lines().count() < rows && started.elapsed() < Duration::from_secs(60) {
        assert!(child.try_wait().unwrap().is_none(), "{}", text(&log));
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    let mut got: Vec<String> = text(&out).lines().map(str::to_string).collect();
    got.sort();
    got
}

/// The table read whole by the jdbc scan, printed and sorted.
fn scanned(dir: &Path, script: &str) -> Vec<String> {
    let file = dir.join("scan.sql");
    std::fs::write(&file, script).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sluice"));
    cmd.arg("run").arg(&file).stdin(Stdio::null());
    let o = crate::common::output_within(cmd, Duration::from_secs(60));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let mut rows: Vec<String> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    rows.sort();
    rows
}

const COLUMNS: &str = "id BIGINT, b BOOLEAN, i INT, n DECIMAL(12, 2), f DOUBLE, s STRING, d DATE, \
                       ts TIMESTAMP(3), bin BYTES";

#[test]
fn postgres_cdc_streams_every_type_as_the_jdbc_scan_reads_it() {
    crate::postgres_cdc::logical_wal();
    let db = PgDb::create("sluice_cdc_types");
    let slot = crate::postgres_cdc::Slot {
        db: &db,
        name: unique("sluice_cdc_types"),
    };
    db.exec(
        "CREATE TABLE t (id bigint PRIMARY KEY, b boolean, i integer, n numeric(12, 2),
                         f double precision, s text, d date, ts timestamp(3), bin bytea);
         ALTER TABLE t REPLICA IDENTITY FULL;",
    );
    let dir = tempfile::tempdir().unwrap();
    let cdc = format!(
        "CREATE TABLE t ({COLUMNS}, PRIMARY KEY (id) NOT ENFORCED) WITH ('connector' = 'postgres-cdc',
           'hostname' = '127.0.0.1', 'database-name' = '{}', 'table-name' = 't', 'slot.name' = '{}',
           'scan.startup.mode' = 'latest-offset');
         CREATE TABLE out ({COLUMNS}) WITH ('connector' = 'print');
             INSERT INTO out SELECT * FROM t;",
        db.name, slot.name
    );
    let got = streamed(
        dir.path(),
        &cdc,
        "streaming changes from the slot",
        3,
        || {
            db.exec(
                "INSERT INTO t VALUES (1, true, -7, 12345.67, 0.5, 'héllo ''x''', '2026-11-11',
                                   '2026-11-11 10:20:30.456', '\\x00ff10');
             INSERT INTO t VALUES (2, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL);
             INSERT INTO t VALUES (3, false, 2147483647, -0.01, -1e300, '', '1970-01-01',
                                   '1999-12-31 23:59:59.999', '\\x');",
            )
        },
    );
    let want = scanned(
        dir.path(),
        &format!(
            "CREATE TABLE t ({COLUMNS}, PRIMARY KEY (id) NOT ENFORCED) WITH ('connector' = 'jdbc',
               'url' = '{}', 'table-name' = 't');
             CREATE TABLE out ({COLUMNS}) WITH ('connector' = 'print');
             INSERT INTO out SELECT * FROM t;",
            db.url()
        ),
    );
    assert_eq!(want.len(), 3, "{want:?}");
    assert_eq!(got, want);
}

#[test]
fn mysql_cdc_streams_every_type_as_the_jdbc_scan_reads_it() {
    crate::mysql_cdc::binlog_on();
    let mut db = MyDb::create("sluice_mycdc_types");
    db.exec(
        "CREATE TABLE t (id BIGINT PRIMARY KEY, b BOOLEAN, i INT, n DECIMAL(12, 2), f DOUBLE,
                         s VARCHAR(40), d DATE, ts DATETIME(3), bin VARBINARY(16))",
    );
    let dir = tempfile::tempdir().unwrap();
    let cdc = format!(
        "CREATE TABLE t ({COLUMNS}, PRIMARY KEY (id) NOT ENFORCED) WITH ('connector' = 'mysql-cdc',
           'hostname' = '127.0.0.1', 'database-name' = '{}', 'table-name' = 't',
           'server-id' = '{}', 'scan.startup.mode' = 'latest-offset');
         CREATE TABLE out ({COLUMNS}) WITH ('connector' = 'print');
             INSERT INTO out SELECT * FROM t;",
        db.name,
        7000 + std::process::id() % 1000
    );
    let got = streamed(
        dir.path(),
        &cdc,
        "streaming changes from the binlog",
        3,
        || {
            db.exec(
                "INSERT INTO t VALUES (1, true, -7, 12345.67, 0.5, 'héllo ''x''', '2026-11-11',
                                   '2026-11-11 10:20:30.456', x'00ff10');
             INSERT INTO t VALUES (2, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL);
             INSERT INTO t VALUES (3, false, 2147483647, -0.01, -1e300, '', '1970-01-01',
                                   '1999-12-31 23:59:59.999', x'');",
            )
        },
    );
    let want = scanned(
        dir.path(),
        &format!(
            "CREATE TABLE t ({COLUMNS}, PRIMARY KEY (id) NOT ENFORCED) WITH ('connector' = 'jdbc',
               'url' = '{}', 'table-name' = 't', 'username' = 'root');
             CREATE TABLE out ({COLUMNS}) WITH ('connector' = 'print');
             INSERT INTO out SELECT * FROM t;",
            db.url()
        ),
    );
    assert_eq!(want.len(), 3, "{want:?}");
    assert_eq!(got, want);
}
