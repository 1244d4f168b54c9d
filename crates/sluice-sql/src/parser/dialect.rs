//! The Sluice SQL dialect: sqlparser's generic dialect plus the Flink syntax it lacks.
//!
//! Only sqlparser's extension hooks are used (no fork, no text rewriting), so every position in
//! an error message still points into the user's text.

use sqlparser::ast::{Expr, Ident};
use sqlparser::dialect::{Dialect, GenericDialect};
use sqlparser::keywords::Keyword;
use sqlparser::parser::{Parser, ParserError};
use sqlparser::tokenizer::Token;

/// Name of the marker function that stands for `TABLE t` inside a window TVF call.
pub const TABLE_ARG_MARKER: &str = "__table_arg";

/// `TABLE name [PARTITION BY (col, ...)]` as a marker call `__table_arg(name, col, ...)`.
fn parse_table_arg(parser: &mut Parser) -> Result<Expr, ParserError> {
    let name = parser.parse_object_name(false)?;
    let mut args = vec![Expr::Identifier(Ident::new(name.to_string()))];
    // Flink: `PARTITION BY col` or `PARTITION BY (col, ...)`.
    if parser.parse_keywords(&[Keyword::PARTITION, Keyword::BY]) {
        if parser.consume_token(&Token::LParen) {
            loop {
                args.push(Expr::Identifier(parser.parse_identifier()?));
                if !parser.consume_token(&Token::Comma) {
                    break;
                }
            }
            parser.expect_token(&Token::RParen)?;
        } else {
            args.push(Expr::Identifier(parser.parse_identifier()?));
        }
    }
    Ok(crate::rewrite::call(TABLE_ARG_MARKER, args))
}

/// Flink-flavoured SQL dialect.
#[derive(Debug, Default)]
pub struct SluiceDialect {
    generic: GenericDialect,
}

impl Dialect for SluiceDialect {
    fn is_identifier_start(&self, ch: char) -> bool {
        self.generic.is_identifier_start(ch)
    }

    fn is_identifier_part(&self, ch: char) -> bool {
        self.generic.is_identifier_part(ch)
    }

    fn is_delimited_identifier_start(&self, ch: char) -> bool {
        // Flink quotes identifiers with backticks; standard double quotes also work.
        ch == '`' || ch == '"'
    }

    /// `JOIN dim FOR SYSTEM_TIME AS OF o.proc_time` (lookup joins).
    fn supports_table_versioning(&self) -> bool {
        true
    }

    fn supports_filter_during_aggregation(&self) -> bool {
        true
    }

    fn supports_group_by_expr(&self) -> bool {
        true
    }

    fn supports_named_fn_args_with_rarrow_operator(&self) -> bool {
        true
    }

    fn supports_string_literal_backslash_escape(&self) -> bool {
        false
    }

    /// Parses `TABLE name` where an expression is expected, as in
    /// `TUMBLE(TABLE orders, DESCRIPTOR(ts), INTERVAL '5' MINUTE)`.
    fn parse_prefix(&self, parser: &mut Parser) -> Option<Result<Expr, ParserError>> {
        if !parser.peek_keyword(Keyword::TABLE) {
            return None;
        }
        // `TABLE(` is a table function call, not a table argument.
        if matches!(parser.peek_nth_token(1).token, Token::LParen) {
            return None;
        }
        parser.next_token();
        Some(parse_table_arg(parser))
    }
}
