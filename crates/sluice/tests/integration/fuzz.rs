//! Fuzzing on stable Rust: the SQL front end (the whole `plan_script` path) and the file
//! decoders (JSON lines, CSV, with and without their ignore-parse-errors options) get mutated
//! input, seeded from the `.slt` suites and the bad-input reproductions. Every input must end in
//! a result or an error: never a panic, a hang, or a runaway allocation.
//!
//! Each target runs for a bounded time: `SLUICE_FUZZ_SECONDS` (default 15 per target in CI) and
//! `SLUICE_FUZZ_SEED` (default: fixed in CI; a nightly run can pass the date).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::datatypes::{DataType, Field, Schema, TimeUnit};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use sluice_connectors::{open_source, ConnectorSpec, Poll};

fn budget() -> Duration {
    Duration::from_secs(
        std::env::var("SLUICE_FUZZ_SECONDS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(15),
    )
}

fn seed() -> u64 {
    std::env::var("SLUICE_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20261206)
}

/// Runs `f` on its own thread; fails the test with `what` if it panics or takes over `limit`.
fn guarded<T: Send + 'static>(
    what: &str,
    limit: Duration,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .stack_size(8 << 20)
        .spawn(move || {
            let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
            let _ = tx.send(out);
        })
        .unwrap();
    match rx.recv_timeout(limit) {
        Ok(Ok(v)) => v,
        Ok(Err(_)) => panic!("panicked on input:\n{what}"),
        Err(_) => panic!("no answer within {limit:?} on input:\n{what}"),
    }
}

/// The scripts of the `.slt` suites (their statements, in order) and the reproductions.
fn corpus() -> Vec<String> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/slt");
    let mut scripts = vec![];
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    files.sort();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        let mut statements = vec![];
        let mut current: Option<Vec<&str>> = None;
        for line in text.lines() {
            if line.starts_with("statement") || line.starts_with("query") {
                current = Some(vec![]);
            } else if line.trim().is_empty() || line.starts_with("----") {
                if let Some(s) = current.take() {
                    if !s.is_empty() {
                        statements.push(s.join("\n"));
                    }
                }
            } else if let Some(s) = current.as_mut() {
                s.push(line);
            }
        }
        if let Some(s) = current.take() {
            statements.push(s.join("\n"));
        }
        scripts.push(
            statements
                .join(";\n")
                .replace("${DIR}", "/nonexistent/fuzz"),
        );
    }
    let repro =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/repro/bad-input");
    if let Ok(entries) = std::fs::read_dir(repro) {
        let mut sql: Vec<_> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "sql"))
            .collect();
        sql.sort();
        for p in sql {
            // The reproductions of runaway plans are kept short: their point is their shape.
            let text = std::fs::read_to_string(p).unwrap_or_default();
            if text.len() < 20_000 {
                scripts.push(text);
            }
        }
    }
    assert!(scripts.len() >= 8, "the corpus is there");
    scripts
}

/// Words to splice in: SQL's awkward corners.
const SPLICE: &[&str] = &[
    "(",
    ")",
    ",",
    ";",
    "'",
    "\"",
    "`",
    "*",
    "NULL",
    "-",
    "+",
    "/",
    "%",
    "||",
    "=",
    "<>",
    "AND",
    "OR",
    "NOT",
    "SELECT",
    "FROM",
    "WHERE",
    "GROUP BY",
    "HAVING",
    "OVER (",
    "PARTITION BY",
    "ORDER BY",
    "JOIN",
    "ON",
    "TABLE(",
    "TUMBLE(",
    "HOP(",
    "SESSION(",
    "CUMULATE(",
    "DESCRIPTOR(",
    "INTERVAL '1' SECOND",
    "INTERVAL '-1' DAY",
    "INTERVAL '0' SECOND",
    "CAST(",
    "AS",
    "BIGINT",
    "DECIMAL(38, 38)",
    "DECIMAL(99, 2)",
    "TIMESTAMP(9)",
    "TIMESTAMP(3)",
    "ARRAY[",
    "MAP[",
    "ROW(",
    "9223372036854775807",
    "-9223372036854775808",
    "99999999999999999999999999",
    "1e308",
    "'\u{0}'",
    "'😀'",
    "/*+ OPTIONS('a'='b') */",
    "--",
    "/*",
    "*/",
    "FOR SYSTEM_TIME AS OF",
    "PROCTIME()",
    "WATERMARK FOR",
    "PRIMARY KEY",
    "NOT ENFORCED",
    "WITH (",
    "'connector' = 'datagen'",
    "'connector' = 'filesystem'",
    "'format' = 'csv'",
    "SET",
    "VALUES (1)",
    "ROW_NUMBER()",
    "COUNT(DISTINCT",
    "FILTER (WHERE",
    "CASE WHEN",
    "END",
    "IN (",
    "LIKE",
    "ESCAPE",
    "REGEXP_EXTRACT(",
    "DATE_FORMAT(",
    "SUBSTRING(",
    "UNION ALL",
    "LIMIT",
    "MATCH_RECOGNIZE (",
];

