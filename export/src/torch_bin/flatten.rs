//! Naming the tensors of the unpickled object (see the module docs of
//! [`super`]).

use std::collections::HashSet;
use std::rc::Rc;

use super::objects::TensorRef;
use super::value::{Object, Shared, Value};

const MAX_DEPTH: usize = 64;

pub(super) struct Flat {
    pub tensors: Vec<(String, Rc<TensorRef>)>,
    pub skipped: Vec<String>,
    seen: HashSet<String>,
}

pub(super) enum FlatError {
    Structure(String),
    Tensor { key: String, msg: String },
}

pub(super) fn flatten(root: &Value) -> Result<Flat, FlatError> {
    let mut flat = Flat {
        tensors: Vec::new(),
        skipped: Vec::new(),
        seen: HashSet::new(),
    };
    match root {
        Value::Dict(_) => walk(root, "", 0, &mut flat)?,
        other => {
            return Err(FlatError::Structure(format!(
                "the top-level object is a {}, expected a dict of tensors",
                other.kind()
            )));
        }
    }
    Ok(flat)
}

fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_string()
    } else {
        format!("{prefix}.{key}")
    }
}

fn too_deep(name: &str) -> FlatError {
    FlatError::Structure(format!(
        "'{name}': nested deeper than {MAX_DEPTH} levels (or a reference cycle)"
    ))
}

fn walk(v: &Value, name: &str, depth: usize, flat: &mut Flat) -> Result<(), FlatError> {
    if depth > MAX_DEPTH {
        return Err(too_deep(name));
    }
    match v {
        Value::Tensor(t) => {
            if !flat.seen.insert(name.to_string()) {
                return Err(FlatError::Tensor {
                    key: name.to_string(),
                    msg: "the name occurs twice after flattening nested keys".into(),
                });
            }
            flat.tensors.push((name.to_string(), t.clone()));
        }
        Value::Dict(d) => {
            let entries = match d.try_borrow() {
                Ok(d) => d.entries.clone(),
                Err(_) => return Err(too_deep(name)),
            };
            for (k, item) in &entries {
                let key = match k {
                    Value::Str(s) => s.to_string(),
                    Value::Int(i) => i.to_string(),
                    Value::Bool(b) => if *b { "True" } else { "False" }.to_string(),
                    Value::None => "None".to_string(),
                    other => {
                        return Err(FlatError::Structure(format!(
                            "'{name}': dict keys of type {} are not supported",
                            other.kind()
                        )));
                    }
                };
                walk(item, &join(name, &key), depth + 1, flat)?;
            }
        }
        Value::Tuple(_) | Value::List(_) => {
            if contains_tensor(v, depth)? {
                for (i, item) in v.items().unwrap_or_default().iter().enumerate() {
                    walk(item, &join(name, &i.to_string()), depth + 1, flat)?;
                }
            } else {
                flat.skipped.push(name.to_string());
            }
        }
        Value::Object(o) => {
            if let Some(func) = unsupported_rebuild(o) {
                return Err(FlatError::Tensor {
                    key: name.to_string(),
                    msg: format!(
                        "tensors rebuilt by {func} (quantized/sparse/nested/meta) are not supported"
                    ),
                });
            }
            flat.skipped.push(name.to_string());
        }
        _ => flat.skipped.push(name.to_string()),
    }
    Ok(())
}

fn unsupported_rebuild(o: &Shared<Object>) -> Option<String> {
    let o = o.try_borrow().ok()?;
    match &o.callable {
        Value::Global(g) if g.module.starts_with("torch") && g.name.starts_with("_rebuild") => {
            Some(format!("{}.{}", g.module, g.name))
        }
        _ => None,
    }
}

fn contains_tensor(v: &Value, depth: usize) -> Result<bool, FlatError> {
    if depth > MAX_DEPTH {
        return Err(too_deep("?"));
    }
    Ok(match v {
        Value::Tensor(_) => true,
        Value::Tuple(_) | Value::List(_) => {
            for item in v.items().unwrap_or_default() {
                if contains_tensor(&item, depth + 1)? {
                    return Ok(true);
                }
            }
            false
        }
        Value::Dict(d) => {
            let entries = d
                .try_borrow()
                .map(|d| d.entries.clone())
                .unwrap_or_default();
            for (_, item) in &entries {
                if contains_tensor(item, depth + 1)? {
                    return Ok(true);
                }
            }
            false
        }
        Value::Object(o) => unsupported_rebuild(o).is_some(),
        _ => false,
    })
}
