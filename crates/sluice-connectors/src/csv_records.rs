//! CSV records of one split, decoded a batch at a time by arrow's decoder. A batch that fails
//! to decode is read again record by record, so that exactly its bad records are skipped (with
//! `csv.ignore-parse-errors`) or named by line (without it): one bad field never costs its
//! neighbours, and a record the decoder chokes on is always consumed, never retried forever.

use std::io::{BufRead, Read};

use arrow::csv::reader::Decoder;
use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;

/// A bad record: its line within the split (1-based) and what is wrong with it.
#[derive(Debug)]
pub struct BadCsvRecord {
    pub line: u64,
    pub message: String,
}

/// What a read gave.
pub enum CsvRead {
    Rows(RecordBatch),
    /// Every record of the stretch read was bad and skipped.
    Nothing,
    Eof,
}

/// Reads the CSV records of a byte stream (one split) in batches.
pub struct CsvRecords {
    reader: Box<dyn BufRead + Send>,
    schema: SchemaRef,
    projection: Option<Vec<usize>>,
    batch_size: usize,
    decoder: Decoder,
    /// The bytes the decoder has taken since its last batch, and their line ends, so that a
    /// batch that fails can be read again record by record.
    pending: Vec<u8>,
    /// Line ends consumed before `pending`.
    lines: u64,
    ignore_errors: bool,
    /// Records skipped as bad (with `ignore_errors`).
    pub skipped: u64,
    /// Records read (good and skipped): the split's resume position.
    pub records: u64,
}

impl CsvRecords {
    /// Reads `reader` after skipping its first `skip` records (a resumed split).
    pub fn new(
        reader: Box<dyn BufRead + Send>,
        schema: SchemaRef,
        projection: Option<Vec<usize>>,
        batch_size: usize,
        ignore_errors: bool,
        skip: u64,
    ) -> std::io::Result<Self> {
        let decoder = decoder(&schema, &projection, batch_size);
        let mut r = CsvRecords {
            reader,
            schema,
            projection,
            batch_size: batch_size.max(1),
            decoder,
            pending: vec![],
            lines: 0,
            ignore_errors,
            skipped: 0,
            records: 0,
        };
        let mut record = vec![];
        for _ in 0..skip {
            record.clear();
            if !r.next_record(&mut record)? {
                break;
            }
            r.lines += line_ends(&record);
            r.records += 1;
        }
        Ok(r)
    }

    /// The next batch of rows. A bad record is an error (its line within the split) unless
    /// errors are ignored.
    pub fn read(&mut self) -> Result<CsvRead, ReadError> {
        match self.read_fast() {
            Ok(Some(batch)) => {
                self.lines += line_ends(&self.pending);
                self.pending.clear();
                self.records += batch.num_rows() as u64;
                Ok(CsvRead::Rows(batch))
            }
            Ok(None) => Ok(CsvRead::Eof),
            Err(ReadError::Io(e)) => Err(ReadError::Io(e)),
            Err(ReadError::Bad(_)) => self.read_carefully(),
        }
    }

    /// Arrow's own loop: decode until a batch is full or the input ends, then flush. The bytes
    /// taken are kept in `pending` until the batch is out.
    fn read_fast(&mut self) -> Result<Option<RecordBatch>, ReadError> {
        loop {
            let buf = self.reader.fill_buf()?;
            let at_end = buf.is_empty();
            let decoded = self.decoder.decode(buf).map_err(bad)?;
            self.pending.extend_from_slice(&buf[..decoded]);
            self.reader.consume(decoded);
            // The split ends inside quotes: its last record never closed a quote (the CSV
            // reader would end the field there and take it). Bad: sort it out record by record.
            if at_end && unclosed(&self.pending) {
                return Err(ReadError::Bad(BadCsvRecord {
                    line: 0,
                    message: String::new(),
                }));
            }
            if decoded == 0 || self.decoder.capacity() == 0 {
                break;
            }
        }
        self.decoder.flush().map_err(bad)
    }

