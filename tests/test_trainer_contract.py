"""The Trainer's whole contract on the XSAM path, feature by feature.

Each feature is run three ways: the plain trainer with the base optimizer; ``--optim xsam --xsam_rho 0``, which
must equal it bitwise, in the weights and in every logged number; and ``--optim xsam`` at rho > 0, which must
train (parameters change) without error. Tiny models built from configs, no downloads.
"""

from __future__ import annotations

import pytest
import torch
from helpers import (
    dpo_pair,
    padded_text,
    params_of,
    preference_pairs,
    sentences,
    text_data,
    tiny_bert,
    tiny_llama,
    tiny_tokenizer,
)
from transformers import (
    BertConfig,
    BertModel,
    DefaultFlowCallback,
    PrinterCallback,
    ProgressCallback,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from hf_xsam import XSAM, XSAMSFTConfig, XSAMSFTTrainer, XSAMTrainer, XSAMTrainingArguments

BASE = "adamw_torch"
RHO_ZERO = dict(optim="xsam", xsam_rho=0.0, xsam_base_optim=BASE)
RHO_ON = dict(optim="xsam", xsam_rho=0.1, xsam_probe_every=2, xsam_base_optim=BASE)
# wall-clock numbers differ between any two runs; the xsam/ keys exist only on our side
_UNCOMPARABLE = ("runtime", "per_second", "total_flos")


def settings(output_dir, **overrides) -> dict:
    values = dict(output_dir=str(output_dir), use_cpu=True, report_to="none", save_strategy="no",
                  per_device_train_batch_size=4, max_steps=4, logging_steps=1, seed=7, disable_tqdm=True,
                  dataloader_num_workers=0, learning_rate=1e-3)
    values.update(overrides)
    return values


def fit(output_dir, plain: bool, model=None, data=None, xsam: dict | None = None, train: bool = True,
        trainer_kwargs: dict | None = None, **overrides):
    """A trainer run: ``plain`` is `Trainer` with `TrainingArguments` and ``optim=BASE``; otherwise `XSAMTrainer`
    with the ``xsam`` settings."""
    if plain:
        args = TrainingArguments(**settings(output_dir, optim=BASE, **overrides))
        cls = Trainer
    else:
        args = XSAMTrainingArguments(**settings(output_dir, **(xsam or RHO_ZERO), **overrides))
        cls = XSAMTrainer
    kwargs = dict(trainer_kwargs or {})
    if "model_init" not in kwargs:
        kwargs["model"] = model if model is not None else tiny_bert()
    trainer = cls(args=args, train_dataset=data if data is not None else text_data(n=24), **kwargs)
    if train:
        trainer.train()
    return trainer


def logs(trainer) -> list[dict]:
    return [{k: v for k, v in entry.items() if not k.startswith("xsam/") and not k.endswith(_UNCOMPARABLE)}
            for entry in trainer.state.log_history]


def assert_same_training(plain, ours) -> None:
    """Bitwise the same weights, and the same logged numbers (loss, grad_norm, learning_rate, train_loss, ...)."""
    a, b = params_of(plain.model), params_of(ours.model)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert logs(plain) == logs(ours)
    assert any("loss" in entry for entry in logs(ours))


def assert_trains(trainer, before: dict) -> None:
    after = params_of(trainer.model)
    changed = [name for name in before if not torch.equal(before[name], after[name])]
    assert changed, "no parameter changed"
    assert all(torch.isfinite(p).all() for p in after.values())


# ---------------------------------------------------------------------- the Trainer's default optimizer
def test_optim_xsam_rho_zero_alone_is_the_trainers_default_run(tmp_path):
    """A script's plain run, then the same script with only ``--optim xsam --xsam_rho 0`` added: the base is the
    Trainer's own default optimizer (``TrainingArguments.default_optim``, fused AdamW in Transformers 5 with
    torch >= 2.8), built alike, and the run is equal bitwise, weights and every logged number."""
    data = text_data(n=24)
    plain = Trainer(model=tiny_bert(), args=TrainingArguments(**settings(tmp_path / "plain")), train_dataset=data)
    plain.train()  # before the next trainer is built: each run draws dropout masks from the seed its trainer set
    ours = XSAMTrainer(model=tiny_bert(), train_dataset=data,
                       args=XSAMTrainingArguments(**settings(tmp_path / "ours", optim="xsam", xsam_rho=0.0)))
    ours.train()
    assert plain.args.optim == ours.args.xsam_base_optim == TrainingArguments.default_optim
    base, plain_optimizer = ours.xsam.base_optimizer, plain.optimizer.optimizer  # under Accelerate's wrapper
    assert type(base) is type(plain_optimizer) and base.defaults == plain_optimizer.defaults
    assert_same_training(plain, ours)


# ---------------------------------------------------------------------- the callback list
class Marker(TrainerCallback):
    """A callback that does nothing: the one the tests add, pop and remove."""


def callback_types(trainer) -> list[type]:
    return [type(callback) for callback in trainer.callback_handler.callbacks]


@pytest.mark.parametrize("optim", [BASE, "xsam"])
def test_the_callback_list_is_the_trainers_and_edits_alike(tmp_path, optim):
    """No callback of ours, with a built-in optimizer or XSAM: the list equals `Trainer`'s when built, after
    training, and after the same add/pop/remove calls."""
    plain = fit(tmp_path / "plain", plain=True, train=False)
    ours = fit(tmp_path / "ours", plain=False, xsam=RHO_ON if optim == "xsam" else dict(optim=optim), train=False)
    assert callback_types(ours) == callback_types(plain) == [DefaultFlowCallback, PrinterCallback]
    plain.train()
    ours.train()
    assert callback_types(ours) == callback_types(plain) == [DefaultFlowCallback, PrinterCallback]

    def edit(trainer) -> list:
        mine = Marker()
        trainer.add_callback(ProgressCallback)  # a class: the trainer builds it
        trainer.add_callback(mine)
        assert callback_types(trainer) == [DefaultFlowCallback, PrinterCallback, ProgressCallback, Marker]
        popped = [trainer.pop_callback(PrinterCallback), trainer.pop_callback(mine), trainer.pop_callback(Marker)]
        assert popped[1] is mine
        trainer.remove_callback(DefaultFlowCallback)
        return [type(callback) for callback in popped]

    assert edit(ours) == edit(plain) == [PrinterCallback, Marker, type(None)]
    assert callback_types(ours) == callback_types(plain) == [ProgressCallback]
    assert ours.callback_handler.callback_list == plain.callback_handler.callback_list == "ProgressCallback"


# ---------------------------------------------------------------------- every SchedulerType
SCHEDULERS = [
    ("linear", None), ("cosine", None), ("cosine_with_restarts", None), ("cosine_with_restarts", {"num_cycles": 2}),
    ("polynomial", None), ("polynomial", {"power": 2.0, "lr_end": 1e-5}), ("constant", None),
    ("constant_with_warmup", None), ("inverse_sqrt", None), ("inverse_sqrt", {"timescale": 2}),
    ("reduce_lr_on_plateau", None), ("reduce_lr_on_plateau", {"factor": 0.5, "patience": 0}),
    ("cosine_with_min_lr", {"min_lr": 1e-5}), ("cosine_with_min_lr", {"min_lr_rate": 0.1}),
    ("cosine_warmup_with_min_lr", {"min_lr_rate": 0.1}), ("warmup_stable_decay", {"num_decay_steps": 2}),
    ("greedy", None),
]


@pytest.mark.parametrize(("scheduler", "kwargs"), SCHEDULERS, ids=lambda v: str(v) if v else "defaults")
def test_every_scheduler(tmp_path, scheduler, kwargs):
    options = dict(lr_scheduler_type=scheduler, warmup_steps=1)
    if kwargs:
        options["lr_scheduler_kwargs"] = kwargs
    eval_data = None
    on_metrics = scheduler in ("reduce_lr_on_plateau", "greedy")
    if on_metrics:  # they step on the evaluation loss
        options.update(eval_strategy="steps", eval_steps=1)
        eval_data = text_data(n=8, seed=5)
    extra = dict(trainer_kwargs={"eval_dataset": eval_data})
    plain = fit(tmp_path / "plain", plain=True, **extra, **options)
    ours = fit(tmp_path / "ours", plain=False, **extra, **options)
    assert_same_training(plain, ours)
    before = params_of(tiny_bert())
    on = fit(tmp_path / "on", plain=False, xsam=RHO_ON, **extra, **options)
    assert_trains(on, before)
    if not on_metrics:  # the schedule does not depend on the gradients: the same rates
        rates = [[e["learning_rate"] for e in t.state.log_history if "learning_rate" in e] for t in (plain, on)]
        assert rates[0] == rates[1] and len(rates[0]) == 4


# ---------------------------------------------------------------------- re-entry and resumption
def test_train_called_again(tmp_path):
    plain = fit(tmp_path / "plain", plain=True)
    plain.train()
    ours = fit(tmp_path / "ours", plain=False)
    ours.train()
    assert_same_training(plain, ours)

    before = params_of(tiny_bert())
    on = fit(tmp_path / "on", plain=False, xsam=RHO_ON)
    first = on.xsam
    on.train()
    assert on.xsam is first and first.step_count == 8  # the same optimizer, wrapped once, went on counting
    assert_trains(on, before)


def test_resume_from_checkpoint_after_a_finished_run(tmp_path):
    def run(name, plain, xsam=None):
        out = tmp_path / name
        fit(out, plain=plain, xsam=xsam, save_strategy="steps", save_steps=4)
        assert (out / "checkpoint-4").is_dir()
        resumed = fit(out, plain=plain, xsam=xsam, train=False, save_strategy="no", max_steps=6)
        resumed.train(resume_from_checkpoint=True)
        return resumed

    plain, ours = run("plain", True), run("ours", False)
    assert_same_training(plain, ours)
    assert plain.state.global_step == ours.state.global_step == 6
    on = run("on", False, RHO_ON)
    assert on.xsam.step_count == 6  # 4 saved in the checkpoint's optimizer state, then 2 more
    assert_trains(on, params_of(tiny_bert()))


# ---------------------------------------------------------------------- auto_find_batch_size
class OutOfMemoryOnce:
    """Raises the CPU allocator's out-of-memory error (the one Accelerate's batch-size finder catches) on the
    ``at``-th forward of the model, once."""

    def __init__(self, model, at: int):
        self.calls, self.at, self.raised = 0, at, False
        model.register_forward_pre_hook(self)

    def __call__(self, module, args):
        self.calls += 1
        if self.calls == self.at and not self.raised:
            self.raised = True
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes.")


def test_auto_find_batch_size(tmp_path):
    """A step at batch 8 runs out of memory; the Trainer retries with a smaller batch. The error strikes the second
    step's theta_0 pass (forward 3); at rho > 0 also its ascent pass (forward 4), which must leave the weights as
    the failed step found them, so that both runs go on alike."""
    options = dict(auto_find_batch_size=True, per_device_train_batch_size=8)

    def run(name, plain, at, xsam=None):
        model = tiny_bert(dropout=0.0)
        hook = OutOfMemoryOnce(model, at)
        trainer = fit(tmp_path / name, plain=plain, model=model, xsam=xsam, **options)
        assert hook.raised and trainer._train_batch_size < 8
        return trainer

    assert_same_training(run("plain", True, at=3), run("ours", False, at=3))
    on = dict(RHO_ON, xsam_probe_every=0, xsam_alpha=0.5)  # two forwards per step: theta_0, then the ascent
    at_theta_0, in_ascent = run("theta_0", False, at=3, xsam=on), run("ascent", False, at=4, xsam=on)
    for name, p in params_of(at_theta_0.model).items():
        assert torch.equal(p, params_of(in_ascent.model)[name]), name
    assert_trains(in_ascent, params_of(tiny_bert(dropout=0.0)))


class WindowAtStart(XSAMTrainer):
    """Records, each time a run starts afresh, how many micro-batches the window held (what the start forgets);
    None at construction."""

    def _xsam_start_run(self) -> None:
        window = getattr(self, "_xsam_window", None)
        self.window_at_start = [*getattr(self, "window_at_start", []), None if window is None else len(window)]
        super()._xsam_start_run()


def test_every_run_starts_from_an_empty_window(tmp_path):
    """Out of memory in the second micro-batch of an accumulation window leaves the first one in the window; the
    retry at a smaller batch starts without it, and so does train() called again."""
    model = tiny_bert(dropout=0.0)
    hook = OutOfMemoryOnce(model, at=2)  # forward 2: the second micro-batch's theta_0 pass
    args = XSAMTrainingArguments(**settings(tmp_path, **RHO_ON, auto_find_batch_size=True,
                                            per_device_train_batch_size=8, gradient_accumulation_steps=2))
    trainer = WindowAtStart(model=model, args=args, train_dataset=text_data(n=32))
    trainer.train()
    assert hook.raised and trainer._train_batch_size < 8
    assert trainer.window_at_start == [None, 0, 1]  # built; the first try; the retry, forgetting one micro-batch
    trainer.train()
    assert trainer.window_at_start == [None, 0, 1, 0] and trainer.xsam.step_count == 8


# ---------------------------------------------------------------------- model_init and hyperparameter search
def test_model_init(tmp_path):
    init = dict(trainer_kwargs={"model_init": lambda: tiny_bert()})
    assert_same_training(fit(tmp_path / "plain", plain=True, **init), fit(tmp_path / "ours", plain=False, **init))
    on = fit(tmp_path / "on", plain=False, xsam=RHO_ON, **init)
    assert_trains(on, params_of(tiny_bert()))


class Record(TrainerCallback):
    """What each training run (one per trial) began and ended with."""

    def __init__(self):
        self.trainer, self.runs = None, []

    def on_train_begin(self, args, state, control, **kwargs):
        opt = getattr(self.trainer, "xsam", None) if args.optim in ("xsam", "sam") else None
        self.runs.append({"xsam": opt, "step_at_start": opt.step_count if opt else None,
                          "rho": opt.rho if opt else None, "lr": args.learning_rate})

    def on_train_end(self, args, state, control, **kwargs):
        self.runs[-1]["weights"] = params_of(self.trainer.model)


def search(output_dir, plain: bool, xsam=None, hp_space=None):
    pytest.importorskip("optuna")
    import optuna

    record = Record()
    trainer = fit(output_dir, plain=plain, xsam=xsam, train=False, eval_strategy="no",
                  trainer_kwargs={"model_init": lambda: tiny_bert(), "eval_dataset": text_data(n=8, seed=5),
                                  "callbacks": [record]})
    record.trainer = trainer
    space = hp_space or (lambda trial: {"learning_rate": trial.suggest_float("learning_rate", 1e-4, 1e-2, log=True)})
    best = trainer.hyperparameter_search(hp_space=space, n_trials=2, direction="minimize", backend="optuna",
                                         sampler=optuna.samplers.RandomSampler(seed=0))
    return best, record.runs


def test_hyperparameter_search(tmp_path):
    plain_best, plain_runs = search(tmp_path / "plain", plain=True)
    ours_best, ours_runs = search(tmp_path / "ours", plain=False, xsam=RHO_ZERO)
    assert len(plain_runs) == len(ours_runs) == 2
    assert plain_best.objective == ours_best.objective and plain_best.hyperparameters == ours_best.hyperparameters
    for a, b in zip(plain_runs, ours_runs):
        assert a["lr"] == b["lr"]
        for name in a["weights"]:
            assert torch.equal(a["weights"][name], b["weights"][name]), name

    def space(trial):
        return {"learning_rate": trial.suggest_float("learning_rate", 1e-4, 1e-2, log=True),
                "xsam_rho": trial.suggest_categorical("xsam_rho", [0.05, 0.2])}

    _, runs = search(tmp_path / "on", plain=False, xsam=RHO_ON, hp_space=space)
    assert len(runs) == 2 and runs[0]["xsam"] is not runs[1]["xsam"]  # each trial builds its own XSAM
    assert [r["step_at_start"] for r in runs] == [0, 0]  # no state leaks from one trial into the next
    assert all(r["rho"] in (0.05, 0.2) for r in runs)
    before = params_of(tiny_bert())
    assert all(any(not torch.equal(before[n], r["weights"][n]) for n in before) for r in runs)


# ---------------------------------------------------------------------- optimizers the user passes
def sgd_of(model):
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)


