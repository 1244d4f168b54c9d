//! The status of a running job, about once a second: rows read per source and per second, the
//! watermark and its lag behind the wall clock, state, rows in flight, checkpoints and elapsed
//! time. On a terminal it is one line redrawn in place (as cargo and Flink's SQL client show
//! progress); elsewhere it is logged every 10 s.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice_engine::JobMetrics;

/// `--progress`: when to show the status.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// A redrawn line on a terminal; a logged line every 10 s otherwise.
    Auto,
    /// Every second, as a redrawn line on a terminal and as logged lines otherwise.
    Always,
    /// Nothing until the summary.
    Never,
}

/// Shows the status until dropped.
pub struct Progress {
    done: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Progress {
    pub fn start(mode: Mode, metrics: Arc<JobMetrics>) -> Progress {
        let done = Arc::new(AtomicBool::new(false));
        let terminal = std::io::stderr().is_terminal();
        let every = match (mode, terminal) {
            (Mode::Never, _) => None,
            (Mode::Auto, false) => Some(Duration::from_secs(10)),
            _ => Some(Duration::from_secs(1)),
        };
        let thread = every.map(|every| {
            let done = done.clone();
            std::thread::Builder::new()
                .name("progress".into())
                .spawn(move || show(every, terminal, &metrics, &done))
                .expect("a thread for the status line")
        });
        Progress { done, thread }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.done.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn show(every: Duration, terminal: bool, metrics: &JobMetrics, done: &AtomicBool) {
    let started = Instant::now();
    let bar = terminal.then(|| {
        let bar = indicatif::ProgressBar::new_spinner();
        bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
        bar
    });
    let mut before: (Instant, BTreeMap<String, u64>) = (started, BTreeMap::new());
    let mut next = started + every;
    while !done.load(Ordering::Relaxed) {
        // Wake often, so that the end of the job is not held up by this thread.
        std::thread::sleep(Duration::from_millis(50));
        if Instant::now() < next {
            continue;
        }
        next += every;
        let read = metrics.rows_read();
        let line = status(metrics, &read, &before, started.elapsed());
        before = (Instant::now(), read);
        match &bar {
            Some(b) => b.set_message(line),
            None => tracing::info!("progress: {line}"),
        }
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
}

/// One status line.
fn status(
    metrics: &JobMetrics,
    read: &BTreeMap<String, u64>,
    before: &(Instant, BTreeMap<String, u64>),
    elapsed: Duration,
) -> String {
    let seconds = before.0.elapsed().as_secs_f64().max(1e-3);
    let sources: Vec<String> = read
        .iter()
        .map(|(table, n)| {
            let rate = (n - before.1.get(table).copied().unwrap_or(0)) as f64 / seconds;
            format!("{table} {} ({}/s)", count(*n as f64), count(rate))
        })
        .collect();
    let mut parts = vec![
        format!("{:.0} s", elapsed.as_secs_f64()),
        format!("read {}", sources.join(", ")),
    ];
    let wm = metrics.source_watermark.load(Ordering::Relaxed);
    if wm > i64::MIN && wm < i64::MAX {
        let lag = (sluice_common::time::now_millis() - wm) as f64 / 1000.0;
        let at = chrono::DateTime::from_timestamp_millis(wm)
            .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
            .unwrap_or_default();
        parts.push(format!("watermark {at} (lag {})", seconds_text(lag)));
    }
    let (bytes, keys) = metrics.state_now();
    if keys > 0 || bytes > 0 {
        parts.push(format!(
            "state {} in {} keys",
            megabytes(bytes),
            count(keys as f64)
        ));
    }
    let flight = metrics.in_flight_now();
    if flight > 0 {
        parts.push(format!("in flight {}", megabytes(flight as u64)));
    }
    let checkpoints = metrics.checkpoints.load(Ordering::Relaxed);
    if checkpoints > 0 {
        parts.push(format!("{checkpoints} checkpoints"));
    }
    parts.join(" · ")
}

fn count(n: f64) -> String {
    match n {
        n if n >= 1e9 => format!("{:.1} G", n / 1e9),
        n if n >= 1e6 => format!("{:.1} M", n / 1e6),
        n if n >= 1e3 => format!("{:.1} K", n / 1e3),
        n => format!("{n:.0}"),
    }
}

fn megabytes(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / (1u64 << 20) as f64)
}

fn seconds_text(s: f64) -> String {
    if s.abs() >= 86_400.0 {
        format!("{:.0} d", s / 86_400.0)
    } else if s.abs() >= 3_600.0 {
        format!("{:.1} h", s / 3_600.0)
    } else {
        format!("{s:.1} s")
    }
}
