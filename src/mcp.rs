//! MCP (Model Context Protocol) messages as Till reads them: the JSON-RPC
//! body a client POSTs to a Streamable-HTTP MCP server, the request headers
//! that mirror it, and the `tools/list` results Till narrows to what a token
//! may call.
//!
//! Pure functions over bytes and `serde_json` values, so the decision can be
//! made by anything that holds the body (the proxy, a service). Everything
//! is read the strict way: a body an MCP server could read differently from
//! Till (a key twice, a key that differs only in case, a key that is a
//! member Till reads only without regard to case, a `tools/call` without a
//! string `name`) is refused rather than guessed at.

use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::Value;

use crate::request::fold_key;
use crate::token::McpMessage;
use crate::token::vocab::{NAMED_TARGETS, TOOLS_CALL};

/// Most messages one batch may hold: each is decided on its own.
pub const MAX_BATCH: usize = 64;

/// The list methods whose answers Till narrows ([`filter_lists`]) to what
/// the token may use.
pub const LISTING: &[&str] = &["tools/list", "prompts/list", "resources/list"];

/// The methods Till treats apart from the rest: those that name a target
/// (checked against the token's tools, prompts, resources; a `tools/call`
/// spends a use) and those whose answers it narrows. Every other method is
/// free and unscoped.
fn scoped_methods() -> impl Iterator<Item = &'static str> {
    NAMED_TARGETS
        .iter()
        .map(|(m, _, _)| *m)
        .chain(LISTING.iter().copied())
}

/// The scoped method `method` is not but could be read as, if any: equal
/// under [`fold_key`] once surrounding whitespace and control characters
/// are trimmed (`Tools/Call`, `"tools/call "`). Such a method is free and
/// unscoped to Till, while a server that normalises method names (case,
/// `strip()`) runs it as the tool call (red team, wave 2, third pass). The
/// trim is wider than ASCII whitespace (Python's `str.strip()` also strips
/// Unicode spaces and `\x1c`–`\x1f`): refusing more costs nothing, no MCP
/// method starts or ends with either.
fn near_scoped_method(method: &str) -> Option<&'static str> {
    if scoped_methods().any(|m| m == method) {
        return None;
    }
    let trimmed = method.trim_matches(|c: char| c.is_whitespace() || c.is_control());
    let folded = fold_key(trimmed);
    scoped_methods().find(|m| *m == folded)
}

/// One JSON-RPC message of a request body.
#[derive(Clone, Debug, PartialEq)]
pub struct Message {
    /// The request id; `None` for a notification or a response.
    pub id: Option<Value>,
    /// `None` for a response the client sends back to the server.
    pub method: Option<String>,
    /// The target a name-bearing method names (`params.name` of
    /// `tools/call` and `prompts/get`, `params.uri` of `resources/read`).
    pub name: Option<String>,
}

impl Message {
    /// Whether this message is a tool call: the one kind that spends a use.
    pub fn is_tool_call(&self) -> bool {
        self.method.as_deref() == Some(TOOLS_CALL)
    }

    /// The tool a `tools/call` names.
    pub fn tool(&self) -> Option<&str> {
        self.is_tool_call()
            .then_some(self.name.as_deref())
            .flatten()
    }

    /// The request facts this message contributes (`mcp`, and `tool`,
    /// `prompt` or `resource`).
    pub fn facts(&self) -> McpMessage {
        McpMessage {
            method: self.method.clone().unwrap_or_default(),
            name: self.name.clone(),
        }
    }
}

/// The messages of one POSTed body.
#[derive(Clone, Debug, PartialEq)]
pub struct Body {
    pub messages: Vec<Message>,
    /// Sent as a JSON array (a JSON-RPC batch), even of one message.
    pub batch: bool,
}

/// Why a body is not read as MCP messages.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum ParseError {
    /// Not JSON at all (JSON-RPC "parse error", -32700).
    #[error("the body is not JSON: {0}")]
    NotJson(String),
    /// JSON, but not JSON-RPC messages Till can read unambiguously
    /// (JSON-RPC "invalid request", -32600). `id` when the message had one.
    #[error("{why}")]
    Invalid { id: Option<Value>, why: String },
}

