//! The human command grammar, wherever a person types text: `/p0 approve <id> [<duration>]`,
//! `/p0 deny <id>`, `/p0 revoke <id>`, each on a line of its own, the verb in any case.

use crate::domain::{Action, printable};

/// One command as typed; the ID and duration are validated by policy, not here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    pub action: Action,
    pub request_id: String,
    pub duration: Option<String>,
}

/// Every command in `text`. `Ok(empty)` when there is none; `Err` names the first line that
/// starts like a command but is not one, so a typo is answered rather than half-obeyed.
pub fn parse(text: &str) -> Result<Vec<Command>, String> {
    let mut commands = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let mut words = line.split_whitespace();
        match words.next() {
            Some(first) if first.eq_ignore_ascii_case("/p0") => {}
            _ => continue,
        }
        let line_no = n + 1;
        let verb = words.next().ok_or_else(|| {
            format!("line {line_no}: `/p0` needs a verb: approve, deny or revoke")
        })?;
        let action = Action::parse(verb).ok_or_else(|| {
            format!(
                "line {line_no}: unknown verb `{}` (approve, deny or revoke)",
                printable(verb)
            )
        })?;
        let request_id = words
            .next()
            .ok_or_else(|| format!("line {line_no}: `/p0 {action}` needs a request ID"))?;
        let duration = words.next();
        if words.next().is_some() {
            return Err(format!(
                "line {line_no}: too many words after `/p0 {action}`"
            ));
        }
        if duration.is_some() && action != Action::Approve {
            return Err(format!("line {line_no}: `/p0 {action}` takes no duration"));
        }
        commands.push(Command {
            action,
            request_id: request_id.to_owned(),
            duration: duration.map(str::to_owned),
        });
    }
    Ok(commands)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmd(action: Action, id: &str, duration: Option<&str>) -> Command {
        Command {
            action,
            request_id: id.into(),
            duration: duration.map(Into::into),
        }
    }

    #[test]
    fn grammar() {
        use Action::*;
        let ok: &[(&str, Vec<Command>)] = &[
            (
                "/p0 approve req-1 2h",
                vec![cmd(Approve, "req-1", Some("2h"))],
            ),
            ("/p0 approve req-1", vec![cmd(Approve, "req-1", None)]),
            ("/P0 APPROVE req-1", vec![cmd(Approve, "req-1", None)]),
            ("  /p0   Deny   req-2  ", vec![cmd(Deny, "req-2", None)]),
            (
                "LGTM\r\n/p0 revoke r3\r\nthanks",
                vec![cmd(Revoke, "r3", None)],
            ),
            (
                "/p0 approve a 1h\n/p0 deny b",
                vec![cmd(Approve, "a", Some("1h")), cmd(Deny, "b", None)],
            ),
            ("no command here", vec![]),
            ("please run `/p0 approve x` later", vec![]),
            ("> /p0 approve quoted", vec![]),
            ("/p0approve x", vec![]),
            ("", vec![]),
            // The ID is policy's to judge: the grammar keeps it as typed.
            ("/p0 approve ../../x", vec![cmd(Approve, "../../x", None)]),
        ];
        for (text, want) in ok {
            assert_eq!(&parse(text).unwrap(), want, "{text:?}");
        }
        let bad: &[(&str, &str)] = &[
            ("/p0", "needs a verb"),
            ("/p0 grant x", "unknown verb `grant`"),
            ("/p0 approve", "needs a request ID"),
            ("/p0 approve x 2h now", "too many words"),
            ("/p0 deny x 2h", "takes no duration"),
            ("ok\n/p0 revoke", "line 2"),
        ];
        for (text, fragment) in bad {
            let err = parse(text).unwrap_err();
            assert!(err.contains(fragment), "{text:?}: {err}");
        }
    }
}