def test_optimizers_xsam_instance_and_scheduler(tmp_path):
    def halving(opt):
        return torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)

    model = tiny_bert()
    sgd = sgd_of(model)
    plain = fit(tmp_path / "plain", plain=True, model=model, trainer_kwargs={"optimizers": (sgd, halving(sgd))})
    model = tiny_bert()
    xsam = XSAM(model.parameters(), torch.optim.SGD, rho=0.0, lr=0.05, momentum=0.9)
    ours = fit(tmp_path / "ours", plain=False, model=model, trainer_kwargs={"optimizers": (xsam, halving(xsam))})
    assert_same_training(plain, ours)
    assert ours.xsam is xsam

    model = tiny_bert()
    before = params_of(model)
    xsam = XSAM(model.parameters(), torch.optim.SGD, rho=0.1, alpha=0.5, probe_every=0, lr=0.05, momentum=0.9)
    on = fit(tmp_path / "on", plain=False, model=model, xsam=RHO_ON, trainer_kwargs={"optimizers": (xsam, None)})
    assert on.xsam is xsam and xsam.step_count == 4 and xsam.alpha == 0.5  # the instance's settings, not the flags'
    assert_trains(on, before)


def test_optimizers_base_instance_is_wrapped(tmp_path):
    model = tiny_bert()
    plain = fit(tmp_path / "plain", plain=True, model=model, trainer_kwargs={"optimizers": (sgd_of(model), None)})
    model = tiny_bert()
    sgd = sgd_of(model)
    ours = fit(tmp_path / "ours", plain=False, model=model, trainer_kwargs={"optimizers": (sgd, None)})
    assert_same_training(plain, ours)
    assert ours.xsam.base_optimizer is sgd

    model = tiny_bert()
    before, sgd = params_of(model), sgd_of(model)
    on = fit(tmp_path / "on", plain=False, model=model, xsam=RHO_ON, trainer_kwargs={"optimizers": (sgd, None)})
    assert on.xsam.base_optimizer is sgd and on.xsam.rho == 0.1 and on.xsam.step_count == 4
    assert_trains(on, before)


