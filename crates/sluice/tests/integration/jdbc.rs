//! The `jdbc` sink against the PostgreSQL (127.0.0.1:5432) and MariaDB (127.0.0.1:3306) servers
//! here. Every test writes into a database of its own, dropped at the end.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use mysql_async::prelude::Queryable;

use crate::common::output_within;

/// A name no other test or run uses.
pub(crate) fn unique(prefix: &str) -> String {
    format!(
        "{prefix}_{}_{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
            % 1_000_000_000
    )
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// A database of its own on the local PostgreSQL, dropped at the end.
pub(crate) struct PgDb {
    pub(crate) name: String,
    pub(crate) rt: tokio::runtime::Runtime,
    pub(crate) client: tokio_postgres::Client,
}

pub(crate) fn pg_connect(rt: &tokio::runtime::Runtime, db: &str) -> tokio_postgres::Client {
    let (client, conn) = rt
        .block_on(tokio_postgres::connect(
            &format!("host=127.0.0.1 port=5432 user=postgres dbname={db} connect_timeout=30"),
            tokio_postgres::NoTls,
        ))
        .expect("the local PostgreSQL (127.0.0.1:5432, trust)");
    rt.spawn(async move {
        let _ = conn.await;
    });
    client
}

impl PgDb {
    pub(crate) fn create(prefix: &str) -> PgDb {
        let name = unique(prefix);
        let rt = runtime();
        let admin = pg_connect(&rt, "postgres");
        rt.block_on(admin.batch_execute(&format!("CREATE DATABASE {name}")))
            .unwrap();
        let client = pg_connect(&rt, &name);
        PgDb { name, rt, client }
    }

    pub(crate) fn url(&self) -> String {
        format!("jdbc:postgresql://127.0.0.1:5432/{}", self.name)
    }

    pub(crate) fn exec(&self, sql: &str) {
        self.rt
            .block_on(self.client.batch_execute(sql))
            .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
    }

    /// Every row of a query, each cell as text (`None` for NULL).
    pub(crate) fn rows(&self, sql: &str) -> Vec<Vec<Option<String>>> {
        let rows = self
            .rt
            .block_on(self.client.simple_query(sql))
            .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
        rows.into_iter()
            .filter_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => {
                    Some((0..r.len()).map(|i| r.get(i).map(str::to_string)).collect())
                }
                _ => None,
            })
            .collect()
    }
}

impl Drop for PgDb {
    fn drop(&mut self) {
        let admin = pg_connect(&self.rt, "postgres");
        let _ = self.rt.block_on(admin.batch_execute(&format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        )));
    }
}

/// A database of its own on the local MariaDB, dropped at the end.
pub(crate) struct MyDb {
    pub(crate) name: String,
    rt: tokio::runtime::Runtime,
    conn: Option<mysql_async::Conn>,
}

fn my_opts(db: Option<&str>) -> mysql_async::OptsBuilder {
    mysql_async::OptsBuilder::default()
        .ip_or_hostname("127.0.0.1")
        .tcp_port(3306)
        .user(Some("root"))
        .db_name(db)
        .prefer_socket(false)
        .init(vec!["SET time_zone = '+00:00'"])
}

impl MyDb {
    pub(crate) fn create(prefix: &str) -> MyDb {
        let name = unique(prefix);
        let rt = runtime();
        let mut admin = rt
            .block_on(mysql_async::Conn::new(my_opts(None)))
            .expect("the local MariaDB (127.0.0.1:3306, root)");
        rt.block_on(admin.query_drop(format!("CREATE DATABASE {name}")))
            .unwrap();
        rt.block_on(admin.disconnect()).unwrap();
        let conn = rt
            .block_on(mysql_async::Conn::new(my_opts(Some(&name))))
            .unwrap();
        MyDb {
            name,
            rt,
            conn: Some(conn),
        }
    }

    pub(crate) fn url(&self) -> String {
        format!("jdbc:mysql://127.0.0.1:3306/{}", self.name)
    }

    pub(crate) fn exec(&mut self, sql: &str) {
        let conn = self.conn.as_mut().unwrap();
        self.rt
            .block_on(conn.query_drop(sql))
            .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
    }

    /// Every row of a query, each cell as text (`None` for NULL).
    pub(crate) fn rows(&mut self, sql: &str) -> Vec<Vec<Option<String>>> {
        let conn = self.conn.as_mut().unwrap();
        let rows: Vec<mysql_async::Row> = self
            .rt
            .block_on(conn.query(sql))
            .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
        rows.into_iter()
            .map(|r| {
                (0..r.len())
                    .map(|i| match r.as_ref(i).unwrap() {
                        mysql_async::Value::NULL => None,
                        mysql_async::Value::Bytes(b) => Some(String::from_utf8_lossy(b).into()),
                        mysql_async::Value::Int(v) => Some(v.to_string()),
                        mysql_async::Value::UInt(v) => Some(v.to_string()),
                        mysql_async::Value::Double(v) => Some(v.to_string()),
                        mysql_async::Value::Float(v) => Some(v.to_string()),
                        other => Some(other.as_sql(true)),
                    })
                    .collect()
            })
            .collect()
    }
}

