//! XDR (RFC 4506) encoding and decoding of the few types libvirt's protocol
//! needs. The decoder is bounded: it never allocates more than the bytes it
//! was given, and every length is checked against the remaining input and a
//! caller-supplied maximum before anything is read.

use thiserror::Error;

/// Largest string libvirt sends (`VIR_NET_MESSAGE_STRING_MAX`).
pub const STRING_MAX: usize = 4 * 1024 * 1024;
/// Length of a libvirt UUID.
pub const UUID_LEN: usize = 16;

/// Why XDR input could not be decoded.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum XdrError {
    /// The input ended inside a value.
    #[error("XDR input truncated: needed {needed} more bytes for {what}, {remaining} left")]
    Truncated {
        /// What was being read.
        what: &'static str,
        /// Bytes it needed.
        needed: usize,
        /// Bytes that were left.
        remaining: usize,
    },
    /// A length larger than the protocol allows.
    #[error("XDR {what} length {len} exceeds the maximum {max}")]
    TooLong {
        /// What was being read.
        what: &'static str,
        /// Declared length.
        len: usize,
        /// Protocol maximum.
        max: usize,
    },
    /// A value outside its type's range (a bool that is not 0 or 1, a bad enum…).
    #[error("XDR {what} has invalid value {value}")]
    Invalid {
        /// What was being read.
        what: &'static str,
        /// The value found.
        value: i64,
    },
    /// A string that is not UTF-8.
    #[error("XDR string is not UTF-8")]
    Utf8,
    /// Bytes left over after the whole value was read.
    #[error("XDR input has {0} unexpected trailing bytes")]
    Trailing(usize),
}

/// Appends XDR-encoded values to a buffer.
#[derive(Debug, Default)]
pub struct Encoder {
    buf: Vec<u8>,
}

impl Encoder {
    /// An empty encoder.
    pub fn new() -> Encoder {
        Encoder::default()
    }

    /// The encoded bytes.
    pub fn into_bytes(self) -> Vec<u8> {
        self.buf
    }

    /// `unsigned int`.
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.buf.extend_from_slice(&v.to_be_bytes());
        self
    }

    /// `int`.
    pub fn i32(&mut self, v: i32) -> &mut Self {
        self.buf.extend_from_slice(&v.to_be_bytes());
        self
    }

    /// `hyper`.
    pub fn i64(&mut self, v: i64) -> &mut Self {
        self.buf.extend_from_slice(&v.to_be_bytes());
        self
    }

    /// `bool`.
    pub fn bool(&mut self, v: bool) -> &mut Self {
        self.u32(u32::from(v))
    }

    fn pad(&mut self, len: usize) {
        let padding = (4 - len % 4) % 4;
        self.buf.extend(std::iter::repeat_n(0u8, padding));
    }

    /// Variable-length `opaque<>` / `string<>`: length, bytes, padding.
    pub fn opaque(&mut self, bytes: &[u8]) -> &mut Self {
        // Lengths above u32::MAX cannot be framed anyway; callers keep messages under 16 MiB.
        self.u32(u32::try_from(bytes.len()).unwrap_or(u32::MAX));
        self.buf.extend_from_slice(bytes);
        self.pad(bytes.len());
        self
    }

    /// `string<>`.
    pub fn string(&mut self, s: &str) -> &mut Self {
        self.opaque(s.as_bytes())
    }

    /// Optional string (`remote_string`, an XDR pointer).
    pub fn opt_string(&mut self, s: Option<&str>) -> &mut Self {
        match s {
            Some(s) => self.bool(true).string(s),
            None => self.bool(false),
        }
    }

    /// Fixed-length `opaque[n]` (no length prefix).
    pub fn fixed_opaque(&mut self, bytes: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(bytes);
        self.pad(bytes.len());
        self
    }
}

/// Reads XDR values from a byte slice.
#[derive(Debug)]
pub struct Decoder<'a> {
    input: &'a [u8],
}

