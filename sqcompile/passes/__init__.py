"""FX rewrite passes; each module has one entry function taking and returning a graph module."""
from .attention import explicit_attention
from .composite import composite_gemms
from .l1_norms import l1_norms
from .precision import check_overrides
from .quantize_gemms import quantize_gemms
from .rms_norm import explicit_rms_norm

__all__ = ["check_overrides", "composite_gemms", "explicit_attention", "explicit_rms_norm", "l1_norms",
           "quantize_gemms"]
