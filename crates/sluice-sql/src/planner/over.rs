//! OVER aggregates: `SUM(x) OVER (PARTITION BY k ORDER BY rowtime ROWS ...)`.

use datafusion_expr::expr::{AggregateFunction, WindowFunctionDefinition};
use datafusion_expr::logical_plan::Window;
use datafusion_expr::{Expr, WindowFrameBound, WindowFrameUnits};
use sluice_common::{Error, Result};

use crate::plan::properties::rowtime_column;
use crate::plan::*;
use crate::planner::expr::{column_index, literal, strip};
use crate::planner::{agg_call, arrow_schema, physical_expr, Catalog};
use crate::tvf::interval_literal_millis;

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
