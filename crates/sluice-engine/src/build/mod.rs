//! Builds one worker's dataflow from a [`JobPlan`]: one arm per plan node, each made into
//! its operator.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice_common::{ChangeBatch, Error, Result};
use sluice_connectors::{open_source, ConnectorSpec};
use sluice_sql::{JobPlan, StreamNode, TableDef};
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::operators::{Concatenate, Inspect};
use timely::dataflow::ProbeHandle;

use crate::operator::aggregate::AggregateState;
use crate::operator::source::{source_stream, table_prepare, ValuesReader};
use crate::operator::stateless::{assign_windows, filter, map_batches, project};
use crate::runtime::metrics::JobMetrics;
use crate::runtime::watermark::WatermarkTracker;
use crate::runtime::{
    exchange_by_key, tag_watermarks, DataflowScope, Epoch, Event, EventBuilder, EventStream,
};

mod window;

use crate::job::{idle_timeout, read_columns, DEFAULT_BATCH_ROWS};

use crate::operator::aggregate::operator::AggregateOperator;
use crate::operator::driver::stateful;
use crate::operator::join::JoinOperator;
use window::*;

pub(crate) fn spec(table: &TableDef) -> ConnectorSpec {
    ConnectorSpec {
        table: table.name.clone(),
        schema: table.physical_schema.clone(),
        options: table.options.clone(),
        partitioned_by: table.partitioned_by.clone(),
        read_columns: None,
        decode_ahead: false,
        whole_files: false,
        sink_instance: 0,
        metadata: table.metadata.clone(),
        primary_key: table.primary_key_columns(),
    }
}

/// The connector spec of `table` as a sink: the columns an INSERT writes (not `VIRTUAL`
/// metadata ones) and the metadata columns among them.
pub(crate) fn sink_spec(table: &TableDef) -> ConnectorSpec {
    let schema = table.sink_schema();
    ConnectorSpec {
        primary_key: table
            .primary_key
            .iter()
            .filter_map(|k| schema.index_of(k).ok())
            .collect(),
        metadata: table.sink_metadata(),
        schema,
        ..spec(table)
    }
}

/// What every operator of one worker needs to know.
#[derive(Clone)]
pub(crate) struct BuildContext {
    pub index: usize,
    pub peers: usize,
    pub metrics: Arc<JobMetrics>,
    pub probe: ProbeHandle<Epoch>,
    /// Rows per source batch.
    pub batch_rows: usize,
    /// Checkpointing, when enabled.
    pub checkpoint: Option<std::rc::Rc<crate::checkpoint::CheckpointContext>>,
    /// Errors end the job here; a cancel stops the sources.
    pub control: Arc<crate::runtime::control::JobControl>,
    /// `'table.exec.state.ttl'`: how long regular joins keep rows that are not written.
    pub state_ttl: Option<Duration>,
    /// Processing time per epoch (`'sluice.epoch-length'`).
    pub epoch_length: Duration,
    /// Sources run one after another ([`JobOptions::sequential_sources`]).
    pub sequence: Option<std::rc::Rc<crate::operator::source::SourceSequence>>,
    /// File sources read and parse on a thread of their own (the process's workers leave a
    /// core spare), as Flink's split fetchers do.
    pub fetch_threads: bool,
    /// The workers of this process (global indexes).
    pub local_workers: std::ops::Range<usize>,
    /// `EXPLAIN ANALYZE`: count the rows every node produces.
    pub count_rows: bool,
    /// The plan nodes being built, innermost last (with `count_rows`): a stateful operator
    /// made now belongs to the last one.
    pub building: std::cell::RefCell<Vec<u64>>,
    /// Stateful operators made so far, by kind ([`BuildContext::operator_name`]).
    pub named: std::cell::RefCell<std::collections::HashMap<&'static str, usize>>,
}

impl BuildContext {
    /// The name of a new stateful operator of `kind`: the kind itself for the first one, then
    /// `Kind #2`, `Kind #3` in build order (the same on every worker), so that two operators'
    /// state, watermarks, late rows and busy time are never counted as one. The name is
    /// recorded with the plan node being built, for the console's dataflow graph.
    pub fn operator_name(&self, kind: &'static str) -> String {
        let mut named = self.named.borrow_mut();
        let n = named.entry(kind).or_default();
        *n += 1;
        let name = if *n == 1 {
            kind.to_string()
        } else {
            format!("{kind} #{n}")
        };
        if let Some(node) = self.building.borrow().last() {
            self.metrics.name_node(&name, *node);
        }
        name
    }

