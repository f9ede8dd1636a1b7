"""One model load, two continuations: the base model (adapter switched off) and the fine-tuned
one (adapter on), each streamed token by token, with the figures shown under each pane.

The continuations are made by eval.generate's own code (`generate_batch`: the same generation
settings, the same per-row seeded sampler, the same decoding of the new tokens), one prompt at a
time, base first, then fine-tuned, from the same seed; so a greedy pane holds exactly what
`python -m eval.generate --prompt P --samples 0` writes for that prompt, and a sampled pane what
its first sample (seed --seed) writes. The memorisation share is eval.generate's
`TrainingIndex.share`. Streaming only shows the tokens as they come: each pane's final text is
the one generate_batch returns.

Figures per pane: new tokens, seconds (prompt processing included, as eval.generate counts
them), tokens/s = tokens / seconds, the time to the first new token, and the decoding rate after
it ((tokens - 1) / (seconds - first token)).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import queue
import statistics
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from core.errors import UserError
from eval import generate
from eval.common import base_model_context, load_for_eval, model_device, read_texts

LOG = logging.getLogger("app")

BASE, FINE_TUNED = "base", "fine-tuned"
PANES = (BASE, FINE_TUNED)
DEFAULT_PROMPT = generate.DEFAULT_PROMPTS[0]  # the notebook's, trailing space included


@dataclasses.dataclass(frozen=True)
class Settings:
    """What the page's controls say; `args()` turns them into eval.generate's arguments."""

    prompt: str = DEFAULT_PROMPT
    max_new_tokens: int = 60
    temperature: float = 0.8
    top_p: float = 0.95
    seed: int = 0
    greedy: bool = True

    def args(self):
        """eval.generate's arguments for these settings, checked by its own check_args (a bad
        value is its one-line UserError)."""
        args = generate.parse_args([
            "--prompt", self.prompt, "--max-new-tokens", str(int(self.max_new_tokens)),
            "--temperature", str(float(self.temperature)), "--top-p", str(float(self.top_p)),
            "--seed", str(int(self.seed)), "--samples", "0" if self.greedy else "1",
            "--no-memorisation"])
        generate.check_args(args)
        return args

    @property
    def row_seed(self) -> int | None:
        """The seed of the generated row (None = greedy), the same for both panes."""
        return None if self.greedy else int(self.seed)


@dataclasses.dataclass
class Pane:
    """One model's continuation so far, and its figures."""

    model: str
    text: str = ""
    tokens: int = 0
    seconds: float = 0.0
    first_token_s: float | None = None
    done: bool = False
    stopped_at_eos: bool = False
    memorisation: dict | None = None  # eval.generate's TrainingIndex.share, when done

    @property
    def tokens_per_s(self) -> float | None:
        return self.tokens / self.seconds if self.seconds > 0 and self.tokens else None

    @property
    def decode_tokens_per_s(self) -> float | None:
        if self.first_token_s is None or self.tokens < 2 or self.seconds <= self.first_token_s:
            return None
        return (self.tokens - 1) / (self.seconds - self.first_token_s)

    def figures(self) -> dict:
        out = dataclasses.asdict(self)
        out.update(tokens_per_s=self.tokens_per_s, decode_tokens_per_s=self.decode_tokens_per_s)
        return out

    def stats_line(self) -> str:
        """The line under the pane (Markdown)."""
        if not self.tokens and not self.done:
            return "generating..."
        rate = f"{self.tokens_per_s:,.1f} tokens/s" if self.tokens_per_s else "n/a tokens/s"
        first = f", first token after {self.first_token_s:.2f} s" if self.first_token_s else ""
        line = f"{self.tokens} tokens in {self.seconds:.2f} s: **{rate}**{first}"
        if not self.done:
            return "generating... " + line
        if self.stopped_at_eos:
            line += " (stopped at the end-of-text token)"
        return line + " · " + memorisation_text(self.memorisation)


def memorisation_text(share: dict | None) -> str:
    if share is None:
        return "memorisation check off"
    if share["share"] is None:
        return (f"copied from the training text: n/a (fewer than {generate.NGRAM} words)")
    return (f"copied from the training text: **{100 * share['share']:.0f} %** "
            f"({share['n_copied']}/{share['n_ngrams']} word {generate.NGRAM}-grams verbatim)")


