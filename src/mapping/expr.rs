//! Compiled mapping pieces and their evaluation against one webhook: selectors, conditions,
//! extractions. Pure: values in, values out, no I/O.

use std::borrow::Cow;
use std::collections::BTreeMap;

use axum::http::{HeaderMap, HeaderName};
use jsonpath_rust::parser::model::{JpQuery, Segment, Selector as Jp};
use jsonpath_rust::query::js_path_process;
use regex::Regex;
use serde_json::Value;

use crate::domain::printable;

/// One webhook as the mapping sees it: headers and the parsed body.
#[derive(Clone, Copy)]
pub struct Input<'a> {
    pub headers: &'a HeaderMap,
    pub body: &'a Value,
}

/// Where a rule looks: the webhook, and the element a `for_each` rule is deciding on.
#[derive(Clone, Copy)]
pub struct Scope<'a> {
    pub input: Input<'a>,
    pub element: Option<&'a Value>,
}

impl<'a> std::convert::From<Input<'a>> for Scope<'a> {
    fn from(input: Input<'a>) -> Scope<'a> {
        Scope {
            input,
            element: None,
        }
    }
}

/// Where values come from: a compiled JSONPath into the body (`$...`) or into the current
/// `for_each` element (`@...`), or a header.
#[derive(Debug, Clone)]
pub enum Selector {
    Path { text: String, query: JpQuery },
    Element { text: String, query: JpQuery },
    Header(HeaderName),
}

impl Selector {
    /// Every non-null value the selector yields, as text (numbers and booleans in JSON form,
    /// arrays and objects as JSON). Element paths yield nothing outside a `for_each`.
    pub fn values<'a>(&self, input: Input<'a>) -> Vec<Cow<'a, str>> {
        self.values_in(input.into())
    }

    /// As `values`, with element paths reading `scope.element`.
    pub fn values_in<'a>(&self, scope: Scope<'a>) -> Vec<Cow<'a, str>> {
        match self {
            Selector::Path { .. } | Selector::Element { .. } => {
                self.nodes(scope).into_iter().filter_map(text).collect()
            }
            Selector::Header(name) => scope
                .input
                .headers
                .get_all(name)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .map(Cow::Borrowed)
                .collect(),
        }
    }

    /// The JSON values a path selects (none for a header).
    pub fn nodes<'a>(&self, scope: Scope<'a>) -> Vec<&'a Value> {
        let (query, root) = match self {
            Selector::Path { query, .. } => (query, scope.input.body),
            Selector::Element { query, .. } => match scope.element {
                Some(e) => (query, e),
                None => return Vec::new(),
            },
            Selector::Header(_) => return Vec::new(),
        };
        if let Some(found) = members(query, root) {
            return found.into_iter().collect();
        }
        js_path_process(query, root)
            .map(|refs| refs.into_iter().map(|r| r.val()).collect())
            .unwrap_or_default()
    }

    pub fn describe(&self) -> String {
        match self {
            Selector::Path { text, .. } | Selector::Element { text, .. } => text.clone(),
            Selector::Header(name) => format!("header {name}"),
        }
    }
}

/// For a path of member names only (`$.comment.user.login`, most paths), the value it selects
/// (if any), found by walking the members; `None` for other paths, which the JSONPath engine
/// evaluates. Walking gives what the engine gives (a test below proves it) without building
/// the engine's node paths.
fn members<'a>(query: &JpQuery, root: &'a Value) -> Option<Option<&'a Value>> {
    let plain = |seg: &Segment| matches!(seg, Segment::Selector(Jp::Name(_)));
    if !query.segments.iter().all(plain) {
        return None;
    }
    let mut at = root;
    for seg in &query.segments {
        let Segment::Selector(Jp::Name(name)) = seg else {
            return None;
        };
        match at.as_object().and_then(|m| m.get(name)) {
            Some(v) => at = v,
            None => return Some(None),
        }
    }
    Some(Some(at))
}

