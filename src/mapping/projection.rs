//! Reading only what a mapping reads: the JSONPaths a mapping evaluates, known when it loads,
//! as a tree of member names, and a one-pass parse that validates the whole body, enforces the
//! nesting limit and builds only the parts of the document those paths can reach. Everything
//! else is checked and skipped without being allocated.
//!
//! A path made only of member names (`$.comment.user.login`) keeps that member whole. A path
//! with anything else (a wildcard, an index, a slice, a union, recursive descent) keeps whole
//! the value at its last plain member (`$.alerts[*]` keeps `$.alerts`); a filter keeps the
//! whole document (its expression may read `$`). A `for_each` path keeps its elements whole,
//! so the `@` paths that read them need nothing more. Evaluating the mapping on the projected
//! document gives what it gives on the full one (`tests/api/properties.rs` proves it on arbitrary
//! documents for every shipped mapping).

use std::cell::Cell;
use std::fmt;

use jsonpath_rust::parser::model::{JpQuery, Segment, Selector as Jp};
use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};

use super::expr::{Condition, Extract, From, Part, Selector};
use super::{Mapping, Oncall, Produce};

/// What of a body one mapping reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Projection(Node);

#[derive(Debug, Clone, PartialEq, Eq)]
enum Node {
    /// The value is kept whole.
    Whole,
    /// Of an object, only these members are kept (each projected further); any other value is
    /// kept whole.
    Members(Vec<(String, Node)>),
}

/// Why a body could not be parsed.
#[derive(Debug)]
pub enum ParseError {
    /// Arrays and objects nest deeper than the limit.
    TooDeep,
    /// Not JSON (the whole document is checked, read or not).
    Invalid(serde_json::Error),
}

impl Projection {
    /// Keeps the whole document: a full parse.
    pub fn full() -> Projection {
        Projection(Node::Whole)
    }

    /// Keeps nothing but what is checked: only the document's validity and depth matter.
    pub fn nothing() -> Projection {
        Projection(Node::Members(Vec::new()))
    }

    /// Whether this projection keeps the whole document.
    pub fn is_full(&self) -> bool {
        self.0 == Node::Whole
    }

    /// Everything `mapping` reads: its dedup parts, freshness times and every rule's paths.
    pub(super) fn of(mapping: &Mapping) -> Projection {
        let mut p = Projection::nothing();
        for s in mapping.dedup.selectors() {
            p.add(s);
        }
        for s in mapping.freshness.selectors() {
            p.add(s);
        }
        if let Some(s) = &mapping.truncated {
            p.add(s);
        }
        for rule in &mapping.rules {
            if let Some(each) = &rule.for_each {
                // The elements are kept whole: `@` paths and the element digest read them.
                p.add(&each.path);
                for k in &each.key {
                    p.add(k);
                }
            }
            for c in rule
                .when
                .iter()
                .chain(rule.ends_subject.condition())
                .chain(rule.reopens_subject.condition())
            {
                p.add_condition(c);
            }
            match &rule.produce {
                Produce::Nothing => {}
                Produce::Command(s) => p.add(s),
                Produce::Fields(f) => {
                    for x in [Some(&f.action), Some(&f.request_id), f.expiration.as_ref()]
                        .into_iter()
                        .flatten()
                    {
                        p.add_extract(x);
                    }
                }
            }
            if let Some(a) = &rule.actor {
                p.add(a);
            }
            if let Some(x) = &rule.subject {
                p.add_extract(x);
            }
            for x in rule
                .answer
                .iter()
                .flat_map(|a| a.comment.iter().chain(a.on.iter()))
            {
                p.add_extract(x);
            }
            match &rule.oncall {
                None | Some(Oncall::Opsgenie { .. }) => {}
                Some(Oncall::PagerDuty {
                    escalation_policy,
                    incident,
                    ..
                }) => {
                    for x in [escalation_policy, incident].into_iter().flatten() {
                        p.add_extract(x);
                    }
                }
                Some(Oncall::GitHub { owner, .. }) => p.add(owner),
            }
        }
        p
    }

    fn add_condition(&mut self, c: &Condition) {
        match c {
            Condition::Not(inner) => self.add_condition(inner),
            Condition::Any(all) => {
                for c in all {
                    self.add_condition(c);
                }
            }
            Condition::Test { selector, .. } => self.add(selector),
        }
    }

    fn add_extract(&mut self, x: &Extract) {
        match &x.from {
            From::Constant(_) => {}
            From::Select(s) => self.add(s),
            From::Template(parts) => {
                for part in parts {
                    if let Part::Value(alternatives) = part {
                        for s in alternatives {
                            self.add(s);
                        }
                    }
                }
            }
        }
    }

