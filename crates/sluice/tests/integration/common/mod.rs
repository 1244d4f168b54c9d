//! Helpers shared by the integration tests.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The published rows of a filesystem sink folder, as JSON text with multiplicities: JSON lines
/// count once each; Debezium changes are folded (`before` retracts, `after` adds). `normalize`
/// may adjust a row first (for example, round float sums). A hidden, unpublished file left
/// behind after a successful run is an error.
#[allow(dead_code)]
pub fn committed_rows(
    dir: &Path,
    normalize: impl Fn(&mut serde_json::Value),
) -> BTreeMap<String, i64> {
    published_rows(dir, normalize, false)
}

/// As [`committed_rows`], while the job still runs: the files published so far (the hidden
/// ones in progress are not read).
#[allow(dead_code)]
pub fn committed_rows_so_far(dir: &Path) -> BTreeMap<String, i64> {
    published_rows(dir, |_| {}, true)
}

fn published_rows(
    dir: &Path,
    normalize: impl Fn(&mut serde_json::Value),
    running: bool,
) -> BTreeMap<String, i64> {
    let mut rows = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return rows;
    };
    for entry in entries {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        if running && name.starts_with('.') {
            continue;
        }
        assert!(
            !name.starts_with('.'),
            "unpublished file left behind: {name}"
        );
        for line in std::fs::read_to_string(&path).unwrap().lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            let mut apply = |row: &serde_json::Value, sign: i64| {
                let mut row = row.clone();
                normalize(&mut row);
                *rows.entry(row.to_string()).or_insert(0) += sign;
            };
            if v.get("op").is_some() {
                if !v["before"].is_null() {
                    apply(&v["before"], -1);
                }
                if !v["after"].is_null() {
                    apply(&v["after"], 1);
                }
            } else {
                apply(&v, 1);
            }
        }
    }
    rows.retain(|_, n| *n != 0);
    rows
}

/// A batch's rows as text, floats at 12 significant digits: float sums depend on addition order
/// (and on retractions in sliding frames), while the exact values in these tests (cents,
/// averaged over at most a few dozen rows) need no more, so rounding never meets a tie that
/// float error could tip either way.
#[allow(dead_code)]
pub fn render(batch: &arrow::record_batch::RecordBatch) -> Vec<Vec<String>> {
    let mut out = sluice_connectors::memory::row_strings(batch).unwrap();
    for (c, f) in batch.schema().fields().iter().enumerate() {
        if matches!(
            f.data_type(),
            arrow::datatypes::DataType::Float64 | arrow::datatypes::DataType::Float32
        ) {
            for row in out.iter_mut() {
                if let Ok(v) = row[c].parse::<f64>() {
                    row[c] = format!("{v:.11e}");
                }
            }
        }
    }
    out
}

/// A free TCP port on 127.0.0.1.
#[allow(dead_code)]
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// An S3-compatible server on a free loopback port with one empty bucket, stopped on drop. It
/// is moto's server, which `bash .ci/run` installs (`SLUICE_MOTO_SERVER`, or the default
/// venv under `~/.cache/sluice-tools`).
#[allow(dead_code)]
pub struct S3Server {
    child: std::process::Child,
    pub endpoint: String,
}

