"""The optimizer of a run: AdamW (``optim=adamw``), or Muon for the hidden matrices with AdamW for the rest
(``optim=muon``).

Muon (Jordan et al. 2024, "Muon: An optimizer for hidden layers in neural networks";
Liu et al. 2025, "Muon is Scalable for LLM Training", arXiv:2502.16982) replaces each 2-D hidden matrix's
Nesterov-momentum update by its nearest semi-orthogonal matrix, computed by a quintic Newton-Schulz iteration.
It is meant for the matrices inside the transformer blocks (attention's wq/wk/wv/wo, the MLP's
w_gate/w_up/w_down); embeddings, the LM head (tied or not), norms, biases and the relative-position tables stay
with AdamW. ``MuonWithAdamW`` holds both and is one ``torch.optim.Optimizer``: its ``param_groups`` are the
union (so the LR schedule, gradient clipping and Lightning's optimizer loop see every group) and its
``state_dict`` is torch's ordinary format (so single-file and torch.distributed.checkpoint checkpoints work).

Under FSDP2 the parameters are DTensors sharded on dim 0, and torch.optim.Muon (2.13) has no DTensor handling
(DTensor dispatch would run Newton-Schulz on the sharded matrix with implicit collectives). ``Muon`` here keeps
the momentum sharded, all-gathers the momentum-smoothed update of each matrix (``DTensor.full_tensor``),
orthogonalizes the full matrix on every rank and keeps its own rows (Replicate -> Shard(0) is a local slice).
Cost per step: one all-gather of each hidden matrix (fp32, the size of FSDP's forward all-gather) and every rank
orthogonalizes every matrix (world-size-times redundant compute; owner-based schemes that orthogonalize each
matrix on one rank and scatter the result would remove that).
"""

from __future__ import annotations

import torch
from torch import nn

from framework.distributed.parallelize import blocks

# Jordan et al. 2024's quintic coefficients (a, b, c), also torch.optim.Muon's defaults
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)

MUON_DEEPSPEED = ("DeepSpeed's ZeRO optimizers flatten and partition the parameters, so Muon's Newton-Schulz step "
                  "never sees a whole matrix")


def decay_groups(params: list[nn.Parameter], weight_decay: float) -> list[dict]:
    """Weight decay on matrices (embeddings and linear weights) only, never on norms or biases."""
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) pairs that train, each parameter once (tied weights appear under their first name)."""
    named, seen = [], set()
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            named.append((name, p))
    return named


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW's two groups for the whole model: matrices decayed, norms and biases not."""
    return decay_groups([p for _, p in trainable_parameters(model)], weight_decay)


def split_for_muon(model: nn.Module) -> tuple[list[tuple[str, nn.Parameter]], list[tuple[str, nn.Parameter]]]:
    """(Muon's, AdamW's) named parameters. Muon: the 2-D matrices inside the repeated blocks (every family's
    ``blocks`` / ``encoder_blocks`` / ``decoder_blocks``). AdamW: everything else (token embedding, LM head,
    final norms, T5's relative-position bias tables, 1-D norm weights inside blocks)."""
    hidden = {id(p) for block in blocks(model) for p in block.parameters() if p.ndim == 2}
    named = trainable_parameters(model)
    return [(n, p) for n, p in named if id(p) in hidden], [(n, p) for n, p in named if id(p) not in hidden]


def adamw_kernel(device_types: set[str], deepspeed: bool = False) -> dict:
    """AdamW's implementation for parameters on ``device_types``: ``fused=True`` (one kernel for all
    parameters) when they are all on CUDA, plain tensors or FSDP2 DTensors (torch registers
    ``_fused_adamw_`` as a DTensor pointwise op); ``foreach=True`` on CUDA under DeepSpeed, whose ZeRO
    optimizers wrap this one and swap its parameters for flat partitions (on the CPU with offload); {} =
    torch's default elsewhere (CPU: the per-parameter loop)."""
    if device_types == {"cuda"}:
        return {"foreach": True} if deepspeed else {"fused": True}
    return {}


