//! Combining watermarks from several senders: the minimum over all of them.

use std::collections::HashMap;

use sluice_common::time::MIN_WATERMARK;

/// Tracks the latest watermark of each sender on an input; the input's watermark is their
/// minimum, and stays at `-inf` until every expected sender has reported.
pub struct WatermarkTracker {
    expected: usize,
    latest: HashMap<u32, i64>,
    current: i64,
}

impl WatermarkTracker {
    pub fn new(expected: usize) -> Self {
        WatermarkTracker {
            expected,
            latest: HashMap::new(),
            current: MIN_WATERMARK,
        }
    }

    /// The combined watermark.
    pub fn current(&self) -> i64 {
        self.current
    }

    /// Records a sender's watermark; returns the combined watermark if it advanced.
    pub fn observe(&mut self, from: u32, ts: i64) -> Option<i64> {
        let slot = self.latest.entry(from).or_insert(MIN_WATERMARK);
        *slot = (*slot).max(ts);
        if self.latest.len() < self.expected {
            return None;
        }
        let min = self.latest.values().copied().min().unwrap_or(MIN_WATERMARK);
        (min > self.current).then(|| {
            self.current = min;
            min
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minimum_over_all_senders() {
        let mut t = WatermarkTracker::new(2);
        assert_eq!(t.observe(0, 100), None, "sender 1 has not reported yet");
        assert_eq!(t.observe(1, 50), Some(50));
        assert_eq!(t.observe(1, 200), Some(100));
        assert_eq!(t.observe(0, 90), None, "watermarks never go back");
        assert_eq!(t.current(), 100);
    }
}
