//! Where a filesystem table's files live: a local folder, or a prefix of an S3-compatible bucket
//! (`'path' = 's3://bucket/prefix'`), reached through `object_store`.
//!
//! Paths stay `PathBuf`s either way: on S3 a path is the object's URL (`s3://bucket/a/b.parquet`),
//! so that split names, partition folders (`day=2026-11-11`) and messages work as for local
//! files. Objects are read whole into memory. Written files are spooled to a local temporary
//! file and uploaded (multipart) when sealed; S3 has no rename, so publishing an object is a
//! copy to its visible name and a delete of the hidden one, which a recovery repeats safely.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use sluice_common::{Error, Result};

/// A table's storage.
#[derive(Clone)]
pub(crate) enum Storage {
    Local,
    S3(Arc<Bucket>),
}

/// An S3-compatible bucket, and a small runtime its requests run on.
pub(crate) struct Bucket {
    store: Arc<dyn object_store::ObjectStore>,
    runtime: tokio::runtime::Runtime,
    /// `s3://bucket`: paths start with it.
    root: String,
}

/// An object store error as a Sluice one, naming the object.
fn failed(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Runtime(format!("{}: {e}", path.display()))
}

/// Whether a file name is hidden: a writer's file in progress, or not data (`_SUCCESS`).
pub(crate) fn hidden(name: &str) -> bool {
    name.starts_with('.') || name.starts_with('_')
}

impl Storage {
    /// The storage of `'path' = location`: S3 for `s3://bucket/prefix` (configured by the
    /// table's `s3.*` options), else local. `s3.*` options on a local path are an error.
    pub(crate) fn of(location: &str, options: &BTreeMap<String, String>) -> Result<Storage> {
        let s3: BTreeMap<String, String> = options
            .iter()
            .filter(|(k, _)| k.starts_with("s3."))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if !location.starts_with("s3://") {
            if let Some(key) = s3.keys().next() {
                return Err(Error::Plan(format!(
                    "option '{key}' applies to S3 paths, and 'path' = '{location}' is local"
                )));
            }
            return Ok(Storage::Local);
        }
        let (store, _) = sluice_state::checkpoint::s3_bucket(location, "option 'path'", &s3)?;
        let bucket = location
            .trim_start_matches("s3://")
            .split('/')
            .next()
            .unwrap_or_default();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| Error::Runtime(format!("option 'path' = '{location}': {e}")))?;
        Ok(Storage::S3(Arc::new(Bucket {
            store,
            runtime,
            root: format!("s3://{bucket}"),
        })))
    }

    /// The files of a table at `path` (a file, or a folder's files: with `recursive`, at any
    /// depth), hidden ones left out, sorted, with their sizes.
    pub(crate) fn list(
        &self,
        path: &Path,
        recursive: bool,
    ) -> std::io::Result<Vec<(PathBuf, u64)>> {
        match self {
            Storage::Local => {
                let files = match recursive {
                    false => local_files(path)?,
                    true => crate::partitions::list_files_recursive(path)?,
                };
                files
                    .into_iter()
                    .map(|f| Ok((std::fs::metadata(&f)?.len(), f)))
                    .map(|r| r.map(|(len, f)| (f, len)))
                    .collect()
            }
            Storage::S3(b) => b.list(path, recursive),
        }
    }

    /// Whether `path` is a folder (rather than one file). On S3 every prefix is one.
    pub(crate) fn is_dir(&self, path: &Path) -> bool {
        match self {
            Storage::Local => path.is_dir(),
            Storage::S3(_) => true,
        }
    }
}

/// A local folder's files (or the file itself), hidden ones left out, sorted.
pub(crate) fn local_files(path: &Path) -> std::io::Result<Vec<PathBuf>> {
    let meta = std::fs::metadata(path)?;
    if meta.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    if !meta.is_dir() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "neither a file nor a directory (a device, FIFO or socket); name a file or a folder of files",
        ));
    }
    let mut files = vec![];
    for entry in std::fs::read_dir(path)? {
        let p = entry?.path();
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
        // Hidden files are in-progress output of a writer, not input.
        if p.is_file() && !hidden(name) {
            files.push(p);
        }
    }
    files.sort();
    Ok(files)
}

impl Bucket {
    /// The object key of a path under this bucket.
    fn key(&self, path: &Path) -> Result<object_store::path::Path> {
        let text = path.to_string_lossy();
        let rest = text
            .strip_prefix(&self.root)
            .ok_or_else(|| failed(path, format!("not in {}", self.root)))?;
        object_store::path::Path::parse(rest.trim_matches('/')).map_err(|e| failed(path, e))
    }

