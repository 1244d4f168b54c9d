//! The checkpoint store: snapshot files and manifests behind `object_store`.
//!
//! Layout under the checkpoint directory:
//! ```text
//! chk-0000000000000042/<file>        snapshot files written by operators and sources
//! chk-0000000000000042/_manifest     written last; a checkpoint without it does not exist
//! ```
//! The manifest records every file's size, so a truncated or missing file is detected when the
//! checkpoint is opened, and the previous complete checkpoint is used instead.

use std::collections::BTreeMap;
use std::sync::Arc;

use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use serde::{Deserialize, Serialize};
use sluice_common::{Error, Result};

/// The layout version of checkpoints written by this build.
pub const FORMAT_VERSION: u32 = 1;

/// What a complete checkpoint contains.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub version: u32,
    pub epoch: u64,
    /// Identifies the pipeline's operators and state layout; a restore with another plan fails.
    pub plan_fingerprint: String,
    /// Worker count when taken (state can be restored on another count; offsets may not).
    pub workers: usize,
    /// Every snapshot file and its size in bytes.
    pub files: BTreeMap<String, u64>,
}

/// Splits a path to one checkpoint (`.../chk-0000000000000042`) into its store and epoch.
pub fn parse_checkpoint_path(path: &str) -> Option<(String, u64)> {
    let p = std::path::Path::new(path.trim_end_matches('/'));
    let epoch = p
        .file_name()?
        .to_str()?
        .strip_prefix("chk-")?
        .parse()
        .ok()?;
    Some((p.parent()?.to_str()?.to_string(), epoch))
}

/// A checkpoint directory (local path, or a `file://` URL).
pub struct CheckpointStore {
    store: Arc<dyn ObjectStore>,
    runtime: tokio::runtime::Runtime,
    location: String,
}

fn store_error(location: &str, e: impl std::fmt::Display) -> Error {
    Error::Runtime(format!("checkpoint storage '{location}': {e}"))
}

fn checkpoint_dir(epoch: u64) -> String {
    format!("chk-{epoch:016}")
}

impl CheckpointStore {
    /// Opens (creating if needed) a checkpoint directory.
    pub fn open(location: &str) -> Result<Self> {
        let path = location.strip_prefix("file://").unwrap_or(location);
        if path.contains("://") {
            return Err(Error::Plan(format!(
                "'execution.checkpointing.dir' = '{location}': only local directories are supported by this build"
            )));
        }
        std::fs::create_dir_all(path).map_err(|e| Error::io(path, e))?;
        let store = LocalFileSystem::new_with_prefix(path).map_err(|e| store_error(location, e))?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .map_err(|e| store_error(location, e))?;
        Ok(CheckpointStore {
            store: Arc::new(store),
            runtime,
            location: location.to_string(),
        })
    }

    /// Writes one snapshot file of checkpoint `epoch`; returns its size.
    pub fn put(&self, epoch: u64, name: &str, bytes: Vec<u8>) -> Result<u64> {
        let size = bytes.len() as u64;
        let path = Path::from(format!("{}/{name}", checkpoint_dir(epoch)));
        self.runtime
            .block_on(self.store.put(&path, PutPayload::from(bytes)))
            .map_err(|e| store_error(&self.location, e))?;
        Ok(size)
    }

    /// Reads one snapshot file.
    pub fn get(&self, epoch: u64, name: &str) -> Result<bytes::Bytes> {
        let path = Path::from(format!("{}/{name}", checkpoint_dir(epoch)));
        self.runtime
            .block_on(async { self.store.get(&path).await?.bytes().await })
            .map_err(|e| store_error(&self.location, e))
    }

