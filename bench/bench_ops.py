#!/usr/bin/env python3
"""Microbenchmarks of adaskip.ops: `adaskip bench kernels` (adaskip/benchmarks/kernels.py) with
this script's defaults: the JSON goes to bench/results/ops-<device>-<date>.json on a GPU
(ffn-gated-... with --only-ffn), nowhere on a CPU unless --out is given.

    python bench/bench_ops.py [--out FILE.json] [--quick] [--only-ffn | --no-ffn]
"""
from __future__ import annotations

import argparse

import torch
from common import RESULTS  # also puts the checkout on sys.path

from adaskip.benchmarks import kernels
from adaskip.benchmarks.common import output_path, write_json


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=kernels.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    kernels.add_arguments(p)
    args = p.parse_args(argv)
    try:
        result = kernels.run(args)
    except ValueError as e:
        raise SystemExit(f"adaskip: {e}") from None
    prefix = kernels.result_prefix(args)
    # A GPU run is a measurement worth keeping: into bench/results by default. A CPU run is not.
    out = output_path(args.out, args.out_dir, prefix, result["device"],
                      RESULTS if torch.cuda.is_available() else None)
    if out is not None:
        write_json(out, result)


if __name__ == "__main__":
    main()