/// Reads the JSON-RPC message(s) of a POST body: one object, or a non-empty
/// array of at most [`MAX_BATCH`] objects.
pub fn parse(body: &[u8]) -> Result<Body, ParseError> {
    let text = std::str::from_utf8(body)
        .map_err(|_| ParseError::NotJson("it is not valid UTF-8".into()))?;
    // First pass: refuse keys an MCP server could read differently.
    let mut de = serde_json::Deserializer::from_str(text);
    NoTwins {
        objects: 0,
        reads: Reads::Message,
    }
    .deserialize(&mut de)
    .and_then(|()| de.end())
    .map_err(|e| {
        if e.is_syntax() || e.is_eof() {
            ParseError::NotJson(e.to_string())
        } else {
            invalid(None, e.to_string())
        }
    })?;
    let value: Value =
        serde_json::from_str(text).map_err(|e| ParseError::NotJson(e.to_string()))?;
    match value {
        Value::Array(items) => {
            if items.is_empty() {
                return Err(invalid(None, "the batch is empty".into()));
            }
            if items.len() > MAX_BATCH {
                return Err(invalid(
                    None,
                    format!(
                        "the batch has {} messages, more than the {MAX_BATCH} Till accepts; send fewer at a time",
                        items.len()
                    ),
                ));
            }
            let messages = items
                .into_iter()
                .map(message)
                .collect::<Result<Vec<_>, _>>()?;
            Ok(Body {
                messages,
                batch: true,
            })
        }
        v => Ok(Body {
            messages: vec![message(v)?],
            batch: false,
        }),
    }
}

fn invalid(id: Option<Value>, why: String) -> ParseError {
    ParseError::Invalid { id, why }
}

fn message(v: Value) -> Result<Message, ParseError> {
    let Value::Object(mut o) = v else {
        return Err(invalid(None, "a JSON-RPC message must be an object".into()));
    };
    let id = match o.remove("id") {
        None => None,
        Some(id @ (Value::String(_) | Value::Number(_) | Value::Null)) => Some(id),
        Some(_) => {
            return Err(invalid(
                None,
                "the message's \"id\" must be a string or a number".into(),
            ));
        }
    };
    if o.get("jsonrpc").and_then(Value::as_str) != Some("2.0") {
        return Err(invalid(id, "the message lacks \"jsonrpc\": \"2.0\"".into()));
    }
    let method = match o.get("method") {
        None => {
            if !(o.contains_key("result") || o.contains_key("error")) {
                return Err(invalid(
                    id,
                    "a message without \"method\" must be a response (\"result\" or \"error\")"
                        .into(),
                ));
            }
            None
        }
        Some(Value::String(m)) => Some(m.clone()),
        Some(_) => {
            return Err(invalid(
                id,
                "the message's \"method\" is not a string".into(),
            ));
        }
    };
    if let Some(scoped) = method.as_deref().and_then(near_scoped_method) {
        return Err(invalid(
            id,
            format!(
                "the method {:?} is not {scoped:?} but matches it without regard to case or surrounding spaces; MCP servers that normalise method names would run it as {scoped:?}, which Till scopes, so Till refuses the message: spell it {scoped:?}",
                method.as_deref().unwrap_or_default()
            ),
        ));
    }
    let name_key = method
        .as_deref()
        .and_then(|m| NAMED_TARGETS.iter().find(|(n, _, _)| *n == m))
        .map(|(_, _, k)| *k);
    let name = match name_key {
        None => None,
        Some(key) => match o.get("params").and_then(|p| p.get(key)) {
            Some(Value::String(n)) => Some(n.clone()),
            _ => {
                return Err(invalid(
                    id,
                    format!(
                        "{} needs a string \"params.{key}\"",
                        method.as_deref().unwrap_or_default()
                    ),
                ));
            }
        },
    };
    Ok(Message { id, method, name })
}

/// The members of a JSON-RPC message: Till reads them to decide (`result`
/// and `error` tell a response from a request).
const MESSAGE_KEYS: &[&str] = &["jsonrpc", "id", "method", "params", "result", "error"];

/// The object a map is, which sets the names Till reads in it.
#[derive(Clone, Copy)]
enum Reads {
    /// A message: [`MESSAGE_KEYS`].
    Message,
    /// Its `params`: the target each of [`NAMED_TARGETS`] names.
    Params,
    /// Any other object: Till reads nothing in it.
    Nothing,
}

