//! From SQL to a [`JobPlan`]: DataFusion plans and optimizes each query; this module then
//! translates the logical plan into streaming operators, rejecting what cannot run incrementally.

pub(crate) mod expr;
pub(crate) mod join;
pub(crate) mod over;
pub(crate) mod rank;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion_common::config::ConfigOptions;
use datafusion_common::{Column, DFSchema, DataFusionError, TableReference};
use datafusion_expr::execution_props::ExecutionProps;
use datafusion_expr::expr::{AggregateFunction, ScalarFunction};
use datafusion_expr::logical_plan::builder::LogicalTableSource;
use datafusion_expr::planner::{ContextProvider, ExprPlanner, RelationPlanner};
use datafusion_expr::{
    AggregateUDF, Expr, ExprSchemable, HigherOrderUDF, LogicalPlan, LogicalPlanBuilder, ScalarUDF,
    TableSource, WindowUDF,
};
use datafusion_optimizer::analyzer::Analyzer;
use datafusion_optimizer::optimizer::{Optimizer, OptimizerContext, OptimizerRule};
use datafusion_physical_expr::create_physical_expr;
use datafusion_sql::planner::{ParserOptions, PlannerContext, SqlToRel};
use sluice_common::{Error, Result};
use sqlparser::ast;

use crate::functions::{
    aggregate_functions, scalar_functions, window_time_type, WINDOW_FIELDS, WINDOW_MARKERS,
};
use crate::parser::{parse_script, ColumnDdl, Statement, TableDdl};
use crate::plan::*;
use crate::tvf::{interval_millis, validate_window, WindowTvfNode, WindowTvfPlanner};

/// Tables, views and settings of a script, and the pipelines planned so far.
pub struct Catalog {
    tables: HashMap<String, Arc<TableDef>>,
    views: HashMap<String, LogicalPlan>,
    /// How many views deep each view is built (1: on tables only).
    view_depth: HashMap<String, usize>,
    settings: BTreeMap<String, String>,
    /// What the user should know but that does not stop the job (Flink-only options).
    warnings: Vec<String>,
    pipelines: Vec<Pipeline>,
    /// Statements under `EXPLAIN`: planned, printed, not run.
    explained: Vec<Pipeline>,
    selects: usize,
    scalar: HashMap<String, Arc<ScalarUDF>>,
    aggregate: HashMap<String, Arc<AggregateUDF>>,
    options: ConfigOptions,
    expr_planners: Vec<Arc<dyn ExprPlanner>>,
    relation_planners: Vec<Arc<dyn RelationPlanner>>,
    /// The statement being planned: tables joined `FOR SYSTEM_TIME AS OF` (alias, expression).
    pub(crate) lookups: std::cell::RefCell<Vec<(String, ast::Expr)>>,
}

impl Default for Catalog {
    fn default() -> Self {
        Self::new()
    }
}

/// Plans a whole script into one job.
pub fn plan_script(sql: &str) -> Result<JobPlan> {
    let mut catalog = Catalog::new();
    catalog.execute(sql)?;
    Ok(catalog.into_job())
}

impl Catalog {
    /// An empty catalog.
    pub fn new() -> Self {
        let mut options = ConfigOptions::default();
        options.sql_parser.enable_ident_normalization = false;
        options.sql_parser.map_string_types_to_utf8view = false;
        let expr_planners: Vec<Arc<dyn ExprPlanner>> = vec![
            Arc::new(datafusion_functions::core::planner::CoreFunctionPlanner::default()),
            Arc::new(datafusion_functions::unicode::planner::UnicodeFunctionPlanner),
            Arc::new(datafusion_functions::datetime::planner::DatetimeFunctionPlanner),
            Arc::new(datafusion_functions_aggregate::planner::AggregateFunctionPlanner),
        ];
        Catalog {
            tables: HashMap::new(),
            views: HashMap::new(),
            view_depth: HashMap::new(),
            settings: BTreeMap::new(),
            warnings: vec![],
            pipelines: vec![],
            explained: vec![],
            selects: 0,
            scalar: scalar_functions(),
            aggregate: aggregate_functions(),
            options,
            expr_planners,
            relation_planners: vec![Arc::new(WindowTvfPlanner)],
            lookups: Default::default(),
        }
    }