    /// Routes rows by key to the workers owning them ([`crate::runtime::exchange_by_key`]),
    /// counting the bytes between this process's workers in flight into operator `into`.
    pub fn exchange<'scope>(
        &self,
        stream: EventStream<'scope>,
        keys: Vec<sluice_sql::PhysExpr>,
        into: &str,
    ) -> EventStream<'scope> {
        exchange_by_key(
            stream,
            keys,
            into,
            &self.metrics,
            self.local_workers.clone(),
        )
    }
}

/// Sub-plans computed once per worker, whatever number of places read them (as Flink's
/// `table.optimizer.reuse-sub-plan-enabled`, on by default): a self-join of a windowed
/// aggregation (Nexmark q5) aggregates once, and scans of one table share one reader.
pub(crate) struct Reuse<'scope> {
    /// Built streams by the sub-plan they compute (equal sub-plans: see
    /// [`sluice_sql::optimize::shared`]).
    built: std::cell::RefCell<std::collections::HashMap<StreamNode, EventStream<'scope>>>,
    /// Tables read more than once with different columns: the columns one shared reader keeps
    /// ([`sluice_sql::optimize::shared::scan_columns`]).
    scans: std::collections::HashMap<String, Option<Vec<usize>>>,
}

impl Reuse<'_> {
    pub fn new(plan: &JobPlan) -> Self {
        let scans =
            sluice_sql::optimize::shared::scan_columns(plan.pipelines.iter().map(|p| &p.query));
        Reuse {
            built: Default::default(),
            scans,
        }
    }
}

/// Builds `node`, or returns the stream already built for an equal sub-plan. Sub-plans that call
/// a volatile function are built each time.
pub(crate) fn build<'scope>(
    scope: DataflowScope<'scope>,
    node: &StreamNode,
    ctx: &BuildContext,
    reuse: &Reuse<'scope>,
) -> EventStream<'scope> {
    let shareable = sluice_sql::optimize::shared::shareable(node);
    if shareable {
        if let Some(s) = reuse.built.borrow().get(node).cloned() {
            return s;
        }
    }
    if ctx.count_rows {
        ctx.building
            .borrow_mut()
            .push(sluice_sql::plan::node_id(node));
    }
    let mut stream = build_node(scope, node, ctx, reuse);
    if ctx.count_rows {
        ctx.building.borrow_mut().pop();
        let counter = ctx.metrics.node_counter(sluice_sql::plan::node_id(node));
        stream = stream.inspect_core(move |event| {
            if let Ok((_, Event::Data(d))) = event {
                counter.fetch_add(d.batch.num_rows() as u64, Ordering::Relaxed);
            }
        });
    }
    if shareable {
        reuse
            .built
            .borrow_mut()
            .insert(node.clone(), stream.clone());
    }
    stream
}

