//! Job counters shared by the workers of a process, printed in the run summary.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Counters for one job.
#[derive(Default)]
pub struct JobMetrics {
    rows_read: Mutex<BTreeMap<String, Arc<AtomicU64>>>,
    rows_written: Mutex<BTreeMap<String, Arc<AtomicU64>>>,
    pub late_rows_dropped: AtomicU64,
    /// Rows dropped by windows because their event time was NULL (as Flink drops them).
    pub null_time_rows_dropped: AtomicU64,
    pub records_skipped: AtomicU64,
    /// Bytes and groups held by aggregation state when its input ended (bounded jobs).
    pub state_bytes: AtomicU64,
    pub state_groups: AtomicU64,
    /// Checkpoints committed, and the size of the last one in bytes.
    pub checkpoints: AtomicU64,
    pub checkpoint_bytes: AtomicU64,
    /// Worker time spent taking snapshots (the part of a checkpoint that holds processing up),
    /// per checkpoint epoch not yet committed, and in all (microseconds).
    snapshot_time: Mutex<BTreeMap<u64, std::time::Duration>>,
    pub snapshot_micros: AtomicU64,
    /// The smallest watermark any source holds (ms), for the live lag display.
    pub source_watermark: AtomicI64,
    /// For each window firing: milliseconds from the source making the watermark that closed
    /// the windows to the aggregation emitting them (event-time windows; the latency benchmark
    /// reads it).
    pub window_fire_ms: Mutex<Vec<u32>>,
    /// Each stateful operator's state as last reported (by "operator on worker"): bytes and
    /// keys, for the memory limit's message and the platform's quotas.
    states: Mutex<BTreeMap<String, (u64, u64)>>,
    /// Bytes of rows in flight, by where they wait: in the queues of an exchange between this
    /// process's workers ("exchange into Join"), or held by an operator ("Join on worker 0":
    /// input held back for a checkpoint, or left for later when the output budget ran out).
    in_flight: Mutex<BTreeMap<String, Arc<InFlight>>>,
    /// `EXPLAIN ANALYZE`: rows each plan node produced (by `sluice_sql::plan::node_id`), on all
    /// of this process's workers.
    node_rows: Mutex<std::collections::HashMap<u64, Arc<AtomicU64>>>,
    /// The watermark each stateful operator has reached (by "operator on worker"), in ms.
    watermarks: Mutex<BTreeMap<String, i64>>,
    /// Rows each stateful operator dropped as late (by "operator on worker").
    late: Mutex<BTreeMap<String, u64>>,
    /// Time each operator spent scheduled, on all workers (by operator name), when the job
    /// was started with [`crate::JobOptions::operator_busy`].
    busy: Mutex<BTreeMap<String, std::time::Duration>>,
    /// The plan node (`sluice_sql::plan::node_id`) each stateful operator computes, by the
    /// operator's name, when rows are counted.
    node_names: Mutex<BTreeMap<String, u64>>,
    /// The last [`CHECKPOINT_HISTORY`] checkpoints this process committed.
    checkpoint_history: Mutex<std::collections::VecDeque<CheckpointRecord>>,
}

/// How many committed checkpoints [`JobMetrics::checkpoint_history`] keeps.
pub const CHECKPOINT_HISTORY: usize = 20;

/// One committed checkpoint.
#[derive(Debug, Clone)]
pub struct CheckpointRecord {
    pub epoch: u64,
    /// Bytes and files it wrote.
    pub bytes: u64,
    pub files: u64,
    /// Worker time spent taking its snapshots (held processing up), in ms.
    pub snapshot_ms: f64,
    /// From the epoch's start to its commit, in ms.
    pub duration_ms: u64,
    /// When it committed (Unix ms).
    pub committed_at_ms: i64,
}

/// Bytes of rows in flight at one place: now, and the most there were at once.
#[derive(Default, Debug)]
pub struct InFlight {
    now: AtomicI64,
    peak: AtomicI64,
}

impl InFlight {
    /// Rows of `bytes` arrive.
    pub fn add(&self, bytes: usize) {
        let now = self.now.fetch_add(bytes as i64, Ordering::Relaxed) + bytes as i64;
        self.peak.fetch_max(now, Ordering::Relaxed);
    }

    /// Rows of `bytes` leave.
    pub fn sub(&self, bytes: usize) {
        self.now.fetch_sub(bytes as i64, Ordering::Relaxed);
    }