    /// The path of an object key.
    fn path(&self, key: &object_store::path::Path) -> PathBuf {
        PathBuf::from(format!("{}/{key}", self.root))
    }

    fn io(path: &Path, e: impl std::fmt::Display) -> std::io::Error {
        std::io::Error::other(format!("{}: {e}", path.display()))
    }

    fn list(&self, path: &Path, recursive: bool) -> std::io::Result<Vec<(PathBuf, u64)>> {
        use object_store::ObjectStoreExt;
        let key = self.key(path).map_err(|e| Self::io(path, e))?;
        // A path naming one object is that file.
        if !key.as_ref().is_empty() {
            match self.runtime.block_on(self.store.head(&key)) {
                Ok(meta) => return Ok(vec![(path.to_path_buf(), meta.size)]),
                Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(Self::io(path, e)),
            }
        }
        let depth = key.parts().count();
        let mut files: Vec<(PathBuf, u64)> = self
            .objects(&key, recursive)
            .map_err(|e| Self::io(path, e))?
            .into_iter()
            // Hidden files and folders under the path are not data.
            .filter(|o| !o.location.parts().skip(depth).any(|p| hidden(p.as_ref())))
            .map(|o| (self.path(&o.location), o.size))
            .collect();
        files.sort();
        Ok(files)
    }

    /// The objects under a key: directly under it, or at any depth with `recursive`.
    fn objects(
        &self,
        key: &object_store::path::Path,
        recursive: bool,
    ) -> object_store::Result<Vec<object_store::ObjectMeta>> {
        use futures_util::TryStreamExt;
        let prefix = (!key.as_ref().is_empty()).then_some(key);
        match recursive {
            true => self
                .runtime
                .block_on(self.store.list(prefix).try_collect::<Vec<_>>()),
            false => self
                .runtime
                .block_on(self.store.list_with_delimiter(prefix))
                .map(|l| l.objects),
        }
    }

    /// The objects under `dir` (directly in it, or at any depth with `recursive`), hidden ones
    /// too.
    pub(crate) fn entries(&self, dir: &Path, recursive: bool) -> Result<Vec<PathBuf>> {
        let objects = self
            .objects(&self.key(dir)?, recursive)
            .map_err(|e| failed(dir, e))?;
        Ok(objects.iter().map(|o| self.path(&o.location)).collect())
    }

    /// An object's bytes.
    pub(crate) fn read(&self, path: &Path) -> Result<bytes::Bytes> {
        use object_store::ObjectStoreExt;
        let key = self.key(path)?;
        self.runtime
            .block_on(async { self.store.get(&key).await?.bytes().await })
            .map_err(|e| failed(path, e))
    }

    pub(crate) fn exists(&self, path: &Path) -> Result<bool> {
        use object_store::ObjectStoreExt;
        match self.runtime.block_on(self.store.head(&self.key(path)?)) {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(failed(path, e)),
        }
    }

    /// Uploads the local file `from` as the object `to` (in parts, so that a large file is
    /// never in memory whole).
    pub(crate) fn upload(&self, from: &Path, to: &Path) -> Result<()> {
        use object_store::ObjectStoreExt;
        use std::io::Read;
        const PART: usize = 8 << 20;
        let key = self.key(to)?;
        let mut file = std::fs::File::open(from).map_err(|e| Error::io(from, e))?;
        self.runtime
            .block_on(async {
                let upload = self.store.put_multipart(&key).await?;
                let mut writer = object_store::WriteMultipart::new_with_chunk_size(upload, PART);
                let mut buf = vec![0u8; PART];
                loop {
                    let n = file
                        .read(&mut buf)
                        .map_err(|e| object_store::Error::Generic {
                            store: "local spool",
                            source: Box::new(e),
                        })?;
                    if n == 0 {
                        break;
                    }
                    // At most a few parts in flight: uploading keeps pace with reading.
                    writer.wait_for_capacity(2).await?;
                    writer.write(&buf[..n]);
                }
                writer.finish().await.map(|_| ())
            })
            .map_err(|e| failed(to, e))
    }

    /// Moves an object (a copy and a delete: S3 has no rename).
    pub(crate) fn rename(&self, from: &Path, to: &Path) -> Result<()> {
        use object_store::ObjectStoreExt;
        let (a, b) = (self.key(from)?, self.key(to)?);
        self.runtime
            .block_on(self.store.rename(&a, &b))
            .map_err(|e| failed(to, e))
    }

    /// Deletes an object (one already gone is no error).
    pub(crate) fn remove(&self, path: &Path) -> Result<()> {
        use object_store::ObjectStoreExt;
        match self.runtime.block_on(self.store.delete(&self.key(path)?)) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(failed(path, e)),
        }
    }
}
