"""The bottom layer: plumbing every other folder of this repository shares.

- `core.errors`  one user-error type (`UserError`), one way to report it (`cli`, `reported`)
                 and one exit-status convention (0 done, 1 failed, 2 user error)
- `core.files`   writes that never leave a half-written file or folder (temp + rename),
                 JSONL reading and appending, sha256 of a file
- `core.runs`    what "a run" is: a recipe's model, data, output and eval directories, the
                 file names and metric keys its outputs use, its checkpoints and trainer state
- `core.ports`   whether a server can listen on HOST:PORT, asked before a slow start (the page,
                 the llama.cpp server): a port in use is one line
- `core.tokens`  how a text starts: the token put before it (EOS where the tokenizer adds no
                 BOS) in scoring, generation, the GGUF check and `integrations.passage_start`
- `core.launch`  the one way to launch Axolotl's commands (train, merge-lora, preprocess) and
                 the one environment they run in; a launched command stopped with its processes
- `core.pins`    the versions pyproject.toml pins, for code that names one
- `core.diagnostics`  one-line messages for hub refusals, CUDA out of memory and a driver too
                 old, shared by training (the recipe guard) and evaluation

It imports nothing of the project (only the standard library and PyYAML), so anything may
import it; torch and huggingface_hub are imported only inside `core.diagnostics`' functions,
and nothing here depends on Axolotl or transformers.
"""
