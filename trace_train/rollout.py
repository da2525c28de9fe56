"""Rollouts behind one small interface. `HFRollouts` (Hugging Face `generate`) works everywhere; a vLLM
engine (colocated, sleep/wake, weights pushed each step) is the intended CUDA engine and not written yet."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Rollouts:
    """K samples of each of P prompts, prompt-major: rollout i answers prompt i // K."""

    prompts: list[list[int]]  # [P * K] the prompt ids of each rollout
    responses: list[list[int]]  # [P * K] sampled ids, ending with EOS unless truncated
    logprobs: list[torch.Tensor]  # [P * K] sampling log-probs of each response token (at the temperature)
    finished: list[bool]  # ended with EOS (False: cut at max_new_tokens)


class HFRollouts:
    def __init__(self, model, tokenizer, max_new_tokens: int, temperature: float = 1.0):
        self.model, self.tokenizer = model, tokenizer
        self.max_new_tokens, self.temperature = max_new_tokens, temperature

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], k: int) -> Rollouts:
        pad, eos = self.tokenizer.pad_token_id, self.tokenizer.eos_token_id
        width = max(len(p) for p in prompts)
        # Left padding: generation continues every prompt from the same column.
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        device = next(self.model.parameters()).device
        was_training = self.model.training
        self.model.eval()
        out = self.model.generate(
            input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=True, temperature=self.temperature,
            top_k=0, top_p=1.0, max_new_tokens=self.max_new_tokens, num_return_sequences=k, pad_token_id=pad,
            eos_token_id=eos, return_dict_in_generate=True, output_scores=True)
        self.model.train(was_training)
        new = out.sequences[:, width:].cpu()
        logp = torch.stack([torch.log_softmax(s.float(), -1) for s in out.scores], 1).cpu()  # [PK, T, V]
        responses, logprobs, finished = [], [], []
        for i in range(new.shape[0]):
            row = new[i].tolist()
            end = row.index(eos) + 1 if eos in row else len(row)
            responses.append(row[:end])
            logprobs.append(logp[i, torch.arange(end), new[i, :end]])
            finished.append(eos in row)
        return Rollouts([prompts[i // k] for i in range(len(responses))], responses, logprobs, finished)
