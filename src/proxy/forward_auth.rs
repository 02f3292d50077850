//! Forward-auth: `/auth/<service>`, the check an existing gateway (nginx
//! `auth_request`, Caddy `forward_auth`, Traefik ForwardAuth, Envoy's HTTP
//! `ext_authz`) asks before it forwards a request itself.
//!
//! Till decides and counts exactly as its proxy does (the same head checks,
//! [`crate::decide`] calls, reservation, re-check and durability, shared with
//! [`super::handler`]) but forwards nothing: 200 lets the gateway forward,
//! 401/403/429 are the proxy's own answers. The gateway never reports back,
//! so the use is counted at the check: a request the gateway then fails to
//! forward stays counted.
//!
//! The gateway describes the request it holds: `X-Forwarded-Method` and
//! `X-Forwarded-Uri` (Caddy, Traefik), `X-Original-Method` and
//! `X-Original-URI` (nginx, set in its config), or, for Envoy, the check's
//! own method and the original path appended to `/auth/<service>`. Gateways
//! pass the client's own headers along, so a client can add a description
//! of its own: every description present must agree, and a check without
//! one is refused; Till never guesses. The gateway forwards the path as
//! sent, so Till authorizes exactly that string: a path that normalises to
//! something else is refused rather than authorized under another name.

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::error::{Api, ProxyError};
use super::handler::{
    Counts, admit_windows, extract_token, reserve_and_recheck, respond, verify_token,
};
use super::{AppState, Upstream};
use crate::decide::Stage;
use crate::monitor::{Observation, RequestId};
use crate::token::RequestFacts;
use crate::verify::Denial;

/// The header a gateway sends its `forward_auth_secret` in.
pub const GATEWAY_SECRET_HEADER: &str = "x-till-gateway-secret";

/// Where the endpoint family starts; the service name follows.
const PREFIX: &str = "/auth/";

/// `/auth/<service>` and `/auth/<service>/<original path>`, any method.
pub async fn check(State(st): State<AppState>, req: Request) -> Response {
    let peer = req
        .extensions()
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0);
    let mut obs = Observation::new(RequestId::random(), peer, req.method().as_str());
    let (parts, _body) = req.into_parts();
    let (service, appended) = split(parts.uri.path());
    let upstream = st.upstreams.get(service);
    let api = upstream.as_ref().map_or(Api::OpenAi, |u| u.api);
    let result = match upstream {
        // Only configured names reach the observation (a metric label).
        None => Err(ProxyError::UnknownService(
            service.chars().take(64).collect(),
        )),
        Some(u) => {
            obs.service = u.name.clone();
            decide_check(&st, &u, service, appended, &parts, &mut obs).await
        }
    };
    respond(&st, &mut obs, result, api)
}

/// Splits the path after `/auth/` into the service and the appended
/// original path (Envoy), if any.
fn split(path: &str) -> (&str, Option<&str>) {
    let rest = path.strip_prefix(PREFIX).unwrap_or("");
    match rest.find('/') {
        Some(i) => (&rest[..i], Some(&rest[i..])),
        None => (rest, None),
    }
}

