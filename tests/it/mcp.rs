//! MCP servers behind Till, with the official MCP SDK on both sides: a
//! Streamable-HTTP server with three tools (tests/it/mcp/server.py) as the
//! upstream, and the SDK's client (tests/it/mcp/client.py) through the
//! proxy, in both the session-based protocol (`legacy`: initialize,
//! `Mcp-Session-Id`, event streams) and the newest one (`auto`: JSON
//! answers, `Mcp-Method` / `Mcp-Name` headers). Raw JSON-RPC requests cover
//! what a well-behaved client never sends.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use serde_json::{Value, json};
use till::token::Scope;

use crate::helpers::*;

const SERVER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/it/mcp/server.py");
const CLIENT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/it/mcp/client.py");
const INSTALL: &str = "python3 -m pip install mcp==2.3.0";

fn sdk_installed() -> bool {
    let ok = Command::new("python3")
        .args(["-c", "import mcp, uvicorn, httpx2"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        if std::env::var_os("CI").is_some() {
            panic!("the MCP SDK is required in CI: {INSTALL}");
        }
        eprintln!("\n******** SKIPPED: the mcp package is not installed ({INSTALL}) ********\n");
    }
    ok
}

/// The Python MCP server, on an ephemeral port; stopped on drop.
struct McpServer {
    child: Child,
    port: u16,
    /// One line per `delete_everything` call that reached the server.
    effects: PathBuf,
    _dir: tempfile::TempDir,
}

impl McpServer {
    fn start() -> McpServer {
        let dir = tempfile::tempdir().unwrap();
        let effects = dir.path().join("effects");
        let mut child = Command::new("python3")
            .arg(SERVER)
            .env("MCP_TEST_EFFECTS", &effects)
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 runs");
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        let port = line
            .trim()
            .strip_prefix("PORT ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("the MCP server did not start: {line:?}"));
        McpServer {
            child,
            port,
            effects,
            _dir: dir,
        }
    }

    /// How many `delete_everything` calls reached the server.
    fn deletions(&self) -> usize {
        std::fs::read_to_string(&self.effects)
            .unwrap_or_default()
            .lines()
            .count()
    }
}

impl Drop for McpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The proxy with the MCP server as upstream `tools` (`api = "mcp"`).
fn proxy(home: &Home, server: &McpServer) -> Proxy {
    let cfg = format!(
        "listen = \"127.0.0.1:0\"\nstate_dir = {:?}\npolicies = {:?}\n\
         [upstreams.tools]\nurl = \"http://127.0.0.1:{}\"\napi = \"mcp\"\n\
         credential = {{ env = \"TEST_OPENAI_KEY\" }}\n",
        home.path().to_str().unwrap(),
        policies_dir(),
        server.port,
    );
    let config = home.write("till.toml", &cfg);
    Proxy::start_config(home, &config).expect("proxy starts")
}

/// The official MCP client in one session, driven command by command.
struct McpClient {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl McpClient {
    fn start(proxy: &Proxy, token: &str, mode: &str) -> McpClient {
        let mut child = Command::new("python3")
            .args([CLIENT, &proxy.url("/tools/mcp"), token, mode])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("python3 runs");
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let mut c = McpClient {
            child,
            stdin,
            stdout,
        };
        let ready = c.read();
        assert!(ready.get("ready").is_some(), "{ready}");
        c
    }

    fn read(&mut self) -> Value {
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap_or_else(|_| panic!("client said {line:?}"))
    }

    fn send(&mut self, cmd: &str) -> Value {
        writeln!(self.stdin, "{cmd}").unwrap();
        self.read()
    }

    fn list(&mut self) -> Vec<String> {
        let v = self.send("list");
        serde_json::from_value(v["tools"].clone()).unwrap_or_else(|_| panic!("{v}"))
    }

    fn call(&mut self, tool: &str, args: Value) -> Value {
        self.send(&format!("call {tool} {args}"))
    }
}

impl Drop for McpClient {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "quit");
        let _ = self.child.wait();
    }
}

fn tools_token(home: &Home, tools: &[&str], max_uses: Option<u64>) -> String {
    home.issue(Scope {
        services: vec!["tools".into()],
        tools: tools.iter().map(|t| t.to_string()).collect(),
        max_uses,
        label: Some("mcp-agent".into()),
        ..Scope::default()
    })
}

const MODES: [&str; 2] = ["legacy", "auto"];

#[test]
fn a_token_with_one_tool_lists_and_calls_only_that_tool() {
    if !sdk_installed() {
        return;
    }
    let server = McpServer::start();
    let home = Home::new();
    let proxy = proxy(&home, &server);
    let token = tools_token(&home, &["add"], None);
    for mode in MODES {
        let mut c = McpClient::start(&proxy, &token, mode);
        assert_eq!(c.list(), ["add"], "{mode}");
        assert_eq!(c.call("add", json!({"a": 1, "b": 2}))["ok"], json!(["3"]));
        let denied = c.call("delete_everything", json!({}));
        let e = &denied["error"];
        assert_eq!(e["code"], -32001, "{mode}: {denied}");
        assert_eq!(e["data"]["till_code"], "out_of_scope", "{denied}");
        let msg = e["message"].as_str().unwrap();
        assert!(msg.contains("only allows the MCP tool \"add\""), "{msg}");
        // The session goes on after a denial.
        assert_eq!(c.call("add", json!({"a": 2, "b": 2}))["ok"], json!(["4"]));
    }
    assert_eq!(server.deletions(), 0, "a denied call reached the server");

    // A token for every tool lists all three.
    let all = tools_token(&home, &[], None);
    let mut c = McpClient::start(&proxy, &all, "legacy");
    let mut listed = c.list();
    listed.sort();
    assert_eq!(listed, ["add", "delete_everything", "echo"]);
    drop(c);

    // The audit line names the tool of every call, allowed or denied.
    // The audit writer batches its lines: wait for them.
    let (mut audit, mut calls) = (String::new(), Vec::new());
    let has = |calls: &[Value], tool: &str, decision: &str| {
        calls
            .iter()
            .any(|v| v["tool"] == tool && v["decision"] == decision)
    };
    for _ in 0..100 {
        audit = std::fs::read_to_string(home.path().join("audit.jsonl")).unwrap_or_default();
        calls = audit
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .filter(|v| v["mcp_method"] == "tools/call")
            .collect();
        if has(&calls, "delete_everything", "deny") && has(&calls, "add", "allow") {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(has(&calls, "delete_everything", "deny"), "{audit}");
    assert!(has(&calls, "add", "allow"), "{audit}");
    assert!(!audit.contains(&token[..40]), "a token in the audit log");
}

#[test]
fn a_three_use_token_gets_three_tool_calls_and_housekeeping_is_free() {
    if !sdk_installed() {
        return;
    }
    let server = McpServer::start();
    let home = Home::new();
    let proxy = proxy(&home, &server);
    for mode in MODES {
        let token = tools_token(&home, &[], Some(3));
        let mut c = McpClient::start(&proxy, &token, mode);
        for _ in 0..5 {
            assert_eq!(c.list().len(), 3, "tools/list spends nothing");
        }
        for i in 0..3 {
            let r = c.call("echo", json!({"text": format!("hi {i}")}));
            assert_eq!(r["ok"], json!([format!("hi {i}")]), "{mode} call {i}: {r}");
        }
        let r = c.call("echo", json!({"text": "one too many"}));
        assert_eq!(r["error"]["code"], -32002, "{mode}: {r}");
        assert_eq!(r["error"]["data"]["till_code"], "activations_exhausted");
        // Used up, it may still list what it can no longer call.
        assert_eq!(c.list().len(), 3);
    }
}

#[test]
fn a_child_has_fewer_tools_than_its_parent_and_spends_the_parents_uses() {
    if !sdk_installed() {
        return;
    }
    let server = McpServer::start();
    let home = Home::new();
    let proxy = proxy(&home, &server);
    let parent = tools_token(&home, &["add", "echo"], Some(2));
    let kid = child(
        &parent,
        Scope {
            tools: vec!["echo".into()],
            ..Scope::default()
        },
    );
    // Naming a tool the parent lacks widens nothing: the child gets the
    // intersection, here no tool at all.
    let wider = child(
        &parent,
        Scope {
            tools: vec!["delete_everything".into()],
            ..Scope::default()
        },
    );
    let mut p = McpClient::start(&proxy, &parent, "legacy");
    let mut k = McpClient::start(&proxy, &kid, "legacy");
    let mut w = McpClient::start(&proxy, &wider, "legacy");
    let mut listed = p.list();
    listed.sort();
    assert_eq!(listed, ["add", "echo"]);
    assert_eq!(k.list(), ["echo"]);
    assert!(w.list().is_empty());
    assert_eq!(
        k.call("add", json!({"a": 1, "b": 1}))["error"]["code"],
        -32001
    );
    assert_eq!(
        w.call("delete_everything", json!({}))["error"]["code"],
        -32001
    );
    assert_eq!(k.call("echo", json!({"text": "k"}))["ok"], json!(["k"]));
    // The child's call spent one of the parent's two uses.
    assert_eq!(p.call("add", json!({"a": 1, "b": 1}))["ok"], json!(["2"]));
    assert_eq!(
        k.call("echo", json!({"text": "k"}))["error"]["code"],
        -32002
    );
    assert_eq!(
        p.call("add", json!({"a": 1, "b": 1}))["error"]["code"],
        -32002
    );
    assert_eq!(server.deletions(), 0);
}

#[test]
fn revocation_mid_session_answers_the_next_call_with_an_error() {
    if !sdk_installed() {
        return;
    }
    let server = McpServer::start();
    let home = Home::new();
    let proxy = proxy(&home, &server);
    let token = tools_token(&home, &["add"], None);
    let mut c = McpClient::start(&proxy, &token, "legacy");
    assert_eq!(c.call("add", json!({"a": 1, "b": 2}))["ok"], json!(["3"]));
    till(["revoke", &token, "--url", &proxy.url("")])
        .home(&home)
        .env("TILL_ADMIN_TOKEN", &home.admin())
        .run()
        .success();
    let r = c.call("add", json!({"a": 1, "b": 2}));
    assert_eq!(r["error"]["code"], -32004, "{r}");
    assert_eq!(r["error"]["data"]["till_code"], "token_revoked");
    assert!(
        r["error"]["message"].as_str().unwrap().contains("revoked"),
        "{r}"
    );
    // Housekeeping is refused too: the key is dead.
    assert!(c.send("list").get("error").is_some());
}

// ---------------------------------------------------------------------------
// Raw JSON-RPC: what the SDK never sends.

/// A tools/call in the newest protocol, which needs no session.
fn call_body(id: u64, tool: &str) -> Value {
    json!({
        "jsonrpc": "2.0", "id": id, "method": "tools/call",
        "params": {"name": tool, "arguments": {}, "_meta": meta()},
    })
}

fn meta() -> Value {
    json!({
        "io.modelcontextprotocol/protocolVersion": "2026-07-28",
        "io.modelcontextprotocol/clientCapabilities": {},
    })
}

fn at(proxy: &Proxy) -> ProxyAt {
    ProxyAt(proxy.url(""))
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_tool_calls_never_exceed_the_limit() {
    if !sdk_installed() {
        return;
    }
    let server = McpServer::start();
    let home = Home::new();
    let proxy = proxy(&home, &server);
    let parent = tools_token(&home, &[], Some(3));
    let kids: Vec<String> = (0..4).map(|_| child(&parent, limit(100))).collect();
    let body = call_body(1, "delete_everything").to_string();
    let hdrs = [
        ("mcp-method", "tools/call"),
        ("mcp-name", "delete_everything"),
    ];
    let tasks: Vec<_> = (0..16)
        .map(|i| {
            let (t, b) = (kids[i % 4].clone(), body.clone());
            let url = proxy.url("");
            tokio::spawn(async move {
                let p = ProxyAt(url);
                p.post(&t, &b, &hdrs).await
            })
        })
        .collect();
    let mut ok = 0;
    for t in tasks {
        let (s, v) = t.await.unwrap();
        assert_eq!(s, 200, "{v}");
        if v.get("result").is_some() {
            ok += 1;
        } else {
            assert_eq!(v["error"]["code"], -32002, "{v}");
            assert_eq!(v["id"], 1, "{v}");
        }
    }
    assert_eq!(
        ok, 3,
        "children together spent more than the parent's 3 uses"
    );
    assert_eq!(server.deletions(), 3);
}

/// Raw requests to the proxy's `tools` upstream.
struct ProxyAt(String);

impl ProxyAt {
    async fn post(&self, token: &str, body: &str, headers: &[(&str, &str)]) -> (u16, Value) {
        let mut req = client()
            .post(format!("{}/tools/mcp", self.0))
            .bearer_auth(token)
            .header("content-type", "application/json")
            .header("accept", "application/json, text/event-stream")
            .header("mcp-protocol-version", "2026-07-28")
            .body(body.to_string());
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        let v = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, v)
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn smuggled_tool_names_are_refused_before_the_server() {
    if !sdk_installed() {
        return;
    }
    let server = McpServer::start();
    let home = Home::new();
    let proxy = proxy(&home, &server);
    let add_only = tools_token(&home, &["add"], None);
    let all = tools_token(&home, &[], None);

    // Headers that name another tool than the body.
    let b = call_body(5, "delete_everything").to_string();
    let (s, v) = at(&proxy)
        .post(
            &all,
            &b,
            &[("mcp-method", "tools/call"), ("mcp-name", "add")],
        )
        .await;
    assert_eq!(
        (s, &v["error"]["code"], &v["id"]),
        (400, &json!(-32020), &json!(5)),
        "{v}"
    );
    let (s, v) = at(&proxy)
        .post(&all, &b, &[("mcp-method", "tools/list")])
        .await;
    assert_eq!((s, &v["error"]["code"]), (400, &json!(-32020)), "{v}");

    // The name twice, or in another case: servers disagree on which wins.
    for body in [
        r#"{"jsonrpc":"2.0","id":6,"method":"tools/call","params":{"name":"add","name":"delete_everything","arguments":{}}}"#,
        r#"{"jsonrpc":"2.0","id":6,"method":"tools/call","params":{"name":"add","Name":"delete_everything","arguments":{}}}"#,
    ] {
        let (s, v) = at(&proxy).post(&add_only, body, &[]).await;
        assert_eq!((s, &v["error"]["code"]), (400, &json!(-32600)), "{v}");
    }
    let (s, v) = at(&proxy).post(&add_only, "{not json", &[]).await;
    assert_eq!(
        (s, &v["error"]["code"], &v["id"]),
        (400, &json!(-32700), &Value::Null),
        "{v}"
    );

    // A batch with one denied call: nothing of it is sent, each request
    // gets an error with its own id.
    let batch = json!([call_body(7, "add"), call_body(8, "delete_everything")]).to_string();
    let (s, v) = at(&proxy).post(&add_only, &batch, &[]).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v[0]["id"], 7, "{v}");
    assert_eq!(v[0]["error"]["code"], -32006, "{v}");
    assert_eq!(v[1]["id"], 8, "{v}");
    assert_eq!(v[1]["error"]["code"], -32001, "{v}");

    // No token: 401, which MCP clients read as "authenticate".
    let resp = client()
        .post(proxy.url("/tools/mcp"))
        .header("content-type", "application/json")
        .body(call_body(9, "add").to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 401);
    let v: Value = serde_json::from_str(&resp.text().await.unwrap()).unwrap();
    assert_eq!(v["error"]["code"], -32010, "{v}");
    assert_eq!(server.deletions(), 0);
}

/// A batch is sent whole or not at all, so a batch refused part-way
/// through its spending (a full rate window or concurrency cap at its k-th
/// call) gives back the uses its earlier calls took: a refusal the answer
/// calls retryable must not cost anything.
#[tokio::test(flavor = "multi_thread")]
async fn a_batch_refused_by_its_window_or_cap_spends_no_use() {
    if !sdk_installed() {
        return;
    }
    let server = McpServer::start();
    let home = Home::new();
    let proxy = proxy(&home, &server);
    // One call, with the headers the server checks in the newest protocol.
    async fn one(proxy: &Proxy, token: &str, id: u64) -> (u16, Value) {
        let hdrs = [
            ("mcp-method", "tools/call"),
            ("mcp-name", "delete_everything"),
        ];
        let body = call_body(id, "delete_everything").to_string();
        at(proxy).post(token, &body, &hdrs).await
    }
    let batch = |n: u64| {
        Value::Array((1..=n).map(|i| call_body(i, "delete_everything")).collect()).to_string()
    };

    // Three uses, two calls an hour: a batch of three fills the window at
    // its third call.
    let windowed = home.issue(Scope {
        services: vec!["tools".into()],
        max_uses: Some(3),
        rates: vec![till::token::vocab::Rate {
            limit: 2,
            seconds: 3600,
        }],
        ..Scope::default()
    });
    for _ in 0..3 {
        let (s, v) = at(&proxy).post(&windowed, &batch(3), &[]).await;
        assert_eq!(s, 429, "{v}");
        assert_eq!(v[0]["error"]["data"]["till_code"], "rate_limited", "{v}");
    }
    assert_eq!(server.deletions(), 0);
    // All three uses are left: the window, not the budget, stops the third
    // call. (The SDK's server takes no batches, hence single calls.)
    for id in 1..=2 {
        let (s, v) = one(&proxy, &windowed, id).await;
        assert_eq!(s, 200, "{v}");
        assert!(
            v.get("result").is_some(),
            "the refused batches spent the uses of their first calls: {v}"
        );
    }
    let (s, v) = one(&proxy, &windowed, 3).await;
    assert_eq!(s, 429, "{v}");
    assert_eq!(v["error"]["data"]["till_code"], "rate_limited", "{v}");
    assert_eq!(server.deletions(), 2);

    // Two uses, one call at a time: a batch of two never fits, and
    // leaves both uses to single calls.
    let capped = home.issue(Scope {
        services: vec!["tools".into()],
        max_uses: Some(2),
        concurrency: Some(1),
        ..Scope::default()
    });
    for _ in 0..3 {
        let (s, v) = at(&proxy).post(&capped, &batch(2), &[]).await;
        assert_eq!(s, 429, "{v}");
    }
    for id in 1..=2 {
        let (s, v) = one(&proxy, &capped, id).await;
        assert_eq!(s, 200, "{v}");
        assert!(
            v.get("result").is_some(),
            "the refused batches spent the use of their first call: {v}"
        );
    }
    assert_eq!(server.deletions(), 4);
}

/// The proxy with the recording test upstream as the MCP server `tools`:
/// every request that gets past Till is seen.
fn recording_proxy(home: &Home, up: &Upstream) -> Proxy {
    let extra = format!(
        "[upstreams.tools]\nurl = {:?}\napi = \"mcp\"\ncredential = {{ env = \"TEST_OPENAI_KEY\" }}\n",
        up.url()
    );
    Proxy::start(home, &[], &extra)
}

/// Regression: a lone key that Go's encoding/json matches to a JSON-RPC
/// member only without regard to case passed Till: `Method` made a tool
/// call look like a free response to Till (even on a spent token), and
/// `paramſ` (long s, U+017F) carried another tool than the one Till
/// authorized. Such a body is refused, spends nothing and never reaches
/// the server.
#[tokio::test(flavor = "multi_thread")]
async fn keys_a_server_reads_without_regard_to_case_are_refused_before_it() {
    let up = Upstream::start().await;
    let home = Home::new();
    let proxy = recording_proxy(&home, &up);
    let add_once = tools_token(&home, &["add"], Some(1));
    let method_as_response = r#"{"jsonrpc":"2.0","id":10,"Method":"tools/call","params":{"name":"delete_everything"},"result":{}}"#;
    let bodies = [
        method_as_response,
        r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"add"},"param\u017f":{"name":"delete_everything"}}"#,
        "{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"tools/call\",\"params\":{\"name\":\"add\"},\"param\u{17f}\":{\"name\":\"delete_everything\"}}",
    ];
    for body in bodies {
        let (s, v) = at(&proxy).post(&add_once, body, &[]).await;
        assert_eq!(
            (s, &v["error"]["code"]),
            (400, &json!(-32600)),
            "{body}: {v}"
        );
    }
    assert_eq!(up.count(), 0, "a refused body reached the server");

    // Nothing was spent: the token's one use is still there.
    let call = call_body(2, "add").to_string();
    let (s, v) = at(&proxy).post(&add_once, &call, &[]).await;
    assert_eq!((s, &v["path"]), (200, &json!("/mcp")), "{v}");
    let (s, v) = at(&proxy).post(&add_once, &call, &[]).await;
    assert_eq!((s, &v["error"]["code"]), (200, &json!(-32002)), "{v}");
    // A spent token is refused such a body too, not waved through as a
    // response.
    let (s, v) = at(&proxy).post(&add_once, method_as_response, &[]).await;
    assert_eq!((s, &v["error"]["code"]), (400, &json!(-32600)), "{v}");
    assert_eq!(up.count(), 1);
}

/// Regression (red team, wave 2, third pass): a JSON-RPC method that
/// differs from `tools/call` (or another method Till scopes) only by case
/// or surrounding spaces was free and unscoped to Till, and forwarded with
/// `params.name: "delete_everything"`; a server that normalises method
/// names runs that tool. Refused (-32600, the request's id), before the
/// server, nothing spent, whatever the token's state.
#[tokio::test(flavor = "multi_thread")]
async fn methods_a_server_could_normalise_to_a_scoped_one_are_refused_before_it() {
    let up = Upstream::start().await;
    let home = Home::new();
    let proxy = recording_proxy(&home, &up);
    let add_once = tools_token(&home, &["add"], Some(1));
    let body = |id: u64, method: &str| {
        json!({"jsonrpc":"2.0","id":id,"method":method,"params":{"name":"delete_everything","arguments":{}}})
            .to_string()
    };
    let near = [
        "Tools/Call",
        "tools/call ",
        "TOOLS/CALL",
        "Prompts/Get",
        "Tools/List",
    ];
    for (id, method) in (20..).zip(near) {
        let (s, v) = at(&proxy).post(&add_once, &body(id, method), &[]).await;
        assert_eq!(
            (s, &v["error"]["code"], &v["id"]),
            (400, &json!(-32600), &json!(id)),
            "{method:?}: {v}"
        );
    }
    assert_eq!(up.count(), 0, "a refused method reached the server");

    // Nothing was spent: the token's one use is still there.
    let (s, v) = at(&proxy)
        .post(&add_once, &call_body(2, "add").to_string(), &[])
        .await;
    assert_eq!((s, &v["path"]), (200, &json!("/mcp")), "{v}");
    // Spent, the token is refused such a body the same way.
    let (s, v) = at(&proxy)
        .post(&add_once, &body(30, "Tools/Call"), &[])
        .await;
    assert_eq!((s, &v["error"]["code"]), (400, &json!(-32600)), "{v}");
    assert_eq!(up.count(), 1);
}

/// Sends `method /tools/mcp` with `token` and `rest` (the framing headers,
/// the blank line and the body) exactly as given, on a connection of its
/// own; returns the status and the body of the answer.
async fn raw_with_body(proxy: &Proxy, method: &str, token: &str, rest: &str) -> (u16, String) {
    let req = format!(
        "{method} /tools/mcp HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\
         authorization: Bearer {token}\r\ncontent-type: application/json\r\n{rest}"
    );
    raw_send(proxy.addr, &req).await
}

/// Regression: a GET or DELETE was forwarded with whatever body it had,
/// unread, so a tools/call sent in a GET reached the server unscoped and
/// uncounted.
#[tokio::test(flavor = "multi_thread")]
async fn a_get_or_delete_with_a_body_is_refused_before_the_server() {
    let up = Upstream::start().await;
    let home = Home::new();
    let proxy = recording_proxy(&home, &up);
    let safe_once = tools_token(&home, &["safe_tool"], Some(1));
    let evil = call_body(1, "evil_tool").to_string();
    for method in ["GET", "DELETE"] {
        // With a Content-Length, and chunked.
        for framing in [
            format!("content-length: {}\r\n\r\n{evil}", evil.len()),
            format!(
                "transfer-encoding: chunked\r\n\r\n{:x}\r\n{evil}\r\n0\r\n\r\n",
                evil.len()
            ),
        ] {
            let (status, body) = raw_with_body(&proxy, method, &safe_once, &framing).await;
            let v: Value = serde_json::from_str(&body).unwrap_or(Value::String(body));
            assert_eq!(
                (status, &v["error"]["code"]),
                (400, &json!(-32600)),
                "{method} {framing}: {v}"
            );
            assert!(v.to_string().contains("POST"), "{v}");
        }
    }
    assert_eq!(up.count(), 0, "a GET or DELETE body reached the server");

    // Without a body they pass as before, and spend nothing.
    for method in [reqwest::Method::GET, reqwest::Method::DELETE] {
        let resp = client()
            .request(method.clone(), proxy.url("/tools/mcp"))
            .bearer_auth(&safe_once)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 200, "{method}");
    }
    assert_eq!(up.count(), 2);
    let call = call_body(2, "safe_tool").to_string();
    let (s, v) = at(&proxy).post(&safe_once, &call, &[]).await;
    assert_eq!((s, &v["path"]), (200, &json!("/mcp")), "{v}");
}

/// Red team, wave 2 (third pass): MCP housekeeping spends no use, and it
/// was forwarded to any path of the server, so a tool-scoped token, even a
/// used-up one, sent uncounted GETs, DELETEs and JSON-RPC POSTs with the
/// credential to the server's other routes (`/api/admin/export`).
#[tokio::test(flavor = "multi_thread")]
async fn regression_requests_off_the_mcp_endpoint_are_refused() {
    let up = Upstream::start().await;
    let home = Home::new();
    let proxy = recording_proxy(&home, &up);
    let add_once = tools_token(&home, &["add"], Some(1));
    let ping = r#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#;
    let call = call_body(2, "add").to_string();
    let send = |method: reqwest::Method, path: &str, body: Option<&str>| {
        let mut r = client()
            .request(method, proxy.url(&format!("/tools{path}")))
            .bearer_auth(&add_once);
        if let Some(b) = body {
            r = r
                .header("content-type", "application/json")
                .body(b.to_string());
        }
        async move {
            let resp = r.send().await.unwrap();
            let status = resp.status().as_u16();
            let text = resp.text().await.unwrap_or_default();
            (
                status,
                serde_json::from_str::<Value>(&text).unwrap_or(Value::Null),
            )
        }
    };
    use reqwest::Method as M;
    let off = [
        (M::GET, "/api/admin/export", None),
        (M::DELETE, "/api/users/1", None),
        (M::POST, "/api/admin/delete_all", Some(ping)),
        (M::POST, "/", Some(ping)),
        (M::POST, "/mcpadmin", Some(ping)),
        (M::POST, "/mcp/x", Some(call.as_str())),
    ];
    // Before and after the one use is spent.
    for round in 0..2 {
        for (method, path, body) in off.clone() {
            let (s, v) = send(method.clone(), path, body).await;
            assert_eq!(
                (s, &v["error"]["code"]),
                (400, &json!(-32600)),
                "{method} {path}: {v}"
            );
            assert!(v.to_string().contains("endpoint"), "{v}");
        }
        assert_eq!(
            up.count(),
            round,
            "nothing off the endpoint reached the server"
        );
        if round == 0 {
            // The endpoint itself, with or without the trailing slash.
            let (s, v) = send(M::POST, "/mcp/", Some(&call)).await;
            assert_eq!((s, &v["path"]), (200, &json!("/mcp/")), "{v}");
        }
    }
}

/// `endpoint` names a server's endpoint path other than `/mcp`.
#[tokio::test(flavor = "multi_thread")]
async fn an_mcp_servers_endpoint_path_is_configured() {
    let up = Upstream::start().await;
    let home = Home::new();
    let extra = format!(
        "[upstreams.tools]\nurl = {:?}\napi = \"mcp\"\nendpoint = \"/\"\ncredential = {{ env = \"TEST_OPENAI_KEY\" }}\n",
        up.url()
    );
    let proxy = Proxy::start(&home, &[], &extra);
    let token = tools_token(&home, &["add"], Some(5));
    let call = call_body(1, "add").to_string();
    for (path, status) in [("/", 200), ("/mcp", 400)] {
        let r = client()
            .post(proxy.url(&format!("/tools{path}")))
            .bearer_auth(&token)
            .header("content-type", "application/json")
            .body(call.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), status, "{path}");
    }
    assert_eq!(up.count(), 1);
}

