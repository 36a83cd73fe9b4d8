#!/usr/bin/env python3
"""Docs are code: every repository path and every command-line flag that README.md and docs/ name
must exist. Paths: `code spans` and link targets that look like files or folders of this
repository. Flags: `--name` in code spans and code blocks, checked against the flags the project's
programs define (server, CLI, benchmarks and their Python scripts, Python tools, scripts). Exit 1 with a list of what is
missing.  scripts/check_docs.py [--root DIR]
"""
from __future__ import annotations

import argparse
import glob
import os
import re
import sys

# Files that are written by the build, the benchmarks or the documented commands themselves.
GENERATED = ("build/", ".devbin/", "build-fuzz/", "quality-report", "/tmp/", "out/", "docs/quality/")
# Folders of the evaluation data (../shared/data, --data) and of an installed prefix.
ELSEWHERE = ("leval/", "niah_essays/", "aime2025/", "bin/", "share/kvcompact/")
EXTENSIONS = (".md", ".cc", ".h", ".cu", ".cuh", ".py", ".sh", ".yaml", ".yml", ".json", ".proto", ".txt", ".toml")


def docs(root: str) -> list[str]:
    return [os.path.join(root, "README.md"), *sorted(glob.glob(os.path.join(root, "docs", "*.md"))),
            *sorted(glob.glob(os.path.join(root, "client", "python", "README.md"))),
            *sorted(glob.glob(os.path.join(root, "kernels", "README.md")))]


def code_text(text: str) -> list[str]:
    """Code spans and fenced blocks of a markdown text."""
    blocks = re.findall(r"```.*?\n(.*?)```", text, re.S)
    spans = re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S))
    return blocks + spans


def path_candidates(text: str) -> set[str]:
    found = set()
    for span in re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S)):
        token = span.strip()
        if " " in token or not re.fullmatch(r"[A-Za-z0-9_.\-/]+", token):
            continue
        if "/" in token and not token.startswith(("/", "-", "http")) or token.endswith(EXTENSIONS) and "/" in token:
            found.add(token)
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if not target.startswith(("http:", "https:", "mailto:")):
            found.add(target)
    return found


def exists(root: str, base: str, path: str) -> bool:
    """Relative to the repository or to the document; `x.h/.cc` names x.h and x.cc; a bare
    sub-folder (`e2e/` in a list of tests/' folders) may sit one level down."""
    clean = path.rstrip("/")
    m = re.fullmatch(r"(.+?)(\.\w+)/(\.\w+)", clean)
    if m:
        return all(exists(root, base, m.group(1) + ext) for ext in (m.group(2), m.group(3)))
    if os.path.exists(os.path.join(root, clean)) or os.path.exists(os.path.join(base, clean)):
        return True
    return "/" not in clean and any(os.path.isdir(os.path.join(root, top, clean)) for top in os.listdir(root))


def flag_names(text: str) -> set[str]:
    names = set()
    for code in code_text(text):
        names |= set(re.findall(r"(?<![\w-])--([a-z][a-z0-9_-]*)", code))
    return names


def defined_flags(root: str) -> set[str]:
    """Flags the project's programs accept."""
    flags = {"help", "helpfull", "gtest_filter", "output-on-failure", "test-dir", "build-arg", "build-only", "gemma",
             "no-deps", "upgrade", "config", "from-file", "install"}  # gtest, ctest, docker, pip, cmake, tools
    sources = [p for p in glob.glob(os.path.join(root, "**", "*.cc"), recursive=True) if "/build" not in p]
    for path in sources:
        flags |= set(re.findall(r"ABSL_FLAG\(\s*[\w:<>, ]+?,\s*(\w+)\s*,", open(path, errors="replace").read()))
    for path in (glob.glob(os.path.join(root, "client", "python", "**", "*.py"), recursive=True)
                 + glob.glob(os.path.join(root, "bench", "*.py"))):
        flags |= set(re.findall(r"add_argument\(\s*\"--([\w-]+)\"", open(path).read()))
    for path in glob.glob(os.path.join(root, "scripts", "*")) + glob.glob(os.path.join(root, "bench", "*.sh")):
        if os.path.isfile(path):
            text = open(path, errors="replace").read()
            flags |= set(re.findall(r"--([a-z][a-z0-9_-]+)\)", text))  # case labels
            flags |= set(re.findall(r"\"--([a-z][a-z0-9_-]+)\"", text))  # [ "$1" = "--flag" ]
    # Bool flags also read --noname.
    flags |= {"no" + f for f in list(flags)}
    return flags


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--root", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    args = ap.parse_args(argv)
    root = os.path.normpath(args.root)
    known = defined_flags(root)
    problems = []
    for doc in docs(root):
        text = open(doc).read()
        rel_doc = os.path.relpath(doc, root)
        for path in sorted(path_candidates(text)):
            if any(g in path for g in GENERATED) or path.startswith(("../shared", "shared/", *ELSEWHERE)):
                continue
            if not exists(root, os.path.dirname(doc), path):
                problems.append(f"{rel_doc}: path `{path}` does not exist")
        for flag in sorted(flag_names(text)):
            if flag.replace("-", "_") not in known and flag not in known:
                problems.append(f"{rel_doc}: flag --{flag} is defined by none of the project's programs")
    for p in problems:
        print(p)
    print(f"check_docs: {len(docs(root))} documents, {len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
