"""Disk-to-disk streaming: prune a model that does not fit in memory, one block at a time.

    stream, tok = open_streamed("path/to/model")   # skeleton on the meta device; embeddings, norm, head loaded
    pipe = BlockPipeline(stream.adapter, ..., stream=stream)
    with pipe.onloaded(i) as block:                 # block i read from the safetensors files (memory-mapped)
        ...prune...
        stream.write_block(i, block)                # one shard of the output, written at once
    stream.save("out/", tok)                        # the shards + index + config + tokenizer, into place

The model is built by accelerate's ``init_empty_weights`` (parameters on the meta
device, buffers such as rotary tables real); only the modules outside the decoder
blocks are materialised at open. Block ``i`` is materialised from the checkpoint's
safetensors when its turn comes and goes back to the meta device after it, so memory
holds the embeddings, one block and the calibration activations, however deep the
model. Tensors are cast to the skeleton's dtype for them, as ``from_pretrained``
casts them, so a streamed prune computes exactly what an in-memory prune computes.

Output: ``model-{i+1:05d}-of-{N:05d}.safetensors`` holds block ``i`` (``N`` = blocks +
1), the last shard everything outside the blocks, plus ``model.safetensors.index.json``
as ``save_pretrained`` writes it, so ``from_pretrained`` loads the folder. The block
shards are written into a staging folder (the checkpoint folder when there is one: a
resumed run finds the finished blocks there) and hard-linked (else copied) into the
saved folder at the end.

A GGUF file is de-quantized once into a safetensors folder under
:func:`cache_dir` (transformers' GGUF loader reads the whole model, so that step
needs the memory of the model once; later runs reuse the folder).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional, Sequence

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from .files import atomic_path, safetensors_header, write_json
from .loading import check_checkpoint_keys, disable_use_cache, restore_use_cache, tied_keys
from .memory import fix_mmap_threshold, release_freed_memory
from .models import ModelAdapter, get_adapter

log = logging.getLogger(__name__)

INDEX = "model.safetensors.index.json"
_CONVERTED = ".optima_converted.json"


def cache_dir() -> Path:
    """The package's cache folder (converted GGUF models, dense perplexities): ``$OPTIMA_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/optima_plugin`` (an absolute ``XDG_CACHE_HOME`` only, as the XDG spec says), else
    ``~/.cache/optima_plugin``."""
    if os.environ.get("OPTIMA_CACHE_DIR"):
        return Path(os.environ["OPTIMA_CACHE_DIR"])
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    return (Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache") / "optima_plugin"


def shard_name(index: int, total: int) -> str:
    """``model-00001-of-00031.safetensors`` for ``index`` 0 of ``total`` 31 (HF's shard names)."""
    return f"model-{index + 1:05d}-of-{total:05d}.safetensors"


def safetensors_files(directory: str | os.PathLike) -> dict[str, Path]:
    """``{tensor name: file}`` of a safetensors checkpoint folder (one file, or shards with an index).

    ``FileNotFoundError`` naming the folder when it holds no ``*.safetensors``.
    """
    folder = Path(directory)
    index = folder / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            return {name: folder / file for name, file in weight_map.items()}
        except (ValueError, KeyError, TypeError, AttributeError) as err:  # empty, not JSON, no weight_map
            raise ValueError(f"--model {folder}: {INDEX} is not a safetensors index ({type(err).__name__}: {err}); "
                             "it needs a JSON object with a \"weight_map\" of tensor name -> file") from err
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder} holds no *.safetensors files: streaming reads safetensors checkpoints "
                                "(a GGUF file is converted once with --gguf_file; .bin checkpoints are not read)")
    out = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            out.update({name: path for name in f.keys()})
    return out


def checkpoint_bytes(directory: str | os.PathLike, dtype: torch.dtype) -> int:
    """Bytes the checkpoint's tensors take in memory with floating tensors in ``dtype`` (headers only)."""
    by_file: dict[Path, list[str]] = {}
    for name, path in safetensors_files(directory).items():
        by_file.setdefault(path, []).append(name)
    total = 0
    for path, names in by_file.items():
        with safe_open(str(path), framework="pt") as f:
            total += sum(_nbytes(f.get_slice(name), dtype) for name in names)
    return total


_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def _nbytes(piece, floating_as: Optional[torch.dtype] = None) -> int:
    """Bytes of one safetensors tensor (a ``get_slice``), floating ones counted in ``floating_as`` if given."""
    numel = 1
    for n in piece.get_shape():
        numel *= n
    kind = piece.get_dtype()
    if floating_as is not None and kind in ("F64", "F32", "F16", "BF16"):
        return numel * torch.tensor([], dtype=floating_as).element_size()
    return numel * _SIZES.get(kind, 8)