impl Drop for MyDb {
    fn drop(&mut self) {
        if let Some(mut conn) = self.conn.take() {
            let _ = self
                .rt
                .block_on(conn.query_drop(format!("DROP DATABASE IF EXISTS {}", self.name)));
            let _ = self.rt.block_on(conn.disconnect());
        }
    }
}

fn run(dir: &Path, script: &str, workers: usize) -> (bool, String) {
    let file = dir.join("job.sql");
    std::fs::write(&file, script).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sluice"));
    cmd.args(["run", "--workers", &workers.to_string()])
        .arg(&file);
    let o = output_within(cmd, Duration::from_secs(180));
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// Starts `sluice run` on `file` in the background, its log into `log`.
pub(crate) fn spawn(file: &Path, workers: usize, log: &Path) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["run", "--workers", &workers.to_string()])
        .arg(file)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap()
}

/// Waits for a job to end, killing it and failing the test after `limit`; its log.
pub(crate) fn finish(
    mut child: std::process::Child,
    limit: Duration,
    log: &Path,
) -> (bool, String) {
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > limit {
            child.kill().unwrap();
            let _ = child.wait();
            panic!(
                "the job did not end within {limit:?}: {}",
                std::fs::read_to_string(log).unwrap()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (status.success(), std::fs::read_to_string(log).unwrap())
}

/// Order `i` of `n`: a third go to the first 97 categories (which pass the cap of
/// [`per_category`]), the rest spread over all.
fn order_rows(n: i64, categories: i64) -> Vec<(i64, String, i64)> {
    (0..n)
        .map(|i| {
            let c = if i % 3 == 0 { i % 97 } else { i % categories };
            (i, format!("c{c}"), i % 1000 - 100)
        })
        .collect()
}

/// `n` orders as JSON lines: (id, category, amount), with categories of very different sizes.
fn orders(path: &Path, n: i64, categories: i64) -> Vec<(i64, String, i64)> {
    let rows = order_rows(n, categories);
    let text: String = rows
        .iter()
        .map(|(i, c, a)| format!("{{\"id\":{i},\"category\":\"{c}\",\"amount\":{a}}}\n"))
        .collect();
    std::fs::write(path, text).unwrap();
    rows
}

/// The batch answer of `SELECT category, COUNT(*), SUM(amount) ... GROUP BY category HAVING
/// COUNT(*) <= cap`, as text rows sorted by category.
fn per_category(rows: &[(i64, String, i64)], cap: i64) -> Vec<Vec<Option<String>>> {
    let mut m: BTreeMap<String, (i64, i64)> = BTreeMap::new();
    for (_, c, a) in rows {
        let e = m.entry(c.clone()).or_default();
        e.0 += 1;
        e.1 += a;
    }
    m.into_iter()
        .filter(|(_, (n, _))| *n <= cap)
        .map(|(c, (n, t))| vec![Some(c), Some(n.to_string()), Some(t.to_string())])
        .collect()
}

/// The orders from a JSON file.
fn file_source(input: &Path) -> String {
    format!(
        "CREATE TABLE orders (id BIGINT, category STRING, amount BIGINT)
           WITH ('connector' = 'filesystem', 'path' = '{}', 'format' = 'json');",
        input.display()
    )
}

/// The orders of [`order_rows`] from a paced generator.
fn generated_source(n: i64, categories: i64, per_second: i64) -> String {
    format!(
        "CREATE TABLE gen (id BIGINT) WITH ('connector' = 'datagen', 'number-of-rows' = '{n}',
           'rows-per-second' = '{per_second}', 'fields.id.kind' = 'sequence');
         CREATE VIEW orders AS SELECT id,
           CONCAT('c', CAST(CASE WHEN id % 3 = 0 THEN id % 97 ELSE id % {categories} END AS STRING)) AS category,
           id % 1000 - 100 AS amount FROM gen;"
    )
}

fn job(ckpt: Option<&Path>, source: &str, pg: &str, my: &str, cap: i64) -> String {
    let checkpoints = match ckpt {
        Some(dir) => format!(
            "SET 'execution.checkpointing.interval' = '1 s';
             SET 'execution.checkpointing.dir' = '{}';",
            dir.display()
        ),
        None => String::new(),
    };
    format!(
        "{checkpoints}
         SET 'table.exec.mini-batch.size' = '256';
         {source}
         CREATE TABLE pg_totals (category STRING, n BIGINT, total BIGINT, PRIMARY KEY (category) NOT ENFORCED)
           WITH ('connector' = 'jdbc', 'url' = '{pg}', 'table-name' = 'totals');
         CREATE TABLE my_totals (category STRING, n BIGINT, total BIGINT, PRIMARY KEY (category) NOT ENFORCED)
           WITH ('connector' = 'jdbc', 'url' = '{my}', 'table-name' = 'totals', 'username' = 'root');
         CREATE TABLE pg_ids (id BIGINT, category STRING)
           WITH ('connector' = 'jdbc', 'url' = '{pg}', 'table-name' = 'ids');
         CREATE TABLE my_ids (id BIGINT, category STRING)
           WITH ('connector' = 'jdbc', 'url' = '{my}', 'table-name' = 'ids');
         INSERT INTO pg_totals SELECT category, COUNT(*), SUM(amount) FROM orders
           GROUP BY category HAVING COUNT(*) <= {cap};
         INSERT INTO my_totals SELECT category, COUNT(*), SUM(amount) FROM orders
           GROUP BY category HAVING COUNT(*) <= {cap};
         INSERT INTO pg_ids SELECT id, category FROM orders WHERE amount > 850;
         INSERT INTO my_ids SELECT id, category FROM orders WHERE amount > 850;"
    )
}

fn create_tables(pg: &PgDb, my: &mut MyDb) {
    pg.exec(
        "CREATE TABLE totals (category text PRIMARY KEY, n bigint NOT NULL, total bigint);
         CREATE TABLE ids (id bigint, category varchar(20))",
    );
    my.exec(
        "CREATE TABLE totals (category VARCHAR(20) PRIMARY KEY, n BIGINT NOT NULL, total BIGINT)",
    );
    my.exec("CREATE TABLE ids (id BIGINT, category VARCHAR(20))");
}

/// The ids an append-only sink must hold once each.
fn ids_over(rows: &[(i64, String, i64)]) -> Vec<Vec<Option<String>>> {
    rows.iter()
        .filter(|(_, _, a)| *a > 850)
        .map(|(i, c, _)| vec![Some(i.to_string()), Some(c.clone())])
        .collect()
}

/// Fails with the first few differences only (tables run to thousands of rows).
#[track_caller]
pub(crate) fn assert_rows(got: Vec<Vec<Option<String>>>, want: &[Vec<Option<String>>], what: &str) {
    if got == want {
        return;
    }
    let mut count: BTreeMap<&Vec<Option<String>>, i64> = BTreeMap::new();
    for r in want {
        *count.entry(r).or_default() += 1;
    }
    for r in &got {
        *count.entry(r).or_default() -= 1;
    }
    let missing: Vec<_> = count.iter().filter(|(_, n)| **n > 0).take(5).collect();
    let extra: Vec<_> = count.iter().filter(|(_, n)| **n < 0).take(5).collect();
    panic!(
        "{what}: {} rows, want {}; missing (first 5): {missing:?}; extra or repeated (first 5, negated): {extra:?}",
        got.len(),
        want.len()
    );
}

const TOTALS: &str = "SELECT category, n, total FROM totals ORDER BY category";
const IDS: &str = "SELECT id, category FROM ids ORDER BY id";

/// An updating aggregation (per-category counts and totals, whose categories are deleted once
/// they pass a cap) and an append-only copy, into PostgreSQL and MariaDB, with 1 s checkpoints.
/// The job is killed at random moments three times on 3 workers, then rerun to its end on 2.
/// The tables then hold exactly the batch answer, and every copied id once.
#[test]
fn killed_and_rerun_on_other_workers_the_tables_are_exact() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("orders.json");
    const ROWS: i64 = 2_400_000;
    let rows = orders(&input, ROWS, 5_000);
    let cap = ROWS / 5_000 + 40;
    let want = per_category(&rows, cap);
    assert!(
        want.len() > 1_000 && want.len() < 5_000 - 90,
        "{}",
        want.len()
    );
    let want_ids = ids_over(&rows);

    // One uninterrupted run says how long the job takes here.
    let (pg, mut my) = (
        PgDb::create("sluice_jdbc_whole"),
        MyDb::create("sluice_jdbc_whole"),
    );
    create_tables(&pg, &mut my);
    let whole = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let script = job(
        Some(&whole.path().join("checkpoints")),
        &file_source(&input),
        &pg.url(),
        &my.url(),
        cap,
    );
    let (ok, stderr) = run(whole.path(), &script, 3);
    assert!(ok, "{stderr}");
    let took = started.elapsed().as_millis() as u64;
    assert!(
        took > 3_000,
        "the job must run long enough to be killed: {took} ms"
    );
    assert_rows(pg.rows(TOTALS), &want, "pg TOTALS");
    assert_rows(my.rows(TOTALS), &want, "my TOTALS");
    assert_rows(pg.rows(IDS), &want_ids, "pg IDS");
    assert_rows(my.rows(IDS), &want_ids, "my IDS");
    drop((pg, my));

    let (pg, mut my) = (
        PgDb::create("sluice_jdbc_kill"),
        MyDb::create("sluice_jdbc_kill"),
    );
    create_tables(&pg, &mut my);
    let script = job(
        Some(&dir.path().join("checkpoints")),
        &file_source(&input),
        &pg.url(),
        &my.url(),
        cap,
    );
    let file = dir.path().join("job.sql");
    std::fs::write(&file, &script).unwrap();
    let kills = crate::common::kill_runs(dir.path(), &file, 3, took);
    assert!(kills >= 2, "the job should have been killed mid-way");
    // Killed runs left rows of committed checkpoints, no more.
    let (ok, stderr) = run(dir.path(), &script, 2);
    assert!(ok, "{stderr}");
    assert!(stderr.contains("resuming from checkpoint"), "{stderr}");
    assert_rows(pg.rows(TOTALS), &want, "PostgreSQL");
    assert_rows(my.rows(TOTALS), &want, "MariaDB");
    assert_rows(pg.rows(IDS), &want_ids, "PostgreSQL: every id once");
    assert_rows(my.rows(IDS), &want_ids, "MariaDB: every id once");
    // The progress table names the job by its checkpoint directory, per sink and worker.
    let progress = pg.rows("SELECT DISTINCT job, sink FROM sluice_sink_progress ORDER BY sink");
    let ckpt = std::fs::canonicalize(dir.path().join("checkpoints")).unwrap();
    assert_eq!(
        progress,
        vec![
            vec![Some(ckpt.display().to_string()), Some("pg_ids#0".into())],
            vec![Some(ckpt.display().to_string()), Some("pg_totals#0".into())],
        ]
    );
}