def test_optimizer_cls_and_kwargs(tmp_path):
    chosen = {"optimizer_cls_and_kwargs": (torch.optim.SGD, {"lr": 0.05, "momentum": 0.9})}
    plain = fit(tmp_path / "plain", plain=True, trainer_kwargs=chosen)
    ours = fit(tmp_path / "ours", plain=False, trainer_kwargs=chosen)
    assert_same_training(plain, ours)
    assert type(ours.xsam.base_optimizer) is torch.optim.SGD
    on = fit(tmp_path / "on", plain=False, xsam=RHO_ON, trainer_kwargs=chosen)
    assert type(on.xsam.base_optimizer) is torch.optim.SGD and on.xsam.step_count == 4
    assert_trains(on, params_of(tiny_bert()))


def test_an_xsam_instance_without_optim_xsam_is_refused_before_training(tmp_path):
    model = tiny_bert()
    before = params_of(model)
    xsam = XSAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.05)
    trainer = fit(tmp_path, plain=False, model=model, xsam=dict(optim=BASE), train=False,
                  trainer_kwargs={"optimizers": (xsam, None)})
    with pytest.raises(ValueError, match=r"optimizers=\(XSAM\(\.\.\.\), \.\.\.\) was given with optim='adamw_torch'"):
        trainer.train()
    for name, p in params_of(model).items():
        assert torch.equal(p, before[name]), name


