"""Low-rank adapters: a rank-``k`` correction ``L R`` of a compressed linear's error.

A linear compressed from dense ``W`` (``r x d``) to ``Ŵ`` (pruned, maybe quantized) has the
error ``E = W - Ŵ``; the adapter ``L`` (``r x k``), ``R`` (``k x d``) minimises the layer
objective of what is left, ``tr((E - L R) H (E - L R)ᵀ)``, ``H`` the ``d x d`` mean of ``x xᵀ``:

* ``exact``: with ``H = C Cᵀ`` (Cholesky of the damped ``H``), the objective is
  ``‖(E - L R) C‖²_F``; Eckart–Young gives ``L R = [E C]_k C⁻¹`` from the SVD of ``E C``
  (the optimum under ``H``; SVD of ``E H^{1/2}`` in the issue's words, any square root works);
* ``slim``: the SLiM reference's heuristic, the SVD of ``E diag(sqrt(H_jj))``, mapped back
  with ``diag(sqrt(H_jj))⁻¹`` (optimal only when ``H`` is diagonal).

The singular values are split evenly: ``L = U_k S_k^{1/2}``, ``R = S_k^{1/2} V_kᵀ (...)``.
An adapter either merges into the weight (``W ← Ŵ + L R``, dense again) or stays separate
(``--separate_lora``): then it is a :class:`LowRankAdapter` child ``optima_lowrank`` of the
linear, whose forward hook adds ``(x Rᵀ) Lᵀ`` to the linear's output; its tensors are
non-persistent buffers (they move with ``.to()``; they are not in the ``state_dict`` that
``save_pretrained`` writes) and are saved beside the model in :data:`ADAPTER_FILE`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .options import OptionParser
from .solvers.problem import cholesky_checked, damp_hessian, escalate_damp
from .sparsity import nm_mask, parse_pattern

#: the file beside a saved model holding its separate adapters: ``<linear>.lora_left`` / ``.lora_right``
ADAPTER_FILE = "lowrank_adapters.safetensors"
#: the child module name of a linear's separate adapter
ADAPTER_ATTR = "optima_lowrank"
METHODS = ("exact", "slim")


def addoption(parser: OptionParser) -> None:
    group = parser.getgroup("lowrank", "low-rank adapters (--lora_rank; fitted to each layer's compression error)")
    group.addoption("lora_rank", type=float, default=0.0,
                    help="adapter rank as a fraction of min(rows, columns) of each linear (0: no adapters)",
                    check=lambda v: 0.0 <= v <= 1.0, requirement="must be in [0, 1]")
    group.addoption("lowrank", type=str, default="exact", choices=METHODS,
                    help="exact: optimal under the layer Hessian; slim: the SLiM reference's diag-scaled SVD")
    group.addoption("separate_lora", type=bool,
                    help="keep L, R beside each linear (saved in lowrank_adapters.safetensors) instead of "
                    "merging L R into its weight (which makes the weight dense again)")
    group.addoption("quantize_lora", type=bool, help="fake-quantize L and R (AbsMax per tile, --bitwidth bits)")
    group.addoption("lora_tile_size", type=int, default=256, help="entries per AbsMax tile of L and R",
                    check=lambda v: v >= 1, requirement="must be >= 1")
    group.addoption("prune_lora", type=bool, help="2:4-prune L (largest |L| kept), then refit R (needs 2:4)")
    group.addoption("pad_lora", type=bool, help="pad the rank with zero columns of L / rows of R to a multiple "
                    "of --lora_tile_size")


@dataclass
class LowRank:
    """``left`` (``r x k``) and ``right`` (``k x d``), float32; the correction is ``left @ right``."""

    left: Tensor
    right: Tensor

    @property
    def rank(self) -> int:
        return self.left.shape[1]

    def product(self) -> Tensor:
        return self.left @ self.right


def rank_of(fraction: float, shape: tuple[int, int]) -> int:
    """The rank for ``--lora_rank fraction`` on an ``r x d`` linear: ``round(fraction * min(r, d))``, at least 1."""
    return max(1, min(min(shape), int(round(fraction * min(shape)))))


def _split(u: Tensor, s: Tensor, vh: Tensor, k: int) -> tuple[Tensor, Tensor]:
    root = s[:k].sqrt()
    return u[:, :k] * root, root.unsqueeze(1) * vh[:k]


def exact_lowrank(error: Tensor, hessian: Tensor, rank: int, damp: float = 0.01) -> tuple[LowRank, float]:
    """The rank-``rank`` ``L R`` minimising ``tr((E - L R) Hd (E - L R)ᵀ)``; returns ``(adapter, damp used)``.

    ``error``: ``r x d``; ``hessian``: ``d x d`` (damped as the solvers damp it, see
    :func:`~optima_plugin.solvers.problem.damp_hessian`, escalated if Cholesky fails).
    Computed in float64 when ``hessian`` is, float32 otherwise.
    """
    dtype = torch.float64 if hessian.dtype == torch.float64 else torch.float32
    e = error.to(dtype)
    h = hessian.to(device=e.device, dtype=dtype)
    h = 0.5 * (h + h.T)
    chol, used = escalate_damp(lambda dmp, last: cholesky_checked(damp_hessian(h, dmp)), damp,
                               what="low-rank: damped Hessian")
    u, s, vh = torch.linalg.svd(e @ chol, full_matrices=False)
    left, right_c = _split(u, s, vh, rank)
    right = torch.linalg.solve_triangular(chol, right_c, upper=False, left=False)  # right_c C⁻¹
    return LowRank(left.float(), right.float()), used


def slim_lowrank(error: Tensor, hessian: Tensor, rank: int) -> LowRank:
    """SLiM's adapter: SVD of ``E diag(sqrt(H_jj))``, mapped back (dead inputs, ``H_jj = 0``, scaled by 1)."""
    e = error.float()
    scale = hessian.diagonal().float().to(e.device).clamp_min(0).sqrt()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    u, s, vh = torch.linalg.svd(e * scale, full_matrices=False)
    left, right = _split(u, s, vh, rank)
    return LowRank(left, right / scale)