impl Reads {
    /// The name Till reads that `folded` (a key through
    /// [`fold_key`]) matches, if any.
    fn name(self, folded: &str) -> Option<&'static str> {
        match self {
            Reads::Message => MESSAGE_KEYS.iter().copied().find(|n| *n == folded),
            Reads::Params => NAMED_TARGETS
                .iter()
                .map(|(_, _, key)| *key)
                .find(|n| *n == folded),
            Reads::Nothing => None,
        }
    }
}

/// Refuses, in the message objects and the objects directly inside them
/// (`params`, `result`, `error`), a key sent twice or two keys with the
/// same [`fold_key`], and a key that is a name Till reads only under that
/// fold (`Method`, `paramſ` with the long s): JSON parsers disagree on
/// which of two keys wins (last, first), and Go's `encoding/json` matches
/// keys to fields without regard to case, so the server could read a
/// method, tool or message kind Till never saw. Deeper objects (tool
/// arguments) are the server's business.
struct NoTwins {
    /// Objects around this value.
    objects: usize,
    reads: Reads,
}

impl<'de> DeserializeSeed<'de> for NoTwins {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for NoTwins {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("JSON")
    }
    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut s: A) -> Result<(), A::Error> {
        while s
            .next_element_seed(NoTwins {
                objects: self.objects,
                reads: self.reads,
            })?
            .is_some()
        {}
        Ok(())
    }
    fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<(), A::Error> {
        let mut seen: Vec<String> = Vec::new();
        while let Some(k) = m.next_key::<String>()? {
            if self.objects < 2 {
                let folded = fold_key(&k);
                if let Some(name) = self.reads.name(&folded)
                    && k != name
                {
                    return Err(serde::de::Error::custom(format!(
                        "the key {k:?} is not {name:?} but matches it without regard to case; MCP servers that match keys that way (Go's encoding/json) would read it as {name:?}, so Till refuses the message: spell it {name:?}"
                    )));
                }
                if seen.contains(&folded) {
                    return Err(serde::de::Error::custom(format!(
                        "the key {k:?} appears twice (or differs only in case from another key); MCP servers could read either one, so Till refuses the message: send each key once"
                    )));
                }
                // Laravel reads `_method` from a JSON body as the HTTP
                // method, which could turn the POST into a DELETE (the end
                // of a session) or anything else.
                if self.objects == 0 && folded == "_method" {
                    return Err(serde::de::Error::custom(format!(
                        "the message has a key {k:?}, which some frameworks (Laravel) read as the HTTP method instead of the request's; send the message without it"
                    )));
                }
                seen.push(folded);
                let reads = match (self.reads, k.as_str()) {
                    (Reads::Message, "params") => Reads::Params,
                    _ => Reads::Nothing,
                };
                m.next_value_seed(NoTwins {
                    objects: self.objects + 1,
                    reads,
                })?;
            } else {
                m.next_value::<IgnoredAny>()?;
            }
        }
        Ok(())
    }
}

/// Decodes an `Mcp-Name` header value: verbatim, or `=?base64?…?=` for
/// names that are not plain printable ASCII (the MCP specification's
/// encoding). `None` for a malformed encoded value, which then matches
/// nothing.
pub fn decode_header_value(v: &str) -> Option<String> {
    match v
        .strip_prefix("=?base64?")
        .and_then(|r| r.strip_suffix("?="))
    {
        Some(b64) => base64::decode(b64)
            .ok()
            .and_then(|b| String::from_utf8(b).ok()),
        None => Some(v.to_string()),
    }
}

