//! The streaming plan: what the engine runs. Each node says how its rows change (append-only or
//! updating) so that sinks can be checked when the plan is built, not when the job runs.

pub mod explain;
pub mod properties;

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::datatypes::{DataType, SchemaRef};
use datafusion_physical_expr::PhysicalExpr;

/// A physical expression evaluated on whole batches.
pub type PhysExpr = Arc<dyn PhysicalExpr>;

/// A table from `CREATE TABLE`: its columns and connector options.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TableDef {
    pub name: String,
    /// Columns stored in the external system, in declaration order.
    pub physical_schema: SchemaRef,
    /// All columns: physical ones, then computed ones in declaration order.
    pub schema: SchemaRef,
    /// Computed columns, evaluated over the physical columns.
    pub computed: Vec<PhysExpr>,
    /// `WATERMARK FOR`: the time column's index in `schema`, and the watermark expression over `schema`.
    pub watermark: Option<(usize, PhysExpr)>,
    pub primary_key: Vec<String>,
    pub partitioned_by: Vec<String>,
    pub options: BTreeMap<String, String>,
    /// Metadata columns (`METADATA FROM 'key'`): their positions in `physical_schema` and keys.
    pub metadata: Vec<(usize, String)>,
    /// `VIRTUAL` metadata columns (positions in `physical_schema`): read, never written.
    pub virtual_columns: Vec<usize>,
}

/// Connectors that read a database's changes (`+I`, `-U`/`+U`, `-D`).
pub const CDC_CONNECTORS: [&str; 2] = ["postgres-cdc", "mysql-cdc"];

/// Formats whose records are changes with full before and after images.
pub const CHANGELOG_FORMATS: [&str; 2] = ["debezium-json", "canal-json"];

/// How the rows a table's source reads change, as Flink's changelog modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangelogMode {
    /// Every record is a new row (`+I`).
    InsertOnly,
    /// Records are changes with full rows (`debezium-json`, `canal-json`): `+I`, `-U`/`+U`, `-D`.
    Retract,
    /// Records are upserts and deletes by primary key (`upsert-kafka`): the scan keeps the last
    /// row of each key to turn them into a changelog (Flink's ChangelogNormalize).
    Upsert,
}

impl TableDef {
    /// How this table's source rows change.
    pub fn changelog_mode(&self) -> ChangelogMode {
        if self.connector() == "upsert-kafka" {
            return ChangelogMode::Upsert;
        }
        // Database changes: whole old rows, or (`'changelog-mode' = 'upsert'`) keys.
        if CDC_CONNECTORS.contains(&self.connector()) {
            return match self.options.get("changelog-mode").map(String::as_str) {
                Some("upsert") => ChangelogMode::Upsert,
                _ => ChangelogMode::Retract,
            };
        }
        let format = self
            .options
            .get("format")
            .or_else(|| self.options.get("value.format"));
        match format {
            Some(f) if CHANGELOG_FORMATS.contains(&f.as_str()) => ChangelogMode::Retract,
            _ => ChangelogMode::InsertOnly,
        }
    }

    /// The columns an INSERT writes: the physical ones but `VIRTUAL` metadata columns (Flink's
    /// persisted columns).
    pub fn sink_schema(&self) -> SchemaRef {
        if self.virtual_columns.is_empty() {
            return self.physical_schema.clone();
        }
        let kept: Vec<usize> = (0..self.physical_schema.fields().len())
            .filter(|c| !self.virtual_columns.contains(c))
            .collect();
        std::sync::Arc::new(
            self.physical_schema
                .project(&kept)
                .expect("columns of the schema"),
        )
    }

    /// The metadata columns an INSERT writes (not `VIRTUAL`): positions in [`Self::sink_schema`]
    /// and keys.
    pub fn sink_metadata(&self) -> Vec<(usize, String)> {
        self.metadata
            .iter()
            .filter(|(c, _)| !self.virtual_columns.contains(c))
            .map(|(c, key)| {
                let before = self.virtual_columns.iter().filter(|v| *v < c).count();
                (c - before, key.clone())
            })
            .collect()
    }

