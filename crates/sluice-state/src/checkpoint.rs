//! The checkpoint store: snapshot files and manifests behind `object_store`.
//!
//! Layout under the checkpoint directory:
//! ```text
//! chk-0000000000000042/<file>        snapshot files written by operators and sources
//! chk-0000000000000042/_manifest     written last; a checkpoint without it does not exist
//! ```
//! The manifest records every file's size, and every file (the manifest too) ends with a
//! CRC-32C of its bytes ([`TRAILER`]), so a truncated, missing or altered file is detected when
//! the checkpoint is opened, and the previous complete checkpoint is used instead. The committer
//! also copies each file's checksum into the manifest (`checksums`), read from the file's own
//! trailer, so that a well-formed file put in another's place is detected too.
//!
//! Incremental checkpoints: an operator's file `state-op3-w0` is a full snapshot, while
//! `state-op3-w0+41` holds only what changed since its snapshot in committed checkpoint 41. The
//! manifest then *inherits* the files of checkpoint 41 that the delta builds on (the *chain*:
//! one full snapshot and the deltas after it), and retention keeps inherited files alive after
//! the checkpoint that wrote them is gone.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use serde::{Deserialize, Serialize};
use sluice_common::{Error, Result};

/// The layout version of checkpoints written by this build (2: files end with a checksum).
pub const FORMAT_VERSION: u32 = 2;

/// The last bytes of every checkpoint file: a marker, then the CRC-32C of the bytes before it
/// (little-endian).
pub const TRAILER: usize = 8;
const TRAILER_MARK: &[u8; 4] = b"SLC\x01";

fn trailer(crc: u32) -> [u8; TRAILER] {
    let mut t = [0u8; TRAILER];
    t[..4].copy_from_slice(TRAILER_MARK);
    t[4..].copy_from_slice(&crc.to_le_bytes());
    t
}

/// The content of a checkpoint file, once its checksum matches.
pub fn verified(bytes: bytes::Bytes, what: &str) -> Result<bytes::Bytes> {
    let n = bytes.len();
    if n < TRAILER || &bytes[n - TRAILER..n - 4] != TRAILER_MARK {
        return Err(Error::Runtime(format!(
            "{what}: no checksum at its end (damaged, or written by an older Sluice)"
        )));
    }
    let want = u32::from_le_bytes(bytes[n - 4..].try_into().expect("4 bytes"));
    let got = crc32c::crc32c(&bytes[..n - TRAILER]);
    if got != want {
        return Err(Error::Runtime(format!(
            "{what}: checksum mismatch (the file was altered or damaged)"
        )));
    }
    Ok(bytes.slice(..n - TRAILER))
}

/// A writer that sums what passes through it.
struct Summing<'a> {
    inner: &'a mut dyn std::io::Write,
    crc: u32,
}

impl std::io::Write for Summing<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.crc = crc32c::crc32c_append(self.crc, &buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// What a complete checkpoint contains.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub version: u32,
    pub epoch: u64,
    /// Identifies the pipeline's operators and state layout; a restore with another plan fails.
    pub plan_fingerprint: String,
    /// Worker count when taken (state can be restored on another count; offsets may not).
    pub workers: usize,
    /// Every snapshot file of this checkpoint and its size in bytes.
    pub files: BTreeMap<String, u64>,
    /// Files of earlier checkpoints that deltas here build on (`chk-.../name`), with sizes.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub inherited: BTreeMap<String, u64>,
    /// What identifies each source table's input (connector, path, topic, seed): offsets
    /// restored into another input would skip or repeat rows.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub sources: BTreeMap<String, String>,
    /// The CRC-32C of every file (keyed as `files` and `inherited` are), from the file's own
    /// trailer when committed: a restore checks each file's bytes against both, so that neither
    /// damage nor another well-formed file in its place goes unnoticed.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub checksums: BTreeMap<String, u32>,
}

/// One file of a chain: the checkpoint epoch that wrote it, its name and size.
pub type ChainFile = (u64, String, u64);

/// Splits an inherited file's key (`chk-.../name`) into its epoch and name.
fn split_inherited(path: &str) -> Option<(u64, &str)> {
    let (dir, name) = path.split_once('/')?;
    Some((dir.strip_prefix("chk-")?.parse().ok()?, name))
}

