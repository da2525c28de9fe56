"""The hand-over between verl's patched model forward (trace_train.integrations.verl) and `TraceVerlLoss`: the
training forward leaves its hidden states here, the loss takes them, and the loss's teacher forward goes
through the same model with `teacher_pass` set."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Handoff:
    """What a training forward hands to `TraceVerlLoss`: the model (for the teacher forward), the final hidden
    states ([1, T, H] packed, or [B, S, H] padded), the LM-head weight, the labels verl rolled ([1, T] or [B, S])
    and the temperature."""

    model: torch.nn.Module
    hidden: torch.Tensor
    weight: torch.Tensor
    labels: torch.Tensor
    temperature: float
    packed: bool  # verl's use_remove_padding layout: one packed row, attention_mask None


class State:
    armed = False  # a TraceVerlLoss lives in this process
    teacher_pass = False  # the loss is running the teacher forward
    handoff: Handoff | None = None
    teacher_hidden: torch.Tensor | None = None


def arm() -> None:
    """Make training forwards in this process hand their hidden states to the TRACE loss (TraceVerlLoss does it)."""
    State.armed = True


def disarm() -> None:
    State.armed = False
    State.handoff = None


def take_handoff() -> Handoff | None:
    handoff, State.handoff = State.handoff, None
    return handoff


def teacher_hidden_states(model: torch.nn.Module, **inputs) -> torch.Tensor:
    """The model's final hidden states on `inputs`, through the model's own call (so FSDP's hooks gather the
    parameters), without gradient."""
    State.teacher_pass, State.teacher_hidden = True, None
    try:
        with torch.no_grad():
            model(**inputs, use_cache=False, return_dict=True)
        hidden = State.teacher_hidden
    finally:
        State.teacher_pass, State.teacher_hidden = False, None
    if hidden is None:
        raise RuntimeError("the teacher forward did not reach verl's fused forward: is use_fused_kernels on?")
    return hidden
