//! `sluice serve`: the platform server, driven as its users drive it, over the Postgres wire
//! protocol (`tokio-postgres`, `psql`) and REST. Every result is checked against an answer
//! computed here from the same input; every isolation check is an attempt that must fail.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::free_port;

pub(crate) const ADMIN_TOKEN: &str = "sluice_test_admin_token_0123456789abcdef0123456789abcdef";
const ADMIN_PASSWORD: &str = "admin-secret";

/// A running `sluice serve` on free ports; killed (SIGKILL, as a crash) when dropped.
pub(crate) struct Serve {
    child: Child,
    data: PathBuf,
    pub(crate) pg: u16,
    pub(crate) http: u16,
    banner: Vec<String>,
}

impl Serve {
    pub(crate) fn start(data: &Path) -> Serve {
        Serve::start_on(data, free_port(), free_port())
    }

    pub(crate) fn start_on(data: &Path, pg: u16, http: u16) -> Serve {
        Serve::start_with(data, pg, http, &[])
    }

    /// Starts the server with more arguments; `banner` holds what it printed.
    fn start_with(data: &Path, pg: u16, http: u16, extra: &[&std::ffi::OsStr]) -> Serve {
        let mut child = Command::new(env!("CARGO_BIN_EXE_sluice"))
            .args(["serve", "--data-dir"])
            .arg(data)
            .args([
                "--pg-port",
                &pg.to_string(),
                "--http-port",
                &http.to_string(),
            ])
            .args(extra)
            .env("SLUICE_ADMIN_TOKEN", ADMIN_TOKEN)
            .env("SLUICE_ADMIN_PASSWORD", ADMIN_PASSWORD)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start sluice serve");
        let out = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut printed = vec![];
        loop {
            match rx.recv_timeout(Duration::from_millis(200)) {
                Ok(line) => {
                    let done = line.contains("Postgres wire");
                    printed.push(line);
                    if done {
                        break;
                    }
                }
                Err(_) if Instant::now() > deadline => {
                    let _ = child.kill();
                    panic!("sluice serve did not start in 60 s; printed {printed:?}")
                }
                Err(_) => {
                    if let Ok(Some(status)) = child.try_wait() {
                        panic!("sluice serve exited with {status}; printed {printed:?}");
                    }
                }
            }
        }
        Serve {
            child,
            data: data.to_path_buf(),
            pg,
            http,
            banner: printed,
        }
    }

    pub(crate) fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub(crate) fn connect(&self, user: &str, password: &str) -> Result<Pg, tokio_postgres::Error> {
        Pg::connect(self.pg, user, password)
    }

    pub(crate) fn admin(&self) -> Pg {
        self.connect("admin", ADMIN_PASSWORD)
            .expect("admin logs in")
    }

    pub(crate) fn files(&self, tenant: &str) -> PathBuf {
        self.data.join("tenants").join(tenant).join("files")
    }

    /// `/metrics` as `token` sees it.
    fn metrics(&self, token: &str) -> String {
        let _ = rustls::crypto::ring::default_provider().install_default();
        reqwest::blocking::Client::new()
            .get(format!("http://127.0.0.1:{}/metrics", self.http))
            .bearer_auth(token)
            .timeout(Duration::from_secs(60))
            .send()
            .unwrap()
            .text()
            .unwrap()
    }

