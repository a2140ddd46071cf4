//! Request and response bodies of every route, with their OpenAPI schemas (utoipa). Field
//! names follow text-embeddings-inference (`/embed`, `/tokenize`, `/info`) and OpenAI
//! (`/v1/embeddings`).

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

pub use super::inputs::{Inputs, OpenAiInput};

/// Which end of a long input is cut off when it is truncated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize, ToSchema)]
pub enum TruncationDirection {
    /// Keep the end of the text.
    #[serde(alias = "left")]
    Left,
    /// Keep the start of the text.
    #[default]
    #[serde(alias = "right")]
    Right,
}

/// `POST /embed` (text-embeddings-inference's shape).
#[derive(Debug, Deserialize, ToSchema)]
pub struct EmbedRequest {
    pub inputs: Inputs,
    /// L2-normalise the vectors. [default: as the model's folder says (or --normalize)]
    #[serde(default)]
    pub normalize: Option<bool>,
    /// Cut inputs longer than the model's limit instead of answering 413.
    /// [default: --auto-truncate]
    #[serde(default)]
    pub truncate: Option<bool>,
    #[serde(default)]
    pub truncation_direction: TruncationDirection,
    /// A named prompt of the model (config_sentence_transformers.json), prepended to every
    /// input. [default: --prompt-name, else the model's default prompt]
    #[serde(default)]
    pub prompt_name: Option<String>,
    /// Keep only the first N dimensions (Matryoshka), normalised after truncation when the
    /// vectors are normalised.
    #[serde(default)]
    #[schema(minimum = 1)]
    pub dimensions: Option<usize>,
}

/// One vector per input, in the inputs' order.
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!([[0.1, -0.2, 0.3]]))]
pub struct EmbedResponse(pub Vec<Vec<f32>>);

/// `encoding_format` of the OpenAI route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum EncodingFormat {
    /// A list of numbers.
    #[default]
    Float,
    /// The little-endian float32 bytes, base64-encoded (what OpenAI's Python client asks
    /// for by default).
    Base64,
}

/// `POST /v1/embeddings` (OpenAI's shape).
#[derive(Debug, Deserialize, ToSchema)]
pub struct OpenAiRequest {
    pub input: OpenAiInput,
    /// Echoed in the reply; the server serves one model (see /info) whatever this says.
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default)]
    pub encoding_format: EncodingFormat,
    /// Keep only the first N dimensions (Matryoshka), renormalised when the vectors are
    /// normalised.
    #[serde(default)]
    #[schema(minimum = 1)]
    pub dimensions: Option<usize>,
    /// Ignored (OpenAI's end-user id).
    #[serde(default)]
    pub user: Option<String>,
}

/// One vector, as numbers or as base64 of its little-endian float32 bytes.
#[derive(Debug, Serialize, ToSchema)]
#[serde(untagged)]
pub enum EmbeddingData {
    Float(Vec<f32>),
    Base64(String),
}

#[derive(Debug, Serialize, ToSchema)]
pub struct OpenAiEmbedding {
    /// Always "embedding".
    #[schema(example = "embedding")]
    pub object: &'static str,
    /// The input's position in the request.
    pub index: usize,
    pub embedding: EmbeddingData,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct OpenAiUsage {
    /// Tokens of all inputs, special tokens included.
    pub prompt_tokens: usize,
    pub total_tokens: usize,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct OpenAiResponse {
    /// Always "list".
    #[schema(example = "list")]
    pub object: &'static str,
    pub data: Vec<OpenAiEmbedding>,
    pub model: String,
    pub usage: OpenAiUsage,
}

/// `POST /predict`: the multitask model's heads (needs --checkpoint).
#[derive(Debug, Deserialize, ToSchema)]
pub struct PredictRequest {
    pub inputs: Inputs,
    /// Cut inputs longer than the model's limit instead of answering 413.
    /// [default: --auto-truncate]
    #[serde(default)]
    pub truncate: Option<bool>,
}

/// One label's probability.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct LabelProbability {
    pub label: String,
    pub probability: f32,
}

/// One head's answer: the most probable label and the whole distribution (the checkpoint's
/// label order).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct HeadPrediction {
    pub label: String,
    pub probability: f32,
    pub distribution: Vec<LabelProbability>,
}

/// Both heads' answers for one input (the keys of `--task=2 --format jsonl`).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Prediction {
    pub class: HeadPrediction,
    pub sentiment: HeadPrediction,
}

/// One prediction per input, in the inputs' order.
#[derive(Debug, Serialize, ToSchema)]
pub struct PredictResponse(pub Vec<Prediction>);

/// `POST /tokenize`.
#[derive(Debug, Deserialize, ToSchema)]
pub struct TokenizeRequest {
    pub inputs: Inputs,
    /// Add the model's special tokens ([CLS], [SEP], ...), as the model sees them.
    #[serde(default = "yes")]
    #[schema(default = true)]
    pub add_special_tokens: bool,
    /// A named prompt, prepended as /embed would. [default: the server's prompt]
    #[serde(default)]
    pub prompt_name: Option<String>,
}

