//! [`OpenAiConfig`] and its builder: base URL, key, timeouts, retries and backoff.

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use crate::error::{Error, Result};

/// Configuration of an [`OpenAiModel`](super::OpenAiModel). Build it with [`OpenAiConfig::builder`] (nothing from
/// the environment) or [`OpenAiConfig::from_env`] (base URL and key from the environment).
#[derive(Clone)]
pub struct OpenAiConfig {
    pub(super) base_url: String,
    pub(super) api_key: String,
    pub(super) organization: Option<String>,
    pub(super) project: Option<String>,
    pub(super) timeout: Duration,
    pub(super) max_retries: u32,
    pub(super) initial_backoff: Duration,
    pub(super) max_backoff: Duration,
    pub(super) max_retry_after: Duration,
    pub(super) name: String,
    pub(super) max_completion_tokens: bool,
}

impl fmt::Debug for OpenAiConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpenAiConfig")
            .field("base_url", &self.base_url)
            .field(
                "api_key",
                &if self.api_key.is_empty() {
                    "<none>"
                } else {
                    "<redacted>"
                },
            )
            .field("organization", &self.organization)
            .field("project", &self.project)
            .field("timeout", &self.timeout)
            .field("max_retries", &self.max_retries)
            .field("initial_backoff", &self.initial_backoff)
            .field("max_backoff", &self.max_backoff)
            .field("max_retry_after", &self.max_retry_after)
            .field("name", &self.name)
            .finish()
    }
}

impl OpenAiConfig {
    /// Default base URL: OpenAI's API.
    pub const DEFAULT_BASE_URL: &'static str = "https://api.openai.com/v1";
    /// Default per-request timeout: 60 s (each HTTP attempt gets the full timeout).
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
    /// Default number of retries after the first attempt: 3.
    pub const DEFAULT_MAX_RETRIES: u32 = 3;
    /// Default backoff before the first retry: 500 ms (doubling per retry, with jitter).
    pub const DEFAULT_INITIAL_BACKOFF: Duration = Duration::from_millis(500);
    /// Default cap on one backoff: 20 s.
    pub const DEFAULT_MAX_BACKOFF: Duration = Duration::from_secs(20);
    /// Default longest `Retry-After` honoured: 60 s.
    pub const DEFAULT_MAX_RETRY_AFTER: Duration = Duration::from_secs(60);
    /// Most retries accepted.
    pub const MAX_RETRIES_LIMIT: u32 = 20;

    /// A builder with the documented defaults and nothing read from the environment.
    pub fn builder() -> OpenAiConfigBuilder {
        OpenAiConfigBuilder::default()
    }

    /// A builder whose base URL, API key, organization and project come from the process
    /// environment (`OPENAI_BASE_URL`, `OPENAI_API_KEY`, `OPENAI_ORG_ID`, `OPENAI_PROJECT_ID`)
    /// when set; builder setters called afterwards take precedence.
    pub fn from_env() -> OpenAiConfigBuilder {
        Self::from_env_with(|k| std::env::var(k).ok())
    }

    /// Like [`from_env`](Self::from_env) with an explicit variable map (for tests and for
    /// configuration files).
    pub fn from_env_map(vars: &HashMap<String, String>) -> OpenAiConfigBuilder {
        Self::from_env_with(|k| vars.get(k).cloned())
    }

    /// Like [`from_env`](Self::from_env) with a lookup function.
    pub fn from_env_with(lookup: impl Fn(&str) -> Option<String>) -> OpenAiConfigBuilder {
        let get = |k: &str| lookup(k).filter(|v| !v.trim().is_empty());
        let mut b = OpenAiConfigBuilder::default();
        let c = &mut b.config;
        if let Some(url) = get("OPENAI_BASE_URL") {
            c.base_url = url;
        }
        if let Some(key) = get("OPENAI_API_KEY") {
            c.api_key = key;
        }
        c.organization = get("OPENAI_ORG_ID");
        c.project = get("OPENAI_PROJECT_ID");
        b
    }

    /// The base URL (requests go to `<base_url>/chat/completions`).
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// Whether an API key is configured.
    pub fn has_api_key(&self) -> bool {
        !self.api_key.is_empty()
    }

    /// The per-request timeout.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Retries after the first attempt.
    pub fn max_retries(&self) -> u32 {
        self.max_retries
    }