    /// After a failed batch: the records from the last good batch on, one at a time, up to a
    /// batch of good ones. Then the fast path starts afresh.
    fn read_carefully(&mut self) -> Result<CsvRead, ReadError> {
        let mut replay = std::mem::take(&mut self.pending);
        let mut at = 0;
        let mut good = vec![];
        let mut rows = 0;
        let mut record = vec![];
        self.decoder = decoder(&self.schema, &self.projection, self.batch_size);
        while rows < self.batch_size {
            record.clear();
            // The bytes the failed batch took come first, then the rest of the split.
            let more = if at < replay.len() {
                let end = record_end(&replay[at..]).map(|n| at + n);
                match end {
                    Some(end) => {
                        record.extend_from_slice(&replay[at..end]);
                        at = end;
                        true
                    }
                    None => {
                        record.extend_from_slice(&replay[at..]);
                        at = replay.len();
                        self.continue_record(&mut record)?;
                        true
                    }
                }
            } else {
                self.next_record(&mut record)?
            };
            if !more {
                break;
            }
            let line = self.lines + 1;
            self.lines += line_ends(&record);
            self.records += 1;
            let mut one = decoder(&self.schema, &self.projection, 1);
            let decoded = if unclosed(&record) {
                Err(arrow::error::ArrowError::CsvError(
                    "a quote is never closed (the field runs to the end of the file)".into(),
                ))
            } else {
                one.decode(&record)
                    .and_then(|_| one.decode(&[]))
                    .and_then(|_| one.flush())
            };
            match decoded {
                Ok(Some(batch)) => {
                    rows += batch.num_rows();
                    good.push(batch);
                }
                Ok(None) => {}
                Err(_) if self.ignore_errors => self.skipped += 1,
                Err(e) => {
                    return Err(ReadError::Bad(BadCsvRecord {
                        line,
                        message: e.to_string(),
                    }))
                }
            }
        }
        // Bytes of the failed batch past the last record read go back in front of the rest.
        if at < replay.len() {
            replay.drain(..at);
            let rest = std::mem::replace(&mut self.reader, Box::new(std::io::empty()));
            self.reader = Box::new(std::io::Cursor::new(replay).chain(rest));
        }
        if good.is_empty() {
            let at_end = self.reader.fill_buf()?.is_empty();
            return Ok(if at_end {
                CsvRead::Eof
            } else {
                CsvRead::Nothing
            });
        }
        let schema = good[0].schema();
        Ok(CsvRead::Rows(arrow::compute::concat_batches(
            &schema, &good,
        )?))
    }

    /// Reads the next record (through its line end) from the split into `record`; false at
    /// the end of the split.
    fn next_record(&mut self, record: &mut Vec<u8>) -> std::io::Result<bool> {
        self.continue_record(record)?;
        Ok(!record.is_empty())
    }

    /// Reads on from the split until `record` ends with a line end outside quotes (or the
    /// split ends).
    fn continue_record(&mut self, record: &mut Vec<u8>) -> std::io::Result<()> {
        let mut scan = CsvScan::default();
        scan.feed(record);
        loop {
            let buf = self.reader.fill_buf()?;
            if buf.is_empty() {
                return Ok(());
            }
            let (taken, done) = match buf.iter().position(|&b| scan.step(b)) {
                Some(i) => (i + 1, true),
                None => (buf.len(), false),
            };
            record.extend_from_slice(&buf[..taken]);
            self.reader.consume(taken);
            if done {
                return Ok(());
            }
        }
    }
}

/// Where a field stands, as the CSV reader (csv-core) reads it.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
enum Field {
    #[default]
    Start,
    Unquoted,
    Quoted,
    /// A quote inside a quoted field: it closes the field, or a second one makes it a quote.
    QuoteInQuoted,
}

/// Where a CSV reader stands after the bytes fed so far: a quote opens a quoted field only at
/// the start of a field (elsewhere it is a character like any other); in a quoted field a
/// doubled quote is a quote and a single one closes the field; a line end outside quotes ends
/// the record.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct CsvScan(Field);

impl CsvScan {
    /// Feeds one byte; true when it ends a record.
    pub(crate) fn step(&mut self, b: u8) -> bool {
        use Field::*;
        let (next, ends) = match (self.0, b) {
            (Quoted, b'"') => (QuoteInQuoted, false),
            (Quoted, _) => (Quoted, false),
            (QuoteInQuoted, b'"') | (Start, b'"') => (Quoted, false),
            (_, b',') => (Start, false),
            (_, b'\n') => (Start, true),
            _ => (Unquoted, false),
        };
        self.0 = next;
        ends
    }

    pub(crate) fn feed(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.step(b);
        }
    }

    /// Inside a quoted field that has not been closed.
    pub(crate) fn in_quotes(&self) -> bool {
        self.0 == Field::Quoted
    }
}

/// Where the first record of `bytes` ends (just past its line end outside quotes).
fn record_end(bytes: &[u8]) -> Option<usize> {
    let mut scan = CsvScan::default();
    bytes.iter().position(|&b| scan.step(b)).map(|i| i + 1)
}

/// Whether `bytes` (whole records but maybe the last) end inside a quoted field.
fn unclosed(bytes: &[u8]) -> bool {
    let mut scan = CsvScan::default();
    scan.feed(bytes);
    scan.in_quotes()
}

