//! PostgreSQL's `pg_catalog` and `information_schema` over one tenant's objects, so that psql's
//! `\d` family, Grafana and other clients can read what a tenant has.
//!
//! The tables and the functions clients call (`format_type`, `pg_get_expr`, `has_*_privilege`,
//! ...) come from `datafusion-pg-catalog`, as do the rewrites that make clients' catalog SQL plan
//! on DataFusion (`OPERATOR(pg_catalog.~)`, `COLLATE`, `'x'::regclass`, ...). What is Sluice's
//! own here:
//! - the catalog is built per query from the caller's tenant only: it holds one database (the
//!   tenant) with one schema (`public`), and names are listed in a fixed order, so that an oid
//!   read by one query names the same relation in the next (psql's `\d x` takes two);
//! - materialized views are `relkind = 'm'`, as `\dm` expects;
//! - a table or view that is not a materialized view is listed, with its columns, but reading
//!   it says why it cannot be read.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock, Weak};

use arrow::array::{Array, ArrayRef, BooleanArray, StringArray};
use arrow::datatypes::DataType;
use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use async_trait::async_trait;
use datafusion::catalog::{CatalogProviderList, SchemaProvider, Session, TableProvider};
use datafusion::datasource::{MemTable, TableType};
use datafusion::error::{DataFusionError, Result as DfResult};
use datafusion::logical_expr::Expr;
use datafusion::physical_plan::ExecutionPlan;
use datafusion::prelude::{SessionConfig, SessionContext};
use datafusion_pg_catalog::pg_catalog::catalog_info::CatalogInfo;
use datafusion_pg_catalog::pg_catalog::context::{PgCatalogContextProvider, Role};
use datafusion_pg_catalog::pg_catalog::{
    self as pgc, PgCatalogSchemaProvider, PgCatalogStaticTables,
};
use datafusion_pg_catalog::sql::PostgresCompatibilityParser;

use crate::catalog::ObjectKind;
use crate::error::ApiError;

/// The schema every tenant object is in.
pub const SCHEMA: &str = "public";

fn internal(e: impl std::fmt::Display) -> ApiError {
    ApiError::internal(format!("pg_catalog: {e}"))
}

/// PostgreSQL's own catalog rows (types, functions, operators), read once.
fn static_tables() -> Result<Arc<PgCatalogStaticTables>, ApiError> {
    static TABLES: OnceLock<Result<Arc<PgCatalogStaticTables>, String>> = OnceLock::new();
    TABLES
        .get_or_init(|| {
            PgCatalogStaticTables::try_new()
                .map(Arc::new)
                .map_err(|e| e.to_string())
        })
        .clone()
        .map_err(internal)
}

/// The parser that rewrites clients' catalog SQL into SQL DataFusion plans.
pub fn parser() -> &'static PostgresCompatibilityParser {
    static PARSER: OnceLock<PostgresCompatibilityParser> = OnceLock::new();
    PARSER.get_or_init(PostgresCompatibilityParser::new)
}

/// Parts of client catalog queries DataFusion cannot plan, with what they come to on Sluice
/// (whitespace does not matter). psql's `\d+` lists storage options (`reloptions`) with an
/// `array(SELECT ...)` constructor; Sluice's relations have none.
const CLIENT_FRAGMENTS: [(&str, &str); 1] = [(
    "pg_catalog.array_to_string(c.reloptions || array(select 'toast.' || x from pg_catalog.unnest(tc.reloptions) x), ', ')",
    "''",
)];

/// `sql` with the client fragments of [`CLIENT_FRAGMENTS`] replaced (as is when it has none).
pub fn replace_client_fragments(sql: &str) -> std::borrow::Cow<'_, str> {
    let squeeze = |t: &str| t.split_whitespace().collect::<Vec<_>>().join(" ");
    let squeezed = squeeze(sql);
    let mut out = squeezed.clone();
    for (fragment, replacement) in CLIENT_FRAGMENTS {
        out = out.replace(&squeeze(fragment), replacement);
    }
    if out == squeezed {
        std::borrow::Cow::Borrowed(sql)
    } else {
        std::borrow::Cow::Owned(out)
    }
}

