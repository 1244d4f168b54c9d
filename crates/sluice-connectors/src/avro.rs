//! The `avro` format: a row is an Avro record whose schema is derived from the table's columns
//! the way Flink derives it (`AvroSchemaConverter`): a nullable column is the union
//! `["null", T]` with default null, a NOT NULL or primary key column is `T`; TINYINT, SMALLINT
//! and INT are `int`, DECIMAL is `bytes` with the `decimal` logical type, DATE `int`/`date`,
//! TIME `int`/`time-millis`, and timestamps `long` with a timestamp logical type. Messages hold
//! one record's binary encoding with no header (Flink's `avro` format for Kafka); files are Avro
//! object container files (see the filesystem connector).

use std::sync::Arc;

use apache_avro::types::Value;
use arrow::array::{
    Array, ArrayRef, AsArray, BinaryBuilder, BooleanBuilder, Decimal128Builder, Float32Builder,
    Float64Builder, Int32Builder, Int64Builder, StringBuilder,
};
use arrow::datatypes::{
    DataType, Date32Type, Float32Type, Float64Type, Int16Type, Int32Type, Int64Type, Int8Type,
    SchemaRef, Time32MillisecondType, TimeUnit,
};
use arrow::record_batch::RecordBatch;
use serde_json::json;
use sluice_common::{Error, Result};

use crate::options::{Kind, OptionDef, Options, Side};

/// `avro.timestamp_mapping.legacy`, as Flink's option.
pub const LEGACY_TIMESTAMPS_OPTION: OptionDef = OptionDef {
    key: "avro.timestamp_mapping.legacy",
    kind: Kind::Bool,
    default: Some("true"),
    side: Side::Both,
    identity: true,
    doc: "`avro`: `true` holds TIMESTAMP as `timestamp-millis`/`-micros`/`-nanos`, `false` as `local-timestamp-*` (TIMESTAMP_LTZ is `timestamp-*` either way)",
};

/// `avro.ignore-parse-errors`.
pub const IGNORE_OPTION: OptionDef = OptionDef {
    key: "avro.ignore-parse-errors",
    kind: Kind::Bool,
    default: Some("false"),
    side: Side::Source,
    identity: false,
    doc: "`avro`: skip and count a record that is not an Avro record of the columns, instead of failing the job",
};

/// `avro.codec`: how the blocks of container files are compressed.
pub const CODEC_OPTION: OptionDef = OptionDef {
    key: "avro.codec",
    kind: Kind::Choice(&["null", "deflate", "snappy"]),
    default: Some("snappy"),
    side: Side::Sink,
    identity: false,
    doc: "`avro` files: the compression of their blocks (Flink's default is `snappy`)",
};

/// The `avro.codec` of a sink.
pub fn codec(opts: &mut Options) -> Result<apache_avro::Codec> {
    Ok(match opts.value::<String>("avro.codec")?.as_str() {
        "null" => apache_avro::Codec::Null,
        "deflate" => apache_avro::Codec::Deflate(Default::default()),
        _ => apache_avro::Codec::Snappy,
    })
}

/// How a column is held in Avro.
#[derive(Clone, Copy, Debug)]
enum Column {
    Boolean,
    /// `int`: TINYINT, SMALLINT, INT, DATE (`date`), TIME(3) (`time-millis`).
    Int,
    /// `long`: BIGINT.
    Long,
    Float,
    Double,
    String,
    Bytes,
    /// `bytes` with the `decimal` logical type.
    Decimal,
    /// `long` with a timestamp logical type in `unit` (`local`: `local-timestamp-*`); `scale`
    /// multiplies the column's values (TIMESTAMP(0) is held in milliseconds).
    Timestamp {
        unit: TimeUnit,
        local: bool,
        scale: i64,
    },
}

/// A reader of single binary records.
pub type DatumReader<'a> = apache_avro::reader::datum::GenericDatumReader<'a>;

/// Where each column is among the fields of a container file's records.
pub struct Resolver {
    fields: Vec<Option<usize>>,
}

/// The `avro` format of a table's columns.
#[derive(Clone)]
pub struct Avro {
    table: String,
    schema: apache_avro::Schema,
    columns: SchemaRef,
    kinds: Vec<(Column, bool)>,
    ignore_errors: bool,
    /// Records skipped as malformed so far.
    skipped: u64,
}

impl Avro {
    /// The format of `columns`, where those named in `not_null` (a primary key's) are NOT NULL
    /// as well as those declared so, with `avro.timestamp_mapping.legacy` from `opts`.
    pub fn from_options(
        opts: &mut Options,
        columns: &SchemaRef,
        not_null: &[String],
    ) -> Result<Avro> {
        let legacy = opts.flag("avro.timestamp_mapping.legacy")?;
        Avro::new(opts.table(), columns, not_null, legacy)
            .map_err(|e| opts.error(format!("'format' = 'avro': {e}")))
    }

