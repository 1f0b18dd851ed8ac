"""Property-based tests (hypothesis) of the adapter reader: malformed adapters never get past it.

Starting from a normally saved adapter of a tiny Llama, hypothesis edits ``adapter_config.json`` (fields set to values
of every JSON type, fields removed, the text cut or overwritten) and ``adapter_model.safetensors`` (keys added and
removed, dtypes, shapes and values changed, the header and the bytes damaged). For every case, loading with
``PeftModel.from_pretrained`` either works (the edit was harmless: an unused field) or raises one of the package's
errors with a message; after a refused load the base model is bit-identical, and no file appears anywhere but in the
case's own directory.

The default run tries a few dozen cases per property (seconds); ``pytest -m fuzz tests/...`` runs the same
properties with many more (docs/security.md has the numbers).
"""

from __future__ import annotations

import json
import shutil
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from tiny_models import tiny_model

from peft_hft import HFTConfig
from peft_hft.format.fingerprint import BaseMismatchError
from peft_hft.format.keys import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PEFT_KEY_PREFIX, diff_key
from peft_hft.format.reader import AdapterFormatError
from peft_hft.integrations.patching import looks_like_hft_config

DEFAULT_EXAMPLES = 100
FUZZ_EXAMPLES = 2000
PACKAGE_ERRORS = (AdapterFormatError, BaseMismatchError, FileNotFoundError)
_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
DEFAULT = settings(max_examples=DEFAULT_EXAMPLES, derandomize=True, **_COMMON)  # the same cases on every run
FUZZ = settings(max_examples=FUZZ_EXAMPLES, **_COMMON)  # new random cases on every run


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    """(good adapter directory, base model to load onto, its state dict, a scratch root for the cases)."""
    root = tmp_path_factory.mktemp("fuzz")
    model = tiny_model("llama", layers=1)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    peft_model = get_peft_model(model, HFTConfig(init_weights=False, seed=0))
    good = root / "good"
    peft_model.save_pretrained(good)
    base = peft_model.unload()
    assert all(torch.equal(base.state_dict()[k], v) for k, v in base_state.items())
    base_state["requires_grad"] = {n: p.requires_grad for n, p in base.named_parameters()}
    return good, base, base_state, root / "cases"


def files_outside(root: Path, case: Path) -> set[str]:
    seen = set()
    for top in (root.parent, Path.cwd()):
        for path in top.rglob("*") if top == root.parent else top.iterdir():
            if case not in path.parents and path != case:
                seen.add(str(path))
    return seen


def check_unchanged(base: torch.nn.Module, base_state: dict) -> None:
    state = base.state_dict()
    assert state.keys() == base_state.keys() - {"requires_grad"}
    for key, value in state.items():
        assert torch.equal(value, base_state[key]), f"{key} changed"
    assert {n: p.requires_grad for n, p in base.named_parameters()} == base_state["requires_grad"]


def still_hft(case: Path) -> bool:
    """Whether the edited adapter still shows that it is HFT (what decides whether peft-hft reads it at all)."""
    config = case / ADAPTER_CONFIG
    return config.is_file() and looks_like_hft_config(config.read_bytes().decode("utf-8", errors="replace"))


def attempt(setting, write) -> None:
    """Write a case with ``write(directory)``, load it, and check the properties of the module docstring."""
    good, base, base_state, cases = setting
    cases.mkdir(exist_ok=True)
    case = Path(tempfile.mkdtemp(dir=cases))
    shutil.copytree(good, case, dirs_exist_ok=True)
    write(case)
    outside = files_outside(cases, case)
    try:
        model = PeftModel.from_pretrained(base, case)
    except PACKAGE_ERRORS as exc:
        assert str(exc).strip(), f"{type(exc).__name__} without a message"
        check_unchanged(base, base_state)
        assert not hasattr(base, "hft") and not hasattr(base, "peft_config")
    except Exception:
        # A config with no HFT mark left is any method's broken config: PEFT reports it, as it would without
        # peft-hft (tests/integrations/test_non_hft_unchanged.py), before it touches the model.
        if still_hft(case):
            raise
        check_unchanged(base, base_state)
    else:  # a harmless edit: the adapter loaded; take it off again
        assert model.unload() is base
        check_unchanged(base, base_state)
    finally:
        assert files_outside(cases, case) == outside
        shutil.rmtree(case, ignore_errors=True)


