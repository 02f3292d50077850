//! The operator dashboard (`/dashboard`). Placeholder wiring; the page
//! itself is built in this module.

use axum::Router;

use super::AppState;

/// Routes of the dashboard, merged into the main router.
pub fn routes() -> Router<AppState> {
    Router::new()
}
