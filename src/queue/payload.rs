//! Sizes and bounds of what a task stores: its payload's JSON text and its error texts.

use super::MAX_ERROR_CHARS;
use crate::error::{Error, Result};

/// The size in bytes of `payload`'s JSON text as PostgreSQL renders the stored `jsonb`
/// (`octet_length(payload::text)`: `", "` and `": "` separators, numbers as `numeric` prints
/// them), the measure [`MAX_PAYLOAD_BYTES`](super::MAX_PAYLOAD_BYTES) applies to on every enqueue path, the SQL function
/// `pgcrew.enqueue_task` included. `Err` names what `jsonb` cannot store at all (a NUL
/// character, `\u0000`, in a string or key).
pub fn payload_size(payload: &serde_json::Value) -> Result<usize> {
    use serde_json::Value;
    fn string(s: &str) -> Result<usize> {
        let mut n = 2;
        for c in s.chars() {
            n += match c {
                '\0' => {
                    return Err(Error::invalid(
                        "payload",
                        "contains a NUL character (\\u0000), which PostgreSQL's jsonb cannot store: remove it or encode the data (e.g. base64)",
                    ));
                }
                '"' | '\\' | '\u{8}' | '\u{c}' | '\n' | '\r' | '\t' => 2,
                c if (c as u32) < 0x20 => 6,
                c => c.len_utf8(),
            };
        }
        Ok(n)
    }
    fn value(v: &Value) -> Result<usize> {
        Ok(match v {
            Value::Null | Value::Bool(true) => 4,
            Value::Bool(false) => 5,
            Value::Number(n) => numeric_len(&n.to_string()),
            Value::String(s) => string(s)?,
            Value::Array(a) => {
                let mut n = 2 + 2 * a.len().saturating_sub(1);
                for x in a {
                    n += value(x)?;
                }
                n
            }
            Value::Object(m) => {
                let mut n = 2 + 2 * m.len().saturating_sub(1);
                for (k, x) in m {
                    n += string(k)? + 2 + value(x)?;
                }
                n
            }
        })
    }
    value(payload)
}

/// Length of PostgreSQL's `numeric` output for a JSON number written as `text`
/// (`-1.5e-7` prints as `-0.00000015`, `1e16` as `10000000000000000`, `-0` as `0`).
fn numeric_len(text: &str) -> usize {
    let (neg, rest) = match text.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, text),
    };
    let (mantissa, exp) = match rest.find(['e', 'E']) {
        Some(i) => (
            &rest[..i],
            rest[i + 1..]
                .trim_start_matches('+')
                .parse::<i64>()
                .unwrap_or(0),
        ),
        None => (rest, 0),
    };
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let digits = int.len() as i64 + frac.len() as i64;
    // Digits before the decimal point once the exponent is applied.
    let point = int.len() as i64 + exp;
    let scale = (frac.len() as i64 - exp).max(0);
    let all = int.bytes().chain(frac.bytes());
    let nonzero = all.clone().any(|b| b != b'0');
    // Integer part: the digits before the point (padded with zeros), without leading zeros.
    let leading_zeros = all
        .take(point.clamp(0, digits) as usize)
        .take_while(|b| *b == b'0')
        .count() as i64;
    let int_len = if point <= 0 || !nonzero {
        1
    } else {
        (point - leading_zeros).max(1)
    };
    let sign = usize::from(neg && nonzero);
    sign + int_len as usize + if scale > 0 { 1 + scale as usize } else { 0 }
}

/// `text` made storable as a task's error: NUL characters (which PostgreSQL text cannot hold)
/// become `␀` (U+2400), and a text longer than [`MAX_ERROR_CHARS`] characters keeps its
/// beginning and ends with ` … [truncated: N characters in all]` (N counts the whole text),
/// exactly as `pgcrew.ack_tasks` bounds what it is given. Borrowed when nothing changes.
pub fn bound_error_text(text: &str) -> std::borrow::Cow<'_, str> {
    use std::borrow::Cow;
    let has_nul = text.contains('\0');
    // At most MAX_ERROR_CHARS bytes is at most that many characters.
    if !has_nul && text.len() <= MAX_ERROR_CHARS {
        return Cow::Borrowed(text);
    }
    let clean: Cow<'_, str> = if has_nul {
        Cow::Owned(text.replace('\0', "\u{2400}"))
    } else {
        Cow::Borrowed(text)
    };
    let total = clean.chars().count();
    if total <= MAX_ERROR_CHARS {
        return clean;
    }
    let marker = format!(" … [truncated: {total} characters in all]");
    let keep = MAX_ERROR_CHARS.saturating_sub(marker.chars().count());
    let cut = clean
        .char_indices()
        .nth(keep)
        .map_or(clean.len(), |(i, _)| i);
    Cow::Owned(format!("{}{marker}", &clean[..cut]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_texts_are_bounded_and_storable() {
        assert!(matches!(
            bound_error_text("plain"),
            std::borrow::Cow::Borrowed("plain")
        ));
        assert_eq!(bound_error_text("a\0b\0"), "a\u{2400}b\u{2400}");
        let exact = "é".repeat(MAX_ERROR_CHARS);
        assert_eq!(bound_error_text(&exact), exact);
        let long = format!("{}\0", "é".repeat(MAX_ERROR_CHARS));
        let b = bound_error_text(&long);
        assert_eq!(b.chars().count(), MAX_ERROR_CHARS);
        assert!(b.starts_with("éé"));
        assert!(!b.contains('\0'));
        assert!(
            b.ends_with(&format!(
                " … [truncated: {} characters in all]",
                MAX_ERROR_CHARS + 1
            )),
            "{}",
            &b[b.len() - 50..]
        );
    }

    #[test]
    fn payload_size_is_postgresql_json_text_length() {
        use serde_json::json;
        let cases = [
            (json!({}), "{}"),
            (json!([]), "[]"),
            (
                json!({"a": 1, "b": [true, false, null]}),
                r#"{"a": 1, "b": [true, false, null]}"#,
            ),
            (json!("q\"\\\n\u{1}é"), r#""q\"\\\n\u0001é""#),
        ];
        for (v, text) in cases {
            assert_eq!(payload_size(&v).unwrap(), text.len(), "{v}");
        }
        for (num, pg) in [
            ("1e16", "10000000000000000"),
            ("1.5e-7", "0.00000015"),
            ("-1.5E+2", "-150"),
            ("-0", "0"),
            ("-0.0", "0.0"),
            ("0e5", "0"),
            ("0.5e3", "500"),
            ("100.0", "100.0"),
            ("-12.25", "-12.25"),
            ("18446744073709551615", "18446744073709551615"),
        ] {
            assert_eq!(numeric_len(num), pg.len(), "{num}");
        }
        assert!(payload_size(&json!({"k": "nul\u{0}"})).is_err());
        assert!(payload_size(&json!({"nul\u{0}": 1})).is_err());
    }
}
