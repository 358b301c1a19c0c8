//! Extractors that turn every rejection axum would answer in its own words into an
//! [`ApiError`], so that malformed bodies and paths get the one JSON error shape.

use axum::body::Bytes;
use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, StatusCode};
use chrono::{DateTime, Utc};
use ledgerline_aggregates::validate;
use serde::de::{DeserializeOwned, IgnoredAny};
use serde::Deserialize;
use serde_json::Value;

use super::error::ApiError;
use crate::ledger::hash::truncate_to_micros;

/// `axum::Json` with our errors: 400 for syntax, 422 for shape (or a NUL character), 413 for
/// size, 415 for type.
pub struct Json<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for Json<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        if !is_json(req.headers()) {
            return Err(not_json());
        }
        parse(&body(req, state).await?).map(Json)
    }
}

/// A JSON body that may be absent (empty), with our errors when present and wrong.
pub struct OptionalJson<T>(pub Option<T>);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for OptionalJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let is_json = is_json(req.headers());
        let bytes = body(req, state).await?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(OptionalJson(None));
        }
        if !is_json {
            return Err(not_json());
        }
        parse(&bytes).map(|v| OptionalJson(Some(v)))
    }
}

/// What a request that takes no body accepts: nothing, or an empty object. A body there is
/// refused with [`OptionalJson`]'s errors (naming the field), rather than ignored: a client
/// sending one by mistake (a reason an erasure does not record, a truncated document)
/// learns it before the command is carried out. (Every list takes a query of its own, as
/// strict: `super::page::PageQuery` for the keyset lists.)
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Nothing {}

/// The body of a request that takes none: absent, blank or `{}` (which many clients send).
pub type NoBody = OptionalJson<Nothing>;

/// `application/json` or any `application/*+json`, as axum's `Json` accepts.
fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|mime| {
            let mime = mime.trim().to_ascii_lowercase();
            mime == "application/json"
                || (mime.starts_with("application/") && mime.ends_with("+json"))
        })
}

fn not_json() -> ApiError {
    ApiError::new(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "expected `Content-Type: application/json`",
    )
}

/// The whole body, within the limit (413 over it).
pub(super) async fn body<S: Send + Sync>(req: Request, state: &S) -> Result<Bytes, ApiError> {
    Bytes::from_request(req, state).await.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(r.status(), "request body is larger than 1 MiB")
        } else {
            ApiError::new(r.status(), r.body_text())
        }
    })
}

/// Parses with axum's deserializer (its errors name the field at fault), and refuses what it
/// would take but the API must not: an array for an object, an integer it would round, a
/// NUL character anywhere (no read model could store it: `validate::json_has_nul`). Every
/// command's input comes through here.
fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    // Every body this API takes is an object, but serde's derived structs also take an array
    // of their fields in order: `["group", "a title"]` would be carried out as a conversation.
    // (Other values than objects serde refuses itself, naming the struct it expected.)
    let first = bytes
        .iter()
        .find(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r'));
    if first == Some(&b'[') && serde_json::from_slice::<IgnoredAny>(bytes).is_ok() {
        return Err(ApiError::invalid(
            "invalid request body: expected a JSON object, found an array",
        ));
    }
    let value = match axum::Json::<T>::from_bytes(bytes) {
        Ok(axum::Json(v)) => v,
        Err(rejection) => return Err(json_rejection(rejection)),
    };
    if let Some(integer) = wider_than_64_bits(bytes) {
        return Err(ApiError::invalid(format!(
            "invalid request body: the integer {integer} does not fit in 64 bits and would be \
             stored rounded; send it as a string"
        )));
    }
    if validate::json_has_nul(bytes) {
        let at = serde_json::from_slice::<Value>(bytes)
            .ok()
            .and_then(|v| nul_at(&v, String::new()))
            .unwrap_or_default();
        return Err(ApiError::invalid(format!(
            "invalid request body: {at} must not contain the NUL character (\\u0000)"
        )));
    }
    Ok(value)
}

/// A time in a body that is stored (an assignment's or a key's expiry), kept to the
/// microsecond: `#[serde(default, deserialize_with = "super::extract::micros")]` on an
/// `Option<DateTime<Utc>>`. The log keeps what the command carried and the read models
/// microseconds (PostgreSQL's `timestamptz`), so nanoseconds would make the log hold another
/// time than every answer shows, and a command differing only in them would not be seen as
/// changing nothing. Truncated rather than refused: clients that format times with nine
/// digits (Go's RFC3339Nano, Java's Instant) would otherwise be refused for a precision no
/// answer ever showed.
pub fn micros<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<DateTime<Utc>>, D::Error> {
    Ok(Option::<DateTime<Utc>>::deserialize(d)?.map(truncate_to_micros))
}

