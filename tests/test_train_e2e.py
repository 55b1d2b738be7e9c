"""``ktmoe train`` / ``ktmoe chat`` end to end on a small built-in MoE model:
the loss falls, the saved adapter reloads (into a KT-wrapped model and, with
PEFT, into the unmodified model) with the trained model's outputs, and a run
resumed from a checkpoint ends exactly where an uninterrupted run does."""

from __future__ import annotations

import gc
import json
import math
import os

import pytest
import torch

pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytest.importorskip("datasets")
pytest.importorskip("yaml")

from conftest import release_wrappers  # noqa: E402
from reference import rel_err  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:The following (rank|alpha)_pattern keys did not match")

#: a smaller built-in model than the default (2 MoE layers of 8 experts, hidden 64)
SMALL = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
         "head_dim": 16, "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
         "intermediate_size": 64}
BASE_CFG = dict(stage="sft", finetuning_type="lora", use_kt=True, kt_backend="AMXBF16", kt_num_threads=2,
                kt_tp_count=1, lora_rank=4, lora_alpha=8, lora_target="all", dataset="tiny_alpaca",
                max_samples=96, cutoff_len=64, per_device_train_batch_size=4, learning_rate=5e-3,
                lr_scheduler_type="constant", logging_steps=1, save_steps=1000, disable_tqdm=True, seed=0,
                dataloader_num_workers=0)
