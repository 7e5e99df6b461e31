"""Pure loss functions for training students from cached teacher logits.

Every function takes logits as tensors and returns a scalar tensor; nothing here keeps
state or touches I/O. Shapes: ``B`` = batch size, ``C`` = number of classes. Losses are
in nats (natural log), averaged over the batch unless a docstring says otherwise.

Contents:

* :func:`hard_label_loss` - CE or BCE on (already mixed and smoothed) target probabilities.
* :func:`kd_loss` - vanilla KD (Hinton et al.), KL(teacher || student) x T^2, identical to
  the kd term of timm's ``LogitDistillationTask``; temperatures may be per sample and are
  differentiable (MKD learns them).
* :func:`dkd_loss` - Decoupled KD (Zhao et al., CVPR 2022), alpha TCKD + beta NCKD.
* :func:`dist_loss` - DIST (Huang et al., NeurIPS 2022), inter/intra-class Pearson relations.
* :func:`temperature_from_log` - positive temperature from an unconstrained parameter (MKD).
* :class:`LossConfig` / :func:`distill_loss` - the weighted total the training loop uses
  (:func:`distill_term`: its distillation term alone, for one term per teacher).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "HARD_KINDS",
    "KINDS",
    "TOKEN_KINDS",
    "LossConfig",
    "distill_loss",
    "distill_term",
    "dist_loss",
    "dkd_loss",
    "dkd_warmup_factor",
    "hard_label_loss",
    "kd_loss",
    "kd_per_sample",
    "temperature_from_log",
]

HARD_KINDS = ("ce", "bce")
KINDS = ("kd", "dkd", "dist", "projector", "deit-hard", "deit-soft", "none")
#: Kinds distilled through a distillation token (timm's deit_*_distilled_* students): trainer/token.py.
TOKEN_KINDS = ("deit-hard", "deit-soft")

# DIST's Pearson correlation: eps added to the product of norms (as in the authors' code),
# so a constant row/column (zero variance) gives correlation 0 instead of NaN.
_PEARSON_EPS = 1e-8


def _check_logits(student_logits: Tensor, teacher_logits: Tensor) -> None:
    if student_logits.ndim != 2 or student_logits.shape != teacher_logits.shape:
        raise ValueError(
            "expected student and teacher logits of the same shape (B, C), got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )


def _as_temperature(temperature: float | Tensor, like: Tensor) -> Tensor:
    """Temperature as a tensor that broadcasts against (B, C) logits.

    A scalar stays 0-d; a per-sample temperature of shape (B,) or (B, 1) becomes (B, 1).
    Tensors are not detached, so gradients flow back to learnable temperatures (MKD).
    """
    t = torch.as_tensor(temperature, dtype=like.dtype, device=like.device)
    if t.ndim == 0:
        return t
    if t.numel() not in (1, like.shape[0]):
        raise ValueError(
            f"temperature must be a scalar or have B={like.shape[0]} elements, got shape {tuple(t.shape)}"
        )
    return t.reshape(-1, 1)


def _row_scale(scale: Tensor) -> Tensor:
    """(B, 1) or 0-d temperature product -> something that broadcasts against a (B,) loss."""
    return scale if scale.ndim == 0 else scale.reshape(-1)


def hard_label_loss(student_logits: Tensor, target: Tensor, *, kind: str = "ce") -> Tensor:
    """Supervised loss on target probabilities.

    Args:
        student_logits: (B, C) student logits.
        target: (B, C) target probabilities, already mixed (mixup/cutmix) and label-smoothed
            upstream (``timm.data.mixup.mixup_target``). Rows sum to 1 for ``"ce"``; for
            ``"bce"`` each entry is an independent binary target in [0, 1].
        kind: ``"ce"`` - soft-target cross entropy, mean over B of ``-sum_c target * log_softmax``
            (timm's ``SoftTargetCrossEntropy``); ``"bce"`` - binary cross entropy with logits,
            mean over B and C (timm's ``BinaryCrossEntropy`` on dense targets, which applies
            no further smoothing to them).

    Returns:
        Scalar loss in nats.
    """
    if student_logits.ndim != 2 or target.shape != student_logits.shape:
        raise ValueError(
            f"expected logits and target of the same shape (B, C), got "
            f"{tuple(student_logits.shape)} and {tuple(target.shape)}"
        )
    target = target.to(student_logits.dtype)
    if kind == "ce":
        return -(target * F.log_softmax(student_logits, dim=-1)).sum(dim=-1).mean()
    if kind == "bce":
        return F.binary_cross_entropy_with_logits(student_logits, target, reduction="mean")
    raise ValueError(f"unknown hard-label loss kind {kind!r}; expected one of {HARD_KINDS}")


def kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float | Tensor = 1.0,
    *,
    student_temperature: float | Tensor | None = None,
) -> Tensor:
    """Vanilla KD: ``T * Ts * KL(softmax(t / T) || softmax(s / Ts))``, batch mean.

    With ``student_temperature=None`` (Ts = T) this is exactly the kd term of timm's
    ``LogitDistillationTask``: ``kl_div(log_softmax(s/T), log_softmax(t/T),
    reduction="batchmean", log_target=True) * T**2``. The T^2 factor keeps the gradient
    magnitude w.r.t. the student logits independent of T (Hinton et al., 2015).

    Args:
        student_logits: (B, C) student logits.
        teacher_logits: (B, C) teacher logits (finite; may be large - everything goes
            through log_softmax).
        temperature: teacher temperature T > 0; a float, a 0-d tensor, or a per-sample
            tensor of shape (B,) or (B, 1). Differentiable when a tensor requiring grad.
        student_temperature: student temperature Ts (same forms); None means Ts = T.

    Returns:
        Scalar loss in nats: mean over B of ``T * Ts * sum_c p_t (log p_t - log p_s)``.
    """
    return kd_per_sample(student_logits, teacher_logits, temperature, student_temperature=student_temperature).mean()


def kd_per_sample(student_logits: Tensor, teacher_logits: Tensor, temperature: float | Tensor = 1.0, *,
                  student_temperature: float | Tensor | None = None) -> Tensor:
    """:func:`kd_loss` per sample: (B,) ``T * Ts * KL(softmax(t / T) || softmax(s / Ts))`` in nats."""
    _check_logits(student_logits, teacher_logits)
    t = _as_temperature(temperature, student_logits)
    ts = t if student_temperature is None else _as_temperature(student_temperature, student_logits)
    log_p_s = F.log_softmax(student_logits / ts, dim=-1)
    log_p_t = F.log_softmax(teacher_logits / t, dim=-1)
    # log_target: exp(log_p_t) * (log_p_t - log_p_s) is exact even where p_t underflows to 0.
    kl = F.kl_div(log_p_s, log_p_t, reduction="none", log_target=True).sum(dim=-1)  # (B,)
    return kl * _row_scale(t * ts)


def dkd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target_class: Tensor,
    *,
    alpha: float = 1.0,
    beta: float = 1.0,
    temperature: float | Tensor = 1.0,
) -> Tensor:
    """Decoupled KD (Zhao et al., CVPR 2022): ``T^2 (alpha TCKD + beta NCKD)``, batch mean.

    * TCKD - KL between the teacher's and student's binary distributions
      (p_target, 1 - p_target).
    * NCKD - KL between the distributions over the non-target classes alone (softmax with
      the target class removed).

    Classic KD decomposes as ``KL = TCKD + (1 - p_target^teacher) NCKD`` per sample; DKD
    drops the teacher-confidence weight on NCKD. Defaults alpha = beta = 1, T = 1 sit in the
    paper's ImageNet range (alpha 1, beta 0.5-2, T 1). The warm-up factor
    ``min(epoch / warmup, 1)`` is the caller's job (:func:`dkd_warmup_factor`).

    Args:
        student_logits: (B, C) student logits, C >= 2.
        teacher_logits: (B, C) teacher logits.
        target_class: (B,) int64 target class per sample. For mixed (mixup/cutmix) targets
            :func:`distill_loss` passes the argmax of the mixed target, i.e. the dominant
            class of the pair (the first one on an exact 50/50 tie).
        alpha: weight of TCKD.
        beta: weight of NCKD.
        temperature: T > 0; float, 0-d tensor, or per-sample (B,) / (B, 1) tensor.

    Returns:
        Scalar loss in nats.
    """
    _check_logits(student_logits, teacher_logits)
    if target_class.shape != student_logits.shape[:1]:
        raise ValueError(
            f"target_class must have shape (B,) = ({student_logits.shape[0]},), got {tuple(target_class.shape)}"
        )
    t = _as_temperature(temperature, student_logits)
    gt = F.one_hot(target_class.long(), student_logits.shape[1]).bool()  # (B, C)
    zs = student_logits / t
    zt = teacher_logits / t

    # Binary (target, rest) distributions in log space: log(1 - p) as a logsumexp over the
    # other classes, which stays accurate when p_target -> 1 (unlike log1p(-p)).
    log_p_s = F.log_softmax(zs, dim=-1)
    log_p_t = F.log_softmax(zt, dim=-1)
    ninf = float("-inf")
    idx = target_class.long().unsqueeze(-1)  # (B, 1)
    log_b_s = torch.cat([log_p_s.gather(-1, idx), log_p_s.masked_fill(gt, ninf).logsumexp(-1, keepdim=True)], -1)
    log_b_t = torch.cat([log_p_t.gather(-1, idx), log_p_t.masked_fill(gt, ninf).logsumexp(-1, keepdim=True)], -1)
    # log_b_*: (B, 2) = log (p_target, 1 - p_target)
    tckd = F.kl_div(log_b_s, log_b_t, reduction="none", log_target=True).sum(dim=-1)  # (B,)

    # Non-target distributions: remove the target with -inf before the softmax, then put 0
    # back in its log-prob slot so that the target term is 0 * (0 - 0) = 0 rather than NaN
    # (masked_fill passes no gradient through the filled slot).
    log_q_s = F.log_softmax(zs.masked_fill(gt, ninf), dim=-1).masked_fill(gt, 0.0)
    log_q_t = F.log_softmax(zt.masked_fill(gt, ninf), dim=-1).masked_fill(gt, 0.0)
    q_t = log_q_t.exp().masked_fill(gt, 0.0)
    nckd = (q_t * (log_q_t - log_q_s)).sum(dim=-1)  # (B,)

    return ((alpha * tckd + beta * nckd) * _row_scale(t * t)).mean()


def dkd_warmup_factor(epoch: float, warmup_epochs: float) -> float:
    """DKD's linear warm-up of the distillation term: ``min(epoch / warmup_epochs, 1)``.

    ``epoch`` may be fractional (epoch + step / steps_per_epoch). ``warmup_epochs <= 0``
    means no warm-up (factor 1).
    """
    if warmup_epochs <= 0:
        return 1.0
    return float(min(max(epoch, 0.0) / warmup_epochs, 1.0))


def _pearson_rows(a: Tensor, b: Tensor) -> Tensor:
    """(N, M), (N, M) -> (N,) Pearson correlation of each row pair (eps-stabilised)."""
    a = a - a.mean(dim=-1, keepdim=True)
    b = b - b.mean(dim=-1, keepdim=True)
    return (a * b).sum(dim=-1) / (a.norm(dim=-1) * b.norm(dim=-1) + _PEARSON_EPS)


def dist_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    beta: float = 1.0,
    gamma: float = 1.0,
    temperature: float = 1.0,
) -> Tensor:
    """DIST (Huang et al., NeurIPS 2022): ``tau^2 (beta L_inter + gamma L_intra)``.

    With p = softmax(z / tau) for student and teacher (B, C):

    * ``L_inter = 1 - mean_b pearson(p_s[b, :], p_t[b, :])`` (correlation across classes);
    * ``L_intra = 1 - mean_c pearson(p_s[:, c], p_t[:, c])`` (correlation across the batch).

    Pearson is ``<a - mean a, b - mean b> / (|a - mean a| |b - mean b| + 1e-8)`` as in the
    authors' code. With B = 1 every column is constant, so L_intra is the constant 1 (no
    gradient). The paper's ImageNet setting is beta = gamma = tau = 1 with total
    ``CE + 2 L_DIST``.

    Args:
        student_logits: (B, C) student logits.
        teacher_logits: (B, C) teacher logits.
        beta: weight of the inter-class relation.
        gamma: weight of the intra-class relation.
        temperature: tau > 0 (scalar).

    Returns:
        Scalar, dimensionless (1 - correlation, in [0, 2] before the tau^2 and weights).
    """
    _check_logits(student_logits, teacher_logits)
    p_s = F.softmax(student_logits / temperature, dim=-1)
    p_t = F.softmax(teacher_logits / temperature, dim=-1)
    inter = 1.0 - _pearson_rows(p_s, p_t).mean()
    intra = 1.0 - _pearson_rows(p_s.t(), p_t.t()).mean()
    return temperature**2 * (beta * inter + gamma * intra)


def temperature_from_log(log_t: Tensor) -> Tensor:
    """Temperature ``exp(log_t)``: a positive T from an unconstrained (learnable) log T.

    Used by MKD, whose temperatures are meta-parameters; same shape as ``log_t``.
    """
    return log_t.exp()


@dataclass
class LossConfig:
    """How the training loop combines the hard-label loss and the distillation term.

    ``total = hard_weight * hard + kd_weight * w * distill`` where ``w`` is DKD's warm-up
    factor (1 for the other kinds).

    Attributes:
        kind: distillation term: ``"kd"`` (vanilla KD), ``"dkd"``, ``"dist"``, ``"projector"``
            (vanilla KD plus ``feature_weight`` x the projector feature distance, added by the
            training step: trainer/projector.py), or ``"none"`` (plain supervised training).
        temperature: T for kd / dkd, tau for dist.
        kd_weight: weight of the distillation term. The DIST paper uses 2.0
            (``CE + 2 L_DIST``); VanillaKD and DKD use 1.0.
        hard_weight: weight of the hard-label loss.
        hard_kind: ``"ce"`` or ``"bce"`` (see :func:`hard_label_loss`; VanillaKD uses BCE).
        dkd_alpha, dkd_beta: DKD weights of TCKD and NCKD.
        dkd_warmup_epochs: DKD linear warm-up length in epochs (0 = none).
        dist_beta, dist_gamma: DIST weights of the inter- and intra-class relations.
        feature_weight: projector: weight of the feature distance.
    """

    kind: str = "kd"
    temperature: float = 1.0
    kd_weight: float = 1.0
    hard_weight: float = 1.0
    hard_kind: str = "ce"
    dkd_alpha: float = 1.0
    dkd_beta: float = 1.0
    dkd_warmup_epochs: float = 0.0
    dist_beta: float = 1.0
    dist_gamma: float = 1.0
    feature_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown distillation kind {self.kind!r}; expected one of {KINDS}")
        if self.hard_kind not in HARD_KINDS:
            raise ValueError(f"unknown hard-label loss kind {self.hard_kind!r}; expected one of {HARD_KINDS}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")


def distill_loss(
    cfg: LossConfig,
    student_logits: Tensor,
    teacher_logits: Tensor | None,
    target: Tensor,
    *,
    epoch: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Training loss for one batch.

    Args:
        cfg: loss configuration.
        student_logits: (B, C) student logits.
        teacher_logits: (B, C) teacher logits (decoded from the cache), or None when
            ``cfg.kind == "none"``.
        target: (B, C) mixed and smoothed target probabilities. DKD takes its target class
            as ``target.argmax(-1)``.
        epoch: (fractional) epoch, for DKD's warm-up.

    Returns:
        ``(total, parts)``: the scalar total ``hard_weight * hard + kd_weight * w * distill``
        and ``parts = {"hard": hard, "kd": distill}``, the unweighted terms (still attached
        to the graph; ``"kd"`` is 0 for kind ``"none"``).
    """
    if cfg.kind in TOKEN_KINDS:
        raise ValueError(f"{cfg.kind} distils through a distillation head: use trainer.token.token_distill_loss")
    hard = hard_label_loss(student_logits, target, kind=cfg.hard_kind)
    if cfg.kind == "none":
        zero = student_logits.new_zeros(())
        return cfg.hard_weight * hard, {"hard": hard, "kd": zero}
    if teacher_logits is None:
        raise ValueError(f"distillation kind {cfg.kind!r} needs teacher logits, got None")
    term, factor = distill_term(cfg, student_logits, teacher_logits, target, epoch=epoch)
    total = cfg.hard_weight * hard + (cfg.kd_weight * factor) * term
    return total, {"hard": hard, "kd": term}


