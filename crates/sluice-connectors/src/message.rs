//! Rows as messages, for the connectors whose records are single messages with no key (NATS,
//! RabbitMQ, MQTT): the `format` option, decoding a poll's messages into a batch whose rows keep
//! their message's metadata, and encoding a changelog batch into message bodies. A message
//! holds one row: a JSON object, one CSV record (no header), an Avro record, the raw body, or a
//! change.

use std::sync::Arc;

use arrow::array::{ArrayRef, StringArray};
use arrow::datatypes::{DataType, SchemaRef};
use arrow::record_batch::RecordBatch;
use sluice_common::{ChangeBatch, Error, Op, Result};

use crate::avro::Avro;
use crate::format::{Changelog, JsonLines};
use crate::options::{Kind, OptionDef, Options, Side};

/// A runtime of one thread for a message client's connection and its reading task (a reader or
/// writer each has its own).
#[cfg(any(feature = "nats", feature = "rabbitmq", feature = "mqtt"))]
pub fn client_runtime(table: &str, client: &str) -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name(client)
        .enable_all()
        .build()
        .map_err(|e| {
            Error::connector(
                table,
                format!("starting the {client} client's runtime: {e}"),
            )
        })
}

/// The `format` choices of a message connector.
pub const FORMATS: &[&str] = &["json", "csv", "avro", "raw", "debezium-json", "canal-json"];

/// The `format` option of a message connector.
pub const FORMAT_OPTION: OptionDef = OptionDef {
    key: "format",
    kind: Kind::Choice(FORMATS),
    default: None,
    side: Side::Both,
    identity: true,
    doc: "how a message holds a row: a JSON object, a CSV record, an Avro record (binary, no header, schema from the columns as Flink derives it), `raw` bytes as the one STRING column, or a change of rows (an updating table)",
};

/// `json.ignore-parse-errors` of a message connector.
pub const JSON_IGNORE_OPTION: OptionDef = OptionDef {
    key: "json.ignore-parse-errors",
    kind: Kind::Bool,
    default: Some("false"),
    side: Side::Source,
    identity: false,
    doc: "skip and count a message that is not a JSON object of the columns, instead of failing the job",
};

/// `csv.ignore-parse-errors` of a message connector.
pub const CSV_IGNORE_OPTION: OptionDef = OptionDef {
    key: "csv.ignore-parse-errors",
    kind: Kind::Bool,
    default: Some("false"),
    side: Side::Source,
    identity: false,
    doc: "skip and count a message that is not one CSV record of the columns, instead of failing the job",
};

/// How a message holds a row.
#[derive(Clone)]
pub enum MessageFormat {
    /// A JSON object of the columns.
    Json,
    /// One CSV record of the columns, without a header.
    Csv,
    /// The body as the table's one column.
    Raw,
    /// One Avro record of the columns, binary encoded.
    Avro(Arc<Avro>),
    /// A change of rows (an updating table).
    Changes(Changelog),
}

impl MessageFormat {
    /// The `format` option of the table `spec`.
    pub fn from_options(opts: &mut Options, spec: &crate::ConnectorSpec) -> Result<MessageFormat> {
        let name = opts.required("format")?;
        if let Some(c) = Changelog::from_options(&name, opts)? {
            return Ok(MessageFormat::Changes(c));
        }
        Ok(match name.as_str() {
            "raw" => MessageFormat::Raw,
            "csv" => MessageFormat::Csv,
            "avro" => MessageFormat::Avro(Arc::new(Avro::from_options(
                opts,
                &spec.value_schema(),
                &spec.primary_key_names(),
            )?)),
            _ => MessageFormat::Json,
        })
    }

