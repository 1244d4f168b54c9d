//! The `postgres-cdc` source against the local PostgreSQL (127.0.0.1:5432), which `.ci/run`
//! (or [`logical_wal`]) runs with `wal_level = logical`. Each test has a database and a
//! replication slot of its own, dropped at the end. The answer is always the database's own
//! `GROUP BY` over the table as the writes left it.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};

use crate::jdbc::{assert_rows, finish, spawn, unique, PgDb};

/// Makes sure the server runs with `wal_level = logical`, restarting it if not (as `.ci/run`
/// does before any test), once across test processes.
pub(crate) fn logical_wal() {
    let show = || {
        let o = Command::new("psql")
            .args([
                "-h",
                "127.0.0.1",
                "-U",
                "postgres",
                "-Atc",
                "SHOW wal_level",
            ])
            .output()
            .expect("psql");
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    };
    if show() == "logical" {
        return;
    }
    let script = "exec 9>/tmp/sluice-pg-logical.lock; flock 9; \
        if [ \"$(psql -h 127.0.0.1 -U postgres -Atc 'SHOW wal_level')\" != logical ]; then \
          psql -h 127.0.0.1 -U postgres -qc 'ALTER SYSTEM SET wal_level = logical' \
            -c 'ALTER SYSTEM SET max_replication_slots = 64' -c 'ALTER SYSTEM SET max_wal_senders = 64'; \
          pg_ctlcluster --skip-systemctl-redirect \"$(ls /etc/postgresql | sort -n | tail -1)\" main restart; \
          for _ in $(seq 60); do pg_isready -h 127.0.0.1 -q && break; sleep 0.5; done; \
        fi";
    let ok = Command::new("bash").args(["-c", script]).status().unwrap();
    assert!(
        ok.success() && show() == "logical",
        "PostgreSQL needs wal_level = logical"
    );
}

/// Drops the test's replication slot (a database with a slot cannot be dropped); declared
/// after its [`PgDb`], so dropped before it.
pub(crate) struct Slot<'a> {
    pub(crate) db: &'a PgDb,
    pub(crate) name: String,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        for _ in 0..50 {
            let rows = self.db.rows(&format!(
                "SELECT active FROM pg_replication_slots WHERE slot_name = '{}'",
                self.name
            ));
            match rows.first().and_then(|r| r[0].clone()).as_deref() {
                None => return,
                Some("f") => {
                    self.db
                        .exec(&format!("SELECT pg_drop_replication_slot('{}')", self.name));
                    return;
                }
                _ => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }
}

const ANSWER: &str = "SELECT category, count(*)::text, sum(amount)::text, max(amount)::text \
                      FROM orders GROUP BY category ORDER BY category";
const TOTALS: &str =
    "SELECT category, n::text, total::text, top::text FROM totals ORDER BY category";

fn job(db: &PgDb, slot: &str, dir: &Path, extra: &str) -> String {
    format!(
        "SET 'execution.checkpointing.interval' = '300 ms';
         SET 'execution.checkpointing.dir' = '{ckpt}';
         CREATE TABLE orders (id BIGINT, category STRING, amount BIGINT, PRIMARY KEY (id) NOT ENFORCED)
           WITH ('connector' = 'postgres-cdc', 'hostname' = '127.0.0.1', 'port' = '5432',
                 'username' = 'postgres', 'password' = '', 'database-name' = '{name}',
                 'schema-name' = 'public', 'table-name' = 'orders', 'slot.name' = '{slot}',
                 'decoding.plugin.name' = 'pgoutput' {extra});
         CREATE TABLE totals (category STRING, n BIGINT, total BIGINT, top BIGINT,
                              PRIMARY KEY (category) NOT ENFORCED)
           WITH ('connector' = 'jdbc', 'url' = '{url}', 'table-name' = 'totals');
         INSERT INTO totals SELECT category, COUNT(*), SUM(amount), MAX(amount) FROM orders
           GROUP BY category;",
        ckpt = dir.join("checkpoints").display(),
        name = db.name,
        url = db.url(),
    )
}

fn create_tables(db: &PgDb, rows: i64, full: bool) {
    db.exec(&format!(
        "CREATE TABLE orders (id bigint PRIMARY KEY, category text NOT NULL, amount bigint NOT NULL);
         {}
         INSERT INTO orders SELECT i, 'c' || (i % 37), (i::bigint * 7919) % 1000 FROM generate_series(1, {rows}) i;
         CREATE TABLE totals (category text PRIMARY KEY, n bigint, total bigint, top bigint);",
        if full {
            "ALTER TABLE orders REPLICA IDENTITY FULL;"
        } else {
            ""
        }
    ));
}

