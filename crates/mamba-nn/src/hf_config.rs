//! `config.json` as transformers writes it (MambaConfig, Mamba2Config) and as the original
//! state-spaces checkpoints do (d_model, n_layer, ssm_cfg): read into an [`LmConfig`], and written.

use crate::config::{BackboneConfig, LmConfig, MixerConfig};
use crate::{Error, Mamba1Config, Mamba2Config, Result};
use serde_json::Value;
use std::path::Path;

impl LmConfig {
    /// transformers' `config.json` for this model (MambaConfig or Mamba2Config keys). Infinite
    /// dt limits are written as transformers 5 writes them, {"__float__": "Infinity"}.
    pub fn to_hf_json(&self) -> Result<String> {
        let b = &self.backbone;
        let refuse = |message: String| Err(Error::Config { path: "config.json".into(), message });
        // Mamba-2's modeling code never reads time_step_rank; it is written as transformers' default.
        let (d_conv, conv_bias, proj_bias, dt_rank, mamba2) = match &b.mixer {
            MixerConfig::Mamba1(m) if !m.selective => {
                return refuse("a time-invariant (selective = false) model has no Hugging Face layout".into())
            }
            MixerConfig::Mamba1(m) => (m.d_conv, m.conv_bias, m.proj_bias, m.dt_rank(b.d_model), None),
            MixerConfig::Mamba2(m) => (m.d_conv, m.conv_bias, m.proj_bias, b.d_model.div_ceil(16), Some(m)),
            other => {
                return refuse(format!(
                    "transformers has no {} model: such a checkpoint keeps its TOML model file",
                    other.kind()
                ))
            }
        };
        if !b.is_causal() {
            return Err(Error::Config {
                path: "config.json".into(),
                message: format!("routes {:?}: the Hugging Face layout holds causal models only", b.routes),
            });
        }
        let num = |x: f64| {
            if x.is_finite() {
                serde_json::json!(x)
            } else {
                serde_json::json!({"__float__": if x > 0.0 { "Infinity" } else { "-Infinity" }})
            }
        };
        let mut json = serde_json::json!({
            "architectures": [if mamba2.is_none() { "MambaForCausalLM" } else { "Mamba2ForCausalLM" }],
            "model_type": if mamba2.is_none() { "mamba" } else { "mamba2" },
            "hidden_size": b.d_model,
            "num_hidden_layers": b.n_layer,
            "state_size": b.d_state,
            "conv_kernel": d_conv,
            "expand": b.expand,
            "intermediate_size": b.d_inner(),
            "time_step_rank": dt_rank,
            "layer_norm_epsilon": b.norm_eps,
            "use_bias": proj_bias,
            "use_conv_bias": conv_bias,
            "vocab_size": self.vocab_size,
            "tie_word_embeddings": self.tie_embeddings,
        });
        if let Some(m) = mamba2 {
            let extra = serde_json::json!({
                "head_dim": m.headdim,
                "num_heads": m.nheads(b),
                "n_groups": m.ngroups,
                "chunk_size": m.chunk_size,
                "time_step_limit": [num(m.dt_limit.0), num(m.dt_limit.1)],
            });
            json.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        }
        Ok(serde_json::to_string_pretty(&json).expect("a JSON value serialises"))
    }

