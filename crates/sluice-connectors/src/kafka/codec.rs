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
use crate::message::CsvMessages;
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
    /// The decoders of CSV values and keys decoded one by one.
    value_csv: Option<CsvMessages>,
    key_csv: Option<CsvMessages>,
    /// The key's columns as the key's format names them (without `key.fields-prefix`).
    key_schema: Option<SchemaRef>,
    prefix: String,
    /// The columns a record's value holds (all, or all but the key's with `EXCEPT_KEY`).
    value_schema: SchemaRef,
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
        // `key.fields-prefix`: the key's columns are named with it in the table, and without
        // it in the key's format.
        let prefix = opts.get("key.fields-prefix")?.unwrap_or_default();
        if !prefix.is_empty() {
            if !except_key {
                return Err(opts.error(
                    "'key.fields-prefix' needs 'value.fields-include' = 'EXCEPT_KEY' (as in Flink)",
                ));
            }
            let (_, columns) = key.as_ref().expect("EXCEPT_KEY has a key");
            if let Some(c) = columns
                .iter()
                .find(|c| !schema.field(**c).name().starts_with(&prefix))
            {
                return Err(opts.error(format!(
                    "key column '{}' does not start with 'key.fields-prefix' = '{prefix}'",
                    schema.field(*c).name()
                )));
            }
        }
        let unprefixed = |name: &str| name[prefix.len()..].to_string();
        let key_schema: Option<SchemaRef> = key.as_ref().map(|(_, columns)| {
            Arc::new(arrow::datatypes::Schema::new(
                columns
                    .iter()
                    .map(|c| {
                        let f = schema.field(*c);
                        f.clone().with_name(unprefixed(f.name()))
                    })
                    .collect::<Vec<_>>(),
            ))
        });
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
        let value_schema = Arc::new(schema.project(&value_columns)?);
        let value_avro = match value {
            Format::Avro if changes.is_none() => {
                Some(Avro::from_options(opts, &value_schema, &not_null)?)
            }
            _ => None,
        };
        let key_avro = match (&key, &key_schema) {
            (Some((Format::Avro, _)), Some(key_schema)) => Some(Avro::from_options(
                opts,
                key_schema,
                &not_null
                    .iter()
                    .filter(|n| n.starts_with(&prefix))
                    .map(|n| unprefixed(n))
                    .collect::<Vec<_>>(),
            )?),
            _ => None,
        };
        // CSV records put together with a key, or read as upserts, are decoded one by one.
        let table = opts.table().to_string();
        let value_csv = match value == Format::Csv && (upsert || except_key) {
            true => Some(CsvMessages::new(&table, all_nullable(&value_schema), false)),
            false => None,
        };
        let key_csv = match (&key, &key_schema) {
            (Some((Format::Csv, _)), Some(k)) => {
                Some(CsvMessages::new(&table, all_nullable(k), false))
            }
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
            value_csv,
            key_csv,
            key_schema,
            prefix,
            value_schema,
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
        let (key_format, _) = self.key.as_ref().expect("a keyed decode has a key");
        let key_object = || -> std::result::Result<Map<String, Value>, String> {
            let Some(key) = key else {
                return Err("the record has no key".into());
            };
            let object = match &self.key_avro {
                Some(avro) => avro
                    .json_object(readers.0.expect("a reader for Avro keys"), key)
                    .map_err(|e| format!("the key: {e}"))?,
                None => {
                    let text =
                        std::str::from_utf8(key).map_err(|_| "the key is not UTF-8".to_string())?;
                    let names = self.key_schema.as_ref().expect("a key has a schema");
                    self.object(*key_format, text, self.key_csv.as_ref(), names)
                        .map_err(|e| format!("the key is {e}"))?
                }
            };
            if self.prefix.is_empty() {
                return Ok(object);
            }
            Ok(object
                .into_iter()
                .map(|(k, v)| (format!("{}{k}", self.prefix), v))
                .collect())
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
        let mut row = match &self.value_avro {
            Some(avro) => avro.json_object(readers.1.expect("a reader for Avro values"), value)?,
            None => {
                let text = String::from_utf8_lossy(value);
                // A JSON value of the whole row is the row as it is.
                if self.value == Format::Json && !self.except_key {
                    return Ok(Some((op, text.into_owned())));
                }
                self.object(
                    self.value,
                    &text,
                    self.value_csv.as_ref(),
                    &self.value_schema,
                )
                .map_err(|e| format!("the value is {e}"))?
            }
        };
        if !self.except_key {
            return Ok(Some((op, Value::Object(row).to_string())));
        }
        row.extend(key_object()?);
        Ok(Some((op, Value::Object(row).to_string())))
    }

    /// A key's or value's text in `format` as a JSON object of `columns`: a JSON object as it
    /// is, a CSV record decoded by `csv` (as JSON the row decoder reads back exactly), or the
    /// one column's text. Errors complete "the key is ...".
    fn object(
        &self,
        format: Format,
        text: &str,
        csv: Option<&CsvMessages>,
        columns: &SchemaRef,
    ) -> std::result::Result<Map<String, Value>, String> {
        match format {
            Format::Raw => Ok(Map::from_iter([(
                columns.field(0).name().clone(),
                Value::String(text.to_string()),
            )])),
            Format::Csv => {
                let batch = csv
                    .expect("a CSV decoder")
                    .one(text)
                    .map_err(|e| format!("not one CSV record of the columns ({e})"))?;
                let row = crate::format::json_rows(&batch)
                    .map_err(|e| e.to_string())?
                    .pop()
                    .expect("one row");
                match serde_json::from_str::<Value>(&row) {
                    Ok(Value::Object(m)) => Ok(m),
                    _ => unreachable!("a row's JSON is an object"),
                }
            }
            Format::Json | Format::Avro => match serde_json::from_str::<Value>(text) {
                Ok(Value::Object(m)) => Ok(m),
                Ok(_) => Err("not a JSON object".into()),
                Err(e) => Err(format!("not JSON ({e})")),
            },
        }
    }

    /// The records of a batch: key and value (`None`: a tombstone). A plain table takes only
    /// inserts; a changelog format writes change records; `upsert-kafka` writes `+I`/`+U` as
    /// upserts and `-D` as tombstones, and drops a `-U` followed by the `+U` of its key (which
    /// overwrites it). A `-U` without its `+U` is a tombstone, as in Flink: a filter above an
    /// aggregation passes only the old row of a group that stopped matching.
    /// `timestamps` are the records' timestamps by row (a `timestamp` metadata column).
    pub fn encode(
        &self,
        batch: &ChangeBatch,
        timestamps: Option<&[Option<i64>]>,
    ) -> Result<Vec<super::Record>> {
        let at = |row: usize| timestamps.and_then(|t| t[row]);
        let keys = match &self.key {
            None => None,
            Some((format, columns)) => {
                // Named as the key's format names them (without `key.fields-prefix`).
                let names = self.key_schema.clone().expect("a key has a schema");
                let key =
                    RecordBatch::try_new(names, batch.data.project(columns)?.columns().to_vec())?;
                Some(encode(&key, *format, self.key_avro.as_ref())?)
            }
        };
        let key = |row: usize| keys.as_ref().and_then(|k| k[row].clone());
        if let Some(c) = &self.changes {
            return Ok(c
                .encode(batch)?
                .into_iter()
                .map(|(row, text)| (key(row), Some(Payload(text.into_bytes())), at(row)))
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
                (Op::Insert, _) | (Op::UpdateAfter, true) => out.push((key(i), value, at(i))),
                // The `+U` right after overwrites the key. A `-U` without one (a filter above
                // an aggregation let only the old row through) removes the key's row.
                (Op::UpdateBefore, true)
                    if i + 1 < n && batch.op(i + 1) == Op::UpdateAfter && key(i) == key(i + 1) => {}
                (Op::UpdateBefore | Op::Delete, true) => out.push((key(i), None, at(i))),
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
