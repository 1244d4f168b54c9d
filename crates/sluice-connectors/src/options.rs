//! Connector options: typed access, and an error for every option no connector read.

use std::collections::{BTreeMap, BTreeSet};

use sluice_common::{Error, Result};

use crate::ConnectorSpec;

/// Options a connector reads; whatever it leaves unread is reported as unknown.
pub struct Options {
    table: String,
    values: BTreeMap<String, String>,
    read: BTreeSet<String>,
}

/// Options shared by all tables, read by the engine rather than by a connector.
const ENGINE_OPTIONS: [&str; 4] = [
    "connector",
    "scan.watermark.idle-timeout",
    "late-data.sink",
    "lookup.join.cache.ttl",
];

impl Options {
    pub fn new(spec: &ConnectorSpec) -> Self {
        Options {
            table: spec.table.clone(),
            values: spec.options.clone(),
            read: BTreeSet::new(),
        }
    }

    /// The `connector` option.
    pub fn connector(&mut self) -> Result<String> {
        self.get("connector").ok_or_else(|| {
            Error::connector(&self.table, "missing option 'connector' in WITH (...)")
        })
    }

    /// An option's raw value.
    pub fn get(&mut self, key: &str) -> Option<String> {
        self.read.insert(key.to_string());
        self.values.get(key).cloned()
    }

    /// A required option. When it is missing and an option no one reads is spelled close to
    /// it, the message names that one.
    pub fn required(&mut self, key: &str) -> Result<String> {
        if let Some(v) = self.get(key) {
            return Ok(v);
        }
        let unread = self
            .values
            .keys()
            .filter(|k| !self.read.contains(*k) && !ENGINE_OPTIONS.contains(&k.as_str()));
        let typo = unread
            .map(|k| (k, sluice_common::text::edit_distance(k, key)))
            .filter(|(k, d)| *d <= 2.max(k.len() / 6))
            .min_by_key(|(_, d)| *d);
        Err(Error::connector(
            &self.table,
            match typo {
                Some((k, _)) => {
                    format!("unknown option '{k}' (did you mean '{key}'?); missing required option '{key}'")
                }
                None => format!("missing required option '{key}'"),
            },
        ))
    }

    /// A parsed option, with a default.
    pub fn parse<T: std::str::FromStr>(&mut self, key: &str, default: T) -> Result<T> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v.trim().parse().map_err(|_| {
                Error::connector(
                    &self.table,
                    format!(
                        "option '{key}' = '{v}' is not a valid {}",
                        std::any::type_name::<T>()
                    ),
                )
            }),
        }
    }

    /// A rate such as `rows-per-second`: a finite number of at least 0 (0: unpaced).
    pub fn rate(&mut self, key: &str, default: f64) -> Result<f64> {
        let v: f64 = self.parse(key, default)?;
        if !v.is_finite() || v < 0.0 {
            return Err(self.error(format!(
                "option '{key}' = '{v}' must be a number of at least 0 (0: as fast as possible)"
            )));
        }
        Ok(v)
    }

    /// A size in bytes, written as Flink writes memory sizes: `134217728`, `128mb`, `8 MB`,
    /// `64kb`, `1g` (units of 1024).
    pub fn memory_size(&mut self, key: &str, default: u64) -> Result<u64> {
        let Some(v) = self.get(key) else {
            return Ok(default);
        };
        sluice_common::text::memory_size(&v).ok_or_else(|| {
            self.error(format!(
                "option '{key}' = '{v}' is not a size such as '128mb', '8 MB' or a number of bytes"
            ))
        })
    }

    /// A parsed option that may be absent.
    pub fn optional<T: std::str::FromStr>(&mut self, key: &str) -> Result<Option<T>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.trim().parse().map(Some).map_err(|_| {
                Error::connector(
                    &self.table,
                    format!(
                        "option '{key}' = '{v}' is not a valid {}",
                        std::any::type_name::<T>()
                    ),
                )
            }),
        }
    }

    /// A duration option (`'3 s'`, `'500 ms'`, `'5 min'`) in milliseconds, with a default.
    pub fn duration_ms(&mut self, key: &str, default: i64) -> Result<i64> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => sluice_common::time::parse_duration_ms(&v).ok_or_else(|| {
                Error::connector(
                    &self.table,
                    format!("option '{key}' = '{v}' is not a duration such as '3 s'"),
                )
            }),
        }
    }

    /// A boolean option.
    pub fn flag(&mut self, key: &str, default: bool) -> Result<bool> {
        match self.get(key).map(|v| v.to_lowercase()) {
            None => Ok(default),
            Some(v) if v == "true" => Ok(true),
            Some(v) if v == "false" => Ok(false),
            Some(v) => Err(Error::connector(
                &self.table,
                format!("option '{key}' = '{v}' must be 'true' or 'false'"),
            )),
        }
    }

    /// All options starting with `prefix`, marked as read.
    pub fn with_prefix(&mut self, prefix: &str) -> Vec<(String, String)> {
        let found: Vec<(String, String)> = self
            .values
            .iter()
            .filter(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for (k, _) in &found {
            self.read.insert(k.clone());
        }
        found
    }

    /// The table name, for messages.
    pub fn table(&self) -> &str {
        &self.table
    }

    /// An error about this table.
    pub fn error(&self, message: impl Into<String>) -> Error {
        Error::connector(&self.table, message)
    }

    fn finish(&self, extra_ok: &[&str]) -> Result<()> {
        let unknown: Vec<&String> = self
            .values
            .keys()
            .filter(|k| {
                !self.read.contains(*k)
                    && !ENGINE_OPTIONS.contains(&k.as_str())
                    && !extra_ok.contains(&k.as_str())
            })
            .collect();
        if unknown.is_empty() {
            return Ok(());
        }
        let known: Vec<&String> = self.read.iter().collect();
        let options = self
            .read
            .iter()
            .map(String::as_str)
            .chain(extra_ok.iter().copied());
        let options: Vec<&str> = options.collect();
        Err(Error::connector(
            &self.table,
            format!(
                "unknown option{} {} for connector '{}' (it reads: {})",
                if unknown.len() > 1 { "s" } else { "" },
                unknown
                    .iter()
                    .map(
                        |k| match sluice_common::text::closest(k, options.iter().copied()) {
                            Some(close) => format!("'{k}' (did you mean '{close}'?)"),
                            None => format!("'{k}'"),
                        }
                    )
                    .collect::<Vec<_>>()
                    .join(", "),
                self.values.get("connector").cloned().unwrap_or_default(),
                known
                    .iter()
                    .map(|k| k.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ))
    }

    /// Fails on options a source did not read. Sink-side options are tolerated, since one table
    /// may be read by one statement and written by another.
    pub fn finish_source(&self) -> Result<()> {
        self.finish(&[
            "sink.rolling-policy.file-size",
            "sink.rolling-policy.rollover-interval",
            "print-identifier",
            "memory.name",
        ])
    }

    /// Fails on options a sink did not read (source-side options are tolerated).
    pub fn finish_sink(&self) -> Result<()> {
        let mut source_side: Vec<&str> = vec![
            "json.ignore-parse-errors",
            "source.monitor-interval",
            "rows-per-second",
            "number-of-rows",
            "seed",
            "speed-up",
            "max-out-of-orderness",
            "start-time",
            "csv.ignore-parse-errors",
            "source.split-size",
            "event-rate",
        ];
        let fields: Vec<&str> = self
            .values
            .keys()
            .filter(|k| k.starts_with("fields."))
            .map(String::as_str)
            .collect();
        source_side.extend(fields);
        self.finish(&source_side)
    }
}