def stream_needed(directory: str | os.PathLike, dtype: torch.dtype, available: Optional[int] = None) -> bool:
    """Whether a local safetensors model is larger than the available RAM (then it is streamed; logged).

    ``available``: bytes (default: what the system reports as available now). A folder
    without safetensors (a hub id, a GGUF file) gives False.
    """
    import psutil

    try:
        need = checkpoint_bytes(directory, dtype)
    except (FileNotFoundError, OSError, ValueError):
        return False
    available = psutil.virtual_memory().available if available is None else available
    if need > available:
        log.info("the model takes %.1f GB in %s, more than the %.1f GB of RAM available: streaming it from disk "
                 "one block at a time (--stream; --no-stream to load it whole)", need / 1e9,
                 str(dtype).replace("torch.", ""), available / 1e9)
        return True
    return False


def gguf_to_safetensors(directory: str, gguf_file: str, dtype: torch.dtype) -> Path:
    """A safetensors folder holding the de-quantized GGUF model (converted once, then reused).

    The folder is named after the file and keyed by its path, size, time and ``dtype``;
    it is written to a temporary sibling and renamed, so a crash never leaves half of it.
    """
    from .loading import load_model

    source = (Path(directory) / gguf_file).resolve()
    st = source.stat()
    key = hashlib.sha1(f"{source}|{st.st_size}|{st.st_mtime_ns}|{dtype}".encode()).hexdigest()[:12]
    target = cache_dir() / "gguf" / f"{source.stem}-{str(dtype).replace('torch.', '')}-{key}"
    if (target / _CONVERTED).is_file():
        log.info("streaming %s from its safetensors conversion in %s", gguf_file, target)
        return target
    log.info("converting %s to safetensors once, into %s (de-quantized to %s; later runs reuse it)", gguf_file,
             target, str(dtype).replace("torch.", ""))
    model, tokenizer = load_model(directory, gguf_file=gguf_file, dtype=dtype)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        restore_use_cache(model)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / _CONVERTED, {"source": str(source), "size": st.st_size, "dtype": str(dtype)})
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def resolve_directory(model: str, gguf_file: Optional[str], dtype: torch.dtype) -> Path:
    """The local safetensors folder to stream ``model`` from: the folder itself, a GGUF file's
    conversion, or the hub snapshot of an id (safetensors, config and tokenizer files only)."""
    path = Path(model).expanduser()
    if gguf_file is not None:
        if not (path / gguf_file).is_file():
            raise FileNotFoundError(f"--gguf_file {gguf_file}: not found in {model}")
        return gguf_to_safetensors(str(path), gguf_file, dtype)
    if path.is_dir():
        return path
    if path.exists() or model.startswith((".", "/", "~")):
        raise FileNotFoundError(f"--model {model}: no such directory")
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(model, allow_patterns=["*.safetensors", "*.json", "*.model", "*.txt",
                                                         "tokenizer*"]))


