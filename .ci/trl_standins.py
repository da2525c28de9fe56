"""Offline stand-ins for the hub names TRL's GRPO test file loads (`.ci/trl_own_tests.py`).

Models: tiny randomly initialised models of the named architectures, written into a Hugging Face hub cache
folder (`models--org--name/snapshots/<commit>/`), so that with HF_HUB_OFFLINE=1 every `from_pretrained` of the
hub name resolves to them and `config._name_or_path` stays the hub name. All share one character tokenizer
with a chat template (TRL's tiny models are random too; only the architecture and the tokenizer's role matter).
Datasets: `zen`'s prompt-only configs (train / test splits, a `prompt` column), built in memory by
`load_zen`. One vision-language model, Gemma 3's (tests/vlm_setup.py), and `zen-image` (`load_zen_image`); the other
VLM names and `zen-multi-image` are not built.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

COMMIT = "0" * 40
# Qwen2.5's vocabulary size and special ids: TRL's tests hand-write completions with pad 151643 / eos 151645, and
# rely on a random model over this vocabulary almost never sampling EOS within 8 tokens.
VOCAB_SIZE, PAD_ID, START_ID, EOS_ID = 151665, 151643, 151644, 151645
SPECIALS = {PAD_ID: "<|endoftext|>", START_ID: "<|im_start|>", EOS_ID: "<|im_end|>"}
# Accepts (and ignores) chat-template kwargs such as Qwen3's enable_thinking, like the hub templates do.
CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")

# zen's layout: a `prompt` column, 17 train rows and 2 test rows, fragments of PEP 20 (public domain). The first 12
# train rows are the ones TRL's test_prepare_input_called_with_correct_data names, in its order; the rest ours.
ZEN_TRAIN = ["Beautiful is better than", "Explicit is", "Simple is better", "Complex", "Flat is better than",
             "Sparse is better", "Readability", "Special cases aren't special", "Although practicality beats",
             "Errors should never", "Unless explicitly", "In the face of ambiguity, refuse", "There should be one",
             "Although that way may not", "Now is better than", "Although never is", "If the implementation"]
ZEN_TEST = ["Namespaces are one", "If the implementation is easy"]

DENSE = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=1, head_dim=8, max_position_embeddings=256)
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)

VLM = "trl-internal-testing/tiny-Gemma3ForConditionalGeneration"  # the one vision-language stand-in
# hub name -> (architecture, config class, config kwargs beyond DENSE)
CAUSAL_LMS = {
    "trl-internal-testing/tiny-Qwen2ForCausalLM-2.5": ("Qwen2ForCausalLM", "Qwen2Config",
                                                       dict(tie_word_embeddings=True)),
    "trl-internal-testing/tiny-Qwen3ForCausalLM": ("Qwen3ForCausalLM", "Qwen3Config", dict(tie_word_embeddings=True)),
    "trl-internal-testing/tiny-Qwen3MoeForCausalLM": ("Qwen3MoeForCausalLM", "Qwen3MoeConfig",
                                                      dict(MOE, output_router_logits=True, router_aux_loss_coef=0.001)),
    "trl-internal-testing/tiny-Cohere2ForCausalLM": ("Cohere2ForCausalLM", "Cohere2Config",
                                                     dict(logit_scale=0.5, sliding_window=16,
                                                          sliding_window_pattern=2)),
    "trl-internal-testing/tiny-Gemma2ForCausalLM": ("Gemma2ForCausalLM", "Gemma2Config",
                                                    dict(final_logit_softcapping=30.0, sliding_window=16)),
    "trl-internal-testing/tiny-GptOssForCausalLM": ("GptOssForCausalLM", "GptOssConfig",
                                                    dict(num_local_experts=4, num_experts_per_tok=2,
                                                         output_router_logits=True, sliding_window=16,
                                                         # yarn's factor = max_position_embeddings / original
                                                         rope_parameters=dict(rope_type="yarn", factor=32.0,
                                                                              original_max_position_embeddings=8,
                                                                              beta_fast=32.0, beta_slow=1.0,
                                                                              rope_theta=150000.0))),
    "trl-internal-testing/tiny-Glm4MoeForCausalLM": ("Glm4MoeForCausalLM", "Glm4MoeConfig",
                                                     dict(n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
                                                          moe_intermediate_size=16, first_k_dense_replace=1,
                                                          n_group=1, topk_group=1, partial_rotary_factor=0.5)),
    "trl-internal-testing/tiny-NemotronHForCausalLM-nano": (
        "NemotronHForCausalLM", "NemotronHConfig",
        dict(layers_block_type=["linear_attention", "full_attention"], mamba_num_heads=4, mamba_head_dim=8,
             ssm_state_size=8, n_groups=1, chunk_size=8, bos_token_id=None)),
    "trl-internal-testing/tiny-LlamaForCausalLM-3.2": ("LlamaForCausalLM", "LlamaConfig", {}),
    "trl-internal-testing/tiny-MistralForCausalLM-0.2": ("MistralForCausalLM", "MistralConfig", {}),
}
SEQ_CLASSIFIERS = {
    "trl-internal-testing/tiny-Qwen2ForSequenceClassification-2.5": ("Qwen2ForSequenceClassification", "Qwen2Config"),
    "trl-internal-testing/tiny-Qwen3ForSequenceClassification": ("Qwen3ForSequenceClassification", "Qwen3Config"),
    "trl-internal-testing/tiny-LlamaForSequenceClassification-3.2": ("LlamaForSequenceClassification", "LlamaConfig"),
}
REMOTE = "trl-internal-testing/tiny-RemoteForCausalLM"

# trust_remote_code stand-in: a Qwen2 under another name, loaded only through auto_map.
REMOTE_CONFIG_PY = '''from transformers import Qwen2Config


class RemoteConfig(Qwen2Config):
    model_type = "remote"
'''
REMOTE_MODELING_PY = '''from transformers import Qwen2ForCausalLM

from .configuration_remote import RemoteConfig


class RemoteForCausalLM(Qwen2ForCausalLM):
    config_class = RemoteConfig
'''


def build_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # One token per printable character, then filler tokens (never produced by encoding; decodable when sampled).
    chars = sorted(set(string.printable) - set("\x0b\x0c\r")) + ["<unk>"]
    names = [SPECIALS.get(i) or (chars[i] if i < len(chars) else f"<|x{i}|>") for i in range(VOCAB_SIZE)]
    tok = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(names)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=SPECIALS[PAD_ID], eos_token=SPECIALS[EOS_ID],
                                   unk_token="<unk>")
    fast.add_special_tokens({"additional_special_tokens": [SPECIALS[START_ID]]})
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _snapshot(cache: Path, name: str) -> Path:
    repo = cache / ("models--" + name.replace("/", "--"))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)
    folder = repo / "snapshots" / COMMIT
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _config(config_cls: str, tok, **kwargs):
    import transformers

    ids = dict(vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None)
    return getattr(transformers, config_cls)(**{**DENSE, **ids, **kwargs})


def _save(model, tok, folder: Path):
    import torch

    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tok.pad_token_id
        model.generation_config.eos_token_id = tok.eos_token_id
    model.to(torch.float32).save_pretrained(folder)
    tok.save_pretrained(folder)


def build_hub_cache(cache: str | Path) -> list[str]:
    """Writes every stand-in model into the hub cache folder `cache`; returns the names written."""
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    cache = Path(cache)
    tok = build_tokenizer()
    written = []
    for seed, (name, (arch, config_cls, extra)) in enumerate(CAUSAL_LMS.items()):
        torch.manual_seed(seed)
        config = _config(config_cls, tok, architectures=[arch], **extra)
        _save(getattr(transformers, arch)(config), tok, _snapshot(cache, name))
        written.append(name)
    for seed, (name, (arch, config_cls)) in enumerate(SEQ_CLASSIFIERS.items(), start=100):
        torch.manual_seed(seed)
        config = _config(config_cls, tok, architectures=[arch], num_labels=1)
        _save(getattr(transformers, arch)(config), tok, _snapshot(cache, name))
        written.append(name)
    folder = _snapshot(cache, REMOTE)
    torch.manual_seed(200)
    _save(transformers.Qwen2ForCausalLM(_config("Qwen2Config", tok, tie_word_embeddings=True)), tok, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="remote", architectures=["RemoteForCausalLM"],
                  auto_map={"AutoConfig": "configuration_remote.RemoteConfig",
                            "AutoModelForCausalLM": "modeling_remote.RemoteForCausalLM"})
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "configuration_remote.py").write_text(REMOTE_CONFIG_PY)
    (folder / "modeling_remote.py").write_text(REMOTE_MODELING_PY)
    written.append(REMOTE)
    import sys  # the Gemma 3 image-text model of tests/test_trl_families.py (its own tokenizer and processor)

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from vlm_setup import save_tiny_gemma3_vlm

    save_tiny_gemma3_vlm(_snapshot(cache, VLM), seed=300)
    written.append(VLM)
    return written


def load_zen_image(config_name: str | None = None, split: str | None = None, streaming: bool = False):
    """`load_dataset("trl-internal-testing/zen-image", "conversational_prompt_only", split=...)`: zen's prompts
    with one random image each (the `image` column), as the hub dataset lays them out."""
    import sys

    from datasets import Dataset, DatasetDict

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from vlm_setup import vlm_rows

    if config_name != "conversational_prompt_only" or streaming:
        raise FileNotFoundError(f"stand-in zen-image has no config {config_name!r} (streaming={streaming})")
    splits = {"train": Dataset.from_dict(vlm_rows(ZEN_TRAIN)), "test": Dataset.from_dict(vlm_rows(ZEN_TEST))}
    return splits[split] if split is not None else DatasetDict(splits)


def load_zen(config_name: str | None = None, split: str | None = None, streaming: bool = False):
    """`load_dataset("trl-internal-testing/zen", config_name, split=..., streaming=...)` for the prompt-only
    configs, as the hub dataset lays them out."""
    from datasets import Dataset, DatasetDict, IterableDatasetDict

    if config_name == "standard_prompt_only":
        def rows(prompts):
            return {"prompt": list(prompts)}
    elif config_name == "conversational_prompt_only":
        def rows(prompts):
            return {"prompt": [[{"role": "user", "content": p}] for p in prompts]}
    else:
        raise FileNotFoundError(f"stand-in zen has no config {config_name!r}")
    splits = {"train": Dataset.from_dict(rows(ZEN_TRAIN)), "test": Dataset.from_dict(rows(ZEN_TEST))}
    if streaming:
        splits = {k: v.to_iterable_dataset() for k, v in splits.items()}
    if split is not None:
        return splits[split]
    return IterableDatasetDict(splits) if streaming else DatasetDict(splits)