/// A crash right before the sinks write a committed checkpoint, and one right after: the rerun
/// writes the first checkpoint's rows (the progress table lacks it) and not the second's (it
/// has it), so an append-only table holds every id once.
#[test]
fn a_crash_around_the_database_commit_writes_each_row_once() {
    let dir = tempfile::tempdir().unwrap();
    let rows = order_rows(20_000, 150);
    let want_ids = ids_over(&rows);
    let want = per_category(&rows, 150);
    for point in ["sink-commit", "sink-committed"] {
        let (pg, mut my) = (
            PgDb::create("sluice_jdbc_crash"),
            MyDb::create("sluice_jdbc_crash"),
        );
        create_tables(&pg, &mut my);
        let run_dir = dir.path().join(point);
        std::fs::create_dir_all(&run_dir).unwrap();
        let source = generated_source(20_000, 150, 10_000);
        let script = job(
            Some(&run_dir.join("checkpoints")),
            &source,
            &pg.url(),
            &my.url(),
            150,
        )
        .replace("'1 s'", "'100 ms'");
        let file = run_dir.join("job.sql");
        std::fs::write(&file, &script).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_sluice"));
        cmd.args(["run", "--workers", "2"])
            .arg(&file)
            .env("SLUICE_CRASH_AT", point);
        let o = output_within(cmd, Duration::from_secs(120));
        assert_eq!(
            o.status.code(),
            Some(137),
            "{point}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let (ok, stderr) = run(&run_dir, &script, 2);
        assert!(ok, "{point}: {stderr}");
        assert_rows(pg.rows(IDS), &want_ids, &format!("{point}: PostgreSQL"));
        assert_rows(my.rows(IDS), &want_ids, &format!("{point}: MariaDB"));
        assert_rows(pg.rows(TOTALS), &want, &format!("{point}: PostgreSQL"));
        assert_rows(my.rows(TOTALS), &want, &format!("{point}: MariaDB"));
    }
}

/// Without checkpoints the sink flushes by interval: rows of a slow stream reach the table
/// while the job runs (the row threshold is never reached), and all of them by its end.
#[test]
fn without_checkpoints_rows_are_flushed_by_interval() {
    let pg = PgDb::create("sluice_jdbc_interval");
    pg.exec("CREATE TABLE ticks (id bigint)");
    let dir = tempfile::tempdir().unwrap();
    let script = format!(
        "CREATE TABLE src (id BIGINT) WITH ('connector' = 'datagen', 'number-of-rows' = '600',
           'rows-per-second' = '100', 'fields.id.kind' = 'sequence');
         CREATE TABLE ticks (id BIGINT) WITH ('connector' = 'jdbc', 'url' = '{}',
           'table-name' = 'ticks', 'sink.buffer-flush.max-rows' = '100000',
           'sink.buffer-flush.interval' = '200 ms');
         INSERT INTO ticks SELECT id FROM src;",
        pg.url()
    );
    let file = dir.path().join("job.sql");
    std::fs::write(&file, &script).unwrap();
    let log = dir.path().join("log");
    let mut child = spawn(&file, 1, &log);
    let started = Instant::now();
    let mut seen_while_running = None;
    while started.elapsed() < Duration::from_secs(60) {
        let n: i64 = pg.rows("SELECT count(*) FROM ticks")[0][0]
            .as_ref()
            .unwrap()
            .parse()
            .unwrap();
        let running = child.try_wait().unwrap().is_none();
        if n > 0 && running {
            seen_while_running = Some(n);
            break;
        }
        if !running {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let (ok, stderr) = finish(child, Duration::from_secs(60), &log);
    assert!(ok, "{stderr}");
    let n = seen_while_running.expect("rows reach the table while the job runs");
    assert!(n < 600, "{n}");
    let got = pg.rows("SELECT count(DISTINCT id), min(id), max(id), count(*) FROM ticks");
    assert_eq!(
        got,
        vec![vec![
            Some("600".into()),
            Some("0".into()),
            Some("599".into()),
            Some("600".into())
        ]]
    );
}

/// Every Sluice type into its PostgreSQL and MariaDB column type, NULLs included; values read
/// back as the databases print them, checked by hand.
#[test]
fn every_type_is_written_as_the_database_column_type() {
    let pg = PgDb::create("sluice_jdbc_types");
    let mut my = MyDb::create("sluice_jdbc_types");
    pg.exec(
        "CREATE TABLE t (id integer, small smallint, big bigint, d double precision, f real,
           price numeric(12, 2), name text, flag boolean, day date, at timestamp(3),
           ltz timestamptz, raw bytea, nothing text, widened numeric, day_time timestamp)",
    );
    my.exec(
        "CREATE TABLE t (id INT, small SMALLINT, big BIGINT, d DOUBLE, f FLOAT,
           price DECIMAL(12, 2), name VARCHAR(40), flag BOOLEAN, day DATE, at DATETIME(3),
           ltz DATETIME(3), raw VARBINARY(10), nothing TEXT, widened DECIMAL(30, 4), day_time DATETIME)",
    );
    let dir = tempfile::tempdir().unwrap();
    let columns = "id INT, small SMALLINT, big BIGINT, d DOUBLE, f FLOAT, price DECIMAL(12, 2),
        name STRING, flag BOOLEAN, day DATE, at TIMESTAMP(3), ltz TIMESTAMP_LTZ(3), raw BYTES,
        nothing STRING, widened BIGINT, day_time DATE";
    let input = dir.path().join("typed.json");
    std::fs::write(
        &input,
        concat!(
            r#"{"id":1,"small":-7,"big":9007199254740993,"d":2.5,"f":0.25,"price":1234.56,"#,
            r#""name":"Zoë 'quoted'","flag":true,"day":"2026-11-11","at":"2026-11-11 00:00:01.250","#,
            r#""ltz":"2026-11-11 08:00:00Z","raw":"6162","nothing":null,"widened":123456789012,"#,
            r#""day_time":"2026-01-02"}"#,
            "\n",
            r#"{"id":2}"#,
            "\n"
        ),
    )
    .unwrap();
    let script = format!(
        "CREATE TABLE src ({columns}) WITH ('connector' = 'filesystem', 'path' = '{input}', 'format' = 'json');
         CREATE TABLE pg_t ({columns}) WITH ('connector' = 'jdbc', 'url' = '{pg}', 'table-name' = 't');
         CREATE TABLE my_t ({columns}) WITH ('connector' = 'jdbc', 'url' = '{my}', 'table-name' = 't');
         INSERT INTO pg_t SELECT * FROM src;
         INSERT INTO my_t SELECT * FROM src;",
        input = input.display(),
        pg = pg.url(),
        my = my.url()
    );
    let (ok, stderr) = run(dir.path(), &script, 1);
    assert!(ok, "{stderr}");
    let s = |v: &str| Some(v.to_string());
    pg.exec("SET TIME ZONE 'UTC'");
    assert_eq!(
        pg.rows("SELECT id, small, big, d, f, price, name, flag, day, at, ltz, encode(raw, 'hex'), nothing, widened, day_time FROM t ORDER BY id"),
        vec![
            vec![
                s("1"), s("-7"), s("9007199254740993"), s("2.5"), s("0.25"), s("1234.56"),
                s("Zoë 'quoted'"), s("t"), s("2026-11-11"), s("2026-11-11 00:00:01.25"),
                s("2026-11-11 08:00:00+00"), s("6162"), None, s("123456789012"),
                s("2026-01-02 00:00:00"),
            ],
            [vec![s("2")], vec![None; 14]].concat(),
        ]
    );
    assert_eq!(
        my.rows("SELECT id, small, big, d, f, price, name, flag, day, at, ltz, HEX(raw), nothing, widened, day_time FROM t ORDER BY id"),
        vec![
            vec![
                s("1"), s("-7"), s("9007199254740993"), s("2.5"), s("0.25"), s("1234.56"),
                s("Zoë 'quoted'"), s("1"), s("2026-11-11"), s("2026-11-11 00:00:01.250"),
                s("2026-11-11 08:00:00.000"), s("6162"), None, s("123456789012.0000"),
                s("2026-01-02 00:00:00"),
            ],
            [vec![s("2")], vec![None; 14]].concat(),
        ]
    );

    // Read back by lookup joins (every type decoded from each database), and whole (a bounded
    // scan): the same JSON lines as the source file's rows written straight out.
    let back = |name: &str| dir.path().join(name);
    let script = format!(
        "CREATE TABLE src ({columns}) WITH ('connector' = 'filesystem', 'path' = '{input}', 'format' = 'json');
         CREATE TABLE pg_t ({columns}, PRIMARY KEY (id) NOT ENFORCED) WITH ('connector' = 'jdbc', 'url' = '{pg}', 'table-name' = 't');
         CREATE TABLE my_t ({columns}, PRIMARY KEY (id) NOT ENFORCED) WITH ('connector' = 'jdbc', 'url' = '{my}', 'table-name' = 't',
           'lookup.cache' = 'PARTIAL', 'lookup.partial-cache.max-rows' = '10');
         CREATE TABLE direct ({columns}) WITH ('connector' = 'filesystem', 'path' = '{direct}', 'format' = 'json');
         CREATE TABLE from_pg ({columns}) WITH ('connector' = 'filesystem', 'path' = '{from_pg}', 'format' = 'json');
         CREATE TABLE from_my ({columns}) WITH ('connector' = 'filesystem', 'path' = '{from_my}', 'format' = 'json');
         CREATE TABLE scanned ({columns}) WITH ('connector' = 'filesystem', 'path' = '{scanned}', 'format' = 'json');
         CREATE VIEW ids AS SELECT id, PROCTIME() AS pt FROM src;
         INSERT INTO direct SELECT * FROM src;
         INSERT INTO from_pg SELECT d.* FROM ids LEFT JOIN pg_t FOR SYSTEM_TIME AS OF ids.pt AS d ON ids.id = d.id;
         INSERT INTO from_my SELECT d.* FROM ids LEFT JOIN my_t FOR SYSTEM_TIME AS OF ids.pt AS d ON ids.id = d.id;
         INSERT INTO scanned SELECT * FROM my_t;",
        input = input.display(),
        pg = pg.url(),
        my = my.url(),
        direct = back("direct").display(),
        from_pg = back("from_pg").display(),
        from_my = back("from_my").display(),
        scanned = back("scanned").display(),
    );
    let (ok, stderr) = run(dir.path(), &script, 1);
    assert!(ok, "{stderr}");
    let lines = |name: &str| -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(back(name))
            .unwrap()
            .map(|f| f.unwrap().path())
            .filter(|p| !p.file_name().unwrap().to_string_lossy().starts_with('.'))
            .flat_map(|p| {
                std::fs::read_to_string(p)
                    .unwrap()
                    .lines()
                    .map(str::to_string)
                    .collect::<Vec<_>>()
            })
            .collect();
        v.sort();
        v
    };
    let direct = lines("direct");
    assert_eq!(direct.len(), 2);
    assert!(
        direct[0].contains(r#""ltz":"2026-11-11 08:00:00"#),
        "{direct:?}"
    );
    assert_eq!(lines("from_pg"), direct, "PostgreSQL");
    assert_eq!(lines("from_my"), direct, "MariaDB");
    assert_eq!(lines("scanned"), direct, "MariaDB, scanned");
}

