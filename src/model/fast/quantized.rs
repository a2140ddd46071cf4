//! The inference encoder in a chosen arithmetic ([`FastEncoder`]): each layer's dense weights
//! are converted at load (Q, K and V fused), to float32 stored transposed
//! ([`super::dense_f32`]) or to int8 or bf16 for the [`quant`] kernels, with embeddings,
//! attention, LayerNorm and pooling in float32 on the parent's kernels.

use super::dense_f32::F32Linear;
use super::*;

mod long;
pub use long::LongEncoder;

impl PackedEncoder for FastEncoder {
    fn hidden_size(&self) -> usize {
        self.config().hidden_size
    }
    fn forward_packed<'w>(
        &self,
        seqs: &[&Encoded],
        ws: &'w mut Workspace,
    ) -> Result<Cow<'w, [f32]>> {
        Ok(Cow::Borrowed(FastEncoder::forward_packed(self, seqs, ws)?))
    }
}

/// One dense layer of the inference encoder, in the arithmetic it runs in.
enum Dense {
    /// float32, its weights transposed (the gemm path of [`product`]).
    F32(F32Linear),
    Int8(quant::Int8Linear),
    Bf16(quant::Bf16Linear),
}

/// The kernels a [`FastEncoder`] runs.
#[derive(Clone, Copy)]
struct Kernels {
    int8: quant::Int8Kernel,
    bf16: quant::Bf16Kernel,
}

fn quant_err(e: quant::QuantError) -> candle_core::Error {
    candle_core::Error::Msg(e.0)
}

fn quant_act(act: HiddenAct) -> quant::Activation {
    match act {
        HiddenAct::Gelu => quant::Activation::Gelu,
        HiddenAct::GeluApproximate => quant::Activation::GeluTanh,
        HiddenAct::Relu => quant::Activation::Relu,
    }
}

impl Dense {
    /// Converts `lin` (weights `[out, in]`) to `dtype` (f32: transposed); `normed`: its input is a
    /// LayerNorm's output, whose outlier dimensions get int8 token rows a second pass (see
    /// [`quant::ROW_OUTLIER_RATIO`]).
    fn new(lin: &Linear, dtype: quant::Dtype, normed: bool) -> Result<Self> {
        if dtype == quant::Dtype::F32 {
            return Ok(Dense::F32(F32Linear::new(lin)?));
        }
        let (out, inp) = lin.weight.dims2()?;
        let w = lin.weight.flatten_all()?.to_vec1::<f32>()?;
        let b = lin.bias.to_vec1::<f32>()?;
        Ok(match dtype {
            quant::Dtype::Int8 => {
                let q = quant::Int8Linear::new(&w, &b, out, inp).map_err(quant_err)?;
                let t = quant::ROW_OUTLIER_RATIO;
                Dense::Int8(if normed { q.with_row_residual(t) } else { q })
            }
            _ => Dense::Bf16(quant::Bf16Linear::new(&w, &b, out, inp).map_err(quant_err)?),
        })
    }

    /// `dst[r, col..col + out] = act(x[r] W^T + b)`; `act` only with `col == 0`, `ld == out`.
    #[allow(clippy::too_many_arguments)]
    fn forward(
        &self,
        x: &[f32],
        rows: usize,
        dst: &mut [f32],
        ld: usize,
        col: usize,
        act: Option<HiddenAct>,
        kernels: Kernels,
        scratch: &mut quant::Scratch,
    ) -> Result<()> {
        let qa = act.map_or(quant::Activation::None, quant_act);
        match self {
            Dense::F32(lin) => {
                lin.forward(x, rows, dst, ld, col)?;
                if let Some(act) = act {
                    let out = lin.out();
                    if col != 0 || ld != out {
                        bail!("fast path: a fused activation needs a dense output");
                    }
                    activation(&mut dst[..rows * out], act);
                }
                Ok(())
            }
            Dense::Int8(q) => q
                .forward(kernels.int8, x, rows, dst, ld, col, qa, scratch)
                .map_err(quant_err),
            Dense::Bf16(q) => q
                .forward(kernels.bf16, x, rows, dst, ld, col, qa, scratch)
                .map_err(quant_err),
        }
    }
}

/// One encoder layer with converted dense layers; LayerNorms stay float32.
struct QuantLayer {
    /// Q, K and V fused into one `[3H, H]` product.
    qkv: Dense,
    attn_out: Dense,
    attn_norm: LayerNorm,
    ffn_in: Dense,
    ffn_out: Dense,
    out_norm: LayerNorm,
    act: HiddenAct,
    heads: usize,
    head_dim: usize,
}