/// Checks that the `Mcp-Method` and `Mcp-Name` request headers, when the
/// client sends them, say what the body says: an intermediary (or the MCP
/// server) routing on the headers must not see another method or tool than
/// the one Till authorized. A header with a batch, or `Mcp-Name` for a
/// method that names nothing, disagrees.
pub fn check_headers(
    body: &Body,
    method_header: Option<&str>,
    name_header: Option<&str>,
) -> Result<(), String> {
    if method_header.is_none() && name_header.is_none() {
        return Ok(());
    }
    let one = match body.messages.as_slice() {
        [m] if !body.batch => m,
        _ => {
            return Err(
                "the Mcp-Method or Mcp-Name header comes with a batch of messages; send them only with a single message".into(),
            );
        }
    };
    if let Some(h) = method_header
        && one.method.as_deref() != Some(h)
    {
        return Err(format!(
            "the Mcp-Method header ({h:?}) does not match the body's method ({:?})",
            one.method.as_deref().unwrap_or("")
        ));
    }
    if let Some(h) = name_header {
        let decoded = decode_header_value(h);
        if decoded.is_none() || decoded != one.name {
            return Err(format!(
                "the Mcp-Name header ({h:?}) does not match the name the body's {} names",
                one.method.as_deref().unwrap_or("message")
            ));
        }
    }
    Ok(())
}

/// The lists an MCP server answers with, the key naming each entry, and
/// the method an entry is then used with: what [`filter_lists`] narrows.
const LISTS: &[(&str, &str, &str)] = &[
    ("tools", "name", crate::token::vocab::TOOLS_CALL),
    ("prompts", "name", crate::token::vocab::PROMPTS_GET),
    ("resources", "uri", crate::token::vocab::RESOURCES_READ),
];

