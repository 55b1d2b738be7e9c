"""``KTTrainer`` (a transformers ``Trainer`` for KT-wrapped models) and
``run_sft``, the supervised fine-tuning workflow behind ``ktmoe train``
(spec 004 §1.3)."""

from __future__ import annotations

import json
import logging
import os
import resource
import shutil
import sys
import time
from pathlib import Path
from typing import List, Optional

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import ProgressCallback

from ..hf.errors import KTAMXConfigError

logger = logging.getLogger(__name__)

SUMMARY_FILE = "run_summary.json"
CONFIG_FILE = "train_config.yaml"
LOSS_PLOT = "training_loss.png"


def _kt_layers(model):
    from ..hf import kt_wrappers

    try:
        return kt_wrappers(model)
    except Exception:
        return []


class _LoraPointers(TrainerCallback):
    """After each optimizer step, make the kernels read the current LoRA
    tensors (spec 004 §2.4 ``update_lora_pointers``; a no-op unless an
    optimizer replaced a tensor, and every forward checks it anyway)."""

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        if model is not None:
            for w in _kt_layers(model):
                w.update_lora_pointers()


class KTProgressCallback(ProgressCallback):
    """transformers' progress bar, with each log printed as one short line
    and the latest loss shown on the bar."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or self.training_bar is None or not logs:
            return
        if "loss" in logs:
            self.training_bar.set_postfix(loss=f"{logs['loss']:.4f}", refresh=False)
        keys = [("loss", "loss", "{:.4f}"), ("eval_loss", "eval_loss", "{:.4f}"),
                ("grad_norm", "grad_norm", "{:.3g}"), ("learning_rate", "lr", "{:.3g}"), ("epoch", "epoch", "{:.2f}")]
        parts = [f"{label} {fmt.format(logs[k])}" for k, label, fmt in keys
                 if isinstance(logs.get(k), (int, float))]
        if len(parts) > 1 or (parts and "epoch" not in logs):
            self.training_bar.write(f"step {state.global_step:>5}/{state.max_steps}  " + "  ".join(parts))


class KTTrainer(Trainer):
    """A transformers ``Trainer`` for models whose routed experts run on
    ktmoe's kernels (spec 004 §1.3).

    * saving (checkpoints and the final model) writes the adapter with
      :func:`ktmoe.hf.save_kt_adapter`: one PEFT adapter for the unmodified
      model (attention LoRA + the experts' LoRA) plus ``kt_adapter.json``;
    * resuming from a checkpoint and loading the best model read it back with
      :func:`ktmoe.hf.load_kt_adapter`;
    * after every optimizer step the kernels' LoRA pointers are refreshed;
    * ``num_tokens`` / ``num_supervised_tokens`` count the non-padding and the
      loss tokens trained on by this ``train()`` call.

    Models that are not KT-wrapped are handled exactly as ``Trainer`` does."""

    def __init__(self, *args, finetuning_args=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.finetuning_args = finetuning_args
        self.num_tokens = 0
        self.num_supervised_tokens = 0
        if self.is_kt:
            self.add_callback(_LoraPointers())
        if self.args.disable_tqdm is False or self.args.disable_tqdm is None:
            self.remove_callback(ProgressCallback)
            self.add_callback(KTProgressCallback())

    @property
    def is_kt(self) -> bool:
        return bool(_kt_layers(self.model))

    def training_step(self, model, inputs, num_items_in_batch=None):
        mask = inputs.get("attention_mask")
        ids = inputs.get("input_ids")
        if mask is not None:
            self.num_tokens += int(mask.sum())
        elif ids is not None:
            self.num_tokens += ids.numel()
        labels = inputs.get("labels")
        if labels is not None:
            self.num_supervised_tokens += int((labels[:, 1:] != -100).sum())
        return super().training_step(model, inputs, num_items_in_batch)

    def _save(self, output_dir: Optional[str] = None, state_dict=None) -> None:
        if not self.is_kt:
            return super()._save(output_dir, state_dict)
        from ..hf import save_kt_adapter

        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        save_kt_adapter(self.model, output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)

    def _load_kt(self, path: str, model=None) -> None:
        from ..hf import load_kt_adapter

        model = model if model is not None else self.model
        flags = {id(p): p.requires_grad for p in model.parameters()}
        loaded = load_kt_adapter(model, path, is_trainable=True)
        if loaded is not model:
            raise KTAMXConfigError(f"{path}: the checkpoint's adapter does not fit the model being trained "
                                   "(it has LoRA modules the model lacks)")
        for p in model.parameters():  # keep what the config froze (e.g. the experts' LoRA)
            if id(p) in flags:
                p.requires_grad_(flags[id(p)])

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        if not self.is_kt:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        self._load_kt(resume_from_checkpoint, model)

    def _load_best_model(self):
        if not self.is_kt:
            return super()._load_best_model()
        best = self.state.best_model_checkpoint
        if best and os.path.isdir(best):
            logger.info("Loading the best model from %s (score: %s).", best, self.state.best_metric)
            self._load_kt(best)


# ------------------------------------------------------------------ helpers

def plot_loss(output_dir, log_history: List[dict]) -> Optional[str]:
    """Write ``training_loss.png`` (logged training loss, smoothed, and the
    evaluation loss when there is one) to ``output_dir``; returns its path,
    or None when nothing was logged or matplotlib is missing."""
    points = [(e["step"], e["loss"]) for e in log_history if "loss" in e and "step" in e]
    evals = [(e["step"], e["eval_loss"]) for e in log_history if "eval_loss" in e and "step" in e]
    if not points:
        return None
    try:
        from matplotlib.figure import Figure
    except ImportError:
        logger.warning("matplotlib is not installed: no loss plot (pip install matplotlib)")
        return None
    steps, losses = zip(*points)
    half = max(1, len(losses) // 20)  # centred moving average over about a tenth of the points
    smooth = [sum(losses[max(0, i - half):i + half + 1]) / len(losses[max(0, i - half):i + half + 1])
              for i in range(len(losses))]
    fig = Figure(figsize=(7, 4.2), dpi=110)
    ax = fig.subplots()
    ax.plot(steps, losses, color="#1f77b4", alpha=0.35, label="training loss")
    ax.plot(steps, smooth, color="#1f77b4", label="smoothed")
    if evals:
        es, ev = zip(*evals)
        ax.plot(es, ev, "o-", color="#d62728", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(f"training loss of {Path(output_dir).resolve().name}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = os.path.join(output_dir, LOSS_PLOT)
    fig.savefig(path)
    return path


def resolve_resume(training_args) -> Optional[str]:
    """The checkpoint to resume from: ``resume_from_checkpoint`` when set
    (``true`` = the last one in output_dir), else the last checkpoint in
    output_dir unless ``overwrite_output_dir`` (which instead removes the
    old ``checkpoint-*`` directories)."""
    from transformers.trainer_utils import get_last_checkpoint

    out = training_args.output_dir
    last = get_last_checkpoint(out) if os.path.isdir(out) else None
    r = training_args.resume_from_checkpoint
    if r in (None, "", False) or str(r).lower() in ("false", "none"):
        if last and not training_args.overwrite_output_dir:
            logger.warning("resuming from %s (the last checkpoint in output_dir; set overwrite_output_dir: true "
                           "to start over)", last)
            return last
        if last and training_args.overwrite_output_dir:
            for d in sorted(Path(out).glob("checkpoint-*")):
                if d.is_dir():
                    shutil.rmtree(d)
        return None
    if r is True or str(r).lower() == "true":
        if not last:
            raise KTAMXConfigError(f"resume_from_checkpoint: true, but {out} holds no checkpoint-* directory")
        return last
    if not os.path.isdir(r):
        raise KTAMXConfigError(f"resume_from_checkpoint: {r} is not a directory")
    return str(r)


def _versions() -> dict:
    import transformers

    from .. import __version__

    out = {"ktmoe": __version__, "torch": torch.__version__, "transformers": transformers.__version__}
    try:
        import peft

        out["peft"] = peft.__version__
    except ImportError:  # pragma: no cover
        pass
    return out


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _write_config(path: Path, config: dict) -> None:
    import yaml

    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(config, f, sort_keys=False, allow_unicode=True)


def run_sft(model_args, data_args, training_args, finetuning_args, generating_args=None, callbacks=None, *,
            config: Optional[dict] = None, progress: bool = True):
    """Supervised LoRA fine-tuning (spec 004 §1.3): load the tokenizer, the
    data and the model (KT-wrapped with ``use_kt``), train with
    :class:`KTTrainer` (resuming from the last checkpoint in ``output_dir``
    unless ``overwrite_output_dir``), save the adapter and the tokenizer to
    ``output_dir``, and write ``training_loss.png``, ``run_summary.json``
    and ``train_config.yaml`` there.  Returns the trainer (its
    ``kt_summary`` is the summary)."""
    from transformers import set_seed

    from .data import SFTDataCollator, get_dataset, get_template
    from .model import compute_dtype, count_parameters, load_model, load_tokenizer
    from .tiny import prepare_builtin_model

    t0 = time.perf_counter()
    out = Path(training_args.output_dir)
    given_model = model_args.model_name_or_path
    resume = resolve_resume(training_args)
    out.mkdir(parents=True, exist_ok=True)
    builtin = prepare_builtin_model(model_args, out)
    set_seed(training_args.seed)
    tokenizer = load_tokenizer(model_args)["tokenizer"]
    template = get_template(data_args.template, tokenizer)
    data = get_dataset(template, data_args, seed=training_args.seed)
    t_model = time.perf_counter()
    model = load_model(tokenizer, model_args, finetuning_args, is_trainable=True,
                       dtype=compute_dtype(training_args), progress=progress)
    load_s = time.perf_counter() - t_model
    trainable, total = count_parameters(model)
    layers = _kt_layers(model)
    kt_bytes = sum(int(getattr(w.kt_wrapper, "weight_bytes", 0)) for w in layers)
    print(f"ktmoe train: {given_model} ({model.config.model_type}), "
          + (f"{len(layers)} MoE layers on ktmoe ({layers[0].kt_wrapper.method}, "
             f"{layers[0].kt_wrapper.cpuinfer_threads} threads, {kt_bytes / 2**20:.1f} MiB of experts), "
             if layers else "experts in PyTorch, ")
          + f"{trainable:,} trainable of {total:,} parameters; {len(data['train_dataset'])} examples "
          f"({template.name} template); output {out}", file=sys.stderr, flush=True)
    if config is not None:
        _write_config(out / CONFIG_FILE, config)
    trainer = KTTrainer(model=model, args=training_args, train_dataset=data["train_dataset"],
                        eval_dataset=data["eval_dataset"], data_collator=SFTDataCollator(tokenizer.pad_token_id),
                        processing_class=tokenizer, callbacks=callbacks, finetuning_args=finetuning_args)
    result = trainer.train(resume_from_checkpoint=resume)
    trainer.save_model()
    trainer.save_state()
    metrics = dict(result.metrics)
    eval_loss = None
    if data["eval_dataset"] is not None:
        eval_metrics = trainer.evaluate()
        eval_loss = eval_metrics.get("eval_loss")
    png = plot_loss(out, trainer.state.log_history) if finetuning_args.plot_loss else None

    losses = [[e["step"], e["loss"]] for e in trainer.state.log_history if "loss" in e and "step" in e]
    runtime = float(metrics.get("train_runtime", 0.0))
    first_step = int(getattr(trainer, "_initial_global_step", 0) or 0)
    summary = {
        "output_dir": str(out.resolve()),
        "adapter": str(out.resolve()),
        "loss_curve": str(Path(png).resolve()) if png else None,
        "model": given_model,
        "base_model_path": model_args.model_name_or_path,
        "builtin_model": builtin,
        "model_type": model.config.model_type,
        "use_kt": bool(model_args.use_kt),
        "kt_method": layers[0].kt_wrapper.method if layers else None,
        "kt_moe_layers": len(layers),
        "kt_threads": layers[0].kt_wrapper.cpuinfer_threads if layers else None,
        "kt_expert_weight_bytes": kt_bytes,
        "trainable_params": trainable,
        "params_in_torch": total,
        "train_examples": len(data["train_dataset"]),
        "steps": trainer.state.global_step,
        "steps_this_run": trainer.state.global_step - first_step,
        "resumed_from": resume,
        "epochs": trainer.state.epoch,
        "model_load_s": round(load_s, 3),
        "train_runtime_s": round(runtime, 3),
        "total_time_s": round(time.perf_counter() - t0, 3),
        "tokens_this_run": trainer.num_tokens,
        "supervised_tokens_this_run": trainer.num_supervised_tokens,
        "tokens_per_second": round(trainer.num_tokens / runtime, 1) if runtime > 0 else None,
        "loss_first": losses[0][1] if losses else None,
        "loss_last": losses[-1][1] if losses else None,
        "train_loss_mean": metrics.get("train_loss"),
        "eval_loss": eval_loss,
        "losses": losses,
        "peak_rss_mib": round(_peak_rss_mib(), 1),
        "config": config,
        "versions": _versions(),
    }
    with open(out / SUMMARY_FILE, "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
        f.write("\n")
    trainer.kt_summary = summary
    return trainer


__all__ = ["KTTrainer", "KTProgressCallback", "run_sft", "plot_loss", "resolve_resume", "SUMMARY_FILE",
           "CONFIG_FILE", "LOSS_PLOT"]
