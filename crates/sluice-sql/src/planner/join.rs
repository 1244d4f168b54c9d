//! Joins: from DataFusion's logical join to a streaming [`StreamNode::Join`], and which joins can
//! bound their state by event time.
//!
//! - A **window join** joins two windowed inputs on `window_start` and `window_end` (plus keys):
//!   a row can only meet rows of the same window, so it is dropped once the other input's
//!   watermark passes the window's end.
//! - An **interval join** bounds the distance between two time columns on both sides
//!   (`b.ts BETWEEN a.ts - INTERVAL '1' MINUTE AND a.ts + INTERVAL '15' MINUTE`): a row is dropped
//!   once the other input's watermark is past the last time a partner could have.
//!
//! Both need append-only inputs and give append-only output. Any other join is a regular join.

use arrow::datatypes::DataType;
use datafusion_common::{DFSchema, NullEquality};
use std::sync::Arc;

use datafusion_common::tree_node::Transformed;
use datafusion_expr::logical_plan::{Filter, Join};
use datafusion_expr::utils::{conjunction, split_conjunction};
use datafusion_expr::{Between, BinaryExpr, Expr, ExprSchemable, JoinType, LogicalPlan, Operator};
use datafusion_optimizer::optimizer::ApplyOrder;
use datafusion_optimizer::{OptimizerConfig, OptimizerRule};
use sluice_common::{Error, Result};

use crate::plan::properties::window_columns;
use crate::plan::*;
use crate::planner::expr::strip;
use crate::planner::{arrow_schema, df_error, physical_expr};
use crate::tvf::interval_literal_millis;

/// Plans a join of two already planned inputs.
pub(crate) fn plan_join(
    j: &Join,
    left: StreamNode,
    right: StreamNode,
    lookups: &[(String, sqlparser::ast::Expr)],
) -> Result<StreamNode> {
    let kind = match j.join_type {
        JoinType::Inner => JoinKind::Inner,
        JoinType::Left => JoinKind::Left,
        JoinType::Right => JoinKind::Right,
        JoinType::Full => JoinKind::Full,
        other => {
            return Err(Error::plan(format!(
                "{other} joins (from EXISTS / IN subqueries) are not supported in streaming queries yet; \
                 write the condition as an INNER or OUTER JOIN"
            )))
        }
    };
    if j.null_equality == NullEquality::NullEqualsNull || j.null_aware {
        return Err(Error::plan(
            "joins where NULL keys match (IS NOT DISTINCT FROM, NOT IN) are not supported in streaming queries yet",
        ));
    }
    let (ls, rs) = (j.left.schema(), j.right.schema());
    let mut left_keys = vec![];
    let mut right_keys = vec![];
    for (l, r) in &j.on {
        // Both sides hash alike only if they have the same type.
        let lt = l.get_type(ls.as_ref()).map_err(df_error)?;
        let rt = r.get_type(rs.as_ref()).map_err(df_error)?;
        let r = if lt == rt {
            r.clone()
        } else {
            r.clone().cast_to(&lt, rs.as_ref()).map_err(df_error)?
        };
        left_keys.push(physical_expr(l, ls)?);
        right_keys.push(physical_expr(&r, rs)?);
    }
    let combined = ls.join(rs).map_err(df_error)?;
    let filter = j
        .filter
        .as_ref()
        .map(|f| physical_expr(f, &combined))
        .transpose()?;
    let lookup_of = |plan: &LogicalPlan| -> Option<&sqlparser::ast::Expr> {
        let name = match plan {
            LogicalPlan::SubqueryAlias(a) => a.alias.table().to_string(),
            LogicalPlan::TableScan(t) => t.table_name.table().to_string(),
            _ => return None,
        };
        lookups.iter().find(|(n, _)| *n == name).map(|(_, e)| e)
    };
    if lookup_of(&j.left).is_some() {
        return Err(Error::plan(
            "FOR SYSTEM_TIME AS OF goes on the right side of a join: the table looked up",
        ));
    }
    if let Some(as_of) = lookup_of(&j.right) {
        return lookup_join(j, kind, left, right, left_keys, right_keys, filter, as_of);
    }
    let bound = if left.is_append_only() && right.is_append_only() {
        match window_bound(j, &left, &right) {
            Some(b) => Some(b),
            None => interval_bound(j, ls, rs).map(|mut b| {
                let (l, r) = (b.expire[0].column, b.expire[1].column);
                b.processing_time = crate::plan::properties::is_proctime(&left, l)
                    && crate::plan::properties::is_proctime(&right, r);
                b
            }),
        }
    } else {
        None
    };
    Ok(StreamNode::Join {
        left: Box::new(left),
        right: Box::new(right),
        kind,
        left_keys,
        right_keys,
        filter,
        bound,
        schema: arrow_schema(&j.schema),
    })
}