/// Each bad target fails the job before it runs, with a message naming what is wrong and what
/// to do.
#[test]
fn bad_targets_fail_with_a_clear_error() {
    let pg = PgDb::create("sluice_jdbc_bad");
    let mut my = MyDb::create("sluice_jdbc_bad");
    pg.exec(
        "CREATE TABLE totals (category text, n bigint);
         CREATE TABLE typed (category text, n text)",
    );
    my.exec("CREATE TABLE totals (category VARCHAR(20), n BIGINT)");
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("orders.json");
    orders(&input, 10, 3);
    let port = crate::common::free_port();
    let case = |sink: &str, select: &str| -> String {
        let script = format!(
            "CREATE TABLE orders (id BIGINT, category STRING, amount BIGINT)
               WITH ('connector' = 'filesystem', 'path' = '{}', 'format' = 'json');
             CREATE TABLE out {sink};
             INSERT INTO out {select};",
            input.display()
        );
        let started = Instant::now();
        let (ok, stderr) = run(dir.path(), &script, 1);
        assert!(!ok, "{sink} should fail");
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{sink}: {stderr}"
        );
        stderr
    };
    let counts = "SELECT category, COUNT(*) FROM orders GROUP BY category";
    let ids = "SELECT category, id FROM orders";
    let keyed = "(category STRING, n BIGINT, PRIMARY KEY (category) NOT ENFORCED)";
    let e = case(
        &format!("{keyed} WITH ('connector' = 'jdbc', 'url' = 'jdbc:postgresql://127.0.0.1:{port}/shop', 'table-name' = 'totals', 'sluice.connect-timeout' = '2 s', 'sink.max-retries' = '0')"),
        counts,
    );
    assert!(
        e.contains(&format!("PostgreSQL at 127.0.0.1:{port}, database 'shop'")),
        "{e}"
    );
    let e = case(
        &format!("{keyed} WITH ('connector' = 'jdbc', 'url' = 'jdbc:mysql://127.0.0.1:{port}/shop', 'table-name' = 'totals', 'sluice.connect-timeout' = '2 s')"),
        counts,
    );
    assert!(
        e.contains(&format!("MySQL at 127.0.0.1:{port}, database 'shop'")),
        "{e}"
    );
    let e = case(
        &format!("{keyed} WITH ('connector' = 'jdbc', 'url' = 'jdbc:postgresql://127.0.0.1:5432/{}_none', 'table-name' = 'totals')", pg.name),
        counts,
    );
    assert!(
        e.contains("does not exist") && e.contains("option 'url'"),
        "{e}"
    );
    let e = case(
        &format!("{keyed} WITH ('connector' = 'jdbc', 'url' = '{}', 'table-name' = 'totals', 'username' = 'root', 'password' = 'wrong-{port}')", my.url()),
        counts,
    );
    assert!(
        e.contains("refused user 'root'") && e.contains("'password'"),
        "{e}"
    );
    let e = case(
        &format!(
            "{keyed} WITH ('connector' = 'jdbc', 'url' = '{}', 'table-name' = 'missing')",
            pg.url()
        ),
        counts,
    );
    assert!(
        e.contains("table 'missing' does not exist")
            && e.contains(
                r#"CREATE TABLE missing ("category" text, "n" bigint, PRIMARY KEY ("category"))"#
            ),
        "{e}"
    );
    let e = case(
        &format!(
            "{keyed} WITH ('connector' = 'jdbc', 'url' = '{}', 'table-name' = 'missing')",
            my.url()
        ),
        counts,
    );
    assert!(
        e.contains("table 'missing' does not exist") && e.contains("CREATE TABLE `missing`"),
        "{e}"
    );
    // The key has no unique constraint in the database.
    for url in [pg.url(), my.url()] {
        let e = case(
            &format!(
                "{keyed} WITH ('connector' = 'jdbc', 'url' = '{url}', 'table-name' = 'totals')"
            ),
            counts,
        );
        assert!(
            e.contains("no primary key or unique") && e.contains("ADD PRIMARY KEY (category)"),
            "{e}"
        );
    }
    // An updating result without a key.
    let e = case(
        &format!("(category STRING, n BIGINT) WITH ('connector' = 'jdbc', 'url' = '{}', 'table-name' = 'totals')", pg.url()),
        counts,
    );
    assert!(
        e.contains("line 4") && e.contains("declare the table's PRIMARY KEY"),
        "{e}"
    );
    // A column the table lacks, and one of another type.
    let e = case(
        &format!("(category STRING, id BIGINT) WITH ('connector' = 'jdbc', 'url' = '{}', 'table-name' = 'totals')", pg.url()),
        ids,
    );
    assert!(
        e.contains("column 'id' is not in table totals") && e.contains("its columns: category, n"),
        "{e}"
    );
    let e = case(
        &format!("(category STRING, n BIGINT) WITH ('connector' = 'jdbc', 'url' = '{}', 'table-name' = 'typed')", pg.url()),
        "SELECT category, id FROM orders",
    );
    assert!(
        e.contains("column 'n' is BIGINT in the DDL but text in table typed"),
        "{e}"
    );
    let e = case(
        &format!("(category STRING, id BIGINT) WITH ('connector' = 'jdbc', 'url' = '{}', 'table-name' = 'totals')", my.url()),
        ids,
    );
    assert!(
        e.contains("column 'id' of the sink is not in table `totals`"),
        "{e}"
    );
}

