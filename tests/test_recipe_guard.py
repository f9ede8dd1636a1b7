"""integrations/recipe_guard against the installed Axolotl: every fix of Axolotl's internals
applies where Axolotl calls it (each test fails if its patch stops applying), refuses in one
line where it cannot apply, and its one-line stops exit with status 2."""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from core.errors import UserError
from integrations.recipe_guard import compat, resume, saving
from integrations.recipe_guard.callbacks import FiniteLossCallback
from integrations.recipe_guard.plugin import RecipeGuardPlugin, check_patch_targets

REPO = Path(__file__).resolve().parents[1]


def test_every_patch_target_matches_the_installed_axolotl():
    assert compat.axolotl_version() == compat.PINNED_AXOLOTL
    check_patch_targets({"sample_packing": True, "auto_resume_from_checkpoints": True})


class ChangedTrainer:
    """What a later Axolotl might have: the sampler factory with other parameter names."""

    def _create_multipack_sampler(self, sampler, data):
        return sampler


def test_another_axolotl_with_changed_methods_is_refused_in_one_line(monkeypatch):
    # on the pinned version the signature is not consulted
    assert compat.patch_target(ChangedTrainer, "_create_multipack_sampler", ("base_sampler",),
                               "recipe_guard_exact_resume")
    monkeypatch.setattr(compat, "axolotl_version", lambda: "0.99.0")
    with pytest.raises(UserError) as exc:
        resume.seed_packed_order(ChangedTrainer(), seed=1)
    assert str(exc.value) == (
        "integrations.recipe_guard.RecipeGuardPlugin: ChangedTrainer._create_multipack_sampler "
        "of axolotl 0.99.0 has no parameter(s) base_sampler, dataset, which "
        "`recipe_guard_exact_resume` relies on (written against axolotl 0.19.0): pin "
        "axolotl==0.19.0 or set `recipe_guard_exact_resume: false`")
    with pytest.raises(UserError, match=r"axolotl 0.99.0 has no ChangedTrainer._save_checkpoint"):
        saving.one_line_save_errors(ChangedTrainer())


# -- exact resume: the packed order ---------------------------------------------------------


def axolotl_trainer(seed: int = 42, n_rows: int = 48):
    """A real AxolotlTrainer, built without the model and data loading that are not under
    test: the attributes its sampler code reads, a real dataset of rows of random lengths."""
    from axolotl.core.trainers.base import AxolotlTrainer
    from datasets import Dataset

    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(4, 60, (n_rows,), generator=generator).tolist()
    trainer = AxolotlTrainer.__new__(AxolotlTrainer)
    trainer.args = SimpleNamespace(
        sample_packing=True, pretraining=False, curriculum_sampling=False,
        multipack_real_batches=False, per_device_train_batch_size=1, max_seq_length=128,
        sample_packing_efficiency=1.0, sample_packing_group_size=100_000,
        sample_packing_bin_size=200, sample_packing_sequentially=False, dataset_num_proc=1,
        sample_packing_mp_start_method=None, seed=seed)
    trainer.state = SimpleNamespace(train_batch_size=None)
    trainer.train_dataset = Dataset.from_dict({"input_ids": [[1] * n for n in lengths]})
    return trainer


def packed_order(sampler, epoch: int = 0) -> list:
    sampler.sampler.set_epoch(epoch)  # as accelerate does at each epoch start
    return [list(map(list, batch)) for batch in sampler]


def test_sampler_patch_makes_axolotls_packed_order_a_function_of_seed_and_epoch():
    """Each sampler costs a few of Axolotl's gc.collect() calls: built as few times as can be."""
    from torch.utils.data import RandomSampler, SequentialSampler

    plain = axolotl_trainer()
    assert isinstance(plain._get_train_sampler().sampler, RandomSampler)  # Axolotl alone
    samplers = []
    for seed in (42, 42, 7):
        trainer = axolotl_trainer()
        resume.seed_packed_order(trainer, seed=seed)
        resume.seed_packed_order(trainer, seed=seed)  # idempotent
        samplers.append(trainer._get_train_sampler())  # Axolotl's own code path
    assert isinstance(samplers[0].sampler, resume.EpochSeededSampler)
    assert samplers[0].sampler.owner is samplers[0]
    first = packed_order(samplers[0])
    assert first == packed_order(samplers[1])  # same seed, same batches
    assert first != packed_order(samplers[2])  # another seed
    assert packed_order(samplers[0], epoch=1) != first  # another epoch
    assert packed_order(samplers[0], epoch=0) == first
    # the wrapper forwards positional arguments too, and leaves a non-random sampler alone
    dataset = trainer.train_dataset
    by_position = trainer._create_multipack_sampler(RandomSampler(dataset), dataset)
    assert isinstance(by_position.sampler, resume.EpochSeededSampler)
    sequential = SequentialSampler(dataset)
    assert trainer._create_multipack_sampler(sequential, dataset=dataset).sampler is sequential


