//! What a model declares of each of its tensors, once: the checkpoint name, the shape, how a
//! fresh one is drawn, whether the optimizer decays it, and which dtype it is held in. Loading
//! checks, initialisation, the optimizer's groups and the bf16 / f16 conversion all read these
//! lists, so no table of parameter names exists beside the layer that owns the tensor.

/// One tensor of a model.
#[derive(Debug, Clone, PartialEq)]
pub struct Param {
    /// The checkpoint key (a `VarBuilder` path).
    pub name: String,
    pub shape: Vec<usize>,
    pub init: Init,
    /// Takes decoupled weight decay.
    pub decay: bool,
    /// A projection or embedding matrix: held in the weight dtype (bf16 / f16 when asked for);
    /// every other tensor is held in the compute dtype.
    pub matrix: bool,
}

/// How a fresh tensor is drawn; the ranges that are hyperparameters of the reference
/// initialisation come from [`crate::InitConfig`] when the tensor is made.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    Zeros,
    Ones,
    Constant(f64),
    /// U(-bound, bound).
    Uniform(f64),
    /// N(0, std^2).
    Normal(f64),
    /// N(0, embedding_std^2).
    Embedding,
    /// dt_proj's weight: U(±dt_scale / sqrt(dt_rank)).
    DtProj {
        dt_rank: usize,
    },
    /// The inverse softplus of dt drawn log-uniformly in [dt_min, dt_max], floored.
    DtBias,
    /// Mamba-1's S4D-real A: log(n + 1) along the last (state) dimension.
    S4dReal,
    /// Mamba-2's A per head: the log of U(a_init_range).
    LogUniformA,
}

impl Param {
    /// A tensor that takes weight decay and is held in the compute dtype.
    pub fn new(name: impl Into<String>, shape: Vec<usize>, init: Init) -> Self {
        Self { name: name.into(), shape, init, decay: true, matrix: false }
    }

    /// PyTorch's default for a layer whose weight has `shape`: U(±1/sqrt(fan_in)).
    pub fn fan_in(name: impl Into<String>, shape: Vec<usize>) -> Self {
        let bound = fan_in_bound(&shape);
        Self::new(name, shape, Init::Uniform(bound))
    }

    /// A PyTorch conv or linear layer's weight of `shape` and its bias, both drawn as PyTorch
    /// does, U(±1/sqrt(fan_in)); the bias takes no weight decay.
    pub fn torch_layer(prefix: &str, shape: Vec<usize>) -> [Self; 2] {
        let bias = Self::new(format!("{prefix}.bias"), vec![shape[0]], Init::Uniform(fan_in_bound(&shape)));
        [Self::fan_in(format!("{prefix}.weight"), shape), bias.no_decay()]
    }

    /// Exempt from weight decay (biases, norms, A, D, dt biases, position embeddings, class
    /// tokens, as the reference recipes have them).
    pub fn no_decay(self) -> Self {
        Self { decay: false, ..self }
    }

    /// A matrix, held in the weight dtype.
    pub fn matrix(self) -> Self {
        Self { matrix: true, ..self }
    }

    /// The same tensor under `prefix.name`.
    pub fn under(self, prefix: &str) -> Self {
        Self { name: format!("{prefix}.{}", self.name), ..self }
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// 1/sqrt(fan_in) for a weight of `shape` (out, in, kernel...).
pub fn fan_in_bound(shape: &[usize]) -> f64 {
    1.0 / (shape[1..].iter().product::<usize>().max(1) as f64).sqrt()
}

/// The parameters' total element count.
pub fn num_params(params: &[Param]) -> usize {
    params.iter().map(Param::numel).sum()
}
