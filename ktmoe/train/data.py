"""Instruction data for ``ktmoe train``: local JSON / JSONL datasets in the
alpaca or sharegpt format, read with the ``datasets`` library, rendered with
a template and tokenized with the prompt masked out of the loss.

Dataset names resolve as in LLaMA-Factory: an entry of
``dataset_dir/dataset_info.json`` (``file_name``, ``formatting``:
``alpaca`` | ``sharegpt``, optional ``columns`` and ``tags``), one of the
bundled datasets (``tiny_alpaca``, ``tiny_sharegpt``), or a path to a
``.json`` / ``.jsonl`` file whose format is recognised from its columns.

* alpaca: ``instruction``, optional ``input`` (appended to the instruction on
  a new line), ``output``, optional ``system`` and ``history`` (``[[user,
  assistant], ...]`` earlier turns);
* sharegpt: ``conversations`` (or ``messages``), a list of ``{"from":
  "human"|"gpt"|"system", "value": ...}`` turns (or OpenAI style
  ``{"role": "user"|"assistant"|"system", "content": ...}``), optional
  ``system``.

Templates: ``tokenizer`` renders with the tokenizer's chat template, ``plain``
with ``User: ...`` / ``Assistant: ...<eos>`` lines, ``auto`` picks the chat
template when the tokenizer has one.  The loss covers the assistant turns
only (every assistant turn, or the last one with ``mask_history``; all tokens
with ``train_on_prompt``); labels of other tokens are -100.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from ..hf.errors import KTAMXConfigError
from .tiny import DATA_DIR

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
_SHAREGPT_TAGS = dict(role_tag="from", content_tag="value", user_tag="human", assistant_tag="gpt",
                      system_tag="system")
_OPENAI_TAGS = dict(role_tag="role", content_tag="content", user_tag="user", assistant_tag="assistant",
                    system_tag="system")
_ALPACA_COLUMNS = dict(prompt="instruction", query="input", response="output", system="system",
                       history="history")


# ------------------------------------------------------------------ templates

class Template:
    """Renders a conversation (``[{"role", "content"}]`` alternating user /
    assistant, plus an optional system prompt) to text, and finds the
    character spans of the assistant turns."""

    def __init__(self, name: str, tokenizer):
        self.name = name
        self.tokenizer = tokenizer
        if name == "plain" and not tokenizer.eos_token:
            raise KTAMXConfigError("template 'plain' needs a tokenizer with an eos_token")
        if name == "tokenizer" and not getattr(tokenizer, "chat_template", None):
            raise KTAMXConfigError("template 'tokenizer': the tokenizer has no chat template; use template: plain")

    @property
    def add_special_tokens(self) -> bool:
        # chat templates write their own BOS; the plain template lets the tokenizer add it
        return self.name == "plain"

    def render(self, messages: Sequence[dict], system: Optional[str], add_generation_prompt: bool) -> str:
        if self.name == "tokenizer":
            msgs = ([{"role": "system", "content": system}] if system else []) + list(messages)
            return self.tokenizer.apply_chat_template(msgs, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt)
        eos = self.tokenizer.eos_token
        parts = [f"{system}\n\n"] if system else []
        for m in messages:
            if m["role"] == "user":
                parts.append(f"User: {m['content']}\n")
            else:
                parts.append(f"Assistant: {m['content']}{eos}\n")
        if add_generation_prompt:
            parts.append("Assistant: ")
        return "".join(parts)

    def assistant_spans(self, messages: Sequence[dict], system: Optional[str]) -> Tuple[str, List[Tuple[int, int]]]:
        """(full text, [(start, end)] character span of each assistant turn,
        including what the template writes after it up to the next turn)."""
        full = self.render(messages, system, False)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prompt = self.render(messages[:i], system, True)
            upto = self.render(messages[:i + 1], system, False)
            if not (upto.startswith(prompt) and full.startswith(upto)):
                raise KTAMXConfigError(
                    f"template '{self.name}': the chat template does not render a conversation as the "
                    "concatenation of its turns (a prefix of the conversation renders differently inside "
                    "the whole), so the assistant tokens cannot be located; use template: plain")
            spans.append((len(prompt), len(upto)))
        return full, spans

    def encode_prompt(self, messages: Sequence[dict], system: Optional[str]) -> List[int]:
        """Token ids of a conversation ending with a user turn, followed by the
        start of the assistant's reply (for generation)."""
        text = self.render(messages, system, True)
        return self.tokenizer(text, add_special_tokens=self.add_special_tokens)["input_ids"]


