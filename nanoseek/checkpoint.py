"""HF-format checkpoints: config.json + safetensors (one file or shards + model.safetensors.index.json).

Key mapping (ours -> HF on disk):
  embed_tokens / norm / layers.N.*          -> model.embed_tokens / model.norm / model.layers.N.*
  layers.N.mlp.experts.gate_up[j] (2I, D)   -> model.layers.N.mlp.experts.j.{gate_proj, up_proj}.weight
  layers.N.mlp.experts.down[j]    (D, I)    -> model.layers.N.mlp.experts.j.down_proj.weight
  mtp.k.{enorm, hnorm, eh_proj, shared_head.norm}, mtp.k.block.*  -> model.layers.{L + k}.*
MTP layers also carry copies of the shared embedding and head (`embed_tokens`, `shared_head.head`), as
DeepSeek-V3's checkpoints do; on load those copies are ignored (the main model's are used).

Loading builds the model on the meta device, validates every header first (missing, unexpected,
wrongly shaped or truncated tensors raise CheckpointError before any memory is allocated), then reads
each tensor straight from the file into its parameter: peak memory stays near the model's size.
Saving writes into a temporary folder renamed into place: a crash never leaves a half-written model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import shutil
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from .config import ModelConfig
from .errors import CheckpointError
from .model import Transformer, rope_frequencies
from .runio import chmod_like_new, staged_dir
from .tokenizer import Tokenizer

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
FP8_BLOCK = 128
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


# ---- key mapping -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Slot:
    """Where one HF tensor lives in our model: parameter `name`, indexed by `index`."""
    name: str
    index: tuple


def hf_key_map(model: Transformer) -> dict[str, Slot]:
    """HF key -> Slot for every tensor the checkpoint holds (in a stable order)."""
    cfg = model.config
    out: dict[str, Slot] = {}
    for name, _ in named_tensors(model):
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        prefix, local = _hf_prefix(name, cfg.num_hidden_layers)
        if local.startswith("mlp.experts.gate_up") or local.startswith("mlp.experts.down"):
            n_experts, inter = cfg.n_routed_experts, cfg.moe_intermediate_size
            base = prefix + local[: local.index("experts.") + len("experts.")]
            for j in range(n_experts):
                if local.endswith("gate_up"):
                    out[f"{base}{j}.gate_proj.weight"] = Slot(name, (j, slice(0, inter)))
                    out[f"{base}{j}.up_proj.weight"] = Slot(name, (j, slice(inter, 2 * inter)))
                else:
                    out[f"{base}{j}.down_proj.weight"] = Slot(name, (j,))
        else:
            out[prefix + local] = Slot(name, ())
    return out


def named_tensors(model: Transformer):
    """Parameters and persistent buffers, each once (tied weights appear under their first name)."""
    yield from model.named_parameters()
    for mod_name, mod in model.named_modules():
        for name, buf in mod.named_buffers(recurse=False):
            if buf is not None and name not in mod._non_persistent_buffers_set:
                yield (f"{mod_name}.{name}" if mod_name else name), buf


def _hf_prefix(name: str, n_layers: int) -> tuple[str, str]:
    """Split our parameter name into (HF prefix, local name within the layer)."""
    if name == "lm_head.weight":
        return "", name
    parts = name.split(".")
    if parts[0] == "layers":
        return f"model.layers.{parts[1]}.", ".".join(parts[2:])
    if parts[0] == "mtp":
        layer = n_layers + int(parts[1])
        rest = parts[2:]
        if rest[0] == "block":
            rest = rest[1:]
        return f"model.layers.{layer}.", ".".join(rest)
    return "model.", name


def _mtp_copies(cfg: ModelConfig) -> dict[str, str]:
    """HF keys of the per-MTP-layer copies of the shared embedding and head -> our source parameter."""
    copies = {}
    for k in range(cfg.num_nextn_predict_layers):
        layer = cfg.num_hidden_layers + k
        copies[f"model.layers.{layer}.embed_tokens.weight"] = "embed_tokens.weight"
        copies[f"model.layers.{layer}.shared_head.head.weight"] = "lm_head.weight"
    return copies


# ---- save --------------------------------------------------------------------------------------
def save_model(model: Transformer, path: str | Path, *, dtype: torch.dtype | None = None,
               max_shard_size: int | str = "5GB") -> Path:
    """Write an HF-format folder that transformers' AutoModelForCausalLM.from_pretrained loads.

    dtype: storage dtype for weights (default: the model's); routing gate weights and the
    e_score_correction_bias stay fp32. Shards above max_shard_size get an index file.
    Saving over an existing folder replaces its weights and config.json and keeps its other files
    (tokenizer, logs); if the save fails, the folder is left as it was.
    """
    path = Path(path)
    limit = _parse_size(max_shard_size)
    cfg = model.config
    params = dict(named_tensors(model))
    tensors: list[tuple[str, torch.Tensor]] = []
    for key, slot in hf_key_map(model).items():
        t = params[slot.name].detach()[slot.index] if slot.index else params[slot.name].detach()
        tensors.append((key, t.to(_storage_dtype(key, t.dtype, dtype))))
    for key, src in _mtp_copies(cfg).items():
        t = params["embed_tokens.weight" if cfg.tie_word_embeddings else src].detach()
        tensors.append((key, t.to(dtype) if dtype is not None else t))

    shards = plan_shards([(key, t.numel() * t.element_size()) for key, t in tensors], limit)
    values = dict(tensors)
    with _staged_model_dir(path) as tmp:
        weight_map = {}
        for fname, keys in zip(shard_names(len(shards)), shards):
            write_shard(tmp / fname, {k: values[k].to("cpu").contiguous().clone() for k in keys})
            weight_map.update(dict.fromkeys(keys, fname))
        total = sum(t.numel() * t.element_size() for _, t in tensors)
        write_config_and_index(tmp, cfg, dtype or model.dtype, weight_map, total)
    return path


def plan_shards(sizes: list[tuple[str, int]], limit: int) -> list[list[str]]:
    """Split (key, bytes) in order into shards of at most `limit` bytes (a bigger tensor gets its own)."""
    shards: list[list[str]] = [[]]
    size = 0
    for key, nbytes in sizes:
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    return shards


def shard_names(n: int) -> list[str]:
    """File names of n weight shards, as transformers writes them."""
    return [SINGLE_NAME] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def write_shard(file: Path, tensors: dict[str, torch.Tensor]) -> None:
    save_file(tensors, file, metadata={"format": "pt"})
    chmod_like_new(file)  # save_file writes through mkstemp (0600)


def write_config_and_index(folder: Path, cfg: ModelConfig, dtype: torch.dtype, weight_map: dict[str, str],
                           total_bytes: int) -> None:
    """config.json (torch_dtype: the stored dtype), and the index when the weights span several files."""
    if len(set(weight_map.values())) > 1:
        (folder / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total_bytes},
                                                     "weight_map": weight_map}, indent=2))
    hf = cfg.to_hf()
    hf["torch_dtype"] = str(dtype).replace("torch.", "")
    (folder / "config.json").write_text(json.dumps(hf, indent=2) + "\n")


def _staged_model_dir(path: Path):
    """staged_dir for a model folder: files of an earlier save are dropped (a stale index would win);
    tokenizer, logs etc. are kept."""
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"cannot save a model to {path}: it exists and is not a folder")
    return staged_dir(path, keep_old=lambda name: not _is_model_file(name))


def _storage_dtype(key: str, dtype: torch.dtype, wanted: torch.dtype | None) -> torch.dtype:
    """The dtype an HF tensor is stored in: `wanted` for floating-point weights, except the routing
    gate and e_score_correction_bias, which stay as they are (fp32)."""
    keep = key.endswith("gate.weight") or key.endswith("e_score_correction_bias")
    return dtype if wanted is None or keep or not dtype.is_floating_point else wanted


def _is_model_file(name: str) -> bool:
    """Files a save rewrites: stale ones from an earlier save must not survive (a stale index would win)."""
    return name.endswith(".safetensors") or name in (INDEX_NAME, "config.json")


def _parse_size(size: int | str) -> int:
    """Bytes from an int or a string such as '5GB' (10^9, as transformers) or '2GiB' (2^30)."""
    if isinstance(size, int):
        return size
    s = size.strip().upper()
    units = (("GIB", 2**30), ("MIB", 2**20), ("KIB", 2**10), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3),
             ("B", 1))
    try:
        for unit, mult in units:
            if s.endswith(unit):
                return int(float(s[: -len(unit)]) * mult)
        return int(s)
    except ValueError:
        raise CheckpointError(f"invalid max_shard_size {size!r}: use bytes or a size like '5GB'") from None


# ---- reading safetensors without mmap --------------------------------------------------------
@dataclass
class TensorInfo:
    file: Path
    key: str
    dtype: torch.dtype
    shape: tuple
    offset: int  # absolute byte offset in the file
    nbytes: int


def read_header(file: Path) -> dict[str, TensorInfo]:
    """Parse a safetensors header and check every tensor lies inside the file."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{file}: truncated safetensors file (no header)")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8:
                raise CheckpointError(f"{file}: truncated safetensors file (header of {n} bytes, "
                                      f"file of {size})")
            header = json.loads(f.read(n))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: not a safetensors file (its header is not a JSON object)")
    base = 8 + n
    out = {}
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype_name, shape, (start, end) = meta["dtype"], tuple(meta["shape"]), meta["data_offsets"]
            numel = math.prod(int(d) for d in shape)
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{file}: tensor '{key}' has a malformed header entry {meta!r}") from None
        if dtype_name not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{file}: tensor '{key}' has unsupported dtype {dtype_name!r}")
        dtype = SAFETENSORS_DTYPES[dtype_name]
        if not (isinstance(start, int) and isinstance(end, int) and 0 <= start <= end):
            raise CheckpointError(f"{file}: tensor '{key}' has invalid data_offsets {[start, end]}")
        if end - start != numel * torch.empty((), dtype=dtype).element_size():
            raise CheckpointError(f"{file}: tensor '{key}' byte range does not match its shape {shape}")
        if base + end > size:
            raise CheckpointError(f"{file}: truncated: tensor '{key}' ends at byte {base + end} but the file "
                                  f"has {size} bytes")
        out[key] = TensorInfo(file, key, dtype, shape, base + start, end - start)
    return out