    /// The MIME type of its messages.
    pub fn content_type(&self) -> &'static str {
        match self {
            MessageFormat::Json | MessageFormat::Changes(_) => "application/json",
            MessageFormat::Csv => "text/csv",
            MessageFormat::Avro(_) => "application/avro",
            MessageFormat::Raw => "application/octet-stream",
        }
    }

    /// Whether a writer of this format takes updates and deletes.
    pub fn writes_updates(&self) -> bool {
        matches!(self, MessageFormat::Changes(_))
    }

    /// The message bodies of a batch (a changelog format gives one per change, the others one
    /// per row; those take inserts only).
    pub fn encode(
        &self,
        table: &str,
        connector: &str,
        batch: &ChangeBatch,
    ) -> Result<Vec<Vec<u8>>> {
        if let MessageFormat::Changes(c) = self {
            return Ok(c
                .encode(batch)?
                .into_iter()
                .map(|(_, m)| m.into_bytes())
                .collect());
        }
        if (0..batch.num_rows()).any(|i| batch.op(i) != Op::Insert) {
            return Err(Error::connector(
                table,
                format!(
                    "the {connector} connector writes inserts only with a plain format; write an \
                     updating result with 'format' = 'debezium-json' or 'canal-json'"
                ),
            ));
        }
        match self {
            MessageFormat::Raw => {
                let column = arrow::compute::cast(batch.data.column(0), &DataType::Utf8)?;
                let text = column
                    .as_any()
                    .downcast_ref::<StringArray>()
                    .expect("cast to Utf8");
                Ok(text
                    .iter()
                    .map(|v| v.unwrap_or("").as_bytes().to_vec())
                    .collect())
            }
            MessageFormat::Avro(avro) => avro.encode(&batch.data),
            MessageFormat::Csv => Ok(csv_rows(&batch.data)?
                .into_iter()
                .map(String::into_bytes)
                .collect()),
            _ => Ok(crate::format::json_rows(&batch.data)?
                .into_iter()
                .map(String::into_bytes)
                .collect()),
        }
    }
}

/// Decodes messages into rows of a table's value columns.
pub struct MessageDecoder {
    format: MessageFormat,
    json: JsonLines,
    value_schema: SchemaRef,
    csv: Option<CsvMessages>,
    avro: Option<Avro>,
    /// The table's physical columns, and its metadata columns with their keys.
    schema: SchemaRef,
    metadata: Vec<(usize, String)>,
}

impl MessageDecoder {
    /// A decoder for the value columns of `spec`, with `<format>.ignore-parse-errors`.
    pub fn open(
        spec: &crate::ConnectorSpec,
        opts: &mut Options,
        format: &MessageFormat,
    ) -> Result<MessageDecoder> {
        let value_schema = spec.value_schema();
        let mut csv = None;
        let mut avro = None;
        let json = match format {
            MessageFormat::Changes(c) => {
                let ignore = opts.flag(&format!("{}.ignore-parse-errors", c.name()))?;
                JsonLines::changelog(value_schema.clone(), ignore, c.clone())?
            }
            MessageFormat::Raw => {
                if value_schema.fields().len() != 1 {
                    return Err(opts.error(
                        "format 'raw' reads a table of one column (besides metadata columns)",
                    ));
                }
                JsonLines::new(value_schema.clone(), false)?
            }
            MessageFormat::Json => {
                let ignore = opts.flag("json.ignore-parse-errors")?;
                JsonLines::new(value_schema.clone(), ignore)?
            }
            MessageFormat::Avro(a) => {
                let ignore = opts.flag("avro.ignore-parse-errors")?;
                avro = Some(a.as_ref().clone().ignoring_errors(ignore));
                JsonLines::new(value_schema.clone(), false)?
            }
            MessageFormat::Csv => {
                let ignore = opts.flag("csv.ignore-parse-errors")?;
                csv = Some(CsvMessages::new(&spec.table, value_schema.clone(), ignore));
                JsonLines::new(value_schema.clone(), false)?
            }
        };
        Ok(MessageDecoder {
            format: format.clone(),
            json,
            value_schema,
            csv,
            avro,
            schema: spec.schema.clone(),
            metadata: spec.metadata.clone(),
        })
    }

