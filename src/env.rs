//! The environment a config is read against: the process environment over an optional env
//! file, `${VAR}` / `${VAR:-default}` expansion, and `VAR_FILE` for secrets mounted as files.

use std::collections::HashMap;
use std::path::Path;

/// Variables visible to `${...}` references. The process environment wins over the env file.
#[derive(Clone, Debug, Default)]
pub struct Env {
    file: HashMap<String, String>,
    overlay: HashMap<String, String>,
    process: bool,
    /// Unset `${VAR}`s expand to `STAND_IN` instead of failing: for checking the syntax of
    /// mapping files whose sources are not enabled.
    stand_ins: bool,
}

/// What an unset variable reads as under `with_stand_ins`: valid as a token, a password and
/// a base64 (Standard Webhooks) secret alike.
pub const STAND_IN: &str = "c3RhbmQtaW4=";

impl Env {
    /// The process environment alone.
    pub fn process() -> Env {
        Env {
            process: true,
            ..Env::default()
        }
    }

    /// The process environment over the `KEY=VALUE` lines of `path`.
    pub fn with_file(path: &Path) -> Result<Env, String> {
        let mut env = Env::process();
        let iter = dotenvy::from_path_iter(path)
            .map_err(|e| format!("{}: cannot read env file: {e}", path.display()))?;
        for item in iter {
            let (key, value) =
                item.map_err(|e| format!("{}: bad line in env file: {e}", path.display()))?;
            env.file.insert(key, value);
        }
        Ok(env)
    }

    /// Variables that take precedence over everything else (mapping test cases set these).
    pub fn overlay(&self, vars: &HashMap<String, String>) -> Env {
        let mut env = self.clone();
        env.overlay
            .extend(vars.iter().map(|(k, v)| (k.clone(), v.clone())));
        env
    }

    /// The same variables, with unset ones standing in rather than failing.
    pub fn with_stand_ins(&self) -> Env {
        Env {
            stand_ins: true,
            ..self.clone()
        }
    }

    /// A variable's value: `NAME` itself, else the contents of the file `NAME_FILE` names.
    pub fn get(&self, name: &str) -> Result<Option<String>, String> {
        if let Some(v) = self.raw(name) {
            return Ok(Some(v));
        }
        let file_var = format!("{name}_FILE");
        match self.raw(&file_var) {
            None => Ok(None),
            Some(path) => std::fs::read_to_string(&path)
                .map(|s| Some(s.trim_end_matches(['\r', '\n']).to_owned()))
                .map_err(|e| format!("{file_var}: cannot read `{path}`: {e}")),
        }
    }

    fn raw(&self, name: &str) -> Option<String> {
        if let Some(v) = self.overlay.get(name) {
            return Some(v.clone());
        }
        if self.process
            && let Ok(v) = std::env::var(name)
        {
            return Some(v);
        }
        self.file.get(name).cloned()
    }

    /// Expands every `${VAR}` and `${VAR:-default}` in `text`. `$$` stands for a literal `$`.
    /// An unset `${VAR}` is an error naming it; `${VAR:-}` says empty is fine.
    pub fn expand(&self, text: &str) -> Result<String, String> {
        let mut out = String::with_capacity(text.len());
        let mut rest = text;
        while let Some(pos) = rest.find('$') {
            out.push_str(&rest[..pos]);
            let after = &rest[pos + 1..];
            if let Some(stripped) = after.strip_prefix('$') {
                out.push('$');
                rest = stripped;
            } else if let Some(body) = after.strip_prefix('{') {
                let end = body
                    .find('}')
                    .ok_or_else(|| format!("unclosed `${{` in `{text}`"))?;
                let inner = &body[..end];
                let (name, default) = match inner.split_once(":-") {
                    Some((n, d)) => (n, Some(d)),
                    None => (inner, None),
                };
                if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
                {
                    return Err(format!("`${{{inner}}}` is not a valid variable reference"));
                }
                match (self.get(name)?, default) {
                    (Some(v), _) => out.push_str(&v),
                    (None, Some(d)) => out.push_str(d),
                    (None, None) if self.stand_ins => out.push_str(STAND_IN),
                    (None, None) => {
                        return Err(format!(
                            "environment variable {name} is not set (write ${{{name}:-}} if empty is fine)"
                        ));
                    }
                }
                rest = &body[end + 1..];
            } else {
                out.push('$');
                rest = after;
            }
        }
        out.push_str(rest);
        Ok(out)
    }

