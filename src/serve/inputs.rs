//! The two shapes of a request's inputs, read by hand for clear errors: TEI's `inputs` (a
//! text or a list of texts) and OpenAI's `input` (texts or token ids), with their OpenAPI
//! schemas.

use serde::{Deserialize, Deserializer};
use serde_json::Value;
use utoipa::openapi::schema::{ArrayBuilder, ObjectBuilder, OneOfBuilder, Schema, Type};
use utoipa::openapi::RefOr;
use utoipa::ToSchema;

/// One text or a list of texts (`"inputs"` of `/embed`, `/predict`, `/tokenize`).
#[derive(Debug, Clone, PartialEq)]
pub struct Inputs(pub Vec<String>);

impl<'de> Deserialize<'de> for Inputs {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        match Value::deserialize(d)? {
            Value::String(s) => Ok(Inputs(vec![s])),
            Value::Array(items) => items
                .into_iter()
                .enumerate()
                .map(|(i, v)| match v {
                    Value::String(s) => Ok(s),
                    other => Err(D::Error::custom(format!(
                        "item {i} is {}, expected a string",
                        kind(&other)
                    ))),
                })
                .collect::<Result<_, _>>()
                .map(Inputs),
            other => Err(D::Error::custom(format!(
                "expected a string or a list of strings, got {}",
                kind(&other)
            ))),
        }
    }
}

/// A JSON value's kind, for error messages.
fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

fn text_schema() -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .min_length(Some(1))
}

/// A non-empty list of non-empty texts.
fn texts_schema(description: &str) -> ArrayBuilder {
    ArrayBuilder::new()
        .items(text_schema())
        .min_items(Some(1))
        .description(Some(description))
}

impl utoipa::PartialSchema for Inputs {
    fn schema() -> RefOr<Schema> {
        OneOfBuilder::new()
            .item(text_schema().description(Some("One text")))
            .item(texts_schema(
                "Several texts (at most --max-client-batch-size)",
            ))
            .description(Some("A non-empty text, or a non-empty list of them"))
            .into()
    }
}
impl ToSchema for Inputs {}

/// OpenAI's `input`: a text, a list of texts, one list of token ids, or a list of them.
#[derive(Debug, Clone, PartialEq)]
pub enum OpenAiInput {
    Texts(Vec<String>),
    /// Token ids as `/tokenize` gives them (special tokens included), one list per input.
    Tokens(Vec<Vec<u32>>),
}

impl<'de> Deserialize<'de> for OpenAiInput {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let ids = |v: &[Value]| -> Option<Vec<u32>> {
            v.iter()
                .map(|x| x.as_u64().and_then(|n| u32::try_from(n).ok()))
                .collect()
        };
        let bad = || {
            D::Error::custom(
                "expected a string, a list of strings, a list of token ids (whole numbers) or \
                 a list of such lists",
            )
        };
        match Value::deserialize(d)? {
            Value::String(s) => Ok(OpenAiInput::Texts(vec![s])),
            Value::Array(items) => match items.first() {
                None => Ok(OpenAiInput::Texts(Vec::new())),
                Some(Value::String(_)) => Inputs::deserialize(Value::Array(items))
                    .map(|i| OpenAiInput::Texts(i.0))
                    .map_err(D::Error::custom),
                Some(Value::Number(_)) => ids(&items)
                    .map(|v| OpenAiInput::Tokens(vec![v]))
                    .ok_or_else(bad),
                Some(Value::Array(_)) => items
                    .iter()
                    .map(|x| x.as_array().and_then(|a| ids(a)))
                    .collect::<Option<_>>()
                    .map(OpenAiInput::Tokens)
                    .ok_or_else(bad),
                Some(_) => Err(bad()),
            },
            _ => Err(bad()),
        }
    }
}

impl utoipa::PartialSchema for OpenAiInput {
    fn schema() -> RefOr<Schema> {
        let id = || {
            ObjectBuilder::new()
                .schema_type(Type::Integer)
                .minimum(Some(0))
                .maximum(Some(u32::MAX))
        };
        let ids = || ArrayBuilder::new().items(id()).min_items(Some(1));
        OneOfBuilder::new()
            .item(text_schema().description(Some("One text")))
            .item(texts_schema("Several texts"))
            .item(ids().description(Some(
                "One input as token ids, special tokens included (as /tokenize gives them)",
            )))
            .item(
                ArrayBuilder::new()
                    .items(ids())
                    .min_items(Some(1))
                    .description(Some("Several inputs as token ids")),
            )
            .into()
    }
}
impl ToSchema for OpenAiInput {}
