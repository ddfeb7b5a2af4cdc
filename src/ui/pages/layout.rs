//! The page frame (navigation, live-status badge, embedded CSS and JavaScript) and the asset
//! routes.

use axum::http::header;
use axum::response::IntoResponse;
use maud::{DOCTYPE, Markup, html};

use crate::ui::respond::Ctx;

const CSS: &str = include_str!("../assets/app.css");
const JS: &str = include_str!("../assets/app.js");

/// A page: `live` is `all` (re-read on every notification), `run:<id>` (only that run's), or
/// `none`.
pub(crate) fn page(ctx: &Ctx, title: &str, live: &str, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " - pgcrew" }
                link rel="stylesheet" href=(ctx.link("/assets/app.css"));
            }
            body data-base=(ctx.base) data-live=(live) {
                header {
                    a.brand href=(ctx.link("/")) { "pgcrew" }
                    a href=(ctx.link("/runs")) { "Runs" }
                    a href=(ctx.link("/tasks")) { "Tasks" }
                    a href=(ctx.link("/tenants")) { "Tenants" }
                    a href=(ctx.link("/instances")) { "Instances" }
                    a href=(ctx.link("/login")) { "Log in" }
                    span #live-status.warn { "connecting" }
                }
                main {
                    h1 hidden { (title) }
                    (body)
                }
                script src=(ctx.link("/assets/app.js")) {}
            }
        }
    }
}

/// `/assets/app.css`.
pub(crate) async fn css() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/css; charset=utf-8")], CSS)
}

/// `/assets/app.js`.
pub(crate) async fn js() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        JS,
    )
}
