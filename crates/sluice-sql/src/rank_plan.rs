//! Window functions in streaming queries:
//! - Top-N and deduplication: `ROW_NUMBER() OVER (PARTITION BY ... ORDER BY ...)` in a subquery,
//!   filtered by `rn <= N` (or `rn < N`, `rn = 1`) above it, as Flink writes them;
//! - OVER aggregates ordered by event time, over a ROWS or RANGE frame ending at the current row.

use datafusion_common::{DFSchema, ScalarValue};
use datafusion_expr::expr::{AggregateFunction, WindowFunctionDefinition};
use datafusion_expr::logical_plan::Filter;
use datafusion_expr::logical_plan::Window;
use datafusion_expr::utils::{conjunction, split_conjunction};
use datafusion_expr::{
    BinaryExpr, Expr, LogicalPlan, Operator, WindowFrameBound, WindowFrameUnits,
};
use sluice_common::{Error, Result};

use crate::join_plan::window_columns;
use crate::plan::*;
use crate::planner::{agg_call, arrow_schema, physical_expr, Catalog};
use crate::tvf::interval_literal_millis;

fn strip(e: &Expr) -> &Expr {
    match e {
        Expr::Cast(c) => strip(&c.expr),
        Expr::TryCast(c) => strip(&c.expr),
        Expr::Alias(a) => strip(&a.expr),
        other => other,
    }
}

fn column_index(e: &Expr, schema: &DFSchema) -> Option<usize> {
    match strip(e) {
        Expr::Column(c) => schema.index_of_column(c).ok(),
        _ => None,
    }
}

fn literal(e: &Expr) -> Option<i64> {
    match strip(e) {
        Expr::Literal(v, _) => v
            .cast_to(&arrow::datatypes::DataType::Int64)
            .ok()
            .and_then(|v| match v {
                ScalarValue::Int64(Some(n)) => Some(n),
                _ => None,
            }),
        _ => None,
    }
}

/// The row limit a conjunct puts on the rank column (at `rank` in `schema`), if it is one.
fn rank_limit(c: &Expr, schema: &DFSchema, rank: usize) -> Option<i64> {
    let Expr::BinaryExpr(BinaryExpr { left, op, right }) = c else {
        return None;
    };
    let (op, n) = if column_index(left, schema) == Some(rank) {
        (*op, literal(right)?)
    } else if column_index(right, schema) == Some(rank) {
        (op.swap()?, literal(left)?)
    } else {
        return None;
    };
    match op {
        Operator::LtEq => Some(n),
        Operator::Lt => Some(n - 1),
        Operator::Eq if n == 1 => Some(1),
        _ => None,
    }
}

/// The input column holding the rows' event time (the scanned table's watermarked column), if it
/// is still there.
pub(crate) fn rowtime_column(node: &StreamNode) -> Option<usize> {
    let find = |exprs: &[PhysExpr], index: usize| {
        exprs.iter().position(|x| {
            x.downcast_ref::<datafusion_physical_expr::expressions::Column>()
                .is_some_and(|c| c.index() == index)
        })
    };
    match node {
        StreamNode::Scan {
            table, projection, ..
        } => {
            let (time, _) = table.watermark.as_ref()?;
            match projection {
                None => Some(*time),
                Some(p) => p.iter().position(|i| i == time),
            }
        }
        StreamNode::Project { input, exprs, .. } => find(exprs, rowtime_column(input)?),
        StreamNode::Filter { input, .. }
        | StreamNode::WindowAssign { input, .. }
        | StreamNode::LookupJoin { input, .. }
        | StreamNode::TemporalJoin { left: input, .. } => rowtime_column(input),
        _ => None,
    }
}

