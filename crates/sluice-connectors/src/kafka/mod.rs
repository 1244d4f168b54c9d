//! The `kafka` connector, with the options of Flink's: a source over a topic's partitions and
//! a sink into a topic, through librdkafka (the `rdkafka` crate, synchronous API).
//!
//! **Source.** A topic's partitions are its splits, dealt to the workers in turn as file splits
//! are, and each has its own watermark. Partitions are assigned by hand, never through a
//! consumer group: where each partition is (the next offset to read) lives in Sluice's
//! checkpoints, as `<topic>/<partition>`, and a restore seeks every partition there (on any
//! number of workers). A job can end: `scan.bounded.mode` gives each partition an end offset.
//!
//! **Sink.** Each worker has its own producer. `sink.delivery-guarantee` = `at-least-once`
//! flushes at every checkpoint (and at the end) and fails the job on an undelivered record;
//! `none` does not wait.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use sluice_common::{ChangeBatch, Error, Result};

use crate::format::JsonLines;
use crate::staged::Payload;
use codec::{Codec, Format};

mod codec;
use crate::options::{ConnectorDef, Kind, OptionDef, Options, Side};
use crate::{ConnectorSpec, Poll, SinkWriter, SourceOffsets, SourceReader, SPLIT_DONE};

const TOPIC: OptionDef = OptionDef {
    key: "topic",
    kind: Kind::Text,
    default: None,
    side: Side::Both,
    identity: true,
    doc: "the topic; a source may read several, separated by `;`",
};
const TOPIC_PATTERN: OptionDef = OptionDef {
    key: "topic-pattern",
    kind: Kind::Text,
    default: None,
    side: Side::Source,
    identity: true,
    doc: "instead of `topic`: read every topic whose whole name matches this regular expression",
};
const DISCOVERY_INTERVAL: OptionDef = OptionDef {
        key: "scan.topic-partition-discovery.interval",
        kind: Kind::Duration,
        default: None,
        side: Side::Source,
        identity: false,
        doc: "an unbounded source looks this often for partitions added to its topics (and, with `topic-pattern`, for new topics), and reads them from their start",
};
const PROPERTIES_BOOTSTRAP_SERVERS: OptionDef = OptionDef {
    key: "properties.bootstrap.servers",
    kind: Kind::Text,
    default: None,
    side: Side::Both,
    identity: true,
    doc: "the brokers, `host:port[,host:port...]`",
};
const PROPERTIES_GROUP_ID: OptionDef = OptionDef {
        key: "properties.group.id",
        kind: Kind::Text,
        default: None,
        side: Side::Source,
        identity: false,
        doc: "the consumer group whose committed offsets `group-offsets` starts from; each committed checkpoint's positions are committed to it, for monitoring (reading uses the checkpoints, and the group is never joined)",
};
const PROPERTIES_NAME: OptionDef = OptionDef {
    key: "properties.<name>",
    kind: Kind::Text,
    default: None,
    side: Side::Both,
    identity: false,
    doc: "passed to librdkafka as `<name>`",
};
const FORMAT: OptionDef = OptionDef {
        key: "format",
        kind: Kind::Choice(&["json", "csv", "avro", "raw", "debezium-json", "canal-json"]),
        default: None,
        side: Side::Both,
        identity: true,
        doc: "how a record's value holds a row: a JSON object, a CSV record (no header), an Avro record (binary, no header, schema from the columns as Flink derives it), `raw` bytes as the one STRING or BYTES column, or a change of rows (`debezium-json`, `canal-json`: the table is an updating one)",
};
const VALUE_FORMAT: OptionDef = OptionDef {
    key: "value.format",
    kind: Kind::Choice(&["json", "csv", "avro", "raw", "debezium-json", "canal-json"]),
    default: None,
    side: Side::Both,
    identity: true,
    doc: "the same as `format`",
};
const JSON_IGNORE_PARSE_ERRORS: OptionDef = OptionDef {
        key: "json.ignore-parse-errors",
        kind: Kind::Bool,
        default: Some("false"),
        side: Side::Source,
        identity: false,
        doc: "skip and count a record that is not a JSON object of the columns, instead of failing the job",
};
const SCAN_STARTUP_MODE: OptionDef = OptionDef {
    key: "scan.startup.mode",
    kind: Kind::Choice(&[
        "earliest-offset",
        "latest-offset",
        "group-offsets",
        "timestamp",
        "specific-offsets",
    ]),
    default: Some("group-offsets"),
    side: Side::Source,
    identity: false,
    doc: "where a job without a checkpoint starts reading each partition",
};
const SCAN_STARTUP_TIMESTAMP_MILLIS: OptionDef = OptionDef {
    key: "scan.startup.timestamp-millis",
    kind: Kind::Count,
    default: None,
    side: Side::Source,
    identity: false,
    doc: "`timestamp` mode: the first record at or after this time (epoch milliseconds)",
};
const SCAN_STARTUP_SPECIFIC_OFFSETS: OptionDef = OptionDef {
        key: "scan.startup.specific-offsets",
        kind: Kind::Text,
        default: None,
        side: Side::Source,
        identity: false,
        doc: "`specific-offsets` mode: `partition:0,offset:42;partition:1,offset:300` (others start at the earliest offset)",
};
const SCAN_BOUNDED_MODE: OptionDef = OptionDef {
    key: "scan.bounded.mode",
    kind: Kind::Choice(&[
        "unbounded",
        "latest-offset",
        "timestamp",
        "specific-offsets",
    ]),
    default: Some("unbounded"),
    side: Side::Source,
    identity: false,
    doc:
        "where the source ends: the partitions' ends when the job starts, a time, or given offsets",
};
const SCAN_BOUNDED_TIMESTAMP_MILLIS: OptionDef = OptionDef {
    key: "scan.bounded.timestamp-millis",
    kind: Kind::Count,
    default: None,
    side: Side::Source,
    identity: false,
    doc: "`timestamp` bound: records from this time on (epoch milliseconds) are not read",
};
const SCAN_BOUNDED_SPECIFIC_OFFSETS: OptionDef = OptionDef {
        key: "scan.bounded.specific-offsets",
        kind: Kind::Text,
        default: None,
        side: Side::Source,
        identity: false,
        doc: "`specific-offsets` bound: `partition:0,offset:42;...`, the first offset not read (partitions not named are read to their end when the job starts)",
};
const SLUICE_CONNECT_TIMEOUT: OptionDef = OptionDef {
        key: "sluice.connect-timeout",
        kind: Kind::Duration,
        default: Some("10 s"),
        side: Side::Both,
        identity: false,
        doc: "how long the brokers may stay unreachable (at start, or while running) before the job fails",
};
const SINK_DELIVERY_GUARANTEE: OptionDef = OptionDef {
        key: "sink.delivery-guarantee",
        kind: Kind::Choice(&["none", "at-least-once", "exactly-once"]),
        default: Some("at-least-once"),
        side: Side::Sink,
        identity: false,
        doc: "`at-least-once` waits for every record to be acknowledged at each checkpoint and at the end; `exactly-once` writes each checkpoint's records in one Kafka transaction once the checkpoint is committed (with checkpoints on)",
};
const SINK_TRANSACTIONAL_ID_PREFIX: OptionDef = OptionDef {
        key: "sink.transactional-id-prefix",
        kind: Kind::Text,
        default: None,
        side: Side::Sink,
        identity: false,
        doc: "`exactly-once`: the prefix of the producers' `transactional.id`s (`<prefix>-<insert>-<worker>`), unique per job and sink",
};
const SINK_PARTITIONER: OptionDef = OptionDef {
        key: "sink.partitioner",
        kind: Kind::Choice(&["default", "fixed", "round-robin"]),
        default: Some("default"),
        side: Side::Sink,
        identity: false,
        doc: "which partition a record goes to: librdkafka's (by key hash; unkeyed records spread), the worker's own (`fixed`: worker `w` writes partition `w` modulo the partitions), or each partition in turn",
};
const KEY_FORMAT: OptionDef = OptionDef {
    key: "key.format",
    kind: Kind::Choice(&["json", "csv", "avro", "raw"]),
    default: None,
    side: Side::Both,
    identity: true,
    doc: "how the key columns are a record's key: a JSON object of them, a CSV record, an Avro record, or the one column as text",
};
const KEY_FIELDS_PREFIX: OptionDef = OptionDef {
    key: "key.fields-prefix",
    kind: Kind::Text,
    default: None,
    side: Side::Both,
    identity: true,
    doc: "the key columns' names start with this in the table, and the key's format names them without it (needs `EXCEPT_KEY`); keeps key and value fields of one name apart",
};
const KEY_FIELDS: OptionDef = OptionDef {
        key: "key.fields",
        kind: Kind::Text,
        default: None,
        side: Side::Both,
        identity: true,
        doc: "columns that make the record key, separated by `;` (records with equal keys go to one partition); read from the key with `EXCEPT_KEY`",
};
const VALUE_FIELDS_INCLUDE: OptionDef = OptionDef {
        key: "value.fields-include",
        kind: Kind::Choice(&["ALL", "EXCEPT_KEY"]),
        default: Some("ALL"),
        side: Side::Both,
        identity: true,
        doc: "whether a record's value holds every column (`ALL`) or all but the key's (`EXCEPT_KEY`, read from the key)",
};
const UPSERT_VALUE_FORMAT: OptionDef = OptionDef {
        key: "value.format",
        kind: Kind::Choice(&["json", "csv", "avro", "raw"]),
        default: None,
        side: Side::Both,
        identity: true,
        doc: "how a record's value holds the row: a JSON object, a CSV record, an Avro record, or the one non-key column as text (with `EXCEPT_KEY`); a record without a value deletes its key's row",
};
const UPSERT_KEY_FORMAT: OptionDef = OptionDef {
    key: "key.format",
    kind: Kind::Choice(&["json", "csv", "avro", "raw"]),
    default: None,
    side: Side::Both,
    identity: true,
    doc: "how the PRIMARY KEY's columns are a record's key (required)",
};
const UPSERT_GUARANTEE: OptionDef = OptionDef {
        key: "sink.delivery-guarantee",
        kind: Kind::Choice(&["none", "at-least-once", "exactly-once"]),
        default: Some("at-least-once"),
        side: Side::Sink,
        identity: false,
        doc: "as for `kafka`; upserts are idempotent, so `at-least-once` gives the right table to a reader that keeps the last value per key",
};