fn mutate(rng: &mut SmallRng, script: &str) -> String {
    // Tokens: runs of word characters, and single other characters (whitespace kept).
    let mut tokens: Vec<String> = vec![];
    let mut word = String::new();
    for c in script.chars() {
        if c.is_alphanumeric() || c == '_' {
            word.push(c);
        } else {
            if !word.is_empty() {
                tokens.push(std::mem::take(&mut word));
            }
            tokens.push(c.to_string());
        }
    }
    if !word.is_empty() {
        tokens.push(word);
    }
    if tokens.is_empty() {
        tokens.push(String::new());
    }
    for _ in 0..rng.random_range(1..=4) {
        let at = rng.random_range(0..tokens.len());
        match rng.random_range(0..7) {
            0 => {
                tokens.remove(at);
                if tokens.is_empty() {
                    tokens.push(String::new());
                }
            }
            1 => {
                let t = tokens[at].clone();
                tokens.insert(at, t);
            }
            2 => tokens[at] = SPLICE[rng.random_range(0..SPLICE.len())].to_string(),
            3 => tokens.insert(
                at,
                format!(" {} ", SPLICE[rng.random_range(0..SPLICE.len())]),
            ),
            4 => {
                let other = tokens[rng.random_range(0..tokens.len())].clone();
                tokens[at] = other;
            }
            5 => tokens.truncate(at.max(1)),
            _ => {
                // Deep or long: parentheses or a long chain.
                let n = rng.random_range(1..2_000);
                let deep = if rng.random_bool(0.5) {
                    format!("{}1{}", "(".repeat(n), ")".repeat(n))
                } else {
                    vec!["1"; n].join(" + ")
                };
                tokens.insert(at, deep);
            }
        }
    }
    tokens.concat()
}

/// Mutated scripts through the whole planner: a plan or an error, never a panic or a hang.
#[test]
fn the_planner_survives_mutated_scripts() {
    let corpus = corpus();
    let mut rng = SmallRng::seed_from_u64(seed());
    let started = Instant::now();
    let mut runs = 0;
    let mut planned = 0;
    while started.elapsed() < budget() || runs < corpus.len() {
        let base = &corpus[runs % corpus.len()];
        let script = if runs < corpus.len() {
            base.clone()
        } else {
            mutate(&mut rng, base)
        };
        let shown = if script.len() > 4_000 {
            format!(
                "{}... ({} bytes)",
                &script[..script.floor_char_boundary(4_000)],
                script.len()
            )
        } else {
            script.clone()
        };
        let ok = guarded(&shown, Duration::from_secs(20), move || {
            sluice_sql::plan_script(&script).is_ok()
        });
        planned += usize::from(ok);
        runs += 1;
    }
    assert!(runs > corpus.len(), "{runs} scripts");
    eprintln!("{runs} scripts planned or refused ({planned} planned)");
}

fn json_record(rng: &mut SmallRng) -> String {
    let id = rng.random_range(-5..1_000_000i64);
    let s = ["\"a\"", "\"\"", "null", "\"x,y\"", "\"\\u00e9\\n\"", "17"][rng.random_range(0..6)];
    let d = ["1.5", "-0", "1e400", "null", "\"2\"", "NaN"][rng.random_range(0..6)];
    let ts = [
        "\"2026-11-11 00:00:01.000\"",
        "\"2026-11-11T00:00:01\"",
        "\"not a time\"",
        "null",
        "1794355200000",
    ][rng.random_range(0..5)];
    format!("{{\"id\": {id}, \"s\": {s}, \"d\": {d}, \"ts\": {ts}}}")
}

fn csv_record(rng: &mut SmallRng) -> String {
    let id = rng.random_range(-5..1_000_000i64);
    let s = ["a", "", "\"x,y\"", "\"two\nlines\"", "\"q\"\"q\""][rng.random_range(0..5)];
    let d = ["1.5", "", "x", "1e400"][rng.random_range(0..4)];
    let ts = ["2026-11-11 00:00:01.000", "", "bad"][rng.random_range(0..3)];
    format!("{id},{s},{d},{ts}")
}

