//! `sluice bench`: throughput of the engine core on the built-in generators, and of the Nexmark
//! queries (`sluice bench nexmark`, the SQL files in `benchmarks/nexmark/`).
//!
//! Each scenario is a SQL job over a bounded generated stream, run several times; the median
//! events/s is reported, per run and per worker. `gen-only` polls the generator directly, with
//! no dataflow, so that generation cost can be told apart from the engine's.

use std::collections::BTreeMap;
use std::io::Write;
use std::time::Instant;

use sluice_connectors::{open_source, ConnectorSpec, Poll};

/// One benchmark scenario.
struct Scenario {
    name: &'static str,
    what: &'static str,
    /// The query; `{source}` is replaced by the source DDL.
    sql: &'static str,
    /// Which generator table it reads.
    source: Source,
}

#[derive(Clone, Copy)]
enum Source {
    Orders,
    Clicks,
    /// Clicks over 10 M users.
    Clicks10M,
    /// The Nexmark streams (`benchmarks/nexmark/ddl.sql`).
    Nexmark,
}

macro_rules! nexmark {
    ($($name:literal),*) => {
        &[$(Scenario {
            name: $name,
            what: "",
            sql: include_str!(concat!("../../../benchmarks/queries/nexmark/", $name, ".sql")),
            source: Source::Nexmark,
        }),*]
    };
}

/// The Nexmark queries; q10 writes files and q13 reads a side table, both in a scratch folder.
const NEXMARK: &[Scenario] = nexmark!(
    "q0", "q1", "q2", "q3", "q4", "q5", "q6", "q7", "q8", "q9", "q10", "q11", "q12", "q13", "q14",
    "q15", "q16", "q17", "q18", "q19", "q20", "q21", "q22"
);

const NEXMARK_DDL: &str = include_str!("../../../benchmarks/queries/nexmark/ddl.sql");

const ORDERS: &str = "CREATE TABLE orders (order_id BIGINT, user_id BIGINT, item_id BIGINT, category STRING, province STRING, \
     amount DOUBLE, quantity INT, event_time TIMESTAMP(3), WATERMARK FOR event_time AS event_time - INTERVAL '5' SECOND) \
     WITH ('connector' = 'ecommerce', 'rows-per-second' = '0', 'event-rate' = '20000', 'number-of-rows' = '{events}');";

const CLICKS: &str = "CREATE TABLE clicks (user_id BIGINT, amount DOUBLE) \
     WITH ('connector' = 'datagen', 'rows-per-second' = '0', 'number-of-rows' = '{events}', \
     'fields.user_id.min' = '1', 'fields.user_id.max' = '1000000', 'fields.amount.min' = '1', 'fields.amount.max' = '1000');";

/// CLICKS over 10 M users (`groupby-10m`).
static CLICKS_10M: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    CLICKS.replace(
        "'fields.user_id.max' = '1000000'",
        "'fields.user_id.max' = '10000000'",
    )
});

/// The `groupby-*` query.
macro_rules! groupby_user {
    () => {
        "CREATE TABLE sink (user_id BIGINT, n BIGINT, total DOUBLE) WITH ('connector' = 'blackhole');
         INSERT INTO sink SELECT user_id, COUNT(*), SUM(amount) FROM clicks GROUP BY user_id;"
    };
}

/// Checkpoints every second, for the `*-ckpt` scenarios.
macro_rules! checkpoint_every_second {
    () => {
        "SET 'execution.checkpointing.interval' = '1 s';
         SET 'execution.checkpointing.dir' = '{checkpoints}';\n"
    };
}

