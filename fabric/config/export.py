"""Config of the export stage (ONNX, ONNX Runtime)."""

from __future__ import annotations

from pydantic import Field

from fabric.config._base import Section


class ExportConfig(Section):
    """ONNX export of the champion model and its parity check."""

    enabled: bool = True
    opset: int = Field(default=18, ge=13)
    tolerance: float = Field(default=1e-4, gt=0)
    """Largest allowed absolute difference between the model's outputs (torch, or the XGBoost / LightGBM
    booster) and ONNX Runtime's; for tree regression relative to the values' scale (float32 sums)."""
    quantize: bool = False
    """Also write a dynamic int8 model and report its accuracy change."""
