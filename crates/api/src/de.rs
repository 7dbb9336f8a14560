//! A serde `Deserializer` over a `serde_json::Value` tree that records schema problems
//! (unknown fields, wrong types, missing required fields, unsupported enum values) with their
//! field paths and keeps going, so one document can report all of its problems at once.
//!
//! How it recovers: `deserialize_struct` knows the struct's field list, so it reports
//! unknown keys itself and hands the derived visitor every known field, marking absent
//! ones. An absent field becomes `None` / an empty collection, or, for a required field, a
//! recorded "missing required field" and a made-up placeholder value. A value of the wrong
//! type is recorded and replaced by a placeholder too. The placeholder never escapes: a
//! document with any recorded problem is rejected. Types deserialized this way must not use
//! `#[serde(default)]`, `flatten` or untagged enums (none in this crate do).

use std::cell::RefCell;
use std::fmt;

use serde::de::value::StrDeserializer;
use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::Value;

/// A schema problem.
#[derive(Debug, Clone)]
pub(crate) struct Problem {
    /// Field path.
    pub path: String,
    /// Message.
    pub message: String,
    /// Whether a placeholder value stands where the problem is (false for unknown fields,
    /// which are just left out).
    pub substituted: bool,
}

/// Problems found so far.
#[derive(Debug, Default)]
pub(crate) struct Problems(RefCell<Vec<Problem>>);

impl Problems {
    fn push(&self, path: &str, message: String) {
        self.0.borrow_mut().push(Problem {
            path: path.to_owned(),
            message,
            substituted: true,
        });
    }
    fn push_unknown(&self, path: &str, message: String) {
        self.0.borrow_mut().push(Problem {
            path: path.to_owned(),
            message,
            substituted: false,
        });
    }
    pub(crate) fn into_inner(self) -> Vec<Problem> {
        self.0.into_inner()
    }
}

/// Error type. `located` means it was already recorded in [`Problems`].
#[derive(Debug)]
pub(crate) struct DeError {
    message: String,
    located: bool,
}

impl fmt::Display for DeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for DeError {}

impl de::Error for DeError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        DeError {
            message: msg.to_string(),
            located: false,
        }
    }
}

/// Deserializes `T` from `value`, recording every problem. Returns `None` only when the
/// derived code failed in a way it could not recover from (also recorded).
pub(crate) fn from_value<T: de::DeserializeOwned>(value: &Value, problems: &Problems) -> Option<T> {
    let de = De {
        value: Some(value),
        path: String::new(),
        problems,
        mode: Mode::Present,
    };
    match T::deserialize(de) {
        Ok(v) => Some(v),
        Err(e) => {
            if !e.located {
                problems.push("", e.message);
            }
            None
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// The value is there (`value` is `Some`).
    Present,
    /// The field is absent from its object.
    Absent,
    /// Make up a placeholder silently (a problem was already recorded above).
    Synth,
}

struct De<'v, 'p> {
    value: Option<&'v Value>,
    path: String,
    problems: &'p Problems,
    mode: Mode,
}

/// Appends a field to a path: `.name` for plain names, `[key]` for map keys like `tls.crt`.
pub(crate) fn join_key(path: &str, key: &str) -> String {
    let plain = !key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    match (path.is_empty(), plain) {
        (true, true) => key.to_owned(),
        (false, true) => format!("{path}.{key}"),
        (_, false) => format!("{path}[{key}]"),
    }
}

/// Appends a list index to a path.
pub(crate) fn join_index(path: &str, i: usize) -> String {
    format!("{path}[{i}]")
}

/// The range a field really accepts, for messages about numbers that do not even fit its
/// Rust type (the semantic checks give the same ranges for numbers that do).
fn range_hint(path: &str) -> Option<(i128, i128)> {
    let field = path.rsplit(['.', '[']).next().unwrap_or(path);
    match field {
        "port" => Some((1, 65535)),
        "weight" if path.contains("endpoints[") => Some((1, 1_000_000)),
        "weight" => Some((0, 1_000_000)),
        _ => None,
    }
}

fn describe(v: &Value) -> String {
    match v {
        Value::Null => "null".to_owned(),
        Value::Bool(b) => format!("boolean {b}"),
        Value::Number(n) => format!("number {n}"),
        // String contents are not echoed: they may be secrets.
        Value::String(_) => "a string".to_owned(),
        Value::Array(_) => "a list".to_owned(),
        Value::Object(_) => "an object".to_owned(),
    }
}

fn truncate(s: &str) -> String {
    if s.chars().count() > 64 {
        format!("{}...", s.chars().take(64).collect::<String>())
    } else {
        s.to_owned()
    }
}

impl<'v, 'p> De<'v, 'p> {
    fn child(&self, path: String, value: Option<&'v Value>, mode: Mode) -> De<'v, 'p> {
        De {
            value,
            path,
            problems: self.problems,
            mode,
        }
    }

    /// Records a problem for a present value of the wrong shape, or a missing required
    /// field, depending on the mode (nothing in `Synth` mode).
    fn mismatch(&self, expected: &str) {
        match (self.mode, self.value) {
            (Mode::Present, Some(Value::Null)) | (Mode::Absent, _) => self
                .problems
                .push(&self.path, "missing required field".to_owned()),
            (Mode::Present, Some(v)) => self.problems.push(
                &self.path,
                format!("expected {expected}, got {}", describe(v)),
            ),
            _ => {}
        }
    }

    fn present(&self) -> Option<&'v Value> {
        if self.mode == Mode::Present {
            self.value
        } else {
            None
        }
    }

    fn integer<'de, V: Visitor<'de>>(
        self,
        visitor: V,
        min: i128,
        max: i128,
    ) -> Result<V::Value, DeError> {
        if let Some(Value::Number(n)) = self.present() {
            let as_int = n
                .as_i64()
                .map(i128::from)
                .or_else(|| n.as_u64().map(i128::from));
            match as_int {
                Some(i) if (min..=max).contains(&i) => {
                    return if i >= 0 {
                        visitor.visit_u64(i as u64)
                    } else {
                        visitor.visit_i64(i as i64)
                    };
                }
                Some(i) => {
                    let (lo, hi) = range_hint(&self.path).unwrap_or((min, max));
                    self.problems.push(
                        &self.path,
                        format!("must be between {lo} and {hi}, got {i}"),
                    );
                }
                None => self
                    .problems
                    .push(&self.path, format!("expected an integer, got number {n}")),
            }
        } else {
            self.mismatch("an integer");
        }
        visitor.visit_u64(0)
    }
}

macro_rules! int_method {
    ($method:ident, $ty:ty) => {
        fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
            self.integer(visitor, i128::from(<$ty>::MIN), i128::from(<$ty>::MAX))
        }
    };
}

