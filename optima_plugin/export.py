"""Saving a pruned (and quantized) model in the compressed-tensors format (``--save_format compressed-tensors``).

The format is the one llm-compressor writes and vLLM and transformers load: every
quantized :class:`torch.nn.Linear` (one carrying a
:class:`~optima_plugin.quantizers.QuantState`) is stored as ``weight_packed`` (int32
words, each holding ``32 / bits`` integers, packed by the ``compressed-tensors``
library), ``weight_scale`` (``r x g``, in the weight's dtype: what transformers and vLLM
multiply by) and ``weight_shape``; ``config.json``
gets a ``quantization_config`` (``quant_method: compressed-tensors``, one config group
per ``(bits, group_size)``: symmetric int weights, ``channel`` strategy when one scale
per row, ``group`` otherwise, format ``pack-quantized`` as the library chooses for
weight-only int schemes). Everything else is written as ``save_pretrained`` writes it.

Sparsity is recorded, not compressed: ``compressed-tensors`` 0.20 (tested; transformers
needs >= 0.15) no longer has the sparse-bitmask / sparse-24 compressors (its own saver
writes an empty ``sparsity_config``), so it can neither write nor decompress them. Pruned weights are stored dense (zeros in the
packed integers or in the float weights) and ``quantization_config.sparsity_config``
holds the library's ``dense`` sparsity config: ``sparsity_structure`` ``2:4`` when
every pruned linear is 2:4 (at least two zeros in every 4 consecutive inputs),
``unstructured`` otherwise, ``global_sparsity`` and the pruned linears as ``targets``.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch
from torch import Tensor, nn

from .loading import install_directory, restore_use_cache
from .quantizers.base import QuantState, quant_state

log = logging.getLogger(__name__)

INSTALL_HINT = ("pip install compressed-tensors (the version this package is tested with: "
                "pip install 'optima_plugin[export]'), or use --save_format hf")


def require_compressed_tensors() -> None:
    """Raise ``ImportError`` saying what to install when the ``compressed-tensors`` library is missing."""
    try:
        import compressed_tensors  # noqa: F401
    except ImportError as e:
        raise ImportError(f"--save_format compressed-tensors needs the compressed-tensors library: "
                          f"{INSTALL_HINT}") from e


def linear_widths(model: nn.Module, skip_attention: bool = False) -> dict[str, int]:
    """``{full name: input width}`` of the linears a run prunes (and quantizes) in ``model``, which may be
    a skeleton on the meta device."""
    from .models import block_linears, get_adapter, is_attention

    adapter = get_adapter(model)
    prefix = next(name for name, module in model.named_modules() if module is adapter.blocks)
    return {f"{prefix}.{i}.{rel}": lin.in_features for i, block in enumerate(adapter.blocks)
            for rel, lin in block_linears(block).items() if not (skip_attention and is_attention(rel))}


def config_linear_widths(source: str, gguf_file: Optional[str] = None,
                         skip_attention: bool = False) -> Optional[dict[str, int]]:
    """:func:`linear_widths` of the model ``source`` describes (its ``config.json``, or the GGUF file's
    metadata), built on the meta device: no weight is read. None when the config cannot be read
    (e.g. a hub id offline): the loaded model is checked instead."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(source, **({"gguf_file": gguf_file} if gguf_file else {}))
        with init_empty_weights():
            skeleton = AutoModelForCausalLM.from_config(config)
        return linear_widths(skeleton, skip_attention)
    except Exception as err:  # noqa: BLE001 - whatever fails here fails again, with its own message, at the load
        log.debug("no layer shapes from the config of %s before loading (%s: %s)", source, type(err).__name__, err)
        return None


def _checked_group_size(config) -> int:
    """The ``--group_size`` that ``--save_format compressed-tensors`` needs to divide every quantized
    linear's input width; 0 when there is nothing to check."""
    opt = config.option
    if config.save_format != "compressed-tensors" or not opt("quantize_weight"):
        return 0
    return max(int(opt("group_size") or 0), 0)