    /// A REST call: the status and the JSON body.
    pub(crate) fn http(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<serde_json::Value>,
    ) -> (u16, serde_json::Value) {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::blocking::Client::new();
        let url = format!("http://127.0.0.1:{}{path}", self.http);
        let mut req = match method {
            "GET" => client.get(&url),
            "POST" => client.post(&url),
            "DELETE" => client.delete(&url),
            "PUT" => client.put(&url),
            "PATCH" => client.patch(&url),
            other => panic!("method {other}"),
        };
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req
            .timeout(Duration::from_secs(60))
            .send()
            .expect("HTTP request");
        let status = resp.status().as_u16();
        let body = resp.json().unwrap_or(serde_json::Value::Null);
        (status, body)
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A blocking `tokio-postgres` session.
pub(crate) struct Pg {
    rt: tokio::runtime::Runtime,
    client: tokio_postgres::Client,
}

impl Pg {
    fn connect(port: u16, user: &str, password: &str) -> Result<Pg, tokio_postgres::Error> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let conf = format!(
            "host=127.0.0.1 port={port} user={user} password={password} connect_timeout=30"
        );
        let (client, conn) = rt.block_on(tokio_postgres::connect(&conf, tokio_postgres::NoTls))?;
        rt.spawn(async move {
            let _ = conn.await;
        });
        Ok(Pg { rt, client })
    }

    /// Runs statements (simple protocol); panics with the server's message on an error.
    pub(crate) fn exec(&self, sql: &str) {
        if let Err(e) = self.try_exec(sql) {
            panic!("{sql}: {e}");
        }
    }

    fn try_exec(&self, sql: &str) -> Result<(), String> {
        self.rt
            .block_on(self.client.batch_execute(sql))
            .map_err(|e| {
                e.as_db_error().map_or(e.to_string(), |d| {
                    format!("{}: {}", d.code().code(), d.message())
                })
            })
    }

    /// The rows of a query (extended protocol), every value as text.
    pub(crate) fn rows(&self, sql: &str) -> Result<Vec<Vec<String>>, String> {
        let rows = self.rt.block_on(self.client.query(sql, &[])).map_err(|e| {
            e.as_db_error().map_or(e.to_string(), |d| {
                format!("{}: {}", d.code().code(), d.message())
            })
        })?;
        Ok(rows
            .iter()
            .map(|r| {
                (0..r.len())
                    .map(|i| {
                        let t = r.columns()[i].type_().clone();
                        match t {
                            tokio_postgres::types::Type::INT8 => r
                                .get::<_, Option<i64>>(i)
                                .map_or("NULL".into(), |v| v.to_string()),
                            tokio_postgres::types::Type::INT4 => r
                                .get::<_, Option<i32>>(i)
                                .map_or("NULL".into(), |v| v.to_string()),
                            tokio_postgres::types::Type::INT2 => r
                                .get::<_, Option<i16>>(i)
                                .map_or("NULL".into(), |v| v.to_string()),
                            tokio_postgres::types::Type::FLOAT8 => r
                                .get::<_, Option<f64>>(i)
                                .map_or("NULL".into(), |v| v.to_string()),
                            tokio_postgres::types::Type::BOOL => r
                                .get::<_, Option<bool>>(i)
                                .map_or("NULL".into(), |v| v.to_string()),
                            _ => r
                                .get::<_, Option<String>>(i)
                                .unwrap_or_else(|| "NULL".into()),
                        }
                    })
                    .collect()
            })
            .collect())
    }

    /// The error code and message a statement fails with (it must fail).
    fn fails(&self, sql: &str) -> String {
        match self.try_exec(sql) {
            Ok(()) => panic!("{sql}: succeeded, but must be refused"),
            Err(e) => e,
        }
    }
}

/// Waits for `check` to hold, up to `secs`; panics with `what` and the last value otherwise.
fn wait_for<T: std::fmt::Debug>(secs: u64, what: &str, mut check: impl FnMut() -> (bool, T)) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let (ok, value) = check();
        if ok {
            return value;
        }
        if Instant::now() > deadline {
            panic!("{what}: not within {secs} s; last {value:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Waits until `pipeline` has finished and `query` gives exactly `expected`.
fn wait_finished(pg: &Pg, secs: u64, pipeline: &str, query: &str, expected: &[Vec<String>]) {
    wait_for(
        secs,
        &format!("{pipeline} finishes with the exact answer"),
        || {
            let status = pipeline_status(pg, pipeline);
            let rows = pg.rows(query).unwrap_or_default();
            let done = status.get(2).map(String::as_str) == Some("finished") && rows == expected;
            (done, (status, rows.len()))
        },
    );
}

fn pipeline_status(pg: &Pg, name: &str) -> Vec<String> {
    pg.rows("SHOW PIPELINES")
        .expect("SHOW PIPELINES")
        .into_iter()
        .find(|r| r[1] == name)
        .unwrap_or_default()
}

/// Orders `id, category, amount` as CSV; returns the batch answer per category: (count, sum).
fn write_orders(path: &Path, n: u64) -> BTreeMap<String, (i64, i64)> {
    let mut text = String::new();
    let mut answer: BTreeMap<String, (i64, i64)> = BTreeMap::new();
    for id in 0..n {
        let category = format!("c{}", (id * 7919) % 13);
        let amount = ((id * 104729) % 1000) as i64;
        text.push_str(&format!("{id},{category},{amount}\n"));
        let e = answer.entry(category).or_default();
        e.0 += 1;
        e.1 += amount;
    }
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
    answer
}

fn as_rows(answer: &BTreeMap<String, (i64, i64)>) -> Vec<Vec<String>> {
    answer
        .iter()
        .map(|(k, (n, s))| vec![k.clone(), n.to_string(), s.to_string()])
        .collect()
}

#[test]
fn tenants_build_a_materialized_view_that_only_they_can_reach() {
    let dir = tempfile::tempdir().unwrap();
    let serve = Serve::start(dir.path());
    let admin = serve.admin();
    admin.exec(
        "CREATE TENANT team_a; CREATE TENANT team_b;
         CREATE USER alice WITH PASSWORD 'alice-pw' IN TENANT team_a ROLE owner;
         CREATE USER bob WITH PASSWORD 'bob-pw' IN TENANT team_b ROLE owner;
         CREATE USER vera WITH PASSWORD 'vera-pw' IN TENANT team_a ROLE viewer",
    );
    assert_eq!(
        admin.rows("SHOW TENANTS").unwrap(),
        vec![
            vec!["admin".to_string()],
            vec!["team_a".into()],
            vec!["team_b".into()]
        ]
    );
    // 60 K orders across files read by a bounded pipeline.
    let answer = write_orders(&serve.files("team_a").join("orders/part-0.csv"), 60_000);
    let alice = serve.connect("alice", "alice-pw").expect("alice logs in");
    alice.exec(
        "CREATE TABLE orders (id BIGINT, category STRING, amount BIGINT)
           WITH ('connector' = 'filesystem', 'path' = 'orders', 'format' = 'csv');
         CREATE MATERIALIZED VIEW by_category AS
           SELECT category, COUNT(*) AS orders, SUM(amount) AS total FROM orders GROUP BY category",
    );
    wait_finished(
        &alice,
        120,
        "by_category",
        "SELECT category, orders, total FROM by_category ORDER BY category",
        &as_rows(&answer),
    );
    // A query over the view runs on one snapshot: the sum of the counts is every order.
    assert_eq!(
        alice.rows("SELECT SUM(orders) FROM by_category").unwrap(),
        vec![vec!["60000".to_string()]]
    );
    assert_eq!(
        alice.rows("DESCRIBE by_category").unwrap(),
        vec![
            vec!["category".to_string(), "STRING".into(), "YES".into()],
            vec!["orders".to_string(), "BIGINT".into(), "NO".into()],
            vec!["total".to_string(), "BIGINT".into(), "YES".into()],
        ]
    );
    // The viewer reads but cannot change anything.
    let vera = serve.connect("vera", "vera-pw").unwrap();
    assert_eq!(
        vera.rows("SELECT COUNT(*) FROM by_category").unwrap(),
        vec![vec![answer.len().to_string()]]
    );
    assert!(vera
        .fails("DROP MATERIALIZED VIEW by_category")
        .starts_with("42501"));

    // Tenant B, logged in with its own valid password, finds nothing of A's.
    let bob = serve.connect("bob", "bob-pw").expect("bob logs in");
    assert!(bob
        .rows("SELECT * FROM by_category")
        .unwrap_err()
        .starts_with("42P01"));
    assert!(bob
        .rows("SELECT * FROM team_a.by_category")
        .unwrap_err()
        .starts_with("42P01"));
    assert!(bob.rows("SHOW TABLES").unwrap().is_empty());
    assert!(bob.rows("SHOW PIPELINES").unwrap().is_empty());
    assert!(bob
        .rows("SHOW USERS")
        .unwrap()
        .iter()
        .all(|r| r[1] == "team_b"));
    assert!(bob.fails("STOP PIPELINE by_category").starts_with("42704"));
    assert!(bob
        .fails("DROP MATERIALIZED VIEW by_category")
        .starts_with("42P01"));
    assert!(bob.fails("DESCRIBE orders").starts_with("42P01"));
    assert!(bob
        .fails("CREATE TOKEN FOR USER alice")
        .starts_with("42704"));
    assert!(bob.fails("CREATE TENANT team_c").starts_with("42501"));
    assert!(bob
        .fails("CREATE USER mallory WITH PASSWORD 'x' IN TENANT team_a ROLE owner")
        .starts_with("42501"));
    // File paths into A's storage, or anywhere outside B's own, are refused at CREATE TABLE.
    let a_files = serve.files("team_a").join("orders");
    for path in [
        "../../team_a/files/orders".to_string(),
        a_files.display().to_string(),
        "/etc".to_string(),
        format!("file://{}", a_files.display()),
    ] {
        let e = bob.fails(&format!(
            "CREATE TABLE stolen (id BIGINT, category STRING, amount BIGINT)
               WITH ('connector' = 'filesystem', 'path' = '{path}', 'format' = 'csv')"
        ));
        assert!(
            e.starts_with("42501") && e.contains("storage"),
            "{path}: {e}"
        );
    }
    // Client library options that name the server's files, or load or run its programs.
    for (key, value, why) in [
        (
            "properties.ssl.ca.location",
            "/etc/ssl/private/server.pem",
            "storage",
        ),
        (
            "properties.ssl.key.location",
            "../../team_a/files/key.pem",
            "storage",
        ),
        (
            "properties.sasl.kerberos.keytab",
            "/etc/krb5.keytab",
            "storage",
        ),
        (
            "properties.plugin.library.paths",
            "/usr/lib/libevil.so",
            "program",
        ),
        (
            "properties.sasl.kerberos.kinit.cmd",
            "cat /etc/shadow",
            "program",
        ),
    ] {
        let e = bob.fails(&format!(
            "CREATE TABLE k (id BIGINT) WITH ('connector' = 'kafka', 'topic' = 't',
               'properties.bootstrap.servers' = '127.0.0.1:9', 'format' = 'json', '{key}' = '{value}')"
        ));
        assert!(e.starts_with("42501") && e.contains(why), "{key}: {e}");
    }
    // A link inside B's storage that leads into A's is refused too.
    std::fs::create_dir_all(serve.files("team_b")).unwrap();
    std::os::unix::fs::symlink(&a_files, serve.files("team_b").join("link")).unwrap();
    let e = bob.fails(
        "CREATE TABLE stolen (id BIGINT, category STRING, amount BIGINT)
           WITH ('connector' = 'filesystem', 'path' = 'link', 'format' = 'csv')",
    );
    assert!(e.contains("link"), "{e}");
    // Wrong or unknown credentials do not log in.
    assert!(serve.connect("alice", "wrong").is_err());
    assert!(serve.connect("nobody", "alice-pw").is_err());

    // REST: the same view with A's token; B's token finds nothing; no token is refused.
    let alice_token = alice.rows("CREATE TOKEN").unwrap()[0][1].clone();
    let bob_token = bob.rows("CREATE TOKEN").unwrap()[0][1].clone();
    let (status, body) = serve.http(
        "GET",
        "/v1/views/by_category/rows",
        Some(&alice_token),
        None,
    );
    assert_eq!(status, 200, "{body}");
    let mut got: Vec<Vec<String>> = body["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|v| v.to_string().trim_matches('"').to_string())
                .collect()
        })
        .collect();
    got.sort();
    assert_eq!(got, as_rows(&answer));
    let (status, _) = serve.http("GET", "/v1/views/by_category/rows", Some(&bob_token), None);
    assert_eq!(status, 404);
    let (status, _) = serve.http("GET", "/v1/pipelines/by_category", Some(&bob_token), None);
    assert_eq!(status, 404);
    let (status, _) = serve.http(
        "POST",
        "/v1/pipelines/by_category/stop",
        Some(&bob_token),
        None,
    );
    assert_eq!(status, 404);
    let (status, _) = serve.http("GET", "/v1/views/by_category/rows", None, None);
    assert_eq!(status, 401);
    let (status, _) = serve.http(
        "GET",
        "/v1/views/by_category/rows",
        Some("sluice_0000"),
        None,
    );
    assert_eq!(status, 401);
    // A revoked token stops working at once.
    let token_id = alice.rows("SHOW TOKENS").unwrap()[0][0].clone();
    alice.exec(&format!("REVOKE TOKEN '{token_id}'"));
    let (status, _) = serve.http(
        "GET",
        "/v1/views/by_category/rows",
        Some(&alice_token),
        None,
    );
    assert_eq!(status, 401);
    // The admin token sees every tenant.
    let (status, body) = serve.http("GET", "/v1/tenants", Some(ADMIN_TOKEN), None);
    assert_eq!(status, 200);
    assert_eq!(body["rows"].as_array().unwrap().len(), 3, "{body}");
}

#[test]
fn pipelines_survive_a_killed_process_and_a_killed_server_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let pg_port = free_port();
    let http_port = free_port();
    let mut serve = Serve::start_on(dir.path(), pg_port, http_port);
    let admin = serve.admin();
    admin.exec(
        "CREATE TENANT shop; CREATE USER dev WITH PASSWORD 'pw' IN TENANT shop ROLE developer",
    );
    let dev = serve.connect("dev", "pw").unwrap();
    // 150 K ids at 15 K/s: about 10 s of input, so the kills land mid-stream.
    let n: i64 = 150_000;
    dev.exec(&format!(
        "CREATE TABLE ids (id BIGINT) WITH ('connector' = 'datagen', 'rows-per-second' = '15000',
           'fields.id.kind' = 'sequence', 'fields.id.start' = '1', 'fields.id.end' = '{n}');
         SET 'parallelism.default' = '2';
         SET 'restart-strategy.exponential-delay.initial-backoff' = '200 ms';
         CREATE MATERIALIZED VIEW buckets AS
           SELECT id % 7 AS bucket, COUNT(*) AS n, SUM(id) AS total FROM ids GROUP BY id % 7"
    ));
    let expected = buckets_answer(n, 7);
    // Some rows are in, then the pipeline's process is killed.
    wait_for(60, "the view shows some rows", || {
        let r = dev.rows("SELECT SUM(n) FROM buckets").unwrap_or_default();
        let seen: i64 = r.first().and_then(|r| r[0].parse().ok()).unwrap_or(0);
        (seen > 20_000, seen)
    });
    let pid: i32 = pipeline_status(&dev, "buckets")[6].parse().expect("a pid");
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let status = wait_for(60, "the pipeline restarts", || {
        let s = pipeline_status(&dev, "buckets");
        (
            s[4] == "1" && s[2] == "running" && !s[6].is_empty() && s[6] != pid.to_string(),
            s,
        )
    });
    assert!(status[7].contains("signal 9"), "{status:?}");
    // While it runs again, every read is one epoch: a partial view never shows a bucket
    // counted past the answer.
    std::thread::sleep(Duration::from_secs(2));
    for row in dev
        .rows("SELECT bucket, n, total FROM buckets ORDER BY bucket")
        .unwrap()
    {
        let full = &expected[row[0].parse::<usize>().unwrap()];
        assert!(
            row[1].parse::<i64>().unwrap() <= full[1].parse::<i64>().unwrap(),
            "{row:?}"
        );
    }
    // Then the server itself dies (its pipelines die with it) and comes back.
    drop(dev);
    drop(admin);
    serve.kill();
    std::thread::sleep(Duration::from_millis(500));
    let orphan_alive = unsafe { libc::kill(pid, 0) } == 0;
    assert!(!orphan_alive);
    let serve = Serve::start_on(dir.path(), pg_port, http_port);
    let dev = serve.connect("dev", "pw").unwrap();
    assert_eq!(expected.len(), 7);
    wait_finished(
        &dev,
        120,
        "buckets",
        "SELECT bucket, n, total FROM buckets ORDER BY bucket",
        &expected,
    );
}

#[test]
fn quotas_and_a_failing_pipeline_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let serve = Serve::start(dir.path());
    let admin = serve.admin();
    admin.exec(
        "CREATE TENANT small;
         CREATE USER owner1 WITH PASSWORD 'pw' IN TENANT small ROLE owner;
         ALTER TENANT small SET QUOTA (max_pipelines = 1, max_parallelism = 2, max_state_bytes = '64mb')",
    );
    let quotas = admin.rows("SHOW QUOTAS").unwrap();
    let row = |q: &str| {
        quotas
            .iter()
            .find(|r| r[0] == "small" && r[1] == q)
            .cloned()
            .unwrap()
    };
    assert_eq!(row("max_pipelines")[2], "1");
    assert_eq!(row("max_state_bytes")[2], (64u64 << 20).to_string());
    assert!(admin
        .fails("ALTER TENANT small SET QUOTA (max_widgets = 1)")
        .contains("unknown quota"));
    let owner = serve.connect("owner1", "pw").unwrap();
    // The owner cannot raise its own quota.
    assert!(owner
        .fails("ALTER TENANT small SET QUOTA (max_pipelines = 9)")
        .starts_with("42501"));
    owner.exec(
        "CREATE TABLE ticks (id BIGINT) WITH ('connector' = 'datagen', 'rows-per-second' = '10',
           'fields.id.kind' = 'sequence', 'fields.id.start' = '1', 'fields.id.end' = '1000000')",
    );
    let e = owner.fails("SET 'parallelism.default' = '3'; CREATE MATERIALIZED VIEW big AS SELECT COUNT(*) AS n FROM ticks");
    assert!(
        e.starts_with("53400") && e.contains("max_parallelism") && e.contains("is 2"),
        "{e}"
    );
    owner.exec("SET 'parallelism.default' = '1'; CREATE MATERIALIZED VIEW one AS SELECT COUNT(*) AS n FROM ticks");
    let e = owner.fails("CREATE MATERIALIZED VIEW two AS SELECT MAX(id) AS m FROM ticks");
    assert!(
        e.starts_with("53400")
            && e.contains("max_pipelines")
            && e.contains("1 pipelines are running"),
        "{e}"
    );
    assert_eq!(
        owner
            .rows("SHOW QUOTAS")
            .unwrap()
            .iter()
            .find(|r| r[1] == "max_pipelines")
            .unwrap()[3],
        "1"
    );
    // Stopping the first frees the slot.
    owner.exec("STOP PIPELINE one");
    assert_eq!(pipeline_status(&owner, "one")[2], "stopped");
    // A pipeline that fails every time ends failed with its error, after its restarts.
    std::fs::write(serve.files("small").join("bad.csv"), "1\nnot-a-number\n").unwrap();
    owner.exec(
        "CREATE TABLE bad (id BIGINT) WITH ('connector' = 'filesystem', 'path' = 'bad.csv', 'format' = 'csv');
         SET 'restart-strategy.type' = 'fixed-delay';
         SET 'restart-strategy.fixed-delay.attempts' = '2';
         SET 'restart-strategy.fixed-delay.delay' = '100 ms';
         CREATE MATERIALIZED VIEW broken AS SELECT SUM(id) AS n FROM bad",
    );
    let status = wait_for(60, "the pipeline ends failed", || {
        let s = pipeline_status(&owner, "broken");
        (s.get(2).map(String::as_str) == Some("failed"), s)
    });
    assert_eq!(status[4], "2", "{status:?}");
    assert!(
        status[7].contains("bad.csv:2: malformed CSV record"),
        "{status:?}"
    );
    // The log has every run's error; another tenant cannot read it.
    let token = owner.rows("CREATE TOKEN").unwrap()[0][1].clone();
    let (st, body) = serve.http(
        "GET",
        "/v1/pipelines/broken/logs?lines=50",
        Some(&token),
        None,
    );
    assert_eq!(st, 200, "{body}");
    let errors = body["lines"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l.as_str().unwrap().contains("bad.csv:2"))
        .count();
    assert_eq!(errors, 3, "{body}");
    let (st, _) = serve.http("GET", "/v1/pipelines/broken/logs", Some(ADMIN_TOKEN), None);
    assert_eq!(st, 404);
}