impl<'de> Deserializer<'de> for De<'_, '_> {
    type Error = DeError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        let Some(v) = self.present() else {
            self.mismatch("a value");
            return visitor.visit_unit();
        };
        match v {
            Value::Null => visitor.visit_unit(),
            Value::Bool(b) => visitor.visit_bool(*b),
            Value::Number(n) => {
                if let Some(u) = n.as_u64() {
                    visitor.visit_u64(u)
                } else if let Some(i) = n.as_i64() {
                    visitor.visit_i64(i)
                } else {
                    visitor.visit_f64(n.as_f64().unwrap_or_default())
                }
            }
            Value::String(s) => visitor.visit_str(s),
            Value::Array(items) => visitor.visit_seq(Seq {
                de: &self,
                items: items.iter().enumerate(),
            }),
            Value::Object(map) => visitor.visit_map(AnyMap {
                de: &self,
                iter: map.iter(),
                pending: None,
            }),
        }
    }

    fn deserialize_bool<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        if let Some(Value::Bool(b)) = self.present() {
            return visitor.visit_bool(*b);
        }
        self.mismatch("a boolean (true or false)");
        visitor.visit_bool(false)
    }

    int_method!(deserialize_i8, i8);
    int_method!(deserialize_i16, i16);
    int_method!(deserialize_i32, i32);
    int_method!(deserialize_i64, i64);
    int_method!(deserialize_u8, u8);
    int_method!(deserialize_u16, u16);
    int_method!(deserialize_u32, u32);
    int_method!(deserialize_u64, u64);

    fn deserialize_f32<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_f64(visitor)
    }

    fn deserialize_f64<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        if let Some(Value::Number(n)) = self.present() {
            return visitor.visit_f64(n.as_f64().unwrap_or_default());
        }
        self.mismatch("a number");
        visitor.visit_f64(0.0)
    }

    fn deserialize_char<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_str(visitor)
    }

    fn deserialize_str<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        if let Some(Value::String(s)) = self.present() {
            return visitor.visit_str(s);
        }
        self.mismatch("a string");
        visitor.visit_str("")
    }

    fn deserialize_string<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_str(visitor)
    }

    fn deserialize_bytes<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_str(visitor)
    }

    fn deserialize_byte_buf<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_str(visitor)
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        match self.present() {
            None | Some(Value::Null) => visitor.visit_none(),
            Some(_) => visitor.visit_some(self),
        }
    }

    fn deserialize_unit<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        visitor.visit_unit()
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, DeError> {
        visitor.visit_unit()
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, DeError> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        const EMPTY: &[Value] = &[];
        let items = match self.present() {
            Some(Value::Array(items)) => items.as_slice(),
            None | Some(Value::Null) => EMPTY,
            Some(_) => {
                self.mismatch("a list");
                EMPTY
            }
        };
        visitor.visit_seq(Seq {
            de: &self,
            items: items.iter().enumerate(),
        })
    }

    fn deserialize_tuple<V: Visitor<'de>>(
        self,
        _len: usize,
        visitor: V,
    ) -> Result<V::Value, DeError> {
        self.deserialize_seq(visitor)
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _len: usize,
        visitor: V,
    ) -> Result<V::Value, DeError> {
        self.deserialize_seq(visitor)
    }

    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        static EMPTY: std::sync::LazyLock<serde_json::Map<String, Value>> =
            std::sync::LazyLock::new(serde_json::Map::new);
        let map = match self.present() {
            Some(Value::Object(map)) => map,
            None | Some(Value::Null) => &*EMPTY,
            Some(_) => {
                self.mismatch("an object");
                &*EMPTY
            }
        };
        visitor.visit_map(AnyMap {
            de: &self,
            iter: map.iter(),
            pending: None,
        })
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DeError> {
        let mut entries = Vec::with_capacity(fields.len());
        match self.present() {
            Some(Value::Object(map)) => {
                for key in map.keys() {
                    if !fields.contains(&key.as_str()) {
                        self.problems.push_unknown(
                            &join_key(&self.path, key),
                            format!("unknown field (expected one of: {})", fields.join(", ")),
                        );
                    }
                }
                for f in fields {
                    let path = join_key(&self.path, f);
                    match map.get(*f) {
                        Some(v) => entries.push((*f, path, Some(v), Mode::Present)),
                        None => entries.push((*f, path, None, Mode::Absent)),
                    }
                }
            }
            _ => {
                self.mismatch("an object");
                entries.extend(
                    fields
                        .iter()
                        .map(|f| (*f, join_key(&self.path, f), None, Mode::Synth)),
                );
            }
        }
        let result = visitor.visit_map(StructMap {
            de: &self,
            entries: entries.into_iter(),
            pending: None,
        });
        result.map_err(|e| {
            if !e.located {
                self.problems.push(&self.path, e.message.clone());
            }
            DeError {
                message: e.message,
                located: true,
            }
        })
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DeError> {
        let Some(first) = variants.first() else {
            return Err(de::Error::custom("enum without variants"));
        };
        let chosen = match self.present() {
            Some(Value::String(s)) => match variants.iter().find(|v| **v == s.as_str()) {
                Some(v) => v,
                None => {
                    self.problems.push(
                        &self.path,
                        format!(
                            "unsupported value {:?} (expected one of: {})",
                            truncate(s),
                            variants.join(", ")
                        ),
                    );
                    first
                }
            },
            _ => {
                self.mismatch(&format!("one of: {}", variants.join(", ")));
                first
            }
        };
        visitor.visit_enum(StrDeserializer::<DeError>::new(chosen))
    }

    fn deserialize_identifier<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_str(visitor)
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        visitor.visit_unit()
    }
}

