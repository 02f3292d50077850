//! `multipart/*` request bodies: checked for a `_method` part and read for
//! their `model` part, without holding a large upload in memory.
//!
//! Rails (through Rack), Laravel and Symfony take a POST body's `_method`
//! field as the method to run, and Rack reads every `multipart/*` body
//! (`form-data`, `mixed`, `related`) for it, so a POST-only token could
//! DELETE. OpenAI's audio, image-edit and file endpoints name the model in
//! a `model` part. Such bodies may be uploads of hundreds of MB, so they are
//! not read whole like JSON:
//!
//! * the body is read and checked up to `max_body_bytes` (within
//!   `body_timeout_secs` and the `max_buffered_bytes` budget) before
//!   anything is spent: a body that ends there is judged whole, a refused
//!   one spends nothing;
//! * a longer (or slower) body is forwarded from there on as it arrives,
//!   each chunk checked before it is passed on; a chunk that completes a
//!   forbidden part is not sent, and the upstream request is cut off (the
//!   connection closed before the body's end), so the upstream never
//!   receives a complete body holding such a part. The use is spent then:
//!   it was spent before the chunk arrived.
//!
//! The parts are parsed with `multer`, and every line of the body is also
//! checked as the most lenient parsers read it (PHP ends a part at a bare
//! `\n--boundary`, takes the first `boundary` in the `Content-Type`, turns
//! `.method` into `_method`; Rack finds `name=` anywhere in a part's head):
//! whatever Till and an upstream could read differently is refused (deny
//! when unsure).

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};

use axum::body::{Body, Bytes};
use futures_util::{FutureExt, Stream};
use http::HeaderValue;
use http_body_util::BodyExt;
use thiserror::Error;
use tokio::sync::OwnedSemaphorePermit;

use super::AppState;
use super::error::ProxyError;
use super::forward::{METHOD_OR_URL_HEADERS, dashed, is_method_override_name};
use super::handler::{BodyBuffer, over_budget};

/// A part's head (its header lines) may be this long. `multer` holds a head
/// in memory until it ends, so this bounds what a streamed body can hold.
const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Text before the first boundary: clients send none; `multer` holds it.
const MAX_PREAMBLE_BYTES: usize = 1024;
/// A model name is short; a longer `model` part is refused.
const MAX_MODEL_BYTES: usize = 1024;
/// RFC 2046 §5.1.1.
const MAX_BOUNDARY_LEN: usize = 70;

/// Why a multipart body (or its `Content-Type`) is refused.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum MultipartError {
    /// The `Content-Type` has no boundary Till and every upstream would
    /// read alike.
    #[error(
        "the multipart Content-Type has no usable boundary: {0}; Rack then reads the body as a URL-encoded form and PHP takes another boundary than Till, so Till refuses it: send one `boundary=` parameter of 1 to 70 letters, digits or '()+_-./:=? characters"
    )]
    Boundary(&'static str),
    /// A part named `_method` (any case or spelling a framework reads as
    /// it).
    #[error(
        "the multipart body has a part named {0:?}, which some frameworks (Rails through Rack, Laravel, Symfony) use to replace the HTTP method; send the request with the method you mean and without `_method`"
    )]
    MethodOverride(String),
    /// A part with a method- or URL-override header.
    #[error(
        "a part of the multipart body has the header {0:?}, which some frameworks read as another HTTP method or URL; send the part without it"
    )]
    OverrideHeader(String),
    /// Something a parser could read otherwise than Till.
    #[error(
        "the multipart body cannot be checked: {0}; Till refuses bodies that it and the upstream might read differently"
    )]
    Ambiguous(&'static str),
    /// `multer` could not parse the body.
    #[error("the multipart body is malformed ({0}); send a well-formed multipart/form-data body")]
    Malformed(String),
    /// Two parts name the model.
    #[error(
        "the multipart body has more than one `model` part; upstreams differ on which one they use, so send one"
    )]
    ModelTwice,
    /// A `model` part Till cannot read as the upstream would.
    #[error("the multipart body's `model` part {0}; send the model as a plain text part")]
    ModelPart(&'static str),
}

impl From<MultipartError> for ProxyError {
    fn from(e: MultipartError) -> Self {
        ProxyError::BadRequest(e.to_string())
    }
}

