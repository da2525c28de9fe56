"""The model: a local Hugging Face causal LM, or a tiny Qwen3 with a character tokenizer built in-process
(tests and the CPU demo never download anything); batches of prompt + response, and the hidden states of
the positions that predict response tokens (without computing logits). trace_train.policy adds the loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import ModelConfig

SPECIALS = ("<pad>", "<eos>", "<unk>")
# Everything the synthetic task's prompts, solutions and diagnostics use.
ALPHABET = "0123456789+-*=,;:\n QARD" + "abcdefghijklmnopqrstuvwxyz"


def build_char_tokenizer(alphabet: str = ALPHABET):
    """A one-character-per-token Hugging Face tokenizer (offsets, decoding and saving work as usual)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(list(SPECIALS) + sorted(set(alphabet)))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def build_tiny_model(cfg: ModelConfig, tokenizer, seed: int = 0):
    """A tiny Qwen3 (tied embeddings, like the small Qwen3 models) from a config, randomly initialised."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=cfg.tiny_hidden, intermediate_size=2 * cfg.tiny_hidden,
        num_hidden_layers=cfg.tiny_layers, num_attention_heads=cfg.tiny_heads,
        num_key_value_heads=max(1, cfg.tiny_heads // 2), head_dim=cfg.tiny_hidden // cfg.tiny_heads,
        max_position_embeddings=512, tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return Qwen3ForCausalLM(config).to(getattr(torch, cfg.dtype))


def load_policy(cfg: ModelConfig, seed: int = 0):
    """(model, tokenizer): from_pretrained on cfg.path (a local folder), else the tiny model."""
    if cfg.path:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        attn = "sdpa"
        try:
            import flash_attn  # noqa: F401

            attn = "flash_attention_2" if torch.cuda.is_available() else "sdpa"
        except ImportError:
            pass
        tokenizer = AutoTokenizer.from_pretrained(cfg.path)
        model = AutoModelForCausalLM.from_pretrained(cfg.path, dtype=getattr(torch, cfg.dtype),
                                                     attn_implementation=attn)
        return model, tokenizer
    tokenizer = build_char_tokenizer()
    return build_tiny_model(cfg, tokenizer, seed), tokenizer


@dataclass
class Batch:
    """B sequences prompt_b + response_b and the N = sum_b L_b loss rows: row (b, j), the position predicting
    response_b[j] (position prompt_len_b - 1 + j of sequence b), as an index into input_ids.reshape(-1).

    Two layouts, the same rows in the same order (b-major), so targets and the loss see no difference:
    - padded: [B, T], sequence b in row b, right-padded to the longest; attention_mask marks the tokens.
    - packed (padding-free): [R, W], sequences concatenated along rows with position_ids restarting at 0 at each
      one and attention_mask None; transformers then builds the block-diagonal causal mask from position_ids
      (sdpa / eager / flex) or calls flash-attn's varlen kernel (flash_attention_*). R = 1 for varlen kernels;
      for dense-mask kernels, sequences filled first-fit-decreasing into rows of at most the longest sequence's
      tokens (by default), so the mask (R x W x W) is never larger than the padded one (B x T x T). A row's
      unused tail is a filler sequence of pad tokens (its own positions from 0), never a loss row."""

    input_ids: torch.Tensor  # [B, T] or [R, W]
    attention_mask: torch.Tensor | None  # [B, T]; None when packed
    rows: torch.Tensor  # [N] positions in the flattened input_ids
    targets: torch.Tensor  # [N]
    response_lens: list[int]
    position_ids: torch.Tensor | None = None  # [R, W] when packed

    @property
    def packed(self) -> bool:
        return self.position_ids is not None


def make_batch(prompts: list[list[int]], responses: list[list[int]], pad_id: int, packed: bool = False,
               row_tokens: int | None = None) -> Batch:
    """The batch of prompt + response sequences, padded (default) or packed. packed with row_tokens None: one row
    (for varlen attention kernels); else rows of at most max(row_tokens, longest sequence) tokens (dense masks),
    as wide as the fullest row."""
    if len(prompts) != len(responses):
        raise ValueError("one prompt per response")
    if any(not p for p in prompts):
        raise ValueError("every prompt needs at least one token (it predicts the first response token)")
    seqs = [p + r for p, r in zip(prompts, responses)]
    if packed:
        return _packed_batch(prompts, responses, seqs, pad_id, row_tokens)
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    rows, targets = [], []
    for b, (p, r) in enumerate(zip(prompts, responses)):
        ids[b, :len(p) + len(r)] = torch.tensor(p + r)
        mask[b, :len(p) + len(r)] = 1
        rows.extend(b * width + len(p) - 1 + j for j in range(len(r)))
        targets.extend(r)
    return Batch(ids, mask, torch.tensor(rows, dtype=torch.long), torch.tensor(targets, dtype=torch.long),
                 [len(r) for r in responses])


def pack_rows(seq_lens: list[int], width: int) -> list[list[int]]:
    """Sequence indices per row: first-fit decreasing into rows of `width` tokens (ties by index: deterministic)."""
    rows, free = [], []
    for i in sorted(range(len(seq_lens)), key=lambda i: (-seq_lens[i], i)):
        for r, room in enumerate(free):
            if seq_lens[i] <= room:
                rows[r].append(i)
                free[r] -= seq_lens[i]
                break
        else:
            rows.append([i])
            free.append(width - seq_lens[i])
    return rows


def _packed_batch(prompts, responses, seqs, pad_id: int, row_tokens: int | None) -> Batch:
    lens = [len(s) for s in seqs]
    if row_tokens is None:
        layout = [list(range(len(seqs)))]
    else:
        layout = pack_rows(lens, max(row_tokens, max(lens)))
    width = max(sum(lens[b] for b in members) for members in layout)
    ids = torch.full((len(layout), width), pad_id, dtype=torch.long)
    pos = torch.zeros((len(layout), width), dtype=torch.long)
    start = [0] * len(seqs)  # flat offset of each sequence's first token
    for r, members in enumerate(layout):
        col = 0
        for b in members:
            ids[r, col:col + lens[b]] = torch.tensor(seqs[b])
            pos[r, col:col + lens[b]] = torch.arange(lens[b])
            start[b] = r * width + col
            col += lens[b]
        pos[r, col:] = torch.arange(width - col)  # the filler: a sequence of its own, attended by nothing else
    rows = [start[b] + len(p) - 1 + j for b, (p, r) in enumerate(zip(prompts, responses)) for j in range(len(r))]
    targets = [t for r in responses for t in r]
    return Batch(ids, None, torch.tensor(rows, dtype=torch.long), torch.tensor(targets, dtype=torch.long),
                 [len(r) for r in responses], position_ids=pos)


def varlen_attention(model) -> bool:
    """Whether the model's attention runs flash-attn's varlen kernel on packed rows (no dense mask), so that
    one packed row is best; with sdpa / eager a dense [W, W] mask is built per row."""
    impl = str(getattr(getattr(model, "config", None), "_attn_implementation", "") or "")
    return "flash" in impl


def response_hidden(model, batch: Batch) -> torch.Tensor:
    """[N, H] final-norm hidden states of the rows predicting response tokens; the LM head is not run."""
    device = next(model.parameters()).device
    mask = None if batch.attention_mask is None else batch.attention_mask.to(device)
    pos = None if batch.position_ids is None else batch.position_ids.to(device)
    # no cache: transformers reads packed sequences from position_ids only without one
    out = model.base_model(input_ids=batch.input_ids.to(device), attention_mask=mask, position_ids=pos,
                           use_cache=False)
    hidden = out.last_hidden_state
    return hidden.reshape(-1, hidden.shape[-1])[batch.rows.to(device)]


def token_char_offsets(tokenizer, ids: list[int]) -> list[tuple[int, int]]:
    """[start, end) of each token's text inside decode(ids). Per-token decoding where it concatenates to the
    whole (character and most BPE tokenizers), else by decoding prefixes (multi-byte pieces)."""
    pieces = [tokenizer.decode([i], skip_special_tokens=True) for i in ids]
    if "".join(pieces) != tokenizer.decode(ids, skip_special_tokens=True):
        ends = [len(tokenizer.decode(ids[:j + 1], skip_special_tokens=True)) for j in range(len(ids))]
        starts = [0] + ends[:-1]
        return list(zip(starts, ends))
    out, pos = [], 0
    for piece in pieces:
        out.append((pos, pos + len(piece)))
        pos += len(piece)
    return out


def char_to_token_spans(char_spans: list[tuple[int, int]], offsets: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Token spans [start, end) covering each character span (every token that overlaps it)."""
    out = []
    for cs, ce in char_spans:
        hit = [j for j, (s, e) in enumerate(offsets) if s < ce and cs < e and e > s]
        if hit:
            out.append((hit[0], hit[-1] + 1))
    return out
