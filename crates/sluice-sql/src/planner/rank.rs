//! Top-N and deduplication: `ROW_NUMBER() OVER (PARTITION BY ... ORDER BY ...)` in a subquery,
//! filtered by `rn <= N` (or `rn < N`, `rn = 1`) above it, as Flink writes them.

use datafusion_common::DFSchema;
use datafusion_expr::logical_plan::Filter;
use datafusion_expr::utils::{conjunction, split_conjunction};
use datafusion_expr::{BinaryExpr, Expr, LogicalPlan, Operator};
use sluice_common::{Error, Result};

use crate::plan::properties::{rowtime_column, window_columns};
use crate::plan::*;
use crate::planner::expr::{column_index, literal, strip};
use crate::planner::{arrow_schema, physical_expr, Catalog};

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
