//! The `redis` connector's source: a Redis stream, read with `XRANGE` from the entry after the
//! last one returned. A stream is one ordered log: one split, read by worker 0. Where it stands,
//! the last entry id returned, lives in Sluice's checkpoints (as `<key>` → its milliseconds and
//! `<key>#seq` → its sequence), and a restore reads on after it: exactly-once into state and
//! transactional sinks.

use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::{ArrayRef, StringArray, TimestampMillisecondArray};
use arrow::record_batch::RecordBatch;
use sluice_common::{Error, Result};

use crate::options::Options;
use crate::{ConnectorSpec, Poll, SourceOffsets, SourceReader, SPLIT_DONE};

/// A stream entry: its id and its fields.
type Entry = (String, Vec<(String, Vec<u8>)>);

/// An entry id, `<milliseconds>-<sequence>`.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
struct EntryId(u64, u64);

impl EntryId {
    fn parse(text: &str) -> Option<EntryId> {
        let (ms, seq) = text.split_once('-').unwrap_or((text, "0"));
        Some(EntryId(ms.parse().ok()?, seq.parse().ok()?))
    }

    fn text(self) -> String {
        format!("{}-{}", self.0, self.1)
    }
}

/// Worker 0's reader of a stream (the other workers read nothing).
pub struct RedisStreamSource {
    table: String,
    url: String,
    key: String,
    field: String,
    connection: redis::Connection,
    client: redis::Client,
    timeout: Duration,
    /// Since when the server has been unreachable.
    down_since: Option<Instant>,
    reads: bool,
    /// The last entry returned (reading goes on after it); `None`: from `first`.
    last: Option<EntryId>,
    /// Where a job without a checkpoint starts: an id to read from (inclusive), or `-`.
    first: Option<EntryId>,
    /// The last entry to read, for a bounded source.
    end: Option<Option<EntryId>>,
    done: bool,
    closed: bool,
    decoder: crate::message::MessageDecoder,
    workers: usize,
}

impl RedisStreamSource {
    pub fn open(
        spec: &ConnectorSpec,
        opts: &mut Options,
        worker: usize,
        workers: usize,
    ) -> Result<Self> {
        let url = opts.required("url")?;
        let key = opts.required("key")?;
        let field = opts.value::<String>("stream.field")?;
        let format = crate::message::MessageFormat::from_options(opts, spec)?;
        let decoder = crate::message::MessageDecoder::open(spec, opts, &format)?;
        let timeout_ms = opts
            .duration_ms("sluice.connect-timeout")?
            .expect("declared default");
        let timeout = Duration::from_millis(timeout_ms.max(1) as u64);
        let client = redis::Client::open(url.as_str())
            .map_err(|e| opts.error(format!("option 'url' = '{url}': {e}")))?;
        let mut connection = connect(&client, timeout).map_err(|e| {
            opts.error(format!(
                "cannot reach Redis at '{url}' within {timeout:?} (option 'url'): {e}"
            ))
        })?;
        let exists: bool = redis::cmd("EXISTS")
            .arg(&key)
            .query(&mut connection)
            .map_err(|e| opts.error(format!("Redis at '{url}': {e}")))?;
        if !exists {
            return Err(opts.error(format!(
                "Redis at '{url}' has no stream '{key}' (option 'key')"
            )));
        }
        let entries: Vec<Entry> = redis::cmd("XREVRANGE")
            .arg(&key)
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1)
            .query(&mut connection)
            .map_err(|e| opts.error(format!("stream '{key}' (option 'key'): {e}")))?;
        let newest = entries.first().and_then(|(id, _)| EntryId::parse(id));
        let first = match opts.value::<String>("scan.startup.mode")?.as_str() {
            "latest" => newest.map(|n| EntryId(n.0, n.1 + 1)),
            "id" => {
                let text = opts.get("scan.startup.id")?.ok_or_else(|| {
                    opts.error("'scan.startup.mode' = 'id' needs 'scan.startup.id'")
                })?;
                Some(EntryId::parse(&text).ok_or_else(|| {
                    opts.error(format!(
                        "option 'scan.startup.id' = '{text}' is not an entry id such as 1700000000000-0"
                    ))
                })?)
            }
            _ => None,
        };
        let end = match opts.value::<String>("scan.bounded.mode")?.as_str() {
            "latest" => Some(newest),
            _ => None,
        };
        Ok(RedisStreamSource {
            table: spec.table.clone(),
            url,
            key,
            field,
            connection,
            client,
            timeout,
            down_since: None,
            reads: worker == 0,
            last: None,
            first,
            end,
            done: false,
            closed: false,
            decoder,
            workers,
        })
    }

    fn error(&self, message: impl Into<String>) -> Error {
        Error::connector(&self.table, message)
    }

    /// The next entries, up to `n`: `XRANGE` after the last one returned (or from the start).
    fn fetch(&mut self, n: usize) -> Result<Option<Vec<Entry>>> {
        let start = match (self.last, self.first) {
            (Some(last), _) => format!("({}", last.text()),
            (None, Some(first)) => first.text(),
            (None, None) => "-".to_string(),
        };
        let end = match self.end {
            Some(Some(end)) => end.text(),
            _ => "+".to_string(),
        };
        let read: redis::RedisResult<Vec<Entry>> = redis::cmd("XRANGE")
            .arg(&self.key)
            .arg(&start)
            .arg(&end)
            .arg("COUNT")
            .arg(n)
            .query(&mut self.connection);
        match read {
            Ok(entries) => {
                self.down_since = None;
                Ok(Some(entries))
            }
            Err(e) if e.is_io_error() || e.is_connection_dropped() || e.is_timeout() => {
                // Reconnect, until the server has been away longer than the timeout.
                let since = *self.down_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= self.timeout {
                    return Err(self.error(format!(
                        "lost Redis at '{}' for {:?} (option 'sluice.connect-timeout'): {e}",
                        self.url,
                        since.elapsed()
                    )));
                }
                if let Ok(c) = connect(&self.client, Duration::from_millis(500)) {
                    self.connection = c;
                }
                Ok(None)
            }
            Err(e) => Err(self.error(format!("reading stream '{}': {e}", self.key))),
        }
    }

    /// The rows of entries: each entry's field decoded, then the metadata columns.
    fn decode(&mut self, entries: &[Entry]) -> Result<Option<RecordBatch>> {
        let key = self.key.clone();
        let mut bodies = Vec::with_capacity(entries.len());
        for (id, fields) in entries {
            match fields.iter().find(|(f, _)| *f == self.field) {
                Some((_, v)) => bodies.push((id.as_str(), v.as_slice())),
                None => {
                    return Err(Error::BadRecord {
                        location: format!("stream '{key}' entry {id}"),
                        message: format!(
                            "the entry has no field '{}' (option 'stream.field')",
                            self.field
                        ),
                    })
                }
            }
        }
        let location = |i: usize| format!("stream '{key}' entry {}", bodies[i].0);
        self.decoder.rows(
            &bodies,
            |(_, body)| body,
            &location,
            |key, kept| -> ArrayRef {
                match key {
                    "id" => Arc::new(StringArray::from_iter_values(
                        kept.iter().map(|(id, _)| *id),
                    )),
                    _ => Arc::new(TimestampMillisecondArray::from_iter_values(
                        kept.iter()
                            .map(|(id, _)| EntryId::parse(id).map_or(0, |id| id.0 as i64)),
                    )),
                }
            },
        )
    }
}

