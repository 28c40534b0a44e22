"""The profile as a markdown table (the JSON is the rows themselves)."""

from __future__ import annotations

CHECKS = ("no_spills", "no_global_atomics", "tensor_core_dots")
LABEL = ("Static compile profile for sm_90 (H100/H200), no GPU: what ptxas and the SASS say, not "
         "a timing.")


def _dots(row) -> str:
    """Dot count by lowering; a dot cloned by the pipeliner (same line and shape) counts once."""
    kinds: dict[str, int] = {}
    for _, kind in {(d["where"], d["m"], d["n"], d["k"], d["kind"]): d["kind"]
                    for d in row.get("dots", [])}.items():
        kinds[kind] = kinds.get(kind, 0) + 1
    return " ".join(f"{k} {v}" for k, v in sorted(kinds.items())) or "-"


def _checks(row) -> str:
    if "error" in row:
        return "**does not compile**"
    bad = [c for c in CHECKS if not row["checks"].get(c, True)]
    names = {"no_spills": "spills", "no_global_atomics": "atomics", "tensor_core_dots": "FMA dot"}
    return "ok" if not bad else "**" + ", ".join(names[c] for c in bad) + "**"


def triton_table(rows: list[dict]) -> list[str]:
    out = ["| kernel | config | grid | regs | spill st/ld B | smem KiB | CTAs/SM (limit) | waves "
           "| dots | HGMMA | HMMA | FFMA | TMA loads | atomics | gate |",
           "| --- | --- | ---: | ---: | ---: | ---: | --- | ---: | --- | ---: | ---: | ---: | ---: "
           "| ---: | --- |"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['kernel']} | {r['config']} | | | | | | | | | | | | | "
                       f"**does not compile**: {r['error'][:120]} |")
            continue
        s = r["sass"]
        atom = s["ATOMG"] + s["REDG"] + s["RED"] + s["ATOM"]
        out.append(
            f"| {r['kernel']} | {r['config']} | {r['grid']} | {r['regs']} | "
            f"{r['spill_stores']}/{r['spill_loads']} | {r['smem'] / 1024:.1f} | "
            f"{r['ctas_per_sm']} ({r['occupancy_limit']}) | {r['waves']} | {_dots(r)} | "
            f"{s['HGMMA']} | {s['HMMA']} | {s['FFMA']} | {s.get('UTMALDG', 0)} | {atom} | "
            f"{_checks(r)} |")
    return out


def failing_dots(rows: list[dict]) -> list[str]:
    seen: dict[tuple, list[str]] = {}
    for r in rows:
        for d in r.get("failing_dots", []):
            seen.setdefault((r["kernel"], d), []).append(r["config"])
    return [f"- `{k}` {d} (in {len(cfgs)} config{'s' if len(cfgs) > 1 else ''})"
            for (k, d), cfgs in seen.items()]


def cuda_table(rows: list[dict]) -> list[str]:
    out = ["| file | kernel | threads | regs | spill st/ld B | static smem KiB | CTAs/SM by regs "
           "| HGMMA | HMMA | FFMA | atomics | gate |",
           "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        s = r["sass"]
        atom = s["ATOMG"] + s["REDG"] + s["RED"] + s["ATOM"]
        bad = [n for c, n in (("no_spills", "spills"), ("no_global_atomics", "atomics"))
               if not r["checks"][c]]
        gate = "ok" if not bad else "**" + ", ".join(bad) + "**"
        out.append(
            f"| {r['file']} | `{r['kernel']}` | {r['threads'] or '?'} | {r['regs']} | "
            f"{r['spill_stores']}/{r['spill_loads']} | {r['static_smem'] / 1024:.1f} | "
            f"{r['ctas_per_sm_by_regs'] if r['ctas_per_sm_by_regs'] is not None else '?'} | "
            f"{s['HGMMA']} | {s['HMMA']} | {s['FFMA']} | {atom} | {gate} |")
    return out


def markdown(doc: dict) -> str:
    lines = [f"# sm_90 static profile ({doc['title']})", "", LABEL, "",
             f"Produced by `{doc['command']}`. Toolchain: {doc['toolchain']}.", ""]
    lines += [
        "Columns: `grid` CTAs of the launch at the case's shape; `regs` per thread; `spill` bytes "
        "of local-memory spill stores/loads (ptxas); `smem` shared memory per CTA; `CTAs/SM` "
        "resident per SM from registers, shared memory (228 KiB per SM, 227 per CTA, 1 KiB "
        "reserved per CTA), warps (64) and the 32-CTA cap, with the limiting one; `waves` = grid "
        "/ (CTAs/SM x 132 SMs); `dots` the kernel's dots after Triton's layout passes (`wgmma` = "
        "Hopper tensor cores, `mma.sync` = Ampere-style tensor cores, `fma` = CUDA cores); "
        "HGMMA/HMMA/FFMA/TMA loads (UTMALDG)/atomics = static SASS instruction counts (atomics: "
        "ATOMG, REDG, RED, ATOM). `gate`: what `tests/test_sm90_gate.py` checks (no spills, no global atomics, "
        "every dot with K >= 16 on tensor cores).", ""]
    summary = doc.get("summary")
    if summary:
        lines += ["## Summary", "", "| case | kernel x config rows | spills | global atomics | "
                  "FMA dots (K >= 16) | do not compile |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
        gated = {c["name"] for c in doc["cases"] if c["gate"]}
        for case, s in summary.items():
            name = f"{case} (gated)" if case in gated else case
            lines.append(f"| {name} | {s['rows']} | {s['no_spills']} | {s['no_global_atomics']} | "
                         f"{s['tensor_core_dots']} | {s['errors']} |")
        lines.append("")
    for case in doc["cases"]:
        rows = [r for r in doc["triton"] if r["case"] == case["name"]]
        if not rows:
            continue
        lines += [f"## Triton: {case['name']}{' (gated)' if case['gate'] else ''}", "",
                  case["doc"] + ".", ""]
        lines += triton_table(rows)
        bad = failing_dots(rows)
        if bad:
            lines += ["", "Dots with K >= 16 not on tensor cores (source line > inlined helper "
                      "lines, M x N x K, operand type, lowering):", ""] + bad
        lines.append("")
    if doc.get("cuda"):
        lines += ["## CUDA (csrc/)", "", doc.get("cuda_note", ""), ""]
        lines += cuda_table(doc["cuda"])
        lines.append("")
    return "\n".join(lines)


def summarise(rows: list[dict]) -> dict:
    out: dict[str, dict] = {}
    for r in rows:
        s = out.setdefault(r["case"], {"rows": 0, **dict.fromkeys(CHECKS, 0), "errors": 0})
        s["rows"] += 1
        if "error" in r:
            s["errors"] += 1
            continue
        for c in CHECKS:
            s[c] += not r["checks"][c]
    return out
