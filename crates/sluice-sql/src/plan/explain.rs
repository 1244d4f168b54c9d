//! `EXPLAIN`: a job's streaming plan as text, before it runs (or, for `EXPLAIN ANALYZE`, after
//! it ran, with the rows each node produced). Each node shows what it computes,
//! the changelog it emits (`[I]` append-only, `[I,UB,UA,D]` updating), how its input is
//! partitioned between workers, the state it keeps, and the physical decisions that apply to it
//! (the rules of [`crate::optimize`], which the builder follows). The planner's golden tests are
//! this text.

use std::collections::HashMap;
use std::fmt::Write as _;

use super::*;
use crate::optimize::windows::{hop_slices, keys_below_window};

/// The text of `EXPLAIN` for every pipeline of `plan`.
pub fn explain(plan: &JobPlan) -> String {
    explain_pipelines(&plan.pipelines)
}

/// The text of `EXPLAIN` for `pipelines` (sub-plans shared between them are marked).
pub fn explain_pipelines(pipelines: &[Pipeline]) -> String {
    explain_with_rows(pipelines, None)
}

/// The text of `EXPLAIN ANALYZE` for `pipelines` after a run: each node also shows the rows it
/// produced on all workers (`rows` by [`node_id`]).
pub fn explain_analyzed(pipelines: &[Pipeline], rows: &HashMap<u64, u64>) -> String {
    explain_with_rows(pipelines, Some(rows))
}

fn explain_with_rows(pipelines: &[Pipeline], rows: Option<&HashMap<u64, u64>>) -> String {
    let uses = crate::optimize::shared::reads(pipelines.iter().map(|p| &p.query));
    let scans = crate::optimize::shared::scan_columns(pipelines.iter().map(|p| &p.query));
    let mut e = Explainer {
        out: String::new(),
        uses,
        scans,
        written: Default::default(),
        fired: Default::default(),
        rows,
    };
    for (i, p) in pipelines.iter().enumerate() {
        let sink = match &p.sink {
            SinkTarget::Table(t) => {
                format!("INSERT INTO {} ('connector' = '{}')", t.name, t.connector())
            }
            SinkTarget::Select { index } if p.analyze => {
                format!(
                    "SELECT #{} (its changelog is counted, not printed)",
                    index + 1
                )
            }
            SinkTarget::Select { index } => {
                format!("SELECT #{} (its changelog is printed)", index + 1)
            }
        };
        let _ = writeln!(e.out, "== Pipeline {} (line {}): {sink} ==", i + 1, p.line);
        let _ = writeln!(e.out, "Sink  changelog={}", changelog(&p.query));
        e.node(&p.query, "", true);
        e.out.push('\n');
    }
    let fired: Vec<String> = e
        .fired
        .iter()
        .map(|(rule, n)| format!("{rule} ×{n}"))
        .collect();
    let _ = writeln!(
        e.out,
        "Rules applied: {}",
        if fired.is_empty() {
            "none".to_string()
        } else {
            fired.join(", ")
        }
    );
    e.out
}

/// A node of a job's dataflow graph, as the console draws it.
#[derive(Debug, Clone, PartialEq)]
pub struct GraphNode {
    /// The plan node's [`node_id`] (operators' figures are recorded by it).
    pub id: u64,
    /// What it is: the start of its `EXPLAIN` line (`GroupAggregate`, `Scan orders (...)`).
    pub label: String,
    /// The rest of that line and its detail lines.
    pub details: Vec<String>,
    /// Its inputs' ids.
    pub inputs: Vec<u64>,
    /// How its input is partitioned between workers, where it says (`hash[category@1]`).
    pub partitioning: Option<String>,
    /// Rows it produced (after a run), on all workers.
    pub rows: Option<u64>,
}

/// Where a pipeline of the graph writes.
#[derive(Debug, Clone, PartialEq)]
pub struct GraphSink {
    /// The node whose rows it writes.
    pub node: u64,
    pub label: String,
}

