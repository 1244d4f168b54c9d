//! `sluice bench latency`: end-to-end latency at a fixed input rate.
//!
//! The Nexmark tables get an ingestion column (`ingest AS PROCTIME()`, stamped by the source
//! when it reads a row). The query's output goes to a sink in this process that takes, for
//! every row, the wall clock minus the newest ingestion stamp in the row (a join row exists once
//! its later input arrived). First the query runs unpaced to measure its capacity; then it runs
//! paced at a share of that capacity, and the percentiles of the paced run are reported.

use std::sync::{Arc, Mutex};

use arrow::array::{Array, AsArray};
use arrow::datatypes::{DataType, SchemaRef, TimeUnit, TimestampMillisecondType};
use sluice_common::ChangeBatch;
use sluice_engine::{JobOptions, SelectOutput};

const DDL: &str = "
CREATE TABLE person (id BIGINT, name STRING, emailAddress STRING, creditCard STRING, city STRING,
  state STRING, dateTime TIMESTAMP(3), extra STRING, ingest AS PROCTIME(),
  WATERMARK FOR dateTime AS dateTime - INTERVAL '4' SECOND)
WITH ('connector' = 'nexmark', 'nexmark.table' = 'person', 'nexmark.events' = '{events}', 'rows-per-second' = '{person_rate}');
CREATE TABLE auction (id BIGINT, itemName STRING, description STRING, initialBid BIGINT,
  reserve BIGINT, dateTime TIMESTAMP(3), expires TIMESTAMP(3), seller BIGINT, category BIGINT,
  extra STRING, ingest AS PROCTIME(), WATERMARK FOR dateTime AS dateTime - INTERVAL '4' SECOND)
WITH ('connector' = 'nexmark', 'nexmark.table' = 'auction', 'nexmark.events' = '{events}', 'rows-per-second' = '{auction_rate}');
CREATE TABLE bid (auction BIGINT, bidder BIGINT, price BIGINT, channel STRING, url STRING,
  dateTime TIMESTAMP(3), extra STRING, ingest AS PROCTIME(),
  WATERMARK FOR dateTime AS dateTime - INTERVAL '4' SECOND)
WITH ('connector' = 'nexmark', 'nexmark.table' = 'bid', 'nexmark.events' = '{events}', 'rows-per-second' = '{bid_rate}');
";

/// The measured queries: their output keeps the ingestion stamps.
const QUERIES: &[(&str, &str)] = &[
    (
        "q1",
        "SELECT auction, bidder, 0.908 * price AS price, dateTime, extra, ingest FROM bid",
    ),
    (
        "q3",
        "SELECT P.name, P.city, P.state, A.id, A.ingest, P.ingest FROM auction AS A \
         INNER JOIN person AS P ON A.seller = P.id \
         WHERE A.category = 10 AND (P.state = 'OR' OR P.state = 'ID' OR P.state = 'CA')",
    ),
];

#[derive(Default)]
struct Latencies(Mutex<Vec<u32>>);

impl SelectOutput for Latencies {
    fn begin(&self, _index: usize, _schema: SchemaRef) {}
    fn emit(&self, _index: usize, batch: &ChangeBatch) {
        let now = sluice_common::time::now_millis();
        let stamps: Vec<_> = batch
            .data
            .columns()
            .iter()
            .zip(batch.schema().fields())
            .filter(|(_, f)| {
                f.name() == "ingest"
                    && matches!(f.data_type(), DataType::Timestamp(TimeUnit::Millisecond, _))
            })
            .map(|(c, _)| c.as_primitive::<TimestampMillisecondType>().clone())
            .collect();
        let mut out = self.0.lock().expect("latencies");
        for i in 0..batch.num_rows() {
            let newest = stamps
                .iter()
                .filter(|s| s.is_valid(i))
                .map(|s| s.value(i))
                .max();
            if let Some(t) = newest {
                out.push((now - t).max(0) as u32);
            }
        }
    }
}