    /// This format, skipping and counting malformed records when decoding
    /// (`avro.ignore-parse-errors`) instead of failing.
    pub fn ignoring_errors(mut self, ignore: bool) -> Avro {
        self.ignore_errors = ignore;
        self
    }

    /// The format of `columns` (see [`Self::from_options`]).
    pub fn new(
        table: &str,
        columns: &SchemaRef,
        not_null: &[String],
        legacy: bool,
    ) -> std::result::Result<Avro, String> {
        let mut fields = vec![];
        let mut kinds = vec![];
        for f in columns.fields() {
            let (column, mut avro) = match f.data_type() {
                DataType::Boolean => (Column::Boolean, json!("boolean")),
                DataType::Int8 | DataType::Int16 | DataType::Int32 => (Column::Int, json!("int")),
                DataType::Date32 => (Column::Int, json!({"type": "int", "logicalType": "date"})),
                DataType::Time32(TimeUnit::Millisecond) => (
                    Column::Int,
                    json!({"type": "int", "logicalType": "time-millis"}),
                ),
                DataType::Int64 => (Column::Long, json!("long")),
                DataType::Float32 => (Column::Float, json!("float")),
                DataType::Float64 => (Column::Double, json!("double")),
                DataType::Utf8 => (Column::String, json!("string")),
                DataType::Binary => (Column::Bytes, json!("bytes")),
                DataType::Decimal128(p, s) => (
                    Column::Decimal,
                    json!({"type": "bytes", "logicalType": "decimal", "precision": p, "scale": s}),
                ),
                DataType::Timestamp(unit, tz) => {
                    let local = tz.is_none() && !legacy;
                    let (avro_unit, scale, name) = match unit {
                        TimeUnit::Second => (TimeUnit::Millisecond, 1000, "millis"),
                        TimeUnit::Millisecond => (TimeUnit::Millisecond, 1, "millis"),
                        TimeUnit::Microsecond => (TimeUnit::Microsecond, 1, "micros"),
                        TimeUnit::Nanosecond => (TimeUnit::Nanosecond, 1, "nanos"),
                    };
                    let logical = if local {
                        format!("local-timestamp-{name}")
                    } else {
                        format!("timestamp-{name}")
                    };
                    (
                        Column::Timestamp {
                            unit: avro_unit,
                            local,
                            scale,
                        },
                        json!({"type": "long", "logicalType": logical}),
                    )
                }
                other => return Err(format!("column '{}': Avro holds no {other} here", f.name())),
            };
            let nullable = f.is_nullable() && !not_null.contains(f.name());
            let mut field = json!({"name": f.name()});
            if nullable {
                avro = json!(["null", avro]);
                field["default"] = serde_json::Value::Null;
            }
            field["type"] = avro;
            fields.push(field);
            kinds.push((column, nullable));
        }
        let text = json!({
            "type": "record",
            "name": "record",
            "namespace": "org.apache.flink.avro.generated",
            "fields": fields,
        })
        .to_string();
        let schema = apache_avro::Schema::parse_str(&text)
            .map_err(|e| format!("the Avro schema of the columns is not valid: {e}"))?;
        Ok(Avro {
            table: table.to_string(),
            schema,
            columns: columns.clone(),
            kinds,
            ignore_errors: false,
            skipped: 0,
        })
    }

    /// The Avro schema of a row, as JSON.
    pub fn schema(&self) -> &apache_avro::Schema {
        &self.schema
    }

    /// Records skipped as malformed so far.
    pub fn skipped(&self) -> u64 {
        self.skipped
    }

