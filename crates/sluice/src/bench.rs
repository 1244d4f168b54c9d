//! `sluice bench`: throughput of the engine core on the built-in generators.
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
}

const ORDERS: &str = "CREATE TABLE orders (order_id BIGINT, user_id BIGINT, item_id BIGINT, category STRING, province STRING, \
     amount DOUBLE, quantity INT, event_time TIMESTAMP(3), WATERMARK FOR event_time AS event_time - INTERVAL '5' SECOND) \
     WITH ('connector' = 'ecommerce', 'rows-per-second' = '0', 'event-rate' = '20000', 'number-of-rows' = '{events}');";

const CLICKS: &str = "CREATE TABLE clicks (user_id BIGINT, amount DOUBLE) \
     WITH ('connector' = 'datagen', 'rows-per-second' = '0', 'number-of-rows' = '{events}', \
     'fields.user_id.min' = '1', 'fields.user_id.max' = '1000000', 'fields.amount.min' = '1', 'fields.amount.max' = '1000');";

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
        sql: "SET 'execution.checkpointing.interval' = '1 s';
              SET 'execution.checkpointing.dir' = '{checkpoints}';
              CREATE TABLE sink (user_id BIGINT, n BIGINT, total DOUBLE) WITH ('connector' = 'blackhole');
              INSERT INTO sink SELECT user_id, COUNT(*), SUM(amount) FROM clicks GROUP BY user_id;",
        source: Source::Clicks,
    },
    Scenario {
        name: "groupby-1m",
        what: "unwindowed GROUP BY user_id over ~1 M distinct keys (updating)",
        sql: "CREATE TABLE sink (user_id BIGINT, n BIGINT, total DOUBLE) WITH ('connector' = 'blackhole');
              INSERT INTO sink SELECT user_id, COUNT(*), SUM(amount) FROM clicks GROUP BY user_id;",
        source: Source::Clicks,
    },
];

/// One measured run.
struct Run {
    events: u64,
    seconds: f64,
    state_bytes: u64,
    state_groups: u64,
}

fn run_scenario(s: &Scenario, events: u64, workers: usize) -> Result<Run, String> {
    let ddl = match s.source {
        Source::Orders => ORDERS,
        Source::Clicks => CLICKS,
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
        });
    }
    let checkpoints =
        std::env::temp_dir().join(format!("sluice-bench-checkpoints-{}", std::process::id()));
    let sql = s
        .sql
        .replace("{checkpoints}", &checkpoints.display().to_string());
    let plan = sluice_sql::plan_script(&format!("{ddl}\n{sql}")).map_err(|e| e.to_string())?;
    let options = sluice_engine::JobOptions {
        workers,
        ..Default::default()
    };
    let summary = sluice_engine::run(plan, options).map_err(|e| e.to_string())?;
    let _ = std::fs::remove_dir_all(&checkpoints);
    if summary.checkpoints > 0 {
        eprintln!(
            "  ({} checkpoints, last {} bytes)",
            summary.checkpoints, summary.checkpoint_bytes
        );
    }
    Ok(Run {
        events: summary.total_read(),
        seconds: summary.elapsed.as_secs_f64(),
        state_bytes: summary.state_bytes,
        state_groups: summary.state_groups,
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Runs the chosen scenarios and prints a table; each result is also a JSON line in `json`.
pub fn run(
    events: u64,
    workers: &[usize],
    runs: usize,
    only: Option<String>,
    json: Option<std::path::PathBuf>,
) -> Result<(), String> {
    let chosen: Vec<&Scenario> = SCENARIOS
        .iter()
        .filter(|s| {
            only.as_deref()
                .is_none_or(|o| o.split(',').any(|n| n == s.name))
        })
        .collect();
    if chosen.is_empty() {
        let names: Vec<&str> = SCENARIOS.iter().map(|s| s.name).collect();
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
        "{:<16} {:>7} {:>14} {:>16} {:>12}  what",
        "benchmark", "workers", "events/s", "events/s/worker", "state B/key"
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
            println!(
                "{:<16} {:>7} {:>14.0} {:>16.0} {:>12}  {}",
                s.name,
                w,
                rate,
                rate / w as f64,
                per_key,
                s.what
            );
            if let Some(f) = out.as_mut() {
                let line = format!(
                    "{{\"benchmark\":\"{}\",\"workers\":{w},\"events\":{},\"events_per_s\":{rate:.0},\"runs\":{:?},\"state_bytes\":{},\"state_groups\":{}}}\n",
                    s.name, r.events, rates.iter().map(|x| x.round()).collect::<Vec<_>>(), r.state_bytes, r.state_groups
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
    Ok(())
}
