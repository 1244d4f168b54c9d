//! Writing a new file past the page cache (Linux `O_DIRECT`), for checkpoint snapshots.
//!
//! A snapshot is written once and read only after a failure, so copying it into the page cache
//! (and later writing the cached pages back) costs CPU for nothing: with every key of a large
//! aggregation changing between checkpoints, that copy was the largest part of what a
//! checkpoint cost besides the state copy itself. Direct writes hand aligned blocks to the
//! device instead. File systems that refuse them (tmpfs, some network file systems) get the
//! same bytes through ordinary writes.

use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// Alignment of direct writes: of the buffer's address, each write's length and file offset.
/// 4 KiB covers the logical block sizes of common devices (512 B and 4 KiB).
const ALIGN: usize = 4096;

/// Bytes gathered before each write.
const CHUNK: usize = 4 << 20;

/// A new file written through an aligned buffer; [`DirectFile::finish`] writes the rest and
/// returns the file's length.
pub struct DirectFile {
    path: PathBuf,
    file: File,
    /// Holds `CHUNK` aligned bytes starting at `start`.
    buf: Vec<u8>,
    start: usize,
    /// Bytes gathered in the buffer.
    len: usize,
    /// Bytes in the file.
    written: u64,
    direct: bool,
}

impl DirectFile {
    /// Creates (or truncates) `path`, for direct writes where the file system allows them.
    pub fn create(path: &Path) -> std::io::Result<Self> {
        let (file, direct) = match open(path, true) {
            Ok(f) => (f, true),
            // Refused (EINVAL on tmpfs): ordinary writes.
            Err(_) => (open(path, false)?, false),
        };
        let buf = vec![0u8; CHUNK + ALIGN];
        let start = buf.as_ptr().align_offset(ALIGN);
        Ok(DirectFile {
            path: path.to_path_buf(),
            file,
            buf,
            start,
            len: 0,
            written: 0,
            direct,
        })
    }

    /// Writes the gathered bytes, padded with zeros to the alignment when `last` (the file is
    /// cut back to its length afterwards).
    fn write_out(&mut self, last: bool) -> std::io::Result<()> {
        let len = self.len;
        let padded = if self.direct && last {
            len.div_ceil(ALIGN) * ALIGN
        } else {
            len
        };
        self.buf[self.start + len..self.start + padded].fill(0);
        let chunk = &self.buf[self.start..self.start + padded];
        if let Err(e) = self.file.write_all(chunk) {
            // Accepted at open but refused on write (EINVAL): nothing of this chunk counts; go on
            // with ordinary writes from where the file stands.
            if !self.direct || e.raw_os_error() != Some(EINVAL) {
                return Err(e);
            }
            self.file = open_at(&self.path, self.written)?;
            self.direct = false;
            self.file
                .write_all(&self.buf[self.start..self.start + len])?;
        }
        self.written += len as u64;
        self.len = 0;
        Ok(())
    }

    /// Writes what is left; returns the file's length.
    pub fn finish(mut self) -> std::io::Result<u64> {
        if self.len > 0 {
            let padded = self.direct && !self.len.is_multiple_of(ALIGN);
            self.write_out(true)?;
            if padded {
                self.file.set_len(self.written)?;
            }
        }
        Ok(self.written)
    }
}

impl Write for DirectFile {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let n = data.len().min(CHUNK - self.len);
        let at = self.start + self.len;
        self.buf[at..at + n].copy_from_slice(&data[..n]);
        self.len += n;
        if self.len == CHUNK {
            self.write_out(false)?;
        }
        Ok(n)
    }

    /// Buffered bytes stay until a chunk is full or [`DirectFile::finish`]: a direct write must
    /// be a whole number of blocks.
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(target_os = "linux")]
const EINVAL: i32 = libc::EINVAL;
#[cfg(not(target_os = "linux"))]
const EINVAL: i32 = 22;

fn open(path: &Path, direct: bool) -> std::io::Result<File> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(target_os = "linux")]
    if direct {
        use std::os::unix::fs::OpenOptionsExt;
        options.custom_flags(libc::O_DIRECT);
    }
    #[cfg(not(target_os = "linux"))]
    if direct {
        return Err(std::io::Error::from(std::io::ErrorKind::Unsupported));
    }
    options.open(path)
}

/// `path` opened for ordinary writes at `offset`, keeping what it holds.
fn open_at(path: &Path, offset: u64) -> std::io::Result<File> {
    let mut file = std::fs::OpenOptions::new().write(true).open(path)?;
    file.set_len(offset)?;
    file.seek(SeekFrom::Start(offset))?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lengths around the alignment and the chunk, written in uneven pieces, read back equal.
    #[test]
    fn files_of_any_length_read_back_as_written() {
        let dir = tempfile::tempdir().unwrap();
        let lengths = [
            0,
            1,
            ALIGN - 1,
            ALIGN,
            ALIGN + 1,
            CHUNK - 3,
            CHUNK,
            2 * CHUNK + 4097,
        ];
        for (i, n) in lengths.into_iter().enumerate() {
            let data: Vec<u8> = (0..n).map(|j| (j * 31 + j / 7 + i) as u8).collect();
            let path = dir.path().join(format!("f{i}"));
            let mut f = DirectFile::create(&path).unwrap();
            let mut at = 0;
            let mut piece = 1;
            while at < n {
                let end = (at + piece).min(n);
                f.write_all(&data[at..end]).unwrap();
                at = end;
                piece = piece * 3 % 100_003 + 1;
            }
            assert_eq!(f.finish().unwrap(), n as u64, "length {n}");
            assert_eq!(std::fs::read(&path).unwrap(), data, "length {n}");
        }
    }

    /// A file that held more before is replaced, not overwritten in part.
    #[test]
    fn an_existing_file_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, vec![7u8; 3 * ALIGN]).unwrap();
        let mut f = DirectFile::create(&path).unwrap();
        f.write_all(b"short").unwrap();
        assert_eq!(f.finish().unwrap(), 5);
        assert_eq!(std::fs::read(&path).unwrap(), b"short");
    }
}
