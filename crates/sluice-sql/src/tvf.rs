//! Window table-valued functions: `TABLE(TUMBLE(TABLE t, DESCRIPTOR(ts), size))` and HOP and
//! CUMULATE. A relation planner turns the call into a [`WindowTvfNode`], a logical extension node
//! that appends `window_start`, `window_end` and `window_time` to the input's columns.

use std::cmp::Ordering;
use std::fmt;
use std::sync::Arc;

use arrow::datatypes::Field;
use datafusion_common::{
    plan_datafusion_err, plan_err, Column, DFSchema, DFSchemaRef, Result as DFResult, ScalarValue,
    TableReference,
};
use datafusion_expr::planner::{
    PlannedRelation, RelationPlanner, RelationPlannerContext, RelationPlanning,
};
use datafusion_expr::{
    Expr, Extension, LogicalPlan, LogicalPlanBuilder, UserDefinedLogicalNodeCore,
};
use sqlparser::ast::{self, FunctionArg, FunctionArgExpr, FunctionArguments, TableFactor};

use crate::functions::{window_time_type, WINDOW_FIELDS};
use crate::parser::dialect::TABLE_ARG_MARKER;
use crate::plan::WindowKind;

/// The logical node for a window TVF.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct WindowTvfNode {
    pub input: LogicalPlan,
    pub time_column: Column,
    pub kind: WindowKind,
    /// SESSION's `PARTITION BY` columns: sessions are per value of these.
    pub partition: Vec<String>,
    pub schema: DFSchemaRef,
}

impl PartialOrd for WindowTvfNode {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        self.input.partial_cmp(&other.input)
    }
}

impl WindowTvfNode {
    pub fn try_new(
        input: LogicalPlan,
        time_column: Column,
        kind: WindowKind,
        partition: Vec<String>,
    ) -> DFResult<Self> {
        let mut fields: Vec<(Option<TableReference>, Arc<Field>)> = input
            .schema()
            .iter()
            .map(|(q, f)| (q.cloned(), f.clone()))
            .collect();
        for name in WINDOW_FIELDS {
            fields.push((None, Arc::new(Field::new(name, window_time_type(), false))));
        }
        let schema = Arc::new(DFSchema::new_with_metadata(fields, Default::default())?);
        Ok(WindowTvfNode {
            input,
            time_column,
            kind,
            partition,
            schema,
        })
    }
}

impl UserDefinedLogicalNodeCore for WindowTvfNode {
    fn name(&self) -> &str {
        "WindowTVF"
    }
    fn inputs(&self) -> Vec<&LogicalPlan> {
        vec![&self.input]
    }
    fn schema(&self) -> &DFSchemaRef {
        &self.schema
    }
    fn expressions(&self) -> Vec<Expr> {
        vec![Expr::Column(self.time_column.clone())]
    }
    fn fmt_for_explain(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "WindowTVF: {:?} on {}", self.kind, self.time_column)
    }
    /// The input columns the output needs: the ones passed through that are read above, the
    /// time column and SESSION's partition columns. Without this, DataFusion keeps every column
    /// of the table under a window TVF, and a HOP window copies them all into each window.
    fn necessary_children_exprs(&self, output_columns: &[usize]) -> Option<Vec<Vec<usize>>> {
        let schema = self.input.schema();
        let mut need: Vec<usize> = output_columns
            .iter()
            .copied()
            .filter(|i| *i < schema.fields().len())
            .collect();
        need.push(schema.index_of_column(&self.time_column).ok()?);
        for name in &self.partition {
            need.push(schema.index_of_column_by_name(None, name)?);
        }
        need.sort_unstable();
        need.dedup();
        Some(vec![need])
    }
    fn with_exprs_and_inputs(
        &self,
        exprs: Vec<Expr>,
        mut inputs: Vec<LogicalPlan>,
    ) -> DFResult<Self> {
        let time_column = match exprs.into_iter().next() {
            Some(Expr::Column(c)) => c,
            _ => self.time_column.clone(),
        };
        WindowTvfNode::try_new(
            inputs.swap_remove(0),
            time_column,
            self.kind,
            self.partition.clone(),
        )
    }
}

/// Plans `TABLE(TUMBLE(...))`, `TABLE(HOP(...))` and `TABLE(CUMULATE(...))`.
#[derive(Debug)]
pub struct WindowTvfPlanner;