    /// The primary key's positions among the physical columns.
    pub fn primary_key_columns(&self) -> Vec<usize> {
        self.primary_key
            .iter()
            .filter_map(|k| self.physical_schema.index_of(k).ok())
            .collect()
    }

    /// The `connector` option.
    pub fn connector(&self) -> &str {
        self.options
            .get("connector")
            .map(String::as_str)
            .unwrap_or("")
    }
}

/// How a window operator assigns rows to windows (all sizes in milliseconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WindowKind {
    Tumble {
        size: i64,
        offset: i64,
    },
    Hop {
        size: i64,
        slide: i64,
    },
    Cumulate {
        step: i64,
        size: i64,
    },
    /// The SESSION window TVF: each row gets its own session `[ts, ts + gap)`; the aggregation
    /// above merges overlapping ones per key.
    Session {
        gap: i64,
    },
}

/// An aggregate function.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AggFunc {
    Count,
    Sum,
    Avg,
    Min,
    Max,
}

/// One aggregate call, e.g. `COUNT(DISTINCT user_id) FILTER (WHERE amount > 10)`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AggCall {
    pub func: AggFunc,
    /// `None` for `COUNT(*)`.
    pub arg: Option<PhysExpr>,
    pub distinct: bool,
    pub filter: Option<PhysExpr>,
    pub output_type: DataType,
}

/// How an aggregation relates to event-time windows.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum AggWindow {
    /// Unwindowed: an updating result.
    None,
    /// Rows already carry their window (window TVF or a window-assign step): the group keys at
    /// `start_key` and `end_key` are the bounds. Windows fire when the watermark passes the end.
    /// With `as_struct`, the two keys are output as one struct column (legacy `GROUP BY TUMBLE`).
    Assigned {
        start_key: usize,
        end_key: usize,
        as_struct: bool,
    },
    /// Session windows, merged per key as rows arrive (in any order within the watermark).
    Session {
        gap: i64,
        time: PhysExpr,
        output: SessionOutput,
    },
}

/// Where a session window's bounds go in the output row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SessionOutput {
    /// `GROUP BY SESSION(ts, gap)`: one struct column at this position.
    Struct(usize),
    /// The SESSION TVF: `window_start` and `window_end` columns at these positions.
    Columns { start: usize, end: usize },
}

/// When windowed results are emitted (Flink's `table.exec.emit.*` options).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct EmitPolicy {
    /// Emit partial results this often (processing time, milliseconds) before the window closes.
    pub early_fire_ms: Option<u64>,
    /// Keep fired windows this long (event time, milliseconds): later rows update them.
    pub allowed_lateness_ms: i64,
    /// Windows over a processing-time attribute (`PROCTIME()`): they close by the wall clock,
    /// not by the watermark.
    pub processing_time: bool,
}

impl EmitPolicy {
    /// Whether a windowed aggregation under this policy emits updates rather than only inserts.
    pub fn is_updating(&self) -> bool {
        self.early_fire_ms.is_some() || self.allowed_lateness_ms > 0
    }
}

/// The column that carries source rows to a window for `'late-data.sink'`.
pub const SOURCE_ROW: &str = "__source_row";

/// Rows a window drops as late go to `table`; they are the struct column `column` of its input.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LateSink {
    pub column: usize,
    pub table: Arc<TableDef>,
}

/// Which rows of a join survive without a match (padded with NULLs on the other side).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JoinKind {
    Inner,
    Left,
    Right,
    Full,
}

impl JoinKind {
    /// Whether unmatched rows of input `side` (0 = left, 1 = right) are kept, padded.
    pub fn keeps_unmatched(self, side: usize) -> bool {
        matches!(
            (self, side),
            (JoinKind::Left | JoinKind::Full, 0) | (JoinKind::Right | JoinKind::Full, 1)
        )
    }
}

/// How long a row of one join input can still find partners, for joins whose state is bounded by
/// event time (interval and window joins): the row expires once the *other* input's watermark is
/// past `column + offset` (milliseconds). Both inputs are append-only, and so is the output: rows
/// of a kept side that never matched are emitted padded when they expire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ExpireBy {
    /// A timestamp column of this input.
    pub column: usize,
    pub offset: i64,
}

