//! Connector options: each connector declares the options it takes (type, default, side, doc),
//! reads them through [`Options`], which takes defaults and checks from the declaration, and
//! gets an error for every option it does not declare. docs/connectors.md's option tables are
//! generated from the declarations.

use std::collections::{BTreeMap, BTreeSet};

use sluice_common::{Error, Result};

use crate::ConnectorSpec;

/// The type of an option's value, as written in `WITH (...)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Text,
    /// One of these words.
    Choice(&'static [&'static str]),
    /// `'true'` or `'false'`.
    Bool,
    /// A whole number of at least 0.
    Count,
    /// A finite number.
    Number,
    /// Rows per second: a number of at least 0 (0: as fast as possible).
    Rate,
    /// `'3 s'`, `'500 ms'`, `'5 min'`.
    Duration,
    /// `'128mb'`, `'8 MB'`, `'64kb'`, or a number of bytes (units of 1024).
    MemorySize,
    /// `'2026-11-11 00:00:00'`.
    Timestamp,
    /// The name of another table.
    Table,
}

impl Kind {
    /// How the docs write the type.
    pub fn describe(&self) -> String {
        match self {
            Kind::Text => "text".into(),
            Kind::Choice(words) => words
                .iter()
                .map(|w| format!("`{w}`"))
                .collect::<Vec<_>>()
                .join(" \\| "),
            Kind::Bool => "boolean".into(),
            Kind::Count => "whole number".into(),
            Kind::Number => "number".into(),
            Kind::Rate => "rows/s".into(),
            Kind::Duration => "duration".into(),
            Kind::MemorySize => "size".into(),
            Kind::Timestamp => "timestamp".into(),
            Kind::Table => "table name".into(),
        }
    }

    /// Checks a value of this kind; the error completes "option 'k' = 'v' ...".
    fn check(&self, value: &str) -> std::result::Result<(), String> {
        let v = value.trim();
        let ok = match self {
            Kind::Text | Kind::Table => true,
            Kind::Choice(words) => {
                if words.contains(&v) {
                    true
                } else {
                    return Err(format!(
                        "is not supported (use {})",
                        words
                            .iter()
                            .map(|w| format!("'{w}'"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ));
                }
            }
            Kind::Bool => matches!(v.to_lowercase().as_str(), "true" | "false"),
            Kind::Count => v.parse::<u64>().is_ok(),
            Kind::Number => v.parse::<f64>().is_ok_and(f64::is_finite),
            Kind::Rate => v.parse::<f64>().is_ok_and(|r| r.is_finite() && r >= 0.0),
            Kind::Duration => sluice_common::time::parse_duration_ms(v).is_some(),
            Kind::MemorySize => sluice_common::text::memory_size(v).is_some(),
            Kind::Timestamp => timestamp_ms(v).is_some(),
        };
        if ok {
            return Ok(());
        }
        Err(match self {
            Kind::Bool => "must be 'true' or 'false'".into(),
            Kind::Count => "is not a whole number of at least 0".into(),
            Kind::Number => "is not a number".into(),
            Kind::Rate => "must be a number of at least 0 (0: as fast as possible)".into(),
            Kind::Duration => "is not a duration such as '3 s'".into(),
            Kind::MemorySize => "is not a size such as '128mb', '8 MB' or a number of bytes".into(),
            Kind::Timestamp => "must look like 2026-11-11 00:00:00".into(),
            Kind::Text | Kind::Table | Kind::Choice(_) => unreachable!(),
        })
    }
}

/// `'2026-11-11 00:00:00'` as epoch milliseconds (UTC).
fn timestamp_ms(v: &str) -> Option<i64> {
    chrono::NaiveDateTime::parse_from_str(v.trim(), "%Y-%m-%d %H:%M:%S")
        .ok()
        .map(|t| t.and_utc().timestamp_millis())
}

/// Which side of a table reads an option.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Source,
    Sink,
    Both,
}

impl Side {
    fn covers(self, sink: bool) -> bool {
        matches!(
            (self, sink),
            (Side::Both, _) | (Side::Sink, true) | (Side::Source, false)
        )
    }
}

/// One option a connector takes.
pub struct OptionDef {
    /// The key. A part in angle brackets matches any non-empty text: `fields.<name>.kind`.
    pub key: &'static str,
    pub kind: Kind,
    /// The value used when the option is not set, as written in SQL (`None`: required, or
    /// off, as the doc says).
    pub default: Option<&'static str>,
    pub side: Side,
    /// Whether the option says which data a source reads (a path, a topic, a generator's seed):
    /// a checkpoint restores only into a source whose identity options are the same. Tuning
    /// options (split size, parse-error handling, rates) are not.
    pub identity: bool,
    pub doc: &'static str,
}

impl OptionDef {
    /// Whether `key` is this option (or an instance of its pattern).
    fn matches(&self, key: &str) -> bool {
        match (self.key.find('<'), self.key.find('>')) {
            (Some(open), Some(close)) => {
                let (prefix, suffix) = (&self.key[..open], &self.key[close + 1..]);
                key.len() > prefix.len() + suffix.len()
                    && key.starts_with(prefix)
                    && key.ends_with(suffix)
            }
            _ => self.key == key,
        }
    }
}

impl OptionDef {
    /// The key, with a pattern's part filled in from `key` where `key` has the pattern's
    /// prefix (`fields.id.mn` makes `fields.<name>.min` into `fields.id.min`), for hints.
    fn instance_like(&self, key: &str) -> String {
        if let (Some(open), Some(close)) = (self.key.find('<'), self.key.find('>')) {
            let (prefix, suffix) = (&self.key[..open], &self.key[close + 1..]);
            if let Some(rest) = key.strip_prefix(prefix) {
                let part = match suffix.is_empty() {
                    true => rest,
                    false => rest.rsplit_once('.').map_or(rest, |(p, _)| p),
                };
                if !part.is_empty() {
                    return format!("{prefix}{part}{suffix}");
                }
            }
        }
        self.key.to_string()
    }
}

/// A connector: its name, what it does, and the options it declares.
pub struct ConnectorDef {
    pub name: &'static str,
    pub reads: bool,
    pub writes: bool,
    /// The metadata a source can put in `METADATA FROM 'key'` columns.
    pub metadata: &'static [&'static str],
    /// The metadata a sink writes from a (not `VIRTUAL`) metadata column.
    pub writable_metadata: &'static [&'static str],
    /// Whether it reads and writes the changelog formats, and so their options
    /// ([`crate::format::CHANGELOG_OPTIONS`]).
    pub formats: bool,
    /// Whether lookup joins query it by key, and so it takes Flink's lookup cache options
    /// ([`crate::lookup::OPTIONS`]).
    pub lookup: bool,
    pub options: &'static [OptionDef],
}