async fn decide_check(
    st: &AppState,
    upstream: &Upstream,
    service: &str,
    appended: Option<&str>,
    parts: &http::request::Parts,
    obs: &mut Observation,
) -> Result<Response, ProxyError> {
    let fa = &upstream.forward_auth;
    if fa.secret_required {
        let given = one_header(&parts.headers, GATEWAY_SECRET_HEADER)
            .ok()
            .flatten();
        let trusted = match (&fa.secret, given) {
            (Some(s), Some(g)) => s.matches(g.as_bytes()),
            _ => false,
        };
        if !trusted {
            return Err(ProxyError::GatewayNotTrusted(service.to_string()));
        }
    }

    // 1. The request the gateway holds, bounded and parsed before any
    // cryptography, with the proxy's own head checks.
    let (method, target) = original_request(parts, appended)?;
    let (path, query) = split_target(&target)?;
    super::forward::refuse_unsafe(&method, query)?;
    // The proxy drops these; a gateway forwards them as the client sent
    // them, and the service would act on another method or path than the
    // one decided here.
    if let Some(h) = super::forward::method_or_url_header(&parts.headers) {
        return Err(ProxyError::Denied(Denial::new(
            crate::verify::DenialKind::Scope,
            format!(
                "the request carries the header {h}, which frameworks read as the method or path to act on instead of the request's own, and the gateway forwards it unchanged; send the request without it (and have the gateway drop it: see README, \"Forward-auth\")"
            ),
        )));
    }
    obs.method = method.clone();
    let normal = crate::path::normalize(path).map_err(|e| ProxyError::BadRequest(e.to_string()))?;
    if normal != path {
        return Err(ProxyError::BadRequest(format!(
            "the path is not in normal form: Till would read it as {normal:?}, but the gateway forwards it as sent, so Till refuses it rather than authorize another path than the service receives; send {normal:?}"
        )));
    }
    obs.path = normal.clone();
    let token_text = extract_token(&parts.headers)?;

    // 2. Decide without touching state, as the proxy does before a body.
    let (token, revoked) = verify_token(st, token_text, obs)?;
    let mut counts = Counts::current(st, &token.ids).await?;
    let facts = RequestFacts {
        service: service.to_string(),
        method,
        path: normal,
        model: None,
        mcp: None,
        time: st.clock.now(),
    };
    let alone = crate::verify::WindowCounts::alone(&token);
    if let Err(d) = counts
        .decide(st, &token, revoked, &facts, &alone, Stage::BeforeBody)
        .await?
    {
        obs.uses = Some(counts.values);
        return Err(ProxyError::Denied(d));
    }
    // A check carries no body, so no MCP message: on an MCP upstream a
    // deny-list on a tool, prompt, resource or JSON-RPC method (`reject if
    // tool("delete_everything")`, or a policy) would never fire here and let
    // every call through, while an allow-list could never pass.
    if upstream.api == Api::Mcp
        && let Some(fact) = st.verifier.first_read(&token, &till_core::MCP_FACTS)
    {
        obs.uses = Some(counts.values);
        return Err(ProxyError::Denied(Denial::new(
            crate::verify::DenialKind::Scope,
            format!(
                "this key's scope (or a policy) reads `{fact}(...)` of the MCP message, and a gateway's forward-auth check carries no body, so Till cannot see the message; send this key's requests through Till's proxy (/{service}/...), or use a key without MCP tools, prompts, resources or methods here"
            ),
        )));
    }
    // A gateway sends no body, so the model is never known here: a token
    // whose scope reads it cannot be decided, and a deny-list passing
    // without a model would let any model through.
    let reads_model = st
        .verifier
        .first_read(&token, &[till_core::token::vocab::names::MODEL])
        .is_some();
    let decided = if reads_model {
        Err(None)
    } else {
        counts
            .decide(st, &token, None, &facts, &alone, Stage::Final)
            .await?
            .map_err(Some)
    };
    if let Err(d) = decided {
        obs.uses = Some(counts.values);
        return Err(ProxyError::Denied(Denial::new(
            d.map_or(crate::verify::DenialKind::Scope, |d| d.kind),
            format!(
                "this key's scope depends on the request's model, and a gateway's forward-auth check carries no body, so Till cannot see the model; send this key's requests through Till's proxy (/{service}/...), or use a key without a model list here"
            ),
        )));
    }

    // A concurrency slot is held until the response ends, and only the
    // gateway sees that end: a cap cannot be kept here, so it is refused
    // rather than ignored.
    if let Some(c) = token.caps.first() {
        return Err(ProxyError::Denied(Denial::new(
            crate::verify::DenialKind::Scope,
            format!(
                "{} has a concurrency cap ({} in flight), which Till can only hold when it forwards the request itself, and a forward-auth check does not see when the request ends; send this key's requests through Till's proxy (/{service}/...), or use a key without --concurrency here",
                token.view.key_name(c.block),
                c.limit
            ),
        )));
    }
    // Rate windows: every slot or none, before anything is counted.
    let (windows, window_guard) = admit_windows(st, &token, obs).await?;

    // 3. Reserve, re-check with this request's own counts, make durable.
    reserve_and_recheck(st, &token, &facts, &windows, obs).await?;
    // The request is allowed: its rate slots are spent (no in-flight slot).
    drop(window_guard.map(crate::store::window::WindowGuard::forwarded));

    let mut resp = StatusCode::OK.into_response();
    let h = resp.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if fa.return_credential
        && let Some(c) = &upstream.credential
    {
        h.insert(upstream.header.clone(), c.clone());
    }
    Ok(resp)
}