def distill_term(cfg: LossConfig, student_logits: Tensor, teacher_logits: Tensor, target: Tensor, *,
                 epoch: float = 0.0, temperature: float | None = None) -> tuple[Tensor, float]:
    """The distillation term of :func:`distill_loss` (scalar, unweighted) and its warm-up factor
    (DKD's; 1 otherwise), at ``temperature`` (None: ``cfg.temperature``)."""
    t = cfg.temperature if temperature is None else temperature
    # Cached logits may be stored in half precision; compute in the student's dtype.
    teacher_logits = teacher_logits.to(student_logits.dtype)
    if cfg.kind in ("kd", "projector"):
        return kd_loss(student_logits, teacher_logits, t), 1.0
    if cfg.kind == "dkd":
        term = dkd_loss(student_logits, teacher_logits, target.argmax(dim=-1), alpha=cfg.dkd_alpha,
                        beta=cfg.dkd_beta, temperature=t)
        return term, dkd_warmup_factor(epoch, cfg.dkd_warmup_epochs)
    if cfg.kind == "dist":
        return dist_loss(student_logits, teacher_logits, beta=cfg.dist_beta, gamma=cfg.dist_gamma, temperature=t), 1.0
    # unreachable after __post_init__, unless cfg was mutated
    raise ValueError(f"unknown distillation kind {cfg.kind!r}; expected one of {KINDS}")
