//! Kubernetes resource quantities (`256Mi`, `2Gi`, `1G`, `1.5Gi`, `1e9`) as
//! whole byte counts.

use thiserror::Error;

/// Why a string is not a usable byte quantity.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum QuantityError {
    /// Not of the form `<number><suffix>`.
    #[error("is not a Kubernetes quantity (e.g. 512Mi, 2Gi)")]
    Syntax,
    /// Fractional number of bytes, e.g. `0.5` or `100m`.
    #[error("is not a whole number of bytes (e.g. 512Mi, 2Gi)")]
    Fractional,
    /// More than 2^64 - 1 bytes.
    #[error("is too large")]
    Overflow,
}

/// Parses a Kubernetes quantity into a number of bytes.
///
/// Accepts the binary suffixes `Ki Mi Gi Ti Pi Ei`, the decimal ones
/// `k M G T P E`, a decimal exponent (`1e9`, `2E6`), and no suffix (bytes).
/// Rejects signs, milli (`m`) values that are not whole bytes, and anything
/// that is not a whole number of bytes.
pub fn parse_bytes(input: &str) -> Result<u64, QuantityError> {
    let s = input.trim();
    let number_end = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
    let (number, suffix) = s.split_at(number_end);
    let (int_part, frac_part) = match number.split_once('.') {
        Some((i, f)) => (i, f),
        None => (number, ""),
    };
    if int_part.is_empty() && frac_part.is_empty() {
        return Err(QuantityError::Syntax);
    }
    if !int_part.bytes().all(|b| b.is_ascii_digit()) || !frac_part.bytes().all(|b| b.is_ascii_digit()) {
        return Err(QuantityError::Syntax);
    }
    // value = digits / 10^frac_len * base^exp ; computed exactly in u128.
    let (base, exp): (u128, u32) = match suffix {
        "" => (1, 0),
        "Ki" => (1024, 1),
        "Mi" => (1024, 2),
        "Gi" => (1024, 3),
        "Ti" => (1024, 4),
        "Pi" => (1024, 5),
        "Ei" => (1024, 6),
        "k" => (10, 3),
        "M" => (10, 6),
        "G" => (10, 9),
        "T" => (10, 12),
        "P" => (10, 15),
        "E" => (10, 18),
        "m" => return parse_milli(int_part, frac_part),
        s if s.starts_with(['e', 'E']) => {
            let e: u32 = s[1..].parse().map_err(|_| QuantityError::Syntax)?;
            if e > 30 {
                return Err(QuantityError::Overflow);
            }
            (10, e)
        }
        _ => return Err(QuantityError::Syntax),
    };
    if int_part.len() + frac_part.len() > 30 {
        return Err(QuantityError::Overflow);
    }
    let digits: u128 = format!("{int_part}{frac_part}")
        .parse()
        .map_err(|_| QuantityError::Syntax)?;
    let multiplier = base.checked_pow(exp).ok_or(QuantityError::Overflow)?;
    let scaled = digits.checked_mul(multiplier).ok_or(QuantityError::Overflow)?;
    let divisor = 10u128.pow(frac_part.len() as u32);
    if scaled % divisor != 0 {
        return Err(QuantityError::Fractional);
    }
    u64::try_from(scaled / divisor).map_err(|_| QuantityError::Overflow)
}

fn parse_milli(int_part: &str, frac_part: &str) -> Result<u64, QuantityError> {
    if !frac_part.is_empty() {
        return Err(QuantityError::Fractional);
    }
    let milli: u128 = int_part.parse().map_err(|_| QuantityError::Overflow)?;
    if !milli.is_multiple_of(1000) {
        return Err(QuantityError::Fractional);
    }
    u64::try_from(milli / 1000).map_err(|_| QuantityError::Overflow)
}

