//! Formats: how rows become bytes and back, independent of where the bytes live.

use std::sync::Arc;

use arrow::array::ArrayRef;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::json::reader::Decoder;
use arrow::record_batch::RecordBatch;
use arrow::util::display::{ArrayFormatter, FormatOptions};
use sluice_common::{ChangeBatch, Error, Op, Result};

use crate::options::{Kind, OptionDef, Options, Side};

/// Flink's SQL timestamp text, `2026-11-11 00:05:00.000`.
pub const TIMESTAMP_FORMAT: &str = "%Y-%m-%d %H:%M:%S%.3f";

/// A changelog format: each record is a change of whole rows, in an envelope.
#[derive(Debug, Clone)]
pub enum Changelog {
    /// `debezium-json`: `{"before":..,"after":..,"op":"c"|"r"|"u"|"d"}`, inside
    /// `{"schema":..,"payload":..}` with `debezium-json.schema-include`.
    Debezium { schema_include: bool },
    /// `canal-json`: `{"data":[..],"old":[..],"type":"INSERT"|"UPDATE"|"DELETE",
    /// "database":..,"table":..}`, where `old` holds the changed fields' old values. Records of
    /// other databases or tables than the patterns (whole-name regular expressions) are skipped.
    Canal {
        database: Option<regex::Regex>,
        table: Option<regex::Regex>,
    },
}

/// Options of the changelog formats, for connectors that read and write them.
pub const CHANGELOG_OPTIONS: &[OptionDef] = &[
    OptionDef {
        key: "debezium-json.ignore-parse-errors",
        kind: Kind::Bool,
        default: Some("false"),
        side: Side::Source,
        identity: false,
        doc: "`debezium-json`: skip and count a malformed record instead of failing the job",
    },
    OptionDef {
        key: "debezium-json.schema-include",
        kind: Kind::Bool,
        default: Some("false"),
        side: Side::Source,
        identity: true,
        doc: "`debezium-json`: each record is `{\"schema\":..,\"payload\":..}` (Kafka Connect's JSON converter with schemas on)",
    },
    OptionDef {
        key: "canal-json.ignore-parse-errors",
        kind: Kind::Bool,
        default: Some("false"),
        side: Side::Source,
        identity: false,
        doc: "`canal-json`: skip and count a malformed record instead of failing the job",
    },
    OptionDef {
        key: "canal-json.database.include",
        kind: Kind::Text,
        default: None,
        side: Side::Source,
        identity: true,
        doc: "`canal-json`: read only changes of databases whose whole name matches this regular expression",
    },
    OptionDef {
        key: "canal-json.table.include",
        kind: Kind::Text,
        default: None,
        side: Side::Source,
        identity: true,
        doc: "`canal-json`: read only changes of tables whose whole name matches this regular expression",
    },
];

impl Changelog {
    /// The changelog format named `format`, configured by its options (`None`: not a changelog
    /// format).
    pub fn from_options(format: &str, opts: &mut Options) -> Result<Option<Changelog>> {
        Ok(match format {
            "debezium-json" => Some(Changelog::Debezium {
                schema_include: opts.flag("debezium-json.schema-include")?,
            }),
            "canal-json" => {
                let mut pattern = |key: &str| -> Result<Option<regex::Regex>> {
                    match opts.get(key)? {
                        None => Ok(None),
                        Some(p) => regex::Regex::new(&format!("^(?:{p})$"))
                            .map(Some)
                            .map_err(|e| opts.error(format!("option '{key}' = '{p}': {e}"))),
                    }
                };
                Some(Changelog::Canal {
                    database: pattern("canal-json.database.include")?,
                    table: pattern("canal-json.table.include")?,
                })
            }
            _ => None,
        })
    }

