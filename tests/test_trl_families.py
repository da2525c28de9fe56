"""The model families stock TRL trains, each a tiny offline stand-in, through both trainers: Qwen3, Llama,
Gemma 2 (logit and attention softcapping, eager attention) and Gemma 3, Cohere (logit_scale), Granite
(logits_scaling and its body multipliers), Falcon-H1 (hybrid Mamba, lm_head_multiplier), Qwen3-MoE and GPT-OSS
(the router aux loss), and a vision-language model, Gemma 3's image-text model (a SigLIP tower, images through
its processor, the head's softcapping in the text config).

Per family, with a different GRPOConfig option and dataset format each (a union, not a cross product; the
options themselves are tested in tests/test_trl_losses.py: the entropy mask is not used here, since these random
models' entropies all lie within 2e-3 of log V, where fp32 round-off can move a token across the quantile):
1. one generated micro-batch (TRL's own `_generate_and_score_completions`, with a truncated completion so that
   tokens are masked, and off-policy old log-probs so that the clip acts): TraceGRPOTrainer's `_compute_loss`
   equals GRPOTrainer's in loss (2e-5 relative) and in every parameter gradient (2e-5 of each tensor's largest
   entry), as tests/test_trl_grpo.py;
2. both trainers train 2 optimizer steps (SGD: Adam's first steps move every entry by about lr whatever its
   gradient, so round-off-sized gradients would move as much as real ones) from the same seed: the same
   parameters move, the moves agree to 1e-4 normwise per tensor, and every logged metric agrees to 1e-4
   relative (fp32).
About 30 s for the ten families on 2 CPU cores, so `make test` runs it."""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("datasets")
transformers = pytest.importorskip("transformers")

from trl import GRPOConfig, GRPOTrainer  # noqa: E402
from trl_setup import CHAT_TEMPLATE, PROMPTS, assert_logs_agree, digit_reward, loss_and_grads  # noqa: E402
from vlm_setup import save_tiny_gemma3_vlm, vlm_rows  # noqa: E402

from trace_train.integrations.trl import TraceGRPOTrainer  # noqa: E402
from trace_train.integrations.trl_loss import MULTIMODAL_KEYS  # noqa: E402
from trace_train.model import build_char_tokenizer  # noqa: E402

COMMON = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
              max_position_embeddings=128)
MOE = dict(num_hidden_layers=2, num_experts_per_tok=2, head_dim=16)
FALCON_H1 = dict(head_dim=16, lm_head_multiplier=0.37, mamba_d_ssm=32, mamba_n_heads=4, mamba_d_head=8,
                 mamba_d_state=8, mamba_d_conv=4, mamba_chunk_size=8, mamba_n_groups=1)
CHAT_ROWS = {"prompt": [[{"role": "user", "content": p}] for p in PROMPTS]}
# family: (config class, model class, config options, attention implementation, dataset rows, GRPOConfig options)
FAMILIES = {
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=16), None, CHAT_ROWS,
              dict(loss_type="dr_grpo", delta=1.1)),  # delta below 1 + epsilon_high: TRL's cap on r
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(head_dim=16), None, None, dict(loss_type="grpo", beta=0.04)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(head_dim=16, final_logit_softcapping=2.0,
                                                         attn_logit_softcapping=50.0), "eager", CHAT_ROWS,
               dict(loss_type="bnpo")),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(head_dim=16, final_logit_softcapping=2.0), None, None,
               dict(loss_type="vespo")),
    "cohere": ("CohereConfig", "CohereForCausalLM", dict(logit_scale=0.25), None, CHAT_ROWS,
               dict(loss_type="cispo", epsilon_high=5.0)),
    "granite": ("GraniteConfig", "GraniteForCausalLM", dict(logits_scaling=8.0, embedding_multiplier=2.0,
                                                            residual_multiplier=0.5, attention_multiplier=0.25),
                None, None, dict(loss_type="sapo")),
    "falcon_h1": ("FalconH1Config", "FalconH1ForCausalLM", FALCON_H1, None, None,
                  dict(loss_type="dapo", importance_sampling_level="sequence")),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(MOE, moe_intermediate_size=16, num_experts=4),
                  None, CHAT_ROWS, dict(loss_type="dapo", router_aux_loss_coef=0.1)),
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM",
                dict(MOE, num_local_experts=4, layer_types=["sliding_attention", "full_attention"], sliding_window=8),
                None, None, dict(loss_type="luspo")),  # GPT-OSS's config: router_aux_loss_coef 0.001, TRL adds it
    "gemma3_vlm": (None, None, None, None, None, dict(loss_type="dapo", beta=0.04)),
}


def _save_text_model(family: str, folder) -> None:
    config_cls, model_cls, options, *_ = FAMILIES[family]
    tok = build_char_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    config = getattr(transformers, config_cls)(vocab_size=len(tok), **{**COMMON, **options},
                                               pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                               bos_token_id=None)
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(folder)
    tok.save_pretrained(folder)


def _trainer(cls, family: str, path: str, out_dir, **overrides):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

    *_, attn, rows, options = FAMILIES[family]
    vlm = family.endswith("_vlm")
    args = GRPOConfig(output_dir=str(out_dir), use_cpu=True, bf16=False, report_to="none", seed=0,
                      per_device_train_batch_size=4, num_generations=2, max_completion_length=6, logging_steps=1,
                      save_strategy="no", optim="sgd", learning_rate=0.1, max_steps=2, **{**options, **overrides})
    auto = AutoModelForImageTextToText if vlm else AutoModelForCausalLM
    model = auto.from_pretrained(path, dtype=torch.float32, **({"attn_implementation": attn} if attn else {}))
    processing = (AutoProcessor if vlm else AutoTokenizer).from_pretrained(path)
    rows = vlm_rows(PROMPTS) if vlm else (rows or {"prompt": PROMPTS})
    return cls(model=model, reward_funcs=digit_reward, args=args, train_dataset=Dataset.from_dict(rows),
               processing_class=processing)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    paths = {}

    def get(family: str) -> str:
        if family not in paths:
            folder = tmp_path_factory.mktemp(family)
            save_tiny_gemma3_vlm(folder) if family.endswith("_vlm") else _save_text_model(family, folder)
            paths[family] = str(folder)
        return paths[family]
    return get