const SCENARIOS: &[Scenario] = &[
    Scenario { name: "gen-only", what: "the ecommerce generator alone, no dataflow", sql: "", source: Source::Orders },
    Scenario {
        name: "passthrough",
        what: "every order to a blackhole sink",
        sql: "CREATE TABLE sink (order_id BIGINT, user_id BIGINT, item_id BIGINT, category STRING, province STRING, \
              amount DOUBLE, quantity INT, event_time TIMESTAMP(3)) WITH ('connector' = 'blackhole');
              INSERT INTO sink SELECT * FROM orders;",
        source: Source::Orders,
    },
    Scenario {
        name: "filter-project",
        what: "a filter and a projection with a string function",
        sql: "CREATE TABLE sink (order_id BIGINT, user_id BIGINT, euros DOUBLE, category STRING) WITH ('connector' = 'blackhole');
              INSERT INTO sink SELECT order_id, user_id, amount * 0.908, UPPER(category) FROM orders
              WHERE amount > 20 AND province <> 'Shaanxi';",
        source: Source::Orders,
    },
    Scenario {
        name: "tumble-sum",
        what: "5-minute tumbling SUM and COUNT",
        sql: "CREATE TABLE sink (ws TIMESTAMP(3), gmv DOUBLE, n BIGINT) WITH ('connector' = 'blackhole');
              INSERT INTO sink SELECT TUMBLE_START(event_time, INTERVAL '5' MINUTE), SUM(amount), COUNT(*)
              FROM orders GROUP BY TUMBLE(event_time, INTERVAL '5' MINUTE);",
        source: Source::Orders,
    },
    Scenario {
        name: "groupby-1m-ckpt",
        what: "groupby-1m with a checkpoint every second",
        sql: concat!(checkpoint_every_second!(), groupby_user!()),
        source: Source::Clicks,
    },
    Scenario {
        name: "groupby-10m-ckpt",
        what: "groupby-10m with a checkpoint every second",
        sql: concat!(checkpoint_every_second!(), groupby_user!()),
        source: Source::Clicks10M,
    },
    Scenario {
        name: "groupby-10m-ckpt-lz4",
        what: "groupby-10m-ckpt with LZ4-compressed snapshots",
        sql: concat!(
            checkpoint_every_second!(),
            "SET 'execution.checkpointing.snapshot-compression' = 'true';\n",
            groupby_user!()
        ),
        source: Source::Clicks10M,
    },
    Scenario {
        name: "groupby-10m",
        what: "unwindowed GROUP BY user_id over ~10 M distinct keys (updating)",
        sql: groupby_user!(),
        source: Source::Clicks10M,
    },
    Scenario {
        name: "groupby-1m",
        what: "unwindowed GROUP BY user_id over ~1 M distinct keys (updating)",
        sql: groupby_user!(),
        source: Source::Clicks,
    },
];

/// One measured run.
struct Run {
    events: u64,
    seconds: f64,
    state_bytes: u64,
    state_groups: u64,
    peak_rss: u64,
}

