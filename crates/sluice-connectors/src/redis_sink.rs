//! The `redis` sink: live results for dashboards and services, written with the official
//! client (`redis` crate, synchronous API). The connector's source side, a Redis stream, is in
//! [`crate::redis_stream`].
//!
//! Each row becomes one command, whose key (and field or member) come from templates over the
//! row's columns: `'key' = 'gmv:{category}'`. An updating result becomes idempotent writes: an
//! insert or `+U` writes, a `-U` or `-D` deletes the key (or field, or member). Each batch's
//! commands run in one `MULTI`/`EXEC`, in changelog order, so that a reader never sees a key
//! between its retraction and its new value.
//!
//! With `exactly-once` and checkpoints, each checkpoint's commands are staged beside the
//! checkpoints when it is sealed, and run once it commits in one `MULTI`/`EXEC` that also sets a
//! marker key to the checkpoint's epoch. After a crash, staged checkpoints the marker does not
//! cover run again: every write is applied once, appends (`xadd`, `publish`) included.

use std::time::Duration;

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use sluice_common::{ChangeBatch, Error, Op, Result};

use crate::options::{ConnectorDef, Kind, OptionDef, Options, Side};
use crate::{ConnectorSpec, SinkWriter};

/// The `redis` connector's options.
pub const CONNECTOR: ConnectorDef = ConnectorDef {
    name: "redis",
    reads: true,
    writes: true,
    metadata: &["id", "timestamp"],
    writable_metadata: &[],
    formats: true,
    lookup: false,
    options: &[
        OptionDef {
            key: "url",
            kind: Kind::Text,
            default: None,
            side: Side::Both,
            identity: true,
            doc: "the server, `redis://host:port/db`",
        },
        OptionDef {
            key: "command",
            kind: Kind::Choice(&["set", "hset", "zadd", "xadd", "publish"]),
            default: Some("set"),
            side: Side::Sink,
            identity: false,
            doc: "how a row is written: a string key, a hash field, a sorted-set member, a stream entry, or a message on a channel (`xadd` and `publish` take inserts only)",
        },
        OptionDef {
            key: "key",
            kind: Kind::Text,
            default: None,
            side: Side::Both,
            identity: true,
            doc: "reading: the stream; writing: the key (or stream, or channel) as a template over the row: `gmv:{category}`",
        },
        OptionDef {
            key: "field",
            kind: Kind::Text,
            default: None,
            side: Side::Sink,
            identity: false,
            doc: "`hset`: the field, as a template over the row",
        },
        OptionDef {
            key: "member",
            kind: Kind::Text,
            default: None,
            side: Side::Sink,
            identity: false,
            doc: "`zadd`: the member, as a template over the row",
        },
        OptionDef {
            key: "score",
            kind: Kind::Text,
            default: None,
            side: Side::Sink,
            identity: false,
            doc: "`zadd`: the numeric column that is the member's score",
        },
        OptionDef {
            key: "value",
            kind: Kind::Text,
            default: None,
            side: Side::Sink,
            identity: false,
            doc: "the column written as the value (default: the whole row as a JSON object)",
        },
        OptionDef {
            key: "sluice.connect-timeout",
            kind: Kind::Duration,
            default: Some("10 s"),
            side: Side::Both,
            identity: false,
            doc: "how long connecting, and the server being unreachable while running, may take before the job fails",
        },
        OptionDef {
            key: "sink.delivery-guarantee",
            kind: Kind::Choice(&["at-least-once", "exactly-once"]),
            default: Some("at-least-once"),
            side: Side::Sink,
            identity: false,
            doc: "`at-least-once` writes each batch as it comes; `exactly-once` (with checkpoints) runs each checkpoint's writes once it commits, in one `MULTI`/`EXEC` with a marker of the epoch",
        },
        OptionDef {
            key: "sink.transactional-id-prefix",
            kind: Kind::Text,
            default: None,
            side: Side::Sink,
            identity: false,
            doc: "`exactly-once`: the prefix of the marker keys (`<prefix>:<table>:<insert>:<worker>` holds the last epoch written), unique per job",
        },
        OptionDef {
            key: "format",
            kind: Kind::Choice(crate::message::FORMATS),
            default: Some("json"),
            side: Side::Source,
            identity: true,
            doc: "reading: how an entry's field holds a row: a JSON object (as `xadd` writes it), a CSV record, an Avro record, the one STRING column, or a change of rows",
        },
        OptionDef {
            key: "stream.field",
            kind: Kind::Text,
            default: Some("row"),
            side: Side::Source,
            identity: true,
            doc: "reading: the entry field that holds the row (`xadd` writes `row`)",
        },
        OptionDef {
            key: "json.ignore-parse-errors",
            kind: Kind::Bool,
            default: Some("false"),
            side: Side::Source,
            identity: false,
            doc: "skip and count an entry whose row is not a JSON object of the columns, instead of failing the job",
        },
        crate::message::CSV_IGNORE_OPTION,
        crate::avro::IGNORE_OPTION,
        crate::avro::LEGACY_TIMESTAMPS_OPTION,
        OptionDef {
            key: "scan.startup.mode",
            kind: Kind::Choice(&["earliest", "latest", "id"]),
            default: Some("earliest"),
            side: Side::Source,
            identity: false,
            doc: "where a job without a checkpoint starts: the stream's first entry, only new ones, or an entry id",
        },
        OptionDef {
            key: "scan.startup.id",
            kind: Kind::Text,
            default: None,
            side: Side::Source,
            identity: false,
            doc: "`id` mode: the first entry id to read (`1700000000000-0`)",
        },
        OptionDef {
            key: "scan.bounded.mode",
            kind: Kind::Choice(&["unbounded", "latest"]),
            default: Some("unbounded"),
            side: Side::Source,
            identity: false,
            doc: "where the source ends: never, or at the stream's last entry when the job starts",
        },
    ],
};

