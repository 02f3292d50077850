//! Facts read from a request: the token from its headers and the `model`
//! of its JSON body. The proxy and the service middleware (`till-tower`)
//! both need them, so both read a request the same way.

use serde::de::{IgnoredAny, MapAccess, Visitor};
use thiserror::Error;

use crate::token::MAX_TOKEN_LEN;

/// Key prefixes of the providers Till fronts. A Till token is a Biscuit in
/// URL-safe base64, which starts with `C` or `E` (its first protobuf tag),
/// so none of these can be a Till token.
const PROVIDER_KEY_PREFIXES: &[&str] =
    &["sk-", "ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_"];

/// Whether `token` is a provider's API key sent by mistake instead of a
/// Till token.
pub fn looks_like_provider_key(token: &str) -> bool {
    PROVIDER_KEY_PREFIXES.iter().any(|p| token.starts_with(p))
}

/// Why no token could be read from a request's headers.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum TokenHeaderError {
    /// Neither `Authorization: Bearer` nor `x-api-key`, or an empty one.
    #[error("no Till token: send it as `Authorization: Bearer <token>` or `x-api-key: <token>`")]
    Missing,
    /// `x-api-key` holds bytes that are not visible text.
    #[error("x-api-key is not text")]
    NotText,
    /// Longer than [`MAX_TOKEN_LEN`] (the bound applies before any parsing).
    #[error("the Till token is longer than {max} bytes")]
    TooLarge {
        /// The limit, in bytes.
        max: usize,
    },
    /// A provider's API key (`sk-...`) sent instead of a Till token. The
    /// key itself is never kept, so it cannot be echoed or logged.
    #[error(
        "this looks like a provider API key, not a Till token; ask your operator for a Till token"
    )]
    ProviderKey,
}

/// The Till token of a request: `Authorization: Bearer <token>` (scheme
/// case-insensitive), else `x-api-key: <token>`; surrounding spaces are
/// trimmed. Bounded by [`MAX_TOKEN_LEN`] before anything parses it.
///
/// ```
/// use http::{HeaderMap, HeaderValue};
/// use till_core::request::{TokenHeaderError, token_from_headers};
///
/// let mut h = HeaderMap::new();
/// assert_eq!(token_from_headers(&h), Err(TokenHeaderError::Missing));
/// h.insert("x-api-key", HeaderValue::from_static("EoQB..."));
/// assert_eq!(token_from_headers(&h), Ok("EoQB..."));
/// h.insert("authorization", HeaderValue::from_static("bearer sk-proj-123"));
/// assert_eq!(token_from_headers(&h), Err(TokenHeaderError::ProviderKey));
/// ```
pub fn token_from_headers(headers: &http::HeaderMap) -> Result<&str, TokenHeaderError> {
    let bearer = headers.get(http::header::AUTHORIZATION).and_then(|v| {
        let s = v.to_str().ok()?;
        let (scheme, rest) = s.split_once(' ')?;
        scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
    });
    let token = match bearer {
        Some(t) => t,
        None => match headers.get("x-api-key") {
            Some(v) => v.to_str().map_err(|_| TokenHeaderError::NotText)?.trim(),
            None => return Err(TokenHeaderError::Missing),
        },
    };
    if token.is_empty() {
        return Err(TokenHeaderError::Missing);
    }
    if token.len() > MAX_TOKEN_LEN {
        return Err(TokenHeaderError::TooLarge { max: MAX_TOKEN_LEN });
    }
    if looks_like_provider_key(token) {
        return Err(TokenHeaderError::ProviderKey);
    }
    Ok(token)
}

/// Why a method with a lower-case ASCII letter is refused, or `None`; the
/// proxy, forward-auth, `till verify` and the tower layer all refuse it.
///
/// Policies and checks compare the method as sent (`method("DELETE")`), and
/// many servers (Werkzeug, Django, PHP) upper-case it before routing, so
/// `delete` would pass a deny-list for DELETE and still run as DELETE. Every
/// registered method is upper case, so nothing legitimate is lost.
pub fn lower_case_method(m: &str) -> Option<String> {
    if !m.bytes().any(|b| b.is_ascii_lowercase()) {
        return None;
    }
    // A method is a token (no quotes or controls), but may be long.
    let shown: String = m.chars().take(32).collect();
    Some(format!(
        "methods are upper case; send {} instead of {shown:?}: servers differ on whether a lower-case method is the same method, so Till refuses it rather than authorize one and forward the other",
        shown.to_ascii_uppercase()
    ))
}

