//! How a table's rows are a topic's records: the value format, which columns the key holds and
//! in what format, and whether the value holds the key's columns too (`value.fields-include`).
//! For `upsert-kafka`, a record is an upsert of its key's row and a record without a value (a
//! tombstone) deletes it.

use std::sync::Arc;

use arrow::datatypes::{DataType, SchemaRef};
use arrow::record_batch::RecordBatch;
use serde_json::{Map, Value};
use sluice_common::changelog::all_nullable;
use sluice_common::{ChangeBatch, Error, Op, Result};

use crate::avro::{Avro, DatumReader};
use crate::format::{Changelog, JsonLines};
use crate::options::Options;
use crate::staged::Payload;

/// How a record's value (or key) holds a row.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Format {
    /// A JSON object of the columns.
    Json,
    /// The one column as text.
    Raw,
    /// A CSV record of the columns, without a header (values only).
    Csv,
    /// An Avro record of the columns (binary, no header).
    Avro,
}

impl Format {
    fn parse(name: &str) -> Format {
        match name {
            "raw" => Format::Raw,
            "csv" => Format::Csv,
            "avro" => Format::Avro,
            _ => Format::Json,
        }
    }
}

/// The rows of a table as records of a topic.
pub(super) struct Codec {
    /// The value's format; `changes` when it is a changelog format.
    pub value: Format,
    pub changes: Option<Changelog>,
    /// The key's format and columns (positions among the value's columns), when keyed.
    pub key: Option<(Format, Vec<usize>)>,
    /// `value.fields-include` = `EXCEPT_KEY`: the value holds only the other columns.
    pub except_key: bool,
    /// `upsert-kafka`.
    pub upsert: bool,
    /// The Avro formats of the value's and the key's columns, when they are Avro.
    pub value_avro: Option<Avro>,
    key_avro: Option<Avro>,
    /// The columns the key and value hold between them (the table's physical columns that are
    /// not metadata).
    schema: SchemaRef,
    table: String,
}

