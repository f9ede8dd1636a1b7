"""The nine stages of the check, in two GPU lanes, and the summary of what they measured.

Lane a (the first GPU): train_interrupted -> train_resumed -> evaluate -> pytest.
Lane b (the second GPU, else the same one): train_reference, then (once the resumed run is done)
merge -> merged_logits; with one GPU the merge also waits for the evaluation, so that the
evaluation's timing is its own. data_prep and model run first, side by side. A stage whose
inputs did not come out ok is skipped and says which (runner.py).
"""

from __future__ import annotations

import datetime as dt
import json
import re
import shlex
import shutil
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

from bench.timeline import ENV_TIMELINE, breakdown
from core.files import read_jsonl
from core.launch import CODE_ROOT, axolotl_command
from core.runs import (
    TRAINER_STATE,
    Run,
    checkpoint_complete,
    checkpoints,
    load_recipe,
    parse_overrides,
    read_trainer_state,
    write_recipe,
)
from gpu_check import model as models
from gpu_check.figures import (
    compare_runs,
    eval_figures,
    junit_counts,
    machine_info,
    prep_figures,
    train_figures,
)
from gpu_check.logs import early_end_reason
from gpu_check.runner import Runner, Stage

TIMELINE_PLUGIN = "bench.timeline.TimelinePlugin"
TITLES = {
    "data_prep": "data prep",
    "model": "base model",
    "train_interrupted": "train, killed after 1st checkpoint",
    "train_resumed": "train again: resume",
    "train_reference": "train uninterrupted (reference)",
    "evaluate": "evaluate (perplexity + generate + report)",
    "merge": "merge-lora",
    "merged_logits": "merged model vs base + adapter",
    "pytest": "pytest",
}
STAGES = tuple(TITLES)
# Goals of the evaluation on one H100/H200 with the 4-bit 7B (shown next to the measurements).
GOAL_GENERATE_S = 20
GOAL_EVALUATE_S = 90
WORK_FOLDERS = ("run", "reference", "prepared-run", "prepared-reference", "logs", "recipes")
WORK_FILES = ("pytest.xml", "merged-logits.json")


def gpu_test_files() -> list[str]:
    """The test files that hold `gpu`-marked tests (so that collecting the rest, which may
    import packages a bare GPU image lacks, cannot fail the GPU run)."""
    return sorted(str(p.relative_to(CODE_ROOT)) for p in (CODE_ROOT / "tests").glob("test_*.py")
                  if re.search(r"mark\.gpu\b", p.read_text(errors="replace")))


