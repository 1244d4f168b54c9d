//! Tables looked up by key: the dimension side of a lookup join
//! (`JOIN dim FOR SYSTEM_TIME AS OF o.proc_time`) when its connector can query by key (`jdbc`).
//! Each input batch asks once for all its keys that the cache does not hold.
//!
//! The cache follows Flink's options: `'lookup.cache' = 'PARTIAL'` keeps each key's rows (and,
//! with `lookup.partial-cache.cache-missing-key`, that a key has none) for
//! `lookup.partial-cache.expire-after-write` / `-after-access`, at most
//! `lookup.partial-cache.max-rows` keys (the oldest written go first). `'NONE'` asks the
//! database for every batch. Flink's older `lookup.cache.max-rows` and `lookup.cache.ttl` mean a
//! partial cache with those bounds.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::{ArrayRef, UInt32Array};
use arrow::datatypes::{Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use arrow::row::{OwnedRow, RowConverter, SortField};
use sluice_common::{Error, Result};

use crate::options::{Kind, OptionDef, Options, Side};
use crate::ConnectorSpec;

/// A table queried by key.
pub trait LookupTable: Send {
    /// The rows whose key columns equal a row of `keys` (the key columns, in order; no NULLs),
    /// in the table's schema (`ConnectorSpec::schema`).
    fn lookup(&mut self, keys: &RecordBatch) -> Result<RecordBatch>;
}

/// Flink's lookup cache options, shared by connectors that can be looked up.
pub const OPTIONS: &[OptionDef] = &[
    OptionDef {
        key: "lookup.cache",
        kind: Kind::Choice(&["NONE", "PARTIAL"]),
        default: Some("NONE"),
        side: Side::Source,
        identity: false,
        doc: "lookup joins: `PARTIAL` caches looked-up keys (bounded by the options below); `NONE` queries for every batch",
    },
    OptionDef {
        key: "lookup.partial-cache.max-rows",
        kind: Kind::Count,
        default: None,
        side: Side::Source,
        identity: false,
        doc: "`PARTIAL`: at most this many keys are cached per worker (the oldest written go first)",
    },
    OptionDef {
        key: "lookup.partial-cache.expire-after-write",
        kind: Kind::Duration,
        default: None,
        side: Side::Source,
        identity: false,
        doc: "`PARTIAL`: a key's rows are looked up again this long after they were read",
    },
    OptionDef {
        key: "lookup.partial-cache.expire-after-access",
        kind: Kind::Duration,
        default: None,
        side: Side::Source,
        identity: false,
        doc: "`PARTIAL`: a key's rows are looked up again when unused this long",
    },
    OptionDef {
        key: "lookup.partial-cache.cache-missing-key",
        kind: Kind::Bool,
        default: Some("true"),
        side: Side::Source,
        identity: false,
        doc: "`PARTIAL`: also cache that a key has no rows",
    },
    OptionDef {
        key: "lookup.max-retries",
        kind: Kind::Count,
        default: Some("3"),
        side: Side::Source,
        identity: false,
        doc: "how many times a lookup that lost its connection is retried before the job fails",
    },
    OptionDef {
        key: "lookup.cache.max-rows",
        kind: Kind::Count,
        default: None,
        side: Side::Source,
        identity: false,
        doc: "Flink's older option: a partial cache of this many keys",
    },
    OptionDef {
        key: "lookup.cache.ttl",
        kind: Kind::Duration,
        default: None,
        side: Side::Source,
        identity: false,
        doc: "Flink's older option: a partial cache whose keys expire this long after they were read",
    },
    OptionDef {
        key: "lookup.cache.caching-missing-key",
        kind: Kind::Bool,
        default: None,
        side: Side::Source,
        identity: false,
        doc: "Flink's older option: as `lookup.partial-cache.cache-missing-key`",
    },
];

/// How a lookup table caches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CacheOptions {
    pub enabled: bool,
    pub max_keys: Option<u64>,
    pub expire_after_write: Option<Duration>,
    pub expire_after_access: Option<Duration>,
    pub cache_missing: bool,
}