/// The `kafka` connector's options (Flink's names).
pub const CONNECTOR: ConnectorDef = ConnectorDef {
    name: "kafka",
    reads: true,
    writes: true,
    metadata: &[
        "topic",
        "partition",
        "offset",
        "timestamp",
        "timestamp-type",
        "leader-epoch",
    ],
    writable_metadata: &["timestamp"],
    formats: true,
    lookup: false,
    options: &[
        TOPIC,
        TOPIC_PATTERN,
        DISCOVERY_INTERVAL,
        PROPERTIES_BOOTSTRAP_SERVERS,
        PROPERTIES_GROUP_ID,
        PROPERTIES_NAME,
        FORMAT,
        VALUE_FORMAT,
        JSON_IGNORE_PARSE_ERRORS,
        crate::message::CSV_IGNORE_OPTION,
        crate::avro::IGNORE_OPTION,
        crate::avro::LEGACY_TIMESTAMPS_OPTION,
        SCAN_STARTUP_MODE,
        SCAN_STARTUP_TIMESTAMP_MILLIS,
        SCAN_STARTUP_SPECIFIC_OFFSETS,
        SCAN_BOUNDED_MODE,
        SCAN_BOUNDED_TIMESTAMP_MILLIS,
        SCAN_BOUNDED_SPECIFIC_OFFSETS,
        SLUICE_CONNECT_TIMEOUT,
        SINK_DELIVERY_GUARANTEE,
        SINK_TRANSACTIONAL_ID_PREFIX,
        SINK_PARTITIONER,
        KEY_FORMAT,
        KEY_FIELDS,
        KEY_FIELDS_PREFIX,
        VALUE_FIELDS_INCLUDE,
    ],
};

/// The `upsert-kafka` connector's options (Flink's names): a topic of upserts and tombstones
/// keyed by the table's PRIMARY KEY. It reads from the topic's start; `scan.bounded.mode` lets
/// a job end.
pub const UPSERT: ConnectorDef = ConnectorDef {
    name: "upsert-kafka",
    reads: true,
    writes: true,
    metadata: &[
        "topic",
        "partition",
        "offset",
        "timestamp",
        "timestamp-type",
        "leader-epoch",
    ],
    writable_metadata: &["timestamp"],
    formats: false,
    lookup: false,
    options: &[
        TOPIC,
        PROPERTIES_BOOTSTRAP_SERVERS,
        PROPERTIES_NAME,
        UPSERT_KEY_FORMAT,
        UPSERT_VALUE_FORMAT,
        KEY_FIELDS_PREFIX,
        VALUE_FIELDS_INCLUDE,
        JSON_IGNORE_PARSE_ERRORS,
        crate::message::CSV_IGNORE_OPTION,
        crate::avro::IGNORE_OPTION,
        crate::avro::LEGACY_TIMESTAMPS_OPTION,
        SCAN_BOUNDED_MODE,
        SCAN_BOUNDED_TIMESTAMP_MILLIS,
        SCAN_BOUNDED_SPECIFIC_OFFSETS,
        SLUICE_CONNECT_TIMEOUT,
        UPSERT_GUARANTEE,
        SINK_TRANSACTIONAL_ID_PREFIX,
        SINK_PARTITIONER,
    ],
};

/// The edge of `<prefix>.mode` = `mode` (`earliest-offset`, `latest-offset`, `timestamp` with
/// `<prefix>.timestamp-millis`, or `specific-offsets` with `<prefix>.specific-offsets`, where
/// partitions not named are at `otherwise`).
fn edge(opts: &mut Options, prefix: &str, mode: &str, otherwise: Edge) -> Result<Edge> {
    Ok(match mode {
        "earliest-offset" => Edge::Earliest,
        "latest-offset" => Edge::Latest,
        "timestamp" => {
            let key = format!("{prefix}.timestamp-millis");
            Edge::Time(opts.optional::<i64>(&key)?.ok_or_else(|| {
                opts.error(format!("'{prefix}.mode' = 'timestamp' needs '{key}'"))
            })?)
        }
        _ => {
            let key = format!("{prefix}.specific-offsets");
            let text = opts.get(&key)?.ok_or_else(|| {
                opts.error(format!(
                    "'{prefix}.mode' = 'specific-offsets' needs '{key}'"
                ))
            })?;
            Edge::Given(specific_offsets(opts, &key, &text)?, Box::new(otherwise))
        }
    })
}

/// How long a broker request at start (metadata, offsets) may take.
fn connect_timeout(opts: &mut Options) -> Result<Duration> {
    let ms = opts
        .duration_ms("sluice.connect-timeout")?
        .expect("declared default");
    Ok(Duration::from_millis(ms.max(1) as u64))
}

/// The partitions of `topic`, in order; an error naming the servers when they cannot be
/// reached within `timeout`, or the topic when it does not exist.
fn topic_partitions<C: ClientContext>(
    client: &rdkafka::client::Client<C>,
    opts: &Options,
    topic: &str,
    servers: &str,
    timeout: Duration,
) -> Result<Vec<i32>> {
    let metadata = client.fetch_metadata(Some(topic), timeout).map_err(|e| {
        opts.error(format!(
            "cannot reach the Kafka brokers at '{servers}' within {timeout:?} \
             (option 'properties.bootstrap.servers'): {e}"
        ))
    })?;
    let t = metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic && t.error().is_none() && !t.partitions().is_empty())
        .ok_or_else(|| {
            opts.error(format!(
                "topic '{topic}' does not exist on '{servers}' (option 'topic')"
            ))
        })?;
    let mut ids: Vec<i32> = t.partitions().iter().map(|p| p.id()).collect();
    ids.sort_unstable();
    Ok(ids)
}