/// The boundary of a `multipart/*` body, `None` for another media type
/// (PHP's and Rack's reading: the media type ends at `;`, `,` or a space,
/// any case).
///
/// Refused unless the first `boundary` (any case) in the header is a
/// parameter of its own, spelt in lower case, no other `boundary=` (any
/// case) follows, and its value of [`is_boundary_char`]s ends the
/// parameter: PHP takes the first lower-case `boundary` substring
/// (`xboundary=` too), Rack the last `boundary=` in any case, and a Rack
/// that finds no boundary parses the body as a URL-encoded form.
/// (`----WebKitFormBoundary...` values are fine: no `=` follows them.)
pub fn boundary_of(content_type: Option<&HeaderValue>) -> Result<Option<String>, MultipartError> {
    use MultipartError::Boundary;
    let Some(v) = content_type else {
        return Ok(None);
    };
    let b = v.as_bytes();
    let media_end = b
        .iter()
        .position(|c| matches!(c, b';' | b',' | b' ' | b'\t'))
        .unwrap_or(b.len());
    if !b[..media_end]
        .get(..10)
        .is_some_and(|m| m.eq_ignore_ascii_case(b"multipart/"))
    {
        return Ok(None);
    }
    let lower = b.to_ascii_lowercase();
    let Some(at) = memchr::memmem::find(&lower, b"boundary") else {
        return Err(Boundary("it has no `boundary` parameter"));
    };
    if !lower[..at].trim_ascii_end().ends_with(b";") {
        return Err(Boundary("`boundary` is not a parameter of its own"));
    }
    if &b[at..at + 8] != b"boundary" {
        return Err(Boundary(
            "the `boundary` parameter is not spelt in lower case",
        ));
    }
    if memchr::memmem::find(&lower[at + 8..], b"boundary=").is_some() {
        return Err(Boundary("it says `boundary=` more than once"));
    }
    let Some(rest) = b[at + "boundary".len()..].strip_prefix(b"=") else {
        return Err(Boundary("`boundary` is not followed by `=`"));
    };
    let (value, after) = match rest.strip_prefix(b"\"") {
        Some(quoted) => {
            let end = quoted
                .iter()
                .position(|&c| c == b'"')
                .ok_or(Boundary("the quoted boundary has no closing quote"))?;
            (&quoted[..end], &quoted[end + 1..])
        }
        None => {
            let end = rest.iter().position(|&c| c == b';').unwrap_or(rest.len());
            (&rest[..end], &rest[end..])
        }
    };
    if !(after.is_empty() || after.starts_with(b";")) {
        return Err(Boundary("text follows the boundary's value"));
    }
    if value.is_empty()
        || value.len() > MAX_BOUNDARY_LEN
        || !value.iter().copied().all(is_boundary_char)
    {
        return Err(Boundary(
            "the boundary is empty, longer than 70 characters or holds other characters",
        ));
    }
    Ok(Some(String::from_utf8_lossy(value).into_owned()))
}

/// RFC 2046's boundary characters without the space, and none that ends
/// a value for some parser (`"`, `;`, `,`, `\`).
fn is_boundary_char(c: u8) -> bool {
    c.is_ascii_alphanumeric() || b"'()+_-./:=?".contains(&c)
}

/// Checks a multipart body chunk by chunk: its lines as a lenient parser
/// reads them ([`Lines`]) and its parts as `multer` parses them. A chunk is
/// passed on only once [`Scanner::feed`] accepted it.
pub struct Scanner {
    lines: Lines,
    inbox: Arc<Mutex<Inbox>>,
    parts: multer::Multipart<'static>,
    /// The `model` part being read.
    model_part: Option<multer::Field<'static>>,
    model_bytes: Vec<u8>,
    model: Option<String>,
    /// `multer` has seen the closing boundary.
    ended: bool,
}

/// Chunks handed to `multer`, which takes them as a stream.
#[derive(Default)]
struct Inbox {
    chunks: VecDeque<Bytes>,
    ended: bool,
}

struct Feed(Arc<Mutex<Inbox>>);

impl Stream for Feed {
    type Item = Result<Bytes, std::io::Error>;

    /// `Pending` without a waker: [`Scanner::drive`] polls `multer` again
    /// itself after each chunk, and `multer` waits on nothing else.
    fn poll_next(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let mut inbox = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match inbox.chunks.pop_front() {
            Some(c) => Poll::Ready(Some(Ok(c))),
            None if inbox.ended => Poll::Ready(None),
            None => Poll::Pending,
        }
    }
}

impl Scanner {
    pub fn new(boundary: &str) -> Self {
        let inbox = Arc::new(Mutex::new(Inbox::default()));
        let parts = multer::Multipart::new(Feed(inbox.clone()), boundary.to_string());
        Scanner {
            lines: Lines::new(boundary),
            inbox,
            parts,
            model_part: None,
            model_bytes: Vec::new(),
            model: None,
            ended: false,
        }
    }

    /// The `model` part's text, once read whole.
    pub fn model(&self) -> Option<&str> {
        self.model.as_deref()
    }

    /// Checks the next chunk of the body.
    pub fn feed(&mut self, chunk: &Bytes) -> Result<(), MultipartError> {
        self.lines.feed(chunk)?;
        if !self.ended {
            self.inbox
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .chunks
                .push_back(chunk.clone());
            self.drive()?;
        }
        Ok(())
    }

    /// The body has ended: it must have ended as a whole multipart body.
    pub fn finish(&mut self) -> Result<(), MultipartError> {
        self.lines.finish()?;
        self.inbox.lock().unwrap_or_else(|e| e.into_inner()).ended = true;
        self.drive()?;
        if !self.ended {
            return Err(MultipartError::Malformed(
                "it ends before its closing boundary".into(),
            ));
        }
        Ok(())
    }

