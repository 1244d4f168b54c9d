//! Formats: how rows become bytes and back, independent of where the bytes live.

use std::sync::Arc;

use arrow::array::ArrayRef;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::json::reader::Decoder;
use arrow::record_batch::RecordBatch;
use arrow::util::display::{ArrayFormatter, FormatOptions};
use sluice_common::{ChangeBatch, Error, Op, Result};

/// Flink's SQL timestamp text, `2026-11-11 00:05:00.000`.
pub const TIMESTAMP_FORMAT: &str = "%Y-%m-%d %H:%M:%S%.3f";

/// Decodes JSON lines into batches, reporting the file and line of a malformed record.
pub struct JsonLines {
    schema: SchemaRef,
    decoder: Decoder,
    ignore_errors: bool,
    skipped: u64,
}

impl JsonLines {
    pub fn new(schema: SchemaRef, ignore_errors: bool) -> Result<Self> {
        let decoder = arrow::json::ReaderBuilder::new(schema.clone())
            .with_batch_size(8192)
            .build_decoder()?;
        Ok(JsonLines {
            schema,
            decoder,
            ignore_errors,
            skipped: 0,
        })
    }

    /// Records skipped so far.
    pub fn skipped(&self) -> u64 {
        self.skipped
    }

    /// Decodes `lines` (each without its newline), the first being line `first_line` of `file`.
    pub fn decode(
        &mut self,
        lines: &[String],
        file: &str,
        first_line: u64,
    ) -> Result<Option<RecordBatch>> {
        self.decode_at(lines, &|i| format!("{file}:{}", first_line + i as u64))
    }

    /// Decodes `lines` (each one record), where `location(i)` names record `i` in messages.
    pub fn decode_at(
        &mut self,
        lines: &[String],
        location: &dyn Fn(usize) -> String,
    ) -> Result<Option<RecordBatch>> {
        let mut buf = Vec::with_capacity(lines.iter().map(|l| l.len() + 1).sum());
        for l in lines {
            buf.extend_from_slice(l.as_bytes());
            buf.push(b'\n');
        }
        // A record nested absurdly deep is malformed (it could only exhaust a stack); only a
        // line longer than the limit can be that deep.
        let deep = lines
            .iter()
            .any(|l| l.len() > MAX_JSON_DEPTH && nesting(l.as_bytes()) > MAX_JSON_DEPTH);
        let whole = if deep {
            Err(String::new())
        } else {
            self.decode_bytes(&buf)
        };
        match whole {
            Ok(b) => Ok(b),
            Err(_) => {
                // Find the bad lines one by one: rare, so the slow path is fine.
                self.decoder = arrow::json::ReaderBuilder::new(self.schema.clone())
                    .with_batch_size(8192)
                    .build_decoder()?;
                let mut good = vec![];
                for (i, l) in lines.iter().enumerate() {
                    if l.trim().is_empty() {
                        continue;
                    }
                    let mut one = l.as_bytes().to_vec();
                    one.push(b'\n');
                    let decoded =
                        if l.len() > MAX_JSON_DEPTH && nesting(l.as_bytes()) > MAX_JSON_DEPTH {
                            Err(format!("nested deeper than {MAX_JSON_DEPTH} levels"))
                        } else {
                            self.decode_bytes(&one)
                        };
                    match decoded {
                        Ok(Some(b)) => good.push(b),
                        Ok(None) => {}
                        Err(message) => {
                            self.decoder = arrow::json::ReaderBuilder::new(self.schema.clone())
                                .with_batch_size(8192)
                                .build_decoder()?;
                            if self.ignore_errors {
                                self.skipped += 1;
                            } else {
                                return Err(Error::BadRecord {
                                    location: location(i),
                                    message: format!("malformed JSON record ({message}); set 'json.ignore-parse-errors' = 'true' to skip such lines"),
                                });
                            }
                        }
                    }
                }
                if good.is_empty() {
                    return Ok(None);
                }
                Ok(Some(arrow::compute::concat_batches(&self.schema, &good)?))
            }
        }
    }

    fn decode_bytes(&mut self, mut buf: &[u8]) -> Result<Option<RecordBatch>, String> {
        if buf.is_empty() {
            return Ok(None);
        }
        // The decoder stops taking bytes whenever its batch is full: flush and go on.
        let mut batches = vec![];
        while !buf.is_empty() {
            let n = self.decoder.decode(buf).map_err(|e| e.to_string())?;
            buf = &buf[n..];
            if n == 0 || !buf.is_empty() {
                match self.decoder.flush().map_err(|e| e.to_string())? {
                    Some(b) => batches.push(b),
                    None if n == 0 => break,
                    None => {}
                }
            }
        }
        if let Some(b) = self.decoder.flush().map_err(|e| e.to_string())? {
            batches.push(b);
        }
        match batches.len() {
            0 => Ok(None),
            1 => Ok(batches.pop()),
            _ => arrow::compute::concat_batches(&self.schema, &batches)
                .map(Some)
                .map_err(|e| e.to_string()),
        }
    }
}

