"""The heads' logit transforms (trace_train/heads.py): the one list both trainers read, and the families that use
it, each as a tiny offline stand-in: Gemma 2 and 3 (final_logit_softcapping), Cohere (logit_scale), Granite
(logits_scaling, divides), Falcon-H1 (lm_head_multiplier; trace-train used to train it with a silently wrong
loss) and a Qwen3 with an LM-head bias.

trace-train: its batch log-probs (Policy.token_logprobs, trace_loss on the final hidden states) against
log_softmax of the model's own Hugging Face logits, in fp64 (token_logprobs returns fp32: 2e-7 relative).
TRL: TraceGRPOTrainer's loss and gradients against GRPOTrainer._compute_loss on one batch (fp32, 2e-5 of each
tensor's largest entry, as tests/test_trl_grpo.py)."""

from __future__ import annotations

import pytest
import torch

from trace_train.heads import HeadMap, head_map
from trace_train.model import build_char_tokenizer, check_lm_head, make_batch
from trace_train.policy import Policy

transformers = pytest.importorskip("transformers")

COMMON = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
              max_position_embeddings=64)
# family: (config class, model class, config options, the HeadMap trace_loss must get)
FAMILIES = {
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(head_dim=16, final_logit_softcapping=0.2,
                                                         attn_logit_softcapping=None), HeadMap(1.0, 0.2)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(head_dim=16, final_logit_softcapping=0.2),
               HeadMap(1.0, 0.2)),
    "cohere": ("CohereConfig", "CohereForCausalLM", dict(logit_scale=0.25), HeadMap(0.25, None)),
    "granite": ("GraniteConfig", "GraniteForCausalLM", dict(logits_scaling=8.0), HeadMap(0.125, None)),
    "falcon_h1": ("FalconH1Config", "FalconH1ForCausalLM",
                  dict(head_dim=16, lm_head_multiplier=0.37, mamba_d_ssm=32, mamba_n_heads=4, mamba_d_head=8,
                       mamba_d_state=8, mamba_d_conv=4, mamba_chunk_size=8, mamba_n_groups=1), HeadMap(0.37, None)),
}


def build(family: str, tok, seed: int = 0, dtype=torch.float64):
    config_cls, model_cls, options, _ = FAMILIES[family]
    ids = dict(pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    config = getattr(transformers, config_cls)(vocab_size=len(tok), **COMMON, **options, **ids)
    torch.manual_seed(seed)
    return getattr(transformers, model_cls)(config).to(dtype).eval()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_head_map_of_each_family(family):
    config_cls, _, options, expected = FAMILIES[family]
    config = getattr(transformers, config_cls)(**COMMON, **options)
    assert head_map(config) == expected
    assert not expected.identity


def test_neutral_values_and_other_families():
    assert head_map(transformers.Qwen3Config()).identity
    assert head_map(transformers.Gemma3TextConfig(final_logit_softcapping=None)).identity
    assert head_map(transformers.CohereConfig(logit_scale=1.0)).identity
    assert head_map(transformers.RecurrentGemmaConfig(logits_soft_cap=30.0)) == HeadMap(1.0, 30.0)
    if hasattr(transformers, "HyperCLOVAXConfig"):  # multiplies by logits_scaling (Granite divides)
        assert head_map(transformers.HyperCLOVAXConfig(logits_scaling=0.5)) == HeadMap(0.5, None)


def test_unverified_transforms_are_refused_naming_the_attribute():
    config = transformers.LlamaConfig()
    config.logits_scaling = 8.0  # a model type for which it is not known whether it multiplies or divides
    with pytest.raises(ValueError, match="logits_scaling"):
        head_map(config)
    config = transformers.LlamaConfig()
    config.output_logit_soft_cap = 30.0  # xLSTM's cap: not verified
    with pytest.raises(ValueError, match="output_logit_soft_cap"):
        head_map(config)
    with pytest.raises(ValueError, match="logit_scale"):
        head_map(transformers.CohereConfig(logit_scale=-1.0))
    # MPT documents logit_scale as a scale but transformers' MPT forward never applies it: which one a checkpoint
    # was trained with is unknown, so it is refused rather than guessed
    with pytest.raises(ValueError, match="logit_scale.*'mpt'"):
        head_map(transformers.MptConfig(logit_scale=2.0))
    assert head_map(transformers.MptConfig()).identity


@pytest.mark.parametrize("family", list(FAMILIES))
def test_trace_train_logprobs_equal_the_models_own_logits(family):
    """The trainer path in fp64: trace_loss with the head's map gives the model's own log-probs. Without the map
    (what trace-train did for Falcon-H1) they differ by at least 500x the tolerance."""
    tok = build_char_tokenizer()
    model = build(family, tok)
    policy = Policy(model)
    assert check_lm_head(model) == FAMILIES[family][3]
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, len(tok), (n,), generator=g).tolist() for n in (3, 5)]
    responses = [torch.randint(3, len(tok), (n,), generator=g).tolist() for n in (6, 2)]
    batch = make_batch(prompts, responses, tok.pad_token_id)
    logp = policy.token_logprobs(batch, temperature=0.7)
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    expected = torch.log_softmax(logits.reshape(-1, logits.shape[-1])[batch.rows] / 0.7, -1)
    expected = expected.gather(1, batch.targets[:, None]).squeeze(1)
    err = ((logp.double() - expected).abs().max() / expected.abs().max()).item()
    assert err <= 2e-7
    policy.head_kwargs = {}  # the logits as hidden @ W.T
    assert ((policy.token_logprobs(batch, 0.7).double() - expected).abs().max() / expected.abs().max()).item() > 1e-4


