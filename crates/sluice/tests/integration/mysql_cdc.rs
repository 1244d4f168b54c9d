//! The `mysql-cdc` source against the local MariaDB (127.0.0.1:3306), which `.ci/run` (or
//! [`binlog_on`]) restarts with a ROW binlog. Each test has a database of its own. The answer is
//! always the database's own `GROUP BY` over the table as the writes left it.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};

use crate::jdbc::{assert_rows, finish, spawn, MyDb};

/// Makes sure MariaDB writes a ROW binlog, restarting it if not (as `.ci/run` does before any
/// test), once across test processes.
pub(crate) fn binlog_on() {
    let on = || {
        let o = Command::new("mariadb")
            .args(["-uroot", "-Nse", "SELECT @@log_bin"])
            .output()
            .expect("the mariadb client");
        String::from_utf8_lossy(&o.stdout).trim() == "1"
    };
    if on() {
        return;
    }
    let script = "exec 9>/tmp/sluice-mariadb-binlog.lock; flock 9; \
        if [ \"$(mariadb -uroot -Nse 'SELECT @@log_bin')\" != 1 ]; then \
          mariadb-admin -uroot shutdown || true; \
          for _ in $(seq 60); do pgrep -x mariadbd >/dev/null || break; sleep 0.5; done; \
          start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd -- \
            --log-bin=mysql-bin --binlog-format=ROW --binlog-row-image=FULL --server-id=1; \
          for _ in $(seq 60); do mariadb -uroot -e 'SELECT 1' >/dev/null 2>&1 && break; sleep 0.5; done; \
        fi";
    let ok = Command::new("bash").args(["-c", script]).status().unwrap();
    assert!(ok.success() && on(), "MariaDB needs a ROW binlog");
}

const ANSWER: &str = "SELECT category, COUNT(*), SUM(amount), MAX(amount) FROM orders \
                      GROUP BY category ORDER BY category";
const TOTALS: &str = "SELECT category, n, total, top FROM totals ORDER BY category";

fn job(db: &MyDb, dir: &Path, server_id: u32) -> String {
    format!(
        "SET 'execution.checkpointing.interval' = '300 ms';
         SET 'execution.checkpointing.dir' = '{ckpt}';
         CREATE TABLE orders (id BIGINT, category STRING, amount BIGINT, PRIMARY KEY (id) NOT ENFORCED)
           WITH ('connector' = 'mysql-cdc', 'hostname' = '127.0.0.1', 'port' = '3306',
                 'username' = 'root', 'password' = '', 'database-name' = '{name}',
                 'table-name' = 'orders', 'server-id' = '{server_id}-{end}');
         CREATE TABLE totals (category STRING, n BIGINT, total BIGINT, top BIGINT,
                              PRIMARY KEY (category) NOT ENFORCED)
           WITH ('connector' = 'jdbc', 'url' = '{url}', 'table-name' = 'totals', 'username' = 'root');
         INSERT INTO totals SELECT category, COUNT(*), SUM(amount), MAX(amount) FROM orders
           GROUP BY category;",
        ckpt = dir.join("checkpoints").display(),
        name = db.name,
        url = db.url(),
        end = server_id + 4,
    )
}

fn writes(db: &mut MyDb, rng: &mut rand::rngs::SmallRng, next_id: &mut i64, large: bool) {
    db.exec(&crate::postgres_cdc::random_transaction(
        rng, next_id, large,
    ));
}

