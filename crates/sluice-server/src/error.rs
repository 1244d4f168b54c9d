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
            _ => ApiError::plan(e.to_string()),
        }
    }
}
