"""Sharing HFT adapters on the Hugging Face Hub: the model card, and ``push_to_hub`` that keeps it.

PEFT writes a model card (``README.md``) in ``save_pretrained`` with ``library_name: peft`` and the base model, but it
knows nothing of HFT; and ``PeftModel.push_to_hub`` is transformers' generic ``PushToHubMixin.push_to_hub``, which
saves the adapter and then *overwrites* that card with a transformers card (``library_name: transformers``, no
``base_model``). :func:`patch_peft` (run when ``peft_hft`` is imported) therefore

* extends ``PeftModel.create_or_update_model_card`` so that a model with HFT adapters gets the HFT tags, the base
  model and a usage section (between ``<!-- peft-hft:start -->`` and ``<!-- peft-hft:end -->``, rewritten on every
  save, everything else of the card kept);
* replaces ``PeftModel.push_to_hub`` for models with HFT adapters with one that starts from the card already on the
  Hub (if any), saves with ``save_pretrained`` (which updates that card), names the repo in the usage snippet and
  uploads the folder in one commit with ``HfApi.upload_folder``. Other PEFT models keep the original method.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Optional

from ..utils import float_dtype
from .patching import hft_configs, patch

HFT_TAGS = ("hft", "peft-hft", "half-fine-tuning")
SECTION_START = "<!-- peft-hft:start -->"
SECTION_END = "<!-- peft-hft:end -->"
PAPER_URL = "https://arxiv.org/abs/2404.18466"
_AUTO_CLASS = {
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "FEATURE_EXTRACTION": "AutoModel",
}
_AUTO_PEFT_CLASS = {
    "CAUSAL_LM": "AutoPeftModelForCausalLM",
    "SEQ_2_SEQ_LM": "AutoPeftModelForSeq2SeqLM",
    "SEQ_CLS": "AutoPeftModelForSequenceClassification",
    "TOKEN_CLS": "AutoPeftModelForTokenClassification",
    "QUESTION_ANS": "AutoPeftModelForQuestionAnswering",
    "FEATURE_EXTRACTION": "AutoPeftModelForFeatureExtraction",
}


def hub_model_id(name: Optional[str]) -> Optional[str]:
    """``name`` if it is a Hub repo id (``owner/name``) rather than a local path, else ``None``."""
    from ..format.checkpoint import is_repo_id

    return str(name) if is_repo_id(name) else None


def _value(config: Any, key: str, default: Any = None) -> Any:
    return config.get(key, default) if isinstance(config, Mapping) else getattr(config, key, default)


def _describe_selection(config: Any) -> str:
    names = _value(config, "selected_parameters") or []
    how = (
        f"strategy `{_value(config, 'strategy')}`, ratio {_value(config, 'ratio')}, seed {_value(config, 'seed')}"
        if _value(config, "strategy")
        else "custom selection"
    )
    return f"{len(names)} tensors ({how})"


def card_section(
    configs: Mapping[str, Any],
    repo_id: Optional[str] = None,
    base_model: Optional[str] = None,
    sizes: Optional[Mapping[str, int]] = None,
    provenance: Optional[str] = None,
) -> str:
    """The HFT part of a model card: what the adapter is, its base, and how to load or merge it.

    Args:
        configs: adapter name -> HFTConfig (or its dict).
        repo_id: Where the adapter is published; a placeholder is used when unknown.
        base_model: The base model (Hub id or path).
        sizes: adapter name -> bytes of its diff tensors, if known.
        provenance: One sentence on how the adapter was made, if not by training.
    """
    adapter = repo_id or "<this adapter: Hub repo id or local directory>"
    base = base_model or "<the base model>"
    first = next(iter(configs.values()))
    task = str(_value(first, "task_type") or "CAUSAL_LM").split(".")[-1]
    auto = _AUTO_CLASS.get(task, "AutoModelForCausalLM")
    auto_peft = _AUTO_PEFT_CLASS.get(task, "AutoPeftModelForCausalLM")
    lines = [
        SECTION_START,
        "## HFT adapter",
        "",
        f"A [Half Fine-Tuning (HFT)]({PAPER_URL}) adapter made with [peft-hft](https://pypi.org/project/peft-hft/). "
        "HFT trains a chosen half of the model's tensors in full and freezes the rest; this adapter stores, for each "
        "trained tensor, `tuned - base` (the diff), and nothing else.",
        "",
    ]
    if provenance:
        lines += [provenance, ""]
    for name, config in configs.items():
        size = f", {sizes[name] / 1e6:,.1f} MB of diffs" if sizes and name in sizes else ""
        where = "" if name == "default" else f" (subfolder `{name}`)"
        lines.append(f"- adapter `{name}`{where}: {_describe_selection(config)}{size}")
    fingerprint = _value(first, "base_fingerprint") or {}
    revision = fingerprint.get("revision")
    lines += [
        f"- base model: `{base}`" + (f" at revision `{revision}`" if revision else ""),
        "- integrity: the adapter records a digest (XXH3-128) of every base tensor it modifies; loading or merging "
        "it onto another base fails with an error that lists the differing tensors.",
        "",
        "### Usage",
        "",
        "```python",
        "import peft_hft  # registers the HFT method with PEFT (pip install peft-hft)",
        f"from peft import PeftModel, {auto_peft}",
        f"from transformers import {auto}",
        "",
        f'base = {auto}.from_pretrained("{base}")',
        f'model = PeftModel.from_pretrained(base, "{adapter}")',
        "model = model.merge_and_unload()  # optional: a plain transformers model",
        "",
        "# or in one step, the base model being read from the adapter's config:",
        f'model = {auto_peft}.from_pretrained("{adapter}")',
        "```",
        "",
        "Merge on disk, shard by shard, without loading the model into memory:",
        "",
        "```bash",
        f"peft-hft merge {base} {adapter} merged-model/",
        "```",
        SECTION_END,
    ]
    return "\n".join(lines)


def update_model_card(
    directory: os.PathLike | str,
    configs: Mapping[str, Any],
    repo_id: Optional[str] = None,
    base_model: Optional[str] = None,
    extra_tags: Iterable[str] = (),
    sizes: Optional[Mapping[str, int]] = None,
    provenance: Optional[str] = None,
) -> Path:
    """Create or update ``directory/README.md`` for HFT adapters (metadata and the HFT section); returns its path.

    Metadata: ``library_name: peft``, the HFT tags, ``base_model`` (when it is a Hub id) and the usual
    ``base_model:adapter:<id>`` tag, ``pipeline_tag: text-generation`` for causal LMs. Text outside the HFT section is
    kept, so a card written by hand survives re-saving.
    """
    from huggingface_hub import ModelCard, ModelCardData

    path = Path(directory) / "README.md"
    if path.is_file():
        card = ModelCard(path.read_text(encoding="utf-8"), ignore_metadata_errors=True)
    else:
        card = ModelCard.from_template(ModelCardData())
    hub_base = hub_model_id(base_model)
    card.data.library_name = "peft"
    tags = list(card.data.tags or [])
    wanted = list(HFT_TAGS) + list(extra_tags or ()) + ([f"base_model:adapter:{hub_base}"] if hub_base else [])
    card.data.tags = tags + [t for t in wanted if t not in tags]
    if hub_base:
        card.data.base_model = hub_base
    first = next(iter(configs.values()))
    if str(_value(first, "task_type") or "").endswith("CAUSAL_LM") and not card.data.pipeline_tag:
        card.data.pipeline_tag = "text-generation"
    section = card_section(configs, repo_id, base_model, sizes, provenance)
    text = card.text
    pattern = re.compile(re.escape(SECTION_START) + r".*?" + re.escape(SECTION_END), re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text, count=1)
    else:
        lines = text.splitlines()
        title = next((i for i, line in enumerate(lines) if line.startswith("# ")), None)
        at = 0 if title is None else title + 1
        text = "\n".join(lines[:at] + ["", section, ""] + lines[at:])
    card.text = text
    card.save(path)
    return path


# ------------------------------------------------------------------------------------------------------------------
# PeftModel integration
# ------------------------------------------------------------------------------------------------------------------


def _base_model_name(peft_model: Any, configs: Mapping[str, Any]) -> Optional[str]:
    for config in configs.values():
        if getattr(config, "base_model_name_or_path", None):
            return config.base_model_name_or_path
    base = peft_model.get_base_model()
    return getattr(base, "name_or_path", None) or None


def _diff_sizes(peft_model: Any, configs: Mapping[str, Any], directory: Optional[os.PathLike | str] = None
                ) -> dict[str, int]:
    """Tensor bytes of each adapter: from the weights file just saved in ``directory`` (any ``diff_encoding``), else
    estimated from the dtypes."""
    from ..format.checkpoint import read_header
    from ..format.keys import ADAPTER_WEIGHTS

    sizes = {}
    for name in configs:
        path = Path(directory or "", "" if name == "default" else name, ADAPTER_WEIGHTS)
        if directory is not None and path.is_file():
            sizes[name] = sum(entry.nbytes for entry in read_header(path)[0].values())
    return {**_estimated_sizes(peft_model, {n: c for n, c in configs.items() if n not in sizes}), **sizes}


def _estimated_sizes(peft_model: Any, configs: Mapping[str, Any]) -> dict[str, int]:

    from ..tuner.layer import find_ledger

    ledger = find_ledger(peft_model)
    sizes = {}
    for name, config in configs.items():
        if ledger is None or name not in ledger.hft_adapters:
            continue
        dtype = float_dtype(config.diff_dtype, "HFTConfig.diff_dtype")
        total = 0
        for param_name in ledger.hft_adapters[name].params:
            param = ledger.root.get_parameter(param_name)
            total += param.numel() * (dtype or param.dtype).itemsize
        sizes[name] = total
    return sizes


def write_hft_card(peft_model: Any, directory: os.PathLike | str, repo_id: Optional[str] = None,
                   extra_tags: Iterable[str] = ()) -> Optional[Path]:
    """Update the card in ``directory`` for the HFT adapters of ``peft_model`` (no-op without HFT adapters)."""
    configs = hft_configs(peft_model)
    if not configs:
        return None
    return update_model_card(
        directory, configs, repo_id, _base_model_name(peft_model, configs), extra_tags,
        _diff_sizes(peft_model, configs, directory),
    )


def _existing_card(api: Any, repo_id: str, revision: Optional[str], into: Path) -> None:
    """Put the repo's current README.md (if any) into ``into`` so that saving updates it instead of replacing it."""
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    with tempfile.TemporaryDirectory() as cache:
        try:
            path = api.hf_hub_download(repo_id, "README.md", revision=revision, cache_dir=cache)
        except (EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError):
            return
        (into / "README.md").write_bytes(Path(path).read_bytes())