/// Whether the request's body is JSON, i.e. whether it is read for its
/// `model` (and a `_method` key): the proxy and the service middleware must
/// agree on which bodies name a model.
///
/// Laravel decodes a body as JSON when its `Content-Type` contains `/json`
/// or `+json` anywhere (`text/json` too), and then reads `_method` from it,
/// so every such body is read here (any case, which is broader still).
pub fn is_json(headers: &http::HeaderMap) -> bool {
    headers.get(http::header::CONTENT_TYPE).is_some_and(|v| {
        v.as_bytes()
            .windows(5)
            .any(|w| (w[0] == b'/' || w[0] == b'+') && w[1..].eq_ignore_ascii_case(b"json"))
    })
}

/// An object key as JSON decoders that match keys to field names without
/// regard to case see it: two keys with the same fold can land in the same
/// field. Go's `encoding/json` (last match wins) folds by Unicode simple
/// case folding, so besides ASCII case the long s (U+017F) matches `s` and
/// the Kelvin sign (U+212A) matches `k`, which lowercasing alone misses
/// (`"paramſ".to_lowercase()` is unchanged). Lowering, raising and lowering
/// again puts every such set of letters on one form (`ß`, `ẞ` and `ss`
/// too); it also joins a few that Go keeps apart (`ı` and `i`, `ﬀ` and
/// `ff`), which only makes a caller refuse more.
pub fn fold_key(key: &str) -> String {
    if key.is_ascii() {
        key.to_ascii_lowercase()
    } else {
        key.to_lowercase().to_uppercase().to_lowercase()
    }
}

/// Whether `key` is `name` (lower case ASCII, as every field Till reads
/// is) under [`fold_key`], without allocating for an ASCII key.
pub fn folds_to(key: &str, name: &str) -> bool {
    if key.is_ascii() {
        key.eq_ignore_ascii_case(name)
    } else {
        fold_key(key) == name
    }
}

/// The `model` field of a JSON body, or why the body is refused.
///
/// `Ok(None)` (no model fact, which fails any model check: deny when unsure)
/// for malformed JSON, a body that is not an object (serde would read a
/// struct from an array too: `["gpt-4o-mini"]` would name a model the
/// upstream never sees), a `model` that is not a string, and invalid UTF-8
/// anywhere (an upstream may decode such a body differently).
///
/// `Err` for a body an upstream could read as naming another model: `model`
/// twice, or another top-level key that folds to `model` ([`fold_key`]:
/// `MODEL`, `Model`, escapes such as `"\u004dodel"`), which Go's `encoding/json`,
/// ASP.NET and others match case-insensitively, taking the last one. Also
/// for a top-level `_method` key (any case), which Laravel reads from a
/// JSON body as the HTTP method to run instead of the request's: checked in
/// the same pass over the keys, so it costs no second parse.
pub fn model_of(body: &[u8]) -> Result<Option<String>, String> {
    struct Scan(Result<Option<String>, String>);
    /// Whether the `model` value is parsed (to read it) or skipped as every
    /// other value is.
    #[derive(Clone, Copy)]
    struct V {
        read_model: bool,
    }
    impl<'de> Visitor<'de> for V {
        type Value = Scan;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Scan, A::Error> {
            let mut model: Option<Option<String>> = None;
            let mut problem = None;
            // Keys are borrowed from the body unless they hold escapes: no
            // allocation per key on the request path.
            while let Some(Key(k)) = m.next_key::<Key<'de>>()? {
                if k == "model" {
                    if model.is_some() {
                        problem.get_or_insert_with(|| {
                            "the JSON body has the key \"model\" twice; send it once".to_string()
                        });
                    }
                    model = Some(if self.read_model {
                        match m.next_value::<serde_json::Value>()? {
                            serde_json::Value::String(s) => Some(s),
                            _ => None,
                        }
                    } else {
                        m.next_value::<IgnoredAny>()?;
                        None
                    });
                } else {
                    if folds_to(&k, "model") {
                        problem.get_or_insert_with(|| {
                            format!(
                                "the JSON body has a key {k:?} besides or instead of \"model\"; upstreams that match keys case-insensitively would read it as the model, so Till refuses it: send the model only as \"model\""
                            )
                        });
                    } else if folds_to(&k, "_method") {
                        problem.get_or_insert_with(|| {
                            format!(
                                "the JSON body has a key {k:?}, which some frameworks (Laravel) read as the HTTP method instead of the request's; send the request with the method you mean and without {k:?}"
                            )
                        });
                    }
                    m.next_value::<IgnoredAny>()?;
                }
            }
            Ok(Scan(match problem {
                Some(p) => Err(p),
                None => Ok(model.flatten()),
            }))
        }
    }
    struct Key<'de>(std::borrow::Cow<'de, str>);
    impl<'de> serde::Deserialize<'de> for Key<'de> {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct K;
            impl<'de> Visitor<'de> for K {
                type Value = Key<'de>;
                fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                    f.write_str("a string")
                }
                fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Key<'de>, E> {
                    Ok(Key(v.into()))
                }
                fn visit_str<E>(self, v: &str) -> Result<Key<'de>, E> {
                    Ok(Key(v.to_owned().into()))
                }
            }
            d.deserialize_str(K)
        }
    }
    impl<'de> serde::de::DeserializeSeed<'de> for V {
        type Value = Scan;
        fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Scan, D::Error> {
            d.deserialize_map(self)
        }
    }
    let scan = |text: &str, read_model: bool| -> Result<Scan, serde_json::Error> {
        use serde::de::DeserializeSeed;
        let mut de = serde_json::Deserializer::from_str(text);
        let scan = V { read_model }.deserialize(&mut de)?;
        de.end()?;
        Ok(scan)
    };
    let Ok(text) = std::str::from_utf8(body) else {
        return Ok(None);
    };
    if !text.trim_start().starts_with('{') {
        return Ok(None);
    }
    match scan(text, true) {
        Ok(Scan(r)) => r,
        // A `model` value serde cannot hold (`1e400`, nesting past 128)
        // fails the whole parse, while PHP's `json_decode` reads it (INF,
        // 512 levels): Laravel would still find a `_method` key after it.
        // The keys are checked again with every value skipped; the body
        // still names no model.
        Err(_) => match scan(text, false) {
            Ok(Scan(Err(problem))) => Err(problem),
            _ => Ok(None),
        },
    }
}