    /// Adds what a selector reads of the body. Header and `@` element selectors read none of
    /// it (elements are kept whole by their `for_each` path).
    fn add(&mut self, s: &Selector) {
        if let Selector::Path { query, .. } = s {
            self.add_query(query);
        }
    }

    /// Adds a path: its plain members, the value at the last of them kept whole.
    fn add_query(&mut self, query: &JpQuery) {
        if query.segments.iter().any(has_filter) {
            self.0 = Node::Whole;
            return;
        }
        let mut node = &mut self.0;
        for seg in &query.segments {
            let Segment::Selector(Jp::Name(name)) = seg else {
                break;
            };
            node = match node {
                Node::Whole => return,
                Node::Members(members) => {
                    let i = match members.iter().position(|(k, _)| k == name) {
                        Some(i) => i,
                        None => {
                            members.push((name.clone(), Node::Members(Vec::new())));
                            members.len() - 1
                        }
                    };
                    &mut members[i].1
                }
            };
        }
        *node = Node::Whole;
    }

    /// The document in `json`, with only what this projection keeps. Fails when the document
    /// is not JSON (anywhere, kept or not) or nests deeper than `max_depth`.
    pub fn parse(&self, json: &[u8], max_depth: usize) -> Result<Value, ParseError> {
        let ctx = Ctx {
            max_depth,
            too_deep: Cell::new(false),
        };
        // Outside strings JSON is ASCII, so a body is valid UTF-8 exactly when its strings
        // are: checked once for the whole body here (fast on ASCII), not string by string.
        let text = std::str::from_utf8(json).map_err(|e| {
            ParseError::Invalid(de::Error::custom(format_args!(
                "invalid UTF-8 at byte {}",
                e.valid_up_to()
            )))
        })?;
        let mut de = serde_json::Deserializer::from_str(text);
        let seed = Build {
            members: match &self.0 {
                Node::Whole => None,
                Node::Members(m) => Some(m),
            },
            depth: 0,
            ctx: &ctx,
        };
        let result = seed.deserialize(&mut de).and_then(|v| de.end().map(|()| v));
        match result {
            Ok(v) => Ok(v),
            Err(_) if ctx.too_deep.get() => Err(ParseError::TooDeep),
            Err(e) => Err(ParseError::Invalid(e)),
        }
    }
}

fn has_filter(seg: &Segment) -> bool {
    match seg {
        Segment::Descendant(inner) => has_filter(inner),
        Segment::Selector(s) => matches!(s, Jp::Filter(_)),
        Segment::Selectors(ss) => ss.iter().any(|s| matches!(s, Jp::Filter(_))),
    }
}

struct Ctx {
    max_depth: usize,
    too_deep: Cell<bool>,
}

impl Ctx {
    /// The depth of a container opened inside `depth` containers, or the error when that is
    /// deeper than allowed.
    fn open<E: de::Error>(&self, depth: usize) -> Result<usize, E> {
        if depth + 1 > self.max_depth {
            self.too_deep.set(true);
            return Err(E::custom("nesting too deep"));
        }
        Ok(depth + 1)
    }
}

/// Builds a value: whole (`members: None`, exactly as `serde_json::Value` would) or, for an
/// object, only the listed members.
#[derive(Clone, Copy)]
struct Build<'p> {
    members: Option<&'p [(String, Node)]>,
    depth: usize,
    ctx: &'p Ctx,
}

impl<'de> DeserializeSeed<'de> for Build<'_> {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Build<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any valid JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(Number::from_f64(v).map_or(Value::Null, Value::Number))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let depth = self.ctx.open(self.depth)?;
        let whole = Build {
            members: None,
            depth,
            ctx: self.ctx,
        };
        let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0));
        while let Some(v) = seq.next_element_seed(whole)? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let depth = self.ctx.open(self.depth)?;
        let mut out = Map::new();
        match self.members {
            None => {
                let whole = Build {
                    members: None,
                    depth,
                    ctx: self.ctx,
                };
                while let Some(key) = map.next_key::<String>()? {
                    let value = map.next_value_seed(whole)?;
                    out.insert(key, value);
                }
            }
            Some(members) => {
                while let Some(found) = map.next_key_seed(Key(members))? {
                    match found {
                        Some(i) => {
                            let (name, node) = &members[i];
                            let value = map.next_value_seed(Build {
                                members: match node {
                                    Node::Whole => None,
                                    Node::Members(m) => Some(m),
                                },
                                depth,
                                ctx: self.ctx,
                            })?;
                            out.insert(name.clone(), value);
                        }
                        None => map.next_value_seed(Skip {
                            depth,
                            ctx: self.ctx,
                        })?,
                    }
                }
            }
        }
        Ok(Value::Object(out))
    }
}