/// A connection lost in the middle of a run (the server ends the sink's sessions) is retried:
/// the job still finishes with exact tables.
#[test]
fn a_lost_connection_is_retried() {
    let pg = PgDb::create("sluice_jdbc_lost");
    pg.exec("CREATE TABLE totals (category text PRIMARY KEY, n bigint NOT NULL, total bigint)");
    let dir = tempfile::tempdir().unwrap();
    // A paced stream (4 s), so that the sink writes at every checkpoint while its sessions end.
    let rows = order_rows(20_000, 2_000);
    let want = per_category(&rows, i64::MAX);
    let script = format!(
        "SET 'execution.checkpointing.interval' = '200 ms';
         SET 'execution.checkpointing.dir' = '{ckpt}';
         SET 'table.exec.mini-batch.size' = '256';
         {source}
         CREATE TABLE totals (category STRING, n BIGINT, total BIGINT, PRIMARY KEY (category) NOT ENFORCED)
           WITH ('connector' = 'jdbc', 'url' = '{url}', 'table-name' = 'totals', 'sink.max-retries' = '10');
         INSERT INTO totals SELECT category, COUNT(*), SUM(amount) FROM orders GROUP BY category;",
        ckpt = dir.path().join("checkpoints").display(),
        source = generated_source(20_000, 2_000, 5_000),
        url = pg.url()
    );
    let file = dir.path().join("job.sql");
    std::fs::write(&file, &script).unwrap();
    let log = dir.path().join("log");
    let mut child = spawn(&file, 2, &log);
    // End the sink's sessions a few times while the job writes.
    let mut ended = 0;
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() && started.elapsed() < Duration::from_secs(60) {
        let n = pg.rows(&format!(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
             WHERE datname = '{}' AND application_name = 'sluice'",
            pg.name
        ));
        ended += n[0][0].as_ref().unwrap().parse::<i64>().unwrap();
        std::thread::sleep(Duration::from_millis(300));
    }
    let (ok, stderr) = finish(child, Duration::from_secs(60), &log);
    assert!(ok, "{stderr}");
    assert!(
        ended > 0,
        "the sink's sessions should have been ended: {stderr}"
    );
    assert!(stderr.contains("retrying"), "{stderr}");
    assert_rows(pg.rows(TOTALS), &want, "pg TOTALS");
}