#[allow(dead_code)]
impl S3Server {
    pub fn start(bucket: &str) -> S3Server {
        use std::io::{Read, Write};
        let server = std::env::var("SLUICE_MOTO_SERVER").unwrap_or_else(|_| {
            format!(
                "{}/.cache/sluice-tools/venv/bin/moto_server",
                std::env::var("HOME").unwrap_or_default()
            )
        });
        assert!(
            Path::new(&server).exists(),
            "no S3 test server at {server}: `bash .ci/run` installs it (moto[server])"
        );
        let port = free_port();
        let child = std::process::Command::new(&server)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let s3 = S3Server {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
        };
        // Create the bucket (moto takes unsigned requests), retrying while the server starts.
        let started = std::time::Instant::now();
        loop {
            let status = std::net::TcpStream::connect(("127.0.0.1", port)).and_then(|mut c| {
                write!(
                    c,
                    "PUT /{bucket} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                )?;
                let mut reply = String::new();
                c.read_to_string(&mut reply)?;
                Ok(reply.lines().next().unwrap_or_default().to_string())
            });
            match status {
                Ok(line) if line.contains(" 200") => return s3,
                Ok(line) => panic!("creating bucket {bucket}: {line}"),
                Err(e) if started.elapsed().as_secs() > 30 => {
                    panic!("the S3 test server did not start: {e}")
                }
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(100)),
            }
        }
    }

    /// `SET` statements pointing checkpoint storage at this server.
    pub fn settings(&self) -> String {
        format!(
            "SET 's3.endpoint' = '{}';
             SET 's3.access-key' = 'test';
             SET 's3.secret-key' = 'test';
             SET 's3.region' = 'us-east-1';
             SET 's3.path.style.access' = 'true';\n",
            self.endpoint
        )
    }