/// The one value of header `name`: `None` when absent, an error when sent
/// twice (which of two a gateway would act on is unknown) or not text.
fn one_header<'a>(h: &'a HeaderMap, name: &str) -> Result<Option<&'a str>, ProxyError> {
    let mut all = h.get_all(name).iter();
    let Some(v) = all.next() else {
        return Ok(None);
    };
    if all.next().is_some() {
        return Err(ProxyError::BadRequest(format!(
            "the header {name} is sent more than once; the gateway must send it once"
        )));
    }
    v.to_str()
        .map(Some)
        .map_err(|_| ProxyError::BadRequest(format!("the header {name} is not visible ASCII text")))
}

/// A method and URI given by a header pair, or none; one without the other
/// is refused.
fn header_pair(
    h: &HeaderMap,
    method: &str,
    uri: &str,
) -> Result<Option<(String, String)>, ProxyError> {
    match (one_header(h, method)?, one_header(h, uri)?) {
        (None, None) => Ok(None),
        (Some(m), Some(u)) => Ok(Some((m.to_string(), u.to_string()))),
        _ => Err(ProxyError::BadRequest(format!(
            "a forward-auth check needs both {method} and {uri}, or neither; configure the gateway to send both"
        ))),
    }
}

/// The method and request target (path and query) of the request the
/// gateway holds.
fn original_request(
    parts: &http::request::Parts,
    appended: Option<&str>,
) -> Result<(String, String), ProxyError> {
    let h = &parts.headers;
    let mut found = Vec::with_capacity(3);
    if let Some(d) = header_pair(h, "x-forwarded-method", "x-forwarded-uri")? {
        found.push(d);
    }
    if let Some(d) = header_pair(h, "x-original-method", "x-original-uri")? {
        found.push(d);
    }
    if let Some(p) = appended {
        let target = match parts.uri.query() {
            Some(q) => format!("{p}?{q}"),
            None => p.to_string(),
        };
        found.push((parts.method.as_str().to_string(), target));
    }
    let mut all = found.into_iter();
    let Some(first) = all.next() else {
        return Err(ProxyError::BadRequest(
            "a forward-auth check must say which request it is for: X-Forwarded-Method and X-Forwarded-Uri (Caddy, Traefik), X-Original-Method and X-Original-URI (nginx: proxy_set_header X-Original-URI $request_uri; and X-Original-Method $request_method;), or the original path after /auth/<service> (Envoy); see README, \"Forward-auth\"".into(),
        ));
    };
    if all.any(|other| other != first) {
        return Err(ProxyError::BadRequest(
            "this forward-auth check describes the request in more than one way (X-Forwarded-*, X-Original-*, a path after /auth/<service>) and they disagree; a client may have added one: configure the gateway to set one and send requests without the others".into(),
        ));
    }
    if http::Method::from_bytes(first.0.as_bytes()).is_err() {
        return Err(ProxyError::BadRequest(
            "the original method is not an HTTP method".into(),
        ));
    }
    Ok(first)
}