    pub fn name(&self) -> &'static str {
        match self {
            Changelog::Debezium { .. } => "debezium-json",
            Changelog::Canal { .. } => "canal-json",
        }
    }

    /// The changes one record holds: rows (JSON objects) with their kinds. A record that holds
    /// no change of the table (a DDL record, another table's) gives none.
    pub fn changes(&self, record: &str) -> std::result::Result<Vec<(Op, String)>, String> {
        use serde_json::Value;
        let v: Value = serde_json::from_str(record).map_err(|e| e.to_string())?;
        let row = |v: Option<&Value>, what: &str| -> std::result::Result<String, String> {
            match v {
                Some(r @ Value::Object(_)) => Ok(r.to_string()),
                Some(Value::Null) | None => Err(format!("'{what}' is missing or null")),
                Some(_) => Err(format!("'{what}' is not a JSON object")),
            }
        };
        match self {
            Changelog::Debezium { schema_include } => {
                let v = if *schema_include {
                    v.get("payload").ok_or(
                        "no 'payload' field (with 'debezium-json.schema-include' = 'true', a record is {\"schema\":..,\"payload\":..})",
                    )?
                } else {
                    if v.get("op").is_none() && v.get("payload").is_some() {
                        return Err("the record is a {\"schema\":..,\"payload\":..} envelope; set 'debezium-json.schema-include' = 'true'".into());
                    }
                    &v
                };
                let op = v.get("op").and_then(Value::as_str).ok_or("no 'op' field")?;
                Ok(match op {
                    "c" | "r" => vec![(Op::Insert, row(v.get("after"), "after")?)],
                    "u" => {
                        let before = row(v.get("before"), "before").map_err(|e| {
                            format!("{e} in an update; with the Debezium Postgres connector, set the table's REPLICA IDENTITY to FULL")
                        })?;
                        vec![
                            (Op::UpdateBefore, before),
                            (Op::UpdateAfter, row(v.get("after"), "after")?),
                        ]
                    }
                    "d" => vec![(Op::Delete, row(v.get("before"), "before")?)],
                    other => {
                        return Err(format!(
                            "unknown operation 'op' = '{other}' (expected c, r, u or d)"
                        ))
                    }
                })
            }
            Changelog::Canal { database, table } => {
                if v.get("isDdl").and_then(Value::as_bool) == Some(true) {
                    return Ok(vec![]);
                }
                for (pattern, field) in [(database, "database"), (table, "table")] {
                    if let Some(p) = pattern {
                        let name = v.get(field).and_then(Value::as_str).unwrap_or("");
                        if !p.is_match(name) {
                            return Ok(vec![]);
                        }
                    }
                }
                let kind = v
                    .get("type")
                    .and_then(Value::as_str)
                    .ok_or("no 'type' field")?;
                let rows = |key: &str| -> std::result::Result<&Vec<Value>, String> {
                    match v.get(key) {
                        Some(Value::Array(a)) => Ok(a),
                        _ => Err(format!("'{key}' is not an array of rows")),
                    }
                };
                let mut out = vec![];
                match kind {
                    "INSERT" | "DELETE" => {
                        let op = if kind == "INSERT" {
                            Op::Insert
                        } else {
                            Op::Delete
                        };
                        for r in rows("data")? {
                            out.push((op, row(Some(r), "data")?));
                        }
                    }
                    "UPDATE" => {
                        let (data, old) = (rows("data")?, rows("old")?);
                        if old.len() != data.len() {
                            return Err(format!(
                                "an UPDATE with {} rows in 'data' but {} in 'old'",
                                data.len(),
                                old.len()
                            ));
                        }
                        for (after, changed) in data.iter().zip(old) {
                            let (Value::Object(a), Value::Object(c)) = (after, changed) else {
                                return Err("'data' and 'old' must hold JSON objects".into());
                            };
                            // `old` holds only the fields that changed.
                            let mut before = a.clone();
                            before.extend(c.iter().map(|(k, v)| (k.clone(), v.clone())));
                            out.push((Op::UpdateBefore, Value::Object(before).to_string()));
                            out.push((Op::UpdateAfter, after.to_string()));
                        }
                    }
                    "CREATE" | "ALTER" | "ERASE" | "QUERY" | "TRUNCATE" | "RENAME" | "CINDEX"
                    | "DINDEX" | "GTID" | "XACOMMIT" | "XAROLLBACK" | "MHEARTBEAT" => {}
                    other => {
                        return Err(format!(
                            "unknown 'type' = '{other}' (expected INSERT, UPDATE or DELETE)"
                        ))
                    }
                }
                Ok(out)
            }
        }
    }

    /// Encodes a changelog as records of this format, each with the row whose key it carries.
    /// An adjacent `-U`/`+U` pair becomes one update record.
    pub fn encode(&self, batch: &ChangeBatch) -> Result<Vec<(usize, String)>> {
        let rows = json_rows(&batch.data)?;
        let mut out = Vec::with_capacity(rows.len());
        let mut i = 0;
        while i < rows.len() {
            let paired = batch.op(i) == Op::UpdateBefore
                && i + 1 < rows.len()
                && batch.op(i + 1) == Op::UpdateAfter;
            let record = match (self, batch.op(i), paired) {
                (Changelog::Debezium { .. }, _, true) => format!(
                    r#"{{"before":{},"after":{},"op":"u"}}"#,
                    rows[i],
                    rows[i + 1]
                ),
                (Changelog::Debezium { .. }, Op::Insert | Op::UpdateAfter, _) => {
                    format!(r#"{{"before":null,"after":{},"op":"c"}}"#, rows[i])
                }
                (Changelog::Debezium { .. }, _, _) => {
                    format!(r#"{{"before":{},"after":null,"op":"d"}}"#, rows[i])
                }
                (Changelog::Canal { .. }, _, true) => format!(
                    r#"{{"data":[{}],"old":[{}],"type":"UPDATE"}}"#,
                    rows[i + 1],
                    rows[i]
                ),
                (Changelog::Canal { .. }, Op::Insert | Op::UpdateAfter, _) => {
                    format!(r#"{{"data":[{}],"old":null,"type":"INSERT"}}"#, rows[i])
                }
                (Changelog::Canal { .. }, _, _) => {
                    format!(r#"{{"data":[{}],"old":null,"type":"DELETE"}}"#, rows[i])
                }
            };
            let keyed = if paired { i + 1 } else { i };
            out.push((keyed, record));
            i += if paired { 2 } else { 1 };
        }
        Ok(out)
    }
}

/// Decodes JSON lines into batches, reporting the file and line of a malformed record.
pub struct JsonLines {
    schema: SchemaRef,
    decoder: Decoder,
    ignore_errors: bool,
    skipped: u64,
    /// The records are changes in this format: batches end with an [`OP_COLUMN`](sluice_common::changelog::OP_COLUMN).
    changelog: Option<Changelog>,
    /// Rows of the last decode that decoded (indices into its lines), when some did not.
    kept: Option<Vec<usize>>,
    /// Changelog: the record of each row of the last decoded batch.
    origins: Vec<usize>,
    /// `raw`: each line is the one column's value, not JSON.
    raw: bool,
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
            changelog: None,
            kept: None,
            origins: vec![],
            raw: false,
        })
    }

    /// A decoder of lines that are each the value of the one STRING or BYTES column of
    /// `schema` (the `raw` format).
    pub fn raw(schema: SchemaRef) -> Result<Self> {
        let mut lines = JsonLines::new(schema, false)?;
        lines.raw = true;
        Ok(lines)
    }

    /// A decoder of records of `changelog`, each holding changes of rows of `schema`. Its
    /// batches are the rows with a last [`OP_COLUMN`](sluice_common::changelog::OP_COLUMN).
    pub fn changelog(schema: SchemaRef, ignore_errors: bool, changelog: Changelog) -> Result<Self> {
        let mut lines = JsonLines::new(schema, ignore_errors)?;
        lines.changelog = Some(changelog);
        Ok(lines)
    }

    /// The schema of the batches decoded: the rows', with an [`OP_COLUMN`](sluice_common::changelog::OP_COLUMN) for a changelog.
    pub fn output_schema(&self) -> SchemaRef {
        match &self.changelog {
            None => self.schema.clone(),
            Some(_) => with_op_field(&self.schema),
        }
    }

    /// Changelog: the record (index into the lines) of each row of the last batch decoded.
    pub fn origins(&self) -> &[usize] {
        &self.origins
    }

    /// The option that skips malformed records.
    fn ignore_option(&self) -> String {
        format!(
            "{}.ignore-parse-errors",
            self.changelog.as_ref().map_or("json", |c| c.name())
        )
    }

    /// Records skipped so far.
    pub fn skipped(&self) -> u64 {
        self.skipped
    }

    /// Counts records skipped before they reached the decoder.
    pub fn add_skipped(&mut self, n: u64) {
        self.skipped += n;
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
        if self.raw {
            self.kept = None;
            let column: ArrayRef =
                std::sync::Arc::new(arrow::array::StringArray::from_iter_values(lines));
            let column = arrow::compute::cast(&column, self.schema.field(0).data_type())?;
            return Ok(Some(RecordBatch::try_new(
                self.schema.clone(),
                vec![column],
            )?));
        }
        let Some(changelog) = self.changelog.clone() else {
            return self.decode_rows(lines, location);
        };
        let mut rows = Vec::with_capacity(lines.len());
        let mut ops = Vec::with_capacity(lines.len());
        let mut origins = Vec::with_capacity(lines.len());
        for (i, l) in lines.iter().enumerate() {
            if l.trim().is_empty() {
                continue;
            }
            match changelog.changes(l) {
                Ok(changes) => {
                    for (op, row) in changes {
                        rows.push(row);
                        ops.push(op);
                        origins.push(i);
                    }
                }
                Err(message) if self.ignore_errors => {
                    let _ = message;
                    self.skipped += 1;
                }
                Err(message) => {
                    // A bad row in an earlier record is the first error.
                    self.decode_changes(rows, ops, origins, location)?;
                    return Err(Error::BadRecord {
                        location: location(i),
                        message: format!(
                            "malformed {} record ({message}); set '{}' = 'true' to skip such records",
                            changelog.name(),
                            self.ignore_option()
                        ),
                    });
                }
            }
        }
        self.decode_changes(rows, ops, origins, location)
    }

    /// Decodes rows (JSON objects) with their change kinds, row `j` coming from record
    /// `origins[j]`, into a batch with a last [`OP_COLUMN`](sluice_common::changelog::OP_COLUMN). A record some of whose rows do not
    /// decode is skipped whole (or fails the job).
    pub fn decode_changes(
        &mut self,
        rows: Vec<String>,
        ops: Vec<Op>,
        origins: Vec<usize>,
        location: &dyn Fn(usize) -> String,
    ) -> Result<Option<RecordBatch>> {
        self.origins.clear();
        let skipped_before = self.skipped;
        let Some(batch) = self.decode_rows(&rows, &|j| location(origins[j]))? else {
            return Ok(None);
        };
        let mut kept: Vec<usize> = match self.kept.take() {
            Some(kept) => kept,
            None => (0..rows.len()).collect(),
        };
        let mut batch = batch;
        if kept.len() < rows.len() {
            // Some rows did not decode: drop the other rows of their records too, and count
            // records, not rows.
            let mut bad = std::collections::BTreeSet::new();
            let mut k = kept.iter().peekable();
            for (j, origin) in origins.iter().enumerate() {
                if k.peek() == Some(&&j) {
                    k.next();
                } else {
                    bad.insert(*origin);
                }
            }
            self.skipped = skipped_before + bad.len() as u64;
            let mask: arrow::array::BooleanArray = kept
                .iter()
                .map(|j| Some(!bad.contains(&origins[*j])))
                .collect();
            batch = arrow::compute::filter_record_batch(&batch, &mask)?;
            kept.retain(|j| !bad.contains(&origins[*j]));
        }
        if batch.num_rows() == 0 {
            return Ok(None);
        }
        let op_column =
            arrow::array::Int8Array::from_iter_values(kept.iter().map(|j| ops[*j] as i8));
        self.origins = kept.iter().map(|j| origins[*j]).collect();
        let mut columns = batch.columns().to_vec();
        columns.push(Arc::new(op_column));
        Ok(Some(RecordBatch::try_new(
            with_op_field(&self.schema),
            columns,
        )?))
    }

    /// Decodes `lines`, one row each, and says which lines' rows the batch holds (malformed
    /// ones skipped are not there), so that per-record metadata stays with its row.
    pub fn decode_kept(
        &mut self,
        lines: Vec<String>,
        location: &dyn Fn(usize) -> String,
    ) -> Result<(Option<RecordBatch>, Vec<usize>)> {
        let n = lines.len();
        let batch = self.decode_changes(lines, vec![Op::Insert; n], (0..n).collect(), location)?;
        let batch = batch.map(|mut b| {
            b.remove_column(b.num_columns() - 1);
            b
        });
        Ok((batch, self.origins().to_vec()))
    }

    /// Decodes `lines`, each a JSON object of a row.
    fn decode_rows(
        &mut self,
        lines: &[String],
        location: &dyn Fn(usize) -> String,
    ) -> Result<Option<RecordBatch>> {
        self.kept = None;
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
                let mut kept = vec![];
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
                        Ok(Some(b)) => {
                            kept.push(i);
                            good.push(b)
                        }
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
                                    message: format!(
                                        "malformed JSON {} ({message}); set '{}' = 'true' to skip such records",
                                        if self.changelog.is_some() { "row" } else { "record" },
                                        self.ignore_option()
                                    ),
                                });
                            }
                        }
                    }
                }
                self.kept = Some(kept);
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