impl Codec {
    /// Reads the format options of a table whose key and value hold the columns of `schema`.
    /// `primary_key` (positions in `schema`) is the key of an `upsert-kafka` table.
    pub fn from_options(
        opts: &mut Options,
        schema: &SchemaRef,
        primary_key: &[usize],
        upsert: bool,
    ) -> Result<Codec> {
        let name = if upsert {
            opts.required("value.format")?
        } else {
            match (opts.get("format")?, opts.get("value.format")?) {
                (Some(f), None) | (None, Some(f)) => f,
                (Some(a), Some(b)) if a == b => a,
                (Some(_), Some(_)) => {
                    return Err(opts.error("give 'format' or 'value.format', not both"));
                }
                (None, None) => opts.required("format")?,
            }
        };
        let changes = Changelog::from_options(&name, opts)?;
        if changes.is_some() && upsert {
            return Err(opts.error(format!(
                "'value.format' = '{name}': an 'upsert-kafka' table's records are upserts; read a changelog format with the 'kafka' connector"
            )));
        }
        let value = Format::parse(&name);
        let key_columns = if upsert {
            if primary_key.is_empty() {
                return Err(
                    opts.error("'upsert-kafka' tables require to define a PRIMARY KEY constraint")
                );
            }
            Some(primary_key.to_vec())
        } else {
            match opts.get("key.fields")? {
                None => None,
                Some(fields) => Some(
                    fields
                        .split(';')
                        .map(|f| {
                            schema.index_of(f.trim()).map_err(|_| {
                                opts.error(format!(
                                    "option 'key.fields': the table has no column '{}'",
                                    f.trim()
                                ))
                            })
                        })
                        .collect::<Result<Vec<usize>>>()?,
                ),
            }
        };
        let key = match key_columns {
            None => {
                if opts.is_set("key.format") {
                    return Err(opts.error("'key.format' needs 'key.fields'"));
                }
                None
            }
            Some(columns) => {
                let format = match opts.get("key.format")? {
                    Some(f) => Format::parse(&f),
                    None if upsert => {
                        return Err(opts.error("missing required option 'key.format'"))
                    }
                    None => Format::Json,
                };
                if format == Format::Raw && columns.len() != 1 {
                    return Err(opts.error("'key.format' = 'raw' takes one key field"));
                }
                Some((format, columns))
            }
        };
        let except_key = match opts.value::<String>("value.fields-include")?.as_str() {
            "EXCEPT_KEY" => {
                if key.is_none() {
                    return Err(opts.error(
                        "'value.fields-include' = 'EXCEPT_KEY' needs 'key.fields' (the key must hold the other columns)",
                    ));
                }
                if changes.is_some() {
                    return Err(opts.error(format!(
                        "'value.fields-include' = 'EXCEPT_KEY' does not apply to '{name}' values (their records hold whole rows)"
                    )));
                }
                true
            }
            _ => false,
        };
        if value == Format::Csv && (upsert || except_key) {
            return Err(opts.error(
                "'csv' values are read and written whole: not with 'upsert-kafka' or 'value.fields-include' = 'EXCEPT_KEY' (yet); use 'json' there",
            ));
        }
        let value_columns: Vec<usize> = match (&key, except_key) {
            (Some((_, k)), true) => (0..schema.fields().len())
                .filter(|c| !k.contains(c))
                .collect(),
            _ => (0..schema.fields().len()).collect(),
        };
        // Primary key columns are NOT NULL, as in Flink: Avro holds them without a null branch.
        let not_null: Vec<String> = primary_key
            .iter()
            .map(|c| schema.field(*c).name().clone())
            .collect();
        let value_avro = match value {
            Format::Avro if changes.is_none() => Some(Avro::from_options(
                opts,
                &Arc::new(schema.project(&value_columns)?),
                &not_null,
            )?),
            _ => None,
        };
        let key_avro = match &key {
            Some((Format::Avro, columns)) => Some(Avro::from_options(
                opts,
                &Arc::new(schema.project(columns)?),
                &not_null,
            )?),
            _ => None,
        };
        let value_columns = value_columns.len();
        if value == Format::Raw && value_columns != 1 {
            return Err(opts.error(
                "format 'raw' holds one column in a record's value (besides metadata columns and, with 'EXCEPT_KEY', the key's)",
            ));
        }
        Ok(Codec {
            value,
            changes,
            key,
            except_key,
            upsert,
            value_avro,
            key_avro,
            schema: schema.clone(),
            table: opts.table().to_string(),
        })
    }

    /// The option that skips malformed records.
    pub fn ignore_option(&self) -> String {
        match (&self.changes, self.value) {
            (Some(c), _) => format!("{}.ignore-parse-errors", c.name()),
            (None, Format::Csv) => "csv.ignore-parse-errors".into(),
            (None, Format::Avro) => "avro.ignore-parse-errors".into(),
            (None, _) => "json.ignore-parse-errors".into(),
        }
    }

    /// Whether records are decoded one by one (the key holds columns, or it is an upsert).
    pub fn keyed_decode(&self) -> bool {
        self.upsert || self.except_key
    }

    /// The decoder of record values (or, when [`Self::keyed_decode`], of rows put together
    /// from keys and values).
    pub fn decoder(&self, ignore_errors: bool) -> Result<JsonLines> {
        match &self.changes {
            Some(c) => JsonLines::changelog(self.schema.clone(), ignore_errors, c.clone()),
            // Upsert rows of a delete hold only the key: the other columns are null until
            // ChangelogNormalize finds the row they delete.
            None if self.upsert => JsonLines::new(all_nullable(&self.schema), ignore_errors),
            None => JsonLines::new(self.schema.clone(), ignore_errors),
        }
    }

