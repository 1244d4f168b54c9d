//! Combining watermarks from several senders: the minimum over all of them, leaving out senders
//! that declared themselves idle (and the maximum when all of them are idle).

use std::collections::HashMap;

use sluice_common::time::MIN_WATERMARK;

/// Tracks the latest watermark of each sender on an input; the input's watermark is their
/// minimum, and stays at `-inf` until every expected sender has reported. An idle sender does
/// not hold the minimum back until it sends a watermark again.
pub struct WatermarkTracker {
    expected: usize,
    latest: HashMap<u32, (i64, bool)>,
    current: i64,
    /// Whether this operator told its own receivers that it is idle.
    told_idle: bool,
}

/// What an operator does with a watermark it received.
#[derive(Debug, PartialEq)]
pub struct Progress {
    /// The combined watermark advanced to this: fire what it closes.
    pub advanced: Option<i64>,
    /// Send this downstream as the operator's own watermark: `(ts, idle)`.
    pub forward: Option<(i64, bool)>,
}

impl WatermarkTracker {
    pub fn new(expected: usize) -> Self {
        WatermarkTracker {
            expected,
            latest: HashMap::new(),
            current: MIN_WATERMARK,
            told_idle: false,
        }
    }

    /// The combined watermark.
    pub fn current(&self) -> i64 {
        self.current
    }

    /// True when every expected sender has reported and all of them are idle.
    pub fn all_idle(&self) -> bool {
        self.latest.len() >= self.expected && self.latest.values().all(|(_, idle)| *idle)
    }

    /// Records a sender's watermark and decides what the operator forwards: its new watermark,
    /// that it is idle (all its senders are), or that it is active again.
    pub fn receive(&mut self, from: u32, ts: i64, idle: bool) -> Progress {
        let advanced = self.observe(from, ts, idle);
        let forward = if let Some(wm) = advanced {
            self.told_idle = false;
            Some((wm, false))
        } else if self.all_idle() != self.told_idle {
            self.told_idle = !self.told_idle;
            Some((self.current, self.told_idle))
        } else {
            None
        };
        Progress { advanced, forward }
    }

    /// Records a sender's watermark (or idleness); returns the combined watermark if it advanced.
    pub fn observe(&mut self, from: u32, ts: i64, idle: bool) -> Option<i64> {
        let slot = self.latest.entry(from).or_insert((MIN_WATERMARK, false));
        slot.0 = slot.0.max(ts);
        slot.1 = idle;
        if self.latest.len() < self.expected {
            return None;
        }
        // The minimum over active senders; when all are idle, the maximum over all of them (as
        // Flink does), so that what was sent before everyone went quiet is not held back.
        let candidate = if self.all_idle() {
            self.latest.values().map(|(wm, _)| *wm).max()?
        } else {
            self.latest
                .values()
                .filter(|(_, idle)| !idle)
                .map(|(wm, _)| *wm)
                .min()?
        };
        (candidate > self.current).then(|| {
            self.current = candidate;
            candidate
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minimum_over_all_senders() {
        let mut t = WatermarkTracker::new(2);
        assert_eq!(
            t.observe(0, 100, false),
            None,
            "sender 1 has not reported yet"
        );
        assert_eq!(t.observe(1, 50, false), Some(50));
        assert_eq!(t.observe(1, 200, false), Some(100));
        assert_eq!(t.observe(0, 90, false), None, "watermarks never go back");
        assert_eq!(t.current(), 100);
    }

    #[test]
    fn idle_senders_do_not_hold_the_minimum() {
        let mut t = WatermarkTracker::new(2);
        assert_eq!(t.observe(0, 500, false), None);
        assert_eq!(t.observe(1, i64::MIN, true), Some(500), "sender 1 is idle");
        assert!(!t.all_idle());
        assert_eq!(t.observe(0, 700, false), Some(700));
        assert_eq!(
            t.observe(1, 600, false),
            None,
            "sender 1 is back, behind: the minimum does not regress"
        );
        assert_eq!(
            t.observe(0, 900, false),
            None,
            "sender 1 holds it at 600 now"
        );
        assert_eq!(t.observe(1, 950, false), Some(900));
        assert_eq!(t.observe(0, 900, true), Some(950));
        assert_eq!(t.observe(1, 950, true), None);
        assert!(t.all_idle());
    }

    #[test]
    fn when_all_senders_are_idle_the_maximum_counts() {
        let mut t = WatermarkTracker::new(2);
        assert_eq!(t.observe(0, 800, false), None);
        assert_eq!(
            t.observe(0, 800, true),
            None,
            "sender 1 has not reported yet"
        );
        assert_eq!(
            t.observe(1, i64::MIN, true),
            Some(800),
            "everyone idle: the most advanced watermark stands"
        );
    }

    #[test]
    fn an_operator_forwards_idleness_and_its_end() {
        let mut t = WatermarkTracker::new(1);
        assert_eq!(
            t.receive(0, 10, false),
            Progress {
                advanced: Some(10),
                forward: Some((10, false))
            }
        );
        assert_eq!(
            t.receive(0, 10, true),
            Progress {
                advanced: None,
                forward: Some((10, true))
            }
        );
        assert_eq!(
            t.receive(0, 10, true),
            Progress {
                advanced: None,
                forward: None
            }
        );
        assert_eq!(
            t.receive(0, 10, false),
            Progress {
                advanced: None,
                forward: Some((10, false))
            },
            "active again"
        );
    }
}
