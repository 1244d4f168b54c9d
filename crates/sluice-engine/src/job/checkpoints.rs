//! A run's checkpoints: the store, the checkpoint to restore, and the identity of its sources.

use std::collections::BTreeMap;
use std::sync::Arc;

use sluice_common::{Error, Result};
use sluice_sql::JobPlan;

use crate::runtime::Epoch;

/// Checkpointing for one run: the store, and what the run resumes from.
#[derive(Clone)]
pub(crate) struct RunCheckpoints {
    pub(crate) config: crate::checkpoint::CheckpointConfig,
    pub(crate) store: Arc<sluice_state::checkpoint::CheckpointStore>,
    pub(crate) restore: Option<sluice_state::checkpoint::Manifest>,
    pub(crate) base: Epoch,
    pub(crate) fingerprint: String,
    pub(crate) sources: BTreeMap<String, String>,
    /// Readers that ended (see [`crate::checkpoint::EndedReaders`]).
    pub(crate) ended: crate::checkpoint::EndedReaders,
}

pub(crate) fn prepare_checkpoints(plan: &JobPlan, fresh: bool) -> Result<Option<RunCheckpoints>> {
    let job_config = sluice_sql::config::JobConfig::parse(&plan.settings)?;
    let Some(config) = crate::checkpoint::CheckpointConfig::from_config(&job_config) else {
        return Ok(None);
    };
    let store = Arc::new(sluice_state::checkpoint::CheckpointStore::open(
        &config.dir,
        &plan.settings,
    )?);
    let fingerprint = crate::checkpoint::fingerprint(plan);
    let sources = crate::checkpoint::source_identities(plan);
    let latest = store
        .latest(|epoch, why| tracing::warn!("checkpoint {epoch} is damaged and skipped: {why}"))?;
    // A finished job's record is nothing to go on from: with --fresh, start over.
    let latest = match latest {
        Some(m) if fresh && m.epoch == crate::checkpoint::FINISHED => {
            store.clear()?;
            None
        }
        other => other,
    };
    let restore = match (&config.recovery_path, fresh) {
        (_, true) => None,
        (None, false) => latest.clone(),
        (Some(path), false) => {
            // An explicit checkpoint must exist and be whole: no silent fallback.
            let (root, epoch) = sluice_state::checkpoint::parse_checkpoint_path(path).ok_or_else(|| {
                Error::plan(format!(
                    "'execution.state-recovery.path' = '{path}' must name one checkpoint folder, like .../chk-0000000000000042"
                ))
            })?;
            if std::path::Path::new(&root) != std::path::Path::new(config.dir.trim_end_matches('/'))
            {
                return Err(Error::plan(format!(
                    "'execution.state-recovery.path' = '{path}' is outside 'execution.checkpointing.dir' = '{}'; \
                     copy the checkpoint there or point the checkpoint directory at its folder",
                    config.dir
                )));
            }
            let manifest = store.complete(epoch).map_err(|e| {
                Error::plan(format!("'execution.state-recovery.path' = '{path}': {e}"))
            })?;
            Some(manifest)
        }
    };
    if let Some(m) = &restore {
        if m.plan_fingerprint != fingerprint {
            return Err(Error::plan(format!(
                "the checkpoint in '{}' (epoch {}) was taken by a different pipeline: its operators or state layout differ \
                 from this script's; run the original script, or start over with --fresh",
                config.dir, m.epoch
            )));
        }
        let allow = job_config.allow_changed_sources;
        for (table, was) in &m.sources {
            match sources.get(table) {
                Some(now) if now != was && !allow => {
                    return Err(Error::plan(format!(
                        "the checkpoint in '{}' (epoch {}) read another input for source table '{table}': \
                         then {was}, now {now}. Its offsets would skip or repeat rows of this input: start over \
                         with --fresh, or, if the input is the same data moved, \
                         SET 'sluice.state-recovery.allow-changed-sources' = 'true'",
                        config.dir, m.epoch
                    )));
                }
                Some(now) if now != was => tracing::warn!(
                    "source table '{table}' changed since checkpoint {} (then {was}, now {now}); \
                     restoring anyway ('sluice.state-recovery.allow-changed-sources')",
                    m.epoch
                ),
                _ => {}
            }
        }
        tracing::info!(
            "resuming from checkpoint {} in {} (taken with {} workers)",
            m.epoch,
            config.dir,
            m.workers
        );
    }
    // New checkpoints sort after every existing one, restored or not; what killed runs left
    // where they will go is deleted first (committing one takes the files in its folder).
    let base = latest.map(|m| m.epoch + 1).unwrap_or(0);
    store.discard_from(base, crate::checkpoint::STAGING)?;
    Ok(Some(RunCheckpoints {
        config,
        store,
        restore,
        base,
        fingerprint,
        sources,
        ended: Default::default(),
    }))
}
