//! Taking the `ssl*` keys pgcrew handles out of a DSN (URL or key/value form), so that the
//! rest can go to tokio-postgres.

use crate::error::{Error, Result};

/// The `ssl*` values taken out of a DSN.
#[derive(Debug, Default)]
pub(super) struct SslKeys {
    pub(super) mode: Option<String>,
    pub(super) rootcert: Option<String>,
    pub(super) cert: Option<String>,
    pub(super) key: Option<String>,
}

impl SslKeys {
    /// Take `key=value` if it is ours; `Ok(false)` hands it to tokio-postgres.
    fn take(&mut self, key: &str, value: String) -> Result<bool> {
        let slot = match key {
            "sslmode" => &mut self.mode,
            "sslrootcert" => &mut self.rootcert,
            "sslcert" => &mut self.cert,
            "sslkey" => &mut self.key,
            "sslpassword" | "sslcrl" | "sslcrldir" => {
                return Err(Error::Config(format!(
                    "the DSN parameter {key} is not supported by pgcrew (use an unencrypted sslkey; certificate revocation lists are not checked)"
                )));
            }
            _ => return Ok(false),
        };
        *slot = Some(value);
        Ok(true)
    }
}

/// Split the `ssl*` keys pgcrew handles out of a DSN; the rest goes to tokio-postgres.
pub(super) fn split_ssl_keys(dsn: &str) -> Result<(String, SslKeys)> {
    let trimmed = dsn.trim_start();
    let mut keys = SslKeys::default();
    if trimmed.starts_with("postgres://") || trimmed.starts_with("postgresql://") {
        // The query starts at the first `?` after the user info (which ends at the last `@`).
        let after_at = trimmed.rfind('@').map_or(0, |p| p + 1);
        let Some(q) = trimmed[after_at..].find('?').map(|p| p + after_at) else {
            return Ok((dsn.to_string(), keys));
        };
        let mut kept = Vec::new();
        for pair in trimmed[q + 1..].split('&') {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            if !keys.take(&percent_decode(k), percent_decode(v))? {
                kept.push(pair);
            }
        }
        let mut out = trimmed[..q].to_string();
        if !kept.is_empty() {
            out.push('?');
            out.push_str(&kept.join("&"));
        }
        return Ok((out, keys));
    }
    // key/value: `key = value` pairs, values unquoted (with `\` escapes) or single-quoted.
    let b = dsn.as_bytes();
    let mut out = String::with_capacity(dsn.len());
    let mut i = 0;
    while i < b.len() {
        let start = i;
        while i < b.len() && b[i].is_ascii_whitespace() {
            i += 1;
        }
        let key_start = i;
        while i < b.len() && b[i] != b'=' && !b[i].is_ascii_whitespace() {
            i += 1;
        }
        let key = &dsn[key_start..i];
        while i < b.len() && b[i].is_ascii_whitespace() {
            i += 1;
        }
        if i >= b.len() || b[i] != b'=' {
            // Malformed: let tokio-postgres report it on the untouched string.
            return Ok((dsn.to_string(), SslKeys::default()));
        }
        i += 1;
        while i < b.len() && b[i].is_ascii_whitespace() {
            i += 1;
        }
        let mut value = String::new();
        if i < b.len() && b[i] == b'\'' {
            i += 1;
            let mut closed = false;
            while i < b.len() {
                match b[i] {
                    b'\\' if i + 1 < b.len() => {
                        value.push(b[i + 1] as char);
                        i += 2;
                    }
                    b'\'' => {
                        i += 1;
                        closed = true;
                        break;
                    }
                    _ => {
                        let ch = dsn[i..].chars().next().unwrap_or(' ');
                        value.push(ch);
                        i += ch.len_utf8();
                    }
                }
            }
            if !closed {
                return Ok((dsn.to_string(), SslKeys::default()));
            }
        } else {
            while i < b.len() && !b[i].is_ascii_whitespace() {
                if b[i] == b'\\' && i + 1 < b.len() {
                    value.push(b[i + 1] as char);
                    i += 2;
                } else {
                    let ch = dsn[i..].chars().next().unwrap_or(' ');
                    value.push(ch);
                    i += ch.len_utf8();
                }
            }
        }
        if !keys.take(key, value)? {
            out.push_str(&dsn[start..i]);
        }
    }
    Ok((out, keys))
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let Some(v) = std::str::from_utf8(&b[i + 1..i + 3])
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(v);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dsns_lose_their_ssl_keys() {
        // (DSN, what tokio-postgres is given, [sslmode, sslrootcert, sslcert, sslkey])
        let cases: [(&str, &str, [Option<&str>; 4]); 5] = [
            (
                "postgres://u:p@h:5432/db?sslmode=verify-full&application_name=x&sslrootcert=%2Ftmp%2Fca.pem",
                "postgres://u:p@h:5432/db?application_name=x",
                [Some("verify-full"), Some("/tmp/ca.pem"), None, None],
            ),
            (
                "postgres://u:p?x@h/db?sslcert=/c&sslkey=/k",
                "postgres://u:p?x@h/db",
                [None, None, Some("/c"), Some("/k")],
            ),
            ("postgres://h/db", "postgres://h/db", [None; 4]),
            (
                "host=h sslmode = 'verify-ca' password='a b' sslrootcert=/tmp/my\\ ca.pem dbname=d",
                "host=h password='a b' dbname=d",
                [Some("verify-ca"), Some("/tmp/my ca.pem"), None, None],
            ),
            (
                "host=h password='unterminated sslmode=x",
                "host=h password='unterminated sslmode=x",
                [None; 4],
            ),
        ];
        for (dsn, rest, want) in cases {
            let (got, k) = split_ssl_keys(dsn).expect("split");
            assert_eq!(got, rest, "{dsn}");
            let keys = [&k.mode, &k.rootcert, &k.cert, &k.key].map(|v| v.as_deref());
            assert_eq!(keys, want, "{dsn}");
        }
    }
}