    /// The rows of messages that each hold one record, and the message of each row (a message
    /// skipped as malformed has none). `location(i)` names message `i` in errors.
    pub fn decode<'a>(
        &mut self,
        bodies: impl ExactSizeIterator<Item = &'a [u8]>,
        location: &dyn Fn(usize) -> String,
    ) -> Result<(Option<RecordBatch>, Vec<usize>)> {
        let reader = self.reader()?;
        let mut rows = Vec::with_capacity(bodies.len());
        let mut kept = Vec::with_capacity(bodies.len());
        let mut skipped = 0;
        for (i, body) in bodies.enumerate() {
            match self.record(&reader, body) {
                Ok(fields) => {
                    rows.push(fields);
                    kept.push(i);
                }
                Err(_) if self.ignore_errors => skipped += 1,
                Err(message) => {
                    return Err(Error::BadRecord {
                        location: location(i),
                        message: format!(
                        "{message}; set 'avro.ignore-parse-errors' = 'true' to skip such records"
                    ),
                    })
                }
            }
        }
        drop(reader);
        self.skipped += skipped;
        if rows.is_empty() {
            return Ok((None, kept));
        }
        Ok((Some(self.batch(rows)?), kept))
    }

    /// A reader of single records of the columns (one per batch: making it resolves the
    /// schema).
    pub fn reader(&self) -> Result<DatumReader<'_>> {
        DatumReader::builder(&self.schema)
            .build()
            .map_err(|e| Error::connector(&self.table, e.to_string()))
    }

    /// One message's record: its fields' values (unions unwrapped).
    fn record(&self, reader: &DatumReader, body: &[u8]) -> std::result::Result<Vec<Value>, String> {
        // The SDK reads a value cut off by the end of its input as NULL; a message's record
        // that ends early is an error.
        let mut rest = Strict(body);
        let value = reader.read_value(&mut rest).map_err(|e| {
            let framed = if body.len() > 5 && body[0] == 0 {
                " (it starts like a Confluent Schema Registry message, which 'avro-confluent' reads; Sluice does not read that format yet)"
            } else {
                ""
            };
            format!("not an Avro record of the table's columns ({e}){framed}")
        })?;
        if !rest.0.is_empty() {
            return Err(format!(
                "{} bytes are left after the Avro record: it was written with another schema than the table's columns give",
                rest.0.len()
            ));
        }
        let Value::Record(fields) = value else {
            return Err("not an Avro record".into());
        };
        Ok(fields
            .into_iter()
            .map(|(_, v)| match v {
                Value::Union(_, v) => *v,
                v => v,
            })
            .collect())
    }

    /// How the records of a container file written with `writer` (its own schema) give the
    /// columns, as Avro resolves a writer's schema to a reader's: each column is the field of
    /// its name (NULL when the file has none and the column is nullable), `int` widens to
    /// `long`, `float` and `double`, `float` to `double`, strings and bytes pass for each
    /// other, and a decimal needs the column's scale.
    pub fn resolver(&self, writer: &apache_avro::Schema) -> std::result::Result<Resolver, String> {
        use apache_avro::Schema as S;
        let apache_avro::Schema::Record(record) = writer else {
            return Err(format!("the file holds {writer:?} values, not records"));
        };
        let mut fields = Vec::with_capacity(self.kinds.len());
        for (c, (kind, nullable)) in self.kinds.iter().enumerate() {
            let column = self.columns.field(c);
            let Some(at) = record.fields.iter().position(|f| f.name == *column.name()) else {
                if !nullable {
                    return Err(format!(
                        "the file's records have no field '{}', a NOT NULL column",
                        column.name()
                    ));
                }
                fields.push(None);
                continue;
            };
            let mut schema = &record.fields[at].schema;
            if let S::Union(u) = schema {
                // A nullable field: ["null", T] (or [T, "null"]).
                let non_null: Vec<&S> = u.variants().iter().filter(|v| **v != S::Null).collect();
                if let [one] = non_null[..] {
                    schema = one;
                }
            }
            let fits = match (kind, schema) {
                (Column::Boolean, S::Boolean) => true,
                (Column::Int, S::Int) => true,
                (Column::Int, S::Date) => column.data_type() == &DataType::Date32,
                (Column::Int, S::TimeMillis) => matches!(column.data_type(), DataType::Time32(_)),
                (Column::Long, S::Int | S::Long) => true,
                (Column::Float, S::Int | S::Long | S::Float) => true,
                (Column::Double, S::Int | S::Long | S::Float | S::Double) => true,
                (Column::String, S::String | S::Bytes | S::Enum(_)) => true,
                (Column::Bytes, S::Bytes | S::String | S::Fixed(_)) => true,
                (Column::Decimal, S::Decimal(d)) => {
                    matches!(column.data_type(), DataType::Decimal128(_, s) if *s as usize == d.scale)
                }
                (
                    Column::Timestamp { .. },
                    S::Long
                    | S::TimestampMillis
                    | S::TimestampMicros
                    | S::TimestampNanos
                    | S::LocalTimestampMillis
                    | S::LocalTimestampMicros
                    | S::LocalTimestampNanos,
                ) => true,
                _ => false,
            };
            if !fits {
                return Err(format!(
                    "field '{}' of the file's records is {schema:?}, which does not fit column '{}' {}",
                    column.name(),
                    column.name(),
                    column.data_type()
                ));
            }
            fields.push(Some(at));
        }
        Ok(Resolver { fields })
    }

    /// The rows of records read from a container file, through `resolver` (see
    /// [`Self::resolver`]). `location(i)` names record `i`.
    pub fn resolved_rows(
        &mut self,
        resolver: &Resolver,
        values: Vec<Value>,
        location: &dyn Fn(usize) -> String,
    ) -> Result<Option<RecordBatch>> {
        let mut rows = Vec::with_capacity(values.len());
        for (i, value) in values.into_iter().enumerate() {
            let Value::Record(fields) = value else {
                return Err(Error::BadRecord {
                    location: location(i),
                    message: "not an Avro record".into(),
                });
            };
            let mut fields: Vec<Option<Value>> = fields.into_iter().map(|(_, v)| Some(v)).collect();
            rows.push(
                resolver
                    .fields
                    .iter()
                    .map(|at| match at.and_then(|at| fields.get_mut(at)?.take()) {
                        Some(Value::Union(_, v)) => *v,
                        Some(v) => v,
                        None => Value::Null,
                    })
                    .collect(),
            );
        }
        if rows.is_empty() {
            return Ok(None);
        }
        Ok(Some(self.batch(rows)?))
    }

    /// One message's record as a JSON object of the columns, in the forms the JSON decoder
    /// reads back exactly (timestamps and dates as numbers of their unit, decimals as text,
    /// bytes as hex): for rows put together from a record's key and value.
    pub fn json_object(
        &self,
        reader: &DatumReader,
        body: &[u8],
    ) -> std::result::Result<serde_json::Map<String, serde_json::Value>, String> {
        use serde_json::Value as J;
        let fields = self.record(reader, body)?;
        let mut object = serde_json::Map::with_capacity(fields.len());
        for (c, value) in fields.into_iter().enumerate() {
            let field = self.columns.field(c);
            let json = match value {
                Value::Null => J::Null,
                Value::Boolean(v) => J::from(v),
                Value::Int(v) | Value::Date(v) | Value::TimeMillis(v)
                    if !matches!(self.kinds[c].0, Column::Long | Column::Timestamp { .. }) =>
                {
                    J::from(v)
                }
                ref v @ (Value::Int(_)
                | Value::Long(_)
                | Value::TimestampMillis(_)
                | Value::TimestampMicros(_)
                | Value::TimestampNanos(_)
                | Value::LocalTimestampMillis(_)
                | Value::LocalTimestampMicros(_)
                | Value::LocalTimestampNanos(_)) => {
                    match long(v, self.kinds[c].0, field.data_type()) {
                        Some(v) => J::from(v),
                        None => {
                            return Err(format!(
                                "column '{}': an Avro value {v:?} does not fit it",
                                field.name()
                            ))
                        }
                    }
                }
                Value::Float(v) => J::from(v),
                Value::Double(v) => J::from(v),
                Value::String(v) => J::from(v),
                Value::Bytes(v) => {
                    J::from(v.iter().map(|b| format!("{b:02x}")).collect::<String>())
                }
                Value::Decimal(d) => {
                    let DataType::Decimal128(p, s) = field.data_type() else {
                        return Err(format!("column '{}': a decimal in Avro", field.name()));
                    };
                    let bytes = Vec::<u8>::try_from(&d).map_err(|e| e.to_string())?;
                    let v = unscaled(&bytes).ok_or_else(|| {
                        format!("column '{}': a decimal of over 128 bits", field.name())
                    })?;
                    J::from(<arrow::datatypes::Decimal128Type as arrow::datatypes::DecimalType>::format_decimal(v, *p, *s))
                }
                other => {
                    return Err(format!(
                        "column '{}': an Avro value {other:?} does not fit it",
                        field.name()
                    ))
                }
            };
            object.insert(field.name().clone(), json);
        }
        Ok(object)
    }

    /// A batch of the columns from records' values.
    fn batch(&self, rows: Vec<Vec<Value>>) -> Result<RecordBatch> {
        let n = rows.len();
        let mut columns: Vec<ArrayRef> = Vec::with_capacity(self.kinds.len());
        let value = |row: usize, c: usize| &rows[row][c];
        let mismatch = |c: usize, v: &Value| {
            Error::connector(
                &self.table,
                format!(
                    "column '{}': an Avro value {v:?} does not fit it",
                    self.columns.field(c).name()
                ),
            )
        };
        for (c, (kind, _)) in self.kinds.iter().enumerate() {
            let target = self.columns.field(c).data_type();
            let array: ArrayRef = match kind {
                Column::Boolean => {
                    let mut b = BooleanBuilder::with_capacity(n);
                    for r in 0..n {
                        match value(r, c) {
                            Value::Null => b.append_null(),
                            Value::Boolean(v) => b.append_value(*v),
                            v => return Err(mismatch(c, v)),
                        }
                    }
                    Arc::new(b.finish())
                }
                Column::Int => {
                    let mut b = Int32Builder::with_capacity(n);
                    for r in 0..n {
                        match value(r, c) {
                            Value::Null => b.append_null(),
                            Value::Int(v) | Value::Date(v) | Value::TimeMillis(v) => {
                                b.append_value(*v)
                            }
                            v => return Err(mismatch(c, v)),
                        }
                    }
                    let array: ArrayRef = Arc::new(b.finish());
                    match target {
                        DataType::Int32 => array,
                        // An `int` out of a narrower column's range is an error, not a wrap.
                        DataType::Int8 | DataType::Int16 => arrow::compute::cast_with_options(
                            &array,
                            target,
                            &arrow::compute::CastOptions {
                                safe: false,
                                ..Default::default()
                            },
                        )
                        .map_err(|e| {
                            Error::connector(
                                &self.table,
                                format!("column '{}': {e}", self.columns.field(c).name()),
                            )
                        })?,
                        _ => arrow::compute::cast(&array, target)?,
                    }
                }
                Column::Long | Column::Timestamp { .. } => {
                    let mut b = Int64Builder::with_capacity(n);
                    for r in 0..n {
                        match value(r, c) {
                            Value::Null => b.append_null(),
                            v => match long(v, *kind, target) {
                                Some(v) => b.append_value(v),
                                None => return Err(mismatch(c, v)),
                            },
                        }
                    }
                    arrow::compute::cast(&(Arc::new(b.finish()) as ArrayRef), target)?
                }
                Column::Float => {
                    let mut b = Float32Builder::with_capacity(n);
                    for r in 0..n {
                        match value(r, c) {
                            Value::Null => b.append_null(),
                            Value::Float(v) => b.append_value(*v),
                            Value::Int(v) => b.append_value(*v as f32),
                            Value::Long(v) => b.append_value(*v as f32),
                            v => return Err(mismatch(c, v)),
                        }
                    }
                    Arc::new(b.finish())
                }
                Column::Double => {
                    let mut b = Float64Builder::with_capacity(n);
                    for r in 0..n {
                        match value(r, c) {
                            Value::Null => b.append_null(),
                            Value::Double(v) => b.append_value(*v),
                            Value::Float(v) => b.append_value(*v as f64),
                            Value::Int(v) => b.append_value(*v as f64),
                            Value::Long(v) => b.append_value(*v as f64),
                            v => return Err(mismatch(c, v)),
                        }
                    }
                    Arc::new(b.finish())
                }
                Column::String => {
                    let mut b = StringBuilder::with_capacity(n, n * 8);
                    for r in 0..n {
                        match value(r, c) {
                            Value::Null => b.append_null(),
                            Value::String(v) | Value::Enum(_, v) => b.append_value(v),
                            Value::Bytes(v) => match std::str::from_utf8(v) {
                                Ok(v) => b.append_value(v),
                                Err(_) => return Err(mismatch(c, value(r, c))),
                            },
                            v => return Err(mismatch(c, v)),
                        }
                    }
                    Arc::new(b.finish())
                }
                Column::Bytes => {
                    let mut b = BinaryBuilder::with_capacity(n, n * 8);
                    for r in 0..n {
                        match value(r, c) {
                            Value::Null => b.append_null(),
                            Value::Bytes(v) | Value::Fixed(_, v) => b.append_value(v),
                            Value::String(v) => b.append_value(v),
                            v => return Err(mismatch(c, v)),
                        }
                    }
                    Arc::new(b.finish())
                }
                Column::Decimal => {
                    let DataType::Decimal128(p, s) = target else {
                        unreachable!("a decimal column")
                    };
                    let mut b = Decimal128Builder::with_capacity(n);
                    for r in 0..n {
                        match value(r, c) {
                            Value::Null => b.append_null(),
                            Value::Decimal(d) => {
                                let bytes = Vec::<u8>::try_from(d)
                                    .map_err(|e| Error::connector(&self.table, e.to_string()))?;
                                match unscaled(&bytes) {
                                    Some(v) => b.append_value(v),
                                    None => return Err(mismatch(c, value(r, c))),
                                }
                            }
                            v => return Err(mismatch(c, v)),
                        }
                    }
                    let array = b.finish().with_precision_and_scale(*p, *s)?;
                    // A value with more digits than the precision is an error, as in Flink.
                    array.validate_decimal_precision(*p).map_err(|e| {
                        Error::connector(
                            &self.table,
                            format!("column '{}': {e}", self.columns.field(c).name()),
                        )
                    })?;
                    Arc::new(array)
                }
            };
            columns.push(array);
        }
        Ok(RecordBatch::try_new(self.columns.clone(), columns)?)
    }

    /// Each row of `batch` (the columns) as one record's binary encoding.
    pub fn encode(&self, batch: &RecordBatch) -> Result<Vec<Vec<u8>>> {
        let values = self.values(batch)?;
        let writer = apache_avro::writer::datum::GenericDatumWriter::builder(&self.schema)
            .build()
            .map_err(|e| Error::connector(&self.table, e.to_string()))?;
        values
            .into_iter()
            .map(|v| {
                writer
                    .write_value_to_vec(v)
                    .map_err(|e| Error::connector(&self.table, format!("writing Avro: {e}")))
            })
            .collect()
    }

    /// One block of an object container file holding the rows of `batch`, after the file's
    /// header (with the schema and codec) when `header`. `marker` is the file's sync marker.
    pub fn container_block(
        &self,
        batch: &RecordBatch,
        codec: apache_avro::Codec,
        marker: [u8; 16],
        header: bool,
    ) -> Result<Vec<u8>> {
        let fail = |e: apache_avro::Error| {
            Error::connector(&self.table, format!("writing an Avro file: {e}"))
        };
        let mut writer = apache_avro::Writer::builder()
            .schema(&self.schema)
            .writer(Vec::new())
            .codec(codec)
            .marker(marker)
            .has_header(!header)
            .build()
            .map_err(fail)?;
        writer
            .extend_from_slice(&self.values(batch)?)
            .map_err(fail)?;
        writer.into_inner().map_err(fail)
    }

    /// Each row of `batch` as an Avro record value.
    pub fn values(&self, batch: &RecordBatch) -> Result<Vec<Value>> {
        let n = batch.num_rows();
        let mut rows: Vec<Vec<(String, Value)>> = (0..n)
            .map(|_| Vec::with_capacity(self.kinds.len()))
            .collect();
        for (c, (kind, nullable)) in self.kinds.iter().enumerate() {
            let name = self.columns.field(c).name();
            // Every timestamp unit's values are i64s.
            let array = match kind {
                Column::Timestamp { .. } => {
                    arrow::compute::cast(batch.column(c), &DataType::Int64)?
                }
                _ => batch.column(c).clone(),
            };
            for (r, row) in rows.iter_mut().enumerate() {
                let value = if array.is_null(r) {
                    if !nullable {
                        return Err(Error::connector(
                            &self.table,
                            format!("column '{name}' is NOT NULL in the Avro schema (a NOT NULL or primary key column) but a row holds NULL"),
                        ));
                    }
                    Value::Union(0, Box::new(Value::Null))
                } else {
                    let v = cell(&array, r, *kind);
                    if *nullable {
                        Value::Union(1, Box::new(v))
                    } else {
                        v
                    }
                };
                row.push((name.clone(), value));
            }
        }
        Ok(rows.into_iter().map(Value::Record).collect())
    }
}

