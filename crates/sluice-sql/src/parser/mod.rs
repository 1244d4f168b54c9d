//! Splits a SQL script into statements and parses Flink's DDL.
//!
//! `CREATE TABLE` is parsed here, with sqlparser's token-level API, because sqlparser's own
//! CREATE TABLE grammar has no `WATERMARK FOR`, computed columns or `NOT ENFORCED` keys. Every
//! other statement goes through `Parser::parse_statement` with [`SluiceDialect`].

pub mod dialect;

use std::collections::BTreeMap;

use arrow::datatypes::{DataType, TimeUnit};
use sluice_common::{Error, Result};
use sqlparser::ast::{self, ExactNumberInfo, ObjectName, Query, TimezoneInfo};
use sqlparser::keywords::Keyword;
use sqlparser::parser::{Parser, ParserError};
use sqlparser::tokenizer::{Location, Token};

use crate::parser::dialect::SluiceDialect;

/// One statement of a script, with the line it starts on.
#[derive(Debug, Clone)]
pub struct Located {
    pub line: u64,
    pub statement: Statement,
}

/// The statements `sluice run` understands.
#[derive(Debug, Clone)]
pub enum Statement {
    /// `SET 'key' = 'value'`
    Set { key: String, value: String },
    /// Flink `CREATE TABLE`.
    CreateTable(TableDdl),
    /// `CREATE [TEMPORARY] VIEW name AS query`
    CreateView { name: String, query: Box<Query> },
    /// `INSERT INTO table query`
    Insert { table: String, query: Box<Query> },
    /// A query whose changelog is printed.
    Select(Box<Query>),
    /// `EXPLAIN INSERT ...` or `EXPLAIN SELECT ...`: the statement's plan is printed, and the
    /// statement does not run.
    /// `EXPLAIN [ANALYZE] INSERT ...` or `EXPLAIN [ANALYZE] SELECT ...`: prints the plan instead
    /// of running the statement, or with ANALYZE runs it and prints the plan with the rows
    /// each node produced.
    Explain {
        analyze: bool,
        inner: Box<Statement>,
    },
}

/// A column declared in `CREATE TABLE`: physical, or computed from an expression.
#[derive(Debug, Clone)]
pub enum ColumnDdl {
    Physical {
        name: String,
        data_type: DataType,
        nullable: bool,
        /// `METADATA [FROM 'key'] [VIRTUAL]`: read from the connector's record metadata (the
        /// key defaults to the column's name).
        metadata: Option<String>,
        /// `VIRTUAL`: a metadata column that is only read (INSERT leaves it out).
        is_virtual: bool,
    },
    Computed {
        name: String,
        expr: ast::Expr,
    },
}

impl ColumnDdl {
    /// The column's name.
    pub fn name(&self) -> &str {
        match self {
            ColumnDdl::Physical { name, .. } | ColumnDdl::Computed { name, .. } => name,
        }
    }
}

/// A parsed `CREATE TABLE`.
#[derive(Debug, Clone)]
pub struct TableDdl {
    pub name: String,
    pub columns: Vec<ColumnDdl>,
    /// `WATERMARK FOR column AS expr`
    pub watermark: Option<(String, ast::Expr)>,
    pub primary_key: Vec<String>,
    pub partitioned_by: Vec<String>,
    pub options: BTreeMap<String, String>,
    pub if_not_exists: bool,
}

/// Parses a whole script of `;`-separated statements.
pub fn parse_script(sql: &str) -> Result<Vec<Located>> {
    let dialect = SluiceDialect::default();
    reject_hints(&dialect, sql)?;
    let mut parser = Parser::new(&dialect)
        .try_with_sql(sql)
        .map_err(|e| syntax(e, None))?;
    let mut out = Vec::new();
    loop {
        while parser.consume_token(&Token::SemiColon) {}
        let start = parser.peek_token();
        if start.token == Token::EOF {
            break;
        }
        let statement = parse_statement(&mut parser)
            .map_err(|e| syntax(e, Some(parser.peek_token().span.start)))?;
        out.push(Located {
            line: start.span.start.line,
            statement,
        });
        let next = parser.peek_token();
        if !matches!(next.token, Token::SemiColon | Token::EOF) {
            return Err(syntax(
                ParserError::ParserError(format!(
                    "expected ';' or end of script, found {}",
                    next.token
                )),
                Some(next.span.start),
            ));
        }
    }
    Ok(out)
}

