//! Rows for `COPY table (columns) FROM STDIN (FORMAT binary)`, for the multi-row paths that
//! write a batch's rows with one `COPY` per table (`audit_events`, `messaging`'s new rows):
//! PostgreSQL then neither plans a statement nor unpacks arrays, and takes each field in its
//! type's binary form as it is.
//!
//! The format (PostgreSQL manual, "COPY", "Binary Format"; `src/ledger/copy_binary.rs` reads
//! it): an 11-byte signature, an `int32` of flags and an `int32` header-extension length
//! (both 0 here); per tuple an `int16` field count, and per field an `int32` byte length
//! (`-1` for `NULL`) followed by the field's bytes; then an `int16` `-1`. All integers are
//! big-endian. Each field must be of its column's type exactly: the server reads the bytes
//! with that type's receive function, and casts nothing.

use chrono::{DateTime, NaiveDateTime, Utc};
use sqlx::PgConnection;
use uuid::Uuid;

/// The first bytes of every binary COPY stream (also what the ledger's reader expects).
pub const SIGNATURE: &[u8; 11] = b"PGCOPY\n\xff\r\n\0";

/// Microseconds from the Unix epoch to PostgreSQL's (2000-01-01T00:00:00Z), from which its
/// `timestamptz` counts (also what the ledger's verifier reads times with).
pub const PG_EPOCH_UNIX_MICROS: i64 = 946_684_800_000_000;

/// The version byte that starts `jsonb`'s binary form, before the JSON text.
const JSONB_VERSION: u8 = 1;

