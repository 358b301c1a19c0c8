//! The shapes of answers that many routes share: a list, a page of a paged list, and what a
//! creation answers when it cannot show its view. Typed (and so in the OpenAPI document)
//! rather than built with `json!`, so that one place says what every list looks like.

use schemars::JsonSchema;
use serde::Serialize;
use uuid::Uuid;

/// The answer of a list that is not paged: all of its items.
#[derive(Debug, Serialize, JsonSchema)]
#[schemars(rename = "ListOf{T}")]
pub struct List<T> {
    pub items: Vec<T>,
}

impl<T> List<T> {
    pub fn of(items: Vec<T>) -> Self {
        Self { items }
    }
}

/// One page of a paged list: its cursor is a position (`i64`) in the lists in log order,
/// an opaque string in the others (`super::page`).
#[derive(Debug, Serialize, JsonSchema)]
#[schemars(rename = "PageOf{T}")]
pub struct PageOf<T, C = i64> {
    pub items: Vec<T>,
    /// The `cursor` of the next page; `null` on the last.
    pub next_cursor: Option<C>,
}

/// The answer to a key that may create or change a resource but not read it: its id alone.
#[derive(Debug, Serialize, JsonSchema)]
// Closed, so that in the document's `anyOf` (the view, or this) a view missing a field
// it promises does not pass for this.
#[serde(deny_unknown_fields)]
pub struct CreatedId {
    pub id: Uuid,
}

/// A creation the read models do not show yet (a 202, with `ledgerline-read-models: behind`):
/// it is in the log, and a GET of its id shows it once they catch up.
#[derive(Debug, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Recorded {
    pub id: Uuid,
    /// Always `behind`.
    #[schemars(extend("const" = "behind"))]
    pub read_models: &'static str,
}