impl CacheOptions {
    pub fn read(opts: &mut Options) -> Result<CacheOptions> {
        let duration = |opts: &mut Options, key: &str| -> Result<Option<Duration>> {
            Ok(opts
                .duration_ms(key)?
                .filter(|ms| *ms > 0)
                .map(|ms| Duration::from_millis(ms as u64)))
        };
        let legacy_rows = opts.optional::<u64>("lookup.cache.max-rows")?;
        let legacy_ttl = duration(opts, "lookup.cache.ttl")?;
        let legacy_missing = opts.optional::<bool>("lookup.cache.caching-missing-key")?;
        let partial = opts.value::<String>("lookup.cache")? == "PARTIAL";
        let enabled = partial || legacy_rows.is_some() || legacy_ttl.is_some();
        let cache = CacheOptions {
            enabled,
            max_keys: opts
                .optional::<u64>("lookup.partial-cache.max-rows")?
                .or(legacy_rows),
            expire_after_write: duration(opts, "lookup.partial-cache.expire-after-write")?
                .or(legacy_ttl),
            expire_after_access: duration(opts, "lookup.partial-cache.expire-after-access")?,
            cache_missing: match legacy_missing {
                Some(v) if !opts.is_set("lookup.partial-cache.cache-missing-key") => v,
                _ => opts.value::<bool>("lookup.partial-cache.cache-missing-key")?,
            },
        };
        if partial
            && cache.max_keys.is_none()
            && cache.expire_after_write.is_none()
            && cache.expire_after_access.is_none()
        {
            return Err(opts.error(
                "'lookup.cache' = 'PARTIAL' needs a bound: 'lookup.partial-cache.max-rows', \
                 'lookup.partial-cache.expire-after-write' or 'lookup.partial-cache.expire-after-access'",
            ));
        }
        Ok(cache)
    }
}

struct Entry {
    rows: Vec<OwnedRow>,
    written: Instant,
    accessed: Instant,
}

/// Counters of a cached lookup table, for tests and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LookupStats {
    /// Queries sent to the table (one per batch with misses).
    pub queries: u64,
    /// Keys asked of the table.
    pub keys_queried: u64,
    /// Keys answered from the cache.
    pub hits: u64,
}

/// A lookup table behind Flink's cache.
pub struct CachedLookup {
    table: String,
    inner: Box<dyn LookupTable>,
    options: CacheOptions,
    schema: SchemaRef,
    /// Positions of the key columns in `schema`.
    key_columns: Vec<usize>,
    keys: RowConverter,
    rows: RowConverter,
    entries: HashMap<OwnedRow, Entry>,
    /// Keys in the order they were written, with when (an entry rewritten since is skipped).
    order: VecDeque<(OwnedRow, Instant)>,
    pub stats: LookupStats,
}

impl CachedLookup {
    pub fn new(
        spec: &ConnectorSpec,
        inner: Box<dyn LookupTable>,
        key_columns: Vec<usize>,
        options: CacheOptions,
    ) -> Result<Self> {
        let schema = spec.schema.clone();
        let keys = RowConverter::new(
            key_columns
                .iter()
                .map(|i| SortField::new(schema.field(*i).data_type().clone()))
                .collect(),
        )?;
        let rows = RowConverter::new(
            schema
                .fields()
                .iter()
                .map(|f| SortField::new(f.data_type().clone()))
                .collect(),
        )?;
        Ok(CachedLookup {
            table: spec.table.clone(),
            inner,
            options,
            schema,
            key_columns,
            keys,
            rows,
            entries: HashMap::new(),
            order: VecDeque::new(),
            stats: LookupStats::default(),
        })
    }

    /// The schema of the key batches [`CachedLookup::lookup`] takes.
    pub fn key_schema(&self) -> SchemaRef {
        Arc::new(self.schema.project(&self.key_columns).expect("key columns"))
    }

    fn fresh(&self, e: &Entry, now: Instant) -> bool {
        self.options
            .expire_after_write
            .is_none_or(|d| now.duration_since(e.written) < d)
            && self
                .options
                .expire_after_access
                .is_none_or(|d| now.duration_since(e.accessed) < d)
    }

    fn evict(&mut self, now: Instant) {
        let Some(max) = self.options.max_keys else {
            // Bounded by time only: expired keys go as they come to the front.
            while let Some((k, at)) = self.order.front() {
                match self.entries.get(k) {
                    Some(e) if e.written == *at && self.fresh(e, now) => break,
                    Some(e) if e.written == *at => {
                        self.entries.remove(k);
                    }
                    _ => {}
                }
                self.order.pop_front();
            }
            return;
        };
        while self.entries.len() as u64 > max {
            let Some((k, at)) = self.order.pop_front() else {
                break;
            };
            if self.entries.get(&k).is_some_and(|e| e.written == at) {
                self.entries.remove(&k);
            }
        }
    }