def check_group_widths(config, widths: Optional[dict[str, int]]) -> None:
    """``ValueError`` before any work when ``--save_format compressed-tensors`` could not store the run's
    quantized weights: ``--group_size`` must divide the input width of every linear it quantizes
    (compressed-tensors and vLLM's kernels need whole groups). ``widths``: :func:`linear_widths`
    (None: not known yet, nothing checked)."""
    group = _checked_group_size(config)
    bad = {name: d for name, d in (widths or {}).items() if group and group < d and d % group}
    if not bad:
        return
    name, d = next(iter(bad.items()))
    common = math.gcd(*widths.values())
    hint = f"e.g. --group_size {common & -common}, " if common & -common > 1 else ""
    raise ValueError(f"--group_size {group} does not divide the {d} inputs of {name} ({len(bad)} of the "
                     f"{len(widths)} linears to quantize), which --save_format compressed-tensors needs (whole "
                     f"groups): give a --group_size dividing every input width ({hint}widths "
                     f"{', '.join(map(str, sorted(set(widths.values()))))}), or use --save_format hf")


def check_group_widths_before_load(config, source: str, gguf_file: Optional[str] = None) -> None:
    """:func:`check_group_widths` from the layer shapes ``source``'s config gives (before the weights load);
    nothing is read when there is nothing to check."""
    if _checked_group_size(config):
        check_group_widths(config, config_linear_widths(source, gguf_file, config.skip_attention))