    /// Lets `multer` parse all it can of what it was fed, checking each
    /// part as its head completes.
    fn drive(&mut self) -> Result<(), MultipartError> {
        let mut cx = Context::from_waker(futures_util::task::noop_waker_ref());
        let malformed = |e: multer::Error| MultipartError::Malformed(e.to_string());
        loop {
            if let Some(part) = &mut self.model_part {
                match Pin::new(part).poll_next(&mut cx) {
                    Poll::Pending => return Ok(()),
                    Poll::Ready(Some(Ok(b))) => {
                        if self.model_bytes.len() + b.len() > MAX_MODEL_BYTES {
                            return Err(MultipartError::ModelPart("is longer than 1024 bytes"));
                        }
                        self.model_bytes.extend_from_slice(&b);
                    }
                    Poll::Ready(Some(Err(e))) => return Err(malformed(e)),
                    Poll::Ready(None) => {
                        self.model_part = None;
                        let text = String::from_utf8(std::mem::take(&mut self.model_bytes))
                            .map_err(|_| MultipartError::ModelPart("is not UTF-8 text"))?;
                        self.model = Some(text);
                    }
                }
                continue;
            }
            if self.ended {
                return Ok(());
            }
            match self.parts.poll_next_field(&mut cx) {
                Poll::Pending => return Ok(()),
                Poll::Ready(Ok(None)) => self.ended = true,
                Poll::Ready(Ok(Some(part))) => {
                    if self.check_part(&part)? {
                        self.model_part = Some(part);
                    }
                    // Any other part is dropped: `multer` skips its data.
                }
                Poll::Ready(Err(e)) => return Err(malformed(e)),
            }
        }
    }

    /// Refuses a part that could override the method or that Till could
    /// read otherwise than the upstream; whether it is the `model` part.
    fn check_part(&self, part: &multer::Field<'static>) -> Result<bool, MultipartError> {
        for (name, value) in part.headers() {
            let n = name.as_str();
            if METHOD_OR_URL_HEADERS.contains(&&*dashed(n)) || is_method_override_name(n.as_bytes())
            {
                return Err(MultipartError::OverrideHeader(n.to_string()));
            }
            // Old MIME put `name=` on Content-Type too; Rack finds it in
            // any header line.
            check_name_parameters(value.as_bytes())?;
        }
        let Some(name) = part.name() else {
            return Err(MultipartError::Ambiguous(
                "a part has no name Till can read (Content-Disposition: form-data; name=\"...\")",
            ));
        };
        if is_method_override_name(name.as_bytes()) {
            return Err(MultipartError::MethodOverride(name.to_string()));
        }
        if name.trim().eq_ignore_ascii_case("_charset_") {
            return Err(MultipartError::Ambiguous(
                "a `_charset_` part makes some frameworks read the other parts in another character set",
            ));
        }
        let content_type = part
            .headers()
            .get(http::header::CONTENT_TYPE)
            .map(|v| v.as_bytes().trim_ascii().to_ascii_lowercase());
        if content_type
            .as_deref()
            .is_some_and(|t| t.starts_with(b"multipart/"))
        {
            return Err(MultipartError::Ambiguous(
                "a part is itself multipart (nested multipart/mixed); send each file as a part of its own",
            ));
        }
        if !till_core::request::names_model(name) {
            return Ok(false);
        }
        if self.model.is_some() || self.model_part.is_some() {
            return Err(MultipartError::ModelTwice);
        }
        if part
            .headers()
            .get("content-transfer-encoding")
            .is_some_and(|v| {
                !["7bit", "8bit", "binary"]
                    .iter()
                    .any(|c| v.as_bytes().trim_ascii().eq_ignore_ascii_case(c.as_bytes()))
            })
        {
            return Err(MultipartError::ModelPart(
                "has a Content-Transfer-Encoding, which some frameworks decode",
            ));
        }
        if let Some(t) = content_type {
            let plain = t
                .split(|&c| c == b';')
                .next()
                .unwrap_or_default()
                .trim_ascii()
                == b"text/plain";
            let other_charset = memchr::memmem::find(&t, b"charset").is_some_and(|_| {
                !(t.ends_with(b"charset=utf-8") || t.ends_with(b"charset=\"utf-8\""))
            });
            if !plain || other_charset {
                return Err(MultipartError::ModelPart(
                    "has a Content-Type other than text/plain in UTF-8",
                ));
            }
        }
        Ok(true)
    }
}

/// Refuses `text` (a part's header value, or a `Content-Disposition` line
/// anywhere in the body) if any `name` parameter in it, as the most lenient
/// parser finds one (any case, after `;`, `:` or a space, quoted or not),
/// names `_method`, or is given in a form some parsers decode and others
/// do not (RFC 2231 `name*=`, RFC 2047 `=?...?=`).
fn check_name_parameters(text: &[u8]) -> Result<(), MultipartError> {
    let lower = text.to_ascii_lowercase();
    let mut from = 0;
    while let Some(i) = memchr::memmem::find(&lower[from..], b"name").map(|i| i + from) {
        from = i + 4;
        if i > 0 && !matches!(lower[i - 1], b';' | b':' | b' ' | b'\t') {
            continue; // `filename`, `myname`
        }
        let mut j = i + 4;
        let skip_space = |j: &mut usize| {
            while lower.get(*j).is_some_and(|c| matches!(c, b' ' | b'\t')) {
                *j += 1;
            }
        };
        skip_space(&mut j);
        if lower.get(j) == Some(&b'*') {
            return Err(MultipartError::Ambiguous(
                "a part's name is given in RFC 2231 form (`name*=`), which some parsers decode and others ignore; send name=\"...\"",
            ));
        }
        if lower.get(j) != Some(&b'=') {
            continue;
        }
        j += 1;
        skip_space(&mut j);
        let mut value = Vec::new();
        if text.get(j) == Some(&b'"') {
            j += 1;
            while let Some(&c) = text.get(j) {
                match c {
                    b'"' => break,
                    b'\\' => {
                        if let Some(&n) = text.get(j + 1) {
                            value.push(n);
                        }
                        j += 2;
                    }
                    c => {
                        value.push(c);
                        j += 1;
                    }
                }
            }
        } else {
            let end = text[j..]
                .iter()
                .position(|&c| c == b';')
                .map_or(text.len(), |e| j + e);
            // A parser that unescapes or unquotes otherwise may still
            // read `\"_method"` or `'_method'` as `_method`.
            value.extend(
                text[j..end]
                    .trim_ascii()
                    .iter()
                    .filter(|c| !matches!(c, b'\\' | b'"' | b'\'')),
            );
        }
        if memchr::memmem::find(&value, b"=?").is_some() {
            return Err(MultipartError::Ambiguous(
                "a part's name is an RFC 2047 encoded word (=?...?=), which some parsers decode",
            ));
        }
        if is_method_override_name(&value) {
            return Err(MultipartError::MethodOverride(
                String::from_utf8_lossy(&value).chars().take(64).collect(),
            ));
        }
    }
    Ok(())
}