/// Regression: a message body with `Content-Encoding: gzip` was parsed as
/// sent and forwarded with its coding, so a server that decodes request
/// bodies ran messages Till never read. Refused (415) before the server,
/// spending nothing.
#[tokio::test(flavor = "multi_thread")]
async fn a_compressed_message_body_is_refused_before_the_server() {
    let up = Upstream::start().await;
    let home = Home::new();
    let proxy = recording_proxy(&home, &up);
    let add_once = tools_token(&home, &["add"], Some(1));
    let call = call_body(1, "add").to_string();
    for coding in ["gzip", "identity, deflate"] {
        let (s, v) = at(&proxy)
            .post(&add_once, &call, &[("content-encoding", coding)])
            .await;
        assert_eq!((s, &v["error"]["code"]), (415, &json!(-32600)), "{v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("send the body uncompressed"),
            "{v}"
        );
    }
    assert_eq!(up.count(), 0, "a compressed body reached the server");
    // Nothing was spent: the token's one use is still there.
    let (s, v) = at(&proxy).post(&add_once, &call, &[]).await;
    assert_eq!((s, &v["path"]), (200, &json!("/mcp")), "{v}");
}

#[test]
fn the_cli_issues_inspects_narrows_and_verifies_tool_scopes() {
    let home = Home::new();
    let parent = till([
        "issue",
        "--service",
        "github-mcp",
        "--tool",
        "github_*",
        "--tool",
        "search",
        "--max-uses",
        "10",
    ])
    .home(&home)
    .run()
    .success()
    .out();
    let parent = parent.trim();
    let kid = till(["attenuate", "--tool", "github_get_*"])
        .home(&home)
        .stdin(parent)
        .run()
        .success()
        .out();
    let kid = kid.trim();
    till(["inspect"])
        .home(&home)
        .stdin(kid)
        .run()
        .success()
        .stdout_has(r#"MCP tools: "github_*", "search""#)
        .stdout_has(r#"MCP tools: "github_get_*""#);
    let verify = |args: &[&str]| {
        let mut a = vec!["verify", "--service", "github-mcp", "--method", "POST"];
        a.extend_from_slice(args);
        till(a).home(&home).stdin(kid).run()
    };
    verify(&["--tool", "github_get_repo"]).success();
    verify(&["--tool", "search"])
        .code(1)
        .stdout_has(r#"only allows the MCP tool "github_get_*""#);
    verify(&["--mcp-method", "tools/list"]).success();
    // A tools key is an MCP key: plain HTTP requests fail its check.
    verify(&[]).code(1);
    // Patterns are names or trailing prefixes, nothing else.
    for bad in ["*", "a*b", "has space"] {
        till(["issue", "--service", "x", "--tool", bad])
            .home(&home)
            .run()
            .code(2)
            .stderr_has("--tool");
    }
    // A child naming only tools its parent lacks is told so.
    till(["attenuate", "--tool", "delete_everything"])
        .home(&home)
        .stdin(parent)
        .run()
        .success()
        .stderr_has("the new token can use no MCP tool: no tool passes every block");
}

#[test]
fn prompts_and_resources_are_scoped_and_listed_like_tools() {
    if !sdk_installed() {
        return;
    }
    let server = McpServer::start();
    let home = Home::new();
    let proxy = proxy(&home, &server);
    let token = home.issue(Scope {
        services: vec!["tools".into()],
        prompts: vec!["greet".into()],
        resources: vec!["res://docs/".into()],
        max_uses: Some(1),
        ..Scope::default()
    });
    for mode in MODES {
        let mut c = McpClient::start(&proxy, &token, mode);
        assert_eq!(c.send("prompts")["prompts"], json!(["greet"]), "{mode}");
        assert_eq!(
            c.send("resources")["resources"],
            json!(["res://docs/readme"]),
            "{mode}"
        );
        let r = c.send("prompt greet {\"name\": \"Till\"}");
        assert_eq!(r["ok"], json!(["Hello Till"]), "{mode}: {r}");
        let r = c.send("prompt leak {}");
        assert_eq!(r["error"]["code"], -32001, "{mode}: {r}");
        assert!(r.to_string().contains("MCP prompt \\\"greet\\\""), "{r}");
        assert_eq!(c.send("read res://docs/readme")["ok"], json!(["read me"]));
        let r = c.send("read res://secret/key");
        assert_eq!(r["error"]["code"], -32001, "{mode}: {r}");
        assert!(!r.to_string().contains("hunter2"), "{r}");
        // Prompts and resources spend nothing; tools stay unrestricted
        // (no --tool), and the one use goes to the first call.
        assert_eq!(c.list().len(), 3);
    }
    let mut c = McpClient::start(&proxy, &token, "auto");
    assert_eq!(c.call("add", json!({"a": 1, "b": 1}))["ok"], json!(["2"]));
    assert_eq!(
        c.call("add", json!({"a": 1, "b": 1}))["error"]["code"],
        -32002
    );
    assert_eq!(c.send("read res://docs/readme")["ok"], json!(["read me"]));
}
