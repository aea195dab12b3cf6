//! A small pickle virtual machine for the subset `torch.save` emits.
//!
//! Nothing is ever imported or executed: globals stay symbolic and calls to
//! them are interpreted by [`super::objects`] (tensor rebuilds, `OrderedDict`)
//! or kept as opaque [`super::value::Object`]s.
//!
//! The machine empties every container it created when it is dropped (see
//! [`teardown`]), which also frees reference cycles.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use super::objects;
use super::value::{Global, Seq, Value, release, teardown};

#[derive(Debug)]
pub(super) enum PickleError {
    Unsupported {
        offset: usize,
        opcode: u8,
        name: &'static str,
    },
    Malformed {
        offset: usize,
        msg: String,
    },
}

/// Runs the pickle in `data` and hands the unpickled root to `f`.
pub(super) fn with_unpickled<R>(
    data: &[u8],
    f: impl FnOnce(&Value) -> R,
) -> Result<R, PickleError> {
    let mut machine = Machine {
        data,
        pos: 0,
        op_start: 0,
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
    };
    let root = machine.run()?;
    let out = f(&root);
    machine.stack.push(root);
    Ok(out)
}

struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    op_start: usize,
    stack: Vec<Value>,
    marks: Vec<usize>,
    memo: HashMap<u32, Value>,
}

impl Drop for Machine<'_> {
    fn drop(&mut self) {
        let mut all = std::mem::take(&mut self.stack);
        all.extend(self.memo.drain().map(|(_, v)| v));
        teardown(all);
    }
}

type Res<T> = Result<T, PickleError>;

impl<'a> Machine<'a> {
    fn err<T>(&self, msg: impl Into<String>) -> Res<T> {
        Err(PickleError::Malformed {
            offset: self.op_start,
            msg: msg.into(),
        })
    }

    fn take(&mut self, n: usize) -> Res<&'a [u8]> {
        let data: &'a [u8] = self.data;
        match self.pos.checked_add(n).filter(|&end| end <= data.len()) {
            Some(end) => {
                let s = &data[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            None => self.err(format!(
                "truncated: needs {n} more bytes, {} left",
                data.len() - self.pos
            )),
        }
    }

    fn arr<const N: usize>(&mut self) -> Res<[u8; N]> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn u8(&mut self) -> Res<u8> {
        Ok(self.arr::<1>()?[0])
    }

    fn u32(&mut self) -> Res<u32> {
        Ok(u32::from_le_bytes(self.arr()?))
    }

    fn len_u64(&mut self) -> Res<usize> {
        let n = u64::from_le_bytes(self.arr()?);
        match usize::try_from(n) {
            Ok(n) => Ok(n),
            Err(_) => self.err(format!("length {n} too large")),
        }
    }

    fn line(&mut self) -> Res<&'a str> {
        let data: &'a [u8] = self.data;
        let rest = &data[self.pos..];
        let Some(nl) = rest.iter().position(|&b| b == b'\n') else {
            return self.err("unterminated line");
        };
        self.pos += nl + 1;
        match std::str::from_utf8(&rest[..nl]) {
            Ok(s) => Ok(s),
            Err(_) => self.err("line is not UTF-8"),
        }
    }

    fn floor(&self) -> usize {
        self.marks.last().copied().unwrap_or(0)
    }

    fn push(&mut self, v: Value) {
        self.stack.push(v);
    }

    fn pop(&mut self) -> Res<Value> {
        if self.stack.len() <= self.floor() {
            return self.err("stack underflow");
        }
        match self.stack.pop() {
            Some(v) => Ok(v),
            None => self.err("stack underflow"),
        }
    }

    fn top(&self) -> Res<&Value> {
        if self.stack.len() <= self.floor() {
            return self.err("stack underflow");
        }
        match self.stack.last() {
            Some(v) => Ok(v),
            None => self.err("stack underflow"),
        }
    }

    fn pop_mark(&mut self) -> Res<Vec<Value>> {
        let Some(at) = self.marks.pop() else {
            return self.err("no MARK on the stack");
        };
        if at > self.stack.len() {
            return self.err("MARK below the stack");
        }
        Ok(self.stack.split_off(at))
    }

    fn memo_put(&mut self, idx: u32) -> Res<()> {
        let v = self.top()?.clone();
        if let Some(old) = self.memo.insert(idx, v) {
            release(vec![old]);
        }
        Ok(())
    }

    fn memo_get(&mut self, idx: u32) -> Res<()> {
        match self.memo.get(&idx) {
            Some(v) => {
                let v = v.clone();
                self.push(v);
                Ok(())
            }
            None => self.err(format!("memo entry {idx} is not defined")),
        }
    }

    fn string(&mut self, n: usize) -> Res<()> {
        let bytes = self.take(n)?;
        let s: Rc<str> = String::from_utf8_lossy(bytes).into();
        self.push(Value::Str(s));
        Ok(())
    }

    fn bytes(&mut self, n: usize) -> Res<()> {
        self.take(n)?;
        self.push(Value::Bytes);
        Ok(())
    }

