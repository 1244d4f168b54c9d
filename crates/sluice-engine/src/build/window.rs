//! Windowed aggregations: rows partitioned before window assignment, and HOP windows sliced
//! into panes.

use std::sync::Arc;

use sluice_sql::StreamNode;

use crate::operator::stateless::{assign_windows, filter, map_batches, project};
use crate::runtime::{DataflowScope, EventStream};

use super::*;

/// For a window aggregation over assigned windows (a window TVF), when its group keys other
/// than the window bounds are columns that pass unchanged through the projections and filters
/// down to the window assignment: the nodes from the aggregation's input down to the window
/// assignment, those keys as columns of the assignment's input, and their positions among the
/// group keys. Rows can then be partitioned before the windows are assigned, as Flink does: a
/// HOP window copies each row into size/slide windows, and those copies need not cross workers.
#[allow(clippy::type_complexity)]
/// Below a window aggregation, HOP or CUMULATE windows assigned as copies of each row: the
/// windows, and the column of the rows' time in the aggregation's input when it passes through
/// the projections unchanged (HOP needs it to tell a row's last window). `None` for other
/// windows.
pub(crate) fn window_copies(node: &StreamNode) -> Option<(Option<usize>, sluice_sql::WindowKind)> {
    use datafusion_physical_expr::expressions::Column;
    let column = |e: &sluice_sql::PhysExpr| e.downcast_ref::<Column>().map(|c| c.index());
    match node {
        StreamNode::WindowAssign { time, kind, .. } => match kind {
            sluice_sql::WindowKind::Hop { .. } | sluice_sql::WindowKind::Cumulate { .. } => {
                Some((column(time), *kind))
            }
            _ => None,
        },
        StreamNode::Filter { input, .. } => window_copies(input),
        StreamNode::Project { input, exprs, .. } => {
            let (time, kind) = window_copies(input)?;
            let at = time.and_then(|t| exprs.iter().position(|e| column(e) == Some(t)));
            Some((at, kind))
        }
        _ => None,
    }
}

pub(crate) fn keys_below_window<'a>(
    input: &'a StreamNode,
    group: &[sluice_sql::PhysExpr],
    window: &sluice_sql::AggWindow,
) -> Option<(Vec<&'a StreamNode>, Vec<sluice_sql::PhysExpr>, Vec<usize>)> {
    use datafusion_physical_expr::expressions::Column;
    let sluice_sql::AggWindow::Assigned {
        start_key, end_key, ..
    } = window
    else {
        return None;
    };
    let positions: Vec<usize> = (0..group.len())
        .filter(|i| i != start_key && i != end_key)
        .collect();
    let column = |e: &sluice_sql::PhysExpr| e.downcast_ref::<Column>().map(|c| c.index());
    let mut columns: Vec<usize> = positions
        .iter()
        .map(|&i| column(&group[i]))
        .collect::<Option<_>>()?;
    if columns.is_empty() {
        return None;
    }
    let mut chain = vec![];
    let mut node = input;
    loop {
        chain.push(node);
        match node {
            StreamNode::Project { input, exprs, .. } => {
                columns = columns
                    .iter()
                    .map(|&c| exprs.get(c).and_then(column))
                    .collect::<Option<_>>()?;
                node = input;
            }
            StreamNode::Filter { input, .. } => node = input,
            StreamNode::WindowAssign { input: below, .. } => {
                // The assignment appends the window columns after its input's.
                let schema = below.schema();
                if columns.iter().any(|c| *c >= schema.fields().len()) {
                    return None;
                }
                let keys = columns
                    .iter()
                    .map(|&c| {
                        Arc::new(Column::new(schema.field(c).name(), c)) as sluice_sql::PhysExpr
                    })
                    .collect();
                return Some((chain, keys, positions));
            }
            _ => return None,
        }
    }
}