impl ConnectorDef {
    /// Every option it takes: its own, the format options, then those of every source table.
    pub fn all_options(&self) -> impl Iterator<Item = &'static OptionDef> {
        let formats: &'static [OptionDef] = if self.formats {
            crate::format::CHANGELOG_OPTIONS
        } else {
            &[]
        };
        let lookup: &'static [OptionDef] = if self.lookup {
            crate::lookup::OPTIONS
        } else {
            &[]
        };
        self.options
            .iter()
            .chain(formats)
            .chain(lookup)
            .chain(TABLE_OPTIONS)
    }
}

/// Options of every source table whatever its connector, read by the planner and the engine.
pub const TABLE_OPTIONS: &[OptionDef] = &[
    OptionDef {
        key: "connector",
        kind: Kind::Text,
        default: None,
        side: Side::Both,
        identity: true,
        doc: "which connector reads and writes the table",
    },
    OptionDef {
        key: "scan.watermark.idle-timeout",
        kind: Kind::Duration,
        default: None,
        side: Side::Source,
        identity: false,
        doc: "a split without data for this long stops holding the watermark back",
    },
    OptionDef {
        key: "late-data.sink",
        kind: Kind::Table,
        default: None,
        side: Side::Source,
        identity: false,
        doc: "rows a window drops as late go, whole, to this table (same column types)",
    },
    OptionDef {
        key: "lookup.join.cache.ttl",
        kind: Kind::Duration,
        default: None,
        side: Side::Source,
        identity: false,
        doc: "a table read by a lookup join is reloaded this often",
    },
];

/// The declaration of connector `name`.
pub fn connector_def(name: &str) -> Option<&'static ConnectorDef> {
    crate::CONNECTORS.iter().find(|c| c.name == name)
}

/// Options a connector reads; whatever its table sets but no declaration covers is an error.
pub struct Options {
    table: String,
    values: BTreeMap<String, String>,
    def: &'static ConnectorDef,
    /// Whether a sink reads the options (else a source).
    sink: bool,
    read: BTreeSet<String>,
}

