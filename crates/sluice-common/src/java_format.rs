//! Date-time patterns as Flink's `DATE_FORMAT` reads them: `java.time.format.DateTimeFormatter`
//! patterns in the US locale (what Flink 2.3 runs with on a default JVM: weeks start on
//! Sunday, and week 1 is the week of January 1). Checked against Flink 2.3's own output.
//!
//! The pattern is parsed once into items; formatting a value writes each item's text.

use chrono::{Datelike, NaiveDate, NaiveDateTime, Timelike};

/// One piece of a pattern.
#[derive(Clone, Debug, PartialEq)]
enum Item {
    Literal(String),
    /// A pattern letter and how many times it is repeated.
    Field(char, usize),
}

/// A parsed `DateTimeFormatter` pattern.
#[derive(Clone, Debug)]
pub struct JavaDateFormat {
    items: Vec<Item>,
}

const SHORT_MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];
const LONG_MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
/// Sunday first.
const SHORT_DAYS: [&str; 7] = ["Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"];
const LONG_DAYS: [&str; 7] = [
    "Sunday",
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
];

impl JavaDateFormat {
    /// Parses a pattern; an unknown or over-long letter, an unclosed quote or a time-zone letter
    /// (a TIMESTAMP has no zone) is an error naming it.
    pub fn parse(pattern: &str) -> Result<JavaDateFormat, String> {
        let chars: Vec<char> = pattern.chars().collect();
        let mut items = vec![];
        let mut literal = String::new();
        let mut i = 0;
        while i < chars.len() {
            let c = chars[i];
            if c == '\'' {
                // '' is a quote; 'text' is literal text, with '' inside for a quote.
                if chars.get(i + 1) == Some(&'\'') {
                    literal.push('\'');
                    i += 2;
                    continue;
                }
                let mut j = i + 1;
                loop {
                    match chars.get(j) {
                        None => return Err(format!("pattern '{pattern}': unclosed quote")),
                        Some('\'') if chars.get(j + 1) == Some(&'\'') => {
                            literal.push('\'');
                            j += 2;
                        }
                        Some('\'') => break,
                        Some(&x) => {
                            literal.push(x);
                            j += 1;
                        }
                    }
                }
                i = j + 1;
                continue;
            }
            if !c.is_ascii_alphabetic() {
                match c {
                    // Optional sections: every field of a timestamp is there, so they print.
                    '[' | ']' => {}
                    '{' | '}' | '#' => {
                        return Err(format!(
                            "pattern '{pattern}': '{c}' is reserved in a date-time pattern"
                        ))
                    }
                    _ => literal.push(c),
                }
                i += 1;
                continue;
            }
            let mut n = 1;
            while chars.get(i + n) == Some(&c) {
                n += 1;
            }
            check_letter(pattern, c, n)?;
            if !literal.is_empty() {
                items.push(Item::Literal(std::mem::take(&mut literal)));
            }
            items.push(Item::Field(c, n));
            i += n;
        }
        if !literal.is_empty() {
            items.push(Item::Literal(literal));
        }
        Ok(JavaDateFormat { items })
    }

    /// Whether every instant of a minute formats alike (no seconds or finer fields).
    pub fn minute_or_coarser(&self) -> bool {
        self.items
            .iter()
            .all(|i| !matches!(i, Item::Field('s' | 'S' | 'A' | 'n' | 'N', _)))
    }

    /// Appends the text of `t`.
    pub fn write(&self, t: &NaiveDateTime, out: &mut String) {
        for item in &self.items {
            match item {
                Item::Literal(s) => out.push_str(s),
                Item::Field(c, n) => field(t, *c, *n, out),
            }
        }
    }

    /// The text of `t`.
    pub fn format(&self, t: &NaiveDateTime) -> String {
        let mut out = String::new();
        self.write(t, &mut out);
        out
    }
}

