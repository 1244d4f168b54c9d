//! Rewrites of the parsed SQL tree (never of the text) that map Flink spellings onto DataFusion.
//!
//! - `TUMBLE_START(ts, size)` becomes `get_field(TUMBLE(ts, size), 'window_start')`, so that it
//!   matches the `GROUP BY TUMBLE(ts, size)` expression; likewise `_END` and `_ROWTIME`, for HOP
//!   and SESSION too.
//! - Flink-only names of DataFusion functions: `HOUR(x)`, `DATE_FORMAT(ts, 'yyyy-MM-dd')`, `IF`,
//!   `MOD(a, b)`.

use std::ops::ControlFlow;

use crate::functions::flink::WALL_CLOCK;

use sqlparser::ast::{
    self, CastKind, Expr, Function, FunctionArg, FunctionArgExpr, FunctionArgumentList,
    FunctionArguments, Ident, ObjectName, Value,
};

/// Applies every rewrite to a statement's tree.
pub fn rewrite<V: ast::VisitMut>(node: &mut V) {
    let _ = ast::visit_expressions_mut(node, |expr| {
        if let Some(new) = rewrite_expr(expr) {
            *expr = new;
        }
        ControlFlow::<()>::Continue(())
    });
}

fn function_name(f: &Function) -> Option<String> {
    if f.name.0.len() != 1 {
        return None;
    }
    f.name.0[0]
        .as_ident()
        .filter(|i| i.quote_style.is_none())
        .map(|i| i.value.to_uppercase())
}

fn plain_args(f: &Function) -> Option<Vec<Expr>> {
    match &f.args {
        FunctionArguments::List(list) => list
            .args
            .iter()
            .map(|a| match a {
                FunctionArg::Unnamed(FunctionArgExpr::Expr(e)) => Some(e.clone()),
                _ => None,
            })
            .collect(),
        FunctionArguments::None => Some(vec![]),
        FunctionArguments::Subquery(_) => None,
    }
}

/// A call of `name(args)`.
pub fn call(name: &str, args: Vec<Expr>) -> Expr {
    Expr::Function(Function {
        name: ObjectName::from(vec![Ident::new(name)]),
        uses_odbc_syntax: false,
        parameters: FunctionArguments::None,
        args: FunctionArguments::List(FunctionArgumentList {
            duplicate_treatment: None,
            args: args
                .into_iter()
                .map(|e| FunctionArg::Unnamed(FunctionArgExpr::Expr(e)))
                .collect(),
            clauses: vec![],
        }),
        filter: None,
        null_treatment: None,
        over: None,
        within_group: vec![],
    })
}

fn string(s: &str) -> Expr {
    Expr::Value(Value::SingleQuotedString(s.to_string()).into())
}

fn cast(expr: Expr, data_type: ast::DataType) -> Expr {
    Expr::Cast {
        kind: CastKind::Cast,
        expr: Box::new(expr),
        data_type,
        array: false,
        format: None,
    }
}

