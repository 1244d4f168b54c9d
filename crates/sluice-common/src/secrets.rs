//! Secrets in table options (passwords, keys, tokens): never shown. SQL shown back to users has
//! their values masked (`'password' = '******'`), and messages and log lines have every known
//! secret value replaced.

use std::sync::RwLock;

/// What a secret is shown as.
pub const MASK: &str = "******";

/// Whether an option holds a secret (its key names a password, secret, token, key or
/// credentials).
pub fn is_secret_key(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    [
        "password",
        "passwd",
        "secret",
        "token",
        "jaas.config",
        "access-key",
        "access.key",
        "credential",
        "private",
        "api-key",
        "apikey",
    ]
    .iter()
    .any(|w| k.contains(w))
}

/// One `'key' = 'value'` option written in a text.
#[derive(Debug, Clone, PartialEq)]
pub struct OptionPair {
    pub key: String,
    /// The value as meant (quotes undoubled).
    pub value: String,
    /// Where the value's text lies, between its quotes.
    pub value_at: std::ops::Range<usize>,
    /// Where the whole pair lies, from the key's opening quote to the value's closing one.
    pub at: std::ops::Range<usize>,
}

/// The `'key' = 'value'` pairs (or `'key' 'value'`, in a statement that does not parse) of a
/// text, quotes doubled inside.
pub fn option_pairs(text: &str) -> Vec<OptionPair> {
    let bytes = text.as_bytes();
    // Quoted strings: (content range, unescaped content).
    let mut strings: Vec<(std::ops::Range<usize>, String)> = vec![];
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\'' {
            let start = i + 1;
            let mut j = start;
            let mut content = String::new();
            let mut closed = false;
            while j < bytes.len() {
                if bytes[j] == b'\'' {
                    if bytes.get(j + 1) == Some(&b'\'') {
                        content.push('\'');
                        j += 2;
                        continue;
                    }
                    closed = true;
                    break;
                }
                let ch = text[j..].chars().next().expect("a char");
                content.push(ch);
                j += ch.len_utf8();
            }
            strings.push((start..j, content));
            if !closed {
                break;
            }
            i = j + 1;
        } else {
            i += 1;
        }
    }
    strings
        .windows(2)
        .filter(|w| {
            let between = &text[w[0].0.end + 1..w[1].0.start - 1];
            matches!(between.trim(), "=" | "")
        })
        .map(|w| OptionPair {
            key: w[0].1.clone(),
            value: w[1].1.clone(),
            value_at: w[1].0.clone(),
            at: w[0].0.start - 1..(w[1].0.end + 1).min(text.len()),
        })
        .collect()
}

/// `text` (SQL) with the values of secret options masked.
pub fn mask_sql(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut at = 0;
    for pair in option_pairs(text) {
        if is_secret_key(&pair.key) && pair.value_at.start >= at {
            out.push_str(&text[at..pair.value_at.start]);
            out.push_str(MASK);
            at = pair.value_at.end;
        }
    }
    out.push_str(&text[at..]);
    out
}

/// The values of the secret options in `text` (SQL), as written between their quotes and as
/// meant (quotes undoubled).
pub fn secret_values(text: &str) -> Vec<String> {
    let mut out = vec![];
    for pair in option_pairs(text) {
        if is_secret_key(&pair.key) {
            let raw = &text[pair.value_at];
            // Very short values would mask unrelated text; they are no protection anyway.
            if raw.len() >= 4 {
                out.push(raw.replace("''", "'"));
                out.push(raw.to_string());
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

/// `text` with every occurrence of each of `secrets` replaced by the mask.
pub fn redact(text: &str, secrets: &[String]) -> String {
    let mut out = text.to_string();
    // Longest first, so that one secret inside another is not left half-shown.
    let mut sorted: Vec<&String> = secrets.iter().filter(|s| !s.is_empty()).collect();
    sorted.sort_by_key(|s| std::cmp::Reverse(s.len()));
    for s in sorted {
        if out.contains(s.as_str()) {
            out = out.replace(s.as_str(), MASK);
        }
    }
    out
}

static HIDDEN: RwLock<Vec<String>> = RwLock::new(Vec::new());

/// Adds secret values this process must never print (its log lines are redacted).
pub fn hide(values: impl IntoIterator<Item = String>) {
    let mut hidden = HIDDEN.write().unwrap_or_else(|p| p.into_inner());
    hidden.extend(values);
    hidden.sort();
    hidden.dedup();
}

/// `text` with the secrets this process hides replaced.
pub fn redacted(text: &str) -> String {
    let hidden = HIDDEN.read().unwrap_or_else(|p| p.into_inner());
    if hidden.is_empty() {
        return text.to_string();
    }
    redact(text, &hidden)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_options_are_masked_and_their_values_redacted() {
        let sql = "CREATE TABLE t (id INT) WITH ('connector' = 'rabbitmq', 'password' = 'it''s-hidden',\n  'properties.sasl.jaas.config'='org.Plain username=\"u\" password=\"p4ss\";', 'queue' = 'q')";
        let masked = mask_sql(sql);
        assert_eq!(
            masked,
            "CREATE TABLE t (id INT) WITH ('connector' = 'rabbitmq', 'password' = '******',\n  'properties.sasl.jaas.config'='******', 'queue' = 'q')"
        );
        let values = secret_values(sql);
        assert!(values.contains(&"it's-hidden".to_string()));
        assert!(values.contains(&"it''s-hidden".to_string()));
        let message = "amqp://guest:it's-hidden@127.0.0.1:5672 refused";
        assert_eq!(
            redact(message, &values),
            "amqp://guest:******@127.0.0.1:5672 refused"
        );
        // Keys that are not secrets are left alone; a value cut off is masked to its end.
        assert_eq!(mask_sql("'queue' = 'password'"), "'queue' = 'password'");
        assert_eq!(mask_sql("'password' = 'abc"), "'password' = '******");
        assert!(is_secret_key("s3.secret-key") && is_secret_key("PASSWORD"));
        // In a statement that does not parse, too.
        assert_eq!(
            secret_values("WITH ('password' 'abcd')"),
            vec!["abcd".to_string()]
        );
        assert!(!is_secret_key("username") && !is_secret_key("topic"));
    }
}