/// librdkafka's configuration from `properties.*`, with Sluice's own settings.
fn client_config(opts: &mut Options) -> Result<ClientConfig> {
    let servers = opts.required("properties.bootstrap.servers")?;
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", &servers);
    for (k, v) in opts.with_prefix("properties.") {
        config.set(&k["properties.".len()..], &v);
    }
    Ok(config)
}

/// A client's errors, as librdkafka reports them: kept so that a broker that stays unreachable
/// fails the job after the connect timeout, naming the servers and librdkafka's reason.
#[derive(Default)]
pub struct Errors {
    /// Since when the brokers have been failing, and the last reason.
    failing: Mutex<Option<(Instant, String)>>,
    /// An undelivered record (sinks).
    undelivered: Mutex<Option<String>>,
}

impl Errors {
    fn failing_for(&self) -> Option<(Duration, String)> {
        self.failing
            .lock()
            .expect("kafka errors")
            .as_ref()
            .map(|(since, why)| (since.elapsed(), why.clone()))
    }

    fn note(&self, why: String) {
        let mut failing = self.failing.lock().expect("kafka errors");
        match failing.as_mut() {
            Some((_, last)) => *last = why,
            None => *failing = Some((Instant::now(), why)),
        }
    }

    fn clear(&self) {
        *self.failing.lock().expect("kafka errors") = None;
    }
}

/// The context of Sluice's Kafka clients.
#[derive(Clone, Default)]
pub struct Context {
    errors: Arc<Errors>,
}

impl ClientContext for Context {
    fn error(&self, error: KafkaError, reason: &str) {
        self.errors.note(format!("{error}: {reason}"));
    }
}

impl ConsumerContext for Context {}

impl ProducerContext for Context {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if let Err((e, m)) = result {
            let mut undelivered = self.errors.undelivered.lock().expect("kafka errors");
            if undelivered.is_none() {
                *undelivered = Some(format!(
                    "a record to topic '{}' partition {} was not delivered: {e}",
                    m.topic(),
                    m.partition()
                ));
            }
        }
    }
}

/// `partition:0,offset:42;partition:1,offset:300`, as Flink writes specific offsets.
fn specific_offsets(opts: &Options, key: &str, text: &str) -> Result<BTreeMap<i32, i64>> {
    let mut out = BTreeMap::new();
    for part in text.split(';').map(str::trim).filter(|p| !p.is_empty()) {
        let mut partition = None;
        let mut offset = None;
        for field in part.split(',') {
            match field.trim().split_once(':') {
                Some(("partition", v)) => partition = v.trim().parse::<i32>().ok(),
                Some(("offset", v)) => offset = v.trim().parse::<i64>().ok(),
                _ => {}
            }
        }
        match (partition, offset) {
            (Some(p), Some(o)) if p >= 0 && o >= 0 => {
                out.insert(p, o);
            }
            _ => {
                return Err(opts.error(format!(
                "option '{key}' = '{text}': write 'partition:0,offset:42;partition:1,offset:300'"
            )))
            }
        }
    }
    Ok(out)
}

/// Where a partition starts when no checkpoint says.
enum Startup {
    /// The consumer group's committed offsets.
    Group,
    At(Edge),
}

/// A position in each partition, for where a read starts or ends.
#[derive(Clone, Debug)]
enum Edge {
    Earliest,
    Latest,
    /// The first record at or after a time (epoch milliseconds).
    Time(i64),
    /// Given offsets by partition; the others at another edge.
    Given(BTreeMap<i32, i64>, Box<Edge>),
}

/// Where a source looks for partitions added while it runs.
struct Discovery {
    interval: Duration,
    topics: Topics,
    last: Instant,
    known: std::collections::HashSet<(String, i32)>,
    worker: usize,
    workers: usize,
}

/// The topics a source reads: named, or matching a pattern.
#[derive(Clone)]
enum Topics {
    Named(Vec<String>),
    Pattern(regex::Regex),
}

/// The worker that reads a partition found while running: the same on every worker.
fn discovered_owner(topic: &str, partition: i32, workers: usize) -> usize {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in topic.bytes().chain(partition.to_le_bytes()) {
        h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
    }
    (h % workers.max(1) as u64) as usize
}

/// Every (topic, partition) of `topics` now, sorted; topics that do not exist (yet) are left
/// out, unless `required` (the topics of a start).
fn list_partitions<C: ClientContext>(
    client: &rdkafka::client::Client<C>,
    topics: &Topics,
    timeout: Duration,
) -> std::result::Result<Vec<(String, i32)>, String> {
    let metadata = client
        .fetch_metadata(None, timeout)
        .map_err(|e| e.to_string())?;
    let mut out = vec![];
    for t in metadata.topics() {
        let wanted = match topics {
            Topics::Named(names) => names.iter().any(|n| n == t.name()),
            Topics::Pattern(p) => p.is_match(t.name()),
        };
        if wanted && t.error().is_none() {
            out.extend(
                t.partitions()
                    .iter()
                    .map(|p| (t.name().to_string(), p.id())),
            );
        }
    }
    out.sort();
    Ok(out)
}

/// One partition this worker reads.
struct Split {
    topic: String,
    partition: i32,
    /// The next offset to read, once known (a checkpoint, or resolved at the first poll).
    next: Option<i64>,
    /// The next offset after the rows returned so far (what a checkpoint records).
    returned: Option<i64>,
    /// The first offset not to read, for a bounded source.
    end: Option<i64>,
    /// Read to its end (its last rows may still wait in `ready`).
    done: bool,
    /// Its `SplitDone` was returned: it no longer holds the watermark back.
    closed: bool,
}

impl Split {
    fn key(&self) -> String {
        format!("{}/{}", self.topic, self.partition)
    }
}

/// A worker's reader over its share of a topic's partitions.
pub struct KafkaSource {
    table: String,
    servers: String,
    consumer: BaseConsumer<Context>,
    errors: Arc<Errors>,
    splits: Vec<Split>,
    by_partition: HashMap<(String, i32), usize>,
    startup: Startup,
    /// Where each partition ends (`None`: unbounded).
    bound: Option<Edge>,
    group: Option<String>,
    reset: Option<String>,
    timeout: Duration,
    codec: Codec,
    json: JsonLines,
    ignore_errors: bool,
    /// `csv` values.
    csv: Option<crate::message::CsvMessages>,
    /// The decoder of Avro values (not keyed).
    avro: Option<crate::avro::Avro>,
    /// The table's physical columns; those decoded from records (all but the metadata ones);
    /// and the metadata columns with their keys.
    schema: SchemaRef,
    value_schema: SchemaRef,
    metadata: Vec<(usize, String)>,
    /// Batches decoded but not yet returned, with the position after each.
    ready: VecDeque<(Poll, Option<(usize, i64)>)>,
    assigned: bool,
    silent: Vec<usize>,
    /// `scan.topic-partition-discovery.interval`: the topics (by name, or the pattern), when the
    /// last look was, every partition seen (any worker's), and this worker's index and count.
    discovery: Option<Discovery>,
    /// With `properties.group.id`: the positions each recorded checkpoint holds, committed to
    /// the group once it commits (for monitoring, as Flink does; reading never uses them).
    recorded: BTreeMap<u64, Vec<(String, i32, i64)>>,
}