def _read_into(info: TensorInfo, f, out: torch.Tensor) -> None:
    """Read one tensor's bytes into `out` (same dtype and element count, contiguous, on CPU)."""
    f.seek(info.offset)
    view = memoryview(out.view(-1).view(torch.uint8).numpy())
    if f.readinto(view) != info.nbytes:
        raise CheckpointError(f"{info.file}: truncated while reading tensor '{info.key}'")


def read_tensor(info: TensorInfo, f) -> torch.Tensor:
    t = torch.empty(info.shape, dtype=info.dtype)
    _read_into(info, f, t)
    return t


def dequantize_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """DeepSeek-V3 FP8 e4m3 weights: one scale per 128x128 block; w = q * scale_inv."""
    rows, cols = weight.shape
    scale = scale_inv.float().repeat_interleave(FP8_BLOCK, 0)[:rows].repeat_interleave(FP8_BLOCK, 1)[:, :cols]
    return (weight.float() * scale).to(dtype)


# ---- load --------------------------------------------------------------------------------------
def checkpoint_files(path: Path) -> list[Path]:
    index = path / INDEX_NAME
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        files = sorted({path / f for f in weight_map.values()})
        for f in files:
            if not f.exists():
                raise CheckpointError(f"{index} names shard {f.name}, which does not exist")
        return files
    files = sorted(path.glob("*.safetensors"))
    if files:
        return files
    pickles = [p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES]
    if pickles:
        raise CheckpointError(f"{path}: only pickle-format weights ({', '.join(pickles)}); nanoseek never "
                              "unpickles files: convert them to safetensors")
    raise CheckpointError(f"{path}: no *.safetensors weights found")


