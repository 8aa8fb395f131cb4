"""Helpers the examples share."""
from __future__ import annotations

from typing import List


def shiftquant_options(bits: int, execution: str = "auto") -> dict:
    """W/A/G = ``bits`` with as many ShiftQuant groups (up to 4) as fit one int8 GEMM:
    4 bits G=4, 6 bits G=3, 8 bits G=1; L1 norms (the default).  ``execution="simulate"``
    computes the same numbers with float GEMMs on dequantized values (faster on CPU for convs)."""
    from sqcompile.numerics import fits_int8

    groups = max(g for g in range(1, 5) if fits_int8(bits, g))
    return {"weight_bits": bits, "act_bits": bits, "grad_bits": bits, "groups": groups, "execution": execution}


def print_accuracy_table(results: List[dict]) -> None:
    """The run / test accuracy / gap to float / time table of the classification examples."""
    from tabulate import tabulate

    base = next((r["value"] for r in results if r["bits"] is None), None)
    rows = [[r["run"], f"{r['value']:.2f}", "" if base is None else f"{r['value'] - base:+.2f}",
             f"{r['seconds']:.0f}"] for r in results]
    print()
    print(tabulate(rows, headers=["run", "test acc %", "vs float (points)", "time s"], tablefmt="github",
                   disable_numparse=True))