/// Whether a request's head says it carries no body: no
/// `Transfer-Encoding`, and no `Content-Length` but `0`.
pub fn declares_no_body(headers: &http::HeaderMap) -> bool {
    !headers.contains_key(http::header::TRANSFER_ENCODING)
        && headers
            .get_all(http::header::CONTENT_LENGTH)
            .iter()
            .all(|v| v.as_bytes() == b"0")
}

/// The model a query string names, or why the query is refused.
///
/// Some upstreams read the model from the query: LiteLLM's proxy takes
/// `?model=` over the JSON body's `model`, and OpenAI's Realtime API names
/// it only there. A parameter counts as the model when its name is `model`
/// to some framework ([`names_model`]: any case, `model[]`, `[model]`,
/// percent-encoded up to three times, as `_method` is matched); its value is decoded
/// once, as a form value. `Err` when the query names two different models,
/// or one that is not UTF-8 text.
pub fn model_in_query(query: &str) -> Result<Option<String>, String> {
    let mut found: Option<String> = None;
    // Both `&` and `;` separate parameters in some frameworks.
    for pair in query.split(['&', ';']) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        if !names_model(name) {
            continue;
        }
        let value = decode_form(value.as_bytes());
        let value = String::from_utf8(value)
            .map_err(|_| "the query's `model` parameter is not UTF-8 text".to_string())?;
        match &found {
            Some(m) if *m != value => {
                return Err(format!(
                    "the query names two models ({m:?} and {value:?}); name one"
                ));
            }
            Some(_) => {}
            None => found = Some(value),
        }
    }
    Ok(found)
}

/// Whether a query parameter's or a multipart part's name is `model` to
/// some framework: any case, percent-encoded up to three times, after
/// leading spaces, `[` and `]` (Rack 2's `normalize_params` and `qs`, which
/// Express uses for forms, read `[model]` as `model`), and up to a `[`
/// (`model[]`), a `]` (Rack 2 reads `model]` as `model`) or a NUL byte
/// (PHP ends a name there: `model%00x` is `$_POST['model']`).
pub fn names_model(name: &str) -> bool {
    // Cheap refusal first: most names are not close.
    if name.len() < 5 {
        return false;
    }
    let mut name = name.as_bytes().to_vec();
    for _ in 0..3 {
        name = decode_form(&name);
    }
    let name = String::from_utf8_lossy(&name);
    let name = name.trim_start_matches([' ', '[', ']']);
    let base = name.find(['[', ']', '\0']).map_or(name, |end| &name[..end]);
    base.eq_ignore_ascii_case("model")
}

/// A form value decoded once: `+` is a space, then percent escapes.
fn decode_form(raw: &[u8]) -> Vec<u8> {
    let spaced: Vec<u8> = raw
        .iter()
        .map(|&b| if b == b'+' { b' ' } else { b })
        .collect();
    percent_encoding::percent_decode(&spaced).collect()
}

