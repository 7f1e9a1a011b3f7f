#!/usr/bin/env python3
"""Reports import cycles between the modules of each crate in the workspace.

A module depends on another when it names it in a path (`use crate::a::b`, `super::x`,
`crate::a::f()` inline). Every crate's module graph must be acyclic: a cycle here is
how logic and its drivers start to need each other. Exit 1 when a cycle is found.
"""
import os
import re
import sys

CRATES = ["actors/core/src", "actors/src", "codecs/src", "switch/src", "loadtest/src"]


def modules(src):
    mods = {}
    for root, _, files in os.walk(src):
        for f in files:
            if not f.endswith(".rs"):
                continue
            path = os.path.join(root, f)
            rel = os.path.relpath(path, src)[:-3].split(os.sep)
            if rel[-1] in ("mod", "lib", "main"):
                rel = rel[:-1]
            if rel and rel[0] == "bin":
                continue
            mods[tuple(rel)] = path
    return mods


def strip_tests(text):
    # Test modules may use anything; the graph is about the code that ships.
    out, depth, skipping = [], 0, False
    lines = text.split("\n")
    i = 0
    while i < len(lines):
        line = lines[i]
        if not skipping and line.strip() == "#[cfg(test)]" and i + 1 < len(lines) and re.match(r"\s*mod \w+ \{", lines[i + 1]):
            skipping, depth = True, 0
            i += 1
            continue
        if skipping:
            depth += line.count("{") - line.count("}")
            if depth <= 0 and "}" in line:
                skipping = False
            i += 1
            continue
        out.append(line)
        i += 1
    return "\n".join(out)


REEXPORTS = {}


def reexports(mods):
    """Names a module re-exports from one of its children (`pub use child::{A, B}`)."""
    out = {}
    for m, path in mods.items():
        text = open(path, encoding="utf-8").read()
        for mm in re.finditer(r"pub use (\w+)::(\{[^}]*\}|\w+)", text):
            child = m + (mm.group(1),)
            if child in mods:
                for name in re.findall(r"\w+", mm.group(2)):
                    out[m + (name,)] = child
    return out


def resolve(mods, here, path):
    parts = path.split("::")
    if parts[0] == "crate":
        base, rest = (), parts[1:]
    elif parts[0] in ("super", "self"):
        base = list(here)
        while parts and parts[0] in ("super", "self"):
            if parts[0] == "super":
                base = base[:-1]
            parts = parts[1:]
        base, rest = tuple(base), parts
    else:
        return None
    best = base if base in mods else None
    cur = base
    for p in rest:
        cur = cur + (p,)
        if cur in mods:
            best = cur
        elif cur in REEXPORTS:
            best = REEXPORTS[cur]
            break
        else:
            break
    return best


def cycles(src):
    mods = modules(src)
    REEXPORTS.clear()
    REEXPORTS.update(reexports(mods))
    test_only = set()
    graph = {m: set() for m in mods}
    for m, path in mods.items():
        text = open(path, encoding="utf-8").read()
        if "#![cfg(test)]" in text or m and m[-1].endswith("tests"):
            test_only.add(m)
        text = strip_tests(text)
        # Comments (docs included) name modules without depending on them.
        text = re.sub(r"//[^\n]*", "", text)
        # A plain `use child::x` in a module names its child module.
        for mm in re.finditer(r"\buse (\w+)::", text):
            child = m + (mm.group(1),)
            if child in mods:
                graph[m].add(child)
        for mm in re.finditer(r"\b((?:crate|super|self)(?:::\w+)+)", text):
            target = resolve(mods, m, mm.group(1))
            if target is not None and target != m:
                graph[m].add(target)
        # `use super::{a, b}` / `use crate::x::{a, b}` groups
        for mm in re.finditer(r"\b((?:crate|super|self)(?:::\w+)*)::\{([^}]*)\}", text):
            for name in re.findall(r"\w+", mm.group(2)):
                target = resolve(mods, m, mm.group(1) + "::" + name)
                if target is not None and target != m:
                    graph[m].add(target)
    for m in test_only:
        graph.pop(m, None)
    for m in graph:
        graph[m] -= test_only
    # Tarjan's strongly connected components.
    index, low, stack, on, out, n = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = n[0]
        n[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(comp)

    sys.setrecursionlimit(10000)
    for v in list(graph):
        if v not in index:
            visit(v)
    return out


def main():
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    bad = 0
    for crate in CRATES:
        for comp in cycles(os.path.join(root, crate)):
            bad += 1
            names = sorted("::".join(c) or "<root>" for c in comp)
            print(f"import cycle in {crate}: {' <-> '.join(names)}")
    if bad:
        sys.exit(1)
    print("no import cycles in", ", ".join(CRATES))


if __name__ == "__main__":
    main()