/// The letters `DateTimeFormatter` knows, with the most repetitions each takes.
fn check_letter(pattern: &str, c: char, n: usize) -> Result<(), String> {
    let max = match c {
        'G' | 'M' | 'L' | 'Q' | 'q' | 'E' | 'e' => 5,
        'c' => {
            if n == 2 {
                return Err(format!("pattern '{pattern}': invalid pattern \"cc\""));
            }
            5
        }
        'd' | 'h' | 'H' | 'k' | 'K' | 'm' | 's' | 'w' => 2,
        'D' => 3,
        'W' | 'F' | 'a' => 1,
        'y' | 'u' | 'Y' | 'S' | 'A' | 'n' | 'N' => 19,
        'V' | 'v' | 'z' | 'Z' | 'O' | 'X' | 'x' => {
            return Err(format!(
                "pattern '{pattern}': '{c}' formats a time zone, which a TIMESTAMP has none of"
            ))
        }
        'B' => {
            return Err(format!(
                "pattern '{pattern}': 'B' (day period) is not supported"
            ))
        }
        _ => return Err(format!("pattern '{pattern}': unknown pattern letter '{c}'")),
    };
    if n > max {
        return Err(format!(
            "pattern '{pattern}': too many pattern letters: {}",
            std::iter::repeat_n(c, n).collect::<String>()
        ));
    }
    Ok(())
}

/// `v` padded with zeros to `width` digits (a minus sign first for negative values).
fn number(v: i64, width: usize, out: &mut String) {
    use std::fmt::Write;
    if v < 0 {
        out.push('-');
    }
    let _ = write!(out, "{:0width$}", v.unsigned_abs());
}

/// A year field: two letters give its last two digits; otherwise at least `n` digits, and from
/// four letters on a `+` when the year has more digits than letters.
fn year(v: i64, n: usize, out: &mut String) {
    if n == 2 {
        number(v.rem_euclid(100), 2, out);
        return;
    }
    if n >= 4 && v >= 0 && v.to_string().len() > n {
        out.push('+');
    }
    number(v, n, out);
}

/// Days since Sunday (0 = Sunday).
fn from_sunday(d: NaiveDate) -> i64 {
    d.weekday().num_days_from_sunday() as i64
}

/// The week-based year and week of `d` under US rules (Sunday first, week 1 holds January 1).
fn us_week(d: NaiveDate) -> (i64, i64) {
    let saturday = d + chrono::Duration::days(6 - from_sunday(d));
    let week_year = saturday.year();
    let jan1 = NaiveDate::from_ymd_opt(week_year, 1, 1).expect("January 1");
    let week1 = jan1 - chrono::Duration::days(from_sunday(jan1));
    (week_year as i64, (d - week1).num_days() / 7 + 1)
}