def resolve_model_dir(path: str | Path) -> Path:
    """A model folder (config.json), or a run folder holding one in model/."""
    path = Path(path)
    if (path / "config.json").is_file():
        return path
    if (path / "model" / "config.json").is_file():
        return path / "model"
    raise CheckpointError(f"{path}: neither a model folder (config.json) nor a run folder with model/")


def load_model_and_tokenizer(path: str | Path, tokenizer: str | Path | None = None,
                             device: str | None = None) -> tuple[Transformer, Tokenizer]:
    """(fp32 model in eval mode, tokenizer) from a model or run folder; the tokenizer defaults to the
    one saved beside the weights."""
    model_dir = resolve_model_dir(path)
    model = load_model(model_dir, device=device, dtype=torch.float32).eval()
    return model, Tokenizer.load(tokenizer or model_dir)


def load_model(path: str | Path, device: str | torch.device | None = None,
               dtype: torch.dtype | None = None) -> Transformer:
    """Load an HF-format DeepseekV3/V2 folder (sharded or not, fp32/bf16/fp16/FP8) into a Transformer.

    dtype None keeps the stored dtype (FP8 weights become bf16). device None means CPU.
    The model is returned in eval mode.
    """
    contents = inspect_checkpoint(path)
    config = contents.config
    device = torch.device(device or "cpu")
    if dtype is None:
        dtype = _stored_dtype(contents.headers, contents.expected)
    model = contents.model.to(dtype=dtype).to_empty(device=device)
    model.rotary.inv_freq = rope_frequencies(config)[0].to(device)  # computed, never read from disk

    params = dict(named_tensors(model))
    for key, info, slot, f in contents.reads():
        target = params[slot.name].data[slot.index] if slot.index else params[slot.name].data
        _load_one(key, info, f, target, contents.headers)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    return model.eval()  # as transformers' from_pretrained; call .train() to train


