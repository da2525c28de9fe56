"""What a Hugging Face causal LM's head computes after hidden @ lm_head.weight.T, as `trace_loss` arguments.

The one list of logit transforms that both `trace-train` (model.py) and the TRL integration
(integrations/trl_loss.py, integrations/trl.py) read. `trace_loss` computes
x = softcap(logit_scale (hidden @ W.T + bias)) / temperature, softcap(y) = c tanh(y / c): every scale below
multiplies into logit_scale (before the cap, as the models apply them), the cap is logit_softcap, and the head's
bias is passed as a tensor. A config attribute that is set (not neutral) but not verified for the model's type
is refused with a ValueError naming it: a silently wrong loss is the one outcome not allowed.

Verified against transformers 5.x's modeling code (each model's ForCausalLM forward):
    logit_scale              Cohere, Cohere 2, Cohere 2 MoE, Cohere Compass      logits * s
                             (MPT: documented as a scale, unused by its forward: refused when set)
    lm_head_multiplier       Falcon-H1                                           lm_head(h) * s
    output_multiplier        Muse Glimmer / Spark (then their softcap)           logits * s
    logits_scaling           Granite, GraniteMoE(-Shared, -Hybrid), Granite SWA  logits / s
                             HyperCLOVA X                                        lm_head(h) * s
    final_logit_softcapping  Gemma 2, 3, 3n, 4, VaultGemma, PaliGemma, nanochat,  c tanh(logits / c)
                             Mistral Large 4, Muse (after their multiplier)
    logits_soft_cap          Recurrent Gemma                                     c tanh(logits / c)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# (config attribute, its neutral value, what it does: "scale" | "inverse" | "softcap", the model types it is
# verified for: None = every model type that has the attribute, else the model_type prefixes)
LOGIT_TRANSFORMS = (
    ("logit_scale", 1.0, "scale", ("cohere",)),  # MPT's config has one too, which transformers' MPT never applies
    ("lm_head_multiplier", 1.0, "scale", None),
    ("output_multiplier", 1.0, "scale", None),
    ("logits_scaling", 1.0, "inverse", ("granite",)),
    ("logits_scaling", 1.0, "scale", ("hyperclovax",)),
    ("final_logit_softcapping", None, "softcap", None),
    ("logits_soft_cap", None, "softcap", ("recurrent_gemma",)),
)
# Set on some configs, not verified to act as above (xLSTM's output cap): refused when not neutral.
REFUSED = (("output_logit_soft_cap", None),)


@dataclass(frozen=True)
class HeadMap:
    """The head's scalar logit map: `trace_loss(..., **head_map.kwargs())`."""

    logit_scale: float = 1.0
    logit_softcap: float | None = None

    def kwargs(self) -> dict:
        return {"logit_scale": self.logit_scale, "logit_softcap": self.logit_softcap}

    @property
    def identity(self) -> bool:
        return self.logit_scale == 1.0 and self.logit_softcap is None


def _neutral(value, neutral) -> bool:
    return value is None or value == neutral or (neutral is None and value == 0)


def _configs(config):
    """The text config first (where a vision-language model keeps its head's attributes), then the config."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else getattr(config, "text_config", None)
    return [config] if text is None or text is config else [text, config]


def head_map(config) -> HeadMap:
    """The logit map of a Hugging Face config; ValueError naming the attribute if it cannot be made exact."""
    seen: dict[str, object] = {}
    for cfg in _configs(config):
        for name, neutral in REFUSED:
            value = getattr(cfg, name, None)
            if not _neutral(value, neutral):
                raise ValueError(f"{type(cfg).__name__}.{name} = {value!r}: this logit transform is not supported "
                                 f"by trace_loss (not verified for this model)")
        for name, neutral, _, _ in LOGIT_TRANSFORMS:
            value = getattr(cfg, name, None)
            if _neutral(value, neutral):
                continue
            if name in seen and seen[name][1] != value:
                raise ValueError(f"{type(config).__name__}: {name} differs between the config and its text config "
                                 f"({seen[name][1]!r} vs {value!r})")
            seen.setdefault(name, (cfg, value))
    scale, softcap = 1.0, None
    for name, (cfg, value) in seen.items():
        model_type = str(getattr(cfg, "model_type", "") or "")
        kinds = [kind for n, _, kind, types in LOGIT_TRANSFORMS
                 if n == name and (types is None or any(model_type.startswith(t) for t in types))]
        if not kinds:
            raise ValueError(f"{type(cfg).__name__}.{name} = {value!r}: not known how model type {model_type!r} "
                             f"applies it to its logits, so trace_loss cannot reproduce them")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"{type(cfg).__name__}.{name} = {value!r}: trace_loss takes a positive number here")
        if kinds[0] == "scale":
            scale *= float(value)
        elif kinds[0] == "inverse":
            scale /= float(value)
        else:
            softcap = float(value)
    return HeadMap(scale, softcap)


def head_bias(model) -> torch.Tensor | None:
    """The LM head's bias [V], or None."""
    head = model.get_output_embeddings()
    bias = getattr(head, "bias", None)
    return bias if isinstance(bias, torch.Tensor) else None