# -- exact resume: incomplete checkpoints ----------------------------------------------------


def test_incomplete_newest_checkpoint_steers_axolotls_auto_resume(tmp_path, capsys):
    import axolotl.train
    from axolotl.utils.dict import DictDefault
    from axolotl.utils.train import determine_last_checkpoint

    for step, state in ((5, {"global_step": 5}), (10, None)):
        (tmp_path / f"checkpoint-{step}").mkdir()
        if state:
            (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text(json.dumps(state))

    def cfg():
        return DictDefault({"output_dir": str(tmp_path), "auto_resume_from_checkpoints": True})

    assert determine_last_checkpoint(cfg()) == str(tmp_path / "checkpoint-10")  # Axolotl alone
    fixed = cfg()
    resume.skip_incomplete_checkpoints(fixed)
    assert determine_last_checkpoint(fixed) == str(tmp_path / "checkpoint-5")
    assert capsys.readouterr().err == (
        f"warning: checkpoint-10 in {tmp_path} has no complete trainer_state.json (the run was "
        "killed, or the disk filled, while saving it); resuming from checkpoint-5 instead\n")
    # the hook that does it (post_trainer_create) runs before Axolotl's auto-resume
    source = inspect.getsource(axolotl.train.train)
    assert source.index("setup_model_and_trainer(") < source.index("determine_last_checkpoint(")
    assert "PLUGIN_MANAGER.post_trainer_create" in inspect.getsource(
        axolotl.train.setup_model_and_trainer)


# -- LoRA initialisation seeded ----------------------------------------------------------------


def test_lora_seed_hook_runs_right_before_axolotl_creates_the_adapter():
    from axolotl.loaders.model import ModelLoader

    source = inspect.getsource(ModelLoader.load)
    assert source.index("PLUGIN_MANAGER.pre_lora_load(") < source.index("self._load_adapters()")
    torch.manual_seed(123)
    RecipeGuardPlugin().pre_lora_load({"seed": 42}, model=None)
    first = torch.rand(3)
    torch.manual_seed(456)
    RecipeGuardPlugin().pre_lora_load({"seed": 42}, model=None)
    assert torch.equal(first, torch.rand(3))


# -- checkpoint saves on a full disk -----------------------------------------------------------


FULL_DISK_WRITES = """
import json, resource, signal, sys
import torch
from safetensors.torch import save_file
from integrations.recipe_guard.saving import disk_error_reason

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (10_000, 10_000))
folder, reasons = sys.argv[1], {}
writers = {
    "torch.save": lambda: torch.save({"x": torch.zeros(100_000)}, f"{folder}/optimizer.pt"),
    "safetensors": lambda: save_file({"x": torch.zeros(100_000)}, f"{folder}/adapter.safetensors"),
    "open": lambda: open(f"{folder}/trainer_state.json", "w").write("{}" * 100_000),
}
for name, write in writers.items():
    try:
        write()
        reasons[name] = "no error"
    except Exception as err:
        reasons[name] = disk_error_reason(err)
print(json.dumps(reasons))
"""


def test_disk_errors_are_identified_precisely(tmp_path):
    """The errors the real writers of a checkpoint raise past a file-size limit (EFBIG, what a
    full disk's ENOSPC is to them), and errors that are not about disk space."""
    import subprocess
    import sys

    from safetensors import SafetensorError

    proc = subprocess.run([sys.executable, "-c", FULL_DISK_WRITES, str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reasons = json.loads(proc.stdout.strip().splitlines()[-1])
    assert reasons["open"] == "File too large"
    assert reasons["safetensors"] == (
        "Error while serializing: I/O error: File too large (os error 27)")
    assert "inline_container" in reasons["torch.save"], reasons
    wrapped = RuntimeError("saving the optimizer failed")
    wrapped.__cause__ = OSError(28, "No space left on device")
    assert saving.disk_error_reason(wrapped) == "No space left on device"
    for other in (RuntimeError("CUDA error: an illegal memory access was encountered"),
                  RuntimeError("NCCL error: unhandled system error"),
                  RuntimeError("Error(s) in loading state_dict for PeftModel"),
                  OSError(13, "Permission denied"),
                  SafetensorError("Error while serializing: I/O error: Permission denied "
                                  "(os error 13)")):
        assert saving.disk_error_reason(other) is None, other


class SavingTrainer:
    def __init__(self, error: BaseException | None):
        self.error, self.calls = error, []
        self.state = SimpleNamespace(global_step=3)
        self.args = SimpleNamespace(output_dir="/runs/out")

    def _save_checkpoint(self, model, trial, **kwargs):
        self.calls.append((model, trial, kwargs))
        if self.error:
            raise self.error


def test_save_wrapper_turns_only_disk_errors_into_one_line(capsys):
    import transformers

    # the Trainer saves through the instance attribute the wrapper replaces
    assert "self._save_checkpoint(" in inspect.getsource(
        transformers.Trainer._maybe_log_save_evaluate)
    fine = SavingTrainer(None)
    saving.one_line_save_errors(fine)
    saving.one_line_save_errors(fine)  # idempotent
    fine._save_checkpoint("model", None, extra=1)
    assert fine.calls == [("model", None, {"extra": 1})]  # every argument forwarded

    full = SavingTrainer(OSError(28, "No space left on device"))
    saving.one_line_save_errors(full)
    with pytest.raises(SystemExit) as exc:
        full._save_checkpoint("model", trial=None)
    assert exc.value.code == 2
    assert capsys.readouterr().err == (
        "\nerror: saving checkpoint-3 in /runs/out failed (No space left on device); if the "
        "disk is full, free space and re-run the same command: it resumes from the newest "
        "complete checkpoint\n")

    cuda = RuntimeError("CUDA error: an illegal memory access was encountered")
    broken = SavingTrainer(cuda)
    saving.one_line_save_errors(broken)
    with pytest.raises(RuntimeError) as exc:
        broken._save_checkpoint("model", None)
    assert exc.value is cuda and capsys.readouterr().err == ""


# -- NaN/inf loss ------------------------------------------------------------------------------


def test_finite_loss_callback_stops_with_one_line_and_status_2(capsys, tmp_path):
    callback = FiniteLossCallback()
    out = tmp_path / "out"
    args = SimpleNamespace(output_dir=str(out))
    state = SimpleNamespace(global_step=3, max_steps=20, is_world_process_zero=True)
    assert callback.on_log(args, state, "control", logs={"loss": 2.5, "grad_norm": 1.0}) == \
        "control"
    with pytest.raises(SystemExit) as exc:
        callback.on_log(args, state, "control", logs={"loss": 2.5, "grad_norm": float("nan")})
    assert exc.value.code == 2
    assert capsys.readouterr().err == (
        "\nerror: grad_norm became nan at step 3; training stopped before saving. Lower "
        f"learning_rate (or check the data) and re-run; the last good checkpoint, if any, is in "
        f"{out}\n")
    # and the run directory records the stop (tests/test_watchdog_stop.py)
    record = json.loads((out / "stopped_early.json").read_text())
    assert (record["reason"], record["step"], record["max_steps"]) == ("non_finite", 3, 20)
    assert record["summary"] == "grad_norm became nan at step 3"


def test_each_fix_can_be_turned_off_and_the_options_are_axolotl_keys():
    from integrations.recipe_guard.checks import known_top_level_keys

    plugin = RecipeGuardPlugin()
    assert plugin.add_callbacks_pre_trainer({"recipe_guard_finite_loss": False}, None) == []
    assert len(plugin.add_callbacks_pre_trainer({}, None)) == 1
    trainer = SavingTrainer(OSError(28, "No space left on device"))
    plugin.post_trainer_create({"recipe_guard_one_line_save_errors": False,
                                "output_dir": "/nonexistent"}, trainer)
    assert "_save_checkpoint" not in vars(trainer)
    known = known_top_level_keys(["integrations.recipe_guard.RecipeGuardPlugin"])
    assert {"recipe_guard_finite_loss", "recipe_guard_exact_resume"} <= known
