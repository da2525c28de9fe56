"""The model: a local Hugging Face causal LM, or a tiny Qwen3 with a character tokenizer built in-process
(tests and the CPU demo never download anything); batches of prompt + response, and the hidden states of
the positions that predict response tokens (without computing logits). trace_train.policy adds the loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .config import ModelConfig
from .heads import HeadMap, head_bias, head_map

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
    config._attn_implementation = resolve_attn_implementation(cfg)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return Qwen3ForCausalLM(config).to(getattr(torch, cfg.dtype))


def _auto_attn_implementation(compute_dtype: str) -> str:
    """auto's kernel for a model without attention softcapping: flash-attn 2 on CUDA when it imports and the
    compute dtype is 16-bit (its kernels have no fp32), else sdpa."""
    from .config import attn_missing

    return "sdpa" if attn_missing("flash_attention_2", compute_dtype) else "flash_attention_2"


def attention_softcap(hf_config) -> float | None:
    """The model's attention-score softcapping (Gemma 2: tanh(scores / c) * c before the softmax), or None."""
    for c in (hf_config, getattr(hf_config, "text_config", None)):
        cap = getattr(c, "attn_logit_softcapping", None) if c is not None else None
        if cap:
            return cap
    return None


def resolve_attn_implementation(cfg: ModelConfig, hf_config=None) -> str:
    """The attention kernel transformers runs for model.attn_implementation, hf_config the model's config (None:
    the tiny in-process Qwen3). auto: eager for a model with attention softcapping, else flash-attn 2 on CUDA when
    it imports and the compute dtype is 16-bit, else sdpa. ValueError naming the key for a kernel this machine or
    this model cannot run (sdpa has no softcapping: transformers would drop it, or refuse the model)."""
    from .config import attn_missing

    impl, cap, dtype = cfg.attn_implementation, attention_softcap(hf_config), cfg.compute_dtype or cfg.dtype
    if impl == "auto":
        return "eager" if cap else _auto_attn_implementation(dtype)
    if impl == "sdpa" and cap:
        raise ValueError(f"model.attn_implementation = 'sdpa': {type(hf_config).__name__}.attn_logit_softcapping = "
                         f"{cap} and sdpa cannot apply it (use auto, eager, flex_attention or flash_attention_2)")
    missing = attn_missing(impl, dtype)
    if missing:
        raise ValueError(missing)
    return impl


def check_model_config(cfg: ModelConfig) -> None:
    """What model.path's config.json refuses before any weight loads: the attention kernel for it
    (resolve_attn_implementation) and a router aux loss trace_train cannot compute (router_aux_loss)."""
    from transformers import AutoConfig

    try:
        hf_config = AutoConfig.from_pretrained(cfg.path)
    except (OSError, ValueError) as e:
        raise ValueError(f"model.path {cfg.path!r}: no readable Hugging Face config ({str(e).splitlines()[0]})") from e
    resolve_attn_implementation(cfg, hf_config)
    check_router_aux_config(hf_config)


def _moe_module(hf_config):
    import importlib

    name = getattr(hf_config, "model_type", "")
    try:
        return importlib.import_module(f"transformers.models.{name}.modeling_{name}")
    except ImportError:
        return None


def check_router_aux_config(hf_config) -> None:
    """ValueError naming the model type and attribute if its config asks transformers to add a router aux loss
    (output_router_logits) that trace_train cannot compute as transformers does (its modeling module's
    load_balancing_loss_func)."""
    if not getattr(hf_config, "output_router_logits", False) or not getattr(hf_config, "router_aux_loss_coef", 0):
        return
    module = _moe_module(hf_config)
    if module is None or not callable(getattr(module, "load_balancing_loss_func", None)):
        raise ValueError(f"{type(hf_config).__name__}.output_router_logits = True: trace_train adds the router aux "
                         f"loss only as transformers' load_balancing_loss_func computes it, which "
                         f"{hf_config.model_type!r} has not (set output_router_logits to false in config.json to "
                         f"train without it)")