/// A template over a row's columns: literal text and `{column}` holes.
#[derive(Debug)]
struct Template {
    parts: Vec<Part>,
}

#[derive(Debug)]
enum Part {
    Text(String),
    Column(usize),
}

impl Template {
    fn parse(opts: &Options, key: &str, text: &str, schema: &SchemaRef) -> Result<Template> {
        let mut parts = vec![];
        let mut rest = text;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                parts.push(Part::Text(rest[..open].to_string()));
            }
            let close = rest[open..].find('}').ok_or_else(|| {
                opts.error(format!(
                    "option '{key}' = '{text}': a '{{' without its '}}'"
                ))
            })? + open;
            let column = &rest[open + 1..close];
            let index = schema.index_of(column).map_err(|_| {
                opts.error(format!(
                    "option '{key}' = '{text}': the table has no column '{column}'"
                ))
            })?;
            parts.push(Part::Column(index));
            rest = &rest[close + 1..];
        }
        if !rest.is_empty() {
            parts.push(Part::Text(rest.to_string()));
        }
        Ok(Template { parts })
    }

    fn render(&self, cells: &[Vec<String>], row: usize) -> String {
        let mut out = String::new();
        for p in &self.parts {
            match p {
                Part::Text(t) => out.push_str(t),
                Part::Column(c) => out.push_str(&cells[*c][row]),
            }
        }
        out
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Command {
    Set,
    HSet,
    ZAdd,
    XAdd,
    Publish,
}

/// A worker's connection and how it writes rows.
pub struct RedisSink {
    table: String,
    url: String,
    connection: redis::Connection,
    command: Command,
    key: Template,
    field: Option<Template>,
    member: Option<Template>,
    score: Option<usize>,
    value: Option<usize>,
    /// `exactly-once`: the marker-key prefix; this writer's INSERT among the job's.
    exactly_once: Option<String>,
    instance: usize,
    worker: usize,
    transactional: bool,
    /// `exactly-once`: each checkpoint's commands, staged until it commits.
    staged: crate::staged::Staged<Vec<String>>,
}

impl RedisSink {
    pub fn open(spec: &ConnectorSpec, opts: &mut Options) -> Result<Self> {
        let url = opts.required("url")?;
        let command = match opts.value::<String>("command")?.as_str() {
            "hset" => Command::HSet,
            "zadd" => Command::ZAdd,
            "xadd" => Command::XAdd,
            "publish" => Command::Publish,
            _ => Command::Set,
        };
        let schema = &spec.schema;
        let key_text = opts.required("key")?;
        let key = Template::parse(opts, "key", &key_text, schema)?;
        let template = |opts: &mut Options, name: &str, needed: bool| -> Result<Option<Template>> {
            match (opts.get(name)?, needed) {
                (Some(t), true) => Ok(Some(Template::parse(opts, name, &t, schema)?)),
                (None, true) => Err(opts.error(format!(
                    "'command' = '{}' needs option '{name}'",
                    format!("{command:?}").to_lowercase()
                ))),
                (Some(_), false) => {
                    Err(opts.error(format!("option '{name}' applies to another 'command'")))
                }
                (None, false) => Ok(None),
            }
        };
        let field = template(opts, "field", command == Command::HSet)?;
        let member = template(opts, "member", command == Command::ZAdd)?;
        let column = |opts: &mut Options, name: &str| -> Result<Option<usize>> {
            match opts.get(name)? {
                None => Ok(None),
                Some(c) => schema.index_of(&c).map(Some).map_err(|_| {
                    opts.error(format!("option '{name}': the table has no column '{c}'"))
                }),
            }
        };
        let score = column(opts, "score")?;
        if (command == Command::ZAdd) != score.is_some() {
            return Err(opts.error("'score' names the score column of 'command' = 'zadd' (only)"));
        }
        let value = column(opts, "value")?;
        let exactly_once = match (
            opts.value::<String>("sink.delivery-guarantee")?.as_str(),
            opts.get("sink.transactional-id-prefix")?,
        ) {
            ("exactly-once", Some(prefix)) => Some(prefix),
            ("exactly-once", None) => return Err(opts.error(
                "'sink.delivery-guarantee' = 'exactly-once' needs 'sink.transactional-id-prefix'",
            )),
            _ => None,
        };
        let timeout_ms = opts
            .duration_ms("sluice.connect-timeout")?
            .expect("declared default");
        let timeout = Duration::from_millis(timeout_ms.max(1) as u64);
        let unreachable = |e: redis::RedisError| {
            Error::connector(
                &spec.table,
                format!("cannot reach Redis at '{url}' within {timeout:?} (option 'url'): {e}"),
            )
        };
        let client = redis::Client::open(url.as_str())
            .map_err(|e| opts.error(format!("option 'url' = '{url}': {e}")))?;
        let connection = client
            .get_connection_with_timeout(timeout)
            .map_err(unreachable)?;
        connection
            .set_read_timeout(Some(timeout))
            .and_then(|_| connection.set_write_timeout(Some(timeout)))
            .map_err(unreachable)?;
        Ok(RedisSink {
            table: spec.table.clone(),
            url,
            connection,
            command,
            key,
            field,
            member,
            score,
            value,
            exactly_once,
            instance: spec.sink_instance,
            worker: 0,
            transactional: false,
            staged: crate::staged::Staged::new("redis", &spec.table, spec.sink_instance),
        })
    }

    fn error(&self, message: impl Into<String>) -> Error {
        Error::connector(&self.table, message)
    }

    /// The commands that write a batch, in changelog order, each as its arguments.
    fn commands(&self, batch: &ChangeBatch) -> Result<Vec<Vec<String>>> {
        let appends = matches!(self.command, Command::XAdd | Command::Publish);
        if appends && (0..batch.num_rows()).any(|i| batch.op(i) != Op::Insert) {
            return Err(self.error(format!(
                "'command' = '{}' takes inserts only; an updating result needs 'set', 'hset' or 'zadd'",
                format!("{:?}", self.command).to_lowercase()
            )));
        }
        let cells = cells(&batch.data)?;
        let rows = match self.value {
            Some(_) => vec![],
            None => crate::format::json_rows(&batch.data)?,
        };
        let value = |i: usize| match self.value {
            Some(c) => cells[c][i].clone(),
            None => rows[i].clone(),
        };
        let mut out = Vec::with_capacity(batch.num_rows());
        for i in 0..batch.num_rows() {
            let key = self.key.render(&cells, i);
            let write = matches!(batch.op(i), Op::Insert | Op::UpdateAfter);
            let command: Vec<String> = match (self.command, write) {
                (Command::Set, true) => vec!["SET".into(), key, value(i)],
                (Command::Set, false) => vec!["DEL".into(), key],
                (Command::HSet, w) => {
                    let field = self.field.as_ref().expect("checked").render(&cells, i);
                    if w {
                        vec!["HSET".into(), key, field, value(i)]
                    } else {
                        vec!["HDEL".into(), key, field]
                    }
                }
                (Command::ZAdd, w) => {
                    let member = self.member.as_ref().expect("checked").render(&cells, i);
                    if w {
                        let score = cells[self.score.expect("checked")][i].clone();
                        vec!["ZADD".into(), key, score, member]
                    } else {
                        vec!["ZREM".into(), key, member]
                    }
                }
                (Command::XAdd, _) => vec!["XADD".into(), key, "*".into(), "row".into(), value(i)],
                (Command::Publish, _) => vec!["PUBLISH".into(), key, value(i)],
            };
            out.push(command);
        }
        Ok(out)
    }

    /// Runs commands in one `MULTI`/`EXEC`; with a marker, also sets it to the epoch.
    fn run(&mut self, commands: &[Vec<String>], marker: Option<(&str, u64)>) -> Result<()> {
        let mut pipe = redis::pipe();
        pipe.atomic();
        for c in commands {
            let mut cmd = redis::cmd(&c[0]);
            for a in &c[1..] {
                cmd.arg(a);
            }
            pipe.add_command(cmd).ignore();
        }
        if let Some((key, epoch)) = marker {
            pipe.cmd("SET").arg(key).arg(epoch).ignore();
        }
        pipe.query::<()>(&mut self.connection)
            .map_err(|e| self.error(format!("writing to Redis at '{}': {e}", self.url)))
    }

    /// The key that holds the last epoch worker `worker`'s writes were applied for.
    fn marker(&self, worker: usize) -> String {
        let prefix = self.exactly_once.as_deref().unwrap_or_default();
        format!("{prefix}:{}:{}:{worker}", self.table, self.instance)
    }

    /// The staged commands, out of `self` while `self` runs them.
    fn take_staged(&mut self) -> crate::staged::Staged<Vec<String>> {
        let empty = crate::staged::Staged::new("redis", &self.table, self.instance);
        std::mem::replace(&mut self.staged, empty)
    }
}

/// Every cell of a batch as text (NULL as the empty string), column by column.
fn cells(data: &RecordBatch) -> Result<Vec<Vec<String>>> {
    let data = crate::format::timestamps_as_text(data)?;
    data.columns()
        .iter()
        .map(|c| {
            let text = arrow::compute::cast(c, &arrow::datatypes::DataType::Utf8)?;
            let text = text
                .as_any()
                .downcast_ref::<arrow::array::StringArray>()
                .expect("cast to Utf8");
            Ok(text
                .iter()
                .map(|v| v.unwrap_or_default().to_string())
                .collect())
        })
        .collect()
}

impl SinkWriter for RedisSink {
    fn set_staging(&mut self, staging: std::sync::Arc<dyn crate::Staging>) {
        self.staged.set_staging(staging);
    }

    fn write(&mut self, batch: &ChangeBatch) -> Result<()> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        let commands = self.commands(batch)?;
        if self.transactional && self.exactly_once.is_some() {
            self.staged.push(commands);
            return Ok(());
        }
        self.run(&commands, None)
    }

    fn begin_transactions(
        &mut self,
        committed: Option<u64>,
        worker: usize,
        workers: usize,
    ) -> Result<()> {
        self.transactional = true;
        self.worker = worker;
        if self.exactly_once.is_none() {
            return Ok(());
        }
        // Staged checkpoints (this worker's, and those of the workers it replaces) that
        // committed but whose marker does not show them run again.
        let mut staged = self.take_staged();
        let settled = staged.settle(committed, worker, workers, |old, epoch, commands| {
            let marker = self.marker(old);
            let done: Option<u64> = redis::cmd("GET")
                .arg(&marker)
                .query(&mut self.connection)
                .map_err(|e| self.error(format!("reading marker '{marker}': {e}")))?;
            if done.is_none_or(|d| d < epoch) {
                self.run(&commands, Some((&marker, epoch)))?;
            }
            Ok(())
        });
        self.staged = staged;
        settled
    }

    fn pre_commit(&mut self, epoch: u64) -> Result<()> {
        if !(self.transactional && self.exactly_once.is_some()) {
            return Ok(());
        }
        self.staged.seal(epoch)
    }

    fn commit(&mut self, epoch: u64) -> Result<()> {
        if !(self.transactional && self.exactly_once.is_some()) {
            return Ok(());
        }
        // The last run checkpoints' staged writes stay until the next commit: a crash right
        // after finds them, and the marker says not to run them again.
        let mut staged = self.take_staged();
        let done = staged.commit(epoch, |worker, e, commands| {
            let marker = self.marker(worker);
            self.run(commands, Some((&marker, e)))
        });
        self.staged = staged;
        done
    }

    fn finish(&mut self) -> Result<()> {
        // Exactly-once without checkpoints: as at-least-once.
        let commands = self.staged.take_pending();
        if commands.is_empty() {
            return Ok(());
        }
        self.run(&commands, None)
    }

    fn abort(&mut self) -> Result<()> {
        Ok(())
    }
}
