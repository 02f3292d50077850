//! `multipart/*` bodies: a `_method` part never reaches the upstream in a
//! complete body (refused before anything is spent when it comes within
//! `max_body_bytes`, the upstream request cut off when it comes later), a
//! `model` part is judged like a JSON body's `model`, and large uploads
//! still stream through whole.

use std::time::Duration;

use till::token::Scope;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::helpers::*;

const CT: &str = "multipart/form-data; boundary=XB";

/// A multipart body of `(head, data)` parts, boundary `XB`.
fn body(parts: &[(&str, &str)]) -> String {
    let mut b = String::new();
    for (head, data) in parts {
        b.push_str(&format!("--XB\r\n{head}\r\n\r\n{data}\r\n"));
    }
    b.push_str("--XB--\r\n");
    b
}

fn named(name: &str) -> String {
    format!("Content-Disposition: form-data; name={name}")
}

fn file(name: &str) -> String {
    format!(
        "Content-Disposition: form-data; name=\"{name}\"; filename=\"speech.mp3\"\r\nContent-Type: application/octet-stream"
    )
}

async fn post(
    proxy: &Proxy,
    token: &str,
    path: &str,
    content_type: &str,
    body: impl Into<reqwest::Body>,
) -> (u16, serde_json::Value) {
    let r = client()
        .post(proxy.url(path))
        .bearer_auth(token)
        .header("content-type", content_type)
        .body(body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or_default())
}

/// Sends the head (declaring `len` bytes) and `sent`, then waits for an
/// answer without sending the rest: the proxy reads all that was sent, so
/// its answer is not lost to a reset.
async fn head_then_stall(proxy: &Proxy, token: &str, len: usize, sent: &[u8]) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let head = format!(
        "POST /openai/v1/audio/transcriptions HTTP/1.1\r\nhost: 127.0.0.1\r\nauthorization: Bearer {token}\r\ncontent-type: {CT}\r\ncontent-length: {len}\r\n\r\n"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(sent).await.unwrap();
    let mut got = Vec::new();
    let mut buf = vec![0u8; 8192];
    // An answer ends with its JSON body; a hang (the old path) ends the
    // wait with no status.
    let read = async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
            let text = String::from_utf8_lossy(&got).to_ascii_lowercase();
            let Some((head, rest)) = text.split_once("\r\n\r\n") else {
                continue;
            };
            let length = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|n| n.trim().parse::<usize>().ok());
            if length.is_some_and(|n| rest.len() >= n) || rest.ends_with("0\r\n\r\n") {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(20), read).await;
    let text = String::from_utf8_lossy(&got).to_string();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, text)
}

/// Regression (documented gap until wave 2, fourth pass): a `_method` part
/// in a multipart body reached the upstream unread, and Rack, Laravel and
/// Symfony run it as the method of the POST. Now refused with the form
/// body's 400, however the name is spelt, before anything is spent.
#[tokio::test(flavor = "multi_thread")]
async fn regression_a_method_override_part_is_refused_before_anything_is_spent() {
    let up = Upstream::start().await;
    let home = Home::new();
    let proxy = Proxy::start(&home, &[openai(&up)], "");
    let token = home.token("openai", Some(2));
    let path = "/openai/v1/files";
    let purpose = named("\"purpose\"");
    for (content_type, b) in [
        (
            CT,
            body(&[(&purpose, "x"), (&named("\"_method\""), "DELETE")]),
        ),
        (CT, body(&[(&named("_method"), "DELETE")])),
        (CT, body(&[(&named("\"_METHOD\""), "DELETE")])),
        (CT, body(&[(&named("\"%5Fmethod\""), "DELETE")])),
        (CT, body(&[(&named("\"_method[]\""), "DELETE")])),
        // PHP registers `.method` as `_method`.
        (CT, body(&[(&named("\".method\""), "DELETE")])),
        (
            CT,
            body(&[(&format!("{purpose}; name=\"_method\""), "DELETE")]),
        ),
        // Rack reads every multipart type for form fields.
        (
            "multipart/mixed; boundary=XB",
            body(&[(&named("\"_method\""), "DELETE")]),
        ),
        (
            "Multipart/Form-Data; boundary=\"XB\"",
            body(&[(&named("\"_method\""), "DELETE")]),
        ),
    ] {
        let (status, v) = post(&proxy, &token, path, content_type, b.clone()).await;
        assert_eq!(status, 400, "{b:?}: {v}");
        assert_eq!(v["error"]["code"], "bad_request", "{v}");
        assert!(
            v["error"]["message"].as_str().unwrap().contains("_method"),
            "{v}"
        );
    }
    // What some parser could read otherwise is refused too (deny when
    // unsure): an RFC 2231 name, a bare LF before a boundary (PHP splits
    // there), no boundary (Rack then parses the body as a URL-encoded
    // form), two boundaries in the Content-Type.
    for (content_type, b) in [
        (
            CT,
            body(&[(
                "Content-Disposition: form-data; name*=UTF-8''%5Fmethod",
                "DELETE",
            )]),
        ),
        (
            CT,
            format!(
                "--XB\r\n{purpose}\r\n\r\nx\n--XB\r\n{}\r\n\r\nDELETE\r\n--XB--\r\n",
                named("\"b\"")
            ),
        ),
        ("multipart/form-data", "_method=DELETE".to_string()),
        (
            "multipart/form-data; xboundary=YB; boundary=XB",
            body(&[(&purpose, "x")]),
        ),
        // Laravel reads a body as JSON when its type names `+json`.
        (
            "multipart/form-data; boundary=XB; type=\"application/x+json\"",
            body(&[(&purpose, "x")]),
        ),
    ] {
        let (status, v) = post(&proxy, &token, path, content_type, b.clone()).await;
        assert_eq!(status, 400, "{content_type} {b:?}: {v}");
        assert_eq!(v["error"]["code"], "bad_request", "{v}");
    }
    assert_eq!(up.count(), 0, "nothing forwarded: {:?}", up.seen());
    // Nothing was spent: both uses are left, and bodies without `_method`
    // reach the upstream as sent.
    let fine = body(&[
        (&purpose, "fine-tune"),
        (&file("file"), "_method=DELETE\r\nname=\"_method\""),
        (&named("\"my_method\""), "x"),
    ]);
    for _ in 0..2 {
        let (status, v) = post(&proxy, &token, path, CT, fine.clone()).await;
        assert_eq!(status, 200, "{v}");
    }
    let seen = up.seen();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].body, fine);
    assert_eq!(seen[0].headers["content-type"], CT);
    let (status, _) = post(&proxy, &token, path, CT, fine).await;
    assert_eq!(status, 429);
}