def get_template(name: str, tokenizer) -> Template:
    if name == "auto":
        name = "tokenizer" if getattr(tokenizer, "chat_template", None) else "plain"
    return Template(name, tokenizer)


def encode_example(template: Template, messages: Sequence[dict], system: Optional[str], cutoff_len: int,
                   train_on_prompt: bool = False, mask_history: bool = False) -> Tuple[List[int], List[int]]:
    """(input_ids, labels) of one conversation, cut to ``cutoff_len``."""
    full, spans = template.assistant_spans(messages, system)
    if mask_history:
        spans = spans[-1:]
    enc = template.tokenizer(full, add_special_tokens=template.add_special_tokens, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    if train_on_prompt:
        labels = list(ids)
    else:
        labels = [IGNORE_INDEX] * len(ids)
        for j, (a, b) in enumerate(offsets):
            if b > a and any(a < e and b > s for s, e in spans):
                labels[j] = ids[j]
    return ids[:cutoff_len], labels[:cutoff_len]


# --------------------------------------------------------------- datasets

@dataclass
class DatasetAttr:
    name: str
    path: Path
    formatting: Optional[str] = None          # alpaca | sharegpt | None (detect)
    columns: Optional[dict] = None
    tags: Optional[dict] = None


def _read_info(dirpath: Path) -> Dict[str, dict]:
    p = dirpath / "dataset_info.json"
    if not p.is_file():
        return {}
    try:
        info = json.loads(p.read_text(encoding="utf-8"))
    except ValueError as e:
        raise KTAMXConfigError(f"{p}: not valid JSON: {e}") from None
    if not isinstance(info, dict):
        raise KTAMXConfigError(f"{p}: expected a JSON object of dataset entries")
    return info


def resolve_datasets(dataset: str, dataset_dir: Optional[str]) -> List[DatasetAttr]:
    """The dataset entries named by ``dataset`` (comma-separated)."""
    user_dir = Path(dataset_dir) if dataset_dir else None
    if user_dir is not None and not user_dir.is_dir():
        raise KTAMXConfigError(f"dataset_dir {user_dir} is not a directory")
    infos = []
    if user_dir is not None:
        infos.append((user_dir, _read_info(user_dir)))
    infos.append((DATA_DIR, _read_info(DATA_DIR)))
    out = []
    for name in [n.strip() for n in dataset.split(",") if n.strip()]:
        for base, info in infos:
            if name in info:
                e = info[name]
                if not isinstance(e, dict) or "file_name" not in e:
                    raise KTAMXConfigError(f"{base / 'dataset_info.json'}: entry '{name}' needs a file_name")
                fmt = e.get("formatting")
                if fmt not in (None, "alpaca", "sharegpt"):
                    raise KTAMXConfigError(f"{base / 'dataset_info.json'}: entry '{name}': formatting "
                                           f"'{fmt}' is not supported (alpaca, sharegpt)")
                out.append(DatasetAttr(name, base / e["file_name"], fmt, e.get("columns"), e.get("tags")))
                break
        else:
            p = Path(name)
            if not p.is_absolute() and user_dir is not None and (user_dir / p).exists():
                p = user_dir / p
            if not p.is_file():
                known = sorted({k for _, info in infos for k in info})
                raise KTAMXConfigError(
                    f"dataset '{name}' is neither a file nor a dataset name; known names: {', '.join(known)}"
                    + ("" if user_dir else " (set dataset_dir to use a dataset_info.json)"))
            out.append(DatasetAttr(p.stem, p))
    if not out:
        raise KTAMXConfigError("dataset is empty")
    for a in out:
        if not a.path.is_file():
            raise KTAMXConfigError(f"dataset '{a.name}': file {a.path} does not exist")
        if a.path.suffix.lower() not in (".json", ".jsonl"):
            raise KTAMXConfigError(f"dataset '{a.name}': {a.path} is not a .json or .jsonl file")
    return out


def _detect(attr: DatasetAttr, columns: Sequence[str]) -> str:
    cols = set(columns)
    if attr.formatting:
        return attr.formatting
    want_msgs = (attr.columns or {}).get("messages")
    if want_msgs and want_msgs in cols or cols & {"conversations", "messages"}:
        return "sharegpt"
    if (attr.columns or {}).get("prompt", "instruction") in cols:
        return "alpaca"
    raise KTAMXConfigError(
        f"dataset '{attr.name}' ({attr.path}): cannot tell its format from its columns {sorted(cols)}; expected "
        "alpaca (instruction, input, output) or sharegpt (conversations)")


def _to_messages(fmt: str, attr: DatasetAttr):
    """A function example -> {"messages": [...], "system": str, "_ok": bool}."""
    if fmt == "alpaca":
        c = dict(_ALPACA_COLUMNS, **(attr.columns or {}))

        def conv(ex):
            msgs = []
            for pair in ex.get(c["history"]) or []:
                if isinstance(pair, (list, tuple)) and len(pair) == 2:
                    msgs += [{"role": "user", "content": str(pair[0])},
                             {"role": "assistant", "content": str(pair[1])}]
            prompt = ex.get(c["prompt"]) or ""
            query = ex.get(c["query"]) or ""
            user = f"{prompt}\n{query}" if prompt and query else (prompt or query)
            resp = ex.get(c["response"])
            ok = bool(user) and isinstance(resp, str) and bool(resp)
            msgs += [{"role": "user", "content": str(user)}, {"role": "assistant", "content": str(resp or "")}]
            return {"messages": msgs, "system": str(ex.get(c["system"]) or ""), "_ok": ok}

        return conv

    cols = attr.columns or {}
    msg_col = cols.get("messages")
    sys_col = cols.get("system", "system")

    def conv(ex):
        turns = ex.get(msg_col) if msg_col else (ex.get("conversations") or ex.get("messages"))
        turns = list(turns or [])
        tags = dict(_SHAREGPT_TAGS)
        if turns and isinstance(turns[0], dict) and "role" in turns[0] and "from" not in turns[0]:
            tags = dict(_OPENAI_TAGS)
        tags.update(attr.tags or {})
        system = ex.get(sys_col) or ""
        msgs, ok = [], bool(turns)
        for j, t in enumerate(turns):
            if not isinstance(t, dict):
                ok = False
                break
            role, content = t.get(tags["role_tag"]), t.get(tags["content_tag"])
            if role == tags["system_tag"] and j == 0:
                system = content or system
                continue
            want = tags["user_tag"] if len(msgs) % 2 == 0 else tags["assistant_tag"]
            if role != want or not isinstance(content, str):
                ok = False
                break
            msgs.append({"role": "user" if role == tags["user_tag"] else "assistant", "content": content})
        if not msgs or len(msgs) % 2:
            ok = False
        if not ok:
            msgs = [{"role": "user", "content": ""}, {"role": "assistant", "content": ""}]
        return {"messages": msgs, "system": str(system), "_ok": ok}

    return conv


def load_conversations(data_args, seed: int = 42):
    """The datasets of ``data_args`` as one ``datasets.Dataset`` with columns
    ``messages`` (``[{"role", "content"}]``) and ``system``."""
    import datasets

    parts = []
    for attr in resolve_datasets(data_args.dataset, data_args.dataset_dir):
        try:
            ds = datasets.load_dataset(
                "json", data_files=str(attr.path), split="train",
                download_mode="force_redownload" if data_args.overwrite_cache else None)
        except Exception as e:
            raise KTAMXConfigError(f"dataset '{attr.name}': cannot read {attr.path}: {e}") from None
        if data_args.max_samples is not None and len(ds) > data_args.max_samples:
            ds = ds.select(range(data_args.max_samples))
        fmt = _detect(attr, ds.column_names)
        ds = ds.map(_to_messages(fmt, attr), remove_columns=ds.column_names,
                    num_proc=data_args.preprocessing_num_workers,
                    load_from_cache_file=not data_args.overwrite_cache, desc=f"reading {attr.name}")
        bad = len(ds) - sum(ds["_ok"])
        if bad:
            logger.warning("dataset '%s': %d of %d examples are not valid %s conversations and are skipped",
                           attr.name, bad, len(ds), fmt)
            ds = ds.filter(lambda ok: ok, input_columns="_ok")
        if len(ds) == 0:
            raise KTAMXConfigError(f"dataset '{attr.name}' ({attr.path}) has no usable examples")
        parts.append(ds.remove_columns("_ok"))
    return datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]