/// The model of a request with a JSON body: the body's `model`
/// ([`model_of`]) and the query's ([`model_in_query`]) together.
///
/// The query's model is the request's when the body names none: only when
/// the body is empty or a JSON object Till read without a `model` key (a
/// body Till cannot read may name one an upstream reads, so then there is
/// no model fact: deny when unsure). `Err` when both name a model and they
/// differ, or for any reason either refuses the request.
pub fn model_of_json_request(query: Option<&str>, body: &[u8]) -> Result<Option<String>, String> {
    let from_body = model_of(body)?;
    let Some(from_query) = query.map(model_in_query).transpose()?.flatten() else {
        return Ok(from_body);
    };
    match from_body {
        Some(m) if m == from_query => Ok(Some(m)),
        Some(m) => Err(format!(
            "the query names the model {from_query:?} and the JSON body {m:?}; upstreams differ on which one they run, so name the model once"
        )),
        None if names_no_model(body) => Ok(Some(from_query)),
        None => Ok(None),
    }
}

/// The model of a request with a URL-encoded form body: the body's `model`
/// field and the query's, read alike ([`model_in_query`]: frameworks that
/// take forms, FastAPI's `Form` or Rack's params, read a `model` field).
/// `Err` when they name different models, or the body names two.
pub fn model_of_form_request(query: Option<&str>, body: &[u8]) -> Result<Option<String>, String> {
    // A name or value that is not UTF-8 is not the model's: the lossy text
    // keeps every `model` field, and a value that is not text is refused.
    let from_body = model_in_query(&String::from_utf8_lossy(body))
        .map_err(|e| e.replacen("the query", "the form body", 1))?;
    let from_query = query.map(model_in_query).transpose()?.flatten();
    match (from_body, from_query) {
        (Some(b), Some(q)) if b != q => Err(format!(
            "the query names the model {q:?} and the form body {b:?}; upstreams differ on which one they run, so name the model once"
        )),
        (b, q) => Ok(b.or(q)),
    }
}

/// Whether a body is empty or a JSON object without a `model` key, as an
/// upstream would read it ([`model_of`] has refused keys that fold to it).
///
/// A JSON body [`model_of`] finds no model in, and for which this is
/// `false`, is one Till cannot read as every upstream does: Python's `json`
/// (FastAPI, LiteLLM, vLLM) takes a byte order mark, UTF-16 or UTF-32, and
/// `NaN` or `Infinity`, which `serde_json` refuses; serde reads a struct
/// from an array. A key or policy that reads the model cannot be judged on
/// such a body.
pub fn names_no_model(body: &[u8]) -> bool {
    if body.iter().all(u8::is_ascii_whitespace) {
        return true;
    }
    std::str::from_utf8(body).is_ok_and(|text| {
        serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(text)
            .is_ok_and(|m| !m.contains_key("model"))
    })
}

/// Whether an upstream could read `body`, sent as a form or without a
/// `Content-Type`, as JSON: handlers that parse their body whatever its
/// type (FastAPI's `request.json()`, Python's `json.loads` of the bytes)
/// read JSON after whitespace, behind a byte order mark, or in UTF-16 or
/// UTF-32 (which holds NUL bytes). A form never starts so.
pub fn may_read_as_json(body: &[u8]) -> bool {
    let start = body.trim_ascii_start();
    matches!(start.first(), Some(b'{' | b'[' | 0xEF | 0xFE | 0xFF)) || body.contains(&0)
}

/// Headers that frameworks (Rails, Laravel, Express, ASP.NET, Symfony, IIS,
/// Spring) let replace the method or path that was authorized. The proxy
/// drops them; forward-auth, whose gateway forwards the client's headers as
/// they are, and the tower layer, whose service sees them as sent, refuse a
/// request that carries any ([`method_or_url_header`]).
pub const METHOD_OR_URL_HEADERS: &[&str] = &[
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
    "x-original-url",
    "x-rewrite-url",
    "x-forwarded-prefix",
];

/// A header name with every `_` read as `-`. CGI and WSGI servers (PHP,
/// wsgiref, many Python stacks) turn both into `_` (`HTTP_X_API_KEY`), so
/// to them `x_api_key` is `x-api-key`: a header Till removes or sets must be
/// matched in both spellings. No allocation for a name without `_`.
pub fn dashed(name: &str) -> std::borrow::Cow<'_, str> {
    if name.contains('_') {
        std::borrow::Cow::Owned(name.replace('_', "-"))
    } else {
        std::borrow::Cow::Borrowed(name)
    }
}

/// The first of `headers` that is one of [`METHOD_OR_URL_HEADERS`], in
/// either spelling.
pub fn method_or_url_header(headers: &http::HeaderMap) -> Option<&http::HeaderName> {
    headers
        .keys()
        .find(|n| METHOD_OR_URL_HEADERS.contains(&&*dashed(n.as_str())))
}

