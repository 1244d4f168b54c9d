//! Each pipeline's throughput, lag and state over the last hour, for the console's charts and
//! its pipelines list: sampled from the stats its process writes, by the server's quota
//! thread every second, and kept every [`KEEP_EVERY_MS`] for [`KEEP_MS`].

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use serde::Serialize;
use serde_json::Value;

/// How long samples are kept.
pub const KEEP_MS: i64 = 3_600_000;
/// One sample is kept per this many milliseconds (720 in an hour).
pub const KEEP_EVERY_MS: i64 = 5_000;

/// A pipeline's figures at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, utoipa::ToSchema)]
pub struct Sample {
    /// When its process wrote the stats (Unix ms).
    pub at_ms: i64,
    /// Rows its sources read, and its sinks wrote, per second since the stats before.
    pub rows_in_per_second: f64,
    pub rows_out_per_second: f64,
    /// How far the sources' watermark is behind the clock (none before the first watermark).
    pub lag_ms: Option<i64>,
    pub state_bytes: u64,
}

#[derive(Default)]
struct Track {
    /// The counters of the stats seen last: rows read, rows written, when.
    counters: Option<(u64, u64, i64)>,
    /// The newest sample, while the pipeline runs.
    latest: Option<Sample>,
    samples: VecDeque<Sample>,
}

#[derive(Default)]
pub struct History {
    tracks: Mutex<HashMap<(String, String), Track>>,
}

fn sum(v: &Value) -> u64 {
    v.as_object()
        .map(|o| o.values().filter_map(Value::as_u64).sum())
        .unwrap_or(0)
}

impl History {
    fn tracks(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), Track>> {
        self.tracks.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes in a running pipeline's stats (as its process wrote them).
    pub fn observe(&self, tenant: &str, name: &str, stats: &Value) {
        let Some(at) = stats["written_at_ms"].as_i64() else {
            return;
        };
        let read = sum(&stats["rows_read"]);
        let written = sum(&stats["rows_written"]);
        let mut tracks = self.tracks();
        let t = tracks
            .entry((tenant.to_string(), name.to_string()))
            .or_default();
        let before = t.counters.replace((read, written, at));
        let Some((read0, written0, at0)) = before else {
            return;
        };
        if at <= at0 {
            // The same stats again (the process writes them every second).
            return;
        }
        let secs = (at - at0) as f64 / 1000.0;
        // A restarted process counts from zero again: no rate across the restart.
        let rate = |now: u64, then: u64| {
            if now >= then {
                (now - then) as f64 / secs
            } else {
                0.0
            }
        };
        let sample = Sample {
            at_ms: at,
            rows_in_per_second: rate(read, read0),
            rows_out_per_second: rate(written, written0),
            lag_ms: stats["watermark_ms"].as_i64().map(|wm| (at - wm).max(0)),
            state_bytes: stats["state_bytes"].as_u64().unwrap_or(0),
        };
        t.latest = Some(sample);
        if t.samples
            .back()
            .is_none_or(|last| at - last.at_ms >= KEEP_EVERY_MS)
        {
            t.samples.push_back(sample);
        }
        while t.samples.front().is_some_and(|s| at - s.at_ms > KEEP_MS) {
            t.samples.pop_front();
        }
    }

    /// Pipelines that no longer run have no current rates (their samples stay for the charts).
    pub fn idle_except(&self, running: &[(String, String)]) {
        for (key, t) in self.tracks().iter_mut() {
            if !running.contains(key) {
                t.latest = None;
                t.counters = None;
            }
        }
    }

    /// Forgets a dropped pipeline.
    pub fn forget(&self, tenant: &str, name: &str) {
        self.tracks()
            .remove(&(tenant.to_string(), name.to_string()));
    }

    /// The newest sample of a running pipeline.
    pub fn latest(&self, tenant: &str, name: &str) -> Option<Sample> {
        self.tracks()
            .get(&(tenant.to_string(), name.to_string()))
            .and_then(|t| t.latest)
    }

    /// The kept samples, oldest first, and the newest one after them.
    pub fn samples(&self, tenant: &str, name: &str) -> Vec<Sample> {
        let tracks = self.tracks();
        let Some(t) = tracks.get(&(tenant.to_string(), name.to_string())) else {
            return vec![];
        };
        let mut out: Vec<Sample> = t.samples.iter().copied().collect();
        if let Some(l) = t.latest {
            if out.last().is_none_or(|s| s.at_ms < l.at_ms) {
                out.push(l);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn stats(at: i64, read: u64, written: u64, wm: Option<i64>) -> Value {
        json!({ "written_at_ms": at, "rows_read": { "a": read / 2, "b": read - read / 2 },
                "rows_written": { "s": written }, "watermark_ms": wm, "state_bytes": 7 })
    }

    #[test]
    fn rates_come_from_the_counters_between_two_stats() {
        let h = History::default();
        h.observe("t", "p", &stats(10_000, 0, 0, None));
        assert_eq!(h.latest("t", "p"), None);
        h.observe("t", "p", &stats(12_000, 3_000, 500, Some(11_000)));
        let s = h.latest("t", "p").unwrap();
        assert_eq!(
            (s.rows_in_per_second, s.rows_out_per_second, s.lag_ms),
            (1_500.0, 250.0, Some(1_000))
        );
        // The same file read again changes nothing.
        h.observe("t", "p", &stats(12_000, 3_000, 500, Some(11_000)));
        assert_eq!(h.samples("t", "p").len(), 1);
        // A restarted process counts from zero: no negative rate.
        h.observe("t", "p", &stats(13_000, 100, 0, None));
        let s = h.latest("t", "p").unwrap();
        assert_eq!((s.rows_in_per_second, s.lag_ms), (0.0, None));
        assert!(h.latest("u", "p").is_none());
        h.idle_except(&[]);
        assert!(h.latest("t", "p").is_none());
        assert_eq!(h.samples("t", "p").len(), 1);
    }

    #[test]
    fn one_sample_is_kept_per_period_for_an_hour() {
        let h = History::default();
        // Two hours of stats, one per second.
        for s in 0..7_200i64 {
            h.observe("t", "p", &stats(s * 1000, s as u64 * 10, 0, None));
        }
        let kept = h.samples("t", "p");
        // 720 kept in the last hour (one per 5 s), and the newest.
        assert!((720..=722).contains(&kept.len()), "{}", kept.len());
        assert!(kept.windows(2).all(|w| w[1].at_ms > w[0].at_ms));
        assert!(kept[0].at_ms >= 7_199_000 - KEEP_MS);
        assert_eq!(kept.last().unwrap().at_ms, 7_199_000);
        assert!(kept.iter().all(|s| s.rows_in_per_second == 10.0));
        h.forget("t", "p");
        assert!(h.samples("t", "p").is_empty());
    }
}