/// The i64 a `long` or timestamp value gives a BIGINT or timestamp column (`target`), in the
/// column's unit.
fn long(value: &Value, kind: Column, target: &DataType) -> Option<i64> {
    let (v, unit) = match *value {
        Value::Int(v) => (v as i64, None),
        Value::Long(v) => (v, None),
        Value::TimestampMillis(v) | Value::LocalTimestampMillis(v) => {
            (v, Some(TimeUnit::Millisecond))
        }
        Value::TimestampMicros(v) | Value::LocalTimestampMicros(v) => {
            (v, Some(TimeUnit::Microsecond))
        }
        Value::TimestampNanos(v) | Value::LocalTimestampNanos(v) => (v, Some(TimeUnit::Nanosecond)),
        _ => return None,
    };
    let Column::Timestamp {
        unit: avro_unit, ..
    } = kind
    else {
        return unit.is_none().then_some(v);
    };
    let DataType::Timestamp(column_unit, _) = target else {
        return None;
    };
    // A `long` without a logical type is in the unit the column's schema gives.
    let per_second = |u: &TimeUnit| match u {
        TimeUnit::Second => 1i64,
        TimeUnit::Millisecond => 1_000,
        TimeUnit::Microsecond => 1_000_000,
        TimeUnit::Nanosecond => 1_000_000_000,
    };
    let (from, to) = (
        per_second(&unit.unwrap_or(avro_unit)),
        per_second(column_unit),
    );
    Some(if from >= to {
        v.div_euclid(from / to)
    } else {
        v.checked_mul(to / from)?
    })
}