/// The event-time bound of an interval or window join.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct JoinBound {
    /// `[left, right]`.
    pub expire: [ExpireBy; 2],
    /// How far output rows may lag the inputs' watermark; the output watermark is held back by it.
    pub output_delay: i64,
    /// A window join (else an interval join), for messages and fingerprints.
    pub window: bool,
    /// An interval join on processing-time attributes: rows expire by the wall clock.
    pub processing_time: bool,
}

/// One `ORDER BY` key of a ranking.
#[derive(Debug, Clone, Eq)]
pub struct SortKey {
    pub expr: PhysExpr,
    pub asc: bool,
    pub nulls_first: bool,
}

// By hand: a derived `PartialEq` does not compile for the `Arc<dyn PhysicalExpr>` field here.
impl PartialEq for SortKey {
    fn eq(&self, other: &Self) -> bool {
        self.expr.as_ref() == other.expr.as_ref()
            && (self.asc, self.nulls_first) == (other.asc, other.nulls_first)
    }
}

impl std::hash::Hash for SortKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.expr.as_ref().hash(state);
        (self.asc, self.nulls_first).hash(state);
    }
}

/// How a Top-N emits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RankMode {
    /// Ranks change as rows arrive (and retract): changed positions emit `-U`/`+U` (or `-D`, `+I`).
    Updating,
    /// The partition includes a window: each window's Top-N is emitted once, when the watermark
    /// passes the window end (this input column). Append-only.
    Window { end: usize },
    /// `ROW_NUMBER() OVER (PARTITION BY k ORDER BY rowtime) = 1`: the first row by event time of each
    /// key, emitted once the watermark passes its time (this input column). Append-only.
    FirstByTime { time: usize },
}

/// The frame of an OVER aggregate, ending at the current row. `None`: unbounded preceding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OverFrame {
    /// `ROWS BETWEEN n PRECEDING AND CURRENT ROW`.
    Rows(Option<u64>),
    /// `RANGE BETWEEN INTERVAL ... PRECEDING AND CURRENT ROW` (milliseconds; peers included).
    Range(Option<i64>),
}

/// How an OVER aggregate orders its rows.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum OverOrder {
    /// By this event-time column of an append-only input: rows are emitted once the watermark
    /// passes them (append-only output).
    EventTime(usize),
    /// By these keys, over an updating input: every change re-emits the rows whose frame it
    /// touches (updating output).
    Updating(Vec<SortKey>),
}

/// The rows of a `VALUES` clause. Equal when their rows are; the hash covers the schema and the
/// row count.
#[derive(Debug, Clone, PartialEq)]
pub struct ValuesRows(pub arrow::record_batch::RecordBatch);

impl Eq for ValuesRows {}

impl std::hash::Hash for ValuesRows {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.schema().hash(state);
        self.0.num_rows().hash(state);
    }
}