#[test]
fn a_port_in_use_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["serve", "--data-dir"])
        .arg(dir.path())
        .args([
            "--pg-port",
            &port.to_string(),
            "--http-port",
            &free_port().to_string(),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "127.0.0.1:{port} (Postgres wire) is already in use"
        )),
        "{err}"
    );
}

#[test]
fn psql_works_against_the_server() {
    if Command::new("psql").arg("--version").output().is_err() {
        panic!("psql is not installed (.ci/run installs postgresql-client)");
    }
    let dir = tempfile::tempdir().unwrap();
    let serve = Serve::start(dir.path());
    let out = Command::new("psql")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &serve.pg.to_string(),
            "-U",
            "admin",
            "-d",
            "admin",
            "-At",
            "-c",
            "SHOW TENANTS",
        ])
        .env("PGPASSWORD", ADMIN_PASSWORD)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "admin");
    let out = Command::new("psql")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &serve.pg.to_string(),
            "-U",
            "admin",
            "-At",
            "-c",
            "SHOW TENANTZ",
        ])
        .env("PGPASSWORD", ADMIN_PASSWORD)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("SHOW TENANTZ"));
    // psql prints COPY (SUBSCRIBE ...) lines as they arrive.
    serve.admin().exec(
        "CREATE TABLE ids (id BIGINT) WITH ('connector' = 'datagen', 'rows-per-second' = '1000',
           'fields.id.kind' = 'sequence', 'fields.id.start' = '1', 'fields.id.end' = '1000000');
         CREATE MATERIALIZED VIEW total AS SELECT COUNT(*) AS n FROM ids",
    );
    let mut psql = Command::new("psql")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &serve.pg.to_string(),
            "-U",
            "admin",
            "-c",
            "COPY (SUBSCRIBE TO total) TO STDOUT",
        ])
        .env("PGPASSWORD", ADMIN_PASSWORD)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let out = psql.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    // Counts only grow: each epoch retracts the old count and adds a larger one.
    let mut counts = vec![];
    while counts.len() < 3 {
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("a COPY line within 30 s");
        let cols: Vec<&str> = line.split('\t').collect();
        assert_eq!(cols.len(), 3, "{line}");
        if cols[1] == "+I" || cols[1] == "+U" {
            counts.push(cols[2].parse::<i64>().unwrap());
        }
    }
    let _ = psql.kill();
    let _ = psql.wait();
    assert!(counts.windows(2).all(|w| w[0] < w[1]), "{counts:?}");
    // psql's listings show the tenant's own objects, and only those.
    serve
        .admin()
        .exec("CREATE TENANT other; CREATE USER o WITH PASSWORD 'pw' IN TENANT other ROLE owner");
    serve.connect("o", "pw").unwrap().exec(
        "CREATE TABLE secret (id BIGINT) WITH ('connector' = 'datagen', 'number-of-rows' = '1')",
    );
    let listing = |user: &str, password: &str, command: &str| {
        let (ok, out, err) = self::psql(&serve, user, password, command);
        assert!(ok, "{command}: {err}");
        out
    };
    assert_eq!(
        listing("admin", ADMIN_PASSWORD, "\\d"),
        "public|ids|table|admin\npublic|total|materialized view|admin"
    );
    assert_eq!(
        listing("admin", ADMIN_PASSWORD, "\\dm"),
        "public|total|materialized view|admin"
    );
    assert_eq!(listing("o", "pw", "\\dt"), "public|secret|table|other");
}

/// Folds change-feed rows (`epoch, op, columns...`) into the multiset of current rows.
fn fold_feed(state: &mut BTreeMap<Vec<String>, i64>, op: &str, row: Vec<String>) {
    let sign = match op {
        "+I" | "+U" => 1,
        "-U" | "-D" => -1,
        other => panic!("change kind {other}"),
    };
    let n = state.entry(row.clone()).or_insert(0);
    *n += sign;
    if *n == 0 {
        state.remove(&row);
    }
}

#[test]
fn subscriptions_over_the_wire_and_sse_fold_to_the_final_view() {
    let dir = tempfile::tempdir().unwrap();
    let serve = Serve::start(dir.path());
    let admin = serve.admin();
    let n: i64 = 60_000;
    admin.exec(&format!(
        "CREATE TABLE ids (id BIGINT) WITH ('connector' = 'datagen', 'rows-per-second' = '15000',
           'fields.id.kind' = 'sequence', 'fields.id.start' = '1', 'fields.id.end' = '{n}');
         CREATE MATERIALIZED VIEW fives AS
           SELECT id % 5 AS k, COUNT(*) AS n, SUM(id) AS total FROM ids GROUP BY id % 5"
    ));
    let mut expected: BTreeMap<Vec<String>, i64> = BTreeMap::new();
    for k in 0..5i64 {
        let ids: Vec<i64> = (1..=n).filter(|i| i % 5 == k).collect();
        expected.insert(
            vec![
                k.to_string(),
                ids.len().to_string(),
                ids.iter().sum::<i64>().to_string(),
            ],
            1,
        );
    }
    // Over SSE, on a thread of its own.
    let http = serve.http;
    let expected_sse = expected.clone();
    let sse = std::thread::spawn(move || {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let resp = reqwest::blocking::Client::new()
            .get(format!("http://127.0.0.1:{http}/v1/views/fives/changes"))
            .bearer_auth(ADMIN_TOKEN)
            .timeout(Duration::from_secs(120))
            .send()
            .expect("SSE");
        assert_eq!(resp.status().as_u16(), 200);
        let mut state = BTreeMap::new();
        let mut events = 0;
        for line in BufReader::new(resp).lines() {
            let line = line.expect("SSE line");
            let Some(data) = line.strip_prefix("data:") else {
                continue;
            };
            let v: serde_json::Value = serde_json::from_str(data.trim()).expect("event JSON");
            events += 1;
            for row in v["rows"].as_array().unwrap() {
                let row: Vec<String> = row
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.to_string().trim_matches('"').to_string())
                    .collect();
                fold_feed(&mut state, &row[1], row[2..].to_vec());
            }
            if state == expected_sse {
                return events;
            }
        }
        panic!("the SSE feed ended before it reached the final view: {state:?}");
    });
    // Over the wire: SUBSCRIBE streams rows until the folded state is the final view.
    let pg = serve.connect("admin", ADMIN_PASSWORD).unwrap();
    let state = pg.rt.block_on(async {
        use futures_util::StreamExt;
        let stream = pg
            .client
            .simple_query_raw("SUBSCRIBE TO fives")
            .await
            .expect("SUBSCRIBE");
        futures_util::pin_mut!(stream);
        let mut state = BTreeMap::new();
        let mut first_epoch: Option<String> = None;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        while state != expected {
            let msg = tokio::time::timeout_at(deadline, stream.next())
                .await
                .unwrap_or_else(|_| panic!("SUBSCRIBE did not reach the final view: {state:?}"))
                .expect("the feed ended")
                .expect("a feed row");
            if let tokio_postgres::SimpleQueryMessage::Row(r) = msg {
                let row: Vec<String> = (0..r.len())
                    .map(|i| r.get(i).unwrap_or("NULL").to_string())
                    .collect();
                first_epoch.get_or_insert(row[0].clone());
                fold_feed(&mut state, &row[1], row[2..].to_vec());
            }
        }
        state
    });
    assert_eq!(state.len(), 5);
    assert!(sse.join().expect("the SSE reader") >= 2);
    // A query on the same view agrees.
    assert_eq!(
        admin.rows("SELECT SUM(n) FROM fives").unwrap(),
        vec![vec![n.to_string()]]
    );
}

/// `k, n, total` per `id % m` over ids `1..=n`, as rows.
fn buckets_answer(n: i64, m: i64) -> Vec<Vec<String>> {
    buckets_of(1..=n, m)
}

