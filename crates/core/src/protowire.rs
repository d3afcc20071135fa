//! A borrowing reader of the protobuf wire format (varints, keys, length-delimited
//! fields, fixed-width numbers; unknown fields and groups skipped) for the decoders on
//! the ingest hot path that must not allocate per string.
//!
//! prost's derived types own a `String` per string field and a `Vec` per repeated one;
//! for a remote-write request (a name and a few labels per series, usually one sample)
//! that made decoding cost about as much as validating and storing the samples. This
//! reader hands out slices of the buffer instead. It accepts and refuses what prost
//! accepts and refuses (the remote-write tests and fuzz target check the two agree).

/// What a malformed buffer is refused for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("the buffer ends inside a field")]
    Truncated,
    #[error("a varint is longer than 64 bits")]
    Varint,
    #[error("a field key is invalid (field number 0, above 2^29, or wire type 6 or 7)")]
    Key,
    #[error("field {field} has wire type {found}, not {expected}")]
    WireType { field: u32, found: u8, expected: u8 },
    #[error("a string field is not UTF-8")]
    Utf8,
    #[error("a group ends that was not started, or ends another group")]
    Group,
    #[error("messages and groups nest more than 100 deep")]
    Depth,
}

/// Wire types (the low three bits of a key).
pub const VARINT: u8 = 0;
pub const FIXED64: u8 = 1;
pub const LEN: u8 = 2;
const START_GROUP: u8 = 3;
const END_GROUP: u8 = 4;
const FIXED32: u8 = 5;

/// prost's recursion limit: each message nested in another, and each group skipped in a
/// field, takes one off it, and a field is refused when none is left.
const RECURSION_LIMIT: u32 = 100;

/// Reads the fields of one message off the front of a buffer.
#[derive(Debug, Clone, Copy)]
pub struct Reader<'a> {
    buf: &'a [u8],
    /// What is left of the recursion limit for this message's fields.
    depth_left: u32,
}

impl<'a> Reader<'a> {
    /// A reader of a top-level message.
    pub fn new(buf: &'a [u8]) -> Self {
        Reader {
            buf,
            depth_left: RECURSION_LIMIT,
        }
    }

    /// Reads a length-delimited field holding a message nested in this one: a reader of
    /// its fields, one level deeper.
    pub fn message(&mut self) -> Result<Reader<'a>, WireError> {
        if self.depth_left == 0 {
            return Err(WireError::Depth);
        }
        Ok(Reader {
            buf: self.bytes()?,
            depth_left: self.depth_left - 1,
        })
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// A base-128 varint of at most ten bytes, the tenth holding only the top bit.
    #[inline]
    pub fn varint(&mut self) -> Result<u64, WireError> {
        let mut rest = self.buf;
        match crate::varint::get(&mut rest) {
            Some(v) => {
                self.buf = rest;
                Ok(v)
            }
            // Ten bytes were there, so the varint itself is bad; else the input ended.
            None if self.buf.len() >= 10 => Err(WireError::Varint),
            None => Err(WireError::Truncated),
        }
    }

    /// A field key: (field number, wire type).
    pub fn key(&mut self) -> Result<(u32, u8), WireError> {
        let key = self.varint()?;
        let field = key >> 3;
        let wire = (key & 7) as u8;
        if key > u64::from(u32::MAX) || field == 0 || wire > FIXED32 {
            return Err(WireError::Key);
        }
        Ok((field as u32, wire))
    }

    /// Fails unless a known field came with the wire type its schema gives it.
    pub fn expect(field: u32, found: u8, expected: u8) -> Result<(), WireError> {
        if found == expected {
            Ok(())
        } else {
            Err(WireError::WireType { field, found, expected })
        }
    }