impl std::ops::Deref for ValuesRows {
    type Target = arrow::record_batch::RecordBatch;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

/// A node of the streaming plan. Equal nodes compute the same rows: equality and hashing cover
/// the whole sub-plan (operators, expressions, schemas, tables), which is how shared sub-plans
/// are found ([`crate::optimize::shared`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum StreamNode {
    /// Reads a table; computes computed columns and the watermark; then keeps `projection`.
    /// With `carry_source_row`, the whole physical row also travels along as a last struct column
    /// ([`SOURCE_ROW`]), so that a window can send the rows it drops as late to a side table.
    Scan {
        table: Arc<TableDef>,
        projection: Option<Vec<usize>>,
        schema: SchemaRef,
        carry_source_row: bool,
    },
    /// The rows of a `VALUES` clause: a bounded source.
    Values { rows: ValuesRows },
    /// Evaluates expressions per row.
    Project {
        input: Box<StreamNode>,
        exprs: Vec<PhysExpr>,
        schema: SchemaRef,
    },
    /// Keeps rows for which the predicate is true.
    Filter {
        input: Box<StreamNode>,
        predicate: PhysExpr,
    },
    /// `UNION ALL`.
    Union {
        inputs: Vec<StreamNode>,
        schema: SchemaRef,
    },
    /// Appends `window_start`, `window_end`, `window_time`; HOP and CUMULATE copy a row into each
    /// of its windows.
    WindowAssign {
        input: Box<StreamNode>,
        time: PhysExpr,
        kind: WindowKind,
        schema: SchemaRef,
    },
    /// Grouped aggregation, windowed or updating.
    Aggregate {
        input: Box<StreamNode>,
        group: Vec<PhysExpr>,
        aggs: Vec<AggCall>,
        window: AggWindow,
        emit: EmitPolicy,
        /// `'late-data.sink'`: where rows the window drops as late go instead.
        late_sink: Option<LateSink>,
        schema: SchemaRef,
    },
    /// An equi-join (plus an optional non-equi condition) of two streams, partitioned by the
    /// key. Without a `bound` it is a regular join: both inputs are kept in state (retractions
    /// retract joined rows; padded rows of outer joins are retracted when a match arrives).
    Join {
        left: Box<StreamNode>,
        right: Box<StreamNode>,
        kind: JoinKind,
        /// Key expressions over each input; pairwise of the same type.
        left_keys: Vec<PhysExpr>,
        right_keys: Vec<PhysExpr>,
        /// Over the left columns followed by the right columns.
        filter: Option<PhysExpr>,
        bound: Option<JoinBound>,
        schema: SchemaRef,
    },
    /// A lookup join (`JOIN dim FOR SYSTEM_TIME AS OF o.proc_time`): every worker loads the
    /// dimension table (`dim`, a scan) and joins each input row with its rows at that moment;
    /// later changes of the table do not revise earlier results. INNER or LEFT.
    LookupJoin {
        input: Box<StreamNode>,
        dim: Box<StreamNode>,
        kind: JoinKind,
        left_keys: Vec<PhysExpr>,
        right_keys: Vec<PhysExpr>,
        filter: Option<PhysExpr>,
        /// `'lookup.join.cache.ttl'`: reload the table this often (milliseconds).
        reload_ms: Option<i64>,
        schema: SchemaRef,
    },
    /// An event-time temporal join (`JOIN versioned FOR SYSTEM_TIME AS OF o.rowtime`): each left
    /// row joins the version of the right row with its key that was valid at the left row's
    /// time (the newest one not newer), emitted once both watermarks pass that time. INNER or
    /// LEFT; append-only.
    TemporalJoin {
        left: Box<StreamNode>,
        right: Box<StreamNode>,
        kind: JoinKind,
        left_keys: Vec<PhysExpr>,
        right_keys: Vec<PhysExpr>,
        /// The event-time columns of each input.
        left_time: usize,
        right_time: usize,
        filter: Option<PhysExpr>,
        schema: SchemaRef,
    },
    /// OVER aggregates ordered by event time: each row, once the watermark passes it, with the
    /// aggregates over its frame appended. Append-only.
    Over {
        input: Box<StreamNode>,
        partition: Vec<PhysExpr>,
        order: OverOrder,
        aggs: Vec<AggCall>,
        frame: OverFrame,
        schema: SchemaRef,
    },
    /// Top-N per partition (`ROW_NUMBER() OVER (...)` filtered to `<= N`): the input's columns
    /// followed by the row number.
    Rank {
        input: Box<StreamNode>,
        partition: Vec<PhysExpr>,
        order: Vec<SortKey>,
        limit: usize,
        mode: RankMode,
        schema: SchemaRef,
    },
}

impl StreamNode {
    /// The output schema.
    pub fn schema(&self) -> SchemaRef {
        match self {
            StreamNode::Scan { schema, .. }
            | StreamNode::Project { schema, .. }
            | StreamNode::Union { schema, .. }
            | StreamNode::WindowAssign { schema, .. }
            | StreamNode::Aggregate { schema, .. }
            | StreamNode::Join { schema, .. }
            | StreamNode::Rank { schema, .. }
            | StreamNode::Over { schema, .. }
            | StreamNode::LookupJoin { schema, .. }
            | StreamNode::TemporalJoin { schema, .. } => schema.clone(),
            StreamNode::Filter { input, .. } => input.schema(),
            StreamNode::Values { rows } => rows.schema(),
        }
    }