/// Flink's hints (`/*+ OPTIONS('k'='v') */`) are comments to sqlparser: rather than ignore one
/// silently, a script with a hint is an error at the hint.
fn reject_hints(dialect: &SluiceDialect, sql: &str) -> Result<()> {
    use sqlparser::tokenizer::{Tokenizer, Whitespace};
    let Ok(tokens) = Tokenizer::new(dialect, sql).tokenize_with_location() else {
        // The parser reports the same tokenizer error with its position.
        return Ok(());
    };
    for t in tokens {
        if let Token::Whitespace(Whitespace::MultiLineComment(text)) = &t.token {
            if text.starts_with('+') {
                return Err(syntax(
                    ParserError::ParserError(format!(
                        "hints (/*{}*/) are not supported yet: put the options in the table's WITH clause",
                        text.trim_end()
                    )),
                    Some(t.span.start),
                ));
            }
        }
    }
    Ok(())
}

/// Turns a parser error into a positioned syntax error. sqlparser already appends
/// "at Line: L, Column: C" to most messages; those are preferred over the current token.
fn syntax(e: ParserError, at: Option<Location>) -> Error {
    let text = match e {
        ParserError::ParserError(s) | ParserError::TokenizerError(s) => s,
        ParserError::RecursionLimitExceeded => "statement nested too deeply".to_string(),
    };
    if let Some(idx) = text.rfind(" at Line: ") {
        let (message, pos) = text.split_at(idx);
        let nums: Vec<u64> = pos
            .split(|c: char| !c.is_ascii_digit())
            .filter(|s| !s.is_empty())
            .filter_map(|s| s.parse().ok())
            .collect();
        if nums.len() >= 2 {
            return Error::Syntax {
                line: nums[0],
                column: nums[1],
                message: message.to_string(),
            };
        }
    }
    let at = at.unwrap_or(Location { line: 1, column: 1 });
    Error::Syntax {
        line: at.line,
        column: at.column,
        message: text,
    }
}

fn parse_statement(p: &mut Parser) -> Result<Statement, ParserError> {
    if p.parse_keyword(Keyword::SET) {
        let key = parse_setting_word(p)?;
        p.expect_token(&Token::Eq)?;
        let value = parse_setting_word(p)?;
        return Ok(Statement::Set { key, value });
    }
    if p.peek_keyword(Keyword::CREATE) {
        p.next_token();
        let temporary = p.parse_keyword(Keyword::TEMPORARY);
        if p.parse_keyword(Keyword::TABLE) {
            return parse_create_table(p).map(Statement::CreateTable);
        }
        // Anything else (views) goes to sqlparser: step back over what was consumed.
        // (TEMPORARY is dropped: a view lives as long as its script either way.)
        if !temporary {
            p.prev_token();
        } else {
            p.prev_token();
            p.prev_token();
        }
    }
    let start = p.peek_token();
    let statement = p.parse_statement()?;
    convert(statement, &start)
}

/// A statement sqlparser parsed, as Sluice runs it.
fn convert(
    statement: ast::Statement,
    start: &sqlparser::tokenizer::TokenWithSpan,
) -> Result<Statement, ParserError> {
    match statement {
        ast::Statement::Explain {
            analyze, statement, ..
        } => {
            match *statement {
                inner @ (ast::Statement::Insert(_) | ast::Statement::Query(_)) => {
                    Ok(Statement::Explain {
                        analyze,
                        inner: Box::new(convert(inner, start)?),
                    })
                }
                other => {
                    Err(ParserError::ParserError(format!(
                    "EXPLAIN takes an INSERT INTO or a SELECT, not '{}' at Line: {}, Column: {}",
                    other.to_string().split_whitespace().take(3).collect::<Vec<_>>().join(" "),
                    start.span.start.line,
                    start.span.start.column
                )))
                }
            }
        }
        ast::Statement::CreateView(view) => Ok(Statement::CreateView {
            name: object_name(&view.name),
            query: view.query,
        }),
        ast::Statement::Insert(insert) => {
            let table = match &insert.table {
                ast::TableObject::TableName(name) => object_name(name),
                other => {
                    return Err(ParserError::ParserError(format!(
                        "INSERT INTO {other} is not supported"
                    )))
                }
            };
            let query = insert.source.ok_or_else(|| {
                ParserError::ParserError("INSERT needs a SELECT query".to_string())
            })?;
            Ok(Statement::Insert { table, query })
        }
        ast::Statement::Query(q) => Ok(Statement::Select(q)),
        other => Err(ParserError::ParserError(format!(
            "unsupported statement '{}' at Line: {}, Column: {}",
            other
                .to_string()
                .split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" "),
            start.span.start.line,
            start.span.start.column
        ))),
    }
}

