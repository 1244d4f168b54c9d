//! `'sluice.memory.limit'`: the watch that fails a job past it, naming its largest state.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use sluice_common::Error;

use crate::runtime::metrics::JobMetrics;

/// The memory limit in bytes: `'sluice.memory.limit'`, or 80% of the machine's memory.
pub(crate) fn memory_limit(set: Option<u64>) -> u64 {
    set.unwrap_or_else(|| machine_memory().map_or(u64::MAX, |m| m / 10 * 8))
}

/// The machine's memory (`MemTotal`), where the system says.
pub(crate) fn machine_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    kilobytes(&info, "MemTotal:")
}

/// This process's resident memory (`VmRSS`).
pub fn resident_memory() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    kilobytes(&status, "VmRSS:")
}

pub(crate) fn kilobytes(text: &str, field: &str) -> Option<u64> {
    let line = text.lines().find_map(|l| l.strip_prefix(field))?;
    let kb: u64 = line.trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kb * 1024)
}

pub(crate) fn megabytes(bytes: u64) -> String {
    format!("{:.0} MB", bytes as f64 / (1u64 << 20) as f64)
}

/// Watches the process's memory while the job runs: past the limit, the job fails with a
/// message naming the operator with the largest state, rather than the system killing it.
pub(crate) struct MemoryWatch {
    pub(crate) done: Arc<std::sync::atomic::AtomicBool>,
}

impl MemoryWatch {
    pub(crate) fn start(
        limit: u64,
        metrics: Arc<JobMetrics>,
        control: Arc<crate::runtime::control::JobControl>,
    ) -> MemoryWatch {
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop = done.clone();
        let _ = std::thread::Builder::new()
            .name("memory-limit".into())
            .spawn(move || {
                while !stop.load(Ordering::Relaxed) && !control.failed() {
                    let used = resident_memory().unwrap_or(0);
                    if used > limit {
                        let largest = match metrics.largest_state() {
                            Some((name, bytes, keys)) if bytes > 0 => {
                                format!("the largest state is {name}'s, {} in {keys} keys", megabytes(bytes))
                            }
                            Some((name, _, keys)) => format!("the largest state is {name}'s, {keys} keys"),
                            None => "no operator reported its state yet".to_string(),
                        };
                        let in_flight = match metrics.largest_in_flight() {
                            Some((place, bytes)) if bytes > 0 => format!(
                                "; the most rows in flight wait in {place}, {}",
                                megabytes(bytes as u64)
                            ),
                            _ => String::new(),
                        };
                        control.fail(Error::Runtime(format!(
                            "the job uses {} of memory, more than 'sluice.memory.limit' = {}; {largest}{in_flight}. \
                             Raise the limit, run more processes, or bound the state (windows, \
                             'table.exec.state.ttl')",
                            megabytes(used),
                            megabytes(limit)
                        )));
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            });
        MemoryWatch { done }
    }
}

impl Drop for MemoryWatch {
    fn drop(&mut self) {
        self.done.store(true, Ordering::Relaxed);
    }
}