impl Options {
    /// The options of `spec` for its connector's source side (`sink` false) or sink side.
    pub fn new(spec: &ConnectorSpec, sink: bool) -> Result<Self> {
        let table = spec.table.clone();
        let name = spec
            .options
            .get("connector")
            .ok_or_else(|| Error::connector(&table, "missing option 'connector' in WITH (...)"))?;
        let def = connector_def(name).ok_or_else(|| unknown_connector(&table, name))?;
        if sink && !def.writes {
            return Err(Error::connector(
                &table,
                format!("connector '{name}' can only be read, not written to"),
            ));
        }
        if !sink && !def.reads {
            return Err(Error::connector(
                &table,
                format!("connector '{name}' can only be written to, not read"),
            ));
        }
        let opts = Options {
            table,
            values: spec.options.clone(),
            def,
            sink,
            read: BTreeSet::new(),
        };
        for (column, key) in &spec.metadata {
            let column = spec.schema.field(*column).name();
            if sink && !def.writable_metadata.contains(&key.as_str()) {
                return Err(Error::connector(
                    &spec.table,
                    format!(
                        "column '{column}' (METADATA FROM '{key}') cannot be written{}: declare it \
                         METADATA VIRTUAL, so that INSERT leaves it out",
                        match def.writable_metadata {
                            [] => format!(" (connector '{name}' writes no metadata)"),
                            keys => format!(" (connector '{name}' writes: {})", keys.join(", ")),
                        }
                    ),
                ));
            }
            if !def.metadata.contains(&key.as_str()) {
                return Err(Error::connector(
                    &spec.table,
                    format!(
                        "column '{column}': connector '{name}' has no metadata '{key}'{}",
                        match def.metadata {
                            [] => " (it has no metadata columns)".to_string(),
                            keys => format!(" (it has: {})", keys.join(", ")),
                        }
                    ),
                ));
            }
        }
        // Options no declaration covers are errors before anything is opened or connected.
        let undeclared: Vec<&String> = opts
            .values
            .keys()
            .filter(|k| !def.all_options().any(|d| d.matches(k)))
            .collect();
        if !undeclared.is_empty() {
            return Err(opts.unknown(&undeclared));
        }
        Ok(opts)
    }