pub(crate) fn build_node<'scope>(
    scope: DataflowScope<'scope>,
    node: &StreamNode,
    ctx: &BuildContext,
    reuse: &Reuse<'scope>,
) -> EventStream<'scope> {
    match node {
        // A table that other scans read with other columns: one reader keeps all of them.
        StreamNode::Scan {
            table,
            projection,
            schema,
            carry_source_row: false,
        } if reuse
            .scans
            .get(&table.name)
            .is_some_and(|shared| shared != projection) =>
        {
            let shared = reuse.scans[&table.name].clone();
            let wide = StreamNode::Scan {
                table: table.clone(),
                schema: match &shared {
                    None => table.schema.clone(),
                    Some(p) => Arc::new(table.schema.project(p).expect("columns of the table")),
                },
                projection: shared.clone(),
                carry_source_row: false,
            };
            let all: Vec<usize> = (0..table.schema.fields().len()).collect();
            let shared = shared.unwrap_or(all.clone());
            let positions: Vec<usize> = projection
                .as_ref()
                .unwrap_or(&all)
                .iter()
                .map(|c| {
                    shared
                        .binary_search(c)
                        .expect("the shared scan keeps every column")
                })
                .collect();
            let schema = schema.clone();
            map_batches(
                build(scope, &wide, ctx, reuse),
                "ScanColumns",
                ctx.control.clone(),
                move |b| {
                    let columns = positions
                        .iter()
                        .map(|&i| b.data.column(i).clone())
                        .collect();
                    Ok(Some(b.with_columns(schema.clone(), columns)?))
                },
            )
        }
        StreamNode::Scan {
            table,
            projection,
            schema,
            carry_source_row,
        } => {
            // An upsert table's rows are whole only after ChangelogNormalize: the source emits
            // every column (nullable: a delete holds only its key), and the normalizer projects.
            let upsert = table.changelog_mode() == sluice_sql::ChangelogMode::Upsert;
            let (read, read_schema) = if upsert {
                (None, sluice_common::changelog::all_nullable(&table.schema))
            } else {
                (projection.clone(), schema.clone())
            };
            let stream = source_stream(
                scope,
                &table.name,
                open_source(
                    &ConnectorSpec {
                        read_columns: read_columns(table, &read, *carry_source_row),
                        // With a watermark, a file is read in order by one worker (as in Flink,
                        // where a file is one split), so that the worker count cannot change
                        // which rows are late; its next piece is parsed on another thread
                        // meanwhile.
                        decode_ahead: ctx.fetch_threads || table.watermark.is_some(),
                        whole_files: table.watermark.is_some(),
                        ..spec(table)
                    },
                    ctx.index,
                    ctx.peers,
                )
                .map(|r| {
                    // Files are read and parsed on a fetcher thread when a core is spare (and
                    // the next piece of a file on another, see `decode_ahead`).
                    if ctx.fetch_threads && table.connector() == "filesystem" {
                        Box::new(sluice_connectors::prefetch::Prefetched::new(r, &table.name))
                    } else {
                        r
                    }
                }),
                table_prepare(
                    table.clone(),
                    read.clone(),
                    read_schema.clone(),
                    *carry_source_row,
                ),
                idle_timeout(table).unwrap_or(None),
                ctx,
            );
            if !upsert {
                return stream;
            }
            let key: Vec<sluice_sql::PhysExpr> = table
                .primary_key_columns()
                .into_iter()
                .map(|i| {
                    Arc::new(datafusion_physical_expr::expressions::Column::new(
                        table.schema.field(i).name(),
                        i,
                    )) as sluice_sql::PhysExpr
                })
                .collect();
            let state = crate::operator::normalize::NormalizeState::try_new(
                &table.name,
                key.clone(),
                read_schema,
                projection.clone(),
                schema.clone(),
            );
            let stream = ctx.exchange(stream, key, "ChangelogNormalize");
            stateful(vec![stream], state, ctx)
        }
        StreamNode::Values { rows } => source_stream(
            scope,
            "VALUES",
            Ok(Box::new(ValuesReader::new(rows.0.clone(), ctx.index))),
            Box::new(|b| Ok((ChangeBatch::inserts(b), None))),
            None,
            ctx,
        ),
        StreamNode::Project {
            input,
            exprs,
            schema,
        } => {
            // The filter-project-fusion rule: the calls both make are computed once.
            match sluice_sql::optimize::fusion::fuse(node) {
                Ok(Some(fusion)) => {
                    let StreamNode::Filter { input: below, .. } = input.as_ref() else {
                        unreachable!("a fusion is of a projection over a filter")
                    };
                    let fused =
                        crate::operator::stateless::FilterProject::new(fusion, schema.clone());
                    return map_batches(
                        build(scope, below, ctx, reuse),
                        "FilterProject",
                        ctx.control.clone(),
                        move |b| fused.apply(b).map(Some),
                    );
                }
                Ok(None) => {}
                Err(e) => ctx.control.fail(e),
            }
            let (exprs, schema) = (exprs.clone(), schema.clone());
            map_batches(
                build(scope, input, ctx, reuse),
                "Project",
                ctx.control.clone(),
                move |b| project(b, &exprs, &schema).map(Some),
            )
        }
        StreamNode::Filter { input, predicate } => {
            let predicate = predicate.clone();
            map_batches(
                build(scope, input, ctx, reuse),
                "Filter",
                ctx.control.clone(),
                move |b| filter(b, &predicate).map(Some),
            )
        }
        StreamNode::WindowAssign {
            input,
            time,
            kind,
            schema,
        } => {
            let (time, kind, schema) = (time.clone(), *kind, schema.clone());
            let metrics = ctx.metrics.clone();
            map_batches(
                build(scope, input, ctx, reuse),
                "WindowAssign",
                ctx.control.clone(),
                move |b| {
                    assign_windows(b, &time, kind, &schema, &metrics.null_time_rows_dropped)
                        .map(Some)
                },
            )
        }
        StreamNode::Union { inputs, .. } => {
            let n = inputs.len();
            let streams: Vec<EventStream<'scope>> = inputs
                .iter()
                .enumerate()
                .map(|(i, input)| {
                    tag_watermarks(build(scope, input, ctx, reuse), i as u32, ctx.peers as u32)
                })
                .collect();
            let merged = scope.concatenate(streams);
            merge_watermarks(merged, n, ctx)
        }
        StreamNode::Aggregate {
            input,
            group,
            aggs,
            window,
            emit,
            late_sink,
            schema,
        } => {
            let input_schema = input.schema();
            let below_window = keys_below_window(input, group, window);
            let slices = below_window.as_ref().and_then(|(chain, _, _)| {
                hop_slices(chain, group, window, aggs, emit, late_sink.is_some())
            });
            let stream = match &below_window {
                Some((chain, keys, _)) => build_window_chain(
                    scope,
                    chain,
                    keys.clone(),
                    slices.map(|(_, slide)| slide),
                    ctx,
                    reuse,
                ),
                None => ctx.exchange(build(scope, input, ctx, reuse), group.clone(), "Aggregate"),
            };
            let state = AggregateState::try_new(
                group.clone(),
                aggs.clone(),
                window.clone(),
                *emit,
                late_sink.as_ref().map(|l| l.column),
                schema.clone(),
                &input_schema,
            )
            .map(|mut s| {
                if input.is_append_only() {
                    s.assume_append_only_input();
                }
                if let Some((_, _, positions)) = below_window {
                    s.partition_by(positions);
                }
                s
            })
            .and_then(|mut s| {
                if let Some((size, slide)) = slices {
                    s.slice(size, slide, &input_schema)?;
                } else if let Some((time, kind)) = window_copies(input) {
                    s.windows_as_copies(time, kind);
                }
                Ok(s)
            });
            let late = late_sink.as_ref().map(|l| l.table.clone());
            stateful(
                vec![stream],
                AggregateOperator::new(state, *emit, late, ctx),
                ctx,
            )
        }
        StreamNode::Join {
            left,
            right,
            kind,
            left_keys,
            right_keys,
            filter,
            bound,
            schema,
        } => {
            let state = crate::operator::join::JoinState::try_new(
                *kind,
                left_keys.clone(),
                right_keys.clone(),
                filter.clone(),
                *bound,
                [left.schema(), right.schema()],
                schema.clone(),
                ctx.state_ttl,
            )
            .map(|s| s.with_append_only([left.is_append_only(), right.is_append_only()]));
            let l = ctx.exchange(build(scope, left, ctx, reuse), left_keys.clone(), "Join");
            let r = ctx.exchange(build(scope, right, ctx, reuse), right_keys.clone(), "Join");
            let delay = bound.map_or(0, |b| b.output_delay);
            let proctime = bound.is_some_and(|b| b.processing_time);
            let op = state.map(|s| JoinOperator::new(s, delay, proctime));
            stateful(vec![l, r], op, ctx)
        }
        StreamNode::Rank {
            input,
            partition,
            order,
            limit,
            mode,
            schema,
        } => {
            let state = crate::operator::rank::RankState::try_new(
                partition.clone(),
                order.clone(),
                *limit,
                *mode,
                &input.schema(),
                schema.clone(),
                input.is_append_only(),
            );
            let stream = ctx.exchange(build(scope, input, ctx, reuse), partition.clone(), "Rank");
            stateful(vec![stream], state, ctx)
        }
        StreamNode::TemporalJoin {
            left,
            right,
            kind,
            left_keys,
            right_keys,
            left_time,
            right_time,
            filter,
            schema,
        } => {
            let state = crate::operator::temporal::TemporalState::try_new(
                *kind,
                left_keys.clone(),
                right_keys.clone(),
                [*left_time, *right_time],
                filter.clone(),
                [left.schema(), right.schema()],
                schema.clone(),
            );
            let l = ctx.exchange(
                build(scope, left, ctx, reuse),
                left_keys.clone(),
                "TemporalJoin",
            );
            let r = ctx.exchange(
                build(scope, right, ctx, reuse),
                right_keys.clone(),
                "TemporalJoin",
            );
            stateful(vec![l, r], state, ctx)
        }
        StreamNode::LookupJoin {
            input,
            dim,
            kind,
            left_keys,
            right_keys,
            filter,
            reload_ms,
            schema,
        } => {
            let (kind, dim, input_schema) = (*kind, (**dim).clone(), input.schema());
            let dim_node = dim.clone();
            // A table its connector can query by key: each batch asks for its keys (behind
            // the table's cache) instead of the whole table being loaded.
            let keyed = keyed_lookup(&dim_node, right_keys).unwrap_or_else(|e| {
                ctx.control.fail(e);
                None
            });
            if let Some(mut lookup) = keyed {
                let StreamNode::Scan {
                    table,
                    projection,
                    schema: scan_schema,
                    ..
                } = &dim_node
                else {
                    unreachable!("keyed_lookup takes scans only")
                };
                let mut prepare = table_prepare(
                    table.clone(),
                    projection.clone(),
                    scan_schema.clone(),
                    false,
                );
                let key_schema = lookup.key_schema();
                let (lk, rk, filter, schema) = (
                    left_keys.clone(),
                    right_keys.clone(),
                    filter.clone(),
                    schema.clone(),
                );
                let (dim_schema, input_schema) = (dim_node.schema(), input.schema());
                return map_batches(
                    build(scope, input, ctx, reuse),
                    "LookupJoin",
                    ctx.control.clone(),
                    move |b| {
                        let keys = lookup_keys(&lk, &b.data, &key_schema)?;
                        let rows = lookup.lookup(&keys)?;
                        let (dim_rows, _) = prepare(rows)?;
                        let mut state = crate::operator::join::JoinState::try_new(
                            kind,
                            lk.clone(),
                            rk.clone(),
                            filter.clone(),
                            None,
                            [input_schema.clone(), dim_schema.clone()],
                            schema.clone(),
                            None,
                        )?
                        .for_lookup();
                        state.apply(1, &dim_rows)?;
                        Ok(state.apply(0, b)?.changes)
                    },
                );
            }
            let (lk, rk, filter, schema) = (
                left_keys.clone(),
                right_keys.clone(),
                filter.clone(),
                schema.clone(),
            );
            let load = move || -> Result<crate::operator::join::JoinState> {
                let mut state = crate::operator::join::JoinState::try_new(
                    kind,
                    lk.clone(),
                    rk.clone(),
                    filter.clone(),
                    None,
                    [input_schema.clone(), dim.schema()],
                    schema.clone(),
                    None,
                )?
                .for_lookup();
                for b in load_table(&dim)? {
                    state.apply(1, &b)?;
                }
                Ok(state)
            };
            let reload = reload_ms.map(|ms| Duration::from_millis(ms as u64));
            let mut state = None;
            let mut loaded = Instant::now();
            map_batches(
                build(scope, input, ctx, reuse),
                "LookupJoin",
                ctx.control.clone(),
                move |b| {
                    if state.is_none() || reload.is_some_and(|r| loaded.elapsed() >= r) {
                        state = Some(load()?);
                        loaded = Instant::now();
                    }
                    Ok(state.as_mut().expect("loaded").apply(0, b)?.changes)
                },
            )
        }
        StreamNode::Over {
            input,
            partition,
            order,
            aggs,
            frame,
            schema,
        } => {
            let stream = ctx.exchange(build(scope, input, ctx, reuse), partition.clone(), "Over");
            match order {
                sluice_sql::OverOrder::EventTime(time) => {
                    let state = crate::operator::over::OverState::try_new(
                        partition.clone(),
                        *time,
                        aggs.clone(),
                        *frame,
                        input.schema(),
                        schema.clone(),
                    );
                    stateful(vec![stream], state, ctx)
                }
                sluice_sql::OverOrder::Updating(keys) => {
                    let state = crate::operator::over::UpdatingOverState::try_new(
                        partition.clone(),
                        keys.clone(),
                        aggs.clone(),
                        *frame,
                        input.schema(),
                        schema.clone(),
                    );
                    stateful(vec![stream], state, ctx)
                }
            }
        }
    }
}

