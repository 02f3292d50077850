//! Request path normalisation.
//!
//! Scope checks compare path *prefixes*, so the path a token is checked
//! against must be the path the upstream will act on. We normalise once and
//! then both authorize and forward the normalised form: tricks such as
//! `/v1/chat/../files`, `%2e%2e`, `//` cannot make the two differ. Anything we
//! cannot normalise unambiguously (encoded `/` or `\`, control characters,
//! `..` above the root, `..;` and other dot segments with `;` parameters) is
//! rejected: deny when unsure.

use thiserror::Error;

/// Why a path was refused.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum PathError {
    #[error("path must start with '/'")]
    NotAbsolute,
    #[error("path contains an encoded '/' or '\\' ({0}), which upstreams may decode differently")]
    EncodedSeparator(String),
    #[error("path contains a backslash or a control character")]
    BadCharacter,
    #[error("path contains a malformed percent escape")]
    BadEscape,
    #[error("path climbs above the root with '..'")]
    AboveRoot,
    #[error(
        "path has a '.' or '..' segment with ';' parameters (such as '..;'), which some servers read as '..'; remove the ';'"
    )]
    DotSegmentParameters,
    #[error("path is longer than {0} bytes")]
    TooLong(usize),
    #[error(
        "path contains an escape encoded twice ({0}), which an upstream that decodes twice reads as '.', '/', '\\' or '%'"
    )]
    DoubleEncoded(String),
    #[error(
        "path's escapes do not decode to UTF-8 text (such as the overlong %C0%AE), which upstreams may decode differently"
    )]
    NotUtf8,
    #[error(
        "path contains {0:?} (U+{1:04X}), which Unicode normalisation turns into '.', '/' or '\\'; upstreams that normalise would read another path"
    )]
    LookAlike(char, u32),
}

/// Longest path accepted, in bytes.
pub const MAX_PATH: usize = 4096;

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex_val(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

/// Decodes percent escapes of unreserved characters (RFC 3986 §6.2.2.2),
/// upper-cases the others, and refuses encoded separators.
fn decode_unreserved(raw: &str) -> Result<String, PathError> {
    let bytes = raw.as_bytes();
    let mut out = String::with_capacity(raw.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            let (h, l) = match (bytes.get(i + 1), bytes.get(i + 2)) {
                (Some(h), Some(l)) => (*h, *l),
                _ => return Err(PathError::BadEscape),
            };
            let v = match (hex_val(h), hex_val(l)) {
                (Some(h), Some(l)) => h * 16 + l,
                _ => return Err(PathError::BadEscape),
            };
            if v == b'/' || v == b'\\' {
                return Err(PathError::EncodedSeparator(format!(
                    "%{}{}",
                    h as char, l as char
                )));
            }
            if v < 0x20 || v == 0x7f {
                return Err(PathError::BadCharacter);
            }
            if is_unreserved(v) {
                out.push(v as char);
            } else {
                out.push_str(&format!("%{v:02X}"));
            }
            i += 3;
        } else {
            if b == b'\\' || b < 0x20 || b == 0x7f {
                return Err(PathError::BadCharacter);
            }
            // Non-ASCII bytes are part of valid UTF-8 (the input is a &str);
            // copy the whole character.
            let ch = raw[i..].chars().next().ok_or(PathError::BadCharacter)?;
            out.push(ch);
            i += ch.len_utf8();
        }
    }
    Ok(out)
}

/// Whether `seg` (escapes already canonical) is `.` or `..` followed by `;`
/// parameters. Tomcat and Spring strip path parameters before resolving dot
/// segments, so `/v1/chat/..;/files` is `/v1/files` to them while it would
/// stay under `/v1/chat/` here.
fn is_dot_segment_with_parameters(seg: &str) -> bool {
    // `decode_unreserved` leaves `;` encoded and upper-cases the escape.
    let end = match (seg.find(';'), seg.find("%3B")) {
        (Some(a), Some(b)) => a.min(b),
        (a, b) => match a.or(b) {
            Some(i) => i,
            None => return false,
        },
    };
    matches!(&seg[..end], "." | "..")
}

