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
//!
//! Maps and lists nest at most [`MAX_DEPTH`] levels below a namespace (the namespace's own map
//! is level 1). One namespace-limited key can publish a 284 KB change that nests 100,000 maps;
//! a reader that recursed once per level would overflow its stack and abort the node. So reads
//! walk the document with an explicit stack and refuse a value deeper than the bound with
//! [`PathError::TooDeep`] (only a hostile writer can have made one), and writes deeper than
//! the bound are refused before they touch the document.

use automerge::transaction::{Transactable, Transaction};
use automerge::{ObjId, ObjType, Prop, ReadDoc, ScalarValue, Value, ROOT};
use serde_json::{Map, Number, Value as Json};

/// How many levels of maps and lists a namespace may hold, its own map being the first.
///
/// Deep enough for any JSON an app keeps (serde_json itself refuses to parse more than 128).
/// It bounds the recursion of writes, and the depth of the JSON a read returns, which its
/// callers serialize and drop recursively.
pub(crate) const MAX_DEPTH: usize = 64;

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
    /// The value (with the path leading to it) nests more than [`MAX_DEPTH`] levels.
    #[error("value nested deeper than {max} levels (maps and lists, counting the namespace's own map)")]
    TooDeep {
        /// [`MAX_DEPTH`].
        max: usize,
    },
    /// Automerge refused the operation.
    #[error("document error: {0}")]
    Document(String),
}

fn doc_err(e: automerge::AutomergeError) -> PathError {
    PathError::Document(e.to_string())
}