    /// Reads a transformers `config.json` (model_type "mamba" or "mamba2").
    pub fn from_hf_file(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).map_err(|source| Error::Io { path: path.display().to_string(), source })?;
        Self::from_hf_json(&text, &path.display().to_string())
    }

    /// `source` names the file in errors.
    pub fn from_hf_json(text: &str, source: &str) -> Result<Self> {
        let err = |message: String| Error::Config { path: source.to_string(), message };
        // Older Mamba-2 configs write a bare Infinity, which is not JSON.
        let json: Value = serde_json::from_str(text)
            .or_else(|_| serde_json::from_str(&quote_bare_infinity(text)))
            .map_err(|e| err(format!("not valid JSON: {e}")))?;
        // The original state-spaces checkpoints: d_model, n_layer, ssm_cfg.
        let json = if json.get("d_model").is_some() { from_state_spaces(&json).map_err(err)? } else { json };
        let get = |key: &str| json.get(key).filter(|v| !v.is_null());
        let int = |key: &str| -> Result<usize> {
            let v = get(key).ok_or_else(|| err(format!("missing key `{key}`")))?;
            v.as_u64()
                .map(|n| n as usize)
                .ok_or_else(|| err(format!("key `{key}` must be a non-negative integer, got {v}")))
        };
        let int_or = |key: &str, default: usize| if get(key).is_some() { int(key) } else { Ok(default) };
        let flag_or = |key: &str, default: bool| -> Result<bool> {
            match get(key) {
                None => Ok(default),
                Some(v) => v.as_bool().ok_or_else(|| err(format!("key `{key}` must be true or false, got {v}"))),
            }
        };
        // Every key of transformers' MambaConfig and Mamba2Config (checked against 5.13 and 5.25)
        // that changes what a loaded checkpoint computes is read below or refused. The others do
        // not: time_step_{scale,min,max,floor,init_scheme}, initializer_range and
        // rescale_prenorm_residual only initialise; use_cache, use_mambapy and
        // use_associative_scan choose an algorithm for the same result; pad / bos / eos ids
        // concern generation; Mamba-2's rms_norm and time_step_rank are never used by its
        // modeling code. residual_in_fp32: the residual stream here is always f32, which is what
        // true asks for and, with f32 weights, what false computes too (with bf16 weights false
        // would round the residual to bf16 at every block).
        let mamba2 = match get("model_type").and_then(Value::as_str) {
            Some("mamba") => false,
            Some("mamba2") => true,
            other => return Err(err(format!("key `model_type` must be \"mamba\" or \"mamba2\", got {other:?}"))),
        };
        // The mixers gate and activate with SiLU, transformers' default ("silu", alias "swish").
        if let Some(act) = get("hidden_act").filter(|v| !matches!(v.as_str(), Some("silu" | "swish"))) {
            return Err(err(format!("key `hidden_act` = {act}: only \"silu\" is implemented")));
        }
        let d_model = int("hidden_size")?;
        let expand = int_or("expand", 2)?;
        let d_inner = int_or("intermediate_size", expand * d_model)?;
        if d_inner != expand * d_model {
            return Err(err(format!(
                "`intermediate_size` {d_inner} is not expand ({expand}) x hidden_size ({d_model})"
            )));
        }
        let dt_rank = match get("time_step_rank") {
            Some(Value::String(s)) if s == "auto" => None,
            Some(_) => Some(int("time_step_rank")?),
            None => None,
        };
        let dt_limit = match get("time_step_limit") {
            None => (0.0, f64::INFINITY),
            Some(Value::Array(v)) if v.len() == 2 => match (float(&v[0]), float(&v[1])) {
                (Some(lo), Some(hi)) => (lo, hi),
                _ => return Err(err(format!("key `time_step_limit` must hold two numbers, got {v:?}"))),
            },
            Some(v) => return Err(err(format!("key `time_step_limit` must be [low, high], got {v}"))),
        };
        let norm_eps = match get("layer_norm_epsilon") {
            None => 1e-5,
            Some(v) => float(v).ok_or_else(|| err(format!("key `layer_norm_epsilon` must be a number, got {v}")))?,
        };
        let (d_conv, conv_bias, proj_bias) =
            (int_or("conv_kernel", 4)?, flag_or("use_conv_bias", true)?, flag_or("use_bias", false)?);
        let mixer = if mamba2 {
            let (headdim, ngroups) = (int("head_dim")?, int_or("n_groups", 1)?);
            let heads = int_or("num_heads", d_inner / headdim.max(1))?;
            if headdim == 0 || heads * headdim != d_inner {
                return Err(err(format!(
                    "num_heads ({heads}) x head_dim ({headdim}) must equal expand x hidden_size ({d_inner})"
                )));
            }
            if ngroups == 0 || heads % ngroups != 0 {
                return Err(err(format!("`n_groups` ({ngroups}) must divide num_heads ({heads})")));
            }
            let chunk_size = int_or("chunk_size", 256)?;
            MixerConfig::Mamba2(Mamba2Config { d_conv, conv_bias, proj_bias, headdim, ngroups, chunk_size, dt_limit })
        } else {
            MixerConfig::Mamba1(Mamba1Config { d_conv, conv_bias, proj_bias, dt_rank, selective: true })
        };
        let backbone = BackboneConfig {
            expand,
            norm_eps,
            ..BackboneConfig::causal(d_model, int("num_hidden_layers")?, int("state_size")?, mixer)
        };
        backbone.validate().map_err(err)?;
        Ok(Self { backbone, vocab_size: int("vocab_size")?, tie_embeddings: flag_or("tie_word_embeddings", true)? })
    }
}

