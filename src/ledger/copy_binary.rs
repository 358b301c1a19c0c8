//! A reader for PostgreSQL's binary COPY format, the output of
//! `COPY (...) TO STDOUT (FORMAT binary)`: it splits the stream into tuples of fields borrowed
//! from the received bytes, whatever the chunk boundaries.
//!
//! The format (PostgreSQL manual, "COPY", "Binary Format"): an 11-byte signature, an `int32`
//! of flags and an `int32` header-extension length followed by the extension; then per tuple
//! an `int16` field count (`-1` is the trailer that ends the data), and per field an `int32`
//! byte length (`-1` is `NULL`) followed by the field's bytes in the type's binary form. All
//! integers are big-endian. Malformed input is an error, never a panic: the bytes come from a
//! database that anyone with enough rights can fill with anything.

use ledgerline_projections::copy_in::SIGNATURE;

/// Bits 16-31 of the header flags denote format changes a reader must not ignore (bit 16:
/// OIDs included).
const CRITICAL_FLAGS: u32 = 0xffff_0000;

fn malformed(what: impl std::fmt::Display) -> sqlx::Error {
    sqlx::Error::Protocol(format!("malformed binary COPY data: {what}"))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Header,
    Tuples,
    /// The trailer has been read: nothing may follow.
    Done,
}

/// What parsing one unit at the start of some bytes found.
enum Step<T> {
    /// A complete unit, `usize` bytes long.
    Complete(usize, T),
    /// The bytes end before the unit does.
    Incomplete,
}

/// Reads a stream of tuples of exactly `N` fields.
pub(crate) struct CopyBinaryReader<const N: usize> {
    state: State,
    /// The bytes of an incomplete header or tuple, carried over to the next chunk.
    pending: Vec<u8>,
}

impl<const N: usize> CopyBinaryReader<N> {
    pub(crate) fn new() -> Self {
        Self {
            state: State::Header,
            pending: Vec::new(),
        }
    }

    /// Parses `chunk` (following the chunks fed before) and calls `on_tuple` with the fields
    /// of every tuple it completes, in order (`None` for `NULL`).
    pub(crate) fn feed<F>(&mut self, chunk: &[u8], mut on_tuple: F) -> Result<(), sqlx::Error>
    where
        F: FnMut(&[Option<&[u8]>; N]) -> Result<(), sqlx::Error>,
    {
        if self.pending.is_empty() {
            // The usual case: PostgreSQL sends each tuple in a message of its own, so tuples
            // are parsed straight from the chunk.
            let used = self.parse(chunk, &mut on_tuple)?;
            self.pending.extend_from_slice(&chunk[used..]);
        } else {
            let mut data = std::mem::take(&mut self.pending);
            data.extend_from_slice(chunk);
            let used = self.parse(&data, &mut on_tuple)?;
            data.drain(..used);
            self.pending = data;
        }
        Ok(())
    }

    /// Checks that the stream ended where the data does: after the trailer, with nothing left.
    pub(crate) fn finish(&self) -> Result<(), sqlx::Error> {
        match self.state {
            State::Done => Ok(()),
            State::Header => Err(malformed("the stream ended before the header was complete")),
            State::Tuples if self.pending.is_empty() => {
                Err(malformed("the stream ended without the trailer"))
            }
            State::Tuples => Err(malformed(format!(
                "the stream ended inside a tuple ({} bytes of it received)",
                self.pending.len()
            ))),
        }
    }

    /// Parses what is complete in `data`; returns how many bytes that was.
    fn parse<F>(&mut self, data: &[u8], on_tuple: &mut F) -> Result<usize, sqlx::Error>
    where
        F: FnMut(&[Option<&[u8]>; N]) -> Result<(), sqlx::Error>,
    {
        let mut pos = 0;
        loop {
            let rest = &data[pos..];
            match self.state {
                State::Header => match header(rest)? {
                    Step::Complete(len, ()) => {
                        pos += len;
                        self.state = State::Tuples;
                    }
                    Step::Incomplete => return Ok(pos),
                },
                State::Tuples => match tuple::<N>(rest)? {
                    Step::Complete(len, Some(fields)) => {
                        on_tuple(&fields)?;
                        pos += len;
                    }
                    Step::Complete(len, None) => {
                        pos += len;
                        self.state = State::Done;
                    }
                    Step::Incomplete => return Ok(pos),
                },
                State::Done if rest.is_empty() => return Ok(pos),
                State::Done => {
                    return Err(malformed(format!("{} bytes after the trailer", rest.len())))
                }
            }
        }
    }
}

