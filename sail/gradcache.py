"""GradCache for two-tower models with trainable encoders now lives in sail.step, beside the heads-only
step, so both kinds of training share one module and one gradient sync; this name stays for imports."""

from sail.step import contrastive_backward

__all__ = ["contrastive_backward"]