/// Splits `a/b/c` into segments; the empty path is the namespace itself.
pub(crate) fn parse_path(path: &str) -> Result<Vec<String>, PathError> {
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

/// Whether `value` nests more than `limit` levels of arrays and objects (a scalar nests 0,
/// `{}` 1). Iterative, so that it also answers for a value built too deep to recurse over.
fn nests_deeper_than(value: &Json, limit: usize) -> bool {
    let mut stack = vec![(value, 1usize)];
    while let Some((value, level)) = stack.pop() {
        let children: Box<dyn Iterator<Item = &Json>> = match value {
            Json::Array(items) => Box::new(items.iter()),
            Json::Object(map) => Box::new(map.values()),
            _ => continue,
        };
        if level > limit {
            return true;
        }
        stack.extend(children.map(|child| (child, level + 1)));
    }
    false
}

/// Writes `value` at `namespace/path`, creating maps on the way. Refuses, before touching the
/// document, a write that would nest deeper than [`MAX_DEPTH`].
pub(crate) fn set_path(tx: &mut Transaction<'_>, namespace: &str, path: &[String], value: &Json) -> Result<(), PathError> {
    if path.is_empty() && !value.is_object() {
        return Err(PathError::NamespaceNotObject);
    }
    // The map holding the value is at level `path.len()` (the namespace's own map is 1), so the
    // value's own levels start one below it.
    if path.len() > MAX_DEPTH || nests_deeper_than(value, MAX_DEPTH - path.len()) {
        return Err(PathError::TooDeep { max: MAX_DEPTH });
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

/// Reads `namespace/path`; `None` when nothing is there. A value nested deeper than
/// [`MAX_DEPTH`] levels below the namespace is an error, not a stack overflow.
pub(crate) fn get_path(doc: &impl ReadDoc, namespace: &str, path: &[String]) -> Result<Option<Json>, PathError> {
    // Whatever is at a longer path sits in a map deeper than the bound.
    if path.len() > MAX_DEPTH {
        return Err(PathError::TooDeep { max: MAX_DEPTH });
    }
    let mut candidates = lookup(doc, &[ROOT], &Prop::Map(namespace.to_owned()));
    for segment in path {
        let Some(first) = candidates.first() else { return Ok(None) };
        candidates = match &first.0 {
            Value::Object(ObjType::Map | ObjType::Table) => lookup(doc, &maps_of(&candidates), &Prop::Map(segment.clone())),
            Value::Object(ObjType::List) => {
                let Ok(index) = segment.parse::<usize>() else { return Ok(None) };
                lookup(doc, std::slice::from_ref(&first.1), &Prop::Seq(index))
            }
            _ => return Ok(None),
        };
    }
    if candidates.is_empty() {
        return Ok(None);
    }
    to_json(doc, &candidates, path.len() + 1).map(Some)
}

/// Where a converted value goes in the object being built above it.
enum Slot {
    /// Under this key of a map.
    Key(String),
    /// As the next item of a list.
    Item,
}

/// An object being converted: the children still to visit and the JSON built so far.
enum Building {
    Map { maps: Vec<ObjId>, keys: std::vec::IntoIter<String>, out: Map<String, Json> },
    List { list: ObjId, next: usize, len: usize, items: Vec<Json> },
}

impl Building {
    /// The next child to convert, with where it goes.
    fn next_child<'a>(&mut self, doc: &'a impl ReadDoc) -> Option<(Slot, Candidates<'a>)> {
        match self {
            Building::Map { maps, keys, .. } => {
                for key in keys.by_ref() {
                    let values = lookup(doc, maps, &Prop::Map(key.clone()));
                    if !values.is_empty() {
                        return Some((Slot::Key(key), values));
                    }
                }
                None
            }
            Building::List { list, next, len, .. } => {
                if *next >= *len {
                    return None;
                }
                let values = lookup(doc, std::slice::from_ref(list), &Prop::Seq(*next));
                *next += 1;
                Some((Slot::Item, values))
            }
        }
    }

    fn put(&mut self, slot: Slot, value: Json) {
        match (self, slot) {
            (Building::Map { out, .. }, Slot::Key(key)) => {
                out.insert(key, value);
            }
            (Building::List { items, .. }, _) => items.push(value),
            // A map's children always come with their key (see `next_child`).
            (Building::Map { .. }, Slot::Item) => {}
        }
    }

    fn finish(self) -> Json {
        match self {
            Building::Map { out, .. } => Json::Object(out),
            Building::List { items, .. } => Json::Array(items),
        }
    }
}

/// What one position holds: a finished JSON value, or an object to visit.
enum Opened {
    Done(Json),
    Object(Building),
}

/// Looks at the value at one position; `level` is how deep an object there sits.
fn open(doc: &impl ReadDoc, candidates: &Candidates<'_>, level: usize) -> Result<Opened, PathError> {
    let Some((first, first_id)) = candidates.first() else { return Ok(Opened::Done(Json::Null)) };
    Ok(match first {
        Value::Object(ObjType::Map | ObjType::Table) => {
            if level > MAX_DEPTH {
                return Err(PathError::TooDeep { max: MAX_DEPTH });
            }
            let maps = maps_of(candidates);
            let mut keys: Vec<String> = maps.iter().flat_map(|m| doc.keys(m)).collect();
            keys.sort();
            keys.dedup();
            Opened::Object(Building::Map { maps, keys: keys.into_iter(), out: Map::new() })
        }
        Value::Object(ObjType::List) => {
            if level > MAX_DEPTH {
                return Err(PathError::TooDeep { max: MAX_DEPTH });
            }
            let len = doc.length(first_id);
            Opened::Object(Building::List { list: first_id.clone(), next: 0, len, items: Vec::new() })
        }
        Value::Object(ObjType::Text) => Opened::Done(Json::String(doc.text(first_id).unwrap_or_default())),
        Value::Scalar(s) => Opened::Done(scalar_to_json(s.as_ref())),
    })
}

/// Converts the value at one position to JSON; `level` is how deep an object found there sits
/// (the namespace's own map is 1).
///
/// Iterative, with an explicit stack of the objects being built: the stack a reader's thread
/// needs does not grow with the document (the frames of automerge's lookups are large, so even
/// [`MAX_DEPTH`] recursive calls would not fit a small thread stack). [`MAX_DEPTH`] bounds the
/// explicit stack and the depth of the JSON returned, which its callers serialize and drop
/// recursively.
fn to_json(doc: &impl ReadDoc, candidates: &Candidates<'_>, level: usize) -> Result<Json, PathError> {
    let root = match open(doc, candidates, level)? {
        Opened::Done(json) => return Ok(json),
        Opened::Object(building) => building,
    };
    // Each object being built, with where it goes in the one below it.
    let mut stack: Vec<(Slot, Building)> = vec![(Slot::Item, root)];
    loop {
        let depth = stack.len();
        let Some((_, top)) = stack.last_mut() else { return Ok(Json::Null) };
        match top.next_child(doc) {
            Some((slot, values)) => match open(doc, &values, level + depth)? {
                Opened::Done(json) => top.put(slot, json),
                Opened::Object(child) => stack.push((slot, child)),
            },
            None => {
                let Some((slot, finished)) = stack.pop() else { return Ok(Json::Null) };
                let json = finished.finish();
                match stack.last_mut() {
                    Some((_, parent)) => parent.put(slot, json),
                    None => return Ok(json),
                }
            }
        }
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

#[cfg(test)]
mod tests {
    use automerge::Automerge;
    use serde_json::json;

    use super::*;

    type TestResult = anyhow::Result<()>;

    /// `{"a": {"a": … {}}}` with `levels` objects.
    fn nested(levels: usize) -> Json {
        let mut value = json!({});
        for _ in 1..levels {
            value = json!({ "a": value });
        }
        value
    }

    #[test]
    fn reading_maps_nested_100000_deep_is_an_error_not_a_stack_overflow() -> TestResult {
        // What one namespace-limited key can publish in one 284 KB change.
        let mut doc = Automerge::new();
        let mut tx = doc.transaction();
        let mut obj = tx.put_object(ROOT, "profile", ObjType::Map)?;
        for _ in 0..100_000 {
            obj = tx.put_object(&obj, "a", ObjType::Map)?;
        }
        tx.commit();
        // A small stack, so that a reader recursing once per level overflows for certain.
        let reader = std::thread::Builder::new().stack_size(256 * 1024).spawn(move || {
            let a = |n: usize| vec!["a".to_owned(); n];
            [
                get_path(&doc, "profile", &[]),
                get_path(&doc, "profile", &a(10)),
                get_path(&doc, "profile", &a(MAX_DEPTH + 1)),
                get_path(&doc, "profile", &a(100_000)),
            ]
        })?;
        let results = reader.join().map_err(|_| anyhow::anyhow!("the reader thread panicked"))?;
        for result in results {
            assert_eq!(result, Err(PathError::TooDeep { max: MAX_DEPTH }));
        }
        Ok(())
    }

    #[test]
    fn writing_a_value_nested_too_deeply_is_refused_before_it_touches_the_document() -> TestResult {
        let mut doc = Automerge::new();
        let mut tx = doc.transaction();
        let too_deep = [
            (Vec::new(), nested(MAX_DEPTH + 1)),
            (vec!["x".to_owned()], nested(MAX_DEPTH)),
            (vec!["x".to_owned(); MAX_DEPTH - 1], json!([[]])),
            (vec!["x".to_owned(); MAX_DEPTH + 1], json!(1)),
        ];
        for (path, value) in &too_deep {
            assert_eq!(set_path(&mut tx, "profile", path, value), Err(PathError::TooDeep { max: MAX_DEPTH }));
            assert_eq!(tx.pending_ops(), 0, "a refused write left operations behind");
        }
        tx.commit();
        assert_eq!(get_path(&doc, "profile", &[])?, None);
        Ok(())
    }

    #[test]
    fn values_exactly_as_deep_as_the_limit_are_written_and_read_back() -> TestResult {
        let mut doc = Automerge::new();
        let mut tx = doc.transaction();
        set_path(&mut tx, "profile", &[], &nested(MAX_DEPTH))?;
        set_path(&mut tx, "apps", &vec!["x".to_owned(); MAX_DEPTH - 1], &json!([1]))?;
        set_path(&mut tx, "notes", &vec!["x".to_owned(); MAX_DEPTH], &json!("deepest"))?;
        tx.commit();
        assert_eq!(get_path(&doc, "profile", &[])?, Some(nested(MAX_DEPTH)));
        assert_eq!(get_path(&doc, "apps", &vec!["x".to_owned(); MAX_DEPTH - 1])?, Some(json!([1])));
        assert_eq!(get_path(&doc, "notes", &vec!["x".to_owned(); MAX_DEPTH])?, Some(json!("deepest")));
        Ok(())
    }
}