fn yes() -> bool {
    true
}

/// One token; `start`..`stop` are byte offsets into the text tokenized (prompt included),
/// absent for special tokens.
#[derive(Debug, Serialize, ToSchema)]
pub struct Token {
    pub id: u32,
    pub text: String,
    pub special: bool,
    pub start: Option<usize>,
    pub stop: Option<usize>,
}

/// The tokens of each input (truncated at the model's limit, as the model sees them).
#[derive(Debug, Serialize, ToSchema)]
pub struct TokenizeResponse(pub Vec<Vec<Token>>);

/// `GET /health`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    /// "ok" once the model is loaded.
    #[schema(example = "ok")]
    pub status: &'static str,
}

/// The batching and request limits in force.
#[derive(Debug, Serialize, ToSchema)]
pub struct LimitsInfo {
    pub max_batch_tokens: usize,
    pub max_concurrent_requests: usize,
    pub max_client_batch_size: usize,
    pub max_body_bytes: usize,
    pub auto_truncate: bool,
    /// Sentences per forward pass inside one batching step.
    pub batch_size: usize,
}

/// One head of the multitask model and its labels.
#[derive(Debug, Serialize, ToSchema)]
pub struct HeadInfo {
    pub name: String,
    pub labels: Vec<String>,
}

/// `GET /info`: what is served.
#[derive(Debug, Serialize, ToSchema)]
pub struct Info {
    /// The served model's name (what the OpenAI route reports).
    pub model: String,
    /// The model's folder or hub id.
    pub model_id: String,
    /// Hub revision; absent for a local folder.
    pub revision: Option<String>,
    pub architecture: String,
    pub dimension: usize,
    pub dtype: String,
    /// The kernel of the dense layers on this CPU.
    pub kernel: String,
    pub pooling: String,
    pub normalize: bool,
    /// Tokens per input, special tokens included.
    pub max_input_length: usize,
    /// The prompt prepended when a request names none.
    pub prompt: Option<String>,
    /// Prompt names a request may give.
    pub prompt_names: Vec<String>,
    pub limits: LimitsInfo,
    /// The multitask model's heads (with --checkpoint).
    pub heads: Option<Vec<HeadInfo>>,
    pub checkpoint: Option<String>,
    pub version: String,
}

/// An error of the routes in text-embeddings-inference's shape.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorResponse {
    pub error: String,
    /// validation, payload_too_large, overloaded, unauthorized, not_found, timeout, backend,
    /// unhealthy.
    pub error_type: String,
}

/// OpenAI's error body.
#[derive(Debug, Serialize, ToSchema)]
pub struct OpenAiErrorBody {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: String,
    /// The request field at fault, when there is one.
    pub param: Option<String>,
    pub code: Option<String>,
}

/// An error of the OpenAI route, in OpenAI's shape.
#[derive(Debug, Serialize, ToSchema)]
pub struct OpenAiErrorResponse {
    pub error: OpenAiErrorBody,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn openai(json: &str) -> Result<OpenAiInput, String> {
        serde_json::from_str(json).map_err(|e| e.to_string())
    }

    #[test]
    fn inputs_take_a_string_or_a_list_of_strings_only() {
        let one: Inputs = serde_json::from_str("\"hi\"").unwrap();
        assert_eq!(one.0, vec!["hi"]);
        let two: Inputs = serde_json::from_str("[\"a\", \"b\"]").unwrap();
        assert_eq!(two.0, vec!["a", "b"]);
        let e = serde_json::from_str::<Inputs>("[\"a\", 3]")
            .unwrap_err()
            .to_string();
        assert!(e.contains("item 1 is a number"), "{e}");
        let e = serde_json::from_str::<Inputs>("{}")
            .unwrap_err()
            .to_string();
        assert!(e.contains("got an object"), "{e}");
    }

    #[test]
    fn openai_input_takes_texts_and_token_ids() {
        assert_eq!(
            openai("\"hi\"").unwrap(),
            OpenAiInput::Texts(vec!["hi".into()])
        );
        assert_eq!(
            openai("[\"a\", \"b\"]").unwrap(),
            OpenAiInput::Texts(vec!["a".into(), "b".into()])
        );
        assert_eq!(
            openai("[101, 7, 102]").unwrap(),
            OpenAiInput::Tokens(vec![vec![101, 7, 102]])
        );
        assert_eq!(
            openai("[[101, 102], [5]]").unwrap(),
            OpenAiInput::Tokens(vec![vec![101, 102], vec![5]])
        );
        assert_eq!(openai("[]").unwrap(), OpenAiInput::Texts(vec![]));
        for bad in [
            "[1, \"a\"]",
            "[-1]",
            "[1.5]",
            "[4294967296]",
            "[[1], 2]",
            "[true]",
            "3",
        ] {
            assert!(openai(bad).is_err(), "{bad} was accepted");
        }
    }
}