/// The table's rows, then its changes while the job is killed three times (once in the
/// snapshot, twice while streaming) and rerun: the aggregate in the sink table ends equal to
/// the database's GROUP BY.
#[test]
fn killed_in_the_snapshot_and_while_streaming_the_aggregate_equals_group_by() {
    binlog_on();
    let mut db = MyDb::create("sluice_mycdc_kill");
    const ROWS: i64 = 400_000;
    db.exec(
        "CREATE TABLE orders (id BIGINT PRIMARY KEY, category VARCHAR(20) NOT NULL, amount BIGINT NOT NULL)",
    );
    db.exec(&format!(
        "INSERT INTO orders SELECT seq, CONCAT('c', seq % 37), (seq * 7919) % 1000 FROM seq_1_to_{ROWS}"
    ));
    db.exec("CREATE TABLE totals (category VARCHAR(20) PRIMARY KEY, n BIGINT, total BIGINT, top BIGINT)");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("job.sql");
    let server_id = 6000 + std::process::id() % 1000 * 5;
    std::fs::write(&file, job(&db, dir.path(), server_id)).unwrap();
    let log = dir.path().join("job.log");
    let mut rng = rand::rngs::SmallRng::seed_from_u64(17);
    let mut next_id = ROWS + 1;
    let manifests = |d: &Path| crate::common::manifests(&d.join("checkpoints")).len();

    // Killed in the snapshot, right after its first checkpoint.
    let mut child = spawn(&file, 2, &log);
    let started = Instant::now();
    while manifests(dir.path()) == 0 && started.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let first = std::fs::read_to_string(&log).unwrap();
    assert!(
        !first.contains("snapshot read"),
        "the snapshot ended before the kill: {first}"
    );
    for _ in 0..30 {
        writes(&mut db, &mut rng, &mut next_id, false);
    }
    writes(&mut db, &mut rng, &mut next_id, true);

    // Killed twice while streaming, with writes going on.
    for round in 0..2 {
        let mut child = spawn(&file, 2 + round, &log);
        let until = Instant::now() + Duration::from_millis(rng.random_range(2_500..5_000));
        while Instant::now() < until {
            let large = rng.random_range(0..20) == 0;
            writes(&mut db, &mut rng, &mut next_id, large);
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
        writes(&mut db, &mut rng, &mut next_id, false);
    }

    // The last run catches up and is stopped.
    let mut child = spawn(&file, 2, &log);
    let want = db.rows(ANSWER);
    let started = Instant::now();
    while db.rows(TOTALS) != want && started.elapsed() < Duration::from_secs(90) {
        if child.try_wait().unwrap().is_some() {
            panic!("the job ended: {}", std::fs::read_to_string(&log).unwrap());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let (_, text) = finish(child, Duration::from_secs(60), &log);
    assert!(text.contains("resuming from checkpoint"), "{text}");
    assert_rows(
        db.rows(TOTALS),
        &db.rows(ANSWER),
        "the sink against GROUP BY",
    );
}

/// What a user gets wrong is named, with what to do.
#[test]
fn bad_setups_fail_with_a_clear_error() {
    binlog_on();
    let mut db = MyDb::create("sluice_mycdc_bad");
    db.exec("CREATE TABLE orders (id BIGINT PRIMARY KEY, category VARCHAR(20), amount BIGINT)");
    db.exec("CREATE TABLE nokey (id BIGINT, category VARCHAR(20), amount BIGINT)");
    let dir = tempfile::tempdir().unwrap();
    let run = |table: &str, key: &str, extra: &str| -> String {
        let script = format!(
            "CREATE TABLE orders (id BIGINT, category STRING, amount BIGINT{})
               WITH ('connector' = 'mysql-cdc', 'hostname' = '127.0.0.1', 'database-name' = '{}',
                     'table-name' = '{table}' {extra});
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
    let e = run("orders", "", "");
    assert!(e.contains("needs a PRIMARY KEY"), "{e}");
    let e = run("orders", "category", "");
    assert!(
        e.contains("is not table") && e.contains("PRIMARY KEY (id) NOT ENFORCED"),
        "{e}"
    );
    let e = run("nokey", "id", "");
    assert!(
        e.contains("has no primary key") && e.contains("ADD PRIMARY KEY"),
        "{e}"
    );
    let e = run("missing", "id", "");
    assert!(e.contains("does not exist"), "{e}");
    let e = run("orders", "id", ", 'server-id' = 'x'");
    assert!(e.contains("'server-id'"), "{e}");
    let _ = &mut db;
}
