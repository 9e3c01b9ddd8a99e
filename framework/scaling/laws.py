"""Compute-optimal allocation: from a training budget C (FLOPs) to a model size N and a token count D.

Units: N in parameters (all of them, embeddings included, as Hoffmann et al. count them), D in training
tokens, C in FLOPs, losses in nats/token. One petaflop/s-day = 1e15 FLOP/s * 86,400 s = 8.64e19 FLOPs.

Three allocation rules:

- ``besiroglu2024`` (default): Besiroglu, Erdil, Barnett & You 2024, "Chinchilla Scaling: A replication
  attempt" (arXiv:2404.10102), Table 1: their refit of Hoffmann et al.'s approach 3 on data reconstructed
  from Hoffmann et al.'s Figure 4: E=1.8172, A=482.01, B=2085.43, alpha=0.3478, beta=0.3658.
- ``hoffmann2022``: Hoffmann et al. 2022, "Training Compute-Optimal Large Language Models"
  (arXiv:2203.15556), approach 3, eq. 2 and sec. 3.3: E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28.
- ``tokens_per_param``: the fixed "20 tokens per parameter" rule read off Hoffmann et al.'s Table 3
  (D = 20 N, so C = 6 N D = 120 N^2). It has no loss model of its own; ``predicted_loss`` falls back to
  the Besiroglu et al. law for it.

For the parametric laws L(N, D) = E + A / N^alpha + B / D^beta (Hoffmann et al. eq. 2) minimised under
C = 6 N D, the optimum is closed-form (Hoffmann et al. eq. 4):

    N_opt(C) = G (C/6)^a,    D_opt(C) = G^-1 (C/6)^b,
    G = (alpha A / (beta B))^(1/(alpha+beta)),   a = beta / (alpha+beta),   b = alpha / (alpha+beta).

E does not move the optimum. The laws were fitted on MassiveText with a 32k SentencePiece vocabulary; on
other data and tokenizers the constants differ (fit your own with ``recipes/isoflop.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from framework.catalogue import PF_DAY_FLOPS, pf_days  # 8.64e19 FLOPs in one petaflop/s-day

FLOPS_PER_PARAM_TOKEN = 6  # C = 6 N D (Kaplan et al. 2020 sec. 2.1; Hoffmann et al. eq. 4's constraint)


@dataclass(frozen=True)
class ParametricLaw:
    """L(N, D) = E + A / N^alpha + B / D^beta (Hoffmann et al. 2022 eq. 2); N params, D tokens, L nats/token."""

    name: str
    E: float
    A: float
    B: float
    alpha: float
    beta: float
    source: str

    def loss(self, n_params: float, n_tokens: float) -> float:
        return self.E + self.A / n_params**self.alpha + self.B / n_tokens**self.beta

    @property
    def G(self) -> float:
        return (self.alpha * self.A / (self.beta * self.B)) ** (1.0 / (self.alpha + self.beta))

    @property
    def a(self) -> float:  # N_opt grows as C^a
        return self.beta / (self.alpha + self.beta)

    @property
    def b(self) -> float:  # D_opt grows as C^b
        return self.alpha / (self.alpha + self.beta)

    def optimal_allocation(self, flops: float) -> tuple[float, float]:
        """(N_opt, D_opt) for a budget of ``flops`` FLOPs (Hoffmann et al. eq. 4)."""
        _check_budget(flops)
        return self.G * (flops / 6) ** self.a, (flops / 6) ** self.b / self.G

    def budget_for_params(self, n_params: float) -> float:
        """The budget C whose N_opt is ``n_params``: C = 6 (N / G)^(1/a) (eq. 4 inverted)."""
        return 6 * (n_params / self.G) ** (1.0 / self.a)

    def tokens_for_params(self, n_params: float) -> float:
        """D_opt for a model of ``n_params`` parameters trained compute-optimally."""
        return self.optimal_allocation(self.budget_for_params(n_params))[1]

    def equations(self) -> list[str]:
        return [
            f"L(N, D) = E + A/N^alpha + B/D^beta with E={self.E}, A={self.A}, B={self.B}, alpha={self.alpha}, "
            f"beta={self.beta} ({self.source})",
            "minimised under C = 6 N D (Hoffmann et al. 2022 eq. 4):",
            f"N_opt = G (C/6)^a, D_opt = G^-1 (C/6)^b, G = (alpha A / (beta B))^(1/(alpha+beta)) = {self.G:.6g}, "
            f"a = beta/(alpha+beta) = {self.a:.4f}, b = alpha/(alpha+beta) = {self.b:.4f}",
        ]


@dataclass(frozen=True)
class TokensPerParamRule:
    """D = r N with C = 6 N D, so N_opt = sqrt(C / (6 r)) and D_opt = r N_opt (Hoffmann et al. Table 3, r = 20)."""

    name: str
    tokens_per_param: float
    source: str
    loss_law: ParametricLaw  # the rule has no loss model; losses are predicted with this law

    def loss(self, n_params: float, n_tokens: float) -> float:
        return self.loss_law.loss(n_params, n_tokens)

    def optimal_allocation(self, flops: float) -> tuple[float, float]:
        _check_budget(flops)
        n = math.sqrt(flops / (FLOPS_PER_PARAM_TOKEN * self.tokens_per_param))
        return n, self.tokens_per_param * n

    def budget_for_params(self, n_params: float) -> float:
        return FLOPS_PER_PARAM_TOKEN * self.tokens_per_param * n_params**2

    def tokens_for_params(self, n_params: float) -> float:
        return self.tokens_per_param * n_params

    def equations(self) -> list[str]:
        r = self.tokens_per_param
        return [
            f"D = {r:g} N ({self.source}); C = 6 N D = {6 * r:g} N^2",
            f"N_opt = sqrt(C / {6 * r:g}), D_opt = {r:g} N_opt",
            f"predicted loss from {self.loss_law.name}: " + self.loss_law.equations()[0],
        ]


BESIROGLU_2024 = ParametricLaw(
    "besiroglu2024", E=1.8172, A=482.01, B=2085.43, alpha=0.3478, beta=0.3658,
    source="Besiroglu et al. 2024, 'Chinchilla Scaling: A replication attempt', arXiv:2404.10102, Table 1",
)
HOFFMANN_2022 = ParametricLaw(
    "hoffmann2022", E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28,
    source="Hoffmann et al. 2022, 'Training Compute-Optimal Large Language Models', arXiv:2203.15556, approach 3, "
           "sec. 3.3",
)
TOKENS_PER_PARAM_20 = TokensPerParamRule(
    "tokens_per_param", tokens_per_param=20.0,
    source="the 20-tokens-per-parameter rule of Hoffmann et al. 2022, Table 3", loss_law=BESIROGLU_2024,
)

LAWS = {law.name: law for law in (BESIROGLU_2024, HOFFMANN_2022, TOKENS_PER_PARAM_20)}
DEFAULT_LAW = BESIROGLU_2024.name


def get_law(name: str) -> ParametricLaw | TokensPerParamRule:
    """A law by name, or one fitted by ``recipes/isoflop.py`` from the path of its ``fit.json``."""
    if name.endswith(".json"):
        return load_fitted_law(name)
    if name not in LAWS:
        raise ValueError(f"unknown scaling law {name!r}; pick one of: {', '.join(LAWS)}, or the path of a fit.json "
                         "written by recipes/isoflop.py.")
    return LAWS[name]


def load_fitted_law(path: str) -> ParametricLaw:
    import json
    from pathlib import Path

    f = Path(path)
    if not f.is_file():
        raise ValueError(f"no fitted law at {path}; run `python3 -m recipes.isoflop` first or pick a named law.")
    try:
        c = json.loads(f.read_text())["law"]
        return ParametricLaw(f.stem, E=float(c["E"]), A=float(c["A"]), B=float(c["B"]), alpha=float(c["alpha"]),
                             beta=float(c["beta"]), source=f"fitted by recipes/isoflop.py ({path})")
    except (KeyError, TypeError, ValueError, json.JSONDecodeError):
        raise ValueError(f"{path} is not a fit.json from recipes/isoflop.py (it needs law.E, A, B, alpha, beta).") from None


def pf_days_to_flops(pf_days: float) -> float:
    return pf_days * PF_DAY_FLOPS


flops_to_pf_days = pf_days  # framework.catalogue.pf_days


def _check_budget(flops: float) -> None:
    if not (isinstance(flops, (int, float)) and math.isfinite(flops) and flops > 0):
        raise ValueError(f"the compute budget must be a positive number of FLOPs, got {flops!r}.")
