//! JSON values in and out of the core document.
//!
//! A namespace is a top-level map of the document; a path `a/b/c` walks nested maps (and list
//! indexes when reading). JSON objects become Automerge maps, arrays lists, and scalars
//! scalars (integers that fit `i64` become `Int`, larger ones `Uint`, the rest `F64`; strings
//! are plain `Str` scalars, not collaborative `Text`).
//!
//! Writing an object where a map already exists updates that map key by key (keys missing from
//! the new value are deleted) instead of replacing the map, so concurrent writes to different
//! keys of one object both survive. When two replicas create the same map concurrently (the
//! first write of a namespace on two devices), Automerge keeps both as conflicting values of
//! one key; reads merge such conflicting maps (the winner's keys take precedence), so neither
//! device's data disappears, and writes go to the winner.

use automerge::transaction::{Transactable, Transaction};
use automerge::{ObjId, ObjType, Prop, ReadDoc, ScalarValue, Value, ROOT};
use serde_json::{Map, Number, Value as Json};

/// Why a path cannot be written or read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PathError {
    /// An empty segment (`a//b`, a leading or trailing `/`).
    #[error("empty segment in path {0:?}")]
    EmptySegment(String),
    /// A value on the way is neither a map nor absent.
    #[error("{0:?} is not a map")]
    NotAMap(String),
    /// Writing the whole namespace needs an object.
    #[error("a namespace is a map: write an object at the empty path, or give a path")]
    NamespaceNotObject,
    /// Automerge refused the operation.
    #[error("document error: {0}")]
    Document(String),
}

fn doc_err(e: automerge::AutomergeError) -> PathError {
    PathError::Document(e.to_string())
}

/// Splits `a/b/c` into segments; the empty path is the namespace itself.
pub fn parse_path(path: &str) -> Result<Vec<String>, PathError> {
    if path.is_empty() {
        return Ok(Vec::new());
    }
    path.split('/')
        .map(|s| if s.is_empty() { Err(PathError::EmptySegment(path.to_owned())) } else { Ok(s.to_owned()) })
        .collect()
}

fn scalar(value: &Json) -> Option<ScalarValue> {
    Some(match value {
        Json::Null => ScalarValue::Null,
        Json::Bool(b) => ScalarValue::Boolean(*b),
        Json::Number(n) => {
            if let Some(i) = n.as_i64() {
                ScalarValue::Int(i)
            } else if let Some(u) = n.as_u64() {
                ScalarValue::Uint(u)
            } else {
                ScalarValue::F64(n.as_f64().unwrap_or(0.0))
            }
        }
        Json::String(s) => ScalarValue::Str(s.as_str().into()),
        Json::Array(_) | Json::Object(_) => return None,
    })
}

/// Writes `value` at `namespace/path`, creating maps on the way.
pub(crate) fn set_path(tx: &mut Transaction<'_>, namespace: &str, path: &[String], value: &Json) -> Result<(), PathError> {
    if path.is_empty() && !value.is_object() {
        return Err(PathError::NamespaceNotObject);
    }
    let mut obj = ROOT;
    let mut prop = namespace.to_owned();
    let mut walked = namespace.to_owned();
    for segment in path {
        obj = ensure_map(tx, &obj, &prop, &walked)?;
        prop = segment.clone();
        walked.push('/');
        walked.push_str(segment);
    }
    write_value(tx, &obj, Prop::Map(prop), value)
}

fn ensure_map(tx: &mut Transaction<'_>, obj: &ObjId, key: &str, walked: &str) -> Result<ObjId, PathError> {
    let existing = match tx.get(obj, key).map_err(doc_err)? {
        Some((Value::Object(ObjType::Map), id)) => Some(id),
        None => None,
        Some((Value::Scalar(s), _)) if matches!(s.as_ref(), ScalarValue::Null) => None,
        Some(_) => return Err(PathError::NotAMap(walked.to_owned())),
    };
    match existing {
        Some(id) => Ok(id),
        None => tx.put_object(obj, key, ObjType::Map).map_err(doc_err),
    }
}

fn write_value(tx: &mut Transaction<'_>, obj: &ObjId, prop: Prop, value: &Json) -> Result<(), PathError> {
    match value {
        Json::Object(map) => {
            let existing = match tx.get(obj, prop.clone()).map_err(doc_err)? {
                Some((Value::Object(ObjType::Map), id)) => Some(id),
                _ => None,
            };
            match existing {
                Some(id) => update_map(tx, &id, map),
                None => {
                    let id = tx.put_object(obj, prop, ObjType::Map).map_err(doc_err)?;
                    update_map(tx, &id, map)
                }
            }
        }
        Json::Array(items) => {
            let id = tx.put_object(obj, prop, ObjType::List).map_err(doc_err)?;
            fill_list(tx, &id, items)
        }
        other => {
            let s = scalar(other).unwrap_or(ScalarValue::Null);
            tx.put(obj, prop, s).map_err(doc_err)
        }
    }
}

