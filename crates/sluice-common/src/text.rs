//! Help for messages about names: the known name closest to a misspelled one.

/// The known key closest to `key` by edit distance, if it is close.
pub fn closest<'a>(key: &str, known: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    known
        .map(|k| (edit_distance(key, k), k))
        .filter(|(d, k)| *d <= 3.max(k.len() / 6))
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

/// Levenshtein distance over bytes.
pub fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for i in 1..=a.len() {
        let mut diagonal = row[0];
        row[0] = i;
        for j in 1..=b.len() {
            let next = (diagonal + usize::from(a[i - 1] != b[j - 1]))
                .min(row[j] + 1)
                .min(row[j - 1] + 1);
            diagonal = row[j];
            row[j] = next;
        }
    }
    row[b.len()]
}

/// A memory size as Flink writes them: `134217728`, `128mb`, `8 MB`, `64kb`, `1g` (units of
/// 1024). `None` when it is not one.
pub fn memory_size(text: &str) -> Option<u64> {
    let text = text.trim().to_ascii_lowercase();
    let digits = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let shift = match text[digits..].trim() {
        "" | "b" | "bytes" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return None,
    };
    text[..digits]
        .parse::<u64>()
        .ok()?
        .checked_mul(1u64 << shift)
}

/// For tests that keep generated sections of a document in step with the code: each
/// `(name, text)` section must stand between `<!-- generated from <source>: <name> -->` and the
/// next `<!-- end -->` in the file at `path`. With `SLUICE_BLESS` set, stale sections are
/// rewritten; otherwise a stale section fails the test, naming it.
pub fn check_generated_sections(path: &str, source: &str, sections: &[(&str, String)]) {
    let mut doc = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let mut stale = vec![];
    for (name, fresh) in sections {
        let begin = format!("<!-- generated from {source}: {name} -->\n");
        let start = doc
            .find(&begin)
            .unwrap_or_else(|| panic!("{path} has no marker {begin:?}"))
            + begin.len();
        let end = start + doc[start..].find("<!-- end -->").expect("the end marker");
        if doc[start..end] != *fresh {
            stale.push(*name);
            doc.replace_range(start..end, fresh);
        }
    }
    if stale.is_empty() {
        return;
    }
    if std::env::var_os("SLUICE_BLESS").is_some() {
        std::fs::write(path, doc).unwrap_or_else(|e| panic!("{path}: {e}"));
    } else {
        panic!("{path} holds other {stale:?} than {source} declares; run this test with SLUICE_BLESS=1 to regenerate it");
    }
}