/// A `_method` part after the first `max_body_bytes` (the body is being
/// streamed by then): the chunk that names it is not passed on and the
/// upstream request is cut off, so the upstream never gets a complete
/// body holding it; the client gets the same 400.
#[tokio::test(flavor = "multi_thread")]
async fn regression_a_late_method_override_part_never_reaches_the_upstream_in_a_complete_body() {
    let up = Upstream::start().await;
    let home = Home::new();
    let proxy = Proxy::start(&home, &[openai(&up)], "[limits]\nmax_body_bytes = 65536\n");
    let token = home.token("openai", None);
    let audio = "a".repeat(300_000);
    let whole = body(&[
        (&named("\"model\""), "whisper-1"),
        (&file("file"), &audio),
        (&named("\"_method\""), "DELETE"),
    ]);
    // Sent up to the forbidden part's name, then nothing more: the old
    // path streamed it to the upstream (and waited for the rest).
    let upto = whole.find("name=\"_method\"").unwrap() + "name=\"_method\"\r\n\r\n".len();
    let (status, answer) =
        head_then_stall(&proxy, &token, whole.len(), &whole.as_bytes()[..upto]).await;
    assert_eq!(status, 400, "{answer}");
    assert!(answer.contains("_method"), "{answer}");
    // Sent whole: the upstream may see the start of the body, never all of
    // it, nor the part.
    let r = client()
        .post(proxy.url("/openai/v1/audio/transcriptions"))
        .bearer_auth(&token)
        .header("content-type", CT)
        .body(whole.clone())
        .send()
        .await;
    if let Ok(r) = r {
        assert_eq!(r.status(), 400);
    }
    // The upstream records what it got once its connection ends.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for s in up.seen() {
        assert!(!s.body.contains("_method"), "{} bytes", s.body.len());
        assert_ne!(s.body, whole);
    }
}