fn rewrite_expr(expr: &Expr) -> Option<Expr> {
    let Expr::Function(f) = expr else { return None };
    let name = function_name(f)?;
    let args = plain_args(f)?;
    // Legacy group-window helpers.
    for window in ["TUMBLE", "HOP", "SESSION"] {
        if let Some(part) = name.strip_prefix(window).and_then(|s| s.strip_prefix('_')) {
            let field = match part {
                "START" => "window_start",
                "END" => "window_end",
                "ROWTIME" => "window_time",
                _ => return None,
            };
            return Some(call(
                "get_field",
                vec![call(&window.to_lowercase(), args), string(field)],
            ));
        }
    }
    let date_part = |unit: &str, args: Vec<Expr>| {
        let mut all = vec![string(unit)];
        all.extend(args);
        cast(call("date_part", all), ast::DataType::BigInt(None))
    };
    Some(match (name.as_str(), args.len()) {
        ("YEAR", 1) => date_part("year", args),
        ("MONTH", 1) => date_part("month", args),
        ("DAYOFMONTH", 1) => date_part("day", args),
        ("HOUR", 1) => date_part("hour", args),
        ("MINUTE", 1) => date_part("minute", args),
        ("SECOND", 1) => date_part("second", args),
        ("MOD", 2) => {
            let mut it = args.into_iter();
            Expr::Nested(Box::new(Expr::BinaryOp {
                left: Box::new(it.next()?),
                op: ast::BinaryOperator::Modulo,
                right: Box::new(it.next()?),
            }))
        }
        ("IF", 3) => {
            let mut it = args.into_iter();
            let (c, a, b) = (it.next()?, it.next()?, it.next()?);
            Expr::Case {
                case_token: ast::helpers::attached_token::AttachedToken::empty(),
                end_token: ast::helpers::attached_token::AttachedToken::empty(),
                operand: None,
                conditions: vec![ast::CaseWhen {
                    condition: c,
                    result: a,
                }],
                else_result: Some(Box::new(b)),
            }
        }
        ("DATE_FORMAT", 2) => call("sluice_date_format", args),
        ("TO_TIMESTAMP", 2) => {
            let format = java_format_literal(&args[1])?;
            call(
                "to_timestamp_millis",
                vec![args[0].clone(), string(&format)],
            )
        }
        ("TO_TIMESTAMP", 1) => call("to_timestamp_millis", args),
        ("FROM_UNIXTIME", 1) => call(
            "sluice_date_format",
            vec![
                call("to_timestamp_seconds", args),
                string("yyyy-MM-dd HH:mm:ss"),
            ],
        ),
        ("FROM_UNIXTIME", 2) => call(
            "sluice_date_format",
            vec![
                call("to_timestamp_seconds", vec![args[0].clone()]),
                args[1].clone(),
            ],
        ),
        // Flink's streaming mode reads the clock per row (DataFusion's now() is one value per
        // query, fixed at planning).
        ("CURRENT_TIMESTAMP" | "NOW" | "LOCALTIMESTAMP", 0) => call(WALL_CLOCK, vec![]),
        ("CURRENT_DATE", 0) => cast(call(WALL_CLOCK, vec![]), ast::DataType::Date),
        ("CURRENT_TIME" | "LOCALTIME", 0) => cast(
            call(WALL_CLOCK, vec![]),
            ast::DataType::Time(None, ast::TimezoneInfo::None),
        ),
        ("UNIX_TIMESTAMP", 0) => cast(
            call("to_unixtime", vec![call(WALL_CLOCK, vec![])]),
            ast::DataType::BigInt(None),
        ),
        ("UNIX_TIMESTAMP", 1) => cast(call("to_unixtime", args), ast::DataType::BigInt(None)),
        ("UNIX_TIMESTAMP", 2) => {
            let format = java_format_literal(&args[1])?;
            cast(
                call("to_unixtime", vec![args[0].clone(), string(&format)]),
                ast::DataType::BigInt(None),
            )
        }
        _ => return None,
    })
}

fn java_format_literal(e: &Expr) -> Option<String> {
    match e {
        Expr::Value(v) => match &v.value {
            Value::SingleQuotedString(s) => Some(java_to_chrono(s)),
            _ => None,
        },
        _ => None,
    }
}

/// Converts a Java `SimpleDateFormat` pattern (Flink's) to a chrono `strftime` pattern.
pub fn java_to_chrono(pattern: &str) -> String {
    let chars: Vec<char> = pattern.chars().collect();
    let mut out = String::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let mut n = 1;
        while i + n < chars.len() && chars[i + n] == c {
            n += 1;
        }
        let piece = match (c, n) {
            ('y', 2) => "%y".to_string(),
            ('y', _) => "%Y".to_string(),
            ('M', 1 | 2) => "%m".to_string(),
            ('M', 3) => "%b".to_string(),
            ('M', _) => "%B".to_string(),
            ('d', _) => "%d".to_string(),
            ('H', _) => "%H".to_string(),
            ('h', _) => "%I".to_string(),
            ('m', _) => "%M".to_string(),
            ('s', _) => "%S".to_string(),
            ('S', k) => format!("%{}f", k.min(9)),
            ('a', _) => "%p".to_string(),
            ('E', 1..=3) => "%a".to_string(),
            ('E', _) => "%A".to_string(),
            ('D', _) => "%j".to_string(),
            ('%', _) => "%%".repeat(n),
            ('\'', _) => {
                // Quoted literal text.
                let mut j = i + 1;
                let mut lit = String::new();
                while j < chars.len() && chars[j] != '\'' {
                    lit.push(chars[j]);
                    j += 1;
                }
                out.push_str(&lit);
                i = j + 1;
                continue;
            }
            _ => std::iter::repeat_n(c, n).collect(),
        };
        out.push_str(&piece);
        i += n;
    }
    out
}