@dataclass
class CheckpointContents:
    """A checked HF-format folder: its config, every stored tensor's header, our Transformer for it
    built on the meta device (no memory) and the HF key -> Slot map of the tensors to load."""

    path: Path
    config: ModelConfig
    headers: dict[str, TensorInfo]
    model: Transformer
    expected: dict[str, Slot]

    def reads(self):
        """(HF key, TensorInfo, Slot, open file) for every tensor to load, file by file in the order the
        bytes lie on disk (one sequential pass over each shard)."""
        by_file: dict[Path, list[tuple[str, TensorInfo]]] = {}
        for key, info in self.headers.items():
            if key in self.expected:
                by_file.setdefault(info.file, []).append((key, info))
        for file, items in by_file.items():
            with open(file, "rb") as f:
                for key, info in sorted(items, key=lambda kv: kv[1].offset):
                    yield key, info, self.expected[key], f


def inspect_checkpoint(path: str | Path) -> CheckpointContents:
    """Read and check a model folder's config and safetensors headers without loading any weight:
    missing, unexpected, duplicated, wrongly shaped or truncated tensors raise CheckpointError naming
    the file and tensor. A config with MTP layers over a checkpoint holding none loads without MTP
    (with a warning)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint folder not found: {path}")
    if not (path / "config.json").exists():
        raise CheckpointError(f"{path}: config.json is missing")
    config = ModelConfig.from_hf(path / "config.json")

    headers: dict[str, TensorInfo] = {}
    for file in checkpoint_files(path):
        for key, info in read_header(file).items():
            if key in headers:
                raise CheckpointError(f"{path}: tensor '{key}' is stored twice, in {headers[key].file.name} "
                                      f"and {file.name}")
            headers[key] = info

    with torch.device("meta"):
        model = Transformer(config)
    expected = hf_key_map(model)
    mtp_keys = [k for k in expected if expected[k].name.startswith("mtp.")]
    if mtp_keys and not any(k in headers for k in mtp_keys):
        warnings.warn(f"{path}: config has {config.num_nextn_predict_layers} MTP layer(s) but the checkpoint "
                      "holds none; loading without MTP")
        config = dataclasses.replace(config, num_nextn_predict_layers=0)
        with torch.device("meta"):
            model = Transformer(config)
        expected = hf_key_map(model)
    _check_keys(path, model, expected, headers)
    return CheckpointContents(path, config, headers, model, expected)


def _check_keys(path: Path, model: Transformer, expected: dict[str, Slot], headers: dict[str, TensorInfo]):
    params = dict(named_tensors(model))
    missing = [k for k in expected if k not in headers]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{path}: missing tensor '{missing[0]}'{more}")
    ignorable = set(_mtp_copies(model.config))
    if model.config.tie_word_embeddings:
        ignorable.add("lm_head.weight")  # some tied checkpoints store the copy anyway
    for key, info in headers.items():
        if key in expected:
            slot = expected[key]
            p = params[slot.name]
            want = tuple(p[slot.index].shape) if slot.index else tuple(p.shape)
            if info.shape != want:
                raise CheckpointError(f"{info.file}: tensor '{key}' has shape {info.shape}, expected {want}")
            if info.dtype in FP8_DTYPES:
                _check_fp8_scale(key, info, headers)
        elif key in ignorable or key.endswith("rotary_emb.inv_freq"):
            continue
        elif key.endswith(".weight_scale_inv") and key[: -len("_scale_inv")] in expected:
            continue
        else:
            raise CheckpointError(f"{info.file}: unexpected tensor '{key}' (not part of a "
                                  f"{model.config.model_type} model with this config.json)")


def _check_fp8_scale(key: str, info: TensorInfo, headers: dict[str, TensorInfo]) -> None:
    """An FP8 weight needs `<key>_scale_inv` of shape (ceil(rows/128), ceil(cols/128))."""
    if len(info.shape) != 2:
        raise CheckpointError(f"{info.file}: FP8 tensor '{key}' has shape {info.shape}; only 2-D weights "
                              "with 128x128 block scales are supported")
    scale = headers.get(key + "_scale_inv")
    if scale is None:
        raise CheckpointError(f"{info.file}: FP8 tensor '{key}' has no '{key}_scale_inv' to dequantize it")
    want = tuple(math.ceil(d / FP8_BLOCK) for d in info.shape)
    if scale.shape != want or not scale.dtype.is_floating_point or scale.dtype in FP8_DTYPES:
        raise CheckpointError(f"{scale.file}: scale tensor '{key}_scale_inv' has shape {scale.shape} and dtype "
                              f"{scale.dtype}, expected {want} in a float type for the 128x128 blocks of "
                              f"{info.shape}")


def _stored_dtype(headers: dict[str, TensorInfo], expected: dict[str, Slot]) -> torch.dtype:
    counts: dict[torch.dtype, int] = {}
    for key, info in headers.items():
        if key in expected and info.dtype.is_floating_point:
            counts[info.dtype] = counts.get(info.dtype, 0) + math.prod(info.shape)
    if not counts:
        return torch.float32
    dtype = max(counts, key=counts.get)
    return torch.bfloat16 if dtype in FP8_DTYPES else dtype


def _load_one(key: str, info: TensorInfo, f, target: torch.Tensor, headers: dict[str, TensorInfo]):
    if info.dtype == target.dtype and target.is_contiguous() and target.device.type == "cpu":
        _read_into(info, f, target)
    else:
        target.copy_(read_weight(key, info, f, headers, target.dtype))


def read_weight(key: str, info: TensorInfo, f, headers: dict[str, TensorInfo],
                fp8_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """One stored tensor from the open file `f`, in its stored dtype; an FP8 weight is dequantized
    with its `_scale_inv` (checked by inspect_checkpoint) into fp8_dtype."""
    if info.dtype in FP8_DTYPES:
        scale_info = headers[key + "_scale_inv"]  # presence and shape checked by _check_fp8_scale
        with open(scale_info.file, "rb") as sf:
            scale = read_tensor(scale_info, sf)
        return dequantize_fp8(read_tensor(info, f), scale, fp8_dtype)
    return read_tensor(info, f)


# ---- sharded checkpoints (torch.distributed.checkpoint) ---------------------------------------------
# A sharded model folder holds config.json, the tokenizer files, and what torch.distributed.checkpoint
# (DCP) wrote: `.metadata` and one `__{rank}_0.distcp` file per rank that saved. DCP keys:
#   model.{name}             a parameter or persistent buffer (`name` as in Transformer.named_parameters)
#   model.{name}.{j}         expert j of a stacked routed-experts tensor (gate_up[j]: (2I, D), down[j]: (D, I))
#   optim.{name}[.{j}].{k}   the optimizer's state k (exp_avg, exp_avg_sq, step) of that tensor
# Experts are stored one by one so that the layout is the same whatever the expert-parallel degree and
# the world size of the run that wrote it: any run can read any expert, and so can `consolidate`.
SHARDED_DIR = "sharded"  # the sharded model folder inside a training checkpoint
DCP_METADATA = ".metadata"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def is_expert_stack(name: str) -> bool:
    """Whether a parameter name is a stacked routed-experts tensor (E, ...) (saved expert by expert)."""
    return name.endswith((".experts.gate_up", ".experts.down"))


def sharded_key(name: str, expert: int | None = None, prefix: str = "model") -> str:
    """The DCP key of a tensor, or of one expert of a stacked-experts tensor."""
    return f"{prefix}.{name}" if expert is None else f"{prefix}.{name}.{expert}"


def copy_tokenizer(tokenizer_dir: str | Path, model_dir: Path) -> None:
    """Put the tokenizer files beside the weights, so the model folder is self-contained."""
    src = Path(tokenizer_dir)
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copy2(src / name, model_dir / name)


def resolve_sharded_dir(path: str | Path) -> Path:
    """A sharded model folder (DCP's .metadata), a training checkpoint holding one in sharded/, or a run
    folder, whose newest checkpoint is taken."""
    path = Path(path)
    for candidate in (path, path / SHARDED_DIR):
        if (candidate / DCP_METADATA).is_file():
            return candidate
    steps = sorted((path / "checkpoints").glob("step-*")) if (path / "checkpoints").is_dir() else []
    if steps:
        if (steps[-1] / SHARDED_DIR / DCP_METADATA).is_file():
            return steps[-1] / SHARDED_DIR
        raise CheckpointError(f"{steps[-1]}: the newest checkpoint of {path} is not sharded (its model/ "
                              "folder is already an HF model folder)")
    raise CheckpointError(f"{path}: neither a sharded checkpoint (torch.distributed.checkpoint "
                          f"{DCP_METADATA}) nor a run folder with checkpoints/")


def read_sharded_metadata(folder: Path) -> dict:
    """DCP key -> its TensorStorageMetadata (global size and dtype) of a sharded model folder."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    try:
        metadata = FileSystemReader(folder).read_metadata()
    except Exception as e:  # a missing, truncated or foreign .metadata: unpickling fails in many ways
        raise CheckpointError(f"{folder / DCP_METADATA} does not load: {type(e).__name__}: {e}") from None
    return {k: v for k, v in metadata.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)}