    /// The rows of every (non-NULL) key of `keys`, from the cache or one query for the rest.
    pub fn lookup(&mut self, keys: &RecordBatch) -> Result<RecordBatch> {
        let now = Instant::now();
        let converted = self.keys.convert_columns(keys.columns())?;
        let mut found: Vec<OwnedRow> = vec![];
        let mut missing: Vec<u32> = vec![];
        let mut seen = std::collections::HashSet::new();
        for i in 0..keys.num_rows() {
            if keys.columns().iter().any(|c| c.is_null(i)) {
                continue;
            }
            let key = converted.row(i);
            if !seen.insert(key) {
                continue;
            }
            if self.options.enabled {
                if let Some(e) = self.entries.get(&key.owned()) {
                    if self.fresh(e, now) {
                        self.stats.hits += 1;
                        found.extend(e.rows.iter().cloned());
                        if self.options.expire_after_access.is_some() {
                            self.entries.get_mut(&key.owned()).expect("found").accessed = now;
                        }
                        continue;
                    }
                }
            }
            missing.push(i as u32);
        }
        if !missing.is_empty() {
            let asked = arrow::compute::take_record_batch(keys, &UInt32Array::from(missing))?;
            self.stats.queries += 1;
            self.stats.keys_queried += asked.num_rows() as u64;
            let rows = self.inner.lookup(&asked)?;
            if rows.schema().fields() != self.schema.fields() {
                return Err(Error::connector(
                    &self.table,
                    format!(
                        "internal: a lookup returned columns {:?}, not the table's",
                        rows.schema()
                    ),
                ));
            }
            let all = self.rows.convert_columns(rows.columns())?;
            found.extend(all.iter().map(|r| r.owned()));
            if self.options.enabled {
                let key_cols: Vec<ArrayRef> = self
                    .key_columns
                    .iter()
                    .map(|c| rows.column(*c).clone())
                    .collect();
                let row_keys = self.keys.convert_columns(&key_cols)?;
                let mut by_key: HashMap<OwnedRow, Vec<OwnedRow>> = HashMap::new();
                for (i, k) in row_keys.iter().enumerate() {
                    by_key
                        .entry(k.owned())
                        .or_default()
                        .push(all.row(i).owned());
                }
                let asked_keys = self.keys.convert_columns(asked.columns())?;
                for k in asked_keys.iter() {
                    let k = k.owned();
                    let rows = by_key.remove(&k).unwrap_or_default();
                    if rows.is_empty() && !self.options.cache_missing {
                        continue;
                    }
                    self.order.push_back((k.clone(), now));
                    self.entries.insert(
                        k,
                        Entry {
                            rows,
                            written: now,
                            accessed: now,
                        },
                    );
                }
                self.evict(now);
            }
        }
        let columns = self.rows.convert_rows(found.iter().map(|r| r.row()))?;
        if columns.is_empty() {
            return Ok(RecordBatch::new_empty(self.schema.clone()));
        }
        Ok(RecordBatch::try_new_with_options(
            self.schema.clone(),
            columns,
            &arrow::record_batch::RecordBatchOptions::new().with_row_count(Some(found.len())),
        )?)
    }

    /// Keys held now.
    pub fn cached_keys(&self) -> usize {
        self.entries.len()
    }
}