fn connect(client: &redis::Client, timeout: Duration) -> redis::RedisResult<redis::Connection> {
    let connection = client.get_connection_with_timeout(timeout)?;
    connection.set_read_timeout(Some(timeout))?;
    connection.set_write_timeout(Some(timeout))?;
    Ok(connection)
}

impl SourceReader for RedisStreamSource {
    fn open_splits(&self) -> Vec<usize> {
        if self.reads && !self.closed {
            vec![0]
        } else {
            vec![]
        }
    }

    fn poll(&mut self, max_rows: usize) -> Result<Poll> {
        if !self.reads || self.closed {
            return Ok(if self.end.is_some() || !self.reads {
                Poll::Finished
            } else {
                Poll::Idle
            });
        }
        if self.done || self.end == Some(None) {
            self.done = true;
            self.closed = true;
            return Ok(Poll::SplitDone { split: 0 });
        }
        let Some(entries) = self.fetch(max_rows)? else {
            return Ok(Poll::Idle);
        };
        if entries.is_empty() {
            if self.end.is_some() {
                self.done = true;
                self.closed = true;
                return Ok(Poll::SplitDone { split: 0 });
            }
            return Ok(Poll::Idle);
        }
        let last = entries.last().and_then(|(id, _)| EntryId::parse(id));
        let batch = self.decode(&entries)?;
        self.last = last.or(self.last);
        if let (Some(Some(end)), Some(last)) = (self.end, self.last) {
            self.done = last >= end;
        }
        match batch {
            Some(batch) => Ok(Poll::Batch { split: 0, batch }),
            None => Ok(Poll::Idle),
        }
    }

    fn skipped(&self) -> u64 {
        self.decoder.skipped()
    }

    fn offsets(&self) -> SourceOffsets {
        if !self.reads {
            return SourceOffsets::new();
        }
        if self.done && self.closed {
            return [(self.key.clone(), SPLIT_DONE)].into_iter().collect();
        }
        match self.last {
            None => SourceOffsets::new(),
            Some(id) => [
                (self.key.clone(), id.0),
                (format!("{}#seq", self.key), id.1),
            ]
            .into_iter()
            .collect(),
        }
    }

    fn seek(&mut self, offsets: &SourceOffsets) -> Result<()> {
        match offsets.get(&self.key) {
            Some(&SPLIT_DONE) => {
                self.done = true;
                self.closed = true;
            }
            Some(&ms) => {
                let seq = offsets
                    .get(&format!("{}#seq", self.key))
                    .copied()
                    .unwrap_or(0);
                self.last = Some(EntryId(ms, seq));
            }
            None => {}
        }
        Ok(())
    }

    /// The stream is one split, read by worker 0: the others never hold watermarks back.
    fn silent_workers(&self) -> Vec<usize> {
        (1..self.workers).collect()
    }
}