# ------------------------------------------------------------------------------------------------------------------
# adapter_config.json
# ------------------------------------------------------------------------------------------------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8,
)
FIELDS = st.sampled_from([
    "peft_type", "selected_parameters", "base_fingerprint", "ratio", "strategy", "seed", "diff_dtype",
    "trainable_token_indices", "modules_to_save", "target_modules", "inference_mode", "originals_device",
    "init_weights", "task_type", "base_model_name_or_path", "revision", "layers_pattern", "unknown_field",
])
CONFIG_EDITS = st.one_of(
    st.tuples(st.just("set"), FIELDS, JSON),
    st.tuples(st.just("delete"), FIELDS, st.none()),
    st.tuples(st.just("fingerprint"), st.sampled_from(["dtype", "shape", "xxh3_128", "rounded", "record", "drop"]), JSON),
    st.tuples(st.just("selected"), st.sampled_from(["drop", "add", "rename", "duplicate"]), st.text(max_size=30)),
    st.tuples(st.just("truncate"), st.integers(0, 4000), st.none()),
    st.tuples(st.just("bytes"), st.binary(max_size=64), st.none()),
)


def edit_config(case: Path, edit) -> None:
    path = case / ADAPTER_CONFIG
    kind, what, value = edit
    text = path.read_text()
    if kind == "truncate":
        path.write_text(text[: what % max(1, len(text))])
        return
    if kind == "bytes":
        path.write_bytes(what)
        return
    config = json.loads(text)
    if kind == "set":
        config[what] = value
    elif kind == "delete":
        config.pop(what, None)
    elif kind == "fingerprint":
        records = config["base_fingerprint"]["tensors"]
        name = next(iter(records))
        if what == "drop":
            records.pop(name)
        elif what == "record":
            records[name] = value
        else:
            records[name][what] = value
    else:
        selected = config["selected_parameters"]
        if what == "drop":
            selected.pop()
        elif what == "add":
            selected.append(value)
        elif what == "rename":
            selected[0] = value
        else:
            selected.append(selected[0])
    path.write_text(json.dumps(config))


def config_property(setting, edit) -> None:
    attempt(setting, lambda case: edit_config(case, edit))


@DEFAULT
@given(edit=CONFIG_EDITS)
def test_config_edits(setting, edit):
    config_property(setting, edit)


@pytest.mark.fuzz
@FUZZ
@given(edit=CONFIG_EDITS)
def test_config_edits_fuzz(setting, edit):
    config_property(setting, edit)


# ------------------------------------------------------------------------------------------------------------------
# adapter_model.safetensors
# ------------------------------------------------------------------------------------------------------------------

DTYPES = st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.int8,
                          torch.uint8, torch.bool, torch.int64])
TENSOR_EDITS = st.one_of(
    st.tuples(st.just("drop"), st.integers(0, 100), st.none()),
    st.tuples(st.just("add"), st.sampled_from(["weight", "diff-of-unselected", "diff-of-selected", "junk"]),
              st.text(max_size=20)),
    st.tuples(st.just("dtype"), st.integers(0, 100), DTYPES),
    st.tuples(st.just("shape"), st.integers(0, 100), st.sampled_from(["flatten", "slice", "transpose", "scalar"])),
    st.tuples(st.just("value"), st.integers(0, 100), st.sampled_from([float("nan"), float("inf"), -float("inf"),
                                                                       1e30, 0.0])),
)
BYTE_EDITS = st.one_of(
    st.tuples(st.just("truncate"), st.integers(0, 10**6), st.none()),
    st.tuples(st.just("flip"), st.integers(0, 10**6), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("header-length"), st.integers(0, 2**64 - 1), st.none()),
    st.tuples(st.just("header-field"), st.sampled_from(["dtype", "shape", "data_offsets", "entry", "metadata"]), JSON),
)


