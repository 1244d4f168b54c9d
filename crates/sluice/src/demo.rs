//! `sluice demo`: runs `examples/double11.sql` and draws a live sales dashboard in the terminal.

use std::io::Write;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use sluice_connectors::memory;
use sluice_engine::{JobMetrics, JobOptions};

/// The demo's SQL, compiled in so the demo needs no files; the same text is in `examples/`.
const DEMO_SQL: &str = include_str!("../../../examples/double11.sql");

fn num(s: &str) -> f64 {
    s.parse().unwrap_or(0.0)
}

fn bar(share: f64, width: usize) -> String {
    let n = (share * width as f64).round() as usize;
    format!(
        "{}{}",
        "█".repeat(n.min(width)),
        "·".repeat(width - n.min(width))
    )
}

pub fn run(seconds: Option<u64>, workers: usize) -> Result<(), String> {
    let plan =
        sluice_sql::plan_script(DEMO_SQL).map_err(|e| format!("examples/double11.sql: {e}"))?;
    let pipelines = plan.pipelines.len().max(1) as u64;
    let clock = EventClock::from_sql(DEMO_SQL);
    let metrics = JobMetrics::new();
    let options = JobOptions {
        workers,
        metrics: metrics.clone(),
        ..Default::default()
    };
    let job = std::thread::spawn(move || sluice_engine::run(plan, options));
    let started = Instant::now();
    let mut last_read = 0u64;
    let mut last_tick = Instant::now();
    let mut rate = 0.0;
    loop {
        std::thread::sleep(Duration::from_millis(500));
        if job.is_finished() {
            return match job.join() {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err("the job thread panicked".into()),
            };
        }
        // Every INSERT of the demo reads the same generated orders with its own source.
        let read: u64 = metrics.rows_read().values().sum::<u64>() / pipelines;
        let dt = last_tick.elapsed().as_secs_f64();
        if dt > 0.0 {
            rate = (read - last_read) as f64 / dt;
        }
        last_read = read;
        last_tick = Instant::now();
        draw(&metrics, clock.as_ref(), rate, started.elapsed());
        if seconds.is_some_and(|s| started.elapsed() >= Duration::from_secs(s)) {
            // The demo's source is unbounded: stop the whole process once the time is up.
            println!("\n(stopped after {} s)", seconds.unwrap_or_default());
            let _ = std::io::stdout().flush();
            std::process::exit(0);
        }
    }
}

/// Where event time should be now, from the orders table's `start-time` and `speed-up`: the
/// watermark lag is how far the watermark trails it.
struct EventClock {
    start_ms: i64,
    speed_up: f64,
}

impl EventClock {
    fn from_sql(sql: &str) -> Option<Self> {
        let mut catalog = sluice_sql::Catalog::new();
        catalog.execute(sql).ok()?;
        let options = &catalog.table("orders")?.options;
        let start = options
            .get("start-time")
            .map(String::as_str)
            .unwrap_or("2026-11-11 00:00:00");
        let start_ms = chrono::NaiveDateTime::parse_from_str(start, "%Y-%m-%d %H:%M:%S")
            .ok()?
            .and_utc()
            .timestamp_millis();
        let speed_up = options
            .get("speed-up")
            .and_then(|v| v.parse().ok())
            .unwrap_or(1.0);
        Some(EventClock { start_ms, speed_up })
    }

    /// Event-time lag of `watermark`, in event-time seconds and wall-clock seconds.
    fn lag(&self, watermark: i64, elapsed: Duration) -> (f64, f64) {
        let now = self.start_ms as f64 + elapsed.as_secs_f64() * 1000.0 * self.speed_up;
        let lag = ((now - watermark as f64) / 1000.0).max(0.0);
        (lag, lag / self.speed_up)
    }
}

fn draw(metrics: &JobMetrics, clock: Option<&EventClock>, rate: f64, elapsed: Duration) {
    let mut s = String::from("\x1b[2J\x1b[H");
    s.push_str("  SLUICE · Double-11 live sales   (Ctrl-C to stop)\n\n");
    let total = memory::table("gmv_total")
        .lock()
        .expect("table")
        .current_rows();
    let (gmv, orders, buyers) = total
        .first()
        .map(|r| (num(&r[0]), num(&r[1]), num(&r[2])))
        .unwrap_or_default();
    s.push_str(&format!(
        "  GMV so far   ¥{gmv:>16.2}    orders {orders:>10.0}    buyers {buyers:>8.0}\n"
    ));
    let wm = metrics.source_watermark.load(Ordering::Relaxed);
    let lag = match (clock, wm > i64::MIN) {
        (Some(c), true) => {
            let (event_s, wall_s) = c.lag(wm, elapsed);
            format!("lag {event_s:.0} s event time ({wall_s:.2} s wall)")
        }
        _ => "lag -".to_string(),
    };
    s.push_str(&format!(
        "  orders/s     {rate:>17.0}    watermark {}  {lag}    running {:.0} s\n\n",
        sluice_common::time::format_millis(wm),
        elapsed.as_secs_f64()
    ));

    s.push_str("  GMV per 5-minute window (the open one updates every second; final when the watermark passes its end)\n");
    let mut windows = memory::table("gmv_per_window")
        .lock()
        .expect("table")
        .current_rows();
    windows.sort();
    let max = windows.iter().map(|r| num(&r[2])).fold(1.0, f64::max);
    for w in windows.iter().rev().take(8).rev() {
        s.push_str(&format!(
            "  {} – {}  ¥{:>12.2}  {}\n",
            &w[0][11..16],
            &w[1][11..16],
            num(&w[2]),
            bar(num(&w[2]) / max, 30)
        ));
    }

    s.push_str("\n  Category share of GMV\n");
    let mut cats = memory::table("gmv_by_category")
        .lock()
        .expect("table")
        .current_rows();
    let cat_total: f64 = cats.iter().map(|r| num(&r[1])).sum::<f64>().max(1.0);
    cats.sort_by(|a, b| num(&b[1]).total_cmp(&num(&a[1])));
    for c in &cats {
        let share = num(&c[1]) / cat_total;
        s.push_str(&format!(
            "  {:<12} {:>5.1}%  {}\n",
            c[0],
            share * 100.0,
            bar(share, 30)
        ));
    }

    s.push_str("\n  Top provinces\n");
    let mut provs = memory::table("gmv_by_province")
        .lock()
        .expect("table")
        .current_rows();
    provs.sort_by(|a, b| num(&b[1]).total_cmp(&num(&a[1])));
    for (i, p) in provs.iter().take(5).enumerate() {
        s.push_str(&format!(
            "  {}. {:<10} ¥{:>14.2}  {:>8} orders\n",
            i + 1,
            p[0],
            num(&p[1]),
            p[2]
        ));
    }
    print!("{s}");
    let _ = std::io::stdout().flush();
}