/// The Avro value of a non-null cell (a timestamp column's cast to its i64 values).
fn cell(array: &ArrayRef, r: usize, kind: Column) -> Value {
    match (kind, array.data_type()) {
        (Column::Boolean, _) => Value::Boolean(array.as_boolean().value(r)),
        (Column::Int, DataType::Int8) => {
            Value::Int(array.as_primitive::<Int8Type>().value(r) as i32)
        }
        (Column::Int, DataType::Int16) => {
            Value::Int(array.as_primitive::<Int16Type>().value(r) as i32)
        }
        (Column::Int, DataType::Date32) => Value::Date(array.as_primitive::<Date32Type>().value(r)),
        (Column::Int, DataType::Time32(_)) => {
            Value::TimeMillis(array.as_primitive::<Time32MillisecondType>().value(r))
        }
        (Column::Int, _) => Value::Int(array.as_primitive::<Int32Type>().value(r)),
        (Column::Long, _) => Value::Long(array.as_primitive::<Int64Type>().value(r)),
        (Column::Float, _) => Value::Float(array.as_primitive::<Float32Type>().value(r)),
        (Column::Double, _) => Value::Double(array.as_primitive::<Float64Type>().value(r)),
        (Column::String, _) => Value::String(array.as_string::<i32>().value(r).to_string()),
        (Column::Bytes, _) => Value::Bytes(array.as_binary::<i32>().value(r).to_vec()),
        (Column::Decimal, _) => {
            let v = array
                .as_primitive::<arrow::datatypes::Decimal128Type>()
                .value(r);
            Value::Decimal(apache_avro::Decimal::from(minimal_bytes(v)))
        }
        (Column::Timestamp { unit, local, scale }, _) => {
            let v = array.as_primitive::<Int64Type>().value(r) * scale;
            match (unit, local) {
                (TimeUnit::Millisecond, false) => Value::TimestampMillis(v),
                (TimeUnit::Microsecond, false) => Value::TimestampMicros(v),
                (TimeUnit::Nanosecond, false) => Value::TimestampNanos(v),
                (TimeUnit::Millisecond, true) => Value::LocalTimestampMillis(v),
                (TimeUnit::Microsecond, true) => Value::LocalTimestampMicros(v),
                (_, true) => Value::LocalTimestampNanos(v),
                (TimeUnit::Second, false) => unreachable!("seconds are written as millis"),
            }
        }
    }
}