def newton_schulz(matrix: torch.Tensor, coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
                  steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """~U V^T of ``matrix`` = U S V^T (m, n), in bfloat16: X <- a X + (b X X^T + c (X X^T)^2) X, ``steps`` times,
    from X = matrix / ||matrix||_F (Frobenius >= spectral norm, so every singular value starts in [0, 1]).
    Jordan et al.'s coefficients push singular values to ~Uniform(0.5, 1.5), not exactly 1, which does not hurt
    training. Iterates on the wide orientation so the Gram matrix is (min(m, n), min(m, n))."""
    a, b, c = coefficients
    x = matrix.bfloat16()
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.T  # (m, m), m = min(rows, cols)
        poly = torch.addmm(gram, gram, gram, beta=b, alpha=c)  # b G + c G^2
        x = torch.addmm(x, poly, x, beta=a)  # a X + (b G + c G^2) X
    return x.T if tall else x


def orthogonalize(update: torch.Tensor, coefficients: tuple[float, float, float], steps: int,
                  eps: float) -> torch.Tensor:
    """``newton_schulz`` of the whole matrix, also when ``update`` is an FSDP2 DTensor sharded on dim 0 (or a
    hybrid (replicate, shard) mesh): gather it, orthogonalize, return a DTensor with ``update``'s placements."""
    from torch.distributed.tensor import DTensor, Replicate

    if not isinstance(update, DTensor):
        return newton_schulz(update, coefficients, steps, eps)
    full = newton_schulz(update.full_tensor(), coefficients, steps, eps)  # all-gather: (out, in) on every rank
    mesh = update.device_mesh
    replicated = DTensor.from_local(full, mesh, [Replicate()] * mesh.ndim, run_check=False)
    return replicated.redistribute(mesh, update.placements)  # Replicate -> Shard(0): each rank keeps its rows


def adjusted_lr(lr: float, adjust_lr_fn: str | None, shape: torch.Size) -> float:
    """Muon's per-matrix LR for a (A, B) = (out, in) matrix, as torch.optim.Muon: ``original`` (Jordan et al.)
    lr * sqrt(max(1, A / B)); ``match_rms_adamw`` (Liu et al. 2025, sec. 2.2) lr * 0.2 * sqrt(max(A, B)), which
    gives the update the RMS of a typical AdamW update (0.2-0.4), so AdamW's LR and weight decay carry over."""
    rows, cols = shape[:2]
    if adjust_lr_fn == "match_rms_adamw":
        return lr * 0.2 * max(rows, cols) ** 0.5
    return lr * max(1.0, rows / cols) ** 0.5


class Muon(torch.optim.Muon):
    """torch.optim.Muon's update (same hyperparameters, same state: ``momentum_buffer``), written per parameter
    so that FSDP2's sharded DTensor parameters are orthogonalized as whole matrices (``orthogonalize``)."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group)
        return loss

    def _update(self, p: torch.Tensor, group: dict) -> None:
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
        buf, momentum = state["momentum_buffer"], group["momentum"]
        buf.lerp_(p.grad, 1 - momentum)  # B_t = mu B_{t-1} + (1 - mu) g_t (sharded like p under FSDP2)
        update = p.grad.lerp(buf, momentum) if group["nesterov"] else buf  # Nesterov: (1 - mu) g_t + mu B_t
        ortho = orthogonalize(update, group["ns_coefficients"], group["ns_steps"], group["eps"])
        lr = float(group["lr"])
        p.mul_(1 - lr * group["weight_decay"])  # decoupled weight decay, on the unadjusted LR
        p.add_(ortho, alpha=-adjusted_lr(lr, group["adjust_lr_fn"], p.shape))


class MuonWithAdamW(torch.optim.Optimizer):
    """One optimizer over AdamW's groups then Muon's (in that order, so ``param_groups[0]["lr"]`` is still
    ``optim.lr``'s schedule). ``param_groups`` and ``state`` are shared with the two inner optimizers; the
    state_dict is torch's standard one (state keyed by index across the union of groups)."""

    def __init__(self, adamw: torch.optim.AdamW, muon: Muon) -> None:
        self.adamw, self.muon = adamw, muon
        self._adamw_groups = len(adamw.param_groups)
        super().__init__(adamw.param_groups + muon.param_groups, {})
        self._share()

    def _share(self) -> None:
        """Point the inner optimizers at this one's groups and state (``load_state_dict`` replaces both)."""
        self.adamw.param_groups = self.param_groups[:self._adamw_groups]
        self.muon.param_groups = self.param_groups[self._adamw_groups:]
        self.adamw.state = self.muon.state = self.state

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.adamw.step()
        self.muon.step()
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._share()


def build_optimizer(model: nn.Module, optim_config, device_types: set[str],
                    deepspeed: bool = False) -> torch.optim.Optimizer:
    """The optimizer ``optim_config`` (an ``OptimConfig``) names, over ``model``'s trainable parameters on
    ``device_types``; ``deepspeed``: DeepSpeed will wrap it (AdamW only)."""
    o = optim_config
    adamw_args = dict(lr=o.lr, betas=tuple(o.betas), eps=o.eps, **adamw_kernel(device_types, deepspeed))
    if o.name == "adamw":
        return torch.optim.AdamW(param_groups(model, o.weight_decay), **adamw_args)
    if o.name != "muon":
        raise ValueError(f"optim.name={o.name!r} is not one of adamw, muon; use optim=adamw or optim=muon.")
    if deepspeed:
        raise ValueError(f"optim=muon cannot run under DeepSpeed: {MUON_DEEPSPEED}; use strategy=fsdp or ddp.")
    hidden, rest = split_for_muon(model)
    adamw = torch.optim.AdamW(decay_groups([p for _, p in rest], o.weight_decay), **adamw_args)
    muon = Muon([p for _, p in hidden], lr=o.muon_lr or o.lr, weight_decay=o.weight_decay, momentum=o.muon_momentum,
                nesterov=o.muon_nesterov, ns_steps=o.muon_ns_steps, adjust_lr_fn=o.muon_adjust_lr)
    return MuonWithAdamW(adamw, muon)