/// The size and slide of a HOP window aggregation that can be aggregated in panes (see
/// `aggregate::Slicing`): the window assignment at the bottom of `chain` (from
/// [`keys_below_window`]) is a HOP whose size is a multiple of its slide; its bounds reach the
/// aggregation unchanged as the window keys and nothing else reads them (a pane's bounds are
/// not its windows'); results are final when the window closes (no early firing, lateness or
/// late-data sink); and every aggregate merges (no DISTINCT but COUNT's).
pub(crate) fn hop_slices(
    chain: &[&StreamNode],
    group: &[sluice_sql::PhysExpr],
    window: &sluice_sql::AggWindow,
    aggs: &[sluice_sql::AggCall],
    emit: &sluice_sql::EmitPolicy,
    late_sink: bool,
) -> Option<(i64, i64)> {
    use datafusion_physical_expr::expressions::Column;
    let sluice_sql::AggWindow::Assigned {
        start_key, end_key, ..
    } = window
    else {
        return None;
    };
    if late_sink || emit.is_updating() || emit.processing_time {
        return None;
    }
    if aggs
        .iter()
        .any(|a| a.distinct && a.func != sluice_sql::AggFunc::Count)
    {
        return None;
    }
    let (
        StreamNode::WindowAssign {
            input: below,
            kind: sluice_sql::WindowKind::Hop { size, slide },
            ..
        },
        above,
    ) = chain.split_last()?
    else {
        return None;
    };
    if *slide <= 0 || *size <= *slide || size % slide != 0 {
        return None;
    }
    // Which column holds which window column (0 start, 1 end, 2 time), going up the chain.
    let n = below.schema().fields().len();
    let mut bound: Vec<Option<usize>> = (0..n + 3).map(|c| c.checked_sub(n)).collect();
    let reads_bounds = |e: &sluice_sql::PhysExpr, bound: &[Option<usize>]| {
        datafusion_physical_expr::utils::collect_columns(e)
            .iter()
            .any(|c| bound.get(c.index()).copied().flatten().is_some())
    };
    let column = |e: &sluice_sql::PhysExpr| e.downcast_ref::<Column>().map(|c| c.index());
    for node in above.iter().rev() {
        match node {
            StreamNode::Filter { predicate, .. } if reads_bounds(predicate, &bound) => return None,
            StreamNode::Filter { .. } => {}
            StreamNode::Project { exprs, .. } => {
                let mut next = Vec::with_capacity(exprs.len());
                for e in exprs {
                    match column(e) {
                        Some(c) => next.push(bound.get(c).copied().flatten()),
                        None if reads_bounds(e, &bound) => return None,
                        None => next.push(None),
                    }
                }
                bound = next;
            }
            _ => return None,
        }
    }
    let key_is = |i: usize, which: usize| {
        column(&group[i]).is_some_and(|c| bound.get(c).copied().flatten() == Some(which))
    };
    let others_read_bounds = group
        .iter()
        .enumerate()
        .filter(|(i, _)| i != start_key && i != end_key)
        .map(|(_, g)| g)
        .chain(
            aggs.iter()
                .flat_map(|a| a.arg.iter().chain(a.filter.iter())),
        )
        .any(|e| reads_bounds(e, &bound));
    (key_is(*start_key, 0) && key_is(*end_key, 1) && !others_read_bounds).then_some((*size, *slide))
}

/// Builds the chain [`keys_below_window`] found (projections and filters over a window
/// assignment, top first), with the rows partitioned by `keys` before the assignment. Not
/// shared with other plans: elsewhere the same nodes are built without the exchange. With
/// `pane`, the HOP assignment gives each row its pane, a tumbling window of that length
/// (see [`hop_slices`]).
pub(crate) fn build_window_chain<'scope>(
    scope: DataflowScope<'scope>,
    chain: &[&StreamNode],
    keys: Vec<sluice_sql::PhysExpr>,
    pane: Option<i64>,
    ctx: &BuildContext,
    reuse: &Reuse<'scope>,
) -> EventStream<'scope> {
    let Some((
        StreamNode::WindowAssign {
            input,
            time,
            kind,
            schema,
        },
        above,
    )) = chain.split_last()
    else {
        unreachable!("a window chain ends at the window assignment")
    };
    let (time, schema) = (time.clone(), schema.clone());
    let metrics = ctx.metrics.clone();
    let kind = match pane {
        Some(size) => sluice_sql::WindowKind::Tumble { size, offset: 0 },
        None => *kind,
    };
    let mut stream = map_batches(
        ctx.exchange(build(scope, input, ctx, reuse), keys, "WindowAssign"),
        "WindowAssign",
        ctx.metrics.clone(),
        move |b| assign_windows(b, &time, kind, &schema, &metrics.null_time_rows_dropped).map(Some),
    );
    for node in above.iter().rev() {
        stream = match node {
            StreamNode::Project { exprs, schema, .. } => {
                let (exprs, schema) = (exprs.clone(), schema.clone());
                map_batches(stream, "Project", ctx.metrics.clone(), move |b| {
                    project(b, &exprs, &schema).map(Some)
                })
            }
            StreamNode::Filter { predicate, .. } => {
                let predicate = predicate.clone();
                map_batches(stream, "Filter", ctx.metrics.clone(), move |b| {
                    filter(b, &predicate).map(Some)
                })
            }
            _ => unreachable!("a window chain holds projections and filters"),
        };
    }
    stream
}