#[test]
fn a_pipeline_past_its_state_quota_fails_alone_and_metrics_stay_within_the_tenant() {
    let dir = tempfile::tempdir().unwrap();
    let serve = Serve::start(dir.path());
    let admin = serve.admin();
    admin.exec(
        "CREATE TENANT greedy; CREATE TENANT steady;
         CREATE USER g WITH PASSWORD 'pw' IN TENANT greedy ROLE owner;
         CREATE USER s WITH PASSWORD 'pw' IN TENANT steady ROLE owner;
         ALTER TENANT greedy SET QUOTA (max_state_bytes = '4mb');
         CREATE TENANT hoarder; CREATE USER h WITH PASSWORD 'pw' IN TENANT hoarder ROLE owner;
         ALTER TENANT hoarder SET QUOTA (max_checkpoint_bytes = '256kb')",
    );
    // Checkpoints past their quota end the pipeline, named.
    let h = serve.connect("h", "pw").unwrap();
    h.exec(
        "CREATE TABLE ids (id BIGINT) WITH ('connector' = 'datagen', 'rows-per-second' = '50000',
           'fields.id.kind' = 'sequence', 'fields.id.start' = '1', 'fields.id.end' = '100000000');
         CREATE MATERIALIZED VIEW per_id AS SELECT id, COUNT(*) AS n FROM ids GROUP BY id",
    );
    let g = serve.connect("g", "pw").unwrap();
    let s = serve.connect("s", "pw").unwrap();
    // One group per id: the state grows without bound, by about 0.35 MB/s, so that it passes
    // the soft limit (80%) two seconds before the quota even unslowed: more than the state
    // reports take apart (they space out as the state grows) on a busy machine.
    g.exec(
        "CREATE TABLE ids (id BIGINT) WITH ('connector' = 'datagen', 'rows-per-second' = '3000',
           'fields.id.kind' = 'sequence', 'fields.id.start' = '1', 'fields.id.end' = '100000000');
         SET 'restart-strategy.type' = 'none';
         CREATE MATERIALIZED VIEW per_id AS SELECT id, COUNT(*) AS n FROM ids GROUP BY id",
    );
    let n: i64 = 80_000;
    s.exec(&format!(
        "CREATE TABLE ids (id BIGINT) WITH ('connector' = 'datagen', 'rows-per-second' = '10000',
           'fields.id.kind' = 'sequence', 'fields.id.start' = '1', 'fields.id.end' = '{n}');
         CREATE MATERIALIZED VIEW buckets AS
           SELECT id % 7 AS k, COUNT(*) AS n, SUM(id) AS total FROM ids GROUP BY id % 7"
    ));
    let status = wait_for(90, "the greedy pipeline fails on its quota", || {
        let st = pipeline_status(&g, "per_id");
        (st.get(2).map(String::as_str) == Some("failed"), st)
    });
    // Its last stats show it slowed (backpressured) below its generator's rate.
    let g_token = g.rows("CREATE TOKEN").unwrap()[0][1].clone();
    let (_, body) = serve.http("GET", "/v1/pipelines/per_id/stats", Some(&g_token), None);
    assert_eq!(
        body["stats"]["backpressured"],
        serde_json::json!(true),
        "{body}"
    );
    let slowed_to = body["stats"]["ingest_limit"]
        .as_u64()
        .expect("an ingest limit");
    assert!(
        (100..3000).contains(&slowed_to),
        "slowed to {slowed_to} rows/s"
    );
    let error = &status[7];
    assert!(
        error.contains("quota max_state_bytes is 4194304")
            && error.contains("greedy/per_id")
            && error.contains("the largest is"),
        "{error}"
    );
    // Past the soft limit (80%) it was slowed first, and its log says so.
    let (st, body) = serve.http("GET", "/v1/pipelines/per_id/logs", Some(&g_token), None);
    assert_eq!(st, 200, "{body}");
    let log = body["lines"].to_string();
    assert!(
        log.contains("past 80% of its quota max_state_bytes = 4194304: its sources are slowed to"),
        "{log}"
    );
    let status = wait_for(90, "the hoarding pipeline fails on its quota", || {
        let st = pipeline_status(&h, "per_id");
        (st.get(2).map(String::as_str) == Some("failed"), st)
    });
    assert!(
        status[7].contains("quota max_checkpoint_bytes of tenant 'hoarder' is 262144")
            && status[7].contains("pipeline 'per_id' holds"),
        "{status:?}"
    );
    // The other tenant's pipeline runs on to the exact answer.
    wait_finished(
        &s,
        90,
        "buckets",
        "SELECT k, n, total FROM buckets ORDER BY k",
        &buckets_answer(n, 7),
    );
    // Metrics: each tenant's token sees its own series only; the admin's sees both.
    let token_of = |pg: &Pg| pg.rows("CREATE TOKEN").unwrap()[0][1].clone();
    let (st, _) = serve.http("GET", "/metrics", None, None);
    assert_eq!(st, 401);
    let metrics = |token: &str| serve.metrics(token);
    let steady = metrics(&token_of(&s));
    assert!(
        steady.contains(&format!(
            "sluice_pipeline_rows_read_total{{pipeline=\"buckets\",table=\"ids\",tenant=\"steady\"}} {n}"
        )),
        "{steady}"
    );
    assert!(!steady.contains("greedy"), "{steady}");
    let greedy = metrics(&token_of(&g));
    assert!(
        greedy.contains("tenant=\"greedy\"") && !greedy.contains("steady"),
        "{greedy}"
    );
    let all = metrics(ADMIN_TOKEN);
    assert!(all.contains("tenant=\"greedy\"") && all.contains("tenant=\"steady\""));
    // The stats endpoint has the counters too.
    let (st, body) = serve.http(
        "GET",
        "/v1/pipelines/buckets/stats",
        Some(&token_of(&s)),
        None,
    );
    assert_eq!(st, 200, "{body}");
    assert_eq!(body["stats"]["rows_read"]["ids"], serde_json::json!(n));
}

/// `ids`: a table over the CSV files of the tenant's `incoming` folder, watched for new ones.
macro_rules! INCOMING_IDS {
    () => {
        "CREATE TABLE ids (id BIGINT) WITH ('connector' = 'filesystem', 'path' = 'incoming',
           'format' = 'csv', 'source.monitor-interval' = '200 ms');"
    };
}

/// Writes ids `from..to` as a CSV file into `dir` (renamed into place whole).
fn write_ids(dir: &Path, name: &str, ids: std::ops::Range<i64>) {
    let text: String = ids.map(|i| format!("{i}\n")).collect();
    let tmp = dir.parent().unwrap().join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, dir.join(name)).unwrap();
}

#[test]
fn stop_resume_and_rescale_keep_a_view_exact() {
    let dir = tempfile::tempdir().unwrap();
    let serve = Serve::start(dir.path());
    let admin = serve.admin();
    let input = serve.files("admin").join("incoming");
    std::fs::create_dir_all(&input).unwrap();
    write_ids(&input, "a.csv", 1..40_001);
    admin.exec(concat!(
        INCOMING_IDS!(),
        "
         CREATE MATERIALIZED VIEW buckets AS
           SELECT id % 11 AS k, COUNT(*) AS n, SUM(id) AS total FROM ids GROUP BY id % 11"
    ));
    let rows = |pg: &Pg| {
        pg.rows("SELECT k, n, total FROM buckets ORDER BY k")
            .unwrap_or_default()
    };
    wait_for(60, "the first file", || {
        (
            rows(&admin) == buckets_answer(40_000, 11),
            rows(&admin).len(),
        )
    });
    admin.exec("STOP PIPELINE buckets");
    assert_eq!(pipeline_status(&admin, "buckets")[2], "stopped");
    // Stopped: a new file waits, and the view holds still.
    write_ids(&input, "b.csv", 40_001..80_001);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(rows(&admin), buckets_answer(40_000, 11));
    admin.exec("START PIPELINE buckets");
    wait_for(60, "the second file after resuming", || {
        (
            rows(&admin) == buckets_answer(80_000, 11),
            rows(&admin).len(),
        )
    });
    admin.exec("ALTER PIPELINE buckets SET PARALLELISM = 2");
    wait_for(30, "running on 2 workers", || {
        let st = pipeline_status(&admin, "buckets");
        (st[2] == "running" && st[3] == "2", st)
    });
    write_ids(&input, "c.csv", 80_001..120_001);
    wait_for(60, "the third file on 2 workers", || {
        (
            rows(&admin) == buckets_answer(120_000, 11),
            rows(&admin).len(),
        )
    });
    let st = pipeline_status(&admin, "buckets");
    assert_eq!(st[4], "0", "no failure on the way: {st:?}");
    // Generated streams cannot move to another worker count: refused up front.
    admin.exec(
        "CREATE TABLE gen (id BIGINT) WITH ('connector' = 'datagen', 'rows-per-second' = '10',
           'fields.id.kind' = 'sequence', 'fields.id.start' = '1', 'fields.id.end' = '100000');
         CREATE MATERIALIZED VIEW gen_count AS SELECT COUNT(*) AS n FROM gen",
    );
    let e = admin.fails("ALTER PIPELINE gen_count SET PARALLELISM = 2");
    assert!(e.contains("'gen'") && e.contains("FRESH"), "{e}");
}

#[test]
fn the_ingest_quota_throttles_sources_without_dropping_rows() {
    let dir = tempfile::tempdir().unwrap();
    let serve = Serve::start(dir.path());
    let admin = serve.admin();
    admin.exec(
        "CREATE TENANT slow; CREATE USER sl WITH PASSWORD 'pw' IN TENANT slow ROLE owner;
         ALTER TENANT slow SET QUOTA (max_ingest_rows_per_second = 4000)",
    );
    let sl = serve.connect("sl", "pw").unwrap();
    // Two pipelines share the tenant's 4000 rows/s: 6000 rows each take 3 s or more, though
    // their generators would make them in a tenth of that.
    let started = Instant::now();
    for name in ["a", "b"] {
        sl.exec(&format!(
            "CREATE TABLE ids_{name} (id BIGINT) WITH ('connector' = 'datagen', 'rows-per-second' = '100000',
               'fields.id.kind' = 'sequence', 'fields.id.start' = '1', 'fields.id.end' = '6000');
             CREATE MATERIALIZED VIEW count_{name} AS SELECT COUNT(*) AS n, SUM(id) AS s FROM ids_{name}"
        ));
    }
    for name in ["a", "b"] {
        wait_finished(
            &sl,
            120,
            &format!("count_{name}"),
            &format!("SELECT n, s FROM count_{name}"),
            &[vec!["6000".to_string(), (6000 * 6001 / 2).to_string()]],
        );
    }
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(2500),
        "12000 rows at 4000/s took only {took:?}"
    );
}