@dataclass
class RouterAux:
    """The router load-balancing loss an MoE ForCausalLM adds to its loss when config.output_router_logits is
    set: router_aux_loss_coef * load_balancing_loss_func(router logits, num_experts, num_experts_per_tok, mask),
    with the same function and attributes transformers' forward uses."""

    coef: float
    num_experts: int
    top_k: int
    fn: object

    def __call__(self, router_logits, token_mask) -> torch.Tensor:
        """The unweighted aux loss of one forward; token_mask [rows, width]: 1 on real tokens (padding and packed
        rows' filler excluded, as transformers excludes padding with the attention mask)."""
        return self.fn(router_logits, self.num_experts, self.top_k, token_mask)


def router_aux_loss(model) -> RouterAux | None:
    """The model's router aux loss (None when transformers would add none: a dense model, output_router_logits
    unset or router_aux_loss_coef 0); ValueError naming the model where it cannot be computed as transformers
    does."""
    config = model.config
    if not getattr(config, "output_router_logits", False) or not getattr(config, "router_aux_loss_coef", 0):
        return None
    check_router_aux_config(config)
    attrs = ("router_aux_loss_coef", "num_experts", "num_experts_per_tok")
    if not all(hasattr(model, a) for a in attrs):
        absent = " / ".join(a for a in attrs if not hasattr(model, a))
        raise ValueError(f"{type(model).__name__}: output_router_logits is set but the model has no {absent} "
                         f"(trace_train computes the router aux loss from them as its forward does)")
    return RouterAux(float(model.router_aux_loss_coef), int(model.num_experts), int(model.num_experts_per_tok),
                     _moe_module(config).load_balancing_loss_func)


def load_policy(cfg: ModelConfig, seed: int = 0, *, meta: bool = False):
    """(model, tokenizer): from_pretrained on cfg.path (a local folder), else the tiny model.

    meta=True (cfg.path only): the model is built from its config with every parameter on the meta device
    (no memory, no file read; buffers computed at construction stay real), to be sharded by
    `dist.shard` and filled by `load_sharded_weights`, so that no process ever holds the full weights.
    Either way a model whose logits trace_loss cannot reproduce is refused (`check_lm_head`: heads.py's list)."""
    if not cfg.path:
        tokenizer = build_char_tokenizer()
        return build_tiny_model(cfg, tokenizer, seed), tokenizer
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(cfg.path)
    dtype = getattr(torch, cfg.dtype)
    config = AutoConfig.from_pretrained(cfg.path)
    attn = resolve_attn_implementation(cfg, config)
    if not meta:
        model = AutoModelForCausalLM.from_pretrained(cfg.path, dtype=dtype, attn_implementation=attn)
        check_lm_head(model)
        router_aux_loss(model)
        return model, tokenizer
    from accelerate import init_empty_weights
    from transformers import GenerationConfig

    check_lm_head_config(config)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn)
    model.tie_weights()  # from_pretrained ties after loading; here it must be done before sharding
    check_lm_head(model)
    router_aux_loss(model)
    try:
        model.generation_config = GenerationConfig.from_pretrained(cfg.path)
    except OSError:  # no generation_config.json: from_pretrained keeps the one derived from the config too
        pass
    return model, tokenizer


def check_lm_head_config(config) -> HeadMap:
    """The logit map trace_loss applies for this config (heads.py's list: softcapping, scales); ValueError
    naming the config attribute where it cannot be made exact."""
    return head_map(config)


def check_lm_head(model) -> HeadMap:
    """check_lm_head_config, and the LM head itself: a Linear weight, without bias (trace-train does not pass
    a bias; the TRL integration does)."""
    lmap = check_lm_head_config(model.config)
    head = model.get_output_embeddings()
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise ValueError(f"{type(model).__name__}: no output embedding (lm_head) weight to compute logits with")
    if head_bias(model) is not None:
        raise ValueError(f"{type(model).__name__}.lm_head.bias is set: trace-train computes logits from "
                         f"lm_head.weight without a bias")
    return lmap


def _safetensors_files(path: str) -> list[str]:
    """The safetensors weight files of a local Hugging Face folder."""
    import json
    import os

    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            return sorted({os.path.join(path, v) for v in json.load(f)["weight_map"].values()})
    single = os.path.join(path, "model.safetensors")
    if not os.path.exists(single):
        raise ValueError(f"model.path {path!r}: sharded loading reads safetensors (model.safetensors or "
                         f"model.safetensors.index.json), none found")
    return [single]


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


