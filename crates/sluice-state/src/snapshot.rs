//! A compact byte encoding of one group's state, for checkpoints.
//!
//! Each accumulator writes a group's state as little-endian fields; multisets (MIN/MAX, DISTINCT)
//! write a count followed by `(length, bytes, multiplicity)` entries. The encoding is internal to
//! Sluice: checkpoints carry a format version, so it can change with a migration.

/// Appends fields to a buffer.
pub struct Writer<'a>(pub &'a mut Vec<u8>);

impl Writer<'_> {
    #[inline]
    pub fn i64(&mut self, v: i64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    #[inline]
    pub fn f64(&mut self, v: f64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    #[inline]
    pub fn i128(&mut self, v: i128) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    #[inline]
    pub fn bytes(&mut self, b: &[u8]) {
        self.0.extend_from_slice(&(b.len() as u32).to_le_bytes());
        self.0.extend_from_slice(b);
    }
    /// A multiset of byte strings with multiplicities.
    pub fn multiset<'b>(&mut self, entries: impl ExactSizeIterator<Item = (&'b [u8], i64)>) {
        self.0
            .extend_from_slice(&(entries.len() as u32).to_le_bytes());
        for (k, m) in entries {
            self.bytes(k);
            self.i64(m);
        }
    }
}

/// A multiset as read back: values (encoded) and their multiplicities.
pub type Multiset = Vec<(Box<[u8]>, i64)>;

/// Reads fields back; every read checks the length, so a truncated snapshot is an error.
pub struct Reader<'a>(pub &'a [u8]);

/// A snapshot that ended early or has the wrong shape.
#[derive(Debug, thiserror::Error)]
#[error("corrupt state snapshot: {0}")]
pub struct CorruptSnapshot(pub &'static str);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], CorruptSnapshot> {
        if self.0.len() < n {
            return Err(CorruptSnapshot("truncated group state"));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    #[inline]
    pub fn i64(&mut self) -> Result<i64, CorruptSnapshot> {
        Ok(i64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
    #[inline]
    pub fn f64(&mut self) -> Result<f64, CorruptSnapshot> {
        Ok(f64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
    #[inline]
    pub fn i128(&mut self) -> Result<i128, CorruptSnapshot> {
        Ok(i128::from_le_bytes(
            self.take(16)?.try_into().expect("16 bytes"),
        ))
    }
    fn u32(&mut self) -> Result<u32, CorruptSnapshot> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    #[inline]
    pub fn bytes(&mut self) -> Result<&'a [u8], CorruptSnapshot> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    #[inline]
    pub fn multiset(&mut self) -> Result<Multiset, CorruptSnapshot> {
        let n = self.u32()? as usize;
        let mut out = Vec::with_capacity(n.min(1 << 16));
        for _ in 0..n {
            let k: Box<[u8]> = self.bytes()?.into();
            out.push((k, self.i64()?));
        }
        Ok(out)
    }
    /// True when everything was read.
    pub fn is_done(&self) -> bool {
        self.0.is_empty()
    }
}