#[test]
fn tls_protects_rest_and_the_postgres_wire() {
    let dir = tempfile::tempdir().unwrap();
    // A test authority, and a server certificate for 127.0.0.1 signed by it.
    let d = dir.path();
    let (ca, cert, key) = (d.join("ca.pem"), d.join("cert.pem"), d.join("key.pem"));
    std::fs::write(
        d.join("ext.cnf"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    for args in [
        "req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=sluice-test-ca -keyout ca.key -out ca.pem",
        "req -newkey rsa:2048 -nodes -subj /CN=127.0.0.1 -keyout key.pem -out server.csr",
        "x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 1 -extfile ext.cnf -out cert.pem",
    ] {
        let made = Command::new("openssl")
            .args(args.split(' '))
            .current_dir(d)
            .output()
            .expect("openssl makes the test certificates");
        assert!(made.status.success(), "openssl {args}: {}", String::from_utf8_lossy(&made.stderr));
    }
    let (pg, http) = (free_port(), free_port());
    let serve = Serve::start_with(
        &dir.path().join("data"),
        pg,
        http,
        &[
            "--tls-cert".as_ref(),
            cert.as_os_str(),
            "--tls-key".as_ref(),
            key.as_os_str(),
        ],
    );
    let banner = serve.banner.join("\n");
    assert!(
        banner.contains(&format!("https://127.0.0.1:{http}")),
        "{banner}"
    );
    // psql checks the certificate against the test's own authority and the address.
    let psql = Command::new("psql")
        .arg(format!(
            "host=127.0.0.1 port={pg} user=admin dbname=admin sslmode=verify-full sslrootcert={}",
            ca.display()
        ))
        .args(["-At", "-c", "SHOW TENANTS"])
        .env("PGPASSWORD", ADMIN_PASSWORD)
        .output()
        .unwrap();
    assert!(
        psql.status.success(),
        "{}",
        String::from_utf8_lossy(&psql.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&psql.stdout).trim(), "admin");
    // REST over HTTPS with the same authority; plain HTTP gets no answer.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = reqwest::blocking::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&std::fs::read(&ca).unwrap()).unwrap())
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let resp = client
        .get(format!("https://127.0.0.1:{http}/v1/tenants"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .expect("HTTPS");
    assert_eq!(resp.status().as_u16(), 200);
    let plain = reqwest::blocking::Client::new()
        .get(format!("http://127.0.0.1:{http}/v1/health"))
        .timeout(Duration::from_secs(10))
        .send();
    assert!(plain.is_err() || !plain.unwrap().status().is_success());
    let psql_with = |pg: u16, sslmode: &str| {
        Command::new("psql")
            .arg(format!(
                "host=127.0.0.1 port={pg} user=admin dbname=admin sslmode={sslmode} sslrootcert={} connect_timeout=30",
                ca.display()
            ))
            .args(["-At", "-c", "SHOW TENANTS"])
            .env("PGPASSWORD", ADMIN_PASSWORD)
            .output()
            .unwrap()
    };
    // TLS is offered, not required: a client that does not ask still connects.
    assert!(psql_with(pg, "disable").status.success());
    drop(serve);
    // With --require-tls, it is refused with PostgreSQL's error for that, and TLS still works.
    let (pg, http) = (free_port(), free_port());
    let _serve = Serve::start_with(
        &dir.path().join("data"),
        pg,
        http,
        &[
            "--tls-cert".as_ref(),
            cert.as_os_str(),
            "--tls-key".as_ref(),
            key.as_os_str(),
            "--require-tls".as_ref(),
        ],
    );
    let refused = psql_with(pg, "disable");
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("this server requires TLS"), "{err}");
    let plain = Pg::connect(pg, "admin", ADMIN_PASSWORD)
        .err()
        .expect("refused without TLS");
    let code = plain.as_db_error().map(|d| d.code().code().to_string());
    assert_eq!(code.as_deref(), Some("28000"), "{plain}");
    let ok = psql_with(pg, "verify-full");
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&ok.stdout).trim(), "admin");
    // psql's default (sslmode=prefer) asks for TLS, and gets it.
    let prefer = psql_with(pg, "prefer");
    assert!(
        prefer.status.success(),
        "{}",
        String::from_utf8_lossy(&prefer.stderr)
    );
}

#[test]
fn dates_timestamps_and_decimals_reach_clients_as_their_postgres_types() {
    let dir = tempfile::tempdir().unwrap();
    let serve = Serve::start(dir.path());
    let admin = serve.admin();
    std::fs::create_dir_all(serve.files("admin")).unwrap();
    std::fs::write(
        serve.files("admin").join("sales.csv"),
        "2026-11-11,2026-11-11 00:00:01.250,10.05\n\
         2026-11-11,2026-11-11 23:59:59.999,0.95\n\
         2026-11-12,2026-11-12 08:30:00.000,99.99\n",
    )
    .unwrap();
    admin.exec(
        "CREATE TABLE sales (d DATE, ts TIMESTAMP(3), amount DECIMAL(10, 2))
           WITH ('connector' = 'filesystem', 'path' = 'sales.csv', 'format' = 'csv');
         CREATE MATERIALIZED VIEW daily AS
           SELECT d, MAX(ts) AS last_sale, SUM(amount) AS total FROM sales GROUP BY d",
    );
    let rows = wait_for(60, "the daily view", || {
        let r = admin.rt.block_on(
            admin
                .client
                .query("SELECT d, last_sale, total FROM daily ORDER BY d", &[]),
        );
        match r {
            Ok(rows) if rows.len() == 2 => (true, Some(rows)),
            _ => (false, None),
        }
    })
    .unwrap();
    use tokio_postgres::types::Type;
    let types: Vec<Type> = rows[0]
        .columns()
        .iter()
        .map(|c| c.type_().clone())
        .collect();
    assert_eq!(types, vec![Type::DATE, Type::TIMESTAMP, Type::NUMERIC]);
    let day = |s: &str| chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d").unwrap();
    let at = |s: &str| chrono::NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S%.3f").unwrap();
    // Binary values (the extended protocol asks for them).
    assert_eq!(rows[0].get::<_, chrono::NaiveDate>(0), day("2026-11-11"));
    assert_eq!(
        rows[0].get::<_, chrono::NaiveDateTime>(1),
        at("2026-11-11 23:59:59.999")
    );
    assert_eq!(
        rows[1].get::<_, chrono::NaiveDateTime>(1),
        at("2026-11-12 08:30:00.000")
    );
    // NUMERIC in text (the simple protocol), exactly as summed.
    let text = admin
        .rt
        .block_on(
            admin
                .client
                .simple_query("SELECT d, last_sale, total FROM daily ORDER BY d"),
        )
        .unwrap();
    let rows: Vec<Vec<String>> = text
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some(
                (0..r.len())
                    .map(|i| r.get(i).unwrap().to_string())
                    .collect(),
            ),
            _ => None,
        })
        .collect();
    assert_eq!(
        rows,
        vec![
            vec![
                "2026-11-11".to_string(),
                "2026-11-11 23:59:59.999".into(),
                "11.00".into()
            ],
            vec![
                "2026-11-12".to_string(),
                "2026-11-12 08:30:00".into(),
                "99.99".into()
            ],
        ]
    );
}

/// psql run once: whether it succeeded, and its output (`-At`: unaligned, tuples only).
fn psql(serve: &Serve, user: &str, password: &str, command: &str) -> (bool, String, String) {
    let out = Command::new("psql")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &serve.pg.to_string(),
            "-U",
            user,
            "-At",
            "-c",
            command,
        ])
        .env("PGPASSWORD", password)
        .env("PGCONNECT_TIMEOUT", "30")
        .output()
        .expect("psql runs (.ci/run installs postgresql-client)");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
        String::from_utf8_lossy(&out.stderr).trim().to_string(),
    )
}

/// A simple-protocol query (as Grafana and psql send them): the rows as text.
fn simple_rows(pg: &Pg, sql: &str) -> Result<Vec<Vec<String>>, String> {
    let messages = pg.rt.block_on(pg.client.simple_query(sql)).map_err(|e| {
        e.as_db_error().map_or(e.to_string(), |d| {
            format!("{}: {}", d.code().code(), d.message())
        })
    })?;
    Ok(messages
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some(
                (0..r.len())
                    .map(|i| r.get(i).unwrap_or("NULL").to_string())
                    .collect(),
            ),
            _ => None,
        })
        .collect())
}

#[test]
fn psql_describes_objects_and_grafana_charts_a_view() {
    let dir = tempfile::tempdir().unwrap();
    let serve = Serve::start(dir.path());
    let admin = serve.admin();
    // Orders from 23:00 the day before to 07:00, around Grafana's range of 00:00..06:00.
    let start = chrono::NaiveDate::from_ymd_opt(2024, 4, 30)
        .unwrap()
        .and_hms_opt(23, 0, 0)
        .unwrap();
    let mut csv = String::new();
    let mut rows = vec![];
    let mut x: u64 = 7;
    for i in 0..5_000u64 {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let at = start + chrono::Duration::milliseconds(((x >> 20) % (8 * 3_600_000)) as i64);
        let amount = (x >> 40) % 1000 + 1;
        let province = ["Guangdong", "Zhejiang", "Beijing"][(i % 3) as usize];
        csv.push_str(&format!(
            "{},{province},{amount}\n",
            at.format("%Y-%m-%d %H:%M:%S%.3f")
        ));
        rows.push((at, amount as i64));
    }
    std::fs::create_dir_all(serve.files("admin")).unwrap();
    std::fs::write(serve.files("admin").join("orders.csv"), csv).unwrap();
    admin.exec(
        "CREATE TABLE orders (ts TIMESTAMP(3), province STRING, amount BIGINT)
           WITH ('connector' = 'filesystem', 'path' = 'orders.csv', 'format' = 'csv');
         CREATE VIEW big AS SELECT ts, amount FROM orders WHERE amount > 500;
         CREATE MATERIALIZED VIEW gmv AS SELECT ts, province, amount FROM orders",
    );
    wait_finished(
        &admin,
        120,
        "gmv",
        "SELECT COUNT(*) FROM gmv",
        &[vec!["5000".to_string()]],
    );

    // psql's \d family on each kind of object; columns and types as PostgreSQL names them.
    let (ok, out, err) = psql(&serve, "admin", ADMIN_PASSWORD, "\\d gmv");
    assert!(ok, "{err}");
    let columns: Vec<Vec<&str>> = out
        .lines()
        .map(|l| l.split('|').take(2).collect())
        .collect();
    assert_eq!(
        columns,
        vec![
            vec!["ts", "timestamp without time zone"],
            vec!["province", "text"],
            vec!["amount", "bigint"]
        ],
        "{out}"
    );
    // \d+ too (psql asks for storage options with an array constructor).
    let (ok, out, err) = psql(&serve, "admin", ADMIN_PASSWORD, "\\d+ gmv");
    assert!(ok, "{err}");
    assert_eq!(
        out.lines()
            .map(|l| l.split('|').next().unwrap())
            .filter(|c| ["ts", "province", "amount"].contains(c))
            .count(),
        3,
        "{out}"
    );
    let (ok, out, err) = psql(&serve, "admin", ADMIN_PASSWORD, "\\d orders");
    assert!(ok, "{err}");
    assert_eq!(
        out.lines()
            .map(|l| l.split('|').next().unwrap())
            .collect::<Vec<_>>(),
        vec!["ts", "province", "amount"],
        "{out}"
    );
    let (ok, out, err) = psql(&serve, "admin", ADMIN_PASSWORD, "\\d big");
    assert!(ok, "{err}");
    assert_eq!(
        out.lines()
            .map(|l| l.split('|').next().unwrap())
            .collect::<Vec<_>>(),
        vec!["ts", "amount"],
        "{out}"
    );
    let (ok, out, err) = psql(&serve, "admin", ADMIN_PASSWORD, "\\d");
    assert!(ok, "{err}");
    assert_eq!(
        out,
        "public|big|view|admin\npublic|gmv|materialized view|admin\npublic|orders|table|admin"
    );
    let (ok, _, err) = psql(&serve, "admin", ADMIN_PASSWORD, "\\d nosuch");
    assert!(
        !ok && err.contains("Did not find any relation named \"nosuch\""),
        "{err}"
    );
    // Reading a table or plain view says why it cannot be read.
    let e = admin.rows("SELECT * FROM orders").unwrap_err();
    assert!(e.contains("materialized view"), "{e}");

    // Another tenant's catalog holds nothing of this one's, however it asks.
    admin.exec("CREATE TENANT other; CREATE USER o WITH PASSWORD 'pw' IN TENANT other ROLE owner");
    let (ok, _, err) = psql(&serve, "o", "pw", "\\d gmv");
    assert!(!ok && err.contains("Did not find"), "{err}");
    let o = serve.connect("o", "pw").unwrap();
    for q in [
        "SELECT relname FROM pg_catalog.pg_class WHERE relname IN ('gmv', 'orders', 'big')",
        "SELECT relname FROM pg_class WHERE relname = 'gmv'",
        "SELECT table_name FROM information_schema.tables WHERE table_name = 'gmv'",
        "SELECT column_name FROM information_schema.columns WHERE column_name = 'province'",
        "SELECT attname FROM pg_catalog.pg_attribute WHERE attname = 'province'",
        "SELECT datname FROM pg_catalog.pg_database WHERE datname = 'admin'",
        "SELECT nspname FROM pg_catalog.pg_namespace WHERE nspname = 'admin'",
    ] {
        assert_eq!(simple_rows(&o, q), Ok(vec![]), "{q}");
    }
    assert!(o
        .rows("SELECT * FROM admin.public.gmv")
        .unwrap_err()
        .starts_with("42P01"));

    // Grafana's PostgreSQL data source: its ping, the queries its editor sends, and a panel.
    let grafana = |name: &str| {
        std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/integration/grafana")
                .join(name),
        )
        .unwrap()
    };
    for ping in [";", "-- ping"] {
        assert_eq!(simple_rows(&admin, ping), Ok(vec![]), "{ping}");
    }
    assert_eq!(
        simple_rows(&admin, &grafana("version.sql")),
        Ok(vec![vec!["1500".to_string()]])
    );
    assert_eq!(simple_rows(&admin, &grafana("timescaledb.sql")), Ok(vec![]));
    let tables = simple_rows(&admin, &grafana("tables.sql")).unwrap();
    assert_eq!(
        tables,
        vec![
            vec!["public.big".to_string()],
            vec!["public.gmv".into()],
            vec!["public.orders".into()]
        ]
    );
    // The editor asks for columns by the name the table list gave ('public.gmv').
    let got = simple_rows(&admin, &grafana("columns_public.gmv.sql")).unwrap();
    let names: Vec<&str> = got.iter().map(|r| r[0].as_str()).collect();
    assert_eq!(names, ["ts", "province", "amount"], "{got:?}");
    // By the bare name it runs too. (The search-path test in it is stubbed out by
    // datafusion-pg-catalog, so no row matches: that is why the list gives qualified names.)
    simple_rows(&admin, &grafana("columns_gmv.sql")).unwrap();
    // The panel: GMV per minute within the range, against the same sums computed here.
    let from = chrono::NaiveDate::from_ymd_opt(2024, 5, 1)
        .unwrap()
        .and_hms_opt(0, 0, 0)
        .unwrap();
    let to = from + chrono::Duration::hours(6);
    let mut per_minute: BTreeMap<i64, i64> = BTreeMap::new();
    for (at, amount) in &rows {
        if *at >= from && *at <= to {
            let secs = at.and_utc().timestamp_millis().div_euclid(1000);
            *per_minute.entry(secs.div_euclid(60) * 60).or_default() += amount;
        }
    }
    let panel = simple_rows(&admin, &grafana("timeseries_example.sql")).unwrap();
    let got: BTreeMap<i64, i64> = panel
        .iter()
        .map(|r| (r[0].parse::<f64>().unwrap() as i64, r[1].parse().unwrap()))
        .collect();
    assert_eq!(panel.len(), got.len());
    assert_eq!(got, per_minute);
}

