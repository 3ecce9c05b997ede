//! Output made safe for a terminal: what a sender, P0 or a mapping file wrote is shown, but
//! nothing in it can move the cursor, clear the screen, reorder or hide text.

use std::borrow::Cow;

/// True for characters a terminal acts on or hides rather than shows: control characters
/// (C0, DEL, C1) and the invisible format characters that reorder or hide text (bidirectional
/// overrides and isolates, zero-width characters, the byte-order mark, tags).
fn hidden_or_control(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{61c}'
                | '\u{200b}'..='\u{200f}'
                | '\u{2028}'..='\u{202e}'
                | '\u{2060}'..='\u{206f}'
                | '\u{feff}'
                | '\u{fff9}'..='\u{fffb}'
                | '\u{e0000}'..='\u{e007f}'
        )
}

/// `text` made safe to print: the characters `hidden_or_control` names written as escapes
/// (`\n`, `\r`, `\t`, else `\u{1b}`). Everything else (any script, emoji, backslashes, so
/// regexes read as written) is shown as it is.
pub fn terminal_safe(text: &str) -> Cow<'_, str> {
    if !text.chars().any(hidden_or_control) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if hidden_or_control(c) => out.push_str(&format!("\\u{{{:x}}}", u32::from(c))),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// Serialized JSON made safe to print: the characters `hidden_or_control` names (which can
/// only occur inside its strings) written as `\uXXXX` escapes; the value is unchanged.
pub fn json_safe(json: &str) -> Cow<'_, str> {
    if !json.chars().any(hidden_or_control) {
        return Cow::Borrowed(json);
    }
    let mut out = String::with_capacity(json.len() + 16);
    for c in json.chars() {
        if hidden_or_control(c) {
            let mut units = [0u16; 2];
            for u in c.encode_utf16(&mut units) {
                out.push_str(&format!("\\u{u:04x}"));
            }
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminal_safe_escapes_what_a_terminal_would_act_on() {
        assert_eq!(terminal_safe("req-1 Jörg 🚀"), "req-1 Jörg 🚀");
        assert_eq!(
            terminal_safe("a\u{1b}[2J\r\n\t\\S+\u{9b}\u{202e}\u{7f}\u{e0041}"),
            "a\\u{1b}[2J\\r\\n\\t\\S+\\u{9b}\\u{202e}\\u{7f}\\u{e0041}"
        );
    }

    #[test]
    fn json_safe_keeps_the_value() {
        let value = serde_json::json!({ "e": "\u{1b}]0;x\u{7}\u{85}\u{202e}\u{e0041}\\\"" });
        let text = serde_json::to_string(&value).unwrap();
        let safe = json_safe(&text);
        assert!(!safe.chars().any(hidden_or_control), "{safe}");
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&safe).unwrap(),
            value
        );
    }
}