/// A random transaction over `orders`: inserts, amount and category updates, deletes, or with
/// `large` 3 000 of them; `next_id` is the next unused id. Both databases take its SQL.
pub(crate) fn random_transaction(
    rng: &mut rand::rngs::SmallRng,
    next_id: &mut i64,
    large: bool,
) -> String {
    let n = if large {
        3_000
    } else {
        rng.random_range(1..40)
    };
    let mut sql = String::from("START TRANSACTION;");
    for _ in 0..n {
        let id = rng.random_range(1..*next_id);
        match rng.random_range(0..5) {
            0 => {
                sql += &format!(
                    "INSERT INTO orders VALUES ({}, 'c{}', {});",
                    *next_id,
                    rng.random_range(0..40),
                    rng.random_range(0..1000)
                );
                *next_id += 1;
            }
            1 | 2 => {
                sql += &format!(
                    "UPDATE orders SET amount = {} WHERE id = {id};",
                    rng.random_range(0..2000)
                )
            }
            3 => {
                sql += &format!(
                    "UPDATE orders SET category = 'c{}' WHERE id = {id};",
                    rng.random_range(0..40)
                )
            }
            _ => sql += &format!("DELETE FROM orders WHERE id = {id};"),
        }
    }
    sql + "COMMIT;"
}

fn writes(db: &PgDb, rng: &mut rand::rngs::SmallRng, next_id: &mut i64, large: bool) {
    db.exec(&random_transaction(rng, next_id, large));
}

