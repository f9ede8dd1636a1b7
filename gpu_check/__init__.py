"""`make gpu-check`: the whole GPU path on a GPU box, each stage a real command, one summary.

- `gpu_check.cli`             `python -m gpu_check`: the options, the run, the files written
- `gpu_check.check`           the nine stages in two GPU lanes, and the summary's data
- `gpu_check.runner`          a stage as a process: logged, timed, watched, stopped on time
- `gpu_check.monitor`         the GPUs and the memory each stage's processes hold (nvidia-smi)
- `gpu_check.model`           which base model is trained: given, from the hub, or random-init
- `gpu_check.logs`            why a stage ended early, from its log
- `gpu_check.figures`         each stage's key figures, from what its command wrote
- `gpu_check.summary`         summary.md and the files beside summary.json
- `gpu_check.compare_merged`  `python -m gpu_check.compare_merged`: the merged model against
                              base + adapter (the `merged_logits` stage)

How to run it and what it measured: docs/gpu-check.md.
"""
