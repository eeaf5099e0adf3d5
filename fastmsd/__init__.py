"""fastmsd: medical vision-language pretraining with momentum self-distillation (MSD)."""

__version__ = "0.1.0"