fn text(value: &Value) -> Option<Cow<'_, str>> {
    match value {
        Value::Null => None,
        Value::String(s) => Some(Cow::Borrowed(s)),
        other => Some(Cow::Owned(other.to_string())),
    }
}

/// The text form of a scalar from a mapping file, compared with payload values as text.
pub fn scalar_text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

#[derive(Debug, Clone)]
pub enum Test {
    Equals(String),
    OneOf(Vec<String>),
    Matches(Regex),
    Exists(bool),
}

#[derive(Debug, Clone)]
pub enum Condition {
    Test {
        selector: Selector,
        test: Test,
        /// The values are GitHub Markdown, tested as their reader sees them rendered.
        markdown: bool,
    },
    Not(Box<Condition>),
    Any(Vec<Condition>),
}

impl Condition {
    /// Whether the condition holds: a test holds when any value the selector yields passes.
    pub fn holds(&self, input: Scope<'_>) -> bool {
        match self {
            Condition::Not(inner) => !inner.holds(input),
            Condition::Any(all) => all.iter().any(|c| c.holds(input)),
            Condition::Test {
                selector,
                test,
                markdown,
            } => {
                let values = visible(selector.values_in(input), *markdown);
                match test {
                    Test::Exists(want) => values.is_empty() != *want,
                    Test::Equals(x) => values.iter().any(|v| v == x),
                    Test::OneOf(xs) => values.iter().any(|v| xs.iter().any(|x| v == x)),
                    Test::Matches(re) => values.iter().any(|v| re.is_match(v)),
                }
            }
        }
    }

    /// The condition in words, for `explain`.
    pub fn describe(&self) -> String {
        match self {
            Condition::Not(inner) => format!("not ({})", inner.describe()),
            Condition::Any(all) => format!(
                "any of ({})",
                all.iter()
                    .map(|c| c.describe())
                    .collect::<Vec<_>>()
                    .join("; ")
            ),
            Condition::Test { selector, test, .. } => {
                let s = selector.describe();
                match test {
                    Test::Exists(true) => format!("{s} exists"),
                    Test::Exists(false) => format!("{s} does not exist"),
                    Test::Equals(x) => format!("{s} equals `{x}`"),
                    Test::OneOf(xs) => format!("{s} is one of [{}]", xs.join(", ")),
                    Test::Matches(re) => format!("{s} matches /{re}/"),
                }
            }
        }
    }

    /// What the condition's selector saw, for `explain`.
    pub fn seen(&self, input: Scope<'_>) -> String {
        match self {
            Condition::Not(inner) => inner.seen(input),
            Condition::Any(all) => all
                .iter()
                .map(|c| c.seen(input))
                .collect::<Vec<_>>()
                .join("; "),
            Condition::Test { selector, .. } => {
                let values = selector.values_in(input);
                if values.is_empty() {
                    "nothing".into()
                } else {
                    values
                        .iter()
                        .take(4)
                        .map(|v| format!("`{}`", printable(v)))
                        .collect::<Vec<_>>()
                        .join(", ")
                }
            }
        }
    }
}

/// A value to extract: a constant, or selected values refined by a regex capture, a value map
/// and a default.
#[derive(Debug, Clone)]
pub struct Extract {
    pub from: From,
    pub regex: Option<Regex>,
    pub map: Option<BTreeMap<String, String>>,
    pub default: Option<String>,
    /// The values are GitHub Markdown: what a reader cannot see rendered is dropped first.
    pub markdown: bool,
}

