"""``ktmoe train`` configuration: the spec 004 §7.1 keys, value conversion,
and the errors for unknown keys and bad values (no model is built here)."""

from __future__ import annotations

import dataclasses
import os

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("yaml")

from ktmoe.train.args import (  # noqa: E402
    BUILTIN_MODEL,
    DEFAULT_CONFIG,
    get_infer_args,
    get_train_args,
    parse_overrides,
    valid_kt_backends,
)
from ktmoe.hf.errors import KTAMXConfigError  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: spec 004 §7.1, with a dataset (the spec's example leaves the data keys out)
SPEC_CONFIG = {
    "model_name_or_path": "deepseek-ai/DeepSeek-V2-Lite-Chat",
    "stage": "sft",
    "finetuning_type": "lora",
    "use_kt": True,
    "kt_backend": "AMXBF16",
    "kt_num_threads": 60,
    "kt_tp_enabled": True,
    "kt_num_gpu_experts": 0,
    "lora_rank": 16,
    "lora_alpha": 32,
    "lora_target": "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
    "per_device_train_batch_size": 1,
    "gradient_accumulation_steps": 8,
    "learning_rate": 1.0e-4,
    "num_train_epochs": 1,
    "output_dir": "outputs/deepseek_v2_sft_kt_amx",
    "dataset": "tiny_alpaca",
}


def test_spec_config_parses_into_the_dataclasses(tmp_path):
    cfg = dict(SPEC_CONFIG, output_dir=str(tmp_path / "out"), kt_max_cache_depth=8, kt_tp_count=2,
               cutoff_len=512, template="plain")
    model_args, data_args, training_args, finetuning_args, generating_args = get_train_args(cfg)
    assert model_args.use_kt is True and model_args.kt_backend == "AMXBF16"
    assert (model_args.kt_num_threads, model_args.kt_tp_enabled, model_args.kt_tp_count) == (60, True, 2)
    assert (model_args.kt_num_gpu_experts, model_args.kt_max_cache_depth) == (0, 8)
    assert (finetuning_args.stage, finetuning_args.finetuning_type) == ("sft", "lora")
    assert (finetuning_args.lora_rank, finetuning_args.lora_alpha) == (16, 32.0)
    assert (data_args.dataset, data_args.cutoff_len, data_args.template) == ("tiny_alpaca", 512, "plain")
    assert training_args.gradient_accumulation_steps == 8
    assert training_args.learning_rate == pytest.approx(1e-4)
    assert training_args.num_train_epochs == 1
    assert training_args.output_dir == str(tmp_path / "out")
    # our defaults for keys the config leaves out
    assert training_args.logging_steps == 10 and training_args.logging_first_step
    assert generating_args.max_new_tokens == 128
    # the spec's dataclasses exist under their names
    import ktmoe.train as kt_train

    for name in ("ModelArguments", "DataArguments", "FinetuningArguments", "GeneratingArguments",
                 "TrainingArguments"):
        assert dataclasses.is_dataclass(getattr(kt_train, name))
    from transformers import Seq2SeqTrainingArguments

    assert isinstance(training_args, Seq2SeqTrainingArguments)


def test_values_are_converted_to_the_field_types(tmp_path):
    # YAML reads 1e-4 (no dot) as a string; lists of names become comma lists
    cfg = dict(SPEC_CONFIG, output_dir=str(tmp_path), learning_rate="1e-4", lora_rank="8",
               use_kt="yes", lora_target=["q_proj", "v_proj"], dataset=["tiny_alpaca", "tiny_sharegpt"],
               warmup_ratio=0.1, max_steps=50)
    model_args, data_args, training_args, finetuning_args, _ = get_train_args(cfg)
    assert training_args.learning_rate == pytest.approx(1e-4)
    assert finetuning_args.lora_rank == 8 and finetuning_args.lora_alpha == 32.0
    assert model_args.use_kt is True
    assert finetuning_args.lora_target == "q_proj,v_proj"
    assert data_args.dataset == "tiny_alpaca,tiny_sharegpt"
    assert training_args.warmup_steps == pytest.approx(0.1)  # warmup_ratio -> a ratio of the steps
    assert get_train_args(dict(cfg, resume_from_checkpoint=True))[2].resume_from_checkpoint == "true"
    assert get_train_args(dict(cfg, resume_from_checkpoint=False))[2].resume_from_checkpoint is None
    # lora_alpha defaults to twice the rank
    cfg.pop("lora_alpha")
    assert get_train_args(cfg)[3].lora_alpha == 16.0


def test_overrides_on_the_command_line(tmp_path):
    ov = parse_overrides(["max_steps=7", "use_kt=false", "learning_rate=3e-3", f"output_dir={tmp_path}"])
    assert ov == {"max_steps": 7, "use_kt": False, "learning_rate": "3e-3", "output_dir": str(tmp_path)}
    model_args, _, training_args, _, _ = get_train_args(SPEC_CONFIG, ov)
    assert training_args.max_steps == 7 and model_args.use_kt is False
    assert training_args.learning_rate == pytest.approx(3e-3)
    with pytest.raises(KTAMXConfigError, match="key=value"):
        parse_overrides(["max_steps"])


def _err(cfg) -> str:
    with pytest.raises(KTAMXConfigError) as ei:
        get_train_args(cfg)
    return str(ei.value)


def test_unknown_key_names_the_valid_keys():
    msg = _err(dict(SPEC_CONFIG, lora_rnak=8))
    assert "unknown key 'lora_rnak'" in msg
    assert "did you mean 'lora_rank'" in msg
    for key in ("kt_backend", "kt_num_threads", "kt_weight_path", "kt_max_cache_depth", "lora_target",
                "cutoff_len", "per_device_train_batch_size", "num_train_epochs", "max_steps", "output_dir"):
        assert key in msg, key
    msg = _err(dict(SPEC_CONFIG, kt_bakend="AMXBF16", zzz=1))
    assert "unknown keys" in msg and "'kt_backend'" in msg and "'zzz'" in msg


@pytest.mark.parametrize("key,value,expect", [
    ("kt_backend", "AMXFP16", ["'AMXFP16' is not a valid backend", "AMXBF16", "AMXInt8", "AMXInt4",
                               "AMXInt4_KGroup", "AMXInt4_1KGroup", "AMXINT4_1_SFT"]),
    ("stage", "dpo", ["stage: 'dpo' is not a valid value", "'sft'"]),
    ("finetuning_type", "full", ["finetuning_type: 'full'", "'lora'"]),
    ("lora_rank", "abc", ["lora_rank: 'abc' is not a valid value; expected int"]),
    ("lora_rank", 0, ["lora_rank must be >= 1"]),
    ("use_kt", "maybe", ["use_kt: 'maybe' is not a valid value; expected bool"]),
    ("kt_num_gpu_experts", 4, ["kt_num_gpu_experts must be 0"]),
    ("kt_num_threads", 0, ["kt_num_threads must be >= 1"]),
    ("kt_max_cache_depth", 0, ["kt_max_cache_depth must be >= 1"]),
    ("kt_weight_path", "/nonexistent/weights", ["kt_weight_path: /nonexistent/weights does not exist"]),
    ("template", "qwen", ["template: 'qwen' is not a valid template", "auto, tokenizer, plain"]),
    ("fp16", True, ["fp16 is not supported"]),
    ("learning_rate", "fast", ["learning_rate: 'fast' is not a valid value; expected float"]),
    ("learning_rate", 0, ["learning_rate must be > 0"]),
    ("lr_scheduler_type", "bogus", ["bogus"]),
    ("cutoff_len", 1, ["cutoff_len must be >= 2"]),
])
def test_bad_values_are_named(key, value, expect):
    msg = _err(dict(SPEC_CONFIG, **{key: value}))
    for e in expect:
        assert e in msg, (e, msg)


def test_required_keys():
    assert "model_name_or_path is required" in _err({k: v for k, v in SPEC_CONFIG.items()
                                                     if k != "model_name_or_path"})
    assert "dataset is required" in _err({k: v for k, v in SPEC_CONFIG.items() if k != "dataset"})
    assert "output_dir is required" in _err({k: v for k, v in SPEC_CONFIG.items() if k != "output_dir"})


def test_kt_backends_include_the_spec_names_and_the_int4_family():
    names = valid_kt_backends()
    for n in ("AMXBF16", "AMXInt8", "AMXInt4", "AMXInt4_1", "AMXInt4_KGroup", "AMXInt4_1KGroup",
              "AMXBF16_SFT", "AMXINT8_SFT", "AMXINT4_KGroup_SFT"):
        assert n in names
    from ktmoe.hf.wrap import BACKEND_METHODS, resolve_options

    for short, method in BACKEND_METHODS.items():
        assert resolve_options({"kt_backend": short}).method == method


def test_config_files(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(KTAMXConfigError, match="mapping"):
        get_train_args(str(bad))
    with pytest.raises(KTAMXConfigError, match="does not exist"):
        get_train_args(str(tmp_path / "missing.yaml"))
    broken = tmp_path / "broken.yaml"
    broken.write_text("a: [1, 2\n")
    with pytest.raises(KTAMXConfigError, match="not valid YAML"):
        get_train_args(str(broken))


def test_example_config_is_the_default_and_parses(tmp_path):
    example = os.path.join(REPO, "examples", "train_tiny.yaml")
    with open(example, encoding="utf-8") as a, open(DEFAULT_CONFIG, encoding="utf-8") as b:
        assert a.read() == b.read(), "examples/train_tiny.yaml and ktmoe/data/train_tiny.yaml differ"
    model_args, data_args, training_args, finetuning_args, _ = get_train_args(None, {"output_dir": str(tmp_path)})
    assert model_args.model_name_or_path == BUILTIN_MODEL and model_args.use_kt
    assert training_args.max_steps >= 200 and data_args.dataset


def test_infer_args_accept_a_training_config(tmp_path):
    model_args, data_args, finetuning_args, generating_args = get_infer_args(
        None, {"output_dir": str(tmp_path), "max_new_tokens": 5})
    assert generating_args.max_new_tokens == 5 and model_args.use_kt


def test_cli_config_errors_exit_2(tmp_path, capsys):
    from ktmoe.cli import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text("model_name_or_path: builtin:tiny-moe\ndataset: tiny_alpaca\noutput_dir: x\nlora_rnak: 4\n")
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "did you mean 'lora_rank'" in err
    assert main(["train", str(cfg), "lora_rnak=", "kt_backend=nope"]) == 2
    assert main(["train", "--list-keys"]) == 0
    out = capsys.readouterr().out
    assert "kt_max_cache_depth" in out and "per_device_train_batch_size" in out


def test_spec_names_and_exceptions():
    import transformers

    import ktmoe.train as t

    assert issubclass(t.KTTrainer, transformers.Trainer)
    assert callable(t.load_kt_model) and callable(t.init_cpu_infer) and callable(t.run_sft)
    assert callable(t.load_model) and callable(t.init_adapter) and callable(t.load_tokenizer)
    for name in ("KTAMXNotAvailableError", "KTAMXModelNotSupportedError", "KTAMXConfigError",
                 "KTAMXForwardError", "KTAMXBackwardError"):
        assert issubclass(getattr(t, name), t.KTAMXError)
    assert issubclass(t.KTAMXConfigError, ValueError)
    assert issubclass(t.KTAMXModelNotSupportedError, ValueError)
    assert issubclass(t.KTAMXForwardError, RuntimeError)


def test_resume_choice(tmp_path):
    from ktmoe.train.trainer import resolve_resume

    out = tmp_path / "out"
    for n in (3, 10):
        (out / f"checkpoint-{n}").mkdir(parents=True)

    def args(**kw):
        return get_train_args(dict(SPEC_CONFIG, output_dir=str(out), **kw))[2]

    assert resolve_resume(args()) == str(out / "checkpoint-10")           # the last one, automatically
    assert resolve_resume(args(resume_from_checkpoint=True)) == str(out / "checkpoint-10")
    assert resolve_resume(args(resume_from_checkpoint=str(out / "checkpoint-3"))) == str(out / "checkpoint-3")
    with pytest.raises(KTAMXConfigError, match="is not a directory"):
        resolve_resume(args(resume_from_checkpoint=str(out / "checkpoint-7")))
    assert resolve_resume(args(overwrite_output_dir=True)) is None         # starts over ...
    assert not list(out.glob("checkpoint-*"))                               # ... without the old checkpoints
    with pytest.raises(KTAMXConfigError, match="holds no checkpoint"):
        resolve_resume(args(resume_from_checkpoint=True))
    assert resolve_resume(args()) is None