# ---------------------------------------------------------------------- a trainer that is never trained
def encoder(seed: int = 0) -> BertModel:
    """A model whose forward takes no labels (no task head)."""
    torch.manual_seed(seed)
    return BertModel(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=64, max_position_embeddings=32))


def test_evaluation_prediction_and_optimizer_helpers_without_training(tmp_path):
    data = [{"input_ids": row["input_ids"]} for row in text_data(n=8)]

    def build(plain):
        return fit(tmp_path / str(plain), plain=plain, model=encoder(), data=data, train=False,
                   per_device_eval_batch_size=4)

    plain, ours = build(True), build(False)
    assert ours.get_num_trainable_parameters() == plain.get_num_trainable_parameters() > 0
    a, b = plain.predict(data), ours.predict(data)
    for x, y in zip(a.predictions, b.predictions):
        assert (x == y).all()
    plain.create_optimizer()
    ours.create_optimizer()
    assert isinstance(ours.optimizer, XSAM)
    assert ours.get_learning_rates() == plain.get_learning_rates() == [1e-3, 1e-3]
    param = next(ours.model.parameters())
    assert ours.get_optimizer_group(param)["lr"] == plain.get_optimizer_group(next(plain.model.parameters()))["lr"]
    assert len(ours.get_optimizer_group()) == len(plain.get_optimizer_group()) == 2

    before = params_of(ours.model)
    with pytest.raises(ValueError, match=r"optim='xsam' needs a loss, but BertModel.forward takes no labels"):
        ours.train()
    for name, p in params_of(ours.model).items():
        assert torch.equal(p, before[name]), name