impl QuantLayer {
    /// Converts `layer`'s dense layers to `dtype` (Q, K and V fused into one product).
    fn new(layer: &BertLayer, dtype: quant::Dtype) -> Result<Self> {
        let a = &layer.attention;
        let qkv = Linear {
            weight: Tensor::cat(&[&a.query.weight, &a.key.weight, &a.value.weight], 0)?,
            bias: Tensor::cat(&[&a.query.bias, &a.key.bias, &a.value.bias], 0)?,
        };
        Ok(Self {
            qkv: Dense::new(&qkv, dtype, true)?,
            attn_out: Dense::new(&a.output, dtype, false)?,
            attn_norm: a.layer_norm.clone(),
            ffn_in: Dense::new(&layer.intermediate, dtype, true)?,
            ffn_out: Dense::new(&layer.output, dtype, false)?,
            out_norm: layer.layer_norm.clone(),
            act: layer.act(),
            heads: a.heads(),
            head_dim: a.head_dim(),
        })
    }
}

/// The encoder with converted dense layers (float32 transposed, int8 or bf16); embeddings,
/// LayerNorms, softmax and pooling stay float32. It holds no copy of the checkpoint's dense
/// weights.
struct QuantEncoder {
    embeddings: BertEmbeddings,
    layers: Vec<QuantLayer>,
    relative_bias: Option<RelativeBias>,
    config: BertConfig,
    kernels: Kernels,
    /// Rows per FFN chunk: [`FFN_ROWS_F32`] in float32, [`FFN_ROWS`] in int8 and bf16.
    ffn_rows: usize,
}

/// The inference encoder in a chosen arithmetic ([`quant::Dtype`]).
///
/// ```no_run
/// # fn demo(encoder: fetch_ml::model::bert::BertEncoder, seqs: &[&fetch_ml::tokenize::Encoded]) -> candle_core::Result<()> {
/// use fetch_ml::model::fast::{FastEncoder, PackedEncoder, Workspace};
/// use fetch_ml::model::quant::Dtype;
/// let fast = FastEncoder::new(encoder, Dtype::Int8)?;
/// eprintln!("dense layers: {}", fast.kernel_name());
/// let mut ws = Workspace::default();
/// let vectors = fast.pooled_packed(seqs, fetch_ml::model::pooling::Pooling::Mean, &mut ws)?;
/// # Ok(()) }
/// ```
pub struct FastEncoder {
    dtype: quant::Dtype,
    kernel: &'static str,
    inner: QuantEncoder,
}

impl FastEncoder {
    /// Takes over `encoder` and converts its dense layers to `dtype` (f32 transposes them).
    /// The float32 dense weights are dropped unless another handle shares them (candle
    /// tensors are reference counted: see [`FastEncoder::from_encoder`]). Fails when
    /// `FETCH_ML_KERNEL` asks for a kernel this CPU lacks.
    pub fn new(encoder: BertEncoder, dtype: quant::Dtype) -> Result<Self> {
        if dtype != quant::Dtype::F32 {
            note_amx_refused();
        }
        let int8 = match dtype {
            quant::Dtype::Int8 => quant::Int8Kernel::select().map_err(quant_err)?,
            _ => quant::Int8Kernel::best(),
        };
        let bf16 = match dtype {
            quant::Dtype::Bf16 => quant::Bf16Kernel::select().map_err(quant_err)?,
            _ => quant::Bf16Kernel::best(),
        };
        Self::with_kernels(encoder, dtype, int8, bf16)
    }

    /// As [`FastEncoder::new`] with the kernels named (for tests and benchmarks); errors when
    /// the CPU lacks the one `dtype` uses.
    pub fn with_kernels(
        encoder: BertEncoder,
        dtype: quant::Dtype,
        int8: quant::Int8Kernel,
        bf16: quant::Bf16Kernel,
    ) -> Result<Self> {
        let kernels = Kernels { int8, bf16 };
        if (dtype == quant::Dtype::Int8 && !int8.supported())
            || (dtype == quant::Dtype::Bf16 && !bf16.supported())
        {
            bail!("this CPU lacks the instructions of the requested {dtype} kernel");
        }
        let kernel = match dtype {
            quant::Dtype::F32 => "gemm-f32",
            quant::Dtype::Int8 => kernels.int8.name(),
            quant::Dtype::Bf16 => kernels.bf16.name(),
        };
        let BertEncoder {
            embeddings,
            layers,
            relative_bias,
            config,
        } = encoder;
        let mut qlayers = Vec::with_capacity(layers.len());
        for layer in layers {
            qlayers.push(QuantLayer::new(&layer, dtype)?);
            // `layer` (with its float32 dense weights) is dropped here.
        }
        Ok(Self {
            dtype,
            kernel,
            inner: QuantEncoder {
                embeddings,
                layers: qlayers,
                relative_bias,
                config,
                kernels,
                ffn_rows: match dtype {
                    quant::Dtype::F32 => FFN_ROWS_F32,
                    _ => FFN_ROWS,
                },
            },
        })
    }

