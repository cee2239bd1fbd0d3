"""A lean, hand-built ONNX graph for decoder-only models of the Llama recipe (Llama, Mistral,
Qwen2/2.5, Qwen3, Gemma, Gemma 3: architectures.py lists them and what sets them apart).

Optimum's export traces the PyTorch code and leaves ~100 small shape ops per layer
(Shape/Gather/Unsqueeze/Concat/Expand/Where ...) that ONNX Runtime executes on every decoding
step. This package writes the same model directly from its weights, with ~10 nodes per layer.
Its inputs and outputs follow the Optimum export (`text-generation-with-past`), with the KV
cache as buffers that are written in place:

    input_ids       int64 [batch_size, sequence_length]
    attention_mask  int64 [batch_size, past_length + sequence_length]  (1 real, 0 left padding)
    position_ids    int64 [batch_size, sequence_length]
    past_key_values.{i}.key / .value   float [batch_size, kv_heads, capacity, head_dim]
 -> logits          float [logits_count, vocab]
    present.{i}.key / .value           float [batch_size, kv_heads, capacity or past_length + sequence_length, head_dim]

The past tensors may be longer than the past (capacity >= past_length, read from the attention
mask): when the caller binds each present output to its past buffer (IO binding), attention
(com.microsoft GroupQueryAttention) writes the new keys/values into slots past_length ..
past_length + sequence_length - 1 of that buffer and nothing is copied. Unbound, with capacity =
past_length, the present is the concatenation, as in Optimum's graph. The model metadata
`epic_ort.kv_cache = shared_buffer` tells the runtime which contract a graph has.

Two inputs of its own:

    logits_index    int64 [logits_count]: which positions (row x sequence_length + position)
                    reach the lm_head: a prefill needs each row's last, text scoring all, an
                    EPIC token tree its real tokens (not the padding of narrower rows);
    tree_mask       bool [batch_size or 1, sequence_length or 1, past_length + sequence_length or 1]:
                    which keys each new token may see, on top of padding and causality. [1, 1, 1]
                    True is ordinary decoding; EPIC's lookahead runs a token tree through it.

Sliding-window layers (Gemma 3's) see the keys within their window of each query's position. The
window is counted over the keys a query sees (prelude._window_bias), which is the position
distance both in left-padded rows and in token trees: no input carries key positions.

"float" is float32, or float16 throughout (weights, activations, KV cache) in a `--dtype fp16`
graph, whose logits are still float32 (cast once after the lm_head): the runtime samples and
scores in float32 either way. fp16 is what ONNX Runtime's CUDA GroupQueryAttention runs with an
attention bias (>= 1.29; it has no float32 kernel); on the CPU the fp16 graph runs too (ORT casts
around the few kernels it lacks in fp16), which is how the tests check it.

`epic_ort.runtime` runs both graphs, and their KV caches are interchangeable (keys are stored
after rotary, as in transformers).

Modules: graph.py (writing nodes and saving), architectures.py (the model_type table and
`supports`), prelude.py (attention bias, lengths, rotary tables), layers.py (a decoder layer,
the head, the inputs/outputs), projection.py (float32 or exact 4-bit products), build.py
(`build_lean_onnx`). Needs only NumPy and `onnx`; the torch model is converted to NumPy arrays
right away.
"""

from .architectures import ARCHITECTURES, Architecture, WeightNames, supports
from .build import build_lean_onnx
from .graph import FLOAT_TYPES, MS_DOMAIN, OPSET
from .prelude import MASKED_SCORE, MASKED_SCORE_FP16

__all__ = ["ARCHITECTURES", "FLOAT_TYPES", "MASKED_SCORE", "MASKED_SCORE_FP16", "MS_DOMAIN", "OPSET", "Architecture",
           "WeightNames", "build_lean_onnx", "supports"]