fn i16_at(b: &[u8], at: usize) -> Option<i16> {
    Some(i16::from_be_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn i32_at(b: &[u8], at: usize) -> Option<i32> {
    Some(i32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// The signature, flags and header extension.
fn header(b: &[u8]) -> Result<Step<()>, sqlx::Error> {
    let fixed = SIGNATURE.len() + 8;
    if b.len() < fixed {
        // Check what has arrived of the signature already, so garbage fails early.
        let n = b.len().min(SIGNATURE.len());
        if b[..n] != SIGNATURE[..n] {
            return Err(malformed("no PGCOPY signature"));
        }
        return Ok(Step::Incomplete);
    }
    if b[..SIGNATURE.len()] != SIGNATURE[..] {
        return Err(malformed("no PGCOPY signature"));
    }
    let flags = i32_at(b, SIGNATURE.len()).unwrap_or(0) as u32;
    if flags & CRITICAL_FLAGS != 0 {
        return Err(malformed(format!("unsupported header flags {flags:#010x}")));
    }
    let extension = i32_at(b, SIGNATURE.len() + 4).unwrap_or(0);
    let extension = usize::try_from(extension)
        .map_err(|_| malformed(format!("negative header extension length {extension}")))?;
    let len = fixed + extension;
    Ok(if b.len() < len {
        Step::Incomplete
    } else {
        Step::Complete(len, ())
    })
}

/// One tuple's fields, or `None` for the trailer.
#[allow(clippy::type_complexity)]
fn tuple<const N: usize>(b: &[u8]) -> Result<Step<Option<[Option<&[u8]>; N]>>, sqlx::Error> {
    let Some(count) = i16_at(b, 0) else {
        return Ok(Step::Incomplete);
    };
    if count == -1 {
        return Ok(Step::Complete(2, None));
    }
    if usize::try_from(count).ok() != Some(N) {
        return Err(malformed(format!(
            "a tuple of {count} fields, expected {N}"
        )));
    }
    let mut fields = [None; N];
    let mut pos = 2;
    for field in fields.iter_mut() {
        let Some(len) = i32_at(b, pos) else {
            return Ok(Step::Incomplete);
        };
        pos += 4;
        if len == -1 {
            continue; // NULL
        }
        let len =
            usize::try_from(len).map_err(|_| malformed(format!("a field of length {len}")))?;
        let Some(bytes) = b.get(pos..pos + len) else {
            return Ok(Step::Incomplete);
        };
        *field = Some(bytes);
        pos += len;
    }
    Ok(Step::Complete(pos, Some(fields)))
}

#[cfg(test)]
mod tests {
    use super::*;

    type Tuple = Vec<Option<Vec<u8>>>;

    fn header_bytes(extension: &[u8]) -> Vec<u8> {
        let mut b = SIGNATURE.to_vec();
        b.extend_from_slice(&0i32.to_be_bytes());
        b.extend_from_slice(&(extension.len() as i32).to_be_bytes());
        b.extend_from_slice(extension);
        b
    }

    fn tuple_bytes(fields: &[Option<&[u8]>]) -> Vec<u8> {
        let mut b = (fields.len() as i16).to_be_bytes().to_vec();
        for f in fields {
            match f {
                None => b.extend_from_slice(&(-1i32).to_be_bytes()),
                Some(f) => {
                    b.extend_from_slice(&(f.len() as i32).to_be_bytes());
                    b.extend_from_slice(f);
                }
            }
        }
        b
    }

    const TRAILER: [u8; 2] = [0xff, 0xff];

    /// A small stream: a header with an extension, three tuples (with NULLs, an empty field
    /// and a long one), the trailer.
    fn sample() -> (Vec<u8>, Vec<Tuple>) {
        let long = vec![7u8; 300];
        let one = 1i64.to_be_bytes();
        let tuples: Vec<Vec<Option<&[u8]>>> = vec![
            vec![Some(&one), Some(b"text"), None],
            vec![None, Some(b""), Some(&long)],
            vec![Some(b"\xff\xff\xff\xff"), None, None],
        ];
        let mut b = header_bytes(b"ext");
        for t in &tuples {
            b.extend(tuple_bytes(t));
        }
        b.extend_from_slice(&TRAILER);
        let owned = tuples
            .iter()
            .map(|t| t.iter().map(|f| f.map(<[u8]>::to_vec)).collect())
            .collect();
        (b, owned)
    }

    /// Feeds the chunks in order; returns the tuples read and the result of `finish`.
    fn read(chunks: &[&[u8]]) -> Result<Vec<Tuple>, sqlx::Error> {
        let mut reader = CopyBinaryReader::<3>::new();
        let mut got = Vec::new();
        for c in chunks {
            reader.feed(c, |fields| {
                got.push(fields.iter().map(|f| f.map(<[u8]>::to_vec)).collect());
                Ok(())
            })?;
        }
        reader.finish()?;
        Ok(got)
    }

    fn message(e: sqlx::Error) -> String {
        match e {
            sqlx::Error::Protocol(m) => m,
            other => panic!("expected a protocol error, got {other:?}"),
        }
    }

    #[test]
    fn reads_a_stream_in_one_chunk() {
        let (bytes, want) = sample();
        assert_eq!(read(&[&bytes]).unwrap(), want);
    }

    #[test]
    fn reads_a_stream_split_at_every_byte_boundary() {
        let (bytes, want) = sample();
        for at in 0..=bytes.len() {
            let (a, b) = bytes.split_at(at);
            assert_eq!(read(&[a, b]).unwrap(), want, "split at {at}");
        }
        for first in 0..bytes.len() {
            for second in first..=bytes.len() {
                let chunks = [&bytes[..first], &bytes[first..second], &bytes[second..]];
                assert_eq!(read(&chunks).unwrap(), want, "split at {first}, {second}");
            }
        }
    }

    #[test]
    fn reads_a_stream_one_byte_at_a_time() {
        let (bytes, want) = sample();
        let chunks: Vec<&[u8]> = bytes.chunks(1).collect();
        assert_eq!(read(&chunks).unwrap(), want);
    }

    #[test]
    fn reads_an_empty_result() {
        let mut bytes = header_bytes(b"");
        bytes.extend_from_slice(&TRAILER);
        assert_eq!(read(&[&bytes]).unwrap(), Vec::<Tuple>::new());
    }

    #[test]
    fn truncated_input_is_an_error_at_every_length() {
        let (bytes, _) = sample();
        for len in 0..bytes.len() {
            let err = read(&[&bytes[..len]]).expect_err(&format!("truncated to {len}"));
            assert!(message(err).contains("ended"), "truncated to {len}");
        }
    }

    #[test]
    fn malformed_input_is_an_error() {
        let (good, _) = sample();
        let header_len = header_bytes(b"ext").len();

        let mut bad = good.clone();
        bad[0] = b'X';
        assert!(message(read(&[&bad]).unwrap_err()).contains("signature"));
        assert!(message(read(&[b"PGCOPZ"]).unwrap_err()).contains("signature"));

        let mut oids = good.clone();
        oids[SIGNATURE.len() + 1] = 1; // flag bit 16: OIDs included
        assert!(message(read(&[&oids]).unwrap_err()).contains("flags"));

        let mut negative_ext = header_bytes(b"");
        negative_ext[SIGNATURE.len() + 4..SIGNATURE.len() + 8]
            .copy_from_slice(&(-5i32).to_be_bytes());
        assert!(message(read(&[&negative_ext]).unwrap_err()).contains("extension"));

        let mut wrong_count = header_bytes(b"ext");
        wrong_count.extend(tuple_bytes(&[None, None]));
        assert!(message(read(&[&wrong_count]).unwrap_err()).contains("2 fields"));

        let mut negative_len = header_bytes(b"ext");
        negative_len.extend_from_slice(&3i16.to_be_bytes());
        negative_len.extend_from_slice(&(-2i32).to_be_bytes());
        assert!(message(read(&[&negative_len]).unwrap_err()).contains("length -2"));

        let mut after_trailer = good.clone();
        after_trailer.push(0);
        assert!(message(read(&[&after_trailer]).unwrap_err()).contains("after the trailer"));
        // Also when the extra bytes come in a chunk of their own.
        assert!(message(read(&[&good, &[0]]).unwrap_err()).contains("after the trailer"));

        // A tuple's field count of 0x7fff: rejected before its fields arrive.
        let mut huge = good[..header_len].to_vec();
        huge.extend_from_slice(&i16::MAX.to_be_bytes());
        assert!(message(read(&[&huge]).unwrap_err()).contains("fields"));
    }

    #[test]
    fn an_error_from_the_callback_stops_the_reader() {
        let (bytes, _) = sample();
        let mut reader = CopyBinaryReader::<3>::new();
        let mut seen = 0;
        let err = reader
            .feed(&bytes, |_| {
                seen += 1;
                Err(sqlx::Error::Protocol("stop".into()))
            })
            .unwrap_err();
        assert_eq!(message(err), "stop");
        assert_eq!(seen, 1);
    }
}