@dataclass
class StreamedModel:
    """A causal LM whose decoder blocks stay on disk until their turn.

    Attributes:
        model: the skeleton; its blocks' parameters on the meta device except the one
            materialised now, everything else real (on CPU).
        adapter: the skeleton's :class:`~optima_plugin.models.ModelAdapter`.
        directory: the safetensors folder read.
        sources: ``{state_dict key: (file, key in that file)}`` of every tensor to read.
        staging: where :meth:`write_block` puts the pruned blocks' shards (set by the run).
        prefix: the blocks' dotted path in the state dict (``model.layers``).
    """

    model: nn.Module
    adapter: ModelAdapter
    directory: Path
    sources: dict
    staging: Optional[Path] = None
    prefix: str = ""
    _block_keys: list = field(default_factory=list)

    @property
    def num_shards(self) -> int:
        return len(self.adapter.blocks) + 1

    def load_block(self, index: int, device: torch.device | str) -> nn.Module:
        """Materialise block ``index`` on ``device`` from its files (exact, in the skeleton's dtypes)."""
        block = self.adapter.blocks[index]
        start = f"{self.prefix}.{index}."
        _materialise(block, {k[len(start):]: self.sources[k] for k in self._block_keys[index]}, torch.device(device))
        return block

    def release_block(self, index: int) -> None:
        """Block ``index`` back on the meta device: its memory is freed (and handed back to the OS)."""
        self.adapter.blocks[index].to("meta")
        release_freed_memory()  # else glibc keeps the freed heap: resident memory grew ~3 MB per block

    def write_block(self, index: int, block: nn.Module) -> Path:
        """Write block ``index``'s tensors (full state-dict names) as its output shard in :attr:`staging`."""
        if self.staging is None:
            raise RuntimeError("StreamedModel.staging is not set: the run decides where pruned blocks go")
        start = f"{self.prefix}.{index}."
        tensors = {start + k: v.detach().to("cpu").contiguous() for k, v in block.state_dict().items()}
        path = self.staging / shard_name(index, self.num_shards)
        try:
            self.staging.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp:
                save_file(tensors, str(tmp), metadata={"format": "pt"})
        except (OSError, SafetensorError) as e:
            from .checkpoint import WriteFailed, blocks_done, write_failure

            why = write_failure(e)
            if why is None:
                raise
            kept = f"; the finished blocks are kept in {self.staging}" if blocks_done(self.staging) else ""
            raise WriteFailed(f"writing {path} failed ({why}); free space or check the folder, then run the same "
                              f"command again{kept}") from e
        return path

    def tensor(self, name: str) -> Tensor:
        """The tensor ``name`` (full state-dict name) as its file holds it, read from disk on the CPU."""
        path, key = self.sources[name]
        with safe_open(str(path), framework="pt") as f:
            return f.get_tensor(key)

    def has_block(self, index: int) -> bool:
        """Whether block ``index``'s shard is in :attr:`staging`."""
        return self.staging is not None and (self.staging / shard_name(index, self.num_shards)).is_file()

    def pruned(self) -> "StreamedModel":
        """The same skeleton reading its blocks from the shards in :attr:`staging` (the pruned model)."""
        sources = dict(self.sources)
        for i in range(len(self.adapter.blocks)):
            shard = self.staging / shard_name(i, self.num_shards)
            sources.update({k: (shard, k) for k in self._block_keys[i]})
        return replace(self, sources=sources)

    def save(self, directory: str, tokenizer, *, overwrite: bool = False, protected: Sequence[str] = ()) -> Path:
        """Save the pruned model: the staged block shards, a shard of everything else, the index,
        config, generation config, tokenizer (all-or-nothing, see
        :func:`~optima_plugin.loading.install_directory`)."""
        from .loading import install_directory

        missing = [i for i in range(len(self.adapter.blocks)) if not self.has_block(i)]
        if missing:
            raise RuntimeError(f"blocks {missing[:5]} have no pruned shard in {self.staging}: the prune did not finish")

        def write(tmp: Path) -> None:
            restore_use_cache(self.model)
            weight_map, total = {}, 0
            for i in range(len(self.adapter.blocks)):
                name = shard_name(i, self.num_shards)
                _link_or_copy(self.staging / name, tmp / name)
                weight_map.update({k: name for k in self._block_keys[i]})
            outside = {k: v.detach().to("cpu").contiguous() for k, v in self._outside_state().items()}
            last = shard_name(len(self.adapter.blocks), self.num_shards)
            save_file(outside, str(tmp / last), metadata={"format": "pt"})
            weight_map.update({k: last for k in outside})
            for path in {tmp / f for f in weight_map.values()}:
                with safe_open(str(path), framework="pt") as f:
                    total += sum(_nbytes(f.get_slice(k)) for k in f.keys())
            write_json(tmp / INDEX, {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})
            self.model.config.save_pretrained(tmp)
            if getattr(self.model, "generation_config", None) is not None:
                self.model.generation_config.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)

        return install_directory(directory, write, overwrite=overwrite, protected=protected)

    def _outside_state(self) -> dict[str, Tensor]:
        """The state-dict tensors outside the blocks that the checkpoint holds (a tied head is not saved twice)."""
        start = f"{self.prefix}."
        return {k: v for k, v in self.model.state_dict().items() if not k.startswith(start) and k in self.sources}