/// The JSON rows of a filesystem sink's published files, as (id, value of `column`).
fn published(dir: &Path, column: &str) -> Vec<(i64, Option<String>)> {
    let mut out = vec![];
    for f in std::fs::read_dir(dir).unwrap() {
        let path = f.unwrap().path();
        if path.file_name().unwrap().to_string_lossy().starts_with('.') {
            continue;
        }
        for line in std::fs::read_to_string(&path).unwrap().lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            out.push((
                v["id"].as_i64().unwrap(),
                v[column].as_str().map(str::to_string),
            ));
        }
    }
    out.sort();
    out
}

/// Checks the rows of a lookup join with the customers of
/// [`lookup_joins_see_the_table_as_it_is_unless_the_cache_says_otherwise`] without a cache: one
/// order is the first to see the change, every order before it saw `A` (or no customer, for 48
/// and 49), every one from it on `B` (none for 49). An INNER join has no rows where a LEFT one
/// has NULLs. Returns the first order that saw the change.
fn check_as_of(rows: &[(i64, Option<String>)], inner: bool) -> i64 {
    let switch = rows
        .iter()
        .find(|(_, p)| p.as_deref() == Some("B"))
        .expect("rows after the change see it")
        .0;
    let want: Vec<(i64, Option<String>)> = (0..2000)
        .map(|id| {
            let p = match (id % 50, id >= switch) {
                (49, _) | (48, false) => None,
                (_, false) => Some("A".to_string()),
                (_, true) => Some("B".to_string()),
            };
            (id, p)
        })
        .filter(|(_, p)| !inner || p.is_some())
        .collect();
    if rows != want {
        let wrong: Vec<_> = want
            .iter()
            .zip(rows)
            .filter(|(w, g)| w != g)
            .take(5)
            .collect();
        panic!(
            "{} rows, want {} (first to see the change: order {switch}); first differences (want, got): {wrong:?}",
            rows.len(),
            want.len()
        );
    }
    switch
}