impl<'a> Decoder<'a> {
    /// A decoder over `input`.
    pub fn new(input: &'a [u8]) -> Decoder<'a> {
        Decoder { input }
    }

    /// Bytes not read yet.
    pub fn remaining(&self) -> usize {
        self.input.len()
    }

    /// Fails unless every byte was read.
    pub fn finish(&self) -> Result<(), XdrError> {
        if self.input.is_empty() {
            Ok(())
        } else {
            Err(XdrError::Trailing(self.input.len()))
        }
    }

    fn take(&mut self, what: &'static str, n: usize) -> Result<&'a [u8], XdrError> {
        if n > self.input.len() {
            return Err(XdrError::Truncated {
                what,
                needed: n,
                remaining: self.input.len(),
            });
        }
        let (head, tail) = self.input.split_at(n);
        self.input = tail;
        Ok(head)
    }

    fn word(&mut self, what: &'static str) -> Result<[u8; 4], XdrError> {
        let bytes = self.take(what, 4)?;
        Ok([bytes[0], bytes[1], bytes[2], bytes[3]])
    }

    /// `unsigned int`.
    pub fn u32(&mut self, what: &'static str) -> Result<u32, XdrError> {
        Ok(u32::from_be_bytes(self.word(what)?))
    }

    /// `int`.
    pub fn i32(&mut self, what: &'static str) -> Result<i32, XdrError> {
        Ok(i32::from_be_bytes(self.word(what)?))
    }

    /// `hyper`.
    pub fn i64(&mut self, what: &'static str) -> Result<i64, XdrError> {
        let bytes = self.take(what, 8)?;
        let mut word = [0u8; 8];
        word.copy_from_slice(bytes);
        Ok(i64::from_be_bytes(word))
    }

    /// `unsigned hyper`.
    pub fn u64(&mut self, what: &'static str) -> Result<u64, XdrError> {
        Ok(self.i64(what)? as u64)
    }

    /// `bool`.
    pub fn bool(&mut self, what: &'static str) -> Result<bool, XdrError> {
        match self.u32(what)? {
            0 => Ok(false),
            1 => Ok(true),
            other => Err(XdrError::Invalid {
                what,
                value: i64::from(other),
            }),
        }
    }

    fn skip_padding(&mut self, what: &'static str, len: usize) -> Result<(), XdrError> {
        let padding = (4 - len % 4) % 4;
        self.take(what, padding).map(|_| ())
    }

    /// Variable-length `opaque<max>`.
    pub fn opaque(&mut self, what: &'static str, max: usize) -> Result<&'a [u8], XdrError> {
        let len = self.u32(what)? as usize;
        if len > max {
            return Err(XdrError::TooLong { what, len, max });
        }
        let bytes = self.take(what, len)?;
        self.skip_padding(what, len)?;
        Ok(bytes)
    }

    /// `string<STRING_MAX>`.
    pub fn string(&mut self, what: &'static str) -> Result<String, XdrError> {
        let bytes = self.opaque(what, STRING_MAX)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| XdrError::Utf8)
    }

    /// Optional string (`remote_string`).
    pub fn opt_string(&mut self, what: &'static str) -> Result<Option<String>, XdrError> {
        if self.bool(what)? {
            self.string(what).map(Some)
        } else {
            Ok(None)
        }
    }

    /// Fixed-length `opaque[N]`.
    pub fn fixed_opaque<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], XdrError> {
        let bytes = self.take(what, N)?;
        self.skip_padding(what, N)?;
        let mut out = [0u8; N];
        out.copy_from_slice(bytes);
        Ok(out)
    }

    /// An array length prefix, checked against `max` and against the bytes
    /// left (each element takes at least `min_element_size` bytes), so a
    /// hostile count cannot make the caller allocate.
    pub fn array_len(&mut self, what: &'static str, max: usize, min_element_size: usize) -> Result<usize, XdrError> {
        let len = self.u32(what)? as usize;
        if len > max {
            return Err(XdrError::TooLong { what, len, max });
        }
        let needed = len.saturating_mul(min_element_size.max(1));
        if needed > self.remaining() {
            return Err(XdrError::Truncated {
                what,
                needed,
                remaining: self.remaining(),
            });
        }
        Ok(len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let mut e = Encoder::new();
        e.u32(7)
            .i32(-2)
            .i64(-3)
            .bool(true)
            .string("abcde")
            .opt_string(None)
            .opt_string(Some("x"));
        e.fixed_opaque(&[9u8; UUID_LEN]);
        let bytes = e.into_bytes();
        assert_eq!(bytes.len() % 4, 0);
        let mut d = Decoder::new(&bytes);
        assert_eq!(d.u32("a").unwrap(), 7);
        assert_eq!(d.i32("b").unwrap(), -2);
        assert_eq!(d.i64("c").unwrap(), -3);
        assert!(d.bool("d").unwrap());
        assert_eq!(d.string("e").unwrap(), "abcde");
        assert_eq!(d.opt_string("f").unwrap(), None);
        assert_eq!(d.opt_string("g").unwrap().as_deref(), Some("x"));
        assert_eq!(d.fixed_opaque::<UUID_LEN>("h").unwrap(), [9u8; UUID_LEN]);
        d.finish().unwrap();
    }

    #[test]
    fn string_encoding_is_padded_to_four_bytes() {
        let mut e = Encoder::new();
        e.string("abcde");
        assert_eq!(e.into_bytes(), [0, 0, 0, 5, b'a', b'b', b'c', b'd', b'e', 0, 0, 0]);
    }

    #[test]
    fn hostile_input_is_an_error_not_a_panic_or_allocation() {
        // A string claiming 4 GiB.
        let mut d = Decoder::new(&[0xff, 0xff, 0xff, 0xff, 1, 2]);
        assert!(matches!(d.string("s"), Err(XdrError::TooLong { .. })));
        // A string claiming 100 bytes with 2 present.
        let mut d = Decoder::new(&[0, 0, 0, 100, 1, 2]);
        assert!(matches!(d.string("s"), Err(XdrError::Truncated { .. })));
        // An array claiming a million elements in 8 bytes.
        let mut d = Decoder::new(&[0, 0x0f, 0x42, 0x40, 0, 0, 0, 0]);
        assert!(matches!(d.array_len("a", 1 << 20, 4), Err(XdrError::Truncated { .. })));
        let mut d = Decoder::new(&[0, 0, 0, 2]);
        assert!(matches!(d.bool("b"), Err(XdrError::Invalid { value: 2, .. })));
        let mut d = Decoder::new(&[0, 0, 0, 2, 0xff, 0xfe, 0, 0]);
        assert_eq!(d.string("s"), Err(XdrError::Utf8));
        let d = Decoder::new(&[0]);
        assert_eq!(d.finish(), Err(XdrError::Trailing(1)));
        let mut d = Decoder::new(&[0, 0]);
        assert!(matches!(
            d.u32("u"),
            Err(XdrError::Truncated {
                needed: 4,
                remaining: 2,
                ..
            })
        ));
    }
}