/// Formats a byte count as the shortest exact binary quantity (`512Mi`,
/// `24Gi`, `1536Ki`, `1000`).
pub fn format_bytes(bytes: u64) -> String {
    const SUFFIXES: [&str; 6] = ["Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];
    let mut value = bytes;
    let mut suffix = "";
    for s in SUFFIXES {
        if value == 0 || !value.is_multiple_of(1024) {
            break;
        }
        value /= 1024;
        suffix = s;
    }
    format!("{value}{suffix}")
}

/// Deserializes a quantity written as a string (`512Mi`) or, as Kubernetes
/// also accepts, a plain number of bytes (`536870912`), into its text.
pub(crate) fn string_or_integer<'de, D>(deserializer: D) -> Result<Option<String>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    struct Text;
    impl serde::de::Visitor<'_> for Text {
        type Value = Option<String>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a Kubernetes quantity such as 512Mi or 2Gi, or a number of bytes")
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
            Ok(Some(v.to_owned()))
        }
        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Self::Value, E> {
            Ok(Some(v.to_string()))
        }
        fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Self::Value, E> {
            // Negative numbers reach the quantity parser, which names them.
            Ok(Some(v.to_string()))
        }
        fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Self::Value, E> {
            Ok(Some(v.to_string()))
        }
        fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_none<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
    }
    deserializer.deserialize_any(Text)
}

/// The CRD schema of such a quantity: Kubernetes' int-or-string.
pub(crate) fn int_or_string_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    // No anyOf of integer and string: kube's structural rewrite strips its types anyway.
    schemars::json_schema!({
        "nullable": true,
        "x-kubernetes-int-or-string": true
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binary_and_decimal_suffixes() {
        assert_eq!(parse_bytes("256Mi"), Ok(256 << 20));
        assert_eq!(parse_bytes("2Gi"), Ok(2 << 30));
        assert_eq!(parse_bytes("1G"), Ok(1_000_000_000));
        assert_eq!(parse_bytes("1.5Gi"), Ok(3 << 29));
        assert_eq!(parse_bytes("128974848"), Ok(128_974_848));
        assert_eq!(parse_bytes("129e6"), Ok(129_000_000));
        assert_eq!(parse_bytes("123k"), Ok(123_000));
        assert_eq!(parse_bytes("1Ki"), Ok(1024));
        assert_eq!(parse_bytes("5000m"), Ok(5));
        assert_eq!(parse_bytes(".5Ki"), Ok(512));
    }

    #[test]
    fn rejects_what_kubernetes_or_bytes_reject() {
        assert_eq!(parse_bytes("12 GB"), Err(QuantityError::Syntax));
        assert_eq!(parse_bytes("1GB"), Err(QuantityError::Syntax));
        assert_eq!(parse_bytes(""), Err(QuantityError::Syntax));
        assert_eq!(parse_bytes("Mi"), Err(QuantityError::Syntax));
        assert_eq!(parse_bytes("-1Gi"), Err(QuantityError::Syntax));
        assert_eq!(parse_bytes("1.2.3"), Err(QuantityError::Syntax));
        assert_eq!(parse_bytes("0.5"), Err(QuantityError::Fractional));
        assert_eq!(parse_bytes("100m"), Err(QuantityError::Fractional));
        assert_eq!(parse_bytes("16Ei"), Err(QuantityError::Overflow));
        assert_eq!(parse_bytes("1e99"), Err(QuantityError::Overflow));
        assert_eq!(
            parse_bytes("9999999999999999999999999999999999999"),
            Err(QuantityError::Overflow)
        );
    }

    #[test]
    fn formats_shortest_exact_binary_form() {
        assert_eq!(format_bytes(512 << 20), "512Mi");
        assert_eq!(format_bytes(24 << 30), "24Gi");
        assert_eq!(format_bytes(1536 << 10), "1536Ki");
        assert_eq!(format_bytes(1000), "1000");
        assert_eq!(format_bytes(0), "0");
        for b in [1u64, 1024, 3 << 29, 123_456_789_012] {
            assert_eq!(parse_bytes(&format_bytes(b)), Ok(b));
        }
    }
}