/// A window join: the keys pair both inputs' `window_start` and `window_end` columns.
fn window_bound(j: &Join, left: &StreamNode, right: &StreamNode) -> Option<JoinBound> {
    let (l, r) = (window_columns(left)?, window_columns(right)?);
    let (ls, rs) = (j.left.schema(), j.right.schema());
    let paired = |li: usize, ri: usize| {
        j.on.iter().any(|(a, b)| match (strip(a), strip(b)) {
            (Expr::Column(a), Expr::Column(b)) => {
                ls.index_of_column(a).ok() == Some(li) && rs.index_of_column(b).ok() == Some(ri)
            }
            _ => false,
        })
    };
    if !(paired(l.0, r.0) && paired(l.1, r.1)) {
        return None;
    }
    // Rows of window [s, e) have times below e: once the other side's watermark reaches e,
    // nothing more can join this window.
    Some(JoinBound {
        expire: [
            ExpireBy {
                column: l.1,
                offset: -1,
            },
            ExpireBy {
                column: r.1,
                offset: -1,
            },
        ],
        output_delay: 0,
        window: true,
        processing_time: false,
    })
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    Left,
    Right,
}

/// `column + offset` on one side of a comparison.
fn time_term(e: &Expr, ls: &DFSchema, rs: &DFSchema) -> Option<(Side, usize, i64)> {
    let column = |e: &Expr| -> Option<(Side, usize)> {
        let Expr::Column(c) = strip(e) else {
            return None;
        };
        let (side, index, schema) = match ls.index_of_column(c) {
            Ok(i) => (Side::Left, i, ls),
            Err(_) => (Side::Right, rs.index_of_column(c).ok()?, rs),
        };
        matches!(schema.field(index).data_type(), DataType::Timestamp(_, _))
            .then_some((side, index))
    };
    match strip(e) {
        Expr::BinaryExpr(BinaryExpr { left, op, right }) => {
            let ms = interval_literal_millis(right).ok()?;
            let (side, index) = column(left)?;
            match op {
                Operator::Plus => Some((side, index, ms)),
                Operator::Minus => Some((side, index, -ms)),
                _ => None,
            }
        }
        other => column(other).map(|(side, index)| (side, index, 0)),
    }
}

/// What one conjunct says about `right_time - left_time`: `(left col, right col, lower, upper)`.
type Constraint = (usize, usize, Option<i64>, Option<i64>);