/// A state-spaces `config.json` (mamba_ssm's MambaConfig) in transformers' keys, with mamba_ssm's
/// defaults and its vocabulary padding (pad_vocab_size_multiple, 8 by default).
fn from_state_spaces(json: &Value) -> std::result::Result<Value, String> {
    let ssm = json.get("ssm_cfg").cloned().unwrap_or_else(|| serde_json::json!({}));
    let mamba2 = ssm.get("layer").and_then(Value::as_str) == Some("Mamba2");
    let int = |v: Option<&Value>, key: &str, default: u64| -> std::result::Result<u64, String> {
        match v {
            None | Some(Value::Null) => Ok(default),
            Some(v) => v.as_u64().ok_or_else(|| format!("key `{key}` must be a non-negative integer, got {v}")),
        }
    };
    let d_model = int(json.get("d_model"), "d_model", 0)?;
    let expand = int(ssm.get("expand"), "ssm_cfg.expand", 2)?;
    let headdim = int(ssm.get("headdim"), "ssm_cfg.headdim", 64)?;
    // Keys that change what the model computes, against what these mixers compute (mamba_ssm's
    // defaults). residual_in_fp32 changes nothing here: the residual stream is always f32.
    let flag = |v: &Value, key: &str| v.get(key).and_then(Value::as_bool);
    let unsupported = [
        (flag(json, "rms_norm") == Some(false), "rms_norm = false (LayerNorm blocks)"),
        (mamba2 && flag(&ssm, "rmsnorm") == Some(false), "ssm_cfg.rmsnorm = false (no gated norm before out_proj)"),
        (mamba2 && flag(&ssm, "norm_before_gate") == Some(true), "ssm_cfg.norm_before_gate = true"),
        (mamba2 && flag(&ssm, "D_has_hdim") == Some(true), "ssm_cfg.D_has_hdim = true"),
        (
            mamba2 && ssm.get("d_ssm").is_some_and(|v| !v.is_null() && v.as_u64() != Some(expand * d_model)),
            "ssm_cfg.d_ssm other than expand x d_model (an SSM over part of the channels)",
        ),
    ];
    if let Some((_, what)) = unsupported.iter().find(|(refused, _)| *refused) {
        return Err(format!("{what} is not implemented"));
    }
    let vocab = int(json.get("vocab_size"), "vocab_size", 0)?;
    let pad = int(json.get("pad_vocab_size_multiple"), "pad_vocab_size_multiple", 8)?.max(1);
    let mut out = serde_json::json!({
        "model_type": if mamba2 { "mamba2" } else { "mamba" },
        "hidden_size": d_model,
        "num_hidden_layers": int(json.get("n_layer"), "n_layer", 0)?,
        "vocab_size": vocab.div_ceil(pad) * pad,
        "tie_word_embeddings": json.get("tie_embeddings").and_then(Value::as_bool).unwrap_or(true),
        "state_size": int(ssm.get("d_state"), "ssm_cfg.d_state", if mamba2 { 128 } else { 16 })?,
        "conv_kernel": int(ssm.get("d_conv"), "ssm_cfg.d_conv", 4)?,
        "expand": expand,
        "time_step_rank": ssm.get("dt_rank").cloned().unwrap_or_else(|| "auto".into()),
        "use_conv_bias": ssm.get("conv_bias").and_then(Value::as_bool).unwrap_or(true),
        "use_bias": ssm.get("bias").and_then(Value::as_bool).unwrap_or(false),
        "layer_norm_epsilon": json.get("norm_epsilon").cloned().unwrap_or_else(|| 1e-5.into()),
    });
    if mamba2 {
        let extra = serde_json::json!({
            "head_dim": headdim,
            "num_heads": expand * d_model / headdim.max(1),
            "n_groups": int(ssm.get("ngroups"), "ssm_cfg.ngroups", 1)?,
            "chunk_size": int(ssm.get("chunk_size"), "ssm_cfg.chunk_size", 256)?,
            "time_step_limit": ssm.get("dt_limit").cloned().unwrap_or_else(|| serde_json::json!([0.0, "Infinity"])),
        });
        out.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    }
    Ok(out)
}

/// A JSON number, a string such as "Infinity", or transformers' {"__float__": "Infinity"}.
fn float(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.parse().ok(),
        Value::Object(o) => o.get("__float__").and_then(float),
        _ => None,
    }
}