impl KafkaSource {
    pub fn open(
        spec: &ConnectorSpec,
        opts: &mut Options,
        worker: usize,
        workers: usize,
    ) -> Result<Self> {
        let upsert = opts.connector() == "upsert-kafka";
        let pattern_option = if upsert {
            None
        } else {
            opts.get("topic-pattern")?
        };
        let pattern = match (opts.get("topic")?, pattern_option) {
            (Some(_), Some(_)) => {
                return Err(opts.error("give 'topic' or 'topic-pattern', not both"));
            }
            (None, Some(p)) => Some(
                regex::Regex::new(&format!("^(?:{p})$"))
                    .map_err(|e| opts.error(format!("option 'topic-pattern' = '{p}': {e}")))?,
            ),
            _ => None,
        };
        let topics: Vec<String> = match &pattern {
            Some(_) => vec![],
            None => opts
                .required("topic")?
                .split(';')
                .map(|t| t.trim().to_string())
                .filter(|t| !t.is_empty())
                .collect(),
        };
        let value_schema = spec.value_schema();
        let primary_key: Vec<usize> = spec
            .primary_key
            .iter()
            .map(|c| {
                value_schema
                    .index_of(spec.schema.field(*c).name())
                    .map_err(|_| opts.error("a PRIMARY KEY column cannot be a METADATA column"))
            })
            .collect::<Result<_>>()?;
        let codec = Codec::from_options(opts, &value_schema, &primary_key, upsert)?;
        let ignore_errors = opts.flag(&codec.ignore_option())?;
        let csv = (codec.value == Format::Csv).then(|| {
            crate::message::CsvMessages::new(&spec.table, value_schema.clone(), ignore_errors)
        });
        let avro = match (&codec.value_avro, codec.keyed_decode()) {
            (Some(a), false) => Some(a.clone().ignoring_errors(ignore_errors)),
            _ => None,
        };
        let timeout = connect_timeout(opts)?;
        // An upsert topic is read from its start: its table is every key's last record.
        let startup = if upsert {
            Startup::At(Edge::Earliest)
        } else {
            match opts.value::<String>("scan.startup.mode")?.as_str() {
                "group-offsets" => Startup::Group,
                mode => Startup::At(edge(opts, "scan.startup", mode, Edge::Earliest)?),
            }
        };
        // Partitions that specific offsets do not name end where they end when the job starts.
        let bound = match opts.value::<String>("scan.bounded.mode")?.as_str() {
            "unbounded" => None,
            mode => Some(edge(opts, "scan.bounded", mode, Edge::Latest)?),
        };
        let group = opts.get("properties.group.id")?;
        if matches!(startup, Startup::Group) && group.is_none() {
            return Err(opts.error(
                "'scan.startup.mode' = 'group-offsets' (the default) needs 'properties.group.id'; \
                 or set 'scan.startup.mode' = 'earliest-offset'",
            ));
        }
        let mut config = client_config(opts)?;
        let servers = config
            .get("bootstrap.servers")
            .unwrap_or_default()
            .to_string();
        let reset = config.get("auto.offset.reset").map(str::to_string);
        // Partitions are assigned by hand and offsets live in checkpoints: the group (when
        // set) is only for `group-offsets`, and nothing is committed to it.
        config
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "false");
        if config.get("group.id").is_none() {
            config.set("group.id", format!("sluice-{}", spec.table));
        }
        // librdkafka stops fetching a partition for `fetch.queue.backoff.ms` (1 s by default)
        // whenever its local queue is past `queued.min.messages`; a job that takes a batch at a
        // time crosses that often, and reading fell to a seventh of the file source's rate
        // (benchmarks/scripts/kafka_vs_file.sh). A short backoff keeps fetches flowing.
        if config.get("fetch.queue.backoff.ms").is_none() {
            config.set("fetch.queue.backoff.ms", "10");
        }
        let context = Context::default();
        let errors = context.errors.clone();
        let consumer: BaseConsumer<Context> = config
            .create_with_context(context)
            .map_err(|e| opts.error(format!("kafka consumer for '{servers}': {e}")))?;
        // Every worker lists the same partitions in the same order, and deals them alike.
        let mut partitions: Vec<(String, i32)> = vec![];
        for topic in &topics {
            let ids = topic_partitions(consumer.client(), opts, topic, &servers, timeout)?;
            partitions.extend(ids.into_iter().map(|p| (topic.clone(), p)));
        }
        let selection = match &pattern {
            Some(p) => Topics::Pattern(p.clone()),
            None => Topics::Named(topics.clone()),
        };
        if pattern.is_some() {
            partitions = list_partitions(consumer.client(), &selection, timeout).map_err(|e| {
                opts.error(format!(
                    "cannot reach the Kafka brokers at '{servers}' within {timeout:?} \
                     (option 'properties.bootstrap.servers'): {e}"
                ))
            })?;
        }
        let interval = if upsert {
            None
        } else {
            opts.duration_ms("scan.topic-partition-discovery.interval")?
        };
        let discovery = match interval {
            Some(ms) if ms > 0 && bound.is_none() => Some(Discovery {
                interval: Duration::from_millis(ms as u64),
                topics: selection,
                last: Instant::now(),
                known: partitions.iter().cloned().collect(),
                worker,
                workers,
            }),
            _ => None,
        };
        let total = partitions.len();
        let splits: Vec<Split> = partitions
            .into_iter()
            .enumerate()
            .filter(|(i, _)| i % workers == worker)
            .map(|(_, (topic, partition))| Split {
                topic,
                partition,
                next: None,
                returned: None,
                end: None,
                done: false,
                closed: false,
            })
            .collect();
        let by_partition = splits
            .iter()
            .enumerate()
            .map(|(i, s)| ((s.topic.clone(), s.partition), i))
            .collect();
        let silent = if bound.is_none() {
            vec![]
        } else {
            (total..workers).collect()
        };
        Ok(KafkaSource {
            table: spec.table.clone(),
            servers,
            consumer,
            errors,
            splits,
            by_partition,
            startup,
            bound,
            group,
            reset,
            timeout,
            json: codec.decoder(ignore_errors)?,
            ignore_errors,
            csv,
            avro,
            // Upsert rows of deletes hold only their key until ChangelogNormalize.
            schema: if codec.upsert {
                sluice_common::changelog::all_nullable(&spec.schema)
            } else {
                spec.schema.clone()
            },
            codec,
            value_schema,
            metadata: spec.metadata.clone(),
            ready: VecDeque::new(),
            assigned: false,
            silent,
            discovery,
            recorded: BTreeMap::new(),
        })
    }

    fn error(&self, message: impl Into<String>) -> Error {
        Error::connector(&self.table, message)
    }

    /// The partition's first and next offsets (librdkafka's low and high watermarks).
    fn watermarks(&self, s: &Split) -> Result<(i64, i64)> {
        self.consumer
            .fetch_watermarks(&s.topic, s.partition, self.timeout)
            .map_err(|e| {
                self.error(format!(
                    "topic '{}' partition {}: cannot read its offsets from '{}': {e}",
                    s.topic, s.partition, self.servers
                ))
            })
    }

    /// The offset of the first record at or after `ms` in each of `splits` (the end when none).
    fn offsets_for_time(&self, splits: &[usize], ms: i64) -> Result<HashMap<usize, i64>> {
        let mut tpl = TopicPartitionList::new();
        for &i in splits {
            let s = &self.splits[i];
            tpl.add_partition_offset(&s.topic, s.partition, Offset::Offset(ms))
                .map_err(|e| self.error(e.to_string()))?;
        }
        let found = self
            .consumer
            .offsets_for_times(tpl, self.timeout)
            .map_err(|e| self.error(format!("offsets for time {ms}: {e}")))?;
        let mut out = HashMap::new();
        for &i in splits {
            let s = &self.splits[i];
            let offset = match found
                .find_partition(&s.topic, s.partition)
                .map(|e| e.offset())
            {
                Some(Offset::Offset(o)) => o,
                _ => self.watermarks(s)?.1,
            };
            out.insert(i, offset);
        }
        Ok(out)
    }

    /// The offset at `edge` of each of `splits`.
    fn positions(&self, splits: &[usize], edge: &Edge) -> Result<HashMap<usize, i64>> {
        match edge {
            Edge::Time(ms) => self.offsets_for_time(splits, *ms),
            Edge::Given(given, otherwise) => {
                let (named, rest): (Vec<usize>, Vec<usize>) = splits
                    .iter()
                    .partition(|i| given.contains_key(&self.splits[**i].partition));
                let mut out = self.positions(&rest, otherwise)?;
                out.extend(
                    named
                        .iter()
                        .map(|i| (*i, given[&self.splits[*i].partition])),
                );
                Ok(out)
            }
            Edge::Earliest | Edge::Latest => splits
                .iter()
                .map(|&i| {
                    let (low, high) = self.watermarks(&self.splits[i])?;
                    Ok((
                        i,
                        if matches!(edge, Edge::Earliest) {
                            low
                        } else {
                            high
                        },
                    ))
                })
                .collect(),
        }
    }

    /// Resolves where each partition starts and ends, and assigns them to the consumer.
    fn assign(&mut self) -> Result<()> {
        let unknown: Vec<usize> = (0..self.splits.len())
            .filter(|i| self.splits[*i].next.is_none() && !self.splits[*i].done)
            .collect();
        let starts: HashMap<usize, i64> = match &self.startup {
            Startup::At(edge) => self.positions(&unknown, edge)?,
            Startup::Group => {
                let mut tpl = TopicPartitionList::new();
                for &i in &unknown {
                    let s = &self.splits[i];
                    tpl.add_partition(&s.topic, s.partition);
                }
                let committed = if unknown.is_empty() {
                    TopicPartitionList::new()
                } else {
                    self.consumer
                        .committed_offsets(tpl, self.timeout)
                        .map_err(|e| {
                            self.error(format!(
                                "committed offsets of group '{}': {e}",
                                self.group.as_deref().unwrap_or_default()
                            ))
                        })?
                };
                let mut out = HashMap::new();
                for &i in &unknown {
                    let s = &self.splits[i];
                    let offset = match committed
                        .find_partition(&s.topic, s.partition)
                        .map(|e| e.offset())
                    {
                        Some(Offset::Offset(o)) => o,
                        _ => match self.reset.as_deref() {
                            Some("earliest" | "smallest" | "beginning") => self.watermarks(s)?.0,
                            Some("latest" | "largest" | "end") => self.watermarks(s)?.1,
                            _ => {
                                return Err(self.error(format!(
                                "group '{}' has no committed offset for topic '{}' partition {}: \
                                     set 'properties.auto.offset.reset' = 'earliest' or 'latest', \
                                     or another 'scan.startup.mode'",
                                self.group.as_deref().unwrap_or_default(),
                                s.topic,
                                s.partition
                            )))
                            }
                        },
                    };
                    out.insert(i, offset);
                }
                out
            }
        };
        for (i, offset) in starts {
            self.splits[i].next = Some(offset);
            self.splits[i].returned = Some(offset);
        }
        let all: Vec<usize> = (0..self.splits.len()).collect();
        let ends: HashMap<usize, i64> = match &self.bound {
            None => HashMap::new(),
            Some(edge) => self.positions(&all, edge)?,
        };
        for (i, end) in ends {
            self.splits[i].end = Some(end);
        }
        let mut tpl = TopicPartitionList::new();
        for s in &mut self.splits {
            if s.end.is_some_and(|e| s.next.is_some_and(|n| n >= e)) {
                s.done = true;
            }
            if s.done {
                continue;
            }
            let next = s.next.expect("resolved above");
            tpl.add_partition_offset(&s.topic, s.partition, Offset::Offset(next))
                .map_err(|e| Error::connector(&self.table, e.to_string()))?;
        }
        self.consumer
            .assign(&tpl)
            .map_err(|e| self.error(format!("assigning partitions: {e}")))?;
        for (i, s) in self.splits.iter().enumerate() {
            if s.done {
                self.ready.push_back((Poll::SplitDone { split: i }, None));
            }
        }
        self.assigned = true;
        Ok(())
    }

    /// Decodes one partition's record values into a batch.
    /// Decodes one partition's records into a batch: the values, then the metadata columns.
    fn decode(&mut self, split: usize, mut records: Gathered) -> Result<()> {
        let next = records.offsets.last().expect("at least one record") + 1;
        let s = &self.splits[split];
        let (topic, partition) = (s.topic.clone(), s.partition);
        let offsets = &records.offsets;
        let location = |i: usize| {
            format!(
                "topic '{topic}' partition {partition} offset {}",
                offsets[i]
            )
        };
        // The records whose values decoded (all but those skipped as malformed).
        let (batch, kept): (Option<RecordBatch>, Vec<usize>) = if self.codec.keyed_decode() {
            let (batch, kept) = self.codec.decode_keyed(
                &mut self.json,
                &records.keys,
                &records.values,
                &location,
                self.ignore_errors,
            )?;
            // A plain table's rows are all inserts: no op column.
            let batch = match batch {
                Some(mut b) if !self.codec.upsert => {
                    b.remove_column(b.num_columns() - 1);
                    Some(b)
                }
                other => other,
            };
            (batch, kept)
        } else if let Some(avro) = self.avro.as_mut() {
            avro.decode(
                records
                    .values
                    .iter()
                    .map(|v| v.as_deref().unwrap_or_default()),
                &location,
            )?
        } else {
            // Text that is not UTF-8 is left to the decoder, which skips or reports it. The
            // payloads move into the strings (no copy when they are UTF-8).
            let values: Vec<String> = std::mem::take(&mut records.values)
                .into_iter()
                .map(|v| {
                    String::from_utf8(v.unwrap_or_default())
                        .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
                })
                .collect();
            match self.codec.value {
                _ if self.codec.changes.is_some() => {
                    let batch = self.json.decode_at(&values, &location)?;
                    (batch, self.json.origins().to_vec())
                }
                Format::Raw => {
                    let column: arrow::array::ArrayRef =
                        Arc::new(arrow::array::StringArray::from(values.clone()));
                    let column =
                        arrow::compute::cast(&column, self.value_schema.field(0).data_type())?;
                    let batch = RecordBatch::try_new(self.value_schema.clone(), vec![column])?;
                    (Some(batch), (0..values.len()).collect())
                }
                Format::Csv => {
                    let csv = self.csv.as_mut().expect("a CSV decoder for csv values");
                    csv.decode(&values, &location)?
                }
                Format::Json if self.metadata.is_empty() => {
                    let batch = self.json.decode_at(&values, &location)?;
                    let rows = batch.as_ref().map_or(0, |b| b.num_rows());
                    (batch, (0..rows).collect())
                }
                // Each record's row, so that skipped ones do not shift the metadata.
                Format::Json => self.json.decode_kept(values, &location)?,
                Format::Avro => unreachable!("avro values have a decoder of their own"),
            }
        };
        let batch = match batch {
            Some(b) if !self.metadata.is_empty() => Some(self.with_metadata(b, &records, &kept)?),
            other => other,
        };
        match batch {
            Some(batch) => self
                .ready
                .push_back((Poll::Batch { split, batch }, Some((split, next)))),
            // Every record skipped: the position still moves past them.
            None => self.splits[split].returned = Some(next),
        }
        Ok(())
    }

    /// The table's row: the decoded value columns with the metadata columns put in their places.
    fn with_metadata(
        &self,
        values: RecordBatch,
        records: &Gathered,
        kept: &[usize],
    ) -> Result<RecordBatch> {
        use arrow::array::{
            ArrayRef, Int32Array, Int64Array, StringArray, TimestampMillisecondArray,
        };
        let split = &self.splits[records.split];
        crate::format::place_metadata(values, &self.schema, &self.metadata, |key| -> ArrayRef {
            match key {
                "topic" => Arc::new(StringArray::from(vec![split.topic.as_str(); kept.len()])),
                "partition" => Arc::new(Int32Array::from(vec![split.partition; kept.len()])),
                "offset" => Arc::new(Int64Array::from_iter_values(
                    kept.iter().map(|k| records.offsets[*k]),
                )),
                "leader-epoch" => Arc::new(Int32Array::from(
                    kept.iter().map(|k| records.epochs[*k]).collect::<Vec<_>>(),
                )),
                "timestamp" => Arc::new(TimestampMillisecondArray::from(
                    kept.iter()
                        .map(|k| records.timestamps[*k].0)
                        .collect::<Vec<_>>(),
                )),
                _ => Arc::new(StringArray::from(
                    kept.iter()
                        .map(|k| records.timestamps[*k].1)
                        .collect::<Vec<_>>(),
                )),
            }
        })
    }
}

