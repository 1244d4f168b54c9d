//! The end of a job that checkpoints: every process seals, then publishes, through markers in
//! the checkpoint store.

use super::*;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice_common::{Error, Result};
use sluice_connectors::{open_sink, ConnectorSpec};
use sluice_sql::{JobPlan, SinkTarget, TableDef};

/// For the recovery tests (the `fault-injection` feature): `SLUICE_CRASH_AT=<point>` ends the
/// process at that point of the end of a job, as a kill there would. Release builds have no such
/// code.
pub(crate) fn crash_point(point: &str) {
    #[cfg(feature = "fault-injection")]
    if std::env::var("SLUICE_CRASH_AT").is_ok_and(|p| p == point) {
        tracing::info!("stopping at {point} (SLUICE_CRASH_AT)");
        std::process::exit(137);
    }
    #[cfg(not(feature = "fault-injection"))]
    let _ = point;
}

/// How long one process of a cluster waits for the others at the end of a job.
pub(crate) const FINISH_TIMEOUT: Duration = Duration::from_secs(60);

/// The end of a job that checkpoints, run as `processes` processes (one or more) that share its
/// checkpoint store. Sinks sealed their last output for [`crate::checkpoint::FINISHED`];
/// publishing it must wait until the job has recorded that it finished, and that record may go
/// only once every process has sealed. The store is the meeting point: each process leaves
/// marker files in the `FINISHED` checkpoint folder (no manifest, so never a checkpoint).
pub(crate) struct Finish<'a> {
    pub(crate) plan: &'a JobPlan,
    pub(crate) c: &'a RunCheckpoints,
    pub(crate) process: usize,
    pub(crate) processes: usize,
    /// Workers in every process of this run.
    pub(crate) workers_per_process: usize,
}

impl Finish<'_> {
    /// A marker's name says which workers' output it speaks for.
    pub(crate) fn marker(&self, step: &str, process: usize) -> String {
        format!(
            "{step}-{process}-of-{}x{}",
            self.processes, self.workers_per_process
        )
    }

    /// At the start of a run that resumes or starts over: markers this process left in an
    /// earlier run that was killed before the job's end was recorded mean nothing now. (Process 0
    /// cannot reach the end of this run before every process has joined the cluster, that is,
    /// after this.)
    pub(crate) fn forget_earlier_markers(&self) -> Result<()> {
        for step in ["sealed", "published"] {
            self.c.store.remove(
                crate::checkpoint::FINISHED,
                &self.marker(step, self.process),
            )?;
        }
        Ok(())
    }

    /// Waits until `ready` holds, up to [`FINISH_TIMEOUT`].
    pub(crate) fn wait(&self, what: &str, mut ready: impl FnMut() -> Result<bool>) -> Result<()> {
        let deadline = Instant::now() + FINISH_TIMEOUT;
        while !ready()? {
            if Instant::now() >= deadline {
                return Err(Error::Runtime(format!(
                    "process {} of {}: {what} within {} s; run the same command again on every process to finish the job",
                    self.process,
                    self.processes,
                    FINISH_TIMEOUT.as_secs()
                )));
            }
            std::thread::sleep(sluice_state::checkpoint::COMMIT_POLL);
        }
        Ok(())
    }

    /// Waits for every process's `step` marker.
    pub(crate) fn wait_for_all(&self, step: &str, what: &str) -> Result<()> {
        let store = &self.c.store;
        let mut missing: Vec<usize> = (0..self.processes).collect();
        self.wait(what, || {
            let mut still = vec![];
            for p in missing.drain(..) {
                if store
                    .size(crate::checkpoint::FINISHED, &self.marker(step, p))?
                    .is_none()
                {
                    still.push(p);
                }
            }
            missing = still;
            Ok(missing.is_empty())
        })
    }

    /// After this run's workers ended: every process seals, process 0 records the job's end,
    /// every process publishes its workers' sealed output, and once all have, process 0 drops
    /// the checkpoints.
    pub(crate) fn run_to_end(&self) -> Result<()> {
        let finished = crate::checkpoint::FINISHED;
        let store = &self.c.store;
        crash_point("final-seal");
        store.put(finished, &self.marker("sealed", self.process), vec![])?;
        if self.process == 0 {
            self.wait_for_all("sealed", "not every process sealed its last output")?;
            store.commit(&sluice_state::checkpoint::Manifest {
                version: sluice_state::checkpoint::FORMAT_VERSION,
                epoch: finished,
                plan_fingerprint: self.c.fingerprint.clone(),
                sources: self.c.sources.clone(),
                checksums: Default::default(),
                workers: self.processes * self.workers_per_process,
                files: Default::default(),
                inherited: Default::default(),
            })?;
        } else {
            self.wait("process 0 did not record the end of the job", || {
                store.is_committed(finished)
            })?;
        }
        crash_point("final-marker");
        self.publish()
    }

    /// Tells the readers that ended what is committed now: after the job's recorded end, every
    /// finished one; after a graceful stop, those whose stop checkpoint committed. The others
    /// are dropped untold (a queue redelivers what they did not acknowledge).
    pub(crate) fn tell_ended_readers(&self, stopped: bool) -> Result<()> {
        let ended = std::mem::take(&mut *self.c.ended.lock().expect("not poisoned"));
        for (mut reader, stop) in ended {
            match stop {
                None if !stopped => reader.job_finished()?,
                Some(epoch) if self.c.store.is_committed(epoch)? => reader.committed(epoch)?,
                _ => {}
            }
        }
        Ok(())
    }

    /// Publishes what this process's workers sealed for the job's end (with another worker
    /// count than the run that sealed it, what the workers they replace sealed, as a restore
    /// would), then, on process 0, drops the checkpoints once every process has published.
    pub(crate) fn publish(&self) -> Result<()> {
        let finished = crate::checkpoint::FINISHED;
        // Each table, and how many INSERTs write into it (each its own part files).
        let mut tables: BTreeMap<String, (Arc<TableDef>, usize)> = BTreeMap::new();
        for p in &self.plan.pipelines {
            if let SinkTarget::Table(t) = &p.sink {
                tables.entry(t.name.clone()).or_insert((t.clone(), 0)).1 += 1;
            }
            let mut late = vec![];
            collect_late_sinks(&p.query, &mut late);
            for t in late {
                tables.entry(t.name.clone()).or_insert((t, 1));
            }
        }
        let workers = self.processes * self.workers_per_process;
        let mine =
            self.process * self.workers_per_process..(self.process + 1) * self.workers_per_process;
        for (t, inserts) in tables.values() {
            for sink_instance in 0..*inserts {
                let spec = ConnectorSpec {
                    sink_instance,
                    ..sink_spec(t)
                };
                for w in mine.clone() {
                    let mut sink = open_sink(&spec, w, workers)?;
                    crate::checkpoint::transactions::begin(
                        sink.as_mut(),
                        &self.c.store,
                        Some(finished),
                        w,
                        workers,
                    )?;
                }
            }
        }
        self.c
            .store
            .put(finished, &self.marker("published", self.process), vec![])?;
        crash_point("final-published");
        if self.process == 0 {
            self.wait_for_all("published", "not every process published its last output")?;
            self.c.store.clear()?;
        }
        Ok(())
    }
}