def load_sharded_tensors(folder: Path, tensors: dict[str, torch.Tensor], *, no_dist: bool = False) -> None:
    """Fill `tensors` (DCP key -> this process's tensor, a DTensor or a plain one) in place from a
    sharded folder. Collective under torch.distributed unless no_dist. Errors name the folder."""
    import torch.distributed.checkpoint as dcp
    try:
        with single_process_quietly():
            dcp.load(tensors, storage_reader=dcp.FileSystemReader(folder), no_dist=no_dist)
    except dcp.api.CheckpointException as e:  # a BaseException: one entry per failed rank
        first = next(iter(e.failures.values()), e)
        raise CheckpointError(f"{folder} does not load: {_first_line(first)}") from None
    except (RuntimeError, ValueError, KeyError, OSError, AssertionError) as e:
        raise CheckpointError(f"{folder} does not load: {type(e).__name__}: {e}") from None


@contextlib.contextmanager
def single_process_quietly():
    """DCP in one process warns on every call that it assumes one process: that is what we ask for."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _first_line(error) -> str:
    text = str(error[0] if isinstance(error, tuple) else error).strip()
    return text.splitlines()[-1] if text else type(error).__name__


@dataclass
class ConsolidateSummary:
    path: Path
    tensors: int
    files: int
    bytes: int
    largest_shard: int  # bytes of the largest file written: what a shard holds in memory at once


def consolidate(source: str | Path, out: str | Path, *, max_shard_size: int | str = "5GB",
                dtype: torch.dtype | None = None) -> ConsolidateSummary:
    """Write the HF model folder of a sharded checkpoint (see SHARDED_DIR), one safetensors shard at a
    time: the tensors of a shard are read from DCP's files (whatever world size wrote them), written,
    and freed before the next shard, so memory holds about one shard (max_shard_size), never the model.
    The result is what save_model writes (dtype as there); the tokenizer files are copied."""
    src = resolve_sharded_dir(source)
    if not (src / "config.json").is_file():
        raise CheckpointError(f"{src}: config.json is missing")
    config = ModelConfig.from_hf(src / "config.json")
    stored = read_sharded_metadata(src)
    plan = _consolidation_plan(src, config, stored)  # [(HF key, DCP key, index into it, stored dtype)]
    sizes = [(key, math.prod(_index_shape(stored[dkey].size, index)) * dtype_size(_storage_dtype(key, dt, dtype)))
             for key, dkey, index, dt in plan]
    shards = plan_shards(sizes, _parse_size(max_shard_size))
    by_key = {p[0]: p for p in plan}
    nbytes = dict(sizes)
    out = Path(out)
    with _staged_model_dir(out) as tmp:
        weight_map = {}
        for fname, keys in zip(shard_names(len(shards)), shards):
            write_shard(tmp / fname, _read_shard(src, [by_key[k] for k in keys], stored, dtype))
            weight_map.update(dict.fromkeys(keys, fname))
        write_config_and_index(tmp, config, dtype or _plan_dtype(plan), weight_map, sum(nbytes.values()))
        copy_tokenizer(src, tmp)
    largest = max(sum(nbytes[k] for k in keys) for keys in shards)
    return ConsolidateSummary(out, len(plan), len(shards), sum(nbytes.values()), largest)


def dtype_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _consolidation_plan(src: Path, config: ModelConfig, stored: dict) -> list[tuple]:
    """For every tensor save_model would write: (HF key, DCP key, index into the DCP tensor, its dtype),
    checked against the checkpoint's metadata (CheckpointError names a missing or misshaped tensor)."""
    with torch.device("meta"):
        model = Transformer(config)
    params = dict(named_tensors(model))
    plan = []
    for key, slot in hf_key_map(model).items():
        if is_expert_stack(slot.name):
            dkey, index, shape = sharded_key(slot.name, slot.index[0]), slot.index[1:], params[slot.name].shape[1:]
        else:
            dkey, index, shape = sharded_key(slot.name), (), params[slot.name].shape
        plan.append((key, dkey, index, shape))
    for key, name in _mtp_copies(config).items():
        name = "embed_tokens.weight" if config.tie_word_embeddings else name
        plan.append((key, sharded_key(name), (), params[name].shape))
    checked = []
    for key, dkey, index, shape in plan:
        if dkey not in stored:
            raise CheckpointError(f"{src}: tensor '{dkey}' (for '{key}') is missing from the sharded checkpoint")
        if tuple(stored[dkey].size) != tuple(shape):
            raise CheckpointError(f"{src}: tensor '{dkey}' has shape {tuple(stored[dkey].size)}, expected "
                                  f"{tuple(shape)} (config.json)")
        checked.append((key, dkey, index, stored[dkey].properties.dtype))
    return checked


