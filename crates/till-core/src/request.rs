//! Facts read from a request's body: what the proxy and the service
//! middleware both need, so both read a body the same way.

use serde::de::{IgnoredAny, MapAccess, Visitor};

/// The `model` field of a JSON body, or why the body is refused.
///
/// `Ok(None)` (no model fact, which fails any model check: deny when unsure)
/// for malformed JSON, a body that is not an object (serde would read a
/// struct from an array too: `["gpt-4o-mini"]` would name a model the
/// upstream never sees), a `model` that is not a string, and invalid UTF-8
/// anywhere (an upstream may decode such a body differently).
///
/// `Err` for a body an upstream could read as naming another model: `model`
/// twice, or another top-level key that case-folds to `model` (`MODEL`,
/// `Model`, escapes such as `"\u004dodel"`), which Go's `encoding/json`,
/// ASP.NET and others match case-insensitively, taking the last one.
pub fn model_of(body: &[u8]) -> Result<Option<String>, String> {
    struct Scan(Result<Option<String>, String>);
    struct V;
    impl<'de> Visitor<'de> for V {
        type Value = Scan;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Scan, A::Error> {
            let mut model: Option<Option<String>> = None;
            let mut problem = None;
            while let Some(k) = m.next_key::<String>()? {
                if k == "model" {
                    if model.is_some() {
                        problem.get_or_insert_with(|| {
                            "the JSON body has the key \"model\" twice; send it once".to_string()
                        });
                    }
                    let v = m.next_value::<serde_json::Value>()?;
                    model = Some(match v {
                        serde_json::Value::String(s) => Some(s),
                        _ => None,
                    });
                } else {
                    if k.to_lowercase() == "model" {
                        problem.get_or_insert_with(|| {
                            format!(
                                "the JSON body has a key {k:?} besides or instead of \"model\"; upstreams that match keys case-insensitively would read it as the model, so Till refuses it: send the model only as \"model\""
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
    impl<'de> serde::Deserialize<'de> for Scan {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            d.deserialize_map(V)
        }
    }
    let Ok(text) = std::str::from_utf8(body) else {
        return Ok(None);
    };
    if !text.trim_start().starts_with('{') {
        return Ok(None);
    }
    match serde_json::from_str::<Scan>(text) {
        Ok(Scan(r)) => r,
        Err(_) => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        // Nested keys do not name the model.
        assert_eq!(
            model_of(br#"{"model":"a","meta":{"MODEL":"b"}}"#)
                .unwrap()
                .as_deref(),
            Some("a")
        );
    }
}