    /// The rows of records decoded one by one, from their keys and values (`None`: a
    /// tombstone), with a last op column: each record's row is an insert (an upsert for
    /// `upsert-kafka`, a delete for a tombstone). Returns the batch and each row's record.
    pub fn decode_keyed(
        &self,
        json: &mut JsonLines,
        keys: &[Option<Vec<u8>>],
        values: &[Option<Vec<u8>>],
        location: &dyn Fn(usize) -> String,
        ignore_errors: bool,
    ) -> Result<(Option<RecordBatch>, Vec<usize>)> {
        let mut rows = Vec::with_capacity(values.len());
        let mut ops = Vec::with_capacity(values.len());
        let mut origins = Vec::with_capacity(values.len());
        let mut skipped = 0u64;
        let key_reader = self.key_avro.as_ref().map(Avro::reader).transpose()?;
        let value_reader = self.value_avro.as_ref().map(Avro::reader).transpose()?;
        let readers = (key_reader.as_ref(), value_reader.as_ref());
        for (i, value) in values.iter().enumerate() {
            match self.record_row(keys[i].as_deref(), value.as_deref(), readers) {
                Ok(Some((op, row))) => {
                    rows.push(row);
                    ops.push(op);
                    origins.push(i);
                }
                Ok(None) => {}
                Err(_) if ignore_errors => skipped += 1,
                Err(message) => {
                    return Err(Error::BadRecord {
                        location: location(i),
                        message: format!(
                            "{message}; set '{}' = 'true' to skip such records",
                            self.ignore_option()
                        ),
                    })
                }
            }
        }
        json.add_skipped(skipped);
        let batch = json.decode_changes(rows, ops, origins, location)?;
        let kept = json.origins().to_vec();
        Ok((batch, kept))
    }

    /// One record's row as a JSON object, and its change kind. `readers` read Avro keys and
    /// values.
    fn record_row(
        &self,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        readers: (Option<&DatumReader>, Option<&DatumReader>),
    ) -> std::result::Result<Option<(Op, String)>, String> {
        let (key_format, key_columns) = self.key.as_ref().expect("a keyed decode has a key");
        let key_object = || -> std::result::Result<Map<String, Value>, String> {
            let Some(key) = key else {
                return Err("the record has no key".into());
            };
            if let Some(avro) = &self.key_avro {
                let reader = readers.0.expect("a reader for Avro keys");
                return avro
                    .json_object(reader, key)
                    .map_err(|e| format!("the key: {e}"));
            }
            let text = std::str::from_utf8(key).map_err(|_| "the key is not UTF-8".to_string())?;
            match key_format {
                Format::Raw => {
                    let name = self.schema.field(key_columns[0]).name().clone();
                    Ok(Map::from_iter([(name, Value::String(text.to_string()))]))
                }
                Format::Json | Format::Csv | Format::Avro => {
                    match serde_json::from_str::<Value>(text) {
                        Ok(Value::Object(m)) => Ok(m),
                        Ok(_) => Err("the key is not a JSON object".into()),
                        Err(e) => Err(format!("the key is not JSON ({e})")),
                    }
                }
            }
        };
        let Some(value) = value else {
            if !self.upsert {
                return Ok(None);
            }
            return Ok(Some((Op::Delete, Value::Object(key_object()?).to_string())));
        };
        let op = if self.upsert {
            Op::UpdateAfter
        } else {
            Op::Insert
        };
        if let Some(avro) = &self.value_avro {
            let mut row = avro.json_object(readers.1.expect("a reader for Avro values"), value)?;
            if self.except_key {
                row.extend(key_object()?);
            }
            return Ok(Some((op, Value::Object(row).to_string())));
        }
        let value = String::from_utf8_lossy(value);
        if !self.except_key {
            return Ok(Some((op, value.into_owned())));
        }
        let mut row = match self.value {
            Format::Json | Format::Csv | Format::Avro => {
                match serde_json::from_str::<Value>(&value) {
                    Ok(Value::Object(m)) => m,
                    Ok(_) => return Err("the value is not a JSON object".into()),
                    Err(e) => return Err(format!("the value is not JSON ({e})")),
                }
            }
            Format::Raw => {
                let column = (0..self.schema.fields().len())
                    .find(|c| !key_columns.contains(c))
                    .expect("raw values hold one column");
                Map::from_iter([(
                    self.schema.field(column).name().clone(),
                    Value::String(value.into_owned()),
                )])
            }
        };
        row.extend(key_object()?);
        Ok(Some((op, Value::Object(row).to_string())))
    }