/// One run: its events/s, the ingestion-to-sink latencies, and the window firing delays.
fn run_once(
    query: &str,
    events: u64,
    rate: f64,
    workers: usize,
    batch: usize,
    epoch_ms: u64,
) -> Result<(f64, Vec<u32>, Vec<u32>), String> {
    // The rate is for all events; each stream gets its share (1 : 3 : 46).
    let ddl = DDL
        .replace("{events}", &events.to_string())
        .replace("{person_rate}", &format!("{}", rate / 50.0))
        .replace("{auction_rate}", &format!("{}", rate * 3.0 / 50.0))
        .replace("{bid_rate}", &format!("{}", rate * 46.0 / 50.0));
    let script = format!(
        "SET 'table.exec.mini-batch.size' = '{batch}';\nSET 'sluice.epoch-length' = '{epoch_ms} ms';\n{ddl}{query};"
    );
    let plan = sluice_sql::plan_script(&script).map_err(|e| e.to_string())?;
    let out = Arc::new(Latencies::default());
    let metrics = sluice_engine::JobMetrics::new();
    let options = JobOptions {
        workers,
        select_output: Some(out.clone()),
        metrics: metrics.clone(),
        ..Default::default()
    };
    let summary = sluice_engine::run(plan, options).map_err(|e| e.to_string())?;
    let latencies = std::mem::take(&mut *out.0.lock().expect("latencies"));
    let fired = std::mem::take(&mut *metrics.window_fire_ms.lock().expect("metrics"));
    Ok((
        events as f64 / summary.elapsed.as_secs_f64(),
        latencies,
        fired,
    ))
}