fn line_ends(bytes: &[u8]) -> u64 {
    memchr::memchr_iter(b'\n', bytes).count() as u64
}

fn decoder(schema: &SchemaRef, projection: &Option<Vec<usize>>, batch_size: usize) -> Decoder {
    let mut builder = arrow::csv::ReaderBuilder::new(schema.clone())
        .with_header(false)
        .with_batch_size(batch_size.max(1));
    if let Some(cols) = projection {
        builder = builder.with_projection(cols.clone());
    }
    builder.build_decoder()
}

/// Why a read failed.
#[derive(Debug)]
pub enum ReadError {
    Io(std::io::Error),
    Bad(BadCsvRecord),
}

impl From<std::io::Error> for ReadError {
    fn from(e: std::io::Error) -> Self {
        ReadError::Io(e)
    }
}

impl From<arrow::error::ArrowError> for ReadError {
    fn from(e: arrow::error::ArrowError) -> Self {
        bad(e)
    }
}

fn bad(e: arrow::error::ArrowError) -> ReadError {
    ReadError::Bad(BadCsvRecord {
        line: 0,
        message: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::AsArray;
    use arrow::datatypes::{DataType, Field, Int64Type, Schema};

    use super::*;

    fn schema() -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, true),
            Field::new("s", DataType::Utf8, true),
        ]))
    }

    /// Every id read, with the skipped count, for `text` read in batches of `batch`.
    fn read_all(
        text: &str,
        batch: usize,
        ignore: bool,
        skip: u64,
    ) -> Result<(Vec<i64>, u64, u64), BadCsvRecord> {
        let reader: Box<dyn BufRead + Send> = Box::new(std::io::BufReader::with_capacity(
            7,
            std::io::Cursor::new(text.as_bytes().to_vec()),
        ));
        let mut r = CsvRecords::new(reader, schema(), None, batch, ignore, skip).unwrap();
        let mut ids = vec![];
        let mut reads = 0;
        loop {
            reads += 1;
            assert!(reads < 10_000, "the reader makes no progress");
            match r.read() {
                Ok(CsvRead::Rows(b)) => ids.extend(
                    b.column(0)
                        .as_primitive::<Int64Type>()
                        .iter()
                        .map(|v| v.unwrap_or(-1)),
                ),
                Ok(CsvRead::Nothing) => {}
                Ok(CsvRead::Eof) => break,
                Err(ReadError::Bad(b)) => return Err(b),
                Err(ReadError::Io(e)) => panic!("{e}"),
            }
        }
        Ok((ids, r.skipped, r.records))
    }

    #[test]
    fn exactly_the_bad_records_are_skipped_in_every_shape() {
        // Bad shapes: a wrong type, a short row, a long row. (A quote opened mid-file is no
        // error to arrow's CSV reader: the field runs on to the next quote.)
        let good = |i: i64| format!("{i},\"row {i}\"\n");
        for (bad, lost_after) in [("x,bad type\n", false), ("7\n", false), ("8,a,b\n", false)] {
            for at in [0usize, 1, 5, 29] {
                let mut text = String::new();
                for i in 0..30i64 {
                    if i as usize == at {
                        text.push_str(bad);
                    }
                    text.push_str(&good(i));
                }
                let want: Vec<i64> = if lost_after {
                    (0..at as i64).collect()
                } else {
                    (0..30).collect()
                };
                for batch in [1, 4, 8192] {
                    let (ids, skipped, records) =
                        read_all(&text, batch, true, 0).unwrap_or_else(|e| panic!("{e:?}"));
                    assert_eq!(ids, want, "bad {bad:?} at {at}, batches of {batch}");
                    assert_eq!(skipped, 1, "bad {bad:?} at {at}, batches of {batch}");
                    let total = if lost_after { at as u64 + 1 } else { 31 };
                    assert_eq!(records, total, "records counted for {bad:?} at {at}");
                    let err = read_all(&text, batch, false, 0).unwrap_err();
                    assert_eq!(
                        err.line,
                        at as u64 + 1,
                        "line of {bad:?} at {at}, batches of {batch}"
                    );
                }
            }
        }
    }

    #[test]
    fn quoted_line_ends_stay_in_their_record_and_resume_skips_records() {
        let text = "1,\"a\nb\"\n2,\"c\"\"d\"\n3,e\n4,f\n";
        let (ids, _, _) = read_all(text, 2, false, 0).unwrap();
        assert_eq!(ids, vec![1, 2, 3, 4]);
        let (ids, _, records) = read_all(text, 2, false, 2).unwrap();
        assert_eq!(ids, vec![3, 4]);
        assert_eq!(records, 4);
    }
}
