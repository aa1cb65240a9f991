//! Unknown keys of a run config: a TOML value is walked against the
//! config's JSON schema ([`super::config::schema`]), so a misspelt key is an
//! error naming its table, the valid keys and the nearest one.

use std::collections::BTreeSet;

use serde_json::Value;

use crate::{Error, Result};

/// The valid name nearest to `bad` (Levenshtein distance at most a third
/// of its length, and at least 2), if any.
pub fn nearest<'a>(bad: &str, valid: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    let (d, v) = valid
        .map(|v| (strsim::levenshtein(bad, v), v))
        .min_by_key(|(d, _)| *d)?;
    (d <= (bad.chars().count() / 3).max(2)).then_some(v)
}

/// `"; did you mean `x`?"` for the valid name nearest to `bad`, or "".
pub fn suggestion<'a>(bad: &str, valid: impl Iterator<Item = &'a str>) -> String {
    nearest(bad, valid)
        .map(|v| format!("; did you mean `{v}`?"))
        .unwrap_or_default()
}

/// Follow `$ref` (`#/$defs/Name`) from the schema root.
fn deref<'a>(s: &'a Value, root: &'a Value) -> &'a Value {
    let mut cur = s;
    for _ in 0..16 {
        match cur.get("$ref").and_then(Value::as_str) {
            Some(r) => {
                let ptr = r.trim_start_matches('#');
                match root.pointer(ptr) {
                    Some(next) => cur = next,
                    None => return cur,
                }
            }
            None => return cur,
        }
    }
    cur
}

/// The schema and its alternatives (`anyOf` / `oneOf` / `allOf`), resolved.
fn alternatives<'a>(s: &'a Value, root: &'a Value, out: &mut Vec<&'a Value>) {
    let s = deref(s, root);
    out.push(s);
    for k in ["anyOf", "oneOf", "allOf"] {
        if let Some(list) = s.get(k).and_then(Value::as_array) {
            for a in list {
                alternatives(a, root, out);
            }
        }
    }
}

/// Whether a table fits an alternative's constant properties (a tag such
/// as `kind`, `"const"` in the schema): `None` when the alternative has no
/// constant the table sets.
fn tag_matches(props: &serde_json::Map<String, Value>, t: &toml::Table) -> Option<bool> {
    let mut seen = None;
    for (k, v) in t {
        let Some(c) = props.get(k).and_then(|p| p.get("const")) else {
            continue;
        };
        let same = match (c, v) {
            (Value::String(a), toml::Value::String(b)) => a == b,
            (Value::Bool(a), toml::Value::Boolean(b)) => a == b,
            _ => false,
        };
        if !same {
            return Some(false);
        }
        seen = Some(true);
    }
    seen
}

/// Walk a TOML value against the JSON schema: every table key must be a
/// property of its table's schema (maps, whose schema has no properties,
/// take any key).
pub(super) fn check_keys(v: &toml::Value, schema: &Value, root: &Value, path: &str) -> Result<()> {
    let mut alts = Vec::new();
    alternatives(schema, root, &mut alts);
    match v {
        toml::Value::Table(t) => {
            let mut props: Vec<&serde_json::Map<String, Value>> = alts
                .iter()
                .filter_map(|a| a.get("properties").and_then(Value::as_object))
                .collect();
            // A tagged alternative (`kind = "sdxl"`) is the one whose tag
            // matches: the other kinds' keys are not this table's.
            let tagged: Vec<_> = props
                .iter()
                .copied()
                .filter(|p| tag_matches(p, t) == Some(true))
                .collect();
            if !tagged.is_empty() {
                props = tagged;
            }
            if props.is_empty() {
                return Ok(());
            }
            for (k, child) in t {
                let sub = props.iter().find_map(|p| p.get(k));
                let here = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                match sub {
                    Some(sub) => check_keys(child, sub, root, &here)?,
                    None => {
                        let valid: BTreeSet<&str> = props
                            .iter()
                            .flat_map(|p| p.keys().map(String::as_str))
                            .collect();
                        let table = if path.is_empty() {
                            "the top level".to_string()
                        } else {
                            format!("[{path}]")
                        };
                        let prefix = if path.is_empty() {
                            String::new()
                        } else {
                            format!("{path}.")
                        };
                        let hint = nearest(k, valid.iter().copied())
                            .map(|v| format!("; did you mean `{prefix}{v}`?"))
                            .unwrap_or_default();
                        return Err(Error::config(format!(
                            "unknown key `{here}`{hint}; the keys of {table} are: {}",
                            valid.into_iter().collect::<Vec<_>>().join(", ")
                        )));
                    }
                }
            }
            Ok(())
        }
        toml::Value::Array(a) => {
            let items = alts.iter().find_map(|s| s.get("items"));
            if let Some(items) = items {
                for (i, x) in a.iter().enumerate() {
                    check_keys(x, items, root, &format!("{path}[{i}]"))?;
                }
            }
            Ok(())
        }
        _ => Ok(()),
    }
}