/// SIGTERM once the sink table equals the answer (or `limit` passed); the job's log.
fn stop_when_equal(
    db: &PgDb,
    mut child: std::process::Child,
    log: &Path,
    limit: Duration,
) -> String {
    let want = db.rows(ANSWER);
    let started = Instant::now();
    while db.rows(TOTALS) != want && started.elapsed() < limit {
        if child.try_wait().unwrap().is_some() {
            panic!("the job ended: {}", std::fs::read_to_string(log).unwrap());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let (_, text) = finish(child, Duration::from_secs(60), log);
    text
}

/// The table's rows, then its changes while the job is killed three times (once in the
/// snapshot, twice while streaming) and rerun: the aggregate in the sink table ends equal to
/// the database's GROUP BY, with MAX, which deletes and updates must retract exactly.
#[test]
fn killed_in_the_snapshot_and_while_streaming_the_aggregate_equals_group_by() {
    logical_wal();
    let db = PgDb::create("sluice_cdc_kill");
    let slot = Slot {
        db: &db,
        name: unique("sluice_cdc_kill"),
    };
    const ROWS: i64 = 400_000;
    create_tables(&db, ROWS, true);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("job.sql");
    std::fs::write(&file, job(&db, &slot.name, dir.path(), "")).unwrap();
    let log = dir.path().join("job.log");
    let mut rng = rand::rngs::SmallRng::seed_from_u64(7);
    let mut next_id = ROWS + 1;
    let manifests = |d: &Path| crate::common::manifests(&d.join("checkpoints")).len();

    // Killed in the snapshot: right after its first checkpoint, while rows change.
    let child = spawn(&file, 2, &log);
    let started = Instant::now();
    while manifests(dir.path()) == 0 && started.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut child = child;
    child.kill().unwrap();
    child.wait().unwrap();
    let first = std::fs::read_to_string(&log).unwrap();
    assert!(
        !first.contains("snapshot read"),
        "the snapshot ended before the kill: {first}"
    );
    for _ in 0..30 {
        writes(&db, &mut rng, &mut next_id, false);
    }
    writes(&db, &mut rng, &mut next_id, true);

    // Killed twice while streaming, with writes going on.
    for round in 0..2 {
        let mut child = spawn(&file, 2 + round, &log);
        let until = Instant::now() + Duration::from_millis(rng.random_range(2_500..5_000));
        while Instant::now() < until {
            let large = rng.random_range(0..20) == 0;
            writes(&db, &mut rng, &mut next_id, large);
            std::thread::sleep(Duration::from_millis(20));
        }
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(child.try_wait().unwrap().is_none(), "the job ended: {text}");
        if round == 0 {
            assert!(text.contains("resuming the snapshot"), "{text}");
        }
        child.kill().unwrap();
        child.wait().unwrap();
    }
    for _ in 0..20 {
        writes(&db, &mut rng, &mut next_id, false);
    }

    // The last run catches up and is stopped.
    let child = spawn(&file, 2, &log);
    let text = stop_when_equal(&db, child, &log, Duration::from_secs(90));
    assert!(text.contains("resuming from checkpoint"), "{text}");
    assert_rows(
        db.rows(TOTALS),
        &db.rows(ANSWER),
        "the sink against GROUP BY",
    );
    // The slot was acknowledged as checkpoints committed: it holds no WAL from before the run.
    let acked = db.rows(&format!(
        "SELECT confirmed_flush_lsn > '0/0' FROM pg_replication_slots WHERE slot_name = '{}'",
        slot.name
    ));
    assert_eq!(acked, vec![vec![Some("t".to_string())]]);
}

/// Without REPLICA IDENTITY FULL, `'changelog-mode' = 'upsert'`: updates (some changing the
/// key) and deletes by key, normalized by Sluice; without checkpoints.
#[test]
fn upsert_mode_reads_a_table_with_the_default_replica_identity() {
    logical_wal();
    let db = PgDb::create("sluice_cdc_upsert");
    let slot = Slot {
        db: &db,
        name: unique("sluice_cdc_upsert"),
    };
    create_tables(&db, 20_000, false);
    let dir = tempfile::tempdir().unwrap();
    let script = job(&db, &slot.name, dir.path(), ", 'changelog-mode' = 'upsert'")
        .lines()
        .filter(|l| !l.contains("execution.checkpointing"))
        .collect::<Vec<_>>()
        .join("\n");
    let file = dir.path().join("job.sql");
    std::fs::write(&file, script).unwrap();
    let log = dir.path().join("job.log");
    let child = spawn(&file, 2, &log);
    let mut rng = rand::rngs::SmallRng::seed_from_u64(9);
    let mut next_id = 20_001;
    for i in 0..60 {
        writes(&db, &mut rng, &mut next_id, i == 30);
        if i % 10 == 0 {
            // A key changes: the old key's row must go.
            db.exec(&format!(
                "UPDATE orders SET id = {} WHERE id = (SELECT min(id) FROM orders)",
                next_id
            ));
            next_id += 1;
        }
    }
    stop_when_equal(&db, child, &log, Duration::from_secs(60));
    assert_rows(
        db.rows(TOTALS),
        &db.rows(ANSWER),
        "the sink against GROUP BY",
    );
}

/// What a user gets wrong is named, with what to do.
#[test]
fn bad_setups_fail_with_a_clear_error() {
    logical_wal();
    let db = PgDb::create("sluice_cdc_bad");
    create_tables(&db, 10, false);
    let role = unique("sluice_norepl");
    db.exec(&format!("CREATE ROLE {role} LOGIN"));
    let dir = tempfile::tempdir().unwrap();
    let run = |extra: &str, key: &str| -> String {
        let script = format!(
            "CREATE TABLE orders (id BIGINT, category STRING, amount BIGINT{})
               WITH ('connector' = 'postgres-cdc', 'hostname' = '127.0.0.1', 'database-name' = '{}',
                     'table-name' = 'orders', 'slot.name' = 'never_made' {extra});
             SELECT * FROM orders;",
            match key {
                "" => String::new(),
                k => format!(", PRIMARY KEY ({k}) NOT ENFORCED"),
            },
            db.name
        );
        let file = dir.path().join("bad.sql");
        std::fs::write(&file, script).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_sluice"));
        cmd.arg("run").arg(&file);
        let o = crate::common::output_within(cmd, Duration::from_secs(60));
        assert!(!o.status.success());
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    let e = run("", "id");
    assert!(
        e.contains("REPLICA IDENTITY FULL") && e.contains("'changelog-mode' = 'upsert'"),
        "{e}"
    );
    let e = run(", 'changelog-mode' = 'upsert'", "");
    assert!(e.contains("needs a PRIMARY KEY"), "{e}");
    let e = run(", 'changelog-mode' = 'upsert'", "category");
    assert!(
        e.contains("is not table") && e.contains("PRIMARY KEY (id) NOT ENFORCED"),
        "{e}"
    );
    let e = run(
        &format!(", 'changelog-mode' = 'upsert', 'username' = '{role}'"),
        "id",
    );
    assert!(e.contains("REPLICATION") && e.contains(&role), "{e}");
    let e = run(", 'schema-name' = 'nowhere'", "id");
    assert!(e.contains("does not exist"), "{e}");
    let e = run(", 'decoding.plugin.name' = 'decoderbufs'", "id");
    assert!(e.contains("pgoutput"), "{e}");
    // Nothing was left behind: no slot was made at planning or by the failed starts.
    let slots =
        db.rows("SELECT slot_name FROM pg_replication_slots WHERE slot_name = 'never_made'");
    assert!(slots.is_empty(), "{slots:?}");
    db.exec(&format!("DROP ROLE {role}"));
}

/// `examples/cdc_orders.sql`, pointed at this test's database, slot and checkpoint folder:
/// while orders are paid, refunded, changed and deleted, the GMV per province (through the
/// customers lookup table) ends equal to the database's own join and GROUP BY.
#[test]
fn the_cdc_orders_example_keeps_gmv_by_province_equal_to_the_database() {
    logical_wal();
    let db = PgDb::create("sluice_cdc_example");
    let slot = Slot {
        db: &db,
        name: unique("sluice_cdc_example"),
    };
    db.exec(
        "CREATE TABLE orders (id bigint PRIMARY KEY, user_id bigint NOT NULL,
                              amount numeric(12, 2) NOT NULL, status text NOT NULL);
         ALTER TABLE orders REPLICA IDENTITY FULL;
         CREATE TABLE customers (id bigint PRIMARY KEY, province text NOT NULL);
         CREATE TABLE gmv_by_province (province text PRIMARY KEY, orders bigint, gmv numeric(18, 2));
         INSERT INTO customers SELECT i, 'p' || (i % 31) FROM generate_series(1, 1800) i;
         INSERT INTO orders SELECT i, 1 + (i * 13) % 2000, ((i * 7919) % 100000) / 100.0,
           (ARRAY['paid', 'paid', 'refunded', 'pending'])[1 + i % 4] FROM generate_series(1, 50000) i;",
    );
    let dir = tempfile::tempdir().unwrap();
    let example = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../examples/cdc_orders.sql"
    ))
    .unwrap();
    let script = example
        .replace(
            "'database-name' = 'shop'",
            &format!("'database-name' = '{}'", db.name),
        )
        .replace(":5432/shop'", &format!(":5432/{}'", db.name))
        .replace("sluice_cdc_orders", &slot.name)
        .replace(
            "file:///tmp/sluice-cdc-orders",
            &format!("file://{}", dir.path().join("checkpoints").display()),
        )
        .replace(
            "'execution.checkpointing.interval' = '5 s'",
            "'execution.checkpointing.interval' = '300 ms'",
        );
    assert!(script.contains(&slot.name) && script.matches(&db.name).count() == 3);
    let file = dir.path().join("job.sql");
    std::fs::write(&file, script).unwrap();
    let log = dir.path().join("job.log");
    let child = spawn(&file, 2, &log);
    let mut rng = rand::rngs::SmallRng::seed_from_u64(5);
    let mut next_id = 50_001;
    for _ in 0..200 {
        let mut sql = String::from("BEGIN;");
        for _ in 0..rng.random_range(1..20) {
            let id = rng.random_range(1..next_id);
            sql += &match rng.random_range(0..6) {
                0 => {
                    next_id += 1;
                    format!(
                        "INSERT INTO orders VALUES ({}, {}, {}.{:02}, 'paid');",
                        next_id - 1,
                        rng.random_range(1..2000),
                        rng.random_range(0..1000),
                        rng.random_range(0..100)
                    )
                }
                1 => format!("UPDATE orders SET status = 'refunded' WHERE id = {id};"),
                2 => format!("UPDATE orders SET status = 'paid' WHERE id = {id};"),
                3 => format!(
                    "UPDATE orders SET amount = amount + {}.5 WHERE id = {id};",
                    rng.random_range(0..50)
                ),
                4 => format!("DELETE FROM orders WHERE id = {id};"),
                _ => format!(
                    "UPDATE orders SET user_id = {} WHERE id = {id};",
                    rng.random_range(1..2000)
                ),
            };
        }
        sql += "COMMIT;";
        db.exec(&sql);
        std::thread::sleep(Duration::from_millis(10));
    }
    const WANT: &str =
        "SELECT COALESCE(c.province, 'unknown'), count(*)::text, sum(o.amount)::text \
        FROM orders o LEFT JOIN customers c ON o.user_id = c.id WHERE o.status = 'paid' \
        GROUP BY 1 ORDER BY 1";
    const GOT: &str =
        "SELECT province, orders::text, gmv::text FROM gmv_by_province ORDER BY province";
    let want = db.rows(WANT);
    assert!(want.len() == 32, "{want:?}");
    let started = Instant::now();
    let mut child = child;
    while db.rows(GOT) != want && started.elapsed() < Duration::from_secs(90) {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the job ended: {}",
            std::fs::read_to_string(&log).unwrap()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    finish(child, Duration::from_secs(60), &log);
    assert_rows(
        db.rows(GOT),
        &want,
        "gmv_by_province against the database's join",
    );
}