fn comparison(
    a: &Expr,
    op: Operator,
    b: &Expr,
    ls: &DFSchema,
    rs: &DFSchema,
) -> Option<Constraint> {
    let (sa, ca, oa) = time_term(a, ls, rs)?;
    let (sb, cb, ob) = time_term(b, ls, rs)?;
    if sa == sb {
        return None;
    }
    let at_most = matches!(op, Operator::Lt | Operator::LtEq);
    let at_least = matches!(op, Operator::Gt | Operator::GtEq);
    if !(at_most || at_least) {
        return None;
    }
    // Strict comparisons are kept as non-strict bounds: the bound only decides when state is
    // dropped (the condition itself is evaluated exactly), so it may be a little wide.
    if sa == Side::Left {
        // l + oa <= r + ob  <=>  r - l >= oa - ob
        let d = oa - ob;
        Some((ca, cb, at_most.then_some(d), at_least.then_some(d)))
    } else {
        // r + oa <= l + ob  <=>  r - l <= ob - oa
        let d = ob - oa;
        Some((cb, ca, at_least.then_some(d), at_most.then_some(d)))
    }
}

/// An interval join: conjuncts bound `right_time - left_time` from below and above.
fn interval_bound(j: &Join, ls: &DFSchema, rs: &DFSchema) -> Option<JoinBound> {
    let filter = j.filter.as_ref()?;
    let mut found: Vec<Constraint> = vec![];
    for c in split_conjunction(filter) {
        match c {
            Expr::BinaryExpr(BinaryExpr { left, op, right }) => {
                found.extend(comparison(left, *op, right, ls, rs));
            }
            Expr::Between(Between {
                expr,
                negated: false,
                low,
                high,
            }) => {
                found.extend(comparison(expr, Operator::GtEq, low, ls, rs));
                found.extend(comparison(expr, Operator::LtEq, high, ls, rs));
            }
            _ => {}
        }
    }
    for (l, r, _, _) in &found {
        let of_pair = found.iter().filter(|c| c.0 == *l && c.1 == *r);
        let lower = of_pair.clone().filter_map(|c| c.2).max();
        let upper = of_pair.filter_map(|c| c.3).min();
        if let (Some(lower), Some(upper)) = (lower, upper) {
            // A left row meets right rows up to l + upper; a right row meets left rows from
            // r - upper to r - lower.
            return Some(JoinBound {
                expire: [
                    ExpireBy {
                        column: *l,
                        offset: upper,
                    },
                    ExpireBy {
                        column: *r,
                        offset: -lower,
                    },
                ],
                output_delay: upper.max(-lower).max(0),
                window: false,
                processing_time: false,
            });
        }
    }
    None
}

/// Puts join conditions where a streaming join needs them: a `WHERE` directly above an inner
/// join (`FROM a, b WHERE ...`) becomes part of the join's condition, so that equi-keys partition
/// the join and time bounds make it an interval join; conjuncts that read only one input move
/// below the join (into that input, when it is not one an outer join preserves), so that rows
/// they reject never enter join state.
#[derive(Debug, Default)]
pub(crate) struct JoinConditions;

impl OptimizerRule for JoinConditions {
    fn name(&self) -> &str {
        "sluice_join_conditions"
    }

    fn apply_order(&self) -> Option<ApplyOrder> {
        Some(ApplyOrder::TopDown)
    }

    fn supports_rewrite(&self) -> bool {
        true
    }