class _SafetensorsRows:
    """Row ranges of the tensors of one safetensors file, read with plain file reads (no memory map, so a
    process's resident memory holds only what it asked for). The format: an 8-byte little-endian header
    length, a JSON header {name: {dtype, shape, data_offsets}}, then the row-major data."""

    def __init__(self, path: str):
        import json

        self.path = path
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            self.header = {k: v for k, v in json.loads(f.read(n)).items() if k != "__metadata__"}
        self.data_start = 8 + n

    def read(self, name: str, start: int, rows: int, out: torch.Tensor) -> None:
        """Copy rows [start, start + rows) of tensor `name` (all of a 0-d tensor) into `out` (cast)."""
        meta = self.header[name]
        dtype, shape = SAFETENSORS_DTYPES[meta["dtype"]], meta["shape"]
        row_numel = math.prod(shape[1:]) if shape else 1
        if tuple(out.shape) != ((rows, *shape[1:]) if shape else ()):
            raise ValueError(f"{name}: file shape {shape}, rows {start}:{start + rows}, parameter shard "
                             f"{tuple(out.shape)}")
        itemsize = torch.empty((), dtype=dtype).element_size()
        direct = out.dtype == dtype and out.device.type == "cpu" and out.is_contiguous()
        buf = out if direct else torch.empty(out.shape, dtype=dtype)
        with open(self.path, "rb") as f:
            f.seek(self.data_start + meta["data_offsets"][0] + start * row_numel * itemsize)
            view = memoryview(buf.view(-1).view(torch.uint8).numpy()) if buf.numel() else memoryview(b"")
            if f.readinto(view) != len(view):
                raise ValueError(f"{self.path}: truncated data for {name}")
        if not direct:
            out.copy_(buf)


# transformers >= 5 holds an MoE layer's experts as fused [E, ...] parameters that checkpoints store per expert (its
# conversion_mapping: qwen2_moe's, which Qwen3-MoE, DeepSeek V2 / V3, GLM-4 MoE and others share, and Mixtral's):
# each expert's slice of the fused parameter is its tensors concatenated along their dim 0 (gate, then up).
FUSED_EXPERTS = (
    ("experts.gate_up_proj", (("experts.{e}.gate_proj.weight", "experts.{e}.up_proj.weight"),
                              ("experts.{e}.w1.weight", "experts.{e}.w3.weight"))),
    ("experts.down_proj", (("experts.{e}.down_proj.weight",), ("experts.{e}.w2.weight",))),
)


def _expert_sources(name: str, where: dict) -> tuple[str, tuple[str, ...]] | None:
    """(prefix, per-expert patterns) of the checkpoint tensors a fused expert parameter is made of, or None."""
    for suffix, variants in FUSED_EXPERTS:
        if not name.endswith(suffix):
            continue
        prefix = name[: -len(suffix)]
        for pre in dict.fromkeys((prefix, prefix.replace(".mlp.", ".block_sparse_moe."))):  # Mixtral's files
            for patterns in variants:
                if all(pre + p.format(e=0) in where for p in patterns):
                    return pre, patterns
    return None


def _read_fused_experts(where: dict, pre: str, patterns: tuple[str, ...], start: int, local: torch.Tensor) -> None:
    """Fill local [experts, rows, cols] (experts start, start + 1, ...) from the per-expert tensors."""
    for j in range(local.shape[0]):
        row = 0
        for pattern in patterns:
            src = pre + pattern.format(e=start + j)
            if src not in where:
                raise ValueError(f"no weights for {src} in the safetensors files")
            rows = where[src].header[src]["shape"][0]
            where[src].read(src, 0, rows, local[j, row:row + rows])
            row += rows
        if row != local.shape[1]:
            raise ValueError(f"{pre}{patterns}: expert {start + j} has {row} rows, the fused parameter "
                             f"{local.shape[1]}")