fn field(t: &NaiveDateTime, c: char, n: usize, out: &mut String) {
    let d = t.date();
    let short_long_narrow = |short: &str, long: &str, out: &mut String| match n {
        4 => out.push_str(long),
        5 => out.push_str(&long[..1]),
        _ => out.push_str(short),
    };
    match c {
        'G' => {
            let ad = d.year() > 0;
            match n {
                4 => out.push_str(if ad { "Anno Domini" } else { "Before Christ" }),
                5 => out.push_str(if ad { "A" } else { "B" }),
                _ => out.push_str(if ad { "AD" } else { "BC" }),
            }
        }
        'u' => year(d.year() as i64, n, out),
        'y' => {
            let y = d.year() as i64;
            year(if y > 0 { y } else { 1 - y }, n, out)
        }
        'Y' => year(us_week(d).0, n, out),
        'M' | 'L' => {
            let m = d.month0() as usize;
            match n {
                1 | 2 => number(m as i64 + 1, n, out),
                _ => short_long_narrow(SHORT_MONTHS[m], LONG_MONTHS[m], out),
            }
        }
        'Q' | 'q' => {
            let q = d.month0() / 3 + 1;
            match n {
                1 | 2 => number(q as i64, n, out),
                3 => out.push_str(&format!("Q{q}")),
                4 => out.push_str(["1st", "2nd", "3rd", "4th"][q as usize - 1]),
                _ => number(q as i64, 1, out),
            }
            if n == 4 {
                out.push_str(" quarter");
            }
        }
        'w' => number(us_week(d).1, n, out),
        'W' => {
            let first = d.with_day(1).expect("day 1");
            number((d.day0() as i64 + from_sunday(first)) / 7 + 1, 1, out)
        }
        'd' => number(d.day() as i64, n, out),
        'D' => number(d.ordinal() as i64, n, out),
        // JDK 17 maps 'F' to the aligned day of week in the month.
        'F' => number(d.day0() as i64 % 7 + 1, 1, out),
        'E' => {
            let w = from_sunday(d) as usize;
            short_long_narrow(SHORT_DAYS[w], LONG_DAYS[w], out)
        }
        'e' | 'c' => {
            let w = from_sunday(d) as usize;
            match n {
                1 | 2 => number(w as i64 + 1, n, out),
                _ => short_long_narrow(SHORT_DAYS[w], LONG_DAYS[w], out),
            }
        }
        'a' => out.push_str(if t.hour() < 12 { "AM" } else { "PM" }),
        'H' => number(t.hour() as i64, n, out),
        'k' => number(if t.hour() == 0 { 24 } else { t.hour() as i64 }, n, out),
        'K' => number(t.hour() as i64 % 12, n, out),
        'h' => {
            let h = t.hour() as i64 % 12;
            number(if h == 0 { 12 } else { h }, n, out)
        }
        'm' => number(t.minute() as i64, n, out),
        's' => number(t.second() as i64, n, out),
        'S' => {
            let digits = format!("{:09}", t.nanosecond().min(999_999_999));
            let k = n.min(9);
            out.push_str(&digits[..k]);
            for _ in 9..n {
                out.push('0');
            }
        }
        'A' => number(
            t.num_seconds_from_midnight() as i64 * 1000 + t.nanosecond() as i64 / 1_000_000,
            n,
            out,
        ),
        'n' => number(t.nanosecond() as i64, n, out),
        'N' => number(
            t.num_seconds_from_midnight() as i64 * 1_000_000_000 + t.nanosecond() as i64,
            n,
            out,
        ),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::JavaDateFormat;

    fn at(text: &str) -> chrono::NaiveDateTime {
        chrono::NaiveDateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S%.3f").unwrap()
    }

    /// Each expected text is Flink 2.3's own `DATE_FORMAT(TIMESTAMP '...', '...')` output
    /// (run on a default JVM, 2026-12-06).
    #[test]
    fn patterns_format_as_flink_does() {
        let cases = [
            ("2024-12-29 05:06:07.008", "YYYY-ww", "2025-01"),
            ("2024-12-29 05:06:07.008", "YYYYww", "202501"),
            ("2024-12-29 05:06:07.008", "u", "2024"),
            ("2024-12-29 05:06:07.008", "E", "Sun"),
            ("2024-12-29 05:06:07.008", "EEEE", "Sunday"),
            ("2024-12-29 05:06:07.008", "d/M/H", "29/12/5"),
            ("2024-12-29 05:06:07.008", "dd/MM/HH", "29/12/05"),
            ("2024-12-29 05:06:07.008", "S", "0"),
            ("2024-12-29 05:06:07.008", "SSS", "008"),
            ("2024-12-29 05:06:07.008", "SSSSSS", "008000"),
            ("2024-12-29 05:06:07.008", "y", "2024"),
            ("2024-12-29 05:06:07.008", "yyy", "2024"),
            ("2024-12-29 05:06:07.008", "yy", "24"),
            ("2024-12-29 05:06:07.008", "yyyyy", "02024"),
            ("2024-12-29 05:06:07.008", "D", "364"),
            ("2024-12-29 05:06:07.008", "'T'HH'h'", "T05h"),
            ("2024-12-29 05:06:07.008", "a h K k", "AM 5 5 5"),
            ("2024-12-29 05:06:07.008", "MMM MMMM", "Dec December"),
            ("2024-12-29 05:06:07.008", "w W F", "1 5 1"),
            ("2024-12-29 05:06:07.008", "''yyyy''", "'2024'"),
            ("2024-12-29 05:06:07.008", "G", "AD"),
            ("2024-12-29 05:06:07.008", "Q QQ QQQ", "4 04 Q4"),
            ("2024-12-29 05:06:07.008", "e ee c", "1 01 1"),
            ("2024-12-29 05:06:07.008", "hh KK kk", "05 05 05"),
            ("2024-12-29 05:06:07.008", "n", "8000000"),
            ("2024-12-29 05:06:07.008", "A", "18367008"),
            ("2026-01-01 00:00:00.000", "DDD", "001"),
            ("2026-01-01 00:00:00.000", "E", "Thu"),
            ("2026-01-01 00:00:00.000", "a h K k", "AM 12 0 24"),
            ("2026-01-01 00:00:00.000", "e ee c", "5 05 5"),
            ("2026-01-01 00:00:00.000", "YYYY-ww", "2026-01"),
            ("2021-01-01 13:00:00.120", "S", "1"),
            ("2021-01-01 13:00:00.120", "a h K k", "PM 1 1 13"),
            ("2021-01-01 13:00:00.120", "e ee c", "6 06 6"),
            ("2021-01-01 13:00:00.120", "A", "46800120"),
            ("2021-01-01 13:00:00.120", "n", "120000000"),
            ("2020-12-31 23:59:59.999", "YYYY-ww", "2021-01"),
            ("2020-12-31 23:59:59.999", "w W F", "1 5 3"),
            ("2020-12-31 23:59:59.999", "D", "366"),
            ("2020-12-31 23:59:59.999", "a h K k", "PM 11 11 23"),
            ("2027-01-03 09:09:09.009", "YYYYww", "202702"),
            (
                "2027-01-03 09:09:09.009",
                "E d/M/H w W F e YYYY",
                "Sun 3/1/9 2 2 3 1 2027",
            ),
            (
                "2024-02-29 00:00:00.000",
                "EEEEE MMMMM QQQQ GGGG",
                "T F 1st quarter Anno Domini",
            ),
            (
                "2024-02-29 00:00:00.000",
                "yyyy-MM-dd HH:mm:ss",
                "2024-02-29 00:00:00",
            ),
        ];
        for (t, pattern, want) in cases {
            let f = JavaDateFormat::parse(pattern).unwrap();
            assert_eq!(f.format(&at(t)), want, "{pattern} of {t}");
        }
    }

    /// Week numbers agree with a day-by-day count over 30 years: a week starts on Sunday, and
    /// the week holding January 1 is week 1 of the next week-based year.
    #[test]
    fn week_fields_agree_with_counting_days() {
        use chrono::Datelike;
        let f = JavaDateFormat::parse("YYYY ww").unwrap();
        let mut day = chrono::NaiveDate::from_ymd_opt(2000, 1, 1).unwrap();
        // 2000-01-01 is a Saturday: the week of 1999-12-26, which holds 2000-01-01: week 1.
        let (mut week_year, mut week) = (2000, 1);
        while day.year_ce().1 < 2030 {
            let d = day.and_hms_opt(12, 0, 0).unwrap();
            assert_eq!(f.format(&d), format!("{week_year} {week:02}"), "{day}");
            day = day.succ_opt().unwrap();
            if day.weekday() == chrono::Weekday::Sun {
                let saturday = day + chrono::Duration::days(6);
                if saturday.year() != week_year {
                    week_year = saturday.year();
                    week = 1;
                } else {
                    week += 1;
                }
            }
        }
    }

    #[test]
    fn bad_patterns_are_errors() {
        for (pattern, says) in [
            ("yyyy-MM-dd z", "time zone"),
            ("ddd", "too many"),
            ("b", "unknown pattern letter 'b'"),
            ("'open", "unclosed quote"),
            ("yyyy#", "reserved"),
        ] {
            let e = JavaDateFormat::parse(pattern).unwrap_err();
            assert!(e.contains(says), "{pattern}: {e}");
        }
    }
}
