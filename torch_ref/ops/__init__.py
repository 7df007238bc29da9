"""Custom operators of the torch reference (twin of paddle_impl.ops)."""
from .psa_mask import psa_mask

__all__ = ["psa_mask"]