/// A session context whose one database is the tenant's, with `public` as its schema.
pub fn context(tenant: &str) -> SessionContext {
    let config = SessionConfig::new()
        .with_default_catalog_and_schema(tenant, SCHEMA)
        .with_information_schema(true);
    SessionContext::new_with_config(config)
}

/// Whether a relation a query names is one of the catalog's (rather than a tenant object).
pub fn is_catalog_table(schema: Option<&str>, table: &str) -> bool {
    match schema {
        Some(s) => {
            s.eq_ignore_ascii_case("pg_catalog") || s.eq_ignore_ascii_case("information_schema")
        }
        None => pgc::PG_CATALOG_TABLES.contains(&table.to_ascii_lowercase().as_str()),
    }
}

/// Registers `pg_catalog` and the functions clients call on `ctx` (made by [`context`]), whose
/// `public` schema already holds the tenant's objects; `kinds` says which kind each is.
pub fn register(
    ctx: &SessionContext,
    tenant: &str,
    kinds: HashMap<String, ObjectKind>,
) -> Result<(), ApiError> {
    let statics = static_tables()?;
    let info = TenantCatalog {
        list: Arc::downgrade(ctx.state().catalog_list()),
        tenant: tenant.to_string(),
    };
    let inner = PgCatalogSchemaProvider::try_new(
        info,
        statics.clone(),
        TenantRole {
            tenant: tenant.to_string(),
        },
    )
    .map_err(internal)?;
    ctx.catalog(tenant)
        .ok_or_else(|| internal("no catalog for the tenant"))?
        .register_schema(
            "pg_catalog",
            Arc::new(TenantPgCatalog {
                inner: Arc::new(inner),
                kinds,
                class: Default::default(),
            }),
        )
        .map_err(internal)?;
    ctx.register_udf(pgc::create_current_database_udf(tenant));
    ctx.register_udf(pgc::create_current_schema_udf());
    ctx.register_udf(pgc::create_current_schemas_udf());
    ctx.register_udf(pgc::create_pg_get_userbyid_udf());
    for name in [
        "has_table_privilege",
        "has_schema_privilege",
        "has_database_privilege",
        "has_any_column_privilege",
    ] {
        ctx.register_udf(pgc::has_privilege_udf::create_has_privilege_udf(name));
    }
    ctx.register_udf(pgc::create_pg_table_is_visible());
    ctx.register_udf(pgc::format_type::create_format_type_udf());
    ctx.register_udf(pgc::create_session_user_udf());
    ctx.register_udtf("pg_get_keywords", statics.pg_get_keywords.clone());
    ctx.register_udf(pgc::pg_get_expr_udf::create_pg_get_expr_udf());
    ctx.register_udf(pgc::create_pg_get_partkeydef_udf());
    ctx.register_udf(pgc::create_pg_relation_is_publishable_udf());
    ctx.register_udf(pgc::create_pg_get_statisticsobjdef_columns_udf());
    ctx.register_udf(pgc::create_pg_encoding_to_char_udf());
    ctx.register_udf(pgc::create_pg_backend_pid_udf());
    ctx.register_udf(pgc::create_pg_relation_size_udf());
    ctx.register_udf(pgc::create_pg_total_relation_size_udf());
    ctx.register_udf(pgc::create_pg_stat_get_numscans());
    ctx.register_udf(pgc::create_pg_get_constraintdef());
    ctx.register_udf(pgc::create_pg_get_partition_ancestors_udf());
    ctx.register_udf(pgc::quote_ident_udf::create_quote_ident_udf());
    ctx.register_udf(pgc::quote_ident_udf::create_parse_ident_udf());
    ctx.register_udf(pgc::array_bounds_udf::create_array_upper_udf());
    ctx.register_udf(pgc::array_bounds_udf::create_array_lower_udf());
    {
        use datafusion::execution::session_state::SessionStateBuilder;
        let state = ctx.state_ref();
        let existing = state.read().clone();
        *state.write() = SessionStateBuilder::new_from_existing(existing)
            .with_type_planner(Arc::new(pgc::oid_type_planner::PgOidTypePlanner))
            .build();
    }
    pgc::generate_series_arg_coercion::CoerceIntArgsToBigInt::widen(ctx);
    ctx.register_udf(current_setting());
    // Every object is the tenant's (psql shows owners by name).
    let owner = tenant.to_string();
    ctx.register_udf(constant_udf("pg_get_userbyid", DataType::Int32, move |n| {
        Arc::new(StringArray::from(vec![owner.as_str(); n]))
    }));
    // Comments and view definitions, which psql's `\d+` prints when there are any: Sluice keeps
    // no comments, and a view's definition is its DDL (`SHOW TABLES`, `/v1/tables`).
    for name in [
        "col_description",
        "obj_description",
        "pg_get_viewdef",
        "shobj_description",
    ] {
        ctx.register_udf(datafusion::logical_expr::ScalarUDF::new_from_impl(
            NullText::new(name),
        ));
    }
    for name in ["pg_function_is_visible", "pg_type_is_visible"] {
        ctx.register_udf(constant_udf(name, DataType::Int32, |n| {
            Arc::new(BooleanArray::from(vec![true; n]))
        }));
    }
    Ok(())
}