/// `JOIN t FOR SYSTEM_TIME AS OF x [AS alias]`: removes the version clause (DataFusion has none)
/// and returns each such table's alias (or name) with its `AS OF` expression, for the planner to
/// make those joins lookup or temporal joins. For a versioned table (`versioned` gives its
/// event-time column), the join condition gains `alias.time <= x`: a version must not be newer
/// than the row that looks it up, and the row's time column stays in the plan.
pub fn take_lookups<V: ast::VisitMut>(
    node: &mut V,
    versioned: &dyn Fn(&str) -> Option<String>,
) -> Vec<(String, Expr)> {
    struct Lookups<'a> {
        found: Vec<(String, Expr)>,
        versioned: &'a dyn Fn(&str) -> Option<String>,
    }
    impl Lookups<'_> {
        fn table(&mut self, tf: &mut ast::TableFactor) -> Option<Expr> {
            let ast::TableFactor::Table {
                name,
                alias,
                version,
                ..
            } = tf
            else {
                return None;
            };
            let Some(ast::TableVersion::ForSystemTimeAsOf(e)) = version.take() else {
                return None;
            };
            let table = name.to_string();
            let n = alias
                .as_ref()
                .map(|a| a.name.value.clone())
                .unwrap_or_else(|| table.clone());
            self.found.push((n.clone(), e.clone()));
            let time = (self.versioned)(&table)?;
            Some(Expr::BinaryOp {
                left: Box::new(Expr::CompoundIdentifier(vec![
                    Ident::new(n),
                    Ident::new(time),
                ])),
                op: ast::BinaryOperator::LtEq,
                right: Box::new(e),
            })
        }
    }
    impl ast::VisitorMut for Lookups<'_> {
        type Break = ();
        fn pre_visit_query(&mut self, q: &mut ast::Query) -> ControlFlow<()> {
            let ast::SetExpr::Select(select) = q.body.as_mut() else {
                return ControlFlow::Continue(());
            };
            for twj in &mut select.from {
                self.table(&mut twj.relation);
                for join in &mut twj.joins {
                    let Some(extra) = self.table(&mut join.relation) else {
                        continue;
                    };
                    use ast::JoinOperator as J;
                    if let J::Join(ast::JoinConstraint::On(on))
                    | J::Inner(ast::JoinConstraint::On(on))
                    | J::Left(ast::JoinConstraint::On(on))
                    | J::LeftOuter(ast::JoinConstraint::On(on)) = &mut join.join_operator
                    {
                        let old = std::mem::replace(on, Expr::Value(Value::Boolean(true).into()));
                        *on = Expr::BinaryOp {
                            left: Box::new(old),
                            op: ast::BinaryOperator::And,
                            right: Box::new(extra),
                        };
                    }
                }
            }
            ControlFlow::Continue(())
        }
    }
    let mut v = Lookups {
        found: vec![],
        versioned,
    };
    let _ = node.visit(&mut v);
    v.found
}

#[cfg(test)]
mod tests {
    use super::java_to_chrono;

    #[test]
    fn java_patterns_map_to_chrono() {
        assert_eq!(
            java_to_chrono("yyyy-MM-dd HH:mm:ss.SSS"),
            "%Y-%m-%d %H:%M:%S.%3f"
        );
        assert_eq!(java_to_chrono("yyyyMMdd'T'HH"), "%Y%m%dT%H");
    }
}