    /// The variables `text` refers to (`${NAME}` and `${NAME:-default}`), in order: for
    /// errors that name the setting an operator changes, not the field it lands in.
    pub fn references(text: &str) -> Vec<String> {
        let mut out = Vec::new();
        let mut rest = text;
        while let Some(pos) = rest.find("${") {
            let body = &rest[pos + 2..];
            let Some(end) = body.find('}') else { break };
            let name = body[..end].split(":-").next().unwrap_or("");
            if !name.is_empty() && !out.iter().any(|n: &String| n == name) {
                out.push(name.to_owned());
            }
            rest = &body[end + 1..];
        }
        out
    }

    /// Expands references in every string of a parsed document, keys left as they are.
    /// Every reference that cannot be expanded is an error, each with the dotted path of its
    /// value (`p0.token`).
    pub fn expand_tree(
        &self,
        value: &mut serde_json::Value,
        path: &str,
    ) -> Result<(), Vec<String>> {
        let mut errors = Vec::new();
        self.expand_into(value, path, &mut errors);
        match errors.is_empty() {
            true => Ok(()),
            false => Err(errors),
        }
    }

    /// As `expand_tree`, each error prefixed with `at` (the file).
    pub fn expand_at(&self, at: &str, value: &mut serde_json::Value) -> Result<(), Vec<String>> {
        self.expand_tree(value, "")
            .map_err(|errors| errors.iter().map(|e| format!("{at}: {e}")).collect())
    }

    fn expand_into(&self, value: &mut serde_json::Value, path: &str, errors: &mut Vec<String>) {
        use serde_json::Value;
        match value {
            Value::String(s) if s.contains('$') => match self.expand(s) {
                Ok(done) => *s = done,
                Err(e) => errors.push(format!("{path}: {e}")),
            },
            Value::Array(items) => {
                for (i, item) in items.iter_mut().enumerate() {
                    self.expand_into(item, &format!("{path}[{i}]"), errors);
                }
            }
            Value::Object(map) => {
                for (k, v) in map.iter_mut() {
                    let sub = if path.is_empty() {
                        k.clone()
                    } else {
                        format!("{path}.{k}")
                    };
                    self.expand_into(v, &sub, errors);
                }
            }
            _ => {}
        }
    }
}

/// `tree` read as `T`; an error names `at` (the file) and the path of the value.
pub fn deserialize_at<T: serde::de::DeserializeOwned>(
    at: &str,
    tree: serde_json::Value,
) -> Result<T, Vec<String>> {
    serde_path_to_error::deserialize(tree)
        .map_err(|e| vec![format!("{at}: {}: {}", e.path(), e.inner())])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Env {
        Env::default().overlay(
            &pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    #[test]
    fn expansion() {
        let e = env(&[("A", "1"), ("EMPTY", "")]);
        for (input, want) in [
            ("x${A}y", "x1y"),
            ("${B:-dflt}", "dflt"),
            ("${B:-}", ""),
            ("${EMPTY:-d}", ""),
            ("$$A", "$A"),
            ("cost $5", "cost $5"),
            ("plain", "plain"),
        ] {
            assert_eq!(e.expand(input).as_deref(), Ok(want), "{input}");
        }
        let err = e.expand("${MISSING}").unwrap_err();
        assert!(err.contains("MISSING"), "{err}");
        assert!(e.expand("${A").is_err());
        assert!(e.expand("${A B}").is_err());
    }

    #[test]
    fn references_name_the_variables() {
        assert_eq!(
            Env::references("${A:-*},${B} and ${A} $$C ${"),
            vec!["A".to_owned(), "B".to_owned()]
        );
        assert!(Env::references("plain").is_empty());
    }

    #[test]
    fn file_variables() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        std::fs::write(&path, "from-file\n").unwrap();
        let e = env(&[("TOKEN_FILE", path.to_str().unwrap())]);
        assert_eq!(e.expand("${TOKEN}").as_deref(), Ok("from-file"));
    }
}