def prune_left(adapter: LowRank, error: Tensor) -> LowRank:
    """2:4-prune ``left`` (largest ``|L|`` of each 4 along the rank kept; rank padded to a multiple of 4),
    then refit ``right`` by least squares, ``min_R ‖(E - L R) C‖`` = ``(LᵀL)⁺ Lᵀ E`` for any invertible ``C``."""
    left, right = adapter.left, adapter.right
    pad = -left.shape[1] % 4
    if pad:
        left = torch.nn.functional.pad(left, (0, pad))
    left = left.masked_fill(nm_mask(left.abs(), parse_pattern("2:4")), 0.0)
    right = torch.linalg.lstsq(left.double(), error.double(), driver="gelsd").solution.float()
    return LowRank(left, right)


def pad_rank(adapter: LowRank, multiple: int) -> LowRank:
    """Zero columns of ``left`` and rows of ``right`` up to a rank that is a multiple of ``multiple``."""
    pad = -adapter.rank % multiple
    if not pad:
        return adapter
    return LowRank(torch.nn.functional.pad(adapter.left, (0, pad)),
                   torch.nn.functional.pad(adapter.right, (0, 0, 0, pad)))


def quantize_tiles(matrix: Tensor, bits: int, tile: int) -> Tensor:
    """AbsMax fake quantization of ``matrix`` by tiles of ``tile`` consecutive entries of each row."""
    from .quantizers.grid import absmax_scale, quantize_grouped

    group = min(tile, matrix.shape[1])
    return quantize_grouped(matrix, absmax_scale(matrix, bits, group), bits, group)