    /// A table's rows from messages: each message's `body` decoded, then the metadata columns
    /// in their places, each made by `column(key, messages)` from the messages that gave rows
    /// (in row order). `location(i)` names message `i` in errors.
    pub fn rows<M>(
        &mut self,
        messages: &[M],
        body: impl Fn(&M) -> &[u8],
        location: &dyn Fn(usize) -> String,
        column: impl Fn(&str, &[&M]) -> ArrayRef,
    ) -> Result<Option<RecordBatch>> {
        let with_metadata = !self.metadata.is_empty();
        let (batch, kept) = match self.avro.as_mut() {
            Some(avro) => avro.decode(messages.iter().map(&body), location)?,
            None => {
                let bodies: Vec<String> = messages
                    .iter()
                    .map(|m| String::from_utf8_lossy(body(m)).into_owned())
                    .collect();
                self.decode(bodies, location, with_metadata)?
            }
        };
        let Some(values) = batch else {
            return Ok(None);
        };
        if !with_metadata {
            return Ok(Some(values));
        }
        let kept: Vec<&M> = kept.iter().map(|k| &messages[*k]).collect();
        crate::format::place_metadata(values, &self.schema, &self.metadata, |key| {
            column(key, &kept)
        })
        .map(Some)
    }

    /// Messages skipped as malformed so far.
    pub fn skipped(&self) -> u64 {
        self.json.skipped()
            + self.csv.as_ref().map_or(0, |c| c.skipped)
            + self.avro.as_ref().map_or(0, Avro::skipped)
    }

    /// The rows of `bodies` (value columns, with the changelog's op column last), and the
    /// message each row came from: a malformed message skipped has no row, and a changelog
    /// message may have two (an update's before and after). `location(i)` names message `i` in
    /// errors. Without `keep_origins` the origins are not tracked (no metadata columns to
    /// fill), which decodes plain JSON faster.
    pub fn decode(
        &mut self,
        bodies: Vec<String>,
        location: &dyn Fn(usize) -> String,
        keep_origins: bool,
    ) -> Result<(Option<RecordBatch>, Vec<usize>)> {
        match &self.format {
            MessageFormat::Raw => {
                let n = bodies.len();
                let column: ArrayRef = Arc::new(StringArray::from(bodies));
                let column = arrow::compute::cast(&column, self.value_schema.field(0).data_type())?;
                let batch = RecordBatch::try_new(self.value_schema.clone(), vec![column])?;
                Ok((Some(batch), (0..n).collect()))
            }
            MessageFormat::Changes(_) => {
                let batch = self.json.decode_at(&bodies, location)?;
                Ok((batch, self.json.origins().to_vec()))
            }
            MessageFormat::Csv => {
                let csv = self.csv.as_mut().expect("a CSV decoder");
                csv.decode(&bodies, location)
            }
            MessageFormat::Avro(_) => {
                let avro = self.avro.as_mut().expect("an Avro decoder");
                avro.decode(bodies.iter().map(|b| b.as_bytes()), location)
            }
            MessageFormat::Json if keep_origins => self.json.decode_kept(bodies, location),
            MessageFormat::Json => {
                let batch = self.json.decode_at(&bodies, location)?;
                let n = batch.as_ref().map_or(0, |b| b.num_rows());
                Ok((batch, (0..n).collect()))
            }
        }
    }
}

/// Decodes messages of one CSV record each (`csv.ignore-parse-errors` skips bad ones).
pub struct CsvMessages {
    table: String,
    schema: SchemaRef,
    ignore: bool,
    /// Messages skipped as bad.
    pub skipped: u64,
}

impl CsvMessages {
    pub fn new(table: &str, schema: SchemaRef, ignore: bool) -> CsvMessages {
        CsvMessages {
            table: table.to_string(),
            schema,
            ignore,
            skipped: 0,
        }
    }

