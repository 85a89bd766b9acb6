"""The four PPO models and where they live.

  actor      the policy (GPTModel with its LM head): trained; generates the rollouts
  reference  a frozen copy of the initial policy: per-token KL anchor; no grads, no optimizer state
  reward     the rm stage's RewardModel: scores finished responses; frozen
  critic     a ValueModel started from `critic.restore_from_path`, else from the reward model
             (as NeMo-Aligner does): a value per token; trained

Precision. On a GPU with `precision: bf16` every model computes in bf16; the two trained ones keep
fp32 master weights inside their optimizer (`MasterWeights`), so that updates of lr 9e-7 are not
lost to bf16 rounding. The frozen two are plain bf16 (2 bytes/parameter). On the CPU everything is
fp32. `offload_idle_models` parks the frozen models in CPU memory while the policy and critic
train, and the trained ones' optimizer state while the rollout is generated.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
from typing import List, Optional

import torch

from modeling import ModelConfig, build_model, load_pretrained
from modeling.config import engine_switches

log = logging.getLogger(__name__)


def compute_dtype(precision: str, device: torch.device) -> torch.dtype:
    """engine/precision.py's rule (the one every stage uses): bf16 on CUDA for bf16*, fp32 on the CPU."""
    from engine.precision import compute_dtype as resolve

    return resolve(precision, device, "model.precision")


def model_config(cfg_model) -> ModelConfig:
    """cfg.model (DictConfig or ModelConfig) -> ModelConfig."""
    if isinstance(cfg_model, ModelConfig):
        return dataclasses.replace(cfg_model)
    from engine.config import typed  # omegaconf only here: the stage entry (the GPU benchmark box has none)

    return typed(cfg_model, ModelConfig)


def load_actor(mcfg: ModelConfig, vocab_size: int, device, dtype, seed: int):
    """The initial policy: `restore_from_path`, or a random init of the architecture keys with the
    tokenizer's vocab (the tiny quickstart)."""
    if mcfg.restore_from_path:
        model = load_pretrained(mcfg.restore_from_path, dtype=dtype, device=device, **engine_switches(mcfg))
    else:
        torch.manual_seed(seed)
        model = build_model(mcfg, vocab_size=vocab_size, device=device, dtype=dtype)
    if model.vocab_size < vocab_size:
        raise ValueError(f"the policy's vocab ({model.vocab_size}) is smaller than the tokenizer's ({vocab_size})")
    return model


def mask_padded_vocab(model, vocab_size: int) -> None:
    """Make the vocab padding (Megatron pads the vocab to a multiple of 128) impossible to sample:
    its logits are -inf in generation and in every log-prob, so the policy is a distribution over
    the tokenizer's real ids. (A trained model gives them ~0 probability anyway; a random one does not.)"""
    if model.vocab_size <= vocab_size:
        return
    orig = type(model).logits.__get__(model)

    def logits(hidden):
        out = orig(hidden)
        out[..., vocab_size:] = float("-inf")
        return out

    model.logits = logits


def frozen_copy(model):
    saved = {k: model.__dict__.pop(k) for k in ("_generation_state", "logits") if k in model.__dict__}
    try:
        ref = copy.deepcopy(model)  # never share the actor's cached KV / CUDA graphs
    finally:
        model.__dict__.update(saved)
    ref._compiled_layers = None  # compiled blocks hold the actor's modules; compile its own
    ref.eval().requires_grad_(False)
    return ref


def load_reward(path: str, device, dtype, torch_compile: bool = False):
    rm = load_pretrained(path, head="reward", dtype=dtype, device=device, torch_compile=torch_compile)
    return rm.eval().requires_grad_(False)


def load_critic(path: str, device, dtype, **switches):
    """The value model; `switches`: the engine switches (modeling.config.ENGINE_SWITCHES)."""
    return load_pretrained(path, head="value", dtype=dtype, device=device, **switches)


class MasterWeights:
    """fp32 master copies of a low-precision model's parameters.

    Gradients are accumulated in fp32 on the masters (a hook moves each bf16 grad there as soon as
    autograd produces it, so no bf16 .grad outlives a backward); the optimizer steps the masters
    and `sync()` copies them back in place (cached CUDA graphs keep seeing the live tensors). For
    fp32 models the masters are the parameters themselves and nothing is copied."""

    def __init__(self, model: torch.nn.Module):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.mixed = any(p.dtype != torch.float32 for p in self.params)
        if not self.mixed:
            self.master = self.params
            return
        self.master = [torch.nn.Parameter(p.detach().float().clone()) for p in self.params]
        for p, m in zip(self.params, self.master):
            p.register_post_accumulate_grad_hook(self._hook(m))

    @staticmethod
    def _hook(m):
        def move(p):
            if m.grad is None:
                m.grad = p.grad.float()
            else:
                m.grad.add_(p.grad)
            p.grad = None
        return move

    @torch.no_grad()
    def sync(self) -> None:
        if self.mixed:
            torch._foreach_copy_(self.params, self.master)

    def grads(self) -> List[torch.Tensor]:
        return [m.grad for m in self.master if m.grad is not None]

    def to(self, device) -> None:
        """Move the masters (and their grads) - for offloading; the optimizer's state moves apart."""
        if self.mixed:
            for m in self.master:
                m.data = m.data.to(device, non_blocking=True)
                if m.grad is not None:
                    m.grad = m.grad.to(device, non_blocking=True)


class FrozenOffload:
    """CPU offload of the frozen models (reference, reward): a pinned host copy is made once (they
    never change), so offloading is only dropping the GPU tensors, and bringing them back is one
    host-to-device copy on a side stream that overlaps the next rollout's generation."""

    def __init__(self, models, device):
        self.device = torch.device(device)
        self.tensors = [t for m in models for t in list(m.parameters()) + list(m.buffers())]
        self.host = [t.detach().to("cpu").pin_memory() for t in self.tensors]
        self.stream = torch.cuda.Stream(self.device)
        self.on_device = True

    def offload(self) -> None:
        if self.on_device:
            torch.cuda.current_stream(self.device).synchronize()  # nothing may still read them
            for t, h in zip(self.tensors, self.host):
                t.data = h
            self.on_device = False

    def prefetch(self) -> None:
        """Start the upload (returns at once); `wait()` before the frozen models run."""
        if self.on_device:
            return
        main = torch.cuda.current_stream(self.device)
        bufs = [torch.empty(h.shape, dtype=h.dtype, device=self.device) for h in self.host]  # main stream's pool
        self.stream.wait_stream(main)
        with torch.cuda.stream(self.stream):
            for b, h in zip(bufs, self.host):
                b.copy_(h, non_blocking=True)
        for t, b in zip(self.tensors, bufs):
            t.data = b
        self.on_device = True

    def wait(self) -> None:
        torch.cuda.current_stream(self.device).wait_stream(self.stream)


def move_optimizer_state(opt: Optional[torch.optim.Optimizer], device) -> None:
    if opt is None:
        return
    for state in opt.state.values():
        for k, v in state.items():
            if torch.is_tensor(v) and v.dim() > 0:
                state[k] = v.to(device, non_blocking=True)


def bytes_of(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())