    /// The port name reported by [`ModelPort::name`](crate::model::ModelPort::name).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The backoff before retry number `retry` (0-based): `initial * 2^retry`, capped at
    /// `max_backoff`, with "equal jitter" (a uniformly random delay between half and all of it).
    pub fn backoff(&self, retry: u32) -> Duration {
        let base = self
            .initial_backoff
            .saturating_mul(2u32.saturating_pow(retry.min(30)))
            .min(self.max_backoff);
        let half = base / 2;
        let jitter_ms = u64::try_from(half.as_millis()).unwrap_or(u64::MAX);
        half + Duration::from_millis(fastrand::u64(0..=jitter_ms))
    }
}
/// Builder of [`OpenAiConfig`]: holds the configuration it builds, with the documented
/// defaults, and validates it in [`build`](Self::build).
#[derive(Clone)]
pub struct OpenAiConfigBuilder {
    config: OpenAiConfig,
}

impl fmt::Debug for OpenAiConfigBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpenAiConfigBuilder")
            .field("base_url", &self.config.base_url)
            .field("timeout", &self.config.timeout)
            .field("max_retries", &self.config.max_retries)
            .finish_non_exhaustive()
    }
}

impl Default for OpenAiConfigBuilder {
    fn default() -> Self {
        Self {
            config: OpenAiConfig {
                base_url: OpenAiConfig::DEFAULT_BASE_URL.to_string(),
                api_key: String::new(),
                organization: None,
                project: None,
                timeout: OpenAiConfig::DEFAULT_TIMEOUT,
                max_retries: OpenAiConfig::DEFAULT_MAX_RETRIES,
                initial_backoff: OpenAiConfig::DEFAULT_INITIAL_BACKOFF,
                max_backoff: OpenAiConfig::DEFAULT_MAX_BACKOFF,
                max_retry_after: OpenAiConfig::DEFAULT_MAX_RETRY_AFTER,
                name: "openai".to_string(),
                max_completion_tokens: false,
            },
        }
    }
}

fn header_safe(field: &'static str, value: &str) -> Result<()> {
    if value.chars().all(|c| c.is_ascii_graphic()) {
        Ok(())
    } else {
        Err(Error::invalid(
            field,
            "must consist of printable ASCII characters without spaces",
        ))
    }
}

impl OpenAiConfigBuilder {
    /// Base URL of the OpenAI-compatible API, including the version path
    /// (`https://api.openai.com/v1`, `http://localhost:11434/v1` for Ollama,
    /// `http://localhost:8000/v1` for vLLM). Default: [`OpenAiConfig::DEFAULT_BASE_URL`].
    pub fn base_url(mut self, url: impl Into<String>) -> Self {
        self.config.base_url = url.into();
        self
    }

    /// API key sent as `Authorization: Bearer <key>`. Default: none (local servers usually
    /// need none).
    pub fn api_key(mut self, key: impl Into<String>) -> Self {
        self.config.api_key = key.into();
        self
    }

    /// OpenAI organization id (`OpenAI-Organization` header). Default: none.
    pub fn organization(mut self, org: impl Into<String>) -> Self {
        self.config.organization = Some(org.into());
        self
    }

    /// OpenAI project id (`OpenAI-Project` header). Default: none.
    pub fn project(mut self, project: impl Into<String>) -> Self {
        self.config.project = Some(project.into());
        self
    }