/// Whether the request's body is a URL-encoded form that frameworks read
/// for a `_method` field (Rails through Rack, Laravel, Symfony): declared as
/// `application/x-www-form-urlencoded`, or a POST with a body and no
/// `Content-Type`, which Rack parses as a form too. An empty `Content-Type`
/// is none: Rack's `Request#content_type` reads `""` as `nil`.
pub fn is_url_encoded_form(parts: &http::request::Parts) -> bool {
    let content_type = parts
        .headers
        .get(http::header::CONTENT_TYPE)
        .filter(|v| !v.as_bytes().trim_ascii().is_empty());
    match content_type {
        // PHP ends the media type at a space as well as at ';' or ','.
        Some(v) => v
            .as_bytes()
            .split(|b| matches!(b, b';' | b',' | b' ' | b'\t'))
            .next()
            .is_some_and(|m| m.eq_ignore_ascii_case(b"application/x-www-form-urlencoded")),
        None => {
            parts.method == http::Method::POST
                && (parts.headers.contains_key(http::header::TRANSFER_ENCODING)
                    || parts
                        .headers
                        .get(http::header::CONTENT_LENGTH)
                        .is_some_and(|v| v.as_bytes() != b"0"))
        }
    }
}

/// Whether a query string has a parameter named `_method` to some framework
/// ([`is_method_override_name`]: also `.method`, which PHP registers as
/// `_method`). Both `&` and `;` separate parameters in some frameworks.
pub fn has_method_override(query: &str) -> bool {
    query
        .split(['&', ';'])
        .any(|pair| is_method_override_name(pair.split('=').next().unwrap_or(pair).as_bytes()))
}

/// Whether a parameter's or a multipart part's name (or a name parameter's
/// value) is `_method` to some framework: any case, `_method[]` and other names
/// starting with it, percent-encoded up to three times, after leading
/// spaces and `+`; and as PHP registers it, which turns `.`, ` ` and a
/// `[` without `]` into `_` (`.method` is `$_POST['_method']`). Also after
/// leading `[` and `]`, which Rack 2 (`normalize_params`) and `qs`
/// (Express's extended forms) drop: `[_method]` is `_method` to both, and
/// `Rack::MethodOverride` runs it.
pub fn is_method_override_name(name: &[u8]) -> bool {
    let mut name = name.to_vec();
    for _ in 0..3 {
        name = percent_decoded(&name);
    }
    let skip = |name: &[u8], skipped: &[u8]| {
        name.iter()
            .position(|b| !skipped.contains(b))
            .unwrap_or(name.len())
    };
    let is_it = |name: &[u8]| {
        name.iter()
            .map(|&b| match b {
                b'.' | b' ' | b'[' => b'_',
                b => b.to_ascii_lowercase(),
            })
            .take(7)
            .eq(b"_method".iter().copied())
    };
    let start = skip(&name, b" +\t");
    let bare = skip(&name, b" +\t[]");
    is_it(&name[start..]) || is_it(&name[bare..])
}

fn percent_decoded(s: &[u8]) -> Vec<u8> {
    let hex = |b: u8| (b as char).to_digit(16);
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        if let (b'%', Some(h), Some(l)) = (
            s[i],
            s.get(i + 1).and_then(|&b| hex(b)),
            s.get(i + 2).and_then(|&b| hex(b)),
        ) {
            // Two hex digits: at most 255.
            out.push((h * 16 + l) as u8);
            i += 3;
        } else {
            out.push(s[i]);
            i += 1;
        }
    }
    out
}

/// The first content coding other than `identity` a request declares, if
/// any. A body Till reads (JSON, a form, MCP messages) is checked as the
/// bytes arrive (`model`, `_method`, tool names), and Till does not decode
/// it, while a server that decodes request bodies acts on what is inside:
/// such a body is refused (415).
pub fn content_coding(headers: &http::HeaderMap) -> Option<String> {
    headers
        .get_all(http::header::CONTENT_ENCODING)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
        .find(|c| !c.is_empty() && !c.eq_ignore_ascii_case(b"identity"))
        .map(|c| String::from_utf8_lossy(c).chars().take(40).collect())
}

/// Why the body's type is ambiguous, or `None`: two `Content-Type`
/// headers (Till reads the first, Werkzeug and others the last, so a JSON
/// body Till checked the `model` of could be read as a form naming
/// another), or one whose media type holds a comma (two values folded into
/// one line).
pub fn ambiguous_content_type(headers: &http::HeaderMap) -> Option<&'static str> {
    let mut all = headers.get_all(http::header::CONTENT_TYPE).iter();
    let first = all.next()?;
    if all.next().is_some() {
        return Some(
            "the request has more than one Content-Type header; servers differ on which one they read, so Till refuses it: send one",
        );
    }
    let media = first.as_bytes().split(|&b| b == b';').next().unwrap_or(b"");
    media.contains(&b',').then_some(
        "the Content-Type names more than one media type (a ',' before any ';'); servers differ on which one they read, so Till refuses it: send one",
    )
}