#[test]
fn rest_administers_tenants_users_tokens_and_quotas_and_documents_itself() {
    let dir = tempfile::tempdir().unwrap();
    let serve = Serve::start(dir.path());
    let admin = Some(ADMIN_TOKEN);
    let (status, body) = serve.http(
        "POST",
        "/v1/tenants",
        admin,
        Some(serde_json::json!({"name": "shop"})),
    );
    assert_eq!(status, 200, "{body}");
    let (status, body) = serve.http(
        "POST",
        "/v1/users",
        admin,
        Some(serde_json::json!({"name": "sam", "password": "it's-sam", "tenant": "shop", "role": "owner"})),
    );
    assert_eq!(status, 200, "{body}");
    // The password with a quote in it works over the wire.
    let sam = serve.connect("sam", "it's-sam").expect("sam logs in");
    let (status, body) = serve.http(
        "POST",
        "/v1/tokens",
        admin,
        Some(serde_json::json!({"user": "sam"})),
    );
    assert_eq!(status, 200, "{body}");
    let columns = body["columns"].as_array().unwrap().clone();
    let row = body["rows"][0].as_array().unwrap().clone();
    let field = |n: &str| {
        row[columns.iter().position(|c| c == n).unwrap()]
            .as_str()
            .unwrap()
            .to_string()
    };
    let (token_id, token) = (field("token_id"), field("token"));
    assert_eq!(field("tenant"), "shop");
    // sam's token sees sam's tenant only.
    let (status, body) = serve.http("GET", "/v1/users", Some(&token), None);
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["rows"], serde_json::json!([["sam", "shop", "owner"]]));
    let (status, body) = serve.http("GET", "/v1/tokens", Some(&token), None);
    assert_eq!(status, 200);
    assert_eq!(body["rows"][0][0], serde_json::json!(token_id), "{body}");
    // Only the administrator sets quotas or makes tenants; values are checked.
    let (status, body) = serve.http(
        "PUT",
        "/v1/quotas/shop",
        Some(&token),
        Some(serde_json::json!({"max_pipelines": 1})),
    );
    assert_eq!(status, 403, "{body}");
    let (status, body) = serve.http(
        "POST",
        "/v1/tenants",
        Some(&token),
        Some(serde_json::json!({"name": "x"})),
    );
    assert_eq!(status, 403, "{body}");
    let (status, body) = serve.http(
        "PUT",
        "/v1/quotas/shop",
        admin,
        Some(serde_json::json!({"max_state_bytes": "lots"})),
    );
    assert_eq!(status, 400, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("max_state_bytes"),
        "{body}"
    );
    let (status, body) = serve.http(
        "PUT",
        "/v1/quotas/shop",
        admin,
        Some(serde_json::json!({"max_pipelines": 1, "max_state_bytes": "64mb"})),
    );
    assert_eq!(status, 200, "{body}");
    let quotas = sam.rows("SHOW QUOTAS").unwrap();
    let limit = |name: &str| {
        quotas
            .iter()
            .find(|r| r[1] == name)
            .map(|r| r[2].clone())
            .unwrap()
    };
    assert_eq!(limit("max_pipelines"), "1");
    assert_eq!(limit("max_state_bytes"), (64u64 << 20).to_string());
    // A name that is not a name never reaches the SQL.
    let (status, body) = serve.http(
        "DELETE",
        "/v1/users/sam%3B%20DROP%20TENANT%20shop",
        admin,
        None,
    );
    assert_eq!(status, 400, "{body}");
    // Revoking the token over REST ends it.
    let (status, body) = serve.http("DELETE", &format!("/v1/tokens/{token_id}"), admin, None);
    assert_eq!(status, 200, "{body}");
    let (status, _) = serve.http("GET", "/v1/users", Some(&token), None);
    assert_eq!(status, 401);
    let (status, body) = serve.http("DELETE", "/v1/users/sam", admin, None);
    assert_eq!(status, 200, "{body}");
    assert!(serve.connect("sam", "it's-sam").is_err());
    let (status, body) = serve.http("DELETE", "/v1/tenants/shop", admin, None);
    assert_eq!(status, 200, "{body}");

    // The OpenAPI document names every route the server answers, and Swagger UI is served
    // from the binary.
    let (status, doc) = serve.http("GET", "/v1/openapi.json", None, None);
    assert_eq!(status, 200);
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."), "{doc}");
    let paths = doc["paths"].as_object().unwrap();
    for (path, method) in [
        ("/v1/sql", "post"),
        ("/v1/pipelines", "get"),
        ("/v1/pipelines", "post"),
        ("/v1/pipelines/{name}", "delete"),
        ("/v1/pipelines/{name}/{action}", "post"),
        ("/v1/pipelines/{name}/stats", "get"),
        ("/v1/pipelines/{name}/logs", "get"),
        ("/v1/views/{name}/rows", "get"),
        ("/v1/views/{name}/changes", "get"),
        ("/v1/tables", "get"),
        ("/v1/tenants", "post"),
        ("/v1/tenants/{name}", "delete"),
        ("/v1/users", "post"),
        ("/v1/tokens/{id}", "delete"),
        ("/v1/quotas/{tenant}", "put"),
        ("/metrics", "get"),
    ] {
        assert!(
            paths.get(path).and_then(|p| p.get(method)).is_some(),
            "{method} {path} is not documented"
        );
    }
    assert!(
        doc["components"]["securitySchemes"]["token"].is_object(),
        "{doc}"
    );
    let _ = rustls::crypto::ring::default_provider().install_default();
    let page = reqwest::blocking::get(format!("http://127.0.0.1:{}/v1/docs/", serve.http))
        .unwrap()
        .text()
        .unwrap();
    assert!(page.contains("swagger-ui"), "{page}");
    let script = reqwest::blocking::get(format!(
        "http://127.0.0.1:{}/v1/docs/swagger-ui-bundle.js",
        serve.http
    ))
    .unwrap();
    assert_eq!(script.status().as_u16(), 200);
    assert!(script.text().unwrap().len() > 100_000);
}

/// `k, n, total` per `id % m` over `ids`, as rows.
fn buckets_of(ids: impl Iterator<Item = i64>, m: i64) -> Vec<Vec<String>> {
    let mut answer: BTreeMap<i64, (i64, i64)> = BTreeMap::new();
    for id in ids {
        let e = answer.entry(id % m).or_default();
        e.0 += 1;
        e.1 += id;
    }
    answer
        .iter()
        .map(|(k, (c, s))| vec![k.to_string(), c.to_string(), s.to_string()])
        .collect()
}

#[test]
fn a_pipeline_edited_in_place_keeps_its_state_or_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let serve = Serve::start(dir.path());
    let admin = serve.admin();
    let input = serve.files("admin").join("incoming");
    std::fs::create_dir_all(&input).unwrap();
    write_ids(&input, "a.csv", 1..30_001);
    admin.exec(
        concat!(
        INCOMING_IDS!(),
        "
         CREATE MATERIALIZED VIEW buckets AS
           SELECT id % 11 AS k, COUNT(*) AS n, SUM(id) AS total FROM ids WHERE id > 0 GROUP BY id % 11"
    ),
    );
    let rows = |pg: &Pg| {
        pg.rows("SELECT k, n, total FROM buckets ORDER BY k")
            .unwrap_or_default()
    };
    let first = buckets_of(1..30_001, 11);
    wait_for(60, "the first file", || {
        (rows(&admin) == first, rows(&admin).len())
    });
    // A new filter fits the state: the counts so far stay, new rows pass the new filter.
    admin.exec(
        "ALTER PIPELINE buckets AS
           SELECT id % 11 AS k, COUNT(*) AS n, SUM(id) AS total FROM ids WHERE id % 3 <> 0 GROUP BY id % 11",
    );
    write_ids(&input, "b.csv", 30_001..60_001);
    let second = buckets_of(
        (1..30_001).chain((30_001..60_001).filter(|i| i % 3 != 0)),
        11,
    );
    wait_for(60, "the second file through the new filter", || {
        (rows(&admin) == second, rows(&admin).len())
    });
    let st = pipeline_status(&admin, "buckets");
    assert_eq!((st[2].as_str(), st[4].as_str()), ("running", "0"), "{st:?}");
    let (_, shown) = serve.http("GET", "/v1/pipelines/buckets", Some(ADMIN_TOKEN), None);
    assert!(
        shown["sql"].as_str().unwrap().contains("id % 3 <> 0"),
        "{shown}"
    );
    // Another aggregate does not fit the state: refused, and the pipeline runs on unchanged.
    let e = admin.fails(
        "ALTER PIPELINE buckets AS
           SELECT id % 11 AS k, COUNT(DISTINCT id) AS n, SUM(id) AS total FROM ids GROUP BY id % 11",
    );
    assert!(e.contains("checkpoint") && e.contains("FRESH"), "{e}");
    // Other columns do not fit the view.
    let e = admin.fails(
        "ALTER PIPELINE buckets AS SELECT id % 11 AS k, MAX(id) AS top FROM ids GROUP BY id % 11",
    );
    assert!(e.contains("columns") && e.contains("top BIGINT"), "{e}");
    // A plan error points into the new statements.
    let e = admin.fails("ALTER PIPELINE buckets AS SELECT id % 11 AS k, nosuch FROM ids");
    assert!(e.contains("nosuch"), "{e}");
    write_ids(&input, "c.csv", 60_001..70_001);
    let third = buckets_of(
        (1..30_001).chain((30_001..70_001).filter(|i| i % 3 != 0)),
        11,
    );
    wait_for(
        60,
        "the third file, still through the edited filter",
        || (rows(&admin) == third, rows(&admin).len()),
    );
    // FRESH (over REST) runs the new statements from the start, without the old state.
    let (status, body) = serve.http(
        "PATCH",
        "/v1/pipelines/buckets",
        Some(ADMIN_TOKEN),
        Some(serde_json::json!({
            "sql": "SELECT id % 11 AS k, COUNT(DISTINCT id) AS n, SUM(id) AS total FROM ids GROUP BY id % 11",
            "fresh": true
        })),
    );
    assert_eq!(status, 200, "{body}");
    let all = buckets_of(1..70_001, 11);
    wait_for(60, "every id again, counted by the new query", || {
        (rows(&admin) == all, rows(&admin).len())
    });
    let (status, body) = serve.http(
        "PATCH",
        "/v1/pipelines/nosuch",
        Some(ADMIN_TOKEN),
        Some(serde_json::json!({"sql": "SELECT 1"})),
    );
    assert_eq!(status, 404, "{body}");
}