/// Where [`Lines`] is in the body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Region {
    /// Before the first boundary.
    Preamble,
    /// A part's header lines, with the `Content-Disposition` lines so far.
    Head { dispositions: u8 },
    /// A part's data.
    Data,
    /// After the closing boundary: only white space may follow.
    Closed,
}

/// The body's lines as a lenient parser reads them: a boundary only at the
/// start of a line that follows CRLF (PHP also takes one after a bare LF),
/// nothing but white space before the first and after the last one, part
/// heads of CRLF lines with one `Content-Disposition` and no folded lines,
/// and no `Content-Disposition` line anywhere (in file data too, where a
/// parser that splits parts elsewhere would see a head) naming `_method`.
/// Memory is bounded: a line is kept only up to [`MAX_HEAD_BYTES`].
struct Lines {
    /// `--` and the boundary.
    delimiter: Vec<u8>,
    /// The current line's first bytes (without its `\n`).
    line: Vec<u8>,
    /// The current line's length so far.
    line_len: usize,
    /// The current line's last byte so far (a long line is not kept whole).
    line_last: Option<u8>,
    /// The line before the current one ended with CRLF (the first line
    /// counts as following one).
    after_crlf: bool,
    region: Region,
    /// Bytes of the preamble or of the current head so far.
    region_bytes: usize,
    /// A `Content-Disposition` line, with its continuation lines, checked
    /// once a line that does not continue it begins.
    disposition: Option<Vec<u8>>,
}

impl Lines {
    fn new(boundary: &str) -> Self {
        Lines {
            delimiter: [b"--", boundary.as_bytes()].concat(),
            line: Vec::new(),
            line_len: 0,
            line_last: None,
            after_crlf: true,
            region: Region::Preamble,
            region_bytes: 0,
            disposition: None,
        }
    }

    fn feed(&mut self, mut chunk: &[u8]) -> Result<(), MultipartError> {
        while !chunk.is_empty() {
            match memchr::memchr(b'\n', chunk) {
                Some(i) => {
                    self.take(&chunk[..i])?;
                    self.count(1)?;
                    self.end_line(true)?;
                    chunk = &chunk[i + 1..];
                }
                None => {
                    self.take(chunk)?;
                    chunk = &[];
                }
            }
        }
        Ok(())
    }

    fn finish(&mut self) -> Result<(), MultipartError> {
        if self.line_len > 0 {
            self.end_line(false)?;
        }
        if let Some(d) = self.disposition.take() {
            check_name_parameters(&d)?;
        }
        Ok(())
    }

    /// A piece of the current line.
    fn take(&mut self, piece: &[u8]) -> Result<(), MultipartError> {
        if self.region == Region::Closed && !piece.iter().all(u8::is_ascii_whitespace) {
            return Err(MultipartError::Ambiguous(
                "text follows the closing boundary, which some parsers read as more parts",
            ));
        }
        self.count(piece.len())?;
        let room = MAX_HEAD_BYTES.saturating_sub(self.line.len());
        self.line.extend_from_slice(&piece[..piece.len().min(room)]);
        self.line_len += piece.len();
        if let Some(&last) = piece.last() {
            self.line_last = Some(last);
        }
        Ok(())
    }

    /// Counts bytes of the preamble or of a head against their bound.
    fn count(&mut self, n: usize) -> Result<(), MultipartError> {
        let (max, why) = match self.region {
            Region::Preamble => (
                MAX_PREAMBLE_BYTES,
                "more than 1024 bytes come before the first boundary",
            ),
            Region::Head { .. } => (MAX_HEAD_BYTES, "a part's headers are longer than 16 KiB"),
            Region::Data | Region::Closed => return Ok(()),
        };
        self.region_bytes += n;
        if self.region_bytes > max {
            return Err(MultipartError::Ambiguous(why));
        }
        Ok(())
    }

