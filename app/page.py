"""The Gradio page: a prompt and the generation settings, the base and the fine-tuned
continuation side by side (streamed), and a second tab with the run's evaluation.

Element ids (for a browser test or your own scripts): #prompt, #max-new-tokens, #temperature,
#top-p, #seed, #greedy, #generate (the button), #base-text, #base-stats, #fine-tuned-text,
#fine-tuned-stats, #status ("done in N s" when both panes are complete).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from app.session import BASE, DEFAULT_PROMPT, FINE_TUNED, Session, Settings
from core.errors import UserError
from core.runs import Run

LOG = logging.getLogger("app")

# Gradio sends usage statistics and checks its version online unless told not to.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

TRAILING_SPACE_NOTE = (
    "Kept exactly as typed. A trailing space becomes a token of its own for byte-level BPE "
    "tokenizers (SmolLM2's), which derails some models: delete it to compare.")


def evaluation_markdown(run: Run, target: str) -> tuple[str, list[tuple[Path, str]]]:
    """The evaluation tab: the summary and perplexity tables of report.md (from
    RUN/eval/perplexity.json) and its charts, or one line saying how to make them."""
    from eval.common import load_json_object
    from eval.perplexity import NOTE, render_dataset_sections
    from eval.report import summary_lines

    charts = [(run.chart_dir / name, title) for name, title in
              (("perplexity.png", "perplexity before and after"), ("loss.png", "loss curves"))
              if (run.chart_dir / name).is_file()]
    if not run.perplexity_json.is_file():
        return (f"No evaluation of this run yet: `python -m eval {target}` writes the "
                "perplexity table and the charts (`make demo` runs it).", charts)
    ppl = load_json_object(run.perplexity_json, "perplexity results",
                           f"re-run python -m eval {target}")
    lines = [f"From `{run.perplexity_json}`"
             + (f" and the charts of `{run.report_md}`" if charts else "") + ".", "",
             *summary_lines(None, ppl, None), "", NOTE]
    lines += render_dataset_sections(ppl, level=3)
    return "\n".join(lines), charts


def header_markdown(session: Session, run: Run) -> str:
    loaded = session.loaded
    return (f"## {run.output_dir.name}: base vs fine-tuned\n"
            f"Model `{loaded.ref}` + adapter `{run.output_dir}`, loaded once on {session.device} "
            f"({session.precision}): the base pane is the same weights with the adapter switched "
            "off. Both continue your opening with the same settings and the same seed, one after "
            "the other.")


def compare_events(session: Session):
    """The button's handler: a generator of (base text, base figures, fine-tuned text,
    fine-tuned figures, status) after every new token."""

    def run(prompt, max_new_tokens, temperature, top_p, seed, greedy):
        import gradio as gr

        start = time.perf_counter()
        settings = Settings(prompt, max_new_tokens, temperature, top_p,
                            0 if seed is None else seed, bool(greedy))
        try:
            for panes in session.compare(settings):
                base, tuned = panes[BASE], panes[FINE_TUNED]
                yield base.text, base.stats_line(), tuned.text, tuned.stats_line(), ""
        except UserError as err:
            raise gr.Error(err.message, print_exception=False) from None
        mode = "greedy" if settings.greedy else f"sampled, seed {settings.seed}"
        yield (base.text, base.stats_line(), tuned.text, tuned.stats_line(),
               f"done in {time.perf_counter() - start:.1f} s ({mode})")

    return run


def build(session: Session, run: Run, target: str, max_new_tokens: int = 60):
    """The page (gradio.Blocks), not yet launched."""
    import gradio as gr

    evaluation, charts = evaluation_markdown(run, target)
    with gr.Blocks(title=f"{run.output_dir.name}: base vs fine-tuned",
                   analytics_enabled=False) as page:
        gr.Markdown(header_markdown(session, run))
        with gr.Tab("Compare"):
            prompt = gr.Textbox(value=DEFAULT_PROMPT, label="Opening", info=TRAILING_SPACE_NOTE,
                                lines=2, elem_id="prompt")
            with gr.Row():
                max_new = gr.Slider(1, max(512, max_new_tokens), value=max_new_tokens, step=1, label="max new tokens",
                                    elem_id="max-new-tokens")
                temperature = gr.Slider(0.05, 2.0, value=0.8, step=0.05, label="temperature",
                                        elem_id="temperature")
                top_p = gr.Slider(0.05, 1.0, value=0.95, step=0.05, label="top-p",
                                  elem_id="top-p")
                seed = gr.Number(value=0, precision=0, label="seed (sampling)", elem_id="seed")
                greedy = gr.Checkbox(value=True, label="greedy (ignores temperature, top-p, seed)",
                                     elem_id="greedy")
            button = gr.Button("Continue with both models", variant="primary",
                               elem_id="generate")
            with gr.Row(equal_height=True):
                with gr.Column():
                    base_text = gr.Textbox(label="base model (adapter off)", lines=10,
                                           interactive=False, elem_id="base-text")
                    base_stats = gr.Markdown(elem_id="base-stats")
                with gr.Column():
                    tuned_text = gr.Textbox(label="fine-tuned (adapter on)", lines=10,
                                            interactive=False, elem_id="fine-tuned-text")
                    tuned_stats = gr.Markdown(elem_id="fine-tuned-stats")
            status = gr.Markdown(elem_id="status")
        with gr.Tab("Evaluation"):
            gr.Markdown(evaluation, elem_id="evaluation")
            for path, title in charts:
                gr.Image(value=str(path), label=title, interactive=False, type="filepath",
                         buttons=["download", "fullscreen"])
        button.click(compare_events(session),
                     inputs=[prompt, max_new, temperature, top_p, seed, greedy],
                     outputs=[base_text, base_stats, tuned_text, tuned_stats, status],
                     concurrency_limit=1)
    return page


def theme():
    """Gradio's default theme with the system's fonts: the default one loads web fonts from the
    internet, which an offline machine cannot reach."""
    import gradio as gr

    return gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                             font_mono=["ui-monospace", "monospace"])


def launch(page, host: str, port: int) -> None:
    """Serve the page on host:port until Ctrl-C; never a public share link."""
    try:
        page.queue(default_concurrency_limit=1).launch(
            server_name=host, server_port=port, share=False, inbrowser=False, theme=theme(),
            footer_links=[], ssr_mode=False, mcp_server=False, enable_monitoring=False,
            pwa=False, show_error=True, quiet=True, prevent_thread_lock=True)
    except OSError as err:  # the port was taken between the check and the launch
        raise UserError(f"cannot listen on {host}:{port} ({err}): stop what uses it or pass "
                        "--port N") from None
    try:
        print(f"app: base vs fine-tuned on {page.local_url} (Ctrl-C to stop)", flush=True)
        page.block_thread()  # returns on Ctrl-C, the server closed
    except KeyboardInterrupt:  # Ctrl-C before block_thread caught it
        page.close()
