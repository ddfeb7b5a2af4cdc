//! `Retry-After`: the HTTP transport under async-openai notes the header of a 429 / 503
//! response for the call that made the request (async-openai's error types drop headers), and
//! the retry loop waits that long instead of its own backoff.
//!
//! The note travels in a task-local slot that each attempt sets up around its request
//! ([`capture`]); async-openai runs the transport inside the calling task, so concurrent calls
//! never see each other's header.

use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use async_openai::error::OpenAIError;
use async_openai::middleware::{HttpRequestFactory, ReqwestService};
use chrono::{DateTime, Utc};

tokio::task_local! {
    static SLOT: Arc<Mutex<Option<Duration>>>;
}

/// Run `fut` (one HTTP attempt) and return its output with the `Retry-After` delay of its
/// response, if it had one.
pub(super) async fn capture<F: Future>(fut: F) -> (F::Output, Option<Duration>) {
    let slot = Arc::new(Mutex::new(None));
    let out = SLOT.scope(slot.clone(), fut).await;
    let delay = slot.lock().map(|g| *g).unwrap_or(None);
    (out, delay)
}

/// The delay a `Retry-After` value asks for: delta-seconds (`120`) or an HTTP date (`Wed, 21
/// Oct 2015 07:28:00 GMT`, measured from `now`; a date in the past is no delay). `None` when
/// the value is neither.
pub fn parse_retry_after(value: &str, now: DateTime<Utc>) -> Option<Duration> {
    let v = value.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    if let Ok(secs) = v.parse::<f64>()
        && secs.is_finite()
        && secs >= 0.0
    {
        return Some(Duration::from_secs_f64(secs));
    }
    let at = DateTime::parse_from_rfc2822(v).ok()?.with_timezone(&Utc);
    Some((at - now).to_std().unwrap_or(Duration::ZERO))
}

/// The plain reqwest transport, noting `Retry-After` of 429 and 503 responses.
#[derive(Clone, Debug, Default)]
pub(super) struct RetryAfterService {
    inner: ReqwestService,
}

impl tower_service::Service<HttpRequestFactory> for RetryAfterService {
    type Response = reqwest::Response;
    type Error = OpenAIError;
    type Future = std::pin::Pin<
        Box<dyn Future<Output = Result<reqwest::Response, OpenAIError>> + Send + 'static>,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: HttpRequestFactory) -> Self::Future {
        let call = self.inner.call(request);
        Box::pin(async move {
            let response = call.await?;
            let status = response.status().as_u16();
            if status == 429 || status == 503 {
                let delay = response
                    .headers()
                    .get(reqwest::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| parse_retry_after(v, Utc::now()));
                let _ = SLOT.try_with(|slot| {
                    if let Ok(mut g) = slot.lock() {
                        *g = delay;
                    }
                });
            }
            Ok(response)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_and_http_dates_are_understood() {
        let now = DateTime::parse_from_rfc3339("2015-10-21T07:27:30Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(parse_retry_after("7", now), Some(Duration::from_secs(7)));
        assert_eq!(parse_retry_after(" 0 ", now), Some(Duration::ZERO));
        assert_eq!(
            parse_retry_after("1.5", now),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-3", now), None);
    }
}