/// A message's bytes, read to their end and no further: reading past it is an error other than
/// `UnexpectedEof` (which the SDK takes for a missing trailing field).
struct Strict<'a>(&'a [u8]);

impl std::io::Read for Strict<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.0.is_empty() && !buf.is_empty() {
            return Err(std::io::Error::other("the record ends early"));
        }
        let n = buf.len().min(self.0.len());
        buf[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        Ok(n)
    }
}

/// A decimal's unscaled value from its big-endian two's complement bytes (`None`: more than
/// 128 bits).
fn unscaled(bytes: &[u8]) -> Option<i128> {
    if bytes.is_empty() {
        return Some(0);
    }
    if bytes.len() > 16 {
        // Sign-extension bytes in front are allowed.
        let (extra, rest) = bytes.split_at(bytes.len() - 16);
        let fill = if rest[0] & 0x80 != 0 { 0xFF } else { 0 };
        if extra.iter().any(|b| *b != fill) {
            return None;
        }
        return unscaled(rest);
    }
    let fill = if bytes[0] & 0x80 != 0 { 0xFF } else { 0 };
    let mut full = [fill; 16];
    full[16 - bytes.len()..].copy_from_slice(bytes);
    Some(i128::from_be_bytes(full))
}

/// The shortest big-endian two's complement bytes of `v` (as Java's `BigInteger.toByteArray`).
fn minimal_bytes(v: i128) -> Vec<u8> {
    let bytes = v.to_be_bytes();
    let mut start = 0;
    while start < 15 {
        let (b, next) = (bytes[start], bytes[start + 1]);
        if (b == 0 && next & 0x80 == 0) || (b == 0xFF && next & 0x80 != 0) {
            start += 1;
        } else {
            break;
        }
    }
    bytes[start..].to_vec()
}