/// Whether `raw` is its own normal form: unreserved characters only (no
/// escape, no `;`), no empty segment but a final one, no `.` or `..`
/// segment. Nearly every real request path is; this scan is what they cost
/// instead of the decode-split-join below (3 300 instructions for
/// `/v1/chat/completions`, callgrind).
fn already_normal(raw: &str) -> bool {
    let b = raw.as_bytes();
    if b.first() != Some(&b'/') {
        return false;
    }
    let mut start = 1;
    for i in 1..=b.len() {
        if i == b.len() || b[i] == b'/' {
            let seg = &b[start..i];
            if (seg.is_empty() && i != b.len()) || seg == b"." || seg == b".." {
                return false;
            }
            start = i + 1;
        } else if !is_unreserved(b[i]) {
            return false;
        }
    }
    true
}

/// Returns the normalised form of an absolute path (no query string).
///
/// ```
/// assert_eq!(till_core::path::normalize("/v1/chat/../files").unwrap(), "/v1/files");
/// assert_eq!(till_core::path::normalize("/v1//chat/%2e%2e/files").unwrap(), "/v1/files");
/// assert!(till_core::path::normalize("/v1/chat%2f..%2ffiles").is_err());
/// ```
pub fn normalize(raw: &str) -> Result<String, PathError> {
    if raw.len() > MAX_PATH {
        return Err(PathError::TooLong(MAX_PATH));
    }
    if !raw.starts_with('/') {
        return Err(PathError::NotAbsolute);
    }
    if already_normal(raw) {
        return Ok(raw.to_string());
    }
    resolve(raw)
}

/// Characters whose compatibility normal form (NFKC) is `.`, `/` or `\`:
/// a server that normalises Unicode would read `/v1/chat/．．/files` as
/// `/v1/files`.
const LOOK_ALIKES: [char; 6] = [
    '\u{2024}', // ONE DOT LEADER
    '\u{FE52}', // SMALL FULL STOP
    '\u{FE68}', // SMALL REVERSE SOLIDUS
    '\u{FF0E}', // FULLWIDTH FULL STOP
    '\u{FF0F}', // FULLWIDTH SOLIDUS
    '\u{FF3C}', // FULLWIDTH REVERSE SOLIDUS
];

/// Refuses what a path's remaining escapes (`decode_unreserved` left only
/// reserved and non-ASCII bytes encoded) would turn into for an upstream
/// that decodes differently from Till: a second decoding (`%252e` is
/// `%2e`, then `.`), bytes that are not UTF-8 (`%C0%AE`, an overlong `.`
/// that lenient decoders accept), and Unicode look-alikes of `.`, `/` and
/// `\` that normalising servers fold.
fn refuse_decoding_differentials(decoded: &str) -> Result<(), PathError> {
    let b = decoded.as_bytes();
    let mut bytes = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            // Escapes are canonical here: `%` and two hex digits.
            let v = hex_val(b[i + 1]).unwrap_or(0) * 16 + hex_val(b[i + 2]).unwrap_or(0);
            if v == b'%'
                && let (Some(h), Some(l)) = (
                    b.get(i + 3).copied().and_then(hex_val),
                    b.get(i + 4).copied().and_then(hex_val),
                )
                && matches!(h * 16 + l, b'.' | b'/' | b'\\' | b'%')
            {
                return Err(PathError::DoubleEncoded(decoded[i..i + 5].to_string()));
            }
            bytes.push(v);
            i += 3;
        } else {
            bytes.push(b[i]);
            i += 1;
        }
    }
    let text = std::str::from_utf8(&bytes).map_err(|_| PathError::NotUtf8)?;
    match text.chars().find(|c| LOOK_ALIKES.contains(c)) {
        Some(c) => Err(PathError::LookAlike(c, c as u32)),
        None => Ok(()),
    }
}