# ---------------------------------------------------------------------- every accumulation count, every logged number
@pytest.mark.parametrize("accumulation", [1, 2, 3])
@pytest.mark.parametrize("family", ["bert", "llama"])
def test_every_accumulation_count(tmp_path, family, accumulation):
    """20 examples in micro-batches of 2: with 3 micro-batches per step the epoch ends on a shorter window. BERT's
    forward takes **kwargs and ignores num_items_in_batch; the Llama normalises by it: both as the plain Trainer."""
    build, data = (tiny_bert, text_data(n=20)) if family == "bert" else (tiny_llama, padded_text(20, low=3, high=19))
    options = dict(per_device_train_batch_size=2, gradient_accumulation_steps=accumulation, max_steps=-1,
                   num_train_epochs=1, max_grad_norm=1.0)
    plain = fit(tmp_path / "plain", plain=True, model=build(), data=data, **options)
    ours = fit(tmp_path / "ours", plain=False, model=build(), data=data, **options)
    assert_same_training(plain, ours)
    assert {"loss", "grad_norm"} <= logs(ours)[0].keys() and "train_loss" in logs(ours)[-1]
    on = fit(tmp_path / "on", plain=False, model=build(), data=data, xsam=RHO_ON, **options)
    assert_trains(on, params_of(build()))
    assert on.state.global_step == plain.state.global_step == -(-10 // accumulation)


def test_the_cheap_mode_at_rho_zero_is_the_plain_run(tmp_path):
    """``--xsam_sharpness_every 2 --xsam_reuse`` at rho 0, with accumulation and clipping: the plain run bitwise;
    at rho > 0 the sharpness steps log as with plain steps in between, and a step in between clips the corrected
    direction."""
    cheap = dict(xsam_sharpness_every=2, xsam_reuse=True)
    options = dict(per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=4, max_grad_norm=1.0)
    plain = fit(tmp_path / "plain", plain=True, **options)
    ours = fit(tmp_path / "ours", plain=False, xsam=dict(RHO_ZERO, **cheap), **options)
    assert_same_training(plain, ours)
    every = fit(tmp_path / "every", plain=False, xsam=dict(RHO_ON, xsam_sharpness_every=2), **options)
    reused = fit(tmp_path / "reused", plain=False, xsam=dict(RHO_ON, **cheap), **options)
    first, second = ([entry for entry in logs(run) if "grad_norm" in entry] for run in (every, reused))
    assert len(first) == len(second) == 4
    assert first[0] == second[0]  # the sharpness step: the same
    assert first[1]["loss"] == second[1]["loss"]  # from the same weights,
    assert first[1]["grad_norm"] != second[1]["grad_norm"]  # the step in between clips the corrected direction
    assert every.xsam.step_count == reused.xsam.step_count == 4


# ---------------------------------------------------------------------- every PEFT adapter, with Trainer and trl's SFT
def adapter_config(kind: str):
    import peft

    task = "CAUSAL_LM"
    return {
        "lora": lambda: peft.LoraConfig(task_type=task, r=4, target_modules=["q_proj", "v_proj"]),
        "ia3": lambda: peft.IA3Config(task_type=task, target_modules=["k_proj", "v_proj", "down_proj"],
                                      feedforward_modules=["down_proj"]),
        "prefix_tuning": lambda: peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=4),
        "prompt_tuning": lambda: peft.PromptTuningConfig(task_type=task, num_virtual_tokens=4),
        "p_tuning": lambda: peft.PromptEncoderConfig(task_type=task, num_virtual_tokens=4, encoder_hidden_size=16),
    }[kind]()


