"""MKD - Meta Knowledge Distillation (Liu et al., 2022): learnable KD temperatures.

The teacher temperature ``T_t`` and the student temperature ``T_s`` of the KD term are
meta-parameters, kept positive through log parameters. Every ``meta_every`` student steps a
meta step updates them:

1. **look-ahead** - pre-update a functional copy of the student's weights with one SGD step
   on the training loss at the current temperatures::

       theta' = theta - inner_lr * grad_theta L(theta; T_t, T_s),
       L = hard_weight * hard + kd_weight * kd_loss(s, t, T_t, student_temperature=T_s)

   (the gradient is taken with ``create_graph=True``, so ``theta'`` is a differentiable
   function of the temperatures);
2. **meta objective** - cross entropy of the pre-updated student (run through
   ``torch.func.functional_call(model, (theta', buffers), x_meta)``) on a held-out meta
   batch with integer labels. The meta batch must come from a held-out split of the
   *training* data (the trainer's ``logitcache.trainer.data.meta_split``), never from validation;
3. back-propagate the meta loss to the temperature parameters (second order, through the
   look-ahead) and take an Adam step on them (``meta_lr``).

The student's own step (the trainer's job) then uses the current temperatures, detached
(:meth:`MetaTemperatureLearner.kd_temperatures` and :func:`mkd_loss`). Typical use::

    mkd = MetaTemperatureLearner(MKDConfig(), num_classes, device)
    for step, batch in enumerate(loader):
        if mkd.should_step(step):
            x_meta, y_meta = next(meta_batches)            # from the meta split of TRAIN
            stats = mkd.meta_step(model, x, teacher_logits, target, x_meta, y_meta,
                                  student_lr=optimizer.param_groups[0]["lr"], loss_cfg=cfg.loss)
        logits = model(x)
        t_t, t_s = mkd.kd_temperatures(logits, teacher_logits)
        loss, parts = mkd_loss(cfg.loss, logits, teacher_logits, target, t_t, t_s)
        ...

Choices:

* **Buffers / BatchNorm**: the look-ahead and meta forwards run in the model's current mode
  (train mode: BatchNorm normalises with batch statistics, exactly as in the student's own
  step; dropout / drop-path active) on *clones* of every buffer. BatchNorm's in-place
  running-stat updates (``running_mean``, ``running_var``, ``num_batches_tracked``) land on
  the clones, which are thrown away, so the real model's buffers are untouched. The real
  parameters are only read; their ``.grad`` is not touched (gradients are taken with
  ``torch.autograd.grad``). Dropout / drop-path do draw from the global RNG.
  ``SyncBatchNorm`` is untested here.
* **Look-ahead optimiser**: plain SGD without weight decay, step ``cfg.inner_lr`` or, when
  None, the student's current lr. The temperatures are updated with Adam, which normalises
  the meta-gradient's scale, so a small SGD step (e.g. an AdamW-sized lr) is fine.
* **Attention**: the look-ahead forward runs with the math SDPA kernel, the only one with
  a double backward (the default flash kernel has none, on CPU as well as CUDA).
* **Clamping**: the temperatures stay in ``[min_temperature, max_temperature]``; see
  :mod:`logitcache.trainer.temperatures`.
* **Distributed**: pass the unwrapped model (DDP and torch.compile wrappers are unwrapped
  automatically, with timm's ``unwrap_model``); when ``torch.distributed`` is initialised
  the temperature gradients are averaged over ranks, so every rank keeps identical
  temperatures.
"""

from __future__ import annotations

from dataclasses import asdict

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.utils import unwrap_model
from torch import Tensor

from logitcache.replay.teachers import mix_weights

from .config import MKDConfig
from .losses import LossConfig, hard_label_loss, kd_loss
from .temperatures import Temperatures

__all__ = [
    "MetaTemperatureLearner",
    "mkd_loss",
]


