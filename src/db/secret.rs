//! Keeping DSN passwords out of `Debug` output, logs and error messages, and generating the
//! random passwords of throwaway clusters.

use std::io::Read;

/// What a redacted password is replaced with.
const MASK: &str = "***";

/// Connection parameter names a key/value DSN may contain (tokio-postgres' and libpq's). An
/// unquoted password value is taken to run until the next of these, so that a password with a
/// space in it (`password=open sesame`) is masked whole rather than only up to the space.
const KNOWN_KEYS: &[&str] = &[
    "host",
    "hostaddr",
    "port",
    "user",
    "password",
    "passfile",
    "dbname",
    "options",
    "application_name",
    "fallback_application_name",
    "sslmode",
    "sslnegotiation",
    "sslcert",
    "sslkey",
    "sslrootcert",
    "sslcrl",
    "sslpassword",
    "connect_timeout",
    "tcp_user_timeout",
    "keepalives",
    "keepalives_idle",
    "keepalives_interval",
    "keepalives_retries",
    "target_session_attrs",
    "channel_binding",
    "load_balance_hosts",
    "client_encoding",
    "gssencmode",
    "krbsrvname",
    "service",
    "replication",
];

/// A DSN with every password replaced by `***`, safe to print, log or put in an error.
///
/// Handles both forms tokio-postgres and libpq accept: URLs
/// (`postgres://user:secret@host/db?password=secret`) and key/value strings
/// (`host=h user=u password='se cret'`). Any parameter whose name ends in `password` is masked.
/// Malformed input is redacted conservatively: an unterminated quoted value is masked to the
/// end of the string, an unquoted one up to the next known parameter name, and in a URL
/// everything between the first `:` of the user info and the last `@` is masked.
///
/// ```
/// use pgcrew::db::redact_dsn;
/// assert_eq!(redact_dsn("postgres://me:s3cret@db:5432/app"), "postgres://me:***@db:5432/app");
/// assert_eq!(redact_dsn("host=db password='s3 cret' dbname=app"), "host=db password=*** dbname=app");
/// ```
pub fn redact_dsn(dsn: &str) -> String {
    match url_scheme_end(dsn) {
        Some(end) => redact_url(dsn, end),
        None => redact_key_value(dsn),
    }
}

/// The byte offset just after `scheme://` when `dsn` starts (after whitespace) with a URL scheme.
fn url_scheme_end(dsn: &str) -> Option<usize> {
    let start = dsn.len() - dsn.trim_start().len();
    let sep = dsn[start..].find("://")? + start;
    let scheme = &dsn[start..sep];
    let mut chars = scheme.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphabetic());
    let rest_ok = chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
    (first_ok && rest_ok).then_some(sep + 3)
}

fn redact_url(dsn: &str, authority_start: usize) -> String {
    let (head, rest) = dsn.split_at(authority_start);
    let mut out = String::with_capacity(dsn.len());
    out.push_str(head);
    // The user info ends at the last `@`: a password may contain an unescaped `@`, `/` or `?`
    // (wrong, but common); masking too much is better than printing part of a password.
    let after_userinfo = match rest.rfind('@') {
        Some(at) => {
            let userinfo = &rest[..at];
            match userinfo.find(':') {
                Some(colon) => {
                    out.push_str(&userinfo[..colon]);
                    out.push(':');
                    out.push_str(MASK);
                }
                None => out.push_str(userinfo),
            }
            out.push('@');
            &rest[at + 1..]
        }
        None => rest,
    };
    // Query parameters: `?password=...&...`.
    let mut remaining = after_userinfo;
    while let Some(pos) = remaining.find(['?', '&']) {
        out.push_str(&remaining[..=pos]);
        remaining = &remaining[pos + 1..];
        let key_end = remaining.find(['=', '&', '#']).unwrap_or(remaining.len());
        let key = &remaining[..key_end];
        if is_password_key(key) && remaining[key_end..].starts_with('=') {
            out.push_str(key);
            out.push('=');
            out.push_str(MASK);
            let value = &remaining[key_end + 1..];
            let value_end = value.find(['&', '#']).unwrap_or(value.len());
            remaining = &value[value_end..];
        }
    }
    out.push_str(remaining);
    out
}

fn is_password_key(key: &str) -> bool {
    key.trim().to_ascii_lowercase().ends_with("password")
}

fn redact_key_value(dsn: &str) -> String {
    let b = dsn.as_bytes();
    let mut out = String::with_capacity(dsn.len());
    let mut i = 0;
    while i < b.len() {
        // Whitespace between parameters.
        let ws_end = skip_ws(dsn, i);
        out.push_str(&dsn[i..ws_end]);
        i = ws_end;
        if i >= b.len() {
            break;
        }
        // The keyword, up to `=` or whitespace.
        let key_end = dsn[i..]
            .find(|c: char| c == '=' || c.is_whitespace())
            .map_or(b.len(), |p| p + i);
        let key = &dsn[i..key_end];
        out.push_str(key);
        i = key_end;
        let eq = skip_ws(dsn, i);
        if eq >= b.len() || b[eq] != b'=' {
            // Not `key=value`: copy the whitespace and carry on with the next word.
            continue;
        }
        out.push_str(&dsn[i..=eq]);
        let value_start = skip_ws(dsn, eq + 1);
        out.push_str(&dsn[eq + 1..value_start]);
        let value_end = value_end(dsn, value_start, is_password_key(key));
        if is_password_key(key) {
            out.push_str(MASK);
        } else {
            out.push_str(&dsn[value_start..value_end]);
        }
        i = value_end;
    }
    out
}

