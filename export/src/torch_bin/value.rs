//! Values of the pickle machine.
//!
//! Containers are reference-counted so that memo references see later
//! mutations, exactly as in Python. Dropping is iterative (see [`release`]) so
//! hostile, deeply nested input cannot overflow the stack.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use super::objects::{StorageRef, TensorRef};

pub(super) type Shared<T> = Rc<RefCell<T>>;

#[derive(Clone, Debug)]
pub(super) enum Value {
    None,
    Bool(bool),
    Int(i64),
    /// An integer outside the `i64` range; its value is not kept.
    BigInt,
    /// A float; its value is not needed.
    Float,
    Str(Rc<str>),
    /// A bytes object; its contents are not needed.
    Bytes,
    Tuple(Shared<Seq>),
    List(Shared<Seq>),
    Dict(Shared<Dict>),
    Global(Rc<Global>),
    Object(Shared<Object>),
    Storage(Rc<StorageRef>),
    Tensor(Rc<TensorRef>),
}

impl Value {
    pub(super) fn kind(&self) -> &'static str {
        match self {
            Value::None => "None",
            Value::Bool(_) => "bool",
            Value::Int(_) | Value::BigInt => "int",
            Value::Float => "float",
            Value::Str(_) => "str",
            Value::Bytes => "bytes",
            Value::Tuple(_) => "tuple",
            Value::List(_) => "list",
            Value::Dict(_) => "dict",
            Value::Global(_) => "global",
            Value::Object(_) => "object",
            Value::Storage(_) => "storage",
            Value::Tensor(_) => "tensor",
        }
    }

    pub(super) fn tuple(items: Vec<Value>) -> Value {
        Value::Tuple(Rc::new(RefCell::new(Seq(items))))
    }

    /// Items of a tuple or list, cloned.
    pub(super) fn items(&self) -> Option<Vec<Value>> {
        match self {
            Value::Tuple(s) | Value::List(s) => Some(s.borrow().0.clone()),
            _ => None,
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
pub(super) struct Global {
    pub module: String,
    pub name: String,
}

/// Items of a tuple or list.
#[derive(Debug, Default)]
pub(super) struct Seq(pub Vec<Value>);

/// An insertion-ordered dict. Simple keys (str, int, bool, None) are indexed
/// so re-assignment replaces the value in place, as in Python.
#[derive(Debug, Default)]
pub(super) struct Dict {
    pub entries: Vec<(Value, Value)>,
    index: HashMap<DictKey, usize>,
}

#[derive(Debug, PartialEq, Eq, Hash)]
enum DictKey {
    Str(Rc<str>),
    Int(i64),
    None,
}

impl Dict {
    pub(super) fn insert(&mut self, key: Value, value: Value) {
        let hashed = match &key {
            Value::Str(s) => Some(DictKey::Str(s.clone())),
            Value::Int(i) => Some(DictKey::Int(*i)),
            Value::Bool(b) => Some(DictKey::Int(i64::from(*b))),
            Value::None => Some(DictKey::None),
            _ => None,
        };
        match hashed {
            Some(h) => {
                if let Some(&i) = self.index.get(&h)
                    && let Some(slot) = self.entries.get_mut(i)
                {
                    slot.1 = value;
                    return;
                }
                self.index.insert(h, self.entries.len());
                self.entries.push((key, value));
            }
            None => self.entries.push((key, value)),
        }
    }
}

/// The result of calling a global the reader does not interpret.
#[derive(Debug)]
pub(super) struct Object {
    pub callable: Value,
    pub args: Value,
    pub state: Value,
}

impl Drop for Seq {
    fn drop(&mut self) {
        if !self.0.is_empty() {
            release(std::mem::take(&mut self.0));
        }
    }
}

impl Drop for Dict {
    fn drop(&mut self) {
        if !self.entries.is_empty() {
            let mut flat = Vec::with_capacity(self.entries.len() * 2);
            for (k, v) in self.entries.drain(..) {
                flat.push(k);
                flat.push(v);
            }
            release(flat);
        }
    }
}

impl Drop for Object {
    fn drop(&mut self) {
        release(vec![
            std::mem::replace(&mut self.callable, Value::None),
            std::mem::replace(&mut self.args, Value::None),
            std::mem::replace(&mut self.state, Value::None),
        ]);
    }
}

/// Moves the children of `v` into `out`. With `only_unique`, containers that
/// are still referenced elsewhere are left intact.
fn detach_children(v: &Value, out: &mut Vec<Value>, only_unique: bool) {
    match v {
        Value::Tuple(s) | Value::List(s) if !only_unique || Rc::strong_count(s) == 1 => {
            if let Ok(mut s) = s.try_borrow_mut() {
                out.append(&mut s.0);
            }
        }
        Value::Dict(d) if !only_unique || Rc::strong_count(d) == 1 => {
            if let Ok(mut d) = d.try_borrow_mut() {
                d.index.clear();
                for (k, v) in d.entries.drain(..) {
                    out.push(k);
                    out.push(v);
                }
            }
        }
        Value::Object(o) if !only_unique || Rc::strong_count(o) == 1 => {
            if let Ok(mut o) = o.try_borrow_mut() {
                out.push(std::mem::replace(&mut o.callable, Value::None));
                out.push(std::mem::replace(&mut o.args, Value::None));
                out.push(std::mem::replace(&mut o.state, Value::None));
            }
        }
        _ => {}
    }
}

/// Drops values without recursion.
pub(super) fn release(mut work: Vec<Value>) {
    while let Some(v) = work.pop() {
        detach_children(&v, &mut work, true);
    }
}

/// Empties every container reachable from `work`, shared or not.
pub(super) fn teardown(mut work: Vec<Value>) {
    while let Some(v) = work.pop() {
        detach_children(&v, &mut work, false);
    }
}