fn run_scenario(s: &Scenario, events: u64, workers: usize) -> Result<Run, String> {
    let ddl = match s.source {
        Source::Orders => ORDERS,
        Source::Clicks => CLICKS,
        Source::Clicks10M => CLICKS_10M.as_str(),
        Source::Nexmark => NEXMARK_DDL,
    }
    .replace("{events}", &events.to_string());
    if s.name == "gen-only" {
        let catalog_sql = ddl.clone();
        let mut catalog = sluice_sql::Catalog::new();
        catalog.execute(&catalog_sql).map_err(|e| e.to_string())?;
        let table = catalog.table("orders").expect("declared above");
        let spec = ConnectorSpec {
            table: table.name.clone(),
            schema: table.physical_schema.clone(),
            options: table.options.clone(),
            partitioned_by: vec![],
            read_columns: None,
            decode_ahead: false,
            whole_files: false,
            sink_instance: 0,
            metadata: vec![],
            primary_key: vec![],
        };
        let started = Instant::now();
        let mut total = 0u64;
        // One generator per worker thread, as the engine runs them.
        std::thread::scope(|scope| -> Result<(), String> {
            let handles: Vec<_> = (0..workers)
                .map(|w| {
                    let spec = spec.clone();
                    scope.spawn(move || -> Result<u64, String> {
                        let mut reader =
                            open_source(&spec, w, workers).map_err(|e| e.to_string())?;
                        let mut n = 0u64;
                        loop {
                            match reader.poll(8192).map_err(|e| e.to_string())? {
                                Poll::Batch { batch, .. } => n += batch.num_rows() as u64,
                                Poll::Idle | Poll::SplitDone { .. } => continue,
                                Poll::Finished => return Ok(n),
                            }
                        }
                    })
                })
                .collect();
            for h in handles {
                total += h
                    .join()
                    .map_err(|_| "generator thread panicked".to_string())??;
            }
            Ok(())
        })?;
        return Ok(Run {
            events: total,
            seconds: started.elapsed().as_secs_f64(),
            state_bytes: 0,
            state_groups: 0,
            peak_rss: rss_bytes(),
        });
    }
    let scratch = std::env::temp_dir().join(format!("sluice-bench-{}", std::process::id()));
    let checkpoints = scratch.join("checkpoints");
    let _ = std::fs::remove_dir_all(&scratch);
    // q13's side table: 10 000 keys.
    let side = scratch.join("side_input");
    std::fs::create_dir_all(&side).map_err(|e| e.to_string())?;
    let rows: String = (0..10_000)
        .map(|k| format!("{{\"key\": {k}, \"value\": \"side-{k}\"}}\n"))
        .collect();
    std::fs::write(side.join("side.json"), rows).map_err(|e| e.to_string())?;
    let sql = s
        .sql
        .replace("{checkpoints}", &checkpoints.display().to_string())
        .replace("{out}", &scratch.display().to_string());
    let plan = sluice_sql::plan_script(&format!("{ddl}\n{sql}")).map_err(|e| e.to_string())?;
    let options = sluice_engine::JobOptions {
        workers,
        ..Default::default()
    };
    let rss = PeakRss::start();
    let summary = sluice_engine::run(plan, options).map_err(|e| e.to_string())?;
    let peak_rss = rss.stop();
    let _ = std::fs::remove_dir_all(&scratch);
    if summary.checkpoints > 0 {
        eprintln!(
            "  ({} checkpoints, last {} bytes)",
            summary.checkpoints, summary.checkpoint_bytes
        );
    }
    Ok(Run {
        // Nexmark counts events of the whole stream (all three kinds), as its generator makes
        // them all; this one generates only the kinds a query reads.
        events: match s.source {
            Source::Nexmark => events,
            _ => summary.total_read(),
        },
        seconds: summary.elapsed.as_secs_f64(),
        state_bytes: summary.state_bytes,
        state_groups: summary.state_groups,
        peak_rss,
    })
}

/// Samples this process's resident memory while a job runs; its maximum is the job's peak.
struct PeakRss {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<u64>,
}

fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