ADAPTERS = ["lora", "ia3", "prefix_tuning", "prompt_tuning", "p_tuning"]


def adapted(kind: str):
    from peft import get_peft_model

    model = get_peft_model(tiny_llama(), adapter_config(kind))
    torch.manual_seed(1)  # the adapters' own initialisation draws from the global generator: make it the same
    return model


def sft_run(output_dir, plain: bool, model, xsam=None, **overrides):
    from trl import SFTConfig, SFTTrainer

    values = settings(output_dir, max_length=32, dataset_num_proc=None, bf16=False, max_steps=3,
                      gradient_accumulation_steps=2, per_device_train_batch_size=2, learning_rate=1e-2)
    values.update(overrides)
    if plain:
        args, cls = SFTConfig(**values, optim=BASE), SFTTrainer
    else:
        args, cls = XSAMSFTConfig(**values, **(xsam or RHO_ZERO)), XSAMSFTTrainer
    trainer = cls(model=model, args=args, train_dataset=sentences(), processing_class=tiny_tokenizer())
    trainer.train()
    return trainer


def adapter_params(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("kind", ADAPTERS)
@pytest.mark.parametrize("family", ["trainer", "sft"])
def test_every_peft_adapter(tmp_path, family, kind):
    """Prompt learning prepends virtual tokens and normalises the loss by the model's own label mask: the XSAM
    passes must weigh the tokens exactly as the plain trainer's step does."""
    if family == "trainer":
        def run(name, plain, xsam=None):
            return fit(tmp_path / name, plain=plain, model=adapted(kind), data=padded_text(16, low=3, high=19),
                       xsam=xsam, per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=3,
                       learning_rate=1e-2)
    else:
        def run(name, plain, xsam=None):
            return sft_run(tmp_path / name, plain=plain, model=adapted(kind), xsam=xsam)

    try:
        plain = run("plain", True)
    except RuntimeError as error:  # trl 1.16's SFTTrainer with prefix tuning: the plain trainer fails on its own
        with pytest.raises(RuntimeError) as ours_error:
            run("ours", False)
        assert str(ours_error.value) == str(error)  # and the XSAM path fails exactly alike, no further
        return
    ours = run("ours", False)
    assert_same_training(plain, ours)
    on = run("on", False, dict(RHO_ON, xsam_probe_every=1))
    before, after = adapter_params(adapted(kind)), adapter_params(on.model)
    assert before.keys() == after.keys() and all(not torch.equal(before[n], after[n]) for n in before)
    frozen = {n: p for n, p in on.model.named_parameters() if not p.requires_grad}
    reference = dict(adapted(kind).named_parameters())
    assert all(torch.equal(p, reference[n]) for n, p in frozen.items())  # the base model: never moved
    assert len(on.xsam._theta_0) == len(before)  # theta_0 holds the adapter only


@pytest.mark.parametrize("accumulation", [1, 3])
def test_sft_trainer_every_logged_number(tmp_path, accumulation):
    """trl's SFTTrainer counts tokens and logs metrics in compute_loss; at accumulation 3 the Trainer divides the
    loss by 3, which the XSAM path must do the same way (not multiply by a rounded 1/3)."""
    plain = sft_run(tmp_path / "plain", plain=True, model=tiny_llama(), gradient_accumulation_steps=accumulation)
    ours = sft_run(tmp_path / "ours", plain=False, model=tiny_llama(), gradient_accumulation_steps=accumulation)
    assert_same_training(plain, ours)
    assert {"loss", "grad_norm", "num_tokens", "entropy", "mean_token_accuracy"} <= logs(ours)[0].keys()


# ---------------------------------------------------------------------- trl's DPO
def test_dpo_trainer(tmp_path):
    from trl import DPOConfig, DPOTrainer

    XSAMDPOConfig, XSAMDPOTrainer = dpo_pair()
    pairs = preference_pairs(3)

    def run(name, plain, xsam=None):
        values = settings(tmp_path / name, max_steps=2, per_device_train_batch_size=2, gradient_accumulation_steps=3,
                          bf16=False, dataset_num_proc=None)
        args = DPOConfig(**values, optim=BASE) if plain else XSAMDPOConfig(**values, **(xsam or RHO_ZERO))
        trainer = (DPOTrainer if plain else XSAMDPOTrainer)(
            model=tiny_llama(), ref_model=tiny_llama(), args=args, train_dataset=pairs,
            processing_class=tiny_tokenizer())
        trainer.train()
        return trainer

    assert_same_training(run("plain", True), run("ours", False))
    on = run("on", False, RHO_ON)
    assert_trains(on, params_of(tiny_llama()))