def edit_tensors(case: Path, edit, selected: list[str], all_names: list[str]) -> None:
    path = case / ADAPTER_WEIGHTS
    tensors = load_file(path)
    keys = sorted(tensors)
    kind, what, value = edit
    if kind == "drop":
        tensors.pop(keys[what % len(keys)])
    elif kind == "add":
        unselected = sorted(set(all_names) - set(selected)) or all_names
        key = {
            "weight": PEFT_KEY_PREFIX + all_names[len(value) % len(all_names)],
            "diff-of-unselected": diff_key(unselected[len(value) % len(unselected)]),
            "diff-of-selected": diff_key(selected[0]).replace(".hft_diff.", ".hft_diff.x."),
            "junk": value or "x",
        }[what]
        tensors[key] = torch.zeros(4)
    elif kind == "dtype":
        key = keys[what % len(keys)]
        tensors[key] = tensors[key].to(value)
    elif kind == "shape":
        key = keys[what % len(keys)]
        t = tensors[key]
        tensors[key] = {"flatten": t.reshape(-1), "slice": t[..., :1].contiguous(), "scalar": t.reshape(-1)[0].clone(),
                        "transpose": t.T.contiguous() if t.dim() == 2 else t.reshape(-1, 1)}[value]
    else:
        key = keys[what % len(keys)]
        tensors[key] = tensors[key].clone()
        tensors[key].view(-1)[0] = value
    save_file(tensors, path, metadata={"format": "pt"})


def edit_bytes(case: Path, edit) -> None:
    path = case / ADAPTER_WEIGHTS
    data = bytearray(path.read_bytes())
    kind, what, value = edit
    if kind == "truncate":
        data = data[: what % len(data)]
    elif kind == "flip":
        at = what % len(data)
        data[at: at + len(value)] = value
    elif kind == "header-length":
        data[:8] = struct.pack("<Q", what)
    else:
        (length,) = struct.unpack("<Q", bytes(data[:8]))
        header = json.loads(bytes(data[8: 8 + length]))
        key = next(k for k in header if k != "__metadata__")
        if what == "entry":
            header[key] = value
        elif what == "metadata":
            header["__metadata__"] = value
        else:
            header[key][what] = value
        encoded = json.dumps(header).encode()
        data = bytearray(struct.pack("<Q", len(encoded))) + encoded + data[8 + length:]
    path.write_bytes(bytes(data))


def tensor_property(setting, edit) -> None:
    good, base, *_ = setting
    selected = json.loads((good / ADAPTER_CONFIG).read_text())["selected_parameters"]
    names = [n for n, _ in base.named_parameters()]
    attempt(setting, lambda case: edit_tensors(case, edit, selected, names))


@DEFAULT
@given(edit=TENSOR_EDITS)
def test_tensor_edits(setting, edit):
    tensor_property(setting, edit)


@pytest.mark.fuzz
@FUZZ
@given(edit=TENSOR_EDITS)
def test_tensor_edits_fuzz(setting, edit):
    tensor_property(setting, edit)


@DEFAULT
@given(edit=BYTE_EDITS)
def test_byte_edits(setting, edit):
    attempt(setting, lambda case: edit_bytes(case, edit))


@pytest.mark.fuzz
@FUZZ
@given(edit=BYTE_EDITS)
def test_byte_edits_fuzz(setting, edit):
    attempt(setting, lambda case: edit_bytes(case, edit))


def test_the_fuzzed_adapter_itself_loads(setting):
    """The starting point is a valid adapter, so refusals come from the edits."""
    good, base, base_state, _ = setting
    model = PeftModel.from_pretrained(base, good)
    state = model.get_base_model().state_dict()
    assert any(not torch.equal(state[k], base_state[k]) for k in state)
    model.unload()



