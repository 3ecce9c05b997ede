//! Reads the mappings folder: one file per source, the sources enabled, and every error named
//! by file, rule and field.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::Value;

use super::*;

/// Every source's mapping, loaded from one folder.
#[derive(Debug, Default)]
pub struct MappingSet {
    pub dir: PathBuf,
    /// The enabled sources: served at `/webhooks/<source>`.
    pub mappings: BTreeMap<String, Arc<Mapping>>,
    /// Mapping files of sources not enabled, compiled only by `load_every` (for `check` and
    /// `test`), with stand-ins for the variables they reference that are unset. Never served.
    pub disabled: BTreeMap<String, Arc<Mapping>>,
}

/// The mapping files in `dir` (`*.yaml`, `*.yml`), in name order.
fn yaml_files(dir: &Path) -> Result<Vec<PathBuf>, Vec<String>> {
    let entries = std::fs::read_dir(dir).map_err(|e| {
        vec![format!(
            "{}: cannot read mappings folder: {e}",
            dir.display()
        )]
    })?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_file() && matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml"))
        })
        .collect();
    files.sort();
    Ok(files)
}

impl MappingSet {
    /// Loads and compiles the mapping file of every enabled source (`defaults.sources`) in
    /// `dir`. All errors are returned, each naming its file, rule and field; an enabled
    /// source without a file is one.
    pub fn load(dir: &Path, env: &Env, defaults: &Defaults) -> Result<MappingSet, Vec<String>> {
        Self::load_with(dir, env, defaults, false)
    }

    /// As `load`, and also compiles the files of sources that are not enabled, for `check`
    /// and `test`: their syntax must hold even though their secrets need not be set.
    pub fn load_every(
        dir: &Path,
        env: &Env,
        defaults: &Defaults,
    ) -> Result<MappingSet, Vec<String>> {
        Self::load_with(dir, env, defaults, true)
    }

    fn load_with(
        dir: &Path,
        env: &Env,
        defaults: &Defaults,
        every: bool,
    ) -> Result<MappingSet, Vec<String>> {
        let files = yaml_files(dir)?;
        let stand_in = env.with_stand_ins();
        let mut errors = Vec::new();
        let mut seen = BTreeSet::new();
        let mut mappings = BTreeMap::new();
        let mut disabled = BTreeMap::new();
        for file in files {
            let source = file
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or_default()
                .to_owned();
            if !is_source_name(&source) {
                errors.push(format!(
                    "{}: a source name (the file stem) is lower-case letters, digits, - and _",
                    file.display()
                ));
                continue;
            }
            if !seen.insert(source.clone()) {
                errors.push(format!(
                    "{}: source `{source}` is defined twice (one of .yaml and .yml)",
                    file.display()
                ));
                continue;
            }
            let enabled = defaults.sources.includes(&source);
            if !enabled && !every {
                continue;
            }
            let env = if enabled { env } else { &stand_in };
            match load_file(&file, &source, env, defaults) {
                Ok(m) if enabled => {
                    mappings.insert(source, Arc::new(m));
                }
                Ok(m) => {
                    disabled.insert(source, Arc::new(m));
                }
                Err(mut errs) => errors.append(&mut errs),
            }
        }
        if let Enabled::Only(names) = &defaults.sources {
            for name in names.iter().filter(|n| !seen.contains(*n)) {
                errors.push(format!(
                    "sources: `{name}` is enabled, but there is no {}",
                    dir.join(format!("{name}.yaml")).display()
                ));
            }
        }
        if mappings.is_empty() && errors.is_empty() {
            errors.push(format!("{}: no mapping files (*.yaml)", dir.display()));
        }
        if errors.is_empty() {
            Ok(MappingSet {
                dir: dir.to_owned(),
                mappings,
                disabled,
            })
        } else {
            Err(errors)
        }
    }

    pub fn get(&self, source: &str) -> Option<&Arc<Mapping>> {
        self.mappings.get(source)
    }

    pub fn warnings(&self) -> impl Iterator<Item = &String> {
        self.mappings.values().flat_map(|m| m.warnings.iter())
    }
}

fn load_file(
    file: &Path,
    source: &str,
    env: &Env,
    defaults: &Defaults,
) -> Result<Mapping, Vec<String>> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| vec![format!("{}: cannot read: {e}", file.display())])?;
    from_text(source, file, &text, env, defaults)
}

/// Parses and compiles a mapping file's text as if read from `file`.
pub fn from_text(
    source: &str,
    file: &Path,
    text: &str,
    env: &Env,
    defaults: &Defaults,
) -> Result<Mapping, Vec<String>> {
    let tree: Value = serde_saphyr::from_str(text)
        .map_err(|e| vec![format!("{}: not valid YAML: {e}", file.display())])?;
    compile(source, file, tree, env, defaults)
}
