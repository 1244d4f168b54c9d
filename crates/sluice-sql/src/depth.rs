//! Limits on how deep a statement may nest, so that no query overflows a stack: long AND/OR
//! chains (which SQL generators write) are flattened, and anything still deeper than
//! [`MAX_EXPR_DEPTH`] is an error naming the limit.

use std::ops::ControlFlow;

use sqlparser::ast::{self, BinaryOperator, Expr, VisitMut, VisitorMut};

use sluice_common::{Error, Result};

/// The deepest expression a statement may hold once its AND/OR chains are balanced.
pub const MAX_EXPR_DEPTH: usize = 256;

/// The deepest chain of views over views.
pub const MAX_VIEW_DEPTH: usize = 64;

/// Chains of one AND or OR longer than this are rebalanced (shorter ones keep their shape, and
/// so the names of the columns they compute).
const CHAIN: usize = 64;

/// The stack the front end runs on: enough for [`MAX_EXPR_DEPTH`] and [`MAX_VIEW_DEPTH`] in
/// the parser, DataFusion's planner and its optimizer, whatever thread calls it.
pub const STACK_BYTES: usize = 256 << 20;

/// Flattens long AND/OR chains (an OR of equalities of one expression becomes `IN`), then
/// checks that no expression nests deeper than [`MAX_EXPR_DEPTH`].
pub fn limit<V: VisitMut>(node: &mut V) -> Result<()> {
    let mut v = Limiter { depth: 0 };
    match node.visit(&mut v) {
        ControlFlow::Continue(()) => Ok(()),
        ControlFlow::Break(e) => Err(e),
    }
}

struct Limiter {
    depth: usize,
}

impl VisitorMut for Limiter {
    type Break = Error;

    fn pre_visit_expr(&mut self, expr: &mut Expr) -> ControlFlow<Error> {
        if let Expr::BinaryOp {
            op: op @ (BinaryOperator::And | BinaryOperator::Or),
            ..
        } = expr
        {
            let op = op.clone();
            let mut terms = vec![];
            flatten(
                std::mem::replace(expr, Expr::value(ast::Value::Null)),
                &op,
                &mut terms,
            );
            *expr = if terms.len() <= CHAIN {
                rebuild_left_deep(terms, &op)
            } else {
                in_list(&terms, &op).unwrap_or_else(|| balanced(terms, &op))
            };
        }
        self.depth += 1;
        if self.depth > MAX_EXPR_DEPTH {
            return ControlFlow::Break(Error::plan(format!(
                "an expression nests deeper than {MAX_EXPR_DEPTH} levels (a chain of thousands of \
                 operators?): split it, or use IN (...) for a long list of alternatives"
            )));
        }
        ControlFlow::Continue(())
    }

    fn post_visit_expr(&mut self, _expr: &mut Expr) -> ControlFlow<Error> {
        self.depth -= 1;
        ControlFlow::Continue(())
    }
}

/// The terms of a chain of `op`, left to right, without recursing.
fn flatten(expr: Expr, op: &BinaryOperator, out: &mut Vec<Expr>) {
    let mut stack = vec![expr];
    while let Some(e) = stack.pop() {
        match e {
            Expr::BinaryOp { left, op: o, right } if o == *op => {
                stack.push(*right);
                stack.push(*left);
            }
            other => out.push(other),
        }
    }
}

fn join(left: Expr, op: &BinaryOperator, right: Expr) -> Expr {
    Expr::BinaryOp {
        left: Box::new(left),
        op: op.clone(),
        right: Box::new(right),
    }
}

/// The chain as parsed: `((a op b) op c) ...`.
fn rebuild_left_deep(terms: Vec<Expr>, op: &BinaryOperator) -> Expr {
    let mut terms = terms.into_iter();
    let first = terms.next().expect("a chain has a term");
    terms.fold(first, |acc, t| join(acc, op, t))
}

/// The chain as a balanced tree (AND and OR are associative, NULLs included).
fn balanced(mut terms: Vec<Expr>, op: &BinaryOperator) -> Expr {
    if terms.len() == 1 {
        return terms.pop().expect("one term");
    }
    let right = terms.split_off(terms.len() / 2);
    join(balanced(terms, op), op, balanced(right, op))
}

/// `x = a OR x = b OR ...` as `x IN (a, b, ...)`, when every term compares one expression with
/// a value.
fn in_list(terms: &[Expr], op: &BinaryOperator) -> Option<Expr> {
    if *op != BinaryOperator::Or {
        return None;
    }
    let mut subject: Option<&Expr> = None;
    let mut list = vec![];
    for t in terms {
        let Expr::BinaryOp {
            left,
            op: BinaryOperator::Eq,
            right,
        } = t
        else {
            return None;
        };
        let (x, v) = match (&**left, &**right) {
            (x, v @ Expr::Value(_)) | (v @ Expr::Value(_), x) => (x, v),
            _ => return None,
        };
        if matches!(x, Expr::Value(_)) || subject.is_some_and(|s| s != x) {
            return None;
        }
        subject = Some(x);
        list.push(v.clone());
    }
    Some(Expr::InList {
        expr: Box::new(subject?.clone()),
        list,
        negated: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(sql: &str) -> ast::Statement {
        let dialect = sqlparser::dialect::GenericDialect {};
        sqlparser::parser::Parser::new(&dialect)
            .try_with_sql(sql)
            .unwrap()
            .parse_statement()
            .unwrap()
    }

    /// Runs `f` on a stack as deep as the planner's.
    fn deep(f: impl FnOnce() + Send + 'static) {
        std::thread::Builder::new()
            .stack_size(STACK_BYTES)
            .spawn(f)
            .unwrap()
            .join()
            .unwrap();
    }

    #[test]
    fn a_long_or_of_equalities_becomes_in() {
        deep(a_long_or_of_equalities_becomes_in_here);
    }

    #[test]
    fn other_long_chains_are_balanced_and_deep_ones_refused() {
        deep(other_long_chains_are_balanced_and_deep_ones_refused_here);
    }

    fn a_long_or_of_equalities_becomes_in_here() {
        let terms: Vec<String> = (0..4000).map(|i| format!("a = {i}")).collect();
        let mut s = parse(&format!("SELECT * FROM t WHERE {}", terms.join(" OR ")));
        limit(&mut s).unwrap();
        let text = s.to_string();
        assert!(text.contains("a IN (0, 1, 2,"), "{}", &text[..80]);
        assert!(text.ends_with("3999)"));
    }

    fn other_long_chains_are_balanced_and_deep_ones_refused_here() {
        let terms: Vec<String> = (0..3000).map(|i| format!("a > {i}")).collect();
        let mut s = parse(&format!("SELECT * FROM t WHERE {}", terms.join(" AND ")));
        limit(&mut s).unwrap();
        let sum: Vec<String> = (0..3000).map(|i| format!("c{i}")).collect();
        let mut s = parse(&format!("SELECT {} FROM t", sum.join(" + ")));
        let e = limit(&mut s).unwrap_err().to_string();
        assert!(e.contains("deeper than 256"), "{e}");
        // Short chains keep their shape.
        let mut s = parse("SELECT a OR b OR c FROM t");
        limit(&mut s).unwrap();
        assert_eq!(s.to_string(), "SELECT a OR b OR c FROM t");
    }
}