class _TokenQueue:
    """transformers' streamer interface: generate() puts the prompt first, then each new token,
    then calls end(); the tokens go to a queue the page reads from another thread."""

    def __init__(self):
        self.items: queue.Queue = queue.Queue()
        self._prompt_seen = False

    def put(self, value) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.items.put((value.reshape(-1).tolist(), time.perf_counter()))

    def end(self) -> None:
        self.items.put((None, time.perf_counter()))


class Session:
    """The loaded model (base + adapter), its tokenizer and the training-text index."""

    def __init__(self, loaded, index: generate.TrainingIndex | None, train: Path | None):
        self.loaded = loaded
        self.index = index
        self.train = train
        self._lock = threading.Lock()  # one generation at a time: the adapter switch is global

    @classmethod
    def load(cls, plan: dict) -> Session:
        index = None
        if plan["train"] is not None:
            index = generate.TrainingIndex(read_texts(plan["train"], what="training text"))
            LOG.info("memorisation index: %d words from %s", index.n_words, plan["train"])
        loaded = load_for_eval(plan["model"], plan["run_dir"], plan["load_in_4bit"],
                               plan["tokenizer"], plan["eos_token"], plan["pad_token"])
        return cls(loaded, index, plan["train"])

    @property
    def device(self) -> str:
        return str(model_device(self.loaded.model))

    @property
    def precision(self) -> str:
        if self.loaded.load_in_4bit:
            return "nf4 (bnb 4-bit)"
        return str(next(self.loaded.model.parameters()).dtype).removeprefix("torch.")

    def _stream(self, label: str, args, seed: int | None) -> Iterator[Pane]:
        """One model's continuation of args.prompt[0], a Pane per new token, then the final one."""
        model, tok = self.loaded.model, self.loaded.tok
        streamer, outcome = _TokenQueue(), {}

        def work():
            context = base_model_context(model) if label == BASE else contextlib.nullcontext()
            try:
                with context:
                    outcome["row"] = generate.generate_batch(model, tok, args.prompt, [seed],
                                                             args, streamer=streamer)[0]
            except BaseException as err:  # noqa: BLE001 - re-raised in the page's thread
                outcome["error"] = err
                streamer.end()

        pane, ids = Pane(label), []
        start = time.perf_counter()
        worker = threading.Thread(target=work, name=f"generate-{label}", daemon=True)
        worker.start()
        while True:
            tokens, at = streamer.items.get()
            if tokens is None:
                break
            ids += tokens
            pane.first_token_s = pane.first_token_s or at - start
            pane.tokens, pane.seconds = len(ids), at - start
            pane.text = tok.decode(ids, skip_special_tokens=True)
            yield pane
        worker.join()
        if "error" in outcome:
            raise outcome["error"]
        row = outcome["row"]
        pane.seconds = time.perf_counter() - start
        pane.text, pane.tokens = row["text"], row["n_new_tokens"]
        pane.stopped_at_eos, pane.done = row["stopped_at_eos"], True
        pane.memorisation = self.index.share(row["text"]) if self.index else None
        yield pane

    def compare(self, settings: Settings) -> Iterator[dict[str, Pane]]:
        """Both continuations of settings.prompt, base first: {pane name: Pane} after every new
        token of either. A bad setting raises eval.generate's one-line UserError."""
        args, seed = settings.args(), settings.row_seed
        panes = {label: Pane(label) for label in PANES}
        with self._lock:
            for label in PANES:
                for pane in self._stream(label, args, seed):
                    panes[label] = pane
                    yield panes

    def complete(self, settings: Settings) -> dict[str, Pane]:
        """Both continuations, run to the end (no page)."""
        panes = {}
        for panes in self.compare(settings):  # noqa: B007 - the last one is the result
            pass
        return panes


def measure(session: Session, settings: Settings, rounds: int) -> dict:
    """Time to first token and tokens/s of both models: one warm-up comparison (not counted:
    the first call on a GPU pays for kernel set-up), then `rounds` comparisons; medians."""
    if rounds < 1:
        raise UserError(f"--rounds {rounds} must be >= 1")
    session.complete(settings)
    runs = [{k: p.figures() for k, p in session.complete(settings).items()}
            for _ in range(rounds)]
    median = {}
    for label in PANES:
        median[label] = {key: _median([r[label][key] for r in runs])
                         for key in ("first_token_s", "tokens_per_s", "decode_tokens_per_s",
                                     "tokens", "seconds")}
    return {"rounds": runs, "median": median}


def _median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return round(statistics.median(values), 4) if values else None
