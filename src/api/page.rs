//! Pages of a list: the `limit` every paged list checks, the extra row that tells whether
//! another page follows, and the keyset cursor of the lists ordered by what their rows
//! hold (organizations, users, roles, a user's roles, API keys, conversations).
//!
//! Such a list's cursor is the sort key of the last item a page showed, never an offset
//! or a row's id alone: rows added or removed before it do not shift what comes next, and it
//! still works once that row is gone (a role deleted between two pages). It is the list's
//! name and that key as JSON (times with every microsecond PostgreSQL keeps), in base64url:
//! opaque to clients, who pass it back unchanged, but not secret, since it holds only what
//! the page showed, and a hand-made one only starts the caller's own list elsewhere.

use axum::Json;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ledgerline_aggregates::validate;
use schemars::JsonSchema;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sqlx::{Encode, Postgres, QueryBuilder, Type};
use uuid::Uuid;

use super::answers::PageOf;
use super::error::{ApiError, ApiResult};

/// A page of a keyset list when `limit` is not given.
pub const DEFAULT_LIMIT: i64 = 100;
/// The largest page of a keyset list.
pub const MAX_LIMIT: i64 = 500;

/// `limit` as given, or `default`; a 400 outside 1..=`max`.
pub fn limit(given: Option<i64>, default: i64, max: i64) -> ApiResult<i64> {
    let limit = given.unwrap_or(default);
    if (1..=max).contains(&limit) {
        Ok(limit)
    } else {
        Err(ApiError::bad_request(format!(
            "limit must be between 1 and {max}"
        )))
    }
}

/// Cuts `rows`, read with a limit of `limit + 1`, to `limit`, and answers the key of the
/// last one kept when the extra row shows that another page follows (`None` on the last).
pub fn cut<R, K>(rows: &mut Vec<R>, limit: i64, key: impl FnOnce(&R) -> K) -> Option<K> {
    let limit = usize::try_from(limit).unwrap_or(0);
    if rows.len() <= limit {
        return None;
    }
    rows.truncate(limit);
    rows.last().map(key)
}

/// The query of a keyset list: nothing else, so a misspelt parameter is a 400, not ignored.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PageQuery {
    /// The `next_cursor` of the previous page, unchanged (opaque).
    cursor: Option<String>,
    /// Items per page: 1 to 500 (100 when not given).
    limit: Option<i64>,
}

/// One page of keyset list `list`, whose sort key is `K`: the rows after `after` (from
/// the start without a cursor), `limit` of them.
#[derive(Debug)]
pub struct Page<K> {
    list: &'static str,
    pub limit: i64,
    pub after: Option<K>,
}

impl PageQuery {
    /// Checks the limit and opens the cursor of list `list` (a 400 when it is not one of
    /// that list's: mangled, or another list's).
    pub fn page<K: DeserializeOwned>(self, list: &'static str) -> ApiResult<Page<K>> {
        let limit = limit(self.limit, DEFAULT_LIMIT, MAX_LIMIT)?;
        let after = self.cursor.map(|c| open(list, &c)).transpose()?;
        Ok(Page { list, limit, after })
    }
}

impl<K> Page<K> {
    /// How many rows to read: one more than the page, to learn whether another follows.
    pub fn fetch(&self) -> i64 {
        self.limit + 1
    }
}

impl<K: Serialize> Page<K> {
    /// Cuts `rows` (read with [`Page::fetch`]) to the page and answers the next page's
    /// cursor, made from the last row kept, or `None` on the last page.
    pub fn cut<R>(&self, rows: &mut Vec<R>, key: impl FnOnce(&R) -> K) -> Option<String> {
        cut(rows, self.limit, key).map(|k| seal(self.list, &k))
    }
}

