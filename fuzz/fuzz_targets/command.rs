//! The `/p0` command grammar (`mapping::command::parse`) on arbitrary text. Checks: no panic;
//! every command found has a request ID of one word and a duration only when it approves;
//! there are never more commands than lines; each command, written back in its canonical
//! form, parses to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use p0_relay::domain::Action;
use p0_relay::mapping::command::parse;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(commands) = parse(text) else {
        return;
    };
    assert!(commands.len() <= text.lines().count());
    for c in &commands {
        assert!(!c.request_id.is_empty());
        assert!(!c.request_id.contains(char::is_whitespace));
        if c.duration.is_some() {
            assert_eq!(c.action, Action::Approve);
        }
        let line = match &c.duration {
            Some(d) => format!("/p0 {} {} {d}", c.action, c.request_id),
            None => format!("/p0 {} {}", c.action, c.request_id),
        };
        assert_eq!(
            parse(&line).as_deref(),
            Ok(std::slice::from_ref(c)),
            "{line:?}"
        );
    }
});
