"""Custom operators of the Paddle twin (twin of torch_ref.ops)."""
from .psa_mask import psa_mask

__all__ = ["psa_mask"]