fn update_map(tx: &mut Transaction<'_>, id: &ObjId, map: &Map<String, Json>) -> Result<(), PathError> {
    let stale: Vec<String> = tx.keys(id).filter(|k| !map.contains_key(k)).collect();
    for key in stale {
        tx.delete(id, key.as_str()).map_err(doc_err)?;
    }
    for (key, value) in map {
        write_value(tx, id, Prop::Map(key.clone()), value)?;
    }
    Ok(())
}

fn fill_list(tx: &mut Transaction<'_>, id: &ObjId, items: &[Json]) -> Result<(), PathError> {
    for (i, item) in items.iter().enumerate() {
        match item {
            Json::Object(map) => {
                let child = tx.insert_object(id, i, ObjType::Map).map_err(doc_err)?;
                update_map(tx, &child, map)?;
            }
            Json::Array(inner) => {
                let child = tx.insert_object(id, i, ObjType::List).map_err(doc_err)?;
                fill_list(tx, &child, inner)?;
            }
            other => tx.insert(id, i, scalar(other).unwrap_or(ScalarValue::Null)).map_err(doc_err)?,
        }
    }
    Ok(())
}

/// The conflicting values at one position, the winner first.
type Candidates<'a> = Vec<(Value<'a>, ObjId)>;

fn lookup<'a>(doc: &'a impl ReadDoc, parents: &[ObjId], prop: &Prop) -> Candidates<'a> {
    let mut out: Candidates<'a> = Vec::new();
    for parent in parents {
        let Ok(Some((winner, winner_id))) = doc.get(parent, prop.clone()) else { continue };
        let all = doc.get_all(parent, prop.clone()).unwrap_or_default();
        out.push((winner, winner_id.clone()));
        out.extend(all.into_iter().filter(|(_, id)| *id != winner_id));
    }
    out
}

fn maps_of(candidates: &Candidates<'_>) -> Vec<ObjId> {
    candidates
        .iter()
        .filter(|(v, _)| matches!(v, Value::Object(ObjType::Map | ObjType::Table)))
        .map(|(_, id)| id.clone())
        .collect()
}

/// Reads `namespace/path`; `None` when nothing is there.
pub(crate) fn get_path(doc: &impl ReadDoc, namespace: &str, path: &[String]) -> Option<Json> {
    let mut candidates = lookup(doc, &[ROOT], &Prop::Map(namespace.to_owned()));
    for segment in path {
        let first = candidates.first()?;
        candidates = match &first.0 {
            Value::Object(ObjType::Map | ObjType::Table) => lookup(doc, &maps_of(&candidates), &Prop::Map(segment.clone())),
            Value::Object(ObjType::List) => {
                let index: usize = segment.parse().ok()?;
                lookup(doc, std::slice::from_ref(&first.1), &Prop::Seq(index))
            }
            _ => return None,
        };
    }
    if candidates.is_empty() {
        return None;
    }
    Some(to_json(doc, &candidates))
}

fn to_json(doc: &impl ReadDoc, candidates: &Candidates<'_>) -> Json {
    let Some((first, first_id)) = candidates.first() else { return Json::Null };
    match first {
        Value::Object(ObjType::Map | ObjType::Table) => {
            let maps = maps_of(candidates);
            let mut keys: Vec<String> = maps.iter().flat_map(|m| doc.keys(m)).collect();
            keys.sort();
            keys.dedup();
            let mut out = Map::new();
            for key in keys {
                let values = lookup(doc, &maps, &Prop::Map(key.clone()));
                if !values.is_empty() {
                    out.insert(key, to_json(doc, &values));
                }
            }
            Json::Object(out)
        }
        Value::Object(ObjType::List) => {
            let len = doc.length(first_id);
            let items = (0..len)
                .map(|i| {
                    let values = lookup(doc, std::slice::from_ref(first_id), &Prop::Seq(i));
                    to_json(doc, &values)
                })
                .collect();
            Json::Array(items)
        }
        Value::Object(ObjType::Text) => Json::String(doc.text(first_id).unwrap_or_default()),
        Value::Scalar(s) => scalar_to_json(s.as_ref()),
    }
}

fn scalar_to_json(s: &ScalarValue) -> Json {
    match s {
        ScalarValue::Null => Json::Null,
        ScalarValue::Boolean(b) => Json::Bool(*b),
        ScalarValue::Int(i) | ScalarValue::Timestamp(i) => Json::Number((*i).into()),
        ScalarValue::Uint(u) => Json::Number((*u).into()),
        ScalarValue::F64(f) => Number::from_f64(*f).map(Json::Number).unwrap_or(Json::Null),
        ScalarValue::Str(s) => Json::String(s.to_string()),
        ScalarValue::Counter(_) => s.to_i64().map(|i| Json::Number(i.into())).unwrap_or(Json::Null),
        ScalarValue::Bytes(b) => Json::String(format!("0x{}", hex::encode(b))),
        ScalarValue::Unknown { .. } => Json::Null,
    }
}

/// The namespaces (top-level keys) of the document, the reserved one included.
pub(crate) fn namespaces(doc: &impl ReadDoc) -> Vec<String> {
    doc.keys(ROOT).collect()
}