/// `values` as their reader sees them when `markdown` says they are GitHub Markdown.
fn visible(values: Vec<Cow<'_, str>>, markdown: bool) -> Vec<Cow<'_, str>> {
    if !markdown {
        return values;
    }
    values
        .into_iter()
        .map(|v| match visible_markdown(&v) {
            Cow::Borrowed(_) => v,
            Cow::Owned(o) => Cow::Owned(o),
        })
        .collect()
}

/// Markdown text as its reader sees it rendered (GitHub-flavoured, by pulldown-cmark): the
/// text of paragraphs, headings, list items, tables and code, each block on lines of its own.
/// Raw HTML is left out whole (comments, tags and their attributes, blocks such as `<style>`
/// or `<details>`), and so are link reference definitions (whose titles never show): a line
/// hidden in any of them (a `P0-Request:` in a pull request template's comment) is not the
/// approver's to have seen. Visible text inside an HTML block is left out too: the safe side.
pub fn visible_markdown(text: &str) -> Cow<'_, str> {
    use pulldown_cmark::{Event, Options, Parser, TagEnd};
    let options = Options::ENABLE_TABLES
        | Options::ENABLE_STRIKETHROUGH
        | Options::ENABLE_TASKLISTS
        | Options::ENABLE_FOOTNOTES;
    let mut out = String::with_capacity(text.len());
    for event in Parser::new_ext(text, options) {
        match event {
            Event::Text(t) | Event::Code(t) => out.push_str(&t),
            Event::SoftBreak | Event::HardBreak => out.push('\n'),
            Event::End(
                TagEnd::Paragraph
                | TagEnd::Heading(_)
                | TagEnd::Item
                | TagEnd::CodeBlock
                | TagEnd::TableCell
                | TagEnd::TableRow
                | TagEnd::TableHead,
            ) => out.push('\n'),
            _ => {}
        }
    }
    Cow::Owned(out)
}

#[derive(Debug, Clone)]
pub enum From {
    Constant(String),
    Select(Selector),
    /// Literal text and placeholders, joined into one value.
    Template(Vec<Part>),
}

/// A piece of a template: literal text, or the first value of the first selector that
/// yields one.
#[derive(Debug, Clone)]
pub enum Part {
    Text(String),
    Value(Vec<Selector>),
}

/// The one value a template makes, or which placeholder yielded nothing.
fn fill(parts: &[Part], input: Scope<'_>) -> Result<String, String> {
    let mut out = String::new();
    for part in parts {
        match part {
            Part::Text(t) => out.push_str(t),
            Part::Value(alternatives) => {
                let value = alternatives
                    .iter()
                    .find_map(|sel| sel.values_in(input).into_iter().next())
                    .ok_or_else(|| {
                        let names: Vec<String> =
                            alternatives.iter().map(Selector::describe).collect();
                        format!("{} yielded nothing", names.join(" | "))
                    })?;
                out.push_str(&value);
            }
        }
    }
    Ok(out)
}

impl Extract {
    /// A constant value.
    pub fn constant(value: &str) -> Extract {
        Extract {
            from: From::Constant(value.to_owned()),
            regex: None,
            map: None,
            default: None,
            markdown: false,
        }
    }

