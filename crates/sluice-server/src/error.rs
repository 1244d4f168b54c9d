//! Errors of the server's interfaces: one SQLSTATE each, which the Postgres wire protocol sends
//! as is and REST maps to an HTTP status, with the message and, for SQL, the position.

use serde::Serialize;

/// An error for the client.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ApiError {
    /// The SQLSTATE (`42P01`, ...).
    pub code: &'static str,
    pub message: String,
    /// 1-based character position in the statement, where the error has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub position: Option<usize>,
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ApiError {}

impl ApiError {
    pub fn new(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            code,
            message: message.into(),
            position: None,
        }
    }

    pub fn at(mut self, position: usize) -> ApiError {
        self.position = Some(position);
        self
    }

    pub fn syntax(message: impl Into<String>) -> ApiError {
        ApiError::new("42601", message)
    }
    /// Planning errors: the statement parses but cannot run (unknown columns, bad options).
    pub fn plan(message: impl Into<String>) -> ApiError {
        ApiError::new("42000", message)
    }
    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new("42704", message)
    }
    pub fn undefined_table(message: impl Into<String>) -> ApiError {
        ApiError::new("42P01", message)
    }
    pub fn duplicate(message: impl Into<String>) -> ApiError {
        ApiError::new("42710", message)
    }
    pub fn denied(message: impl Into<String>) -> ApiError {
        ApiError::new("42501", message)
    }
    pub fn invalid(message: impl Into<String>) -> ApiError {
        ApiError::new("22023", message)
    }
    pub fn auth(message: impl Into<String>) -> ApiError {
        ApiError::new("28P01", message)
    }
    /// A quota would be exceeded.
    pub fn quota(message: impl Into<String>) -> ApiError {
        ApiError::new("53400", message)
    }
    pub fn unsupported(message: impl Into<String>) -> ApiError {
        ApiError::new("0A000", message)
    }
    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new("XX000", message)
    }

    /// The HTTP status REST answers with.
    pub fn http_status(&self) -> u16 {
        match self.code {
            "28P01" => 401,
            "42501" => 403,
            "42704" | "42P01" => 404,
            "42710" => 409,
            "53400" => 429,
            "XX000" => 500,
            "0A000" => 501,
            _ => 400,
        }
    }

    /// From a Sluice SQL error: syntax errors keep their line and column as a position in
    /// `sql`.
    pub fn from_sql(e: &sluice_common::Error, sql: &str) -> ApiError {
        match e {
            sluice_common::Error::Syntax { line, column, .. } => {
                let mut pos = 0;
                for (i, l) in sql.split_inclusive('\n').enumerate() {
                    if i + 1 == *line as usize {
                        pos += (*column as usize).min(l.chars().count());
                        break;
                    }
                    pos += l.chars().count();
                }
                ApiError::syntax(e.to_string()).at(pos.max(1))
            }
            sluice_common::Error::Plan(message) => {
                let err = ApiError::plan(e.to_string());
                match plan_error_position(message, sql) {
                    Some(pos) => err.at(pos),
                    None => err,
                }
            }
            _ => ApiError::plan(e.to_string()),
        }
    }
}

/// Where a planning error's unknown name is: the planner says which statement failed
/// (`statement at line N: ...`), and names the column or table it did not find (`No field
/// named x.`, `table or view 'x' not found`); its first whole-word use from that line on is the
/// 1-based character position in `sql`.
fn plan_error_position(message: &str, sql: &str) -> Option<usize> {
    let rest = message.strip_prefix("statement at line ")?;
    let (line, rest) = rest.split_once(':')?;
    let line: usize = line.trim().parse().ok()?;
    let name = if let Some(after) = rest.split_once("No field named ").map(|(_, a)| a) {
        after
            .split(|c: char| c.is_whitespace())
            .next()?
            .trim_end_matches('.')
    } else if rest.contains(" not found") {
        // `table or view 'x' not found`: the first quoted name.
        rest.split_once('\'')?.1.split_once('\'')?.0
    } else {
        return None;
    };
    // A qualified name as written, else its last part (`orders.x` written as `x`).
    let name = name.trim_matches('"');
    let start: usize = sql
        .split_inclusive('\n')
        .take(line.saturating_sub(1))
        .map(|l| l.chars().count())
        .sum();
    let chars: Vec<char> = sql.chars().collect();
    let word = |c: char| c.is_alphanumeric() || c == '_';
    let find = |needle: &str| -> Option<usize> {
        let n: Vec<char> = needle.chars().collect();
        if n.is_empty() {
            return None;
        }
        (start..chars.len().saturating_sub(n.len() - 1)).find(|&i| {
            chars[i..i + n.len()]
                .iter()
                .zip(&n)
                .all(|(a, b)| a.eq_ignore_ascii_case(b))
                && (i == 0 || !word(chars[i - 1]))
                && chars.get(i + n.len()).is_none_or(|c| !word(*c))
        })
    };
    find(name)
        .or_else(|| find(name.rsplit('.').next()?))
        .map(|i| i + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unknown_name_is_found_in_the_statement_that_failed() {
        let sql = "SELECT provnce FROM t0;\nSELECT a,\n  provnce FROM orders";
        let e = sluice_common::Error::Plan(
            "statement at line 2: No field named provnce. Did you mean 'orders.province'?".into(),
        );
        let err = ApiError::from_sql(&e, sql);
        let at = err.position.unwrap();
        // The second statement's use (line 3), not the first statement's.
        assert_eq!(
            sql.chars().skip(at - 1).take(7).collect::<String>(),
            "provnce"
        );
        assert!(at > 24, "{at}");
        let e = sluice_common::Error::Plan(
            "statement at line 1: table or view 'ordrs' not found (defined: none defined)".into(),
        );
        let err = ApiError::from_sql(&e, "SELECT * FROM ordrs");
        assert_eq!(err.position, Some(15));
        // A message naming nothing it can find has no position.
        let e = sluice_common::Error::Plan("statement at line 1: something else".into());
        assert_eq!(ApiError::from_sql(&e, "SELECT 1").position, None);
        let e = sluice_common::Error::Plan("No field named x.".into());
        assert_eq!(ApiError::from_sql(&e, "SELECT x").position, None);
    }
}