/// A one-argument function with the same answer for every row (any integer type coerces).
fn constant_udf(
    name: &str,
    arg: DataType,
    value: impl Fn(usize) -> ArrayRef + Send + Sync + 'static,
) -> datafusion::logical_expr::ScalarUDF {
    use datafusion::logical_expr::{create_udf, ColumnarValue, Volatility};
    let returns = value(0).data_type().clone();
    create_udf(
        name,
        vec![arg],
        returns,
        Volatility::Stable,
        Arc::new(move |args: &[ColumnarValue]| {
            let rows = match &args[0] {
                ColumnarValue::Array(a) => a.len(),
                ColumnarValue::Scalar(_) => 1,
            };
            Ok(ColumnarValue::Array(value(rows)))
        }),
    )
}

/// The settings clients read with `current_setting(name)` (Grafana reads
/// `server_version_num` and `search_path`), as the server reports them at login.
fn setting(name: &str) -> Option<&'static str> {
    Some(match name.to_ascii_lowercase().as_str() {
        "server_version_num" => "150000",
        "server_version" => crate::pg::SERVER_VERSION,
        "search_path" => SCHEMA,
        "client_encoding" | "server_encoding" => "UTF8",
        "datestyle" => "ISO, MDY",
        "timezone" => "UTC",
        "standard_conforming_strings" | "integer_datetimes" => "on",
        "max_identifier_length" => "63",
        _ => return None,
    })
}

fn current_setting() -> datafusion::logical_expr::ScalarUDF {
    use datafusion::logical_expr::{create_udf, ColumnarValue, Volatility};
    create_udf(
        "current_setting",
        vec![DataType::Utf8],
        DataType::Utf8,
        Volatility::Stable,
        Arc::new(|args: &[ColumnarValue]| {
            let names = ColumnarValue::values_to_arrays(args)?;
            let names = names[0]
                .as_any()
                .downcast_ref::<StringArray>()
                .ok_or_else(|| DataFusionError::Plan("current_setting takes a name".into()))?;
            let values = (0..names.len())
                .map(|i| {
                    if names.is_null(i) {
                        return Ok(None);
                    }
                    setting(names.value(i)).map(Some).ok_or_else(|| {
                        DataFusionError::Plan(format!(
                            "unrecognized configuration parameter \"{}\"",
                            names.value(i)
                        ))
                    })
                })
                .collect::<DfResult<StringArray>>()?;
            Ok(ColumnarValue::Array(Arc::new(values)))
        }),
    )
}

/// The tenant's database as the catalog tables list it: its `public` schema only, in name
/// order. It holds the context's catalogs weakly (the context holds this).
#[derive(Clone, Debug)]
struct TenantCatalog {
    list: Weak<dyn CatalogProviderList>,
    tenant: String,
}

impl TenantCatalog {
    fn schema(&self) -> DfResult<Option<Arc<dyn SchemaProvider>>> {
        let list = self
            .list
            .upgrade()
            .ok_or_else(|| DataFusionError::Internal("the query's catalog is gone".into()))?;
        Ok(list.catalog(&self.tenant).and_then(|c| c.schema(SCHEMA)))
    }