impl<A, B> Page<(A, B)> {
    /// Ends `sql`, whose `WHERE` is open, with this page of the rows in ascending order of
    /// `columns` (the key's two, as `"created_at, id"`): a row-value comparison, which an
    /// index on them (after the equalities before it) serves as the start of its range.
    pub fn push_ascending<'q>(&self, sql: &mut QueryBuilder<'q, Postgres>, columns: &str)
    where
        A: Clone + Encode<'q, Postgres> + Type<Postgres> + 'q,
        B: Clone + Encode<'q, Postgres> + Type<Postgres> + 'q,
    {
        if let Some((a, b)) = &self.after {
            sql.push(format_args!(" AND ({columns}) > ("))
                .push_bind(a.clone())
                .push(", ")
                .push_bind(b.clone())
                .push(")");
        }
        sql.push(format_args!(" ORDER BY {columns} LIMIT "))
            .push_bind(self.fetch());
    }

    /// `select` (no `WHERE`) of organization `org`'s rows, this page of them in ascending
    /// order of `columns`, as [`Page::push_ascending`].
    pub fn of_organization<'q>(
        &self,
        select: &str,
        org: Uuid,
        columns: &str,
    ) -> QueryBuilder<'q, Postgres>
    where
        A: Clone + Encode<'q, Postgres> + Type<Postgres> + 'q,
        B: Clone + Encode<'q, Postgres> + Type<Postgres> + 'q,
    {
        let mut sql = QueryBuilder::new(format!("{select} WHERE organization_id = "));
        sql.push_bind(org);
        self.push_ascending(&mut sql, columns);
        sql
    }
}

/// The answer of every paged list.
pub fn answer<T, C>(items: Vec<T>, next_cursor: Option<C>) -> Json<PageOf<T, C>> {
    Json(PageOf { items, next_cursor })
}

fn seal<K: Serialize>(list: &str, key: &K) -> String {
    let json = serde_json::to_vec(&(list, key)).expect("a sort key serializes");
    URL_SAFE_NO_PAD.encode(json)
}

fn open<K: DeserializeOwned>(list: &str, cursor: &str) -> ApiResult<K> {
    URL_SAFE_NO_PAD
        .decode(cursor)
        .ok()
        // A key with a NUL (never made here) would reach PostgreSQL, which refuses it in text.
        .filter(|json| !validate::json_has_nul(json))
        .and_then(|json| serde_json::from_slice::<(String, K)>(&json).ok())
        .filter(|(of, _)| of == list)
        .map(|(_, key)| key)
        .ok_or_else(|| {
            ApiError::bad_request(
                "invalid query: cursor is malformed: pass back the next_cursor of a page \
                 of this list as it was given",
            )
        })
}

#[cfg(test)]
mod tests {
    use chrono::{DateTime, TimeZone, Utc};

    use super::*;

    fn query(cursor: Option<String>, limit: Option<i64>) -> PageQuery {
        PageQuery { cursor, limit }
    }

    #[test]
    fn a_cursor_gives_back_its_key_to_the_microsecond() {
        let at = Utc.timestamp_opt(1_767_225_600, 123_456_000).unwrap();
        let key = (at, Uuid::new_v4());
        let cursor = seal("users", &key);
        let page = query(Some(cursor), None)
            .page::<(DateTime<Utc>, Uuid)>("users")
            .unwrap();
        assert_eq!(page.after, Some(key));
        assert_eq!(page.limit, DEFAULT_LIMIT);
    }

    #[test]
    fn a_cursor_of_another_list_or_mangled_is_refused() {
        let cursor = seal("users", &(Utc::now(), Uuid::new_v4()));
        for bad in [
            cursor.clone(),
            format!("{cursor}!"),
            cursor[1..].to_string(),
            String::new(),
            URL_SAFE_NO_PAD.encode(b"[\"api-keys\", 3]"),
        ] {
            let e = query(Some(bad.clone()), None)
                .page::<(DateTime<Utc>, Uuid)>("api-keys")
                .unwrap_err();
            assert_eq!(e.status, 400, "{bad}");
            assert!(e.message.contains("cursor is malformed"), "{}", e.message);
        }
    }

    #[test]
    fn limits_outside_the_range_are_refused() {
        for bad in [0, -1, MAX_LIMIT + 1] {
            let e = query(None, Some(bad))
                .page::<(String,)>("roles")
                .unwrap_err();
            assert_eq!(
                e.message,
                format!("limit must be between 1 and {MAX_LIMIT}")
            );
        }
        assert_eq!(
            query(None, Some(MAX_LIMIT))
                .page::<(String,)>("roles")
                .unwrap()
                .limit,
            MAX_LIMIT
        );
    }

    #[test]
    fn cut_keeps_the_page_and_names_its_last_row_only_when_more_follow() {
        let mut rows = vec![1, 2, 3];
        assert_eq!(cut(&mut rows, 2, |r| *r), Some(2));
        assert_eq!(rows, [1, 2]);
        let mut rows = vec![1, 2];
        assert_eq!(cut(&mut rows, 2, |r| *r), None);
        assert_eq!(rows, [1, 2]);
    }
}