/// The normal form of any absolute path within [`MAX_PATH`].
fn resolve(raw: &str) -> Result<String, PathError> {
    let decoded = decode_unreserved(raw)?;
    refuse_decoding_differentials(&decoded)?;
    let mut segs: Vec<&str> = Vec::new();
    let mut trailing = false;
    for seg in decoded.split('/') {
        trailing = false;
        if is_dot_segment_with_parameters(seg) {
            return Err(PathError::DotSegmentParameters);
        }
        match seg {
            "" => trailing = true,
            "." => trailing = true,
            ".." => {
                if segs.pop().is_none() {
                    return Err(PathError::AboveRoot);
                }
                trailing = true;
            }
            s => segs.push(s),
        }
    }
    let mut out = String::with_capacity(decoded.len());
    for s in &segs {
        out.push('/');
        out.push_str(s);
    }
    if trailing || segs.is_empty() {
        out.push('/');
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_dot_segments_and_duplicate_slashes() {
        assert_eq!(normalize("/").unwrap(), "/");
        assert_eq!(normalize("/v1/chat/").unwrap(), "/v1/chat/");
        assert_eq!(normalize("/v1/chat").unwrap(), "/v1/chat");
        assert_eq!(normalize("//v1///chat//x").unwrap(), "/v1/chat/x");
        assert_eq!(normalize("/v1/chat/../files").unwrap(), "/v1/files");
        assert_eq!(normalize("/v1/chat/./x").unwrap(), "/v1/chat/x");
        assert_eq!(normalize("/v1/chat/..").unwrap(), "/v1/");
        assert_eq!(normalize("/v1/chat/.").unwrap(), "/v1/chat/");
    }

    #[test]
    fn decodes_encoded_dots_before_resolving() {
        assert_eq!(normalize("/v1/chat/%2e%2e/files").unwrap(), "/v1/files");
        assert_eq!(normalize("/v1/chat/%2E%2E/files").unwrap(), "/v1/files");
        assert_eq!(normalize("/v1/chat/.%2e/files").unwrap(), "/v1/files");
        assert_eq!(normalize("/v1/%63hat/x").unwrap(), "/v1/chat/x");
    }

    #[test]
    fn refuses_what_it_cannot_normalise() {
        assert!(matches!(
            normalize("/a%2f..%2fb"),
            Err(PathError::EncodedSeparator(_))
        ));
        assert!(matches!(
            normalize("/a%5C..%5Cb"),
            Err(PathError::EncodedSeparator(_))
        ));
        assert_eq!(normalize("/a\\..\\b"), Err(PathError::BadCharacter));
        assert_eq!(normalize("/a%00"), Err(PathError::BadCharacter));
        assert_eq!(normalize("/a%zz"), Err(PathError::BadEscape));
        assert_eq!(normalize("/a%2"), Err(PathError::BadEscape));
        assert_eq!(normalize("/.."), Err(PathError::AboveRoot));
        assert_eq!(normalize("/a/../../b"), Err(PathError::AboveRoot));
        assert_eq!(normalize("a/b"), Err(PathError::NotAbsolute));
    }

    /// Red team, wave 2 (third pass): these reached the upstream as sent
    /// under a `/v1/chat/` scope, and a server that decodes twice, accepts
    /// overlong UTF-8 or normalises Unicode reads them as `/v1/files`.
    #[test]
    fn regression_escapes_another_decoder_reads_as_dots_or_separators_are_refused() {
        for p in [
            "/v1/chat/%252e%252e/files",
            "/v1/chat/%252E%252E/files",
            "/v1/chat/..%252f..%252ffiles",
            "/v1/chat/%255c",
            "/v1/chat/%25252e%25252e/files",
            // `%32%65` decodes to `2e` here, leaving `%252e`.
            "/v1/chat/%25%32%65%25%32%65/files",
        ] {
            assert!(
                matches!(normalize(p), Err(PathError::DoubleEncoded(_))),
                "{p}: {:?}",
                normalize(p)
            );
        }
        for p in [
            "/v1/chat/%C0%AE%C0%AE/files",
            "/v1/chat/%E0%80%AE",
            "/v1/%FF",
            "/v1/%C3",
        ] {
            assert_eq!(normalize(p), Err(PathError::NotUtf8), "{p}");
        }
        for p in [
            "/v1/chat/%EF%BC%8E%EF%BC%8E/files",
            "/v1/chat/%EF%BC%8F",
            "/v1/chat/%E2%80%A4%E2%80%A4/files",
        ] {
            assert!(
                matches!(normalize(p), Err(PathError::LookAlike(..))),
                "{p}: {:?}",
                normalize(p)
            );
        }
        // A `%` or non-ASCII text that is just text still passes.
        for (p, n) in [
            ("/files/100%25.txt", "/files/100%25.txt"),
            ("/files/%2541", "/files/%2541"),
            ("/files/caf%C3%A9", "/files/caf%C3%A9"),
            ("/files/%E6%97%A5%E6%9C%AC", "/files/%E6%97%A5%E6%9C%AC"),
        ] {
            assert_eq!(normalize(p).as_deref(), Ok(n), "{p}");
        }
    }

    #[test]
    fn regression_dot_segments_with_semicolon_parameters_are_refused() {
        for p in [
            "/v1/chat/..;/files",
            "/v1/chat/.;/x",
            "/v1/chat/..;jsessionid=x/files",
            "/v1/chat/%2e%2e;/files",
            "/v1/chat/%2E.;/files",
            "/v1/chat/..%3b/files",
            "/v1/chat/..%3B/files",
            "/v1/chat/.%2e%3bx=1/files",
            "/v1/chat/..;",
            "/..;/x",
        ] {
            assert_eq!(normalize(p), Err(PathError::DotSegmentParameters), "{p}");
        }
        // `;` elsewhere changes no segment's meaning and is kept as sent.
        assert_eq!(normalize("/v1/chat;x/y").unwrap(), "/v1/chat;x/y");
        assert_eq!(normalize("/v1/chat/...;/x").unwrap(), "/v1/chat/...;/x");
        assert_eq!(normalize("/v1/chat/;../x").unwrap(), "/v1/chat/;../x");
        assert_eq!(normalize("/v1/chat/a..;/x").unwrap(), "/v1/chat/a..;/x");
    }

    #[test]
    fn the_fast_path_takes_only_paths_that_are_their_own_normal_form() {
        // Every path of up to 6 characters after the '/' over an alphabet
        // with each character that matters to normalisation.
        const ALPHABET: &[u8] = b"a.-/;%2E";
        let mut taken = 0;
        let mut path = Vec::new();
        for len in 0..=6u32 {
            for mut n in 0..ALPHABET.len().pow(len) {
                path.clear();
                path.push(b'/');
                for _ in 0..len {
                    path.push(ALPHABET[n % ALPHABET.len()]);
                    n /= ALPHABET.len();
                }
                let p = std::str::from_utf8(&path).unwrap();
                if already_normal(p) {
                    taken += 1;
                    assert_eq!(resolve(p).as_deref(), Ok(p), "{p}");
                }
            }
        }
        // Not vacuous: many paths took it ("/", "/a", "/a.-/", ...).
        assert!(taken > 1000, "{taken}");
    }

    #[test]
    fn keeps_other_escapes_canonical() {
        assert_eq!(normalize("/a%20b").unwrap(), "/a%20b");
        assert_eq!(normalize("/a%3a").unwrap(), "/a%3A");
        assert_eq!(normalize("/é").unwrap(), "/é");
    }
}