/// One partition's records gathered by a poll: values, offsets, and timestamps with their type.
#[derive(Default)]
struct Gathered {
    split: usize,
    /// Values (`None`: a tombstone, gathered only for upsert tables), and keys when the key
    /// holds columns.
    values: Vec<Option<Vec<u8>>>,
    keys: Vec<Option<Vec<u8>>>,
    offsets: Vec<i64>,
    timestamps: Vec<(Option<i64>, &'static str)>,
    /// Each record's leader epoch, when the broker gives one.
    epochs: Vec<Option<i32>>,
}

/// The leader epoch of a fetched record (`None`: the broker gave none). rdkafka's safe API does
/// not expose it; librdkafka's accessor reads the message.
fn leader_epoch(message: &rdkafka::message::BorrowedMessage) -> Option<i32> {
    // SAFETY: `ptr` is the message this borrow keeps alive; the accessor only reads a field.
    let epoch = unsafe { rdkafka::bindings::rd_kafka_message_leader_epoch(message.ptr()) };
    (epoch >= 0).then_some(epoch)
}

impl KafkaSource {
    /// `scan.topic-partition-discovery.interval`: takes on the partitions added since the last
    /// look that fall to this worker, from their start. A failed look is tried again later.
    fn discover(&mut self) {
        let Some(d) = self.discovery.as_mut() else {
            return;
        };
        if d.last.elapsed() < d.interval {
            return;
        }
        d.last = Instant::now();
        let Ok(now) = list_partitions(self.consumer.client(), &d.topics, self.timeout) else {
            return;
        };
        let mut tpl = TopicPartitionList::new();
        for (topic, partition) in now {
            if !d.known.insert((topic.clone(), partition))
                || discovered_owner(&topic, partition, d.workers) != d.worker
            {
                continue;
            }
            if tpl
                .add_partition_offset(&topic, partition, Offset::Beginning)
                .is_err()
            {
                continue;
            }
            self.by_partition
                .insert((topic.clone(), partition), self.splits.len());
            self.splits.push(Split {
                topic,
                partition,
                next: None,
                returned: None,
                end: None,
                done: false,
                closed: false,
            });
        }
        if tpl.count() > 0 {
            if let Err(e) = self.consumer.incremental_assign(&tpl) {
                self.errors
                    .note(format!("assigning discovered partitions: {e}"));
            }
        }
    }