    fn long(&mut self, n: usize) -> Res<()> {
        let b = self.take(n)?;
        self.push(decode_long(b));
        Ok(())
    }

    fn set_items(&mut self, items: Vec<Value>) -> Res<()> {
        if !items.len().is_multiple_of(2) {
            return self.err("SETITEMS with an odd number of items");
        }
        let target = self.top()?.clone();
        let Value::Dict(d) = target else {
            return self.err(format!("SETITEM on a {}", target.kind()));
        };
        let Ok(mut d) = d.try_borrow_mut() else {
            return self.err("dict is busy");
        };
        let mut it = items.into_iter();
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            d.insert(k, v);
        }
        Ok(())
    }

    fn append(&mut self, mut items: Vec<Value>) -> Res<()> {
        let target = self.top()?.clone();
        let Value::List(l) = target else {
            return self.err(format!("APPEND to a {}", target.kind()));
        };
        let Ok(mut l) = l.try_borrow_mut() else {
            return self.err("list is busy");
        };
        l.0.append(&mut items);
        Ok(())
    }

    fn call(&mut self, callable: Value, args: Value) -> Res<()> {
        match objects::call(callable, args) {
            Ok(v) => {
                self.push(v);
                Ok(())
            }
            Err(msg) => self.err(msg),
        }
    }

    fn run(&mut self) -> Res<Value> {
        loop {
            self.op_start = self.pos;
            let op = self.u8()?;
            match op {
                0x80 => {
                    let v = self.u8()?;
                    if v > 5 {
                        return self.err(format!("pickle protocol {v} is not supported"));
                    }
                }
                0x95 => {
                    self.arr::<8>()?;
                }
                b'.' => return self.pop(),
                b'(' => self.marks.push(self.stack.len()),
                b'0' => {
                    if self.stack.len() > self.floor() {
                        self.pop()?;
                    } else {
                        self.pop_mark()?;
                    }
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let v = self.top()?.clone();
                    self.push(v);
                }
                b'N' => self.push(Value::None),
                0x88 => self.push(Value::Bool(true)),
                0x89 => self.push(Value::Bool(false)),
                b'J' => {
                    let v = i32::from_le_bytes(self.arr()?);
                    self.push(Value::Int(i64::from(v)));
                }
                b'K' => {
                    let v = self.u8()?;
                    self.push(Value::Int(i64::from(v)));
                }
                b'M' => {
                    let v = u16::from_le_bytes(self.arr()?);
                    self.push(Value::Int(i64::from(v)));
                }
                0x8a => {
                    let n = usize::from(self.u8()?);
                    self.long(n)?;
                }
                0x8b => {
                    let n = i32::from_le_bytes(self.arr()?);
                    let Ok(n) = usize::try_from(n) else {
                        return self.err("LONG4 with a negative length");
                    };
                    self.long(n)?;
                }
                b'G' => {
                    self.arr::<8>()?;
                    self.push(Value::Float);
                }
                b'X' => {
                    let n = self.u32()? as usize;
                    self.string(n)?;
                }
                0x8c => {
                    let n = usize::from(self.u8()?);
                    self.string(n)?;
                }
                0x8d => {
                    let n = self.len_u64()?;
                    self.string(n)?;
                }
                b'T' => {
                    let n = i32::from_le_bytes(self.arr()?);
                    let Ok(n) = usize::try_from(n) else {
                        return self.err("BINSTRING with a negative length");
                    };
                    self.string(n)?;
                }
                b'U' => {
                    let n = usize::from(self.u8()?);
                    self.string(n)?;
                }
                b'B' => {
                    let n = self.u32()? as usize;
                    self.bytes(n)?;
                }
                b'C' => {
                    let n = usize::from(self.u8()?);
                    self.bytes(n)?;
                }
                0x8e | 0x96 => {
                    let n = self.len_u64()?;
                    self.bytes(n)?;
                }
                b')' => self.push(Value::tuple(Vec::new())),
                b't' => {
                    let items = self.pop_mark()?;
                    self.push(Value::tuple(items));
                }
                0x85..=0x87 => {
                    let n = usize::from(op - 0x84);
                    let mut items = Vec::with_capacity(n);
                    for _ in 0..n {
                        items.push(self.pop()?);
                    }
                    items.reverse();
                    self.push(Value::tuple(items));
                }
                b']' => self.push(Value::List(Rc::default())),
                b'l' => {
                    let items = self.pop_mark()?;
                    self.push(Value::List(Rc::new(RefCell::new(Seq(items)))));
                }
                b'}' => self.push(Value::Dict(Rc::default())),
                b'd' => {
                    let items = self.pop_mark()?;
                    self.push(Value::Dict(Rc::default()));
                    self.set_items(items)?;
                }
                b'a' => {
                    let v = self.pop()?;
                    self.append(vec![v])?;
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    self.append(items)?;
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    self.set_items(vec![k, v])?;
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    self.set_items(items)?;
                }
                b'q' => {
                    let i = self.u8()?;
                    self.memo_put(u32::from(i))?;
                }
                b'r' => {
                    let i = self.u32()?;
                    self.memo_put(i)?;
                }
                0x94 => {
                    let Ok(i) = u32::try_from(self.memo.len()) else {
                        return self.err("memo is full");
                    };
                    self.memo_put(i)?;
                }
                b'h' => {
                    let i = self.u8()?;
                    self.memo_get(u32::from(i))?;
                }
                b'j' => {
                    let i = self.u32()?;
                    self.memo_get(i)?;
                }
                b'c' => {
                    let module = self.line()?.to_owned();
                    let name = self.line()?.to_owned();
                    self.push(Value::Global(Rc::new(Global { module, name })));
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    let (Value::Str(module), Value::Str(name)) = (&module, &name) else {
                        return self.err(format!(
                            "STACK_GLOBAL needs two strings, got {} and {}",
                            module.kind(),
                            name.kind()
                        ));
                    };
                    let g = Global {
                        module: module.to_string(),
                        name: name.to_string(),
                    };
                    self.push(Value::Global(Rc::new(g)));
                }
                b'R' => {
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    self.call(callable, args)?;
                }
                0x81 => {
                    let args = self.pop()?;
                    let cls = self.pop()?;
                    self.call(cls, args)?;
                }
                0x92 => {
                    let _kwargs = self.pop()?;
                    let args = self.pop()?;
                    let cls = self.pop()?;
                    self.call(cls, args)?;
                }
                b'b' => {
                    let state = self.pop()?;
                    if let Value::Object(o) = self.top()?
                        && let Ok(mut o) = o.try_borrow_mut()
                    {
                        o.state = state;
                    }
                }
                b'Q' => {
                    let pid = self.pop()?;
                    match objects::persistent_load(&pid) {
                        Ok(s) => self.push(Value::Storage(Rc::new(s))),
                        Err(msg) => return self.err(msg),
                    }
                }
                other => {
                    return Err(PickleError::Unsupported {
                        offset: self.op_start,
                        opcode: other,
                        name: opcode_name(other),
                    });
                }
            }
        }
    }
}