/// Reads a lookup join's table whole, as it is now.
/// A lookup join's table opened for lookups by key, when its connector can (`jdbc`) and every
/// right key is one of its columns.
fn keyed_lookup(
    dim: &StreamNode,
    right_keys: &[sluice_sql::PhysExpr],
) -> Result<Option<sluice_connectors::lookup::CachedLookup>> {
    let StreamNode::Scan { table, schema, .. } = dim else {
        return Ok(None);
    };
    let spec = spec(table);
    let mut columns = vec![];
    for k in right_keys {
        // A key the planner cast to the other side's type (`o.user_id = c.id` with INT and
        // BIGINT) is still the column: the left values are cast to the column's type.
        let mut expr: &dyn datafusion_physical_expr::PhysicalExpr = k.as_ref();
        if let Some(cast) = expr.downcast_ref::<datafusion_physical_expr::expressions::CastExpr>() {
            expr = cast.expr().as_ref();
        }
        let column = expr
            .downcast_ref::<datafusion_physical_expr::expressions::Column>()
            .and_then(|c| spec.schema.index_of(schema.field(c.index()).name()).ok());
        match column {
            Some(c) => columns.push(c),
            None if table.connector() == "jdbc" => {
                return Err(Error::plan(format!(
                    "a lookup join on table '{}' (connector 'jdbc') needs equality conditions on its columns, \
                     not on expressions over them",
                    table.name
                )))
            }
            None => return Ok(None),
        }
    }
    sluice_connectors::lookup::open_lookup(&spec, columns)
}