/// One field of a tuple, in the type of its column.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Field<'a> {
    Null,
    Int(i32),
    Bigint(i64),
    Uuid(Uuid),
    Text(&'a str),
    /// JSON text, which the server parses as `jsonb` (as a `::jsonb` cast does).
    Jsonb(&'a str),
    Timestamptz(DateTime<Utc>),
}

impl<'a> Field<'a> {
    /// `value`, or `NULL` when there is none.
    pub(crate) fn or_null(value: Option<Field<'a>>) -> Field<'a> {
        value.unwrap_or(Field::Null)
    }
}

/// Why a tuple could not be encoded.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    #[error("a field of {0} bytes is longer than COPY takes")]
    TooLong(usize),
    #[error("{0} is too far from 2000-01-01 for PostgreSQL's microseconds")]
    TimeOutOfRange(DateTime<Utc>),
    #[error("a tuple of {0} fields is longer than COPY takes")]
    TooManyFields(usize),
}

impl From<EncodeError> for sqlx::Error {
    fn from(e: EncodeError) -> Self {
        sqlx::Error::Encode(Box::new(e))
    }
}

/// The data of one binary `COPY ... FROM STDIN`: the header, then the tuples added; the
/// trailer is added by [`BinaryCopy::finish`]. After an error the data is unusable.
pub struct BinaryCopy {
    data: Vec<u8>,
    rows: u64,
}

impl Default for BinaryCopy {
    fn default() -> Self {
        Self::new()
    }
}

impl BinaryCopy {
    pub fn new() -> Self {
        // Grown as rows come: most segments of the live projector's batches fold nothing.
        let mut data = Vec::new();
        data.extend_from_slice(SIGNATURE);
        data.extend_from_slice(&0i32.to_be_bytes()); // flags: no OIDs
        data.extend_from_slice(&0i32.to_be_bytes()); // no header extension
        Self { data, rows: 0 }
    }

    /// Adds one tuple: `fields` in the order of the `COPY`'s column list.
    pub fn row(&mut self, fields: &[Field<'_>]) -> Result<(), EncodeError> {
        let count =
            i16::try_from(fields.len()).map_err(|_| EncodeError::TooManyFields(fields.len()))?;
        self.data.extend_from_slice(&count.to_be_bytes());
        for field in fields {
            self.field(field)?;
        }
        self.rows += 1;
        Ok(())
    }

    /// The tuples added so far.
    pub(crate) fn rows(&self) -> u64 {
        self.rows
    }

    /// The whole stream, trailer included.
    pub fn finish(mut self) -> Vec<u8> {
        self.data.extend_from_slice(&(-1i16).to_be_bytes());
        self.data
    }

    fn field(&mut self, field: &Field<'_>) -> Result<(), EncodeError> {
        match *field {
            Field::Null => self.data.extend_from_slice(&(-1i32).to_be_bytes()),
            Field::Int(n) => self.bytes(&[&n.to_be_bytes()])?,
            Field::Bigint(n) => self.bytes(&[&n.to_be_bytes()])?,
            Field::Uuid(id) => self.bytes(&[id.as_bytes()])?,
            Field::Text(s) => self.bytes(&[s.as_bytes()])?,
            Field::Jsonb(json) => self.bytes(&[&[JSONB_VERSION], json.as_bytes()])?,
            Field::Timestamptz(t) => {
                self.bytes(&[&timestamptz_micros(t)?.to_be_bytes()])?;
            }
        }
        Ok(())
    }

    /// A non-NULL field made of `parts`, after its length.
    fn bytes(&mut self, parts: &[&[u8]]) -> Result<(), EncodeError> {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        let prefix = i32::try_from(len).map_err(|_| EncodeError::TooLong(len))?;
        self.data.extend_from_slice(&prefix.to_be_bytes());
        for part in parts {
            self.data.extend_from_slice(part);
        }
        Ok(())
    }
}

/// Sends `data` with `statement` (a `COPY ... FROM STDIN (FORMAT binary)`), all or none.
pub(crate) async fn copy(
    conn: &mut PgConnection,
    statement: &str,
    data: BinaryCopy,
) -> sqlx::Result<u64> {
    let data = data.finish();
    // sqlx ends a `COPY` that fails at its start itself. Whatever the server makes of the
    // data, `finish` ends it: it reads the error that stopped it, if any, through
    // ReadyForQuery, so the connection can roll back to a savepoint. (`abort` could not be
    // used here: after the server's own error it leaves ReadyForQuery unread, and the next
    // statement would take it for its own.) `send` fails only when the socket does: the
    // dropped `PgCopyIn` then queues a CopyFail on a connection that is lost anyway. Dropped
    // mid-`COPY`, this would leave the connection out of step. A build's workers are cut
    // off by a lost lock or a stall, and their schema pool is closed or dropped after them,
    // which discards its connections; a live batch is cut off only by its stall watch,
    // after the watch ended its session on a connection of its own (`runner::end_session`),
    // so the pooled connection finds its socket closed (were that to fail, the connection
    // could be left waiting).
    let mut copy = conn.copy_in_raw(statement).await?;
    #[cfg(feature = "fault-injection")]
    if crate::fault::cut_copy() {
        copy.send(&data[..data.len() / 2]).await?;
        std::future::pending::<()>().await;
    }
    copy.send(data.as_slice()).await?;
    copy.finish().await
}

/// PostgreSQL's `timestamptz`: microseconds since 2000-01-01 00:00:00 UTC, computed as sqlx
/// binds a `DateTime<Utc>` (a sub-microsecond part is cut off towards 2000), so that a value
/// lands the same by `COPY` as by a bound parameter.
fn timestamptz_micros(t: DateTime<Utc>) -> Result<i64, EncodeError> {
    (t.naive_utc() - postgres_epoch())
        .num_microseconds()
        .ok_or(EncodeError::TimeOutOfRange(t))
}

fn postgres_epoch() -> NaiveDateTime {
    DateTime::from_timestamp_micros(PG_EPOCH_UNIX_MICROS)
        .expect("2000-01-01 00:00:00 is a valid date and time")
        .naive_utc()
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    /// The tuples' bytes alone: what follows the 19-byte header, up to the trailer.
    fn tuples(fields: &[Field<'_>]) -> Vec<u8> {
        let mut copy = BinaryCopy::new();
        copy.row(fields).unwrap();
        let data = copy.finish();
        data[19..data.len() - 2].to_vec()
    }

    /// The bytes of a timestamp's field, after its length.
    fn micros(t: DateTime<Utc>) -> [u8; 8] {
        let bytes = tuples(&[Field::Timestamptz(t)]);
        assert_eq!(bytes[..6], [0, 1, 0, 0, 0, 8], "one field of 8 bytes");
        bytes[6..].try_into().expect("nothing after the field")
    }

    #[test]
    fn an_empty_copy_is_the_header_and_the_trailer() {
        let mut expected = b"PGCOPY\n\xff\r\n\0".to_vec();
        expected.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff]);
        assert_eq!(BinaryCopy::new().finish(), expected);
    }

    #[test]
    fn a_tuple_is_its_field_count_then_each_field_after_its_length() {
        let id = Uuid::parse_str("00112233-4455-6677-8899-aabbccddeeff").unwrap();
        let bytes = tuples(&[
            Field::Bigint(-2),
            Field::Null,
            Field::Uuid(id),
            Field::Text("é👍"),
            Field::Jsonb(r#"{"a":1}"#),
        ]);
        let expected: Vec<u8> = [
            &[0, 5][..],
            &[0, 0, 0, 8, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xfe],
            &[0xff, 0xff, 0xff, 0xff],
            &[0, 0, 0, 16],
            &[
                0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd,
                0xee, 0xff,
            ],
            &[0, 0, 0, 6, 0xc3, 0xa9, 0xf0, 0x9f, 0x91, 0x8d],
            &[0, 0, 0, 8, 1, b'{', b'"', b'a', b'"', b':', b'1', b'}'],
        ]
        .concat();
        assert_eq!(bytes, expected);
    }

    #[test]
    fn an_int_is_four_bytes_big_endian() {
        assert_eq!(
            tuples(&[Field::Int(-2)]),
            [0, 1, 0, 0, 0, 4, 0xff, 0xff, 0xff, 0xfe]
        );
        assert_eq!(tuples(&[Field::Int(258)]), [0, 1, 0, 0, 0, 4, 0, 0, 1, 2]);
    }

    #[test]
    fn null_and_the_empty_text_differ() {
        assert_eq!(tuples(&[Field::Null]), [0, 1, 0xff, 0xff, 0xff, 0xff]);
        assert_eq!(tuples(&[Field::Text("")]), [0, 1, 0, 0, 0, 0]);
        assert_eq!(
            tuples(&[Field::or_null(None)]),
            [0, 1, 0xff, 0xff, 0xff, 0xff]
        );
        assert_eq!(
            tuples(&[Field::or_null(Some(Field::Text("")))]),
            [0, 1, 0, 0, 0, 0]
        );
    }

    #[test]
    fn a_timestamp_is_its_microseconds_since_2000_big_endian() {
        let utc = |y, mo, d, h, mi, s| Utc.with_ymd_and_hms(y, mo, d, h, mi, s).unwrap();
        assert_eq!(micros(utc(2000, 1, 1, 0, 0, 0)), 0i64.to_be_bytes());
        // 9,132 days: 25 years, 7 of them leap years (2000 to 2024).
        assert_eq!(
            micros(utc(2025, 1, 1, 0, 0, 0)),
            789_004_800_000_000i64.to_be_bytes()
        );
        let one_micro = chrono::Duration::microseconds(1);
        assert_eq!(
            micros(utc(2000, 1, 1, 0, 0, 0) + one_micro),
            1i64.to_be_bytes()
        );
        // Before 2000: negative, in two's complement.
        assert_eq!(micros(utc(2000, 1, 1, 0, 0, 0) - one_micro), [0xff; 8]);
        assert_eq!(
            micros(utc(1970, 1, 1, 0, 0, 0)),
            (-946_684_800_000_000i64).to_be_bytes()
        );
    }
}