PROBE = "<|im_start|>user\nWhat is the capital of Peru?<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(autouse=True)
def _release(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_datasets"))
    yield
    release_wrappers()


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    from ktmoe.train.tiny import build_builtin_model

    return str(build_builtin_model(tmp_path_factory.mktemp("base"), SMALL))


def _train(cfg):
    from ktmoe.train import get_train_args, run_sft

    args = get_train_args(cfg)
    return run_sft(*args, config=cfg, progress=False)


@torch.no_grad()
def _logits(model, tokenizer, text=PROBE):
    model.eval()
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    return model(input_ids=ids).logits[0].float()


def test_cli_train_then_reload_and_chat(tmp_path, capsys):
    import yaml
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ktmoe.cli import main
    from ktmoe.train import ChatModel

    out = tmp_path / "run"
    cfg = dict(BASE_CFG, model_name_or_path="builtin:tiny-moe", builtin_model_config=SMALL, output_dir=str(out),
               max_steps=30)
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(path)]) == 0
    printed = capsys.readouterr().out
    assert "trained 30 steps" in printed and "loss curve:" in printed

    s = json.loads((out / "run_summary.json").read_text())
    assert (s["steps"], s["steps_this_run"], s["use_kt"], s["kt_moe_layers"]) == (30, 30, True, 2)
    assert s["kt_method"] == "AMXBF16_SFT" and s["builtin_model"] is True
    losses = [v for _, v in s["losses"]]
    assert len(losses) == 30 and all(math.isfinite(v) for v in losses)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 1.0, (first, last)   # ln(1024) = 6.9 at the start
    assert s["tokens_per_second"] > 0 and s["tokens_this_run"] > 30 * 4
    assert s["config"]["max_steps"] == 30
    for f in ("adapter_model.safetensors", "adapter_config.json", "kt_adapter.json", "tokenizer.json",
              "train_config.yaml", "trainer_state.json", "base_model/config.json", "base_model/model.safetensors"):
        assert (out / f).is_file(), f
    assert (out / "training_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # `ktmoe chat` finds the run from its directory or from the training config
    from ktmoe.train.chat import resolve_chat_config

    for src in (str(out), str(path)):
        c = resolve_chat_config(src)
        assert c["adapter_name_or_path"] == str(out)
        assert os.path.samefile(c["model_name_or_path"], out / "base_model")
        assert (c["lora_rank"], c["lora_alpha"], c["use_kt"], c["kt_backend"]) == (4, 8.0, True, "AMXBF16")

    # the adapter on the KT-wrapped base (what `ktmoe chat` loads) ...
    chat = ChatModel(str(out), {"infer_dtype": "float32"})
    assert chat.model_args.use_kt and chat.template.name == "tokenizer"
    kt_logits = chat.logits(PROBE)
    del chat
    gc.collect()
    # ... equals PEFT's loading of it onto the unmodified transformers model
    tok = AutoTokenizer.from_pretrained(str(out))
    base = AutoModelForCausalLM.from_pretrained(str(out / "base_model"), dtype=torch.float32)
    base_logits = _logits(base, tok)
    ref = peft.PeftModel.from_pretrained(base, str(out))
    ref_logits = _logits(ref, tok)
    assert rel_err(kt_logits, ref_logits) < 1e-5
    assert rel_err(ref_logits, base_logits) > 1e-2   # the adapter is not a no-op
    del ref, base
    gc.collect()

    assert main(["chat", str(out), "--prompt", "What is 2 plus 3?", "--prompt", "Say hello.",
                 "--max-new-tokens", "6"]) == 0
    printed = capsys.readouterr().out
    assert "> What is 2 plus 3?\n" in printed and "> Say hello.\n" in printed
    assert main(["chat", str(tmp_path)]) == 2          # not an adapter directory
    assert "holds no adapter" in capsys.readouterr().err


def test_resume_matches_an_uninterrupted_run(tmp_path, base_dir):
    from safetensors.torch import load_file

    from ktmoe.train import ChatModel

    cfg = dict(BASE_CFG, model_name_or_path=base_dir, save_steps=3)
    # A: 6 steps in one go
    a = _train(dict(cfg, output_dir=str(tmp_path / "a"), max_steps=6))
    trained = _logits(a.model, a.processing_class)
    assert a.kt_summary["steps"] == 6 and a.kt_summary["resumed_from"] is None
    losses_a = a.kt_summary["losses"]
    del a
    gc.collect()
    # the saved adapter gives the trained model's outputs
    chat = ChatModel(str(tmp_path / "a"), {"infer_dtype": "float32"})
    assert rel_err(chat.logits(PROBE), trained) < 1e-6
    del chat
    gc.collect()

    # B: 3 steps, then a second run continues from output_dir's checkpoint-3
    b1 = _train(dict(cfg, output_dir=str(tmp_path / "b"), max_steps=3))
    assert (tmp_path / "b" / "checkpoint-3" / "adapter_model.safetensors").is_file()
    del b1
    gc.collect()
    b2 = _train(dict(cfg, output_dir=str(tmp_path / "b"), max_steps=6))
    s = b2.kt_summary
    assert s["resumed_from"].endswith("checkpoint-3")
    assert (s["steps"], s["steps_this_run"]) == (6, 3)
    assert [st for st, _ in s["losses"]] == [st for st, _ in losses_a] == [1, 2, 3, 4, 5, 6]
    assert [v for _, v in s["losses"]] == pytest.approx([v for _, v in losses_a], rel=1e-5)
    del b2
    gc.collect()
    ta = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    tb = load_file(str(tmp_path / "b" / "adapter_model.safetensors"))
    assert ta.keys() == tb.keys() and len(ta) > 0
    for k in ta:
        assert torch.allclose(ta[k], tb[k], rtol=1e-5, atol=1e-7), k
    # and it did train: the expert LoRA B factors moved away from zero
    assert any(float(ta[k].abs().max()) > 0 for k in ta if "experts" in k and "lora_B" in k)

    # overwrite_output_dir starts over (and drops the old checkpoints)
    b3 = _train(dict(cfg, output_dir=str(tmp_path / "b"), max_steps=2, overwrite_output_dir=True))
    assert b3.kt_summary["resumed_from"] is None and b3.kt_summary["steps"] == 2
    assert not (tmp_path / "b" / "checkpoint-6").exists()
    del b3


def test_first_step_loss_matches_plain_pytorch(tmp_path, base_dir):
    """With B = 0 the first step computes the base model; the KT model and the
    plain transformers + PEFT model (use_kt: false) give the same loss."""
    cfg = dict(BASE_CFG, model_name_or_path=base_dir, max_steps=1, max_samples=8)
    kt = _train(dict(cfg, output_dir=str(tmp_path / "kt")))
    kt_loss = kt.kt_summary["loss_first"]
    assert kt.kt_summary["use_kt"] is True
    del kt
    gc.collect()
    plain = _train(dict(cfg, output_dir=str(tmp_path / "plain"), use_kt=False))
    assert plain.kt_summary["use_kt"] is False and plain.kt_summary["kt_moe_layers"] == 0
    assert plain.kt_summary["loss_first"] == pytest.approx(kt_loss, rel=1e-5)
    del plain


def test_lora_target_decides_what_trains(tmp_path, base_dir):
    from ktmoe.hf import kt_wrappers

    cfg = dict(BASE_CFG, model_name_or_path=base_dir, max_steps=1, max_samples=8, output_dir=str(tmp_path / "o"))
    t = _train(dict(cfg, lora_target="q_proj,v_proj"))
    names = [n for n, p in t.model.named_parameters() if p.requires_grad]
    assert names and all(("q_proj" in n or "v_proj" in n) and "lora_" in n for n in names)
    assert not any(p.requires_grad for w in kt_wrappers(t.model) for p in w.lora_params.values())
    del t
    gc.collect()
    from ktmoe.hf.errors import KTAMXConfigError

    with pytest.raises(KTAMXConfigError, match="no linear module of this model"):
        _train(dict(cfg, lora_target="nonexistent_proj"))