    /// The next decoded batch or finished split, moving the returned position past it.
    fn take_ready(&mut self) -> Option<Poll> {
        let (poll, position) = self.ready.pop_front()?;
        if let Some((split, next)) = position {
            self.splits[split].returned = Some(next);
        }
        if let Poll::SplitDone { split } = poll {
            self.splits[split].closed = true;
        }
        Some(poll)
    }
}

impl SourceReader for KafkaSource {
    fn open_splits(&self) -> Vec<usize> {
        (0..self.splits.len())
            .filter(|i| !self.splits[*i].closed)
            .collect()
    }

    fn poll(&mut self, max_rows: usize) -> Result<Poll> {
        if !self.assigned {
            self.assign()?;
        }
        if let Some(poll) = self.take_ready() {
            return Ok(poll);
        }
        self.discover();
        if self.splits.iter().all(|s| s.done) {
            return Ok(if self.discovery.is_some() {
                Poll::Idle
            } else {
                Poll::Finished
            });
        }
        // Gather up to `max_rows` records, by partition, in offset order.
        let mut gathered: BTreeMap<usize, Gathered> = BTreeMap::new();
        let mut finished: Vec<usize> = vec![];
        let mut n = 0;
        while n < max_rows {
            let message = match self.consumer.poll(Duration::ZERO) {
                None => break,
                Some(Err(e)) => {
                    // librdkafka retries by itself; a lasting failure ends the job below.
                    self.errors.note(e.to_string());
                    break;
                }
                Some(Ok(m)) => m,
            };
            self.errors.clear();
            let Some(&split) = self
                .by_partition
                .get(&(message.topic().to_string(), message.partition()))
            else {
                continue;
            };
            let s = &mut self.splits[split];
            let offset = message.offset();
            if s.done || s.next.is_some_and(|next| offset < next) {
                continue;
            }
            if s.end.is_some_and(|end| offset >= end) {
                s.done = true;
                finished.push(split);
                continue;
            }
            s.next = Some(offset + 1);
            let ended = s.end.is_some_and(|end| offset + 1 >= end);
            // A record without a value (a tombstone) holds no row, but deletes one in an
            // upsert table.
            if message.payload().is_some() || self.codec.upsert {
                let value = message.payload().map(<[u8]>::to_vec);
                let key = self
                    .codec
                    .keyed_decode()
                    .then(|| message.key().map(<[u8]>::to_vec))
                    .flatten();
                let entry = gathered.entry(split).or_insert_with(|| Gathered {
                    split,
                    ..Default::default()
                });
                entry.values.push(value);
                entry.keys.push(key);
                entry.offsets.push(offset);
                entry.epochs.push(leader_epoch(&message));
                entry.timestamps.push(match message.timestamp() {
                    rdkafka::Timestamp::NotAvailable => (None, "NoTimestampType"),
                    rdkafka::Timestamp::CreateTime(t) => (Some(t), "CreateTime"),
                    rdkafka::Timestamp::LogAppendTime(t) => (Some(t), "LogAppendTime"),
                });
                n += 1;
            } else if ended {
                self.splits[split].returned = Some(offset + 1);
            }
            if ended {
                self.splits[split].done = true;
                finished.push(split);
            }
        }
        for (split, records) in gathered {
            self.decode(split, records)?;
        }
        for split in finished {
            let mut tpl = TopicPartitionList::new();
            let s = &self.splits[split];
            tpl.add_partition(&s.topic, s.partition);
            let _ = self.consumer.pause(&tpl);
            self.ready.push_back((Poll::SplitDone { split }, None));
        }
        if let Some(poll) = self.take_ready() {
            return Ok(poll);
        }
        if let Some((since, why)) = self.errors.failing_for() {
            if since >= self.timeout {
                // librdkafka reports failures, not recoveries: ask the brokers before giving up
                // (an idle topic brings no record that would show they are back).
                match self
                    .consumer
                    .fetch_metadata(None, Duration::from_secs(1))
                {
                    Ok(_) => self.errors.clear(),
                    Err(e) => {
                        return Err(self.error(format!(
                            "lost the Kafka brokers at '{}' for {:?} (option 'sluice.connect-timeout'): {why}; now: {e}",
                            self.servers, since
                        )))
                    }
                }
            }
        }
        Ok(Poll::Idle)
    }

    fn skipped(&self) -> u64 {
        self.json.skipped()
            + self.csv.as_ref().map_or(0, |c| c.skipped)
            + self.avro.as_ref().map_or(0, crate::avro::Avro::skipped)
    }

    fn offsets(&self) -> SourceOffsets {
        self.splits
            .iter()
            .filter_map(|s| {
                let at = if s.done && s.returned == s.next {
                    SPLIT_DONE
                } else {
                    s.returned? as u64
                };
                Some((s.key(), at))
            })
            .collect()
    }

    fn seek(&mut self, offsets: &SourceOffsets) -> Result<()> {
        for s in &mut self.splits {
            match offsets.get(&s.key()) {
                Some(&SPLIT_DONE) => s.done = true,
                Some(&at) => {
                    s.next = Some(at as i64);
                    s.returned = Some(at as i64);
                }
                // A partition the checkpoint did not know (added since): from its start.
                None if !offsets.is_empty() => {
                    s.next = None;
                    s.returned = None;
                }
                None => {}
            }
        }
        if !offsets.is_empty() {
            // New partitions of a restored job start at their beginning, as Flink's do.
            self.startup = Startup::At(Edge::Earliest);
        }
        Ok(())
    }

    fn silent_workers(&self) -> Vec<usize> {
        self.silent.clone()
    }

    fn checkpoint(&mut self, epoch: u64) {
        if self.group.is_none() {
            return;
        }
        let positions = self
            .splits
            .iter()
            .filter_map(|s| Some((s.topic.clone(), s.partition, s.returned?)))
            .collect();
        self.recorded.insert(epoch, positions);
    }

