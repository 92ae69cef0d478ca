//! The security headers on every answer: a Content-Security-Policy that lets the dashboard
//! run only its own script and style (allowed by their SHA-256, computed from the page the
//! binary serves), `frame-ancestors 'none'` (no page may frame the cancel button),
//! `nosniff`, no referrer, and `Cache-Control: no-store` (histories stay out of caches).

use axum::http::{header, HeaderName, HeaderValue};
use axum::Router;
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use sha2::{Digest, Sha256};
use tower_http::set_header::SetResponseHeaderLayer;

/// The dashboard page.
pub(crate) const DASHBOARD: &str = include_str!("dashboard.html");

/// The text of the first `<tag>...</tag>` element of `page` (empty if none).
fn element<'a>(page: &'a str, tag: &str) -> &'a str {
    let open = format!("<{tag}>");
    let close = format!("</{tag}>");
    page.split_once(&open)
        .and_then(|(_, rest)| rest.split_once(&close))
        .map_or("", |(inner, _)| inner)
}

/// `'sha256-...'` of an element's text, as CSP hashes it.
fn hash(text: &str) -> String {
    format!(
        "'sha256-{}'",
        STANDARD.encode(Sha256::digest(text.as_bytes()))
    )
}

/// The policy: nothing but the dashboard's own script and style, requests to this origin.
pub(crate) fn content_security_policy() -> String {
    format!(
        "default-src 'none'; script-src {}; style-src {}; connect-src 'self'; img-src 'self'; \
         base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        hash(element(DASHBOARD, "script")),
        hash(element(DASHBOARD, "style")),
    )
}

/// `router` with the security headers on every answer (set over any a handler gave).
pub(crate) fn secure(router: Router) -> Router {
    let csp = HeaderValue::from_str(&content_security_policy())
        .unwrap_or_else(|_| HeaderValue::from_static("default-src 'none'; frame-ancestors 'none'"));
    router
        .layer(SetResponseHeaderLayer::overriding(
            header::CONTENT_SECURITY_POLICY,
            csp,
        ))
        .layer(SetResponseHeaderLayer::overriding(
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ))
        .layer(SetResponseHeaderLayer::overriding(
            header::X_FRAME_OPTIONS,
            HeaderValue::from_static("DENY"),
        ))
        .layer(SetResponseHeaderLayer::overriding(
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        ))
        .layer(SetResponseHeaderLayer::overriding(
            header::CACHE_CONTROL,
            HeaderValue::from_static("no-store"),
        ))
        .layer(SetResponseHeaderLayer::overriding(
            HeaderName::from_static("cross-origin-opener-policy"),
            HeaderValue::from_static("same-origin"),
        ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_policy_hashes_the_pages_script_and_style() {
        let script = element(DASHBOARD, "script");
        let style = element(DASHBOARD, "style");
        assert!(script.contains("EventSource") && style.contains("--bg"));
        // One script and one style element, no inline handler or style attribute.
        assert_eq!(DASHBOARD.matches("<script").count(), 1);
        assert_eq!(DASHBOARD.matches("<style").count(), 1);
        assert!(!DASHBOARD.contains(" style=") && !DASHBOARD.contains(" onclick="));
        let csp = content_security_policy();
        assert!(csp.contains(&hash(script)) && csp.contains(&hash(style)));
        assert!(HeaderValue::from_str(&csp).is_ok());
    }
}