/// The dataflow graph of `pipelines`: each distinct node once (a sub-plan that several read
/// is one node with several readers), inputs first; and each pipeline's sink.
pub fn graph(pipelines: &[Pipeline], rows: &HashMap<u64, u64>) -> (Vec<GraphNode>, Vec<GraphSink>) {
    let mut e = Explainer {
        out: String::new(),
        uses: crate::optimize::shared::reads(pipelines.iter().map(|p| &p.query)),
        scans: crate::optimize::shared::scan_columns(pipelines.iter().map(|p| &p.query)),
        written: Default::default(),
        fired: Default::default(),
        rows: Some(rows),
    };
    fn walk(
        e: &mut Explainer<'_>,
        node: &StreamNode,
        rows: &HashMap<u64, u64>,
        out: &mut Vec<GraphNode>,
    ) {
        let id = node_id(node);
        if out.iter().any(|n| n.id == id) {
            return;
        }
        let inputs = node.inputs();
        for i in &inputs {
            walk(e, i, rows, out);
        }
        let (head, mut details) = e.describe(node);
        let mut parts = head.splitn(2, "  ");
        let label = parts.next().unwrap_or_default().trim().to_string();
        if let Some(rest) = parts.next().map(str::trim).filter(|r| !r.is_empty()) {
            details.insert(0, rest.to_string());
        }
        let partitioning = details
            .iter()
            .find_map(|d| d.strip_prefix("partitioning: "))
            .map(str::to_string);
        out.push(GraphNode {
            id,
            label,
            details,
            inputs: inputs.iter().map(|i| node_id(i)).collect(),
            partitioning,
            rows: rows.get(&id).copied(),
        });
    }
    let mut nodes = vec![];
    let mut sinks = vec![];
    for p in pipelines {
        walk(&mut e, &p.query, rows, &mut nodes);
        let label = match &p.sink {
            SinkTarget::Table(t) => {
                format!("INSERT INTO {} ('connector' = '{}')", t.name, t.connector())
            }
            SinkTarget::Select { index } => format!("SELECT #{}", index + 1),
        };
        sinks.push(GraphSink {
            node: node_id(&p.query),
            label,
        });
    }
    (nodes, sinks)
}

/// The changes a node emits: `[I]` (append-only) or `[I,UB,UA,D]` (updating).
fn changelog(node: &StreamNode) -> &'static str {
    if node.is_append_only() {
        "[I]"
    } else {
        "[I,UB,UA,D]"
    }
}

