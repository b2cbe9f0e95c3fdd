//! Reading the config: the main file, `conf.d/*.toml` beside it in name order, and
//! `DRIFTWATCH__SECTION__KEY` environment overrides applied through the `config` crate. Keeps
//! track of which file (or variable) each key came from, so problems can name it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::raw::RawConfig;
use super::{ConfigError, Problem};

/// One step of a key path: a table key or an array index.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Seg {
    Key(String),
    Index(usize),
}

/// A key path such as `watch[1].schedule` or `registries."127.0.0.1:5000".insecure`.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct KeyPath(pub Vec<Seg>);

impl KeyPath {
    pub fn key(mut self, k: &str) -> Self {
        self.0.push(Seg::Key(k.to_string()));
        self
    }

    pub fn index(mut self, i: usize) -> Self {
        self.0.push(Seg::Index(i));
        self
    }

    fn render(segs: &[Seg]) -> String {
        let mut out = String::new();
        for seg in segs {
            match seg {
                Seg::Index(i) => out.push_str(&format!("[{i}]")),
                Seg::Key(k) => {
                    if !out.is_empty() {
                        out.push('.');
                    }
                    let bare = !k.is_empty()
                        && k.bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
                    if bare {
                        out.push_str(k);
                    } else {
                        out.push_str(&format!("{k:?}"));
                    }
                }
            }
        }
        out
    }
}

impl std::fmt::Display for KeyPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&KeyPath::render(&self.0))
    }
}

/// Where each key of the merged document came from.
#[derive(Debug, Default)]
pub(crate) struct Provenance {
    main: String,
    /// For each merged `[[watch]]`/`[[sink]]` entry: its file and its index inside that file.
    arrays: BTreeMap<String, Vec<(String, usize)>>,
    /// Every table and leaf path a file set, to the last file that set it.
    keys: BTreeMap<Vec<Seg>, String>,
    /// Paths set from the environment, to the variable's name.
    env: BTreeMap<Vec<Seg>, String>,
}

/// The top-level arrays of tables that conf.d files add to rather than replace.
const APPENDED: [&str; 2] = ["watch", "sink"];

impl Provenance {
    /// Names the file a problem at `path` belongs to, and the key as that file spells it.
    pub fn problem(&self, path: &KeyPath, message: impl Into<String>) -> Problem {
        let segs = &path.0;
        let message = message.into();

        // An environment override wins over any file for the paths it set.
        for n in (1..=segs.len()).rev() {
            if let Some(var) = self.env.get(&segs[..n]) {
                return Problem {
                    file: format!("environment {var}"),
                    key: path.to_string(),
                    message,
                };
            }
        }

        // Entries of the appended arrays are numbered as in their own file.
        if let [Seg::Key(top), Seg::Index(i), rest @ ..] = segs.as_slice()
            && let Some((file, local)) = self.arrays.get(top).and_then(|v| v.get(*i))
        {
            let mut local_path = vec![Seg::Key(top.clone()), Seg::Index(*local)];
            local_path.extend_from_slice(rest);
            return Problem {
                file: file.clone(),
                key: KeyPath::render(&local_path),
                message,
            };
        }

        for n in (1..=segs.len()).rev() {
            if let Some(file) = self.keys.get(&segs[..n]) {
                return Problem {
                    file: file.clone(),
                    key: path.to_string(),
                    message,
                };
            }
        }
        Problem {
            file: self.main.clone(),
            key: path.to_string(),
            message,
        }
    }

    fn record(&mut self, prefix: &[Seg], value: &toml::Value, file: &str) {
        self.keys.insert(prefix.to_vec(), file.to_string());
        if let toml::Value::Table(t) = value {
            for (k, v) in t {
                let mut p = prefix.to_vec();
                p.push(Seg::Key(k.clone()));
                self.record(&p, v, file);
            }
        }
    }
}

/// The merged raw config and what is needed to report problems against it.
pub(crate) struct Loaded {
    pub raw: RawConfig,
    pub provenance: Provenance,
    pub files: Vec<PathBuf>,
    /// Problems found while reading: unknown keys, wrong types.
    pub problems: Vec<Problem>,
}

impl Loaded {
    /// Nothing read: every key at its default.
    pub fn empty() -> Loaded {
        Loaded {
            raw: RawConfig::default(),
            provenance: Provenance::default(),
            files: Vec::new(),
            problems: Vec::new(),
        }
    }
}

/// The `conf.d` directory that belongs to a config file.
pub fn conf_d(config_path: &Path) -> PathBuf {
    config_path
        .parent()
        .unwrap_or_else(|| Path::new("."))
        .join("conf.d")
}