impl RelationPlanner for WindowTvfPlanner {
    fn plan_relation(
        &self,
        relation: TableFactor,
        ctx: &mut dyn RelationPlannerContext,
    ) -> DFResult<RelationPlanning> {
        let TableFactor::TableFunction {
            expr: ast::Expr::Function(call),
            alias,
        } = &relation
        else {
            return Ok(RelationPlanning::Original(Box::new(relation)));
        };
        let name = call.name.to_string().to_uppercase();
        if !["TUMBLE", "HOP", "CUMULATE", "SESSION"].contains(&name.as_str()) {
            return Ok(RelationPlanning::Original(Box::new(relation)));
        }
        let FunctionArguments::List(list) = &call.args else {
            return plan_err!("{name} needs arguments: {name}(TABLE t, DESCRIPTOR(time_col), ...)");
        };
        let args: Vec<ast::Expr> = list
            .args
            .iter()
            .map(|a| match a {
                FunctionArg::Unnamed(FunctionArgExpr::Expr(e)) => Ok(e.clone()),
                FunctionArg::Named {
                    arg: FunctionArgExpr::Expr(e),
                    ..
                } => Ok(e.clone()),
                FunctionArg::ExprNamed {
                    arg: FunctionArgExpr::Expr(e),
                    ..
                } => Ok(e.clone()),
                other => plan_err!("unexpected argument {other} in {name}"),
            })
            .collect::<DFResult<_>>()?;
        let expected = match name.as_str() {
            "TUMBLE" => 3..=4,
            "SESSION" => 3..=3,
            _ => 4..=4,
        };
        if !expected.contains(&args.len()) {
            return plan_err!(
                "{name} takes (TABLE t, DESCRIPTOR(time_col), {}), got {} arguments",
                match name.as_str() {
                    "TUMBLE" => "size [, offset]",
                    "HOP" => "slide, size",
                    _ => "step, max_size",
                },
                args.len()
            );
        }
        let (table, partition) = table_arg(&args[0]).ok_or_else(|| {
            plan_datafusion_err!("the first argument of {name} must be TABLE <name>")
        })?;
        if !partition.is_empty() && name != "SESSION" {
            return plan_err!(
                "PARTITION BY in the table argument is for SESSION windows only, not {name}"
            );
        }
        let time_col = single_ident_arg(&args[1], "DESCRIPTOR").ok_or_else(|| {
            plan_datafusion_err!("the second argument of {name} must be DESCRIPTOR(<time column>)")
        })?;
        let empty = DFSchema::empty();
        let mut durations = vec![];
        for a in &args[2..] {
            let e = ctx.sql_to_expr(a.clone(), &empty)?;
            durations.push(interval_millis(&e).map_err(datafusion_common::DataFusionError::Plan)?);
        }
        let kind = match name.as_str() {
            "TUMBLE" => WindowKind::Tumble {
                size: durations[0],
                offset: durations.get(1).copied().unwrap_or(0),
            },
            "HOP" => WindowKind::Hop {
                slide: durations[0],
                size: durations[1],
            },
            "SESSION" => WindowKind::Session { gap: durations[0] },
            _ => WindowKind::Cumulate {
                step: durations[0],
                size: durations[1],
            },
        };
        validate_window(&kind).map_err(datafusion_common::DataFusionError::Plan)?;
        let reference = TableReference::bare(table.clone());
        let source = ctx.context_provider().get_table_source(reference.clone())?;
        let input = LogicalPlanBuilder::scan(reference, source, None)?.build()?;
        let column = input
            .schema()
            .qualified_field_with_unqualified_name(&time_col)
            .map(|(q, f)| Column::new(q.cloned(), f.name()))
            .map_err(|_| {
                plan_datafusion_err!(
                    "DESCRIPTOR({time_col}): table {table} has no column {time_col}"
                )
            })?;
        let node = WindowTvfNode::try_new(input, column, kind, partition)?;
        let plan = LogicalPlan::Extension(Extension {
            node: Arc::new(node),
        });
        Ok(RelationPlanning::Planned(Box::new(PlannedRelation::new(
            plan,
            alias.clone(),
        ))))
    }
}

/// The table name and PARTITION BY columns of a `TABLE t [PARTITION BY ...]` argument.
fn table_arg(e: &ast::Expr) -> Option<(String, Vec<String>)> {
    let ast::Expr::Function(f) = e else {
        return None;
    };
    if f.name.to_string() != TABLE_ARG_MARKER {
        return None;
    }
    let FunctionArguments::List(list) = &f.args else {
        return None;
    };
    let mut names = list.args.iter().map(|a| match a {
        FunctionArg::Unnamed(FunctionArgExpr::Expr(ast::Expr::Identifier(i))) => {
            Some(i.value.clone())
        }
        _ => None,
    });
    let table = names.next()??;
    Some((table, names.collect::<Option<Vec<_>>>()?))
}