fn list(exprs: &[PhysExpr]) -> String {
    exprs
        .iter()
        .map(|e| e.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

fn hash(keys: &[PhysExpr]) -> String {
    if keys.is_empty() {
        "single worker (no key)".to_string()
    } else {
        format!("hash[{}]", list(keys))
    }
}

fn duration(ms: i64) -> String {
    match ms {
        ms if ms % 3_600_000 == 0 && ms != 0 => format!("{} h", ms / 3_600_000),
        ms if ms % 60_000 == 0 && ms != 0 => format!("{} min", ms / 60_000),
        ms if ms % 1_000 == 0 && ms != 0 => format!("{} s", ms / 1_000),
        ms => format!("{ms} ms"),
    }
}

fn window(kind: &WindowKind) -> String {
    match kind {
        WindowKind::Tumble { size, offset: 0 } => format!("TUMBLE({})", duration(*size)),
        WindowKind::Tumble { size, offset } => {
            format!("TUMBLE({}, offset {})", duration(*size), duration(*offset))
        }
        WindowKind::Hop { size, slide } => {
            format!("HOP(size {}, slide {})", duration(*size), duration(*slide))
        }
        WindowKind::Cumulate { step, size } => {
            format!(
                "CUMULATE(step {}, size {})",
                duration(*step),
                duration(*size)
            )
        }
        WindowKind::Session { gap } => format!("SESSION(gap {})", duration(*gap)),
    }
}

fn aggs(calls: &[AggCall]) -> String {
    calls
        .iter()
        .map(|a| {
            let arg = a.arg.as_ref().map_or("*".to_string(), |e| e.to_string());
            let distinct = if a.distinct { "DISTINCT " } else { "" };
            let filter = a
                .filter
                .as_ref()
                .map(|f| format!(" FILTER (WHERE {f})"))
                .unwrap_or_default();
            let func = format!("{:?}", a.func).to_uppercase();
            format!("{func}({distinct}{arg}){filter}")
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn join_kind(kind: &JoinKind) -> &'static str {
    match kind {
        JoinKind::Inner => "inner",
        JoinKind::Left => "left",
        JoinKind::Right => "right",
        JoinKind::Full => "full",
    }
}

fn pairs(left: &[PhysExpr], right: &[PhysExpr]) -> String {
    left.iter()
        .zip(right)
        .map(|(l, r)| format!("{l} = {r}"))
        .collect::<Vec<_>>()
        .join(", ")
}

struct Explainer<'a> {
    out: String,
    /// How many places read each shareable sub-plan.
    uses: HashMap<&'a StreamNode, usize>,
    /// Tables whose scans share one reader, and the columns it keeps.
    scans: HashMap<String, Option<Vec<usize>>>,
    /// Shared sub-plans already written out.
    written: std::collections::HashSet<&'a StreamNode>,
    fired: std::collections::BTreeMap<&'static str, usize>,
    /// After a run (`EXPLAIN ANALYZE`): rows produced per node.
    rows: Option<&'a HashMap<u64, u64>>,
}

impl<'a> Explainer<'a> {
    fn fire(&mut self, rule: &'static str) {
        *self.fired.entry(rule).or_default() += 1;
    }

    /// Writes `node` and its inputs; `prefix` is the indentation of its details.
    fn node(&mut self, node: &'a StreamNode, prefix: &str, last: bool) {
        let branch = if last { "└─ " } else { "├─ " };
        if self.written.contains(node) {
            let _ = writeln!(
                self.out,
                "{prefix}{branch}(the shared sub-plan above)  changelog={}",
                changelog(node)
            );
            return;
        }
        let (head, details) = self.describe(node);
        let rows = match self.rows {
            None => String::new(),
            Some(rows) => match rows.get(&node_id(node)) {
                Some(n) => format!("  rows={n}"),
                // Not an operator of its own (a filter fused into the projection above).
                None => "  rows=(in the node above)".to_string(),
            },
        };
        let _ = writeln!(
            self.out,
            "{prefix}{branch}{head}  changelog={}{rows}",
            changelog(node)
        );
        let child = format!("{prefix}{}", if last { "   " } else { "│  " });
        let inputs = node.inputs();
        let bar = if inputs.is_empty() { "   " } else { "│  " };
        let shared = self.uses.get(node).is_some_and(|n| *n > 1);
        for d in details {
            let _ = writeln!(self.out, "{child}{bar}{d}");
        }
        if shared {
            let n = self.uses[node];
            let _ = writeln!(
                self.out,
                "{child}{bar}rule shared-sub-plan: computed once per worker, read {n} times"
            );
            self.fire("shared-sub-plan");
            self.written.insert(node);
            // Its inputs belong to the shared part: count them once.
            for i in &inputs {
                forget(i, &mut self.uses);
            }
        }
        for (k, i) in inputs.iter().enumerate() {
            self.node(i, &child, k + 1 == inputs.len());
        }
    }

    /// A node's head line and its detail lines.
    fn describe(&mut self, node: &StreamNode) -> (String, Vec<String>) {
        let mut d = vec![];
        let head = match node {
            StreamNode::Scan {
                table,
                projection,
                carry_source_row,
                ..
            } => {
                if let Some(shared) = self.scans.get(&table.name).filter(|_| !carry_source_row) {
                    let kept = match shared {
                        Some(p) => p
                            .iter()
                            .map(|i| table.schema.field(*i).name().clone())
                            .collect::<Vec<_>>()
                            .join(", "),
                        None => "all".to_string(),
                    };
                    d.push(format!(
                        "rule shared-scan: one reader of {} per worker keeps columns [{kept}] for every scan of it; this scan keeps its own",
                        table.name
                    ));
                    self.fire("shared-scan");
                }
                if let Some((time, wm)) = &table.watermark {
                    d.push(format!(
                        "watermark: {} by {wm}",
                        table.schema.field(*time).name()
                    ));
                }
                d.push("state: source offsets (in checkpoints)".to_string());
                match table.changelog_mode() {
                    ChangelogMode::InsertOnly => {}
                    ChangelogMode::Retract => d.push(
                        "changelog: the records are changes with whole rows (+I, -U/+U, -D)"
                            .to_string(),
                    ),
                    ChangelogMode::Upsert => {
                        d.push(format!(
                            "changelog: upserts and deletes by primary key [{}]; ChangelogNormalize, hashed by the key, keeps each key's last row to emit +I, -U/+U, -D",
                            table.primary_key.join(", ")
                        ));
                        d.push("state: the last row of each key (in checkpoints)".to_string());
                    }
                }
                let columns = match projection {
                    Some(p) => p
                        .iter()
                        .map(|i| table.schema.field(*i).name().clone())
                        .collect::<Vec<_>>(),
                    None => table
                        .schema
                        .fields()
                        .iter()
                        .map(|f| f.name().clone())
                        .collect(),
                };
                format!(
                    "Scan {} ('connector' = '{}')  columns=[{}]",
                    table.name,
                    table.connector(),
                    columns.join(", ")
                )
            }
            StreamNode::Values { rows, .. } => format!("Values  rows={}", rows.num_rows()),
            StreamNode::Project { exprs, .. } => {
                if let Ok(Some(fusion)) = crate::optimize::fusion::fuse(node) {
                    d.push(format!(
                        "rule filter-project-fusion: the filter and this projection run as one step; once per row: [{}]",
                        list(&fusion.shared)
                    ));
                    self.fire("filter-project-fusion");
                }
                format!("Project  [{}]", list(exprs))
            }
            StreamNode::Filter { predicate, .. } => format!("Filter  {predicate}"),
            StreamNode::Union { inputs, .. } => format!("Union  inputs={}", inputs.len()),
            StreamNode::WindowAssign { time, kind, .. } => {
                format!("WindowAssign  {} on {time}", window(kind))
            }
            StreamNode::Aggregate {
                input,
                group,
                aggs: calls,
                window: w,
                emit,
                late_sink,
                ..
            } => {
                let below = keys_below_window(input, group, w);
                match &below {
                    Some((_, keys, _)) => {
                        d.push(format!(
                            "partitioning: {} below the window assignment",
                            hash(keys)
                        ));
                        d.push("rule pre-partition: rows are partitioned before their windows are assigned, so window copies stay on one worker".to_string());
                        self.fire("pre-partition");
                    }
                    None => d.push(format!("partitioning: {}", hash(group))),
                }
                if let Some((size, slide)) = below.as_ref().and_then(|(chain, _, _)| {
                    hop_slices(chain, group, w, calls, emit, late_sink.is_some())
                }) {
                    d.push(format!(
                        "rule hop-slicing: panes of {} merged into windows of {}",
                        duration(slide),
                        duration(size)
                    ));
                    self.fire("hop-slicing");
                }
                d.push(match w {
                    AggWindow::None => "state: one accumulator row per group (updating; unbounded unless the keys are)".to_string(),
                    AggWindow::Assigned { .. } => "state: accumulators per group and open window; a window's state goes when it fires".to_string(),
                    AggWindow::Session { gap, .. } => format!("state: open sessions per group (gap {}); a session's state goes when it closes", duration(*gap)),
                });
                if let Some(ms) = emit.early_fire_ms {
                    d.push(format!("emit: early fire every {}", duration(ms as i64)));
                }
                if emit.allowed_lateness_ms > 0 {
                    d.push(format!(
                        "emit: fired windows kept {} for late rows",
                        duration(emit.allowed_lateness_ms)
                    ));
                }
                if emit.processing_time {
                    d.push("emit: windows close by the wall clock (processing time)".to_string());
                }
                if let Some(l) = late_sink {
                    d.push(format!("late rows: written to {}", l.table.name));
                }
                let kind = match w {
                    AggWindow::None => "GroupAggregate",
                    AggWindow::Assigned { .. } => "WindowAggregate",
                    AggWindow::Session { .. } => "SessionWindowAggregate",
                };
                format!("{kind}  group=[{}]  aggs=[{}]", list(group), aggs(calls))
            }
            StreamNode::Join {
                kind,
                left_keys,
                right_keys,
                filter,
                bound,
                ..
            } => {
                d.push(format!(
                    "partitioning: left {}, right {}",
                    hash(left_keys),
                    hash(right_keys)
                ));
                if let Some(f) = filter {
                    d.push(format!("condition: {f}"));
                }
                let what = match bound {
                    None => {
                        d.push("state: both inputs' rows by key (unbounded unless 'table.exec.state.ttl' is set)".to_string());
                        "Join"
                    }
                    Some(b) if b.window => {
                        d.push(
                            "state: rows of open windows; a window's rows go when it closes"
                                .to_string(),
                        );
                        "WindowJoin"
                    }
                    Some(b) => {
                        d.push(format!(
                            "state: rows within the time bound; output held back {}",
                            duration(b.output_delay)
                        ));
                        "IntervalJoin"
                    }
                };
                format!(
                    "{what} {}  on [{}]",
                    join_kind(kind),
                    pairs(left_keys, right_keys)
                )
            }
            StreamNode::LookupJoin {
                kind,
                left_keys,
                right_keys,
                reload_ms,
                ..
            } => {
                d.push(match reload_ms {
                    Some(ms) => format!(
                        "state: the dimension table on every worker, reloaded every {}",
                        duration(*ms)
                    ),
                    None => "state: the dimension table on every worker".to_string(),
                });
                format!(
                    "LookupJoin {}  on [{}]",
                    join_kind(kind),
                    pairs(left_keys, right_keys)
                )
            }
            StreamNode::TemporalJoin {
                kind,
                left_keys,
                right_keys,
                ..
            } => {
                d.push(format!(
                    "partitioning: left {}, right {}",
                    hash(left_keys),
                    hash(right_keys)
                ));
                d.push("state: versions per key of the right input, and left rows until the watermark passes them".to_string());
                format!(
                    "TemporalJoin {}  on [{}]",
                    join_kind(kind),
                    pairs(left_keys, right_keys)
                )
            }
            StreamNode::Over {
                partition,
                order,
                aggs: calls,
                frame,
                ..
            } => {
                d.push(format!("partitioning: {}", hash(partition)));
                let frame = match frame {
                    OverFrame::Rows(Some(n)) => format!("ROWS {n} PRECEDING"),
                    OverFrame::Range(Some(ms)) => format!("RANGE {} PRECEDING", duration(*ms)),
                    OverFrame::Rows(None) | OverFrame::Range(None) => {
                        "UNBOUNDED PRECEDING".to_string()
                    }
                };
                let order = match order {
                    OverOrder::EventTime(c) => format!("event time (column {c})"),
                    OverOrder::Updating(keys) => {
                        list(&keys.iter().map(|k| k.expr.clone()).collect::<Vec<_>>())
                    }
                };
                d.push(
                    "state: the rows in each partition's frame, and rows waiting for the watermark"
                        .to_string(),
                );
                format!("Over  aggs=[{}]  order by {order}  {frame}", aggs(calls))
            }
            StreamNode::Rank {
                partition,
                order,
                limit,
                mode,
                ..
            } => {
                d.push(format!("partitioning: {}", hash(partition)));
                let order = order
                    .iter()
                    .map(|k| format!("{} {}", k.expr, if k.asc { "ASC" } else { "DESC" }))
                    .collect::<Vec<_>>()
                    .join(", ");
                let what = match mode {
                    RankMode::Updating => {
                        d.push(
                            "state: every row of each partition (ranks change as rows come and go)"
                                .to_string(),
                        );
                        "TopN"
                    }
                    RankMode::Window { .. } => {
                        d.push(
                            "state: the top rows of each open window; emitted when it closes"
                                .to_string(),
                        );
                        "WindowTopN"
                    }
                    RankMode::FirstByTime { .. } => {
                        d.push("state: the first row by event time of each key".to_string());
                        "Deduplicate"
                    }
                };
                format!("{what}  limit={limit}  order by [{order}]")
            }
        };
        (head, d)
    }
}

/// Marks a shared sub-plan's inputs as read once (they are part of it).
fn forget(node: &StreamNode, uses: &mut HashMap<&StreamNode, usize>) {
    uses.remove(node);
    for i in node.inputs() {
        forget(i, uses);
    }
}
