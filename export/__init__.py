"""Export a trained run for local inference: merged model, GGUF files, Ollama Modelfile.

`python -m export [RUN_DIR]` (what `make export` runs) merges the LoRA adapter of an axolotl run
into its base model, converts the merged model to GGUF with llama.cpp's own converter
(`convert_hf_to_gguf.py`, f16 and q8_0), writes an Ollama `Modelfile`, and checks the GGUF in
llama.cpp (through llama-cpp-python) against the merged model in transformers. Details:
docs/export.md.
"""

from core.pins import pinned

# llama.cpp's converter and the llama.cpp runtime both come from this llama-cpp-python release:
# the converter from its source distribution, the runtime built from the same sources
# (`make setup-export`). Its one pin is pyproject.toml's `export` extra; the Makefile reads it too.
LLAMA_CPP_PYTHON_VERSION = pinned("llama-cpp-python")
