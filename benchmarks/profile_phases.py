"""Where a prune's time goes: the demo prune of SmolLM2-135M and its per-phase timings (the report's
``timings.phases``) as shares of the phases' total and of ``prune_seconds``.

Phases (self time: a nested phase pauses its parent): ``calibration`` (windows, model to the device),
``allocation``, ``capture``, ``statistics`` (forwards with hooks), ``hessian`` (the hooks' accumulation),
``allreduce`` (torchrun), ``selection``, ``update`` (the solve; PCG iterations summed below), ``refinement``,
``objectives``, ``compression``, ``propagation``, ``checkpoint``, ``stream``; after the prune ``evaluation``
and ``save``. On CUDA the clock is the host's: an asynchronous kernel counts in the phase that waits for it.

    OMP_NUM_THREADS=1 python benchmarks/profile_phases.py --nsamples 8 --seqlen 256      # CPU, about a minute
    python benchmarks/profile_phases.py --device cuda --nsamples 128 --seqlen 2048 --eval_ppl pydoc
    python benchmarks/profile_phases.py --nsamples 16 --prune_method sparsegpt --weight_update native  # its own update
"""

from __future__ import annotations

import argparse

from optima_plugin import prune
from optima_plugin.loading import default_model, load_model


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--nsamples", type=int, default=32, help="calibration windows (fewer: faster)")
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--sparsity_type", default="unstructured")
    ap.add_argument("--sparsity_ratio", type=float, default=0.5)
    ap.add_argument("--prune_method", default="wanda")
    ap.add_argument("--weight_update", default="optima", help="none, native (the selector's own) or optima")
    ap.add_argument("--eval_ppl", default=None, help="also time the perplexity evaluation (e.g. pydoc)")
    args = ap.parse_args(argv)
    directory, gguf = default_model()
    model, tok = load_model(directory, gguf_file=gguf)
    evaluation = dict(eval_ppl=args.eval_ppl, eval_max_windows=8) if args.eval_ppl else {}
    report = prune(model, tok, nsamples=args.nsamples, seqlen=args.seqlen, device=args.device,
                   sparsity_type=args.sparsity_type, sparsity_ratio=args.sparsity_ratio, prune_method=args.prune_method,
                   weight_update=args.weight_update, progress=False, **evaluation)
    t = report["timings"]
    phases, prune_s = t["phases"], t["prune_seconds"]
    total = sum(phases.values())
    print(f"SmolLM2-135M {args.prune_method}+{args.weight_update} {args.sparsity_type} {args.sparsity_ratio:g} on "
          f"{report['device']}, {args.nsamples} x {args.seqlen} tokens: prune {prune_s:.1f} s, "
          f"phases {total:.1f} s, solver iterations {t['solver_iterations']}")
    print(f"{'phase':12} {'seconds':>9} {'% phases':>9} {'% prune':>8}")
    for name, s in sorted(phases.items(), key=lambda kv: -kv[1]):
        inside = name not in ("evaluation", "save")  # those run after prune_seconds
        print(f"{name:12} {s:9.2f} {100 * s / total:9.1f} " + (f"{100 * s / prune_s:8.1f}" if inside else f"{'-':>8}"))
    covered = sum(s for name, s in phases.items() if name not in ("evaluation", "save"))
    print(f"{'(untimed)':12} {prune_s - covered:9.2f} {'':9} {100 * (prune_s - covered) / prune_s:8.1f}")


if __name__ == "__main__":
    main()