/// The deepest a JSON record may nest (objects and arrays): Flink's (Jackson's) default limit
/// is 1000; a record of a table's columns needs far less.
pub const MAX_JSON_DEPTH: usize = 1000;

/// How deep a JSON text nests, at most (brackets outside strings).
pub fn nesting(text: &[u8]) -> usize {
    let (mut depth, mut max, mut in_string, mut escaped) = (0usize, 0usize, false, false);
    for &b in text {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                max = max.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    max
}

/// Replaces timestamp columns with Flink-formatted text so every writer prints them alike.
pub fn timestamps_as_text(batch: &RecordBatch) -> Result<RecordBatch> {
    if !batch
        .schema()
        .fields()
        .iter()
        .any(|f| matches!(f.data_type(), DataType::Timestamp(_, _)))
    {
        return Ok(batch.clone());
    }
    let options = FormatOptions::default()
        .with_timestamp_format(Some(TIMESTAMP_FORMAT))
        .with_timestamp_tz_format(Some(TIMESTAMP_FORMAT));
    let mut fields = vec![];
    let mut columns: Vec<ArrayRef> = vec![];
    for (f, c) in batch.schema().fields().iter().zip(batch.columns()) {
        if matches!(f.data_type(), DataType::Timestamp(_, _)) {
            let text = match sluice_common::time::format_timestamps(c, TIMESTAMP_FORMAT)? {
                Some(text) => text,
                None => {
                    let formatter = ArrayFormatter::try_new(c.as_ref(), &options)?;
                    (0..c.len())
                        .map(|i| c.is_valid(i).then(|| formatter.value(i).to_string()))
                        .collect()
                }
            };
            fields.push(Field::new(f.name(), DataType::Utf8, f.is_nullable()));
            columns.push(Arc::new(text));
        } else {
            fields.push(f.as_ref().clone());
            columns.push(c.clone());
        }
    }
    Ok(RecordBatch::try_new(
        Arc::new(Schema::new(fields)),
        columns,
    )?)
}

use arrow::array::Array;

/// JSON objects, one per row.
pub fn json_rows(batch: &RecordBatch) -> Result<Vec<String>> {
    let batch = timestamps_as_text(batch)?;
    let mut buf = Vec::new();
    {
        let mut w = arrow::json::writer::WriterBuilder::new()
            .with_explicit_nulls(true)
            .build::<_, arrow::json::writer::LineDelimited>(&mut buf);
        w.write(&batch)?;
        w.finish()?;
    }
    let text = String::from_utf8(buf).map_err(|e| Error::Runtime(e.to_string()))?;
    Ok(text.lines().map(str::to_string).collect())
}

/// Encodes an append-only batch as JSON lines.
pub fn encode_json(batch: &ChangeBatch, out: &mut Vec<u8>) -> Result<()> {
    for row in json_rows(&batch.data)? {
        out.extend_from_slice(row.as_bytes());
        out.push(b'\n');
    }
    Ok(())
}

/// Encodes an append-only batch as CSV lines (no header, as Flink's csv format).
pub fn encode_csv(batch: &ChangeBatch, out: &mut Vec<u8>) -> Result<()> {
    let data = timestamps_as_text(&batch.data)?;
    let mut w = arrow::csv::WriterBuilder::new()
        .with_header(false)
        .build(&mut *out);
    w.write(&data)?;
    Ok(())
}

/// Encodes a changelog as Debezium JSON: `{"before":..,"after":..,"op":"c"|"u"|"d"}`. An
/// adjacent `-U`/`+U` pair becomes one `"u"` record.
pub fn encode_debezium(batch: &ChangeBatch, out: &mut Vec<u8>) -> Result<()> {
    let rows = json_rows(&batch.data)?;
    let mut i = 0;
    while i < rows.len() {
        let op = batch.op(i);
        let line = match op {
            Op::Insert | Op::UpdateAfter => {
                format!(r#"{{"before":null,"after":{},"op":"c"}}"#, rows[i])
            }
            Op::UpdateBefore if i + 1 < rows.len() && batch.op(i + 1) == Op::UpdateAfter => {
                i += 1;
                format!(
                    r#"{{"before":{},"after":{},"op":"u"}}"#,
                    rows[i - 1],
                    rows[i]
                )
            }
            Op::UpdateBefore | Op::Delete => {
                format!(r#"{{"before":{},"after":null,"op":"d"}}"#, rows[i])
            }
        };
        out.extend_from_slice(line.as_bytes());
        out.push(b'\n');
        i += 1;
    }
    Ok(())
}
