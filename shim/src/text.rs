//! Text from outside (libvirt's error messages, template and annotation
//! values) made safe to print: the shim's stderr and termination message are
//! read by people and by Kubernetes, so a peer must not be able to forge a
//! line (`\n[virtkube-shim] exit 0`), move the cursor with escape sequences,
//! or fill the 4 KiB termination message with one value.

/// Longest log line the shim writes, in bytes.
pub const MAX_LOG_LINE: usize = 2048;
/// Longest termination message: Kubernetes keeps at most 4096 bytes.
pub const MAX_TERMINATION_MESSAGE: usize = 4000;

/// `text` on one line: control characters escaped (`\n`, `\t`, `\x1b`, …),
/// and cut to at most `max` bytes with a note of how much was left out.
pub fn printable(text: &str, max: usize) -> String {
    let mut out = String::with_capacity(text.len().min(max));
    for (at, c) in text.char_indices() {
        let piece = match c {
            '\n' => "\\n".to_owned(),
            '\r' => "\\r".to_owned(),
            '\t' => "\\t".to_owned(),
            c if c.is_control() => c.escape_unicode().to_string(),
            c => c.to_string(),
        };
        if out.len() + piece.len() > max {
            let rest = text.len() - at;
            out.push_str(&format!("… ({rest} more bytes)"));
            break;
        }
        out.push_str(&piece);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_cannot_forge_a_line_or_move_the_cursor() {
        let forged = "refused\n[virtkube-shim] exit 0: the guest stopped\x1b[2K\r\t\u{85}";
        let safe = printable(forged, 1000);
        assert!(!safe.chars().any(char::is_control), "{safe:?}");
        assert_eq!(
            safe,
            "refused\\n[virtkube-shim] exit 0: the guest stopped\\u{1b}[2K\\r\\t\\u{85}"
        );
    }

    #[test]
    fn long_text_is_cut_on_a_character_boundary_and_says_so() {
        let long = "é".repeat(100_000);
        let cut = printable(&long, 100);
        assert!(cut.len() <= 100 + "… (199900 more bytes)".len(), "{}", cut.len());
        assert!(cut.ends_with("more bytes)"), "{cut}");
        assert_eq!(printable("short", 100), "short");
    }
}