    /// Timeout of each HTTP attempt. Default: 60 s.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.config.timeout = timeout;
        self
    }

    /// Retries after the first attempt on 429 / 5xx / timeout / connection errors. Default: 3.
    pub fn max_retries(mut self, retries: u32) -> Self {
        self.config.max_retries = retries;
        self
    }

    /// Backoff before the first retry (doubles per retry, with jitter). Default: 500 ms.
    pub fn initial_backoff(mut self, backoff: Duration) -> Self {
        self.config.initial_backoff = backoff;
        self
    }

    /// Cap on one backoff. Default: 20 s.
    pub fn max_backoff(mut self, backoff: Duration) -> Self {
        self.config.max_backoff = backoff;
        self
    }

    /// Longest `Retry-After` (of a 429 or 503) waited before a retry; a provider asking for
    /// longer fails the call at once. Default: 60 s.
    pub fn max_retry_after(mut self, wait: Duration) -> Self {
        self.config.max_retry_after = wait;
        self
    }

    /// Name reported by [`ModelPort::name`](crate::model::ModelPort::name). Default: `openai`.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.config.name = name.into();
        self
    }

    /// Send the request's `max_tokens` as `max_completion_tokens` (required by OpenAI's
    /// reasoning models such as o1/o3) instead of `max_tokens` (understood by every
    /// OpenAI-compatible server). Default: false (`max_tokens`).
    pub fn max_completion_tokens(mut self, yes: bool) -> Self {
        self.config.max_completion_tokens = yes;
        self
    }

    /// Validate and build.
    pub fn build(self) -> Result<OpenAiConfig> {
        let mut c = self.config;
        let base_url = c.base_url.trim().trim_end_matches('/').to_string();
        if !(base_url.starts_with("http://") || base_url.starts_with("https://"))
            || base_url.len() <= "https://".len()
        {
            return Err(Error::invalid(
                "base_url",
                format!(
                    "`{}` is not an http(s) URL (e.g. https://api.openai.com/v1 or http://localhost:11434/v1)",
                    c.base_url
                ),
            ));
        }
        if base_url
            .chars()
            .any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(Error::invalid(
                "base_url",
                "must not contain whitespace or control characters",
            ));
        }
        header_safe("api_key", &c.api_key)?;
        if let Some(o) = &c.organization {
            header_safe("organization", o)?;
        }
        if let Some(p) = &c.project {
            header_safe("project", p)?;
        }
        if c.timeout.is_zero() {
            return Err(Error::invalid("timeout", "must be greater than zero"));
        }
        if c.max_retries > OpenAiConfig::MAX_RETRIES_LIMIT {
            return Err(Error::invalid(
                "max_retries",
                format!(
                    "{} is above the limit of {}",
                    c.max_retries,
                    OpenAiConfig::MAX_RETRIES_LIMIT
                ),
            ));
        }
        if c.initial_backoff > c.max_backoff {
            return Err(Error::invalid(
                "initial_backoff",
                format!(
                    "{:?} is larger than max_backoff {:?}",
                    c.initial_backoff, c.max_backoff
                ),
            ));
        }
        crate::ids::validate_text_id("name", &c.name)?;
        c.base_url = base_url;
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builder_defaults_and_validation() {
        let c = OpenAiConfig::builder().build().unwrap();
        assert_eq!(c.base_url(), "https://api.openai.com/v1");
        assert_eq!(c.timeout(), Duration::from_secs(60));
        assert_eq!(c.max_retries(), 3);
        assert!(!c.has_api_key());
        assert!(!format!("{c:?}").contains("sk-"));
        let with_key = OpenAiConfig::builder()
            .api_key("sk-secret")
            .build()
            .unwrap();
        assert!(!format!("{with_key:?}").contains("sk-secret"));
        for (b, field) in [
            (OpenAiConfig::builder().base_url("ftp://x"), "base_url"),
            (OpenAiConfig::builder().api_key("a b"), "api_key"),
            (OpenAiConfig::builder().timeout(Duration::ZERO), "timeout"),
            (OpenAiConfig::builder().max_retries(1000), "max_retries"),
            (
                OpenAiConfig::builder()
                    .initial_backoff(Duration::from_secs(5))
                    .max_backoff(Duration::from_secs(1)),
                "initial_backoff",
            ),
        ] {
            match b.build() {
                Err(Error::InvalidInput { field: f, .. }) => assert_eq!(f, field),
                other => panic!("expected InvalidInput({field}), got {other:?}"),
            }
        }
    }

    #[test]
    fn env_map_then_builder_override() {
        let vars: HashMap<String, String> = [
            ("OPENAI_BASE_URL", "http://localhost:11434/v1/"),
            ("OPENAI_API_KEY", "sk-env"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let c = OpenAiConfig::from_env_map(&vars).build().unwrap();
        assert_eq!(c.base_url(), "http://localhost:11434/v1");
        assert_eq!(c.api_key, "sk-env");
        let c = OpenAiConfig::from_env_map(&vars)
            .base_url("http://vllm:8000/v1")
            .build()
            .unwrap();
        assert_eq!(c.base_url(), "http://vllm:8000/v1");
        assert_eq!(c.api_key, "sk-env");
    }

    #[test]
    fn backoff_grows_with_jitter_and_cap() {
        let c = OpenAiConfig::builder()
            .initial_backoff(Duration::from_millis(100))
            .max_backoff(Duration::from_millis(1000))
            .build()
            .unwrap();
        for _ in 0..50 {
            let b0 = c.backoff(0);
            assert!(b0 >= Duration::from_millis(50) && b0 <= Duration::from_millis(100));
            let b2 = c.backoff(2);
            assert!(b2 >= Duration::from_millis(200) && b2 <= Duration::from_millis(400));
            let b9 = c.backoff(9);
            assert!(b9 >= Duration::from_millis(500) && b9 <= Duration::from_millis(1000));
        }
    }
}