/// Reads an object key and says which kept member it names, if any, without allocating.
struct Key<'p>(&'p [(String, Node)]);

impl<'de> DeserializeSeed<'de> for Key<'_> {
    type Value = Option<usize>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Option<usize>, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for Key<'_> {
    type Value = Option<usize>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an object key")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Option<usize>, E> {
        Ok(self.0.iter().position(|(k, _)| k == v))
    }
}

/// Checks a value (syntax, strings, numbers, depth) exactly as a full parse would, and keeps
/// nothing of it.
#[derive(Clone, Copy)]
struct Skip<'p> {
    depth: usize,
    ctx: &'p Ctx,
}

impl<'de> DeserializeSeed<'de> for Skip<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Skip<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any valid JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }

    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }

    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }

    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }

    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }

    fn visit_none<E>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let inner = Skip {
            depth: self.ctx.open(self.depth)?,
            ctx: self.ctx,
        };
        while seq.next_element_seed(inner)?.is_some() {}
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let inner = Skip {
            depth: self.ctx.open(self.depth)?,
            ctx: self.ctx,
        };
        while map.next_key_seed(Key(&[]))?.is_some() {
            map.next_value_seed(inner)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonpath_rust::parser::parse_json_path;

    fn of(paths: &[&str]) -> Projection {
        let mut p = Projection::nothing();
        for path in paths {
            p.add_query(&parse_json_path(path).unwrap());
        }
        p
    }

    #[test]
    fn keeps_only_what_the_paths_reach() {
        let doc = br#"{"action":"created","comment":{"id":7,"body":"/p0 approve r 1h","user":{"login":"x"}},
            "issue":{"title":"t","labels":[{"name":"a"}]},"alerts":[{"a":1},{"b":[2]}],"n":null}"#;
        let p = of(&["$.action", "$.comment.body", "$.comment.id", "$.alerts[*]"]);
        let v = p.parse(doc, 64).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"action":"created","comment":{"id":7,"body":"/p0 approve r 1h"},
                "alerts":[{"a":1},{"b":[2]}]})
        );
        // A path to an object keeps it whole, whatever else reads inside it.
        let p = of(&["$.comment.user.login", "$.comment"]);
        assert_eq!(p.parse(doc, 64).unwrap()["comment"]["user"]["login"], "x");
        assert_eq!(
            p.parse(doc, 64).unwrap()["comment"]["body"],
            "/p0 approve r 1h"
        );
        // A filter may read `$`: the whole document is kept.
        let p = of(&["$.alerts[?@.a == 1]"]);
        assert!(p.is_full());
        let full: Value = serde_json::from_slice(doc).unwrap();
        assert_eq!(p.parse(doc, 64).unwrap(), full);
        assert_eq!(Projection::full().parse(doc, 64).unwrap(), full);
        // A member that is not an object where the path expects one is kept as it is.
        assert_eq!(
            of(&["$.n.x", "$.issue.title.y"]).parse(doc, 64).unwrap(),
            serde_json::json!({"n": null, "issue": {"title": "t"}})
        );
    }

    #[test]
    fn checks_the_whole_document_and_its_depth() {
        let p = of(&["$.a"]);
        // Not JSON in a part that is skipped is still not JSON.
        for bad in [
            &br#"{"a":1,"b":[1,}"#[..],
            br#"{"a":1,"b":"\x"}"#,
            br#"{"a":1,"b":1e999}"#,
            b"{\"a\":1,\"b\":\"\xff\"}",
            br#"{"a":1} x"#,
            br#"{"a":1,"b":"\ud800"}"#,
        ] {
            assert!(
                matches!(p.parse(bad, 64), Err(ParseError::Invalid(_))),
                "{}",
                String::from_utf8_lossy(bad)
            );
            assert!(serde_json::from_slice::<Value>(bad).is_err());
        }
        let deep = format!("{{\"a\":1,\"b\":{}1{}}}", "[".repeat(70), "]".repeat(70));
        assert!(matches!(
            p.parse(deep.as_bytes(), 64),
            Err(ParseError::TooDeep)
        ));
        assert!(p.parse(deep.as_bytes(), 80).is_ok());
        let exact = format!("{}{}", "[".repeat(64), "]".repeat(64));
        assert!(p.parse(exact.as_bytes(), 64).is_ok());
        assert!(matches!(
            p.parse(exact.as_bytes(), 63),
            Err(ParseError::TooDeep)
        ));
        // Escaped keys are read as their text; a repeated key keeps the last value.
        assert_eq!(
            p.parse(br#"{"\u0061":1,"a":2,"b":{"a":3}}"#, 64).unwrap(),
            serde_json::json!({"a":2})
        );
    }
}