@torch.no_grad()
def load_sharded_weights(model, path: str) -> None:
    """Fill a sharded (FSDP2, Shard(0)) model's local shards from a Hugging Face folder: each process reads
    only its own rows of each tensor from the safetensors files, cast to the parameter's dtype (an MoE layer's fused
    experts from their per-expert tensors: FUSED_EXPERTS). A parameter absent from the files is an error, unless it
    is tied to one that was loaded (the LM head of tied-embedding models)."""
    from torch.distributed.tensor import DTensor, Shard

    where = {}
    for f in map(_SafetensorsRows, _safetensors_files(path)):
        where.update(dict.fromkeys(f.header, f))
    loaded: set[int] = set()
    missing = []
    for name, t in model.state_dict(keep_vars=True).items():
        fused = _expert_sources(name, where) if name not in where else None
        if name not in where and fused is None:
            missing.append((name, t))
            continue
        if isinstance(t, DTensor):
            if len(t.placements) != 1 or t.placements[0] != Shard(0):
                raise ValueError(f"{name}: expected FSDP's Shard(0) placement, got {t.placements}")
            local = t.to_local()
            n, world, rank = t.shape[0], t.device_mesh.size(), t.device_mesh.get_local_rank()
            chunk = -(-n // world)
            start = min(n, rank * chunk)
            rows = min(n, start + chunk) - start
        else:
            local, start, rows = t, 0, t.shape[0] if t.dim() else 1
        if fused is not None:  # dim 0 is the expert: each rank reads its experts' tensors
            _read_fused_experts(where, *fused, start, local)
        else:
            where[name].read(name, start, rows, local)
        loaded.add(id(t))
    absent = [name for name, t in missing if id(t) not in loaded]
    if absent:
        raise ValueError(f"model.path {path!r}: no weights for {absent[:5]} in the safetensors files")


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
    filled: list[int] | None = None  # [R] when packed: each row's sequence tokens (the filler follows them)

    @property
    def packed(self) -> bool:
        return self.position_ids is not None

    def token_mask(self) -> torch.Tensor:
        """[B, T] or [R, W]: 1 on the sequences' tokens, 0 on padding (padded) and on the rows' filler (packed)."""
        if self.attention_mask is not None:
            return self.attention_mask
        return (torch.arange(self.input_ids.shape[1]) < torch.tensor(self.filled)[:, None]).long()


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
    filled = []
    for r, members in enumerate(layout):
        col = 0
        for b in members:
            ids[r, col:col + lens[b]] = torch.tensor(seqs[b])
            pos[r, col:col + lens[b]] = torch.arange(lens[b])
            start[b] = r * width + col
            col += lens[b]
        filled.append(col)
        pos[r, col:] = torch.arange(width - col)  # the filler: a sequence of its own, attended by nothing else
    rows = [start[b] + len(p) - 1 + j for b, (p, r) in enumerate(zip(prompts, responses)) for j in range(len(r))]
    targets = [t for r in responses for t in r]
    return Batch(ids, None, torch.tensor(rows, dtype=torch.long), torch.tensor(targets, dtype=torch.long),
                 [len(r) for r in responses], position_ids=pos, filled=filled)


def varlen_attention(model) -> bool:
    """Whether the model's attention runs flash-attn's varlen kernel on packed rows (no dense mask), so that
    one packed row is best; with sdpa / eager a dense [W, W] mask is built per row."""
    impl = str(getattr(getattr(model, "config", None), "_attn_implementation", "") or "")
    return "flash" in impl


def response_hidden(model, batch: Batch, router_aux: RouterAux | None = None):
    """[N, H] final-norm hidden states of the rows predicting response tokens; the LM head is not run.
    router_aux: also the forward's router aux loss (unweighted, over the batch's real tokens): (hidden, aux)."""
    device = next(model.parameters()).device
    mask = None if batch.attention_mask is None else batch.attention_mask.to(device)
    pos = None if batch.position_ids is None else batch.position_ids.to(device)
    extra = {} if router_aux is None else {"output_router_logits": True}
    # no cache: transformers reads packed sequences from position_ids only without one
    out = model.base_model(input_ids=batch.input_ids.to(device), attention_mask=mask, position_ids=pos,
                           use_cache=False, **extra)
    hidden = out.last_hidden_state
    hidden = hidden.reshape(-1, hidden.shape[-1])[batch.rows.to(device)]
    if router_aux is None:
        return hidden
    return hidden, router_aux(out.router_logits, batch.token_mask().to(device))


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
