"""Load an HF-format checkpoint folder straight into an int8 model, one tensor at a time.

    from nanoseek.infer.int8_load import load_int8_model
    model = load_int8_model("path/to/model")   # == int8_copy(load_model(path, dtype=torch.float32))

`int8_copy(load_model(path))` holds the full-precision model and its int8 copy at once: for
DeepSeek-V2-Lite (15.7B parameters) 63 GB of fp32 weights before any is quantized. Here the model is
built on the meta device and quantized there (`quantize_int8`: int8 modules whose buffers take no
memory), then given uninitialised CPU storage; each stored tensor is read from its shard (bf16, fp16,
fp32, or FP8 dequantized with its block scales) and quantized into its rows of the int8 weights as it
arrives, a block of rows at a time. Peak memory is the int8 model (embeddings, norms, router gate
and kv_b_proj in fp32, as the int8 path keeps them) plus one stored tensor. The result is the same
model, bit for bit, as quantizing the fp32 load (tests/test_int8_load.py), in eval mode.

Errors name the file and tensor: everything `nanoseek.checkpoint.inspect_checkpoint` checks before any
weight is read (missing, unexpected, misshaped, truncated tensors), a shard cut short while reading,
and a weight with NaN or infinite values, which has no int8 scale.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..checkpoint import CheckpointContents, TensorInfo, inspect_checkpoint, read_weight, resolve_model_dir
from ..errors import CheckpointError
from ..model import Transformer, rope_frequencies
from ..tokenizer import Tokenizer
from .quant import Int8Linear, Int8RoutedExperts, quantize_int8, quantize_rows_into


@torch.no_grad()
def load_int8_model(path: str | Path) -> Transformer:
    """The int8 model (CPU, eval mode) of an HF-format model folder, read tensor by tensor (see the
    module docstring); CheckpointError names a bad file or tensor."""
    contents = inspect_checkpoint(path)
    model = quantize_int8(contents.model).to_empty(device="cpu")  # int8 modules, storage not yet touched
    model.rotary.inv_freq = rope_frequencies(contents.config)[0]  # computed, never read from disk
    for key, info, slot, f in contents.reads():
        _load_tensor(model, contents, key, info, slot, f)
    if contents.config.tie_word_embeddings and isinstance(model.lm_head, Int8Linear):
        lm = model.lm_head  # the checkpoint stores the tied head once, as the embedding
        _quantize_into(model.embed_tokens.weight, lm.q, lm.scale, lm.scale_bf16, contents.path, "lm_head.weight")
    return model.eval()


def load_int8_model_and_tokenizer(path: str | Path, tokenizer: str | Path | None = None
                                  ) -> tuple[Transformer, Tokenizer]:
    """(int8 model, tokenizer) from a model or run folder: `load_model_and_tokenizer` streamed into int8."""
    model_dir = resolve_model_dir(path)
    return load_int8_model(model_dir), Tokenizer.load(tokenizer or model_dir)


def _load_tensor(model: Transformer, contents: CheckpointContents, key: str, info: TensorInfo, slot, f) -> None:
    """One stored tensor into the int8 model: quantized into its rows of an Int8Linear or of the int8
    routed experts, else copied (cast to the model's fp32) into its parameter or buffer."""
    owner_name, attr = slot.name.rsplit(".", 1)
    owner = model.get_submodule(owner_name)
    w = read_weight(key, info, f, contents.headers)
    if isinstance(owner, Int8Linear) and attr == "weight":
        q, scale, scale_bf16 = owner.q, owner.scale, owner.scale_bf16
    elif isinstance(owner, Int8RoutedExperts):
        q, scale, scale_bf16 = (getattr(owner, f"{attr}_{part}") for part in ("q", "scale", "scale_bf16"))
    else:
        target = getattr(owner, attr).data
        (target[slot.index] if slot.index else target).copy_(w)
        return
    if slot.index:  # one expert's gate, up or down projection: its rows of the stacked tensors
        q, scale, scale_bf16 = q[slot.index], scale[slot.index], scale_bf16[slot.index]
    _quantize_into(w, q, scale, scale_bf16, info.file, key)


def _quantize_into(w, q, scale, scale_bf16, where: Path, key: str) -> None:
    quantize_rows_into(w, q, scale, scale_bf16)
    if not bool(torch.isfinite(scale).all()):  # a NaN or inf anywhere in a row makes its scale so
        raise CheckpointError(f"{where}: tensor '{key}' holds NaN or infinite values: it has no int8 scale")


__all__ = ["load_int8_model", "load_int8_model_and_tokenizer"]