/// Reads and merges every source. `env` is the process environment (passed in for tests).
pub(crate) fn load(path: &Path, env: &[(String, String)]) -> Result<Loaded, ConfigError> {
    let mut files = vec![path.to_path_buf()];
    let dir = conf_d(path);
    match std::fs::read_dir(&dir) {
        Ok(entries) => {
            let mut extra: Vec<PathBuf> = entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "toml") && p.is_file())
                .collect();
            extra.sort();
            files.extend(extra);
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => return Err(ConfigError::Read { path: dir, source }),
    }

    // Parse each file on its own first, so a syntax error names its file, line and column.
    let mut prov = Provenance {
        main: path.display().to_string(),
        ..Default::default()
    };
    let mut merged = toml::Table::new();
    for file in &files {
        let text = std::fs::read_to_string(file).map_err(|source| ConfigError::Read {
            path: file.clone(),
            source,
        })?;
        let table: toml::Table =
            toml::from_str(&text).map_err(|e| syntax_error(file, &text, &e))?;
        merge_file(&mut merged, table, &file.display().to_string(), &mut prov);
    }

    // Environment overrides go through the config crate, over the merged files.
    let mut env_map = config::Map::new();
    for (name, value) in env {
        let Some(rest) = name.strip_prefix("DRIFTWATCH__") else {
            continue;
        };
        let segs = rest
            .to_lowercase()
            .split("__")
            .map(|s| Seg::Key(s.to_string()))
            .collect();
        prov.env.insert(segs, name.clone());
        env_map.insert(name.clone(), value.clone());
    }
    let document = toml::to_string(&merged).map_err(|e| ConfigError::Internal(e.to_string()))?;
    let built = config::Config::builder()
        .add_source(config::File::from_str(&document, config::FileFormat::Toml))
        .add_source(
            config::Environment::with_prefix("DRIFTWATCH")
                .prefix_separator("__")
                .separator("__")
                .try_parsing(true)
                .source(Some(env_map)),
        )
        .build()
        .map_err(|e| ConfigError::Internal(e.to_string()))?;

    // Collect every unknown key rather than stopping at the first.
    let mut unknown = Vec::new();
    let mut track = serde_path_to_error::Track::new();
    let result: Result<RawConfig, _> = serde_ignored::deserialize(
        serde_path_to_error::Deserializer::new(built, &mut track),
        |p| unknown.push(ignored_path(&p)),
    );
    let mut problems: Vec<Problem> = unknown
        .into_iter()
        .map(|p| {
            let last = match p.0.last() {
                Some(Seg::Key(k)) => k.clone(),
                _ => String::new(),
            };
            prov.problem(&p, format!("unknown key {last:?}"))
        })
        .collect();
    let raw = match result {
        Ok(raw) => raw,
        Err(e) => {
            let path = tracked_path(&track.path());
            problems.push(prov.problem(&path, clean_type_error(&e.to_string())));
            RawConfig::default()
        }
    };
    Ok(Loaded {
        raw,
        provenance: prov,
        files,
        problems,
    })
}

fn merge_file(merged: &mut toml::Table, table: toml::Table, file: &str, prov: &mut Provenance) {
    for (key, value) in table {
        if APPENDED.contains(&key.as_str())
            && let toml::Value::Array(items) = value
        {
            let target = merged
                .entry(key.clone())
                .or_insert_with(|| toml::Value::Array(Vec::new()));
            if let toml::Value::Array(existing) = target {
                let origins = prov.arrays.entry(key.clone()).or_default();
                for (local, item) in items.into_iter().enumerate() {
                    origins.push((file.to_string(), local));
                    existing.push(item);
                }
                continue;
            }
            merged.insert(key, toml::Value::Array(items));
            continue;
        }
        prov.record(&[Seg::Key(key.clone())], &value, file);
        match (merged.get_mut(&key), value) {
            (Some(toml::Value::Table(into)), toml::Value::Table(from)) => {
                merge_tables(into, from);
            }
            (_, value) => {
                merged.insert(key, value);
            }
        }
    }
}

fn merge_tables(into: &mut toml::Table, from: toml::Table) {
    for (key, value) in from {
        match (into.get_mut(&key), value) {
            (Some(toml::Value::Table(a)), toml::Value::Table(b)) => merge_tables(a, b),
            (_, value) => {
                into.insert(key, value);
            }
        }
    }
}

fn syntax_error(file: &Path, text: &str, err: &toml::de::Error) -> ConfigError {
    let (line, column) = match err.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
            (line, column)
        }
        None => (0, 0),
    };
    ConfigError::Syntax {
        file: file.display().to_string(),
        line,
        column,
        message: err.message().to_string(),
    }
}

fn ignored_path(p: &serde_ignored::Path<'_>) -> KeyPath {
    fn walk(p: &serde_ignored::Path<'_>, out: &mut Vec<Seg>) {
        match p {
            serde_ignored::Path::Root => {}
            serde_ignored::Path::Seq { parent, index } => {
                walk(parent, out);
                out.push(Seg::Index(*index));
            }
            serde_ignored::Path::Map { parent, key } => {
                walk(parent, out);
                out.push(Seg::Key(key.clone()));
            }
            serde_ignored::Path::Some { parent }
            | serde_ignored::Path::NewtypeStruct { parent }
            | serde_ignored::Path::NewtypeVariant { parent } => walk(parent, out),
        }
    }
    let mut segs = Vec::new();
    walk(p, &mut segs);
    KeyPath(segs)
}

fn tracked_path(p: &serde_path_to_error::Path) -> KeyPath {
    let segs = p
        .iter()
        .filter_map(|s| match s {
            serde_path_to_error::Segment::Seq { index } => Some(Seg::Index(*index)),
            serde_path_to_error::Segment::Map { key } => Some(Seg::Key(key.clone())),
            serde_path_to_error::Segment::Enum { variant } => Some(Seg::Key(variant.clone())),
            serde_path_to_error::Segment::Unknown => None,
        })
        .collect();
    KeyPath(segs)
}

/// The config crate phrases type errors with its own key path; keep only the reason.
fn clean_type_error(message: &str) -> String {
    let message = message.split(" for key `").next().unwrap_or(message);
    match message.split_once(": ") {
        Some((prefix, rest)) if !prefix.contains(' ') && prefix.contains('.') => rest.to_string(),
        _ => message.to_string(),
    }
}
