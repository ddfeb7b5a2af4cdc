//! The action token: actions are off unless one is configured. A browser logs in once with the
//! token (`/login`) and gets an HttpOnly, `SameSite=Strict` session cookie; every action form
//! then carries a CSRF field, and a request whose `Origin` is another host is refused. API
//! clients send `Authorization: Bearer <token>` instead (no cookie, no CSRF field). Cookie
//! values and the CSRF field are HMAC-SHA-256 digests of the token, never the token itself.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::Shared;
use super::error::UiError;
use super::pages::layout;
use super::respond::Ctx;

/// Shortest token accepted.
pub const MIN_TOKEN_LEN: usize = 16;
/// The session cookie.
pub const SESSION_COOKIE: &str = "pgcrew_ui_session";
/// The cookie naming the operator (recorded with actions).
pub const WHO_COOKIE: &str = "pgcrew_ui_who";

/// The configured token and what is derived from it.
pub(crate) struct Auth {
    token: Option<String>,
    session: Option<String>,
    csrf: Option<String>,
}

fn digest(token: &str, purpose: &str) -> String {
    match Hmac::<Sha256>::new_from_slice(token.as_bytes()) {
        Ok(mut m) => {
            m.update(purpose.as_bytes());
            hex::encode(m.finalize().into_bytes())
        }
        // HMAC takes keys of any length; keep a value nobody can present.
        Err(_) => uuid::Uuid::new_v4().to_string(),
    }
}

/// Equal in time independent of where they differ.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

impl Auth {
    pub(crate) fn new(token: Option<String>) -> Self {
        let session = token.as_deref().map(|t| digest(t, "pgcrew-ui session"));
        let csrf = token.as_deref().map(|t| digest(t, "pgcrew-ui csrf"));
        Auth {
            token,
            session,
            csrf,
        }
    }

    /// Whether actions are on.
    pub(crate) fn enabled(&self) -> bool {
        self.token.is_some()
    }

    fn logged_in(&self, ctx: &Ctx) -> bool {
        match (&self.session, ctx.cookie(SESSION_COOKIE)) {
            (Some(s), Some(c)) => same(s, c),
            _ => false,
        }
    }

    /// The CSRF field for the pages of a logged-in browser.
    pub(crate) fn csrf_for(&self, ctx: &Ctx) -> Option<&str> {
        if self.logged_in(ctx) {
            self.csrf.as_deref()
        } else {
            None
        }
    }

    /// Who may act: `Ok(who)` for a valid bearer token, or a logged-in browser with the CSRF
    /// field from the same origin; 403 otherwise (nothing is changed).
    pub(crate) fn check(
        &self,
        ctx: &Ctx,
        headers: &HeaderMap,
        csrf: Option<&str>,
    ) -> Result<String, UiError> {
        let Some(token) = &self.token else {
            return Err(UiError::forbidden(
                "actions are off: start the console with PGCREW_UI_TOKEN set",
            ));
        };
        let bearer = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if let Some(b) = bearer {
            return if same(b.trim(), token) {
                Ok("api client".into())
            } else {
                Err(UiError::forbidden(
                    "the bearer token is not the console's token",
                ))
            };
        }
        if !self.logged_in(ctx) {
            return Err(UiError::forbidden(
                "refused: log in with the console token first (/login)",
            ));
        }
        let expected = self.csrf.as_deref().unwrap_or_default();
        if !csrf.is_some_and(|c| same(c, expected)) {
            return Err(UiError::forbidden("refused: missing or wrong CSRF field"));
        }
        if let (Some(origin), Some(host)) = (
            headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()),
            headers.get(header::HOST).and_then(|v| v.to_str().ok()),
        ) {
            let origin_host = origin.split_once("://").map(|(_, h)| h).unwrap_or(origin);
            if origin != "null" && origin_host != host {
                return Err(UiError::forbidden("refused: cross-origin request"));
            }
        }
        let who = ctx
            .cookie(WHO_COOKIE)
            .map(decode)
            .filter(|w| !w.trim().is_empty())
            .unwrap_or_else(|| "operator".into());
        Ok(who)
    }
}

/// Decode a percent-encoded cookie value.
fn decode(v: &str) -> String {
    let b = v.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let Ok(x) =
                u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or(""), 16)
        {
            out.push(x);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The login form.
pub(crate) async fn login_page(State(state): State<Shared>, ctx: Ctx) -> Response {
    let enabled = state.auth.enabled();
    let body = maud::html! {
        h2 { "Log in to act" }
        @if !enabled {
            p.warn { "Actions are off: start the console with PGCREW_UI_TOKEN set." }
        } @else {
            form method="post" action=(ctx.link("/login")) {
                label { "Token " input type="password" name="token" id="token" autocomplete="off"; }
                label { " Your name " input type="text" name="who" id="who" value="operator"; }
                button type="submit" id="login" { "Log in" }
            }
            p.muted { "The name is recorded with every action you take." }
        }
    };
    axum::response::Html(layout::page(&ctx, "Log in", "none", body).into_string()).into_response()
}

/// The login form's fields.
#[derive(Debug, serde::Deserialize)]
pub(crate) struct LoginForm {
    token: String,
    #[serde(default)]
    who: String,
}

/// Check the token; set the session cookie.
pub(crate) async fn login(
    State(state): State<Shared>,
    ctx: Ctx,
    axum::Form(form): axum::Form<LoginForm>,
) -> Response {
    let (Some(token), Some(session)) = (&state.auth.token, &state.auth.session) else {
        return ctx.error(UiError::forbidden(
            "actions are off: PGCREW_UI_TOKEN is not set",
        ));
    };
    if !same(form.token.trim(), token) {
        return ctx.error(UiError::forbidden("wrong token"));
    }
    let who: String = form
        .who
        .chars()
        .filter(|c| !c.is_control())
        .take(64)
        .collect();
    let who = super::filters::encode(if who.trim().is_empty() {
        "operator"
    } else {
        &who
    });
    let mut r = Redirect::to(&ctx.link("/")).into_response();
    for c in [
        format!("{SESSION_COOKIE}={session}; Path=/; HttpOnly; SameSite=Strict"),
        format!("{WHO_COOKIE}={who}; Path=/; HttpOnly; SameSite=Strict"),
    ] {
        if let Ok(v) = header::HeaderValue::from_str(&c) {
            r.headers_mut().append(header::SET_COOKIE, v);
        }
    }
    r
}

/// Forget the session.
pub(crate) async fn logout(ctx: Ctx) -> Response {
    let mut r = (StatusCode::SEE_OTHER, [(header::LOCATION, ctx.link("/"))]).into_response();
    for c in [SESSION_COOKIE, WHO_COOKIE] {
        if let Ok(v) = header::HeaderValue::from_str(&format!("{c}=; Path=/; Max-Age=0")) {
            r.headers_mut().append(header::SET_COOKIE, v);
        }
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_and_comparison() {
        assert!(same("abc", "abc"));
        assert!(!same("abc", "abd"));
        assert!(!same("abc", "abcd"));
        assert_ne!(digest("t", "a"), digest("t", "b"));
        assert_eq!(decode("a%20b"), "a b");
        assert_eq!(decode("%"), "%");
    }
}