/// Splits an origin-form request target into its path and query.
fn split_target(target: &str) -> Result<(&str, Option<&str>), ProxyError> {
    if target.contains('#') {
        return Err(ProxyError::BadRequest(
            "the original URI has a fragment ('#'), which no request target has".into(),
        ));
    }
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (target, None),
    };
    if !path.starts_with('/') {
        return Err(ProxyError::BadRequest(
            "the original URI must be a path starting with '/' (with nginx: $request_uri)".into(),
        ));
    }
    Ok((path, query))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(method: &str, uri: &str, headers: &[(&str, &str)]) -> http::request::Parts {
        let mut b = http::Request::builder().method(method).uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    fn original(
        method: &str,
        uri: &str,
        headers: &[(&str, &str)],
    ) -> Result<(String, String), String> {
        let p = parts(method, uri, headers);
        let (_, appended) = split(p.uri.path());
        original_request(&p, appended).map_err(|e| e.message())
    }

    #[test]
    fn the_service_and_an_appended_path_are_split() {
        assert_eq!(split("/auth/openai"), ("openai", None));
        assert_eq!(split("/auth/openai/"), ("openai", Some("/")));
        assert_eq!(
            split("/auth/openai/v1/chat//x"),
            ("openai", Some("/v1/chat//x"))
        );
        assert_eq!(split("/auth/"), ("", None));
    }

    #[test]
    fn each_gateways_description_is_read() {
        let want = || Ok(("POST".to_string(), "/v1/chat?a=1".to_string()));
        let caddy = [
            ("x-forwarded-method", "POST"),
            ("x-forwarded-uri", "/v1/chat?a=1"),
        ];
        assert_eq!(original("GET", "/auth/openai", &caddy), want());
        let nginx = [
            ("x-original-method", "POST"),
            ("x-original-uri", "/v1/chat?a=1"),
        ];
        assert_eq!(original("GET", "/auth/openai", &nginx), want());
        assert_eq!(original("POST", "/auth/openai/v1/chat?a=1", &[]), want());
        // Sources that agree are fine.
        assert_eq!(original("POST", "/auth/openai/v1/chat?a=1", &caddy), want());
    }

    /// Regression guard: a client adding its own description through a
    /// gateway that sets the other one must not choose what is authorized.
    #[test]
    fn descriptions_that_disagree_or_are_missing_are_refused() {
        let e = original("GET", "/auth/openai", &[]).unwrap_err();
        assert!(e.contains("X-Original-URI"), "{e}");
        for headers in [
            vec![
                ("x-original-method", "POST"),
                ("x-original-uri", "/v1/files"),
                ("x-forwarded-method", "POST"),
                ("x-forwarded-uri", "/v1/chat"),
            ],
            vec![
                ("x-original-method", "GET"),
                ("x-original-uri", "/v1/chat"),
                ("x-forwarded-method", "POST"),
                ("x-forwarded-uri", "/v1/chat"),
            ],
        ] {
            let e = original("GET", "/auth/openai", &headers).unwrap_err();
            assert!(e.contains("disagree"), "{e}");
        }
        // nginx's subrequest is a GET whatever the client sent.
        let e = original(
            "GET",
            "/auth/openai/v1/chat",
            &[
                ("x-original-method", "POST"),
                ("x-original-uri", "/v1/chat"),
            ],
        )
        .unwrap_err();
        assert!(e.contains("disagree"), "{e}");
        let e = original("GET", "/auth/openai", &[("x-forwarded-uri", "/v1/chat")]).unwrap_err();
        assert!(e.contains("both"), "{e}");
        let e = original(
            "GET",
            "/auth/openai",
            &[
                ("x-forwarded-method", "GET"),
                ("x-forwarded-uri", "/v1/chat"),
                ("x-forwarded-uri", "/v1/files"),
            ],
        )
        .unwrap_err();
        assert!(e.contains("more than once"), "{e}");
        let e = original(
            "GET",
            "/auth/openai",
            &[
                ("x-forwarded-method", "G T"),
                ("x-forwarded-uri", "/v1/chat"),
            ],
        )
        .unwrap_err();
        assert!(e.contains("not an HTTP method"), "{e}");
    }

    #[test]
    fn targets_are_origin_form_paths() {
        assert_eq!(split_target("/a?b=c").unwrap(), ("/a", Some("b=c")));
        assert_eq!(split_target("/a").unwrap(), ("/a", None));
        assert!(split_target("http://x/a").is_err());
        assert!(split_target("a").is_err());
        assert!(split_target("/a#b").is_err());
    }
}
