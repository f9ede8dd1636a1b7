"""Try the fine-tuned model: `python -m app TARGET` (what `make app` runs) serves a page on
http://127.0.0.1:7860 with the base model and the fine-tuned one side by side, from one model
load (app/session.py: the models; app/page.py: the Gradio page). docs/app.md."""