# ---- TRL: TraceGRPOTrainer against GRPOTrainer on each family

def _save(folder, family: str | None):
    """A tiny model of `family` (None: an untied Qwen3, to be given a biased head) and the character tokenizer."""
    tok = build_char_tokenizer()
    if family is None:
        config = transformers.Qwen3Config(vocab_size=len(tok), head_dim=16, tie_word_embeddings=False,
                                          pad_token_id=tok.pad_token_id, **COMMON)
        torch.manual_seed(0)
        model = transformers.Qwen3ForCausalLM(config)
    else:
        model = build(family, tok, dtype=torch.float32)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("family", ["gemma2", "cohere", "granite", "falcon_h1", None], ids=lambda f: f or "bias")
def test_trl_loss_and_gradients_equal_trl_on_each_family(tmp_path, family):
    pytest.importorskip("trl")
    pytest.importorskip("datasets")
    from trl import GRPOTrainer
    from trl_setup import make_trainer, random_batch

    from trace_train.integrations.trl import TraceGRPOTrainer

    path = _save(tmp_path / "model", family)
    config = dict(loss_type="dapo", beta=0.0, epsilon=0.2, epsilon_high=0.28, temperature=0.7)
    trainers = []
    for cls, name in ((GRPOTrainer, "trl"), (TraceGRPOTrainer, "ours")):
        if family is None:
            trainers.append(_biased_trainer(cls, path, tmp_path / name, make_trainer, config))
        else:
            trainers.append(make_trainer(cls, path, tmp_path / name, **config))
    ref, ours = trainers
    assert (ours._head_kwargs == {"logit_scale": 1.0, "logit_softcap": None}) == (family is None)
    inputs = random_batch(len(ours._tokenizer), seed=3)
    results = []
    for trainer in (ref, ours):
        trainer.model.train()
        trainer.current_gradient_accumulation_steps = 1
        trainer.model.zero_grad(set_to_none=True)
        loss = trainer._compute_loss(trainer.model, {k: (v.clone() if torch.is_tensor(v) else v)
                                                     for k, v in inputs.items()})
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in trainer.model.named_parameters()
                                        if p.grad is not None}))
    (loss_ref, grads_ref), (loss, grads) = results
    assert torch.isfinite(loss_ref) and loss_ref.abs() > 1e-4
    assert abs(loss.item() - loss_ref.item()) <= 2e-5 * abs(loss_ref.item())
    assert grads.keys() == grads_ref.keys() and len(grads) > 5
    if family is None:
        assert "lm_head.bias" in grads
    for name, g_ref in grads_ref.items():
        assert (grads[name] - g_ref).abs().max() <= 2e-5 * g_ref.abs().max(), name


def _biased_trainer(cls, path, out_dir, make_trainer, config):
    """make_trainer, then the same biased head put on the loaded model (seeded, identical for both trainers)."""
    trainer = make_trainer(cls, path, out_dir, **config)
    model = trainer.model
    head = torch.nn.Linear(32, model.lm_head.out_features, bias=True)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.copy_(0.5 * torch.randn(head.out_features, generator=g))
    model.lm_head = head
    if cls.__name__ == "TraceGRPOTrainer":
        from trace_train.integrations.trl_loss import unsupported_options

        assert unsupported_options(trainer.args, model) == []
    return trainer