fn object_name(name: &ObjectName) -> String {
    name.0
        .iter()
        .map(|p| {
            p.as_ident()
                .map(|i| i.value.clone())
                .unwrap_or_else(|| p.to_string())
        })
        .collect::<Vec<_>>()
        .join(".")
}

/// A `SET` key or value: a quoted string, or bare words joined by dots.
fn parse_setting_word(p: &mut Parser) -> Result<String, ParserError> {
    let tok = p.next_token();
    match tok.token {
        Token::SingleQuotedString(s) | Token::DoubleQuotedString(s) => Ok(s),
        Token::Number(n, _) => Ok(n),
        Token::Word(w) => {
            let mut s = w.value;
            while p.consume_token(&Token::Period) {
                s.push('.');
                s.push_str(&p.parse_identifier()?.value);
            }
            Ok(s)
        }
        other => Err(ParserError::ParserError(format!(
            "expected a setting such as 'key' = 'value', found {other} at Line: {}, Column: {}",
            tok.span.start.line, tok.span.start.column
        ))),
    }
}

fn peek_word(p: &Parser, word: &str) -> bool {
    matches!(&p.peek_token().token, Token::Word(w) if w.quote_style.is_none() && w.value.eq_ignore_ascii_case(word))
}

fn parse_create_table(p: &mut Parser) -> Result<TableDdl, ParserError> {
    let if_not_exists = p.parse_keywords(&[Keyword::IF, Keyword::NOT, Keyword::EXISTS]);
    let name = object_name(&p.parse_object_name(false)?);
    let mut ddl = TableDdl {
        name,
        columns: vec![],
        watermark: None,
        primary_key: vec![],
        partitioned_by: vec![],
        options: BTreeMap::new(),
        if_not_exists,
    };
    p.expect_token(&Token::LParen)?;
    loop {
        if peek_word(p, "WATERMARK") {
            p.next_token();
            p.expect_keyword_is(Keyword::FOR)?;
            let column = p.parse_identifier()?.value;
            p.expect_keyword_is(Keyword::AS)?;
            let expr = p.parse_expr()?;
            ddl.watermark = Some((column, expr));
        } else if p.parse_keyword(Keyword::CONSTRAINT) || p.peek_keyword(Keyword::PRIMARY) {
            if !p.peek_keyword(Keyword::PRIMARY) {
                p.parse_identifier()?;
            }
            p.expect_keywords(&[Keyword::PRIMARY, Keyword::KEY])?;
            ddl.primary_key = p
                .parse_parenthesized_column_list(sqlparser::parser::IsOptional::Mandatory, false)?
                .into_iter()
                .map(|i| i.value)
                .collect();
            p.expect_keywords(&[Keyword::NOT, Keyword::ENFORCED])?;
        } else {
            let name = p.parse_identifier()?.value;
            if p.parse_keyword(Keyword::AS) {
                let expr = p.parse_expr()?;
                ddl.columns.push(ColumnDdl::Computed { name, expr });
            } else {
                let at = p.peek_token().span.start;
                let sql_type = p.parse_data_type()?;
                let data_type = flink_type(&sql_type).map_err(|m| {
                    ParserError::ParserError(format!(
                        "{m} at Line: {}, Column: {}",
                        at.line, at.column
                    ))
                })?;
                let mut nullable = true;
                if p.parse_keywords(&[Keyword::NOT, Keyword::NULL]) {
                    nullable = false;
                } else {
                    let _ = p.parse_keyword(Keyword::NULL);
                }
                let mut metadata = None;
                let mut is_virtual = false;
                if peek_word(p, "METADATA") {
                    p.next_token();
                    let key = if p.parse_keyword(Keyword::FROM) {
                        p.parse_literal_string()?
                    } else {
                        name.clone()
                    };
                    if peek_word(p, "VIRTUAL") {
                        p.next_token();
                        is_virtual = true;
                    }
                    metadata = Some(key);
                }
                if p.parse_keywords(&[Keyword::PRIMARY, Keyword::KEY]) {
                    p.expect_keywords(&[Keyword::NOT, Keyword::ENFORCED])?;
                    ddl.primary_key = vec![name.clone()];
                }
                if p.parse_keyword(Keyword::COMMENT) {
                    p.parse_literal_string()?;
                }
                ddl.columns.push(ColumnDdl::Physical {
                    name,
                    data_type,
                    nullable,
                    metadata,
                    is_virtual,
                });
            }
        }
        if !p.consume_token(&Token::Comma) {
            break;
        }
    }
    p.expect_token(&Token::RParen)?;
    if p.parse_keyword(Keyword::COMMENT) {
        p.parse_literal_string()?;
    }
    if p.parse_keywords(&[Keyword::PARTITIONED, Keyword::BY]) {
        ddl.partitioned_by = p
            .parse_parenthesized_column_list(sqlparser::parser::IsOptional::Mandatory, false)?
            .into_iter()
            .map(|i| i.value)
            .collect();
    }
    if p.parse_keyword(Keyword::WITH) {
        p.expect_token(&Token::LParen)?;
        loop {
            if p.peek_token().token == Token::RParen {
                break;
            }
            let at = p.peek_token().span.start;
            let key = p.parse_literal_string()?;
            p.expect_token(&Token::Eq)?;
            let value = p.parse_literal_string()?;
            if let Some(first) = ddl.options.insert(key.clone(), value) {
                return Err(ParserError::ParserError(format!(
                    "option '{key}' is given twice in WITH (...) (first as '{first}') at Line: {}, Column: {}",
                    at.line, at.column
                )));
            }
            if !p.consume_token(&Token::Comma) {
                break;
            }
        }
        p.expect_token(&Token::RParen)?;
    }
    Ok(ddl)
}