impl PeakRss {
    fn start() -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut peak = rss_bytes();
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                peak = peak.max(rss_bytes());
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            peak.max(rss_bytes())
        });
        PeakRss { stop, thread }
    }

    fn stop(self) -> u64 {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().unwrap_or(0)
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Runs the chosen scenarios and prints a table; each result is also a JSON line in `json`.
/// With a `baseline` (JSON lines of an earlier run), results more than 10% slower are flagged.
pub fn run(
    suite: &str,
    events: u64,
    workers: &[usize],
    runs: usize,
    only: Option<String>,
    json: Option<std::path::PathBuf>,
    baseline: Option<std::path::PathBuf>,
) -> Result<(), String> {
    let scenarios = match suite {
        "core" => SCENARIOS,
        "nexmark" => NEXMARK,
        other => {
            return Err(format!(
                "no benchmark suite '{other}': use 'core' or 'nexmark'"
            ))
        }
    };
    let baseline = match &baseline {
        None => BTreeMap::new(),
        Some(p) => read_baseline(p)?,
    };
    let mut slower = vec![];
    let chosen: Vec<&Scenario> = scenarios
        .iter()
        .filter(|s| {
            only.as_deref()
                .is_none_or(|o| o.split(',').any(|n| n == s.name))
        })
        .collect();
    if chosen.is_empty() {
        let names: Vec<&str> = scenarios.iter().map(|s| s.name).collect();
        return Err(format!(
            "no such benchmark; choose from {}",
            names.join(", ")
        ));
    }
    let mut out = match &json {
        Some(p) => Some(std::fs::File::create(p).map_err(|e| format!("{}: {e}", p.display()))?),
        None => None,
    };
    println!(
        "{:<16} {:>7} {:>14} {:>16} {:>12} {:>10}  what",
        "benchmark", "workers", "events/s", "events/s/worker", "state B/key", "peak RSS"
    );
    let mut by_name: BTreeMap<(&str, usize), f64> = BTreeMap::new();
    for s in chosen {
        for &w in workers {
            let mut rates = vec![];
            let mut last = None;
            for _ in 0..runs.max(1) {
                let r = run_scenario(s, events, w)?;
                rates.push(r.events as f64 / r.seconds);
                last = Some(r);
            }
            let r = last.expect("at least one run");
            let rate = median(rates.clone());
            by_name.insert((s.name, w), rate);
            let per_key = if r.state_groups > 0 {
                format!("{:.0}", r.state_bytes as f64 / r.state_groups as f64)
            } else {
                "-".into()
            };
            let versus = match baseline.get(&(s.name.to_string(), w)) {
                Some(base) if rate < base * 0.9 => {
                    slower.push(format!(
                        "{} ({w} workers): {rate:.0} vs {base:.0} events/s",
                        s.name
                    ));
                    format!(
                        "  SLOWER than baseline {base:.0} ({:+.0}%)",
                        (rate / base - 1.0) * 100.0
                    )
                }
                Some(base) => format!(
                    "  baseline {base:.0} ({:+.0}%)",
                    (rate / base - 1.0) * 100.0
                ),
                None => String::new(),
            };
            println!(
                "{:<16} {:>7} {:>14.0} {:>16.0} {:>12} {:>8} MB  {}{versus}",
                s.name,
                w,
                rate,
                rate / w as f64,
                per_key,
                r.peak_rss >> 20,
                describe(s)
            );
            if let Some(f) = out.as_mut() {
                let line = format!(
                    "{{\"suite\":\"{suite}\",\"benchmark\":\"{}\",\"workers\":{w},\"events\":{},\"events_per_s\":{rate:.0},\"runs\":{:?},\"state_bytes\":{},\"state_groups\":{},\"peak_rss_bytes\":{}}}\n",
                    s.name, r.events, rates.iter().map(|x| x.round()).collect::<Vec<_>>(), r.state_bytes, r.state_groups, r.peak_rss
                );
                f.write_all(line.as_bytes()).map_err(|e| e.to_string())?;
            }
        }
    }
    for name in ["groupby-1m", "tumble-sum", "passthrough"] {
        if let (Some(one), Some(two)) = (by_name.get(&(name, 1)), by_name.get(&(name, 2))) {
            println!("scaling {name}: 2 workers / 1 worker = {:.2}x", two / one);
        }
    }
    if !slower.is_empty() {
        return Err(format!(
            "more than 10% slower than the baseline: {}",
            slower.join("; ")
        ));
    }
    Ok(())
}

/// What a scenario measures: its description, or a Nexmark file's first comment line.
fn describe(s: &Scenario) -> String {
    if !s.what.is_empty() {
        return s.what.to_string();
    }
    let first = s.sql.lines().next().unwrap_or_default();
    let text = first.split_once(": ").map_or(first, |(_, t)| t);
    let mut out: String = text.chars().take(60).collect();
    if text.chars().count() > 60 {
        out.push_str("...");
    }
    out
}

/// `(benchmark, workers) -> events/s` from the JSON lines of an earlier run.
fn read_baseline(path: &std::path::Path) -> Result<BTreeMap<(String, usize), f64>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut out = BTreeMap::new();
    for (n, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let v: serde_json::Value =
            serde_json::from_str(line).map_err(|e| format!("{}:{}: {e}", path.display(), n + 1))?;
        let (Some(name), Some(w), Some(rate)) = (
            v["benchmark"].as_str(),
            v["workers"].as_u64(),
            v["events_per_s"].as_f64(),
        ) else {
            return Err(format!(
                "{}:{}: a baseline line needs benchmark, workers and events_per_s",
                path.display(),
                n + 1
            ));
        };
        out.insert((name.to_string(), w as usize), rate);
    }
    Ok(out)
}
