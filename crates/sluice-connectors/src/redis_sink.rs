//! The `redis` sink: live results for dashboards and services, written with the official
//! client (`redis` crate, synchronous API).
//!
//! Each row becomes one command, whose key (and field or member) come from templates over the
//! row's columns: `'key' = 'gmv:{category}'`. An updating result becomes idempotent writes: an
//! insert or `+U` writes, a `-U` or `-D` deletes the key (or field, or member). Each batch's
//! commands run in one `MULTI`/`EXEC`, in changelog order, so that a reader never sees a key
//! between its retraction and its new value.

use std::time::Duration;

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use sluice_common::{ChangeBatch, Error, Op, Result};

use crate::options::{ConnectorDef, Kind, OptionDef, Options, Side};
use crate::{ConnectorSpec, SinkWriter};

/// The `redis` connector's options.
pub const CONNECTOR: ConnectorDef = ConnectorDef {
    name: "redis",
    reads: false,
    writes: true,
    metadata: &[],
    formats: false,
    options: &[
        OptionDef {
            key: "url",
            kind: Kind::Text,
            default: None,
            side: Side::Sink,
            identity: false,
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
            side: Side::Sink,
            identity: false,
            doc: "the key (or stream, or channel) as a template over the row: `gmv:{category}`",
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
            side: Side::Sink,
            identity: false,
            doc: "how long connecting and each write may take before the job fails",
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
        })
    }

    fn error(&self, message: impl Into<String>) -> Error {
        Error::connector(&self.table, message)
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
    fn write(&mut self, batch: &ChangeBatch) -> Result<()> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
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
        let mut pipe = redis::pipe();
        pipe.atomic();
        for i in 0..batch.num_rows() {
            let key = self.key.render(&cells, i);
            let write = matches!(batch.op(i), Op::Insert | Op::UpdateAfter);
            match (self.command, write) {
                (Command::Set, true) => pipe.cmd("SET").arg(key).arg(value(i)),
                (Command::Set, false) => pipe.cmd("DEL").arg(key),
                (Command::HSet, w) => {
                    let field = self.field.as_ref().expect("checked").render(&cells, i);
                    if w {
                        pipe.cmd("HSET").arg(key).arg(field).arg(value(i))
                    } else {
                        pipe.cmd("HDEL").arg(key).arg(field)
                    }
                }
                (Command::ZAdd, w) => {
                    let member = self.member.as_ref().expect("checked").render(&cells, i);
                    if w {
                        let score = &cells[self.score.expect("checked")][i];
                        pipe.cmd("ZADD").arg(key).arg(score).arg(member)
                    } else {
                        pipe.cmd("ZREM").arg(key).arg(member)
                    }
                }
                (Command::XAdd, _) => pipe.cmd("XADD").arg(key).arg("*").arg("row").arg(value(i)),
                (Command::Publish, _) => pipe.cmd("PUBLISH").arg(key).arg(value(i)),
            }
            .ignore();
        }
        pipe.query::<()>(&mut self.connection)
            .map_err(|e| self.error(format!("writing to Redis at '{}': {e}", self.url)))
    }

    fn finish(&mut self) -> Result<()> {
        Ok(())
    }
}