def _index_shape(size, index: tuple) -> tuple:
    """The shape of tensor[index] for a tensor of `size`, index a tuple of slices."""
    return tuple(len(range(*s.indices(n))) for s, n in zip(index, size)) + tuple(size)[len(index):]


def _plan_dtype(plan: list[tuple]) -> torch.dtype:
    """The dtype most stored bytes have (what config.json's torch_dtype says)."""
    dtypes = [p[3] for p in plan]
    return max(set(dtypes), key=dtypes.count)


def _read_shard(src: Path, items: list[tuple], stored: dict, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """The HF tensors of one output shard, read from the DCP files (only the keys it needs). A DCP
    tensor is dropped as soon as its last HF tensor is cut from it."""
    wanted = {dkey for _, dkey, _, _ in items}
    buffers = {k: torch.empty(tuple(stored[k].size), dtype=stored[k].properties.dtype) for k in wanted}
    load_sharded_tensors(src, buffers, no_dist=True)
    uses = {k: sum(1 for it in items if it[1] == k) for k in wanted}
    out = {}
    for key, dkey, index, dt in items:
        t = buffers[dkey][index] if index else buffers[dkey]
        out[key] = t.to(_storage_dtype(key, dt, dtype)).contiguous()
        if (index or uses[dkey] > 1) and out[key].data_ptr() == t.data_ptr():
            out[key] = out[key].clone()  # tensors sharing memory (slices, MTP copies): safetensors refuses
        uses[dkey] -= 1
        if not uses[dkey]:
            del buffers[dkey]
    return out