struct Seq<'a, 'v, 'p, I> {
    de: &'a De<'v, 'p>,
    items: I,
}

impl<'de, 'v, I: Iterator<Item = (usize, &'v Value)>> SeqAccess<'de> for Seq<'_, 'v, '_, I> {
    type Error = DeError;
    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, DeError> {
        match self.items.next() {
            Some((i, v)) => {
                let child = self
                    .de
                    .child(join_index(&self.de.path, i), Some(v), Mode::Present);
                seed.deserialize(child).map(Some)
            }
            None => Ok(None),
        }
    }
}

struct AnyMap<'a, 'v, 'p, I> {
    de: &'a De<'v, 'p>,
    iter: I,
    pending: Option<(String, &'v Value)>,
}

impl<'de, 'v, I: Iterator<Item = (&'v String, &'v Value)>> MapAccess<'de>
    for AnyMap<'_, 'v, '_, I>
{
    type Error = DeError;
    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, DeError> {
        match self.iter.next() {
            Some((k, v)) => {
                self.pending = Some((join_key(&self.de.path, k), v));
                seed.deserialize(StrDeserializer::<DeError>::new(k))
                    .map(Some)
            }
            None => Ok(None),
        }
    }
    fn next_value_seed<S: DeserializeSeed<'de>>(&mut self, seed: S) -> Result<S::Value, DeError> {
        let (path, v) = self
            .pending
            .take()
            .ok_or_else(|| de::Error::custom("value without key"))?;
        seed.deserialize(self.de.child(path, Some(v), Mode::Present))
    }
}

type Entry<'v> = (&'static str, String, Option<&'v Value>, Mode);

struct StructMap<'a, 'v, 'p, I> {
    de: &'a De<'v, 'p>,
    entries: I,
    pending: Option<(String, Option<&'v Value>, Mode)>,
}

impl<'de, 'v, I: Iterator<Item = Entry<'v>>> MapAccess<'de> for StructMap<'_, 'v, '_, I> {
    type Error = DeError;
    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, DeError> {
        match self.entries.next() {
            Some((name, path, value, mode)) => {
                self.pending = Some((path, value, mode));
                seed.deserialize(StrDeserializer::<DeError>::new(name))
                    .map(Some)
            }
            None => Ok(None),
        }
    }
    fn next_value_seed<S: DeserializeSeed<'de>>(&mut self, seed: S) -> Result<S::Value, DeError> {
        let (path, value, mode) = self
            .pending
            .take()
            .ok_or_else(|| de::Error::custom("value without key"))?;
        seed.deserialize(self.de.child(path, value, mode))
    }
}