    /// One plain HTTP/1.0 request to the server (moto takes unsigned ones): the status line and
    /// the body of the reply.
    fn request(&self, method: &str, path: &str, body: &[u8]) -> (String, Vec<u8>) {
        use std::io::{Read, Write};
        let host = self.endpoint.trim_start_matches("http://");
        let mut c = std::net::TcpStream::connect(host).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        write!(
            c,
            "{method} {path} HTTP/1.0\r\nHost: {host}\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .unwrap();
        c.write_all(body).unwrap();
        let mut reply = vec![];
        c.read_to_end(&mut reply).unwrap();
        let split = reply
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("an HTTP reply");
        let head = String::from_utf8_lossy(&reply[..split]).into_owned();
        let status = head.lines().next().unwrap_or_default().to_string();
        (status, reply[split + 4..].to_vec())
    }

    /// Puts an object.
    pub fn put(&self, bucket: &str, key: &str, body: &[u8]) {
        let (status, reply) = self.request("PUT", &format!("/{bucket}/{key}"), body);
        assert!(
            status.contains(" 200"),
            "PUT {key}: {status} {}",
            String::from_utf8_lossy(&reply)
        );
    }

    /// Every key in a bucket under `prefix`, sorted.
    pub fn keys(&self, bucket: &str, prefix: &str) -> Vec<String> {
        let mut keys = vec![];
        let mut token = String::new();
        loop {
            let (status, body) = self.request(
                "GET",
                &format!("/{bucket}?list-type=2&prefix={prefix}{token}"),
                b"",
            );
            assert!(status.contains(" 200"), "listing {bucket}: {status}");
            let text = String::from_utf8(body).unwrap();
            let tag = |name: &str| -> Vec<String> {
                let (open, close) = (format!("<{name}>"), format!("</{name}>"));
                text.split(&open)
                    .skip(1)
                    .filter_map(|rest| rest.split(&close).next())
                    .map(str::to_string)
                    .collect()
            };
            keys.extend(tag("Key"));
            match tag("NextContinuationToken").first() {
                Some(next) => {
                    let next = next
                        .replace('+', "%2B")
                        .replace('/', "%2F")
                        .replace('=', "%3D");
                    token = format!("&continuation-token={next}")
                }
                None => break,
            }
        }
        keys.sort();
        keys
    }

    /// The same settings as options of a checkpoint store.
    pub fn options(&self) -> BTreeMap<String, String> {
        [
            ("s3.endpoint", self.endpoint.as_str()),
            ("s3.access-key", "test"),
            ("s3.secret-key", "test"),
            ("s3.region", "us-east-1"),
            ("s3.path.style.access", "true"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Renders rows as the tests compare them: as `row_strings` does, with floats rounded (see
/// [`render`]) when `round` is set.
fn rows_of(batch: &arrow::record_batch::RecordBatch, round: bool) -> Vec<Vec<String>> {
    if round {
        render(batch)
    } else {
        sluice_connectors::memory::row_strings(batch).unwrap()
    }
}

/// One change a job's SELECT emitted: when it arrived, its kind and its row as text.
#[allow(dead_code)]
#[derive(Clone, Debug)]
pub struct Change {
    pub at: std::time::Instant,
    pub op: sluice_common::Op,
    pub row: Vec<String>,
}

/// The shared changelog collector: every change of each SELECT of a job (by its index), in
/// arrival order.
#[allow(dead_code)]
#[derive(Default)]
pub struct Changelog(std::sync::Mutex<BTreeMap<usize, Vec<Change>>>);

#[allow(dead_code)]
impl Changelog {
    /// The changes of SELECT `query` so far.
    pub fn changes(&self, query: usize) -> Vec<Change> {
        self.0
            .lock()
            .unwrap()
            .get(&query)
            .cloned()
            .unwrap_or_default()
    }

    /// The rows of SELECT `query` so far, without their change kinds.
    pub fn rows(&self, query: usize) -> Vec<Vec<String>> {
        self.changes(query).into_iter().map(|c| c.row).collect()
    }
}

impl sluice_engine::SelectOutput for Changelog {
    fn begin(&self, _index: usize, _schema: arrow::datatypes::SchemaRef) {}
    fn emit(&self, index: usize, batch: &sluice_common::ChangeBatch) {
        let at = std::time::Instant::now();
        let rows = rows_of(&batch.data, false);
        let mut all = self.0.lock().unwrap();
        let log = all.entry(index).or_default();
        for (i, row) in rows.into_iter().enumerate() {
            log.push(Change {
                at,
                op: batch.op(i),
                row,
            });
        }
    }
}

/// Folds each SELECT's changelog into a multiset of rendered rows as it arrives (nothing else
/// is kept, so a large output costs only its final size). `Folded::rounded()` rounds floats
/// (see [`render`]) for comparing with a batch answer.
#[allow(dead_code)]
#[derive(Default)]
pub struct Folded {
    round: bool,
    rows: std::sync::Mutex<BTreeMap<usize, BTreeMap<Vec<String>, i64>>>,
}

#[allow(dead_code)]
impl Folded {
    pub fn rounded() -> Self {
        Folded {
            round: true,
            ..Default::default()
        }
    }

    /// SELECT `query`'s rows with their net count (rows whose changes cancel out are gone).
    pub fn take(&self, query: usize) -> BTreeMap<Vec<String>, i64> {
        self.rows.lock().unwrap().remove(&query).unwrap_or_default()
    }
}

impl sluice_engine::SelectOutput for Folded {
    fn begin(&self, _index: usize, _schema: arrow::datatypes::SchemaRef) {}
    fn emit(&self, index: usize, batch: &sluice_common::ChangeBatch) {
        let rows = rows_of(&batch.data, self.round);
        let mut all = self.rows.lock().unwrap();
        let folded = all.entry(index).or_default();
        for (i, row) in rows.into_iter().enumerate() {
            // Rows whose changes cancel out leave no trace.
            match folded.entry(row) {
                std::collections::btree_map::Entry::Occupied(mut e) => {
                    *e.get_mut() += batch.op(i).sign();
                    if *e.get() == 0 {
                        e.remove();
                    }
                }
                std::collections::btree_map::Entry::Vacant(e) => {
                    e.insert(batch.op(i).sign());
                }
            }
        }
    }
}

/// The shared run-a-job helper: runs `plan` in this process with `options`, its SELECTs into
/// `output`, and fails after `limit` (a hang fails the test instead of the CI run).
#[allow(dead_code)]
pub fn run_job(
    plan: sluice_sql::JobPlan,
    options: sluice_engine::JobOptions,
    output: std::sync::Arc<dyn sluice_engine::SelectOutput>,
    limit: std::time::Duration,
) -> Result<sluice_engine::JobSummary, String> {
    let options = sluice_engine::JobOptions {
        select_output: Some(output),
        ..options
    };
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(sluice_engine::run(plan, options).map_err(|e| e.to_string()));
    });
    match rx.recv_timeout(limit) {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) => Err(format!("the job failed: {e}")),
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
            Err("the job panicked (its message is above)".into())
        }
        Err(_) => Err(format!("the job did not finish within {limit:?}")),
    }
}

/// Runs a job with `workers` workers and its first SELECT's changelog folded (floats rounded).
#[allow(dead_code)]
pub fn run_folded(
    plan: sluice_sql::JobPlan,
    workers: usize,
    limit: std::time::Duration,
) -> Result<(sluice_engine::JobSummary, BTreeMap<Vec<String>, i64>), String> {
    let folded = std::sync::Arc::new(Folded::rounded());
    let options = sluice_engine::JobOptions {
        workers,
        ..Default::default()
    };
    let summary = run_job(plan, options, folded.clone(), limit)?;
    Ok((summary, folded.take(0)))
}

/// The output of `cmd`, which must end within `limit` (else it is killed and the test fails).
#[allow(dead_code)]
pub fn output_within(
    mut cmd: std::process::Command,
    limit: std::time::Duration,
) -> std::process::Output {
    use std::io::Read;
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut pipes = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let out = std::thread::spawn(move || {
        let mut v = vec![];
        pipes.0.read_to_end(&mut v).unwrap();
        v
    });
    let err = std::thread::spawn(move || {
        let mut v = vec![];
        pipes.1.read_to_end(&mut v).unwrap();
        v
    });
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > limit {
            child.kill().unwrap();
            let _ = child.wait();
            panic!(
                "{cmd:?} did not end within {limit:?}: {}",
                String::from_utf8_lossy(&err.join().unwrap())
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    std::process::Output {
        status,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    }
}

#[allow(dead_code)]
/// Runs `sluice run` on `script` with `workers` workers; fails the test after `limit`.
pub fn run_cli(dir: &Path, script: &str, workers: usize, limit: Duration) -> (bool, String) {
    let file = dir.join("job.sql");
    std::fs::write(&file, script).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sluice"));
    cmd.args(["run", "--workers", &workers.to_string()])
        .arg(&file);
    let o = output_within(cmd, limit);
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[allow(dead_code)]
/// The committed checkpoints under `dir` (their manifests).
pub fn manifests(dir: &Path) -> std::collections::BTreeSet<std::path::PathBuf> {
    let mut found = std::collections::BTreeSet::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let path = e.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.file_name().is_some_and(|n| n == "_manifest") {
                found.insert(path);
            }
        }
    }
    found
}

#[allow(dead_code)]
/// Runs `sluice run` on `file` with `workers` workers three times, killing each run with SIGKILL
/// soon after it commits a checkpoint of its own (at a random moment within a tenth of `took`,
/// the milliseconds an uninterrupted run takes), so that it leaves progress behind but the last
/// run still has work to do. Returns how many runs were killed.
pub fn kill_runs(dir: &Path, file: &Path, workers: usize, took: u64) -> usize {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::SmallRng::seed_from_u64(11);
    let mut kills = 0;
    for _ in 0..3 {
        let mut child = Command::new(env!("CARGO_BIN_EXE_sluice"))
            .args(["run", "--workers", &workers.to_string()])
            .arg(file)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let before = manifests(&dir.join("checkpoints"));
        let started = Instant::now();
        while manifests(&dir.join("checkpoints")) == before
            && started.elapsed().as_millis() < took as u128
            && child.try_wait().unwrap().is_none()
        {
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(rng.random_range(0..took / 10 + 1)));
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap();
            kills += 1;
        }
        child.wait().unwrap();
    }
    kills
}