    /// The rows of messages, and the message of each row: all at once, or (when that fails, or
    /// a message does not hold exactly one record) one message at a time, to name or skip
    /// exactly the bad ones.
    pub fn decode(
        &mut self,
        bodies: &[String],
        location: &dyn Fn(usize) -> String,
    ) -> Result<(Option<RecordBatch>, Vec<usize>)> {
        let all: Vec<&str> = bodies.iter().map(String::as_str).collect();
        if let Ok(batch) = self.csv_records(&all) {
            if batch.num_rows() == bodies.len() {
                return Ok((Some(batch), (0..bodies.len()).collect()));
            }
        }
        let (mut batches, mut kept) = (vec![], vec![]);
        for (i, body) in all.iter().enumerate() {
            let problem = match self.csv_records(&[body]) {
                Ok(b) if b.num_rows() == 1 => {
                    batches.push(b);
                    kept.push(i);
                    continue;
                }
                Ok(b) => format!("it holds {} CSV records, not one", b.num_rows()),
                Err(e) => e.to_string(),
            };
            if !self.ignore {
                return Err(Error::connector(
                    &self.table,
                    format!(
                        "malformed CSV record in {} ({problem}); set 'csv.ignore-parse-errors' = 'true' to skip such messages",
                        location(i)
                    ),
                ));
            }
            self.skipped += 1;
        }
        if batches.is_empty() {
            return Ok((None, kept));
        }
        let batch = arrow::compute::concat_batches(&self.schema, &batches)?;
        Ok((Some(batch), kept))
    }

    /// The row of a message that holds exactly one CSV record.
    pub fn one(&self, body: &str) -> std::result::Result<RecordBatch, String> {
        let batch = self.csv_records(&[body])?;
        match batch.num_rows() {
            1 => Ok(batch),
            n => Err(format!("it holds {n} CSV records, not one")),
        }
    }

    /// The records of `bodies` (each ended by a line end), decoded by arrow's CSV decoder.
    fn csv_records(&self, bodies: &[&str]) -> std::result::Result<RecordBatch, String> {
        let mut text = Vec::with_capacity(bodies.iter().map(|b| b.len() + 1).sum());
        for b in bodies {
            text.extend_from_slice(b.trim_end_matches(['\r', '\n']).as_bytes());
            text.push(b'\n');
        }
        let mut decoder = arrow::csv::ReaderBuilder::new(self.schema.clone())
            .with_header(false)
            .with_batch_size(bodies.len().max(1) + 1)
            .build_decoder();
        let mut at = 0;
        while at < text.len() {
            let n = decoder.decode(&text[at..]).map_err(|e| e.to_string())?;
            if n == 0 {
                break;
            }
            at += n;
        }
        decoder.decode(&[]).map_err(|e| e.to_string())?;
        match decoder.flush().map_err(|e| e.to_string())? {
            Some(batch) => Ok(batch),
            None => Ok(RecordBatch::new_empty(self.schema.clone())),
        }
    }
}

