"""How a case's dtype ran, read back from its row: natively, or emulated.

Probes record ``extra.native`` (bool) and ``extra.native_via`` (one line) for a dtype
whose arithmetic a CPU may lack (probes/native.py); an emulated case (``native:
false``) was computed through fp32 and judged against the fp32 peak (``extra.judged_against``).
``show`` and the run report mark such cases with :data:`MARK`, since its rate is not
that of the dtype's own arithmetic and a comparison with a CPU that has it is between
two different paths. Runs written before the key existed carry no marker.
"""

from __future__ import annotations

from harness.results import json_object

#: The marker shown next to an emulated case (cases table of ``show`` and the report).
MARK = "emulated"


def emulated(row: dict) -> str | None:
    """For a cases row (dict; ``extra`` as JSON text or a dict) whose dtype ran without
    native arithmetic: the note to show, e.g. "bf16 emulated via fp32 upcast: no
    avx512_bf16/... on this CPU; judged against the fp32 peak (...)". None for a native
    case, a case without the key (fp32, GPUs, older runs) or an unreadable extra."""
    extra = json_object(row.get("extra"))
    if extra.get("native") is not False:
        return None
    via = str(extra.get("native_via") or f"{row.get('dtype') or 'dtype'} without native arithmetic")
    judged = extra.get("judged_against")
    return f"{via}; judged against the {judged}" if judged else via