    /// A length-delimited field's bytes.
    pub fn bytes(&mut self) -> Result<&'a [u8], WireError> {
        let len = self.varint()?;
        let len = usize::try_from(len).map_err(|_| WireError::Truncated)?;
        self.take(len)
    }

    /// A length-delimited field holding UTF-8.
    pub fn str(&mut self) -> Result<&'a str, WireError> {
        std::str::from_utf8(self.bytes()?).map_err(|_| WireError::Utf8)
    }

    pub fn fixed64(&mut self) -> Result<u64, WireError> {
        let bytes = self.take(8)?;
        Ok(u64::from_le_bytes(bytes.try_into().expect("took 8 bytes")))
    }

    /// Skips the value of a field this decoder does not know.
    pub fn skip(&mut self, field: u32, wire: u8) -> Result<(), WireError> {
        self.skip_at(field, wire, self.depth_left)
    }

    fn skip_at(&mut self, field: u32, wire: u8, depth_left: u32) -> Result<(), WireError> {
        if depth_left == 0 {
            return Err(WireError::Depth);
        }
        match wire {
            VARINT => self.varint().map(drop),
            FIXED64 => self.take(8).map(drop),
            LEN => self.bytes().map(drop),
            FIXED32 => self.take(4).map(drop),
            START_GROUP => loop {
                let (inner, inner_wire) = self.key()?;
                if inner_wire == END_GROUP {
                    return if inner == field { Ok(()) } else { Err(WireError::Group) };
                }
                self.skip_at(inner, inner_wire, depth_left - 1)?;
            },
            _ => Err(WireError::Group),
        }
    }

    fn take(&mut self, len: usize) -> Result<&'a [u8], WireError> {
        if len > self.buf.len() {
            return Err(WireError::Truncated);
        }
        let (head, rest) = self.buf.split_at(len);
        self.buf = rest;
        Ok(head)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn encode_varint(value: u64) -> Vec<u8> {
        let mut out = Vec::new();
        prost::encoding::encode_varint(value, &mut out);
        out
    }

    #[test]
    fn varints_as_the_spec_writes_them() {
        // The encoding guide's own examples: 1 and 150.
        assert_eq!(Reader::new(&[0x01]).varint(), Ok(1));
        assert_eq!(Reader::new(&[0x96, 0x01]).varint(), Ok(150));
        let max = encode_varint(u64::MAX);
        assert_eq!(max.len(), 10);
        assert_eq!(Reader::new(&max).varint(), Ok(u64::MAX));
        // An eleventh byte, or a tenth with more than the top bit, is not a 64-bit varint.
        assert_eq!(Reader::new(&[0xff; 11]).varint(), Err(WireError::Varint));
        let mut over = max.clone();
        over[9] = 0x02;
        assert_eq!(Reader::new(&over).varint(), Err(WireError::Varint));
        assert_eq!(Reader::new(&[0x96]).varint(), Err(WireError::Truncated));
        assert_eq!(Reader::new(&[]).varint(), Err(WireError::Truncated));
    }

    #[test]
    fn keys_fields_and_groups() {
        // Field 1, varint 150 (the guide's example message), then a string field 2.
        let mut r = Reader::new(&[0x08, 0x96, 0x01, 0x12, 0x02, b'h', b'i']);
        assert_eq!(r.key(), Ok((1, VARINT)));
        assert_eq!(r.varint(), Ok(150));
        assert_eq!(r.key(), Ok((2, LEN)));
        assert_eq!(r.str(), Ok("hi"));
        assert!(r.is_empty());
        assert_eq!(Reader::new(&[0x00]).key(), Err(WireError::Key), "field 0");
        assert_eq!(Reader::new(&[0x0e]).key(), Err(WireError::Key), "wire type 6");
        let mut short = Reader::new(&[0x12, 0x05, b'a']);
        short.key().unwrap();
        assert_eq!(short.bytes(), Err(WireError::Truncated));
        assert_eq!(Reader::new(&[0x02, 0xff, 0xfe]).str(), Err(WireError::Utf8));
        // A group (field 3) holding a varint field, skipped whole; a stray end is refused.
        let mut group = Reader::new(&[0x1b, 0x08, 0x01, 0x1c, 0x08, 0x07]);
        let (field, wire) = group.key().unwrap();
        group.skip(field, wire).unwrap();
        assert_eq!(group.key(), Ok((1, VARINT)));
        let mut stray = Reader::new(&[0x1c]);
        let (field, wire) = stray.key().unwrap();
        assert_eq!(stray.skip(field, wire), Err(WireError::Group));
        // prost's limit: a field inside 99 nested groups is the last one skipped at the
        // top level (100 levels in all); one more is refused, as a field of a message
        // nested a level deeper already is.
        let nest = |groups: usize| -> Vec<u8> {
            let mut bytes = vec![0x1b; groups];
            bytes.extend_from_slice(&[0x08, 0x00]);
            bytes.extend(std::iter::repeat_n(0x1c, groups));
            bytes
        };
        let skip_all = |reader: &mut Reader<'_>| -> Result<(), WireError> {
            while !reader.is_empty() {
                let (field, wire) = reader.key()?;
                reader.skip(field, wire)?;
            }
            Ok(())
        };
        assert_eq!(skip_all(&mut Reader::new(&nest(99))), Ok(()));
        assert_eq!(skip_all(&mut Reader::new(&nest(100))), Err(WireError::Depth));
        let in_message = |groups: usize| -> Result<(), WireError> {
            let inner = nest(groups);
            let mut outer = vec![0x0a];
            outer.extend(encode_varint(inner.len() as u64));
            outer.extend_from_slice(&inner);
            let mut top = Reader::new(&outer);
            top.key()?;
            skip_all(&mut top.message()?)
        };
        assert_eq!(in_message(98), Ok(()));
        assert_eq!(in_message(99), Err(WireError::Depth));
    }

    proptest! {
        #[test]
        fn varints_round_trip(value in any::<u64>()) {
            let bytes = encode_varint(value);
            let mut r = Reader::new(&bytes);
            prop_assert_eq!(r.varint(), Ok(value));
            prop_assert!(r.is_empty());
        }

        #[test]
        fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut r = Reader::new(&bytes);
            while let Ok((field, wire)) = r.key() {
                if r.skip(field, wire).is_err() {
                    break;
                }
            }
        }
    }
}