/// A batch's lookup keys: the left key expressions, cast to the looked-up columns' types.
fn lookup_keys(
    left_keys: &[sluice_sql::PhysExpr],
    batch: &arrow::record_batch::RecordBatch,
    key_schema: &arrow::datatypes::SchemaRef,
) -> Result<arrow::record_batch::RecordBatch> {
    let columns = left_keys
        .iter()
        .zip(key_schema.fields())
        .map(|(k, f)| {
            let v = k
                .evaluate(batch)
                .and_then(|v| v.into_array(batch.num_rows()))
                .map_err(|e| Error::Runtime(e.to_string()))?;
            Ok(arrow::compute::cast(&v, f.data_type())?)
        })
        .collect::<Result<Vec<_>>>()?;
    let nullable: Vec<arrow::datatypes::Field> = key_schema
        .fields()
        .iter()
        .map(|f| f.as_ref().clone().with_nullable(true))
        .collect();
    Ok(arrow::record_batch::RecordBatch::try_new(
        std::sync::Arc::new(arrow::datatypes::Schema::new(nullable)),
        columns,
    )?)
}

pub(crate) fn load_table(node: &StreamNode) -> Result<Vec<ChangeBatch>> {
    let StreamNode::Scan {
        table,
        projection,
        schema,
        ..
    } = node
    else {
        return Err(Error::Runtime(
            "internal: a lookup join reads a table scan".into(),
        ));
    };
    let mut reader = open_source(&spec(table), 0, 1)?;
    let mut prepare = table_prepare(table.clone(), projection.clone(), schema.clone(), false);
    let mut out = vec![];
    loop {
        match reader.poll(DEFAULT_BATCH_ROWS)? {
            sluice_connectors::Poll::Batch { batch, .. } => out.push(prepare(batch)?.0),
            sluice_connectors::Poll::SplitDone { .. } => {}
            sluice_connectors::Poll::Idle | sluice_connectors::Poll::Finished => return Ok(out),
        }
    }
}

/// Emits the minimum watermark over a union's inputs.
pub(crate) fn merge_watermarks<'scope>(
    stream: EventStream<'scope>,
    inputs: usize,
    ctx: &BuildContext,
) -> EventStream<'scope> {
    let (index, peers) = (ctx.index, ctx.peers);
    stream.unary::<EventBuilder, _, _, _>(Pipeline, "UnionWatermark", move |_cap, _info| {
        let mut tracker = WatermarkTracker::new(inputs);
        move |input, output| {
            input.for_each(|cap, data| match data {
                // A source's word for another worker (`SourceReader::silent_workers`): that
                // worker's own union reports it; here only this worker's inputs count.
                Event::Watermark { from, .. } if *from as usize % peers != index => {}
                Event::Watermark { from, ts, idle, .. } => {
                    if let Some((wm, idle)) = tracker.receive(*from, *ts, *idle).forward {
                        let mut event = Event::progress(index, wm, idle, peers);
                        output.session(&cap).give_container(&mut event);
                    }
                }
                _ => output.session(&cap).give_container(data),
            });
        }
    })
}