def is_two_four(weight: Tensor) -> bool:
    """Whether every 4 consecutive entries of each row of ``weight`` (``r x d``) hold at least 2 zeros."""
    r, d = weight.shape
    if d % 4:
        return False
    return bool(((weight.reshape(r, d // 4, 4) == 0).sum(-1) >= 2).all())


def _scheme(bits: int, group_size: Optional[int], targets: list):
    """The compressed-tensors scheme of symmetric ``bits``-bit int weights, one scale per row
    (``group_size`` None: ``channel`` strategy) or per ``group_size`` inputs (``group``)."""
    from compressed_tensors.compressors.format import infer_module_format
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    if group_size is None:
        args = QuantizationArgs(num_bits=bits, type="int", symmetric=True, strategy="channel")
    else:
        args = QuantizationArgs(num_bits=bits, type="int", symmetric=True, strategy="group", group_size=group_size)
    scheme = QuantizationScheme(targets=targets, weights=args)
    scheme.format = infer_module_format(nn.Linear, scheme)
    return scheme


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _pack(name: str, weight: Tensor, qs: QuantState, scheme) -> tuple[dict, float]:
    """``weight`` (``r x d``, every entry ``scale * q``) packed by the library, and how far the packed form
    decodes from ``weight`` (0.0: bit-exact).

    The integers are :meth:`QuantState.integers` (float32 division by the float32 scales). The scales
    are stored in ``weight``'s dtype, the dtype transformers and vLLM load them in, so the decoded
    weight is what a server computes: in float32 exactly ``weight``; in bfloat16/float16, ``weight``
    up to the rounding of the scales (none when they are representable in that dtype).
    ``ValueError`` when ``weight`` is not ``scale * q`` up to one rounding to its dtype.
    """
    from compressed_tensors.compressors import BaseCompressor

    r, d = weight.shape
    scale = qs.scale.detach().float().reshape(r, -1)
    q = qs.integers(weight).float()
    expected = q * scale.repeat_interleave(qs.group_size, dim=1)[:, :d]
    eps = torch.finfo(weight.dtype).eps
    if not bool(((weight.float() - expected).abs() <= eps * expected.abs()).all()):
        worst = (weight.float() - expected).abs().max().item()
        raise ValueError(f"{name}: its weight is not scale * integer ({qs.bits} bits, group {qs.group_size}): off "
                         f"by up to {worst:.3g}; was it changed after quantization?")
    stored = scale.to(weight.dtype).float()  # what a loader multiplies by
    exact = q * stored.repeat_interleave(qs.group_size, dim=1)[:, :d]
    compressor = BaseCompressor.get_value_from_registry(scheme.format)
    packed = compressor.compress({"weight": exact, "weight_scale": stored}, scheme)
    if not torch.equal(compressor.decompress(packed, scheme)["weight"], exact):
        raise ValueError(f"{name}: compressed-tensors did not pack its integers back exactly")
    packed["weight_scale"] = packed["weight_scale"].to(weight.dtype)
    decoded = exact.to(weight.dtype)  # q * scale rounded once to the dtype, as a loader computes it
    return packed, (decoded.float() - weight.float()).abs().max().item()


def compressed_state(model: nn.Module, pruned: Optional[Iterable[str]] = None) -> tuple[dict, dict]:
    """The compressed ``state_dict`` of ``model`` (left unchanged) and its ``quantization_config``.

    Quantized linears become ``{name}.weight_packed`` / ``.weight_scale`` / ``.weight_shape``
    (see :func:`_pack`); other tensors are the model's own. ``pruned``: names of the linears the run
    pruned, for ``sparsity_config`` (None or empty: no sparsity recorded). The config is
    None when nothing is quantized or pruned.
    """
    from compressed_tensors.config import DenseSparsityConfig
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus

    from .lowrank import adapters

    separate = adapters(model)
    if separate:
        raise ValueError(f"{len(separate)} linears carry separate low-rank adapters ({next(iter(separate))}, ...), "
                         "which compressed-tensors cannot store: merge them (drop --separate_lora) or use "
                         "--save_format hf")
    state = dict(model.state_dict())
    modules = dict(model.named_modules())
    groups: dict[tuple[int, int], list[str]] = {}  # (bits, group size or 0 for per channel) -> linears
    plain: list[str] = []
    rounded: list[tuple[str, float]] = []  # linears whose saved weights differ from memory (half-precision scales)
    for name, module in modules.items():
        if not isinstance(module, nn.Linear):
            continue
        qs = quant_state(module)
        if qs is None:
            plain.append(name)
            continue
        r, d = module.weight.shape
        if qs.input_scale is not None:
            raise ValueError(f"{name}: quantized with --scale_important_weights, its weight is q * scale / input_scale "
                             "per input column, which compressed-tensors cannot store: quantize without it or use "
                             "--save_format hf")
        if qs.group_size < d and d % qs.group_size:
            raise ValueError(f"{name}: group size {qs.group_size} does not divide its {d} inputs; compressed-tensors "
                             "(and vLLM's kernels) need whole groups: quantize with a --group_size dividing every "
                             "linear's input width, or use --save_format hf")
        if not 2 <= qs.bits <= 8:
            raise ValueError(f"{name}: {qs.bits}-bit weights; compressed-tensors packs 2 to 8 bits")
        group_size = qs.group_size if qs.group_size < d else None
        groups.setdefault((qs.bits, group_size or 0), []).append(name)
        packed, off = _pack(name, module.weight.detach(), qs, _scheme(qs.bits, group_size, [name]))
        if off:
            rounded.append((name, off))
        del state[name + ".weight"]
        for key, value in packed.items():
            state[f"{name}.{key}"] = value.contiguous()

    if rounded:
        worst = max(rounded, key=lambda x: x[1])
        log.warning("%d quantized linears will load with weights that differ from the ones in memory by up to %.3g "
                    "(%s): their float32 scales are saved in the weights' dtype %s, as transformers and vLLM use "
                    "them; quantize with scales representable in %s for a bit-exact round trip", len(rounded),
                    worst[1], worst[0], dtype_name(modules[worst[0]].weight.dtype),
                    dtype_name(modules[worst[0]].weight.dtype))
    pruned = [n for n in (pruned or ()) if n in modules and isinstance(modules[n], nn.Linear)]
    sparsity: dict = {}
    if pruned:
        weights = [modules[n].weight.detach() for n in pruned]
        zeros = sum(int((w == 0).sum()) for w in weights)
        total = sum(w.numel() for w in weights)
        structure = "2:4" if all(is_two_four(w) for w in weights) else "unstructured"
        sparsity = DenseSparsityConfig(global_sparsity=zeros / total, sparsity_structure=structure,
                                       targets=pruned, ignore=[n for n in modules if n not in pruned and
                                                               isinstance(modules[n], nn.Linear)]).model_dump()
    if not groups and not sparsity:
        return state, None
    config: dict = {"quant_method": "compressed-tensors"}
    if groups:
        one = len(groups) == 1
        schemes = {}
        for i, ((bits, group_size), names) in enumerate(sorted(groups.items())):
            schemes[f"group_{i}"] = _scheme(bits, group_size or None, ["Linear"] if one else names)
        formats = {s.format for s in schemes.values()}
        qconfig = QuantizationConfig(config_groups=schemes, format=formats.pop() if len(formats) == 1 else
                                     "mixed-precision", quantization_status=QuantizationStatus.COMPRESSED,
                                     ignore=plain if one else [])
        config.update(qconfig.model_dump(exclude={"quant_method"}))
    import compressed_tensors

    config["version"] = compressed_tensors.__version__
    config["sparsity_config"] = sparsity
    return state, config


def save_compressed(model: nn.Module, tokenizer, directory: str, *, overwrite: bool = False,
                    protected: Sequence[str] = (), pruned: Optional[Iterable[str]] = None) -> Path:
    """Save ``model`` (unchanged) in the compressed-tensors format, its tokenizer and the save marker.

    See the module's docstring for the layout and :func:`~optima_plugin.loading.install_directory`
    for the checks and the all-or-nothing replacement. ``pruned``: the linears the run pruned
    (recorded in ``sparsity_config``). Load with ``AutoModelForCausalLM.from_pretrained(directory)``
    (needs ``compressed-tensors``) or serve with vLLM. Returns the resolved target.
    """
    require_compressed_tensors()
    state, config = compressed_state(model, pruned)

    def write(tmp: Path) -> None:
        restore_use_cache(model)
        model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if config is not None:
            path = tmp / "config.json"
            data = json.loads(path.read_text())
            data["quantization_config"] = config
            path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")

    return install_directory(directory, write, overwrite=overwrite, protected=protected)


SAVE_FORMATS = ("hf", "compressed-tensors")


def validate_config(config) -> None:
    """``--save_format``: a known name; compressed-tensors needs --save_model, no --stream and the library."""
    fmt = config.save_format
    if fmt not in SAVE_FORMATS:
        raise ValueError(f"--save_format must be one of {', '.join(SAVE_FORMATS)}, got {fmt!r}")
    if fmt == "hf":
        return
    if not config.save_model:
        raise ValueError(f"--save_format {fmt} describes the saved model: give --save_model DIR")
    if config.stream:
        raise ValueError(f"--save_format {fmt} packs the whole pruned model in memory, which --stream "
                         "(on by itself when the model is larger than the available RAM) does not hold: "
                         "give --no-stream, or save with --save_format hf")
    opt = config.plugin_options.get
    if opt("scale_important_weights"):
        raise ValueError(f"--scale_important_weights divides each input column of a weight by its own scale, which "
                         f"--save_format {fmt} cannot store: drop one of them")
    if opt("lora_rank"):
        raise ValueError(f"--lora_rank adds adapters that --save_format {fmt} cannot store (separate) "
                         "or that make the weights dense floats again (merged): drop --lora_rank, or save with "
                         "--save_format hf")
    try:
        require_compressed_tensors()
    except ImportError as e:
        raise ValueError(str(e)) from None