/// A lookup join against a PostgreSQL table that changes while the job runs: customers 0..48
/// are in province `A`, then all move to `B` and customer 48 arrives; customer 49 never exists.
/// - Without a cache every row joins the customer as it is when the row is processed: `A`, then
///   from one row on `B` (rows arrive in id order on one worker), and a LEFT join gives NULL for
///   a missing customer where an INNER one gives no row.
/// - With a partial cache that keeps keys an hour, the rows keep joining the cached `A`, and a
///   customer cached as missing stays missing; without caching missing keys, customer 48 is
///   found once it exists.
#[test]
fn lookup_joins_see_the_table_as_it_is_unless_the_cache_says_otherwise() {
    let pg = PgDb::create("sluice_jdbc_lookup");
    pg.exec(
        "CREATE TABLE customers (id integer PRIMARY KEY, province text NOT NULL);
         INSERT INTO customers SELECT g, 'A' FROM generate_series(0, 47) g;",
    );
    let dir = tempfile::tempdir().unwrap();
    let out = |name: &str| dir.path().join(name);
    let customers = |name: &str, cache: &str| {
        format!(
            "CREATE TABLE {name} (id INT, province STRING, PRIMARY KEY (id) NOT ENFORCED)
               WITH ('connector' = 'jdbc', 'url' = '{}', 'table-name' = 'customers'{cache});",
            pg.url()
        )
    };
    let sink = |name: &str| {
        format!(
            "CREATE TABLE {name} (id BIGINT, province STRING)
               WITH ('connector' = 'filesystem', 'path' = '{}', 'format' = 'json');",
            out(name).display()
        )
    };
    let join = |sink: &str, kind: &str, dim: &str| {
        format!(
            "INSERT INTO {sink} SELECT o.id, c.province FROM orders o
               {kind} JOIN {dim} FOR SYSTEM_TIME AS OF o.proc_time AS c ON o.id % 50 = c.id;"
        )
    };
    let script = [
        "CREATE TABLE orders (id BIGINT, proc_time AS PROCTIME()) WITH ('connector' = 'datagen',
           'number-of-rows' = '2000', 'rows-per-second' = '200', 'fields.id.kind' = 'sequence');"
            .to_string(),
        customers("c_none", ""),
        customers(
            "c_cached",
            ", 'lookup.cache' = 'PARTIAL', 'lookup.partial-cache.expire-after-write' = '1 h'",
        ),
        customers(
            "c_cached_found",
            ", 'lookup.cache' = 'PARTIAL', 'lookup.partial-cache.max-rows' = '1000', \
             'lookup.partial-cache.cache-missing-key' = 'false'",
        ),
        sink("left_none"),
        sink("inner_none"),
        sink("left_cached"),
        sink("left_cached_found"),
        join("left_none", "LEFT", "c_none"),
        join("inner_none", "", "c_none"),
        join("left_cached", "LEFT", "c_cached"),
        join("left_cached_found", "LEFT", "c_cached_found"),
    ]
    .join("\n");
    let file = dir.path().join("job.sql");
    std::fs::write(&file, &script).unwrap();
    let log = dir.path().join("log");
    let child = spawn(&file, 1, &log);
    // The job runs 10 s; the table changes 4 s in.
    std::thread::sleep(Duration::from_secs(4));
    pg.exec(
        "BEGIN; UPDATE customers SET province = 'B'; INSERT INTO customers VALUES (48, 'B'); COMMIT;",
    );
    let (ok, stderr) = finish(child, Duration::from_secs(120), &log);
    assert!(ok, "{stderr}");
    let a = || Some("A".to_string());
    let b = || Some("B".to_string());

    // Each INSERT looks up at its own moments: each has its own first row that saw `B`.
    let none = published(&out("left_none"), "province");
    let switch = check_as_of(&none, false);
    assert!(
        switch > 50,
        "rows before the change see it as it was: {switch}"
    );
    // INNER: no row where LEFT has NULLs.
    let inner = published(&out("inner_none"), "province");
    let switch = check_as_of(&inner, true);
    assert!(switch > 50, "{switch}");
    // Cached an hour: everything as first looked up.
    let cached = published(&out("left_cached"), "province");
    assert_eq!(cached.len(), 2000);
    let wrong: Vec<_> = cached
        .iter()
        .filter(|(id, p)| *p != if id % 50 >= 48 { None } else { a() })
        .take(5)
        .collect();
    assert!(wrong.is_empty(), "{wrong:?}");
    // Missing keys not cached: 48 is found once it exists; the rest stay cached as `A`.
    let found = published(&out("left_cached_found"), "province");
    let first_48 = found
        .iter()
        .find(|(id, p)| id % 50 == 48 && p.is_some())
        .expect("customer 48 is found once it exists");
    assert!(first_48.0 > 50, "{first_48:?}");
    let wrong: Vec<_> = found
        .iter()
        .filter(|(id, p)| {
            *p != match (id % 50, *id >= first_48.0) {
                (49, _) | (48, false) => None,
                (48, true) => b(),
                _ => a(),
            }
        })
        .take(5)
        .collect();
    assert_eq!(found.len(), 2000);
    assert!(wrong.is_empty(), "{wrong:?}");
}
