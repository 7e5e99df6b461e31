"""logitcache: an offline teacher-logit cache and student trainer for knowledge distillation."""

__version__ = "0.1.0"