    /// Loads the encoder from `vb` straight into `dtype`, one layer at a time: each layer's
    /// float32 weights are read, converted and dropped before the next is read, so the
    /// process never holds the whole float32 model (peak memory: the embeddings, one float32
    /// layer and the converted layers).
    pub fn load(vb: VarBuilder, cfg: &BertConfig, dtype: quant::Dtype) -> Result<Self> {
        let empty = BertEncoder {
            embeddings: BertEmbeddings::load(vb.pp("embeddings"), cfg)?,
            layers: Vec::new(),
            relative_bias: BertEncoder::load_relative_bias(&vb, cfg)?,
            config: cfg.clone(),
        };
        let mut fast = Self::new(empty, dtype)?;
        for i in 0..cfg.num_hidden_layers {
            let layer = BertLayer::load(vb.pp(crate::model::names::layer_prefix(i)), cfg)?;
            fast.inner.layers.push(QuantLayer::new(&layer, dtype)?);
        }
        Ok(fast)
    }

    /// As [`FastEncoder::new`] for an encoder the caller keeps: the converted dense layers are
    /// copies in every dtype (f32's transposed), so the caller's float32 weights are held
    /// beside them for as long as its encoder lives; embeddings and LayerNorms are shared.
    pub fn from_encoder(encoder: &BertEncoder, dtype: quant::Dtype) -> Result<Self> {
        Self::new(encoder.clone(), dtype)
    }

    pub fn dtype(&self) -> quant::Dtype {
        self.dtype
    }

    /// The kernel of the dense layers: "gemm-f32", "avx512vnni", "avx512bf16", "portable", ...
    pub fn kernel_name(&self) -> &'static str {
        self.kernel
    }

    pub fn config(&self) -> &BertConfig {
        &self.inner.config
    }

    /// Last hidden states of `seqs`, packed, as [`BertEncoder::forward_packed`].
    pub fn forward_packed<'w>(
        &self,
        seqs: &[&Encoded],
        ws: &'w mut Workspace,
    ) -> Result<&'w [f32]> {
        self.inner.forward_packed(seqs, ws)
    }
}

/// Says once on stderr when the CPU has AMX but the operating system refused the tile state.
fn note_amx_refused() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    if kernels::cpu::amx().refused {
        ONCE.call_once(|| {
            crate::note!(
                "note: this CPU has AMX but the operating system refused the tile state \
                 (arch_prctl ARCH_REQ_XCOMP_PERM); the AVX-512 kernels run instead"
            )
        });
    }
}

/// Rows per FFN chunk of the int8 and bf16 encoders: 128 x 1536 f32 intermediates are 768 KB.
/// (float32 takes [`FFN_ROWS_F32`], as the gemm crate packs the weights' panels per product.)
const FFN_ROWS: usize = 128;

impl QuantEncoder {
    fn forward_packed<'w>(&self, seqs: &[&Encoded], ws: &'w mut Workspace) -> Result<&'w [f32]> {
        let cfg = &self.config;
        let (h, inter) = (cfg.hidden_size, cfg.intermediate_size);
        let offs = offsets(seqs);
        let t = *offs.last().expect("offsets");
        // The FFN runs `chunk` rows at a time: its intermediate needs no more.
        let chunk = self.ffn_rows;
        let inter_rows = t.min(chunk);
        grow_all(ws, t, h, inter, inter_rows);
        embed_packed(&self.embeddings, cfg, seqs, &offs, &mut ws.x[..t * h])?;
        let bias = BiasTable::new(self.relative_bias.as_ref(), &offs)?;
        let k = self.kernels;
        for layer in &self.layers {
            let Workspace {
                x,
                tmp,
                qkv,
                ctx,
                inter: mid,
                quant: scratch,
            } = &mut *ws;
            let (x, tmp) = (&mut x[..t * h], &mut tmp[..t * h]);
            let (qkv, ctx, mid) = (
                &mut qkv[..t * 3 * h],
                &mut ctx[..t * h],
                &mut mid[..inter_rows * inter],
            );
            layer.qkv.forward(x, t, qkv, 3 * h, 0, None, k, scratch)?;
            let (heads, d) = (layer.heads, layer.head_dim);
            attention(qkv, ctx, &offs, heads, d, bias.as_ref())?;
            layer
                .attn_out
                .forward(ctx, t, tmp, h, 0, None, k, scratch)?;
            layer_norm_rows(tmp, Some(x), &layer.attn_norm, h)?;
            // The attention block's output is now in `tmp`; the FFN writes its result to `x`,
            // `chunk` rows at a time (rows are independent), so that the [rows, inter]
            // intermediate stays in cache between the two products.
            let mut r0 = 0;
            while r0 < t {
                let n = chunk.min(t - r0);
                let (xin, xout) = (&tmp[r0 * h..(r0 + n) * h], &mut x[r0 * h..(r0 + n) * h]);
                let mid = &mut mid[..n * inter];
                layer
                    .ffn_in
                    .forward(xin, n, mid, inter, 0, Some(layer.act), k, scratch)?;
                layer
                    .ffn_out
                    .forward(mid, n, xout, h, 0, None, k, scratch)?;
                layer_norm_rows(xout, Some(xin), &layer.out_norm, h)?;
                r0 += n;
            }
        }
        Ok(&ws.x[..t * h])
    }
}