/// One CSV record (without a line end) per row of `batch`.
pub fn csv_rows(batch: &RecordBatch) -> Result<Vec<String>> {
    let data = crate::format::timestamps_as_text(batch)?;
    let mut out = Vec::with_capacity(data.num_rows());
    let mut buf = vec![];
    for i in 0..data.num_rows() {
        buf.clear();
        let mut w = arrow::csv::WriterBuilder::new()
            .with_header(false)
            .build(&mut buf);
        w.write(&data.slice(i, 1))?;
        drop(w);
        let line = String::from_utf8_lossy(&buf);
        out.push(line.trim_end_matches(['\r', '\n']).to_string());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use arrow::array::{Array, AsArray, Int64Array};
    use arrow::datatypes::{Field, Int64Type, Schema, TimeUnit};

    use super::*;

    fn decoder(format: &str, ignore: bool) -> (MessageFormat, MessageDecoder) {
        let spec = crate::ConnectorSpec {
            table: "t".into(),
            schema: Arc::new(Schema::new(vec![
                Field::new("id", DataType::Int64, true),
                Field::new("name", DataType::Utf8, true),
                Field::new("ts", DataType::Timestamp(TimeUnit::Millisecond, None), true),
            ])),
            options: [
                ("connector", "nats"),
                ("format", format),
                (
                    "csv.ignore-parse-errors",
                    if ignore { "true" } else { "false" },
                ),
            ]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<BTreeMap<_, _>>(),
            partitioned_by: vec![],
            read_columns: None,
            decode_ahead: false,
            whole_files: false,
            sink_instance: 0,
            metadata: vec![],
            primary_key: vec![],
        };
        let mut opts = Options::new(&spec, false).unwrap();
        let format = MessageFormat::from_options(&mut opts, &spec).unwrap();
        let decoder = MessageDecoder::open(&spec, &mut opts, &format).unwrap();
        (format, decoder)
    }

    /// Rows with quotes, commas, line ends and NULLs in their text are CSV messages that decode
    /// back to the same rows.
    #[test]
    fn csv_messages_round_trip() {
        let (format, mut decoder) = decoder("csv", false);
        let names = [
            Some("plain"),
            Some("with, comma"),
            Some("with \"quotes\""),
            Some("two\nlines"),
            None,
        ];
        let batch = RecordBatch::try_new(
            decoder.value_schema.clone(),
            vec![
                Arc::new(Int64Array::from_iter_values(0..5)),
                Arc::new(StringArray::from_iter(names)),
                Arc::new(arrow::array::TimestampMillisecondArray::from_iter_values(
                    (0..5).map(|i| 1_700_000_000_000 + i * 1001),
                )),
            ],
        )
        .unwrap();
        let messages = format
            .encode("t", "nats", &ChangeBatch::inserts(batch.clone()))
            .unwrap();
        assert_eq!(messages.len(), 5);
        assert_eq!(messages[1], br#"1,"with, comma",2023-11-14 22:13:21.001"#);
        let messages = messages
            .into_iter()
            .map(|m| String::from_utf8(m).unwrap())
            .collect();
        let (got, kept) = decoder
            .decode(messages, &|i| format!("message {i}"), true)
            .unwrap();
        assert_eq!(kept, vec![0, 1, 2, 3, 4]);
        let got = got.unwrap();
        assert_eq!(got.column(0), batch.column(0));
        assert_eq!(got.column(2), batch.column(2));
        let text = got.column(1).as_string::<i32>();
        for (i, n) in names.iter().enumerate() {
            // CSV has no NULL text: an empty field reads as NULL.
            assert_eq!(text.is_null(i), n.is_none(), "row {i}");
            if let Some(n) = n {
                assert_eq!(text.value(i), *n);
            }
        }
    }

    /// A bad message (a wrong type, a missing field, two records in one) is named by its
    /// location, or skipped and counted with the rows of the others kept in place.
    #[test]
    fn bad_csv_messages_are_named_or_skipped() {
        let bodies = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let messages = bodies(&[
            "1,a,2023-11-14 22:13:20",
            "x,b,2023-11-14 22:13:20",
            "3,c",
            "4,d,2023-11-14 22:13:20\n5,e,2023-11-14 22:13:20",
            "6,f,2023-11-14 22:13:20.5",
        ]);
        let (_, mut strict) = decoder("csv", false);
        let err = strict
            .decode(messages.clone(), &|i| format!("message {i}"), true)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("message 1") && err.contains("csv.ignore-parse-errors"),
            "{err}"
        );
        let (_, mut lenient) = decoder("csv", true);
        let (got, kept) = lenient
            .decode(messages, &|i| format!("message {i}"), true)
            .unwrap();
        assert_eq!(kept, vec![0, 4]);
        assert_eq!(lenient.skipped(), 3);
        let ids: Vec<i64> = got
            .unwrap()
            .column(0)
            .as_primitive::<Int64Type>()
            .values()
            .to_vec();
        assert_eq!(ids, vec![1, 6]);
    }

    #[test]
    fn avro_messages_round_trip_through_rows() {
        let (format, mut decoder) = decoder("avro", false);
        let batch = RecordBatch::try_new(
            decoder.value_schema.clone(),
            vec![
                Arc::new(Int64Array::from(vec![Some(1), None, Some(-3)])),
                Arc::new(StringArray::from(vec![Some("a"), Some(""), None])),
                Arc::new(arrow::array::TimestampMillisecondArray::from(vec![
                    Some(1_700_000_000_001),
                    None,
                    Some(-5),
                ])),
            ],
        )
        .unwrap();
        let messages = format
            .encode("t", "nats", &ChangeBatch::inserts(batch.clone()))
            .unwrap();
        assert_eq!(format.content_type(), "application/avro");
        let got = decoder
            .rows(
                &messages,
                |m| m.as_slice(),
                &|i| format!("message {i}"),
                |_, _| unreachable!("no metadata columns"),
            )
            .unwrap()
            .unwrap();
        assert_eq!(got, batch);
    }
}