/// Why a request's query asks to run another method than its own, or
/// `None` ([`has_method_override`]).
pub fn method_override_in_query(query: Option<&str>) -> Option<&'static str> {
    query.is_some_and(has_method_override).then_some(
        "the query has a `_method` parameter (PHP reads `.method` as `_method` too), which some frameworks use to replace the HTTP method; send the request with the method you mean and without `_method`",
    )
}

/// Why a URL-encoded form body asks to run another method than the
/// request's, or `None`: a `_method` field found as in a query string
/// ([`has_method_override`]), which Rack's `MethodOverride`, Laravel and
/// Symfony read from the body as the method to run.
pub fn method_override_in_form(body: &[u8]) -> Option<&'static str> {
    has_method_override(&String::from_utf8_lossy(body)).then_some(
        "the form body has a `_method` field (PHP reads `.method` as `_method` too), which some frameworks use to replace the HTTP method; send the request with the method you mean and without `_method`",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_an_upstream_reads_whatever_the_content_type_is_recognised() {
        let json = r#"{"model":"gpt-4"}"#;
        for body in [
            json.as_bytes().to_vec(),
            format!(" \r\n\t{json}").into_bytes(),
            [b"\xEF\xBB\xBF".as_slice(), json.as_bytes()].concat(),
            json.encode_utf16().flat_map(u16::to_be_bytes).collect(),
            json.encode_utf16().flat_map(u16::to_le_bytes).collect(),
            br#"["gpt-4"]"#.to_vec(),
        ] {
            assert!(may_read_as_json(&body), "{body:?}");
        }
        for form in [
            "model=gpt-4&x=1",
            "x=%7B%22model%22%3A1%7D",
            "",
            "a=h\u{e9}",
        ] {
            assert!(!may_read_as_json(form.as_bytes()), "{form}");
        }
        // What serde_json cannot read as Python does names no model for sure.
        for body in [
            r#"{"model":"gpt-4","temperature":NaN}"#.as_bytes().to_vec(),
            [b"\xEF\xBB\xBF".as_slice(), br#"{"model":"gpt-4"}"#].concat(),
            br#"["gpt-4"]"#.to_vec(),
            br#"{"model":["gpt-4"]}"#.to_vec(),
        ] {
            assert_eq!(model_of(&body), Ok(None), "{body:?}");
            assert!(!names_no_model(&body), "{body:?}");
        }
        assert!(names_no_model(br#"{"messages":[]}"#));
        assert!(names_no_model(b" "));
    }

    #[test]
    fn a_form_bodys_model_is_read_with_the_querys() {
        let m = |q: Option<&str>, b: &str| model_of_form_request(q, b.as_bytes());
        assert_eq!(m(None, "model=gpt-4&x=1"), Ok(Some("gpt-4".into())));
        assert_eq!(m(None, "x=1&MODEL%5B%5D=gpt%2D4"), Ok(Some("gpt-4".into())));
        assert_eq!(m(Some("model=gpt-4"), "x=1"), Ok(Some("gpt-4".into())));
        assert_eq!(
            m(Some("model=gpt-4"), "model=gpt-4"),
            Ok(Some("gpt-4".into()))
        );
        assert_eq!(m(None, "x=1"), Ok(None));
        assert!(
            m(Some("model=gpt-4"), "model=small")
                .unwrap_err()
                .contains("form body")
        );
        assert!(
            m(None, "model=a&model=b")
                .unwrap_err()
                .contains("form body names two")
        );
    }

    /// Regression (red team, wave 2, fifth pass): a `model` value serde
    /// cannot parse (`1e400`, nesting past 128, which PHP's `json_decode`
    /// reads) made the whole body unread, `_method` after it unchecked.
    #[test]
    fn regression_method_after_a_model_value_serde_cannot_parse_is_refused() {
        let deep = format!("{}1{}", "[".repeat(200), "]".repeat(200));
        for body in [
            r#"{"model":1e400,"_method":"DELETE"}"#.to_string(),
            r#"{"model":-1e999,"\u005fmethod":"DELETE"}"#.to_string(),
            format!(r#"{{"model":{deep},"_METHOD":"DELETE"}}"#),
        ] {
            let e = model_of(body.as_bytes()).expect_err(&body);
            assert!(e.to_lowercase().contains("_method"), "{e}");
        }
        // Two models, one of them unparseable to serde, are still two.
        assert!(model_of(br#"{"model":"a","model":1e400}"#).is_err());
        assert!(model_of(br#"{"model":1e400,"MODEL":"b"}"#).is_err());
        // Without such a key the body still names no model.
        assert_eq!(model_of(br#"{"model":1e400,"x":1}"#), Ok(None));
        assert_eq!(model_of(br#"{"model":1e400,"x":1} x"#), Ok(None));
    }

    /// Regression (red team, wave 2, fifth pass): Rack 2 and `qs` read
    /// `[model]`, Rack 2 `model]`, PHP `model%00x` as `model`.
    #[test]
    fn regression_a_model_name_behind_brackets_or_before_a_nul_is_the_model() {
        for q in [
            "[model]=gpt-4",
            "%5Bmodel%5D=gpt-4",
            "]model=gpt-4",
            "[[model]]=gpt-4",
            "model]=gpt-4",
            "model%00=gpt-4",
            "model%00x=gpt-4",
            "[MODEL]=gpt-4",
            "x=1&+[model]=gpt-4",
        ] {
            assert_eq!(model_in_query(q).unwrap().as_deref(), Some("gpt-4"), "{q}");
        }
        for q in [
            "[models]=x",
            "a[model]=x",
            "model_x=x",
            "model.=x",
            "[mode]l=x",
        ] {
            assert_eq!(model_in_query(q).unwrap(), None, "{q}");
        }
        assert!(model_of_form_request(None, b"model=a&[model]=b").is_err());
        assert!(model_of_form_request(None, b"model=a&model%00=b").is_err());
    }

    #[test]
    fn a_head_declares_no_body_only_without_transfer_encoding_or_a_nonzero_length() {
        let h = |pairs: &[(&str, &str)]| {
            let mut m = http::HeaderMap::new();
            for (k, v) in pairs {
                m.append(
                    http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    v.parse().unwrap(),
                );
            }
            m
        };
        assert!(declares_no_body(&h(&[])));
        assert!(declares_no_body(&h(&[("content-length", "0")])));
        assert!(!declares_no_body(&h(&[("content-length", "2")])));
        assert!(!declares_no_body(&h(&[
            ("content-length", "0"),
            ("content-length", "5")
        ])));
        assert!(!declares_no_body(&h(&[("transfer-encoding", "chunked")])));
    }

    #[test]
    fn a_model_in_the_query_is_found_however_its_name_is_spelt() {
        let m = |q: &str| model_in_query(q).unwrap();
        for q in [
            "model=gpt-4",
            "a=1&model=gpt-4",
            "a=1;model=gpt-4",
            "MODEL=gpt-4",
            "Model=gpt%2D4",
            "mod%65l=gpt-4",
            "mod%2565l=gpt-4",
            "model%5B%5D=gpt-4",
            "model[]=gpt-4",
            "+model=gpt-4",
            "model=gpt-4&model=gpt-4",
        ] {
            assert_eq!(m(q).as_deref(), Some("gpt-4"), "{q}");
        }
        assert_eq!(m("model=a+b").as_deref(), Some("a b"));
        assert_eq!(m("model").as_deref(), Some(""));
        for q in [
            "",
            "a=model",
            "models=x",
            "my_model=x",
            "modelx=x",
            "q=1&mode=2",
        ] {
            assert_eq!(m(q), None, "{q}");
        }
        assert!(model_in_query("model=a&MODEL=b").is_err());
        assert!(model_in_query("model=%FF").is_err(), "not UTF-8");
    }

    #[test]
    fn a_json_requests_model_is_the_bodys_and_the_querys_together() {
        let m = model_of_json_request;
        let body = br#"{"model":"gpt-4o-mini"}"#;
        assert_eq!(m(None, body).unwrap().as_deref(), Some("gpt-4o-mini"));
        assert_eq!(
            m(Some("x=1"), body).unwrap().as_deref(),
            Some("gpt-4o-mini")
        );
        assert_eq!(
            m(Some("model=gpt-4o-mini"), body).unwrap().as_deref(),
            Some("gpt-4o-mini")
        );
        assert!(m(Some("model=gpt-4"), body).is_err(), "two models");
        // No model in a body Till read: the query's is the request's.
        for body in [&b"{}"[..], b"", b"  ", br#"{"messages":[]}"#] {
            assert_eq!(
                m(Some("model=gpt-4"), body).unwrap().as_deref(),
                Some("gpt-4")
            );
        }
        // A body Till cannot read, or a model that is not a string: no
        // model fact at all, since an upstream may read one from it.
        for body in [
            &br#"{"model":5}"#[..],
            b"[1]",
            b"{\"model\":\"a\xff\"}",
            b"{",
        ] {
            assert_eq!(m(Some("model=gpt-4"), body).unwrap(), None, "{body:?}");
        }
        // The body's own refusals still hold.
        assert!(m(Some("model=a"), br#"{"model":"a","MODEL":"b"}"#).is_err());
    }

    #[test]
    fn json_bodies_are_recognised_by_media_type() {
        let h = |ct: &str| {
            let mut m = http::HeaderMap::new();
            m.insert(http::header::CONTENT_TYPE, ct.parse().unwrap());
            m
        };
        for ct in [
            "application/json",
            "Application/JSON; charset=utf-8",
            "application/vnd.api+json",
            // Laravel decodes these as JSON too.
            "text/json",
            "application/jsonx",
            "text/plain; x=/json",
        ] {
            assert!(is_json(&h(ct)), "{ct}");
        }
        for ct in [
            "text/plain",
            "application/x-json",
            "multipart/form-data",
            "/jso",
        ] {
            assert!(!is_json(&h(ct)), "{ct}");
        }
        assert!(!is_json(&http::HeaderMap::new()));
    }

    #[test]
    fn model_extraction_denies_when_unsure() {
        assert_eq!(
            model_of(br#"{"model":"a","x":1}"#).unwrap().as_deref(),
            Some("a")
        );
        assert!(model_of(br#"{"model":"a","model":"b"}"#).is_err());
        assert_eq!(model_of(b"not json"), Ok(None));
        assert_eq!(model_of(br#"{"model":5}"#), Ok(None));
        // Found by fuzzing (tests/fuzz-regressions/request/).
        assert_eq!(model_of(br#"["gpt-4o-mini"]"#), Ok(None));
        assert_eq!(model_of(b"{\"model\":\"a\",\"x\":\"\xff\"}"), Ok(None));
    }

    #[test]
    fn keys_fold_as_case_insensitive_decoders_match_them() {
        for (key, name) in [
            ("Method", "method"),
            ("PARAMS", "params"),
            ("\u{17f}", "s"), // long s, which Go's encoding/json matches to s
            ("param\u{17f}", "params"), // and which lowercasing leaves as is
            ("\u{212a}ind", "kind"), // Kelvin sign, matched to k
            ("\u{1e9e}", "\u{df}"), // capital and small sharp s: one Go fold set
            ("\u{3a3}", "\u{3c2}"), // sigma and final sigma
            ("\u{3f4}", "\u{3d1}"), // theta symbols
        ] {
            assert_eq!(fold_key(key), fold_key(name), "{key:?} and {name:?}");
        }
        assert!(folds_to("param\u{17f}", "params"));
        assert!(folds_to("MoDeL", "model"));
        assert!(!folds_to("models", "model"));
        assert_ne!(fold_key("params"), fold_key("param"));

        // Every letter case mappings join folds together, so no key can
        // reach a field by a case mapping the fold misses.
        for c in (0..=0x10ffff_u32).filter_map(char::from_u32) {
            let fold = fold_key(c.encode_utf8(&mut [0; 4]));
            let lower: String = c.to_lowercase().collect();
            for other in [lower, c.to_uppercase().collect()] {
                if other.chars().count() == 1 {
                    assert_eq!(fold, fold_key(&other), "{c:?} and {other:?}");
                }
            }
        }
        // The letters outside ASCII that fold onto one ASCII letter: Go's
        // two (long s, Kelvin sign) and the dotless i, which Go keeps
        // apart from i (refusing it too costs nothing).
        let onto_ascii: Vec<char> = (0x80..=0x10ffff_u32)
            .filter_map(char::from_u32)
            .filter(|c| {
                let f = fold_key(c.encode_utf8(&mut [0; 4]));
                f.len() == 1 && f.is_ascii()
            })
            .collect();
        assert_eq!(onto_ascii, ['\u{131}', '\u{17f}', '\u{212a}']);
    }

    /// Regression: the allow-list read only the exact key `model`, and
    /// case-insensitive upstreams (Go's encoding/json) used the last
    /// `MODEL`.
    #[test]
    fn a_key_that_case_folds_to_model_is_refused() {
        for body in [
            r#"{"model":"gpt-4o-mini","MODEL":"gpt-4"}"#,
            r#"{"Model":"gpt-4","model":"gpt-4o-mini"}"#,
            r#"{"model":"gpt-4o-mini","\u004dODEL":"gpt-4"}"#,
            r#"{"MoDeL":"gpt-4"}"#,
        ] {
            let e = model_of(body.as_bytes()).expect_err(body);
            assert!(e.contains("\"model\""), "{e}");
        }
        // Nor may `_method`, which Laravel reads from a JSON body.
        for body in [
            r#"{"model":"a","_method":"DELETE"}"#,
            r#"{"_METHOD":"DELETE","model":"a"}"#,
            r#"{"\u005fmethod":"DELETE"}"#,
        ] {
            let e = model_of(body.as_bytes()).expect_err(body);
            assert!(e.contains("_method") || e.contains("_METHOD"), "{e}");
        }
        // Nested keys do not name the model.
        assert_eq!(
            model_of(br#"{"model":"a","meta":{"MODEL":"b"}}"#)
                .unwrap()
                .as_deref(),
            Some("a")
        );
    }
}