# ------------------------------------------------------------------------------------------------------------------
# Encoded adapters (diff_encoding): the same properties for their parts
# ------------------------------------------------------------------------------------------------------------------

ENCODED_EXAMPLES = 50


@pytest.fixture(scope="module", params=["exact", "int4", "dare:0.9", "sign"])
def encoded_setting(request, tmp_path_factory):
    """As ``setting``, for a bf16 adapter saved in one of the encodings (the weights moved by a few ulps)."""
    root = tmp_path_factory.mktemp("fuzz-encoded")
    model = tiny_model("llama", layers=1, dtype=torch.bfloat16)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    peft_model = get_peft_model(model, HFTConfig(seed=0))
    with torch.no_grad():
        for name in peft_model.peft_config["default"].selected_parameters:
            param = model.get_parameter(name)
            param.data = (param.data.view(torch.int16) + 2).view(torch.bfloat16)
    good = root / "good"
    peft_model.save_pretrained(good, diff_encoding=request.param)
    base = peft_model.unload()
    assert all(torch.equal(base.state_dict()[k], v) for k, v in base_state.items())
    base_state["requires_grad"] = {n: p.requires_grad for n, p in base.named_parameters()}
    return good, base, base_state, root / "cases"


PART_EDITS = st.one_of(
    TENSOR_EDITS,
    st.tuples(st.just("int-value"), st.integers(0, 100),
              st.tuples(st.integers(0, 10**6), st.sampled_from([-1, 0, 1, 7, 127, -128, 255, 2**31 - 1, 10**12]))),
    st.tuples(st.just("resize"), st.integers(0, 100), st.integers(-3, 3)),
)


def edit_parts(case: Path, edit) -> None:
    path = case / ADAPTER_WEIGHTS
    tensors = load_file(path)
    keys = sorted(tensors)
    kind, what, value = edit
    if kind not in ("int-value", "resize"):
        if kind in ("value", "dtype", "shape"):
            t = tensors[keys[what % len(keys)]]
            if t.numel() == 0 or (kind == "value" and not t.dtype.is_floating_point):
                return  # nothing to edit there (an empty part; a float value in an integer part)
        names = [parameter_of(k) for k in keys]
        edit_tensors(case, edit, names, names)
        return
    key = keys[what % len(keys)]
    t = tensors[key].clone()
    if kind == "int-value":
        at, number = value
        flat = t.view(-1)
        if flat.numel():
            if t.dtype.is_floating_point:
                flat[at % flat.numel()] = float(number)
            else:
                info = torch.iinfo(t.dtype) if t.dtype != torch.bool else None
                flat[at % flat.numel()] = number if info is None else max(info.min, min(info.max, number))
        tensors[key] = t
    else:
        flat = t.reshape(-1)
        grown = torch.cat([flat, flat[: max(value, 0)]]) if value >= 0 else flat[: max(0, flat.numel() + value)]
        tensors[key] = grown.contiguous()
    save_file(tensors, path, metadata={"format": "pt"})


def parameter_of(key: str) -> str:
    return key.removeprefix(PEFT_KEY_PREFIX).replace(".hft_diff.", ".").split(".exc_")[0].removesuffix(".scales") \
        .removesuffix(".mask")


@settings(max_examples=ENCODED_EXAMPLES, derandomize=True, **_COMMON)
@given(edit=PART_EDITS)
def test_encoded_part_edits(encoded_setting, edit):
    attempt(encoded_setting, lambda case: edit_parts(case, edit))


def test_the_encoded_adapters_themselves_load(encoded_setting):
    good, base, base_state, _ = encoded_setting
    model = PeftModel.from_pretrained(base, good)
    state = model.get_base_model().state_dict()
    assert any(not torch.equal(state[k], base_state[k]) for k in state)
    model.unload()