def mkd_loss(
    cfg: LossConfig,
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor,
    t_teacher: float | Tensor | list,
    t_student: float | Tensor | list,
    weights: list[float] | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The KD training loss with explicit temperatures.

    ``total = hard_weight * hard + kd_weight * kd_loss(s, t, T_t, student_temperature=T_s)``,
    i.e. :func:`logitcache.trainer.losses.distill_loss` of kind ``"kd"`` with separate, possibly
    per-sample and differentiable, temperatures. MKD always uses the KD term:
    ``cfg.kind`` and ``cfg.temperature`` are ignored; ``hard_kind``, ``hard_weight`` and
    ``kd_weight`` are used.

    Args:
        cfg: loss configuration.
        student_logits: (B, C).
        teacher_logits: (B, C) (any float dtype; cast to the student's).
        target: (B, C) mixed / smoothed target probabilities.
        t_teacher, t_student: float, 0-d or (B,) tensors.
        Several teachers (trainer/ensemble.py's per-teacher mode): ``teacher_logits``,
        ``t_teacher`` and ``t_student`` are lists, one per teacher, and the KD term is
        ``sum_i weights[i] kd_loss(s, t_i, T_t_i, student_temperature=T_s_i)``.

    Returns:
        ``(total, {"hard": hard, "kd": kd})`` like ``distill_loss``.
    """
    hard = hard_label_loss(student_logits, target, kind=cfg.hard_kind)
    if isinstance(teacher_logits, list):
        kd = sum(w * kd_loss(student_logits, z.to(student_logits.dtype), tt, student_temperature=ts)
                 for z, tt, ts, w in zip(teacher_logits, t_teacher, t_student, weights))
    else:
        kd = kd_loss(student_logits, teacher_logits.to(student_logits.dtype), t_teacher, student_temperature=t_student)
    return cfg.hard_weight * hard + cfg.kd_weight * kd, {"hard": hard, "kd": kd}


def _math_sdpa():
    """Context manager forcing the math SDPA kernel (double-backward capable)."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel(SDPBackend.MATH)
    except ImportError:  # pragma: no cover - old torch
        import contextlib

        return contextlib.nullcontext()


class MetaTemperatureLearner:
    """Owns the learnable temperatures and their Adam optimiser; performs MKD meta steps.

    Args:
        cfg: MKD configuration.
        num_classes: C (>= 2); logits passed in must have C columns.
        device: where the temperature parameters live (the student's device).
        dtype: dtype of the temperature parameters (float32; float64 for gradient checks).
        teachers: K teachers' caches distilled per teacher (trainer/ensemble.py): a pair of
            temperatures per teacher, meta-learned together; ``teacher_weights`` their fixed
            mix (None: equal). Teacher logits are then lists of K (B, C) tensors.

    Attributes:
        temperatures: the :class:`Temperatures` module.
        optimizer: ``torch.optim.Adam`` over its parameters.
        num_meta_steps: meta steps taken so far (checkpointed).
    """

    def __init__(self, cfg: MKDConfig, num_classes: int, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, teachers: int = 1, teacher_weights: list[float] | None = None):
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        self.cfg = cfg
        self.num_classes = num_classes
        self.temperatures = Temperatures(cfg).to(device=device, dtype=dtype)  # teacher 0's (the only one's)
        self.extra = nn.ModuleList([Temperatures(cfg) for _ in range(teachers - 1)]).to(device=device, dtype=dtype)
        self.weights = mix_weights(teacher_weights, teachers)
        self.optimizer = torch.optim.Adam([p for temps in self._all for p in temps.parameters()], lr=cfg.meta_lr)
        self.num_meta_steps = 0
        self._last = {"t_teacher": cfg.init_teacher_temperature, "t_student": cfg.init_student_temperature}

    # ----------------------------------------------------------------- student side
    @torch.no_grad()
    def kd_temperatures(self, student_logits: Tensor, teacher_logits: Tensor) -> tuple[Tensor, Tensor]:
        """Current ``(T_t, T_s)`` for the student's own step, detached.

        Args:
            student_logits: (B, C) (only read by the predictor).
            teacher_logits: (B, C).

        Returns:
            0-d tensors (scalar mode) or (B,) tensors (predictor), in the student logits'
            dtype and device.
        """
        t_t, t_s = self._temperatures(student_logits, teacher_logits)
        self._last = self.logged(t_t, t_s)  # no device sync here
        return t_t, t_s

    def _temperatures(self, student_logits: Tensor, teacher_logits: Tensor | list[Tensor]):
        """(T_t, T_s) for these logits in their dtype and device; lists of K with K teachers."""
        like = student_logits
        pairs = []
        for temps, z in zip(self._all, self._teachers(teacher_logits)):
            self._check(student_logits, z)
            t_t, t_s = temps(student_logits, z)
            pairs.append((t_t.to(like.device, like.dtype), t_s.to(like.device, like.dtype)))
        if not isinstance(teacher_logits, list):
            return pairs[0]
        return [t for t, _ in pairs], [t for _, t in pairs]

    @property
    def _all(self) -> list[Temperatures]:
        """Every teacher's temperatures, teacher 0's first."""
        return [self.temperatures, *self.extra]

    def _teachers(self, teacher_logits: Tensor | list[Tensor]) -> list[Tensor]:
        many = teacher_logits if isinstance(teacher_logits, list) else [teacher_logits]
        if len(many) != 1 + len(self.extra):
            raise ValueError(f"{len(many)} teachers' logits for temperatures of {1 + len(self.extra)} teachers")
        return many

    def logged(self, t_t, t_s) -> dict[str, Tensor]:
        """The batch-mean temperatures as logged: ``t_teacher``, ``t_student`` (teacher 0's) and
        ``t_teacher_<i>``, ``t_student_<i>`` for teachers i >= 1 (:meth:`logged_keys`)."""
        pairs = zip(t_t, t_s) if isinstance(t_t, list) else [(t_t, t_s)]
        return {k: v.mean() for i, (a, b) in enumerate(pairs)
                for k, v in ((_key("t_teacher", i), a), (_key("t_student", i), b))}

    def logged_keys(self) -> list[str]:
        return [_key(name, i) for i in range(1 + len(self.extra)) for name in ("t_teacher", "t_student")]

    @torch.no_grad()
    def current(self) -> dict[str, float]:
        """``{"t_teacher", "t_student"}`` for logging: the current scalar temperatures, or
        (predictor) the batch means of the last :meth:`kd_temperatures` call."""
        if not self.cfg.predictor:
            return {k: float(v) for i, temps in enumerate(self._all)
                    for k, v in zip((_key("t_teacher", i), _key("t_student", i)), temps())}
        return {k: float(v) for k, v in self._last.items()}

    def should_step(self, step: int) -> bool:
        """True when a meta step is due at student step ``step`` (0, meta_every, 2 meta_every, ...)."""
        return self.cfg.meta_every > 0 and step % self.cfg.meta_every == 0

    # -------------------------------------------------------------------- meta side
    def meta_loss(
        self,
        model: nn.Module,
        x: Tensor,
        teacher_logits: Tensor,
        target_probs: Tensor,
        x_meta: Tensor,
        y_meta: Tensor,
        *,
        student_lr: float | None = None,
        loss_cfg: LossConfig,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The meta objective as a differentiable function of the temperature parameters.

        Args:
            model: the student (its parameters and buffers are read, never modified).
            x: (B, ...) training inputs of the current step.
            teacher_logits: (B, C) teacher logits for ``x``.
            target_probs: (B, C) target probabilities for ``x`` (hard-label term).
            x_meta: (M, ...) meta inputs from the meta split of the training data.
            y_meta: (M,) int64 meta labels.
            student_lr: the student's current lr, used as the look-ahead SGD step when
                ``cfg.inner_lr`` is None (``cfg.inner_lr``, when set, takes precedence).
            loss_cfg: the trainer's loss configuration (see :func:`mkd_loss`).

        Returns:
            ``(meta_loss, T_t, T_s)``: the 0-d meta CE (attached to the temperature
            parameters' graph) and the temperatures used in the look-ahead (0-d or (B,)).
        """
        step = self.cfg.inner_lr if self.cfg.inner_lr is not None else student_lr
        if step is None or not step > 0:
            raise ValueError("need a positive look-ahead step: set MKDConfig.inner_lr or pass student_lr")
        if y_meta.ndim != 1 or y_meta.shape[0] != x_meta.shape[0]:
            raise ValueError(f"y_meta must be (M,) integer labels for M={x_meta.shape[0]}, got {tuple(y_meta.shape)}")
        model = unwrap_model(model)
        named = dict(model.named_parameters())
        trainable = {n: p for n, p in named.items() if p.requires_grad}
        frozen = {n: p.detach() for n, p in named.items() if not p.requires_grad}
        # Clones: in-place running-stat updates (BatchNorm in train mode) hit these, not the model.
        buffers = {n: b.detach().clone() for n, b in model.named_buffers()}

        with _math_sdpa():
            logits = torch.func.functional_call(model, ({**trainable, **frozen}, buffers), (x,))
        t_t, t_s = self._temperatures(logits, teacher_logits)
        loss, _ = mkd_loss(loss_cfg, logits, teacher_logits, target_probs, t_t, t_s, self.weights)
        grads = torch.autograd.grad(loss, list(trainable.values()), create_graph=True, allow_unused=True)
        updated = {
            n: p if g is None else p - step * g for (n, p), g in zip(trainable.items(), grads)
        }
        meta_logits = torch.func.functional_call(model, ({**updated, **frozen}, buffers), (x_meta,))
        meta = F.cross_entropy(meta_logits, y_meta.to(meta_logits.device).long())
        return meta, t_t, t_s

    def meta_step(
        self,
        model: nn.Module,
        x: Tensor,
        teacher_logits: Tensor,
        target_probs: Tensor,
        x_meta: Tensor,
        y_meta: Tensor,
        *,
        student_lr: float | None = None,
        loss_cfg: LossConfig,
    ) -> dict[str, float]:
        """One MKD meta step: look-ahead, meta CE, Adam step on the temperatures.

        Arguments as in :meth:`meta_loss`. Only the temperature parameters change; their
        ``.grad`` is left holding this step's meta-gradient (averaged over ranks when
        distributed). The model's parameters, their ``.grad`` and its buffers are untouched.

        Returns:
            ``{"meta_loss", "t_teacher", "t_student"}``: the meta CE and the (batch-mean)
            temperatures used in the look-ahead, i.e. before this update.
        """
        params = [p for temps in self._all for p in temps.parameters() if p.requires_grad]
        meta, t_t, t_s = self.meta_loss(model, x, teacher_logits, target_probs, x_meta, y_meta,
                                        student_lr=student_lr, loss_cfg=loss_cfg)
        grads = torch.autograd.grad(meta, params, allow_unused=True)
        for p, g in zip(params, grads):
            p.grad = torch.zeros_like(p) if g is None else g.detach()
        meta_value = meta.detach()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            world = torch.distributed.get_world_size()
            if world > 1:
                for p in params:
                    torch.distributed.all_reduce(p.grad)
                    p.grad.div_(world)
                meta_value = meta_value.clone()
                torch.distributed.all_reduce(meta_value)
                meta_value.div_(world)
        self.optimizer.step()
        for temps in self._all:
            temps.project_()
        self.num_meta_steps += 1
        return {"meta_loss": float(meta_value), **{k: float(v.detach()) for k, v in self.logged(t_t, t_s).items()}}

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """Temperatures, Adam state, step count and the config (for checking on load)."""
        return {
            "temperatures": self.temperatures.state_dict(),
            **({"extra_temperatures": [m.state_dict() for m in self.extra]} if len(self.extra) else {}),
            "optimizer": self.optimizer.state_dict(),
            "num_meta_steps": self.num_meta_steps,
            "config": asdict(self.cfg),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore from :meth:`state_dict`; the predictor setting must match."""
        saved = state.get("config", {})
        if "predictor" in saved and bool(saved["predictor"]) != self.cfg.predictor:
            raise ValueError(
                f"checkpoint has predictor={saved['predictor']}, this learner predictor={self.cfg.predictor}"
            )
        extra = state.get("extra_temperatures", [])
        if len(extra) != len(self.extra):
            raise ValueError(f"checkpoint has temperatures of {1 + len(extra)} teachers, this run "
                             f"{1 + len(self.extra)}")
        self.temperatures.load_state_dict(state["temperatures"])
        for module, saved_state in zip(self.extra, extra):
            module.load_state_dict(saved_state)
        self.optimizer.load_state_dict(state["optimizer"])
        self.num_meta_steps = int(state.get("num_meta_steps", 0))

    # --------------------------------------------------------------------- helpers
    def _check(self, student_logits: Tensor, teacher_logits: Tensor) -> None:
        if student_logits.ndim != 2 or student_logits.shape != teacher_logits.shape:
            raise ValueError(
                "expected student and teacher logits of the same shape (B, C), got "
                f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
            )
        if student_logits.shape[1] != self.num_classes:
            raise ValueError(f"expected {self.num_classes} classes, got logits of shape {tuple(student_logits.shape)}")


def _key(name: str, teacher: int) -> str:
    """A logged temperature's key: ``name`` for teacher 0, ``name_<i>`` for teacher i."""
    return name if teacher == 0 else f"{name}_{teacher}"