/// Damages a line: bytes cut, doubled, flipped or inserted (quotes, brackets, separators).
fn damage(rng: &mut SmallRng, line: &str) -> String {
    let mut bytes = line.as_bytes().to_vec();
    for _ in 0..rng.random_range(1..=3) {
        let at = rng.random_range(0..=bytes.len());
        match rng.random_range(0..5) {
            0 => bytes.truncate(at),
            1 => {
                let pick = b"\"{}[],:\\\n\r\x00";
                let b = pick[rng.random_range(0..pick.len())];
                bytes.insert(at, b);
            }
            2 if at < bytes.len() => bytes[at] ^= 1 << rng.random_range(0..8),
            3 => {
                let n = rng.random_range(1..3_000);
                let deep: Vec<u8> = std::iter::repeat_n(b'[', n).collect();
                bytes.splice(at..at, deep);
            }
            _ => {
                let copy = bytes[at..].to_vec();
                bytes.extend(copy);
            }
        }
    }
    String::from_utf8_lossy(&bytes).to_string()
}

/// Mutated JSON lines and CSV through the file source, each option setting and on one or two
/// workers: rows or a clean error (naming file and line), never a panic or a hang.
#[test]
fn the_file_decoders_survive_mutated_records() {
    let mut rng = SmallRng::seed_from_u64(seed() ^ 0x5eed);
    let dir = tempfile::tempdir().unwrap();
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int64, true),
        Field::new("s", DataType::Utf8, true),
        Field::new("d", DataType::Float64, true),
        Field::new("ts", DataType::Timestamp(TimeUnit::Millisecond, None), true),
    ]));
    let started = Instant::now();
    let mut files = 0;
    while started.elapsed() < budget() || files < 20 {
        let csv = rng.random_bool(0.5);
        let n = *[1usize, 10, 300, 5_000]
            .get(rng.random_range(0..4))
            .unwrap();
        let mut text = String::new();
        for _ in 0..n {
            let record = if csv {
                csv_record(&mut rng)
            } else {
                json_record(&mut rng)
            };
            if rng.random_bool(0.05) {
                text.push_str(&damage(&mut rng, &record));
            } else {
                text.push_str(&record);
            }
            text.push('\n');
        }
        if rng.random_bool(0.3) {
            text = damage(&mut rng, &text);
        }
        let path = dir
            .path()
            .join(format!("f{files}.{}", if csv { "csv" } else { "json" }));
        std::fs::write(&path, &text).unwrap();
        files += 1;
        let format = if csv { "csv" } else { "json" };
        for ignore in [false, true] {
            let options: BTreeMap<String, String> = [
                ("connector", "filesystem".to_string()),
                ("path", path.display().to_string()),
                ("format", format.to_string()),
                (
                    if csv {
                        "csv.ignore-parse-errors"
                    } else {
                        "json.ignore-parse-errors"
                    },
                    ignore.to_string(),
                ),
                ("source.split-size", "64kb".to_string()),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
            let spec = ConnectorSpec {
                table: "fuzz".into(),
                schema: schema.clone(),
                options,
                partitioned_by: vec![],
                read_columns: None,
                decode_ahead: rng.random_bool(0.5),
                whole_files: false,
                sink_instance: 0,
                metadata: vec![],
                primary_key: vec![],
            };
            let workers = rng.random_range(1..=2);
            let shown = format!(
                "{} ({format}, ignore errors {ignore}, {workers} workers):\n{}",
                path.display(),
                &text[..text.floor_char_boundary(2_000)]
            );
            let read = guarded(&shown, Duration::from_secs(20), move || {
                let mut rows = 0usize;
                for w in 0..workers {
                    let mut r = match open_source(&spec, w, workers) {
                        Ok(r) => r,
                        Err(e) => return Err(e.to_string()),
                    };
                    loop {
                        match r.poll(128) {
                            Ok(Poll::Batch { batch, .. }) => rows += batch.num_rows(),
                            Ok(Poll::Finished) => break,
                            Ok(_) => {}
                            Err(e) => return Err(e.to_string()),
                        }
                    }
                }
                Ok(rows)
            });
            match read {
                Ok(rows) => assert!(rows <= 8 * n + 10, "{rows} rows from {n} records"),
                Err(e) if !ignore => assert!(
                    e.contains(&format!("f{}", files - 1)),
                    "an error names its file: {e}"
                ),
                Err(e) => panic!("with the errors ignored, {shown}\nfailed: {e}"),
            }
        }
    }
}
