//! The operations console: a live web dashboard over instances, queues, runs, ledgers and
//! budgets, served by any instance.
//!
//! [`router`] returns an axum [`Router`] a service can mount under its own path
//! (`Router::new().nest("/ops", pgcrew::ui::router(&client))`); `pgcrew ui` and
//! `pgcrew serve --http ADDR` serve the same router. Every page is server-rendered HTML (maud,
//! embedded CSS and JavaScript, server-rendered SVG charts) and, with `Accept: application/json`
//! or under `/api/...`, the same data as JSON. Pages stay live through Server-Sent Events fed by
//! the instance's own LISTEN connection (`/events`): one database connection however many
//! browsers are open; a notification only wakes the page, which re-reads its data.
//!
//! Actions (cancel a run, cancel, retry or discard tasks, in bulk too, pause or resume a queue)
//! are off unless a token is configured ([`UiConfig::token`], or `PGCREW_UI_TOKEN` through
//! [`UiConfig::from_env`]); they need the token (a login cookie plus a CSRF field, or
//! `Authorization: Bearer`). Each is recorded with who and when where its domain records
//! things: a run's cancellation in its ledger, task actions in `pgcrew.task_events`, queue
//! pauses in `pgcrew.queue_pause_events`.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::routing::{get, post};

use crate::client::Client;

mod actions;
mod auth;
mod bulk;
mod cache;
mod charts;
mod data;
mod error;
mod filters;
mod live;
mod pages;
mod respond;
mod timeline;

pub use filters::{RunQuery, TaskQuery};

/// The environment variable holding the console's action token.
pub const TOKEN_ENV: &str = "PGCREW_UI_TOKEN";

/// Settings of the console.
#[derive(Clone)]
pub struct UiConfig {
    token: Option<String>,
    cache_ttl: Duration,
    payload_window: i64,
    index_check_ttl: Duration,
}

impl Default for UiConfig {
    fn default() -> Self {
        UiConfig {
            token: None,
            cache_ttl: DEFAULT_CACHE_TTL,
            payload_window: DEFAULT_PAYLOAD_WINDOW,
            index_check_ttl: DEFAULT_INDEX_CHECK_TTL,
        }
    }
}

/// How many tasks the payload filter looks at per search when `pgcrew.tasks` has no GIN index
/// on `payload` ([`UiConfig::payload_window`]): the newest 50,000 tasks that match the other
/// filters (measured with `pgcrew bench ui`: the page's p95 stays under 100 ms on a million
/// tasks, a match or none).
pub const DEFAULT_PAYLOAD_WINDOW: i64 = 50_000;

/// How long the console trusts its last look in the catalog for a GIN index on
/// `pgcrew.tasks(payload)` ([`UiConfig::index_check_ttl`]).
pub const DEFAULT_INDEX_CHECK_TTL: Duration = Duration::from_secs(30);

/// How long page data is shared between browsers by default ([`UiConfig::cache_ttl`]).
pub const DEFAULT_CACHE_TTL: Duration = Duration::from_secs(1);

impl std::fmt::Debug for UiConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UiConfig")
            .field("actions_enabled", &self.token.is_some())
            .finish()
    }
}

impl UiConfig {
    /// Read-only console (no actions).
    pub fn new() -> Self {
        Self::default()
    }

    /// The settings from the environment: the action token from `PGCREW_UI_TOKEN` (unset or
    /// empty: actions off).
    pub fn from_env() -> Self {
        let token = std::env::var(TOKEN_ENV)
            .ok()
            .filter(|t| !t.trim().is_empty());
        UiConfig {
            token,
            ..UiConfig::default()
        }
    }

    /// How long a page's data is shared by the browsers that ask for it (default 1 s; zero:
    /// every request reads the database). Any notification ends the sharing at once, so a page
    /// re-read because something changed always sees the change; the time only bounds how
    /// stale what changes without a notification (heartbeat ages, task completions) may be.
    pub fn cache_ttl(mut self, ttl: Duration) -> Self {
        self.cache_ttl = ttl;
        self
    }

