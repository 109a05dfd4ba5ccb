"""``unet-ext info --kernels``: what each CUDA kernel in a built library costs, from its SASS,
without a GPU. For every kernel of every arch in the fatbin: registers, static shared memory,
local memory and stack (cuobjdump --dump-resource-usage), spill instructions (STL/LDL in the SASS)
and tensor-core instructions (HMMA: mma.sync, HGMMA: Hopper wgmma), from cuobjdump -sass.
Names are demangled and shortened (templates elided); --filter keeps kernels whose full name
contains a substring. Works on any file cuobjdump reads: the library, a .o, a cubin.
"""
import json
import re
import shutil
import subprocess
import sys

# SASS opcodes counted per kernel: tensor cores, and the local-memory traffic a spill makes.
COUNTED = ("HMMA", "HGMMA", "IMMA", "STL", "LDL")
_RESOURCE = re.compile(r"^\s*Function (\S+):\s*$")
_FIELDS = re.compile(r"(REG|STACK|SHARED|LOCAL):(\d+)")
_ARCH = re.compile(r"^\s*(?:arch = |code for )(sm_\w+)")
_SASS_FUNCTION = re.compile(r"^\s*Function : (\S+)")


def _arch_of(name):
    """sm_90a -> sm_90: cuobjdump releases disagree on whether the SASS and the resource listing
    of an arch-specific cubin carry the suffix, and the two must join on the same key."""
    return name.rstrip("af")
_OPCODE = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)(?:\.[A-Z0-9_.]*)?\b")


def parse_resource_usage(text):
    """{(arch, mangled): {REG, STACK, SHARED, LOCAL}} from cuobjdump --dump-resource-usage."""
    kernels, arch, name = {}, "?", None
    for line in text.splitlines():
        m = _ARCH.match(line)
        if m:
            arch = _arch_of(m.group(1))
            continue
        m = _RESOURCE.match(line)
        if m:
            name = m.group(1)
            continue
        if name is not None and "REG:" in line:
            kernels[(arch, name)] = {k: int(v) for k, v in _FIELDS.findall(line)}
            name = None
    return kernels


def parse_sass(lines):
    """{(arch, mangled): {opcode: count}} for COUNTED opcodes, from cuobjdump -sass output lines."""
    counts, arch, name = {}, "?", None
    for line in lines:
        m = _ARCH.match(line)
        if m:
            arch = _arch_of(m.group(1))
            continue
        m = _SASS_FUNCTION.match(line)
        if m:
            name = m.group(1)
            counts[(arch, name)] = dict.fromkeys(COUNTED, 0)
            continue
        if name is None:
            continue
        m = _OPCODE.search(line)
        if m and m.group(1) in COUNTED:
            counts[(arch, name)][m.group(1)] += 1
    return counts


def demangle(names):
    tool = shutil.which("c++filt")
    if not tool or not names:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def shorten(name, width=96):
    """Parameter lists and nested template arguments elided, the first level kept, so that
    instantiations stay apart: (anon)::tiled_kernel<8, 4>(...), cutlass::Kernel<cutlass::Conv<...>>(...)."""
    name = name.replace("(anonymous namespace)", "(anon)")
    out, depth, kinds = [], 0, []
    for i, ch in enumerate(name):
        if ch == "(" and name.startswith("(anon)", i) and not kinds:
            out.append("(anon)")
            kinds.append("skip")
            continue
        if ch in "<(":
            kinds.append(ch)
            if kinds == ["<"]:
                out.append(ch)
            elif kinds in (["("], ["<", "<"], ["<", "("]):  # params, or nested in the first template level
                out.append(ch + "..." + {"<": ">", "(": ")"}[ch])
        elif ch in ">)" and kinds:
            kind = kinds.pop()
            if kind == "<" and not kinds:
                out.append(">")
        elif not kinds or (len(kinds) == 1 and kinds[0] == "<"):
            out.append(ch)
    short = "".join(out)
    return short if len(short) <= width else short[:width - 3] + "..."


def collect(library, tool):
    """One row per (arch, kernel): resource usage joined with the SASS opcode counts."""
    usage = subprocess.run([tool, "--dump-resource-usage", library], capture_output=True, text=True)
    if "does not contain device code" in usage.stderr:
        return []
    if usage.returncode != 0:
        raise RuntimeError(f"{tool} --dump-resource-usage {library}: {usage.stderr.strip()}")
    resources = parse_resource_usage(usage.stdout)
    # The SASS of a CUTLASS-heavy library is hundreds of MB of text: streamed, not held.
    with subprocess.Popen([tool, "-sass", library], stdout=subprocess.PIPE, text=True,
                          stderr=subprocess.DEVNULL) as proc:
        sass = parse_sass(proc.stdout)
    names = demangle(sorted({name for _, name in resources} | {name for _, name in sass}))
    rows = []
    for key in sorted(set(resources) | set(sass), key=lambda k: (k[0], names[k[1]])):
        arch, mangled = key
        rows.append(dict(arch=arch, kernel=names[mangled], mangled=mangled,
                         **{f: resources.get(key, {}).get(f) for f in ("REG", "SHARED", "LOCAL", "STACK")},
                         **sass.get(key, dict.fromkeys(COUNTED, None))))
    return rows


def table(rows, width=96):
    head = ["arch", "REG", "SHARED", "LOCAL", "STACK", "STL", "LDL", "HMMA", "HGMMA", "kernel"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["arch"]] + ["—" if r[k] is None else str(r[k]) for k in head[1:-1]] + [shorten(r["kernel"], width)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(library, tool, name_filter=None, as_json=False, width=96):
    """Prints the table (or JSON); returns 0, or 1 when the library has no CUDA kernels."""
    if tool is None:
        sys.stderr.write("unet-ext info --kernels: cuobjdump not found (CUDA_HOME/bin, PATH, or the "
                         "triton package that CUDA builds of torch bring)\n")
        return 1
    rows = collect(library, tool)
    if name_filter:
        rows = [r for r in rows if name_filter in r["kernel"] or name_filter in r["mangled"]]
    if not rows:
        sys.stderr.write(f"unet-ext info --kernels: no CUDA kernels in {library}"
                         f"{' matching ' + repr(name_filter) if name_filter else ' (a CPU-only build?)'}\n")
        return 1
    if as_json:
        json.dump(rows, sys.stdout, indent=1)
        print()
        return 0
    print(f"{library}: {len(rows)} kernels (STL/LDL: spill stores/loads; HMMA: mma.sync; HGMMA: wgmma)")
    print(table(rows, width))
    spills = [r for r in rows if r["LOCAL"] or r["STL"]]
    print(f"\n{len(spills)} kernel(s) with local memory or spill stores"
          + (": " + ", ".join(f"{shorten(r['kernel'], 60)} [{r['arch']}]" for r in spills[:5]) if spills else ""))
    return 0
