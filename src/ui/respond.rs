//! One handler answers a page's URL as HTML and, with `Accept: application/json` or under
//! `/api/...`, as JSON: [`Ctx`] knows which, and where the console is mounted.

use axum::extract::{FromRequestParts, OriginalUri};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use maud::Markup;
use serde::Serialize;

use super::error::UiError;
use super::pages::layout;

/// The request as pages see it.
#[derive(Debug, Clone)]
pub(crate) struct Ctx {
    /// Where the console is mounted (`""` at the root), for links.
    pub base: String,
    /// Answer with JSON.
    pub json: bool,
    /// The path within the console and the query (`/runs?state=running`): the page cache's key.
    pub key: String,
    /// The login cookie, when sent.
    pub cookies: Vec<(String, String)>,
}

impl<S: Send + Sync> FromRequestParts<S> for Ctx {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let inner = parts.uri.path().to_string();
        let original = match OriginalUri::from_request_parts(parts, state).await {
            Ok(o) => o.0.path().to_string(),
            Err(never) => match never {},
        };
        let mut prefix = if let Some(p) = original.strip_suffix(inner.as_str()) {
            p.to_string()
        } else if inner == "/" {
            original.trim_end_matches('/').to_string()
        } else {
            String::new()
        };
        let mut json = false;
        if let Some(p) = prefix.strip_suffix("/api") {
            prefix = p.to_string();
            json = true;
        }
        let accept = parts
            .headers
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if accept.contains("application/json") && !accept.contains("text/html") {
            json = true;
        }
        let key = match parts.uri.query() {
            Some(q) => format!("{original}?{q}"),
            None => original.clone(),
        };
        let cookies = parts
            .headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|c| {
                let (k, v) = c.trim().split_once('=')?;
                Some((k.to_string(), v.to_string()))
            })
            .collect();
        Ok(Ctx {
            base: prefix,
            json,
            key,
            cookies,
        })
    }
}

impl Ctx {
    /// A link to `path` (starting with `/`) within the console.
    /// (The overview of a console mounted at `/ops` is `/ops`: axum's `nest` does not route
    /// `/ops/`.)
    pub fn link(&self, path: &str) -> String {
        if path == "/" && !self.base.is_empty() {
            return self.base.clone();
        }
        format!("{}{}", self.base, path)
    }

    /// A cookie's value.
    pub fn cookie(&self, name: &str) -> Option<&str> {
        self.cookies
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The page for `data` (HTML through `html`, or the data as JSON), or the error page.
    pub fn respond<T: Serialize, D: std::ops::Deref<Target = T>>(
        &self,
        data: Result<D, UiError>,
        html: impl FnOnce(&T) -> Markup,
    ) -> Response {
        match data {
            Ok(d) if self.json => axum::Json(&*d).into_response(),
            Ok(d) => {
                let mut r = Html(html(&d).into_string()).into_response();
                r.headers_mut().insert(
                    header::CACHE_CONTROL,
                    header::HeaderValue::from_static("no-store"),
                );
                r
            }
            Err(e) => self.error(e),
        }
    }

    /// The error as an HTML page (the status in the title) or as JSON.
    pub fn error(&self, e: UiError) -> Response {
        if self.json {
            return e.into_response();
        }
        let title = format!("{} {}", e.status.as_u16(), reason(e.status));
        let body = maud::html! {
            div.error data-status=(e.status.as_u16()) {
                h2 { (title) }
                p { (e.message) }
                @if e.status == StatusCode::SERVICE_UNAVAILABLE {
                    p.muted { "This page retries on its own and shows the data once the database is back." }
                }
                p { a href=(self.link("/")) { "Back to the overview" } }
            }
        };
        let page = layout::page(self, &title, "all", body);
        (e.status, Html(page.into_string())).into_response()
    }
}

fn reason(s: StatusCode) -> &'static str {
    s.canonical_reason().unwrap_or("Error")
}
