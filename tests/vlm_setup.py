"""A tiny offline vision-language model for the TRL tests: Gemma 3's image-text model with its processor, and a
prompt dataset with images. Used by tests/test_trl_families.py and by .ci/trl_standins.py (TRL's own VLM tests)."""

from __future__ import annotations

import torch
import transformers

from trace_train.model import ALPHABET, SPECIALS

COMMON = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
              max_position_embeddings=128)
VLM_TOKENS = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
VLM_TEMPLATE = ("{% for m in messages %}{{ m['role'][0] }}:{% if m['content'] is string %}{{ m['content'] }}"
                "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<start_of_image>"
                "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}\n{% endfor %}"
                "{% if add_generation_prompt %}a:{% endif %}")


def save_tiny_gemma3_vlm(folder, seed: int = 0) -> None:
    """A tiny Gemma 3 image-text model (one-layer SigLIP tower on 28 x 28 images, one token per image) and its
    processor: the character tokenizer plus Gemma 3's image tokens, and the PIL image processor."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import Gemma3Processor, PreTrainedTokenizerFast
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    vocab = {t: i for i, t in enumerate([*SPECIALS, *VLM_TOKENS.values(), *sorted(set(ALPHABET))])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    split = "|".join(VLM_TOKENS.values()) + r"|[\s\S]"
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(split), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>",
                                  extra_special_tokens=VLM_TOKENS)
    tok.chat_template = VLM_TEMPLATE
    images = Gemma3ImageProcessorPil(size={"height": 28, "width": 28}, do_pan_and_scan=False)
    processor = Gemma3Processor(image_processor=images, tokenizer=tok, chat_template=VLM_TEMPLATE, image_seq_length=1)
    text = dict(COMMON, vocab_size=len(tok), head_dim=16, final_logit_softcapping=2.0, pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id, bos_token_id=None)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14, vision_use_head=False)  # as Gemma 3's own: its SigLIP pooling head is unused
    config = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=1,
                                       boi_token_index=tok.boi_token_id, image_token_index=tok.image_token_id,
                                       eoi_token_index=tok.convert_tokens_to_ids(VLM_TOKENS["eoi_token"]))
    torch.manual_seed(seed)
    model = transformers.Gemma3ForConditionalGeneration(config)
    with torch.no_grad():  # initialised to zeros, which would cut the images off: a trained model's is not
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0.0, 0.2)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(folder)
    processor.save_pretrained(folder)


def vlm_rows(prompts) -> dict:
    """A conversational prompt-only dataset with one image per prompt, as TRL's zen-image lays it out."""
    import numpy as np
    from PIL import Image

    rng = np.random.RandomState(0)
    images = [Image.fromarray((rng.rand(32, 40, 3) * 255).astype("uint8")) for _ in prompts]
    prompts = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": p}]}] for p in prompts]
    return {"prompt": prompts, "image": images}