def tokenize_dataset(ds, template: Template, data_args):
    """Tokenized ``input_ids`` / ``attention_mask`` / ``labels``; examples
    whose assistant tokens are all cut off by ``cutoff_len`` are dropped."""
    default_system = data_args.default_system

    def enc(ex):
        ids, labels = encode_example(template, ex["messages"], ex["system"] or default_system,
                                     data_args.cutoff_len, data_args.train_on_prompt, data_args.mask_history)
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels,
                "_n": sum(1 for x in labels if x != IGNORE_INDEX)}

    out = ds.map(enc, remove_columns=ds.column_names, num_proc=data_args.preprocessing_num_workers,
                 load_from_cache_file=not data_args.overwrite_cache, desc="tokenizing")
    empty = sum(1 for n in out["_n"] if n == 0)
    if empty:
        logger.warning("%d of %d examples have no response tokens within cutoff_len=%d and are dropped",
                       empty, len(out), data_args.cutoff_len)
        out = out.filter(lambda n: n > 0, input_columns="_n")
    if len(out) == 0:
        raise KTAMXConfigError(f"no example keeps a response token within cutoff_len={data_args.cutoff_len}")
    return out.remove_columns("_n")


def get_dataset(template: Template, data_args, seed: int = 42) -> dict:
    """``{"train_dataset": ..., "eval_dataset": ... or None}``, tokenized."""
    ds = tokenize_dataset(load_conversations(data_args, seed), template, data_args)
    eval_ds = None
    if data_args.val_size:
        v = data_args.val_size
        n = int(v) if v >= 1 else int(round(v * len(ds)))
        if n < 1 or n >= len(ds):
            raise KTAMXConfigError(f"val_size={v} leaves no training or no evaluation example "
                                   f"({len(ds)} examples)")
        split = ds.train_test_split(test_size=n, seed=seed)
        ds, eval_ds = split["train"], split["test"]
    return {"train_dataset": ds, "eval_dataset": eval_ds}


class SFTDataCollator:
    """Pads ``input_ids`` (with ``pad_token_id``), ``attention_mask`` (0) and
    ``labels`` (-100) on the right to the longest example of the batch."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: Optional[int] = None):
        self.pad_token_id = int(pad_token_id)
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features):
        import torch

        n = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            n = (n + m - 1) // m * m
        ids = torch.full((len(features), n), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(features), n), dtype=torch.long)
        labels = torch.full((len(features), n), IGNORE_INDEX, dtype=torch.long)
        for i, f in enumerate(features):
            k = len(f["input_ids"])
            ids[i, :k] = torch.as_tensor(f["input_ids"])
            mask[i, :k] = 1
            labels[i, :k] = torch.as_tensor(f["labels"])
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


__all__ = ["Template", "get_template", "encode_example", "resolve_datasets", "load_conversations",
           "tokenize_dataset", "get_dataset", "SFTDataCollator", "IGNORE_INDEX", "DatasetAttr"]