/// Maps a Flink SQL type to its Arrow type.
pub fn flink_type(t: &ast::DataType) -> Result<DataType, String> {
    use ast::DataType as S;
    let precision = match t {
        S::Timestamp(p, _) | S::Datetime(p) => *p,
        S::Custom(name, args) if name.to_string().eq_ignore_ascii_case("TIMESTAMP_LTZ") => {
            args.first().and_then(|a| a.parse().ok())
        }
        _ => None,
    };
    if let Some(p) = precision.filter(|p| *p > 9) {
        return Err(format!(
            "{t}: the precision of a timestamp must be between 0 and 9 (fractional digits of a second), not {p}"
        ));
    }
    let ts_unit = |p: Option<u64>| match p.unwrap_or(6) {
        0 => TimeUnit::Second,
        1..=3 => TimeUnit::Millisecond,
        4..=6 => TimeUnit::Microsecond,
        _ => TimeUnit::Nanosecond,
    };
    Ok(match t {
        S::Boolean | S::Bool => DataType::Boolean,
        S::TinyInt(_) => DataType::Int8,
        S::SmallInt(_) => DataType::Int16,
        S::Int(_) | S::Integer(_) => DataType::Int32,
        S::BigInt(_) => DataType::Int64,
        S::Float(_) | S::Real => DataType::Float32,
        S::Double(_) | S::DoublePrecision | S::Float64 => DataType::Float64,
        S::Decimal(info) | S::Numeric(info) | S::Dec(info) => {
            let (p, s) = match info {
                ExactNumberInfo::None => (10, 0),
                ExactNumberInfo::Precision(p) => (*p, 0),
                ExactNumberInfo::PrecisionAndScale(p, s) => (*p, *s as u64),
            };
            if !(1..=38).contains(&p) || s > p {
                return Err(format!("DECIMAL({p}, {s}) is out of range: precision must be 1..38 and scale at most the precision"));
            }
            DataType::Decimal128(p as u8, s as i8)
        }
        S::String(_)
        | S::Varchar(_)
        | S::Char(_)
        | S::Text
        | S::CharVarying(_)
        | S::Character(_)
        | S::CharacterVarying(_) => DataType::Utf8,
        S::Bytes(_) | S::Varbinary(_) | S::Binary(_) | S::Bytea => DataType::Binary,
        S::Date => DataType::Date32,
        S::Time(_, _) => DataType::Time32(TimeUnit::Millisecond),
        S::Timestamp(p, TimezoneInfo::None | TimezoneInfo::WithoutTimeZone) => {
            DataType::Timestamp(ts_unit(*p), None)
        }
        S::Timestamp(p, _) => DataType::Timestamp(ts_unit(*p), Some("UTC".into())),
        S::Datetime(p) => DataType::Timestamp(ts_unit(*p), None),
        S::Custom(name, args) if name.to_string().eq_ignore_ascii_case("TIMESTAMP_LTZ") => {
            let p = args.first().and_then(|a| a.parse().ok());
            DataType::Timestamp(ts_unit(p), Some("UTC".into()))
        }
        other => return Err(format!("unsupported column type {other}")),
    })
}