impl Manifest {
    /// The recorded checksum of file `name` written by checkpoint `at`.
    pub fn checksum_of(&self, at: u64, name: &str) -> Option<u32> {
        if at == self.epoch {
            self.checksums.get(name).copied()
        } else {
            self.checksums.get(&inherited_key(at, name)).copied()
        }
    }

    /// The files holding the state of one operator on one worker (`stem`, like `state-op3-w0`),
    /// oldest first: a full snapshot, then the deltas after it.
    pub fn chain(&self, stem: &str) -> Vec<ChainFile> {
        let of_stem = |name: &str| {
            name == stem
                || name
                    .strip_prefix(stem)
                    .is_some_and(|rest| rest.starts_with('+'))
        };
        let mut chain: Vec<ChainFile> = self
            .all_files()
            .into_iter()
            .filter(|(_, name, _)| of_stem(name))
            .collect();
        chain.sort();
        chain
    }

    /// Every file this checkpoint needs: its own and the inherited ones.
    pub fn all_files(&self) -> Vec<ChainFile> {
        let mut all: Vec<ChainFile> = self
            .files
            .iter()
            .map(|(n, s)| (self.epoch, n.clone(), *s))
            .collect();
        all.extend(self.inherited.iter().filter_map(|(path, size)| {
            let (epoch, name) = split_inherited(path)?;
            Some((epoch, name.to_string(), *size))
        }));
        all
    }
}

/// The manifest key of an inherited file.
pub fn inherited_key(epoch: u64, name: &str) -> String {
    format!("{}/{name}", checkpoint_dir(epoch))
}