#[test]
fn operator_watermarks_busy_time_and_checkpoints_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let serve = Serve::start(dir.path());
    let admin = serve.admin();
    // Event time runs 60 times faster than the wall clock: a one-minute window closes each second.
    // The watermark allows no delay, so the orders the generator delays (about 10%) are late.
    admin.exec(
        "CREATE TABLE orders (order_id BIGINT, amount DOUBLE, event_time TIMESTAMP(3),
           WATERMARK FOR event_time AS event_time)
           WITH ('connector' = 'ecommerce', 'rows-per-second' = '5000', 'speed-up' = '60',
                 'start-time' = '2026-11-11 00:00:00');
         CREATE MATERIALIZED VIEW per_minute AS
           SELECT window_end, COUNT(*) AS n
           FROM TABLE(TUMBLE(TABLE orders, DESCRIPTOR(event_time), INTERVAL '1' MINUTE))
           GROUP BY window_start, window_end",
    );
    let start_ms = chrono::NaiveDate::from_ymd_opt(2026, 11, 11)
        .unwrap()
        .and_hms_opt(0, 0, 0)
        .unwrap()
        .and_utc()
        .timestamp_millis();
    let stats = |_: ()| {
        let (st, body) = serve.http(
            "GET",
            "/v1/pipelines/per_minute/stats",
            Some(ADMIN_TOKEN),
            None,
        );
        assert_eq!(st, 200, "{body}");
        body["stats"].clone()
    };
    let stats = wait_for(60, "three checkpoints and a watermark per operator", || {
        let s = stats(());
        let ready = s["checkpoint_history"]
            .as_array()
            .is_some_and(|h| h.len() >= 3)
            && s["operator_watermarks"]
                .as_object()
                .is_some_and(|w| !w.is_empty());
        (ready, s)
    });
    // The windows the view shows were closed by the aggregation's watermark: none ends after it.
    let ends: Vec<String> = admin
        .rows("SELECT CAST(window_end AS VARCHAR) AS e FROM per_minute ORDER BY window_end")
        .unwrap()
        .into_iter()
        .map(|r| r[0].clone())
        .collect();
    let (op, wm) = stats["operator_watermarks"]
        .as_object()
        .unwrap()
        .iter()
        .find(|(op, _)| op.contains("on worker 0"))
        .map(|(op, w)| (op.clone(), w["watermark_ms"].as_i64().unwrap()))
        .expect("a stateful operator on worker 0");
    assert!(
        wm >= start_ms,
        "{op}: watermark {wm} before the first order {start_ms}"
    );
    for end in &ends {
        let end_ms = chrono::NaiveDateTime::parse_from_str(end, "%Y-%m-%dT%H:%M:%S")
            .or_else(|_| chrono::NaiveDateTime::parse_from_str(end, "%Y-%m-%d %H:%M:%S"))
            .unwrap_or_else(|e| panic!("{end}: {e}"))
            .and_utc()
            .timestamp_millis();
        assert!(
            end_ms <= wm,
            "window ending {end} shown, but {op}'s watermark is {wm}"
        );
    }
    assert!(
        stats["operator_watermarks"][&op]["lag_ms"]
            .as_i64()
            .unwrap()
            > 0
    );
    // The plan with the rows each operator produced so far (EXPLAIN ANALYZE, live).
    let plan = stats["plan"].as_str().unwrap();
    let counts: Vec<u64> = plan
        .split("rows=")
        .skip(1)
        .filter_map(|t| t.split_whitespace().next()?.parse().ok())
        .collect();
    assert!(counts.iter().any(|n| *n > 0), "{plan}");
    // ... and per second, since the stats before.
    assert!(plan.contains(" rows/s)"), "{plan}");
    // Late rows, counted where they were dropped.
    let late: u64 = stats["late_rows_by_operator"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert!(late > 0, "{stats}");
    // Busy time: every operator that ran has some; the aggregation is among them.
    let busy = stats["busy_ms"].as_object().unwrap();
    assert!(busy.values().any(|v| v.as_f64().unwrap() > 0.0), "{busy:?}");
    // Checkpoint history: committed in order, each with its size and timing.
    let history = stats["checkpoint_history"].as_array().unwrap();
    let epochs: Vec<u64> = history
        .iter()
        .map(|c| c["epoch"].as_u64().unwrap())
        .collect();
    assert!(epochs.windows(2).all(|w| w[0] < w[1]), "{epochs:?}");
    for c in history {
        assert!(
            c["bytes"].as_u64().unwrap() > 0 && c["files"].as_u64().unwrap() > 0,
            "{c}"
        );
        assert!(c["committed_at_ms"].as_i64().unwrap() > start_ms, "{c}");
    }
    // The same in Prometheus's format, labelled by operator.
    let text = serve.metrics(ADMIN_TOKEN);
    for series in [
        "sluice_operator_watermark_seconds{",
        "sluice_operator_watermark_lag_seconds{",
        "sluice_operator_busy_seconds_total{",
        "sluice_operator_late_rows_dropped_total{",
    ] {
        assert!(
            text.lines()
                .any(|l| l.starts_with(series) && l.contains("pipeline=\"per_minute\"")),
            "{series} missing:\n{text}"
        );
    }
}

/// A database of its own on the local PostgreSQL, dropped at the end.
struct PgDatabase {
    name: String,
}

impl PgDatabase {
    fn admin() -> Pg {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let (client, conn) = rt
            .block_on(tokio_postgres::connect(
                "host=127.0.0.1 port=5432 user=postgres dbname=postgres connect_timeout=30",
                tokio_postgres::NoTls,
            ))
            .expect("the local PostgreSQL (127.0.0.1:5432, trust)");
        rt.spawn(async move {
            let _ = conn.await;
        });
        Pg { rt, client }
    }

    fn create(prefix: &str) -> PgDatabase {
        let name = format!(
            "{prefix}_{}_{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
                % 1_000_000_000
        );
        PgDatabase::admin().exec(&format!("CREATE DATABASE {name}"));
        PgDatabase { name }
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:5432/{}", self.name)
    }
}

impl Drop for PgDatabase {
    fn drop(&mut self) {
        let _ = PgDatabase::admin().try_exec(&format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        ));
    }
}

#[test]
fn two_servers_share_a_postgres_catalog_and_take_over_each_others_pipelines() {
    let db = PgDatabase::create("sluice_catalog");
    let dir = tempfile::tempdir().unwrap();
    let url = db.url();
    let extra: Vec<std::ffi::OsString> = vec![
        "--catalog".into(),
        url.clone().into(),
        "--lease-seconds".into(),
        "2".into(),
    ];
    let extra: Vec<&std::ffi::OsStr> = extra.iter().map(|s| s.as_os_str()).collect();
    let a = Serve::start_with(dir.path(), free_port(), free_port(), &extra);
    let mut b = Serve::start_with(dir.path(), free_port(), free_port(), &extra);
    // The catalog is in PostgreSQL, not in the data folder.
    assert!(!dir.path().join("catalog.db").exists());
    a.admin()
        .exec("CREATE TENANT shop; CREATE USER ann WITH PASSWORD 'pw' IN TENANT shop ROLE owner");
    let on_a = a.connect("ann", "pw").expect("ann logs in on A");
    let on_b = b
        .connect("ann", "pw")
        .expect("ann logs in on B: the catalog is shared");
    let input = a.files("shop").join("incoming");
    std::fs::create_dir_all(&input).unwrap();
    write_ids(&input, "a.csv", 1..20_001);
    on_a.exec(concat!(
        INCOMING_IDS!(),
        "
         CREATE MATERIALIZED VIEW buckets AS
           SELECT id % 7 AS k, COUNT(*) AS n, SUM(id) AS total FROM ids GROUP BY id % 7"
    ));
    let rows = |pg: &Pg| {
        pg.rows("SELECT k, n, total FROM buckets ORDER BY k")
            .unwrap_or_default()
    };
    // Both servers serve the view, whichever runs its pipeline.
    let first = buckets_answer(20_000, 7);
    wait_for(60, "the view on A", || (rows(&on_a) == first, rows(&on_a)));
    wait_for(30, "the view on B", || (rows(&on_b) == first, rows(&on_b)));
    assert_eq!(
        on_b.rows("SHOW TABLES").unwrap(),
        on_a.rows("SHOW TABLES").unwrap()
    );
    let pid_on_a = pipeline_status(&on_a, "buckets")[6].clone();
    assert_ne!(pid_on_a, "NULL");
    // B cannot rescale what A runs; it can stop it: A takes the final checkpoint.
    let e = on_b.fails("ALTER PIPELINE buckets SET PARALLELISM = 2");
    assert!(e.contains("runs on server"), "{e}");
    on_b.exec("STOP PIPELINE buckets");
    assert_eq!(pipeline_status(&on_a, "buckets")[2], "stopped");
    write_ids(&input, "b.csv", 20_001..40_001);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(rows(&on_a), first, "a stopped pipeline reads nothing");
    // Started through B, it runs on B, from A's final checkpoint.
    on_b.exec("START PIPELINE buckets");
    let second = buckets_answer(40_000, 7);
    wait_for(60, "the second file, read on B", || {
        (rows(&on_b) == second, rows(&on_b))
    });
    wait_for(30, "the same on A", || (rows(&on_a) == second, rows(&on_a)));
    // A token made on one server works on the other.
    let token = on_a.rows("CREATE TOKEN").unwrap()[0][1].clone();
    let (status, body) = b.http("GET", "/v1/views/buckets/rows", Some(&token), None);
    assert_eq!(status, 200, "{body}");
    // B dies: its pipeline's process dies with it, and A takes the pipeline over once B's
    // lease has run out, resuming from the last checkpoint: nothing lost, nothing twice.
    b.kill();
    write_ids(&input, "c.csv", 40_001..60_001);
    let third = buckets_answer(60_000, 7);
    wait_for(90, "A takes over and reads the third file", || {
        (rows(&on_a) == third, rows(&on_a))
    });
    let st = pipeline_status(&on_a, "buckets");
    assert_eq!(st[2], "running", "{st:?}");
    assert_ne!(st[6], "NULL", "{st:?}");
    drop(b);
    drop(a);
}

#[test]
fn a_catalog_database_that_cannot_be_reached_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["serve", "--data-dir"])
        .arg(dir.path())
        .args([
            "--pg-port",
            &free_port().to_string(),
            "--http-port",
            &free_port().to_string(),
        ])
        .args([
            "--catalog",
            "postgres://postgres:secret@127.0.0.1:1/nowhere",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--catalog postgres://postgres@127.0.0.1:1/nowhere"),
        "{err}"
    );
    assert!(
        !err.contains("secret"),
        "the password is never shown: {err}"
    );
}