    async fn table(
        &self,
        catalog: &str,
        schema: &str,
        table: &str,
    ) -> DfResult<Option<Arc<dyn TableProvider>>> {
        if catalog != self.tenant || schema != SCHEMA {
            return Ok(None);
        }
        match self.schema()? {
            Some(s) => s.table(table).await,
            None => Ok(None),
        }
    }
}

#[async_trait]
impl CatalogInfo for TenantCatalog {
    async fn catalog_names(&self) -> DfResult<Vec<String>> {
        Ok(vec![self.tenant.clone()])
    }

    async fn schema_names(&self, catalog: &str) -> DfResult<Option<Vec<String>>> {
        Ok((catalog == self.tenant).then(|| vec![SCHEMA.to_string()]))
    }

    async fn table_names(&self, catalog: &str, schema: &str) -> DfResult<Option<Vec<String>>> {
        if catalog != self.tenant || schema != SCHEMA {
            return Ok(None);
        }
        Ok(self.schema()?.map(|s| {
            let mut names = s.table_names();
            names.sort();
            names
        }))
    }

    async fn table_schema(
        &self,
        catalog: &str,
        schema: &str,
        table: &str,
    ) -> DfResult<Option<SchemaRef>> {
        Ok(self
            .table(catalog, schema, table)
            .await?
            .map(|t| t.schema()))
    }

    async fn table_type(
        &self,
        catalog: &str,
        schema: &str,
        table: &str,
    ) -> DfResult<Option<TableType>> {
        Ok(self
            .table(catalog, schema, table)
            .await?
            .map(|t| t.table_type()))
    }
}

/// The one role psql and others see: the tenant.
#[derive(Clone, Debug)]
struct TenantRole {
    tenant: String,
}

#[async_trait]
impl PgCatalogContextProvider for TenantRole {
    async fn roles(&self) -> Vec<String> {
        vec![self.tenant.clone()]
    }

    async fn role(&self, name: &str) -> Option<Role> {
        (name == self.tenant).then(|| Role {
            name: name.to_string(),
            is_superuser: false,
            can_login: true,
            can_create_db: false,
            can_create_role: false,
            can_create_user: false,
            can_replication: false,
            grants: vec![],
            inherited_roles: vec![],
        })
    }
}

/// `datafusion-pg-catalog`'s schema, with `pg_class.relkind` saying which relations are
/// materialized views.
#[derive(Debug)]
struct TenantPgCatalog {
    inner: Arc<PgCatalogSchemaProvider<TenantCatalog, TenantRole>>,
    kinds: HashMap<String, ObjectKind>,
    class: tokio::sync::OnceCell<Arc<MemTable>>,
}

#[async_trait]
impl SchemaProvider for TenantPgCatalog {
    fn table_names(&self) -> Vec<String> {
        self.inner.table_names()
    }

    async fn table(&self, name: &str) -> DfResult<Option<Arc<dyn TableProvider>>> {
        let lower = name.to_ascii_lowercase();
        if lower == "pg_class" {
            return Ok(Some(self.pg_class().await?));
        }
        if DYNAMIC.contains(&lower.as_str()) {
            // pg_class numbers the relations first, so that every table of the query (and of
            // the next query) gives each relation the same oid.
            self.pg_class().await?;
        }
        self.inner.table(name).await
    }

    fn table_exist(&self, name: &str) -> bool {
        self.inner.table_exist(name)
    }
}

/// The catalog tables built from the tenant's objects (they number them with oids).
const DYNAMIC: [&str; 4] = ["pg_attribute", "pg_namespace", "pg_database", "pg_tables"];

impl TenantPgCatalog {
    /// `pg_class`, built once per query: it assigns the oids, in name order.
    async fn pg_class(&self) -> DfResult<Arc<dyn TableProvider>> {
        let table =
            self.class
                .get_or_try_init(|| async {
                    let table = self
                        .inner
                        .table("pg_class")
                        .await?
                        .ok_or_else(|| DataFusionError::Internal("no pg_class".into()))?;
                    let batches = SessionContext::new().read_table(table)?.collect().await?;
                    let schema = batches.first().map(|b| b.schema()).ok_or_else(|| {
                        DataFusionError::Internal("pg_class gave no batch".into())
                    })?;
                    let batches = batches
                        .into_iter()
                        .map(|b| self.mark_materialized_views(b))
                        .collect::<DfResult<Vec<_>>>()?;
                    Ok::<_, DataFusionError>(Arc::new(MemTable::try_new(schema, vec![batches])?))
                })
                .await?;
        Ok(table.clone())
    }