/// The base checkpoint epoch of a delta file's name (`state-op3-w0+41` → 41).
pub fn delta_base(name: &str) -> Option<u64> {
    name.rsplit_once('+')?.1.parse().ok()
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

/// S3-compatible storage under `s3://bucket/prefix`.
fn s3_store(location: &str, options: &BTreeMap<String, String>) -> Result<Arc<dyn ObjectStore>> {
    let (store, prefix) = s3_bucket(location, "'execution.checkpointing.dir'", options)?;
    Ok(if prefix.is_empty() {
        store
    } else {
        Arc::new(object_store::prefix::PrefixStore::new(store, prefix))
    })
}

/// The bucket of `s3://bucket/prefix`, configured by `options` ([`S3_OPTIONS`]; unset ones
/// come from the usual `AWS_*` environment variables), and the prefix (no slashes around it).
/// `setting` names where the location was given, for messages.
#[cfg(not(feature = "s3"))]
pub fn s3_bucket(
    location: &str,
    setting: &str,
    _: &BTreeMap<String, String>,
) -> Result<(Arc<dyn ObjectStore>, String)> {
    Err(Error::Plan(format!(
        "{setting} = '{location}': this build of Sluice has no S3 support (build it with the default `s3` feature)"
    )))
}

/// The bucket of `s3://bucket/prefix`, configured by `options` ([`S3_OPTIONS`]; unset ones
/// come from the usual `AWS_*` environment variables), and the prefix (no slashes around it).
/// `setting` names where the location was given, for messages.
#[cfg(feature = "s3")]
pub fn s3_bucket(
    location: &str,
    setting: &str,
    options: &BTreeMap<String, String>,
) -> Result<(Arc<dyn ObjectStore>, String)> {
    use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
    // HTTPS goes through rustls with ring (installed once per process; an earlier install,
    // by this or by the embedding program, stands).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rest = location.trim_start_matches("s3://");
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    if bucket.is_empty() {
        return Err(Error::Plan(format!(
            "{setting} = '{location}' names no bucket (s3://bucket/prefix)"
        )));
    }
    let mut builder = AmazonS3Builder::from_env().with_bucket_name(bucket);
    let flag = |key: &str, v: &str| match v.trim().to_ascii_lowercase().as_str() {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err(Error::Plan(format!(
            "'{key}' = '{v}' must be true or false"
        ))),
    };
    for (key, value) in options.iter().filter(|(k, _)| k.starts_with("s3.")) {
        builder = match key.as_str() {
            "s3.endpoint" => builder
                .with_endpoint(value)
                .with_allow_http(value.starts_with("http://")),
            "s3.access-key" => builder.with_access_key_id(value),
            "s3.secret-key" => builder.with_secret_access_key(value),
            "s3.region" => builder.with_region(value),
            "s3.path.style.access" => builder.with_virtual_hosted_style_request(!flag(key, value)?),
            "s3.allow-http" => builder.with_config(
                AmazonS3ConfigKey::Client(object_store::ClientConfigKey::AllowHttp),
                flag(key, value)?.to_string(),
            ),
            _ => {
                return Err(Error::Plan(format!(
                    "'{key}' is not an S3 option (supported: {})",
                    S3_OPTIONS.join(", ")
                )))
            }
        };
    }
    let store = builder
        .build()
        .map_err(|e| Error::Plan(format!("{setting} = '{location}': {e}")))?;
    Ok((Arc::new(store), prefix.trim_matches('/').to_string()))
}

/// A checkpoint directory (local path, `file://` URL, or `s3://bucket/prefix`).
pub struct CheckpointStore {
    store: Arc<dyn ObjectStore>,
    runtime: tokio::runtime::Runtime,
    location: String,
    /// A local directory's path: large files are written straight into it (see
    /// [`CheckpointStore::put_with`]).
    local_root: Option<std::path::PathBuf>,
    /// Commit checks (sinks waiting to publish, operators choosing a delta) are frequent; they
    /// are answered from what this process knows when possible, so that object storage sees a
    /// request per epoch and [`COMMIT_POLL`] at most.
    known: std::sync::Mutex<CommitKnowledge>,
}

/// How often one epoch's commit status is asked of storage while it is not committed.
pub const COMMIT_POLL: std::time::Duration = std::time::Duration::from_millis(20);

#[derive(Default)]
struct CommitKnowledge {
    committed: BTreeSet<u64>,
    /// Epochs found not committed, and when.
    not_yet: BTreeMap<u64, std::time::Instant>,
}

fn store_error(location: &str, e: impl std::fmt::Display) -> Error {
    Error::Runtime(format!("checkpoint storage '{location}': {e}"))
}

fn checkpoint_dir(epoch: u64) -> String {
    format!("chk-{epoch:016}")
}

/// Options of S3-compatible checkpoint storage, named as in Flink (`SET 's3.endpoint' = ...`).
/// Unset ones come from the usual `AWS_*` environment variables.
pub const S3_OPTIONS: [&str; 6] = [
    "s3.endpoint",
    "s3.access-key",
    "s3.secret-key",
    "s3.region",
    "s3.path.style.access",
    "s3.allow-http",
];

impl CheckpointStore {
    /// Opens a checkpoint directory: a local path (created if needed), a `file://` URL, or
    /// `s3://bucket/prefix` on S3-compatible storage configured by `options` ([`S3_OPTIONS`]).
    pub fn open(location: &str, options: &BTreeMap<String, String>) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| store_error(location, e))?;
        let mut local_root = None;
        let store: Arc<dyn ObjectStore> = if location.starts_with("s3://") {
            s3_store(location, options)?
        } else {
            let path = location.strip_prefix("file://").unwrap_or(location);
            if path.contains("://") {
                return Err(Error::Plan(format!(
                    "'execution.checkpointing.dir' = '{location}': unsupported storage (use a local directory, file:// or s3://)"
                )));
            }
            std::fs::create_dir_all(path).map_err(|e| {
                Error::Runtime(format!(
                    "'execution.checkpointing.dir' = '{location}': {}",
                    Error::io(path, e)
                ))
            })?;
            local_root = Some(std::path::PathBuf::from(path));
            Arc::new(LocalFileSystem::new_with_prefix(path).map_err(|e| store_error(location, e))?)
        };
        Ok(CheckpointStore {
            store,
            runtime,
            location: location.to_string(),
            local_root,
            known: Default::default(),
        })
    }

    /// Where the checkpoints are: an absolute local path, or the URL as given.
    pub fn location(&self) -> String {
        match &self.local_root {
            Some(root) => std::fs::canonicalize(root)
                .unwrap_or_else(|_| root.clone())
                .display()
                .to_string(),
            None => self.location.clone(),
        }
    }

    /// Writes one file of checkpoint `epoch` with `write`; returns its size. In a local
    /// directory the bytes go straight to a staging file that is renamed into place when whole
    /// (as `object_store`'s own local uploads do, with a `#<digits>` suffix its listings skip),
    /// instead of through one buffer the size of the file, and past the page cache where the
    /// file system allows it ([`crate::direct_file`]); elsewhere they are buffered and put.
    pub fn put_with(
        &self,
        epoch: u64,
        name: &str,
        write: impl FnOnce(&mut dyn std::io::Write) -> Result<()>,
    ) -> Result<u64> {
        let Some(root) = &self.local_root else {
            let mut bytes = vec![];
            write(&mut bytes)?;
            return self.put(epoch, name, bytes);
        };
        let dest = root.join(checkpoint_dir(epoch)).join(name);
        if let Some(dir) = dest.parent() {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        }
        let mut staging = dest.clone().into_os_string();
        staging.push(format!("#{}", std::process::id()));
        let staging = std::path::PathBuf::from(staging);
        let written = (|| {
            let mut out = crate::direct_file::DirectFile::create(&staging)
                .map_err(|e| Error::io(&staging, e))?;
            let mut summing = Summing {
                inner: &mut out,
                crc: 0,
            };
            write(&mut summing).map_err(|e| {
                Error::Runtime(format!("checkpoint file {}: {e}", staging.display()))
            })?;
            let crc = summing.crc;
            std::io::Write::write_all(&mut out, &trailer(crc))
                .map_err(|e| Error::io(&staging, e))?;
            let size = out.finish().map_err(|e| Error::io(&staging, e))?;
            std::fs::rename(&staging, &dest).map_err(|e| Error::io(&dest, e))?;
            Ok(size)
        })();
        if written.is_err() {
            let _ = std::fs::remove_file(&staging);
        }
        written
    }

    /// Writes one snapshot file of checkpoint `epoch`; returns its size.
    pub fn put(&self, epoch: u64, name: &str, mut bytes: Vec<u8>) -> Result<u64> {
        let crc = crc32c::crc32c(&bytes);
        bytes.extend_from_slice(&trailer(crc));
        let size = bytes.len() as u64;
        let path = Path::from(format!("{}/{name}", checkpoint_dir(epoch)));
        self.runtime
            .block_on(self.store.put(&path, PutPayload::from(bytes)))
            .map_err(|e| store_error(&self.location, e))?;
        Ok(size)
    }

    /// Reads one snapshot file, checking its checksum.
    pub fn get(&self, epoch: u64, name: &str) -> Result<bytes::Bytes> {
        let path = Path::from(format!("{}/{name}", checkpoint_dir(epoch)));
        let bytes = self
            .runtime
            .block_on(async { self.store.get(&path).await?.bytes().await })
            .map_err(|e| store_error(&self.location, e))?;
        verified(
            bytes,
            &format!("{}/{}/{name}", self.location, checkpoint_dir(epoch)),
        )
    }

    /// The checksum a file of checkpoint `epoch` carries in its trailer (its last bytes, read
    /// alone), for the manifest.
    pub fn stored_checksum(&self, epoch: u64, name: &str, size: u64) -> Result<u32> {
        let what = format!("{}/{}/{name}", self.location, checkpoint_dir(epoch));
        if size < TRAILER as u64 {
            return Err(Error::Runtime(format!(
                "{what}: too short to carry a checksum"
            )));
        }
        let path = Path::from(format!("{}/{name}", checkpoint_dir(epoch)));
        let tail = self
            .runtime
            .block_on(self.store.get_range(&path, size - TRAILER as u64..size))
            .map_err(|e| store_error(&self.location, e))?;
        if tail.len() != TRAILER || &tail[..4] != TRAILER_MARK {
            return Err(Error::Runtime(format!("{what}: no checksum at its end")));
        }
        Ok(u32::from_le_bytes(tail[4..].try_into().expect("4 bytes")))
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

    /// Deletes one file of checkpoint `epoch`, if it exists.
    pub fn remove(&self, epoch: u64, name: &str) -> Result<()> {
        let path = Path::from(format!("{}/{name}", checkpoint_dir(epoch)));
        match self.runtime.block_on(self.store.delete(&path)) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(store_error(&self.location, e)),
        }
    }

    /// The files of checkpoint `epoch` present now, with their sizes.
    pub fn list(&self, epoch: u64) -> Result<BTreeMap<String, u64>> {
        let prefix = Path::from(checkpoint_dir(epoch));
        let listing = self
            .runtime
            .block_on(self.store.list_with_delimiter(Some(&prefix)))
            .map_err(|e| store_error(&self.location, e))?;
        Ok(listing
            .objects
            .into_iter()
            .filter_map(|o| Some((o.location.filename()?.to_string(), o.size)))
            .collect())
    }

    /// Whether this process knows that checkpoint `epoch` was committed (no storage request).
    pub fn known_committed(&self, epoch: u64) -> bool {
        self.known
            .lock()
            .expect("commit knowledge")
            .committed
            .contains(&epoch)
    }

    /// Whether checkpoint `epoch` was committed (its manifest exists, or existed: once
    /// committed, retention may delete it). A negative answer may be up to [`COMMIT_POLL`] old.
    pub fn is_committed(&self, epoch: u64) -> Result<bool> {
        {
            let known = self.known.lock().expect("commit knowledge");
            if known.committed.contains(&epoch) {
                return Ok(true);
            }
            if known
                .not_yet
                .get(&epoch)
                .is_some_and(|at| at.elapsed() < COMMIT_POLL)
            {
                return Ok(false);
            }
        }
        let committed = self.size(epoch, "_manifest")?.is_some();
        let mut known = self.known.lock().expect("commit knowledge");
        if committed {
            known.committed.insert(epoch);
            known.not_yet.remove(&epoch);
        } else {
            known.not_yet.insert(epoch, std::time::Instant::now());
            // Forget old questions.
            while known.not_yet.len() > 64 {
                known.not_yet.pop_first();
            }
        }
        Ok(committed)
    }

    /// Deletes one checkpoint's files (but those named in `keep`, which later checkpoints
    /// inherit) and its folder once empty.
    fn delete(&self, epoch: u64, keep: &BTreeSet<String>) -> Result<()> {
        let prefix = Path::from(checkpoint_dir(epoch));
        let listing = self
            .runtime
            .block_on(self.store.list_with_delimiter(Some(&prefix)))
            .map_err(|e| store_error(&self.location, e))?;
        let mut kept = false;
        for object in listing.objects {
            let name = object.location.filename().unwrap_or_default();
            if keep.contains(&inherited_key(epoch, name)) {
                kept = true;
                continue;
            }
            // A file already gone is fine: processes of a cluster may delete at once.
            match self.runtime.block_on(self.store.delete(&object.location)) {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(store_error(&self.location, e)),
            }
        }
        if kept {
            return Ok(());
        }
        // The local store leaves the emptied folder behind.
        if self.location.starts_with("s3://") {
            return Ok(());
        }
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
            self.delete(epoch, &BTreeSet::new())?;
        }
        Ok(())
    }

    /// Commits checkpoint `manifest.epoch`: the manifest is written last, atomically.
    pub fn commit(&self, manifest: &Manifest) -> Result<()> {
        let json =
            serde_json::to_vec_pretty(manifest).map_err(|e| store_error(&self.location, e))?;
        self.put(manifest.epoch, "_manifest", json)?;
        let mut known = self.known.lock().expect("commit knowledge");
        known.committed.insert(manifest.epoch);
        known.not_yet.remove(&manifest.epoch);
        Ok(())
    }

    /// Reads checkpoint `epoch`'s manifest without checking its files.
    pub fn manifest(&self, epoch: u64) -> Result<Manifest> {
        let bytes = self.get(epoch, "_manifest")?;
        serde_json::from_slice(&bytes).map_err(|e| {
            store_error(
                &self.location,
                format!("manifest of {}: {e}", checkpoint_dir(epoch)),
            )
        })
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

    /// Reads and checks a checkpoint's manifest: every file it lists is present, whole, and
    /// matches its checksum (each is read once here: a restore trusts only checked bytes).
    pub fn complete(&self, epoch: u64) -> Result<Manifest> {
        let manifest = self.manifest(epoch)?;
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
        for (at, name, size) in manifest.all_files() {
            let path = Path::from(format!("{}/{name}", checkpoint_dir(at)));
            let meta = self.runtime.block_on(self.store.head(&path)).map_err(|e| {
                store_error(
                    &self.location,
                    format!("{}/{name}: {e}", checkpoint_dir(at)),
                )
            })?;
            if meta.size != size {
                return Err(store_error(
                    &self.location,
                    format!(
                        "{}/{name} has {} bytes, the manifest says {size}",
                        checkpoint_dir(at),
                        meta.size
                    ),
                ));
            }
            let content = self.get(at, &name)?;
            if let Some(want) = manifest.checksum_of(at, &name) {
                if crc32c::crc32c(&content) != want {
                    return Err(store_error(
                        &self.location,
                        format!(
                            "{}/{name} does not match the manifest's checksum (another file in its place?)",
                            checkpoint_dir(at)
                        ),
                    ));
                }
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
    /// Deletes the folders of checkpoints `from` to `until` (exclusive): what runs killed before
    /// they committed those checkpoints left behind. A new run writes its checkpoints from
    /// `from` on, and committing one takes the files present in its folder: a file another run
    /// left there (a source's offsets from further back, say) must not count as this run's.
    /// Processes of one cluster may all do it at once: a file already gone is fine.
    pub fn discard_from(&self, from: u64, until: u64) -> Result<()> {
        for epoch in self.epochs()? {
            if epoch < from || epoch >= until {
                continue;
            }
            self.delete(epoch, &BTreeSet::new())?;
            let mut known = self.known.lock().expect("commit knowledge");
            known.committed.remove(&epoch);
            known.not_yet.remove(&epoch);
        }
        Ok(())
    }

    pub fn retain(&self, keep: usize) -> Result<()> {
        let epochs = self.epochs()?;
        // Committed ones (one request each; the files were checked when the newest committed).
        let complete: Vec<Manifest> = epochs
            .iter()
            .filter_map(|e| self.manifest(*e).ok())
            .collect();
        let keep_from = complete.len().saturating_sub(keep.max(1));
        let kept: Vec<u64> = complete[keep_from..].iter().map(|m| m.epoch).collect();
        // Files the kept checkpoints inherit stay, whichever checkpoint wrote them.
        let inherited: BTreeSet<String> = complete[keep_from..]
            .iter()
            .flat_map(|m| m.inherited.keys().cloned())
            .collect();
        let newest = kept.last().copied().unwrap_or(0);
        for epoch in epochs {
            if kept.contains(&epoch) || epoch > newest {
                continue;
            }
            self.delete(epoch, &inherited)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An S3 store over HTTPS builds its TLS client with the ring provider this build installs
    /// (reqwest has no provider of its own here: without one it would panic). Nothing listens
    /// at the endpoint; only the client is built.
    #[cfg(feature = "s3")]
    #[test]
    fn an_https_s3_store_builds_its_tls_client() {
        let options: BTreeMap<String, String> = [
            ("s3.endpoint", "https://127.0.0.1:9"),
            ("s3.access-key", "a"),
            ("s3.secret-key", "b"),
            ("s3.region", "us-east-1"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        assert!(CheckpointStore::open("s3://bucket/prefix", &options).is_ok());
    }

    fn manifest(store: &CheckpointStore, epoch: u64, files: &[(&str, &[u8])]) -> Manifest {
        let mut m = Manifest {
            version: FORMAT_VERSION,
            epoch,
            plan_fingerprint: "p".into(),
            sources: Default::default(),
            checksums: Default::default(),
            workers: 2,
            files: BTreeMap::new(),
            inherited: BTreeMap::new(),
        };
        for (name, bytes) in files {
            let size = store.put(epoch, name, bytes.to_vec()).unwrap();
            m.files.insert(name.to_string(), size);
        }
        m
    }

    /// Folders of checkpoints a killed run never committed, from a new run's first epoch on,
    /// are deleted; committed ones before it and the special folders above stay.
    #[test]
    fn leftovers_of_killed_runs_are_discarded() {
        let dir = tempfile::tempdir().unwrap();
        let store = CheckpointStore::open(dir.path().to_str().unwrap(), &BTreeMap::new()).unwrap();
        let m10 = manifest(&store, 10, &[("source-0", b"ten")]);
        store.commit(&m10).unwrap();
        manifest(&store, 12, &[("source-0", b"a killed run's")]);
        manifest(&store, 14, &[("source-0+final", b"another")]);
        manifest(&store, u64::MAX - 2, &[("staged", b"kept")]);
        store.discard_from(11, u64::MAX - 2).unwrap();
        assert_eq!(store.epochs().unwrap(), vec![10, u64::MAX - 2]);
        assert_eq!(&store.get(10, "source-0").unwrap()[..], b"ten");
        assert_eq!(store.latest(|_, _| {}).unwrap(), Some(m10));
    }

    #[test]
    fn the_newest_complete_checkpoint_wins_and_damage_falls_back() {
        let dir = tempfile::tempdir().unwrap();
        let store = CheckpointStore::open(dir.path().to_str().unwrap(), &BTreeMap::new()).unwrap();
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
                .any(|(_, why)| why.contains("has 4 bytes, the manifest says 14")),
            "{skipped:?}"
        );

        // Any bit flipped, of the content or the checksum: caught by the checksum. (Sizes
        // count the 8-byte trailer.)
        let whole = std::fs::read(dir.path().join("chk-0000000000000010").join("state-0")).unwrap();
        store.put(20, "state-0", b"twenty".to_vec()).unwrap();
        let good = std::fs::read(&file).unwrap();
        assert_eq!((good.len(), whole.len()), (14, 11));
        for bit in 0..good.len() * 8 {
            let mut bad = good.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            std::fs::write(&file, &bad).unwrap();
            let mut skipped = vec![];
            assert_eq!(
                store
                    .latest(|e, err| skipped.push((e, err.to_string())))
                    .unwrap(),
                Some(m10.clone()),
                "bit {bit}"
            );
            assert!(
                skipped[0].1.contains("checksum") && skipped[0].1.contains("state-0"),
                "{skipped:?}"
            );
            assert!(store.get(20, "state-0").is_err());
        }
        std::fs::write(&file, &good).unwrap();
        assert_eq!(store.latest(|_, _| {}).unwrap(), Some(m20.clone()));
        // A flipped manifest is damage too.
        let manifest_file = dir.path().join("chk-0000000000000020").join("_manifest");
        let mut bytes = std::fs::read(&manifest_file).unwrap();
        bytes[10] ^= 4;
        std::fs::write(&manifest_file, &bytes).unwrap();
        assert_eq!(store.latest(|_, _| {}).unwrap(), Some(m10.clone()));
        bytes[10] ^= 4;
        std::fs::write(&manifest_file, &bytes).unwrap();

        // A missing file too.
        std::fs::remove_file(&file).unwrap();
        assert_eq!(store.latest(|_, _| {}).unwrap(), Some(m10));
    }

    #[test]
    fn deltas_inherit_their_chain_and_retention_keeps_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = CheckpointStore::open(dir.path().to_str().unwrap(), &BTreeMap::new()).unwrap();
        let m10 = manifest(
            &store,
            10,
            &[("state-op0-w1", b"full"), ("state-op0-w10", b"other")],
        );
        store.commit(&m10).unwrap();
        // Checkpoint 20: worker 1 wrote a delta on top of 10, worker 10 a full snapshot.
        let mut m20 = manifest(
            &store,
            20,
            &[("state-op0-w1+10", b"delta"), ("state-op0-w10", b"again")],
        );
        assert_eq!(delta_base("state-op0-w1+10"), Some(10));
        assert_eq!(delta_base("state-op0-w10"), None);
        m20.inherited.insert(inherited_key(10, "state-op0-w1"), 12);
        store.commit(&m20).unwrap();
        assert_eq!(
            m20.chain("state-op0-w1"),
            vec![
                (10, "state-op0-w1".to_string(), 12),
                (20, "state-op0-w1+10".to_string(), 13)
            ]
        );
        assert_eq!(
            m20.chain("state-op0-w10"),
            vec![(20, "state-op0-w10".to_string(), 13)]
        );

        // Retention drops checkpoint 10 but keeps the file 20 inherits from it.
        store.retain(1).unwrap();
        assert_eq!(store.size(10, "_manifest").unwrap(), None);
        assert_eq!(store.size(10, "state-op0-w1").unwrap(), Some(12));
        assert_eq!(store.size(10, "state-op0-w10").unwrap(), None);
        assert_eq!(store.latest(|_, _| {}).unwrap(), Some(m20.clone()));

        // A missing inherited file makes the checkpoint incomplete, naming the file.
        let kept = dir.path().join("chk-0000000000000010").join("state-op0-w1");
        let bytes = std::fs::read(&kept).unwrap();
        std::fs::remove_file(&kept).unwrap();
        let err = store.complete(20).unwrap_err().to_string();
        assert!(err.contains("chk-0000000000000010/state-op0-w1"), "{err}");
        std::fs::write(&kept, bytes).unwrap();

        // Once a full snapshot follows, nothing of 10 or 20 is needed.
        let m30 = manifest(
            &store,
            30,
            &[("state-op0-w1", b"full"), ("state-op0-w10", b"full")],
        );
        store.commit(&m30).unwrap();
        store.retain(1).unwrap();
        let left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(left, vec!["chk-0000000000000030"]);
    }

    #[test]
    fn retention_keeps_the_newest_complete_checkpoints() {
        let dir = tempfile::tempdir().unwrap();
        let store = CheckpointStore::open(dir.path().to_str().unwrap(), &BTreeMap::new()).unwrap();
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