    /// The connector's name.
    pub fn connector(&self) -> &'static str {
        self.def.name
    }

    fn declared(&self, key: &str) -> &'static OptionDef {
        self.def
            .all_options()
            .find(|d| d.matches(key))
            .unwrap_or_else(|| {
                panic!(
                    "connector '{}' reads option '{key}', which it does not declare",
                    self.def.name
                )
            })
    }

    /// An option's value, checked against its kind; the declared default when it is not set.
    pub fn get(&mut self, key: &str) -> Result<Option<String>> {
        let def = self.declared(key);
        self.read.insert(key.to_string());
        match self.values.get(key) {
            None => Ok(def.default.map(str::to_string)),
            Some(v) => match def.kind.check(v) {
                Ok(()) => Ok(Some(v.trim().to_string())),
                Err(why) => Err(self.error(format!("option '{key}' = '{v}' {why}"))),
            },
        }
    }

    /// Whether the table sets the option.
    pub fn is_set(&self, key: &str) -> bool {
        self.declared(key);
        self.values.contains_key(key)
    }

    /// A required option. When it is missing and an option no one reads is spelled close to
    /// it, the message names that one.
    pub fn required(&mut self, key: &str) -> Result<String> {
        if let Some(v) = self.get(key)? {
            return Ok(v);
        }
        let unread = self
            .values
            .keys()
            .filter(|k| !self.read.contains(*k) && !self.accepts(k));
        let typo = unread
            .map(|k| (k, sluice_common::text::edit_distance(k, key)))
            .filter(|(k, d)| *d <= 2.max(k.len() / 6))
            .min_by_key(|(_, d)| *d);
        Err(self.error(match typo {
            Some((k, _)) => {
                format!(
                    "unknown option '{k}' (did you mean '{key}'?); missing required option '{key}'"
                )
            }
            None => format!("missing required option '{key}'"),
        }))
    }

    /// A parsed option that may be absent (no default declared).
    pub fn optional<T: std::str::FromStr>(&mut self, key: &str) -> Result<Option<T>> {
        match self.get(key)? {
            None => Ok(None),
            Some(v) => v.parse().map(Some).map_err(|_| {
                self.error(format!(
                    "option '{key}' = '{v}' is not a valid {}",
                    std::any::type_name::<T>()
                ))
            }),
        }
    }

    /// A parsed option with a declared default.
    pub fn value<T: std::str::FromStr>(&mut self, key: &str) -> Result<T> {
        self.optional(key)?
            .ok_or_else(|| self.error(format!("missing required option '{key}'")))
    }

    /// A parsed option, with a default that depends on the table (a column's type, say).
    pub fn value_or<T: std::str::FromStr>(&mut self, key: &str, default: T) -> Result<T> {
        Ok(self.optional(key)?.unwrap_or(default))
    }

    /// A boolean option with a declared default.
    pub fn flag(&mut self, key: &str) -> Result<bool> {
        Ok(self.value::<String>(key)?.eq_ignore_ascii_case("true"))
    }

    /// A duration option in milliseconds (`None`: unset, no default).
    pub fn duration_ms(&mut self, key: &str) -> Result<Option<i64>> {
        Ok(self
            .get(key)?
            .and_then(|v| sluice_common::time::parse_duration_ms(&v)))
    }

    /// A size in bytes, as Flink writes memory sizes: `134217728`, `128mb`, `8 MB`, `64kb`,
    /// `1g` (units of 1024).
    pub fn memory_size(&mut self, key: &str) -> Result<u64> {
        let v = self.required(key)?;
        Ok(sluice_common::text::memory_size(&v).expect("checked by its kind"))
    }

    /// A timestamp option (`'2026-11-11 00:00:00'`) as epoch milliseconds.
    pub fn timestamp_ms(&mut self, key: &str) -> Result<i64> {
        let v = self.required(key)?;
        Ok(timestamp_ms(&v).expect("checked by its kind"))
    }

    /// All options set whose key starts with `prefix`, marked as read.
    pub fn with_prefix(&mut self, prefix: &str) -> Vec<(String, String)> {
        let found: Vec<(String, String)> = self
            .values
            .iter()
            .filter(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for (k, _) in &found {
            self.declared(k);
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

    /// Whether an option read by someone else is fine on this side: the table options, and
    /// the connector's options of the other side (one table may be read by one statement and
    /// written by another).
    fn accepts(&self, key: &str) -> bool {
        TABLE_OPTIONS.iter().any(|d| d.matches(key))
            || self
                .def
                .all_options()
                .any(|d| d.matches(key) && !d.side.covers(self.sink))
    }

    /// Fails on options the table sets that the connector neither read nor declares for the
    /// other side; checks the values of those it did not read against their kinds.
    pub fn finish(&self) -> Result<()> {
        let mut unknown = vec![];
        for (k, v) in &self.values {
            if self.read.contains(k) {
                continue;
            }
            let def = self.def.all_options().find(|d| d.matches(k));
            match def {
                Some(d) if self.accepts(k) => {
                    if let Err(why) = d.kind.check(v) {
                        return Err(self.error(format!("option '{k}' = '{v}' {why}")));
                    }
                }
                _ => unknown.push(k),
            }
        }
        if unknown.is_empty() {
            return Ok(());
        }
        Err(self.unknown(&unknown))
    }

    /// The error for options this side of the connector does not take, each with the closest
    /// one it does.
    fn unknown(&self, unknown: &[&String]) -> Error {
        let known: Vec<&str> = self
            .def
            .all_options()
            .filter(|d| d.side.covers(self.sink) && !TABLE_OPTIONS.iter().any(|t| t.key == d.key))
            .map(|d| d.key)
            .collect();
        self.error(format!(
            "unknown option{} {} for connector '{}' {} (it takes: {})",
            if unknown.len() > 1 { "s" } else { "" },
            unknown
                .iter()
                .map(|k| {
                    // An option declared for this side but left unread does not apply to this
                    // table (a CSV option on a JSON table): the hint names another one.
                    let others: Vec<String> = self
                        .def
                        .all_options()
                        .filter(|d| {
                            d.side.covers(self.sink)
                                && !TABLE_OPTIONS.iter().any(|t| t.key == d.key)
                        })
                        .map(|d| d.instance_like(k))
                        .filter(|o| o != *k)
                        .collect();
                    match sluice_common::text::closest(k, others.iter().map(String::as_str)) {
                        Some(close) => format!("'{k}' (did you mean '{close}'?)"),
                        None => format!("'{k}'"),
                    }
                })
                .collect::<Vec<_>>()
                .join(", "),
            self.def.name,
            if self.sink { "sinks" } else { "sources" },
            known.join(", ")
        ))
    }
}

fn unknown_connector(table: &str, name: &str) -> Error {
    let names: Vec<&str> = crate::CONNECTORS.iter().map(|c| c.name).collect();
    Error::connector(
        table,
        format!(
            "unknown connector '{name}' (available: {})",
            names.join(", ")
        ),
    )
}

/// What identifies the input a source table reads: its connector and the options its
/// connector declares as identity, with a path made absolute.
pub fn source_identity(options: &BTreeMap<String, String>) -> String {
    source_identity_at(options, None)
}

/// [`source_identity`] for a job that runs in folder `base` (a relative path starts there).
pub fn source_identity_at(
    options: &BTreeMap<String, String>,
    base: Option<&std::path::Path>,
) -> String {
    let declared: Vec<&OptionDef> = match options.get("connector").and_then(|c| connector_def(c)) {
        Some(c) => c.all_options().filter(|d| d.identity).collect(),
        None => TABLE_OPTIONS.iter().filter(|d| d.identity).collect(),
    };
    let mut parts = vec![];
    for (k, v) in options {
        if !declared.iter().any(|d| d.matches(k)) {
            continue;
        }
        let v = if k == "path" {
            let plain = v.trim().strip_prefix("file://").unwrap_or(v.trim());
            let full = match base {
                Some(base) if std::path::Path::new(plain).is_relative() => base.join(plain),
                _ => std::path::PathBuf::from(plain),
            };
            std::fs::canonicalize(full)
                .map(|p| p.display().to_string())
                .unwrap_or_else(|_| plain.to_string())
        } else {
            v.clone()
        };
        parts.push(format!("{k} = '{v}'"));
    }
    parts.join(", ")
}

/// The options table of a connector for docs/connectors.md.
pub fn options_markdown(options: &[OptionDef]) -> String {
    if options.is_empty() {
        return "It takes no options.\n".into();
    }
    let mut out =
        String::from("| option | side | type | default | meaning |\n|---|---|---|---|---|\n");
    for d in options {
        let side = match d.side {
            Side::Source => "read",
            Side::Sink => "write",
            Side::Both => "both",
        };
        let default = match d.default {
            Some(v) => format!("`{v}`"),
            None => String::new(),
        };
        let identity = if d.identity { " (identity)" } else { "" };
        out.push_str(&format!(
            "| `{}`{identity} | {side} | {} | {default} | {} |\n",
            d.key,
            d.kind.describe(),
            d.doc
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_one_non_empty_part() {
        let d = OptionDef {
            key: "fields.<name>.kind",
            kind: Kind::Text,
            default: None,
            side: Side::Source,
            identity: false,
            doc: "",
        };
        assert!(d.matches("fields.id.kind"));
        assert!(d.matches("fields.a.b.kind"));
        assert!(!d.matches("fields..kind"));
        assert!(!d.matches("fields.id.min"));
        assert!(!d.matches("fields.kind"));
    }

    #[test]
    fn declared_defaults_are_values_of_their_kind() {
        for c in crate::CONNECTORS {
            for d in c.all_options() {
                if let Some(v) = d.default {
                    assert_eq!(d.kind.check(v), Ok(()), "{}: {}", c.name, d.key);
                }
                assert!(!d.doc.is_empty(), "{}: {} has no doc", c.name, d.key);
            }
            let keys: BTreeSet<&str> = c.options.iter().map(|d| d.key).collect();
            assert_eq!(
                keys.len(),
                c.options.len(),
                "{} declares a key twice",
                c.name
            );
        }
    }

    /// The options tables of docs/connectors.md are generated from the declarations: the file
    /// must hold exactly what [`options_markdown`] gives (`SLUICE_BLESS=1` rewrites it).
    #[test]
    fn the_docs_list_every_option_as_declared() {
        let sections: Vec<(&str, String)> = std::iter::once(("any source table", TABLE_OPTIONS))
            .chain(std::iter::once((
                "changelog formats",
                crate::format::CHANGELOG_OPTIONS,
            )))
            .chain(crate::CONNECTORS.iter().map(|c| (c.name, c.options)))
            .map(|(name, options)| (name, options_markdown(options)))
            .collect();
        sluice_common::text::check_generated_sections(
            concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/connectors.md"),
            "the declarations",
            &sections,
        );
    }
}