class Check(Runner):
    def __init__(self, args):
        self.args = args
        self.work = (CODE_ROOT / args.work).resolve() if not args.work.is_absolute() else args.work
        skip = {s.strip() for s in args.skip.split(",") if s.strip()}
        super().__init__(TITLES, self.work / "logs", skip, args.deadline_s)
        self.model_ref: str | None = None
        self.model_kind: str | None = None
        self.model_untrained: str | None = None  # why a given model is taken for random-init
        self.recipe_cfg = load_recipe(CODE_ROOT / args.recipe)
        self.overrides = parse_overrides(args.set)
        self.lane_a = self.gpus[0]["index"] if self.gpus else None
        self.lane_b = self.gpus[1]["index"] if len(self.gpus) > 1 else self.lane_a

    def axolotl(self, verb: str, recipe: Path) -> list[str]:
        return axolotl_command(verb, recipe, launcher=self.args.launcher)

    def write_recipe(self, name: str, timed: bool = False) -> Path:
        """The recipe as the check trains it: the chosen model, outputs under --work, --set."""
        overrides = {**self.overrides, "base_model": self.model_ref,
                     "output_dir": str(self.work / name),
                     "dataset_prepared_path": str(self.work / f"prepared-{name}")}
        if self.model_kind == "random-init" or self.model_untrained:
            # a random-init model's loss starts near ln(32000) = 10.4, above the watchdog
            # threshold the recipe sets for real weights, which would stop it after 3 steps
            overrides.update(loss_watchdog_threshold=None, loss_watchdog_patience=None)
        if timed:  # bench.timeline's plugin: the time to adapter, part by part
            plugins = overrides.get("plugins", self.recipe_cfg.get("plugins")) or []
            overrides["plugins"] = [*plugins, TIMELINE_PLUGIN]
        return write_recipe(self.recipe_cfg, self.work / "recipes" / f"{name}.yml", overrides)

    # -- stages

    def data_prep(self):
        stage = self.stages["data_prep"]
        if not self.blocked(stage):
            cmd = [sys.executable, "-m", "data_prep", "--mode", "clean",
                   *shlex.split(self.args.prep_args)]
            self.run(stage, cmd, None)
            stats = CODE_ROOT / "data" / "prepared" / "clean" / "stats.json"
            if stage.status == "ok" and stats.is_file():
                stage.key = prep_figures(json.loads(stats.read_text()))
        self.complete("data_prep")

    def model(self):
        stage = self.stages["model"]
        if self.blocked(stage):
            return self.complete(stage.name)
        ref, kind, stage.note = models.choose_model(self.args.model, self.recipe_cfg)
        if kind == "random-init":
            out = Path(self.args.random_model_dir)
            self.run(stage, models.build_command(out, self.args.tokenizer_from, bool(self.gpus)),
                     self.lane_a)
            ref = str((CODE_ROOT / out).resolve())
        elif kind == "hub":
            self.run(stage, models.download_command(ref), None)
        else:
            stage.status, stage.wall_s, stage.start_s = "ok", 0.0, round(self.elapsed(), 1)
            self.model_untrained = models.untrained_reason(Path(ref))
            if self.model_untrained:
                stage.note += (f"; not pretrained ({self.model_untrained}): trained without the "
                               "recipe's loss watchdog, as a random-init model is")
        self.model_ref, self.model_kind = ref, kind
        stage.key = {"model": ref, "kind": kind}
        if self.model_untrained:
            stage.key["not_pretrained"] = self.model_untrained
        self.complete("model")

    def train_interrupted(self, recipe: Path):
        stage = self.stages["train_interrupted"]
        if self.blocked(stage, "data_prep", "model"):
            return self.complete(stage.name)
        out = Run.from_recipe(recipe).output_dir
        found: dict = {}

        def first_checkpoint() -> bool:
            complete = next((c for c in checkpoints(out) if checkpoint_complete(c)), None)
            if complete is None:
                return False
            step = read_trainer_state(complete / TRAINER_STATE)["global_step"]
            found.update(checkpoint=complete, step=step, at_s=self.elapsed())
            return True

        self.run(stage, self.axolotl("train", recipe), self.lane_a, watch=first_checkpoint)
        if found and stage.status != "timeout":
            stage.key = {"checkpoint": found["checkpoint"].name, "step": found["step"],
                         "killed_at_s": round(found["at_s"] - stage.start_s, 1),
                         "exit": stage.rc, "signal": "SIGTERM"}
            if stage.rc == 0:  # it finished before the signal landed: nothing to resume
                stage.status, stage.note = "failed", "finished before it could be stopped"
            else:  # stopped by our SIGTERM (-15, or accelerate's exit status for it)
                stage.status, stage.note = "ok", ""
        elif stage.status == "ok":
            why = early_end_reason(Path(stage.log), stage.rc)
            stage.status, stage.note = "failed", "finished without writing any checkpoint" + (
                f" ({why})" if why else "")
        self.complete("train_interrupted")

    def train_resumed(self, recipe: Path):
        stage = self.stages["train_resumed"]
        if self.blocked(stage, "train_interrupted"):
            return self.complete(stage.name)
        self.run(stage, self.axolotl("train", recipe), self.lane_a)
        log = Path(stage.log).read_text(errors="replace")
        resumed = re.search(r"resume from checkpoint at (\S*checkpoint-(\d+))", log)
        stage.key = train_figures(Run.from_recipe(recipe).output_dir)
        stage.key["resumed_from_step"] = int(resumed[2]) if resumed else None
        if stage.status == "ok":
            problems = self.resume_problems(stage, recipe, resumed)
            if problems:
                stage.status, stage.note = "failed", "; ".join(problems)
        self.complete("train_resumed")

    def resume_problems(self, stage: Stage, recipe: Path, resumed: re.Match | None) -> list[str]:
        """What the resumed run did not do: resume from the checkpoint, finish, log each step
        once, save the adapter."""
        checkpoint = self.stages["train_interrupted"].key.get("checkpoint")
        state, problems = stage.key, []
        if not resumed or not resumed[1].endswith(checkpoint):
            problems.append(f"no 'resume from checkpoint at …/{checkpoint}' in its log")
        if state.get("global_step") != state.get("max_steps"):
            why = early_end_reason(Path(stage.log), stage.rc)
            problems.append(f"stopped at step {state.get('global_step')} of "
                            f"{state.get('max_steps')}" + (f" ({why})" if why else ""))
        if state.get("steps_logged_twice"):
            problems.append(f"steps logged twice: {state['steps_logged_twice']}")
        if not Run.from_recipe(recipe).has_adapter():
            problems.append("no final adapter_model.safetensors")
        return problems

    def train_reference(self, recipe: Path):
        """The uninterrupted run, timed part by part as bench.time_to_adapter does (the
        timeline plugin added to its recipe)."""
        stage = self.stages["train_reference"]
        if not self.blocked(stage, "data_prep", "model"):
            timeline = self.work / "reference-timeline.jsonl"
            timeline.unlink(missing_ok=True)
            env = {**self.env_for(self.lane_b), ENV_TIMELINE: str(timeline)}
            launched = time.time()
            self.run(stage, self.axolotl("train", recipe), self.lane_b, env=env)
            finished = time.time()
            stage.key = train_figures(Run.from_recipe(recipe).output_dir)
            if timeline.is_file():
                stage.key["time_to_adapter"] = breakdown(
                    read_jsonl(timeline, skip_bad_lines=True), launched, finished)
        self.complete("train_reference")

    def evaluate(self, recipe: Path):
        stage = self.stages["evaluate"]
        if not self.blocked(stage, "train_resumed"):
            cmd = [sys.executable, "-m", "eval", str(recipe), "--no-progress",
                   *shlex.split(self.args.eval_args)]
            self.run(stage, cmd, self.lane_a)
            summary = Run.from_recipe(recipe).evaluation_json
            if summary.is_file():
                stage.key = eval_figures(json.loads(summary.read_text()), stage.wall_s)
        self.complete("evaluate")

    def merge(self, recipe: Path):
        stage = self.stages["merge"]
        if not self.blocked(stage, "train_resumed"):
            self.run(stage, self.axolotl("merge-lora", recipe), self.lane_b)
            merged = Run.from_recipe(recipe).merged_dir
            weights = list(merged.glob("*.safetensors"))
            if stage.status == "ok" and not weights:
                stage.status, stage.note = "failed", f"no *.safetensors in {merged}"
            stage.key = {"merged_dir": str(merged),
                         "size_gb": round(sum(w.stat().st_size for w in weights) / 1e9, 2)}
        self.complete("merge")

    def merged_logits(self, recipe: Path):
        stage = self.stages["merged_logits"]
        if not self.blocked(stage, "merge"):
            run = Run.from_recipe(recipe)
            result = self.work / "merged-logits.json"
            cmd = [sys.executable, "-m", "gpu_check.compare_merged",
                   "--model", self.model_ref, "--run", str(run.output_dir),
                   "--merged", str(run.merged_dir), "--data", str(run.eval_data),
                   "--json", str(result)]
            if run.load_in_4bit:
                cmd.append("--load-in-4bit")
            self.run(stage, cmd, self.lane_b)
            if result.is_file():
                stage.key = json.loads(result.read_text())
                if stage.status == "ok" and not stage.key.get("ok"):
                    stage.status, stage.note = "failed", stage.key.get("verdict", "")
        self.complete("merged_logits")

    def pytest(self):
        stage = self.stages["pytest"]
        if not self.blocked(stage):
            junit = self.work / "pytest.xml"
            selection = shlex.split(self.args.pytest_args)
            if not any((CODE_ROOT / a).exists() for a in selection if not a.startswith("-")):
                selection += gpu_test_files()  # collect only where GPU tests live
            cmd = [sys.executable, "-m", "pytest", *selection, "-q", "-p", "no:cacheprovider",
                   f"--junitxml={junit}"]
            self.run(stage, cmd, self.lane_a)
            stage.key = junit_counts(junit)
            if stage.key.get("tests", 0) == 0:
                stage.status, stage.note = "failed", "no test ran"
        self.complete("pytest")

    # -- orchestration

    def lane_a_work(self, run_recipe: Path):
        self.train_interrupted(run_recipe)
        self.train_resumed(run_recipe)
        self.evaluate(run_recipe)
        self.pytest()

    def lane_b_work(self, run_recipe: Path, reference_recipe: Path):
        self.train_reference(reference_recipe)
        self.done["train_resumed"].wait()
        if self.lane_b == self.lane_a:  # one GPU (or none): keep the evaluation's timing clean
            self.done["evaluate"].wait()
        self.merge(run_recipe)
        self.merged_logits(run_recipe)

    def prepare_work(self):
        self.work.mkdir(parents=True, exist_ok=True)
        for name in WORK_FOLDERS:
            shutil.rmtree(self.work / name, ignore_errors=True)
        for name in WORK_FILES:
            (self.work / name).unlink(missing_ok=True)
        self.logs.mkdir(parents=True)

    def in_parallel(self, *work) -> None:
        """Run (function, *args) tuples in threads and wait for all of them."""
        threads = [threading.Thread(target=function, args=args) for function, *args in work]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    def execute(self) -> dict:
        self.prepare_work()
        with self.monitor:
            self.in_parallel((self.data_prep,), (self.model,))
            if self.model_ref:
                run_recipe = self.write_recipe("run")
                reference_recipe = self.write_recipe("reference", timed=True)
            else:
                run_recipe = reference_recipe = self.work / "recipes" / "missing.yml"
            self.in_parallel((self.lane_a_work, run_recipe),
                             (self.lane_b_work, run_recipe, reference_recipe))
        comparison = None
        if self.stages["train_resumed"].status == "ok" and \
                self.stages["train_reference"].status == "ok":
            comparison = compare_runs(self.work / "run", self.work / "reference")
        return self.summary(comparison)

    def summary(self, comparison: dict | None) -> dict:
        ran = [s for s in self.stages.values() if s.status != "skipped" or s.note != "--skip"]
        return {
            "schema_version": 1,
            "date": dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat(),
            "ok": all(s.status == "ok" for s in ran),
            "wall_s": round(self.elapsed(), 1),
            "recipe": str(self.args.recipe),
            "overrides": self.overrides,
            "model": {"ref": self.model_ref, "kind": self.model_kind,
                      "note": self.stages["model"].note},
            "machine": machine_info(self.gpus),
            "lanes": {"a": self.lane_a, "b": self.lane_b},
            "stages": [asdict(s) for s in self.stages.values()],
            "resume_vs_uninterrupted": comparison,
            "goals": {"generate_s": GOAL_GENERATE_S, "evaluate_s": GOAL_EVALUATE_S},
        }