    /// Bytes in flight now.
    pub fn now(&self) -> i64 {
        self.now.load(Ordering::Relaxed)
    }

    /// The most bytes that were in flight at once.
    pub fn peak(&self) -> i64 {
        self.peak.load(Ordering::Relaxed)
    }
}

/// How often a stateful operator reports its state size.
pub const STATE_REPORT_EVERY: std::time::Duration = std::time::Duration::from_millis(250);

/// A stateful operator's reporting of its state size, at most every [`STATE_REPORT_EVERY`],
/// and rarer when measuring takes long (some states are measured by a walk over their keys):
/// measuring takes at most about 2% of the operator's time.
pub struct StateGauge {
    name: String,
    next: Option<std::time::Instant>,
}

impl StateGauge {
    pub fn new(operator: &str, worker: usize) -> Self {
        StateGauge {
            name: format!("{operator} on worker {worker}"),
            next: None,
        }
    }

    /// Counts rows the operator dropped as late.
    pub fn late(&self, metrics: &JobMetrics, rows: u64) {
        *metrics
            .late
            .lock()
            .expect("metrics")
            .entry(self.name.clone())
            .or_default() += rows;
    }

    /// Reports the watermark the operator reached.
    pub fn watermark(&self, metrics: &JobMetrics, watermark: i64) {
        metrics
            .watermarks
            .lock()
            .expect("metrics")
            .insert(self.name.clone(), watermark);
    }

    /// Reports the state's size when it is due; `size` (bytes, keys) is computed only then.
    pub fn report(&mut self, metrics: &JobMetrics, size: impl FnOnce() -> (u64, u64)) {
        let now = std::time::Instant::now();
        if self.next.is_some_and(|t| now < t) {
            return;
        }
        let (bytes, keys) = size();
        self.next = Some(now + STATE_REPORT_EVERY.max(now.elapsed() * 50));
        metrics
            .states
            .lock()
            .expect("metrics")
            .insert(self.name.clone(), (bytes, keys));
    }
}

impl JobMetrics {
    pub fn new() -> Arc<Self> {
        let m = JobMetrics::default();
        m.source_watermark.store(i64::MIN, Ordering::Relaxed);
        Arc::new(m)
    }

    /// Records a committed checkpoint.
    pub fn record_checkpoint(&self, record: CheckpointRecord) {
        let mut h = self.checkpoint_history.lock().expect("metrics");
        if h.len() == CHECKPOINT_HISTORY {
            h.pop_front();
        }
        h.push_back(record);
    }

    /// The last checkpoints committed, oldest first.
    pub fn checkpoint_history(&self) -> Vec<CheckpointRecord> {
        self.checkpoint_history
            .lock()
            .expect("metrics")
            .iter()
            .cloned()
            .collect()
    }

    /// Rows each stateful operator dropped as late (by "operator on worker").
    pub fn late_by_operator(&self) -> BTreeMap<String, u64> {
        self.late.lock().expect("metrics").clone()
    }

    /// The watermark each stateful operator reached (by "operator on worker"), in ms.
    pub fn watermarks(&self) -> BTreeMap<String, i64> {
        self.watermarks.lock().expect("metrics").clone()
    }

    /// Adds scheduled time per operator name.
    pub fn add_busy(&self, times: impl IntoIterator<Item = (String, std::time::Duration)>) {
        let mut busy = self.busy.lock().expect("metrics");
        for (name, t) in times {
            *busy.entry(name).or_default() += t;
        }
    }

    /// Time each operator spent scheduled, on all workers, by operator name.
    pub fn busy(&self) -> BTreeMap<String, std::time::Duration> {
        self.busy.lock().expect("metrics").clone()
    }

    /// The counter of rows read from a table.
    pub fn read_counter(&self, table: &str) -> Arc<AtomicU64> {
        self.rows_read
            .lock()
            .expect("metrics")
            .entry(table.to_string())
            .or_default()
            .clone()
    }

    /// Records that the stateful operator `name` computes plan node `node`.
    pub fn name_node(&self, name: &str, node: u64) {
        self.node_names
            .lock()
            .expect("metrics")
            .insert(name.to_string(), node);
    }

    /// The plan node each stateful operator computes, by the operator's name (when rows are
    /// counted, as for `EXPLAIN ANALYZE` and the server's processes).
    pub fn node_names(&self) -> BTreeMap<String, u64> {
        self.node_names.lock().expect("metrics").clone()
    }