    /// The records of a batch: key and value (`None`: a tombstone). A plain table takes only
    /// inserts; a changelog format writes change records; `upsert-kafka` writes `+I`/`+U` as
    /// upserts and `-D` as tombstones, and drops a `-U` followed by the `+U` of its key (which
    /// overwrites it). A `-U` without its `+U` is a tombstone, as in Flink: a filter above an
    /// aggregation passes only the old row of a group that stopped matching.
    pub fn encode(&self, batch: &ChangeBatch) -> Result<Vec<super::Record>> {
        let keys = match &self.key {
            None => None,
            Some((format, columns)) => Some(encode(
                &batch.data.project(columns)?,
                *format,
                self.key_avro.as_ref(),
            )?),
        };
        let key = |row: usize| keys.as_ref().and_then(|k| k[row].clone());
        if let Some(c) = &self.changes {
            return Ok(c
                .encode(batch)?
                .into_iter()
                .map(|(row, text)| (key(row), Some(Payload(text.into_bytes()))))
                .collect());
        }
        let data = match (&self.key, self.except_key) {
            (Some((_, k)), true) => {
                let rest: Vec<usize> = (0..batch.data.num_columns())
                    .filter(|c| !k.contains(c))
                    .collect();
                batch.data.project(&rest)?
            }
            _ => batch.data.clone(),
        };
        let values = encode(&data, self.value, self.value_avro.as_ref())?;
        let mut out = Vec::with_capacity(values.len());
        let n = values.len();
        for (i, value) in values.into_iter().enumerate() {
            match (batch.op(i), self.upsert) {
                (Op::Insert, _) | (Op::UpdateAfter, true) => out.push((key(i), value)),
                // The `+U` right after overwrites the key. A `-U` without one (a filter above
                // an aggregation let only the old row through) removes the key's row.
                (Op::UpdateBefore, true)
                    if i + 1 < n && batch.op(i + 1) == Op::UpdateAfter && key(i) == key(i + 1) => {}
                (Op::UpdateBefore | Op::Delete, true) => out.push((key(i), None)),
                (_, false) => {
                    return Err(Error::connector(
                        &self.table,
                        "the kafka connector writes inserts only; an updating result goes to an \
                         'upsert-kafka' table, or to a 'debezium-json' or 'canal-json' value format",
                    ))
                }
            }
        }
        Ok(out)
    }
}

/// Each row's record key or value in `format`: a JSON object, a CSV record, an Avro record
/// (`avro`), or the one column as text.
pub(super) fn encode(
    data: &RecordBatch,
    format: Format,
    avro: Option<&Avro>,
) -> Result<Vec<Option<Payload>>> {
    let text = |rows: Vec<String>| {
        rows.into_iter()
            .map(|r| Some(Payload(r.into_bytes())))
            .collect()
    };
    match format {
        Format::Json => Ok(text(crate::format::json_rows(data)?)),
        Format::Csv => Ok(text(crate::message::csv_rows(data)?)),
        Format::Avro => Ok(avro
            .expect("an Avro format for avro records")
            .encode(data)?
            .into_iter()
            .map(|r| Some(Payload(r)))
            .collect()),
        Format::Raw => {
            let column = arrow::compute::cast(data.column(0), &DataType::Utf8)?;
            let text = column
                .as_any()
                .downcast_ref::<arrow::array::StringArray>()
                .expect("cast to Utf8");
            Ok(text
                .iter()
                .map(|v| v.map(|v| Payload(v.as_bytes().to_vec())))
                .collect())
        }
    }
}