    /// True when the node only ever emits inserts.
    pub fn is_append_only(&self) -> bool {
        match self {
            StreamNode::Scan { table, .. } => table.changelog_mode() == ChangelogMode::InsertOnly,
            StreamNode::Values { .. } => true,
            StreamNode::Project { input, .. }
            | StreamNode::Filter { input, .. }
            | StreamNode::WindowAssign { input, .. } => input.is_append_only(),
            StreamNode::Union { inputs, .. } => inputs.iter().all(|i| i.is_append_only()),
            StreamNode::Aggregate { window, emit, .. } => match window {
                AggWindow::None => false,
                _ => !emit.is_updating(),
            },
            StreamNode::Join {
                left,
                right,
                kind,
                bound,
                ..
            } => {
                left.is_append_only()
                    && right.is_append_only()
                    && (bound.is_some() || *kind == JoinKind::Inner)
            }
            StreamNode::Rank { mode, .. } => *mode != RankMode::Updating,
            StreamNode::Over { order, .. } => matches!(order, OverOrder::EventTime(_)),
            StreamNode::LookupJoin { input, .. } => input.is_append_only(),
            StreamNode::TemporalJoin { .. } => true,
        }
    }

    /// The nodes this node reads.
    pub fn inputs(&self) -> Vec<&StreamNode> {
        match self {
            StreamNode::Scan { .. } | StreamNode::Values { .. } => vec![],
            StreamNode::Project { input, .. }
            | StreamNode::Filter { input, .. }
            | StreamNode::WindowAssign { input, .. }
            | StreamNode::Aggregate { input, .. }
            | StreamNode::Rank { input, .. }
            | StreamNode::Over { input, .. } => vec![input],
            StreamNode::Union { inputs, .. } => inputs.iter().collect(),
            StreamNode::Join { left, right, .. }
            | StreamNode::TemporalJoin { left, right, .. }
            | StreamNode::LookupJoin {
                input: left,
                dim: right,
                ..
            } => vec![left, right],
        }
    }

    /// The expressions this node itself evaluates (not its inputs'); a scan's are its table's
    /// computed columns and watermark.
    pub fn expressions(&self) -> Vec<&PhysExpr> {
        fn calls(aggs: &[AggCall]) -> impl Iterator<Item = &PhysExpr> {
            aggs.iter()
                .flat_map(|a| a.arg.iter().chain(a.filter.iter()))
        }
        match self {
            StreamNode::Scan { table, .. } => table
                .computed
                .iter()
                .chain(table.watermark.iter().map(|(_, e)| e))
                .collect(),
            StreamNode::Values { .. } | StreamNode::Union { .. } => vec![],
            StreamNode::Project { exprs, .. } => exprs.iter().collect(),
            StreamNode::Filter { predicate, .. } => vec![predicate],
            StreamNode::WindowAssign { time, .. } => vec![time],
            StreamNode::Aggregate {
                group,
                aggs,
                window,
                ..
            } => {
                let mut out: Vec<&PhysExpr> = group.iter().chain(calls(aggs)).collect();
                if let AggWindow::Session { time, .. } = window {
                    out.push(time);
                }
                out
            }
            StreamNode::Join {
                left_keys,
                right_keys,
                filter,
                ..
            }
            | StreamNode::TemporalJoin {
                left_keys,
                right_keys,
                filter,
                ..
            }
            | StreamNode::LookupJoin {
                left_keys,
                right_keys,
                filter,
                ..
            } => left_keys
                .iter()
                .chain(right_keys)
                .chain(filter.iter())
                .collect(),
            StreamNode::Rank {
                partition, order, ..
            } => partition
                .iter()
                .chain(order.iter().map(|k| &k.expr))
                .collect(),
            StreamNode::Over {
                partition,
                order,
                aggs,
                ..
            } => {
                let mut out: Vec<&PhysExpr> = partition.iter().chain(calls(aggs)).collect();
                if let OverOrder::Updating(keys) = order {
                    out.extend(keys.iter().map(|k| &k.expr));
                }
                out
            }
        }
    }