    fn end_line(&mut self, newline: bool) -> Result<(), MultipartError> {
        let line = std::mem::take(&mut self.line);
        let whole = self.line_len == line.len();
        let ends_cr = self.line_last == Some(b'\r');
        let text = if ends_cr && whole {
            &line[..line.len() - 1]
        } else {
            &line[..]
        };
        let continues = matches!(text.first(), Some(b' ' | b'\t'));
        match self.disposition.as_mut() {
            Some(d) if continues => {
                if d.len() + text.len() > MAX_HEAD_BYTES || !whole {
                    return Err(MultipartError::Ambiguous(
                        "a Content-Disposition line is longer than 16 KiB",
                    ));
                }
                d.extend_from_slice(text);
            }
            Some(_) => {
                if let Some(d) = self.disposition.take() {
                    check_name_parameters(&d)?;
                }
            }
            None => {}
        }
        self.classify(text, whole, newline, ends_cr)?;
        if !continues
            && text
                .trim_ascii_start()
                .get(..19)
                .is_some_and(|t| t.eq_ignore_ascii_case(b"content-disposition"))
        {
            if !whole {
                return Err(MultipartError::Ambiguous(
                    "a Content-Disposition line is longer than 16 KiB",
                ));
            }
            self.disposition = Some(text.to_vec());
        }
        self.after_crlf = newline && ends_cr;
        self.line = line;
        self.line.clear();
        self.line_len = 0;
        self.line_last = None;
        Ok(())
    }

