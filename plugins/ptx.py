"""PTX text surgery for AOT kernels (no GPU, no Triton needed)."""

from __future__ import annotations

import re

_ENTRY = re.compile(r"\.entry\s+(?P<name>[\w$]+)\s*\((?P<params>[^)]*)\)", re.S)


def strip_unused_trailing_params(ptx: str, name: str, keep: int) -> str:
    """Drop entry parameters after the first ``keep`` that the body never reads.

    Triton appends scratch-buffer pointers to every kernel's parameter list; TensorRT passes
    only the plugin's own arguments, so the kernel must declare exactly those. A trailing
    parameter that the body reads is an error (the kernel really needs it)."""
    match = next((m for m in _ENTRY.finditer(ptx) if m.group("name") == name), None)
    if match is None:
        raise ValueError(f"kernel entry {name!r} not found in the PTX")
    params = [p.strip() for p in match.group("params").split(",") if p.strip()]
    body = ptx[match.end():]
    for param in params[keep:]:
        ident = param.split()[-1]
        if re.search(rf"\[{re.escape(ident)}(\+\d+)?\]", body):
            raise ValueError(f"kernel {name!r} reads its parameter {ident!r} beyond the {keep} TensorRT passes")
    kept = ",\n\t".join(params[:keep])
    return ptx[:match.start("params")] + "\n\t" + kept + "\n" + ptx[match.end("params"):]