/// Encodes an append-only batch of one column as lines of its text (the `raw` format).
pub fn encode_raw(batch: &ChangeBatch, out: &mut Vec<u8>) -> Result<()> {
    let text = arrow::compute::cast(batch.data.column(0), &DataType::Utf8)?;
    let text = text
        .as_any()
        .downcast_ref::<arrow::array::StringArray>()
        .expect("cast to Utf8");
    for v in text.iter() {
        out.extend_from_slice(v.unwrap_or_default().as_bytes());
        out.push(b'\n');
    }
    Ok(())
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

/// Encodes a changelog as lines of a changelog format (see [`Changelog::encode`]).
pub fn encode_changelog(
    batch: &ChangeBatch,
    changelog: &Changelog,
    out: &mut Vec<u8>,
) -> Result<()> {
    for (_, line) in changelog.encode(batch)? {
        out.extend_from_slice(line.as_bytes());
        out.push(b'\n');
    }
    Ok(())
}

/// A table's rows from the decoded `values` (its non-metadata columns, maybe with a last
/// [`OP_COLUMN`](sluice_common::changelog::OP_COLUMN), which stays last): the metadata columns
/// of `schema` go in their places, each from `column(key)`, cast to the column's type.
pub fn place_metadata(
    values: RecordBatch,
    schema: &SchemaRef,
    metadata: &[(usize, String)],
    column: impl Fn(&str) -> ArrayRef,
) -> Result<RecordBatch> {
    let mut values = values;
    let ops = (values.schema().fields().last().map(|f| f.name().as_str())
        == Some(sluice_common::changelog::OP_COLUMN))
    .then(|| values.remove_column(values.num_columns() - 1));
    let mut columns: Vec<ArrayRef> = Vec::with_capacity(schema.fields().len() + 1);
    let mut value_columns = values.columns().iter();
    for (i, field) in schema.fields().iter().enumerate() {
        match metadata.iter().find(|(c, _)| *c == i) {
            None => columns.push(value_columns.next().expect("a value column").clone()),
            Some((_, key)) => columns.push(arrow::compute::cast(&column(key), field.data_type())?),
        }
    }
    match ops {
        None => Ok(RecordBatch::try_new(schema.clone(), columns)?),
        Some(ops) => {
            columns.push(ops);
            Ok(RecordBatch::try_new(with_op_field(schema), columns)?)
        }
    }
}

/// `schema` with a last [`OP_COLUMN`](sluice_common::changelog::OP_COLUMN).
pub fn with_op_field(schema: &SchemaRef) -> SchemaRef {
    let mut fields: Vec<Field> = schema.fields().iter().map(|f| f.as_ref().clone()).collect();
    fields.push(sluice_common::changelog::op_field());
    Arc::new(Schema::new(fields))
}

#[cfg(test)]
mod tests {
    use arrow::array::{AsArray, Int64Array, StringArray};
    use arrow::datatypes::Int64Type;

    use super::*;

    fn schema() -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("v", DataType::Utf8, true),
        ]))
    }

    fn changes() -> ChangeBatch {
        let data = RecordBatch::try_new(
            schema(),
            vec![
                Arc::new(Int64Array::from(vec![1, 2, 1, 1, 2, 3])),
                Arc::new(StringArray::from(vec![
                    Some("a"),
                    None,
                    Some("a"),
                    Some("a\"2"),
                    None,
                    Some("c"),
                ])),
            ],
        )
        .unwrap();
        use Op::*;
        ChangeBatch::with_ops(
            data,
            vec![
                Insert,
                Insert,
                UpdateBefore,
                UpdateAfter,
                Delete,
                UpdateAfter,
            ],
        )
    }

    fn ops(batch: &RecordBatch) -> Vec<i8> {
        batch
            .column(batch.num_columns() - 1)
            .as_primitive::<arrow::datatypes::Int8Type>()
            .values()
            .to_vec()
    }

    /// Each format's records decode to the changes they were encoded from (an update pair
    /// becomes one record and two rows again; a lone `+U` is written as an insert).
    #[test]
    fn encoded_changes_decode_to_the_same_changes() {
        for changelog in [
            Changelog::Debezium {
                schema_include: false,
            },
            Changelog::Canal {
                database: None,
                table: None,
            },
        ] {
            let records: Vec<String> = changelog
                .encode(&changes())
                .unwrap()
                .into_iter()
                .map(|(_, r)| r)
                .collect();
            assert_eq!(records.len(), 5, "{records:?}");
            let mut json = JsonLines::changelog(schema(), false, changelog.clone()).unwrap();
            let batch = json
                .decode_at(&records, &|i| format!("record {i}"))
                .unwrap()
                .unwrap();
            assert_eq!(ops(&batch), vec![0, 0, 1, 2, 3, 0], "{}", changelog.name());
            let ids = batch.column(0).as_primitive::<Int64Type>();
            assert_eq!(ids.values().to_vec(), vec![1, 2, 1, 1, 2, 3]);
            let v = batch.column(1).as_string::<i32>();
            assert_eq!(v.value(3), "a\"2");
            assert!(v.is_null(4));
            assert_eq!(json.origins(), &[0, 1, 2, 2, 3, 4]);
        }
    }

    /// A malformed envelope names its record and the option that would skip it; skipped,
    /// it is counted once even when it held two rows.
    #[test]
    fn a_bad_record_is_named_or_skipped_whole() {
        let records: Vec<String> = [
            r#"{"before":null,"after":{"id":1,"v":"a"},"op":"c"}"#,
            r#"{"before":{"id":"x","v":"a"},"after":{"id":2,"v":"b"},"op":"u"}"#,
            r#"not json"#,
            r#"{"before":null,"after":{"id":3,"v":"c"},"op":"c"}"#,
        ]
        .map(String::from)
        .into();
        let debezium = Changelog::Debezium {
            schema_include: false,
        };
        let mut strict = JsonLines::changelog(schema(), false, debezium.clone()).unwrap();
        let err = strict
            .decode_at(&records, &|i| format!("f:{}", i + 1))
            .unwrap_err()
            .to_string();
        assert!(err.contains("f:2"), "{err}");
        assert!(err.contains("'debezium-json.ignore-parse-errors'"), "{err}");
        let mut lenient = JsonLines::changelog(schema(), true, debezium).unwrap();
        let batch = lenient
            .decode_at(&records, &|i| format!("f:{}", i + 1))
            .unwrap()
            .unwrap();
        let ids = batch.column(0).as_primitive::<Int64Type>();
        assert_eq!(ids.values().to_vec(), vec![1, 3]);
        assert_eq!(lenient.skipped(), 2);
        assert_eq!(lenient.origins(), &[0, 3]);
    }
}