    /// The counter of rows plan node `node` (a `sluice_sql::plan::node_id`) produces.
    pub fn node_counter(&self, node: u64) -> Arc<AtomicU64> {
        self.node_rows
            .lock()
            .expect("metrics")
            .entry(node)
            .or_default()
            .clone()
    }

    /// Rows per plan node, for `EXPLAIN ANALYZE`.
    pub fn node_rows(&self) -> std::collections::HashMap<u64, u64> {
        self.node_rows
            .lock()
            .expect("metrics")
            .iter()
            .map(|(k, v)| (*k, v.load(Ordering::Relaxed)))
            .collect()
    }

    /// The counter of rows written to a sink.
    pub fn write_counter(&self, sink: &str) -> Arc<AtomicU64> {
        self.rows_written
            .lock()
            .expect("metrics")
            .entry(sink.to_string())
            .or_default()
            .clone()
    }

    /// Rows read per source.
    pub fn rows_read(&self) -> BTreeMap<String, u64> {
        self.rows_read
            .lock()
            .expect("metrics")
            .iter()
            .map(|(k, v)| (k.clone(), v.load(Ordering::Relaxed)))
            .collect()
    }

    /// Rows written per sink.
    pub fn rows_written(&self) -> BTreeMap<String, u64> {
        self.rows_written
            .lock()
            .expect("metrics")
            .iter()
            .map(|(k, v)| (k.clone(), v.load(Ordering::Relaxed)))
            .collect()
    }

    /// Adds an operator's snapshot time for checkpoint `epoch`.
    pub fn record_snapshot(&self, epoch: u64, took: std::time::Duration) {
        *self
            .snapshot_time
            .lock()
            .expect("metrics")
            .entry(epoch)
            .or_default() += took;
        self.snapshot_micros
            .fetch_add(took.as_micros() as u64, Ordering::Relaxed);
    }

    /// The snapshot time of checkpoint `epoch` in this process (forgetting it and older ones).
    pub fn take_snapshot_time(&self, epoch: u64) -> std::time::Duration {
        let mut times = self.snapshot_time.lock().expect("metrics");
        let took = times.get(&epoch).copied().unwrap_or_default();
        times.retain(|e, _| *e > epoch);
        took
    }

    /// The meter of rows in flight at `place` (shared by every worker of the process that
    /// names the same place).
    pub fn in_flight_meter(&self, place: &str) -> Arc<InFlight> {
        self.in_flight
            .lock()
            .expect("metrics")
            .entry(place.to_string())
            .or_default()
            .clone()
    }

    /// Bytes in flight by place: now, and the most at once.
    pub fn in_flight(&self) -> BTreeMap<String, (i64, i64)> {
        self.in_flight
            .lock()
            .expect("metrics")
            .iter()
            .map(|(k, v)| (k.clone(), (v.now(), v.peak())))
            .collect()
    }

    /// The place with the most bytes in flight now, and those bytes.
    pub fn largest_in_flight(&self) -> Option<(String, i64)> {
        self.in_flight()
            .into_iter()
            .map(|(place, (now, _))| (place, now))
            .max_by_key(|(_, now)| *now)
    }

    /// The state all operators hold, as last reported: bytes and keys.
    pub fn state_now(&self) -> (u64, u64) {
        self.states
            .lock()
            .expect("metrics")
            .values()
            .fold((0, 0), |(b, k), (bytes, keys)| (b + bytes, k + keys))
    }

    /// Bytes of rows in flight now, everywhere.
    pub fn in_flight_now(&self) -> i64 {
        self.in_flight
            .lock()
            .expect("metrics")
            .values()
            .map(|m| m.now())
            .sum()
    }

    /// Each stateful operator's state as last reported (`operator on worker n`): bytes, keys.
    pub fn states(&self) -> BTreeMap<String, (u64, u64)> {
        self.states.lock().expect("metrics").clone()
    }

    /// The operator holding the most state (as last reported): name, bytes, keys.
    pub fn largest_state(&self) -> Option<(String, u64, u64)> {
        self.states
            .lock()
            .expect("metrics")
            .iter()
            .max_by_key(|(_, (bytes, keys))| (*bytes, *keys))
            .map(|(name, (bytes, keys))| (name.clone(), *bytes, *keys))
    }
}