    /// The size of a file of checkpoint `epoch`, if it exists.
    pub fn size(&self, epoch: u64, name: &str) -> Result<Option<u64>> {
        let path = Path::from(format!("{}/{name}", checkpoint_dir(epoch)));
        match self.runtime.block_on(self.store.head(&path)) {
            Ok(meta) => Ok(Some(meta.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(store_error(&self.location, e)),
        }
    }

    /// Whether checkpoint `epoch` was committed (its manifest exists).
    pub fn is_committed(&self, epoch: u64) -> Result<bool> {
        Ok(self.size(epoch, "_manifest")?.is_some())
    }

    /// Deletes one checkpoint's files and folder.
    fn delete(&self, epoch: u64) -> Result<()> {
        let prefix = Path::from(checkpoint_dir(epoch));
        let listing = self
            .runtime
            .block_on(self.store.list_with_delimiter(Some(&prefix)))
            .map_err(|e| store_error(&self.location, e))?;
        for object in listing.objects {
            self.runtime
                .block_on(self.store.delete(&object.location))
                .map_err(|e| store_error(&self.location, e))?;
        }
        // The local store leaves the emptied folder behind.
        let root = self
            .location
            .strip_prefix("file://")
            .unwrap_or(&self.location);
        let _ = std::fs::remove_dir(std::path::Path::new(root).join(checkpoint_dir(epoch)));
        Ok(())
    }

    /// Deletes every checkpoint (after a job finished successfully, as Flink does).
    pub fn clear(&self) -> Result<()> {
        for epoch in self.epochs()? {
            self.delete(epoch)?;
        }
        Ok(())
    }

    /// Commits checkpoint `manifest.epoch`: the manifest is written last, atomically.
    pub fn commit(&self, manifest: &Manifest) -> Result<()> {
        let json =
            serde_json::to_vec_pretty(manifest).map_err(|e| store_error(&self.location, e))?;
        self.put(manifest.epoch, "_manifest", json).map(|_| ())
    }

    /// Epochs of the checkpoints present (complete or not), oldest first.
    fn epochs(&self) -> Result<Vec<u64>> {
        let listing = self
            .runtime
            .block_on(self.store.list_with_delimiter(None))
            .map_err(|e| store_error(&self.location, e))?;
        let mut epochs: Vec<u64> = listing
            .common_prefixes
            .iter()
            .filter_map(|p| p.as_ref().strip_prefix("chk-").and_then(|e| e.parse().ok()))
            .collect();
        epochs.sort();
        Ok(epochs)
    }

    /// Reads and checks a checkpoint's manifest: every file it lists is present, whole.
    pub fn complete(&self, epoch: u64) -> Result<Manifest> {
        let bytes = self.get(epoch, "_manifest")?;
        let manifest: Manifest = serde_json::from_slice(&bytes).map_err(|e| {
            store_error(
                &self.location,
                format!("manifest of {}: {e}", checkpoint_dir(epoch)),
            )
        })?;
        if manifest.version != FORMAT_VERSION {
            return Err(store_error(
                &self.location,
                format!(
                    "{} has format version {}, this build reads {FORMAT_VERSION}",
                    checkpoint_dir(epoch),
                    manifest.version
                ),
            ));
        }
        for (name, size) in &manifest.files {
            let path = Path::from(format!("{}/{name}", checkpoint_dir(epoch)));
            let meta = self
                .runtime
                .block_on(self.store.head(&path))
                .map_err(|e| store_error(&self.location, format!("{name}: {e}")))?;
            if meta.size != *size {
                return Err(store_error(
                    &self.location,
                    format!(
                        "{}/{name} has {} bytes, the manifest says {size}",
                        checkpoint_dir(epoch),
                        meta.size
                    ),
                ));
            }
        }
        Ok(manifest)
    }

    /// The newest complete checkpoint. Ones without a manifest were never committed and are
    /// ignored; damaged ones are skipped and reported through `warn`, so that the caller can log
    /// which checkpoint was passed over and why.
    pub fn latest(&self, mut warn: impl FnMut(u64, &Error)) -> Result<Option<Manifest>> {
        for epoch in self.epochs()?.into_iter().rev() {
            // No manifest: a checkpoint still being written when the job stopped. Not damage.
            let manifest = Path::from(format!("{}/_manifest", checkpoint_dir(epoch)));
            if self.runtime.block_on(self.store.head(&manifest)).is_err() {
                continue;
            }
            match self.complete(epoch) {
                Ok(m) => return Ok(Some(m)),
                Err(e) => warn(epoch, &e),
            }
        }
        Ok(None)
    }

    /// Deletes all but the newest `keep` complete checkpoints, and incomplete ones older than
    /// the newest complete one.
    pub fn retain(&self, keep: usize) -> Result<()> {
        let epochs = self.epochs()?;
        let complete: Vec<u64> = epochs
            .iter()
            .copied()
            .filter(|e| self.complete(*e).is_ok())
            .collect();
        let keep_from = complete.len().saturating_sub(keep.max(1));
        let kept: Vec<u64> = complete[keep_from..].to_vec();
        let newest = kept.last().copied().unwrap_or(0);
        for epoch in epochs {
            if kept.contains(&epoch) || epoch > newest {
                continue;
            }
            self.delete(epoch)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(store: &CheckpointStore, epoch: u64, files: &[(&str, &[u8])]) -> Manifest {
        let mut m = Manifest {
            version: FORMAT_VERSION,
            epoch,
            plan_fingerprint: "p".into(),
            workers: 2,
            files: BTreeMap::new(),
        };
        for (name, bytes) in files {
            let size = store.put(epoch, name, bytes.to_vec()).unwrap();
            m.files.insert(name.to_string(), size);
        }
        m
    }

    #[test]
    fn the_newest_complete_checkpoint_wins_and_damage_falls_back() {
        let dir = tempfile::tempdir().unwrap();
        let store = CheckpointStore::open(dir.path().to_str().unwrap()).unwrap();
        assert_eq!(store.latest(|_, _| {}).unwrap(), None);
        let m10 = manifest(&store, 10, &[("state-0", b"ten")]);
        store.commit(&m10).unwrap();
        let m20 = manifest(&store, 20, &[("state-0", b"twenty")]);
        store.commit(&m20).unwrap();
        // Epoch 30 never got its manifest: it does not exist.
        manifest(&store, 30, &[("state-0", b"thirty")]);
        assert_eq!(store.latest(|_, _| {}).unwrap(), Some(m20.clone()));
        assert_eq!(&store.get(20, "state-0").unwrap()[..], b"twenty");

        // Truncate a file of epoch 20: the store falls back to 10 and says why.
        let file = dir.path().join("chk-0000000000000020").join("state-0");
        std::fs::write(&file, b"twen").unwrap();
        let mut skipped = vec![];
        assert_eq!(
            store
                .latest(|e, err| skipped.push((e, err.to_string())))
                .unwrap(),
            Some(m10.clone())
        );
        assert_eq!(skipped[0].0, 20);
        assert!(
            skipped
                .iter()
                .any(|(_, why)| why.contains("has 4 bytes, the manifest says 6")),
            "{skipped:?}"
        );

        // A missing file too.
        std::fs::remove_file(&file).unwrap();
        assert_eq!(store.latest(|_, _| {}).unwrap(), Some(m10));
    }

    #[test]
    fn retention_keeps_the_newest_complete_checkpoints() {
        let dir = tempfile::tempdir().unwrap();
        let store = CheckpointStore::open(dir.path().to_str().unwrap()).unwrap();
        for epoch in [1, 2, 3, 4] {
            let m = manifest(&store, epoch, &[("s", b"x")]);
            store.commit(&m).unwrap();
        }
        manifest(&store, 5, &[("s", b"in progress")]);
        store.retain(2).unwrap();
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(
            left,
            vec![
                "chk-0000000000000003",
                "chk-0000000000000004",
                "chk-0000000000000005"
            ],
            "an in-progress newer checkpoint is left alone"
        );
    }
}
