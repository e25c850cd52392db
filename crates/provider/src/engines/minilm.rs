//! Built-in sentence embeddings: all-MiniLM-L6-v2 on the CPU with candle.
//!
//! Output matches sentence-transformers' `encode(..., normalize_embeddings=True)`: BERT
//! token states, mean-pooled over the real (non-padding) tokens, then L2-normalised.

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};
use tokenizers::{Encoding, Tokenizer, TruncationParams};

/// sentence-transformers' `max_seq_length` for this model: it was trained on 256-token
/// windows, so longer inputs are cut there even though BERT itself allows 512.
pub const MAX_TOKENS: usize = 256;

/// Texts per forward pass: big enough to amortise per-call overhead, small enough that
/// the attention scores of a full batch (batch x heads x 256 x 256 floats) stay ~100 MB.
const BATCH_SIZE: usize = 32;

/// Result of one [`MiniLm::embed`] call.
#[derive(Debug, Clone, PartialEq)]
pub struct Embedded {
    /// One unit-length vector per input text, in input order.
    pub vectors: Vec<Vec<f32>>,
    /// Real tokens processed (after truncation, [CLS] and [SEP] included), summed over inputs.
    pub prompt_tokens: usize,
}

/// A loaded all-MiniLM-L6-v2 model. Immutable after loading, so one instance can be
/// shared across threads behind an `Arc`.
pub struct MiniLm {
    model: BertModel,
    tokenizer: Tokenizer,
    device: Device,
    dimensions: usize,
    max_tokens: usize,
    pad_id: u32,
}

// The node calls `embed` from `spawn_blocking` behind an `Arc`; fail the build, not the
// node, if a dependency upgrade ever makes this untrue.
const _: () = {
    const fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<MiniLm>();
};

impl MiniLm {
    /// Loads the model from a folder holding `model.safetensors`, `config.json` and
    /// `tokenizer.json` (see [`crate::models::is_model_folder`]).
    pub fn load(dir: &Path) -> Result<Self> {
        let config_path = dir.join("config.json");
        let config_text =
            std::fs::read_to_string(&config_path).with_context(|| format!("cannot read {}", config_path.display()))?;
        let config: Config = serde_json::from_str(&config_text)
            .with_context(|| format!("{} is not a BERT config", config_path.display()))?;

        let tokenizer_path = dir.join("tokenizer.json");
        let mut tokenizer = Tokenizer::from_file(&tokenizer_path)
            .map_err(|e| anyhow!("cannot load {}: {e}", tokenizer_path.display()))?;
        let max_tokens = MAX_TOKENS.min(config.max_position_embeddings);
        // The shipped tokenizer.json truncates at 128 and pads every input to 128; we want
        // sentence-transformers' 256-token window and pad per batch ourselves, after
        // sorting by length, so short texts are not padded to the length of long ones.
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: max_tokens,
                ..TruncationParams::default()
            }))
            .map_err(|e| anyhow!("cannot configure truncation: {e}"))?;
        let pad_id = tokenizer
            .get_padding()
            .map(|p| p.pad_id)
            .or_else(|| tokenizer.token_to_id("[PAD]"))
            .unwrap_or(0);
        tokenizer.with_padding(None);

        let device = Device::Cpu;
        let weights = dir.join("model.safetensors");
        if !weights.is_file() {
            bail!("{} is missing", weights.display());
        }
        // SAFETY: the weights are memory-mapped rather than copied to halve peak memory.
        // The file lives in our model cache and is only ever replaced by renaming a new
        // folder into place, never rewritten in place, so the mapping stays valid.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&weights], DType::F32, &device) }
            .with_context(|| format!("cannot map {}", weights.display()))?;
        let model = BertModel::load(vb, &config)
            .with_context(|| format!("{} does not hold BERT weights", weights.display()))?;

        Ok(Self {
            model,
            tokenizer,
            device,
            dimensions: config.hidden_size,
            max_tokens,
            pad_id,
        })
    }

    /// Length of every vector this model returns (384).
    pub fn dimensions(&self) -> usize {
        self.dimensions
    }

    /// Longest input, in tokens, that is embedded whole; longer inputs are truncated.
    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    /// Embeds each text; vectors come back in input order.
    pub fn embed(&self, texts: &[String]) -> Result<Embedded> {
        if texts.is_empty() {
            return Ok(Embedded {
                vectors: Vec::new(),
                prompt_tokens: 0,
            });
        }
        let encodings = self
            .tokenizer
            .encode_batch(texts.iter().map(String::as_str).collect::<Vec<_>>(), true)
            .map_err(|e| anyhow!("tokenization failed: {e}"))?;
        let prompt_tokens = encodings.iter().map(Encoding::len).sum();

        // Batching texts of similar length keeps padding (wasted compute) small.
        let mut order: Vec<usize> = (0..encodings.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(encodings[i].len()));

        let mut vectors = vec![Vec::new(); texts.len()];
        for batch in order.chunks(BATCH_SIZE) {
            let batch_encodings: Vec<&Encoding> = batch.iter().map(|&i| &encodings[i]).collect();
            let pooled = self.embed_batch(&batch_encodings)?;
            for (&i, vector) in batch.iter().zip(pooled) {
                vectors[i] = vector;
            }
        }
        Ok(Embedded { vectors, prompt_tokens })
    }

    fn embed_batch(&self, encodings: &[&Encoding]) -> Result<Vec<Vec<f32>>> {
        let rows = encodings.len();
        let width = encodings.iter().map(|e| e.len()).max().unwrap_or(0);
        let mut ids = Vec::with_capacity(rows * width);
        let mut type_ids = Vec::with_capacity(rows * width);
        let mut mask = Vec::with_capacity(rows * width);
        for encoding in encodings {
            let pad = width - encoding.len();
            ids.extend_from_slice(encoding.get_ids());
            ids.extend(std::iter::repeat_n(self.pad_id, pad));
            type_ids.extend_from_slice(encoding.get_type_ids());
            type_ids.extend(std::iter::repeat_n(0u32, pad));
            mask.extend(std::iter::repeat_n(1u32, encoding.len()));
            mask.extend(std::iter::repeat_n(0u32, pad));
        }
        let ids = Tensor::from_vec(ids, (rows, width), &self.device)?;
        let type_ids = Tensor::from_vec(type_ids, (rows, width), &self.device)?;
        let mask = Tensor::from_vec(mask, (rows, width), &self.device)?;

        // Shapes: hidden (rows, width, dim), mask (rows, width, 1), summed (rows, dim).
        let hidden = self.model.forward(&ids, &type_ids, Some(&mask))?;
        let mask = mask.to_dtype(DType::F32)?.unsqueeze(2)?;
        let summed = hidden.broadcast_mul(&mask)?.sum(1)?;
        // Same floors as sentence-transformers (clamp 1e-9) and torch's normalize (1e-12):
        // they only matter for degenerate rows, but keep those from turning into NaN.
        let counts = mask.sum(1)?.clamp(1e-9f32, f32::MAX)?;
        let mean = summed.broadcast_div(&counts)?;
        let norms = mean.sqr()?.sum_keepdim(1)?.sqrt()?.clamp(1e-12f32, f32::MAX)?;
        let unit = mean.broadcast_div(&norms)?;
        Ok(unit.to_vec2::<f32>()?)
    }
}