/// Little-endian two's-complement integer of any width.
fn decode_long(b: &[u8]) -> Value {
    if b.is_empty() {
        return Value::Int(0);
    }
    let negative = b[b.len() - 1] & 0x80 != 0;
    let fill = if negative { 0xff } else { 0x00 };
    if b.len() > 8 {
        let (low, high) = b.split_at(8);
        if high.iter().any(|&x| x != fill) || (low[7] & 0x80 != 0) != negative {
            return Value::BigInt;
        }
    }
    let mut buf = [fill; 8];
    let n = b.len().min(8);
    buf[..n].copy_from_slice(&b[..n]);
    Value::Int(i64::from_le_bytes(buf))
}

fn opcode_name(op: u8) -> &'static str {
    match op {
        b'F' => "FLOAT",
        b'I' => "INT",
        b'L' => "LONG",
        b'P' => "PERSID",
        b'S' => "STRING",
        b'V' => "UNICODE",
        b'g' => "GET",
        b'p' => "PUT",
        b'i' => "INST",
        b'o' => "OBJ",
        0x82 => "EXT1",
        0x83 => "EXT2",
        0x84 => "EXT4",
        0x8f => "EMPTY_SET",
        0x90 => "ADDITEMS",
        0x91 => "FROZENSET",
        0x97 => "NEXT_BUFFER",
        0x98 => "READONLY_BUFFER",
        _ => "<unknown>",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_decoding() {
        assert!(matches!(decode_long(&[]), Value::Int(0)));
        assert!(matches!(decode_long(&[0xff]), Value::Int(-1)));
        assert!(matches!(decode_long(&[0x00, 0x80]), Value::Int(-32768)));
        assert!(matches!(
            decode_long(&[1, 0, 0, 0, 0, 0, 0, 0, 0]),
            Value::Int(1)
        ));
        assert!(matches!(
            decode_long(&[0, 0, 0, 0, 0, 0, 0, 0, 1]),
            Value::BigInt
        ));
        assert!(matches!(
            decode_long(&[0, 0, 0, 0, 0, 0, 0, 0x80, 0]),
            Value::BigInt
        ));
    }

    #[test]
    fn deep_nesting_drops_without_recursion() {
        let mut pkl = vec![0x80, 2, b')'];
        pkl.extend(std::iter::repeat_n(0x85, 200_000));
        pkl.push(b'.');
        let n = with_unpickled(&pkl, |v| v.kind()).expect("valid pickle");
        assert_eq!(n, "tuple");
        // Errors part-way must not recurse either.
        pkl.pop();
        assert!(with_unpickled(&pkl, |_| ()).is_err());
    }

    #[test]
    fn cycles_are_torn_down() {
        // l = []; l.append(l); return l
        let pkl = [0x80, 2, b']', b'q', 0, b'h', 0, b'a', b'.'];
        let kind = with_unpickled(&pkl, |v| v.kind()).expect("valid pickle");
        assert_eq!(kind, "list");
    }
}