/// Uploads larger than `max_body_bytes` are not refused or held whole: the
/// first `max_body_bytes` are checked, the rest streams through checked
/// chunk by chunk, and the upstream gets the body byte for byte. A
/// `model` part within the first bytes is judged; one after them is not
/// seen, so a model-restricted token is denied with a reason saying why.
#[tokio::test(flavor = "multi_thread")]
async fn a_large_multipart_upload_streams_through_intact() {
    let up = Upstream::start().await;
    let home = Home::new();
    let proxy = Proxy::start(
        &home,
        &[openai(&up)],
        "[limits]\nmax_body_bytes = 1048576\nmax_buffered_bytes = 1048576\n",
    );
    let token = home.token("openai", None);
    // 6 MB of printable bytes, so the recorded body compares exactly.
    let audio: String = (0..6_000_000u32)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    let whole = body(&[
        (&named("\"model\""), "whisper-1"),
        (&file("file"), &audio),
        (&named("\"language\""), "en"),
    ]);
    let chunks: Vec<Vec<u8>> = whole
        .as_bytes()
        .chunks(64 * 1024)
        .map(<[u8]>::to_vec)
        .collect();
    let streamed = || {
        let chunks = chunks.clone().into_iter().map(Ok::<_, std::io::Error>);
        reqwest::Body::wrap_stream(futures_util::stream::iter(chunks))
    };
    let path = "/openai/v1/audio/transcriptions";
    let (status, v) = post(&proxy, &token, path, CT, streamed()).await;
    assert_eq!(status, 200, "{v}");
    let seen = up.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].body.len(), whole.len());
    assert!(seen[0].body == whole, "the body arrives byte for byte");

    // The model part comes first: judged, although the body is streamed.
    let whisper = home.issue(Scope {
        services: vec!["openai".into()],
        models: vec!["whisper-1".into()],
        ..Scope::default()
    });
    let (status, v) = post(&proxy, &whisper, path, CT, streamed()).await;
    assert_eq!(status, 200, "{v}");
    let other = home.issue(Scope {
        services: vec!["openai".into()],
        models: vec!["gpt-4o-transcribe".into()],
        ..Scope::default()
    });
    let sent = &whole.as_bytes()[..1_048_577];
    let (status, answer) = head_then_stall(&proxy, &other, whole.len(), sent).await;
    assert_eq!(status, 403, "{answer}");
    assert_eq!(up.count(), 2);

    // The model part after the file, past the first megabyte: not seen.
    let late = body(&[(&file("file"), &audio), (&named("\"model\""), "whisper-1")]);
    let sent = &late.as_bytes()[..1_048_577];
    let (status, answer) = head_then_stall(&proxy, &whisper, late.len(), sent).await;
    assert_eq!(status, 403, "{answer}");
    assert!(
        answer.contains("send the `model` part before the file"),
        "{answer}"
    );
    // A deny-list allows a request without a model, but the late part may
    // name the banned one (red team, wave 2, fourth pass): refused too.
    let deny_list = home.issue(Scope {
        services: vec!["openai".into()],
        datalog: Some(r#"reject if model("whisper-1");"#.into()),
        ..Scope::default()
    });
    let (status, answer) = head_then_stall(&proxy, &deny_list, late.len(), sent).await;
    assert_eq!(status, 403, "{answer}");
    assert!(
        answer.contains("send the `model` part before the file"),
        "{answer}"
    );
    assert_eq!(up.count(), 2);
    // A key that never reads the model streams it through as before.
    let (status, v) = post(&proxy, &token, path, CT, late.clone()).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(up.count(), 3);
}

/// A multipart body's `model` part is the request's model, as a JSON
/// body's `model`: judged against `--model`, refused (400) when named twice
/// or differently in the query, and nothing is spent on a refusal.
#[tokio::test(flavor = "multi_thread")]
async fn a_model_part_is_judged_like_a_json_model() {
    let up = Upstream::start().await;
    let home = Home::new();
    let proxy = Proxy::start(&home, &[openai(&up)], "");
    let token = home.issue(Scope {
        services: vec!["openai".into()],
        models: vec!["whisper-1".into()],
        max_uses: Some(2),
        ..Scope::default()
    });
    let path = "/openai/v1/audio/transcriptions";
    let with = |model: &str| body(&[(&file("file"), "RIFF...."), (&named("\"model\""), model)]);
    let (status, v) = post(&proxy, &token, path, CT, with("gpt-4o")).await;
    assert_eq!(status, 403, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("whisper-1"),
        "{v}"
    );
    let no_model = body(&[(&file("file"), "RIFF....")]);
    assert_eq!(post(&proxy, &token, path, CT, no_model).await.0, 403);
    for (path, b) in [
        (
            path,
            body(&[(&named("model"), "whisper-1"), (&named("MODEL"), "gpt-4o")]),
        ),
        (
            "/openai/v1/audio/transcriptions?model=gpt-4o",
            with("whisper-1"),
        ),
        (path, with(&"w".repeat(2000))),
    ] {
        let (status, v) = post(&proxy, &token, path, CT, b).await;
        assert_eq!(status, 400, "{v}");
        assert_eq!(v["error"]["code"], "bad_request", "{v}");
    }
    assert_eq!(up.count(), 0);
    let (status, v) = post(&proxy, &token, path, CT, with("whisper-1")).await;
    assert_eq!(status, 200, "{v}");
    // The query's model is the request's when the whole body names none.
    let (status, v) = post(
        &proxy,
        &token,
        "/openai/v1/audio/transcriptions?model=whisper-1",
        CT,
        body(&[(&file("file"), "RIFF....")]),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(up.count(), 2);
    assert_eq!(
        post(&proxy, &token, path, CT, with("whisper-1")).await.0,
        429
    );
}