    /// True when the node or one below it calls a volatile function (`RAND()`, `UUID()`): two
    /// copies of such a plan give different rows, so they must not be computed once and shared.
    pub fn calls_volatile(&self) -> bool {
        fn volatile(e: &PhysExpr) -> bool {
            let here = e
                .downcast_ref::<datafusion_physical_expr::ScalarFunctionExpr>()
                .is_some_and(|f| {
                    f.fun().signature().volatility == datafusion_expr::Volatility::Volatile
                });
            here || e.children().into_iter().any(volatile)
        }
        self.expressions().into_iter().any(volatile)
            || self.inputs().into_iter().any(StreamNode::calls_volatile)
    }

    /// The tables this node reads.
    pub fn scanned_tables(&self, out: &mut Vec<String>) {
        match self {
            StreamNode::Scan { table, .. } => out.push(table.name.clone()),
            StreamNode::Values { .. } => {}
            StreamNode::Project { input, .. }
            | StreamNode::Filter { input, .. }
            | StreamNode::WindowAssign { input, .. }
            | StreamNode::Aggregate { input, .. }
            | StreamNode::Rank { input, .. }
            | StreamNode::Over { input, .. } => input.scanned_tables(out),
            StreamNode::Union { inputs, .. } => inputs.iter().for_each(|i| i.scanned_tables(out)),
            StreamNode::Join { left, right, .. }
            | StreamNode::TemporalJoin { left, right, .. }
            | StreamNode::LookupJoin {
                input: left,
                dim: right,
                ..
            } => {
                left.scanned_tables(out);
                right.scanned_tables(out);
            }
        }
    }
}

/// Where a query's changelog goes.
#[derive(Debug, Clone)]
pub enum SinkTarget {
    /// `INSERT INTO table`.
    Table(Arc<TableDef>),
    /// A plain `SELECT`: the changelog goes to the caller (printed by the CLI).
    Select { index: usize },
}

/// One query of a job and its destination.
#[derive(Debug, Clone)]
pub struct Pipeline {
    pub query: StreamNode,
    pub sink: SinkTarget,
    /// The line of the statement, for messages.
    pub line: u64,
    /// `EXPLAIN ANALYZE`: after the run, the plan is printed with the rows each node produced;
    /// a SELECT's own rows are not printed.
    pub analyze: bool,
}

/// A node's identity for run-time counters: equal sub-plans (which run as one operator) have
/// the same one.
pub fn node_id(node: &StreamNode) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    node.hash(&mut h);
    h.finish()
}

/// Everything a script asks to run, as one job.
#[derive(Debug, Clone, Default)]
pub struct JobPlan {
    pub pipelines: Vec<Pipeline>,
    /// The pipelines of `EXPLAIN` statements: their plans are printed, and they do not run.
    pub explained: Vec<Pipeline>,
    /// `SET` options.
    pub settings: BTreeMap<String, String>,
    /// Warnings for the user (Flink options Sluice accepts but does not act on).
    pub warnings: Vec<String>,
}

impl JobPlan {
    /// Sends the n-th SELECT's changelog to the n-th `(name, folder)`: a `view` sink, which the
    /// platform server folds into a materialized view.
    pub fn selects_into_views(&mut self, views: &[(String, String)]) -> Result<(), String> {
        for p in &mut self.pipelines {
            let SinkTarget::Select { index } = p.sink else {
                continue;
            };
            let (name, dir) = views
                .get(index)
                .ok_or_else(|| format!("SELECT number {} has no view to write to", index + 1))?;
            let schema = p.query.schema();
            p.sink = SinkTarget::Table(Arc::new(TableDef {
                name: name.clone(),
                physical_schema: schema.clone(),
                schema,
                computed: vec![],
                watermark: None,
                primary_key: vec![],
                partitioned_by: vec![],
                options: BTreeMap::from([
                    ("connector".to_string(), "view".to_string()),
                    ("path".to_string(), dir.clone()),
                ]),
                metadata: vec![],
                virtual_columns: vec![],
            }));
        }
        Ok(())
    }
}