    fn committed(&mut self, epoch: u64) -> Result<()> {
        let Some(positions) = self
            .recorded
            .range(..=epoch)
            .next_back()
            .map(|(_, p)| p.clone())
        else {
            return Ok(());
        };
        self.recorded.retain(|e, _| *e > epoch);
        let mut tpl = TopicPartitionList::new();
        for (topic, partition, offset) in positions {
            tpl.add_partition_offset(&topic, partition, Offset::Offset(offset))
                .map_err(|e| self.error(format!("group offsets: {e}")))?;
        }
        if tpl.count() > 0 {
            // Only a report: a failure is noted, and the next checkpoint tries again.
            if let Err(e) = self
                .consumer
                .commit(&tpl, rdkafka::consumer::CommitMode::Async)
            {
                self.errors
                    .note(format!("committing offsets to the group: {e}"));
            }
        }
        Ok(())
    }
}

/// A record as the sink writes it: key, value, and timestamp (from a `timestamp` metadata
/// column; otherwise the producer's clock).
pub(crate) type Record = (Option<Payload>, Option<Payload>, Option<i64>);

/// A worker's producer into a topic.
///
/// With `exactly-once` and checkpoints, the records of each checkpoint are kept (in memory, and
/// staged durably beside the checkpoints when it is sealed) and written in one Kafka transaction
/// once the checkpoint is committed. The same transaction commits an offset of the producer's
/// own consumer group (named after its `transactional.id`) that records the checkpoint epoch:
/// after a crash, a staged checkpoint whose epoch the group does not show yet is written again,
/// and one it shows is not. A transaction left open by a crash is aborted when the next run's
/// producer with the same id starts (`init_transactions`).
pub struct KafkaSink {
    table: String,
    topic: String,
    producer: BaseProducer<Context>,
    config: ClientConfig,
    errors: Arc<Errors>,
    codec: Codec,
    guarantee_wait: bool,
    timeout: Duration,
    /// `exactly-once`: the transactional-id prefix; and this writer's INSERT among the job's.
    exactly_once: Option<String>,
    instance: usize,
    worker: usize,
    /// Set once checkpoints drive the sink ([`SinkWriter::begin_transactions`]).
    transactional: bool,
    /// `exactly-once`: each checkpoint's records, staged until it commits.
    staged: crate::staged::Staged<Record>,
    /// `sink.partitioner`, the topic's partitions, and the next partition in turn.
    partitioner: Partitioner,
    partitions: i32,
    turn: std::cell::Cell<i32>,
    /// The metadata columns of the rows written (left out of keys and values), and the one
    /// that holds each record's timestamp.
    metadata: Vec<usize>,
    timestamp_column: Option<usize>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Partitioner {
    Default,
    Fixed,
    RoundRobin,
}

impl KafkaSink {
    pub fn open(spec: &ConnectorSpec, opts: &mut Options, worker: usize) -> Result<Self> {
        let topic = opts.required("topic")?;
        if topic.contains(';') {
            return Err(opts.error(format!(
                "option 'topic' = '{topic}': a sink writes one topic"
            )));
        }
        let upsert = opts.connector() == "upsert-kafka";
        // A `timestamp` metadata column is each record's timestamp; the others are the key's
        // and value's columns.
        let value_schema = spec.value_schema();
        let primary_key: Vec<usize> = spec
            .primary_key
            .iter()
            .filter_map(|c| value_schema.index_of(spec.schema.field(*c).name()).ok())
            .collect();
        let codec = Codec::from_options(opts, &value_schema, &primary_key, upsert)?;
        let metadata: Vec<usize> = spec.metadata.iter().map(|(c, _)| *c).collect();
        let timestamp_column = spec
            .metadata
            .iter()
            .find(|(_, k)| k == "timestamp")
            .map(|(c, _)| *c);
        let guarantee = opts.value::<String>("sink.delivery-guarantee")?;
        let guarantee_wait = guarantee != "none";
        let exactly_once = match (
            guarantee.as_str(),
            opts.get("sink.transactional-id-prefix")?,
        ) {
            ("exactly-once", Some(prefix)) => Some(prefix),
            ("exactly-once", None) => return Err(opts.error(
                "'sink.delivery-guarantee' = 'exactly-once' needs 'sink.transactional-id-prefix'",
            )),
            _ => None,
        };
        let timeout = connect_timeout(opts)?;
        let mut config = client_config(opts)?;
        let servers = config
            .get("bootstrap.servers")
            .unwrap_or_default()
            .to_string();
        if config.get("message.timeout.ms").is_none() {
            config.set("message.timeout.ms", timeout.as_millis().max(1).to_string());
        }
        let context = Context::default();
        let errors = context.errors.clone();
        let producer: BaseProducer<Context> = config
            .create_with_context(context)
            .map_err(|e| opts.error(format!("kafka producer for '{servers}': {e}")))?;
        // Fail at start on brokers that cannot be reached or a topic that is not there.
        let partitions =
            topic_partitions(producer.client(), opts, &topic, &servers, timeout)?.len() as i32;
        let partitioner = match opts.value::<String>("sink.partitioner")?.as_str() {
            "fixed" => Partitioner::Fixed,
            "round-robin" => Partitioner::RoundRobin,
            _ => Partitioner::Default,
        };
        Ok(KafkaSink {
            table: spec.table.clone(),
            topic,
            producer,
            config,
            errors,
            codec,
            guarantee_wait,
            timeout,
            exactly_once,
            instance: spec.sink_instance,
            worker,
            transactional: false,
            staged: crate::staged::Staged::new("kafka", &spec.table, spec.sink_instance),
            metadata,
            timestamp_column,
            partitioner,
            partitions,
            turn: std::cell::Cell::new(worker as i32),
        })
    }

    /// The partition of the next record (`None`: librdkafka's partitioner decides).
    fn partition(&self) -> Option<i32> {
        match self.partitioner {
            Partitioner::Default => None,
            Partitioner::Fixed => Some(self.worker as i32 % self.partitions),
            Partitioner::RoundRobin => {
                let p = self.turn.get() % self.partitions;
                self.turn.set(p + 1);
                Some(p)
            }
        }
    }

    /// The `transactional.id` of worker `worker`'s producer.
    fn transactional_id(&self, worker: usize) -> String {
        let prefix = self.exactly_once.as_deref().unwrap_or_default();
        format!("{prefix}-{}-{worker}", self.instance)
    }

    /// A transactional producer for `transactional.id` `id`, started: any transaction an
    /// earlier producer with that id left open is aborted.
    fn transactional_producer(&self, id: &str) -> Result<BaseProducer<Context>> {
        let mut config = self.config.clone();
        config.set("transactional.id", id);
        let context = Context {
            errors: self.errors.clone(),
        };
        let producer: BaseProducer<Context> = config
            .create_with_context(context)
            .map_err(|e| self.error(format!("kafka producer '{id}': {e}")))?;
        producer
            .init_transactions(self.timeout)
            .map_err(|e| self.error(format!("starting transactions of '{id}': {e}")))?;
        Ok(producer)
    }

    /// A consumer in group `id` (never joined), for its committed offsets.
    fn group_consumer(&self, id: &str) -> Result<BaseConsumer<Context>> {
        let mut config = self.config.clone();
        config
            .set("group.id", id)
            .set("enable.auto.commit", "false")
            .set("isolation.level", "read_committed");
        config
            .create_with_context(Context::default())
            .map_err(|e| self.error(format!("kafka consumer for group '{id}': {e}")))
    }

    /// The last checkpoint epoch whose records producer `id` committed (recorded as an offset
    /// of its own consumer group on partition 0 of the topic), or `None`.
    fn committed_epoch(&self, id: &str) -> Result<Option<u64>> {
        let consumer = self.group_consumer(id)?;
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&self.topic, 0);
        let committed = consumer
            .committed_offsets(tpl, self.timeout)
            .map_err(|e| self.error(format!("committed offsets of group '{id}': {e}")))?;
        Ok(
            match committed.find_partition(&self.topic, 0).map(|e| e.offset()) {
                Some(Offset::Offset(o)) if o >= 0 => Some(marker_epoch(o)),
                _ => None,
            },
        )
    }