fn single_ident_arg(e: &ast::Expr, function: &str) -> Option<String> {
    let ast::Expr::Function(f) = e else {
        return None;
    };
    if !f.name.to_string().eq_ignore_ascii_case(function) {
        return None;
    }
    let FunctionArguments::List(list) = &f.args else {
        return None;
    };
    match list.args.as_slice() {
        [FunctionArg::Unnamed(FunctionArgExpr::Expr(ast::Expr::Identifier(i)))] => {
            Some(i.value.clone())
        }
        [FunctionArg::Unnamed(FunctionArgExpr::Expr(ast::Expr::CompoundIdentifier(parts)))] => {
            parts.last().map(|i| i.value.clone())
        }
        _ => None,
    }
}

/// Milliseconds of an `INTERVAL` literal.
pub fn interval_millis(e: &Expr) -> Result<i64, String> {
    let ms = interval_literal_millis(e)?;
    if ms <= 0 {
        return Err(format!("window intervals must be positive, found {ms} ms"));
    }
    Ok(ms)
}

/// An INTERVAL literal in milliseconds (zero and negative allowed).
pub fn interval_literal_millis(e: &Expr) -> Result<i64, String> {
    let value = match e {
        Expr::Literal(v, _) => v,
        Expr::Cast(c) => return interval_literal_millis(&c.expr),
        Expr::Alias(a) => return interval_literal_millis(&a.expr),
        other => {
            return Err(format!(
                "expected an INTERVAL literal such as INTERVAL '5' MINUTE, found {other}"
            ))
        }
    };
    let ms = match value {
        ScalarValue::IntervalMonthDayNano(Some(v)) if v.months == 0 => v.days as i64 * 86_400_000 + v.nanoseconds / 1_000_000,
        ScalarValue::IntervalDayTime(Some(v)) => v.days as i64 * 86_400_000 + v.milliseconds as i64,
        ScalarValue::IntervalMonthDayNano(Some(_)) | ScalarValue::IntervalYearMonth(Some(_)) => {
            return Err("window sizes in months or years are not supported: use DAY, HOUR, MINUTE or SECOND".into())
        }
        other => return Err(format!("expected an INTERVAL literal such as INTERVAL '5' MINUTE, found {other}")),
    };
    Ok(ms)
}

/// The most windows one row may belong to (HOP size / slide, CUMULATE size / step): each
/// window a row is in costs work per key as windows fire, so a 1 ms slide over a day (86.4 M
/// windows per row) would never finish.
pub const MAX_WINDOWS_PER_ROW: i64 = 10_000;

/// Checks the shape of a window: HOP's size must be a multiple of its slide, as in Flink, and
/// a row may be in at most [`MAX_WINDOWS_PER_ROW`] windows.
pub fn validate_window(kind: &WindowKind) -> Result<(), String> {
    match *kind {
        WindowKind::Hop { size, slide } if slide > 0 && size / slide > MAX_WINDOWS_PER_ROW => Err(format!(
            "HOP size ({size} ms) / slide ({slide} ms) puts every row in {} windows, more than the limit of \
             {MAX_WINDOWS_PER_ROW}: use a longer slide (or a CUMULATE or TUMBLE window)",
            size / slide
        )),
        WindowKind::Cumulate { step, size } if step > 0 && size / step > MAX_WINDOWS_PER_ROW => Err(format!(
            "CUMULATE max size ({size} ms) / step ({step} ms) puts every row in up to {} windows, more than \
             the limit of {MAX_WINDOWS_PER_ROW}: use a longer step",
            size / step
        )),
        WindowKind::Tumble { size, offset } if offset.abs() >= size => Err(format!(
            "TUMBLE offset ({offset} ms) must be smaller than the size ({size} ms)"
        )),
        WindowKind::Hop { size, slide } if size % slide != 0 => Err(format!(
            "HOP size ({size} ms) must be a whole multiple of the slide ({slide} ms)"
        )),
        WindowKind::Cumulate { step, size } if size % step != 0 => Err(format!(
            "CUMULATE max size ({size} ms) must be a whole multiple of the step ({step} ms)"
        )),
        _ => Ok(()),
    }
}