    /// Every value, in order and without repeats; the default when there is none; otherwise an
    /// error saying why nothing came out.
    pub fn all(&self, input: Scope<'_>) -> Result<Vec<String>, String> {
        let mut why = match &self.from {
            From::Select(sel) => format!("{} yielded nothing", sel.describe()),
            From::Constant(_) | From::Template(_) => String::new(),
        };
        let raw: Vec<Cow<'_, str>> = match &self.from {
            From::Constant(c) => vec![Cow::Borrowed(c.as_str())],
            From::Select(sel) => visible(sel.values_in(input), self.markdown),
            From::Template(parts) => match fill(parts, input) {
                Ok(v) => vec![Cow::Owned(v)],
                Err(e) => {
                    why = e;
                    Vec::new()
                }
            },
        };
        let mut out: Vec<String> = Vec::new();
        for value in &raw {
            let captured: Vec<&str> = match &self.regex {
                None => vec![value.as_ref()],
                Some(re) => {
                    let found: Vec<&str> = re
                        .captures_iter(value)
                        .filter_map(|c| c.get(1).or_else(|| c.get(0)))
                        .map(|m| m.as_str())
                        .collect();
                    if found.is_empty() {
                        why = format!("/{re}/ did not match `{}`", printable(value));
                    }
                    found
                }
            };
            for item in captured {
                let mapped = match &self.map {
                    None => Some(item.to_owned()),
                    Some(map) => {
                        let hit = map.get(item).cloned();
                        if hit.is_none() {
                            why = format!("the map has no entry for `{}`", printable(item));
                        }
                        hit
                    }
                };
                if let Some(m) = mapped
                    && !out.contains(&m)
                {
                    out.push(m);
                }
            }
        }
        if out.is_empty() {
            match &self.default {
                Some(d) => out.push(d.clone()),
                None => return Err(why),
            }
        }
        Ok(out)
    }

    /// The first value (see `all`).
    pub fn first(&self, input: Scope<'_>) -> Result<String, String> {
        self.all(input)?
            .into_iter()
            .next()
            .ok_or_else(|| "nothing to extract".to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonpath_rust::parser::parse_json_path;
    use proptest::prelude::*;

    fn doc() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            "[a-c]{0,3}".prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 32, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..3).prop_map(Value::Array),
                prop::collection::btree_map("[a-c]{1,2}|0|a b|a[.]b", inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #[test]
        fn walking_members_selects_what_the_engine_selects(
            doc in doc(),
            names in prop::collection::vec("[a-c]{1,2}|0|a b|a[.]b", 0..4),
            bracket in any::<bool>(),
        ) {
            let path: String = names
                .iter()
                .map(|n| if bracket || !n.chars().all(char::is_alphanumeric) || n == "0" {
                    format!("['{n}']")
                } else {
                    format!(".{n}")
                })
                .collect();
            let query = parse_json_path(&format!("${path}")).unwrap();
            let walked = members(&query, &doc).expect("a path of names");
            let engine: Vec<&Value> = js_path_process(&query, &doc)
                .map(|refs| refs.into_iter().map(|r| r.val()).collect())
                .unwrap_or_default();
            prop_assert_eq!(walked.into_iter().collect::<Vec<_>>(), engine);
        }
    }

    #[test]
    fn markdown_as_its_reader_sees_it() {
        let seen = |text: &str| -> Vec<String> {
            visible_markdown(text)
                .lines()
                .filter(|l| l.contains("P0-Request"))
                .map(str::to_owned)
                .collect()
        };
        for (text, want) in [
            ("P0-Request: a", vec!["P0-Request: a"]),
            ("Fixes it.\r\nP0-Request: a\r\n", vec!["P0-Request: a"]),
            (
                "x\n<!--\nP0-Request: hidden\n-->\nP0-Request: seen",
                vec!["P0-Request: seen"],
            ),
            ("a <!-- P0-Request: b --> c", vec![]),
            ("before\n\n<!-- never closed\nP0-Request: x", vec![]),
            // A link reference definition's title spans lines and never shows.
            (
                "[x]: https://a.example \"\nP0-Request: req-h\n\"\n\ntext",
                vec![],
            ),
            // An attribute value, and an element the renderer drops with its content.
            ("<img alt=\"\nP0-Request: req-h\n\" src=\"a.png\">", vec![]),
            ("<style>\nP0-Request: req-h\n</style>", vec![]),
            (
                "<details>\n\nP0-Request: in-details\n\n</details>",
                vec!["P0-Request: in-details"],
            ),
            ("- item\n- P0-Request: listed", vec!["P0-Request: listed"]),
            ("```\nP0-Request: code\n```", vec!["P0-Request: code"]),
        ] {
            assert_eq!(seen(text), want, "{text:?}");
        }
    }

    #[test]
    fn other_paths_are_left_to_the_engine() {
        for p in ["$.a[0]", "$.a[*]", "$..a", "$.a[?@.b]", "$['a','b']"] {
            assert!(
                members(&parse_json_path(p).unwrap(), &Value::Null).is_none(),
                "{p}"
            );
        }
    }
}