    /// What the line means for the region it is in.
    fn classify(
        &mut self,
        text: &[u8],
        whole: bool,
        newline: bool,
        ends_cr: bool,
    ) -> Result<(), MultipartError> {
        use MultipartError::Ambiguous;
        if let Some(rest) = text.strip_prefix(&self.delimiter[..]) {
            if !self.after_crlf {
                return Err(Ambiguous(
                    "a line starts with the boundary after a bare LF, where PHP ends a part and other parsers do not",
                ));
            }
            let (closing, rest) = match rest.strip_prefix(b"--") {
                Some(r) => (true, r),
                None => (false, rest),
            };
            if !rest.iter().all(|c| matches!(c, b' ' | b'\t')) || !whole {
                return Err(Ambiguous(
                    "a line starts with the boundary and goes on with other text",
                ));
            }
            if matches!(self.region, Region::Head { .. }) {
                return Err(Ambiguous("a part's headers end without a blank line"));
            }
            if !closing && newline && !ends_cr {
                return Err(Ambiguous("a boundary line ends with a bare LF"));
            }
            self.region = if closing {
                Region::Closed
            } else {
                Region::Head { dispositions: 0 }
            };
            self.region_bytes = 0;
            return Ok(());
        }
        match self.region {
            Region::Preamble if !text.iter().all(u8::is_ascii_whitespace) => Err(Ambiguous(
                "text comes before the first boundary; send the body from its first boundary",
            )),
            Region::Head { dispositions } => {
                if newline && !ends_cr {
                    return Err(Ambiguous(
                        "a part's header line ends with a bare LF, where parsers differ on where the headers end",
                    ));
                }
                if text.is_empty() {
                    if dispositions != 1 {
                        return Err(Ambiguous(
                            "a part has no Content-Disposition header, or more than one",
                        ));
                    }
                    self.region = Region::Data;
                    return Ok(());
                }
                if matches!(text[0], b' ' | b'\t') {
                    return Err(Ambiguous(
                        "a part's header is folded over two lines, which parsers join differently",
                    ));
                }
                let name = text.split(|&c| c == b':').next().unwrap_or(b"");
                let name: Vec<u8> = name
                    .trim_ascii()
                    .iter()
                    .map(|&c| if c == b'_' { b'-' } else { c })
                    .collect();
                if name.eq_ignore_ascii_case(b"content-disposition") {
                    self.region = Region::Head {
                        dispositions: dispositions.saturating_add(1),
                    };
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

/// A multipart body read before forwarding, as far as Till reads it.
pub(super) struct Read {
    /// The bytes read, all checked.
    pub prefix: Bytes,
    /// The part of `max_buffered_bytes` that pays for `prefix`.
    pub permit: Option<OwnedSemaphorePermit>,
    pub scanner: Scanner,
    /// `None` when the whole body was read (and checked to its end);
    /// else a chunk received but not checked yet, and the rest.
    pub rest: Option<(Option<Bytes>, Body)>,
}

/// Reads and checks a multipart body up to `max_body_bytes` and
/// `body_timeout_secs`; past either, the rest is left for [`guarded`]
/// rather than refused, since uploads may be large or slow.
pub(super) async fn read(
    st: &AppState,
    mut body: Body,
    mut scanner: Scanner,
    content_length: Option<u64>,
) -> Result<Read, ProxyError> {
    let max = st.limits.max_body_bytes;
    let deadline =
        tokio::time::Instant::now() + std::time::Duration::from_secs(st.limits.body_timeout_secs);
    // The buffer never grows past what it may hold.
    let declared = Some(content_length.unwrap_or(u64::MAX).min(max as u64));
    let mut buf = BodyBuffer::default();
    let done = |buf: BodyBuffer, scanner, rest| {
        let (bytes, permit) = buf.into_parts();
        Ok(Read {
            prefix: Bytes::from(bytes),
            permit,
            scanner,
            rest,
        })
    };
    loop {
        let next = match body.frame().now_or_never() {
            Some(f) => Ok(f),
            None => tokio::time::timeout_at(deadline, body.frame()).await,
        };
        let frame = match next {
            Err(_) => return done(buf, scanner, Some((None, body))),
            Ok(None) => {
                scanner.finish()?;
                return done(buf, scanner, None);
            }
            Ok(Some(Err(e))) => {
                return Err(ProxyError::BadRequest(format!(
                    "cannot read request body: {e}"
                )));
            }
            Ok(Some(Ok(f))) => f,
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if buf.len() + data.len() > max {
            return done(buf, scanner, Some((Some(data), body)));
        }
        scanner.feed(&data)?;
        buf.push(&st.body_budget, &data, declared)
            .map_err(|_| over_budget(st))?;
    }
}

/// The body to forward after [`read`] stopped early: the bytes read, then
/// the rest as it arrives, each chunk checked before it is passed on. A
/// chunk refused ends the stream with an error, so the upstream request is
/// cut off before the body's end, and its reason is put in `cut` for the
/// client's answer.
pub(super) fn guarded(
    prefix: Bytes,
    permit: Option<OwnedSemaphorePermit>,
    scanner: Scanner,
    pending: Option<Bytes>,
    body: Body,
    cut: Arc<OnceLock<MultipartError>>,
) -> Body {
    struct Guard {
        prefix: Option<Bytes>,
        /// Given back once the prefix is passed on.
        permit: Option<OwnedSemaphorePermit>,
        pending: Option<Bytes>,
        body: Body,
        scanner: Scanner,
        cut: Arc<OnceLock<MultipartError>>,
        done: bool,
    }
    let guard = Guard {
        prefix: Some(prefix).filter(|p| !p.is_empty()),
        permit,
        pending,
        body,
        scanner,
        cut,
        done: false,
    };
    let refused = |g: &Guard, e: MultipartError| {
        tracing::debug!(error = %e, "multipart body cut off");
        let _ = g.cut.set(e);
        std::io::Error::other("the multipart body was refused")
    };
    let stream = futures_util::stream::unfold(guard, move |mut g| async move {
        if g.done {
            return None;
        }
        if let Some(p) = g.prefix.take() {
            return Some((Ok(p), g));
        }
        g.permit = None;
        let chunk = match g.pending.take() {
            Some(c) => c,
            None => loop {
                match g.body.frame().await {
                    None => {
                        g.done = true;
                        return match g.scanner.finish() {
                            Ok(()) => None,
                            Err(e) => {
                                let e = refused(&g, e);
                                Some((Err(e), g))
                            }
                        };
                    }
                    Some(Err(e)) => {
                        g.done = true;
                        return Some((Err(std::io::Error::other(e)), g));
                    }
                    Some(Ok(f)) => {
                        if let Ok(d) = f.into_data() {
                            break d;
                        }
                    }
                }
            },
        };
        match g.scanner.feed(&chunk) {
            Ok(()) => Some((Ok(chunk), g)),
            Err(e) => {
                g.done = true;
                let e = refused(&g, e);
                Some((Err(e), g))
            }
        }
    });
    Body::from_stream(stream)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan(boundary: &str, chunks: &[&[u8]]) -> Result<Option<String>, MultipartError> {
        let mut s = Scanner::new(boundary);
        for c in chunks {
            s.feed(&Bytes::copy_from_slice(c))?;
        }
        s.finish()?;
        Ok(s.model().map(str::to_string))
    }

    fn body(parts: &[(&str, &str)]) -> String {
        let mut b = String::new();
        for (head, data) in parts {
            b.push_str(&format!("--XB\r\n{head}\r\n\r\n{data}\r\n"));
        }
        b.push_str("--XB--\r\n");
        b
    }

    fn cd(name: &str) -> String {
        format!("Content-Disposition: form-data; name={name}")
    }

    #[test]
    fn boundaries_are_read_only_when_every_parser_reads_them_alike() {
        let b = |v: &str| boundary_of(Some(&HeaderValue::from_str(v).unwrap()));
        assert_eq!(b("application/json").unwrap(), None);
        assert_eq!(b("text/plain; boundary=x").unwrap(), None);
        assert_eq!(
            b("multipart/form-data; boundary=abc").unwrap().as_deref(),
            Some("abc")
        );
        assert_eq!(
            b("Multipart/Mixed;boundary=\"a'b(c)+_-./:=?\"; charset=utf-8")
                .unwrap()
                .as_deref(),
            Some("a'b(c)+_-./:=?")
        );
        assert_eq!(
            b("multipart/form-data; boundary=----WebKitFormBoundary7MA4YWxk")
                .unwrap()
                .as_deref(),
            Some("----WebKitFormBoundary7MA4YWxk")
        );
        for bad in [
            "multipart/form-data",
            "multipart/form-data; boundary=",
            "multipart/form-data; boundary=\"\"",
            "multipart/form-data; xboundary=a; boundary=b",
            "multipart/form-data; boundary=a; boundary=b",
            "multipart/form-data; boundary=a; BOUNDARY=b",
            "multipart/form-data; boundary=a-boundary=b",
            "multipart/form-data; BOUNDARY=a",
            "multipart/form-data; boundary=a b",
            "multipart/form-data; boundary=a ; x=y",
            "multipart/form-data; boundary=\"a\"x",
            "multipart/form-data; boundary=\"a",
            "multipart/form-data; boundary = a",
            "multipart/form-data boundary=a",
            "multipart/form-data; boundary=a,b",
            "multipart/form-data; boundary=a\\b",
        ] {
            assert!(b(bad).is_err(), "{bad}");
        }
        assert!(b(&format!("multipart/form-data; boundary={}", "a".repeat(71))).is_err());
    }

    #[test]
    fn a_method_override_part_is_refused_however_it_is_spelt() {
        for name in [
            "\"_method\"",
            "_method",
            "\"_METHOD\"",
            "\"_method[]\"",
            "\"%5Fmethod\"",
            "\"%255Fmethod\"",
            "\".method\"",
            "\" _method\"",
            "\"_meth\\od\"",
            "'_method'",
            "\"a\\\"; name=\\\"_method\"",
        ] {
            let b = body(&[
                ("Content-Disposition: form-data; name=\"a\"", "1"),
                (&cd(name), "DELETE"),
            ]);
            assert!(
                matches!(
                    scan("XB", &[b.as_bytes()]),
                    Err(MultipartError::MethodOverride(_))
                ),
                "{name}"
            );
        }
        for head in [
            // Any case of the parameter, as PHP reads it.
            "Content-Disposition: form-data; NAME=\"_method\"",
            "content-disposition: form-data; filename=\"x\"; name=\"_method\"",
            // Two names: parsers differ on which one counts.
            "Content-Disposition: form-data; name=\"a\"; name=\"_method\"",
            // Rack finds `name=` in any header line of the head.
            "Content-Disposition: form-data; name=\"a\"\r\nX-Note: x; name=_method",
            "Content-Disposition: form-data; name=\"a\"\r\nContent-Type: text/plain; name=\"_method\"",
        ] {
            let b = body(&[(head, "DELETE")]);
            assert!(scan("XB", &[b.as_bytes()]).is_err(), "{head}");
        }
        // In the part's own headers.
        for head in ["_method: DELETE", "X-HTTP-Method-Override: DELETE"] {
            let b = body(&[(&format!("{}\r\n{head}", cd("\"a\"")), "x")]);
            assert!(
                matches!(
                    scan("XB", &[b.as_bytes()]),
                    Err(MultipartError::OverrideHeader(_))
                ),
                "{head}"
            );
        }
        // Names that only contain `_method`, a file named so, a value.
        let b = body(&[
            (&cd("\"my_method\""), "x"),
            (
                "Content-Disposition: form-data; name=\"file\"; filename=\"_method.rb\"",
                "_method=DELETE",
            ),
            (&cd("q"), "_method"),
        ]);
        assert_eq!(scan("XB", &[b.as_bytes()]), Ok(None));
    }

    #[test]
    fn what_parsers_could_read_differently_is_refused() {
        let refused = |b: &str| scan("XB", &[b.as_bytes()]).is_err();
        let a = cd("\"a\"");
        for (why, b) in [
            (
                "RFC 2231 name",
                body(&[(
                    "Content-Disposition: form-data; name*=UTF-8''%5Fmethod",
                    "x",
                )]),
            ),
            (
                "RFC 2231 continuation",
                body(&[(
                    "Content-Disposition: form-data; name*0=\"_me\"; name*1=\"thod\"",
                    "x",
                )]),
            ),
            (
                "encoded word",
                body(&[(
                    "Content-Disposition: form-data; name=\"=?UTF-8?B?X21ldGhvZA==?=\"",
                    "x",
                )]),
            ),
            (
                "two dispositions",
                body(&[(&format!("{a}\r\n{}", cd("\"b\"")), "x")]),
            ),
            ("no disposition", body(&[("Content-Type: text/plain", "x")])),
            ("no name", body(&[("Content-Disposition: form-data", "x")])),
            (
                "folded",
                body(&[("Content-Disposition: form-data;\r\n name=\"a\"", "x")]),
            ),
            (
                "nested",
                body(&[(
                    &format!("{a}\r\nContent-Type: multipart/mixed; boundary=in"),
                    "--in\r\n\r\nx\r\n--in--",
                )]),
            ),
            ("charset", body(&[(&cd("_charset_"), "utf-7")])),
            // PHP ends a part at a bare LF before the boundary.
            (
                "bare LF boundary",
                format!(
                    "--XB\r\n{a}\r\n\r\nx\n--XB\r\n{}\r\n\r\nDELETE\r\n--XB--\r\n",
                    cd("\"_method\"")
                ),
            ),
            (
                "bare LF boundary, innocent",
                format!(
                    "--XB\r\n{a}\r\n\r\nx\n--XB\r\n{}\r\n\r\nx\r\n--XB--\r\n",
                    cd("\"b\"")
                ),
            ),
            // A head that httparse ends at `\n\n`, Rack at CRLF CRLF.
            (
                "bare LF head",
                format!(
                    "--XB\r\n{a}\n\n{}\r\n\r\nx\r\n--XB--\r\n",
                    cd("\"_method\"")
                ),
            ),
            (
                "epilogue",
                format!(
                    "{}{}\r\n\r\nDELETE\r\n--XB--",
                    body(&[(&a, "x")]),
                    cd("\"_method\"")
                ),
            ),
            ("preamble", format!("hello\r\n{}", body(&[(&a, "x")]))),
            (
                "boundary then text",
                format!("--XB\r\n{a}\r\n\r\nx\r\n--XBy\r\n{a}\r\n\r\nx\r\n--XB--"),
            ),
            ("no end", format!("--XB\r\n{a}\r\n\r\nx")),
            // A head in file data, for a parser splitting parts elsewhere.
            (
                "disposition in data",
                body(&[(&a, &format!("x\r\n{}\r\n", cd("\"_method\"")))]),
            ),
            (
                "long head",
                body(&[(
                    &format!("{a}\r\nX-Pad: {}", "p".repeat(MAX_HEAD_BYTES)),
                    "x",
                )]),
            ),
        ] {
            assert!(refused(&b), "{why}: {b:?}");
        }
        // A leading CRLF and transport padding are fine.
        assert!(!refused(&format!("\r\n{}", body(&[(&a, "x")]))));
        assert!(!refused(&format!("--XB  \r\n{a}\r\n\r\nx\r\n--XB--")));
    }

    #[test]
    fn the_model_part_is_read_once_and_as_text() {
        let b = body(&[
            (&cd("\"file\"; filename=\"a.mp3\""), "bytes"),
            (&cd("\"model\""), "whisper-1"),
        ]);
        assert_eq!(
            scan("XB", &[b.as_bytes()]).unwrap().as_deref(),
            Some("whisper-1")
        );
        let b = body(&[(
            &format!(
                "{}\r\nContent-Type: text/plain; charset=utf-8",
                cd("\"Model\"")
            ),
            "gpt-4o",
        )]);
        assert_eq!(
            scan("XB", &[b.as_bytes()]).unwrap().as_deref(),
            Some("gpt-4o")
        );
        for b in [
            body(&[(&cd("model"), "a"), (&cd("MODEL"), "b")]),
            body(&[(&cd("model"), "a"), (&cd("model"), "a")]),
            body(&[(&cd("model"), &"m".repeat(2000))]),
            body(&[(
                &format!("{}\r\nContent-Transfer-Encoding: base64", cd("model")),
                "Z3B0LTQ=",
            )]),
            body(&[(
                &format!("{}\r\nContent-Type: text/plain; charset=utf-7", cd("model")),
                "x",
            )]),
        ] {
            assert!(scan("XB", &[b.as_bytes()]).is_err(), "{b}");
        }
    }

    /// Chunk boundaries anywhere, even one byte at a time, give the same
    /// answers: lines and heads are carried over.
    #[test]
    fn any_chunking_gives_the_same_answer() {
        let ok = body(&[
            (&cd("\"model\""), "whisper-1"),
            (&cd("\"file\"; filename=\"f\""), &"z".repeat(40_000)),
        ]);
        let bad = body(&[
            (&cd("\"file\"; filename=\"f\""), &"z".repeat(300)),
            (&cd("\"_method\""), "DELETE"),
        ]);
        for size in [1, 2, 3, 7, 64] {
            let chunks: Vec<&[u8]> = ok.as_bytes().chunks(size).collect();
            assert_eq!(
                scan("XB", &chunks).unwrap().as_deref(),
                Some("whisper-1"),
                "{size}"
            );
            let chunks: Vec<&[u8]> = bad.as_bytes().chunks(size).collect();
            assert!(scan("XB", &chunks).is_err(), "{size}");
        }
    }

    /// Bodies made of multipart fragments in any order, cut anywhere: the
    /// scanner answers (accepts or refuses) and never panics.
    #[test]
    fn any_body_gets_an_answer() {
        let pieces: [&[u8]; 16] = [
            b"--XB",
            b"--XB--",
            b"\r\n",
            b"\n",
            b"\r",
            b" ",
            b"Content-Disposition: form-data; ",
            b"name=",
            b"\"",
            b"model",
            b"_method",
            b"name*=",
            b"\\",
            b"Content-Type: multipart/mixed",
            b"\xff\x00",
            b";",
        ];
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..3000 {
            let mut body = Vec::new();
            for _ in 0..(next() % 40) {
                body.extend_from_slice(pieces[(next() % 16) as usize]);
            }
            let mut s = Scanner::new("XB");
            let mut rest = &body[..];
            let mut fine = true;
            while !rest.is_empty() && fine {
                let n = 1 + (next() as usize % rest.len());
                fine = s.feed(&Bytes::copy_from_slice(&rest[..n])).is_ok();
                rest = &rest[n..];
            }
            if fine {
                let _ = s.finish();
            }
        }
    }

    /// The refusal comes with the chunk that completes the forbidden part's
    /// head, so that chunk is never passed on, and the bytes before it hold
    /// no complete body.
    #[test]
    fn a_forbidden_part_is_refused_before_its_head_is_passed_on() {
        let b = body(&[
            (&cd("\"file\"; filename=\"f\""), &"z".repeat(1000)),
            (&cd("\"_method\""), "DELETE"),
        ]);
        let at = b.find("name=\"_method\"").unwrap() + "name=\"_method\"".len();
        let mut s = Scanner::new("XB");
        s.feed(&Bytes::copy_from_slice(&b.as_bytes()[..at - 2]))
            .unwrap();
        assert!(
            s.feed(&Bytes::copy_from_slice(&b.as_bytes()[at - 2..]))
                .is_err()
        );
    }
}