/// Plans `Filter(rn <= N) -> [Projection | alias]* -> Window(ROW_NUMBER)` as a Top-N; `None` when
/// the filter is not of that shape.
pub(crate) fn plan_rank(cat: &Catalog, f: &Filter) -> Result<Option<StreamNode>> {
    // Between the filter and the window: projections and aliases, which keep the rank column.
    let mut chain: Vec<&LogicalPlan> = vec![];
    let mut node = f.input.as_ref();
    let w = loop {
        match node {
            LogicalPlan::Projection(p) => {
                chain.push(node);
                node = &p.input;
            }
            LogicalPlan::SubqueryAlias(a) => {
                chain.push(node);
                node = &a.input;
            }
            LogicalPlan::Window(w) => break w,
            _ => return Ok(None),
        }
    };
    let [expr] = w.window_expr.as_slice() else {
        return Ok(None);
    };
    let Expr::WindowFunction(wf) = strip(expr) else {
        return Ok(None);
    };
    if wf.fun.name() != "row_number" {
        return Ok(None);
    }
    // Where the rank column is in the filter's input: follow it up through the projections.
    let mut rank = w.input.schema().fields().len();
    for plan in chain.iter().rev() {
        if let LogicalPlan::Projection(p) = plan {
            let input = p.input.schema();
            match p
                .expr
                .iter()
                .position(|e| column_index(e, input) == Some(rank))
            {
                Some(i) => rank = i,
                None => return Ok(None),
            }
        }
    }
    let schema = f.input.schema();
    let mut limit = None;
    let mut rest = vec![];
    for c in split_conjunction(&f.predicate) {
        match rank_limit(c, schema, rank) {
            Some(n) => limit = Some(limit.map_or(n, |l: i64| l.min(n))),
            None => rest.push(c.clone()),
        }
    }
    let Some(limit) = limit else {
        return Err(Error::plan(
            "ROW_NUMBER() needs a filter that bounds it, such as WHERE rn <= 10 (Top-N) or rn = 1 \
             (deduplication): an unbounded ranking would rewrite every row on each change",
        ));
    };
    if limit < 1 {
        return Err(Error::plan(format!(
            "a Top-N filter must keep at least one row per partition (got rn <= {limit})"
        )));
    }
    let input_schema = w.input.schema();
    let input = cat.to_stream(&w.input)?;
    let partition = wf
        .params
        .partition_by
        .iter()
        .map(|e| physical_expr(e, input_schema))
        .collect::<Result<Vec<_>>>()?;
    let order = wf
        .params
        .order_by
        .iter()
        .map(|s| {
            Ok(SortKey {
                expr: physical_expr(&s.expr, input_schema)?,
                asc: s.asc,
                nulls_first: s.nulls_first,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    if order.is_empty() {
        return Err(Error::plan(
            "ROW_NUMBER() for Top-N or deduplication needs an ORDER BY in its OVER clause",
        ));
    }
    let mode = if !input.is_append_only() {
        RankMode::Updating
    } else {
        let partition_cols: Vec<Option<usize>> = wf
            .params
            .partition_by
            .iter()
            .map(|e| column_index(e, input_schema))
            .collect();
        let window = window_columns(&input).filter(|(s, e)| {
            partition_cols.contains(&Some(*s)) && partition_cols.contains(&Some(*e))
        });
        let first_by_time = match (limit, wf.params.order_by.as_slice()) {
            (1, [s]) if s.asc => {
                column_index(&s.expr, input_schema).filter(|c| rowtime_column(&input) == Some(*c))
            }
            _ => None,
        };
        match (window, first_by_time) {
            (Some((_, end)), _) => RankMode::Window { end },
            (None, Some(time)) => RankMode::FirstByTime { time },
            _ => RankMode::Updating,
        }
    };
    let mut node = StreamNode::Rank {
        input: Box::new(input),
        partition,
        order,
        limit: limit as usize,
        mode,
        schema: arrow_schema(&w.schema),
    };
    for plan in chain.iter().rev() {
        if let LogicalPlan::Projection(p) = plan {
            let exprs = p
                .expr
                .iter()
                .map(|e| physical_expr(e, p.input.schema()))
                .collect::<Result<_>>()?;
            node = StreamNode::Project {
                input: Box::new(node),
                exprs,
                schema: arrow_schema(&p.schema),
            };
        }
    }
    if let Some(rest) = conjunction(rest) {
        node = StreamNode::Filter {
            input: Box::new(node),
            predicate: physical_expr(&rest, schema)?,
        };
    }
    Ok(Some(node))
}

const OVER_SHAPE: &str = "OVER aggregates must ORDER BY the input's event-time column (the one with \
    a WATERMARK) ascending, with a frame ending at the current row: ROWS BETWEEN n PRECEDING AND \
    CURRENT ROW, or RANGE BETWEEN INTERVAL '...' PRECEDING AND CURRENT ROW (or UNBOUNDED PRECEDING)";

/// Plans OVER aggregates (`SUM(x) OVER (PARTITION BY k ORDER BY rowtime ROWS ...)`).
pub(crate) fn plan_over(cat: &Catalog, w: &Window) -> Result<StreamNode> {
    let input_schema = w.input.schema();
    let input = cat.to_stream(&w.input)?;
    let mut shared = None;
    let mut aggs = vec![];
    for (i, e) in w.window_expr.iter().enumerate() {
        let Expr::WindowFunction(wf) = strip(e) else {
            return Err(Error::plan(format!("unsupported window expression {e}")));
        };
        let udaf = match &wf.fun {
            WindowFunctionDefinition::AggregateUDF(f) => f.clone(),
            WindowFunctionDefinition::WindowUDF(f) if f.name() == "row_number" => {
                return Err(Error::plan(
                    "ROW_NUMBER() is supported for Top-N and deduplication: select from a subquery \
                     that computes it and filter with rn <= N (or rn = 1)",
                ))
            }
            WindowFunctionDefinition::WindowUDF(f) => {
                return Err(Error::plan(format!(
                    "window function {} is not supported in streaming queries",
                    f.name().to_uppercase()
                )))
            }
        };
        let p = &wf.params;
        let this = (&p.partition_by, &p.order_by, &p.window_frame);
        match shared {
            None => shared = Some(this),
            Some(s) if s == this => {}
            Some(_) => return Err(Error::plan(
                "all OVER aggregates of a SELECT must share one window (PARTITION BY, ORDER BY \
                     and frame), as in Flink",
            )),
        }
        let output_type = w
            .schema
            .field(input_schema.fields().len() + i)
            .data_type()
            .clone();
        let call = Expr::AggregateFunction(AggregateFunction::new_udf(
            udaf,
            p.args.clone(),
            p.distinct,
            p.filter.clone(),
            vec![],
            None,
        ));
        aggs.push(agg_call(call, input_schema, output_type)?);
    }
    let Some((partition_by, order_by, frame)) = shared else {
        return Err(Error::plan("a window without functions"));
    };
    let updating = !input.is_append_only();
    let order = if updating {
        OverOrder::Updating(
            order_by
                .iter()
                .map(|s| {
                    Ok(SortKey {
                        expr: physical_expr(&s.expr, input_schema)?,
                        asc: s.asc,
                        nulls_first: s.nulls_first,
                    })
                })
                .collect::<Result<Vec<_>>>()?,
        )
    } else {
        match order_by.as_slice() {
            [s] if s.asc => OverOrder::EventTime(
                column_index(&s.expr, input_schema)
                    .filter(|c| rowtime_column(&input) == Some(*c))
                    .ok_or_else(|| Error::plan(OVER_SHAPE))?,
            ),
            _ => return Err(Error::plan(OVER_SHAPE)),
        }
    };
    if frame.end_bound != WindowFrameBound::CurrentRow {
        return Err(Error::plan(OVER_SHAPE));
    }
    let WindowFrameBound::Preceding(start) = &frame.start_bound else {
        return Err(Error::plan(OVER_SHAPE));
    };
    let frame = match frame.units {
        WindowFrameUnits::Rows if start.is_null() => OverFrame::Rows(None),
        WindowFrameUnits::Rows => OverFrame::Rows(Some(
            literal(&Expr::Literal(start.clone(), None))
                .filter(|n| *n >= 0)
                .ok_or_else(|| Error::plan(OVER_SHAPE))? as u64,
        )),
        WindowFrameUnits::Range if start.is_null() => OverFrame::Range(None),
        WindowFrameUnits::Range => OverFrame::Range(Some(
            interval_literal_millis(&Expr::Literal(start.clone(), None))
                .map_err(|m| Error::plan(format!("OVER ... RANGE: {m}")))?,
        )),
        WindowFrameUnits::Groups => return Err(Error::plan(OVER_SHAPE)),
    };
    let partition = partition_by
        .iter()
        .map(|e| physical_expr(e, input_schema))
        .collect::<Result<Vec<_>>>()?;
    if updating && matches!(frame, OverFrame::Range(Some(_))) {
        return Err(Error::plan(
            "an OVER aggregate over an updating input takes a ROWS frame (or RANGE UNBOUNDED \
             PRECEDING); RANGE with an interval is not supported there yet",
        ));
    }
    Ok(StreamNode::Over {
        input: Box::new(input),
        partition,
        order,
        aggs,
        frame,
        schema: arrow_schema(&w.schema),
    })
}

/// Whether column `index` of `node` is a processing-time attribute: computed by `PROCTIME()`
/// (in a table's DDL or a projection) and passed on unchanged.
pub(crate) fn is_proctime(node: &StreamNode, index: usize) -> bool {
    let proctime = |e: &PhysExpr| {
        e.downcast_ref::<datafusion_physical_expr::ScalarFunctionExpr>()
            .is_some_and(|f| f.name() == "proctime")
    };
    let column = |e: &PhysExpr| {
        e.downcast_ref::<datafusion_physical_expr::expressions::Column>()
            .map(|c| c.index())
    };
    match node {
        StreamNode::Project { input, exprs, .. } => exprs
            .get(index)
            .is_some_and(|e| proctime(e) || column(e).is_some_and(|c| is_proctime(input, c))),
        StreamNode::Filter { input, .. } => is_proctime(input, index),
        StreamNode::WindowAssign { input, .. } | StreamNode::LookupJoin { input, .. } => {
            index < input.schema().fields().len() && is_proctime(input, index)
        }
        StreamNode::Scan {
            table, projection, ..
        } => {
            let at = projection
                .as_ref()
                .map_or(Some(index), |p| p.get(index).copied());
            let physical = table.physical_schema.fields().len();
            at.and_then(|i| i.checked_sub(physical))
                .and_then(|c| table.computed.get(c))
                .is_some_and(proctime)
        }
        _ => false,
    }
}

/// Whether the window assignment below an aggregation (through projections and filters) is over
/// a processing-time attribute.
pub(crate) fn windows_on_proctime(node: &StreamNode) -> bool {
    match node {
        StreamNode::WindowAssign { input, time, .. } => time
            .downcast_ref::<datafusion_physical_expr::expressions::Column>()
            .is_some_and(|c| is_proctime(input, c.index())),
        StreamNode::Project { input, .. } | StreamNode::Filter { input, .. } => {
            windows_on_proctime(input)
        }
        _ => false,
    }
}