def _link_or_copy(source: Path, target: Path) -> None:
    """Hard-link ``source`` at ``target`` (no extra disk), or copy it across file systems."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _materialise(module: nn.Module, sources: dict, device: torch.device) -> None:
    """Replace ``module``'s tensors named in ``sources`` (relative names) by those read from disk.

    Each tensor gets the dtype the module's (meta) tensor has, as ``from_pretrained`` casts
    it; parameters keep their ``requires_grad``.
    """
    by_file: dict[Path, list[tuple[str, str]]] = {}
    for rel, (path, key) in sources.items():
        by_file.setdefault(path, []).append((rel, key))
    for path, items in by_file.items():
        with safe_open(str(path), framework="pt") as f:
            for rel, key in items:
                owner_name, _, leaf = rel.rpartition(".")
                owner = module.get_submodule(owner_name) if owner_name else module
                tensor = f.get_tensor(key)
                if leaf in owner._parameters:
                    old = owner._parameters[leaf]
                    value = tensor.to(device=device, dtype=old.dtype if old.is_floating_point() else tensor.dtype)
                    owner._parameters[leaf] = nn.Parameter(value, requires_grad=old.requires_grad)
                else:
                    old = owner._buffers[leaf]
                    dtype = old.dtype if old is not None and old.is_floating_point() else tensor.dtype
                    owner._buffers[leaf] = tensor.to(device=device, dtype=dtype)


def _find_sources(model: nn.Module, files: dict[str, Path]) -> tuple[dict, list[str]]:
    """``({state_dict key: (file, key in file)}, keys the files lack)``; a key may be stored without or
    with the model's ``base_model_prefix`` (OPT's hub checkpoints)."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    sources, missing = {}, []
    for key in model.state_dict():
        candidates = [key]
        if prefix and key.startswith(prefix + "."):
            candidates.append(key[len(prefix) + 1:])
        elif prefix:
            candidates.append(f"{prefix}.{key}")
        found = next((c for c in candidates if c in files), None)
        if found is None:
            missing.append(key)
        else:
            sources[key] = (files[found], found)
    return sources, missing


def open_streamed(model: str, gguf_file: Optional[str] = None, dtype: torch.dtype = torch.float32):
    """Open ``model`` (local folder, GGUF file in it, or hub id) for streaming: ``(StreamedModel, tokenizer)``.

    Every tensor the model needs is checked to be in the files (tied ones excepted)
    before anything heavy is read; the modules outside the blocks are loaded on CPU. The
    process's allocations of 1 MiB or more get their own mappings from then on
    (:func:`~optima_plugin.memory.fix_mmap_threshold`), so its peak does not grow with depth.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    directory = resolve_directory(model, gguf_file, dtype)
    files = safetensors_files(directory)
    fix_mmap_threshold()  # each block then peaks the same: the run's peak does not grow with depth
    config = AutoConfig.from_pretrained(directory)
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config, dtype=dtype)
    disable_use_cache(skeleton)
    skeleton.eval()
    skeleton.name_or_path = str(directory)
    adapter = get_adapter(skeleton)
    from .engine import blocks_path

    stream = StreamedModel(skeleton, adapter, Path(directory), {}, prefix=blocks_path(adapter))
    sources, missing = _find_sources(skeleton, files)
    tied = tied_keys(skeleton)
    check_checkpoint_keys(str(directory), [k for k in missing if k not in tied], _unused(skeleton, files, sources),
                          _mismatched(skeleton, sources))
    stream.sources = sources
    start = f"{stream.prefix}."
    stream._block_keys = [[k for k in sources if k.startswith(f"{start}{i}.")] for i in range(len(adapter.blocks))]
    outside = {k: v for k, v in sources.items() if not k.startswith(start)}
    _materialise(skeleton, outside, torch.device("cpu"))
    if any(k in tied for k in missing):
        skeleton.tie_weights()  # the head shares the embeddings, as from_pretrained ties it
    still = [n for n, p in skeleton.named_parameters() if p.is_meta and not n.startswith(start)]
    if still:
        raise ValueError(f"{directory}: no tensor for {', '.join(still[:3])} in the checkpoint")
    tokenizer = AutoTokenizer.from_pretrained(directory)
    log.info("streaming %s: %d blocks read from disk one at a time", directory, len(adapter.blocks))
    return stream, tokenizer


def _unused(model: nn.Module, files: dict[str, Path], sources: dict) -> list[str]:
    """The checkpoint's tensors no state-dict key reads, but those transformers ignores on load too (the
    model's ``_keys_to_ignore_on_load_unexpected``, old ``rotary_emb.inv_freq`` and ``position_ids`` buffers)."""
    used = {key for _, key in sources.values()}
    patterns = set(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ()) | {
        r"rotary_emb\.inv_freq", r"(^|\.)position_ids$"}
    ignored = re.compile("|".join(f"({p})" for p in patterns))
    return [k for k in files if k not in used and ignored.search(k) is None]


def _mismatched(model: nn.Module, sources: dict) -> list[str]:
    """``"name: shape in file vs shape in model"`` for every tensor whose file shape (its safetensors
    header) differs from the model's."""
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    by_file: dict[Path, list[tuple[str, str]]] = {}
    for name, (path, key) in sources.items():
        by_file.setdefault(path, []).append((name, key))
    out = []
    for path, items in by_file.items():
        with safe_open(str(path), framework="pt") as f:
            for name, key in items:
                stored = list(f.get_slice(key).get_shape())
                if stored != shapes[name]:
                    out.append(f"{name}: {stored} vs {shapes[name]}")
    return out