#[test]
fn a_tenants_ingest_rate_goes_to_the_pipelines_that_want_it() {
    let dir = tempfile::tempdir().unwrap();
    let serve = Serve::start(dir.path());
    serve.admin().exec(
        "CREATE TENANT feed; CREATE USER f WITH PASSWORD 'pw' IN TENANT feed ROLE owner;
         ALTER TENANT feed SET QUOTA (max_ingest_rows_per_second = 4000)",
    );
    let f = serve.connect("f", "pw").unwrap();
    // One pipeline reads 300 rows/s of its own accord, the other as fast as it may.
    for (name, rate) in [("slow", 300), ("busy", 100_000)] {
        f.exec(&format!(
            "CREATE TABLE ids_{name} (id BIGINT) WITH ('connector' = 'datagen', 'rows-per-second' = '{rate}',
               'fields.id.kind' = 'sequence', 'fields.id.start' = '1', 'fields.id.end' = '1000000000');
             CREATE MATERIALIZED VIEW count_{name} AS SELECT COUNT(*) AS n FROM ids_{name}"
        ));
    }
    let token = f.rows("CREATE TOKEN").unwrap()[0][1].clone();
    let limit = |name: &str| {
        let (_, body) = serve.http(
            "GET",
            &format!("/v1/pipelines/count_{name}/stats"),
            Some(&token),
            None,
        );
        body["stats"]["ingest_limit"].as_u64()
    };
    // Even shares would be 2000 each; the busy one gets what the slow one leaves.
    let (slow, busy) = wait_for(
        30,
        "the busy pipeline gets the slow one's unused share",
        || {
            let (slow, busy) = (limit("slow"), limit("busy"));
            let ok =
                matches!((slow, busy), (Some(s), Some(b)) if b > 3000 && s >= 300 && s + b <= 4000);
            (ok, (slow, busy))
        },
    );
    assert!(slow.unwrap() < 1000, "{slow:?} {busy:?}");
}

#[test]
fn a_checkpoint_on_demand_commits_at_once_and_a_restart_resumes_from_it() {
    let dir = tempfile::tempdir().unwrap();
    let serve = Serve::start(dir.path());
    let admin = serve.admin();
    let input = serve.files("admin").join("incoming");
    std::fs::create_dir_all(&input).unwrap();
    // Checkpoints an hour apart: the view shows only what a checkpoint committed.
    admin.exec(
        "SET 'execution.checkpointing.interval' = '1 h';
         CREATE TABLE ids (id BIGINT) WITH ('connector' = 'filesystem', 'path' = 'incoming',
           'format' = 'csv', 'source.monitor-interval' = '200 ms');
         CREATE MATERIALIZED VIEW buckets AS
           SELECT id % 7 AS k, COUNT(*) AS n, SUM(id) AS total FROM ids GROUP BY id % 7",
    );
    let rows = |pg: &Pg| {
        pg.rows("SELECT k, n, total FROM buckets ORDER BY k")
            .unwrap_or_default()
    };
    let read = || {
        let (_, body) = serve.http(
            "GET",
            "/v1/pipelines/buckets/stats",
            Some(ADMIN_TOKEN),
            None,
        );
        body["stats"]["rows_read"]["ids"].as_u64().unwrap_or(0)
    };
    // The first checkpoint comes at the start; the file arrives after it.
    wait_for(60, "running", || {
        let st = pipeline_status(&admin, "buckets");
        (st[2] == "running", st)
    });
    std::thread::sleep(Duration::from_millis(1000));
    write_ids(&input, "a.csv", 1..10_001);
    wait_for(60, "the first file read", || (read() == 10_000, read()));
    std::thread::sleep(Duration::from_millis(1500));
    assert_ne!(
        rows(&admin),
        buckets_answer(10_000, 7),
        "no checkpoint yet, so the view is behind"
    );
    // Over the wire: it returns once the checkpoint committed, and the view shows it.
    let first = admin.rows("CHECKPOINT PIPELINE buckets").unwrap();
    let epoch1: u64 = first[0][0].parse().unwrap();
    assert!(first[0][1].parse::<u64>().unwrap() > 0, "{first:?}");
    wait_for(10, "the view as of the asked-for checkpoint", || {
        (rows(&admin) == buckets_answer(10_000, 7), rows(&admin))
    });
    // Over REST, after more input.
    write_ids(&input, "b.csv", 10_001..20_001);
    wait_for(60, "the second file read", || (read() == 20_000, read()));
    let (status, body) = serve.http(
        "POST",
        "/v1/pipelines/buckets/checkpoint",
        Some(ADMIN_TOKEN),
        None,
    );
    assert_eq!(status, 200, "{body}");
    let epoch2: u64 = body["rows"][0][0].as_str().unwrap().parse().unwrap();
    assert!(epoch2 > epoch1, "{epoch1} then {epoch2}");
    wait_for(10, "the view with the second file", || {
        (rows(&admin) == buckets_answer(20_000, 7), rows(&admin))
    });
    // A killed process resumes from the asked-for checkpoint, not from the start.
    let pid: i32 = pipeline_status(&admin, "buckets")[6].parse().unwrap();
    unsafe { libc::kill(pid, libc::SIGKILL) };
    wait_for(60, "restarted", || {
        let st = pipeline_status(&admin, "buckets");
        (
            st[2] == "running" && st[6] != pid.to_string() && st[6] != "NULL",
            st,
        )
    });
    wait_for(
        30,
        "the restart resumes from the asked-for checkpoint",
        || {
            let (_, logs) =
                serve.http("GET", "/v1/pipelines/buckets/logs", Some(ADMIN_TOKEN), None);
            let logs = logs["lines"].to_string();
            (
                logs.contains(&format!("resuming from checkpoint {epoch2} ")),
                logs,
            )
        },
    );
    write_ids(&input, "c.csv", 20_001..30_001);
    wait_for(60, "the third file read", || (read() >= 10_000, read()));
    admin.exec("CHECKPOINT PIPELINE buckets");
    wait_for(10, "exact after the restart", || {
        (rows(&admin) == buckets_answer(30_000, 7), rows(&admin))
    });
    // A pipeline that is not running has nothing to checkpoint.
    admin.exec("STOP PIPELINE buckets");
    let e = admin.fails("CHECKPOINT PIPELINE buckets");
    assert!(e.contains("START PIPELINE buckets"), "{e}");
}

#[test]
fn secrets_never_come_back_in_answers_errors_or_logs() {
    let dir = tempfile::tempdir().unwrap();
    let serve = Serve::start(dir.path());
    let admin = serve.admin();
    let secret = "Sup3r-Secret-pw";
    let queue = format!("sluice_secret_{}", std::process::id());
    // A statement whose error would quote the secret (before any table holds it).
    let e = admin.fails(&format!(
        "CREATE TABLE rq2 (id BIGINT) WITH ('connector' = 'rabbitmq', 'password' '{secret}')"
    ));
    assert!(e.contains("******"), "{e}");
    // The broker refuses the password: the pipeline fails, and its errors name the login.
    admin.exec(&format!(
        "SET 'restart-strategy.type' = 'none';
         CREATE TABLE rq (id BIGINT) WITH ('connector' = 'rabbitmq', 'host' = '127.0.0.1',
           'username' = 'guest', 'password' = '{secret}', 'queue' = '{queue}', 'format' = 'json');
         CREATE MATERIALIZED VIEW rq_count AS SELECT COUNT(*) AS n FROM rq"
    ));
    let status = wait_for(60, "the pipeline fails to log in", || {
        let st = pipeline_status(&admin, "rq_count");
        (st[2] == "failed", st)
    });
    assert!(!status[7].is_empty(), "{status:?}");
    let mut seen = vec![format!("SHOW PIPELINES: {status:?}")];
    for path in [
        "/v1/tables",
        "/v1/pipelines",
        "/v1/pipelines/rq_count",
        "/v1/pipelines/rq_count/logs",
    ] {
        let (st, body) = serve.http("GET", path, Some(ADMIN_TOKEN), None);
        assert_eq!(st, 200, "{path}: {body}");
        seen.push(format!("{path}: {body}"));
    }
    let (_, tables) = serve.http("GET", "/v1/tables", Some(ADMIN_TOKEN), None);
    assert!(
        tables.to_string().contains("'password' = '******'"),
        "{tables}"
    );
    seen.push(format!("error: {e}"));
    let (_, body) = serve.http(
        "POST",
        "/v1/sql",
        Some(ADMIN_TOKEN),
        Some(serde_json::json!({ "sql": format!("EXPLAIN SELECT * FROM rq WHERE id > 0") })),
    );
    seen.push(format!("EXPLAIN: {body}"));
    // The pipeline's log file on disk, as its process wrote it.
    let log = std::fs::read_to_string(dir.path().join("tenants/admin/pipelines/rq_count/log"))
        .unwrap_or_default();
    assert!(!log.is_empty(), "the process wrote a log");
    seen.push(format!("log file: {log}"));
    for text in seen {
        assert!(!text.contains(secret), "the secret shows in {text}");
    }
}

#[test]
fn connections_hold_shared_options_and_secrets_for_one_tenant() {
    let dir = tempfile::tempdir().unwrap();
    let serve = Serve::start(dir.path());
    let admin = serve.admin();
    admin.exec(
        "CREATE TENANT shop; CREATE USER ann WITH PASSWORD 'pw' IN TENANT shop ROLE owner;
         CREATE TENANT other; CREATE USER oz WITH PASSWORD 'pw' IN TENANT other ROLE owner",
    );
    let ann = serve.connect("ann", "pw").unwrap();
    let input = serve.files("shop").join("incoming");
    std::fs::create_dir_all(&input).unwrap();
    write_ids(&input, "a.csv", 1..5_001);
    // The table takes the connection's options; its own come first.
    ann.exec(
        "CREATE CONNECTION files WITH ('connector' = 'filesystem', 'format' = 'json', 'path' = 'elsewhere');
         CREATE CONNECTION rabbit WITH ('connector' = 'rabbitmq', 'host' = '127.0.0.1',
           'username' = 'guest', 'password' = 'Rabbit-Secret-9');
         CREATE TABLE ids (id BIGINT) WITH ('connection' = 'files', 'path' = 'incoming', 'format' = 'csv');
         CREATE MATERIALIZED VIEW buckets AS
           SELECT id % 7 AS k, COUNT(*) AS n, SUM(id) AS total FROM ids GROUP BY id % 7",
    );
    wait_finished(
        &ann,
        60,
        "buckets",
        "SELECT k, n, total FROM buckets ORDER BY k",
        &buckets_answer(5_000, 7),
    );
    // Listed with their secrets masked, and not as relations.
    let shown = ann.rows("SHOW CONNECTIONS").unwrap();
    assert_eq!(shown.len(), 2, "{shown:?}");
    let rabbit = shown.iter().find(|r| r[0] == "rabbit").unwrap();
    assert!(
        rabbit[1].contains("'password' = '******'") && !rabbit[1].contains("Rabbit-Secret-9"),
        "{rabbit:?}"
    );
    assert!(ann
        .rows("SHOW TABLES")
        .unwrap()
        .iter()
        .all(|r| r[0] != "files"));
    // Another tenant cannot use them, nor see them.
    let oz = serve.connect("oz", "pw").unwrap();
    let e = oz.fails(
        "CREATE TABLE stolen (id BIGINT) WITH ('connection' = 'rabbit', 'queue' = 'q', 'format' = 'json')",
    );
    assert!(
        e.starts_with("42704") && e.contains("connection 'rabbit' does not exist"),
        "{e}"
    );
    assert!(oz.rows("SHOW CONNECTIONS").unwrap().is_empty());
    // A connection in use is not dropped; an unused one is.
    let e = ann.fails("DROP CONNECTION files");
    assert!(e.contains("used by ids"), "{e}");
    ann.exec("DROP CONNECTION rabbit");
    assert_eq!(ann.rows("SHOW CONNECTIONS").unwrap().len(), 1);
    // A connection may not name another, and needs options.
    assert!(ann
        .fails("CREATE CONNECTION c2 WITH ('connection' = 'files')")
        .contains("another connection"));
}
