"""Linear layers through oneDNN with pre-packed weights, for inference on the CPU.

A decoding step multiplies a few rows (1 for AR, a block's few dozen for DFM) by every
weight matrix of the model. On the CPU, aten's ``F.linear`` hands that to MKL's GEMM,
which is slow at such shapes: measured here (2-core AMD EPYC, float32), the LM head
(768 x 32k) takes 13 ms for 1 row and 42 ms for 4 rows through MKL, against 7 ms and
11 ms through oneDNN with the weight reordered once into its blocked layout; a 768 x 2048
MLP matrix at 4 rows 1.2 ms against 0.3 ms. torch's own CPU inference compiler does the
same (inductor's weight prepacking under ``freezing``), but compiling takes minutes per
shape and decoding shapes change every step, so the packing is applied here, per layer.

Only inference uses it (no autograd through the packed op): :class:`PackedLinears` falls
back to ``module(x)`` under grad mode, off the CPU, outside float32, for weights that
DeepSpeed ZeRO-3 partitions, or where this torch build lacks the oneDNN ops. A packed copy
is made lazily per layer and made again when the weight's storage or version counter
changes (an optimizer step, a checkpoint load), so a model that keeps training never
decodes with stale weights.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

# The row count oneDNN is told to expect when packing: measured to change little
# (the packed layout serves every row count).
_ROWS_HINT = 64


def onednn_available() -> bool:
    """Whether this torch build has oneDNN and its packed-linear ops."""
    ops = ("_reorder_linear_weight", "_linear_pointwise")
    return torch.backends.mkldnn.is_available() and all(hasattr(torch.ops.mkldnn, op) for op in ops)


class PackedLinears:
    """Applies ``nn.Linear`` layers with oneDNN-packed copies of their weights (inference
    on the CPU in float32); any other call runs the layer as it is."""

    def __init__(self) -> None:
        self._enabled = onednn_available()
        # ids of the layers -> ((data_ptr, version) of each weight packed, the packed
        # stacked weight, the stacked bias or None)
        self._packed: dict[tuple[int, ...], tuple[tuple, Tensor, Tensor | None]] = {}

    def __call__(self, layer: nn.Linear, x: Tensor) -> Tensor:
        """``layer(x)`` for x Float[..., in_features]."""
        return self.fused((layer,), x)[0]

    def fused(self, layers: tuple[nn.Linear, ...], x: Tensor) -> tuple[Tensor, ...]:
        """``layer(x)`` for each of ``layers`` (same input size), as one product with their
        weights stacked (attention's q / k / v, the MLP's gate / up): one oneDNN call
        instead of several, each a fixed cost at a decoding step's few rows."""
        if (
            not self._enabled
            or torch.is_grad_enabled()
            or x.device.type != "cpu"
            or x.dtype != torch.float32
            or any(layer.weight.dtype != torch.float32 for layer in layers)
            # ZeRO-3 gathers a partitioned weight in the layer's own hooks
            or any(hasattr(layer.weight, "ds_id") for layer in layers)
        ):
            return tuple(layer(x) for layer in layers)
        weight, bias = self._packed_weights(layers)
        rows = x.reshape(-1, x.shape[-1])
        out = torch.ops.mkldnn._linear_pointwise(rows, weight, bias, "none", [], "")
        out = out.view(*x.shape[:-1], out.shape[-1])
        return out.split([layer.out_features for layer in layers], dim=-1)

    def _packed_weights(self, layers: tuple[nn.Linear, ...]) -> tuple[Tensor, Tensor | None]:
        # Weights made under inference_mode keep no version counter (in-place edits of
        # them, only possible inside inference_mode, are not seen).
        key = tuple(
            (w.data_ptr(), -1 if w.is_inference() else w._version)
            for w in (layer.weight for layer in layers)
        )
        name = tuple(id(layer) for layer in layers)
        held = self._packed.get(name)
        if held is None or held[0] != key:
            weight = torch.cat([layer.weight.detach() for layer in layers])
            bias = None
            if any(layer.bias is not None for layer in layers):
                bias = torch.cat([
                    layer.bias.detach() if layer.bias is not None
                    else weight.new_zeros(layer.out_features)
                    for layer in layers
                ])  # fmt: skip
            packed = torch.ops.mkldnn._reorder_linear_weight(weight, _ROWS_HINT)
            held = (key, packed, bias)
            self._packed[name] = held
        return held[1], held[2]

    def __getstate__(self) -> dict[str, object]:
        """Copies and pickles (Ray, ``copy.deepcopy``) start without packed weights: those
        are keyed by the layers of this instance."""
        return {"_enabled": self._enabled, "_packed": {}}