    fn rewrite(
        &self,
        plan: LogicalPlan,
        _config: &dyn OptimizerConfig,
    ) -> datafusion_common::Result<Transformed<LogicalPlan>> {
        let (join, extra) = match plan {
            LogicalPlan::Filter(f) => match f.input.as_ref() {
                LogicalPlan::Join(j) if j.join_type == JoinType::Inner => {
                    (j.clone(), Some(f.predicate.clone()))
                }
                _ => return Ok(Transformed::no(LogicalPlan::Filter(f))),
            },
            LogicalPlan::Join(j) => (j, None),
            other => return Ok(Transformed::no(other)),
        };
        let conjuncts: Vec<Expr> = join
            .filter
            .iter()
            .chain(extra.iter())
            .flat_map(|e| split_conjunction(e).into_iter().cloned())
            .collect();
        let (into_left, into_right) = match join.join_type {
            JoinType::Inner => (true, true),
            JoinType::Left => (false, true),
            JoinType::Right => (true, false),
            _ => (false, false),
        };
        let only = |e: &Expr, schema: &DFSchema| {
            let cols = e.column_refs();
            !cols.is_empty() && cols.iter().all(|c| schema.has_column(c))
        };
        let (mut left, mut right, mut rest) = (vec![], vec![], vec![]);
        for c in conjuncts {
            if into_left && only(&c, join.left.schema()) {
                left.push(c);
            } else if into_right && only(&c, join.right.schema()) {
                right.push(c);
            } else {
                rest.push(c);
            }
        }
        if extra.is_none() && left.is_empty() && right.is_empty() {
            return Ok(Transformed::no(LogicalPlan::Join(join)));
        }
        let below = |input: Arc<LogicalPlan>, preds: Vec<Expr>| match conjunction(preds) {
            None => Ok(input),
            Some(p) => Filter::try_new(p, input).map(|f| Arc::new(LogicalPlan::Filter(f))),
        };
        let join = Join::try_new(
            below(join.left, left)?,
            below(join.right, right)?,
            join.on,
            conjunction(rest),
            join.join_type,
            join.join_constraint,
            join.null_equality,
            join.null_aware,
        )?;
        Ok(Transformed::yes(LogicalPlan::Join(join)))
    }
}

/// `JOIN dim FOR SYSTEM_TIME AS OF o.proc_time`: a lookup join (processing time).
#[allow(clippy::too_many_arguments)]
fn lookup_join(
    j: &Join,
    kind: JoinKind,
    left: StreamNode,
    right: StreamNode,
    left_keys: Vec<PhysExpr>,
    right_keys: Vec<PhysExpr>,
    filter: Option<PhysExpr>,
    as_of: &sqlparser::ast::Expr,
) -> Result<StreamNode> {
    if !matches!(kind, JoinKind::Inner | JoinKind::Left) {
        return Err(Error::plan(
            "a lookup join (FOR SYSTEM_TIME AS OF) is an INNER or LEFT join",
        ));
    }
    let StreamNode::Scan { table, .. } = &right else {
        return Err(Error::plan(
            "FOR SYSTEM_TIME AS OF needs a table, not a subquery",
        ));
    };
    if left_keys.is_empty() {
        return Err(Error::plan(
            "a lookup join needs an equality condition on the looked-up table's columns",
        ));
    }
    // An AS OF the input's event time asks for the version valid then: a different join. The
    // column is resolved with its qualifier (after a chained join, `p.ts` and `d1.ts` are both
    // `ts`) and must be the left input's time attribute, which a temporal join keeps.
    let ls = j.left.schema();
    let as_of_column = match as_of {
        sqlparser::ast::Expr::Identifier(i) => ls.index_of_column_by_name(None, &i.value),
        sqlparser::ast::Expr::CompoundIdentifier(parts) => match parts.as_slice() {
            [q, n] => ls.index_of_column_by_name(Some(&q.value.as_str().into()), &n.value),
            [.., n] => ls.index_of_column_by_name(None, &n.value),
            [] => None,
        },
        _ => None,
    };
    let left_time =
        as_of_column.filter(|c| crate::plan::properties::rowtime_column(&left) == Some(*c));
    // Without the versioned table's condition the AS OF column may have been pruned from the
    // left input: its name still says it meant event time (and the join then says what is
    // missing for an event-time temporal join).
    let as_of_name = match as_of {
        sqlparser::ast::Expr::Identifier(i) => Some(i.value.clone()),
        sqlparser::ast::Expr::CompoundIdentifier(parts) => parts.last().map(|i| i.value.clone()),
        _ => None,
    };
    fn watermarked(node: &StreamNode, name: &str) -> bool {
        match node {
            StreamNode::Scan { table, .. } => table
                .watermark
                .as_ref()
                .is_some_and(|(i, _)| table.schema.field(*i).name() == name),
            StreamNode::Project { input, .. }
            | StreamNode::Filter { input, .. }
            | StreamNode::WindowAssign { input, .. }
            | StreamNode::LookupJoin { input, .. }
            | StreamNode::TemporalJoin { left: input, .. } => watermarked(input, name),
            _ => false,
        }
    }
    if left_time.is_some() || as_of_name.as_deref().is_some_and(|n| watermarked(&left, n)) {
        let name = as_of_name.unwrap_or_default();
        return temporal_join(
            j, kind, left, right, left_keys, right_keys, filter, left_time, &name,
        );
    }
    let reload_ms = match table.options.get("lookup.join.cache.ttl") {
        None => None,
        Some(v) => Some(
            sluice_common::time::parse_duration_ms(v)
                .filter(|ms| *ms > 0)
                .ok_or_else(|| {
                    Error::plan(format!(
                        "table '{}': option 'lookup.join.cache.ttl' = '{v}' is not a positive duration such as '10 min'",
                        table.name
                    ))
                })?,
        ),
    };
    Ok(StreamNode::LookupJoin {
        input: Box::new(left),
        dim: Box::new(right),
        kind,
        left_keys,
        right_keys,
        filter,
        reload_ms,
        schema: arrow_schema(&j.schema),
    })
}