/// Narrows the `tools`, `prompts` and `resources` lists of the results in
/// one server message (a JSON-RPC response, or a batch of them) to the
/// entries `may(method, name)` accepts, `method` being the one that would
/// use the entry (`tools/call`, `prompts/get`, `resources/read`). Returns
/// whether the message holds such a list: the caller then sends the value
/// re-serialised even when nothing was removed, so a list a client could
/// read another way (a key twice) reaches it only as Till read it. An
/// entry without a string name (or `uri`) is removed: deny when unsure.
pub fn filter_lists(v: &mut Value, may: &mut dyn FnMut(&str, &str) -> bool) -> bool {
    match v {
        Value::Array(items) => {
            let mut found = false;
            for item in items {
                found |= filter_lists(item, may);
            }
            found
        }
        Value::Object(o) => {
            let Some(Value::Object(result)) = o.get_mut("result") else {
                return false;
            };
            let mut found = false;
            for (list, key, method) in LISTS {
                if let Some(Value::Array(entries)) = result.get_mut(*list) {
                    entries.retain(|e| {
                        e.get(*key)
                            .and_then(Value::as_str)
                            .is_some_and(|n| may(method, n))
                    });
                    found = true;
                }
            }
            found
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_tool_call_names_its_tool_and_housekeeping_names_none() {
        let b = parse(br#"{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"add","arguments":{"a":1}}}"#).unwrap();
        assert!(!b.batch);
        assert_eq!(b.messages[0].tool(), Some("add"));
        assert_eq!(b.messages[0].id, Some(json!(3)));
        let b = parse(br#"[{"jsonrpc":"2.0","method":"notifications/initialized"},{"jsonrpc":"2.0","id":"x","method":"tools/list"}]"#).unwrap();
        assert!(b.batch);
        assert_eq!(b.messages.len(), 2);
        assert!(b.messages.iter().all(|m| m.tool().is_none()));
        assert_eq!(b.messages[0].id, None);
        // A response the client sends back names no method.
        let b = parse(br#"{"jsonrpc":"2.0","id":1,"result":{}}"#).unwrap();
        assert_eq!(b.messages[0].facts(), McpMessage::none());
    }

    #[test]
    fn bodies_a_server_could_read_differently_are_refused() {
        for body in [
            // Two method keys: which one wins depends on the parser.
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/list","method":"tools/call","params":{"name":"x"}}"#,
            // Two names: Till would authorize one, Python calls the last.
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"add","name":"delete_everything"}}"#,
            // Go's encoding/json matches keys case-insensitively.
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"add","Name":"delete_everything"}}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","Method":"x","params":{"name":"add"}}"#,
            // Laravel reads `_method` from a JSON body as the HTTP method.
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/list","_method":"DELETE"}"#,
            r#"[{"jsonrpc":"2.0","id":1,"method":"tools/list","_METHOD":"DELETE"}]"#,
            // A tool call without a string name.
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":5}}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":["add"]}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":5}"#,
            r#"{"jsonrpc":"2.0","id":1}"#,
            r#"{"id":1,"method":"tools/list"}"#,
            r#"[]"#,
            r#""tools/call""#,
        ] {
            assert!(
                matches!(parse(body.as_bytes()), Err(ParseError::Invalid { .. })),
                "{body}: {:?}",
                parse(body.as_bytes())
            );
        }
        assert!(matches!(parse(b"{"), Err(ParseError::NotJson(_))));
        assert!(matches!(parse(b"\xff"), Err(ParseError::NotJson(_))));
        // So is `_method` inside the parameters.
        assert!(parse(br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"a","arguments":{"_method":"x"}}}"#).is_ok());
        // Keys that differ in case deep inside the arguments are the tool's.
        assert!(parse(br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"a","arguments":{"x":1,"X":2}}}"#).is_ok());
        // The id of an invalid message is kept for the error answer.
        assert_eq!(
            parse(br#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{}}"#),
            Err(ParseError::Invalid {
                id: Some(json!(7)),
                why: "tools/call needs a string \"params.name\"".into()
            })
        );
    }

    /// Regression: only keys sent twice (or twice up to `to_lowercase`)
    /// were refused, but Go's `encoding/json` matches keys to fields by
    /// Unicode case folding. A lone `Method` made Till see a response (free,
    /// unscoped) where such a server runs the tool call; `paramſ` (long s,
    /// which lowercasing leaves as is) made it read other params than the
    /// ones Till authorized.
    #[test]
    fn keys_a_server_matches_without_regard_to_case_are_refused() {
        for (body, key) in [
            (
                r#"{"jsonrpc":"2.0","id":10,"Method":"tools/call","params":{"name":"delete_everything"},"result":{}}"#,
                "method",
            ),
            (
                r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"add"},"param\u017f":{"name":"delete_everything"}}"#,
                "params",
            ),
            (
                "{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"tools/call\",\"params\":{\"name\":\"add\"},\"param\u{17f}\":{\"name\":\"delete_everything\"}}",
                "params",
            ),
            (
                r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","param\u017f":{"name":"delete_everything"},"params":{"name":"add"}}"#,
                "params",
            ),
            (r#"{"jsonrpc":"2.0","ID":1,"method":"tools/list"}"#, "id"),
            (
                r#"{"jsonrpc":"2.0","j\u017fonrpc":"1.0","id":1,"method":"tools/list"}"#,
                "jsonrpc",
            ),
            (
                r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"add"},"RESULT":{}}"#,
                "result",
            ),
            (
                r#"{"jsonrpc":"2.0","id":1,"method":"resources/read","params":{"URI":"res://secret/k"}}"#,
                "uri",
            ),
            (
                r#"[{"jsonrpc":"2.0","id":1,"method":"tools/list"},{"jsonrpc":"2.0","id":2,"Method":"tools/call","params":{"name":"x"},"error":{}}]"#,
                "method",
            ),
        ] {
            match parse(body.as_bytes()) {
                Err(ParseError::Invalid { why, .. }) => {
                    assert!(why.contains(&format!("{key:?}")), "{body}: {why}")
                }
                other => panic!("{body}: {other:?}"),
            }
        }
        // Two keys with one fold, neither of them a name Till reads: the
        // Kelvin sign folds to k.
        assert!(matches!(
            parse("{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"tools/list\",\"params\":{\"kind\":1,\"\u{212a}ind\":2}}".as_bytes()),
            Err(ParseError::Invalid { .. })
        ));
        // What Till does not read may use any case: keys of the MCP schema,
        // a result's contents, tool arguments, a lone long s.
        for body in [
            r#"{"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"c","version":"1"},"_meta":{"progressToken":1}}}"#,
            r#"{"jsonrpc":"2.0","id":1,"result":{"Name":"x","Method":"y"}}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"add","arguments":{"Method":1,"params":2,"Name":3}}}"#,
            "{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"tools/list\",\"params\":{\"\u{17f}\":1}}",
        ] {
            assert!(
                parse(body.as_bytes()).is_ok(),
                "{body}: {:?}",
                parse(body.as_bytes())
            );
        }
    }

    /// Regression (red team, wave 2, third pass): a method that differs
    /// from a scoped one only by case or surrounding spaces was a free,
    /// unscoped method to Till, and forwarded; a server that normalises
    /// method names ran `delete_everything`.
    #[test]
    fn methods_a_server_could_normalise_to_a_scoped_one_are_refused() {
        let body = |m: &str| {
            json!({"jsonrpc":"2.0","id":4,"method":m,"params":{"name":"delete_everything","uri":"res://secret/k"}})
                .to_string()
        };
        for (method, scoped) in [
            ("Tools/Call", "tools/call"),
            ("tools/call ", "tools/call"),
            ("TOOLS/CALL", "tools/call"),
            ("\ttools/call\n", "tools/call"),
            ("tools/call\u{a0}", "tools/call"),
            ("tools/call\u{0}", "tools/call"),
            ("Prompts/Get", "prompts/get"),
            (" resources/read", "resources/read"),
            ("re\u{17f}ources/read", "resources/read"),
            ("TOOLS/LIST", "tools/list"),
            ("prompts/list\r", "prompts/list"),
            ("Resources/List", "resources/list"),
        ] {
            match parse(body(method).as_bytes()) {
                Err(ParseError::Invalid { id, why }) => {
                    assert_eq!(id, Some(json!(4)), "{method:?}");
                    assert!(
                        why.contains(&format!("is not {scoped:?}")),
                        "{method:?}: {why}"
                    );
                }
                other => panic!("{method:?}: {other:?}"),
            }
        }
        // The exact methods, and methods that only look alike, pass.
        for method in [
            "tools/call",
            "prompts/get",
            "resources/read",
            "tools/list",
            "notifications/initialized",
            "tools/calls",
            "tools / call",
            "ping",
        ] {
            assert!(parse(body(method).as_bytes()).is_ok(), "{method:?}");
        }
    }

    #[test]
    fn headers_must_agree_with_the_body() {
        let call =
            parse(br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"add"}}"#)
                .unwrap();
        assert!(check_headers(&call, None, None).is_ok());
        assert!(check_headers(&call, Some("tools/call"), Some("add")).is_ok());
        assert!(check_headers(&call, Some("tools/list"), None).is_err());
        assert!(check_headers(&call, Some("tools/call"), Some("delete_everything")).is_err());
        // The base64 form of the specification.
        assert!(check_headers(&call, None, Some("=?base64?YWRk?=")).is_ok());
        assert!(check_headers(&call, None, Some("=?base64?!!?=")).is_err());
        let list = parse(br#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#).unwrap();
        assert!(check_headers(&list, Some("tools/list"), Some("add")).is_err());
        let batch = parse(br#"[{"jsonrpc":"2.0","id":1,"method":"tools/list"}]"#).unwrap();
        assert!(check_headers(&batch, Some("tools/list"), None).is_err());
    }

    #[test]
    fn tool_lists_keep_only_what_may_be_called() {
        let mut v = json!({"jsonrpc":"2.0","id":2,"result":{"tools":[
            {"name":"add"},{"name":"delete_everything"},{"title":"no name"}
        ],"nextCursor":"c"}});
        assert!(filter_lists(&mut v, &mut |m, n| m == "tools/call" && n == "add"));
        assert_eq!(v["result"]["tools"], json!([{"name":"add"}]));
        assert_eq!(v["result"]["nextCursor"], json!("c"));
        let mut other = json!({"jsonrpc":"2.0","id":3,"result":{"content":[]}});
        assert!(!filter_lists(&mut other, &mut |_, _| false));
        // A list is reported even when every tool stays.
        let mut all = json!([{"jsonrpc":"2.0","id":4,"result":{"tools":[{"name":"add"}]}}]);
        assert!(filter_lists(&mut all, &mut |_, _| true));
        // Prompts and resources, by name and by URI.
        let mut v = json!({"jsonrpc":"2.0","id":5,"result":{
            "prompts":[{"name":"greet"},{"name":"leak"}],
            "resources":[{"uri":"res://docs/a","name":"a"},{"uri":"res://secret/k","name":"k"}]}});
        assert!(filter_lists(&mut v, &mut |m, n| match m {
            "prompts/get" => n == "greet",
            "resources/read" => n.starts_with("res://docs/"),
            _ => false,
        }));
        assert_eq!(v["result"]["prompts"], json!([{"name":"greet"}]));
        assert_eq!(
            v["result"]["resources"],
            json!([{"uri":"res://docs/a","name":"a"}])
        );
    }
}