    /// Writes `records` in one transaction of `producer` (id `id`) that also records `epoch`.
    fn commit_records(
        &self,
        producer: &BaseProducer<Context>,
        id: &str,
        epoch: u64,
        records: &[Record],
    ) -> Result<()> {
        let fail = |what: &str, e: KafkaError| {
            self.error(format!(
                "transaction of '{id}' for checkpoint {epoch}: {what}: {e}"
            ))
        };
        producer.begin_transaction().map_err(|e| fail("begin", e))?;
        for (key, value, timestamp) in records {
            send(
                producer,
                &self.topic,
                self.partition(),
                (key.as_deref(), value.as_deref(), *timestamp),
                &self.errors,
                self.timeout,
            )
            .map_err(|e| self.error(e))?;
        }
        let metadata = self
            .group_consumer(id)?
            .group_metadata()
            .ok_or_else(|| self.error(format!("no group metadata for '{id}'")))?;
        let mut marker = TopicPartitionList::new();
        marker
            .add_partition_offset(&self.topic, 0, Offset::Offset(marker_offset(epoch)))
            .map_err(|e| fail("marker", e))?;
        producer
            .send_offsets_to_transaction(&marker, &metadata, self.timeout)
            .map_err(|e| fail("recording the checkpoint", e))?;
        producer
            .commit_transaction(self.timeout)
            .map_err(|e| fail("commit", e))?;
        self.check()
    }

    fn error(&self, message: impl Into<String>) -> Error {
        Error::connector(&self.table, message)
    }

    fn check(&self) -> Result<()> {
        if let Some(e) = self
            .errors
            .undelivered
            .lock()
            .expect("kafka errors")
            .clone()
        {
            return Err(self.error(e));
        }
        Ok(())
    }

    /// Waits until every record sent is acknowledged.
    fn flush(&self) -> Result<()> {
        self.producer
            .flush(self.timeout)
            .map_err(|e| self.error(format!("flushing to topic '{}': {e}", self.topic)))?;
        self.check()
    }
}

/// The group offset that records checkpoint `epoch` (the job's end, `u64::MAX - 1`, included).
fn marker_offset(epoch: u64) -> i64 {
    epoch.min(i64::MAX as u64) as i64
}

fn marker_epoch(offset: i64) -> u64 {
    if offset == i64::MAX {
        u64::MAX - 1
    } else {
        offset as u64
    }
}

/// Sends one record, waiting while the producer's queue is full; fails when the brokers stay
/// away longer than `timeout`.
fn send(
    producer: &BaseProducer<Context>,
    topic: &str,
    partition: Option<i32>,
    (key, value, timestamp): (Option<&[u8]>, Option<&[u8]>, Option<i64>),
    errors: &Errors,
    timeout: Duration,
) -> std::result::Result<(), String> {
    let mut record: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(topic);
    if let Some(t) = timestamp {
        record = record.timestamp(t);
    }
    if let Some(p) = partition {
        record = record.partition(p);
    }
    if let Some(v) = value {
        record = record.payload(v);
    }
    if let Some(k) = key {
        record = record.key(k);
    }
    loop {
        match producer.send(record) {
            Ok(()) => return Ok(()),
            Err((
                KafkaError::MessageProduction(rdkafka::types::RDKafkaErrorCode::QueueFull),
                r,
            )) => {
                // The local queue is full: let deliveries drain it.
                producer.poll(Duration::from_millis(10));
                if let Some(e) = errors.undelivered.lock().expect("kafka errors").clone() {
                    return Err(e);
                }
                if let Some((since, why)) = errors.failing_for() {
                    if since >= timeout {
                        return Err(format!(
                            "lost the Kafka brokers for {since:?} (option 'sluice.connect-timeout'): {why}"
                        ));
                    }
                }
                record = r;
            }
            Err((e, _)) => return Err(format!("writing to topic '{topic}': {e}")),
        }
    }
}

impl KafkaSink {
    /// The records of a batch: its metadata columns left out of keys and values, and the
    /// `timestamp` one as each record's timestamp (in epoch milliseconds).
    fn records(&self, batch: &ChangeBatch) -> Result<Vec<Record>> {
        if self.metadata.is_empty() {
            return self.codec.encode(batch, None);
        }
        let timestamps: Option<Vec<Option<i64>>> = match self.timestamp_column {
            None => None,
            Some(c) => {
                let millis = arrow::compute::cast(
                    batch.data.column(c),
                    &arrow::datatypes::DataType::Timestamp(
                        arrow::datatypes::TimeUnit::Millisecond,
                        None,
                    ),
                )?;
                let millis = arrow::compute::cast(&millis, &arrow::datatypes::DataType::Int64)?;
                Some(
                    millis
                        .as_any()
                        .downcast_ref::<arrow::array::Int64Array>()
                        .expect("cast to Int64")
                        .iter()
                        .collect(),
                )
            }
        };
        let rest: Vec<usize> = (0..batch.data.num_columns())
            .filter(|c| !self.metadata.contains(c))
            .collect();
        let values = ChangeBatch {
            data: batch.data.project(&rest)?,
            ops: batch.ops.clone(),
        };
        self.codec.encode(&values, timestamps.as_deref())
    }
}

impl SinkWriter for KafkaSink {
    fn write(&mut self, batch: &ChangeBatch) -> Result<()> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        self.check()?;
        let records = self.records(batch)?;
        if self.transactional && self.exactly_once.is_some() {
            self.staged.push(records);
            return Ok(());
        }
        for (key, value, timestamp) in &records {
            send(
                &self.producer,
                &self.topic,
                self.partition(),
                (key.as_deref(), value.as_deref(), *timestamp),
                &self.errors,
                self.timeout,
            )
            .map_err(|e| self.error(e))?;
        }
        self.producer.poll(Duration::ZERO);
        self.check()
    }

    fn set_staging(&mut self, staging: Arc<dyn crate::Staging>) {
        self.staged.set_staging(staging);
    }

    fn begin_transactions(
        &mut self,
        committed: Option<u64>,
        worker: usize,
        workers: usize,
    ) -> Result<()> {
        self.transactional = true;
        if self.exactly_once.is_none() {
            return Ok(());
        }
        // Staged checkpoints of the workers this one replaces (rescaling) and of its own: each
        // committed one is written again unless its transaction committed, as the group of its
        // producer's `transactional.id` records.
        let mut producers: BTreeMap<usize, (String, BaseProducer<Context>, Option<u64>)> =
            BTreeMap::new();
        let mut staged = std::mem::replace(
            &mut self.staged,
            crate::staged::Staged::new("kafka", &self.table, self.instance),
        );
        let settled = staged.settle(committed, worker, workers, |old, epoch, records| {
            let (id, producer, done) = match producers.entry(old) {
                std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::btree_map::Entry::Vacant(v) => {
                    let id = self.transactional_id(old);
                    let producer = self.transactional_producer(&id)?;
                    let done = self.committed_epoch(&id)?;
                    v.insert((id, producer, done))
                }
            };
            if done.is_none_or(|d| d < epoch) {
                self.commit_records(producer, id, epoch, &records)?;
            }
            Ok(())
        });
        self.staged = staged;
        settled?;
        self.worker = worker;
        let id = self.transactional_id(worker);
        self.producer = self.transactional_producer(&id)?;
        Ok(())
    }

    fn pre_commit(&mut self, epoch: u64) -> Result<()> {
        if !(self.transactional && self.exactly_once.is_some()) {
            return if self.guarantee_wait {
                self.flush()
            } else {
                Ok(())
            };
        }
        self.staged.seal(epoch)
    }

    fn commit(&mut self, epoch: u64) -> Result<()> {
        if !(self.transactional && self.exactly_once.is_some()) {
            return Ok(());
        }
        // The staged records of the last commit stay until the next one: a crash right after
        // it finds them, and the group's record of the epoch says not to write them again.
        let id = self.transactional_id(self.worker);
        let mut staged = std::mem::replace(
            &mut self.staged,
            crate::staged::Staged::new("kafka", &self.table, self.instance),
        );
        let done = staged.commit(epoch, |_, e, records| {
            self.commit_records(&self.producer, &id, e, records)
        });
        self.staged = staged;
        done
    }

    fn finish(&mut self) -> Result<()> {
        self.flush()
    }

    fn abort(&mut self) -> Result<()> {
        // What was sent may or may not arrive; nothing is waited for.
        Ok(())
    }
}