    /// How many tasks one payload search looks at when there is no GIN index on
    /// `pgcrew.tasks(payload)` (default [`DEFAULT_PAYLOAD_WINDOW`]; at least 1). The page and
    /// its JSON say so and offer a continuation further back.
    pub fn payload_window(mut self, tasks: i64) -> Self {
        self.payload_window = tasks.max(1);
        self
    }

    /// How long the result of looking for a GIN index on `pgcrew.tasks(payload)` in the
    /// catalog is reused (default 30 s; zero: look on every payload search).
    pub fn index_check_ttl(mut self, ttl: Duration) -> Self {
        self.index_check_ttl = ttl;
        self
    }

    /// Enable actions, guarded by this token (at least 16 characters; shorter or empty tokens
    /// leave actions off and are reported by [`UiConfig::validate`]).
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// Whether actions are enabled.
    pub fn actions_enabled(&self) -> bool {
        self.token.is_some()
    }

    /// Check the settings: a configured token must have at least 16 characters.
    pub fn validate(&self) -> crate::Result<()> {
        match &self.token {
            Some(t) if t.chars().count() < auth::MIN_TOKEN_LEN => Err(crate::Error::invalid(
                "ui token",
                format!(
                    "must have at least {} characters (set {TOKEN_ENV} to a long random value)",
                    auth::MIN_TOKEN_LEN
                ),
            )),
            _ => Ok(()),
        }
    }
}

/// What every handler gets.
pub(crate) struct UiState {
    pub(crate) client: Client,
    pub(crate) auth: auth::Auth,
    pub(crate) bulk: bulk::Jobs,
    pub(crate) cache: Arc<cache::PageCache>,
    pub(crate) hub: live::Hub,
    pub(crate) payload: data::PayloadSearchConfig,
}

pub(crate) type Shared = Arc<UiState>;

/// The console's router with the settings from the environment ([`UiConfig::from_env`]).
/// Mount it anywhere (`nest`); links follow the mount point. The client should be started
/// (live updates come from its LISTEN connection).
pub fn router(client: &Client) -> Router {
    router_with(client, UiConfig::from_env())
}

/// The console's router with explicit settings. A token shorter than 16 characters leaves
/// actions off (see [`UiConfig::validate`]).
pub fn router_with(client: &Client, config: UiConfig) -> Router {
    let token = if config.validate().is_ok() {
        config.token
    } else {
        tracing::warn!("ui token too short: console actions are off");
        None
    };
    let state: Shared = Arc::new(UiState {
        client: client.clone(),
        auth: auth::Auth::new(token),
        bulk: bulk::Jobs::default(),
        cache: Arc::new(cache::PageCache::new(config.cache_ttl)),
        hub: live::Hub::default(),
        payload: data::PayloadSearchConfig::new(config.payload_window, config.index_check_ttl),
    });
    state.hub.start(client, &state.cache);
    let pages = Router::new()
        .route("/", get(pages::overview::handler))
        .route("/overview", get(pages::overview::handler))
        .route("/runs", get(pages::runs::list_handler))
        .route("/runs/{id}", get(pages::runs::detail_handler))
        .route("/tasks", get(pages::tasks::list_handler))
        .route("/tasks/{id}", get(pages::tasks::detail_handler))
        .route("/tenants", get(pages::tenants::list_handler))
        .route("/tenants/{id}", get(pages::tenants::detail_handler))
        .route("/instances", get(pages::instances::handler))
        .route("/bulk/{id}", get(bulk::status_handler));
    Router::new()
        .merge(pages.clone())
        .nest("/api", pages)
        .route("/events", get(live::handler))
        .route("/assets/app.css", get(pages::layout::css))
        .route("/assets/app.js", get(pages::layout::js))
        .route("/login", get(auth::login_page).post(auth::login))
        .route("/logout", post(auth::logout))
        .route("/runs/{id}/cancel", post(actions::cancel_run))
        .route("/tasks/{id}/cancel", post(actions::cancel_task))
        .route("/tasks/{id}/retry", post(actions::retry_task))
        .route("/tasks/{id}/discard", post(actions::discard_task))
        .route("/tasks/bulk", post(bulk::start_handler))
        .route("/queues/{queue}/pause", post(actions::pause_queue))
        .route("/queues/{queue}/resume", post(actions::resume_queue))
        .fallback(error::not_found)
        .with_state(state)
}