def push_hft_to_hub(
    peft_model: Any,
    repo_id: str,
    *,
    commit_message: Optional[str] = None,
    commit_description: Optional[str] = None,
    private: Optional[bool] = None,
    token: Optional[bool | str] = None,
    revision: Optional[str] = None,
    create_pr: bool = False,
    tags: Optional[list[str]] = None,
    **save_kwargs: Any,
):
    """Upload the adapters of ``peft_model`` with an HFT model card, in one commit; returns the ``CommitInfo``.

    Accepts the arguments of transformers' ``push_to_hub``; other keyword arguments go to ``save_pretrained``
    (e.g. ``selected_adapters``).
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    if revision is not None and not revision.startswith("refs/pr"):
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    save_kwargs.pop("max_shard_size", None)  # a transformers argument; adapters are never sharded
    save_kwargs.pop("safe_serialization", None)  # HFT adapters are always saved as safetensors
    with tempfile.TemporaryDirectory() as work:
        folder = Path(work)
        _existing_card(api, repo_id, revision, folder)
        peft_model.save_pretrained(folder, **save_kwargs)
        write_hft_card(peft_model, folder, repo_id=repo_id, extra_tags=tags or ())
        # One commit with every file (upload_folder may split a folder into several commits).
        operations = [
            CommitOperationAdd(path_in_repo=path.relative_to(folder).as_posix(), path_or_fileobj=str(path))
            for path in sorted(folder.rglob("*"))
            if path.is_file()
        ]
        return api.create_commit(
            repo_id=repo_id,
            operations=operations,
            commit_message=commit_message or "Upload HFT adapter",
            commit_description=commit_description,
            revision=revision,
            create_pr=create_pr,
        )


def _create_or_update_model_card(original):
    def create_or_update_model_card(self, output_dir, *args, **kwargs):
        result = original(self, output_dir, *args, **kwargs)
        if hft_configs(self):
            write_hft_card(self, output_dir)
        return result

    return create_or_update_model_card


def _push_to_hub(original):
    def push_to_hub(self, repo_id, *args, **kwargs):
        if hft_configs(self) and not args:
            return push_hft_to_hub(self, repo_id, **kwargs)
        return original(self, repo_id, *args, **kwargs)

    return push_to_hub


def patch_peft() -> None:
    """Give PEFT models with HFT adapters the HFT model card and a card-preserving ``push_to_hub``. Idempotent."""
    from peft import PeftModel

    patch(PeftModel, "create_or_update_model_card", _create_or_update_model_card)
    patch(PeftModel, "push_to_hub", _push_to_hub)
