//! The id of one request: 64 random bits, written as 16 lower-case hex
//! digits in the `x-till-request-id` header, the audit log, alerts and the
//! usage API, so an operator can find a client's request by its header.
//!
//! Kept as the number until it is written: formatting it to a `String` and
//! copying that into the header and the audit record were three heap
//! allocations on every request (benches/README.md, callgrind).

use std::fmt;

use http::{HeaderName, HeaderValue};

/// The response header that carries a request's id.
pub static HEADER: HeaderName = HeaderName::from_static("x-till-request-id");

/// A request's id; see the module doc.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RequestId(pub u64);

impl RequestId {
    /// A fresh random id.
    pub fn random() -> Self {
        RequestId(rand::random())
    }

    /// The 16 hex digits, without allocating.
    pub fn hex(self) -> [u8; 16] {
        let mut out = [0u8; 16];
        hex::encode_to_slice(self.0.to_be_bytes(), &mut out)
            .unwrap_or_else(|_| unreachable!("8 bytes are 16 hex digits"));
        out
    }

    /// The id as a header value.
    pub fn header_value(self) -> HeaderValue {
        HeaderValue::from_bytes(&self.hex())
            .unwrap_or_else(|_| unreachable!("hex digits are a valid header value"))
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hex = self.hex();
        // Hex digits are ASCII.
        f.write_str(std::str::from_utf8(&hex).map_err(|_| fmt::Error)?)
    }
}

impl serde::Serialize for RequestId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let hex = self.hex();
        s.serialize_str(std::str::from_utf8(&hex).map_err(serde::ser::Error::custom)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_as_sixteen_hex_digits_like_the_format_it_replaced() {
        for n in [0, 1, 0xff, 0x0123_4567_89ab_cdef, u64::MAX, 1 << 63] {
            let id = RequestId(n);
            let want = format!("{n:016x}");
            assert_eq!(id.to_string(), want);
            assert_eq!(id.header_value().to_str().unwrap(), want);
            assert_eq!(serde_json::to_value(id).unwrap(), want.as_str());
        }
        for _ in 0..1000 {
            let id = RequestId::random();
            assert_eq!(id.to_string(), format!("{:016x}", id.0));
        }
    }
}