    fn mark_materialized_views(&self, batch: RecordBatch) -> DfResult<RecordBatch> {
        let column = |n: &str| -> DfResult<usize> {
            batch
                .schema()
                .index_of(n)
                .map_err(|e| DataFusionError::Internal(format!("pg_class: {e}")))
        };
        let (names_at, kinds_at) = (column("relname")?, column("relkind")?);
        let names = batch
            .column(names_at)
            .as_any()
            .downcast_ref::<StringArray>();
        let kinds = batch
            .column(kinds_at)
            .as_any()
            .downcast_ref::<StringArray>();
        let (Some(names), Some(kinds)) = (names, kinds) else {
            return Err(DataFusionError::Internal(
                "pg_class: relname and relkind are not text".into(),
            ));
        };
        let relkind: StringArray = (0..batch.num_rows())
            .map(|i| {
                if kinds.is_null(i) {
                    return None;
                }
                let kind = self.kinds.get(names.value(i)).map(|k| match k {
                    ObjectKind::Table => "r",
                    ObjectKind::View => "v",
                    ObjectKind::MaterializedView => "m",
                    ObjectKind::Connection => "r",
                });
                Some(kind.unwrap_or(kinds.value(i)).to_string())
            })
            .collect();
        let mut columns = batch.columns().to_vec();
        columns[kinds_at] = Arc::new(relkind);
        Ok(RecordBatch::try_new(batch.schema(), columns)?)
    }
}

/// A tenant object listed in the catalog whose rows cannot be read here: a connector table or
/// a plain view, which are streams. Reading one says what to do instead.
#[derive(Debug)]
pub struct Unreadable {
    pub name: String,
    pub kind: ObjectKind,
    pub schema: SchemaRef,
}

#[async_trait]
impl TableProvider for Unreadable {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn table_type(&self) -> TableType {
        match self.kind {
            ObjectKind::View => TableType::View,
            _ => TableType::Base,
        }
    }

    async fn scan(
        &self,
        _state: &dyn Session,
        _projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        _limit: Option<usize>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        Err(DataFusionError::Plan(unreadable_message(
            &self.name, self.kind,
        )))
    }
}

/// Why a table or view cannot be read by a SELECT, and what to do instead.
pub fn unreadable_message(name: &str, kind: ObjectKind) -> String {
    format!(
        "'{name}' is a {}: SELECT here reads materialized views; CREATE MATERIALIZED VIEW v AS SELECT ... FROM {name} serves a query over it",
        kind.words()
    )
}

/// A function of any arguments whose answer is always a NULL text.
#[derive(Debug, PartialEq, Eq, Hash)]
struct NullText {
    name: String,
    signature: datafusion::logical_expr::Signature,
}

impl NullText {
    fn new(name: &str) -> Self {
        NullText {
            name: name.to_string(),
            signature: datafusion::logical_expr::Signature::variadic_any(
                datafusion::logical_expr::Volatility::Stable,
            ),
        }
    }
}

impl datafusion::logical_expr::ScalarUDFImpl for NullText {
    fn name(&self) -> &str {
        &self.name
    }

    fn signature(&self) -> &datafusion::logical_expr::Signature {
        &self.signature
    }

    fn return_type(&self, _: &[DataType]) -> DfResult<DataType> {
        Ok(DataType::Utf8)
    }

    fn invoke_with_args(
        &self,
        args: datafusion::logical_expr::ScalarFunctionArgs,
    ) -> DfResult<datafusion::logical_expr::ColumnarValue> {
        Ok(datafusion::logical_expr::ColumnarValue::Array(
            arrow::array::new_null_array(&DataType::Utf8, args.number_rows),
        ))
    }
}