def _batch(trainer) -> dict:
    """One micro-batch as TRL's generation returns it, one completion truncated (masked tokens) and old log-probs
    moved off-policy, so that the clip acts."""
    rows = [dict(zip(trainer.train_dataset.column_names, r)) for r in zip(*trainer.train_dataset[:2].values())]
    with torch.random.fork_rng():
        torch.manual_seed(5)
        inputs = trainer._generate_and_score_completions([r for r in rows for _ in range(2)])
    inputs["completion_mask"][0, 3:] = 0
    g = torch.Generator().manual_seed(6)
    media = {k: inputs.get(k) for k in (*MULTIMODAL_KEYS, "num_images", "num_tiles")}
    with torch.no_grad():
        logps = trainer._get_per_token_logps_and_entropies(
            trainer.model, torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1),
            torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1), inputs["completion_ids"].shape[1],
            **media)[0]
    inputs["old_per_token_logps"] = logps + 0.3 * torch.randn(logps.shape, generator=g)
    if trainer.beta:
        inputs["ref_per_token_logps"] = logps + 0.2 * torch.randn(logps.shape, generator=g)
    inputs["advantages"] = torch.randn(inputs["advantages"].shape, generator=g)
    return inputs


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_equals_trl_on_a_batch_and_trains_like_trl(saved, tmp_path, family):
    path = saved(family)
    ref = _trainer(GRPOTrainer, family, path, tmp_path / "trl")
    ours = _trainer(TraceGRPOTrainer, family, path, tmp_path / "ours")
    if family == "gpt_oss":
        assert ref.aux_loss_enabled and ours.aux_loss_enabled  # GPT-OSS's config: router_aux_loss_coef 0.001

    inputs = _batch(ref)
    if family.endswith("_vlm"):
        assert inputs["pixel_values"].shape[0] == 4 and "token_type_ids" in inputs
    assert not inputs["completion_mask"].all()
    loss_ref, grads_ref = loss_and_grads(ref, inputs)
    loss, grads = loss_and_grads(ours, inputs)
    assert torch.isfinite(loss_ref) and loss_ref.abs() > 1e-4
    assert abs(loss.item() - loss_ref.item()) <= 2e-5 * abs(loss_ref.item())
    assert grads.keys() == grads_ref.keys() and len(grads) > 5
    if family.endswith("_vlm"):  # the images reach the loss: the vision tower gets gradients (but the key bias,
        # to which softmax is invariant: its gradient is round-off)
        vision = [g.norm() for n, g in grads.items() if "vision_tower" in n and "k_proj.bias" not in n]
        assert len(vision) > 10 and min(vision) > 1e-6
    largest = max(g.abs().max() for g in grads_ref.values())  # + its round-off, as for the moves below
    for name, g_ref in grads_ref.items():
        assert (grads[name] - g_ref).abs().max() <= 2e-5 * g_ref.abs().max() + 1e-7 * largest, name

    before = {n: p.detach().clone() for n, p in ref.model.named_parameters()}
    logs, params = [], []
    for trainer in (ref, ours):
        trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}  # drop the batch's metrics
        transformers.set_seed(0)
        trainer.train()
        logs.append([h for h in trainer.state.log_history if "loss" in h])
        params.append(dict(trainer.model.named_parameters()))
    assert_logs_agree(*logs, steps=2)
    moved = [n for n, p in params[0].items() if not torch.equal(p, before[n])]
    assert moved == [n for n, p in params[1].items() if not torch.equal(p, before[n])] and len(moved) > 5
    deltas = {n: (params[0][n].detach() - before[n], params[1][n].detach() - before[n]) for n in moved}
    # 1e-4 normwise per tensor; plus fp32 round-off (~1e-7) of the largest move, for tensors whose gradient is
    # mathematically zero and whose move is round-off alone (attention key biases, under softmax's invariance)
    largest = max(d_ref.norm() for d_ref, _ in deltas.values())
    for name, (delta_ref, delta) in deltas.items():
        assert (delta - delta_ref).norm() <= 1e-4 * delta_ref.norm() + 1e-7 * largest, name


def test_trace_refuses_image_rollouts(saved, tmp_path):
    """TRACE's teacher reads a text-only privileged prompt: a dataset with images is refused at construction,
    naming it, rather than distilled against a teacher that never saw the image."""
    from datasets import Dataset
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from trace_train.integrations.trl import TraceGRPOConfig

    path = saved("gemma3_vlm")
    args = TraceGRPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none",
                           per_device_train_batch_size=4, num_generations=2, max_completion_length=6)
    with pytest.raises(ValueError, match="image columns"):
        TraceGRPOTrainer(model=AutoModelForImageTextToText.from_pretrained(path), reward_funcs=digit_reward,
                         args=args, train_dataset=Dataset.from_dict(vlm_rows(PROMPTS)),
                         processing_class=AutoProcessor.from_pretrained(path),
                         annotator=lambda jobs, rows, seeds: ([None] * len(jobs), 0),
                         privileged_prompt=lambda row, diagnostic: row["prompt"])