/// Opens `spec`'s table for lookups by `key_columns` (positions in `spec.schema`), behind its
/// cache; `None` when its connector cannot look up by key (the join then loads the whole
/// table).
pub fn open_lookup(spec: &ConnectorSpec, key_columns: Vec<usize>) -> Result<Option<CachedLookup>> {
    match spec.options.get("connector").map(String::as_str) {
        #[cfg(feature = "jdbc")]
        Some("jdbc") => {
            let mut opts = Options::new(spec, false)?;
            let cache = CacheOptions::read(&mut opts)?;
            let inner = crate::jdbc::open_lookup(spec, &mut opts, &key_columns)?;
            opts.finish()?;
            Ok(Some(CachedLookup::new(spec, inner, key_columns, cache)?))
        }
        _ => {
            let _ = (Schema::empty(), &key_columns);
            Ok(None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Int64Array, StringArray};
    use arrow::datatypes::{DataType, Field};
    use std::sync::Mutex;

    /// A table of (id, name) rows for ids 0..100 that are even, counting what it was asked.
    struct Counting {
        asked: Arc<Mutex<Vec<Vec<i64>>>>,
        schema: SchemaRef,
        version: Arc<Mutex<i64>>,
    }

    impl LookupTable for Counting {
        fn lookup(&mut self, keys: &RecordBatch) -> Result<RecordBatch> {
            let ids = keys
                .column(0)
                .as_any()
                .downcast_ref::<Int64Array>()
                .unwrap();
            let ids: Vec<i64> = ids.values().to_vec();
            self.asked.lock().unwrap().push(ids.clone());
            let v = *self.version.lock().unwrap();
            let hit: Vec<i64> = ids.into_iter().filter(|i| i % 2 == 0 && *i < 100).collect();
            let names: Vec<String> = hit.iter().map(|i| format!("n{i}v{v}")).collect();
            Ok(RecordBatch::try_new(
                self.schema.clone(),
                vec![
                    Arc::new(Int64Array::from(hit)),
                    Arc::new(StringArray::from(names)),
                ],
            )?)
        }
    }

    /// What the table was asked, batch by batch.
    type Asked = Arc<Mutex<Vec<Vec<i64>>>>;

    fn setup(options: CacheOptions) -> (CachedLookup, Asked, Arc<Mutex<i64>>) {
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("name", DataType::Utf8, true),
        ]));
        let spec = ConnectorSpec {
            table: "dim".into(),
            schema: schema.clone(),
            options: Default::default(),
            partitioned_by: vec![],
            read_columns: None,
            decode_ahead: false,
            whole_files: false,
            sink_instance: 0,
            metadata: vec![],
            primary_key: vec![0],
        };
        let asked = Arc::new(Mutex::new(vec![]));
        let version = Arc::new(Mutex::new(1));
        let inner = Counting {
            asked: asked.clone(),
            schema,
            version: version.clone(),
        };
        let c = CachedLookup::new(&spec, Box::new(inner), vec![0], options).unwrap();
        (c, asked, version)
    }

    fn keys(ids: &[Option<i64>]) -> RecordBatch {
        RecordBatch::try_new(
            Arc::new(Schema::new(vec![Field::new("id", DataType::Int64, true)])),
            vec![Arc::new(Int64Array::from(ids.to_vec()))],
        )
        .unwrap()
    }

    fn names(b: &RecordBatch) -> Vec<String> {
        let mut v: Vec<String> = b
            .column(1)
            .as_any()
            .downcast_ref::<StringArray>()
            .unwrap()
            .iter()
            .map(|s| s.unwrap().to_string())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn one_query_per_batch_for_its_distinct_missing_keys() {
        let (mut c, asked, _) = setup(CacheOptions {
            enabled: false,
            max_keys: None,
            expire_after_write: None,
            expire_after_access: None,
            cache_missing: true,
        });
        let out = c
            .lookup(&keys(&[Some(2), Some(3), Some(2), None, Some(4)]))
            .unwrap();
        assert_eq!(names(&out), vec!["n2v1", "n4v1"]);
        assert_eq!(*asked.lock().unwrap(), vec![vec![2, 3, 4]]);
        // Without a cache, the next batch asks again.
        c.lookup(&keys(&[Some(2)])).unwrap();
        assert_eq!(asked.lock().unwrap().len(), 2);
    }

    #[test]
    fn the_partial_cache_answers_until_keys_expire_or_are_evicted() {
        let (mut c, asked, version) = setup(CacheOptions {
            enabled: true,
            max_keys: Some(3),
            expire_after_write: Some(Duration::from_millis(300)),
            expire_after_access: None,
            cache_missing: false,
        });
        c.lookup(&keys(&[Some(2), Some(3)])).unwrap();
        *version.lock().unwrap() = 2;
        // 2 is cached (with its old row); 3 had no row and missing keys are not cached.
        let out = c.lookup(&keys(&[Some(2), Some(3)])).unwrap();
        assert_eq!(names(&out), vec!["n2v1"]);
        assert_eq!(asked.lock().unwrap()[1], vec![3]);
        // 4, 6, 8 fill the cache past 3 keys: 2, the oldest, goes.
        c.lookup(&keys(&[Some(4), Some(6), Some(8)])).unwrap();
        assert_eq!(c.cached_keys(), 3);
        let out = c.lookup(&keys(&[Some(2), Some(8)])).unwrap();
        assert_eq!(names(&out), vec!["n2v2", "n8v2"]);
        assert_eq!(asked.lock().unwrap()[3], vec![2]);
        // After expire-after-write, everything is asked again.
        std::thread::sleep(Duration::from_millis(350));
        *version.lock().unwrap() = 3;
        let out = c.lookup(&keys(&[Some(2), Some(8)])).unwrap();
        assert_eq!(names(&out), vec!["n2v3", "n8v3"]);
        assert_eq!(asked.lock().unwrap()[4], vec![2, 8]);
        assert_eq!(c.stats.hits, 2);
    }

    /// A table holding a row for every id, counting the keys it was asked.
    struct Every {
        asked: Arc<Mutex<u64>>,
        schema: SchemaRef,
    }

    impl LookupTable for Every {
        fn lookup(&mut self, keys: &RecordBatch) -> Result<RecordBatch> {
            let ids = keys
                .column(0)
                .as_any()
                .downcast_ref::<Int64Array>()
                .unwrap();
            *self.asked.lock().unwrap() += ids.len() as u64;
            let names: Vec<String> = ids.values().iter().map(|i| format!("n{i}")).collect();
            Ok(RecordBatch::try_new(
                self.schema.clone(),
                vec![
                    Arc::new(Int64Array::from(ids.values().to_vec())),
                    Arc::new(StringArray::from(names)),
                ],
            )?)
        }
    }

    /// At scale: 120 K keys through a cache of 50 K. The cache never holds more than its bound,
    /// keys come back from it without a query while held, the oldest go first, and every answer
    /// is the table's row for its key.
    #[test]
    fn a_bounded_cache_at_scale_evicts_the_oldest_keys() {
        let (mut c, _, _) = setup(CacheOptions {
            enabled: true,
            max_keys: Some(50_000),
            expire_after_write: None,
            expire_after_access: None,
            cache_missing: true,
        });
        let asked = Arc::new(Mutex::new(0u64));
        c.inner = Box::new(Every {
            asked: asked.clone(),
            schema: c.schema.clone(),
        });
        let range = |from: i64, to: i64| keys(&(from..to).map(Some).collect::<Vec<_>>());
        let check = |out: &RecordBatch, from: i64, to: i64| {
            let mut got = names(out);
            let mut want: Vec<String> = (from..to).map(|i| format!("n{i}")).collect();
            got.sort();
            want.sort();
            assert_eq!(got, want);
        };
        let out = c.lookup(&range(0, 50_000)).unwrap();
        check(&out, 0, 50_000);
        assert_eq!((*asked.lock().unwrap(), c.cached_keys()), (50_000, 50_000));
        // All held: no query.
        let out = c.lookup(&range(0, 50_000)).unwrap();
        check(&out, 0, 50_000);
        assert_eq!(*asked.lock().unwrap(), 50_000);
        assert_eq!(c.stats.hits, 50_000);
        // 70 K new keys push out the oldest; the cache stays at its bound.
        for from in (50_000..120_000).step_by(10_000) {
            let out = c.lookup(&range(from, from + 10_000)).unwrap();
            check(&out, from, from + 10_000);
            assert!(c.cached_keys() <= 50_000, "{}", c.cached_keys());
        }
        assert_eq!(*asked.lock().unwrap(), 120_000);
        // The newest 50 K are held, the rest asked again.
        let out = c.lookup(&range(60_000, 120_000)).unwrap();
        check(&out, 60_000, 120_000);
        assert_eq!(*asked.lock().unwrap(), 120_000 + 10_000);
        assert!(c.cached_keys() <= 50_000);
    }

    #[test]
    fn missing_keys_are_cached_when_asked() {
        let (mut c, asked, _) = setup(CacheOptions {
            enabled: true,
            max_keys: Some(100),
            expire_after_write: None,
            expire_after_access: None,
            cache_missing: true,
        });
        c.lookup(&keys(&[Some(3), Some(5)])).unwrap();
        let out = c.lookup(&keys(&[Some(3), Some(5)])).unwrap();
        assert_eq!(out.num_rows(), 0);
        assert_eq!(asked.lock().unwrap().len(), 1);
    }
}