fn percentile(sorted: &[u32], p: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

/// A 1 s tumbling count: how long after the watermark that closes a window it is emitted.
const WINDOW: &str = "SELECT TUMBLE_START(dateTime, INTERVAL '1' SECOND), COUNT(*), MAX(ingest) \
    FROM bid GROUP BY TUMBLE(dateTime, INTERVAL '1' SECOND)";

/// Measures capacity, then latency at `load` (a share of capacity) for `seconds`.
pub fn run(workers: &[usize], load: f64, seconds: f64, batches: &[usize]) -> Result<(), String> {
    println!(
        "{:<6} {:>7} {:>10} {:>14} {:>14} {:>8} {:>8} {:>8} {:>8}",
        "query",
        "workers",
        "batch",
        "capacity ev/s",
        "paced ev/s",
        "p50 ms",
        "p99 ms",
        "p999 ms",
        "max ms"
    );
    for (name, query) in QUERIES {
        for &w in workers {
            for &batch in batches {
                let (capacity, _, _) = run_once(query, 2_000_000, 0.0, w, batch, 50)?;
                let rate = capacity * load;
                let events = (rate * seconds) as u64;
                let (_, mut lat, _) = run_once(query, events, rate, w, batch, 50)?;
                lat.sort_unstable();
                println!(
                    "{:<6} {:>7} {:>10} {:>14.0} {:>14.0} {:>8} {:>8} {:>8} {:>8}",
                    name,
                    w,
                    batch,
                    capacity,
                    rate,
                    percentile(&lat, 0.5),
                    percentile(&lat, 0.99),
                    percentile(&lat, 0.999),
                    lat.last().copied().unwrap_or(0)
                );
            }
        }
    }
    // Windows: from the source making the watermark that closes a window to its emission.
    println!();
    println!(
        "{:<12} {:>7} {:>14} {:>10} {:>8} {:>8} {:>8}",
        "window", "workers", "paced ev/s", "windows", "p50 ms", "p99 ms", "max ms"
    );
    for &w in workers {
        let (capacity, _, _) = run_once(WINDOW, 2_000_000, 0.0, w, 1024, 50)?;
        let rate = capacity * load;
        let (_, _, mut fired) = run_once(WINDOW, (rate * seconds) as u64, rate, w, 1024, 50)?;
        fired.sort_unstable();
        println!(
            "{:<12} {:>7} {:>14.0} {:>10} {:>8} {:>8} {:>8}",
            "tumble 1 s",
            w,
            rate,
            fired.len(),
            percentile(&fired, 0.5),
            percentile(&fired, 0.99),
            fired.last().copied().unwrap_or(0)
        );
    }
    // The epoch length: progress (and checkpoint) granularity; rows do not wait for epochs.
    println!();
    println!(
        "{:<6} {:>7} {:>10} {:>14} {:>8} {:>8} {:>8}",
        "query", "workers", "epoch ms", "paced ev/s", "p50 ms", "p99 ms", "p999 ms"
    );
    let w = workers.first().copied().unwrap_or(1);
    let (capacity, _, _) = run_once(QUERIES[0].1, 2_000_000, 0.0, w, 1024, 50)?;
    for epoch in [10u64, 50, 200] {
        let rate = capacity * load;
        let (_, mut lat, _) =
            run_once(QUERIES[0].1, (rate * seconds) as u64, rate, w, 1024, epoch)?;
        lat.sort_unstable();
        println!(
            "{:<6} {:>7} {:>10} {:>14.0} {:>8} {:>8} {:>8}",
            QUERIES[0].0,
            w,
            epoch,
            rate,
            percentile(&lat, 0.5),
            percentile(&lat, 0.99),
            percentile(&lat, 0.999)
        );
    }
    Ok(())
}

/// Produce-to-sink latency through Kafka: a paced Nexmark bid stream is produced into `topic`
/// (a fresh one) by the same job that reads it back; each row's latency is the wall clock at
/// the sink minus the record's Kafka timestamp (set when the producer took it). Runs `seconds`
/// at `rate` events/s with `workers` workers, then stops the job.
pub fn run_kafka(
    servers: &str,
    topic: &str,
    rate: f64,
    seconds: f64,
    workers: usize,
) -> Result<(), String> {
    let columns = "auction BIGINT, bidder BIGINT, price BIGINT, channel STRING, url STRING, \
                   dateTime TIMESTAMP(3), extra STRING";
    // Extra consumer properties (`SLUICE_KAFKA_LATENCY_CONSUMER`, `k=v,k=v`), to see what a
    // setting does to the latency.
    let consumer: String = std::env::var("SLUICE_KAFKA_LATENCY_CONSUMER")
        .unwrap_or_default()
        .split(',')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| format!(", 'properties.{}' = '{}'", k.trim(), v.trim()))
        .collect();
    let script = format!(
        "CREATE TABLE gen ({columns}) WITH ('connector' = 'nexmark', 'nexmark.table' = 'bid',
           'rows-per-second' = '{rate}');
         CREATE TABLE produced ({columns}) WITH ('connector' = 'kafka', 'topic' = '{topic}',
           'properties.bootstrap.servers' = '{servers}', 'format' = 'json',
           'sink.delivery-guarantee' = 'none');
         CREATE TABLE consumed (auction BIGINT, price BIGINT,
           ingest TIMESTAMP_LTZ(3) METADATA FROM 'timestamp')
         WITH ('connector' = 'kafka', 'topic' = '{topic}', 'properties.bootstrap.servers' = '{servers}',
           'scan.startup.mode' = 'earliest-offset', 'format' = 'json'{consumer});
         INSERT INTO produced SELECT * FROM gen;
         SELECT auction, price, ingest FROM consumed;"
    );
    let plan = sluice_sql::plan_script(&script).map_err(|e| e.to_string())?;
    let out = Arc::new(Latencies::default());
    let control = sluice_engine::JobControl::new();
    let options = JobOptions {
        workers,
        select_output: Some(out.clone()),
        control: control.clone(),
        ..Default::default()
    };
    let stopper = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_secs_f64(seconds));
        control.cancel();
    });
    sluice_engine::run(plan, options).map_err(|e| e.to_string())?;
    let _ = stopper.join();
    let mut lat = std::mem::take(&mut *out.0.lock().expect("latencies"));
    // The first second is the producer and consumer starting up.
    let skip = (rate as usize).min(lat.len() / 2);
    let mut lat = lat.split_off(skip);
    lat.sort_unstable();
    println!(
        "kafka produce-to-sink, {workers} workers, {rate:.0} events/s for {seconds} s: {} rows, p50 {} ms, p99 {} ms, p999 {} ms, max {} ms",
        lat.len(),
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
        percentile(&lat, 0.999),
        lat.last().copied().unwrap_or(0)
    );
    Ok(())
}