#[cfg(test)]
mod tests {
    use arrow::array::{
        Date32Array, Decimal128Array, Int16Array, Int64Array, StringArray,
        TimestampMicrosecondArray, TimestampMillisecondArray,
    };
    use arrow::datatypes::{Field, Schema};

    use super::*;

    fn schema() -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("name", DataType::Utf8, true),
            Field::new("qty", DataType::Int16, true),
            Field::new("price", DataType::Decimal128(10, 2), true),
            Field::new("day", DataType::Date32, true),
            Field::new("ts", DataType::Timestamp(TimeUnit::Millisecond, None), true),
            Field::new(
                "at",
                DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
                true,
            ),
        ]))
    }

    fn batch() -> RecordBatch {
        RecordBatch::try_new(
            schema(),
            vec![
                Arc::new(Int64Array::from(vec![1, -2, i64::MAX])),
                Arc::new(StringArray::from(vec![Some("a"), None, Some("汉字")])),
                Arc::new(Int16Array::from(vec![Some(3), Some(-32768), None])),
                Arc::new(
                    Decimal128Array::from(vec![Some(12345), Some(-1), Some(-9999999999)])
                        .with_precision_and_scale(10, 2)
                        .unwrap(),
                ),
                Arc::new(Date32Array::from(vec![Some(20768), None, Some(-1)])),
                Arc::new(TimestampMillisecondArray::from(vec![
                    Some(1_794_441_600_000),
                    Some(-1),
                    None,
                ])),
                Arc::new(
                    TimestampMicrosecondArray::from(vec![Some(1), None, Some(-7)])
                        .with_timezone("UTC"),
                ),
            ],
        )
        .unwrap()
    }

    #[test]
    fn the_schema_is_flinks() {
        let avro = Avro::new("t", &schema(), &[], true).unwrap();
        let json: serde_json::Value =
            serde_json::from_str(&avro.schema().canonical_form()).unwrap();
        let fields = json["fields"].as_array().unwrap();
        assert_eq!(fields[0]["type"], json!("long"));
        assert_eq!(fields[1]["type"], json!(["null", "string"]));
        assert_eq!(fields[2]["type"], json!(["null", "int"]));
        // Canonical form drops logical types; the full schema keeps them.
        let full: serde_json::Value = serde_json::to_value(avro.schema()).unwrap();
        let types: Vec<String> = full["fields"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["type"].to_string())
            .collect();
        assert!(types[3].contains("\"decimal\"") && types[3].contains("\"precision\":10"));
        assert!(types[4].contains("\"date\""));
        assert!(types[5].contains("\"timestamp-millis\""), "{}", types[5]);
        assert!(types[6].contains("\"timestamp-micros\""), "{}", types[6]);
        let not_legacy = Avro::new("t", &schema(), &["name".into()], false).unwrap();
        let full: serde_json::Value = serde_json::to_value(not_legacy.schema()).unwrap();
        assert_eq!(full["fields"][1]["type"], json!("string"));
        assert!(full["fields"][5]["type"]
            .to_string()
            .contains("\"local-timestamp-millis\""));
        assert!(full["fields"][6]["type"]
            .to_string()
            .contains("\"timestamp-micros\""));
    }

    #[test]
    fn rows_round_trip() {
        let mut avro = Avro::new("t", &schema(), &[], true).unwrap();
        let bodies = avro.encode(&batch()).unwrap();
        assert_eq!(bodies.len(), 3);
        let (got, kept) = avro
            .decode(bodies.iter().map(Vec::as_slice), &|i| {
                format!("message {i}")
            })
            .unwrap();
        assert_eq!(kept, vec![0, 1, 2]);
        assert_eq!(got.unwrap(), batch());
    }

    #[test]
    fn the_encoding_is_avros() {
        // id 1 (zigzag 2), name "a" (union branch 1, length 1), the rest null (branch 0).
        let avro = Avro::new("t", &schema(), &[], true).unwrap();
        let body = &avro.encode(&batch().slice(0, 1)).unwrap()[0];
        assert_eq!(&body[..4], &[2, 2, 2, b'a']);
        // qty 3: branch 1, zigzag 6; price 123.45: branch 1, 2 bytes 0x30 0x39.
        assert_eq!(&body[4..10], &[2, 6, 2, 4, 0x30, 0x39]);
    }

    #[test]
    fn bad_records_are_named_or_skipped() {
        let mut avro = Avro::new("t", &schema(), &[], true).unwrap();
        let mut bodies = avro.encode(&batch()).unwrap();
        bodies[1].truncate(3);
        bodies[2].push(0);
        // Cut before a trailing nullable field: the SDK alone would read it as NULL.
        let mut cut = avro.encode(&batch().slice(0, 1)).unwrap()[0].clone();
        cut.truncate(cut.len() - 1);
        let err = avro
            .decode([cut.as_slice()].into_iter(), &|_| "m".into())
            .unwrap_err()
            .to_string();
        assert!(err.contains("ends early"), "{err}");
        let err = avro
            .decode(bodies.iter().map(Vec::as_slice), &|i| format!("offset {i}"))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("offset 1: not an Avro record"), "{err}");
        assert!(err.contains("avro.ignore-parse-errors"), "{err}");
        avro = avro.ignoring_errors(true);
        let (got, kept) = avro
            .decode(bodies.iter().map(Vec::as_slice), &|i| format!("offset {i}"))
            .unwrap();
        assert_eq!(kept, vec![0]);
        assert_eq!(got.unwrap().num_rows(), 1);
        assert_eq!(avro.skipped(), 2);
        let confluent = [0u8, 0, 0, 0, 7, 2, 2, 2];
        avro = avro.ignoring_errors(false);
        let err = avro
            .decode([&confluent[..]].into_iter(), &|_| "m".into())
            .unwrap_err()
            .to_string();
        assert!(err.contains("avro-confluent"), "{err}");
    }

    #[test]
    fn decimals_take_any_length() {
        for v in [
            0i128,
            1,
            -1,
            127,
            128,
            -128,
            -129,
            i64::MAX as i128,
            i128::MIN,
            i128::MAX,
        ] {
            let b = minimal_bytes(v);
            assert_eq!(unscaled(&b), Some(v), "{v} as {b:?}");
            let mut padded = vec![if v < 0 { 0xFF } else { 0 }; 20 - b.len()];
            padded.extend(&b);
            assert_eq!(unscaled(&padded), Some(v));
        }
        assert_eq!(minimal_bytes(128), vec![0, 128]);
        assert_eq!(minimal_bytes(-128), vec![0x80]);
        assert_eq!(unscaled(&[1; 17]), None);
    }

    #[test]
    fn null_in_a_not_null_column_is_an_error() {
        let avro = Avro::new("t", &schema(), &["name".into()], true).unwrap();
        let err = avro.encode(&batch()).unwrap_err().to_string();
        assert!(err.contains("column 'name' is NOT NULL"), "{err}");
    }
}