/// Puts quotes around bare Infinity / -Infinity tokens (outside strings).
fn quote_bare_infinity(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 8);
    let mut in_string = false;
    let mut prev = '\0';
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if c == '"' && prev != '\\' {
            in_string = !in_string;
        }
        let token = ["-Infinity", "Infinity"].into_iter().find(|t| !in_string && rest.starts_with(t));
        if let Some(t) = token {
            out.push('"');
            out.push_str(t);
            out.push('"');
            rest = &rest[t.len()..];
            prev = 'y';
            continue;
        }
        out.push(c);
        prev = c;
        rest = &rest[c.len_utf8()..];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAMBA2: &str = r#"{"model_type": "mamba2", "hidden_size": 64, "num_hidden_layers": 2, "state_size": 16,
        "head_dim": 16, "num_heads": 8, "n_groups": 1, "expand": 2, "vocab_size": 64, "chunk_size": 8,
        "time_step_limit": [0.0, LIMIT], "tie_word_embeddings": false}"#;

    #[test]
    fn reads_every_spelling_of_infinity() {
        for limit in [r#"{"__float__": "Infinity"}"#, "Infinity", r#""Infinity""#] {
            let cfg = LmConfig::from_hf_json(&MAMBA2.replace("LIMIT", limit), "config.json").unwrap();
            let MixerConfig::Mamba2(m) = &cfg.backbone.mixer else { panic!("{cfg:?}") };
            assert_eq!(m.dt_limit, (0.0, f64::INFINITY), "{limit}");
            assert_eq!((m.nheads(&cfg.backbone), cfg.tie_embeddings), (8, false));
        }
    }

    #[test]
    fn errors_name_file_and_key() {
        let text = MAMBA2.replace("LIMIT", "1.0").replace(r#""state_size": 16,"#, "");
        let msg = LmConfig::from_hf_json(&text, "dir/config.json").unwrap_err().to_string();
        assert!(msg.contains("dir/config.json") && msg.contains("`state_size`"), "{msg}");
        let text = MAMBA2.replace("LIMIT", "1.0").replace(r#""num_heads": 8"#, r#""num_heads": 7"#);
        let msg = LmConfig::from_hf_json(&text, "c.json").unwrap_err().to_string();
        assert!(msg.contains("num_heads (7)"), "{msg}");
        let text = MAMBA2.replace("LIMIT", "1.0").replace(r#""n_groups": 1"#, r#""n_groups": 3"#);
        let msg = LmConfig::from_hf_json(&text, "c.json").unwrap_err().to_string();
        assert!(msg.contains("`n_groups` (3)"), "{msg}");
        let msg = LmConfig::from_hf_json(r#"{"model_type": "llama"}"#, "c.json").unwrap_err().to_string();
        assert!(msg.contains("`model_type`"), "{msg}");
        let gelu = MAMBA2.replace("LIMIT", "1.0").replace("\"vocab_size\"", "\"hidden_act\": \"gelu\", \"vocab_size\"");
        let msg = LmConfig::from_hf_json(&gelu, "c.json").unwrap_err().to_string();
        assert!(msg.contains("`hidden_act`") && msg.contains("gelu"), "{msg}");
        let silu = MAMBA2.replace("LIMIT", "1.0").replace("\"vocab_size\"", "\"hidden_act\": \"silu\", \"vocab_size\"");
        LmConfig::from_hf_json(&silu, "c.json").unwrap();
    }

    /// A state-spaces config whose keys ask for a computation these mixers do not do is refused,
    /// naming the key.
    #[test]
    fn state_spaces_keys_that_change_the_computation() {
        let base = r#"{"d_model": 32, "n_layer": 2, "vocab_size": 60, EXTRA
            "ssm_cfg": {"layer": "Mamba2", "d_state": 16, "headdim": 16 SSM}}"#;
        let config = |extra: &str, ssm: &str| base.replace("EXTRA", extra).replace("SSM", ssm);
        let ok = LmConfig::from_hf_json(
            &config(r#""rms_norm": true, "residual_in_fp32": false,"#, r#", "d_ssm": 64"#),
            "c.json",
        );
        let b = ok.unwrap().backbone;
        let MixerConfig::Mamba2(m) = &b.mixer else { panic!("{b:?}") };
        assert_eq!(m.nheads(&b), 4);
        for (extra, ssm, key) in [
            (r#""rms_norm": false,"#, "", "rms_norm"),
            ("", r#", "rmsnorm": false"#, "rmsnorm"),
            ("", r#", "norm_before_gate": true"#, "norm_before_gate"),
            ("", r#", "D_has_hdim": true"#, "D_has_hdim"),
            ("", r#", "d_ssm": 32"#, "d_ssm"),
        ] {
            let msg = LmConfig::from_hf_json(&config(extra, ssm), "dir/config.json").unwrap_err().to_string();
            assert!(msg.contains("dir/config.json") && msg.contains(key), "{msg}");
        }
    }
}