fn skip_ws(s: &str, from: usize) -> usize {
    s[from..]
        .find(|c: char| !c.is_whitespace())
        .map_or(s.len(), |p| p + from)
}

/// Where the value starting at `start` ends: after its closing quote (or at the end of the
/// string when the quote is never closed), or at the next whitespace; for a password, an
/// unquoted value also swallows following words up to the next known `key=`.
fn value_end(s: &str, start: usize, greedy: bool) -> usize {
    let b = s.as_bytes();
    if start < b.len() && b[start] == b'\'' {
        let mut i = start + 1;
        while i < b.len() {
            match b[i] {
                b'\\' => i += 2,
                b'\'' => return i + 1,
                _ => i += 1,
            }
        }
        return b.len();
    }
    let word_end = |from: usize| {
        let mut i = from;
        while i < b.len() && !(b[i] as char).is_ascii_whitespace() {
            i += if b[i] == b'\\' { 2 } else { 1 };
        }
        i.min(b.len())
    };
    let mut end = word_end(start);
    if !greedy {
        return end;
    }
    loop {
        let next = skip_ws(s, end);
        if next >= b.len() || starts_known_parameter(&s[next..]) {
            return end;
        }
        end = word_end(next);
    }
}

/// Whether `s` starts with `known_key` followed by optional whitespace and `=`.
fn starts_known_parameter(s: &str) -> bool {
    let key_end = s
        .find(|c: char| c == '=' || c.is_whitespace())
        .unwrap_or(s.len());
    let key = &s[..key_end];
    KNOWN_KEYS.iter().any(|k| k.eq_ignore_ascii_case(key))
        && s[key_end..].trim_start().starts_with('=')
}

/// Mask the backquoted fragments of a tokio-postgres DSN parse error that are not parameter
/// names: `unknown option `sesame`` or `got `x`` may quote part of a malformed password.
pub(crate) fn scrub_parse_detail(detail: &str) -> String {
    let mut out = String::with_capacity(detail.len());
    let mut parts = detail.split('`');
    if let Some(first) = parts.next() {
        out.push_str(first);
    }
    let mut inside = true;
    for part in parts {
        out.push('`');
        if inside && !KNOWN_KEYS.contains(&part) && !matches!(part, "=" | "'" | " ") {
            out.push_str(MASK);
        } else {
            out.push_str(part);
        }
        inside = !inside;
    }
    out
}

/// A fresh random password (48 hex digits, 192 bits) read from the kernel's CSPRNG
/// (`/dev/urandom`); hex so that it needs no quoting in a URL or key/value DSN.
pub(crate) fn random_password() -> std::io::Result<String> {
    let mut bytes = [0u8; 24];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(hex::encode(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_lose_their_passwords() {
        for (dsn, want) in [
            (
                "postgres://me:s3cret@db:5432/app",
                "postgres://me:***@db:5432/app",
            ),
            (
                "postgresql://me:p@ss/w?rd@db/app?sslmode=disable",
                "postgresql://me:***@db/app?sslmode=disable",
            ),
            ("postgres://me@db/app", "postgres://me@db/app"),
            ("postgres://db/app", "postgres://db/app"),
            (
                "postgres://db/app?user=me&password=s3cret&sslmode=disable",
                "postgres://db/app?user=me&password=***&sslmode=disable",
            ),
            (
                "postgres://db/app?sslpassword=s3cret",
                "postgres://db/app?sslpassword=***",
            ),
            ("  postgres://me:s3cret@db", "  postgres://me:***@db"),
        ] {
            assert_eq!(redact_dsn(dsn), want, "{dsn}");
        }
    }

    #[test]
    fn key_value_strings_lose_their_passwords() {
        for (dsn, want) in [
            (
                "host=db user=me password=s3cret dbname=app",
                "host=db user=me password=*** dbname=app",
            ),
            (
                "host=db password = 's3 \\' cret' dbname=app",
                "host=db password = *** dbname=app",
            ),
            ("password='unterminated dbname=x", "password=***"),
            (
                "host=db password=open sesame=1 dbname=app",
                "host=db password=*** dbname=app",
            ),
            ("PASSWORD=s3cret", "PASSWORD=***"),
            ("host=db dbname=app", "host=db dbname=app"),
            ("this is not a dsn", "this is not a dsn"),
            ("", ""),
            ("password=", "password=***"),
            ("password", "password"),
            ("host=db password=a\\ b", "host=db password=***"),
        ] {
            assert_eq!(redact_dsn(dsn), want, "{dsn}");
        }
    }

    #[test]
    fn parse_details_keep_parameter_names_only() {
        assert_eq!(
            scrub_parse_detail("unknown option `sesame`"),
            "unknown option `***`"
        );
        assert_eq!(
            scrub_parse_detail("invalid value for parameter `port`"),
            "invalid value for parameter `port`"
        );
        assert_eq!(
            scrub_parse_detail("unexpected character at byte 3: expected `=` but got `x`"),
            "unexpected character at byte 3: expected `=` but got `***`"
        );
    }

    #[test]
    fn random_passwords_are_long_hex_and_differ() {
        let a = random_password().expect("urandom");
        let b = random_password().expect("urandom");
        assert_eq!(a.len(), 48);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }
}
