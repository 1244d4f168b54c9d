//! The part of PostgreSQL's `pg_catalog` that psql's listing commands read (`\d`, `\dt`, `\dv`,
//! `\dm`), built per query from the caller's tenant only, and queried with DataFusion like any
//! other SELECT.

use std::sync::Arc;

use arrow::array::{ArrayRef, BooleanArray, Int64Array, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use arrow::record_batch::RecordBatch;
use datafusion::catalog::{MemorySchemaProvider, SchemaProvider};
use datafusion::datasource::MemTable;
use datafusion::logical_expr::{create_udf, ColumnarValue, Volatility};
use datafusion::prelude::SessionContext;

use crate::catalog::{Object, ObjectKind};
use crate::error::ApiError;

/// The namespace every tenant object lives in, as psql sees it.
const PUBLIC_OID: i64 = 2200;
const CATALOG_OID: i64 = 11;
/// The owner of every object (psql shows it by name: the tenant).
const OWNER_OID: i64 = 10;

/// The tables psql's listings name.
pub const TABLES: [&str; 4] = ["pg_class", "pg_namespace", "pg_am", "pg_roles"];

fn batch(columns: Vec<(&str, ArrayRef)>) -> Result<RecordBatch, ApiError> {
    let schema = Arc::new(Schema::new(
        columns
            .iter()
            .map(|(n, a)| Field::new(*n, a.data_type().clone(), true))
            .collect::<Vec<_>>(),
    ));
    RecordBatch::try_new(schema, columns.into_iter().map(|(_, a)| a).collect())
        .map_err(|e| ApiError::internal(e.to_string()))
}

fn internal(e: impl std::fmt::Display) -> ApiError {
    ApiError::internal(format!("pg_catalog: {e}"))
}

/// Registers `pg_catalog` (and the functions psql calls) for a tenant's `objects`.
pub fn register(ctx: &SessionContext, tenant: &str, objects: &[Object]) -> Result<(), ApiError> {
    let schema = Arc::new(MemorySchemaProvider::new());
    let relkind = |k: ObjectKind| match k {
        ObjectKind::Table => "r",
        ObjectKind::View => "v",
        ObjectKind::MaterializedView => "m",
    };
    let n = objects.len();
    let class = batch(vec![
        (
            "oid",
            Arc::new(Int64Array::from_iter_values(
                (0..n as i64).map(|i| 16384 + i),
            )),
        ),
        (
            "relname",
            Arc::new(StringArray::from_iter_values(
                objects.iter().map(|o| o.name.as_str()),
            )),
        ),
        (
            "relnamespace",
            Arc::new(Int64Array::from(vec![PUBLIC_OID; n])),
        ),
        (
            "relkind",
            Arc::new(StringArray::from_iter_values(
                objects.iter().map(|o| relkind(o.kind)),
            )),
        ),
        ("relowner", Arc::new(Int64Array::from(vec![OWNER_OID; n]))),
        ("relam", Arc::new(Int64Array::from(vec![0i64; n]))),
        (
            "relispartition",
            Arc::new(BooleanArray::from(vec![false; n])),
        ),
    ])?;
    let namespace = batch(vec![
        (
            "oid",
            Arc::new(Int64Array::from(vec![PUBLIC_OID, CATALOG_OID, 13000])),
        ),
        (
            "nspname",
            Arc::new(StringArray::from(vec![
                "public",
                "pg_catalog",
                "information_schema",
            ])),
        ),
    ])?;
    let am = batch(vec![
        ("oid", Arc::new(Int64Array::from(Vec::<i64>::new()))),
        ("amname", Arc::new(StringArray::from(Vec::<&str>::new()))),
    ])?;
    let roles = batch(vec![
        ("oid", Arc::new(Int64Array::from(vec![OWNER_OID]))),
        ("rolname", Arc::new(StringArray::from(vec![tenant]))),
    ])?;
    for (name, b) in [
        ("pg_class", class),
        ("pg_namespace", namespace),
        ("pg_am", am),
        ("pg_roles", roles),
    ] {
        let table = MemTable::try_new(b.schema(), vec![vec![b]]).map_err(internal)?;
        schema
            .register_table(name.to_string(), Arc::new(table))
            .map_err(internal)?;
    }
    ctx.catalog("datafusion")
        .ok_or_else(|| internal("no default catalog"))?
        .register_schema("pg_catalog", schema)
        .map_err(internal)?;
    let owner = tenant.to_string();
    let userbyid = create_udf(
        "pg_get_userbyid",
        vec![DataType::Int64],
        DataType::Utf8,
        Volatility::Immutable,
        Arc::new(move |args: &[ColumnarValue]| {
            let rows = match &args[0] {
                ColumnarValue::Array(a) => a.len(),
                ColumnarValue::Scalar(_) => 1,
            };
            Ok(ColumnarValue::Array(Arc::new(StringArray::from(vec![
                owner
                    .as_str(
                    );
                rows
            ]))))
        }),
    );
    let visible = create_udf(
        "pg_table_is_visible",
        vec![DataType::Int64],
        DataType::Boolean,
        Volatility::Immutable,
        Arc::new(|args: &[ColumnarValue]| {
            let rows = match &args[0] {
                ColumnarValue::Array(a) => a.len(),
                ColumnarValue::Scalar(_) => 1,
            };
            Ok(ColumnarValue::Array(Arc::new(BooleanArray::from(vec![
                true;
                rows
            ]))))
        }),
    );
    ctx.register_udf(userbyid.with_aliases(["pg_catalog.pg_get_userbyid"]));
    ctx.register_udf(visible.with_aliases(["pg_catalog.pg_table_is_visible"]));
    Ok(())
}