/// `JOIN versioned FOR SYSTEM_TIME AS OF o.rowtime`: an event-time temporal join.
#[allow(clippy::too_many_arguments)]
fn temporal_join(
    j: &Join,
    kind: JoinKind,
    left: StreamNode,
    right: StreamNode,
    left_keys: Vec<PhysExpr>,
    right_keys: Vec<PhysExpr>,
    filter: Option<PhysExpr>,
    left_time: Option<usize>,
    as_of: &str,
) -> Result<StreamNode> {
    let StreamNode::Scan { table, schema, .. } = &right else {
        return Err(Error::plan("FOR SYSTEM_TIME AS OF needs a table"));
    };
    let Some((time, _)) = table
        .watermark
        .as_ref()
        .filter(|_| !table.primary_key.is_empty())
    else {
        return Err(Error::plan(format!(
            "FOR SYSTEM_TIME AS OF {as_of}: an event-time temporal join needs a versioned table, one \
             with a PRIMARY KEY and a WATERMARK, but '{}' has {}",
            table.name,
            if table.primary_key.is_empty() { "no PRIMARY KEY" } else { "no WATERMARK" }
        )));
    };
    let time_name = table.schema.field(*time).name();
    let right_time = schema.index_of(time_name).map_err(|_| {
        Error::plan(format!(
            "internal: the versioned table's time column {time_name} is not read"
        ))
    })?;
    let left_time = left_time
        .ok_or_else(|| Error::plan(format!("internal: the AS OF column {as_of} is not read")))?;
    // The join must pair the whole primary key, so that a key has one version at a time.
    let rs = j.right.schema();
    let keyed: Vec<String> =
        j.on.iter()
            .filter_map(|(_, r)| match strip(r) {
                Expr::Column(c) => rs
                    .index_of_column(c)
                    .ok()
                    .map(|i| rs.field(i).name().clone()),
                _ => None,
            })
            .collect();
    if let Some(missing) = table.primary_key.iter().find(|k| !keyed.contains(k)) {
        return Err(Error::plan(format!(
            "an event-time temporal join must join on the versioned table's whole PRIMARY KEY ({}); \
             '{missing}' is not in the ON condition",
            table.primary_key.join(", ")
        )));
    }
    if !left.is_append_only() {
        return Err(Error::plan(
            "an event-time temporal join needs an append-only input on the left",
        ));
    }
    Ok(StreamNode::TemporalJoin {
        left: Box::new(left),
        right: Box::new(right),
        kind,
        left_keys,
        right_keys,
        left_time,
        right_time,
        filter,
        schema: arrow_schema(&j.schema),
    })
}
