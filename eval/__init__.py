"""Evaluate a base model and a LoRA adapter side by side.

- `python -m eval.perplexity`  perplexity, bits per byte and word perplexity (base vs adapter)
- `python -m eval.generate`    greedy and sampled generations, with a memorisation check
- `python -m eval.report RUN`  report.md + PNG charts from the trainer log and the two above
- `python -m eval RECIPE|RUN`  all three with one model load (what a recipe's run is scored with)

Default layout inside a run directory (the axolotl output_dir that holds the adapter; the names
are core/runs.py's, which every other folder uses too):

    RUN/eval/perplexity.json, RUN/eval/perplexity.md      (eval.perplexity --adapter RUN)
    RUN/eval/generations.json, RUN/eval/generations.md    (eval.generate --adapter RUN)
    RUN/report.md, RUN/report/*.png                       (eval.report RUN)
"""
