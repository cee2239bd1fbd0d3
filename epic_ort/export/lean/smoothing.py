"""Activation smoothing for the int8-GEMM graph (SmoothQuant, Xiao et al. 2023).

An int8 GEMM rounds each token's activations with one scale, set by the token's largest entry.
A few input channels of a decoder's products carry entries tens of times larger than the rest, so
that scale wastes most of the 255 levels on them and the other channels round coarsely: this
rounding, not the weights', is what int8-gemm's perplexity pays for (bench/RESULTS.md). The
product x @ W.T equals (x / s) @ (W * s).T for any positive s per input channel; choosing
s_j = peak_j^a / wmax_j^(1-a), with peak_j the channel's largest |activation| on real text and
wmax_j its weights' largest |value|, moves part of the range from the activations into the weights,
which are rounded per output column and tolerate it. a = 0.5 (the paper's default) splits it
evenly; 0.7 measured best on a novel that neither the peaks nor the evaluation use (bench/RESULTS.md).

The peaks are measured once, at export time, on the prose shipped with the package (not on any
text used to evaluate the export). `activation_peaks` needs torch: it runs only inside `export`;
the rest is NumPy, for the graph builder.
"""

from __future__ import annotations

from typing import Any

import numpy as np

STRENGTH = 0.7  # the a above
MAX_TOKENS = 131072  # of the bundled prose (SmolLM2's tokenizer makes 68,587 of it)
CHUNK = 512  # tokens per forward pass while measuring
SCALE_RANGE = (1e-2, 1e2)  # a channel that never fires (or a zero weight column) keeps a bounded scale


def smoothing_text_ids(tokenizer: Any, max_tokens: int = MAX_TOKENS) -> np.ndarray:
    """The bundled prose (calibration's default corpus) as token ids, at most `max_tokens`."""
    from ...calibration.corpus import default_corpus, read_prose

    ids: list[int] = []
    for path in default_corpus():
        ids.extend(tokenizer(read_prose(path), add_special_tokens=False)["input_ids"])
    return np.asarray(ids[:max_tokens], dtype=np.int64)


def activation_peaks(hf_model: Any, ids: np.ndarray, chunk: int = CHUNK) -> dict[str, np.ndarray]:
    """max |x_j| over `ids` of the input to every nn.Linear inside the decoder layers, keyed by that
    Linear's weight name in the state dict (the names the lean graph's products use)."""
    import torch

    peaks: dict[str, torch.Tensor] = {}
    hooks = []

    def recorder(key: str) -> Any:
        def record(_module: Any, args: tuple) -> None:
            seen = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(dim=0).float()
            peaks[key] = seen if key not in peaks else torch.maximum(peaks[key], seen)
        return record

    head = hf_model.get_output_embeddings()
    for name, module in hf_model.named_modules():
        if isinstance(module, torch.nn.Linear) and module is not head:
            hooks.append(module.register_forward_pre_hook(recorder(name + ".weight")))
    try:
        with torch.no_grad():
            for start in range(0, len(ids), chunk):
                piece = torch.as_tensor(ids[start:start + chunk][None, :])
                hf_model(input_ids=piece, use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    return {k: v.numpy().astype(np.float32) for k, v in peaks.items()}


def smoothing_scales(peak: np.ndarray, weight: np.ndarray, strength: float = STRENGTH) -> np.ndarray:
    """s per input channel for `weight` [out, in] whose input had `peak` [in] (see the module)."""
    wmax = np.abs(weight).max(axis=0)
    floor = np.float32(1e-12)
    scales = np.maximum(peak, floor) ** strength / np.maximum(wmax, floor) ** (1 - strength)
    return np.clip(scales, *SCALE_RANGE).astype(np.float32)