/// The first integer in a JSON text (one that parsed) that no `i64` or `u64` holds.
/// serde_json reads such a literal as an `f64`, so free-form values (an organization's
/// settings) would be kept rounded, and answered back as another number than was sent.
fn wider_than_64_bits(bytes: &[u8]) -> Option<&str> {
    let (mut i, mut in_string) = (0, false);
    while i < bytes.len() {
        let b = bytes[i];
        if in_string {
            match b {
                b'\\' => i += 1,
                b'"' => in_string = false,
                _ => {}
            }
            i += 1;
        } else if b == b'"' {
            in_string = true;
            i += 1;
        } else if b == b'-' || b.is_ascii_digit() {
            let end = bytes[i..]
                .iter()
                .position(|c| !matches!(c, b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9'))
                .map_or(bytes.len(), |n| i + n);
            let literal = std::str::from_utf8(&bytes[i..end]).ok()?;
            let integer = !literal.contains(['.', 'e', 'E']);
            if integer && literal.parse::<i64>().is_err() && literal.parse::<u64>().is_err() {
                return Some(literal);
            }
            i = end;
        } else {
            i += 1;
        }
    }
    None
}

/// Where the first NUL is, as a JSON pointer (`/settings/theme`), or the object holding a
/// key with one.
fn nul_at(value: &Value, here: String) -> Option<String> {
    let pointer = |here: &str| {
        if here.is_empty() {
            "/".to_string()
        } else {
            here.to_string()
        }
    };
    match value {
        Value::String(s) if s.contains('\0') => Some(pointer(&here)),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .find_map(|(i, v)| nul_at(v, format!("{here}/{i}"))),
        Value::Object(fields) => fields.iter().find_map(|(k, v)| {
            if k.contains('\0') {
                Some(format!("a key in {}", pointer(&here)))
            } else {
                let escaped = k.replace('~', "~0").replace('/', "~1");
                nul_at(v, format!("{here}/{escaped}"))
            }
        }),
        _ => None,
    }
}

fn json_rejection(r: JsonRejection) -> ApiError {
    let status = r.status();
    let message = match &r {
        JsonRejection::JsonDataError(e) => format!("invalid request body: {}", e.body_text()),
        JsonRejection::JsonSyntaxError(e) => format!("malformed JSON: {}", e.body_text()),
        other => other.body_text(),
    };
    ApiError::new(status, message)
}

/// `axum::extract::Path` with our errors (an invalid UUID in a path is a 400).
pub struct Path<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for Path<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(v)) => Ok(Path(v)),
            Err(r) => Err(path_rejection(r)),
        }
    }
}

fn path_rejection(r: PathRejection) -> ApiError {
    ApiError::bad_request(format!("invalid path: {}", r.body_text()))
}

/// `axum::extract::Query` with our errors, refusing a NUL character (400, naming the
/// parameter) as [`Json`] does in a body: a parameter is compared with `text` columns, which
/// cannot hold one, so PostgreSQL would fail the query (a 500), and every list reads its query
/// through here.
pub struct Query<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for Query<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        // The same decoding as the struct's (percent-escapes and `+`), pair by pair; first, so
        // that a NUL is named as such in a value the struct would refuse anyway (an id).
        let pairs = axum::extract::Query::<Vec<(String, String)>>::try_from_uri(&parts.uri)
            .map_err(query_rejection)?
            .0;
        if let Some((name, _)) = pairs
            .iter()
            .find(|(name, value)| name.contains('\0') || value.contains('\0'))
        {
            let what = if name.contains('\0') {
                "a parameter's name".to_string()
            } else {
                name.clone()
            };
            return Err(ApiError::bad_request(format!(
                "invalid query: {what} must not contain the NUL character (%00)"
            )));
        }
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(v)) => Ok(Query(v)),
            Err(r) => Err(query_rejection(r)),
        }
    }
}

fn query_rejection(r: QueryRejection) -> ApiError {
    ApiError::bad_request(format!("invalid query: {}", r.body_text()))
}

#[cfg(test)]
mod tests {
    use super::wider_than_64_bits;

    #[test]
    fn integers_past_64_bits_are_found_outside_strings_only() {
        let wide = |text: &str| wider_than_64_bits(text.as_bytes()).map(str::to_string);
        assert_eq!(
            wide(r#"{"a": 9007199254740993, "b": -9223372036854775808}"#),
            None
        );
        assert_eq!(wide(r#"{"a": 18446744073709551615}"#), None);
        assert_eq!(
            wide(r#"{"a": 1, "b": [18446744073709551616]}"#).as_deref(),
            Some("18446744073709551616")
        );
        assert_eq!(
            wide(r#"{"a":-9223372036854775809}"#).as_deref(),
            Some("-9223372036854775809")
        );
        // Floats are floats; digits in strings and keys are text.
        assert_eq!(
            wide(r#"{"a": 1.5e300, "b": 123456789012345678901.0}"#),
            None
        );
        assert_eq!(
            wide(r#"{"123456789012345678901": "123456789012345678901 \" 99999999999999999999"}"#),
            None
        );
    }
}