class LowRankAdapter(nn.Module):
    """A separate adapter of one linear: ``forward(x) = (x Rᵀ) Lᵀ``, added to the linear's output by a hook.

    ``left``/``right`` are non-persistent buffers in the linear's dtype.
    """

    def __init__(self, left: Tensor, right: Tensor) -> None:
        super().__init__()
        self.register_buffer("left", left, persistent=False)
        self.register_buffer("right", right, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.linear(nn.functional.linear(x, self.right), self.left)


def _add_adapter_output(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
    return output + getattr(module, ADAPTER_ATTR)(args[0])


def attach(linear: nn.Linear, left: Tensor, right: Tensor) -> LowRankAdapter:
    """Give ``linear`` the separate adapter ``(left, right)`` (replacing an earlier one); returns it."""
    dtype, device = linear.weight.dtype, linear.weight.device
    adapter = LowRankAdapter(left.to(device=device, dtype=dtype).contiguous(),  # the layout a reload gives
                             right.to(device=device, dtype=dtype).contiguous())
    had = isinstance(getattr(linear, ADAPTER_ATTR, None), LowRankAdapter)
    linear.add_module(ADAPTER_ATTR, adapter)
    if not had:
        linear.register_forward_hook(_add_adapter_output)
    return adapter


def adapters(model: nn.Module) -> dict[str, LowRankAdapter]:
    """``{linear name: adapter}`` of every separate adapter in ``model``."""
    suffix = "." + ADAPTER_ATTR
    return {name[: -len(suffix)]: m for name, m in model.named_modules()
            if isinstance(m, LowRankAdapter) and name.endswith(suffix)}


def save_adapters(model: nn.Module, directory: Path) -> int:
    """Write the separate adapters of ``model`` to ``directory/ADAPTER_FILE``; returns how many (0: no file)."""
    found = adapters(model)
    if not found:
        return 0
    tensors = {}
    for name, adapter in found.items():
        tensors[f"{name}.lora_left"] = adapter.left.detach().to("cpu").contiguous()
        tensors[f"{name}.lora_right"] = adapter.right.detach().to("cpu").contiguous()
    save_file(tensors, str(Path(directory) / ADAPTER_FILE), metadata={"format": "optima_lowrank/1"})
    return len(found)


def load_adapters(model: nn.Module, directory: str | Path) -> int:
    """Attach the adapters of ``directory/ADAPTER_FILE`` (if present) to ``model``'s linears; returns how many.

    ``ValueError`` naming the layer for an adapter whose linear is missing or whose shapes do not fit.
    """
    path = Path(directory) / ADAPTER_FILE
    if not path.is_file():
        return 0
    tensors = load_file(str(path))
    modules = dict(model.named_modules())
    names = sorted({k.rsplit(".", 1)[0] for k in tensors})
    for name in names:
        linear = modules.get(name)
        left, right = tensors.get(f"{name}.lora_left"), tensors.get(f"{name}.lora_right")
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"{path}: adapter {name} names no linear layer of the model")
        if left is None or right is None or left.shape[0] != linear.out_features \
                or right.shape[1] != linear.in_features or left.shape[1] != right.shape[0]:
            raise ValueError(f"{path}: the adapter of {name} does not fit the layer's "
                             f"{linear.out_features} x {linear.in_features} weight")
        attach(linear, left, right)
    return len(names)


def fit(error: Tensor, hessian: Tensor, *, fraction: float, method: str, damp: float,
        prune: bool = False, quantize_bits: Optional[int] = None, tile: int = 256, pad: bool = False) -> tuple[LowRank, dict]:
    """The adapter of one layer's ``error`` (``r x d``) as the options say: fit, then 2:4-prune ``L`` and
    refit, then fake-quantize, then pad. Returns ``(adapter, figures)``."""
    k = rank_of(fraction, tuple(error.shape))
    stats: dict = {"rank": k, "method": method}
    if method == "exact":
        adapter, stats["damp"] = exact_lowrank(error, hessian, k, damp)
    elif method == "slim":
        adapter = slim_lowrank(error, hessian, k)
    else:
        raise ValueError(f"--lowrank must be one of {', '.join(METHODS)}, got {method!r}")
    if prune:
        adapter = prune_left(adapter, error)
    if quantize_bits is not None:
        adapter = LowRank(quantize_tiles(adapter.left, quantize_bits, tile),
                          quantize_tiles(adapter.right, quantize_bits, tile))
    if pad:
        adapter = pad_rank(adapter, tile)
    stats["stored_rank"] = adapter.rank
    stats["parameters"] = adapter.left.numel() + adapter.right.numel()
    return adapter, stats


__all__ = ["ADAPTER_FILE", "LowRank", "LowRankAdapter", "adapters", "attach", "exact_lowrank", "fit",
           "load_adapters", "rank_of", "save_adapters", "slim_lowrank"]