    /// Runs every statement of a script against the catalog, on a thread with a stack deep
    /// enough for what [`crate::depth`] allows, whatever thread calls this.
    pub fn execute(&mut self, sql: &str) -> Result<()> {
        std::thread::scope(|scope| {
            std::thread::Builder::new()
                .name("sluice-planner".into())
                .stack_size(crate::depth::STACK_BYTES)
                .spawn_scoped(scope, || self.execute_here(sql))
                .map_err(|e| Error::plan(format!("could not start the planner thread: {e}")))?
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    fn execute_here(&mut self, sql: &str) -> Result<()> {
        for located in parse_script(sql)? {
            let line = located.line;
            self.execute_statement(located.statement, line)
                .map_err(|e| match e {
                    Error::Plan(m) => Error::Plan(format!("statement at line {line}: {m}")),
                    other => other,
                })?;
        }
        Ok(())
    }

    /// The job made of every INSERT and SELECT seen.
    pub fn into_job(self) -> JobPlan {
        JobPlan {
            pipelines: self.pipelines,
            explained: self.explained,
            settings: self.settings,
            warnings: self.warnings,
        }
    }

    /// A table by name.
    pub fn table(&self, name: &str) -> Option<Arc<TableDef>> {
        self.tables.get(name).cloned()
    }

    /// The columns a view gives, by name.
    pub fn view_schema(&self, name: &str) -> Option<SchemaRef> {
        self.views
            .get(name)
            .map(|plan| Arc::new(plan.schema().as_arrow().clone()))
    }

    fn execute_statement(&mut self, statement: Statement, line: u64) -> Result<()> {
        match statement {
            Statement::Explain { analyze, inner } => {
                let selects = self.selects;
                self.execute_statement(*inner, line)?;
                if analyze {
                    // It runs; its rows per node are reported when the job ends.
                    let pipeline = self
                        .pipelines
                        .last_mut()
                        .expect("EXPLAIN plans one pipeline");
                    pipeline.analyze = true;
                } else {
                    self.selects = selects;
                    let pipeline = self.pipelines.pop().expect("EXPLAIN plans one pipeline");
                    self.explained.push(pipeline);
                }
            }
            Statement::Set { key, value } => {
                if let Some(warning) = crate::config::check(&key, &value)? {
                    self.warnings.push(format!("line {line}: {warning}"));
                }
                self.settings.insert(key, value);
            }
            Statement::CreateTable(ddl) => {
                if self.tables.contains_key(&ddl.name) || self.views.contains_key(&ddl.name) {
                    if ddl.if_not_exists {
                        return Ok(());
                    }
                    return Err(Error::plan(format!("table '{}' already exists", ddl.name)));
                }
                let def = self.create_table(ddl)?;
                self.tables.insert(def.name.clone(), Arc::new(def));
            }
            Statement::CreateView { name, mut query } => {
                if self.tables.contains_key(&name) || self.views.contains_key(&name) {
                    return Err(Error::plan(format!(
                        "a table or view named '{name}' already exists"
                    )));
                }
                crate::depth::limit(&mut query)?;
                let mut depth = 1;
                let _ = sqlparser::ast::visit_relations(&query, |r| {
                    let used = r.to_string();
                    depth = depth.max(1 + self.view_depth.get(&used).copied().unwrap_or(0));
                    std::ops::ControlFlow::<()>::Continue(())
                });
                if depth > crate::depth::MAX_VIEW_DEPTH {
                    return Err(Error::plan(format!(
                        "view '{name}' would nest {depth} levels of views over views, more than the limit of {}",
                        crate::depth::MAX_VIEW_DEPTH
                    )));
                }
                self.view_depth.insert(name.clone(), depth);
                crate::rewrite::rewrite(&mut query);
                if !crate::rewrite::take_lookups(&mut query, &|_| None).is_empty() {
                    return Err(Error::plan(
                        "FOR SYSTEM_TIME AS OF is not supported inside a view yet; write the lookup join in the query",
                    ));
                }
                let plan = self.logical_plan(query)?;
                self.views.insert(name, plan);
            }
            Statement::Insert { table, mut query } => {
                let def = self.tables.get(&table).cloned().ok_or_else(|| {
                    Error::plan(format!(
                        "INSERT INTO {table}: no such table (tables: {})",
                        self.table_names()
                    ))
                })?;
                crate::depth::limit(&mut query)?;
                crate::rewrite::rewrite(&mut query);
                *self.lookups.borrow_mut() =
                    crate::rewrite::take_lookups(&mut query, &|t| self.versioned_time(t));
                let plan = self.logical_plan(query)?;
                let plan = self.cast_to_sink(plan, &def)?;
                let plan = self.optimize(plan)?;
                let node = self.to_stream(&plan)?;
                check_session_tvfs(&node, false)?;
                self.pipelines.push(Pipeline {
                    query: node,
                    sink: SinkTarget::Table(def),
                    line,
                    analyze: false,
                });
            }
            Statement::Select(mut query) => {
                crate::depth::limit(&mut query)?;
                crate::rewrite::rewrite(&mut query);
                *self.lookups.borrow_mut() =
                    crate::rewrite::take_lookups(&mut query, &|t| self.versioned_time(t));
                let plan = self.logical_plan(query)?;
                let plan = self.optimize(plan)?;
                let node = self.to_stream(&plan)?;
                check_session_tvfs(&node, false)?;
                let index = self.selects;
                self.selects += 1;
                self.pipelines.push(Pipeline {
                    query: node,
                    sink: SinkTarget::Select { index },
                    line,
                    analyze: false,
                });
            }
        }
        Ok(())
    }

    /// A versioned table (PRIMARY KEY and WATERMARK): the name of its event-time column.
    fn versioned_time(&self, table: &str) -> Option<String> {
        let t = self.tables.get(table)?;
        let (time, _) = t.watermark.as_ref()?;
        (!t.primary_key.is_empty()).then(|| t.schema.field(*time).name().clone())
    }

    fn table_names(&self) -> String {
        let mut names: Vec<&str> = self
            .tables
            .keys()
            .chain(self.views.keys())
            .map(String::as_str)
            .collect();
        names.sort();
        if names.is_empty() {
            "none defined".into()
        } else {
            names.join(", ")
        }
    }

    fn sql_to_rel(&self) -> SqlToRel<'_, Self> {
        let options = ParserOptions::new()
            .with_enable_ident_normalization(false)
            .with_map_string_types_to_utf8view(false);
        SqlToRel::new_with_options(self, options)
    }

    /// Plans a query and type-checks it.
    fn logical_plan(&self, query: Box<ast::Query>) -> Result<LogicalPlan> {
        let plan = self
            .sql_to_rel()
            .sql_statement_to_plan(ast::Statement::Query(query))
            .map_err(df_error)?;
        Analyzer::new()
            .execute_and_check(plan, &self.options, |_, _| {})
            .map_err(df_error)
    }

    fn optimize(&self, plan: LogicalPlan) -> Result<LogicalPlan> {
        // A subset of DataFusion's rules: those that keep a plan's streaming meaning. Rules that
        // turn subqueries into joins or split DISTINCT aggregates are left out, and so is filter
        // pushdown, which would push predicates into table scans that sources cannot apply.
        let rules: Vec<Arc<dyn OptimizerRule + Send + Sync>> = vec![
            Arc::new(datafusion_optimizer::simplify_expressions::SimplifyExpressions::new()),
            Arc::new(
                datafusion_optimizer::replace_distinct_aggregate::ReplaceDistinctWithAggregate::new(
                ),
            ),
            Arc::new(datafusion_optimizer::eliminate_filter::EliminateFilter::new()),
            // `FROM a, b WHERE a.k = b.k` becomes an inner join; join conditions split into
            // equi-keys (which partition the join) and the rest.
            Arc::new(crate::planner::join::JoinConditions),
            Arc::new(
                datafusion_optimizer::extract_equijoin_predicate::ExtractEquijoinPredicate::new(),
            ),
            Arc::new(
                datafusion_optimizer::eliminate_duplicated_expr::EliminateDuplicatedExpr::new(),
            ),
            Arc::new(datafusion_optimizer::optimize_projections::OptimizeProjections::new()),
        ];
        Optimizer::with_rules(rules)
            .optimize(plan, &OptimizerContext::new(), |_, _| {})
            .map_err(df_error)
    }

    /// Plans DDL expressions (computed columns, watermarks) over a schema, type-checked.
    fn plan_exprs(
        &self,
        schema: SchemaRef,
        exprs: Vec<(String, ast::Expr)>,
    ) -> Result<(Vec<Expr>, DFSchema)> {
        let df_schema = DFSchema::try_from_qualified_schema("t", &schema).map_err(df_error)?;
        let rel = self.sql_to_rel();
        let mut planned = vec![];
        for (name, e) in exprs {
            let mut e = e;
            crate::rewrite::rewrite(&mut e);
            planned.push(
                rel.sql_to_expr(e, &df_schema, &mut PlannerContext::new())
                    .map_err(df_error)?
                    .alias(name),
            );
        }
        let scan = LogicalPlanBuilder::scan("t", Arc::new(LogicalTableSource::new(schema)), None)
            .map_err(df_error)?;
        let plan = scan
            .project(planned)
            .map_err(df_error)?
            .build()
            .map_err(df_error)?;
        let plan = Analyzer::new()
            .execute_and_check(plan, &self.options, |_, _| {})
            .map_err(df_error)?;
        match plan {
            LogicalPlan::Projection(p) => {
                let exprs = p.expr.into_iter().map(|e| e.unalias()).collect();
                Ok((exprs, p.input.schema().as_ref().clone()))
            }
            _ => Err(Error::plan("internal: expected a projection")),
        }
    }

    fn create_table(&self, ddl: TableDdl) -> Result<TableDef> {
        let TableDdl {
            name,
            columns,
            watermark,
            primary_key,
            partitioned_by,
            options,
            ..
        } = ddl;
        let mut physical = vec![];
        let mut metadata = vec![];
        let mut virtual_columns = vec![];
        let mut computed_sql = vec![];
        for c in &columns {
            match c {
                ColumnDdl::Physical {
                    name,
                    data_type,
                    nullable,
                    metadata: key,
                    is_virtual,
                } => {
                    if let Some(key) = key {
                        metadata.push((physical.len(), key.clone()));
                    }
                    if *is_virtual {
                        virtual_columns.push(physical.len());
                    }
                    physical.push(Field::new(name, data_type.clone(), *nullable))
                }
                ColumnDdl::Computed { name, expr } => {
                    computed_sql.push((name.clone(), expr.clone()))
                }
            }
        }
        let mut seen = std::collections::HashSet::new();
        for c in &columns {
            if !seen.insert(c.name()) {
                return Err(Error::plan(format!(
                    "CREATE TABLE {name}: column '{}' is declared twice",
                    c.name()
                )));
            }
        }
        let physical_schema = Arc::new(Schema::new(physical.clone()));
        let mut fields = physical;
        let mut computed = vec![];
        if !computed_sql.is_empty() {
            let names: Vec<String> = computed_sql.iter().map(|(n, _)| n.clone()).collect();
            let (exprs, df_schema) = self
                .plan_exprs(physical_schema.clone(), computed_sql)
                .map_err(|e| Error::plan(format!("CREATE TABLE {name}: computed column: {e}")))?;
            for (n, e) in names.iter().zip(exprs) {
                let (_, field) = e.to_field(&df_schema).map_err(df_error)?;
                fields.push(Field::new(
                    n,
                    field.data_type().clone(),
                    field.is_nullable(),
                ));
                computed.push(physical_expr(&e, &df_schema)?);
            }
        }
        let schema = Arc::new(Schema::new(fields));
        let watermark = match watermark {
            None => None,
            Some((column, expr)) => {
                let index = schema.index_of(&column).map_err(|_| {
                    Error::plan(format!(
                        "CREATE TABLE {name}: WATERMARK FOR {column}: no such column"
                    ))
                })?;
                if !matches!(schema.field(index).data_type(), DataType::Timestamp(_, _)) {
                    return Err(Error::plan(format!(
                        "CREATE TABLE {name}: WATERMARK FOR {column}: the column must be TIMESTAMP(3) or TIMESTAMP_LTZ(3), not {}",
                        schema.field(index).data_type()
                    )));
                }
                let (exprs, df_schema) = self
                    .plan_exprs(schema.clone(), vec![("watermark".into(), expr)])
                    .map_err(|e| Error::plan(format!("CREATE TABLE {name}: WATERMARK: {e}")))?;
                let e = &exprs[0];
                let t = e.get_type(&df_schema).map_err(df_error)?;
                if !matches!(t, DataType::Timestamp(_, _)) {
                    return Err(Error::plan(format!("CREATE TABLE {name}: the WATERMARK expression must be a TIMESTAMP, not {t}")));
                }
                Some((index, fixed_delay(physical_expr(e, &df_schema)?, &schema)))
            }
        };
        for k in primary_key.iter().chain(partitioned_by.iter()) {
            if schema.index_of(k).is_err() {
                return Err(Error::plan(format!(
                    "CREATE TABLE {name}: key column '{k}' is not a column of the table"
                )));
            }
        }
        if options.get("connector").map(String::as_str) == Some("upsert-kafka") {
            if primary_key.is_empty() {
                return Err(Error::plan(format!(
                    "CREATE TABLE {name}: 'upsert-kafka' tables require to define a PRIMARY KEY constraint \
                     (PRIMARY KEY (...) NOT ENFORCED): the key of each record is the primary key"
                )));
            }
            if let Some(k) = primary_key
                .iter()
                .find(|k| physical_schema.index_of(k).is_err())
            {
                return Err(Error::plan(format!(
                    "CREATE TABLE {name}: primary key column '{k}' of an 'upsert-kafka' table must be a physical column"
                )));
            }
        }
        let mut options = options;
        // A filesystem table on S3 that sets no `s3.*` option of its own takes the job's
        // (`SET 's3.endpoint' = ...`), as checkpoint storage does.
        if options.get("connector").map(String::as_str) == Some("filesystem")
            && options
                .get("path")
                .is_some_and(|p| p.trim().starts_with("s3://"))
            && !options.keys().any(|k| k.starts_with("s3."))
        {
            for (k, v) in self.settings.iter().filter(|(k, _)| k.starts_with("s3.")) {
                options.insert(k.clone(), v.clone());
            }
        }
        Ok(TableDef {
            name,
            physical_schema,
            schema,
            computed,
            watermark,
            primary_key,
            partitioned_by,
            options,
            metadata,
            virtual_columns,
        })
    }

    /// Adds implicit casts so that the query's columns match the sink table's, as Flink does.
    fn cast_to_sink(&self, plan: LogicalPlan, sink: &TableDef) -> Result<LogicalPlan> {
        let target = &sink.sink_schema();
        let source = plan.schema().clone();
        if source.fields().len() != target.fields().len() {
            return Err(Error::plan(format!(
                "INSERT INTO {}: the query has {} columns [{}] but the table has {} [{}]",
                sink.name,
                source.fields().len(),
                source
                    .fields()
                    .iter()
                    .map(|f| f.name().as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                target.fields().len(),
                target
                    .fields()
                    .iter()
                    .map(|f| f.name().as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            )));
        }
        let mut exprs = vec![];
        for (i, ((q, from), to)) in source.iter().zip(target.fields().iter()).enumerate() {
            let col = Expr::Column(Column::new(q.cloned(), from.name()));
            if from.data_type() == to.data_type() {
                exprs.push(col.alias(to.name()));
            } else if arrow::compute::can_cast_types(from.data_type(), to.data_type()) {
                exprs.push(datafusion_expr::cast(col, to.data_type().clone()).alias(to.name()));
            } else {
                return Err(Error::plan(format!(
                    "INSERT INTO {}: column {} ('{}') is {} but the table's column '{}' is {}, and one cannot be cast to the other",
                    sink.name, i + 1, from.name(), from.data_type(), to.name(), to.data_type()
                )));
            }
        }
        LogicalPlanBuilder::from(plan)
            .project(exprs)
            .and_then(|b| b.build())
            .map_err(df_error)
    }

    /// Translates an optimized logical plan into streaming operators.
    pub fn to_stream(&self, plan: &LogicalPlan) -> Result<StreamNode> {
        Ok(match plan {
            LogicalPlan::TableScan(scan) => {
                let name = scan.table_name.table();
                let table = self.tables.get(name).cloned().ok_or_else(|| Error::plan(format!("unknown table {name}")))?;
                if !scan.filters.is_empty() {
                    return Err(Error::plan("internal: filters pushed into a scan"));
                }
                StreamNode::Scan {
                    table,
                    projection: scan.projection.clone(),
                    schema: arrow_schema(plan.schema()),
                    carry_source_row: false,
                }
            }
            LogicalPlan::Projection(p) => {
                let input = self.to_stream(&p.input)?;
                let exprs = p.expr.iter().map(|e| physical_expr(e, p.input.schema())).collect::<Result<_>>()?;
                StreamNode::Project { input: Box::new(input), exprs, schema: arrow_schema(&p.schema) }
            }
            LogicalPlan::Filter(f) => {
                if let Some(node) = crate::planner::rank::plan_rank(self, f)? {
                    return Ok(node);
                }
                let input = self.to_stream(&f.input)?;
                StreamNode::Filter { input: Box::new(input), predicate: physical_expr(&f.predicate, f.input.schema())? }
            }
            LogicalPlan::SubqueryAlias(a) => self.to_stream(&a.input)?,
            LogicalPlan::Union(u) => {
                let inputs = u.inputs.iter().map(|i| self.to_stream(i)).collect::<Result<Vec<_>>>()?;
                StreamNode::Union { inputs, schema: arrow_schema(&u.schema) }
            }
            LogicalPlan::Aggregate(a) => self.plan_aggregate(a)?,
            LogicalPlan::Values(v) => StreamNode::Values {
                rows: ValuesRows(values_batch(v)?),
            },
            LogicalPlan::Extension(ext) => {
                let Some(node) = ext.node.as_any().downcast_ref::<WindowTvfNode>() else {
                    return Err(Error::plan(format!("unsupported plan node {}", ext.node.name())));
                };
                let input = self.to_stream(&node.input)?;
                check_windowable(&input)?;
                if !input.is_append_only() {
                    return Err(Error::plan("window TVFs need an append-only input; this input is an updating result"));
                }
                let time = physical_expr(&Expr::Column(node.time_column.clone()), node.input.schema())?;
                StreamNode::WindowAssign { input: Box::new(input), time, kind: node.kind, schema: arrow_schema(&node.schema) }
            }
            LogicalPlan::Sort(_) => {
                return Err(Error::plan(
                    "ORDER BY on an unbounded stream would never produce a first row; remove it, or order by a window's \
                     results downstream (Top-N with ROW_NUMBER is planned in a later release)",
                ))
            }
            LogicalPlan::Limit(_) => {
                return Err(Error::plan("LIMIT is not supported on a stream yet; remove it, or filter with WHERE"))
            }
            LogicalPlan::Join(j) => {
                let left = self.to_stream(&j.left)?;
                let right = self.to_stream(&j.right)?;
                crate::planner::join::plan_join(j, left, right, &self.lookups.borrow())?
            }
            LogicalPlan::Window(w) => crate::planner::over::plan_over(self, w)?,
            other => return Err(Error::plan(format!("{} is not supported in a streaming query", other.display()))),
        })
    }

    fn plan_aggregate(&self, a: &datafusion_expr::logical_plan::Aggregate) -> Result<StreamNode> {
        let input_schema = a.input.schema();
        let mut input = self.to_stream(&a.input)?;
        let windowed =
            a.group_expr.iter().any(|g| window_marker(g).is_some()) || has_window_tvf(&a.input);
        if windowed {
            check_windowable(&input)?;
        }
        let late_sink = if windowed {
            self.late_sink(&mut input)?
        } else {
            None
        };
        let mut group = vec![];
        let mut window = AggWindow::None;
        for (pos, g) in a.group_expr.iter().enumerate() {
            if let Expr::GroupingSet(_) = g {
                return Err(Error::plan(
                    "GROUPING SETS, CUBE and ROLLUP are not supported in streaming queries",
                ));
            }
            if let Some((name, args)) = window_marker(g) {
                if !matches!(window, AggWindow::None) {
                    return Err(Error::plan("a GROUP BY may use only one group window"));
                }
                if !input.is_append_only() {
                    return Err(Error::plan(format!(
                        "GROUP BY {}(...) needs an append-only input, but its input is an updating result; \
                         aggregate without a window, or window the rows before they are aggregated",
                        name.to_uppercase()
                    )));
                }
                let millis = |i: usize| -> Result<i64> {
                    args.get(i)
                        .ok_or_else(|| {
                            Error::plan(format!(
                                "{}: missing interval argument",
                                name.to_uppercase()
                            ))
                        })
                        .and_then(|e| {
                            interval_millis(e)
                                .map_err(|m| Error::plan(format!("{}: {m}", name.to_uppercase())))
                        })
                };
                let time = physical_expr(&args[0], input_schema)?;
                let kind = match name.as_str() {
                    "tumble" => WindowKind::Tumble {
                        size: millis(1)?,
                        offset: 0,
                    },
                    "hop" => WindowKind::Hop {
                        slide: millis(1)?,
                        size: millis(2)?,
                    },
                    _ => {
                        window = AggWindow::Session {
                            gap: millis(1)?,
                            time,
                            output: SessionOutput::Struct(pos),
                        };
                        continue;
                    }
                };
                validate_window(&kind).map_err(Error::plan)?;
                // Append the window's bounds to the rows and group by them.
                let n = input.schema().fields().len();
                let mut fields: Vec<Field> = input
                    .schema()
                    .fields()
                    .iter()
                    .map(|f| f.as_ref().clone())
                    .collect();
                for f in WINDOW_FIELDS {
                    fields.push(Field::new(format!("__{f}"), window_time_type(), false));
                }
                let schema = Arc::new(Schema::new(fields));
                input = StreamNode::WindowAssign {
                    input: Box::new(input),
                    time,
                    kind,
                    schema,
                };
                let start_key = group.len();
                group.push(column_expr("__window_start", n));
                group.push(column_expr("__window_end", n + 1));
                window = AggWindow::Assigned {
                    start_key,
                    end_key: start_key + 1,
                    as_struct: true,
                };
                continue;
            }
            group.push(physical_expr(g, input_schema)?);
        }
        if matches!(window, AggWindow::None) {
            if let Some(node) = find_window_tvf(&a.input) {
                window = tvf_window(a, node, &mut group)?;
                if !input.is_append_only() {
                    return Err(Error::plan("window aggregation needs an append-only input"));
                }
            }
        }
        // A cascaded window aggregation: GROUP BY the window bounds of a window aggregation's
        // results (Nexmark q5's maximum per window of per-auction counts) is windowed too, as
        // in Flink: one final row per window when the watermark passes its end, instead of an
        // updating result that changes with every batch of counts.
        if matches!(window, AggWindow::None) && input.is_append_only() && !fires_on_proctime(&input)
        {
            if let Some((s, e)) = crate::plan::properties::window_columns(&input) {
                let pos = |c: usize| {
                    group.iter().position(|g| {
                        g.downcast_ref::<datafusion_physical_expr::expressions::Column>()
                            .is_some_and(|x| x.index() == c)
                    })
                };
                if let (Some(start_key), Some(end_key)) = (pos(s), pos(e)) {
                    window = AggWindow::Assigned {
                        start_key,
                        end_key,
                        as_struct: false,
                    };
                }
            }
        }
        let mut aggs = vec![];
        for (i, e) in a.aggr_expr.iter().enumerate() {
            let output_type = a.schema.field(a.group_expr.len() + i).data_type().clone();
            aggs.push(agg_call(e.clone().unalias(), input_schema, output_type)?);
        }
        let mut emit = match window {
            AggWindow::None => EmitPolicy::default(),
            _ => self.emit_policy()?,
        };
        match &window {
            AggWindow::Assigned { .. } => {
                emit.processing_time = crate::plan::properties::windows_on_proctime(&input);
            }
            AggWindow::Session { time, .. } => {
                let on_proctime = time
                    .downcast_ref::<datafusion_physical_expr::expressions::Column>()
                    .is_some_and(|c| crate::plan::properties::is_proctime(&input, c.index()));
                if on_proctime {
                    return Err(Error::plan(
                        "session windows on processing time (PROCTIME()) are not supported yet",
                    ));
                }
            }
            AggWindow::None => {}
        }
        if matches!(window, AggWindow::Session { .. }) && emit.is_updating() {
            return Err(Error::plan(
                "early firing and allowed lateness are not supported for session windows yet; \
                 unset 'table.exec.emit.*' for this query",
            ));
        }
        Ok(StreamNode::Aggregate {
            late_sink,
            input: Box::new(keep_row_time(input)),
            group,
            aggs,
            window,
            emit,
            schema: arrow_schema(&a.schema),
        })
    }

    fn emit_policy(&self) -> Result<EmitPolicy> {
        let options = crate::config::EmitOptions::parse(&self.settings)?;
        Ok(EmitPolicy {
            early_fire_ms: options.early_fire.map(|d| d.as_millis() as u64),
            allowed_lateness_ms: options.allow_lateness.as_millis() as i64,
            ..Default::default()
        })
    }
}

/// Evaluates the (constant) rows of a `VALUES` clause into one batch.
fn values_batch(
    v: &datafusion_expr::logical_plan::Values,
) -> Result<arrow::record_batch::RecordBatch> {
    let schema = arrow_schema(&v.schema);
    let one_row = arrow::record_batch::RecordBatch::try_new_with_options(
        Arc::new(Schema::empty()),
        vec![],
        &arrow::record_batch::RecordBatchOptions::new().with_row_count(Some(1)),
    )?;
    let empty = DFSchema::empty();
    let mut columns = vec![];
    for (c, field) in schema.fields().iter().enumerate() {
        let mut cells = vec![];
        for row in &v.values {
            let cell = physical_expr(&row[c], &empty)?
                .evaluate(&one_row)
                .and_then(|x| x.into_array(1))
                .map_err(df_error)?;
            let cell = if cell.data_type() == field.data_type() {
                cell
            } else {
                arrow::compute::cast(&cell, field.data_type())?
            };
            cells.push(cell);
        }
        let refs: Vec<&dyn arrow::array::Array> = cells.iter().map(|a| a.as_ref()).collect();
        columns.push(arrow::compute::concat(&refs)?);
    }
    Ok(arrow::record_batch::RecordBatch::try_new(schema, columns)?)
}

impl Catalog {
    /// For a window over a table with `'late-data.sink'`: rewrites `input` so that each row
    /// carries its whole source row as a last column, and says where late rows go.
    fn late_sink(&self, input: &mut StreamNode) -> Result<Option<LateSink>> {
        let mut tables = vec![];
        input.scanned_tables(&mut tables);
        let with_sink: Vec<&String> = tables
            .iter()
            .filter(|t| {
                self.tables
                    .get(*t)
                    .is_some_and(|d| d.options.contains_key("late-data.sink"))
            })
            .collect();
        let Some(source) = with_sink.first() else {
            return Ok(None);
        };
        let source = self.tables[*source].clone();
        let target = &source.options["late-data.sink"];
        let sink = self.tables.get(target).cloned().ok_or_else(|| {
            Error::plan(format!(
                "table '{}': 'late-data.sink' = '{target}': no such table",
                source.name
            ))
        })?;
        let (from, to) = (&source.physical_schema, &sink.sink_schema());
        let same = from.fields().len() == to.fields().len()
            && from
                .fields()
                .iter()
                .zip(to.fields())
                .all(|(a, b)| a.data_type() == b.data_type());
        if !same {
            return Err(Error::plan(format!(
                "table '{}': 'late-data.sink' table '{}' must have the same column types as '{}' ({})",
                source.name,
                sink.name,
                source.name,
                from.fields().iter().map(|f| format!("{} {}", f.name(), f.data_type())).collect::<Vec<_>>().join(", ")
            )));
        }
        let original = std::mem::replace(
            input,
            StreamNode::Values {
                rows: ValuesRows(arrow::record_batch::RecordBatch::new_empty(Arc::new(
                    Schema::empty(),
                ))),
            },
        );
        let column = original.schema().fields().len();
        *input = carry_source_row(original).map_err(|what| {
            Error::plan(format!(
                "table '{}' has 'late-data.sink', but the window reads it through {what}; \
                 late rows can be routed only when the window reads the table through projections and filters",
                source.name
            ))
        })?;
        Ok(Some(LateSink {
            column,
            table: sink,
        }))
    }
}

/// Rewrites a plan so that its output gains the scanned table's whole row as a last column.
fn carry_source_row(node: StreamNode) -> std::result::Result<StreamNode, &'static str> {
    let with_row = |schema: &SchemaRef, row: &arrow::datatypes::FieldRef| {
        let mut fields: Vec<arrow::datatypes::FieldRef> = schema.fields().iter().cloned().collect();
        fields.push(row.clone());
        Arc::new(Schema::new(fields))
    };
    Ok(match node {
        StreamNode::Scan {
            table,
            projection,
            schema,
            ..
        } => {
            let row = Arc::new(Field::new(
                SOURCE_ROW,
                DataType::Struct(table.physical_schema.fields().clone()),
                false,
            ));
            StreamNode::Scan {
                schema: with_row(&schema, &row),
                table,
                projection,
                carry_source_row: true,
            }
        }
        StreamNode::Filter { input, predicate } => StreamNode::Filter {
            input: Box::new(carry_source_row(*input)?),
            predicate,
        },
        StreamNode::Project {
            input,
            mut exprs,
            schema,
        } => {
            let input = carry_source_row(*input)?;
            let in_schema = input.schema();
            let at = in_schema.fields().len() - 1;
            let row = in_schema.field(at).clone();
            exprs.push(column_expr(SOURCE_ROW, at));
            StreamNode::Project {
                input: Box::new(input),
                exprs,
                schema: with_row(&schema, &Arc::new(row)),
            }
        }
        StreamNode::WindowAssign {
            input,
            time,
            kind,
            schema,
        } => {
            // Window columns go after the carried row; a projection moves the row back to the end.
            let input = carry_source_row(*input)?;
            let in_schema = input.schema();
            let n = in_schema.fields().len() - 1;
            let mut fields: Vec<arrow::datatypes::FieldRef> =
                in_schema.fields().iter().cloned().collect();
            fields.extend(schema.fields().iter().skip(n).cloned());
            let assigned = StreamNode::WindowAssign {
                input: Box::new(input),
                time,
                kind,
                schema: Arc::new(Schema::new(fields.clone())),
            };
            let mut order: Vec<usize> = (0..n).collect();
            order.extend(n + 1..fields.len());
            order.push(n);
            let exprs = order
                .iter()
                .map(|i| column_expr(fields[*i].name(), *i))
                .collect();
            let schema = Arc::new(Schema::new(
                order.iter().map(|i| fields[*i].clone()).collect::<Vec<_>>(),
            ));
            StreamNode::Project {
                input: Box::new(assigned),
                exprs,
                schema,
            }
        }
        StreamNode::Union { .. } => return Err("UNION ALL"),
        StreamNode::Aggregate { .. } => return Err("another aggregation"),
        StreamNode::Values { .. } => return Err("VALUES"),
        StreamNode::Join { .. } => return Err("a join"),
        StreamNode::Rank { .. } => return Err("a Top-N"),
        StreamNode::Over { .. } => return Err("an OVER aggregate"),
        StreamNode::LookupJoin { .. } => return Err("a lookup join"),
        StreamNode::TemporalJoin { .. } => return Err("a temporal join"),
    })
}

/// Whether the windows whose results reach `node` close on processing time (their results
/// come whenever the clock says, so grouping them again by window is not windowed).
fn fires_on_proctime(node: &StreamNode) -> bool {
    match node {
        StreamNode::Aggregate { emit, .. } => emit.processing_time,
        StreamNode::Project { input, .. } | StreamNode::Filter { input, .. } => {
            fires_on_proctime(input)
        }
        other => crate::plan::properties::windows_on_proctime(other),
    }
}

fn column_expr(name: &str, index: usize) -> PhysExpr {
    Arc::new(datafusion_physical_expr::expressions::Column::new(
        name, index,
    ))
}

fn window_marker(e: &Expr) -> Option<(String, Vec<Expr>)> {
    match e {
        Expr::ScalarFunction(ScalarFunction { func, args })
            if WINDOW_MARKERS.contains(&func.name()) =>
        {
            Some((func.name().to_string(), args.clone()))
        }
        Expr::Alias(a) => window_marker(&a.expr),
        _ => None,
    }
}

/// For `GROUP BY window_start, window_end` over a window TVF: how the aggregation windows.
/// TUMBLE, HOP and CUMULATE rows carry their window already; SESSION rows carry a one-row
/// session that the aggregation merges, keyed by the TVF's `PARTITION BY` columns.
fn tvf_window(
    a: &datafusion_expr::logical_plan::Aggregate,
    node: &WindowTvfNode,
    group: &mut Vec<PhysExpr>,
) -> Result<AggWindow> {
    let pos = |name: &str| {
        a.group_expr
            .iter()
            .position(|g| matches!(g, Expr::Column(c) if c.name == name))
    };
    let (Some(start), Some(end)) = (pos("window_start"), pos("window_end")) else {
        return Err(Error::plan(
            "an aggregation over a window TVF must GROUP BY both window_start and window_end",
        ));
    };
    let WindowKind::Session { gap } = node.kind else {
        return Ok(AggWindow::Assigned {
            start_key: start,
            end_key: end,
            as_struct: false,
        });
    };
    let mut keys: Vec<String> = a
        .group_expr
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != start && *i != end)
        .map(|(_, g)| match g {
            Expr::Column(c) => Ok(c.name.clone()),
            other => Err(Error::plan(format!(
                "GROUP BY over a SESSION window TVF takes columns, not {other}"
            ))),
        })
        .collect::<Result<_>>()?;
    let mut partition = node.partition.clone();
    keys.sort();
    partition.sort();
    if keys != partition {
        return Err(Error::plan(format!(
            "a SESSION window TVF must GROUP BY window_start, window_end and exactly its PARTITION BY columns ({}), \
             but this GROUP BY has [{}]; write TABLE(SESSION(TABLE t PARTITION BY ({}), DESCRIPTOR(ts), gap))",
            if partition.is_empty() { "none".to_string() } else { partition.join(", ") },
            keys.join(", "),
            keys.join(", ")
        )));
    }
    let time = group[start].clone();
    group.remove(start.max(end));
    group.remove(start.min(end));
    Ok(AggWindow::Session {
        gap,
        time,
        output: SessionOutput::Columns { start, end },
    })
}

fn find_window_tvf(plan: &LogicalPlan) -> Option<&WindowTvfNode> {
    match plan {
        LogicalPlan::Extension(e) => e.node.as_any().downcast_ref::<WindowTvfNode>(),
        LogicalPlan::Projection(_) | LogicalPlan::Filter(_) | LogicalPlan::SubqueryAlias(_) => {
            plan.inputs().into_iter().find_map(find_window_tvf)
        }
        _ => None,
    }
}

fn has_window_tvf(plan: &LogicalPlan) -> bool {
    find_window_tvf(plan).is_some()
}

/// The SESSION TVF only makes sense under the aggregation that merges its sessions.
fn check_session_tvfs(node: &StreamNode, merged: bool) -> Result<()> {
    match node {
        StreamNode::Aggregate { input, window, .. } => {
            let merging = matches!(
                window,
                AggWindow::Session {
                    output: SessionOutput::Columns { .. },
                    ..
                }
            );
            check_session_tvfs(input, merging)
        }
        StreamNode::WindowAssign { input, kind, .. } => {
            if matches!(kind, WindowKind::Session { .. }) && !merged {
                return Err(Error::plan(
                    "the SESSION window TVF must be aggregated: GROUP BY window_start, window_end and its PARTITION BY columns",
                ));
            }
            check_session_tvfs(input, false)
        }
        StreamNode::Project { input, .. } | StreamNode::Filter { input, .. } => {
            check_session_tvfs(input, merged)
        }
        StreamNode::Union { inputs, .. } => {
            inputs.iter().try_for_each(|i| check_session_tvfs(i, false))
        }
        StreamNode::Join { left, right, .. } | StreamNode::TemporalJoin { left, right, .. } => {
            check_session_tvfs(left, false)?;
            check_session_tvfs(right, false)
        }
        StreamNode::Rank { input, .. }
        | StreamNode::Over { input, .. }
        | StreamNode::LookupJoin { input, .. } => check_session_tvfs(input, false),
        StreamNode::Scan { .. } | StreamNode::Values { .. } => Ok(()),
    }
}

/// Event-time windows need rows that arrive in event-time order up to the watermark; a regular
/// join emits a match whenever its second row arrives, however old the first one is.
/// HOP windows assigned as copies of each row: the projection above the assignment keeps the
/// rows' time (as a last column, read by no aggregate), so that the aggregation can tell a
/// row's last window and count a late row once.
fn keep_row_time(input: StreamNode) -> StreamNode {
    use datafusion_physical_expr::expressions::Column;
    let StreamNode::Project {
        input: below,
        mut exprs,
        schema,
    } = input
    else {
        return input;
    };
    let mut node = &*below;
    while let StreamNode::Filter { input, .. } = node {
        node = input;
    }
    let time = match node {
        StreamNode::WindowAssign {
            time,
            kind: WindowKind::Hop { .. },
            schema: assigned,
            ..
        } => time
            .downcast_ref::<Column>()
            .map(|c| (c.index(), assigned.field(c.index()).clone())),
        _ => None,
    };
    let Some((at, field)) = time.filter(|(at, _)| {
        !exprs
            .iter()
            .any(|e| e.downcast_ref::<Column>().is_some_and(|c| c.index() == *at))
    }) else {
        return StreamNode::Project {
            input: below,
            exprs,
            schema,
        };
    };
    exprs.push(Arc::new(Column::new("__sluice_row_time", at)));
    let mut fields: Vec<_> = schema.fields().iter().cloned().collect();
    fields.push(Arc::new(
        field.as_ref().clone().with_name("__sluice_row_time"),
    ));
    StreamNode::Project {
        input: below,
        exprs,
        schema: Arc::new(arrow::datatypes::Schema::new(fields)),
    }
}

fn check_windowable(input: &StreamNode) -> Result<()> {
    if crate::plan::properties::has_regular_join(input) {
        return Err(Error::plan(
            "a regular join's output has no time attribute and cannot be windowed; window the inputs \
             and join them on window_start and window_end (a window join), or bound the join with a time \
             interval (an interval join)",
        ));
    }
    Ok(())
}

pub(crate) fn agg_call(e: Expr, schema: &DFSchema, output_type: DataType) -> Result<AggCall> {
    let Expr::AggregateFunction(AggregateFunction { func, params }) = &e else {
        return Err(Error::plan(format!("unsupported aggregate expression {e}")));
    };
    let f = match func.name() {
        "count" => AggFunc::Count,
        "sum" => AggFunc::Sum,
        "avg" | "mean" => AggFunc::Avg,
        "min" => AggFunc::Min,
        "max" => AggFunc::Max,
        other => {
            return Err(Error::plan(format!(
                "aggregate function {} is not supported in streaming queries yet (supported: COUNT, SUM, AVG, MIN, MAX)",
                other.to_uppercase()
            )))
        }
    };
    if !params.order_by.is_empty() {
        return Err(Error::plan(format!(
            "ORDER BY inside {} is not supported",
            func.name().to_uppercase()
        )));
    }
    let arg = match params.args.as_slice() {
        [] => None,
        [Expr::Literal(v, _)] if f == AggFunc::Count && !v.is_null() => None,
        #[allow(deprecated)]
        [Expr::Wildcard { .. }] if f == AggFunc::Count => None,
        [a] => Some(physical_expr(a, schema)?),
        _ => {
            return Err(Error::plan(format!(
                "{} takes one argument",
                func.name().to_uppercase()
            )))
        }
    };
    if arg.is_none() && f != AggFunc::Count {
        return Err(Error::plan(format!(
            "{} needs an argument",
            func.name().to_uppercase()
        )));
    }
    let filter = match &params.filter {
        Some(f) => Some(physical_expr(f, schema)?),
        None => None,
    };
    Ok(AggCall {
        func: f,
        arg,
        distinct: params.distinct,
        filter,
        output_type,
    })
}

/// A physical expression for `e` over `schema`.
/// `ts - INTERVAL '4' SECOND` (the usual watermark) computed per row as a duration: the
/// interval form goes through calendar arithmetic row by row, which costs as much as a cheap
/// query. Other expressions are kept as they are.
fn fixed_delay(expr: PhysExpr, schema: &Schema) -> PhysExpr {
    use arrow::datatypes::TimeUnit;
    use datafusion_common::ScalarValue;
    use datafusion_physical_expr::expressions::{BinaryExpr, Literal};
    let Some(b) = expr.downcast_ref::<BinaryExpr>() else {
        return expr;
    };
    let Some(lit) = b.right().downcast_ref::<Literal>() else {
        return expr;
    };
    let delay_ms = match lit.value() {
        ScalarValue::IntervalMonthDayNano(Some(i))
            if i.months == 0 && i.nanoseconds % 1_000_000 == 0 =>
        {
            Some(i.days as i64 * 86_400_000 + i.nanoseconds / 1_000_000)
        }
        ScalarValue::IntervalDayTime(Some(i)) => {
            Some(i.days as i64 * 86_400_000 + i.milliseconds as i64)
        }
        _ => None,
    };
    // A TIMESTAMP(3) column: minus milliseconds, it stays one.
    let millis = |e: &PhysExpr| {
        e.downcast_ref::<datafusion_physical_expr::expressions::Column>()
            .is_some()
            && matches!(
                e.data_type(schema),
                Ok(DataType::Timestamp(TimeUnit::Millisecond, _))
            )
    };
    match delay_ms {
        Some(ms) if *b.op() == datafusion_expr::Operator::Minus && millis(b.left()) => {
            Arc::new(BinaryExpr::new(
                b.left().clone(),
                datafusion_expr::Operator::Minus,
                Arc::new(Literal::new(ScalarValue::DurationMillisecond(Some(ms)))),
            ))
        }
        _ => expr,
    }
}

pub fn physical_expr(e: &Expr, schema: &DFSchema) -> Result<PhysExpr> {
    use datafusion_common::tree_node::TreeNode;
    let subquery = e
        .exists(|x| {
            Ok(matches!(
                x,
                Expr::InSubquery(_) | Expr::Exists(_) | Expr::ScalarSubquery(_)
            ))
        })
        .unwrap_or(false);
    if subquery {
        return Err(Error::plan(
            "subqueries in expressions (IN, EXISTS, scalar subqueries) are not supported in streaming \
             queries yet; write them as a JOIN",
        ));
    }
    create_physical_expr(e, schema, &ExecutionProps::new(), &Default::default()).map_err(df_error)
}

pub(crate) fn arrow_schema(s: &DFSchema) -> SchemaRef {
    Arc::new(s.as_arrow().clone())
}

/// DataFusion's errors, minus the "Error during planning:" prefixes users don't need.
pub fn df_error(e: DataFusionError) -> Error {
    let e = e.find_root();
    let message = match e {
        DataFusionError::Plan(m)
        | DataFusionError::Execution(m)
        | DataFusionError::NotImplemented(m) => m.clone(),
        DataFusionError::SchemaError(s, _) => s.to_string(),
        DataFusionError::SQL(p, _) => p.to_string(),
        other => other.to_string(),
    };
    Error::Plan(message)
}

impl ContextProvider for Catalog {
    fn get_table_source(
        &self,
        name: TableReference,
    ) -> datafusion_common::Result<Arc<dyn TableSource>> {
        let key = name.table();
        if let Some(t) = self.tables.get(key) {
            return Ok(Arc::new(LogicalTableSource::new(t.schema.clone())));
        }
        if let Some(v) = self.views.get(key) {
            return Ok(Arc::new(ViewSource(v.clone())));
        }
        datafusion_common::plan_err!(
            "table or view '{name}' not found (defined: {})",
            self.table_names()
        )
    }

    fn get_expr_planners(&self) -> &[Arc<dyn ExprPlanner>] {
        &self.expr_planners
    }

    fn get_relation_planners(&self) -> &[Arc<dyn RelationPlanner>] {
        &self.relation_planners
    }

    fn get_function_meta(&self, name: &str) -> Option<Arc<ScalarUDF>> {
        self.scalar.get(&name.to_lowercase()).cloned()
    }

    fn get_higher_order_meta(&self, _name: &str) -> Option<Arc<HigherOrderUDF>> {
        None
    }

    fn get_aggregate_meta(&self, name: &str) -> Option<Arc<AggregateUDF>> {
        self.aggregate.get(&name.to_lowercase()).cloned()
    }

    fn get_window_meta(&self, name: &str) -> Option<Arc<WindowUDF>> {
        // Ranking functions, for Top-N and deduplication.
        match name.to_lowercase().as_str() {
            "row_number" => Some(datafusion_functions_window::row_number::row_number_udwf()),
            _ => None,
        }
    }

    fn get_variable_type(&self, _variable_names: &[String]) -> Option<DataType> {
        None
    }

    fn options(&self) -> &ConfigOptions {
        &self.options
    }

    fn udf_names(&self) -> Vec<String> {
        self.scalar.keys().cloned().collect()
    }

    fn higher_order_function_names(&self) -> Vec<String> {
        vec![]
    }

    fn udaf_names(&self) -> Vec<String> {
        self.aggregate.keys().cloned().collect()
    }

    fn udwf_names(&self) -> Vec<String> {
        vec![]
    }
}

/// A view: its plan is inlined wherever the view is scanned.
#[derive(Debug)]
struct ViewSource(LogicalPlan);

impl TableSource for ViewSource {
    fn schema(&self) -> SchemaRef {
        arrow_schema(self.0.schema())
    }

    fn get_logical_plan(&self) -> Option<std::borrow::Cow<'_, LogicalPlan>> {
        Some(std::borrow::Cow::Borrowed(&self.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Grouping a window aggregation's results by their window is a window aggregation too:
    /// append-only, one row per window (also when a projection renames the bounds).
    #[test]
    fn a_cascaded_window_aggregation_is_windowed() {
        let ddl = "CREATE TABLE bids (auction BIGINT, price BIGINT, ts TIMESTAMP(3), \
                   pt AS PROCTIME(), WATERMARK FOR ts AS ts - INTERVAL '1' SECOND) \
                   WITH ('connector' = 'filesystem', 'path' = '/tmp/none', 'format' = 'csv'); \
                   CREATE TABLE out (s TIMESTAMP(3), e TIMESTAMP(3), m BIGINT) \
                   WITH ('connector' = 'blackhole');";
        let counts = "SELECT window_start AS ws, window_end AS we, auction, COUNT(*) AS num \
                      FROM TABLE(HOP(TABLE bids, DESCRIPTOR(ts), INTERVAL '2' SECOND, INTERVAL '10' SECOND)) \
                      GROUP BY window_start, window_end, auction";
        let on_proctime = counts.replace("DESCRIPTOR(ts)", "DESCRIPTOR(pt)");
        for (outer, windowed) in [
            // Windows that close on the clock: their results come at any time.
            (
                format!("SELECT ws, we, MAX(num) FROM ({on_proctime}) GROUP BY ws, we"),
                false,
            ),
            (
                format!("SELECT ws, we, MAX(num) FROM ({counts}) GROUP BY ws, we"),
                true,
            ),
            // Not grouped by both bounds: an updating aggregation, as before.
            (
                format!("SELECT ws, ws AS e, MAX(num) FROM ({counts}) GROUP BY ws"),
                false,
            ),
        ] {
            let plan = plan_script(&format!("{ddl} INSERT INTO out {outer};")).unwrap();
            fn outer_aggregate(n: &StreamNode) -> &StreamNode {
                match n {
                    StreamNode::Aggregate { .. } => n,
                    other => outer_aggregate(other.inputs()[0]),
                }
            }
            let agg = outer_aggregate(&plan.pipelines[0].query);
            let StreamNode::Aggregate { window, .. } = agg else {
                unreachable!()
            };
            assert_eq!(
                matches!(window, AggWindow::Assigned { .. }),
                windowed,
                "{outer}: {window:?}"
            );
            assert_eq!(agg.is_append_only(), windowed, "{outer}");
        }
    }

    /// The watermark `ts - INTERVAL ...` computed as a duration gives the same timestamps as the
    /// interval form (nulls included); other forms are left alone.
    #[test]
    fn a_fixed_watermark_delay_is_a_duration() {
        use arrow::array::{Array, TimestampMillisecondArray};
        use arrow::record_batch::RecordBatch;
        let ts = DataType::Timestamp(arrow::datatypes::TimeUnit::Millisecond, None);
        let schema = Arc::new(Schema::new(vec![Field::new("ts", ts, true)]));
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![Arc::new(TimestampMillisecondArray::from(vec![
                Some(1_700_000_000_123),
                None,
                Some(5),
                Some(-86_400_000),
            ]))],
        )
        .unwrap();
        let catalog = Catalog::new();
        for (sql, rewritten) in [
            ("ts - INTERVAL '4' SECOND", true),
            ("ts - INTERVAL '1' DAY", true),
            ("ts - INTERVAL '0.25' SECOND", true),
            ("ts - INTERVAL '1' MONTH", false),
            ("ts + INTERVAL '4' SECOND", false),
        ] {
            let expr = sqlparser::parser::Parser::new(&sqlparser::dialect::GenericDialect {})
                .try_with_sql(sql)
                .unwrap()
                .parse_expr()
                .unwrap();
            let (exprs, df_schema) = catalog
                .plan_exprs(schema.clone(), vec![("w".into(), expr)])
                .unwrap();
            let original = physical_expr(&exprs[0], &df_schema).unwrap();
            let fixed = fixed_delay(original.clone(), &schema);
            assert_eq!(!Arc::ptr_eq(&fixed, &original), rewritten, "{sql}");
            let want = original.evaluate(&batch).unwrap().into_array(4).unwrap();
            let got = fixed.evaluate(&batch).unwrap().into_array(4).unwrap();
            assert_eq!(got.data_type(), want.data_type(), "{sql}");
            assert_eq!(&got, &want, "{sql}");
            assert_eq!(got.null_count(), 1);
        }
    }
}
